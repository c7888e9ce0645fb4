"""Sampling params on the wire: the engine's names, checked for type and range without the engine."""

from __future__ import annotations

import pytest

from engine.config import SamplingParams
from producer.errors import ProtocolError
from producer.params import PARAM_NAMES, validate_params


def test_the_wire_knows_exactly_the_engines_sampling_params() -> None:
    assert set(PARAM_NAMES) == set(SamplingParams.__slots__)  # type: ignore[attr-defined]


def test_valid_params_pass_and_are_normalised_for_the_engine() -> None:
    checked = validate_params({"max_tokens": 5, "temperature": 1, "stop": "END", "seed": 3, "logprobs": None})
    assert checked == {"max_tokens": 5, "temperature": 1.0, "stop": ["END"], "seed": 3, "logprobs": None}
    assert SamplingParams.from_dict(checked).stop == ["END"]


@pytest.mark.parametrize(
    "params",
    [
        {"top_p": 0},
        {"top_k": -2},
        {"min_p": 1.5},
        {"presence_penalty": 3},
        {"repetition_penalty": 0},
        {"ignore_eos": 1},
        {"stop_token_ids": [-1]},
        {"stop": ["x"] * 17},
        {"min_tokens": 5, "max_tokens": 2},
        {"seed": 1.5},
        {"stop": "x" * 1001},
        {"structured_outputs": {"json": {"type": "nonsense"}}},
        {"structured_outputs": {"json": {"type": "array", "uniqueItems": True}}},  # llguidance would drop it
        {"structured_outputs": {"regex": "(?=a)b"}},
        {"structured_outputs": {"grammar": "start: undefined_rule"}},
        {"structured_outputs": {"jsn": {}}},
        {"structured_outputs": {"json": {}, "regex": "a"}},
        {"logit_bias": {"5": 101}},
        {"logit_bias": {"x": 1}},
        {"allowed_token_ids": [-1]},
    ],
)
def test_out_of_range_values_are_refused_by_name(params: dict) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_params(params)
    assert any(name in str(info.value) for name in params)


def test_constraints_travel_as_plain_json_and_the_engine_reads_them_back() -> None:
    wire = {
        "structured_outputs": {"json": '{"type": "object", "properties": {"a": {"type": "integer"}}}'},
        "logit_bias": {5: 10, "6": -100},
        "allowed_token_ids": [1, 2, 3],
    }
    checked = validate_params(wire)
    assert checked["structured_outputs"] == {"json": {"type": "object", "properties": {"a": {"type": "integer"}}}}
    assert checked["logit_bias"] == {"5": 10.0, "6": -100.0}  # string keys: msgpack maps are decoded strictly
    engine_params = SamplingParams.from_dict(checked)
    assert engine_params.logit_bias == {5: 10.0, 6: -100.0} and engine_params.allowed_token_ids == [1, 2, 3]
    round_trip = validate_params(engine_params.to_dict())
    assert {name: round_trip[name] for name in checked} == checked
