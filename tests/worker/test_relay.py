"""The worker's Redis side: malformed input, takeover of a dead consumer, dead letters, fencing."""

from __future__ import annotations

import math
import queue
import threading
import time

import msgpack
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.client import Client
from producer.protocol import GROUP, SCHEMA_VERSION, EventType, Keys, Priority, done_event, new_request_id
from tests.queue_helpers import FAST, WorkerThread, read_events, wait_for
from worker.jobs import Outbox
from worker.noop_engine import NoopEngine
from worker.relay import Relay
from worker.settings import WorkerSettings

KEYS = Keys("noop")


def _pending(client: redis.Redis) -> int:
    return sum(client.xpending(k, GROUP)["pending"] for k in KEYS.queues)


def _body(request_id: str, **overrides: object) -> dict:
    body = {
        "v": SCHEMA_VERSION,
        "id": request_id,
        "model": "noop",
        "prompt": "p",
        "params": {"max_tokens": 2},
        "stream": True,
        "priority": "normal",
        "submitted_at": time.time(),
    }
    return {**body, **overrides}


# One corruption each: every case is invalid, whatever else hypothesis picks.
_int64 = st.integers(-(2**63), 2**63 - 1)  # what msgpack can carry: a bigger int fails in the test, not the worker
_corruptions = st.one_of(
    st.tuples(st.just("v"), st.sampled_from([2, "1", None, 1.0, -1])),
    st.tuples(st.just("model"), st.sampled_from(["unknown-model", "", 5, None, "m" * 300, "a{b}"])),
    st.tuples(
        st.just("prompt"),
        st.one_of(
            st.integers(-(2**63), 2**63),
            st.just(""),
            st.just("x" * 1_000_001),
            st.lists(st.text(max_size=5), max_size=3),
            st.binary(max_size=8),
        ),
    ),
    st.tuples(
        st.just("params"),
        st.one_of(
            st.fixed_dictionaries({"temperature": st.sampled_from([math.nan, math.inf, -1.0, "hot", None])}),
            st.fixed_dictionaries({"max_tokens": st.integers(-(2**63), 0) | st.integers(1_000_001, 2**63 - 1)}),
            st.fixed_dictionaries({"top_p": st.floats(1.0001, 1e300) | st.floats(-1e300, 0)}),
            st.dictionaries(
                st.text(min_size=1, max_size=10).filter(
                    lambda k: k not in {"max_tokens", "temperature", "top_p", "seed", "stop"}
                ),
                _int64,
                min_size=1,
                max_size=3,
            ),
            st.text(max_size=10),
            st.lists(_int64, max_size=3),
        ),
    ),
    st.tuples(st.just("stream"), st.integers(-5, 5) | st.text(max_size=5)),
    st.tuples(st.just("priority"), st.text(max_size=8).filter(lambda p: p not in ("high", "normal", "low"))),
    st.tuples(st.just("deadline"), st.sampled_from([math.nan, -5, "tomorrow", [1]])),
    st.tuples(st.just("metadata"), st.just(msgpack.ExtType(3, b"x"))),
    st.tuples(st.just("id"), st.just("f" * 32)),  # body id differs from the entry's id
)


@st.composite
def malformed_entries(draw: st.DrawFn) -> tuple[dict, str | None]:
    """Stream entry fields, and the request id an error event should be addressed to (None: unaddressable)."""
    kind = draw(st.sampled_from(["corrupt", "corrupt", "corrupt", "bytes", "no_id", "bad_id"]))
    request_id = new_request_id()
    if kind == "bytes":
        return {"id": request_id, "m": draw(st.binary(max_size=256))}, request_id
    if kind == "no_id":
        return {
            "m": draw(st.binary(max_size=64)),
            **draw(st.dictionaries(st.sampled_from(["x", "y"]), st.binary(max_size=8))),
        }, None
    if kind == "bad_id":
        return {"id": draw(st.text(max_size=40).filter(lambda s: len(s) != 32)), "m": b"\x80"}, None
    field, value = draw(_corruptions)
    return {"id": request_id, "m": msgpack.packb(_body(request_id, **{field: value}), use_bin_type=True)}, request_id


def test_malformed_input_is_answered_or_dead_lettered_and_serving_goes_on(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    r = client.redis

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(malformed_entries())
    def check(case: tuple[dict, str | None]) -> None:
        fields, request_id = case
        dead_before = r.xlen(KEYS.dead)
        r.xadd(KEYS.queue(Priority.NORMAL), fields)
        good = client.submit("still serving", max_tokens=2)  # sent right after the bad one
        assert client.result(good, timeout=10).finish_reason == "length"
        wait_for(lambda: r.xlen(KEYS.dead) == dead_before + 1, 10, what="a dead letter")
        if request_id is not None:
            events = read_events(r, KEYS, request_id)
            assert [e.type for e in events] == [EventType.ERROR]
            assert events[0].code in ("invalid_request", "unsupported_version", "unknown_model")
        assert _pending(r) == 0

    with WorkerThread(NoopEngine(), redis_url, model_name="noop") as worker:
        check()
        assert worker.thread.is_alive()


def _ghost(redis_url: str, budget: int) -> Relay:
    """A worker that claims requests and then dies silently: its claims are never refreshed."""
    settings = WorkerSettings(redis_url=redis_url, model_name="noop", engine="noop", consumer="ghost", **FAST)
    relay = Relay(redis.Redis.from_url(redis_url), settings, Outbox(), queue.SimpleQueue(), dict)
    relay.ensure_groups()
    relay.admit_once(budget, autoclaim=False, preread=[])
    assert relay.held == budget
    return relay


def test_a_dead_consumers_requests_are_taken_over_with_a_restart(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    ids = [client.submit("a b", max_tokens=4) for _ in range(3)]
    ghost = _ghost(redis_url, 3)
    ghost.outbox.add_delta(ids[0], 1, " stale", [99])  # it got one token out before dying
    ghost.publish_once(heartbeat=False)
    with WorkerThread(NoopEngine(), redis_url, model_name="noop"):
        results = client.wait_all(ids, timeout=30)
    for request_id in ids:
        assert results[request_id].token_ids == [2, 3, 4, 5] and results[request_id].restarts == 1
        kinds = [e.type for e in read_events(client.redis, KEYS, request_id)]
        assert kinds.count(EventType.RESTART) == 1 and kinds.count(EventType.DONE) == 1
    assert [e.type for e in read_events(client.redis, KEYS, ids[0])][:2] == [EventType.DELTA, EventType.RESTART]
    assert _pending(client.redis) == 0


def test_after_max_deliveries_a_request_is_dead_lettered_with_an_error(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    request_id = client.submit("poison", max_tokens=4)
    _ghost(redis_url, 1)
    with WorkerThread(NoopEngine(), redis_url, model_name="noop", max_deliveries=1) as worker:
        events = list(client.events(request_id, timeout=30))
    assert events[-1].type is EventType.ERROR and events[-1].code == "max_deliveries"
    dead = client.redis.xrange(KEYS.dead)
    assert len(dead) == 1 and dead[0][1][b"reason"] == b"max_deliveries" and dead[0][1][b"id"] == request_id.encode()
    assert worker.engine.generated_tokens == 0 and _pending(client.redis) == 0


def test_a_worker_that_lost_its_claim_writes_nothing_more(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    with WorkerThread(NoopEngine(step_delay_s=0.005), redis_url, model_name="noop") as thread:
        request_id = client.submit("x", max_tokens=100_000)
        next(e for e in client.stream(request_id, timeout=10) if e.type is EventType.DELTA)
        client.redis.hincrby(KEYS.request(request_id), "epoch", 1)  # as another worker's takeover does
        wait_for(lambda: not thread.engine.has_unfinished(), 10, what="the worker to drop the request")
        written = len(read_events(client.redis, KEYS, request_id))
        time.sleep(0.3)  # many more steps and publish cycles
        events = read_events(client.redis, KEYS, request_id)
        assert len(events) == written and not any(e.type.terminal for e in events)
        assert thread.worker.relay.held == 0


def test_a_starting_worker_prunes_what_dead_workers_left(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    client.submit("x", max_tokens=1)
    r = client.redis
    r.hset(KEYS.workers, "long-gone", msgpack.packb({"at": time.time() - 3600}))
    r.xgroup_createconsumer(KEYS.queue(Priority.NORMAL), GROUP, "long-gone")
    time.sleep(0.15)  # idle past ten claim thresholds of the worker below
    with WorkerThread(NoopEngine(), redis_url, model_name="noop", heartbeat_s=0.005, claim_idle_s=0.01):
        wait_for(lambda: r.hexists(KEYS.workers, "long-gone") == 0, 10, what="the stale heartbeat pruned")
        names = {c["name"] for c in r.xinfo_consumers(KEYS.queue(Priority.NORMAL), GROUP)}
    assert b"long-gone" not in names and "long-gone" not in names


def test_a_publish_whose_reply_was_lost_is_retried_as_it_was(redis_url: str) -> None:
    """Redis ran the publish script but the reply never came: the retry must be that same publish, not
    one merged with newer tokens (the script sees its seq already applied and writes nothing)."""
    from tests.chaos.proxy import FaultProxy

    client = Client(redis_url, model="noop")
    request_id = client.submit("a b", max_tokens=3)
    proxy = FaultProxy(redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]).start()
    try:
        settings = WorkerSettings(redis_url=proxy.url(), model_name="noop", engine="noop", consumer="w", **FAST)
        relay = Relay(redis.Redis.from_url(proxy.url()), settings, Outbox(), queue.SimpleQueue(), dict)
        relay.ensure_groups()
        relay.admit_once(1, autoclaim=False, preread=[])
        relay.outbox.add_delta(request_id, 1, " x", [2])
        proxy.lose_reply_to(b"EVALSHA")
        with pytest.raises(redis.ConnectionError):
            relay.publish_once(heartbeat=False)
        assert proxy.lost_replies == 1
        relay.outbox.add_delta(request_id, 1, " x", [3])  # made while the first publish was in doubt
        relay.publish_once(heartbeat=False)
        relay.outbox.add_delta(request_id, 1, " x", [4])
        relay.outbox.add_terminal(request_id, 1, done_event("length", {}))
        relay.publish_once(heartbeat=False)
        relay.publish_once(heartbeat=False)  # nothing left over from the retry
    finally:
        proxy.close()
    events = read_events(client.redis, KEYS, request_id)
    assert sum((e.token_ids for e in events), []) == [2, 3, 4]  # none missing, none twice
    assert [e.type for e in events][-1] is EventType.DONE and sum(e.type.terminal for e in events) == 1
    assert relay.held == 0 and _pending(client.redis) == 0


def test_a_worker_started_while_redis_is_down_waits_for_it() -> None:
    from worker.redis_server import RedisServer

    with RedisServer() as server:
        server.kill()
        restart = threading.Thread(target=lambda: (time.sleep(1.0), server.start()))
        restart.start()
        with WorkerThread(NoopEngine(), server.url, model_name="noop") as worker:
            restart.join()
            client = Client(server.url, model="noop")
            assert client.result(client.submit("a b", max_tokens=2), timeout=30).token_ids == [2, 3]
            assert worker.thread.is_alive()


def test_a_stale_heartbeat_reply_does_not_drop_a_newer_claim_of_the_same_request(redis_url: str) -> None:
    """After a Redis pause a worker may take its own idle entry back (a new epoch) while a heartbeat built
    for the old epoch is still in flight; that heartbeat's 'lost' answer concerns the old claim only."""
    from tests.chaos.proxy import FaultProxy

    client = Client(redis_url, model="noop")
    request_id = client.submit("a b", max_tokens=3)
    proxy = FaultProxy(redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]).start()
    try:
        settings = WorkerSettings(
            redis_url=proxy.url(), model_name="noop", engine="noop", consumer="w", heartbeat_s=0.02, claim_idle_s=0.05
        )
        relay = Relay(redis.Redis.from_url(proxy.url()), settings, Outbox(), queue.SimpleQueue(), dict)
        relay.ensure_groups()
        relay.admit_once(1, autoclaim=False, preread=[])
        time.sleep(0.1)  # idle past the claim threshold, as during a pause
        proxy.hold(relay._heartbeat.sha.encode())
        heartbeat = threading.Thread(target=relay.publish_once, args=(True,))
        heartbeat.start()  # built for epoch 1, held on its way to Redis
        time.sleep(0.2)
        relay.admit_once(1, autoclaim=True, preread=[])  # takes its own idle entry back: epoch 2
        assert relay.claims[request_id].epoch == 2
        proxy.release()
        heartbeat.join(10)
    finally:
        proxy.close()
    assert request_id in relay.claims and relay.claims[request_id].epoch == 2  # still ours, under the new epoch
    notes = []
    while not relay.inbox.empty():
        notes.append(relay.inbox.get())
    assert [(n.kind.value, n.epoch) for n in notes] == [("job", 1), ("lost", 1), ("job", 2)]
