"""Batches and their webhooks on a Redis Cluster: a model spread over three partitions on three shards,
batches pinned to each partition (their ledgers beside their requests), two gateway replicas, and a
receiver that gets every batch's event from each partition's outbox."""

from __future__ import annotations

import io
import json
from pathlib import Path

import openai
import pytest

from producer.connection import connect
from producer.protocol import JobKeys, Keys
from producer.webhooks.signing import new_secret
from tests.cluster.test_cluster_partitions import P, _worker, spread_model
from tests.producer.gateway.webhook_receiver import Receiver
from tests.queue_helpers import wait_for
from tests.stack_helpers import GatewayProcess
from worker.redis_cluster import RedisClusterServer

pytestmark = pytest.mark.slow


def test_batches_on_every_shard_finish_and_announce_themselves(
    cluster_url: str, redis_cluster: RedisClusterServer, tmp_path: Path
) -> None:
    model = spread_model(redis_cluster)
    worker = _worker(cluster_url, model, tmp_path)
    receiver = Receiver().start()
    secret = new_secret()
    hooks = json.dumps([{"name": "app", "url": receiver.url("/hook"), "secret": secret}])
    args = ("--partitions", str(P), "--batch-window", "4", "--batch-sweep-s", "0.2")
    hook_args = ("--webhook-allowed-networks", "127.0.0.0/8", "--webhook-poll-s", "0.1")
    first = GatewayProcess(
        cluster_url, tmp_path / "a.log", *args, *hook_args, env={"TOKENRELAY_WEBHOOK_ENDPOINTS": hooks}
    )
    second = GatewayProcess(cluster_url, tmp_path / "b.log", *args)
    try:
        first.wait_ready()
        second.wait_ready()
        admin = connect(cluster_url)
        a = openai.OpenAI(base_url=f"{first.url}/v1", api_key="x", max_retries=0)
        b = openai.OpenAI(base_url=f"{second.url}/v1", api_key="x", max_retries=0)
        lines = "".join(
            json.dumps(
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/completions",
                    "body": {"model": model, "prompt": "a b c", "max_tokens": 3},
                }
            )
            + "\n"
            for i in range(12)
        )
        file_id = a.files.create(file=("in.jsonl", io.BytesIO(lines.encode())), purpose="batch").id
        batches, partitions = [], set()
        while len(partitions) < P:  # one batch (at least) in every partition, so on every shard
            batch = a.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
            where = admin.hget(JobKeys().batch_models, batch.id).decode()
            partitions.add(int(where.split(":")[0]))
            batches.append(batch.id)
        shards = {redis_cluster.master_of(Keys(model, partition=int(p)).batch("x")).port for p in partitions}
        assert len(shards) == P
        for batch_id in batches:
            done = wait_for(
                lambda i=batch_id: (x := b.batches.retrieve(i)).status == "completed" and x, 60, 0.1, "done"
            )
            output = b.files.content(done.output_file_id).text.splitlines()
            assert sorted(json.loads(line)["custom_id"] for line in output) == sorted(f"r{i}" for i in range(12))
        sdk = openai.OpenAI(api_key="unused")

        def announced() -> set[str]:
            return {sdk.webhooks.unwrap(d.body, d.headers, secret=secret).data.id for d in receiver.deliveries("/hook")}

        wait_for(lambda: set(batches) <= announced(), 60, 0.1, "every batch's webhook")
        assert [x.id for x in b.batches.list(limit=len(batches))] == batches[::-1]
    finally:
        first.stop()
        second.stop()
        receiver.stop()
        worker.kill()
