"""Deliverer: every gateway replica delivers the outbox's events to the configured endpoints, at least once.

Each endpoint has a consumer group on every outbox stream (`hook:<name>`, created at id 0, so events
written before any gateway ran are delivered too). A replica reads new entries (XREADGROUP, one stream
per call: a cluster refuses cross-slot reads), acks those the endpoint's filter excludes and POSTs the
rest; a 2xx acks the entry, anything else leaves it pending. The retry sweep walks the pending entries
(XPENDING: idle time and times delivered) and XCLAIMs each one whose wait is over, with that wait as the
claim's min-idle, so of several replicas exactly one wins each retry; the times-delivered count is the
attempt number, the same on every replica. A replica that dies mid-attempt leaves its entries pending:
once its liveness key expires the others retry them. After the last scheduled attempt fails the event
is recorded in `{prefix}:hooks:dead` and acked; a 410 disables the endpoint for every replica
(`{prefix}:hooks:disabled`) until an operator deletes the flag.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from producer.connection import AsyncRedis, as_text
from producer.protocol.keys import JobKeys, Keys
from producer.reconnect import REDIS_ERRORS
from producer.webhooks.config import DeliveryConfig
from producer.webhooks.endpoints import WebhookEndpoint
from producer.webhooks.liveness import Liveness, consumer_name
from producer.webhooks.metrics import WebhookMetrics
from producer.webhooks.outbox import OutboxEvent
from producer.webhooks.sender import Outcome, Result, Sender

log = structlog.get_logger(__name__)
DISCOVER_S = 5.0  # how soon a newly served model's outbox is watched
PRUNE_S = 600.0
READ_BATCH = 64
SWEEP_PAGE = 200
SWEEP_MAX = 2000  # pending entries looked at per stream and endpoint per sweep
DEAD_MAXLEN = 10_000
STOP_GRACE_S = 5.0


@dataclass(slots=True, frozen=True)
class Route:
    """One endpoint's group on one outbox stream."""

    endpoint: WebhookEndpoint
    stream: str

    @property
    def group(self) -> str:
        return self.endpoint.group


class Deliverer:
    def __init__(
        self, redis: AsyncRedis, endpoints: tuple[WebhookEndpoint, ...], config: DeliveryConfig, metrics: WebhookMetrics
    ) -> None:
        self.redis = redis
        self.endpoints = endpoints
        self.config = config
        self.metrics = metrics
        self.keys = JobKeys(config.prefix)
        self.consumer = consumer_name()
        self.liveness = Liveness(redis, self.keys, self.consumer, [e.name for e in endpoints])
        self.senders = {e.name: Sender(e, config.timeout_s, config.allowed) for e in endpoints}
        self.routes: list[Route] = []
        self.grouped: set[Route] = set()  # routes whose group exists (as far as this replica knows)
        self.disabled: set[str] = set()
        self.in_flight: dict[tuple[str, str, str], asyncio.Task[None]] = {}  # (group, stream, entry id)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        log.info("webhook delivery started", consumer=self.consumer, endpoints=[e.describe() for e in self.endpoints])
        self._tasks = [asyncio.create_task(self.liveness.beat_forever()), asyncio.create_task(self.run())]

    async def stop(self) -> None:
        """Lets attempts under way finish for a moment; the rest stay pending and are retried elsewhere."""
        for task in self._tasks:
            task.cancel()
        if self.in_flight:
            await asyncio.wait(list(self.in_flight.values()), timeout=STOP_GRACE_S)
        for task in list(self.in_flight.values()):
            task.cancel()
        await asyncio.gather(*self._tasks, *self.in_flight.values(), return_exceptions=True)
        await self.liveness.forget()
        for sender in self.senders.values():
            await sender.close()

    async def run(self) -> None:
        failures, discover_at, prune_at = 0, 0.0, 0.0  # prunes at start: a restart is what leaves consumers behind
        while True:
            try:
                now = time.monotonic()
                if now >= discover_at or len(self.grouped) < len(self.routes):
                    await self._discover()
                    discover_at = now + DISCOVER_S
                if now >= prune_at:
                    await self._prune()
                    prune_at = now + PRUNE_S
                await self._refresh_disabled()
                more = await self._read_new()
                await self._sweep()
                failures = 0
            except REDIS_ERRORS as exc:
                failures += 1
                log.warning("webhook delivery: Redis call failed", error=str(exc)[:200], failures=failures)
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))
                continue
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad entry or reply
                log.exception("webhook delivery loop error")
                await asyncio.sleep(1.0)
                continue
            if not more:
                await asyncio.sleep(self.config.poll_s)

    @property
    def free(self) -> int:
        return self.config.concurrency - len(self.in_flight)

    async def _discover(self) -> None:
        members: Any = await self.redis.smembers(Keys("x", self.config.prefix).models)
        routes: list[Route] = []
        for model in sorted(as_text(m) for m in members):
            try:
                streams = [k.events for k in Keys(model, self.config.prefix).partitions(self.config.partitions)]
            except ValueError:
                continue  # not a model name this protocol accepts: no outbox of ours
            routes.extend(Route(e, s) for s in streams for e in self.endpoints)
        extra: Any = await self.redis.smembers(JobKeys(self.config.prefix).outboxes)
        known = {route.stream for route in routes}
        routes.extend(Route(e, s) for s in sorted(as_text(m) for m in extra) if s not in known for e in self.endpoints)
        for route in routes:
            if route not in self.grouped:
                try:
                    await self.redis.xgroup_create(route.stream, route.group, id="0", mkstream=True)
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                self.grouped.add(route)
        self.routes = routes

    async def _prune(self) -> None:
        """Best effort: a failure here (a Redis without the ACL grant, say) must not hold up delivery."""
        try:
            for route in self.routes:
                await self.liveness.prune(route.stream, route.group)
        except REDIS_ERRORS as exc:
            log.warning("webhook consumers not pruned", error=str(exc)[:200])

    async def _refresh_disabled(self) -> None:
        raw: Any = await self.redis.hgetall(self.keys.hooks_disabled)
        disabled = {as_text(name) for name in raw} & {e.name for e in self.endpoints}
        for name in disabled - self.disabled:
            log.warning("webhook endpoint is disabled", endpoint=name, why=as_text(raw.get(name.encode(), b"")))
        for name in self.disabled - disabled:
            log.info("webhook endpoint enabled again", endpoint=name)
        for endpoint in self.endpoints:
            self.metrics.disabled.labels(endpoint.name).set(int(endpoint.name in disabled))
        self.disabled = disabled

    def _active(self) -> list[Route]:
        return [r for r in self.routes if r.endpoint.name not in self.disabled]

    async def _read_new(self) -> bool:
        """New entries of every route; True when some stream may hold more than was read."""
        more = False
        for route in self._active():
            if self.free <= 0:
                return False
            count = min(self.free, READ_BATCH)
            try:
                reply: Any = await self.redis.xreadgroup(route.group, self.consumer, {route.stream: ">"}, count=count)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self.grouped.discard(route)  # Redis lost it (a restart without persistence): made again
                continue
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                await self._dispatch(route, as_text(entry_id), fields, attempt=1)
            more = more or len(entries) == count
        return more

    async def _dispatch(self, route: Route, entry_id: str, fields: Any, attempt: int) -> None:
        event = OutboxEvent.decode(entry_id, fields or {})
        if not event.id or not event.type:
            log.error("webhook outbox entry is malformed: dropped", stream=route.stream, entry=entry_id)
            self.metrics.events.labels(route.endpoint.name, "malformed").inc()
            await self.redis.xack(route.stream, route.group, entry_id)
            return
        if not route.endpoint.wants(event.type):
            self.metrics.events.labels(route.endpoint.name, "filtered").inc()
            await self.redis.xack(route.stream, route.group, entry_id)
            return
        key = (route.group, route.stream, entry_id)
        task = asyncio.create_task(self._attempt(route, event, attempt))
        self.in_flight[key] = task
        task.add_done_callback(lambda _: self.in_flight.pop(key, None))

    async def _attempt(self, route: Route, event: OutboxEvent, attempt: int) -> None:
        fields = {"endpoint": route.endpoint.name, "event_id": event.id, "type": event.type, "attempt": attempt}
        try:
            await self._attempt_once(route, event, attempt, fields)
        except REDIS_ERRORS as exc:  # the entry stays pending; the sweep settles it
            log.warning("webhook delivery: Redis call failed after an attempt", error=str(exc)[:200], **fields)
        except Exception:  # noqa: BLE001 - a task's error would go unseen; the entry stays pending
            log.exception("webhook attempt error", **fields)

    async def _attempt_once(self, route: Route, event: OutboxEvent, attempt: int, fields: dict[str, Any]) -> None:
        name = route.endpoint.name
        self.metrics.in_flight.inc()
        try:
            result = await self.senders[name].send(event)
        finally:
            self.metrics.in_flight.dec()
        self.metrics.attempts.labels(name, result.outcome.value).inc()
        self.metrics.attempt_seconds.labels(name).observe(result.seconds)
        if result.outcome is Outcome.DELIVERED:
            await self.redis.xack(route.stream, route.group, event.entry_id)
            self.metrics.events.labels(name, "delivered").inc()
            log.info("webhook delivered", status=result.status, seconds=round(result.seconds, 3), **fields)
        elif result.outcome is Outcome.GONE:
            await self._disable(route, event)  # the entry stays pending: delivered if the endpoint is enabled again
        else:
            if result.outcome is Outcome.REFUSED:
                log.error("webhook destination refused: nothing sent", reason=result.detail, **fields)
            else:
                log.warning("webhook attempt failed", error=result.detail, **fields)
            await self._after_failure(route, event, attempt, result)

    async def _after_failure(self, route: Route, event: OutboxEvent, attempt: int, result: Result) -> None:
        if self.config.schedule.exhausted(attempt):
            await self._give_up(route, event, attempt, result.detail)
            return
        # the wait before the next attempt counts from now, not from when this one started
        await self.redis.xclaim(route.stream, route.group, self.consumer, 0, [event.entry_id], justid=True)

    async def _give_up(self, route: Route, event: OutboxEvent, attempts: int, detail: str) -> None:
        record: dict[Any, Any] = {
            "endpoint": route.endpoint.name,
            "stream": route.stream,
            "entry": event.entry_id,
            "id": event.id,
            "type": event.type,
            "data": event.data,
            "created_at": str(event.created_at),
            "attempts": str(attempts),
            "last_error": detail[:300],
            "failed_at": str(int(time.time())),
        }
        await self.redis.xadd(self.keys.hooks_dead, record, maxlen=DEAD_MAXLEN, approximate=True)
        await self.redis.xack(route.stream, route.group, event.entry_id)
        self.metrics.events.labels(route.endpoint.name, "dead").inc()
        log.error(
            "webhook given up after the last attempt",
            endpoint=route.endpoint.name,
            event_id=event.id,
            type=event.type,
            attempts=attempts,
            last_error=detail[:300],
            dead_letters=self.keys.hooks_dead,
        )

    async def _disable(self, route: Route, event: OutboxEvent) -> None:
        name = route.endpoint.name
        why = {"status": 410, "event_id": event.id, "at": int(time.time()), "by": self.consumer}
        await self.redis.hset(self.keys.hooks_disabled, name, json.dumps(why))
        self.disabled.add(name)
        self.metrics.disabled.labels(name).set(1)
        log.error(
            "webhook endpoint disabled: it answered 410 Gone",
            endpoint=name,
            event_id=event.id,
            enable_with=f"HDEL {self.keys.hooks_disabled} {name}",
        )

    async def _sweep(self) -> None:
        """Retries whose wait is over, on every route; a replica takes only its own or a lost replica's."""
        alive: dict[str, set[str] | None] = {}
        for route in self._active():
            start, seen = "-", 0
            while seen < SWEEP_MAX and self.free > 0:
                rows: Any = await self.redis.xpending_range(route.stream, route.group, start, "+", SWEEP_PAGE)
                for row in rows:
                    if self.free <= 0:
                        return
                    await self._retry(route, row, alive)
                seen += len(rows)
                if len(rows) < SWEEP_PAGE:
                    break
                start = "(" + as_text(rows[-1]["message_id"])

    async def _retry(self, route: Route, row: dict[str, Any], alive: dict[str, set[str] | None]) -> None:
        entry_id, owner = as_text(row["message_id"]), as_text(row["consumer"])
        idle_ms, made = int(row["time_since_delivered"]), int(row["times_delivered"])
        if (route.group, route.stream, entry_id) in self.in_flight:
            return
        if owner != self.consumer and await self.liveness.holds(owner, route.endpoint.name, alive):
            return  # its replica is alive and retries it itself
        schedule = self.config.schedule
        exhausted = schedule.exhausted(made)
        due_ms = 0 if exhausted else int(1000 * schedule.wait_before(made + 1, f"{route.endpoint.name}|{entry_id}"))
        if idle_ms < due_ms:
            return
        # a positive min-idle at or under what was seen: the first claim resets the idle time, later ones fail
        claimed: Any = await self.redis.xclaim(
            route.stream, route.group, self.consumer, max(due_ms, idle_ms // 2, 1), [entry_id]
        )
        if not claimed:
            return  # another replica won it, or the outbox was trimmed past it
        claimed_id, fields = claimed[0]
        if exhausted:  # its last attempt's replica was lost before recording the outcome
            event = OutboxEvent.decode(as_text(claimed_id), fields or {})
            await self._give_up(route, event, made, "the replica of the last attempt was lost")
            return
        await self._dispatch(route, as_text(claimed_id), fields, attempt=made + 1)
