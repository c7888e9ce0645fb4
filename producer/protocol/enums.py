"""The wire's enums: priorities, event types, error codes and finish reasons."""

from __future__ import annotations

import enum


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
