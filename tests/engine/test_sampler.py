"""Sampler: greedy, exact top-k/top-p/min-p support, penalties, seeds independent of the batch."""

from __future__ import annotations

import torch

from engine.config import SamplingParams
from engine.request import Request
from engine.sampler import Sampler, apply_penalties, apply_top_k_top_p

VOCAB = 10


def _req(
    params: SamplingParams, rid: str = "r", output: list[int] | None = None, prompt: list[int] | None = None
) -> Request:
    r = Request(rid, prompt or [0], params)
    if params.seed is not None:
        r.generator = torch.Generator().manual_seed(params.seed)
    r.output_token_ids = list(output or [])
    return r


def test_greedy_takes_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    result = Sampler(3)(logits, [_req(SamplingParams(temperature=0)), _req(SamplingParams(temperature=0))])
    assert result.token_ids == [1, 0]


def test_top_k_keeps_exactly_k() -> None:
    logits = torch.arange(VOCAB, dtype=torch.float64)[None].repeat(2, 1)
    masked = apply_top_k_top_p(logits, [3, 0], [1.0, 1.0])
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [7, 8, 9]
    assert torch.isfinite(masked[1]).all()


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    logits = probs.log()
    keep = lambda p: torch.isfinite(apply_top_k_top_p(logits, [0], [p])[0]).nonzero().flatten().tolist()  # noqa: E731
    assert keep(0.49) == [0]
    assert keep(0.51) == [0, 1]
    assert keep(0.79) == [0, 1]
    assert keep(0.81) == [0, 1, 2]
    assert keep(0.99) == [0, 1, 2, 3]


def test_sampled_tokens_stay_in_the_support() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    top5 = set(logits[0].topk(5).indices.tolist())
    sampler = Sampler(50)
    params = SamplingParams(temperature=1.5, top_k=5, seed=1)
    request = _req(params)
    seen = {sampler(logits, [request]).token_ids[0] for _ in range(200)}
    assert seen <= top5 and len(seen) > 1


def test_min_p_drops_unlikely_tokens() -> None:
    logits = torch.tensor([[2.0, 1.9, -3.0, -3.0]])
    sampler = Sampler(4)
    request = _req(SamplingParams(temperature=1.0, min_p=0.2, seed=3))
    seen = {sampler(logits, [request]).token_ids[0] for _ in range(200)}
    assert seen == {0, 1}


def test_seed_gives_the_same_tokens_whatever_the_batch() -> None:
    torch.manual_seed(0)
    rows = torch.randn(6, 100)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def run(batch_rows: list[int], seeded_row: int, steps: int = 20) -> list[int]:
        sampler = Sampler(100, seed=99)
        seeded = _req(params, "seeded")
        others = [_req(SamplingParams(temperature=0.8), f"o{i}") for i in batch_rows]
        tokens = []
        for _ in range(steps):
            logits = rows[batch_rows + [seeded_row]]
            tokens.append(sampler(logits, others + [seeded]).token_ids[-1])
        return tokens

    alone = run([], 5)
    assert run([0, 1, 2], 5) == alone
    assert run([3, 4], 5) == alone
    assert len(set(alone)) > 1  # it really sampled


def test_unseeded_rows_are_random() -> None:
    logits = torch.zeros(1, 1000)
    sampler = Sampler(1000)
    draws = {sampler(logits, [_req(SamplingParams(temperature=1.0))]).token_ids[0] for _ in range(20)}
    assert len(draws) > 10


def test_repetition_penalty_matches_transformers() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB)
    prompt, output = [1, 2], [3, 1]
    ours = apply_penalties(logits.clone(), [_req(SamplingParams(repetition_penalty=1.3), prompt=prompt, output=output)])
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(ours, theirs)


def test_presence_and_frequency_penalties_follow_openai() -> None:
    logits = torch.zeros(1, VOCAB)
    request = _req(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=[4], output=[1, 1, 2])
    out = apply_penalties(logits, [request])[0]
    assert out[1].item() == -(0.5 + 2 * 0.25)
    assert out[2].item() == -(0.5 + 0.25)
    assert out[4].item() == 0.0  # prompt tokens are not penalised
    assert out[0].item() == 0.0


def test_min_tokens_bans_eos_until_reached() -> None:
    logits = torch.tensor([[0.0, 0.0, 9.0]])  # EOS (2) is the argmax
    request = _req(SamplingParams(temperature=0, min_tokens=2))
    request.eos_token_ids = frozenset({2})
    sampler = Sampler(3)
    assert sampler(logits, [request]).token_ids == [0]
    request.output_token_ids = [0, 0]
    assert sampler(logits, [request]).token_ids == [2]


def test_logprobs_of_sampled_and_top_tokens() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    result = Sampler(3)(logits, [_req(SamplingParams(temperature=0, logprobs=2))])
    lp = result.logprobs[0]
    expected = torch.log_softmax(logits[0], -1)
    assert lp is not None and lp.token_id == 2
    assert abs(lp.logprob - expected[2].item()) < 1e-6
    assert list(lp.top) == [2, 1] and abs(lp.top[1] - expected[1].item()) < 1e-6
