"""No prompt text in logs at info level: a worker (the real model path: chat template, engine) and the
gateway each serve prompts carrying a marker, valid and refused ones alike, and their logs are searched
for it. At debug level the marker does appear, which shows the capture would have caught it."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import msgpack
import pytest

from producer.client import Client
from producer.errors import RequestFailed
from producer.protocol import SCHEMA_VERSION, Keys, Priority, new_request_id
from tests.queue_helpers import WorkerProcess, read_events
from tests.stack_helpers import GatewayProcess

pytestmark = pytest.mark.slow
MARKER = "zebra-quartz-7731"  # in prompts, chat messages and stop strings; never in a log line at info


def _traffic(client: Client) -> None:
    """Valid requests, a chat, and refusals whose error messages could echo what was sent."""
    prompt = f"Tell me about {MARKER} please"
    client.generate([prompt], max_tokens=3, timeout=120)
    client.result(
        client.submit(messages=[{"role": "user", "content": prompt}], max_tokens=3, stop=[MARKER]), timeout=120
    )
    request_id = new_request_id()  # bypassing the client's checks: a stop list the worker must refuse
    body = {
        "v": SCHEMA_VERSION,
        "id": request_id,
        "model": "tiny",
        "prompt": prompt,
        "params": {"stop": [MARKER, 5]},
        "submitted_at": time.time(),
    }
    client.redis.xadd(Keys("tiny").queue(Priority.NORMAL), {"id": request_id, "m": msgpack.packb(body)})
    with pytest.raises(RequestFailed):
        client.result(client.submit(prompt=[10**6, 1], max_tokens=2), timeout=120)  # out of the vocabulary
    while not read_events(client.redis, Keys("tiny"), request_id):
        time.sleep(0.05)


def test_no_prompt_text_in_worker_or_gateway_logs_at_info(redis_url: str, tiny_llama: Path, tmp_path: Path) -> None:
    worker = WorkerProcess(redis_url, tiny_llama, tmp_path / "worker.log", [])
    gateway = GatewayProcess(redis_url, tmp_path / "gateway.log")
    try:
        worker.wait_ready()
        gateway.wait_ready()
        _traffic(Client(redis_url, model="tiny"))
        prompt = f"Tell me about {MARKER} please"
        replies = [
            httpx.post(
                f"{gateway.url}/v1/completions",
                timeout=120,
                json={"model": "tiny", "prompt": prompt, "max_tokens": 3, "stop": [MARKER]},
            ),
            httpx.post(
                f"{gateway.url}/v1/chat/completions",
                timeout=120,
                json={
                    "model": "tiny",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 3,
                    "stream": True,
                },
            ),
            httpx.post(
                f"{gateway.url}/v1/completions",
                timeout=120,  # refused: the reply may echo, logs may not
                json={"model": "tiny", "prompt": prompt, "stop": [MARKER, 5]},
            ),
        ]
        worker.signal(15)
        assert worker.wait(60) == 0
    finally:
        gateway.stop()
        worker.kill()
    assert [r.status_code for r in replies] == [200, 200, 400]
    worker_log, gateway_log = worker.log_path.read_text(), gateway.log_path.read_text()
    # the lines that describe requests are there, without what the requests said
    assert "request admitted" in worker_log and "request rejected" in worker_log
    assert "generation submitted" in gateway_log
    assert MARKER not in worker_log and MARKER not in gateway_log


def test_at_debug_level_the_prompt_is_logged(redis_url: str, tiny_llama: Path, tmp_path: Path) -> None:
    """The same capture sees the marker once prompt logging is asked for: the test above could fail."""
    worker = WorkerProcess(redis_url, tiny_llama, tmp_path / "worker.log", [], env={"TOKENRELAY_LOG_LEVEL": "debug"})
    try:
        worker.wait_ready()
        _traffic(Client(redis_url, model="tiny"))
    finally:
        worker.kill()
    assert MARKER in worker.log_path.read_text()
