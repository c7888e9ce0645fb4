"""ReadMux: the blocking one-stream XREADs of an asyncio client folded into one XREAD over all of them.

A gateway streaming N requests used to hold N connections, each in its own XREAD BLOCK, and to pay
redis-py's whole command path once per token per stream. The mux keeps one dedicated connection
instead: one XREAD over every stream someone waits on, whose reply is handed out per stream. A worker
publishes a step's tokens in one round trip, so one step costs the gateway one read, not N, and open
streams no longer hold pool connections.

Readers that a reply has just woken ask again before the next XREAD is sent (the reader yields to the
loop first), so a stream's next read joins the next XREAD on its own. A reader that arrives while an
XREAD is blocked without it (a new request) rings a doorbell: a one-entry stream private to this mux
that the XREAD also reads, so Redis ends the block at once. No client id is involved, so a reconnect
or a doorbell rung before the XREAD reached Redis is harmless (the entry is newer than the id read
from). Every waiter of a failed XREAD gets its exception, which the caller's retry handles as it did a
read of its own.

What it serves: a read of one stream that blocks. Anything else (several streams, no block, a second
reader of a stream already waited on) is the caller's to send as before. Plain Redis only: on a
cluster, streams of different models live on different nodes. The doorbell is named like a result
stream, so a Redis user allowed to read results may use it; where an ACL refuses it anyway, the mux
stands down (MuxRefused) and its callers read on their own from then on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from producer.protocol import doorbell_key

DOORBELL_TTL_S = 300  # a mux that is gone leaves no key behind for long
_RING_FIELD = b"r"

log = structlog.get_logger(__name__)


class MuxRefused(Exception):
    """Redis refused the mux's commands (an ACL): the read is the caller's to send on its own."""


@dataclass(slots=True)
class _Wait:
    last: str
    count: int
    deadline: float  # time.monotonic() at which the read's BLOCK runs out
    reply: asyncio.Future[Any]


class ReadMux:
    """`await mux.read(key, last, block_ms, count)` answers as `XREAD COUNT count BLOCK block_ms` would."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self._redis = redis
        # its own connection, retried by the callers rather than inside redis-py, so a failure reaches every waiter
        kwargs = dict(redis.connection_pool.connection_kwargs)
        kwargs["retry"] = Retry(NoBackoff(), 0)
        pool = aioredis.ConnectionPool(connection_class=redis.connection_pool.connection_class, **kwargs)
        self._reader = aioredis.Redis(connection_pool=pool)
        self._doorbell = doorbell_key(prefix, uuid.uuid4().hex)
        self.refused: str | None = None  # why Redis refused the mux, once it has
        self._rung_at = "0-0"  # the doorbell's last entry the reader has seen
        self._waits: dict[str, _Wait] = {}
        self._in_flight: dict[str, _Wait] | None = None  # the waits of the XREAD now blocked in Redis
        self._task: asyncio.Task[None] | None = None
        self.xreads = 0  # XREADs sent (the tests count them)

    def serves(self, key: str) -> bool:
        """False when a read of `key` is already waiting here, or Redis refused the mux: the caller reads on
        its own."""
        return self.refused is None and key not in self._waits

    async def read(self, key: str, last: str, block_ms: int, count: int) -> Any:
        loop = asyncio.get_running_loop()
        wait = _Wait(last, count, time.monotonic() + block_ms / 1000, loop.create_future())
        self._waits[key] = wait
        try:  # however this read ends (a reply, a failed ring, its caller cancelled), its wait goes with it
            if self._task is None or self._task.done():
                self._task = loop.create_task(self._run())
            elif self._in_flight is not None and self._in_flight.get(key) is not wait:
                try:
                    await self._ring()
                except NoPermissionError as exc:
                    self._refuse(exc)
                    raise MuxRefused(self.refused) from exc
            return await wait.reply
        finally:
            if self._waits.get(key) is wait:
                del self._waits[key]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing: its waiters are gone too
                pass
        await self._reader.aclose()

    async def _ring(self) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self._doorbell, {_RING_FIELD: b"1"}, maxlen=1, approximate=False)
        pipe.expire(self._doorbell, DOORBELL_TTL_S)
        await pipe.execute()

    async def _run(self) -> None:
        try:
            await self._serve()
        finally:  # cancelled (close) or broken: no waiter may be left hanging
            for key, wait in list(self._waits.items()):
                self._settle(key, wait, RedisConnectionError("the client's stream reader stopped"))

    async def _serve(self) -> None:
        while self._waits:
            await asyncio.sleep(0)  # the readers the last reply woke ask again first, and join this XREAD
            if self.refused is not None:
                for key, wait in list(self._waits.items()):
                    self._settle(key, wait, MuxRefused(self.refused))
                return
            self._expire(time.monotonic())
            if not self._waits:
                break
            waits = dict(self._waits)
            streams: dict[Any, Any] = {key: wait.last for key, wait in waits.items()}
            streams[self._doorbell] = self._rung_at
            block_ms = max(1, int((min(w.deadline for w in waits.values()) - time.monotonic()) * 1000))
            self._in_flight = waits
            self.xreads += 1
            try:
                # COUNT applies per stream; every reader of one client asks with the same
                reply: Any = await self._reader.xread(
                    streams, count=max(w.count for w in waits.values()), block=block_ms
                )
            except Exception as exc:  # noqa: BLE001 - each waiter's caller decides, as for its own read
                if isinstance(exc, NoPermissionError):
                    self._refuse(exc)
                    exc = MuxRefused(self.refused)
                for key, wait in waits.items():
                    self._settle(key, wait, exc)
                continue
            finally:
                self._in_flight = None
            for raw_key, entries in reply.items() if isinstance(reply, dict) else reply or []:
                key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
                if key == self._doorbell:
                    self._rung_at = entries[-1][0].decode()
                elif (waiting := waits.get(key)) is not None:
                    self._settle(key, waiting, [[raw_key, entries]])

    def _refuse(self, exc: Exception) -> None:
        if self.refused is None:
            self.refused = str(exc)
            log.warning("redis refused the shared stream read: each stream reads on its own", error=self.refused)

    def _expire(self, now: float) -> None:
        """A read whose BLOCK ran out gets what XREAD gives then: nothing."""
        for key, wait in list(self._waits.items()):
            if wait.deadline <= now:
                self._settle(key, wait, [])

    def _settle(self, key: str, wait: _Wait, outcome: Any) -> None:
        if self._waits.get(key) is wait:
            del self._waits[key]
        if not wait.reply.done():
            if isinstance(outcome, BaseException):
                wait.reply.set_exception(outcome)
            else:
                wait.reply.set_result(outcome)
