"""Wire-safety checks of sampling params (types and ranges), without loading the engine.

The names and ranges follow `engine.config.SamplingParams`; the worker still builds the engine's
own object from the result, and any ValueError it raises becomes an `error` event. The bounds here
exist so that a hostile message cannot smuggle in values that are expensive before the engine looks.
The constraints (structured_outputs, logit_bias, allowed_token_ids) are checked by the engine's own
torch-free spec module, exactly (llguidance compiles the grammar) where llguidance is installed: a
producer refuses what a worker would, before anything is queued.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from engine.structured import spec as constraints
from producer.errors import ProtocolError
from producer.protocol.enums import ErrorCode

MAX_TOKENS_LIMIT = 1_000_000
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1_000
MAX_STOP_TOKEN_IDS = 1_024
_INT_LIMIT = 2**63


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -_INT_LIMIT < value < _INT_LIMIT


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _stop(value: Any) -> bool:
    items = [value] if isinstance(value, str) else value
    return (
        isinstance(items, list)
        and len(items) <= MAX_STOP_STRINGS
        and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items)
    )


def _stop_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list) and len(value) <= MAX_STOP_TOKEN_IDS and all(_int(t) and 0 <= t < 2**31 for t in value)
    )


# name -> (check, what the check demands: the text of the error)
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tokens": (lambda v: _int(v) and 1 <= v <= MAX_TOKENS_LIMIT, f"an integer in [1, {MAX_TOKENS_LIMIT}]"),
    "temperature": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _int(v) and -1 <= v < 2**31, "an integer >= -1 (0 or -1 disable it)"),
    "min_p": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "presence_penalty": (lambda v: _number(v) and -2 <= v <= 2, "a number in [-2, 2]"),
    "frequency_penalty": (lambda v: _number(v) and -2 <= v <= 2, "a number in [-2, 2]"),
    "seed": (lambda v: v is None or _int(v), "an integer or null"),
    "stop": (_stop, f"a string or a list of at most {MAX_STOP_STRINGS} non-empty strings"),
    "stop_token_ids": (_stop_token_ids, f"a list of at most {MAX_STOP_TOKEN_IDS} token ids"),
    "ignore_eos": (lambda v: isinstance(v, bool), "a boolean"),
    "min_tokens": (lambda v: _int(v) and 0 <= v <= MAX_TOKENS_LIMIT, "a non-negative integer"),
    "logprobs": (lambda v: v is None or (_int(v) and 0 <= v <= 20), "null or an integer in [0, 20]"),
    "prompt_logprobs": (lambda v: v is None or (_int(v) and 0 <= v <= 20), "null or an integer in [0, 20]"),
    "include_stop_str_in_output": (lambda v: isinstance(v, bool), "a boolean"),
    "skip_special_tokens": (lambda v: isinstance(v, bool), "a boolean"),
    # n-gram speculative decoding, where the worker runs with --speculative ngram: null follows the worker,
    # false turns it off for this request (the output is the same either way)
    "speculative": (lambda v: v is None or isinstance(v, bool), "null or a boolean"),
}
# name -> the spec's check (raises ValueError naming the field), and the plain-JSON form that travels
_CONSTRAINTS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "structured_outputs": (constraints.check_structured_outputs, lambda spec: spec.to_dict()),
    # msgpack map keys must be strings here (strict_map_key), and JSON has no others
    "logit_bias": (constraints.check_logit_bias, lambda bias: {str(k): v for k, v in bias.items()}),
    "allowed_token_ids": (constraints.check_allowed_token_ids, list),
}
PARAM_NAMES = frozenset(_RULES) | frozenset(_CONSTRAINTS)
_FLOATS = frozenset({"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"})


def validate_params(params: Any) -> dict[str, Any]:
    """A checked copy of `params`; raises ProtocolError naming the first bad field.

    Unknown names are refused rather than ignored: a misspelt `temprature` must not silently
    sample at the default.
    """
    if not isinstance(params, dict):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"params: expected a map, got {type(params).__name__}")
    checked: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(name, str) and name in _CONSTRAINTS:
            check, plain = _CONSTRAINTS[name]
            try:
                checked_value = check(value)
            except ValueError as exc:
                raise ProtocolError(ErrorCode.INVALID_REQUEST, f"params.{exc}") from None
            if checked_value is not None:
                checked[name] = plain(checked_value)
            continue
        rule = _RULES.get(name) if isinstance(name, str) else None
        if rule is None:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"params: unknown sampling parameter {str(name)[:64]!r}")
        check, demand = rule
        if not check(value):
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"params.{name}: must be {demand}, got {_short(value)}")
        if name in _FLOATS:
            value = float(value)
        elif name == "stop" and isinstance(value, str):
            value = [value]
        checked[name] = value
    if checked.get("min_tokens", 0) > checked.get("max_tokens", 16):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "params.min_tokens: must not exceed max_tokens")
    return checked


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
