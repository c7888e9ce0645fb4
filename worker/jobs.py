"""What the worker's two threads hold and hand each other: claims, jobs, the outbox, inbox notes."""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Any

from producer.batches.ledger import OUTCOME_FAILED
from producer.protocol import Logprobs, Request


@dataclass(slots=True)
class Claim:
    """A queue entry this worker owns (Redis thread only): where to ack it and its fencing epoch."""

    request_id: str
    epoch: int
    queue_index: int  # 1-based, as the Lua scripts index KEYS
    entry_id: str
    seq: int = 0  # publishes that landed for this claim; makes a retried publish a no-op
    cancel_seen: bool = False
    partition: int = 0  # of the model's request streams (protocol.keys): where its keys live


@dataclass(slots=True)
class Job:
    """A request admitted to the engine (step-loop thread only)."""

    request: Request
    epoch: int
    raw: bytes  # the payload as it came, for a dead letter if the engine refuses it
    admitted_at: float  # wall clock, comparable with the client's submitted_at
    added_at: float = 0.0  # monotonic, when the engine got it
    first_token_at: float | None = None  # monotonic
    first_token_wall: float | None = None
    completion_tokens: int = 0


class NoteKind(enum.Enum):
    JOB = "job"  # a claimed request to decode and run
    LOST = "lost"  # another worker owns the request now: drop it without a word
    CANCEL = "cancel"  # the client asked to cancel: abort and send a cancelled terminal


@dataclass(slots=True)
class Note:
    """Redis thread -> step loop."""

    kind: NoteKind
    request_id: str
    epoch: int
    payload: bytes = b""  # JOB: the request body as it came off the stream
    entry_id: str = ""


@dataclass(slots=True)
class Pending:
    """Events waiting to be published for one request; successive deltas merge into one."""

    epoch: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: Logprobs | None = None
    terminal: bytes | None = None
    ending: str = OUTCOME_FAILED  # how the terminal event went, for a batch line (producer.batches.ledger)
    dead_letter: list[Any] | None = None  # field/value pairs for the dead-letter stream

    @property
    def has_delta(self) -> bool:
        return bool(self.text or self.token_ids)


class Outbox:
    """Step loop -> Redis thread. Coalesces by request while a round trip is in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}
        self._wake = threading.Event()

    def add_delta(
        self, request_id: str, epoch: int, text: str, token_ids: list[int], logprobs: Logprobs | None = None
    ) -> None:
        with self._lock:
            pending = self._entry(request_id, epoch)
            if pending.terminal is None:
                if text:
                    pending.text.append(text)
                pending.token_ids.extend(token_ids)
                if logprobs is not None:
                    pending.logprobs = (pending.logprobs or []) + logprobs
        self._signal()

    def add_terminal(
        self,
        request_id: str,
        epoch: int,
        payload: bytes,
        dead_letter: list[Any] | None = None,
        ending: str = OUTCOME_FAILED,
    ) -> None:
        with self._lock:
            pending = self._entry(request_id, epoch)
            if pending.terminal is None:
                pending.terminal, pending.dead_letter, pending.ending = payload, dead_letter, ending
        self._signal()

    def _signal(self) -> None:
        if not self._wake.is_set():  # setting takes a lock and notifies; a set flag needs neither
            self._wake.set()

    def _entry(self, request_id: str, epoch: int) -> Pending:
        pending = self._pending.get(request_id)
        if pending is None or pending.epoch != epoch:
            # a newer claim of the same request replaces whatever the old one still had queued
            pending = self._pending[request_id] = Pending(epoch)
        return pending

    def take(self) -> dict[str, Pending]:
        with self._lock:
            taken, self._pending = self._pending, {}
            self._wake.clear()
        return taken

    def wake(self) -> None:
        self._wake.set()

    def wait(self, timeout: float) -> bool:
        return self._wake.wait(timeout)

    def __len__(self) -> int:
        return len(self._pending)
