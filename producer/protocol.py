"""The wire protocol: every Redis key name and message shape, msgpack maps with a schema version.

Keys of one model share a Redis Cluster hash tag, `{prefix}:{{model}}:...`, so the Lua scripts
that touch a request's queue entry, its owner record and its result stream stay on one shard.

    {p}:{{m}}:q:high|normal|low   request streams (consumer group `workers`), read in that order
    {p}:{{m}}:req:<id>            hash: state, entry, prio, epoch (fencing token), worker, seq, cancel
    {p}:{{m}}:res:<id>            result stream: delta* ... (restart delta*)* then done | error
    {p}:{{m}}:cancel:<worker>     set: ids the owning worker must cancel (the flag itself is in req:<id>)
    {p}:{{m}}:dead                dead letters
    {p}:{{m}}:dead:cursor         the last dead letter a maintenance report covered
    {p}:{{m}}:workers             hash: worker name -> heartbeat (msgpack)
    {p}:models                    set of model names that workers serve (for `tokenrelay status`)
"""

from __future__ import annotations

import enum
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import msgpack

from producer.errors import ProtocolError
from producer.params import validate_params

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "tr"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GROUP = "workers"
DEFAULT_RESULT_TTL_S = 86_400
REQUEST_FIELD_ID = "id"  # stream entry fields: the id stays readable to Lua without unpacking the payload
REQUEST_FIELD_BODY = "m"
EVENT_FIELD = "m"

_MODEL_NAME = re.compile(r"^[A-Za-z0-9._:/@+-]{1,128}$")
_PREFIX = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


class Priority(enum.StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """Engine priority (lower runs first) and index into Keys.queues."""
        return _PRIORITY_ORDER.index(self)


_PRIORITY_ORDER = (Priority.HIGH, Priority.NORMAL, Priority.LOW)


class EventType(enum.StrEnum):
    DELTA = "delta"
    DONE = "done"
    ERROR = "error"
    RESTART = "restart"

    @property
    def terminal(self) -> bool:
        return self in (EventType.DONE, EventType.ERROR)


class ErrorCode(enum.StrEnum):
    INVALID_REQUEST = "invalid_request"  # undecodable or failed validation; dead-lettered, never retried
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_MODEL = "unknown_model"
    DEADLINE = "deadline"
    MAX_DELIVERIES = "max_deliveries"  # workers kept dying on it; dead-lettered
    INTERNAL = "internal"
    UNKNOWN_REQUEST = "unknown_request"  # client side: Redis holds neither its record nor its results


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(slots=True, frozen=True)
class Limits:
    """Size caps applied before and after unpacking a request."""

    max_request_bytes: int = 4 * 2**20
    max_prompt_chars: int = 1_000_000
    max_prompt_tokens: int = 131_072
    max_messages: int = 1_024
    max_metadata_bytes: int = 16_384


DEFAULT_LIMITS = Limits()


def check_model_name(model: str) -> str:
    if not isinstance(model, str) or not _MODEL_NAME.match(model):
        raise ProtocolError("invalid_request", f"model: {str(model)[:64]!r} is not a valid model name "
                            "(1-128 of letters, digits and ._:/@+-)")
    return model


def is_request_id(value: Any) -> bool:
    return isinstance(value, str) and _REQUEST_ID.match(value) is not None


def new_request_id() -> str:
    """128 random bits, made by the client so that a retried submit names the same request."""
    return secrets.token_hex(16)


@dataclass(slots=True, frozen=True)
class Keys:
    """Key names of one model under one prefix."""

    model: str
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        check_model_name(self.model)
        if not _PREFIX.match(self.prefix):
            raise ValueError(f"prefix: {self.prefix!r} must be 1-32 of letters, digits and ._-")

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.model}}}"

    def queue(self, priority: Priority) -> str:
        return f"{self.base}:q:{priority.value}"

    @property
    def queues(self) -> list[str]:
        return [self.queue(p) for p in _PRIORITY_ORDER]

    @property
    def request_prefix(self) -> str:
        """Lua scripts that learn a request id from a stream entry append it to this."""
        return f"{self.base}:req:"

    @property
    def result_prefix(self) -> str:
        return f"{self.base}:res:"

    def request(self, request_id: str) -> str:
        return self.request_prefix + request_id

    def result(self, request_id: str) -> str:
        return self.result_prefix + request_id

    @property
    def cancel_prefix(self) -> str:
        return f"{self.base}:cancel:"

    def cancels(self, worker: str) -> str:
        return self.cancel_prefix + worker

    @property
    def dead(self) -> str:
        return f"{self.base}:dead"

    @property
    def dead_cursor(self) -> str:
        return f"{self.base}:dead:cursor"

    @property
    def workers(self) -> str:
        return f"{self.base}:workers"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"


# -- requests ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """A generation request as it travels on a request stream."""

    request_id: str
    model: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    stream: bool = True
    priority: Priority = Priority.NORMAL
    deadline: float | None = None  # absolute, seconds since the epoch; queue time counts
    submitted_at: float = 0.0
    metadata: Any = None  # opaque, echoed back in the terminal event

    def encode(self) -> bytes:
        body: dict[str, Any] = {"v": SCHEMA_VERSION, "id": self.request_id, "model": self.model,
                                "params": self.params, "stream": self.stream, "priority": self.priority.value,
                                "deadline": self.deadline, "submitted_at": self.submitted_at,
                                "metadata": self.metadata}
        for name in ("prompt", "messages", "prompt_token_ids"):
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
    raise ProtocolError("invalid_request", f"msgpack extension type {code} is not allowed")


def unpack(data: Any, max_bytes: int) -> Any:
    """msgpack -> plain Python, size-capped before unpacking; every failure is a ProtocolError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("invalid_request", f"payload: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProtocolError("invalid_request", f"payload: {len(data)} bytes is over the limit of {max_bytes}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_reject_ext, use_list=True,
                               max_str_len=max_bytes, max_bin_len=max_bytes, max_array_len=max_bytes,
                               max_map_len=max_bytes // 2, max_ext_len=max_bytes)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types (ValueError, StackError, ...)
        raise ProtocolError("invalid_request", f"payload: not valid msgpack ({type(exc).__name__})") from None


def _fail(message: str) -> ProtocolError:
    return ProtocolError("invalid_request", message)


def decode_request(data: Any, limits: Limits = DEFAULT_LIMITS, expected_id: str | None = None) -> Request:
    """Defensive decode of a request body. Unknown top-level fields are ignored (newer clients)."""
    body = unpack(data, limits.max_request_bytes)
    if not isinstance(body, dict):
        raise _fail(f"payload: expected a map, got {type(body).__name__}")
    version = body.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail("v: schema version is missing or not an integer")
    if version != SCHEMA_VERSION:
        raise ProtocolError("unsupported_version", f"v: schema version {version} is not supported "
                            f"(this worker speaks {SCHEMA_VERSION})")
    request_id = body.get("id")
    if not is_request_id(request_id) or (expected_id is not None and request_id != expected_id):
        raise _fail("id: must be 32 lowercase hex characters matching the stream entry's id")
    model = check_model_name(body.get("model"))  # type: ignore[arg-type]
    request = Request(request_id=str(request_id), model=model)
    _decode_prompt(body, request, limits)
    request.params = validate_params(body.get("params", {}))
    if not isinstance(stream := body.get("stream", True), bool):
        raise _fail("stream: must be a boolean")
    request.stream = stream
    try:
        request.priority = Priority(body.get("priority", "normal"))
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
        if (not isinstance(value, list) or not value or len(value) > limits.max_prompt_tokens
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in value)):
            raise _fail(f"prompt_token_ids: must be 1 to {limits.max_prompt_tokens} non-negative integers")
        request.prompt_token_ids = value
    else:
        if not isinstance(value, list) or not value or len(value) > limits.max_messages:
            raise _fail(f"messages: must be a list of 1 to {limits.max_messages} messages")
        messages, chars = [], 0
        for message in value:
            if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                    or not isinstance(message.get("content"), str) or not 0 < len(message["role"]) <= 64):
                raise _fail("messages: each message must be a map with string role and content")
            chars += len(message["content"])
            messages.append({"role": message["role"], "content": message["content"]})
        if chars > limits.max_prompt_chars:
            raise _fail(f"messages: over the limit of {limits.max_prompt_chars} characters")
        request.messages = messages


def _optional_time(value: Any, name: str) -> float | None:
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                              or not math.isfinite(value) or value < 0):
        raise _fail(f"{name}: must be null or a finite number of seconds since the epoch")
    return None if value is None else float(value)


def _plain(value: Any, depth: int) -> bool:
    """Only msgpack's own types, nested at most 32 deep (metadata is echoed back to other clients)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return True
    if isinstance(value, dict):
        return depth < 32 and all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return depth < 32 and isinstance(value, list) and all(_plain(v, depth + 1) for v in value)


# -- events: top-K logprobs travel as [[token_id, logprob], ...] (msgpack map keys must be strings here);
# with a tokenizer, a worker appends texts: [[id, logprob, [[alt_id, alt_logprob, alt_text], ...], text], ...]
Logprobs = list[list[Any]]  # [[token_id, logprob, [[alt_id, alt_logprob], ...]], ...]


def _pack(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def delta_event(text: str, token_ids: list[int], logprobs: Logprobs | None = None) -> bytes:
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "type": "delta", "text": text, "token_ids": token_ids}
    if logprobs is not None:
        body["logprobs"] = logprobs
    return _pack(body)


def done_event(finish_reason: str, usage: dict[str, Any], *, stop_reason: Any = None, metadata: Any = None,
               worker: str = "", text: str | None = None, token_ids: list[int] | None = None,
               logprobs: Logprobs | None = None, prompt_logprobs: Logprobs | None = None) -> bytes:
    """The terminal event of a finished request; non-streamed requests carry their whole output here."""
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "type": "done", "finish_reason": finish_reason,
                            "stop_reason": stop_reason, "usage": usage, "metadata": metadata, "worker": worker}
    if text is not None:
        body["text"], body["token_ids"] = text, token_ids or []
    if logprobs is not None:
        body["logprobs"] = logprobs
    if prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs  # the first prompt token has none: [] in its place
    return _pack(body)


def error_event(code: str, message: str, metadata: Any = None, worker: str = "") -> bytes:
    return _pack({"v": SCHEMA_VERSION, "type": "error", "code": code, "message": message[:2000],
                  "metadata": metadata, "worker": worker})


def restart_event(worker: str) -> bytes:
    return _pack({"v": SCHEMA_VERSION, "type": "restart", "worker": worker})


@dataclass(slots=True)
class Event:
    """One entry of a result stream, decoded; `entry_id` is where a reader resumes after it."""

    type: EventType
    entry_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: Logprobs | None = None
    finish_reason: str | None = None
    stop_reason: Any = None
    usage: dict[str, Any] | None = None
    code: str | None = None
    message: str | None = None
    metadata: Any = None
    worker: str = ""
    full_output: bool = False  # a done event of a non-streamed request: text/token_ids are the whole output
    prompt_logprobs: Logprobs | None = None


def decode_event(data: Any, entry_id: str = "") -> Event:
    body = unpack(data, DEFAULT_LIMITS.max_request_bytes * 4)
    if not isinstance(body, dict) or body.get("v") != SCHEMA_VERSION:
        raise ProtocolError("invalid_request", "event: not a map of this schema version")
    try:
        kind = EventType(str(body.get("type")))
    except ValueError:
        raise ProtocolError("invalid_request", f"event: unknown type {str(body.get('type'))[:32]!r}") from None
    event = Event(kind, entry_id, worker=str(body.get("worker") or ""), metadata=body.get("metadata"))
    if kind is EventType.DELTA or (kind is EventType.DONE and "text" in body):
        event.text, event.token_ids = str(body.get("text", "")), list(body.get("token_ids") or [])
        event.full_output = kind is EventType.DONE
    if kind in (EventType.DELTA, EventType.DONE):
        event.logprobs = body.get("logprobs")
    if kind is EventType.DONE:
        event.prompt_logprobs = body.get("prompt_logprobs")
        event.finish_reason, event.stop_reason = body.get("finish_reason"), body.get("stop_reason")
        event.usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    elif kind is EventType.ERROR:
        event.code, event.message = str(body.get("code", "")), str(body.get("message", ""))
    return event
