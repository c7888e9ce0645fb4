"""Function tools of a chat request: checked, and what `tool_choice` makes of them.

- `none` (the default without tools): the tools are not sent, the output is plain content.
- `auto` (the default with tools): the tools travel with the request and the model's chat template renders
  them; what the model emits is parsed for calls by the model's tool-call parser (producer/gateway/tool_calls.py).
- `required` and a named function are enforced: the output is constrained by a JSON Schema built from the
  tools' parameter schemas (below), so it always parses into calls. Named: the output is the function's
  arguments. Required: a JSON array of `{"name": <one of the tools>, "arguments": <its parameters>}`, one or
  more items (exactly one with `parallel_tool_calls: false`).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from producer.gateway.errors import invalid

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


class ToolMode(enum.StrEnum):
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"


@dataclass(slots=True)
class ToolPlan:
    """The tools a chat request offers and how its output becomes calls."""

    tools: list[dict[str, Any]]  # as they travel: {"type": "function", "function": {...}}
    mode: ToolMode
    name: str | None = None  # the function a named tool choice forces
    parallel: bool = True
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> its parameters schema

    def constraint(self) -> dict[str, Any] | None:
        """The wire's structured_outputs that enforces a required or named choice; None for auto."""
        if self.mode is ToolMode.NAMED:
            assert self.name is not None
            return {"json": self.parameters[self.name]}
        if self.mode is ToolMode.AUTO:
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": schema},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, schema in self.parameters.items()
        ]
        items = calls[0] if len(calls) == 1 else {"anyOf": calls}
        array: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
        if not self.parallel:
            array["maxItems"] = 1
        return {"json": array}


def _tool(value: Any, i: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
    where = f"tools[{i}]"
    if not isinstance(value, dict) or value.get("type") != "function":
        raise invalid(f"{where}.type", "must be 'function' (the only kind of tool supported)")
    function = value.get("function")
    if not isinstance(function, dict):
        raise invalid(f"{where}.function", "must be an object with a name")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid(f"{where}.function.name", "is required: 1 to 64 letters, digits, underscores or dashes")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid(f"{where}.function.description", "must be a string")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise invalid(f"{where}.function.parameters", "must be a JSON Schema object")
    if function.get("strict") is not None and not isinstance(function["strict"], bool):
        raise invalid(f"{where}.function.strict", "must be a boolean")
    sent = {k: v for k, v in function.items() if k in ("name", "description", "parameters") and v is not None}
    return name, parameters or _ANY_OBJECT, {"type": "function", "function": sent}


def parse_tools(body: dict[str, Any]) -> ToolPlan | None:
    """The request's ToolPlan; None when no tools will be offered (none given, or tool_choice none)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", "must be a boolean")
    if tools is None:
        if choice not in (None, "none"):
            raise invalid("tool_choice", "is only allowed when tools are given")
        return None
    if not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS:
        raise invalid("tools", f"must be a list of 1 to {MAX_TOOLS} function tools")
    parameters: dict[str, dict[str, Any]] = {}
    sent = []
    for i, tool in enumerate(tools):
        tool_name, schema, wire = _tool(tool, i)
        if tool_name in parameters:
            raise invalid(f"tools[{i}].function.name", f"{tool_name!r} is given twice")
        parameters[tool_name] = schema
        sent.append(wire)
    mode, forced = _choice(choice, parameters)
    if mode is None:
        return None
    return ToolPlan(sent, mode, forced, True if parallel is None else parallel, parameters)


def _choice(choice: Any, parameters: dict[str, Any]) -> tuple[ToolMode | None, str | None]:
    if choice is None or choice == "auto":
        return ToolMode.AUTO, None
    if choice == "none":
        return None, None
    if choice == "required":
        return ToolMode.REQUIRED, None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in parameters:
            raise invalid("tool_choice.function.name", f"{str(name)[:64]!r} is not one of the tools")
        return ToolMode.NAMED, name
    raise invalid("tool_choice", "must be none, auto, required or {type: function, function: {name}}")
