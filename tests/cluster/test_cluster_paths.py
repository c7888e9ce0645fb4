"""Every path that runs on one Redis, on a real 3-master + 3-replica Redis Cluster (no-op worker processes)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from producer.async_client import AsyncClient
from producer.client import Client
from producer.connection import connect
from producer.errors import RequestFailed
from producer.protocol import EventType, Keys
from producer.results import CancelOutcome
from tests.queue_helpers import WorkerProcess, read_events, terminal_count, wait_for
from tests.stack_helpers import GatewayProcess, celery_client, celery_worker, noop_worker
from worker.redis_cluster import RedisClusterServer
from worker.redis_server import RedisServer

pytestmark = pytest.mark.slow


def models_on_distinct_shards(cluster: RedisClusterServer, count: int) -> list[str]:
    """Model names whose keys (one hash tag each) land on `count` different masters."""
    names: dict[int, str] = {}
    for i in range(1000):
        name = f"m{i}"
        names.setdefault(cluster.master_of(Keys(name).queues[0]).port, name)
        if len(names) == count:
            return list(names.values())
    raise AssertionError("no spread found")


@pytest.fixture(scope="module")
def worker(redis_cluster: RedisClusterServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    process = noop_worker(
        redis_cluster.url, tmp_path_factory.mktemp("cluster") / "worker.log", "--noop-step-delay", "0.002"
    )
    process.wait_ready()
    yield process
    process.kill()


@pytest.fixture
def client(redis_cluster: RedisClusterServer, worker: WorkerProcess) -> Iterator[Client]:
    with Client(redis_cluster.url, model="tiny") as c:
        yield c


def test_submit_stream_result_and_wait_all(client: Client) -> None:
    request_id = client.submit("a b c", max_tokens=5)
    events = list(client.stream(request_id))
    assert [e.type for e in events][-1] is EventType.DONE
    assert "".join(e.text for e in events if e.type is EventType.DELTA) == " x" * 5
    assert client.result(request_id).text == " x" * 5
    ids = [client.submit(f"p {i}", max_tokens=3) for i in range(40)]
    done = client.wait_all(ids, timeout=60)
    assert all(done[i].token_ids and len(done[i].token_ids) == 3 for i in ids)
    assert all(terminal_count(read_events(client.redis, Keys("tiny"), i)) == 1 for i in ids)


def test_cancel_and_deadline(client: Client) -> None:
    running = client.submit("long", max_tokens=100_000)
    wait_for(lambda: any(e.type is EventType.DELTA for e in read_events(client.redis, Keys("tiny"), running)), 30)
    assert client.cancel(running) is CancelOutcome.REQUESTED
    assert client.result(running, timeout=30).finish_reason == "cancelled"
    late = client.submit("late", deadline=time.time() - 1)
    with pytest.raises(RequestFailed, match="deadline"):
        client.result(late, timeout=30)


def test_priority_classes_are_served_high_first(redis_cluster: RedisClusterServer, tmp_path: Path) -> None:
    with Client(redis_cluster.url, model="prio") as client:
        blocker = client.submit("block", max_tokens=300)
        ids = {p: client.submit(p, priority=p, max_tokens=3) for p in ("low", "normal", "high")}
        process = WorkerProcess(
            redis_cluster.url,
            tmp_path,
            tmp_path / "prio.log",
            ["--engine", "noop", "--noop-step-delay", "0.005", "--max-num-seqs", "1"],
            model_name="prio",
        )
        try:
            process.wait_ready()
            client.wait_all([blocker, *ids.values()], timeout=60)
        finally:
            process.kill()
        finished = {
            p: int(read_events(client.redis, Keys("prio"), i)[-1].entry_id.split("-")[0]) for p, i in ids.items()
        }
    assert finished["high"] <= finished["normal"] <= finished["low"]


def test_async_client_generates(redis_cluster: RedisClusterServer, worker: WorkerProcess) -> None:
    async def run(**config: int) -> list[str]:
        async with AsyncClient(redis_cluster.url, model="tiny", **config) as client:
            return [c.text for c in await client.generate(["a", "b c", "d e f"], max_tokens=2, timeout=60)]

    assert asyncio.run(run()) == [" x x"] * 3
    assert asyncio.run(run(submit_replicas=1)) == [" x x"] * 3  # durable: WAIT on the connection that wrote


def test_gateway_serves_the_openai_sdk(
    redis_cluster: RedisClusterServer, worker: WorkerProcess, tmp_path: Path
) -> None:
    gateway = GatewayProcess(redis_cluster.url, tmp_path / "gateway.log").wait_ready()
    try:
        sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused")
        assert "tiny" in [m.id for m in sdk.models.list().data]
        completion = sdk.completions.create(model="tiny", prompt="a b", max_tokens=4)
        assert completion.choices[0].text == " x" * 4
        stream = sdk.completions.create(model="tiny", prompt="a", max_tokens=3, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == " x" * 3
        metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
        assert 'tokenrelay_live_workers{model="tiny"} 1.0' in metrics
        assert "tokenrelay_redis_up 1.0" in metrics
    finally:
        gateway.stop()


def test_gateway_keeps_responses_across_slots(
    redis_cluster: RedisClusterServer, worker: WorkerProcess, tmp_path: Path
) -> None:
    """A stored response's record (its request's slot) and locator (its own) on different shards."""
    gateway = GatewayProcess(redis_cluster.url, tmp_path / "gateway.log").wait_ready()
    try:
        sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        # the no-op engine has no chat template: the response fails, which is all the stores need to show
        created = sdk.responses.create(model="tiny", input="q", background=True)
        failed = wait_for(lambda: (r := sdk.responses.retrieve(created.id)).status == "failed" and r, 30)
        assert failed.error is not None and failed.error.code == "invalid_prompt"
        assert [e.type for e in sdk.responses.retrieve(created.id, stream=True)][-1] == "response.failed"
        sdk.responses.delete(created.id)
        with pytest.raises(openai.NotFoundError):
            sdk.responses.retrieve(created.id)
    finally:
        gateway.stop()


def test_tokenrelay_batch_and_status(redis_cluster: RedisClusterServer, worker: WorkerProcess, tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": f"c{i}",
                    "method": "POST",
                    "url": "/v1/completions",
                    "body": {"model": "tiny", "prompt": f"p {i}", "max_tokens": 2},
                }
            )
            + "\n"
            for i in range(100)
        )
    )
    batch = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "batch",
            str(source),
            "-o",
            str(output),
            "--redis",
            redis_cluster.url,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "TOKENRELAY_LOG_JSON": "1"},
    )
    assert batch.returncode == 0, batch.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == sorted(f"c{i}" for i in range(100))
    assert all(r["response"]["body"]["choices"][0]["text"] == " x x" for r in records)
    status = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status", "--json", "--redis", redis_cluster.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    tiny = next(m for m in json.loads(status.stdout) if m["model"] == "tiny")
    assert len(tiny["workers"]) == 1


def test_celery_generate(redis_cluster: RedisClusterServer, worker: WorkerProcess, tmp_path: Path) -> None:
    # Celery's own broker stays a plain Redis (kombu speaks no Cluster); the tasks' tokenrelay client
    # takes the cluster URL from the same variable as everywhere else.
    with RedisServer() as broker:
        env = {
            **os.environ,
            "TOKENRELAY_REDIS_URL": redis_cluster.url,
            "TOKENRELAY_CELERY_BROKER_URL": broker.url,
            "TOKENRELAY_MAINTENANCE_REDIS_URL": redis_cluster.url,
            "TOKENRELAY_LOG_JSON": "1",
        }
        celery = celery_worker((tmp_path / "celery.log"), env, "c")
        try:
            app = celery_client(broker.url)
            completion = app.send_task(
                "tokenrelay.generate", args=["a b c"], kwargs={"model": "tiny", "max_tokens": 3}
            ).get(timeout=90)
            assert completion["text"] == " x x x" and completion["finish_reason"] == "length"
            swept = app.send_task("tokenrelay.maintenance.reclaim_sweep").get(timeout=60)
            assert "tiny" in swept
        finally:
            celery.terminate()
            celery.wait(30)


def test_two_models_on_different_shards_are_both_served(redis_cluster: RedisClusterServer, tmp_path: Path) -> None:
    names = models_on_distinct_shards(redis_cluster, 2)
    ports = {redis_cluster.master_of(Keys(n).queues[0]).port for n in names}
    assert len(ports) == 2
    workers = [
        WorkerProcess(
            redis_cluster.url,
            tmp_path,
            tmp_path / f"{n}.log",
            ["--engine", "noop", "--noop-step-delay", "0.002"],
            model_name=n,
        )
        for n in names
    ]
    try:
        for process in workers:
            process.wait_ready()
        client = Client(redis_cluster.url)
        ids = {n: [client.submit(f"q {i}", model=n, max_tokens=2) for i in range(20)] for n in names}
        for name, request_ids in ids.items():
            done = client.wait_all(request_ids, model=name, timeout=60)
            assert all(len(done[i].token_ids) == 2 for i in request_ids)
            assert all(terminal_count(read_events(client.redis, Keys(name), i)) == 1 for i in request_ids)
        admin = connect(redis_cluster.url)
        assert set(names) <= {m.decode() for m in admin.smembers(Keys("x").models)}
    finally:
        for process in workers:
            process.kill()
