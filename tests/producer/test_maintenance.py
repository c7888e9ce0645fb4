"""Maintenance jobs against a real redis-server: deadlines nobody serves, orphans, trims, TTLs, dead letters."""

from __future__ import annotations

import time

import msgpack
import redis

from producer import maintenance
from producer.client import Client
from producer.protocol import GROUP, Keys, Priority
from tests.queue_helpers import WorkerThread, read_events
from worker.noop_engine import NoopEngine


def _register(client: redis.Redis, model: str) -> Keys:
    keys = Keys(model)
    client.sadd(keys.models, model)
    return keys


def test_reclaim_sweep_expires_late_requests_nobody_serves(redis_url: str) -> None:
    server = redis.Redis.from_url(redis_url)
    keys = _register(server, "ghost")
    client = Client(redis_url, model="ghost")
    late = client.submit("late", deadline=time.time() - 1)
    timely = client.submit("timely", timeout=3600)
    # an orphan: delivered to a worker that died (its heartbeat is a minute old)
    orphan = client.submit("orphan", timeout=3600)
    server.xreadgroup(GROUP, "dead-worker", {keys.queue(Priority.NORMAL): ">"})
    server.hset(keys.workers, "dead-worker", msgpack.packb({"at": time.time() - 60}))
    time.sleep(0.05)
    report = maintenance.reclaim_sweep(server, claim_idle_s=0.01)
    assert report["ghost"]["expired"] == 1 and report["ghost"]["pruned_heartbeats"] == 1
    assert report["ghost"]["orphaned"] >= 1
    (event,) = read_events(server, keys, late)
    assert event.type.value == "error" and event.code == "deadline"
    assert read_events(server, keys, timely) == [] and read_events(server, keys, orphan) == []
    assert server.hget(keys.request(late), "state") == b"done"
    assert maintenance.reclaim_sweep(server).get("ghost", {}).get("expired", 0) == 0  # answered once


def test_trim_acked_keeps_undelivered_and_pending_entries(redis_url: str) -> None:
    server = redis.Redis.from_url(redis_url)
    keys = _register(server, "m")
    queue = keys.queue(Priority.NORMAL)
    server.xgroup_create(queue, GROUP, id="0", mkstream=True)
    ids = [server.xadd(queue, {"id": "x", "m": b""}) for _ in range(5)]
    server.xreadgroup(GROUP, "w", {queue: ">"}, count=3)
    server.xack(queue, GROUP, ids[0], ids[2])  # acked but not deleted (the worker deletes; this is a safety net)
    trimmed = maintenance.trim_acked(server)
    assert trimmed["m"] == 1  # only the first: the second is still pending, the last two undelivered
    assert [e[0] for e in server.xrange(queue)] == ids[1:]


def test_expire_results_gives_unbounded_keys_a_ttl(redis_url: str) -> None:
    server = redis.Redis.from_url(redis_url)
    keys = _register(server, "m")
    server.xadd(keys.result("a" * 32), {"m": b"x"})
    server.hset(keys.request("b" * 32), "state", "done")
    server.xadd(keys.result("c" * 32), {"m": b"x"})
    server.expire(keys.result("c" * 32), 50)
    assert maintenance.expire_results(server, ttl_s=1000) == 2
    assert 0 < server.ttl(keys.result("a" * 32)) <= 1000 and server.ttl(keys.result("c" * 32)) <= 50


def test_dead_letter_report_counts_what_is_new(redis_url: str) -> None:
    server = redis.Redis.from_url(redis_url)
    keys = _register(server, "noop")
    with WorkerThread(NoopEngine(), redis_url, model_name="noop"):
        server.xadd(keys.queue(Priority.NORMAL), {"id": "not-an-id", "m": b"junk"})  # dead-lettered on claim
        client = Client(redis_url, model="noop")
        client.generate(["ok"], max_tokens=1, timeout=10)  # the junk was claimed before this
    first = maintenance.dead_letter_report(server)
    assert first["noop"]["new"] == 1 and first["noop"]["reasons"] == {"invalid_request": 1}
    assert maintenance.dead_letter_report(server) == {}  # nothing new since
