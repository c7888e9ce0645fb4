"""The worker's Redis side: a reader thread claims requests, a writer thread publishes and heartbeats.

The step loop never waits on Redis: it drops tokens into the Outbox and reads Notes from the
inbox. Neither thread polls. The reader blocks inside Redis (XREADGROUP BLOCK) while there are
free slots, and waits for slots to free up otherwise; the writer sleeps until the step loop hands
it events (or a heartbeat is due), then sends everything pending in one pipelined round trip:
the fenced publish of all coalesced events, the cancellation check and, when due, the heartbeat
that keeps this worker's entries from being taken over. While a round trip is in flight, new
tokens pile up in the Outbox and go out together in the next one (coalescing by time).
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

import msgpack
import redis
import structlog

from producer.connection import SyncRedis, as_text, register_script
from producer.protocol import (
    GROUP,
    ErrorCode,
    FinishReason,
    delta_event,
    done_event,
    error_event,
    restart_event,
)
from producer.reconnect import REDIS_ERRORS, RETRYABLE, Reconnect
from worker import scripts
from worker.admission import Admission, Entry, Partition
from worker.jobs import Claim, Note, NoteKind, Outbox, Pending
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)


class Relay(Admission):
    """The worker's Redis side: its reader, writer and doorbell threads, and everything they hold."""

    def __init__(
        self, client: SyncRedis, settings: WorkerSettings, outbox: Outbox, inbox: queue.SimpleQueue[Note], stats: Any
    ) -> None:
        self.redis = client
        self.settings = settings
        self.keys = settings.keys
        self.me = settings.consumer
        self.outbox = outbox
        self.inbox = inbox
        self.stats = stats  # callable -> dict for heartbeats
        self.claims: dict[str, Claim] = {}  # guarded by _lock: the reader adds, the writer retires
        self.reading = True  # cleared when draining: no new requests
        # partition 0 holds the model's heartbeats; every partition has its own queues, records and results
        self.parts = [
            Partition(p, k, [*k.queues, k.dead, k.workers, k.cancels(self.me)])
            for p, k in enumerate(self.keys.partitions(settings.partitions))
        ]
        self.round_trips = 0
        self.rollbacks = 0  # claims Redis forgot writes of (restart from a lagging AOF, failover to a replica)
        self._lock = threading.Lock()
        self._slots_freed = threading.Event()
        self._stop = threading.Event()
        self._stop_by = 0.0
        self._hand_back = False
        self._next_heartbeat = 0.0
        self._next_autoclaim = 0.0
        self._last_publish = 0.0
        # A publish that failed may still have run in Redis (the reply was lost): it is retried exactly as
        # it was, with the same seq, before anything newer. Merging newer events into it would let the
        # script skip them along with the already-applied part.
        self._in_doubt: dict[str, Pending] | None = None
        self._admit = register_script(client, scripts.ADMIT)
        self._publish = register_script(client, scripts.PUBLISH)
        self._heartbeat = register_script(client, scripts.HEARTBEAT)
        self._hand_back_script = register_script(client, scripts.HAND_BACK)
        self._restart = restart_event(self.me)
        self._claim_args: dict[str, Any] = dict(
            group=GROUP,
            consumer=self.me,
            ttl=settings.result_ttl_s,
            max_deliveries=settings.max_deliveries,
            dead_maxlen=settings.dead_letter_maxlen,
            restart_payload=self._restart,
            cancelled_payload=done_event(FinishReason.CANCELLED, {}, worker=self.me),
            dead_payload=error_event(
                ErrorCode.MAX_DELIVERIES,
                f"gave up after {settings.max_deliveries} deliveries: workers kept failing on this request",
                worker=self.me,
            ),
        )
        self._reader = threading.Thread(target=self._loop, args=(self._read,), name="tokenrelay-read", daemon=True)
        self._writer = threading.Thread(target=self._loop, args=(self._write,), name="tokenrelay-write", daemon=True)
        # More than one partition: a thread per partition blocks in XREADGROUP on it (one slot per read) and
        # rings with what it read; the reader then sweeps every partition, high priority first.
        self._doorbell: queue.SimpleQueue[tuple[int, list[Entry]]] = queue.SimpleQueue()
        self._room = threading.Event()  # set while the free slots can take what every doorbell may read
        self._bells = (
            [
                threading.Thread(
                    target=self._loop,
                    args=(functools.partial(self._ring, part),),
                    name=f"tokenrelay-bell-{part.index}",
                    daemon=True,
                )
                for part in self.parts
            ]
            if len(self.parts) > 1
            else []
        )
        self._turn = 0  # which partition a sweep starts at: none is always last
        self._more = False  # the last sweep filled every free slot

    @property
    def held(self) -> int:
        return len(self.claims)

    def start(self, wait_s: float = 60.0) -> None:
        """Creates the groups and registers the model; a Redis not up yet (restarting, still loading its
        AOF, started beside this worker) is waited for with backoff, up to `wait_s`."""
        reconnect = Reconnect(wait_s)
        while True:
            try:
                self.ensure_groups()
                self.redis.sadd(self.keys.models, self.keys.model)
                break
            except RETRYABLE as exc:
                log.warning("redis unreachable at start; retrying", error=str(exc)[:300])
                time.sleep(reconnect.delay(exc))
        self._safely(self._prune_the_dead)
        self._reader.start()
        self._writer.start()
        for bell in self._bells:
            bell.start()

    def ensure_groups(self) -> None:
        """The consumer group on each priority stream, created from the start of the stream if missing."""
        for key in (q for part in self.parts for q in part.keys.queues):
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
        self.outbox.wake()
        self._slots_freed.set()
        self._reader.join(timeout)
        self._writer.join(timeout)
        for bell in self._bells:
            bell.join(timeout)
        try:
            self._farewell()
        except REDIS_ERRORS as exc:
            log.warning("could not deregister", error=str(exc)[:300])

    # -- the threads ------------------------------------------------------------------------------

    def _loop(self, once: Any) -> None:
        failures = 0
        while True:
            try:
                finished = once()
                failures = 0
            except REDIS_ERRORS as exc:
                failures += 1
                log.warning("redis round trip failed; retrying", error=str(exc)[:300], failures=failures)
                if "NOGROUP" in str(exc):  # a queue stream was deleted under us
                    self._safely(self.ensure_groups)
                finished = self._stop.is_set() and failures > 3
                if not finished:
                    time.sleep(min(2.0, 0.05 * 2**failures))
            if finished:
                return

    def _write(self) -> bool:
        """One publish: wait for events (or a due heartbeat), then one round trip for all of them."""
        stopping = self._stop.is_set()
        now = time.monotonic()
        heartbeat_due = now >= self._next_heartbeat
        if not len(self.outbox) and not heartbeat_due and self._in_doubt is None:
            if not stopping:
                self.outbox.wait(min(0.5, self._next_heartbeat - now))
                return False
            if self.claims and not self._hand_back and now < self._stop_by:
                self.outbox.wait(0.01)  # draining: the step loop still owes terminal events
                return False
        gap = self.settings.publish_interval_s - (now - self._last_publish)
        if gap > 0 and not stopping:
            time.sleep(gap)  # a floor on the publish interval: more tokens per round trip
        self.publish_once(heartbeat_due)
        settled = not len(self.outbox) and self._in_doubt is None
        return stopping and settled and (self._hand_back or not self.claims or time.monotonic() > self._stop_by)

    def publish_once(self, heartbeat: bool) -> None:
        """One round trip: a fenced publish per partition with events or claims (it also collects the
        cancellations), and when due a heartbeat per partition with claims (partition 0's carries the
        worker's heartbeat)."""
        batch = self._in_doubt if self._in_doubt is not None else self.outbox.take()
        with self._lock:
            items = {rid: p for rid, p in batch.items() if rid in self.claims and self.claims[rid].epoch == p.epoch}
            by_part: dict[int, dict[str, Pending]] = {}
            for rid, pending in items.items():
                by_part.setdefault(self.claims[rid].partition, {})[rid] = pending
            held = {c.partition for c in self.claims.values()}
            publish = {
                part.index: self._publish_args(part, by_part.get(part.index, {}))
                for part in self.parts
                if part.index in by_part or part.index in held
            }
            beats = {
                part.index: self._heartbeat_args(part)
                for part in self.parts
                if heartbeat and (part.index == 0 or part.index in held)
            }
            beat_epochs = {c.request_id: c.epoch for c in self.claims.values()}
        pipe = self.redis.pipeline(transaction=False)
        for index, args in publish.items():
            self._publish(keys=self.parts[index].script_keys, args=args, client=pipe)
        for index, args in beats.items():
            self._heartbeat(keys=self.parts[index].script_keys, args=args, client=pipe)
        try:
            replies: Any = pipe.execute() if len(pipe) else []
        except BaseException:
            self._in_doubt = batch
            raise
        self._in_doubt = None
        self.round_trips += 1
        self._last_publish = now = time.monotonic()
        if heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_s
        with self._lock:
            for index, reply in zip(publish, replies, strict=False):
                self._after_publish(list(by_part.get(index, {}).items()), reply)
            for lost in replies[len(publish) :]:
                for request_id in lost:
                    self._lose(as_text(request_id), beat_epochs[as_text(request_id)])

    # -- script arguments and replies (callers hold _lock) -------------------------------------------

    def _publish_args(self, part: Partition, items: dict[str, Pending]) -> list[Any]:
        per_item: list[Any] = []
        for request_id, pending in items.items():
            events = []
            if pending.has_delta:
                events.append(delta_event("".join(pending.text), pending.token_ids, pending.logprobs))
            if pending.terminal is not None:
                events.append(pending.terminal)
            dead = pending.dead_letter or []
            per_item += [
                request_id,
                pending.epoch,
                self.claims[request_id].seq,
                len(events),
                *events,
                pending.ending if pending.terminal is not None else 0,
                len(dead),
                *dead,
            ]
        return scripts.PUBLISH_ARGV.args(
            *per_item,
            group=GROUP,
            consumer=self.me,
            req_prefix=part.keys.request_prefix,
            res_prefix=part.keys.result_prefix,
            ttl=self.settings.result_ttl_s,
            dead_maxlen=self.settings.dead_letter_maxlen,
            restart_payload=self._restart,
            n_items=len(items),
        )

    def _heartbeat_args(self, part: Partition) -> list[Any]:
        payload = b""
        if part.index == 0:
            info = {
                "model": self.keys.model,
                "at": time.time(),
                "pid": os.getpid(),
                "slots_total": self.settings.max_num_seqs,
                "slots_used": len(self.claims),
                "partitions": len(self.parts),
                "draining": not self.reading,
                "engine_options": self.settings.engine_summary(),
                **self.stats(),
            }
            payload = msgpack.packb(info, use_bin_type=True)
        return scripts.HEARTBEAT_ARGV.args(
            *_quads(c for c in self.claims.values() if c.partition == part.index),
            group=GROUP,
            consumer=self.me,
            req_prefix=part.keys.request_prefix,
            ttl=self.settings.result_ttl_s,
            heartbeat=payload,
        )

    def _after_publish(self, items: list[tuple[str, Pending]], reply: list[Any]) -> None:
        statuses, lost, cancelled, rolled_back = reply
        if rolled_back:
            self.rollbacks += rolled_back
            log.warning(
                "redis lost writes it had acknowledged; the requests affected start over",
                requests=rolled_back,
                lost_so_far=self.rollbacks,
            )
        freed = False
        for (request_id, pending), status in zip(items, statuses, strict=True):
            claim = self.claims.get(request_id)
            if status == 2 or claim is None or claim.epoch != pending.epoch:
                continue  # reported in `lost`, or the request was claimed again while this round trip flew
            claim.seq += 1
            if pending.terminal is not None:
                del self.claims[request_id]
                freed = True
        epochs = {request_id: pending.epoch for request_id, pending in items}
        for request_id in lost:
            self._lose(as_text(request_id), epochs[as_text(request_id)])
            freed = True
        if freed:
            self._slots_freed.set()
        for raw_id in cancelled:
            claim = self.claims.get(as_text(raw_id))
            if claim is not None and not claim.cancel_seen:
                claim.cancel_seen = True
                self.inbox.put(Note(NoteKind.CANCEL, claim.request_id, claim.epoch))

    def _lose(self, request_id: str, epoch: int) -> None:
        """Drops the claim of `request_id` under `epoch`; a newer claim of the same request (this worker took
        its own idle entry back, e.g. after a Redis pause) is not what a late reply speaks of."""
        claim = self.claims.get(request_id)
        if claim is not None and claim.epoch == epoch:
            del self.claims[request_id]
            log.warning(
                "ownership lost: another worker took the request over", request_id=request_id, epoch=claim.epoch
            )
            self.inbox.put(Note(NoteKind.LOST, request_id, claim.epoch))
            self._slots_freed.set()

    def _farewell(self) -> None:
        # Whatever is still claimed now (past the grace period, or read just as the drain began)
        # goes back at once rather than waiting out the claim threshold.
        for part in self.parts:
            claims = [c for c in self.claims.values() if c.partition == part.index]
            if claims:
                args = scripts.HAND_BACK_ARGV.args(
                    *_quads(claims), group=GROUP, consumer=self.me, req_prefix=part.keys.request_prefix
                )
                handed = self._hand_back_script(keys=part.script_keys, args=args)
                log.info("handed back in-flight requests", count=handed, partition=part.index)
        self.redis.hdel(self.keys.workers, self.me)
        if not self.claims:
            for key in (q for part in self.parts for q in part.keys.queues):
                pending: Any = self.redis.xpending_range(key, GROUP, min="-", max="+", count=1, consumername=self.me)
                if not pending:
                    self.redis.xgroup_delconsumer(key, GROUP, self.me)

    def _prune_the_dead(self) -> None:
        """Heartbeats and consumer names left by workers that died (kill -9) and hold nothing any more."""
        stale_s = 10 * self.settings.claim_idle_s
        heartbeats: Any = self.redis.hgetall(self.keys.workers)
        for name, raw in heartbeats.items():
            if time.time() - float(msgpack.unpackb(raw).get("at", 0)) > stale_s:
                self.redis.hdel(self.keys.workers, name)
        for key in (q for part in self.parts for q in part.keys.queues):
            consumers: Any = self.redis.xinfo_consumers(key, GROUP)
            for consumer in consumers:
                if consumer["pending"] == 0 and consumer["idle"] > stale_s * 1000:
                    self.redis.xgroup_delconsumer(key, GROUP, consumer["name"])

    def _safely(self, action: Any) -> None:
        try:
            action()
        except REDIS_ERRORS as exc:
            log.warning("redis call failed", error=str(exc)[:300])


def _quads(claims: Iterable[Claim]) -> list[Any]:
    """(id, epoch, queue index, entry) of each claim, flat, as HEARTBEAT and HAND_BACK take them."""
    return [item for c in claims for item in (c.request_id, c.epoch, c.queue_index, c.entry_id)]
