"""Gatherer: the result streams of every request in flight, read together with one XREAD at a time."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import structlog

from producer.connection import AsyncRedis
from producer.gateway.errors import APIError
from producer.protocol import EVENT_FIELD, ErrorCode, Keys, decode_event
from producer.reconnect import RETRYABLE
from producer.results import Completion, read_chunks

log = structlog.get_logger(__name__)
_MAX_KEYS_PER_READ = 1_000
_BLOCK_MS = 100  # bounds how long a request added during a blocking read waits to be read


@dataclass(slots=True)
class _Waiter:
    remaining: int
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Gatherer:
    """One connection for a whole window of requests, instead of one blocking read per request."""

    def __init__(self, client: AsyncRedis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        self.positions: dict[str, str] = {}  # result stream key -> last entry id read
        self._slots: dict[str, str] = {}  # result stream key -> its partition's hash tag (one XREAD each)
        self._owners: dict[str, tuple[Completion, _Waiter]] = {}
        self._added = asyncio.Event()
        self._chunked = False

    async def wait(self, keys: Keys, request_ids: list[str], timeout: float, partitions: int = 1) -> list[Completion]:
        """Every request's completion (in order) once each has its terminal event; 504 past `timeout`."""
        waiter = _Waiter(len(request_ids))
        completions = [Completion(rid) for rid in request_ids]
        parts = [keys.for_request(rid, partitions) for rid in request_ids]
        stream_keys = [part.result(rid) for part, rid in zip(parts, request_ids, strict=True)]
        for key, part, completion in zip(stream_keys, parts, completions, strict=True):
            self.positions[key] = "0-0"
            self._slots[key] = part.base
            self._owners[key] = (completion, waiter)
        self._added.set()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.done), timeout)
        except TimeoutError:
            raise APIError(
                504, f"no answer within {timeout:.0f} s", type="timeout_error", code=ErrorCode.DEADLINE
            ) from None
        finally:
            for key in stream_keys:
                self.positions.pop(key, None)
                self._slots.pop(key, None)
                self._owners.pop(key, None)
        return completions

    async def run(self) -> None:
        failures = 0
        while True:
            if not self.positions:
                self._added.clear()
                await self._added.wait()
                continue
            try:
                got = await self._read_once()
                failures = 0
            except RETRYABLE as exc:
                failures += 1
                log.warning("reading results failed; retrying", error=str(exc)[:200], failures=failures)
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))
                continue
            if not got and self._chunked:  # several reads that do not block: pause when none brought anything
                await asyncio.sleep(0.005)

    async def _read_once(self) -> int:
        chunks = read_chunks(self.positions, self._slots, _MAX_KEYS_PER_READ)
        got, self._chunked = 0, len(chunks) > 1
        for chunk in chunks:
            # positions as they are now: an earlier read's wait may have ended and dropped its streams
            streams = {k: self.positions[k] for k in chunk if k in self.positions}
            block = _BLOCK_MS if len(chunks) == 1 else None
            reply: Any = await self.redis.xread(streams, count=512, block=block)  # type: ignore[arg-type]
            got += self._feed(reply)
        return got

    def _feed(self, reply: Any) -> int:
        got = 0
        for raw_key, entries in reply or []:
            key = raw_key.decode()
            owner = self._owners.get(key)
            for entry_id, fields in entries:
                got += 1
                if owner is None:
                    break
                self.positions[key] = entry_id.decode()
                completion, waiter = owner
                if completion.apply(decode_event(fields.get(EVENT_FIELD.encode()), self.positions[key])):
                    del self.positions[key]
                    waiter.remaining -= 1
                    if waiter.remaining == 0 and not waiter.done.done():
                        waiter.done.set_result(None)
                    break
        return got
