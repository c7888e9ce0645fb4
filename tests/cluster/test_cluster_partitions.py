"""One hot model over three partitions on three shards of a real Redis Cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from producer.client import Client
from producer.errors import QueueFull
from producer.protocol import Keys, new_request_id, partition_of
from producer.results import CancelOutcome
from tests.queue_helpers import WorkerProcess, read_events, terminal_count, wait_for
from worker.redis_cluster import RedisClusterServer

pytestmark = pytest.mark.slow
P = 3


def spread_model(cluster: RedisClusterServer) -> str:
    """A model name whose P partitions hash to P different masters."""
    for i in range(1000):
        name = f"hot{i}"
        if len({cluster.master_of(k.queues[0]).port for k in Keys(name).partitions(P)}) == P:
            return name
    raise AssertionError("no spread found")


def id_in(partition: int) -> str:
    while True:
        request_id = new_request_id()
        if partition_of(request_id, P) == partition:
            return request_id


def _worker(url: str, model: str, tmp_path: Path, *extra: str) -> WorkerProcess:
    process = WorkerProcess(
        url,
        tmp_path,
        tmp_path / f"{model}.log",
        ["--engine", "noop", "--noop-step-delay", "0.003", "--partitions", str(P), *extra],
        model_name=model,
    )
    process.wait_ready()
    return process


def test_partitions_sit_on_three_shards_and_all_are_served(
    redis_cluster: RedisClusterServer, cluster_url: str, tmp_path: Path
) -> None:
    model = spread_model(redis_cluster)
    parts = Keys(model).partitions(P)
    slots = {redis_cluster.keyslot(k.queues[0]) for k in parts}
    assert len(slots) == P and len({redis_cluster.master_of(k.queues[0]).port for k in parts}) == P
    for k in parts:  # every key of a partition shares its slot: each script stays on one shard
        assert {
            redis_cluster.keyslot(key)
            for key in (*k.queues, k.request("a" * 32), k.result("a" * 32), k.dead, k.cancels("w"))
        } == {redis_cluster.keyslot(k.dead)}
    worker = _worker(cluster_url, model, tmp_path)
    try:
        client = Client(cluster_url, model=model, partitions=P)
        ids = [client.submit(f"q {i}", max_tokens=3) for i in range(90)]
        assert set(Counter(partition_of(i, P) for i in ids)) == set(range(P))
        done = client.wait_all(ids, timeout=90)
        assert all(len(done[i].token_ids) == 3 for i in ids)
        for request_id in ids:
            keys = Keys(model).for_request(request_id, P)
            assert terminal_count(read_events(client.redis, keys, request_id)) == 1
            assert client.result(request_id).token_ids == done[request_id].token_ids  # found in its partition
        running = client.submit("long", max_tokens=100_000, request_id=id_in(2))
        keys = Keys(model).for_request(running, P)
        wait_for(lambda: read_events(client.redis, keys, running), 30, what="the long request streaming")
        assert client.cancel(running) is CancelOutcome.REQUESTED  # the cancel reaches its owner's partition
        assert client.result(running, timeout=30).finish_reason == "cancelled"
    finally:
        worker.kill()


def test_high_priority_goes_first_across_partitions(
    redis_cluster: RedisClusterServer, cluster_url: str, tmp_path: Path
) -> None:
    model = spread_model(redis_cluster)
    client = Client(cluster_url, model=model, partitions=P)
    blocker = client.submit("block", max_tokens=200, request_id=id_in(0))
    # each class in a partition of its own, low in the partition a sweep would reach first
    ids = {
        "low": client.submit("l", priority="low", max_tokens=3, request_id=id_in(1)),
        "normal": client.submit("n", priority="normal", max_tokens=3, request_id=id_in(2)),
        "high": client.submit("h", priority="high", max_tokens=3, request_id=id_in(0)),
    }
    worker = _worker(cluster_url, model, tmp_path, "--max-num-seqs", "1")
    try:
        client.wait_all([blocker, *ids.values()], timeout=60)
    finally:
        worker.kill()
    finished = {
        p: int(read_events(client.redis, Keys(model).for_request(i, P), i)[-1].entry_id.split("-")[0])
        for p, i in ids.items()
    }
    assert finished["high"] <= finished["normal"] <= finished["low"]


def test_depth_and_queue_full_are_per_partition_and_summed_in_status(
    redis_cluster: RedisClusterServer, cluster_url: str
) -> None:
    model = spread_model(redis_cluster)
    client = Client(cluster_url, model=model, partitions=P, max_queue_depth=6)  # 2 per partition
    for partition in range(P):
        for _ in range(2):
            client.submit("x", request_id=id_in(partition))
    with pytest.raises(QueueFull):
        client.submit("x", request_id=id_in(1))
    client.redis.sadd(Keys(model).models, model)
    status = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status", "--json", "--redis", cluster_url, "--partitions", str(P)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    view = next(m for m in json.loads(status.stdout) if m["model"] == model)
    assert view["queued"]["normal"] == 6
