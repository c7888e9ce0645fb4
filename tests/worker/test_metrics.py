"""Worker metrics: a real worker process scraped over HTTP, and the engine gauges of a tiny model."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.config import EngineConfig
from engine.engine import LLMEngine
from producer.client import Client
from tests.queue_helpers import WorkerThread, wait_for
from worker.redis_server import free_port


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.slow
def test_worker_process_serves_metrics_on_its_port(redis_url: str, worker_processes, tmp_path: Path) -> None:  # noqa: ANN001
    port = free_port()
    worker = worker_processes(redis_url, tmp_path, "--engine", "noop", "--metrics-port", str(port))
    worker.wait_ready()
    client = Client(redis_url, model="tiny")
    client.generate(["a b", "c"], max_tokens=3, timeout=30)
    client.submit("later", max_tokens=2, priority="high")

    def scraped() -> dict:
        samples = _samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
        done = samples.get(("tokenrelay_worker_requests_total", (("model", "tiny"), ("outcome", "length"))), 0)
        return samples if done == 3 else {}

    samples = wait_for(scraped, 30, 0.1, "three requests counted")
    assert samples[("tokenrelay_worker_ttft_seconds_count", (("model", "tiny"),))] == 3
    assert samples[("tokenrelay_worker_queue_wait_seconds_count", (("model", "tiny"),))] == 3
    assert samples[("tokenrelay_live_workers", (("model", "tiny"),))] == 1
    assert ("tokenrelay_queue_depth", (("model", "tiny"), ("priority", "high"))) in samples
    assert ("tokenrelay_worker_batch_occupancy", (("model", "tiny"),)) in samples
    wait_for(
        lambda: (
            _samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text).get(
                ("tokenrelay_worker_generated_tokens_total", (("model", "tiny"),)), 0
            )
            >= 8
        ),
        30,
        0.1,
        "tokens counted",
    )


@pytest.mark.slow
def test_engine_gauges_and_latency_histograms(redis_url: str, tiny_llama: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float64", max_num_seqs=4, num_kv_blocks=64))
    with WorkerThread(engine, redis_url, model_name="tiny") as thread:
        Client(redis_url, model="tiny").generate(
            ["one two three", "one two three four"], max_tokens=4, ignore_eos=True, timeout=120
        )
        registry = thread.worker.metrics.registry
        wait_for(
            lambda: (
                _samples(generate_latest(registry).decode()).get(
                    ("tokenrelay_worker_generated_tokens_total", (("model", "tiny"),)), 0
                )
                >= 8
            ),
            10,
            0.1,
            "stats refresh",
        )
        samples = _samples(generate_latest(registry).decode())
    label = (("model", "tiny"),)
    assert (
        samples[("tokenrelay_worker_kv_blocks_used", label)] + samples[("tokenrelay_worker_kv_blocks_free", label)]
        == 64
    )
    assert samples[("tokenrelay_worker_inter_token_seconds_count", label)] == 2
    assert samples[("tokenrelay_worker_requests_total", (("model", "tiny"), ("outcome", "length")))] == 2
    assert 0.0 <= samples[("tokenrelay_worker_prefix_cache_hit_rate", label)] <= 1.0
    assert ("tokenrelay_worker_preemptions_total", label) in samples
    assert samples[("tokenrelay_worker_compute_threads", label)] == engine.stats()["threads"] >= 1
