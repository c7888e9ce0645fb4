"""Greedy output of the engine equals transformers' generate, token for token, whatever the batch."""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from tests.tiny_models import ARCHITECTURES

NUM_PROMPTS = 24


def _workload(seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """24 prompts of lengths 1..300 (both ends included) with 1..64 new tokens each."""
    rng = random.Random(seed)
    lengths = [1, 300] + [rng.randint(1, 300) for _ in range(NUM_PROMPTS - 2)]
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in lengths]
    max_tokens = [64, 1] + [rng.randint(1, 64) for _ in range(NUM_PROMPTS - 2)]
    return prompts, max_tokens


def _shared_prefix_workload() -> tuple[list[list[int]], list[int]]:
    rng = random.Random(1)
    system = [rng.randrange(3, 49152) for _ in range(100)]  # six full blocks shared by everyone
    prompts = [system + [rng.randrange(3, 49152) for _ in range(rng.randint(1, 40))] for _ in range(8)]
    return prompts, [rng.randint(8, 32) for _ in prompts]


@cache
def _hf_reference(model_dir: str, prompts: tuple[tuple[int, ...], ...], max_tokens: tuple[int, ...]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    outputs = []
    for prompt, n in zip(prompts, max_tokens, strict=True):
        config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                generation_config=config,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def _run(
    model_dir: Path, prompts: list[list[int]], max_tokens: list[int], **engine_kwargs: object
) -> tuple[LLM, list[list[int]]]:
    llm = LLM(model=str(model_dir), dtype="float64", **engine_kwargs)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    outs = llm.generate(prompts, params)
    assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
    return llm, [o.token_ids for o in outs]


def _assert_same(got: list[list[int]], want: list[list[int]]) -> None:
    mismatched = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
    assert not mismatched, (
        f"prompts {mismatched} differ; first: got {got[mismatched[0]][:10]} want {want[mismatched[0]][:10]}"
    )


def _reference(model_dir: Path, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    want = _hf_reference(str(model_dir), tuple(map(tuple, prompts)), tuple(max_tokens))
    assert [len(w) for w in want] == max_tokens  # transformers did not stop early either
    return want


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_greedy_matches_transformers(tiny_models: dict[str, Path], arch: str) -> None:
    prompts, max_tokens = _workload()
    llm, got = _run(tiny_models[arch], prompts, max_tokens)
    _assert_same(got, _reference(tiny_models[arch], prompts, max_tokens))
    assert llm.engine.stats()["preemptions"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_matches_transformers(tiny_models: dict[str, Path], arch: str) -> None:
    prompts, max_tokens = _workload()
    # 40 tokens a step: every prompt over 40 tokens is split, and decodes share steps with chunks.
    llm, got = _run(tiny_models[arch], prompts, max_tokens, max_num_batched_tokens=40)
    _assert_same(got, _reference(tiny_models[arch], prompts, max_tokens))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_preemption_matches_transformers(tiny_models: dict[str, Path], arch: str) -> None:
    prompts, max_tokens = _workload()
    # 40 blocks of 16 = 640 token slots for ~4,000 prompt tokens: requests are preempted and recomputed.
    llm, got = _run(tiny_models[arch], prompts, max_tokens, num_kv_blocks=40, max_num_batched_tokens=512)
    assert llm.engine.stats()["preemptions"] > 0
    _assert_same(got, _reference(tiny_models[arch], prompts, max_tokens))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefix_cache_hits_match_transformers(tiny_models: dict[str, Path], arch: str) -> None:
    prompts, max_tokens = _shared_prefix_workload()
    llm = LLM(model=str(tiny_models[arch]), dtype="float64")
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    first = llm.generate(prompts[:1], params[:1])  # fills the cache with the shared system prompt
    rest = llm.generate(prompts[1:], params[1:])
    assert all(o.num_cached_tokens == 96 for o in rest)  # 6 full blocks of the 100-token prefix
    assert llm.engine.stats()["prefix_cache_hit_rate"] > 0
    _assert_same([o.token_ids for o in first + rest], _reference(tiny_models[arch], prompts, max_tokens))


@pytest.mark.slow
def test_torch_backend_matches_transformers(tiny_models: dict[str, Path]) -> None:
    """The reference backend, with chunking and preemption together."""
    prompts, max_tokens = _workload()
    llm, got = _run(
        tiny_models["qwen2"],
        prompts,
        max_tokens,
        attention_backend="torch",
        max_num_batched_tokens=64,
        num_kv_blocks=60,
    )
    assert llm.engine.attention_backend == "torch"
    _assert_same(got, _reference(tiny_models["qwen2"], prompts, max_tokens))


def test_same_request_any_batch_mix(tiny_llama: Path) -> None:
    """A request's greedy output does not depend on what it is batched with."""
    prompts, max_tokens = _workload(seed=3)
    llm = LLM(model=str(tiny_llama), dtype="float64")
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = llm.generate([prompts[5]], params)[0].token_ids
    together = llm.generate(prompts[:12], params)[5].token_ids
    assert alone == together


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_swap_preemption_matches_transformers(tiny_models: dict[str, Path], arch: str) -> None:
    """Preempted requests go to host swap space and resume where they were: still exact."""
    prompts, max_tokens = _workload()
    llm, got = _run(
        tiny_models[arch],
        prompts,
        max_tokens,
        num_kv_blocks=40,
        max_num_batched_tokens=512,
        swap_space_gb=0.5,
        preemption_mode="swap",
    )
    stats = llm.engine.stats()
    assert stats["preemptions"] > 0 and stats["swapped_out"] == stats["preemptions"]
    swap = llm.engine.scheduler.swap
    assert swap is not None and swap.pool is not None and swap.pool.num_free == swap.pool.num_blocks
    _assert_same(got, _reference(tiny_models[arch], prompts, max_tokens))
