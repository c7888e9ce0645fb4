"""Every sh and python block of docs/EXAMPLES.md, run against a live stack: redis-server, a tiny-model
worker, the gateway and a Celery worker (addresses and model name rewritten to the test's)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.queue_helpers import WorkerProcess
from tests.stack_helpers import GatewayProcess, celery_worker
from worker.redis_server import RedisServer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```(sh|python)\n(.*?)^```", re.MULTILINE | re.DOTALL)
BLOCKS = BLOCK.findall((ROOT / "docs" / "EXAMPLES.md").read_text())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[dict[str, str]]:
    directory = tmp_path_factory.mktemp("examples")
    server = RedisServer().start()
    worker = WorkerProcess(server.url, tiny_llama, directory / "worker.log", [])
    gateway = GatewayProcess(server.url, directory / "gateway.log")
    env = {
        **os.environ,
        "TOKENRELAY_REDIS_URL": server.url,
        "TOKENRELAY_CELERY_BROKER_URL": server.url.replace("/0", "/1"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    celery = celery_worker((directory / "celery.log"), env, "examples", cwd=ROOT)
    try:
        worker.wait_ready()
        gateway.wait_ready()
        yield {**env, "GATEWAY": gateway.url, "REDIS": server.url, "DIR": str(directory)}
    finally:
        celery.terminate()
        celery.wait(30)
        gateway.stop()
        worker.kill()
        server.close()


def _localised(code: str, stack: dict[str, str]) -> str:
    return (
        code.replace("http://localhost:8000", stack["GATEWAY"])
        .replace("redis://localhost:6379/0", stack["REDIS"])
        .replace("SmolLM2-135M-Instruct", "tiny")
    )


def test_the_page_has_examples_of_every_kind() -> None:
    text = "\n".join(code for _, code in BLOCKS)
    needles = (
        "curl",
        "from openai import OpenAI",
        "AsyncOpenAI",
        "tokenrelay.generate",
        "tokenrelay batch",
        "/v1/batches",
    )
    for needle in needles:
        assert needle in text, needle


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_block_runs(stack: dict[str, str], index: int, tmp_path: Path) -> None:
    language, code = BLOCKS[index]
    code = _localised(code, stack)
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "sh" else [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=stack, timeout=180)
    assert result.returncode == 0, f"block {index} ({language}) failed:\n{code}\n--- stderr\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"block {index} printed nothing"
    if "curl" in code and "/v1/batches" in code:
        lines = (tmp_path / "batch-results.jsonl").read_text().splitlines()
        assert len(lines) == 2 and all('"status_code":200' in line for line in lines)
    elif "curl" in code:
        assert '"object":"chat.completion"' in result.stdout and "data: [DONE]" in result.stdout
        assert '"error"' not in result.stdout
    if "client.batches.create" in code:
        assert result.stdout.startswith("completed")
    if "tokenrelay batch" in code:
        lines = (tmp_path / "results.jsonl").read_text().splitlines()
        assert len(lines) == 2 and all('"status_code":200' in line for line in lines)
