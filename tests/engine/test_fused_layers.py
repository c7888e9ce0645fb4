"""The fused decoder-layer forward is taken where it applies, and computes what transformers' layers do."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig

from engine import LLM, SamplingParams
from engine.models.fused_layers import fuse_decoder_layers
from kernels.fused_ops import FusedOps
from tests.tiny_models import build_tiny_model

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, prompt_logprobs=0)


def _prompts(n: int = 6) -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(1, 90))] for _ in range(n)]


def _run(model: Path, fused: bool, dtype: str) -> tuple[int, list[list[int]], list[list[float]]]:
    llm = LLM(model=str(model), fused_layers=fused, num_kv_blocks=64, dtype=dtype)
    outs = llm.generate(_prompts(), PARAMS)
    scores = [[p.logprob for p in out.prompt_logprobs[1:]] for out in outs]  # type: ignore[union-attr]
    return llm.engine.fused_layers, [out.token_ids for out in outs], scores


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_float64_fused_equals_transformers_layers(tiny_models: dict[str, Path], arch: str) -> None:
    fused_count, fused_tokens, fused_scores = _run(tiny_models[arch], fused=True, dtype="float64")
    plain_count, plain_tokens, plain_scores = _run(tiny_models[arch], fused=False, dtype="float64")
    assert (fused_count, plain_count) == (3, 0)  # every layer took the fused forward, or none
    assert fused_tokens == plain_tokens
    for a, b in zip(fused_scores, plain_scores, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-9, atol=1e-9)


def test_float32_fused_kernels_agree_with_transformers_layers(tmp_path: Path) -> None:
    model = build_tiny_model("llama", tmp_path / "llama32", dtype=torch.float32)
    fused_count, fused_tokens, fused_scores = _run(model, fused=True, dtype="float32")
    _, plain_tokens, plain_scores = _run(model, fused=False, dtype="float32")
    assert fused_count == 3
    assert fused_tokens == plain_tokens
    for a, b in zip(fused_scores, plain_scores, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-4)


def test_other_architectures_keep_their_own_forward(tiny_models: dict[str, Path]) -> None:
    for arch in ("gpt2", "opt"):
        assert LLM(model=str(tiny_models[arch]), num_kv_blocks=64).engine.fused_layers == 0


def test_a_sliding_window_keeps_transformers_forward() -> None:
    """Mistral passes its window at call time; the fused forward has none, so such layers are left alone."""
    config = MistralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
    )
    assert fuse_decoder_layers(AutoModelForCausalLM.from_config(config), FusedOps(None)) == 0
    config.sliding_window = None
    assert fuse_decoder_layers(AutoModelForCausalLM.from_config(config), FusedOps(None)) == 2
