"""Generation requests on the wire: the Request message, its size limits, and its defensive decode."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack

# the module, not the function: producer.params imports the enums, so it may be half-loaded when this runs
from producer import params as wire_params
from producer.errors import ProtocolError
from producer.protocol.enums import ErrorCode, Priority
from producer.protocol.keys import SCHEMA_VERSION, check_model_name, is_request_id


@dataclass(slots=True, frozen=True)
class Limits:
    """Size caps applied before and after unpacking a request."""

    max_request_bytes: int = 4 * 2**20
    max_prompt_chars: int = 1_000_000
    max_prompt_tokens: int = 131_072
    max_messages: int = 1_024
    max_metadata_bytes: int = 16_384
    max_tools: int = 128


DEFAULT_LIMITS = Limits()


@dataclass(slots=True)
class Request:
    """A generation request as it travels on a request stream."""

    request_id: str
    model: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None
    # OpenAI function tools ({"type": "function", "function": {"name", "description", "parameters"}}), given
    # to the chat template with the messages. A worker that predates the field ignores it (as any unknown
    # top-level field) and renders the messages alone: the tools then reach no prompt, while a tool choice
    # the gateway enforces still holds, as its grammar travels in params.
    tools: list[dict[str, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    stream: bool = True
    priority: Priority = Priority.NORMAL
    deadline: float | None = None  # absolute, seconds since the epoch; queue time counts
    submitted_at: float = 0.0
    metadata: Any = None  # opaque, echoed back in the terminal event

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "id": self.request_id,
            "model": self.model,
            "params": self.params,
            "stream": self.stream,
            "priority": self.priority.value,
            "deadline": self.deadline,
            "submitted_at": self.submitted_at,
            "metadata": self.metadata,
        }
        for name in ("prompt", "messages", "prompt_token_ids", "tools"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        return msgpack.packb(body, use_bin_type=True)

    def validate(self, limits: Limits = DEFAULT_LIMITS) -> Request:
        """Checks what the client built, with the same rules the worker applies on decode."""
        try:
            encoded = self.encode()
        except (TypeError, ValueError, OverflowError) as exc:  # msgpack: an object or an integer it cannot pack
            raise _fail(f"request: cannot be encoded ({type(exc).__name__}: {str(exc)[:80]})") from None
        return decode_request(encoded, limits, expected_id=self.request_id)


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(ErrorCode.INVALID_REQUEST, f"msgpack extension type {code} is not allowed")


def unpack(data: Any, max_bytes: int) -> Any:
    """msgpack -> plain Python, size-capped before unpacking; every failure is a ProtocolError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"payload: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"payload: {len(data)} bytes is over the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            use_list=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes // 2,
            max_ext_len=max_bytes,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types (ValueError, StackError, ...)
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"payload: not valid msgpack ({type(exc).__name__})") from None


def _fail(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST, message)


def decode_request(data: Any, limits: Limits = DEFAULT_LIMITS, expected_id: str | None = None) -> Request:
    """Defensive decode of a request body. Unknown top-level fields are ignored (newer clients)."""
    body = unpack(data, limits.max_request_bytes)
    if not isinstance(body, dict):
        raise _fail(f"payload: expected a map, got {type(body).__name__}")
    version = body.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail("v: schema version is missing or not an integer")
    if version != SCHEMA_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"v: schema version {version} is not supported (this worker speaks {SCHEMA_VERSION})",
        )
    request_id = body.get("id")
    if not is_request_id(request_id) or (expected_id is not None and request_id != expected_id):
        raise _fail("id: must be 32 lowercase hex characters matching the stream entry's id")
    model = check_model_name(body.get("model"))  # type: ignore[arg-type]
    request = Request(request_id=str(request_id), model=model)
    _decode_prompt(body, request, limits)
    request.tools = _decode_tools(body.get("tools"), request, limits)
    request.params = wire_params.validate_params(body.get("params", {}))
    if not isinstance(stream := body.get("stream", True), bool):
        raise _fail("stream: must be a boolean")
    request.stream = stream
    try:
        request.priority = Priority(body.get("priority", Priority.NORMAL))
    except ValueError:
        raise _fail("priority: must be one of high, normal, low") from None
    request.deadline = _optional_time(body.get("deadline"), "deadline")
    request.submitted_at = _optional_time(body.get("submitted_at"), "submitted_at") or 0.0
    request.metadata = body.get("metadata")
    if request.metadata is not None:
        if not _plain(request.metadata, depth=0):
            raise _fail("metadata: only nil, booleans, numbers, strings, bytes, lists and maps are allowed")
        if len(msgpack.packb(request.metadata, use_bin_type=True)) > limits.max_metadata_bytes:
            raise _fail(f"metadata: over the limit of {limits.max_metadata_bytes} bytes")
    return request


def _decode_prompt(body: dict[str, Any], request: Request, limits: Limits) -> None:
    given = [name for name in ("prompt", "messages", "prompt_token_ids") if body.get(name) is not None]
    if len(given) != 1:
        raise _fail("prompt: exactly one of prompt, messages, prompt_token_ids is required")
    value = body[given[0]]
    if given[0] == "prompt":
        if not isinstance(value, str) or not value or len(value) > limits.max_prompt_chars:
            raise _fail(f"prompt: must be a non-empty string of at most {limits.max_prompt_chars} characters")
        request.prompt = value
    elif given[0] == "prompt_token_ids":
        if (
            not isinstance(value, list)
            or not value
            or len(value) > limits.max_prompt_tokens
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in value)
        ):
            raise _fail(f"prompt_token_ids: must be 1 to {limits.max_prompt_tokens} non-negative integers")
        request.prompt_token_ids = value
    else:
        if not isinstance(value, list) or not value or len(value) > limits.max_messages:
            raise _fail(f"messages: must be a list of 1 to {limits.max_messages} messages")
        messages, chars = [], 0
        for message in value:
            if (
                not isinstance(message, dict)
                or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)
                or not 0 < len(message["role"]) <= 64
            ):
                raise _fail("messages: each message must be a map with string role and content")
            chars += len(message["content"])
            messages.append({"role": message["role"], "content": message["content"]})
        if chars > limits.max_prompt_chars:
            raise _fail(f"messages: over the limit of {limits.max_prompt_chars} characters")
        request.messages = messages


def _decode_tools(value: Any, request: Request, limits: Limits) -> list[dict[str, Any]] | None:
    """Function tools, shape-checked only: the schemas in them are the chat template's to render."""
    if value is None:
        return None
    if request.messages is None:
        raise _fail("tools: only chat requests (messages) can carry tools")
    if not isinstance(value, list) or not 0 < len(value) <= limits.max_tools:
        raise _fail(f"tools: must be a list of 1 to {limits.max_tools} tools")
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
            or not _plain(tool, depth=0)
        ):
            raise _fail(f"tools[{i}]: must be a map {{type: function, function: {{name, ...}}}} of plain values")
    return value


def _optional_time(value: Any, name: str) -> float | None:
    if value is not None and (
        not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0
    ):
        raise _fail(f"{name}: must be null or a finite number of seconds since the epoch")
    return None if value is None else float(value)


def _plain(value: Any, depth: int) -> bool:
    """Only msgpack's own types, nested at most 32 deep (metadata is echoed back to other clients)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return True
    if isinstance(value, dict):
        return depth < 32 and all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return depth < 32 and isinstance(value, list) and all(_plain(v, depth + 1) for v in value)
