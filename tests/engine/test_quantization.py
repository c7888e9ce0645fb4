"""Engine memory modes: int8 weights and an int8 KV cache stay close to full precision."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams

PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = [[11, 200, 3000, 45] * 8, [7, 7, 7, 600, 12], [9000 + i for i in range(60)], [5]]


@pytest.fixture(scope="module")
def full_precision(tiny_models: dict[str, Path]) -> list[list[int]]:
    llm = LLM(model=str(tiny_models["llama"]), dtype="float32")
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    return same / sum(len(r) for r in a)


def test_int8_weights(tiny_models: dict[str, Path], full_precision: list[list[int]]) -> None:
    llm = LLM(model=str(tiny_models["llama"]), dtype="float32", quantization="int8")
    got = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    assert _agreement(got, full_precision) > 0.8


def test_int8_kv_cache_holds_more_blocks(tiny_models: dict[str, Path], full_precision: list[list[int]]) -> None:
    budget = dict(kv_cache_memory_gb=0.01)
    plain = LLM(model=str(tiny_models["llama"]), dtype="float32", **budget)
    llm = LLM(model=str(tiny_models["llama"]), dtype="float32", kv_cache_dtype="int8", **budget)
    assert llm.engine.runner.kv_caches[0].k_scale is not None
    # float32 -> int8 plus a float32 scale per 16-dim head: (16 * 4) / (16 + 4) = 3.2x the blocks.
    assert llm.engine.kv.pool.num_blocks >= 3 * plain.engine.kv.pool.num_blocks
    got = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    assert _agreement(got, full_precision) > 0.8


def test_int8_kv_cache_with_swapping(tiny_models: dict[str, Path]) -> None:
    """Swap copies the scales with the int8 blocks: resumed requests continue exactly."""
    kwargs = dict(dtype="float64", kv_cache_dtype="int8", max_num_batched_tokens=512)
    roomy = LLM(model=str(tiny_models["llama"]), **kwargs)
    tight = LLM(model=str(tiny_models["llama"]), num_kv_blocks=9, swap_space_gb=0.05, preemption_mode="swap", **kwargs)
    prompts = [[20 + i] * 50 for i in range(6)]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in roomy.generate(prompts, params)]
    got = [o.token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.stats()["swapped_out"] > 0
    assert got == want


@pytest.mark.slow
def test_gguf_blocks_of_the_default_model() -> None:
    """quantization='gguf' computes from the packaged Q4_1/Q8_0 blocks: a fifth of the memory, same answer."""
    from engine.memory import model_weight_bytes

    llm = LLM(model=None, quantization="gguf")
    model = llm.engine.runner.adapter.model
    assert model_weight_bytes(model) < 0.2 * 538 * 2**20  # float32 weights of SmolLM2-135M: 538 MiB
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert out.text.lstrip().startswith("Paris"), out.text


def test_gguf_needs_the_default_model(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="quantization"):
        LLM(model=str(tiny_llama), quantization="gguf")
