"""Size caps (payload bytes, prompt length, prompt tokens, max_tokens) at all three doors: the producer
refuses before sending, the worker refuses what bypassed the producer, the gateway refuses with a 4xx."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest
import redis

from engine.config import EngineConfig
from engine.engine import LLMEngine
from producer.client import Client, build_request
from producer.errors import RequestFailed
from producer.params import MAX_TOKENS_LIMIT
from producer.protocol import DEFAULT_LIMITS, SCHEMA_VERSION, EventType, Keys, Limits, Priority, new_request_id
from tests.queue_helpers import WorkerThread, read_events, wait_for
from tests.stack_helpers import Stack, start_stack
from worker.noop_engine import NoopEngine

LIMITS = DEFAULT_LIMITS
OVERSIZE = [  # (what the client asks, the field the refusal names)
    ({"prompt": "x" * (LIMITS.max_prompt_chars + 1)}, "prompt"),
    ({"prompt": [1] * (LIMITS.max_prompt_tokens + 1)}, "prompt_token_ids"),
    ({"prompt": "x", "max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x" * (LIMITS.max_prompt_chars // 2 + 1)}] * 2}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}] * (LIMITS.max_messages + 1)}, "messages"),
    ({"prompt": "x", "metadata": "m" * (LIMITS.max_metadata_bytes + 1)}, "metadata"),
]


@pytest.mark.parametrize(("kwargs", "field"), OVERSIZE)
def test_the_producer_refuses_oversize_requests_before_sending_anything(
    redis_url: str, kwargs: dict, field: str
) -> None:
    client = Client(redis_url, model="noop")
    with pytest.raises(ValueError, match=field):
        client.submit(**kwargs)
    assert not client.redis.keys("*")


def test_the_producer_applies_its_payload_byte_cap() -> None:
    with pytest.raises(ValueError, match="over the limit of 1000"):
        build_request("noop", "x" * 2_000, limits=Limits(max_request_bytes=1_000))


def _raw(request_id: str, **fields: object) -> dict[str, bytes | str]:
    body = {
        "v": SCHEMA_VERSION,
        "id": request_id,
        "model": "noop",
        "prompt": "p",
        "params": {"max_tokens": 2},
        "submitted_at": time.time(),
        **fields,
    }
    return {"id": request_id, "m": msgpack.packb(body, use_bin_type=True)}


def test_the_worker_refuses_what_bypassed_the_producer_and_keeps_serving(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = Keys("noop")
    cases = {
        "payload": _raw(new_request_id(), prompt="x" * (LIMITS.max_request_bytes + 1)),  # 4 MiB + 1: bytes cap
        "prompt": _raw(new_request_id(), prompt="x" * (LIMITS.max_prompt_chars + 1)),
        "prompt_token_ids": _raw(new_request_id(), prompt=None, prompt_token_ids=[1] * (LIMITS.max_prompt_tokens + 1)),
        "max_tokens": _raw(new_request_id(), params={"max_tokens": MAX_TOKENS_LIMIT + 1}),
    }
    with WorkerThread(NoopEngine(), redis_url, model_name="noop") as worker:
        for fields in cases.values():
            r.xadd(keys.queue(Priority.NORMAL), fields)
        client = Client(redis_url, model="noop")
        assert client.result(client.submit("still serving", max_tokens=2), timeout=30).token_ids == [2, 3]
        wait_for(lambda: r.xlen(keys.dead) == len(cases), 30, what="a dead letter per oversize request")
        assert worker.engine.generated_tokens == 2  # none of them reached the engine
    for field, fields in cases.items():
        events = read_events(r, keys, str(fields["id"]))
        assert [e.type for e in events] == [EventType.ERROR] and field in (events[0].message or ""), events
    raw_sizes = [len(entry[b"raw"]) for _, entry in r.xrange(keys.dead)]
    assert max(raw_sizes) <= 65_536  # a dead letter keeps a sample of the payload, not 4 MiB of it


def test_the_models_context_caps_prompt_tokens_and_generation(redis_url: str, tiny_llama: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float64", num_kv_blocks=64, max_num_seqs=2))
    limit = engine.max_model_len
    client = Client(redis_url, model="tiny")
    with WorkerThread(engine, redis_url, model_name="tiny"):
        with pytest.raises(RequestFailed, match="prompt") as refused:
            client.result(client.submit([5] * limit, max_tokens=1), timeout=60)
        capped = client.result(client.submit([5] * (limit - 4), max_tokens=100, ignore_eos=True), timeout=120)
    assert refused.value.code == "invalid_request"
    assert capped.finish_reason == "length" and len(capped.token_ids) == 4  # stopped at the context, not at 100


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("caps"))
    yield stack
    stack.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x" * (LIMITS.max_prompt_chars + 1)},
        {"prompt": [1] * (LIMITS.max_prompt_tokens + 1)},
        {"prompt": "x", "max_tokens": MAX_TOKENS_LIMIT + 1},
        {"prompt": "x", "max_tokens": 0},
    ],
)
def test_the_gateway_refuses_oversize_requests_with_400(stack: Stack, body: dict) -> None:
    reply = httpx.post(f"{stack.gateway.url}/v1/completions", json={"model": "tiny", **body}, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] in ("prompt", "prompt_token_ids", "max_tokens")


@pytest.mark.slow
def test_the_gateway_refuses_an_oversize_body_without_reading_it_all(stack: Stack) -> None:
    chunk = b"x" * 2**20
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(64):  # 64 MiB, streamed: no Content-Length to check up front
            sent += len(chunk)
            yield chunk

    reply = httpx.post(
        f"{stack.gateway.url}/v1/completions", content=body(), timeout=60, headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 413, reply.text
    declared = httpx.post(
        f"{stack.gateway.url}/v1/completions",
        content=b"{" + b" " * (20 * 2**20) + b"}",
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert declared.status_code == 413
    assert httpx.get(f"{stack.gateway.url}/health", timeout=10).status_code == 200
