"""Exceptions raised at the producer boundary: bad messages, a full queue, a request that failed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:  # at run time producer.protocol imports this module
    from producer.protocol.enums import ErrorCode


class ProtocolError(ValueError):
    """A message that cannot be decoded or fails validation; `code` is the wire error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class QueueFull(RuntimeError):
    """The model's queue is over the configured depth; retry later or raise `max_queue_depth`."""

    def __init__(self, model: str, depth: int, limit: int, accepted: list[str] | None = None) -> None:
        super().__init__(f"queue for model {model!r} is full: {depth} requests waiting, limit {limit}")
        self.model = model
        self.depth = depth
        self.limit = limit
        self.accepted = accepted or []  # ids a batch submit did enqueue before the queue filled


class RequestFailed(RuntimeError):
    """The request ended with an `error` event (code and message come from the worker)."""

    def __init__(self, request_id: str, code: str, message: str, metadata: Any = None) -> None:
        super().__init__(f"request {request_id} failed: {code}: {message}")
        self.request_id = request_id
        self.code = code
        self.message = message
        self.metadata = metadata


class NotReplicated(redis.ConnectionError):
    """Durable submits: the master took the submit but fewer than `replicas` replicas confirmed it in time.

    A lost connection to the client, as far as retrying goes: the submit is sent again under the same ids
    (a no-op where it already landed) until the reconnect window runs out, then this is raised.
    """

    def __init__(self, acked: int, replicas: int, wait_ms: int) -> None:
        super().__init__(f"submit confirmed by {acked} of {replicas} replicas within {wait_ms} ms")
        self.acked, self.replicas = acked, replicas
