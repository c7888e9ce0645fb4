"""engine/structured/spec.py: shapes, the exact backend check, wire round trips; and that it needs no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.config import SamplingParams
from engine.structured.spec import StructuredOutputs, validate_constraints

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("structured_outputs", "field"),
    [
        ({"jsn": SCHEMA}, "structured_outputs: unknown keyword"),
        ({"json": SCHEMA, "regex": "a"}, "structured_outputs: exactly one"),
        ({}, "structured_outputs: exactly one"),
        ({"json": "{not json"}, "structured_outputs.json: not valid JSON"),
        ({"json": [1]}, "structured_outputs.json: must be a JSON Schema object"),
        ({"json": {"type": "strin"}}, "structured_outputs.json: Invalid type"),
        # Keywords llguidance cannot enforce are refused, not silently dropped.
        (
            {"json": {"type": "array", "uniqueItems": True}},
            r"structured_outputs.json: Unimplemented keys: \[\"uniqueItems\"\]",
        ),
        ({"json": {"type": "string", "format": "no-such-format"}}, "structured_outputs.json: Unknown format"),
        ({"json": {"type": "string", "pattern": "(?=a)b"}}, "structured_outputs.json: .*look-around"),
        ({"json_object": False}, "structured_outputs.json_object: must be true"),
        ({"regex": "a("}, "structured_outputs.regex: .*unclosed group"),
        ({"regex": ""}, "structured_outputs.regex: must be a non-empty string"),
        ({"choice": []}, "structured_outputs.choice: must be a non-empty list"),
        ({"choice": ["a", 1]}, "structured_outputs.choice"),
        ({"grammar": "start: foo"}, "structured_outputs.grammar: .*unknown name"),
        ("json", "structured_outputs: must be a mapping"),
    ],
)
def test_bad_structured_outputs_name_the_field(structured_outputs: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(structured_outputs=structured_outputs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        validate_constraints({"structured_outputs": structured_outputs})


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"logit_bias": {"5": 101}}, "logit_bias: bias of token 5"),
        ({"logit_bias": {5: -100.5}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias: key '-1'"),
        ({"logit_bias": {"x": 1}}, "logit_bias: key 'x'"),
        ({"logit_bias": [1, 2]}, "logit_bias: must be a mapping"),
        ({"allowed_token_ids": []}, "allowed_token_ids: must be a non-empty list"),
        ({"allowed_token_ids": [1, -2]}, "allowed_token_ids: must be non-negative"),
    ],
)
def test_bad_logit_bias_and_allowed_ids_name_the_field(params: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**params)
    with pytest.raises(ValueError, match=field):
        validate_constraints(params)


def test_accepted_forms() -> None:
    assert SamplingParams(structured_outputs={"json": json.dumps(SCHEMA)}).structured_outputs == StructuredOutputs(
        json=SCHEMA
    )
    for spec in (
        {"json_object": True},
        {"regex": r"[0-9]{3}"},
        {"choice": ["yes", "no"]},
        {"grammar": 'start: "a" | "b"'},  # Lark (llguidance's dialect)
        {"grammar": 'root ::= "a" | "b"'},  # GBNF, converted to Lark
        {"json": {"type": "string", "format": "date-time"}},
        {"json": {"anyOf": [{"type": "integer", "maximum": 3}, {"type": "string", "maxLength": 2}]}},
    ):
        assert SamplingParams(structured_outputs=spec).structured_outputs is not None
    assert SamplingParams(logit_bias={"7": -100, 8: 2.5}).logit_bias == {7: -100.0, 8: 2.5}
    assert not SamplingParams().constrained and SamplingParams(allowed_token_ids=[3]).constrained


def test_round_trip_through_plain_json() -> None:
    params = SamplingParams(
        structured_outputs={"json": SCHEMA}, logit_bias={3: 1.5}, allowed_token_ids=[1, 2, 3], temperature=0.5
    )
    wire = json.loads(json.dumps(params.to_dict()))
    assert wire["structured_outputs"] == {"json": SCHEMA} and wire["logit_bias"] == {"3": 1.5}
    assert SamplingParams.from_dict(wire) == params
    plain = SamplingParams()
    assert SamplingParams.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain


def test_cache_key_keeps_property_order() -> None:
    """The order of a schema's properties is the order they are generated in."""
    a = StructuredOutputs(json={"type": "object", "properties": {"x": {"type": "integer"}, "y": {}}})
    b = StructuredOutputs(json=json.dumps({"type": "object", "properties": {"x": {"type": "integer"}, "y": {}}}))
    c = StructuredOutputs(json={"type": "object", "properties": {"y": {}, "x": {"type": "integer"}}})
    assert a.cache_key() == b.cache_key() != c.cache_key()
    assert a.cache_key() != StructuredOutputs(regex="x").cache_key()


def test_spec_imports_no_torch() -> None:
    """Producers call the validation; they install the client without torch."""
    code = (
        "import sys; from engine.structured.spec import validate_constraints;"
        "validate_constraints({'structured_outputs': {'json': {'type': 'object'}}});"
        "from engine.config import SamplingParams; SamplingParams(structured_outputs={'regex': 'a+'});"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
