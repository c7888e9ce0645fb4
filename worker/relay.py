"""The worker's Redis thread: claims requests, publishes events, keeps claims alive, hands work back.

The step loop never waits on Redis: it drops tokens into the Outbox and reads Notes from the
inbox. Each cycle here is one pipelined round trip carrying everything due: the fenced publish of
all coalesced events (with the cancellation check), admission of as many new requests as there
are free slots, and, when due, the heartbeat that keeps this worker's entries from being taken.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

import msgpack
import redis
import structlog

from producer.protocol import (
    GROUP,
    ErrorCode,
    delta_event,
    done_event,
    error_event,
    restart_event,
)
from worker import scripts
from worker.jobs import Claim, Note, NoteKind, Outbox, Pending
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)


class Relay:
    def __init__(self, client: redis.Redis, settings: WorkerSettings, outbox: Outbox,
                 inbox: queue.SimpleQueue[Note], stats: Any) -> None:
        self.redis = client
        self.settings = settings
        self.keys = settings.keys
        self.me = settings.consumer
        self.outbox = outbox
        self.inbox = inbox
        self.stats = stats  # callable -> dict for heartbeats
        self.claims: dict[str, Claim] = {}  # this thread only; other threads read len() alone
        self.reading = True  # cleared when draining: no new requests
        self.cursors = ["0-0", "0-0", "0-0"]
        self.round_trips = 0
        self._stop = threading.Event()
        self._stop_by = 0.0
        self._hand_back = False
        self._next_heartbeat = 0.0
        self._next_autoclaim = 0.0
        self._last_cycle = 0.0
        self._script_keys = [*self.keys.queues, self.keys.dead, self.keys.workers, self.keys.cancels(self.me)]
        self._admit = client.register_script(scripts.ADMIT)
        self._publish = client.register_script(scripts.PUBLISH)
        self._heartbeat = client.register_script(scripts.HEARTBEAT)
        self._hand_back_script = client.register_script(scripts.HAND_BACK)
        self._claim_args = [GROUP, self.me, self.keys.request_prefix, self.keys.result_prefix,
                            settings.result_ttl_s, settings.max_deliveries, settings.dead_letter_maxlen,
                            restart_event(self.me), done_event("cancelled", {}, worker=self.me),
                            error_event(ErrorCode.MAX_DELIVERIES.value, f"gave up after {settings.max_deliveries} "
                                        "deliveries: workers kept failing on this request", worker=self.me)]
        self._thread = threading.Thread(target=self._run, name="tokenrelay-redis", daemon=True)

    @property
    def held(self) -> int:
        return len(self.claims)

    def start(self) -> None:
        self.ensure_groups()
        self.redis.sadd(self.keys.models, self.keys.model)
        self._thread.start()

    def ensure_groups(self) -> None:
        """The consumer group on each priority stream, created from the start of the stream if missing."""
        for key in self.keys.queues:
            try:
                self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def close(self, hand_back: bool, timeout: float = 10.0) -> None:
        """Publish what is left, hand back what is still claimed if asked, deregister, stop."""
        self._hand_back = hand_back
        self.reading = False
        self._stop_by = time.monotonic() + timeout / 2
        self._stop.set()
        self.outbox._wake.set()
        self._thread.join(timeout)

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while True:
            stopping = self._stop.is_set()
            try:
                self._cycle(idle_wait=not stopping)
                failures = 0
            except redis.RedisError as exc:
                failures += 1
                log.warning("redis round trip failed; retrying", error=str(exc)[:300], failures=failures)
                if "NOGROUP" in str(exc):  # a queue stream was deleted under us
                    self._safely(self.ensure_groups)
                if stopping and failures > 3:
                    break
                time.sleep(min(2.0, 0.05 * 2**failures))
                continue
            if stopping and not len(self.outbox) and (self._hand_back or not self.claims
                                                       or time.monotonic() > self._stop_by):
                break
        try:
            self._farewell()
        except redis.RedisError as exc:
            log.warning("could not deregister", error=str(exc))

    def _cycle(self, idle_wait: bool) -> None:
        now = time.monotonic()
        heartbeat_due = now >= self._next_heartbeat
        budget = self.settings.max_num_seqs - len(self.claims) if self.reading else 0
        autoclaim_due = budget > 0 and now >= self._next_autoclaim
        if idle_wait and not len(self.outbox) and not heartbeat_due and not autoclaim_due:
            if not self.claims and budget > 0:
                self._read_when_idle(budget)
                return
            gap = max(self.settings.poll_interval_s, self.settings.publish_interval_s)
            if now - self._last_cycle < gap:
                self.outbox.wait(gap - (now - self._last_cycle))
                return
        elif self.settings.publish_interval_s and now - self._last_cycle < self.settings.publish_interval_s:
            time.sleep(self.settings.publish_interval_s - (now - self._last_cycle))
        self._round_trip(budget, autoclaim_due, heartbeat_due, preread=[])

    def _read_when_idle(self, budget: int) -> None:
        """Nothing in flight: block inside Redis until a request arrives (no polling latency)."""
        block_ms = int(min(0.5, self.settings.heartbeat_s) * 1000)
        # one entry per stream, high first: never more than a worker with free slots can hold
        streams = dict.fromkeys(self.keys.queues[:budget], ">")
        reply: Any = self.redis.xreadgroup(GROUP, self.me, streams, count=1, block=block_ms)  # type: ignore[arg-type]
        preread: list[tuple[int, str, list[Any]]] = []
        for stream_key, entries in reply or []:
            index = self.keys.queues.index(_text(stream_key)) + 1
            for entry_id, fields in entries:
                flat = [item for pair in (fields or {}).items() for item in pair]
                preread.append((index, _text(entry_id), flat))
        if preread:
            self._round_trip(budget, False, False, preread)

    def _round_trip(self, budget: int, autoclaim: bool, heartbeat: bool,
                    preread: list[tuple[int, str, list[Any]]]) -> None:
        batch = self.outbox.take()
        items = {rid: p for rid, p in batch.items() if rid in self.claims and self.claims[rid].epoch == p.epoch}
        pipe = self.redis.pipeline(transaction=False)
        steps: list[str] = []
        if items or self.claims:
            self._publish(keys=self._script_keys, args=self._publish_args(items), client=pipe)
            steps.append("publish")
        if budget > 0:
            args: list[Any] = [*self._claim_args, budget, int(autoclaim), int(self.settings.claim_idle_s * 1000),
                               *self.cursors]
            for index, entry_id, flat in preread:
                args += [index, entry_id, len(flat), *flat]
            self._admit(keys=self._script_keys, args=args, client=pipe)
            steps.append("admit")
        if heartbeat:
            self._heartbeat(keys=self._script_keys, args=self._heartbeat_args(), client=pipe)
            steps.append("heartbeat")
        if not steps:
            return
        try:
            replies = pipe.execute()
        except BaseException:
            self.outbox.put_back(batch)
            raise
        self.round_trips += 1
        self._last_cycle = now = time.monotonic()
        if heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_s
        if autoclaim:
            self._next_autoclaim = now + self.settings.claim_idle_s / 4
        for step, reply in zip(steps, replies, strict=True):
            if step == "publish":
                self._after_publish(list(items.items()), reply)
            elif step == "admit":
                self._after_admit(reply)
            else:
                for request_id in reply:
                    self._lose(_text(request_id))

    def _publish_args(self, items: dict[str, Pending]) -> list[Any]:
        args: list[Any] = [GROUP, self.keys.request_prefix, self.keys.result_prefix, self.settings.result_ttl_s,
                           self.settings.dead_letter_maxlen, len(items)]
        for request_id, pending in items.items():
            events = []
            if pending.has_delta:
                events.append(delta_event("".join(pending.text), pending.token_ids, pending.logprobs))
            if pending.terminal is not None:
                events.append(pending.terminal)
            dead = pending.dead_letter or []
            args += [request_id, pending.epoch, self.claims[request_id].seq, len(events), *events,
                     int(pending.terminal is not None), len(dead), *dead]
        return args

    def _heartbeat_args(self) -> list[Any]:
        info = {"model": self.keys.model, "at": time.time(), "pid": os.getpid(),
                "slots_total": self.settings.max_num_seqs, "slots_used": len(self.claims),
                "draining": not self.reading, **self.stats()}
        args: list[Any] = [GROUP, self.me, self.keys.request_prefix, self.settings.result_ttl_s,
                           msgpack.packb(info, use_bin_type=True)]
        for claim in self.claims.values():
            args += [claim.request_id, claim.epoch, claim.queue_index, claim.entry_id]
        return args

    def _after_publish(self, items: list[tuple[str, Pending]], reply: list[Any]) -> None:
        statuses, lost, cancelled = reply
        for (request_id, pending), status in zip(items, statuses, strict=True):
            claim = self.claims[request_id]
            if status == 2:
                continue  # reported in `lost`
            claim.seq += 1
            if pending.terminal is not None:
                del self.claims[request_id]
        for request_id in lost:
            self._lose(_text(request_id))
        for raw_id in cancelled:
            cancelled_claim = self.claims.get(_text(raw_id))
            if cancelled_claim is not None and not cancelled_claim.cancel_seen:
                cancelled_claim.cancel_seen = True
                self.inbox.put(Note(NoteKind.CANCEL, cancelled_claim.request_id, cancelled_claim.epoch))

    def _lose(self, request_id: str) -> None:
        claim = self.claims.pop(request_id, None)
        if claim is not None:
            log.warning("ownership lost: another worker took the request over", request_id=request_id,
                        epoch=claim.epoch)
            self.inbox.put(Note(NoteKind.LOST, request_id, claim.epoch))

    def _after_admit(self, reply: list[Any]) -> None:
        self.cursors = [_text(c) for c in reply[:3]]
        for index, entry_id, raw_id, payload, epoch, verdict in reply[3]:
            request_id, verdict = _text(raw_id), _text(verdict)
            if verdict != "ok":
                log.info("request settled at claim", request_id=request_id or None, verdict=verdict,
                         entry=_text(entry_id))
                continue
            old = self.claims.get(request_id)
            if old is not None:  # our own earlier claim was taken over, by us
                self._lose(request_id)
            claim = self.claims[request_id] = Claim(request_id, int(epoch), int(index), _text(entry_id))
            self._accept(claim, payload)

    def _accept(self, claim: Claim, payload: bytes) -> None:
        # decoding happens on the step loop's thread: this thread's time is the queue's critical path
        self.inbox.put(Note(NoteKind.JOB, claim.request_id, claim.epoch, payload, claim.entry_id))

    def _farewell(self) -> None:
        if self._hand_back and self.claims:
            args: list[Any] = [GROUP, self.me, self.keys.request_prefix]
            for claim in self.claims.values():
                args += [claim.request_id, claim.epoch, claim.queue_index, claim.entry_id]
            handed = self._hand_back_script(keys=self._script_keys, args=args)
            log.info("handed back in-flight requests", count=handed)
        self.redis.hdel(self.keys.workers, self.me)
        if not self.claims:
            for key in self.keys.queues:
                pending = self.redis.xpending_range(key, GROUP, min="-", max="+", count=1, consumername=self.me)
                if not pending:
                    self.redis.xgroup_delconsumer(key, GROUP, self.me)


    def _safely(self, action: Any) -> None:
        try:
            action()
        except redis.RedisError as exc:
            log.warning("redis call failed", error=str(exc)[:300])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
