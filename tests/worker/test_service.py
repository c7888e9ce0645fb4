"""A worker process built from flags: the engine's memory options reach the engine and show in the fleet's views."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from producer import fleet
from producer.client import Client
from producer.gateway.service import model_metadata
from producer.status import as_dicts, gather, render

pytestmark = pytest.mark.slow

# float32, not the helper's float64: int8 weights then run the compiled CPU kernel a served model uses
# (float64 works too, through the dequantise-and-matmul fallback).
MEMORY_FLAGS = ("--dtype", "float32", "--quantization", "int8", "--kv-cache-dtype", "int8", "--swap-space-gb", "0.1")


def test_int8_weights_int8_kv_and_swap_serve_through_redis(redis_url: str, tiny_llama: Path, worker_processes) -> None:  # noqa: ANN001
    worker = worker_processes(redis_url, tiny_llama, *MEMORY_FLAGS)
    worker.wait_ready()
    client = Client(redis_url, model="tiny")
    completions = client.generate(
        ["Write a poem about spring.", [5, 6, 7]], timeout=120, max_tokens=12, temperature=0.0, ignore_eos=True
    )
    assert [c.error for c in completions] == [None, None]
    assert [len(c.token_ids) for c in completions] == [12, 12]
    assert [c.usage["completion_tokens"] for c in completions] == [12, 12]

    (ready,) = [line for line in worker.logs() if line.get("event") == "engine ready"]
    assert ready["dtype"] == "float32"
    assert {k: ready["config"][k] for k in ("quantization", "kv_cache_dtype", "swap_space_gb")} == {
        "quantization": "int8",
        "kv_cache_dtype": "int8",
        "swap_space_gb": 0.1,
    }

    served = {
        "engine": "llm",
        "dtype": "float32",
        "quantization": "int8",
        "kv_cache_dtype": "int8",
        "swap_space_gb": 0.1,
    }
    r = redis.Redis.from_url(redis_url)
    (status,) = gather(r)
    (heartbeat,) = status.workers
    assert heartbeat["engine_options"] == served
    assert as_dicts([status])[0]["workers"][0]["engine_options"] == served
    assert "engine llm: dtype=float32  quantization=int8  kv_cache_dtype=int8  swap_space_gb=0.1" in render([status])
    (view,) = fleet.view(r)
    assert model_metadata(view) == {"workers": 1, "engine_options": [served]}
