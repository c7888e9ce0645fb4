"""Sampling params on the wire: the engine's names, checked for type and range without the engine."""

from __future__ import annotations

import pytest

from engine.config import SamplingParams
from producer.errors import ProtocolError
from producer.params import PARAM_NAMES, validate_params

# Issue 12: the engine has these; the request message gains them with the queue side's part of it.
NOT_ON_THE_WIRE_YET = {"structured_outputs", "logit_bias", "allowed_token_ids"}


def test_the_wire_knows_exactly_the_engines_sampling_params() -> None:
    assert set(PARAM_NAMES) == set(SamplingParams.__slots__) - NOT_ON_THE_WIRE_YET  # type: ignore[attr-defined]


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
    ],
)
def test_out_of_range_values_are_refused_by_name(params: dict) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_params(params)
    assert any(name in str(info.value) for name in params)
