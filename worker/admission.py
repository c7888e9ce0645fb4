"""Admission: how a worker reads and claims requests from its model's partitions (the Relay's reader side).

With one partition a blocking XREADGROUP on its three priority streams wakes the reader, which then
claims up to the free slots in one ADMIT script. With several, each partition is a slot of its own and a
read may not span slots: a doorbell thread per partition blocks on it and hands over what it read, and
the reader sweeps every partition, one priority class at a time across all of them, so high goes before
normal before low whichever partition it is in. The free slots are shared out evenly and each sweep
starts one partition further on, so none is always served last.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from producer.connection import SyncRedis, as_text
from producer.protocol import GROUP, Keys
from worker import scripts
from worker.jobs import Claim, Note, NoteKind

if TYPE_CHECKING:
    from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)
Entry = tuple[int, str, list[Any]]  # (queue index, entry id, flat field list) from a blocking read


@dataclass(slots=True)
class Partition:
    """One partition of the model as the relay sees it: its keys, the scripts' KEYS, XAUTOCLAIM cursors."""

    index: int
    keys: Keys
    script_keys: list[str]
    cursors: list[str] = field(default_factory=lambda: ["0-0", "0-0", "0-0"])


class Admission:
    """The reading half of the Relay; the Relay holds the state it works on."""

    redis: SyncRedis
    settings: WorkerSettings
    me: str
    parts: list[Partition]
    claims: dict[str, Claim]
    reading: bool
    rollbacks: int
    inbox: queue.SimpleQueue[Note]
    _lock: threading.Lock
    _stop: threading.Event
    _slots_freed: threading.Event
    _room: threading.Event
    _doorbell: queue.SimpleQueue[tuple[int, list[Entry]]]
    _next_autoclaim: float
    _turn: int
    _more: bool
    _claim_args: dict[str, Any]
    _admit: Any
    _hand_back_script: Any

    def _lose(self, request_id: str, epoch: int) -> None:
        raise NotImplementedError

    def _read(self) -> bool:
        """One admission: block in Redis for the first request, then claim up to the free slots."""
        if self._stop.is_set():
            self._admit_rung()  # read by a doorbell already: claimed now, handed back with the rest
            return True
        budget = self.settings.max_num_seqs - len(self.claims) if self.reading else 0
        if budget >= 3 * len(self.parts):
            self._room.set()
        else:
            self._room.clear()
        if budget <= 0:
            self._slots_freed.wait(0.5)
            self._slots_freed.clear()
            return False
        autoclaim = time.monotonic() >= self._next_autoclaim
        if len(self.parts) > 1:
            self._read_partitions(budget, autoclaim)
            return False
        preread: list[Entry] = []
        if not autoclaim:
            preread = self._blocking_read(self.parts[0], budget)
            if not preread:
                return False
        self.admit_once(budget, autoclaim, preread)
        return False

    def _read_partitions(self, budget: int, autoclaim: bool) -> None:
        rung = self._rung(block=False)
        if self._room.is_set() and not (rung or autoclaim or self._more):
            # idle: every partition has a doorbell blocked on it, so nothing can arrive unseen
            rung = self._rung(block=True)
            if not rung:
                return
        claimed = self._sweep(budget, autoclaim, rung)
        self._more = claimed >= budget  # the slots filled up: more may be waiting once they free
        if not claimed and not self._room.is_set():
            # few free slots and the doorbells closed (they could over-read): look again when a slot frees
            self._slots_freed.wait(self._block_ms() / 1000)
            self._slots_freed.clear()

    def _block_ms(self) -> int:
        return int(min(0.5, self.settings.claim_idle_s / 4) * 1000)

    def _blocking_read(self, part: Partition, budget: int) -> list[Entry]:
        # one entry per stream, high first: never more than a worker with free slots can hold
        streams = dict.fromkeys(part.keys.queues[:budget], ">")
        reply: Any = self.redis.xreadgroup(
            GROUP,
            self.me,
            streams,  # type: ignore[arg-type]
            count=1,
            block=self._block_ms(),
        )
        preread: list[Entry] = []
        for stream_key, entries in reply or []:
            index = part.keys.queues.index(as_text(stream_key)) + 1
            for entry_id, fields in entries:
                flat = [item for pair in (fields or {}).items() for item in pair]
                preread.append((index, as_text(entry_id), flat))
        return preread

    def _ring(self, part: Partition) -> bool:
        """A doorbell thread's turn: block on one partition while there is room, ring with what came."""
        if self._stop.is_set():
            return True
        if not self._room.wait(0.5):
            return False
        entries = self._blocking_read(part, 3)
        if entries:
            self._doorbell.put((part.index, entries))
        return False

    def _rung(self, block: bool) -> dict[int, list[Entry]]:
        """What the doorbells read, by partition; with `block`, waits up to one read's block for the first."""
        rung: dict[int, list[Entry]] = {}
        try:
            index, entries = (
                self._doorbell.get(timeout=self._block_ms() / 1000) if block else self._doorbell.get_nowait()
            )
            while True:
                rung.setdefault(index, []).extend(entries)
                index, entries = self._doorbell.get_nowait()
        except queue.Empty:
            return rung

    def _admit_rung(self) -> None:
        for index, entries in self._rung(block=False).items():
            self.admit_once(0, False, entries, self.parts[index])

    def _sweep(self, budget: int, autoclaim: bool, rung: dict[int, list[Entry]]) -> int:
        """Claims across every partition: what the doorbells read and dead workers' entries first, then new
        entries one priority class at a time over all partitions (high before normal before low), the free
        slots shared out evenly and each sweep starting one partition further on. Returns the claims made."""
        self._turn = (self._turn + 1) % len(self.parts)
        order = self.parts[self._turn :] + self.parts[: self._turn]
        claimed = 0
        for part in order:  # no new entries here: those go by priority class below
            if autoclaim or part.index in rung:
                claimed += self.admit_once(
                    max(0, budget - claimed), autoclaim, rung.get(part.index, []), part, new_entries=False
                )
        for queue_index in (1, 2, 3):
            open_parts = order
            while open_parts and budget > claimed:
                shares = share_out(budget - claimed, len(open_parts))
                calls = [(part, n) for part, n in zip(open_parts, shares, strict=True) if n]
                untried = [part for part, n in zip(open_parts, shares, strict=True) if not n]
                pipe = self.redis.pipeline(transaction=False)
                for part, n in calls:
                    args = self._admit_args(part, n, False, [], (queue_index, queue_index))
                    self._admit(keys=part.script_keys, args=args, client=pipe)
                replies: Any = pipe.execute()
                got = [self._claimed(part, reply) for (part, _), reply in zip(calls, replies, strict=True)]
                claimed += sum(got)
                # a partition that filled its share may hold more; one that fell short is empty in this class
                open_parts = [part for (part, n), g in zip(calls, got, strict=True) if g >= n] + untried
        return claimed

    def _admit_args(
        self, part: Partition, budget: int, autoclaim: bool, preread: list[Entry], queues: tuple[int, int] = (1, 3)
    ) -> list[Any]:
        entries: list[Any] = []
        for index, entry_id, flat in preread:
            entries += [index, entry_id, len(flat), *flat]
        high, normal, low = part.cursors
        return scripts.ADMIT_ARGV.args(
            *entries,
            **self._claim_args,
            req_prefix=part.keys.request_prefix,
            res_prefix=part.keys.result_prefix,
            budget=budget,
            autoclaim=int(autoclaim),
            min_idle_ms=int(self.settings.claim_idle_s * 1000),
            cursor_high=high,
            cursor_normal=normal,
            cursor_low=low,
            first_queue=queues[0],
            last_queue=queues[1],
        )

    def admit_once(
        self,
        budget: int,
        autoclaim: bool,
        preread: list[Entry],
        part: Partition | None = None,
        new_entries: bool = True,
    ) -> int:
        """Claims pre-read entries, idle entries of dead workers (when `autoclaim`), and new ones (unless not
        `new_entries`), in one partition (the first by default); returns how many it claimed."""
        part = part or self.parts[0]
        queues = (1, 3) if new_entries else (1, 0)  # an empty range: Lua's `for qi = 1, 0` never runs
        reply: Any = self._admit(keys=part.script_keys, args=self._admit_args(part, budget, autoclaim, preread, queues))
        if autoclaim:
            self._next_autoclaim = time.monotonic() + self.settings.claim_idle_s / 4
        return self._claimed(part, reply)

    def _claimed(self, part: Partition, reply: Any) -> int:
        """An ADMIT reply taken in: the claims it made go to the step loop; returns how many entries it took (a
        claim Redis had forgotten counts too, though it goes straight back)."""
        part.cursors = [as_text(c) for c in reply[:3]]
        forgotten: list[Any] = []
        claimed = 0
        for index, entry_id, raw_id, payload, epoch, verdict in reply[3]:
            request_id, verdict = as_text(raw_id), as_text(verdict)
            if verdict != "ok":
                log.info(
                    "request settled at claim", request_id=request_id or None, verdict=verdict, entry=as_text(entry_id)
                )
                continue
            claimed += 1
            with self._lock:
                held = self.claims.get(request_id)
                if held is not None:  # our own earlier claim was taken over, by us
                    self._lose(request_id, held.epoch)
                    if int(epoch) <= held.epoch:
                        # Not a takeover: Redis forgot our claim (and what we published under it) and
                        # delivered the entry again. Running it under the same epoch would mix the old
                        # run's unsent tokens into the new one with no restart for the client; handing it
                        # back makes the next claim a new epoch that starts the client over.
                        forgotten += [request_id, epoch, index, entry_id]
                        continue
                claim = Claim(request_id, int(epoch), int(index), as_text(entry_id), partition=part.index)
                self.claims[request_id] = claim
            # decoding happens on the step loop's thread: this one's time is the queue's critical path
            self.inbox.put(Note(NoteKind.JOB, request_id, claim.epoch, payload, claim.entry_id))
        if forgotten:
            with self._lock:
                self.rollbacks += len(forgotten) // 4
            log.warning(
                "redis forgot claims it had acknowledged; the requests affected start over",
                requests=len(forgotten) // 4,
            )
            args = scripts.HAND_BACK_ARGV.args(
                *forgotten, group=GROUP, consumer=self.me, req_prefix=part.keys.request_prefix
            )
            self._hand_back_script(keys=part.script_keys, args=args)
        return claimed


def share_out(total: int, ways: int) -> list[int]:
    """`total` split into `ways` near-equal parts, the larger ones first."""
    return [total // ways + (1 if i < total % ways else 0) for i in range(ways)]
