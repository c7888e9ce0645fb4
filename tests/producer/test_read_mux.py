"""ReadMux: many streams' blocking reads as one XREAD, against a real Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
import redis.asyncio as aioredis

from producer.async_client import AsyncClient
from producer.protocol import EventType
from producer.read_mux import DOORBELL_TTL_S, ReadMux
from producer.reconnect import RETRYABLE
from tests.queue_helpers import WorkerThread
from tests.stack_helpers import start_stack
from worker.noop_engine import NoopEngine
from worker.redis_server import RedisServer

LONG_BLOCK_MS = 60_000  # longer than any test waits: a read that ends sooner was ended by data or the doorbell


def xread_calls(url: str) -> int:
    stats = redis_sync.Redis.from_url(url).info("commandstats")
    return int(stats.get("cmdstat_xread", {}).get("calls", 0))


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[tuple[aioredis.Redis, ReadMux]]:
    """A client for writing and a mux over it; both closed after."""
    client = aioredis.Redis.from_url(url)
    mux = ReadMux(client, "t")
    try:
        yield client, mux
    finally:
        await mux.close()
        await client.aclose()


async def sample_blocked_readers(probe: aioredis.Redis, samples: list[int]) -> None:
    """Until cancelled, appends how many connections are blocked in an XREAD (CLIENT LIST's `b` flag)."""
    while True:
        clients = await probe.client_list()
        samples.append(sum(1 for c in clients if c.get("cmd") == "xread" and "b" in c.get("flags", "")))
        await asyncio.sleep(0.005)


async def wait_blocked(mux: ReadMux) -> None:
    while mux._in_flight is None:
        await asyncio.sleep(0.001)


def test_one_xread_serves_every_stream_a_step_touched(redis_url: str) -> None:
    streams, steps = 16, 20

    async def scenario() -> None:
        async with opened(redis_url) as (client, mux):
            got: dict[str, list[bytes]] = {f"s{i}": [] for i in range(streams)}
            step_done = [asyncio.Event() for _ in range(steps)]

            async def reader(key: str) -> None:
                last = "0-0"
                while len(got[key]) < steps:
                    for _, entries in await mux.read(key, last, LONG_BLOCK_MS, 16):
                        for entry_id, fields in entries:
                            last = entry_id.decode()
                            got[key].append(fields[b"n"])
                    if all(len(v) >= len(got[key]) for v in got.values()):
                        step_done[len(got[key]) - 1].set()

            tasks = [asyncio.create_task(reader(key)) for key in got]
            before = xread_calls(redis_url)
            for step in range(steps):  # a worker's step: one pipelined write to every stream
                pipe = client.pipeline(transaction=False)
                for key in got:
                    pipe.xadd(key, {"n": str(step)})
                await pipe.execute()
                await asyncio.wait_for(step_done[step].wait(), 30)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            assert all(v == [str(s).encode() for s in range(steps)] for v in got.values())
            # one XREAD per step (plus the one a step's reply and the next write may race into); per-stream
            # reads would have been streams * steps = 320
            assert xread_calls(redis_url) - before <= 2 * steps + 2
            assert mux.xreads <= 2 * steps + 2

    asyncio.run(scenario())


def test_a_new_stream_rings_the_doorbell_of_a_blocked_read(redis_url: str) -> None:
    async def scenario() -> None:
        async with opened(redis_url) as (client, mux):
            idle = asyncio.create_task(mux.read("idle", "0-0", LONG_BLOCK_MS, 16))
            await wait_blocked(mux)
            late = asyncio.create_task(mux.read("late", "0-0", LONG_BLOCK_MS, 16))
            await asyncio.sleep(0.05)
            await client.xadd("late", {"n": "1"})
            reply = await asyncio.wait_for(late, 30)  # without the doorbell: after the idle read's 60 s
            assert [fields for _, entries in reply for _, fields in entries] == [{b"n": b"1"}]
            assert not idle.done()
            assert 0 < await client.ttl(mux._doorbell) <= DOORBELL_TTL_S  # a gone gateway leaves no key for long
            await client.xadd("idle", {"n": "2"})
            assert (await asyncio.wait_for(idle, 30))[0][0] == b"idle"

    asyncio.run(scenario())


def test_a_read_whose_block_runs_out_gets_nothing_and_others_keep_waiting(redis_url: str) -> None:
    async def scenario() -> None:
        async with opened(redis_url) as (client, mux):
            patient = asyncio.create_task(mux.read("patient", "0-0", LONG_BLOCK_MS, 16))
            assert await asyncio.wait_for(mux.read("hasty", "0-0", 50, 16), 30) == []
            cancelled = asyncio.create_task(mux.read("gone", "0-0", LONG_BLOCK_MS, 16))
            await asyncio.sleep(0.05)
            cancelled.cancel()  # its caller left (a client disconnect): nobody else notices
            await client.xadd("patient", {"n": "1"})
            assert (await asyncio.wait_for(patient, 30))[0][0] == b"patient"
            assert "gone" not in mux._waits

    asyncio.run(scenario())


def test_a_failed_read_reaches_every_waiter_and_the_next_read_reconnects(redis_url: str) -> None:
    async def scenario() -> None:
        async with opened(redis_url) as (client, mux):
            waiters = [asyncio.create_task(mux.read(f"k{i}", "0-0", LONG_BLOCK_MS, 16)) for i in range(3)]
            await wait_blocked(mux)
            killer = redis_sync.Redis.from_url(redis_url)
            for entry in killer.client_list():
                if entry.get("cmd") == "xread":
                    killer.client_kill_filter(_id=entry["id"])
            outcomes: list[Any] = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 30)
            assert all(isinstance(o, RETRYABLE) for o in outcomes), outcomes
            await client.xadd("k0", {"n": "1"})
            assert (await asyncio.wait_for(mux.read("k0", "0-0", LONG_BLOCK_MS, 16), 30))[0][0] == b"k0"

    asyncio.run(scenario())


@pytest.mark.parametrize("multiplex", [True, False])
def test_async_client_streams_many_requests_and_one_twice(redis_url: str, multiplex: bool) -> None:
    async def scenario() -> None:
        probe = aioredis.Redis.from_url(redis_url)
        async with AsyncClient(redis_url, model="noop", multiplex_reads=multiplex) as client:
            ids = [await client.submit("a " * (i + 1), max_tokens=40) for i in range(8)]

            async def tokens(request_id: str) -> list[int]:
                out: list[int] = []
                async for event in client.stream(request_id, timeout=60):
                    if event.type is EventType.DELTA:
                        out.extend(event.token_ids)
                return out

            readers = [0]  # samples: how many connections Redis had blocked in XREAD while the streams were open

            watcher = asyncio.create_task(sample_blocked_readers(probe, readers))
            # ids[0] is read by two streams at once: the second reads on its own, both see every token
            results = await asyncio.gather(*(tokens(i) for i in [ids[0], *ids]))
            watcher.cancel()
            assert results[0] == results[1]
            assert [len(r) for r in results] == [40] * 9
            assert [r[0] for r in results[1:]] == list(range(1, 9))  # the noop engine's first token: prompt length
            assert (client._mux is not None) is multiplex
            # multiplexed: the mux's own connection and the second reader of ids[0]; else about one per stream
            assert max(readers) <= 2 if multiplex else max(readers) >= 4, max(readers)
        await probe.aclose()

    with WorkerThread(NoopEngine(step_delay_s=0.005), redis_url, model_name="noop"):
        asyncio.run(scenario())


def test_streams_blocked_in_the_shared_read_ride_out_a_redis_restart() -> None:
    async def run(server: RedisServer) -> list[list[int]]:
        async with AsyncClient(server.url, model="noop") as client:
            ids = [await client.submit("a " * (i + 1), max_tokens=200) for i in range(4)]
            waits = [asyncio.create_task(client.result(request_id, timeout=120)) for request_id in ids]
            while client._mux is None or len(client._mux._waits) < len(ids):  # all four wait in the mux's read
                await asyncio.sleep(0.005)
            server.kill()
            await asyncio.sleep(0.5)
            server.start()
            return [completion.token_ids for completion in await asyncio.gather(*waits)]

    with (
        RedisServer(persist=True) as server,
        WorkerThread(NoopEngine(step_delay_s=0.01), server.url, model_name="noop"),
    ):
        tokens = asyncio.run(run(server))
    assert tokens == [list(range(i + 1, i + 201)) for i in range(4)]  # the noop engine counts up from the prompt length


@pytest.mark.parametrize("flag", ["true", "false"])
def test_the_gateways_multiplex_reads_flag(tmp_path: Path, flag: str) -> None:
    stack = start_stack(tmp_path, worker_args=("--noop-step-delay", "0.01"), gateway_args=("--multiplex-reads", flag))
    try:

        async def scenario() -> list[int]:
            probe = aioredis.Redis.from_url(stack.redis.url)
            readers = [0]

            async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=60) as http:

                async def stream(index: int) -> int:
                    body = {"model": "tiny", "prompt": f"p {index}", "max_tokens": 60, "stream": True}
                    async with http.stream("POST", "/v1/completions", json=body) as response:
                        assert response.status_code == 200
                        # the gateway may coalesce tokens into fewer chunks: count the text, one " x" a token
                        chunks = [
                            json.loads(line[6:]) async for line in response.aiter_lines() if line.startswith("data: {")
                        ]
                        return "".join(c["choices"][0]["text"] for c in chunks if c["choices"]).count(" x")

                watcher = asyncio.create_task(sample_blocked_readers(probe, readers))
                chunks = await asyncio.gather(*(stream(i) for i in range(6)))
                watcher.cancel()
            await probe.aclose()
            assert chunks == [60] * 6
            return readers

        readers = asyncio.run(scenario())
    finally:
        stack.close()
    # on: the gateway's one reading connection; off: one per open stream
    assert max(readers) <= 1 if flag == "true" else max(readers) >= 6, max(readers)


def test_where_an_acl_refuses_the_doorbell_every_stream_reads_on_its_own(redis_url: str) -> None:
    admin = redis_sync.Redis.from_url(redis_url)
    # a user confined to one model's keys: the mux's doorbell (`tr:{mux}:...`) is out of its reach
    admin.acl_setuser("narrow", enabled=True, passwords=["+pw"], keys=["tr:{noop}:*"], commands=["+@all"])
    narrow_url = redis_url.replace("redis://", "redis://narrow:pw@", 1)

    async def scenario() -> tuple[list[list[int]], str | None]:
        async with AsyncClient(narrow_url, model="noop") as client:
            ids = [await client.submit("a " * (i + 1), max_tokens=20) for i in range(3)]
            results = await asyncio.gather(*(client.result(i, timeout=60) for i in ids))
            assert client._mux is not None
            return [r.token_ids for r in results], client._mux.refused

    try:
        with WorkerThread(NoopEngine(step_delay_s=0.005), redis_url, model_name="noop"):
            tokens, refused = asyncio.run(scenario())
    finally:
        admin.acl_deluser("narrow")
    assert tokens == [list(range(i + 1, i + 21)) for i in range(3)]
    assert refused is not None and "permission" in refused.lower()
