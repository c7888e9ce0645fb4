"""The engine in float32 on CPU: prefill chunks through the C++ prefill kernel give SDPA's results."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLM, SamplingParams
from tests.tiny_models import save_random_model


@pytest.fixture(scope="module")
def llama_head64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random float32 llama with the default model's attention shape (head size 64, 3 query heads per kv head)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=384,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return save_random_model(config, tmp_path_factory.mktemp("llama_head64"), dtype=torch.float32)


def _prompts() -> list[list[int]]:
    """Prompts of 9..300 tokens, half of them sharing a 96-token (six-block) prefix: prefix-cache hits."""
    rng = random.Random(3)
    shared = [rng.randrange(3, 2048) for _ in range(96)]
    prompts = [[rng.randrange(3, 2048) for _ in range(n)] for n in (9, 40, 129, 300)]
    return prompts + [shared + [rng.randrange(3, 2048) for _ in range(n)] for n in (1, 20, 77, 150)]


Result = tuple[list[list[int]], list[list[float]], list[list[int]]]


def _run(model: Path, prefill_kernel: bool, budget: int) -> tuple[int, int, Result]:
    """Kernel calls, prefix-cache hits (tokens) and the results: greedy tokens and prompt log-probs of
    every prompt (scored prompts skip the prefix cache), then greedy tokens again after one prompt
    with the shared prefix has cached its blocks (the others then attend over cached tokens)."""
    llm = LLM(model=str(model), dtype="float32", max_num_batched_tokens=budget, num_kv_blocks=256)
    backend: Any = llm.engine.runner.backend
    assert backend.name == "cpu"
    backend.prefill_kernel = prefill_kernel
    calls = [0]
    kernel = backend._prefill

    def counted(*args: Any) -> None:  # noqa: ANN401
        calls[0] += 1
        kernel(*args)

    backend._prefill = counted
    prompts = _prompts()
    scored = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, prompt_logprobs=0))
    scores = []
    for out, prompt in zip(scored, prompts, strict=True):
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
        scores.append([p.logprob for p in out.prompt_logprobs[1:] if p is not None])
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[4:5], greedy)
    hits_before = llm.engine.kv.prefix_hits
    again = llm.generate(prompts, greedy)
    hits = llm.engine.kv.prefix_hits - hits_before
    return calls[0], hits, ([out.token_ids for out in scored], scores, [out.token_ids for out in again])


@pytest.mark.parametrize("budget", [2048, 64])
def test_prefill_kernel_matches_sdpa_in_the_engine(llama_head64: Path, budget: int) -> None:
    """Whole prompts in one step (2048) or chunked into 64-token steps (continuations over cached
    tokens), then prefix-cache hits: the same greedy tokens and prompt log-probabilities."""
    kernel_calls, kernel_hits, (kernel_tokens, kernel_scores, kernel_again) = _run(llama_head64, True, budget)
    sdpa_calls, sdpa_hits, (sdpa_tokens, sdpa_scores, sdpa_again) = _run(llama_head64, False, budget)
    assert kernel_calls > 0 and sdpa_calls == 0
    assert kernel_hits == sdpa_hits >= 4 * 96  # the four prompts with the shared prefix hit it at least
    assert kernel_tokens == sdpa_tokens == kernel_again == sdpa_again
    for a, b in zip(kernel_scores, sdpa_scores, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-4)
