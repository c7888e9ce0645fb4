"""Real worker processes: sharing a stream, kill -9, SIGSTOP past the claim threshold, SIGTERM drains."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest
import redis

from engine.config import SamplingParams
from engine.llm import LLM
from producer.client import Client, build_request
from producer.protocol import GROUP, EventType, Keys
from tests.queue_helpers import WorkerProcess, after_last_restart, read_events, terminal_count, wait_for

pytestmark = pytest.mark.slow
KEYS = Keys("tiny")
PROMPTS = [
    "Explain the benefits of AI in healthcare.",
    "Write a poem about spring.",
    "Summarize the latest AI research trends.",
    "Tell me about message queues.",
    "What is a paged KV cache?",
    "Count to ten.",
]
LONG = 300  # tokens: long enough that a signal lands mid-generation


@pytest.fixture(scope="module")
def expected(tiny_llama: Path) -> dict[str, list[int]]:
    """Greedy outputs of the in-process engine: what every path through the queue must reproduce."""
    outs = LLM(str(tiny_llama), dtype="float64", num_kv_blocks=256).generate(
        PROMPTS, SamplingParams(max_tokens=LONG, temperature=0.0, ignore_eos=True)
    )
    return {p: o.token_ids for p, o in zip(PROMPTS, outs, strict=True)}


def _submit(client: Client, prompts: list[str], max_tokens: int) -> dict[str, str]:
    requests = [build_request("tiny", p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True) for p in prompts]
    return dict(zip(client.submit_requests(requests), prompts, strict=True))


def _queues_empty(client: redis.Redis) -> bool:
    pending = sum(client.xpending(k, GROUP)["pending"] for k in KEYS.queues)
    return pending == 0 and sum(client.xlen(k) for k in KEYS.queues) == 0


def _all_streaming(client: redis.Redis, ids: list[str]) -> bool:
    return all(any(e.type is EventType.DELTA for e in read_events(client, KEYS, i)) for i in ids)


def _kill_and_settle(worker: WorkerProcess, client: redis.Redis) -> None:
    """kill -9, then wait until Redis has dropped the worker's connections: what the worker wrote to its
    sockets just before dying is applied by Redis before it sees them close, so only then does reading
    the result streams say which requests the kill cut off."""
    process = psutil.Process(worker.pid)
    sockets = process.net_connections(kind="tcp") if hasattr(process, "net_connections") else process.connections("tcp")
    ports = {c.laddr.port for c in sockets if c.raddr}
    worker.kill()

    def dropped() -> bool:
        return not any(int(c["addr"].rsplit(":", 1)[1]) in ports for c in client.client_list())

    wait_for(dropped, 30, what="Redis to drop the killed worker's connections")


def test_two_workers_share_one_stream(redis_url: str, tiny_llama: Path, worker_processes, expected) -> None:  # noqa: ANN001
    a = worker_processes(redis_url, tiny_llama, "--max-num-seqs", "3")
    b = worker_processes(redis_url, tiny_llama, "--max-num-seqs", "3")
    a.wait_ready()
    b.wait_ready()
    client = Client(redis_url, model="tiny")
    ids = _submit(client, PROMPTS * 2, 16)
    results = client.wait_all(list(ids), timeout=120)
    for request_id, prompt in ids.items():
        assert results[request_id].token_ids == expected[prompt][:16]
        events = read_events(client.redis, KEYS, request_id)
        assert terminal_count(events) == 1 and not any(e.type is EventType.RESTART for e in events)
    assert {f"-{a.pid}-" in r.worker for r in results.values()} == {True, False}  # both did work
    assert _queues_empty(client.redis)
    for worker in (a, b):
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0


def test_kill_9_mid_generation_restarts_elsewhere_and_completes(
    redis_url: str, tiny_llama: Path, worker_processes, expected
) -> None:  # noqa: ANN001
    a = worker_processes(redis_url, tiny_llama)
    a.wait_ready()
    client = Client(redis_url, model="tiny")
    ids = _submit(client, PROMPTS[:4], LONG)
    wait_for(lambda: _all_streaming(client.redis, list(ids)), 60, what="every request streaming")
    _kill_and_settle(a, client.redis)
    in_flight = [i for i in ids if terminal_count(read_events(client.redis, KEYS, i)) == 0]
    assert in_flight, "the kill should land mid-generation"
    b = worker_processes(redis_url, tiny_llama)
    results = client.wait_all(list(ids), timeout=180)
    for request_id, prompt in ids.items():
        assert results[request_id].token_ids == expected[prompt]  # complete and correct after the restart
        assert terminal_count(read_events(client.redis, KEYS, request_id)) == 1
    assert all(results[i].restarts == 1 and f"-{b.pid}-" in results[i].worker for i in in_flight)
    assert _queues_empty(client.redis)


def test_a_paused_worker_publishes_nothing_after_a_takeover(
    redis_url: str, tiny_llama: Path, worker_processes, expected
) -> None:  # noqa: ANN001
    a = worker_processes(redis_url, tiny_llama)
    a.wait_ready()
    client = Client(redis_url, model="tiny")
    ids = _submit(client, PROMPTS[:4], LONG)
    wait_for(lambda: _all_streaming(client.redis, list(ids)), 60, what="every request streaming")
    a.signal(signal.SIGSTOP)
    b = worker_processes(redis_url, tiny_llama)  # starts after the pause: it finds a's claims going stale
    results = client.wait_all(list(ids), timeout=180)
    assert all(f"-{b.pid}-" in r.worker and r.restarts == 1 for r in results.values())
    a.signal(signal.SIGCONT)
    wait_for(
        lambda: any(line.get("event", "").startswith("ownership lost") for line in a.logs()),
        30,
        what="the resumed worker to learn it lost its requests",
    )
    time.sleep(0.5)  # room for any stale write it might still attempt
    for request_id, prompt in ids.items():
        events = read_events(client.redis, KEYS, request_id)
        tail = after_last_restart(events)
        assert sum((e.token_ids for e in tail if e.type is EventType.DELTA), []) == expected[prompt]
        assert tail[-1].type is EventType.DONE and terminal_count(events) == 1
    a.signal(signal.SIGTERM)
    assert a.wait() == 0
    assert _queues_empty(client.redis)


def test_sigterm_drains_in_flight_work_and_loses_nothing(
    redis_url: str, tiny_llama: Path, worker_processes, expected
) -> None:  # noqa: ANN001
    a = worker_processes(redis_url, tiny_llama, "--max-num-seqs", "2")
    a.wait_ready()
    client = Client(redis_url, model="tiny")
    ids = _submit(client, PROMPTS[:4], 120)
    wait_for(lambda: sum(bool(read_events(client.redis, KEYS, i)) for i in ids) >= 2, 60, what="two streaming")
    a.signal(signal.SIGTERM)
    assert a.wait() == 0
    finished_by_a = [i for i in ids if terminal_count(read_events(client.redis, KEYS, i)) == 1]
    assert len(finished_by_a) >= 2  # what it held, it finished before exiting
    assert sum(client.redis.xpending(k, GROUP)["pending"] for k in KEYS.queues) == 0  # nothing half-done
    b = worker_processes(redis_url, tiny_llama, "--max-num-seqs", "2")
    results = client.wait_all(list(ids), timeout=180)
    for request_id, prompt in ids.items():
        assert results[request_id].token_ids == expected[prompt][:120] and results[request_id].restarts == 0
    b.signal(signal.SIGTERM)
    assert b.wait() == 0
    assert _queues_empty(client.redis)


def test_sigterm_past_the_grace_period_hands_work_back(
    redis_url: str, tiny_llama: Path, worker_processes, expected
) -> None:  # noqa: ANN001
    a = worker_processes(redis_url, tiny_llama, "--drain-grace", "0.3")
    a.wait_ready()
    client = Client(redis_url, model="tiny")
    ids = _submit(client, PROMPTS[:2], LONG)
    wait_for(lambda: _all_streaming(client.redis, list(ids)), 60, what="every request streaming")
    a.signal(signal.SIGTERM)
    assert a.wait() == 0
    assert any(line.get("event") == "handed back in-flight requests" for line in a.logs())
    b = worker_processes(redis_url, tiny_llama)
    results = client.wait_all(list(ids), timeout=180)
    for request_id, prompt in ids.items():
        assert results[request_id].token_ids == expected[prompt] and results[request_id].restarts == 1
    b.signal(signal.SIGTERM)
    assert b.wait() == 0
    assert _queues_empty(client.redis)


LIST_SCHEMA = {
    "type": "object",
    "properties": {"values": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}}},
    "required": ["values"],
    "additionalProperties": False,
}
LIST_SCHEMA["properties"]["values"].update(minItems=100, maxItems=120)  # type: ignore[index]


def test_kill_9_mid_constrained_generation_still_validates(redis_url: str, tiny_llama: Path, worker_processes) -> None:  # noqa: ANN001
    import json

    import jsonschema

    a = worker_processes(redis_url, tiny_llama)
    a.wait_ready()
    client = Client(redis_url, model="tiny")
    constraint = {"structured_outputs": {"json": LIST_SCHEMA}}
    requests = [build_request("tiny", p, max_tokens=1000, temperature=0.0, **constraint) for p in PROMPTS[:3]]
    ids = client.submit_requests(requests)
    wait_for(lambda: _all_streaming(client.redis, ids), 60, what="every request streaming")
    _kill_and_settle(a, client.redis)
    in_flight = [i for i in ids if terminal_count(read_events(client.redis, KEYS, i)) == 0]
    assert in_flight, "the kill should land mid-generation"
    worker_processes(redis_url, tiny_llama)
    results = client.wait_all(ids, timeout=180)
    for request_id in ids:
        assert results[request_id].finish_reason == "stop"
        jsonschema.validate(json.loads(results[request_id].text), LIST_SCHEMA)  # the grammar replayed on restart
    assert all(results[i].restarts == 1 for i in in_flight), {i: results[i].restarts for i in ids}
    assert _queues_empty(client.redis)
