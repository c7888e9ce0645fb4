"""Completion: a request's result folded from its event stream (a `restart` starts it over)."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from producer.errors import RequestFailed
from producer.protocol import EVENT_FIELD, ErrorCode, Event, EventType, Keys, Logprobs, decode_event

UNKNOWN = (
    ErrorCode.UNKNOWN_REQUEST.value,
    "Redis has no record of this request: its results expired (result_ttl_s), no request was submitted "
    "under this id for this model, or Redis lost it (restarted or failed over without the data); "
    "submit it again",
)


class CancelOutcome(enum.StrEnum):
    CANCELLED = "cancelled"  # it was still queued: finished on the spot, no compute spent
    REQUESTED = "requested"  # a worker runs it: it aborts within a step and sends a cancelled done event
    FINISHED = "finished"  # it had already ended
    UNKNOWN = "unknown"  # no such request (or its records expired)


@dataclass(slots=True)
class Completion:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: Logprobs | None = None
    prompt_logprobs: Logprobs | None = None  # when asked for: per prompt token, [] for the first
    finish_reason: str | None = None
    stop_reason: Any = None
    usage: dict[str, Any] = field(default_factory=dict)
    metadata: Any = None
    worker: str = ""
    restarts: int = 0  # times a worker was lost and generation started over
    error: tuple[str, str] | None = None  # (code, message) of an error event
    finished: bool = False

    def apply(self, event: Event) -> bool:
        """Folds one event in; True once the terminal event has arrived."""
        if event.type is EventType.DELTA:
            self.text += event.text
            self.token_ids.extend(event.token_ids)
            if event.logprobs is not None:
                self.logprobs = (self.logprobs or []) + event.logprobs
        elif event.type is EventType.RESTART:
            self.text, self.token_ids, self.logprobs = "", [], None
            self.restarts += 1
        elif event.type is EventType.DONE:
            if event.full_output:
                self.text, self.token_ids = event.text, list(event.token_ids)
                self.logprobs = event.logprobs
            self.finish_reason, self.stop_reason = event.finish_reason, event.stop_reason
            self.prompt_logprobs = event.prompt_logprobs
            self.usage, self.metadata, self.worker = event.usage or {}, event.metadata, event.worker
        else:
            self.error = (event.code or "", event.message or "")
            self.metadata, self.worker = event.metadata, event.worker
        self.finished = event.type.terminal
        return self.finished

    def unknown(self) -> Completion:
        """Ends it with the `unknown_request` error: Redis has neither its record nor a result stream."""
        self.error, self.finished = UNKNOWN, True
        return self

    def raise_for_error(self) -> Completion:
        if self.error is not None:
            raise RequestFailed(self.request_id, self.error[0], self.error[1], self.metadata)
        return self

    def __str__(self) -> str:
        return self.text


def read_chunks(positions: Mapping[str, str], slots: Mapping[str, str], max_keys: int) -> list[dict[str, str]]:
    """Result streams (key -> last entry id read) split for XREAD: one partition's slot per read, since
    Redis Cluster refuses a read across slots, and at most `max_keys` streams each."""
    by_slot: dict[str, list[str]] = {}
    for key in positions:
        by_slot.setdefault(slots[key], []).append(key)
    return [
        {k: positions[k] for k in keys[i : i + max_keys]}
        for keys in by_slot.values()
        for i in range(0, len(keys), max_keys)
    ]


class ResultFold:
    """Folds many result streams read together (XREAD over many keys): what to read next, what came.

    `keys` gives each request's keys (its model's partition): one XREAD covers streams of one partition
    only, since Redis Cluster refuses a read across slots.
    """

    def __init__(self, keys: Mapping[str, Keys], max_keys: int = 1_000) -> None:
        self.completions = {i: Completion(i) for i in keys}
        self.positions = {k.result(i): "0-0" for i, k in keys.items()}
        self._owners = {k.result(i): i for i, k in keys.items()}
        self._records = {k.result(i): k.request(i) for i, k in keys.items()}
        self._slots = {k.result(i): k.base for i, k in keys.items()}
        self._max_keys = max_keys

    def chunks(self) -> list[dict[str, str]]:
        """Stream key -> last entry id seen, for each XREAD to send (one partition, at most max_keys each)."""
        return read_chunks(self.positions, self._slots, self._max_keys)

    def existence_checks(self) -> list[str]:
        """Record key then result key of each request still open, for one single-key EXISTS each (an ACL
        selector covers one key pattern); neither existing means nothing will ever arrive for it."""
        return [key for k in self.positions for key in (self._records[k], k)]

    def settle_unknown(self, answers: Sequence[int]) -> int:
        """Given the EXISTS answers in existence_checks' order, ends the requests Redis knows nothing of."""
        pairs = zip(answers[0::2], answers[1::2], strict=True)
        gone = [k for k, (record, result) in zip(list(self.positions), pairs, strict=True) if not record + result]
        for key in gone:
            self.completions[self._owners[key]].unknown()
            del self.positions[key]
        return len(gone)

    def feed(self, reply: Any) -> int:
        """An XREAD reply folded in; returns how many entries it held."""
        got = 0
        for raw_key, entries in reply or []:
            key = raw_key.decode()
            for entry_id, fields in entries:
                got += 1
                self.positions[key] = entry_id.decode()
                if self.completions[self._owners[key]].apply(
                    decode_event(fields.get(EVENT_FIELD.encode()), self.positions[key])
                ):
                    del self.positions[key]
                    break
        return got
