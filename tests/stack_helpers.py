"""Helpers for producer-side tests: a gateway process, a noop worker process, a whole stack per module."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.queue_helpers import WorkerProcess, wait_for
from worker.redis_server import RedisServer, free_port


class GatewayProcess:
    """`python -m worker.cli serve` on a free port, JSON logs to a file."""

    def __init__(self, redis_url: str, log_path: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = log_path
        args = [sys.executable, "-m", "worker.cli", "serve", "--redis", redis_url, "--port", str(self.port), *extra]
        environ = {**os.environ, "TOKENRELAY_LOG_JSON": "1", **(env or {})}
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=environ)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> GatewayProcess:
        def ready() -> bool:
            assert self.process.poll() is None, f"gateway exited early:\n{self.log_path.read_text()[-3000:]}"
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, 0.1, "gateway /health")
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def celery_client(broker_url: str):  # noqa: ANN201 - celery.Celery
    """A Celery app of the test's own that sends tasks by name (the shared app caches its first broker)."""
    from celery import Celery

    app = Celery("tokenrelay-test-client", broker=broker_url, backend=broker_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue="tokenrelay",
    )
    return app


def celery_worker(log_path: Path, env: dict[str, str], name: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """A real Celery worker on producer.celery_app (solo pool, the `tokenrelay` queue), logging to a file."""
    with log_path.open("wb") as log:
        args = [sys.executable, "-m", "celery", "-A", "producer.celery_app", "worker", "--pool", "solo"]
        return subprocess.Popen(
            [*args, "-Q", "tokenrelay", "--loglevel", "INFO", "-n", f"{name}@%h"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )


def noop_worker(redis_url: str, log_path: Path, *extra: str) -> WorkerProcess:
    """A worker process with the no-op engine (no torch), serving the model name `tiny`."""
    return WorkerProcess(redis_url, log_path.parent, log_path, ["--engine", "noop", *extra])


@dataclass
class Stack:
    redis: RedisServer
    worker: WorkerProcess
    gateway: GatewayProcess

    def close(self) -> None:
        self.gateway.stop()
        self.worker.kill()
        self.redis.close()


def start_stack(
    directory: Path,
    worker_args: tuple[str, ...] = (),
    gateway_args: tuple[str, ...] = (),
    model_dir: Path | None = None,
    gateway_env: dict[str, str] | None = None,
) -> Stack:
    """redis-server + one worker (noop unless `model_dir`) + the gateway, ready to serve `tiny`."""
    server = RedisServer().start()
    worker: WorkerProcess | None = None
    gateway: GatewayProcess | None = None
    started = time.monotonic()
    try:  # whatever fails to start, what did start is stopped (a leaked redis-server outlives the tests)
        if model_dir is None:
            worker = noop_worker(server.url, directory / "worker.log", *worker_args)
        else:
            worker = WorkerProcess(server.url, model_dir, directory / "worker.log", list(worker_args))
        gateway = GatewayProcess(server.url, directory / "gateway.log", *gateway_args, env=gateway_env)
        worker.wait_ready()
        gateway.wait_ready(max(10.0, 90 - (time.monotonic() - started)))
    except BaseException:
        if gateway is not None:
            gateway.stop()
        if worker is not None:
            worker.kill()
        server.close()
        raise
    return Stack(server, worker, gateway)
