"""Celery tasks with a real Celery worker and beat (broker and backend: the test redis-server) and a real
tokenrelay worker process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.client import Client
from producer.protocol import Keys
from tests.queue_helpers import WorkerProcess, read_events, wait_for
from tests.stack_helpers import celery_client, celery_worker, noop_worker
from worker.redis_server import RedisServer

pytestmark = pytest.mark.slow


def _env(server: RedisServer) -> dict[str, str]:
    return {
        **os.environ,
        "TOKENRELAY_REDIS_URL": server.url,
        "TOKENRELAY_CELERY_BROKER_URL": server.url.replace("/0", "/1"),
        "TOKENRELAY_RECLAIM_INTERVAL_S": "1",
        "TOKENRELAY_LOG_JSON": "1",
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, WorkerProcess, Path]]:
    directory = tmp_path_factory.mktemp("celery")
    server = RedisServer().start()
    worker = noop_worker(server.url, directory / "worker.log", "--noop-step-delay", "0.002")
    celery_log = directory / "celery.log"
    celery = celery_worker(celery_log, _env(server), "test")
    try:
        worker.wait_ready()
        yield server, worker, celery_log
    finally:
        celery.terminate()
        celery.wait(30)
        worker.kill()
        server.close()


@pytest.fixture
def app(stack: tuple[RedisServer, WorkerProcess, Path]):  # noqa: ANN201
    """The test's side: sends tasks by name to the broker the Celery worker reads."""
    return celery_client(_env(stack[0])["TOKENRELAY_CELERY_BROKER_URL"])


def test_configuration_is_json_only_acks_late_prefetch_one() -> None:
    from producer.celery_app import VISIBILITY_TIMEOUT_S, app

    conf = app.conf
    assert set(conf.accept_content) == {"json"} and conf.task_serializer == conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == VISIBILITY_TIMEOUT_S >= 3600
    tasks = {entry["task"] for entry in conf.beat_schedule.values()}
    assert tasks == {
        "tokenrelay.maintenance.reclaim_sweep",
        "tokenrelay.maintenance.trim_acked",
        "tokenrelay.maintenance.expire_results",
        "tokenrelay.maintenance.dead_letter_report",
    }


def test_generate_returns_the_completion_dict(app) -> None:  # noqa: ANN001
    result = app.send_task("tokenrelay.generate", args=["a b c"], kwargs={"model": "tiny", "max_tokens": 3})
    completion = result.get(timeout=60)
    assert completion["text"] == " x x x" and completion["finish_reason"] == "length"
    assert completion["usage"]["prompt_tokens"] == 3 and len(completion["request_id"]) == 32
    failed = app.send_task(
        "tokenrelay.generate",
        kwargs={"messages": [{"role": "user", "content": "hi"}], "model": "tiny", "max_tokens": 2},
    )
    with pytest.raises(Exception, match="invalid_request: messages"):  # the no-op engine has no chat template
        failed.get(timeout=60)
    constrained = {"model": "tiny", "max_tokens": 3, "structured_outputs": {"regex": "( x)+"}, "logit_bias": {"7": 5}}
    assert app.send_task("tokenrelay.generate", args=["a"], kwargs=constrained).get(timeout=60)["text"] == " x x x"
    refused = app.send_task("tokenrelay.generate", args=["a"], kwargs={"model": "tiny", "logit_bias": {"7": 500}})
    with pytest.raises(Exception, match="logit_bias"):  # refused at submit: nothing was queued
        refused.get(timeout=60)


def test_run_batch_task(app, tmp_path: Path) -> None:  # noqa: ANN001
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": f"c{i}",
                    "method": "POST",
                    "url": "/v1/completions",
                    "body": {"model": "tiny", "prompt": "p", "max_tokens": 2},
                }
            )
            + "\n"
            for i in range(20)
        )
    )
    summary = app.send_task("tokenrelay.run_batch", args=[str(source), str(output)]).get(timeout=120)
    assert summary["succeeded"] == 20 and summary["failed"] == 0
    assert sorted(json.loads(line)["custom_id"] for line in output.read_text().splitlines()) == sorted(
        f"c{i}" for i in range(20)
    )


def test_maintenance_tasks_run_on_the_worker(app, stack: tuple[RedisServer, WorkerProcess, Path]) -> None:  # noqa: ANN001
    server = redis.Redis.from_url(stack[0].url)
    keys = Keys("ghost")
    server.sadd(keys.models, "ghost")
    server.xadd(keys.result("d" * 32), {"m": b"x"})  # no TTL
    assert app.send_task("tokenrelay.maintenance.expire_results").get(timeout=60) >= 1
    assert server.ttl(keys.result("d" * 32)) > 0
    assert "ghost" in app.send_task("tokenrelay.maintenance.trim_acked").get(timeout=60)
    assert isinstance(app.send_task("tokenrelay.maintenance.dead_letter_report").get(timeout=60), dict)


def test_beat_schedules_the_reclaim_sweep(stack: tuple[RedisServer, WorkerProcess, Path], tmp_path: Path) -> None:
    server_url = stack[0].url
    keys = Keys("ghost")
    redis.Redis.from_url(server_url).sadd(keys.models, "ghost")
    late = Client(server_url, model="ghost").submit("late", deadline=time.time() - 1)
    with (tmp_path / "beat.log").open("wb") as log:
        beat = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "producer.celery_app",
                "beat",
                "--schedule",
                str(tmp_path / "beat-schedule"),
                "--loglevel",
                "INFO",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(stack[0]),
        )
    try:
        events = wait_for(
            lambda: read_events(redis.Redis.from_url(server_url), keys, late),
            60,
            0.2,
            "beat -> celery worker -> reclaim sweep",
        )
    finally:
        beat.terminate()
        beat.wait(30)
    assert events[0].code == "deadline"
