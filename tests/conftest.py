"""Shared fixtures: tiny random models (built once per session) and the default model folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import ARCHITECTURES, build_tiny_model

# Tests share two cores with whatever else runs; one intra-op thread keeps them predictable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from engine.models.default_model import default_model_dir as resolve

    return resolve()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> dict[str, Path]:
    """Float64 tiny models of each architecture, with the default model's tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root / arch, tokenizer_from=default_model_dir) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


# -- queue service: a private redis-server and worker helpers ----------------------------------------


@pytest.fixture(scope="session")
def redis_server():  # noqa: ANN201 - worker.redis_server.RedisServer
    """One redis-server for the session, on a free port in a temp dir (never the one on 6379)."""
    from worker.redis_server import RedisServer

    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server) -> str:  # noqa: ANN001
    """The session server, flushed: each test starts from an empty keyspace."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def worker_processes(tmp_path: Path):  # noqa: ANN201
    """Starts `tokenrelay worker` subprocesses; kills whatever is left at teardown."""
    from tests.queue_helpers import WorkerProcess

    started: list[WorkerProcess] = []

    def start(redis_url: str, model_dir: Path, *extra: str) -> WorkerProcess:
        process = WorkerProcess(redis_url, model_dir, tmp_path / f"worker-{len(started)}.log", list(extra))
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
