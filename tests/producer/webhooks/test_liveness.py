"""Liveness keys against a real redis-server: who holds an endpoint's entries, and which consumers go."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis

from producer.protocol.keys import JobKeys, Keys
from producer.webhooks.liveness import Liveness

STREAM, GROUP = Keys("tiny").events, "hook:app"


def test_owners_hold_entries_while_alive_and_only_for_their_endpoints(redis_url: str) -> None:
    async def check() -> list[bool]:
        client = aioredis.Redis.from_url(redis_url)
        me = Liveness(client, JobKeys(), "me", ["app"])
        other = Liveness(client, JobKeys(), "other", ["app"])
        beat = asyncio.create_task(other.beat_forever())
        await asyncio.sleep(0.1)
        seen = [await me.holds("other", "app", {}), await me.holds("other", "ops", {}), await me.holds("me", "x", {})]
        beat.cancel()
        await other.forget()  # a clean stop: its entries are free at once
        seen.append(await me.holds("other", "app", {}))
        seen.append(await me.holds("ghost", "app", {}))
        await client.aclose()
        return seen

    assert asyncio.run(check()) == [True, False, True, False, False]
    assert redis.Redis.from_url(redis_url).ttl(JobKeys().hooks_alive("other")) == -2


def test_prune_drops_only_idle_empty_consumers_of_lost_replicas(redis_url: str) -> None:
    admin = redis.Redis.from_url(redis_url)
    admin.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    for consumer in ("lost", "holding", "alive"):
        admin.xadd(STREAM, {"id": f"evt_{consumer}"})
        ((_, ((entry_id, _),)),) = admin.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=1)
        if consumer != "holding":
            admin.xack(STREAM, GROUP, entry_id)
    admin.set(JobKeys().hooks_alive("alive"), "{}")

    async def prune() -> int:
        client = aioredis.Redis.from_url(redis_url)
        dropped = await Liveness(client, JobKeys(), "me", ["app"]).prune(STREAM, GROUP, idle_s=0)
        await client.aclose()
        return dropped

    assert asyncio.run(prune()) == 1
    assert sorted(c["name"] for c in admin.xinfo_consumers(STREAM, GROUP)) == [b"alive", b"holding"]
