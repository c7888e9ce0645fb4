"""What a structured-output constraint is, and its validation (no torch: producers import this).

Wire shapes (plain JSON; vLLM's names):

    structured_outputs: {"json": {...JSON Schema...}} | {"json": "<schema as a JSON string>"}
                      | {"json_object": true} | {"regex": "..."} | {"choice": ["a", "b"]}
                      | {"grammar": "<Lark (llguidance's dialect) or GBNF>"}
    logit_bias:         {"<token id>": bias in [-100, 100], ...}   (int keys accepted too)
    allowed_token_ids:  [token id, ...]

`validate_constraints(wire_params)` checks those three keys of a wire mapping and raises a
ValueError naming the field. When llguidance is installed the check is exact: the constraint is
compiled (without a tokenizer) and anything the backend would ignore - an unimplemented JSON Schema
keyword, an unknown `format`, a regex with look-around - is refused rather than silently dropped.
Without llguidance only shapes and types are checked and the worker reports the rest as an error.
Token ids are checked against the vocabulary by the engine (`LLMEngine.add_request`), which knows it.
"""

from __future__ import annotations

import functools
import json as _json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 200_000  # a schema, regex or grammar (as JSON text); bigger ones are refused unseen
MAX_CHOICES = 1_024
MAX_LOGIT_BIAS = 1_024  # entries (OpenAI's limit is 300)
MAX_ALLOWED_TOKEN_IDS = 262_144
_TOKEN_ID_LIMIT = 2**31


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(slots=True)
class StructuredOutputs:
    """Exactly one of the fields is set. `json` holds the schema parsed (a JSON string is accepted)."""

    json: dict[str, Any] | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [kind for kind in KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"structured_outputs: exactly one of {list(KINDS)} must be set, got {given or 'none'}")
        kind = given[0]
        field = f"structured_outputs.{kind}"
        if kind == "json":
            if isinstance(self.json, str):
                _check_size(self.json, field)
                try:
                    self.json = _json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"{field}: not valid JSON ({e})") from None
            if not isinstance(self.json, dict):
                raise ValueError(f"{field}: must be a JSON Schema object, got {type(self.json).__name__}")
            _check_size(_json.dumps(self.json), field)
        elif kind == "json_object":
            if self.json_object is not True:
                raise ValueError(f"{field}: must be true, got {self.json_object!r}")
        elif kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{field}: must be a non-empty string")
            _check_size(value, field)
        else:
            choice = self.choice
            if not isinstance(choice, (list, tuple)) or not choice:
                raise ValueError(f"{field}: must be a non-empty list of strings")
            if len(choice) > MAX_CHOICES or not all(isinstance(c, str) for c in choice):
                raise ValueError(f"{field}: must be a list of at most {MAX_CHOICES} strings")
            self.choice = list(choice)
            _check_size(_json.dumps(self.choice), field)

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) is not None)

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: self.value}

    @classmethod
    def from_dict(cls, values: Any) -> StructuredOutputs:
        if isinstance(values, StructuredOutputs):
            return values
        if not isinstance(values, dict):
            raise ValueError(f"structured_outputs: must be a mapping, got {type(values).__name__}")
        unknown = set(values) - set(KINDS)
        if unknown:
            names = sorted(map(str, unknown))
            raise ValueError(f"structured_outputs: unknown keyword(s) {names}; expected one of {list(KINDS)}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def cache_key(self) -> str:
        """Compact JSON, key order kept: a schema's property order is the order generated, so two
        schemas differing only in order are different constraints."""
        return _json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    def grammar_text(self) -> str:
        """The llguidance grammar for this constraint (needs llguidance)."""
        return _grammar_text(self.cache_key())


# JSON as json.dumps writes it (", " and ": ", no other whitespace): with free whitespace a weak
# model can spend its whole budget on blanks. A schema may ask otherwise through llguidance's
# "x-guidance" keyword (e.g. {"x-guidance": {"whitespace_flexible": true}}).
JSON_DEFAULTS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _check_size(text: str, field: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        raise ValueError(f"{field}: {len(text)} characters, at most {MAX_SPEC_CHARS}")


@functools.lru_cache(maxsize=512)
def _grammar_text(key: str) -> str:
    import llguidance

    kind, value = next(iter(_json.loads(key).items()))
    field = f"structured_outputs.{kind}"
    try:
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_DEFAULTS)  # type: ignore[arg-type]
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)  # type: ignore[arg-type]
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(value)
        if kind == "choice":
            return llguidance.grammar_from("choice", _json.dumps(value))
        return llguidance.grammar_from("grammar", value)  # Lark as is; GBNF (`::=`) converted to Lark
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None


@functools.lru_cache(maxsize=512)
def _backend_check(key: str) -> None:
    try:
        import llguidance
    except ImportError:
        return  # shapes only; the worker's compile reports the rest
    kind = next(iter(_json.loads(key)))
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(_grammar_text(key))
    # A warning is something the backend would ignore (e.g. an unknown `format`): it would
    # silently loosen the constraint, so it is refused like an error.
    if is_error or messages:
        raise ValueError(f"structured_outputs.{kind}: {_first_lines(messages)}")


def _first_lines(messages: list[str], limit: int = 600) -> str:
    text = "; ".join(" ".join(m.split()) for m in messages)  # one line: it goes into an error event
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_structured_outputs(value: Any) -> StructuredOutputs | None:
    """A StructuredOutputs from a mapping (or None), checked exactly when llguidance is installed."""
    if value is None:
        return None
    spec = StructuredOutputs.from_dict(value)
    _backend_check(spec.cache_key())
    return spec


def check_logit_bias(value: Any) -> dict[int, float] | None:
    """{token id: bias} with int or decimal-string keys (JSON has only string keys); None when empty."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"logit_bias: must be a mapping of token id to bias, got {type(value).__name__}")
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
    result: dict[int, float] = {}
    for key, bias in value.items():
        token = key if _is_int(key) else int(key) if isinstance(key, str) and key.isdigit() else None
        if token is None or not 0 <= token < _TOKEN_ID_LIMIT:
            raise ValueError(f"logit_bias: key {key!r} is not a token id (a non-negative integer)")
        if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not -100 <= bias <= 100:
            raise ValueError(f"logit_bias: bias of token {token} must be a number in [-100, 100], got {bias!r}")
        result[token] = float(bias)
    return result or None


def check_allowed_token_ids(value: Any) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("allowed_token_ids: must be a non-empty list of token ids")
    if len(value) > MAX_ALLOWED_TOKEN_IDS:
        raise ValueError(f"allowed_token_ids: at most {MAX_ALLOWED_TOKEN_IDS} ids")
    if not all(_is_int(t) and 0 <= t < _TOKEN_ID_LIMIT for t in value):
        raise ValueError("allowed_token_ids: must be non-negative integers")
    return list(value)


def check_vocab(logit_bias: dict[int, float] | None, allowed_token_ids: list[int] | None, vocab_size: int) -> None:
    """Token ids past the model's vocabulary (the engine calls this; producers do not know the vocab)."""
    for field, ids in (("logit_bias", logit_bias or ()), ("allowed_token_ids", allowed_token_ids or ())):
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise ValueError(f"{field}: token id {bad} is past the vocabulary of {vocab_size} tokens")


def validate_constraints(params: dict[str, Any]) -> None:
    """The producer's check of a wire sampling-params mapping: raises ValueError naming the field."""
    check_structured_outputs(params.get("structured_outputs"))
    check_logit_bias(params.get("logit_bias"))
    check_allowed_token_ids(params.get("allowed_token_ids"))
