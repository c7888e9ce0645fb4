"""Responses API create bodies -> a checked ResponsePlan; every refusal is a 400 naming the field.

What the server does not do (built-in or function tools, images, files, audio, reasoning options, prompt
templates, conversations, logprobs) is refused by name rather than ignored, as chat refuses its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from producer.gateway import constraints
from producer.gateway.errors import APIError, invalid, unsupported
from producer.gateway.requests import _SAMPLING, _bool, _check_fields, _int, _priority, _validated
from producer.protocol import Priority

# Accepted and ignored: they change nothing about the tokens produced.
_IGNORED = ("user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier")
# Accepted only at their neutral value (what asks for nothing this server lacks); anything else is a 400.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "auto", "none"),
    "include": (None, []),
    "top_logprobs": (None, 0),
    "truncation": (None, "disabled"),
    "reasoning": (None, {}),
    "max_tool_calls": (None,),
    "prompt": (None,),
    "conversation": (None,),
    "context_management": (None,),
    "background_options": (None,),
}
_FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "metadata",
        "stream",
        "stream_options",
        "background",
        "store",
        "text",
        "parallel_tool_calls",
        "previous_response_id",
        "priority",
        *_IGNORED,
        *_NEUTRAL,
        *_SAMPLING,
    }
)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TEXT_PARTS = frozenset({"input_text", "output_text"})
_MESSAGE_KEYS = frozenset({"type", "role", "content", "id", "status"})
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


@dataclass(slots=True)
class ResponsePlan:
    """One create call: the conversation to continue, the wire params, and what the response echoes."""

    model: str
    input: list[dict[str, str]]  # this response's own input, as wire chat messages
    instructions: str | None
    params: dict[str, Any]  # checked wire sampling params, max_tokens included
    stream: bool = False
    background: bool = False
    store: bool = True
    previous_response_id: str | None = None
    priority: Priority = Priority.NORMAL
    echo: dict[str, Any] = field(default_factory=dict)  # request fields the response object repeats

    def messages(self, history: list[dict[str, str]]) -> list[dict[str, str]]:
        """The prompt: the instructions (this response's only: OpenAI does not carry a previous response's
        over), the earlier turns, then this input."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return [*system, *history, *self.input]


def _neutral(body: dict[str, Any]) -> None:
    for name, allowed in _NEUTRAL.items():
        if name in body and body[name] not in allowed:
            raise unsupported(name)


def _metadata(value: Any) -> dict[str, str]:
    """OpenAI's limits: at most 16 string pairs, keys up to 64 characters, values up to 512."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS:
        raise invalid("metadata", f"must be an object of at most {MAX_METADATA_KEYS} string pairs")
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY or not isinstance(item, str) or len(item) > MAX_METADATA_VALUE:
            raise invalid(
                "metadata",
                f"keys must be at most {MAX_METADATA_KEY} characters, values strings of at most {MAX_METADATA_VALUE}",
            )
    return dict(value)


def _text(value: Any) -> tuple[dict[str, Any] | None, dict[str, str], dict[str, Any]]:
    """`text` -> the constraint, its error renames, and the `text` the response echoes."""
    if value is None:
        return None, {}, {"format": {"type": "text"}}
    if not isinstance(value, dict):
        raise invalid("text", "must be an object")
    for name in value:
        if name not in ("format", "verbosity"):
            raise unsupported(f"text.{name}"[:64])
    if value.get("verbosity") not in (None, "medium"):
        raise unsupported("text.verbosity")
    if value.get("format") is None:
        return None, {}, {"format": {"type": "text"}}
    constraint, renames = constraints.from_text_format(value["format"])
    return constraint, renames, {"format": value["format"]}


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content", "must be a string or a list of input_text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise unsupported(f"{where}.content[{j}].type", f"{str(kind)[:32]!r} parts are not supported (text only)")
        if not isinstance(part.get("text"), str):
            raise invalid(f"{where}.content[{j}].text", "must be a string")
        texts.append(part["text"])
    return "".join(texts)


def parse_input(value: Any) -> list[dict[str, str]]:
    """A string (one user message) or a list of message items -> wire chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid("input", "must be a string or a non-empty list of message items")
    messages = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(where, "must be an object")
        kind = item.get("type", "message")
        if kind != "message":
            raise unsupported(f"{where}.type", f"{str(kind)[:32]!r} items are not supported (message only)")
        for name in item:
            if name not in _MESSAGE_KEYS:
                raise unsupported(f"{where}.{name}"[:80])
        role = item.get("role")
        if role not in _ROLES:
            raise unsupported(
                f"{where}.role", f"{str(role)[:32]!r} is not supported (system, developer, user, assistant)"
            )
        messages.append({"role": _ROLES[role], "content": _content(item.get("content"), where)})
    return messages


def parse_response(body: Any, default_max_tokens: int) -> ResponsePlan:
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    _check_fields(body, _FIELDS)
    _neutral(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "is required and must be a string")
    if "input" not in body:
        raise invalid("input", "is required")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("instructions", "must be a string")
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise invalid("previous_response_id", "must be a string")
    stream, background = _bool(body, "stream"), _bool(body, "background")
    store = True if body.get("store") is None else _bool(body, "store")
    if background and not store:
        raise invalid("background", "background responses must be stored: leave store unset or true")
    if body.get("stream_options") is not None and (not stream or not isinstance(body["stream_options"], dict)):
        raise invalid("stream_options", "is only allowed with stream: true, as an object")
    if body.get("parallel_tool_calls") is not None and not isinstance(body["parallel_tool_calls"], bool):
        raise invalid("parallel_tool_calls", "must be a boolean")
    params = {name: body[name] for name in _SAMPLING if body.get(name) is not None}
    params["max_tokens"] = _int(body, "max_output_tokens", 1, 1_000_000, default_max_tokens)
    constraint, renames, text = _text(body.get("text"))
    if constraint is not None:
        params["structured_outputs"] = constraint
    checked = _validated(params, {"max_tokens": "max_output_tokens", **renames})
    echo = {
        "instructions": instructions,
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": _metadata(body.get("metadata")),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": previous,
        "temperature": checked.get("temperature", 1.0),
        "top_p": checked.get("top_p", 1.0),
        "text": text,
        "tool_choice": body.get("tool_choice") or "auto",
        "user": body.get("user") if isinstance(body.get("user"), str) else None,
    }
    return ResponsePlan(
        model,
        parse_input(body["input"]),
        instructions,
        checked,
        stream,
        background,
        store,
        previous,
        _priority(body),
        echo,
    )
