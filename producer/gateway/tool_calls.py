"""Generated text -> OpenAI tool calls: one parser per output format, whole or streamed.

A parser maps the text generated so far to (content, calls). It is monotonic: for a longer text the
content only grows and every call's arguments only grow, so a stream sends differences and nothing is
taken back. Parsers:

- `hermes` (tool_choice auto; the Hermes / Qwen / SmolLM2 format): calls are
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks; text outside them is content. A block
  that is not such JSON stays content. Chosen by model name (`PARSERS_BY_MODEL`), hermes by default.
- `named` and `required` (enforced tool choices, producer/gateway/tools.py): the constrained JSON.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from producer.gateway.tools import ToolMode, ToolPlan


@dataclass(slots=True)
class Call:
    name: str
    arguments: str  # JSON text, possibly a prefix while streaming


Parsed = tuple[str, list[Call]]
Parser = Callable[[str, bool], Parsed]  # (text so far, is it the whole output) -> (content, calls)

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(_OPEN) + r"(.*?)" + re.escape(_CLOSE), re.DOTALL)


def _hermes_call(inner: str) -> Call | None:
    try:
        value = json.loads(inner)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        return Call(value["name"], arguments)
    return Call(value["name"], json.dumps(arguments, ensure_ascii=False))


def _partial_tag(text: str) -> int:
    """Length of the longest end of `text` that could begin `<tool_call>` (held back while streaming)."""
    for size in range(min(len(_OPEN) - 1, len(text)), 0, -1):
        if _OPEN.startswith(text[-size:]):
            return size
    return 0


def hermes(text: str, final: bool) -> Parsed:
    content, calls, at = [], [], 0
    for block in _BLOCK.finditer(text):
        content.append(text[at : block.start()])
        call = _hermes_call(block.group(1))
        if call is None:
            content.append(block.group(0))
        else:
            calls.append(call)
        at = block.end()
    rest = text[at:]
    opened = rest.find(_OPEN)
    if opened >= 0:  # a block not closed (yet): held back; at the end, a call if it parses
        content.append(rest[:opened])
        call = _hermes_call(rest[opened + len(_OPEN) :]) if final else None
        if call is not None:
            calls.append(call)
        elif final:
            content.append(rest[opened:])
    else:
        content.append(rest if final else rest[: len(rest) - _partial_tag(rest)])
    joined = "".join(content)
    # blank lines around calls are the format's, not content; kept whole when there is no call at all
    return (joined if final and not calls else joined.rstrip()), calls


def named(name: str) -> Parser:
    return lambda text, final: ("", [Call(name, text)])


def required(text: str, final: bool) -> Parsed:
    """Prefix of `[{"name": "f", "arguments": {...}}, ...]` as the grammar writes it (name first)."""
    names: list[str] = []
    spans: list[list[int]] = []  # [start, end] of each call's arguments; end -1 while open
    depth, in_string, escaped, element_start = 0, False, False, 0
    for at, char in enumerate(text):
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth == 2:
                element_start = at
            elif depth == 3 and (not spans or spans[-1][0] < element_start):
                match = re.match(r'\{"name": ("(?:[^"\\]|\\.)*")', text[element_start:at])
                names.append(json.loads(match.group(1)) if match else "")
                spans.append([at, -1])
        elif char in "]}":
            depth -= 1
            if depth == 2 and spans and spans[-1][1] < 0:
                spans[-1][1] = at + 1
    return "", [
        Call(name, text[start : end if end >= 0 else len(text)])
        for name, (start, end) in zip(names, spans, strict=True)
    ]


PARSERS: dict[str, Parser] = {"hermes": hermes}
# model name pattern -> parser; the first match wins, hermes when none does
PARSERS_BY_MODEL: list[tuple[re.Pattern[str], str]] = [(re.compile(r"smollm|qwen|hermes", re.IGNORECASE), "hermes")]


def parser_for(plan: ToolPlan, model: str) -> Parser:
    if plan.mode is ToolMode.NAMED:
        assert plan.name is not None
        return named(plan.name)
    if plan.mode is ToolMode.REQUIRED:
        return required
    return PARSERS[next((name for pattern, name in PARSERS_BY_MODEL if pattern.search(model)), "hermes")]


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


def message_fields(parser: Parser, text: str) -> dict[str, Any]:
    """`content` and, when the model called tools, `tool_calls` of a whole chat message."""
    content, calls = parser(text, True)
    if not calls:
        return {"content": content}
    return {
        "content": content or None,
        "tool_calls": [
            {"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ],
    }


class ToolCallStream:
    """One choice's deltas: content and tool-call fragments as OpenAI streams them."""

    def __init__(self, parser: Parser) -> None:
        self.parser = parser
        self.text = ""
        self.content_sent = 0
        self.arguments_sent: list[int] = []
        self.called = False

    def feed(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        self.text += text
        content, calls = self.parser(self.text, final)
        deltas: list[dict[str, Any]] = []
        if len(content) > self.content_sent:
            deltas.append({"content": content[self.content_sent :]})
            self.content_sent = len(content)
        for index, call in enumerate(calls):
            if index == len(self.arguments_sent):
                self.called = True
                self.arguments_sent.append(0)
                header = {"name": call.name, "arguments": ""}
                deltas.append(
                    {"tool_calls": [{"index": index, "id": call_id(), "type": "function", "function": header}]}
                )
            fresh = call.arguments[self.arguments_sent[index] :]
            if fresh:
                self.arguments_sent[index] = len(call.arguments)
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": fresh}}]})
        return deltas
