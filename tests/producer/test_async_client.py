"""AsyncClient: the same protocol from asyncio, with many requests streamed concurrently."""

from __future__ import annotations

import asyncio

import pytest

from producer.async_client import AsyncClient
from producer.errors import QueueFull, RequestFailed
from producer.protocol import EventType
from producer.results import CancelOutcome
from tests.queue_helpers import WorkerThread
from worker.noop_engine import NoopEngine


def test_generate_stream_and_cancel_from_asyncio(redis_url: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(redis_url, model="noop") as client:
            results = await client.generate(["a", "a b", "a b c"], max_tokens=4)
            assert [r.token_ids[0] for r in results] == [1, 2, 3]
            assert all(len(r.token_ids) == 4 for r in results)

            long_id = await client.submit("s", max_tokens=100_000)
            seen, outcome = 0, None
            async for event in client.stream(long_id, timeout=20):
                if event.type is EventType.DELTA:
                    seen += len(event.token_ids)
                    if seen >= 10 and outcome is None:
                        outcome = await client.cancel(long_id)
                if event.type is EventType.DONE:
                    assert event.finish_reason == "cancelled"
            assert outcome is CancelOutcome.REQUESTED  # it was running: its worker aborts it
            assert 10 <= seen < 100_000

    with WorkerThread(NoopEngine(step_delay_s=0.001), redis_url, model_name="noop"):
        asyncio.run(scenario())


def test_async_submit_raises_queue_full(redis_url: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(redis_url, model="noop", max_queue_depth=1) as client:
            await client.submit("x")
            with pytest.raises(QueueFull):
                await client.submit("y")

    asyncio.run(scenario())


def test_async_waits_for_an_unknown_request_end_in_an_error(redis_url: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(redis_url, model="noop") as client:
            with pytest.raises(RequestFailed) as info:
                await client.result("1" * 32, timeout=60)
            assert info.value.code == "unknown_request"
            done = await client.wait_all(["2" * 32], timeout=60)
            assert done["2" * 32].error is not None and done["2" * 32].error[0] == "unknown_request"

    asyncio.run(scenario())
