"""Events on a result stream: delta, done, error and restart messages, and their decode."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from producer.errors import ProtocolError
from producer.protocol.enums import ErrorCode, EventType, FinishReason
from producer.protocol.keys import SCHEMA_VERSION
from producer.protocol.requests import DEFAULT_LIMITS, unpack

# One entry per token: [token_id, logprob, [[alt_id, alt_logprob], ...]], the top-K alternatives as pairs
# (msgpack map keys must be strings here, so not a map). A worker with a tokenizer appends the texts:
# [token_id, logprob, [[alt_id, alt_logprob, alt_text], ...], text]. Readers use the first three fields
# and take the texts when present. A prompt's first token has no logprob: its entry is [].
Logprobs = list[list[Any]]


def _pack(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def delta_event(text: str, token_ids: list[int], logprobs: Logprobs | None = None) -> bytes:
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "type": EventType.DELTA.value, "text": text, "token_ids": token_ids}
    if logprobs is not None:
        body["logprobs"] = logprobs
    return _pack(body)


def done_event(
    finish_reason: FinishReason,
    usage: dict[str, Any],
    *,
    stop_reason: Any = None,
    metadata: Any = None,
    worker: str = "",
    text: str | None = None,
    token_ids: list[int] | None = None,
    logprobs: Logprobs | None = None,
    prompt_logprobs: Logprobs | None = None,
) -> bytes:
    """The terminal event of a finished request; non-streamed requests carry their whole output here."""
    body: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "type": EventType.DONE.value,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
        "usage": usage,
        "metadata": metadata,
        "worker": worker,
    }
    if text is not None:
        body["text"], body["token_ids"] = text, token_ids or []
    if logprobs is not None:
        body["logprobs"] = logprobs
    if prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs  # the first prompt token has none: [] in its place
    return _pack(body)


def error_event(code: ErrorCode, message: str, metadata: Any = None, worker: str = "") -> bytes:
    return _pack(
        {
            "v": SCHEMA_VERSION,
            "type": EventType.ERROR.value,
            "code": code,
            "message": message[:2000],
            "metadata": metadata,
            "worker": worker,
        }
    )


def restart_event(worker: str) -> bytes:
    return _pack({"v": SCHEMA_VERSION, "type": EventType.RESTART.value, "worker": worker})


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
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "event: not a map of this schema version")
    try:
        kind = EventType(str(body.get("type")))
    except ValueError:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"event: unknown type {str(body.get('type'))[:32]!r}") from None
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
