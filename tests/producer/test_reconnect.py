"""Clients ride out a Redis restart with backoff, and give up with a clear error when told to."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis

from producer.async_client import AsyncClient
from producer.client import Client
from producer.reconnect import Reconnect
from tests.queue_helpers import WorkerThread, attempt_in_turn
from worker.noop_engine import NoopEngine
from worker.redis_server import RedisServer


def _restart_later(server: RedisServer, after_s: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(after_s), server.start()))
    thread.start()
    return thread


def test_backoff_grows_is_capped_and_gives_up_past_the_window_or_the_deadline() -> None:
    error = redis.ConnectionError("down")
    reconnect = Reconnect(window_s=60.0)
    delays = [reconnect.delay(error) for _ in range(10)]
    assert delays[0] <= 0.05 and max(delays) <= 2.0 and delays[-1] >= 1.0
    reconnect.ok()
    assert reconnect.delay(error) <= 0.05  # a success starts the count over
    expired = Reconnect(window_s=0.0)
    expired.delay(error)
    time.sleep(0.01)
    with pytest.raises(redis.ConnectionError):
        expired.delay(error)
    with pytest.raises(TimeoutError, match="deadline"):
        Reconnect(window_s=60.0, deadline=time.monotonic()).delay(error)


def test_submit_and_results_wait_out_a_redis_restart() -> None:
    with RedisServer(persist=True) as server:
        client = Client(server.url, model="noop")
        with WorkerThread(NoopEngine(), server.url, model_name="noop"):
            assert client.result(client.submit("a", max_tokens=2), timeout=10).token_ids == [1, 2]
            server.kill()
            restart = _restart_later(server, 1.0)
            request_id = client.submit("a b", max_tokens=3)  # blocks, backing off, until Redis is back
            restart.join()
            ids = [request_id, client.submit("c", max_tokens=2)]
            results = client.wait_all(ids, timeout=30)  # the worker reconnected by itself too
    assert results[ids[0]].token_ids == [2, 3, 4] and results[ids[1]].token_ids == [1, 2]


def test_the_async_client_waits_out_a_restart_too() -> None:
    async def run(server: RedisServer) -> list[int]:
        client = AsyncClient(server.url, model="noop")
        assert (await client.result(await client.submit("a", max_tokens=1), timeout=10)).token_ids == [1]
        server.kill()
        restart = _restart_later(server, 0.5)
        request_id = await client.submit("a b", max_tokens=3)
        restart.join()
        completion = await client.result(request_id, timeout=30)
        await client.close()
        return completion.token_ids

    with RedisServer(persist=True) as server, WorkerThread(NoopEngine(), server.url, model_name="noop"):
        assert asyncio.run(run(server)) == [2, 3, 4]


def test_an_outage_past_the_window_or_the_deadline_is_an_error_not_a_hang() -> None:
    with RedisServer() as server:
        client = Client(server.url, model="noop", reconnect_s=0.5)
        request_id = client.submit("a", max_tokens=2)
        server.kill()
        thread, outcomes = attempt_in_turn(
            [
                lambda: client.submit("b"),
                lambda: client.result(request_id, timeout=0.3),
                lambda: client.wait_all([request_id], timeout=0.3),
            ],
            (TimeoutError, redis.ConnectionError),
        )
        thread.join(120)  # a guard against a hang, not a speed check: each call gives up in about a second
        hung = thread.is_alive()
        server.start()
        thread.join(60)
    assert not hung
    # past the reconnect window a submit fails; the caller's own timeout wins over the window when waiting
    assert outcomes == [redis.ConnectionError, TimeoutError, TimeoutError]
