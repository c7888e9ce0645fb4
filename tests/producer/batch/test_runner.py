"""`tokenrelay batch` end to end: 1,000 lines through a real worker process, kill -9 and Ctrl-C, then resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.protocol import Keys
from tests.queue_helpers import WorkerProcess, wait_for
from tests.stack_helpers import noop_worker
from worker.redis_server import RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as redis_server:
        yield redis_server


@pytest.fixture
def worker(server: RedisServer, tmp_path: Path) -> Iterator[WorkerProcess]:
    redis.Redis.from_url(server.url).flushall()
    process = noop_worker(server.url, tmp_path / "worker.log", "--noop-step-delay", "0.003")
    process.wait_ready()
    yield process
    process.kill()


def _write_input(path: Path, lines: int, chat_every: int = 0) -> None:
    with path.open("w") as out:
        for i in range(lines):
            if chat_every and i % chat_every == 0:
                body = {"model": "tiny", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 3}
                url = "/v1/chat/completions"
            else:
                body = {"model": "tiny", "prompt": f"line {i} " + "w " * (i % 5), "max_tokens": 3}
                url = "/v1/completions"
            out.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}) + "\n")


def _batch(server: RedisServer, *args: str, progress: bool = False) -> subprocess.Popen[str]:
    env = {**os.environ, "TOKENRELAY_LOG_JSON": "1"}
    quiet = [] if progress else ["--no-progress"]
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "batch", *args, "--redis", server.url, *quiet],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _request_keys(server: RedisServer) -> int:
    client = redis.Redis.from_url(server.url)
    return sum(1 for _ in client.scan_iter(match=f"{Keys('tiny').request_prefix}*", count=1000))


def test_a_thousand_lines_with_errors_in_their_own_file(
    server: RedisServer, worker: WorkerProcess, tmp_path: Path
) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(source, 1000, chat_every=100)  # the no-op engine has no chat template: 10 lines fail
    batch = _batch(server, str(source), "-o", str(output), "--window", "64")
    stdout, stderr = batch.communicate(timeout=240)
    assert batch.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert (summary["total"], summary["succeeded"], summary["failed"], summary["skipped"]) == (1000, 990, 10, 0)
    records = _records(output)
    assert Counter(r["custom_id"] for r in records) == Counter(f"req-{i}" for i in range(1000))
    ok = [r for r in records if r["error"] is None]
    assert all(
        r["response"]["status_code"] == 200 and r["response"]["body"]["choices"][0]["text"] == " x x x" for r in ok
    )
    assert all(r["id"].startswith("batch_req_") and len(r["response"]["request_id"]) == 32 for r in ok)
    errors = _records(tmp_path / "out.errors.jsonl")
    assert sorted(r["custom_id"] for r in errors) == sorted(f"req-{i}" for i in range(0, 1000, 100))
    assert all(r["response"]["status_code"] == 400 and "chat template" in r["error"]["message"] for r in errors)
    # a second run finds everything done and sends nothing
    again = _batch(server, str(source), "-o", str(output))
    stdout, _ = again.communicate(timeout=60)
    assert json.loads(stdout.strip().splitlines()[-1])["skipped"] == 1000 and len(_records(output)) == 1000


def test_kill_halfway_then_resume_answers_every_line_once(
    server: RedisServer, worker: WorkerProcess, tmp_path: Path
) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(source, 1000)
    batch = _batch(server, str(source), "-o", str(output), "--window", "32")
    wait_for(lambda: output.exists() and len(output.read_bytes().splitlines()) >= 400, 120, 0.05, "400 lines")
    batch.kill()  # SIGKILL: no goodbye, maybe a torn last line, requests left in Redis
    batch.wait()
    partial = len(output.read_bytes().splitlines())
    assert 400 <= partial < 1000
    resumed = _batch(server, str(source), "-o", str(output), "--window", "32")
    stdout, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["skipped"] >= 400 and summary["skipped"] + summary["succeeded"] == 1000
    records = _records(output)
    assert Counter(r["custom_id"] for r in records) == Counter(f"req-{i}" for i in range(1000))
    # request ids come from the lines: what the killed run had in flight was found again, not enqueued twice
    assert _request_keys(server) == 1000


def test_ctrl_c_stops_cleanly_and_a_rerun_finishes(server: RedisServer, worker: WorkerProcess, tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(source, 300)
    batch = _batch(server, str(source), "-o", str(output), "--window", "16")
    wait_for(lambda: output.exists() and len(output.read_bytes().splitlines()) >= 50, 120, 0.05, "50 lines")
    batch.send_signal(signal.SIGINT)
    stdout, stderr = batch.communicate(timeout=60)
    assert batch.returncode == 130, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["interrupted"] is True
    assert output.read_bytes().endswith(b"\n")  # no torn line after a clean stop
    client = redis.Redis.from_url(server.url)
    running = [
        k
        for k in client.scan_iter(match=f"{Keys('tiny').request_prefix}*")
        if client.hget(k, "state") in (b"running", b"queued")
    ]
    wait_for(lambda: all(client.hget(k, "state") == b"done" for k in running), 30, what="in-flight cancelled")
    rerun = _batch(server, str(source), "-o", str(output), progress=True)
    _, stderr = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, stderr
    assert "300/300" in stderr and "req/s" in stderr  # the bar: resumed count, throughput (and ETA while running)
    assert Counter(r["custom_id"] for r in _records(output)) == Counter(f"req-{i}" for i in range(300))
    assert all(r["error"] is None for r in _records(output))


def test_duplicate_custom_id_is_refused_before_anything_is_sent(server: RedisServer, tmp_path: Path) -> None:
    redis.Redis.from_url(server.url).flushall()
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(source, 5)
    with source.open("a") as out:
        out.write(
            json.dumps(
                {
                    "custom_id": "req-2",
                    "method": "POST",
                    "url": "/v1/completions",
                    "body": {"model": "tiny", "prompt": "again"},
                }
            )
            + "\n"
        )
    batch = _batch(server, str(source), "-o", str(output))
    _, stderr = batch.communicate(timeout=60)
    assert batch.returncode == 2 and "duplicate custom_id 'req-2'" in stderr
    assert not output.exists() and redis.Redis.from_url(server.url).dbsize() == 0


def test_constraint_fields_pass_and_bad_ones_fail_their_line_only(
    server: RedisServer, worker: WorkerProcess, tmp_path: Path
) -> None:
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    bodies = {
        "regex": ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3, "guided_regex": "( x)+"}),
        "bias": ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3, "logit_bias": {"5": -100}}),
        "bad-bias": ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"5": 500}}),
        "bad-schema": ("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema", "json_schema": {}}}),
        "no-name": ("/v1/chat/completions", {**chat, "tools": [{"type": "function", "function": {}}]}),
    }
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with source.open("w") as out:
        for custom_id, (url, body) in bodies.items():
            out.write(json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}) + "\n")
    batch = _batch(server, str(source), "-o", str(output))
    stdout, stderr = batch.communicate(timeout=120)
    assert batch.returncode == 0, stderr
    records = {r["custom_id"]: r for r in _records(output)}
    assert records["regex"]["error"] is None and records["bias"]["error"] is None  # the no-op engine's " x x x"
    params = {c: records[c]["response"]["body"]["error"]["param"] for c in ("bad-bias", "bad-schema", "no-name")}
    assert params == {
        "bad-bias": "logit_bias",
        "bad-schema": "response_format.json_schema.schema",
        "no-name": "tools[0].function.name",
    }
