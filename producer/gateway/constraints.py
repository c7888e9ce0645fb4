"""OpenAI's and vLLM's ways of asking for a structured output -> the wire's `structured_outputs` param.

Accepted, one source per request: `response_format` (`text`, `json_object`, `json_schema`; the Responses
API's `text.format` is the same, flattened: `from_text_format`), vLLM's
`structured_outputs` extension (`json`, `json_object`, `regex`, `choice`, `grammar`) and vLLM's older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`. The constraint itself is checked with
the other sampling params (producer/params.py, exactly, with llguidance); `renames` maps the field an error
names there back to the one the client sent.
"""

from __future__ import annotations

from typing import Any

from producer.gateway.errors import invalid, unsupported

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
FIELDS = frozenset({"response_format", "structured_outputs", *GUIDED})


def _from_response_format(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        raise invalid("response_format", "must be an object with a type")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid("response_format.json_schema", "must be an object with name and schema")
        return _json_schema(spec, "response_format.json_schema")
    raise unsupported("response_format.type", f"{str(kind)[:32]!r} is not supported (text, json_object, json_schema)")


def _json_schema(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """`{name, schema, strict}` (chat nests it in `json_schema`, the Responses API does not) -> the constraint."""
    if spec.get("name") is not None and not isinstance(spec["name"], str):
        raise invalid(f"{where}.name", "must be a string")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise invalid(f"{where}.strict", "must be a boolean")
    # strict or not, the schema is enforced exactly: llguidance never drops a keyword silently
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise invalid(f"{where}.schema", "must be a JSON Schema object")
    return {"json": schema}


def from_text_format(value: Any) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The Responses API's `text.format` (`text`, `json_object`, `json_schema` with name, schema and strict
    beside the type) -> the wire constraint (or None) and the renames of its error fields."""
    if not isinstance(value, dict):
        raise invalid("text.format", "must be an object with a type")
    kind = value.get("type")
    if kind == "text":
        return None, {}
    if kind == "json_object":
        return {"json_object": True}, {"structured_outputs.json_object": "text.format"}
    if kind == "json_schema":
        return _json_schema(value, "text.format"), {"structured_outputs.json": "text.format.schema"}
    raise unsupported("text.format.type", f"{str(kind)[:32]!r} is not supported (text, json_object, json_schema)")


def structured_outputs(body: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The wire constraint the body asks for (or None) and the renames of its error fields."""
    given = [name for name in ("response_format", "structured_outputs", *GUIDED) if body.get(name) is not None]
    if len(given) > 1:
        raise invalid(given[1], f"only one of {given} may be given")
    if not given:
        return None, {}
    name = given[0]
    value = body[name]
    if name == "response_format":
        constraint = _from_response_format(value)
        if constraint is None:
            return None, {}
        if "json" in constraint:
            return constraint, {"structured_outputs.json": "response_format.json_schema.schema"}
        return constraint, {"structured_outputs.json_object": "response_format"}
    if name == "structured_outputs":
        if not isinstance(value, dict):
            raise invalid(
                "structured_outputs", "must be an object with one of json, json_object, regex, choice, grammar"
            )
        # vLLM's extension may carry options beside the constraint (null ones): dropped, the rest is checked
        return {k: v for k, v in value.items() if v is not None}, {}
    kind = GUIDED[name]
    return {kind: value}, {f"structured_outputs.{kind}": name, "structured_outputs": name}
