"""A worker with --speculative ngram: the same greedy tokens through Redis, and the drafts' counts in `done`."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.config import SamplingParams
from engine.llm import LLM
from producer.client import Client, build_request

pytestmark = pytest.mark.slow


def _prompts() -> list[list[int]]:
    """Prompts that repeat a passage, so the n-gram proposer has something to copy."""
    rng = random.Random(1)
    return [([rng.randrange(3, 49152) for _ in range(12)] * 6)[: 40 + 5 * i] for i in range(4)]


def test_speculating_worker_serves_the_plain_engines_tokens(redis_url: str, tiny_llama: Path, worker_processes) -> None:  # noqa: ANN001
    prompts = _prompts()
    plain = LLM(str(tiny_llama), dtype="float64", num_kv_blocks=256).generate(
        prompts, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    )
    worker = worker_processes(redis_url, tiny_llama, "--speculative", "ngram")
    worker.wait_ready()
    client = Client(redis_url, model="tiny")
    requests = [build_request("tiny", p, max_tokens=40, temperature=0.0, ignore_eos=True) for p in prompts]
    off = build_request("tiny", prompts[0], max_tokens=40, temperature=0.0, ignore_eos=True, speculative=False)
    ids = client.submit_requests([*requests, off])
    done = client.wait_all(ids, timeout=120)
    for request_id, want in zip(ids, [*plain, plain[0]], strict=True):
        assert done[request_id].token_ids == want.token_ids  # lossless: exactly the plain engine's tokens
    usages = [done[i].usage for i in ids[:-1]]
    assert sum(u.get("spec_accepted_tokens", 0) for u in usages) > 0
    assert all(u.get("spec_accepted_tokens", 0) <= u.get("spec_proposed_tokens", 0) for u in usages)
    assert "spec_proposed_tokens" not in done[ids[-1]].usage  # speculative=False: this one decoded plainly
