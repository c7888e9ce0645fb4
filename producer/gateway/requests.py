"""OpenAI request bodies -> a checked GenerationPlan; every refusal is a 400 naming the field."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from producer.client_core import build_request
from producer.errors import ProtocolError
from producer.gateway import constraints
from producer.gateway.errors import APIError, from_protocol_error, invalid, unsupported
from producer.gateway.tools import ToolPlan, parse_tools
from producer.params import validate_params
from producer.protocol import Priority
from producer.protocol import Request as WireRequest

# OpenAI fields accepted and ignored: they change nothing about the tokens produced.
_IGNORED = frozenset({"user", "metadata", "service_tier"})
# Extensions in vLLM's spirit, passed to the engine under the same names.
_EXTENSIONS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "speculative",
    "allowed_token_ids",
)
_SAMPLING = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "logit_bias",
    *_EXTENSIONS,
)
_COMMON = frozenset(
    {"model", "n", "stream", "stream_options", "priority", "structured_outputs", *constraints.GUIDED, *_SAMPLING}
    | _IGNORED
)
_COMPLETION_FIELDS = _COMMON | {"prompt", "max_tokens", "echo", "logprobs", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON | {
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "modalities",
    "store",
    "reasoning_effort",
    "audio",
    "prediction",
    "web_search_options",
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class Endpoint(enum.StrEnum):
    COMPLETIONS = "completions"
    CHAT = "chat"
    RESPONSES = "responses"  # producer/gateway/responses_request.py


@dataclass(slots=True)
class GenerationPlan:
    """What one HTTP request asks for: one or more prompts, n choices each, and how to answer."""

    endpoint: Endpoint
    model: str
    # each {"prompt": str} | {"prompt_token_ids": [...]} | {"messages": [...], "tools": [...] or None}
    prompts: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)  # wire sampling params
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # completions: top-k alternatives; chat: top_logprobs (when logprobs is true)
    priority: Priority = Priority.NORMAL
    tools: ToolPlan | None = None  # chat with tools offered: the output is parsed for tool calls

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def choice_params(self, index: int) -> dict[str, Any]:
        """Sampling params of choice `index`: with a seed and n > 1, choice i gets seed + i (reproducible, distinct)."""
        params = dict(self.params)
        if self.n > 1 and params.get("seed") is not None:
            params["seed"] = params["seed"] + index % self.n
        return params

    def requests(self, request_ids: list[str] | None = None, **common: Any) -> list[WireRequest]:
        """The wire requests of every choice (prompt by prompt, n each), with `common` build_request keywords
        and, if given, one request id per choice; raises ProtocolError naming a bad field."""
        built = []
        for p, prompt in enumerate(self.prompts):
            for i in range(self.n):
                request_id = request_ids[p * self.n + i] if request_ids is not None else None
                built.append(
                    build_request(self.model, request_id=request_id, **common, **prompt, **self.choice_params(i))
                )
        return built


def _check_fields(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for name in body:
        if name not in allowed:
            raise APIError(
                400, f"Unrecognized request argument supplied: {name}", param=name, code="unsupported_parameter"
            )


def _int(body: dict[str, Any], name: str, low: int, high: int, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise invalid(name, f"must be an integer in [{low}, {high}], got {value!r}"[:200])
    return value


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(name, f"must be a boolean, got {value!r}"[:200])
    return value


def _common(
    body: Any, allowed: frozenset[str], max_choices: int
) -> tuple[str, dict[str, Any], int, bool, bool, dict[str, str]]:
    """model, wire params, n, stream, include_usage, and the renames of constraint fields for errors."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    _check_fields(body, allowed)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "is required and must be a string")
    n = _int(body, "n", 1, max_choices, 1)
    assert n is not None
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise invalid("stream_options", "is only allowed with stream: true, as an object")
    include_usage = bool((options or {}).get("include_usage", False))
    params = {name: body[name] for name in _SAMPLING if body.get(name) is not None}
    constraint, renames = constraints.structured_outputs(body)
    if constraint is not None:
        params["structured_outputs"] = constraint
    return model, params, n, stream, include_usage, renames


def _validated(params: dict[str, Any], renames: dict[str, str] | None = None) -> dict[str, Any]:
    try:
        return validate_params(params)
    except ProtocolError as exc:
        raise from_protocol_error(exc, renames) from None


def _priority(body: dict[str, Any]) -> Priority:
    value = body.get("priority", Priority.NORMAL)
    if not isinstance(value, str) or value not in tuple(Priority):
        raise invalid("priority", "must be one of high, normal, low")
    return Priority(value)


def parse_completion(body: Any, max_choices: int) -> GenerationPlan:
    model, params, n, stream, include_usage, renames = _common(body, _COMPLETION_FIELDS, max_choices)
    if body.get("suffix"):
        raise unsupported("suffix")
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise unsupported("best_of", "is not supported: leave it unset or equal to n")
    params["max_tokens"] = _int(body, "max_tokens", 1, 1_000_000, COMPLETION_DEFAULT_MAX_TOKENS)
    logprobs = _int(body, "logprobs", 0, 20, None)
    echo = _bool(body, "echo")
    if logprobs is not None:
        params["logprobs"] = logprobs
        if echo:
            params["prompt_logprobs"] = logprobs  # echo with logprobs scores the prompt too
    prompts = _completion_prompts(body.get("prompt"))
    if len(prompts) * n > max_choices:
        raise invalid("n", f"prompts x n must be at most {max_choices}")
    return GenerationPlan(
        Endpoint.COMPLETIONS,
        model,
        prompts,
        _validated(params, renames),
        n,
        stream,
        include_usage,
        echo,
        logprobs,
        _priority(body),
    )


def _is_tokens(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def _completion_prompts(prompt: Any) -> list[dict[str, Any]]:
    if isinstance(prompt, str) and prompt:
        return [{"prompt": prompt}]
    if _is_tokens(prompt):
        return [{"prompt_token_ids": prompt}]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) and p for p in prompt):
            return [{"prompt": p} for p in prompt]
        if all(_is_tokens(p) for p in prompt):
            return [{"prompt_token_ids": p} for p in prompt]
    raise invalid(
        "prompt", "must be a non-empty string, a list of strings, a list of token ids or a list of token-id lists"
    )


def parse_chat(body: Any, max_choices: int, default_max_tokens: int) -> GenerationPlan:
    model, params, n, stream, include_usage, renames = _common(body, _CHAT_FIELDS, max_choices)
    for name in ("functions", "audio", "prediction", "web_search_options", "reasoning_effort"):
        if body.get(name):
            raise unsupported(name)
    tools = parse_tools(body)
    enforced = tools.constraint() if tools is not None else None
    if enforced is not None:
        if "structured_outputs" in params:
            raise invalid("tool_choice", "required or a named function cannot be combined with a structured output")
        params["structured_outputs"] = enforced
        renames = {"structured_outputs.json": "tools", "structured_outputs": "tools"}
    if body.get("function_call") not in (None, "none"):
        raise unsupported("function_call")
    if body.get("store"):
        raise unsupported("store", "is not supported: this server keeps no completions")
    if body.get("modalities") not in (None, ["text"]):
        raise unsupported("modalities", "only ['text'] is supported")
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params["max_tokens"] = _int(body, limit_name, 1, 1_000_000, default_max_tokens)
    want_logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, 20, None)
    if top is not None and not want_logprobs:
        raise invalid("top_logprobs", "requires logprobs: true")
    logprobs = (top or 0) if want_logprobs else None
    if logprobs is not None:
        params["logprobs"] = logprobs
    messages = _messages(body.get("messages"))
    checked = _validated(params, {"max_tokens": limit_name, **renames})
    return GenerationPlan(
        Endpoint.CHAT,
        model,
        [{"messages": messages} if tools is None else {"messages": messages, "tools": tools.tools}],
        checked,
        n,
        stream,
        include_usage,
        False,
        logprobs,
        _priority(body),
        tools,
    )


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(where, "must be an object")
        role = message.get("role")
        if role not in _ROLES:
            raise unsupported(
                f"{where}.role", f"{str(role)[:32]!r} is not supported (system, developer, user, assistant)"
            )
        if message.get("tool_calls") or message.get("function_call"):
            raise unsupported(f"{where}.tool_calls")
        messages.append({"role": _ROLES[role], "content": _content(message.get("content"), where, role)})
    return messages


def _content(content: Any, where: str, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise unsupported(
                    f"{where}.content[{j}].type", f"{str(kind)[:32]!r} parts are not supported (text only)"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"{where}.content", "must be a string or a list of text parts")
