"""Which deliverers are alive: each replica refreshes a key with a TTL, so Redis's clock alone decides.

A pending entry belongs to the consumer that last took it. While that consumer's replica is alive it
alone retries the entry (it knows whether its attempt is still under way), so a slow attempt is never
duplicated by another replica's sweep; once its key has expired (kill -9, a lost machine) any replica
takes the entry over. The key lists the replica's endpoints: one whose configuration lacks an endpoint
does not hold that endpoint's entries hostage during a rollout.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
from typing import Any

import structlog

from producer.connection import AsyncRedis, as_text
from producer.protocol.keys import JobKeys
from producer.reconnect import REDIS_ERRORS

log = structlog.get_logger(__name__)
ALIVE_TTL_S = 10.0  # how soon a lost replica's entries are taken over
BEAT_S = ALIVE_TTL_S / 5
PRUNE_IDLE_S = 3600.0  # a consumer idle this long, holding nothing, with no live replica, is dropped


def consumer_name() -> str:
    """Unique per process start: a restarted replica is a new consumer, and the old one is seen dead."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


class Liveness:
    def __init__(self, redis: AsyncRedis, keys: JobKeys, consumer: str, endpoints: list[str]) -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self.value = json.dumps({"endpoints": sorted(endpoints)})

    async def beat_forever(self) -> None:
        """Its own task: a delivery loop stuck on a slow Redis call must not make this replica look dead."""
        while True:
            try:
                await self.redis.set(self.keys.hooks_alive(self.consumer), self.value, px=int(ALIVE_TTL_S * 1000))
            except REDIS_ERRORS as exc:
                log.warning("webhook deliverer heartbeat failed", error=str(exc)[:200])
            await asyncio.sleep(BEAT_S)

    async def forget(self) -> None:
        """On a clean stop: others take over this replica's pending entries at once."""
        try:
            await self.redis.delete(self.keys.hooks_alive(self.consumer))
        except REDIS_ERRORS:
            pass

    async def holds(self, owner: str, endpoint: str, cache: dict[str, set[str] | None]) -> bool:
        """Whether `owner` is alive and delivers to `endpoint` (this replica always is)."""
        if owner == self.consumer:
            return True
        if owner not in cache:
            raw: Any = await self.redis.get(self.keys.hooks_alive(owner))
            cache[owner] = None if raw is None else set(json.loads(raw).get("endpoints", []))
        endpoints = cache[owner]
        return endpoints is not None and endpoint in endpoints

    async def prune(self, stream: str, group: str, idle_s: float = PRUNE_IDLE_S) -> int:
        """Drops consumers of lost replicas that hold nothing (every restart leaves one per group)."""
        dropped = 0
        consumers: Any = await self.redis.xinfo_consumers(stream, group)
        for info in consumers:
            name = as_text(info.get("name"))
            if int(info.get("pending", 0)) or int(info.get("idle", 0)) < idle_s * 1000 or name == self.consumer:
                continue
            if await self.redis.exists(self.keys.hooks_alive(name)):
                continue
            await self.redis.xgroup_delconsumer(stream, group, name)
            dropped += 1
        return dropped
