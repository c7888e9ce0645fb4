"""The Batch API over HTTP, through the openai SDK, on real processes: redis-server, no-op workers, two
gateway replicas. A batch runs in the workers' scripts, so it finishes whichever gateway accepted it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from producer.connection import connect
from producer.protocol import JobKeys
from producer.webhooks.signing import new_secret
from tests.producer.gateway.webhook_receiver import Receiver
from tests.queue_helpers import WorkerProcess, wait_for
from tests.stack_helpers import GatewayProcess, noop_worker
from worker.redis_server import RedisServer

pytestmark = pytest.mark.slow

GATEWAY_ARGS = ("--batch-window", "8", "--batch-sweep-s", "0.2")
SDK = openai.OpenAI(api_key="unused")  # only for webhooks.unwrap
BAD_TOKEN = 10**9  # past the no-op engine's vocabulary: the worker answers the request with an error


@dataclass
class Fleet:
    redis: RedisServer
    workers: list[WorkerProcess]
    gateways: list[GatewayProcess]
    directory: Path

    def client(self, index: int = 0) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateways[index].url}/v1", api_key="x", max_retries=0, timeout=30)

    def add_gateway(self) -> GatewayProcess:
        gateway = GatewayProcess(
            self.redis.url, self.directory / f"gateway{len(self.gateways)}.log", *GATEWAY_ARGS
        ).wait_ready()
        self.gateways.append(gateway)
        return gateway

    def add_worker(self, delay: str = "0.02") -> WorkerProcess:
        worker = noop_worker(
            self.redis.url, self.directory / f"worker{len(self.workers)}.log", "--noop-step-delay", delay
        )
        worker.wait_ready()
        self.workers.append(worker)
        return worker


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("batches")
    server = RedisServer().start()
    fleet = Fleet(server, [], [], directory)
    try:
        fleet.add_worker()
        fleet.add_gateway()
        fleet.add_gateway()
        yield fleet
    finally:
        for gateway in fleet.gateways:
            gateway.stop()
        for worker in fleet.workers:
            worker.kill()
        server.close()


def completion_line(custom_id: str, prompt: Any = "one two three", max_tokens: int = 3) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens},
    }


def upload(client: openai.OpenAI, lines: list[Any], tmp_path: Path, name: str = "input.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    with path.open("rb") as handle:
        return client.files.create(file=handle, purpose="batch").id


def wait_status(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float = 90.0) -> Any:
    def reached() -> Any:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in statuses else None

    return wait_for(reached, timeout, 0.1, f"batch {batch_id} in {statuses}")


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]


def answered_once(client: openai.OpenAI, batch: Any, custom_ids: list[str]) -> tuple[list[dict], list[dict]]:
    """Output and error lines; every input line is in exactly one of them, exactly once."""
    output, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    seen = [line["custom_id"] for line in output + errors]
    assert sorted(seen) == sorted(custom_ids), "each input line answered exactly once"
    assert batch.request_counts.completed == len(output)
    assert batch.request_counts.failed == len(errors)
    assert batch.request_counts.total == len(custom_ids)
    return output, errors


def test_the_sdk_runs_a_batch_from_upload_to_output_files(fleet: Fleet, tmp_path: Path) -> None:
    client = fleet.client()
    lines = [completion_line(f"req-{i}", max_tokens=2 + i % 3) for i in range(20)]
    lines.append(completion_line("bad-token", prompt=[BAD_TOKEN]))
    file_id = upload(client, lines, tmp_path)
    created = client.batches.create(
        input_file_id=file_id, endpoint="/v1/completions", completion_window="24h", metadata={"job": "nightly"}
    )
    assert created.status in ("validating", "in_progress")
    assert created.metadata == {"job": "nightly"}
    batch = wait_status(client, created.id, {"completed", "failed"})
    assert batch.status == "completed", batch.errors
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    output, errors = answered_once(client, batch, [line["custom_id"] for line in lines])
    assert batch.request_counts.completed == 20 and batch.request_counts.failed == 1
    for line in output:
        i = int(line["custom_id"].split("-")[1])
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 2 + i % 3
        assert len(line["response"]["request_id"]) == 32
    (failed,) = errors
    assert failed["custom_id"] == "bad-token" and failed["response"]["status_code"] == 400
    assert "prompt" in failed["error"]["message"]
    assert batch.usage.output_tokens == sum(2 + i % 3 for i in range(20))
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_list_pages_newest_first(fleet: Fleet, tmp_path: Path) -> None:
    client = fleet.client()
    file_id = upload(client, [completion_line("only")], tmp_path)
    made = [client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h").id]
    made += [client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h").id]
    made += [client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h").id]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    rest = client.batches.list(limit=2, after=first.data[-1].id)
    assert rest.data[0].id == made[0]
    # the SDK's auto-paging walks every page
    assert set(made) <= {b.id for b in client.batches.list(limit=2)}


def test_a_bad_file_fails_the_batch_with_line_numbers(fleet: Fleet, tmp_path: Path) -> None:
    client = fleet.client()
    lines: list[Any] = [
        completion_line("fine"),
        "{not json",
        completion_line("fine"),
        {**completion_line("wrong-url"), "url": "/v1/chat/completions"},
        {**completion_line("other-model"), "body": {"model": "nobody-serves-this", "prompt": "x"}},
        {**completion_line("bad-body"), "body": {"model": "tiny", "prompt": "x", "temperature": -3}},
        "",
        completion_line("streamed") | {"body": {"model": "tiny", "prompt": "x", "stream": True}},
    ]
    file_id = upload(client, lines, tmp_path)
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    batch = wait_status(client, batch.id, {"failed", "completed", "in_progress"})
    assert batch.status == "failed" and batch.failed_at
    by_line = {e.line: e for e in batch.errors.data}
    assert by_line[2].code == "invalid_json"
    assert by_line[3].code == "duplicate_custom_id"
    assert by_line[4].code == "mismatched_endpoint" and by_line[4].param == "url"
    assert by_line[5].code in ("mismatched_model", "model_not_found")
    assert by_line[6].param == "body.temperature"
    assert 8 in by_line and 7 not in by_line and 1 not in by_line
    assert batch.output_file_id is None and batch.request_counts.completed == 0


def test_refusals_before_anything_runs(fleet: Fleet, tmp_path: Path) -> None:
    client = fleet.client()
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError) as missing:
        client.batches.retrieve("batch_" + "0" * 32)
    assert missing.value.body["code"] == "batch_not_found"  # type: ignore[index]
    file_id = upload(client, [completion_line("x")], tmp_path)
    with pytest.raises(openai.BadRequestError) as bad:
        client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")  # type: ignore[arg-type]
    assert bad.value.body["param"] == "endpoint"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="soon")  # type: ignore[arg-type]


def test_a_retried_create_with_the_same_idempotency_key_returns_the_first(fleet: Fleet, tmp_path: Path) -> None:
    client = fleet.client()
    file_id = upload(client, [completion_line("x")], tmp_path)
    headers = {"Idempotency-Key": f"nightly-{time.time()}"}
    first = client.batches.create(
        input_file_id=file_id, endpoint="/v1/completions", completion_window="24h", extra_headers=headers
    )
    again = fleet.client(1).batches.create(
        input_file_id=file_id, endpoint="/v1/completions", completion_window="24h", extra_headers=headers
    )
    assert again.id == first.id


def test_another_replica_serves_the_batch_and_it_finishes_after_the_accepting_one_is_killed(
    fleet: Fleet, tmp_path: Path
) -> None:
    accepting = fleet.add_gateway()
    client = openai.OpenAI(base_url=f"{accepting.url}/v1", api_key="x", max_retries=0)
    other = fleet.client(0)
    lines = [completion_line(f"line-{i}", max_tokens=20) for i in range(60)]
    file_id = upload(client, lines, tmp_path)
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    wait_for(lambda: other.batches.retrieve(batch.id).request_counts.completed >= 8, 60, 0.05, "some lines done")
    accepting.process.send_signal(signal.SIGKILL)
    accepting.process.wait()
    fleet.gateways.remove(accepting)
    done = wait_status(other, batch.id, {"completed"})
    answered_once(other, done, [line["custom_id"] for line in lines])
    assert done.request_counts.completed == 60


def test_a_worker_killed_mid_batch_loses_and_repeats_nothing(fleet: Fleet, tmp_path: Path) -> None:
    second = fleet.add_worker()
    client = fleet.client()
    lines = [completion_line(f"w-{i}", max_tokens=15) for i in range(60)]
    file_id = upload(client, lines, tmp_path)
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 10, 60, 0.05, "some lines done")
    second.kill()
    fleet.workers.remove(second)
    done = wait_status(client, batch.id, {"completed"}, timeout=120)
    output, _ = answered_once(client, done, [line["custom_id"] for line in lines])
    for line in output:
        assert line["response"]["body"]["usage"]["completion_tokens"] == 15


def test_cancel_mid_run_keeps_what_finished(fleet: Fleet, tmp_path: Path) -> None:
    client, other = fleet.client(0), fleet.client(1)
    lines = [completion_line(f"c-{i}", max_tokens=20) for i in range(80)]
    file_id = upload(client, lines, tmp_path)
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 8, 60, 0.05, "some lines done")
    cancelling = other.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_status(client, batch.id, {"cancelled"})
    output, errors = answered_once(client, done, [line["custom_id"] for line in lines])
    assert 8 <= len(output) < 80 and errors
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert other.batches.cancel(batch.id).status == "cancelled"  # again: the batch as it is


def test_a_batch_past_its_window_expires_with_its_partial_output(fleet: Fleet, tmp_path: Path) -> None:
    client = fleet.client()
    lines = [completion_line(f"e-{i}", max_tokens=30) for i in range(200)]
    file_id = upload(client, lines, tmp_path)
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="2s")  # type: ignore[arg-type]
    done = wait_status(client, batch.id, {"expired", "completed"})
    assert done.status == "expired" and done.expired_at
    output, errors = answered_once(client, done, [line["custom_id"] for line in lines])
    assert output and errors
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}


def test_a_finished_batch_leaves_its_bulky_keys_behind(fleet: Fleet, tmp_path: Path) -> None:
    """Once the output files exist, the ledger keeps only its object: lines and answers are gone."""
    client = fleet.client()
    file_id = upload(client, [completion_line(f"k-{i}") for i in range(5)], tmp_path)
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    done = wait_status(client, batch.id, {"completed"})
    lines_of(client, done.output_file_id)  # materialized by now (on demand if the sweep has not yet)
    redis = connect(fleet.redis.url)
    where = redis.hget(JobKeys().batch_models, batch.id).decode()
    ledger = f"tr:{{{where.partition(':')[2]}}}:batch:{batch.id}"
    wait_for(lambda: redis.hget(ledger, "rendered"), 10, 0.05, "rendered")
    assert redis.exists(ledger) == 1
    assert not any(redis.exists(ledger + suffix) for suffix in (":todo", ":req", ":left", ":live", ":out"))
    assert redis.ttl(ledger) > 0


def test_every_batch_ending_reaches_a_webhook_receiver_signed(fleet: Fleet, tmp_path: Path) -> None:
    """batch.completed, .failed, .cancelled and .expired, as the ledger scripts emit them and the gateway
    delivers them; the receiver verifies each with the openai SDK's own `webhooks.unwrap`."""
    receiver = Receiver().start()
    secret = new_secret()
    hooks = [{"name": "app", "url": receiver.url("/hook"), "secret": secret}]
    args = (*GATEWAY_ARGS, "--webhook-allowed-networks", "127.0.0.0/8", "--webhook-poll-s", "0.1")
    hooked = GatewayProcess(
        fleet.redis.url, tmp_path / "hooked.log", *args, env={"TOKENRELAY_WEBHOOK_ENDPOINTS": json.dumps(hooks)}
    ).wait_ready()
    try:
        client = fleet.client()
        short = upload(client, [completion_line("a"), completion_line("b")], tmp_path, "short.jsonl")
        long = upload(client, [completion_line(f"l-{i}", max_tokens=40) for i in range(100)], tmp_path, "long.jsonl")
        bad = upload(client, ["{oops"], tmp_path, "bad.jsonl")
        create = client.batches.create
        completed = create(input_file_id=short, endpoint="/v1/completions", completion_window="24h").id
        failed = create(input_file_id=bad, endpoint="/v1/completions", completion_window="24h").id
        expired = create(input_file_id=long, endpoint="/v1/completions", completion_window="1s").id  # type: ignore[arg-type]
        cancelled = create(input_file_id=long, endpoint="/v1/completions", completion_window="24h").id
        client.batches.cancel(cancelled)
        expected = {completed: "batch.completed", failed: "batch.failed", expired: "batch.expired"}
        expected[cancelled] = "batch.cancelled"

        def ours() -> dict[str, Any]:
            events = [SDK.webhooks.unwrap(d.body, d.headers, secret=secret) for d in receiver.deliveries("/hook")]
            return {e.data.id: e for e in events if e.data.id in expected}

        wait_for(lambda: len(ours()) == 4, 90, 0.1, "four batch events")
        for batch_id, event in ours().items():
            assert event.type == expected[batch_id]
            assert client.batches.retrieve(batch_id).status == expected[batch_id].split(".")[1]
    finally:
        hooked.stop()
        receiver.stop()


def test_the_batch_command_runs_a_file_through_the_http_api(fleet: Fleet, tmp_path: Path) -> None:
    """`tokenrelay batch --http URL`: upload, create, follow, download; the output holds every line, the
    errors file the failed one; a file mixing endpoints is refused before anything is uploaded."""
    source = tmp_path / "in.jsonl"
    lines = [completion_line(f"cli-{i}") for i in range(15)] + [completion_line("cli-bad", prompt=[BAD_TOKEN])]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "worker.cli", "batch", str(source), "-o", str(output), "--no-progress"]
    done = subprocess.run([*command, "--http", fleet.gateways[0].url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["total"] == 16 and summary["succeeded"] == 15 and summary["failed"] == 1
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in written) == sorted(line["custom_id"] for line in lines)
    errors = [json.loads(line) for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in errors] == ["cli-bad"]
    mixed = tmp_path / "mixed.jsonl"
    chat = {**completion_line("chat"), "url": "/v1/chat/completions"}
    mixed.write_text(json.dumps(completion_line("c")) + "\n" + json.dumps(chat) + "\n")
    refused = subprocess.run(
        [sys.executable, "-m", "worker.cli", "batch", str(mixed), "-o", str(tmp_path / "m.jsonl"), "--no-progress"]
        + ["--http", fleet.gateways[0].url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "one endpoint per batch" in refused.stderr
