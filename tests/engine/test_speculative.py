"""Speculative decoding (engine/speculative.py, Sampler.verify): the proposer, and output that is the
non-speculative engine's, token for token when greedy and in distribution when sampling."""

from __future__ import annotations

import collections
import math
import random
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine import speculative as speculative_module
from engine.config import EngineConfig
from engine.request import Request
from engine.speculative import MIN_PAUSE, WINDOW, DraftState, NgramProposer
from tests.tiny_models import ARCHITECTURES, save_random_model

# -- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"speculative": "medusa"}, "speculative"),
        ({"speculative": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"ngram_prompt_lookup_min": 0}, "ngram_prompt_lookup_min"),
        ({"ngram_prompt_lookup_min": 3, "ngram_prompt_lookup_max": 2}, "ngram_prompt_lookup_max"),
    ],
)
def test_engine_config_names_the_bad_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)


def test_sampling_params_speculative_is_a_tristate() -> None:
    with pytest.raises(ValueError, match="speculative"):
        SamplingParams(speculative="yes")  # type: ignore[arg-type]
    assert SamplingParams.from_dict({"speculative": False}).speculative is False


# -- the proposer --------------------------------------------------------------------------------------


def _request(prompt: list[int], output: list[int] = (), max_tokens: int = 64) -> Request:  # type: ignore[assignment]
    request = Request("r", list(prompt), SamplingParams(max_tokens=max_tokens), draft_state=DraftState())
    request.output_token_ids = list(output)
    return request


def test_proposes_what_followed_the_latest_longest_match() -> None:
    proposer = NgramProposer(num_tokens=4, lookup_min=2, lookup_max=3, max_model_len=1000)
    # "8 2 3" occurs once, "2 3" twice: the longer match wins even though it is older.
    assert proposer.propose(_request([8, 2, 3, 4, 5, 6, 7, 9, 2, 3, 1, 1, 8, 2, 3])) == [4, 5, 6, 7]
    # Only the shortest n-gram matches: its latest occurrence.
    assert proposer.propose(_request([5, 6, 10, 11, 6, 7, 12, 13, 9, 6, 7])) == [12, 13, 9, 6]
    assert proposer.propose(_request([1, 2, 3, 4])) == []


def test_a_loop_continues_into_its_own_draft_and_stops_at_max_tokens() -> None:
    proposer = NgramProposer(num_tokens=5, lookup_min=2, lookup_max=4, max_model_len=1000)
    assert proposer.propose(_request([9, 4, 7, 4, 7])) == [4, 7, 4, 7, 4]
    # Two tokens left to generate: the step emits at most drafts + 1 of them.
    assert proposer.propose(_request([9, 4, 7], [4, 7], max_tokens=4)) == [4]
    # The index follows new output tokens.
    request = _request([1, 2, 3, 4])
    assert proposer.propose(request) == []
    request.output_token_ids += [5, 3, 4]
    assert proposer.propose(request) == [5, 3, 4, 5, 3]


def test_backs_off_when_nothing_is_accepted_and_recovers() -> None:
    proposer = NgramProposer(num_tokens=4, lookup_min=1, lookup_max=2, max_model_len=1000)
    request = _request([3, 4, 3])
    for _ in range(WINDOW):
        assert proposer.propose(request) == [4, 3, 4, 3]
        proposer.record(request, 4, 0)
    assert [proposer.propose(request) for _ in range(MIN_PAUSE)] == [[]] * MIN_PAUSE
    assert proposer.propose(request) == [4, 3, 4, 3]
    for _ in range(WINDOW):
        proposer.record(request, 4, 0)
    assert request.draft_state is not None and request.draft_state.paused_for == 2 * MIN_PAUSE
    assert (request.spec_proposed, request.spec_accepted) == (8 * 4, 0)
    assert proposer.stats()["spec_acceptance_rate"] == 0.0


def test_draft_length_shrinks_as_decodes_share_a_step() -> None:
    state = DraftState()  # prior: half of the drafts accepted
    assert state.draft_length(num_decodes=1, limit=4) == 3  # 0.5 ** 3 > 1 / 13
    assert state.draft_length(num_decodes=1, limit=2) == 2
    assert state.draft_length(num_decodes=64, limit=4) == 0
    state.accepted_weight, state.tried_weight = 9.0, 10.0
    assert state.draft_length(num_decodes=4, limit=8) == 8
    assert 0 < state.draft_length(num_decodes=16, limit=8) < 8


# -- greedy: token for token the non-speculative engine --------------------------------------------------


def _repetitive_workload(seed: int, num_prompts: int = 16) -> tuple[list[list[int]], list[int]]:
    """Prompts that repeat a random passage (so copying pays), of 8..300 tokens, 8..64 new tokens."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prompts):
        passage = [rng.randrange(3, 49152) for _ in range(rng.randint(4, 60))]
        prompts.append((passage * 5)[: rng.randint(8, 300)])
    return prompts, [rng.randint(8, 64) for _ in prompts]


def _generate(model_dir: Path, prompts: list, params: list[SamplingParams], **engine_kwargs: object) -> tuple:
    llm = LLM(model=str(model_dir), dtype="float64", **engine_kwargs)
    outputs = llm.generate(prompts, params)
    stats = llm.engine.stats()
    assert stats["kv_blocks_used"] == 0  # every block of every finished request came back
    return outputs, stats, llm


def _assert_same_outputs(got: list, want: list) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g.token_ids, g.finish_reason, g.stop_reason) == (w.token_ids, w.finish_reason, w.stop_reason), i


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {},
        {"max_num_batched_tokens": 40},  # chunked prefill; drafts compete with chunks for the budget
        {"num_kv_blocks": 40, "max_num_batched_tokens": 512},  # preemption by recompute
        {"attention_backend": "torch", "max_num_batched_tokens": 64, "num_kv_blocks": 60},
    ],
    ids=["plain", "chunked", "preempted", "torch-backend"],
)
def test_greedy_equals_the_plain_engine(tiny_llama: Path, engine_kwargs: dict) -> None:
    prompts, max_tokens = _repetitive_workload(seed=0)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    want, _, _ = _generate(tiny_llama, prompts, params, **engine_kwargs)
    got, stats, _ = _generate(tiny_llama, prompts, params, speculative="ngram", **engine_kwargs)
    _assert_same_outputs(got, want)
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"]
    assert sum(o.spec_accepted for o in got) == stats["spec_accepted_tokens"]
    if "num_kv_blocks" in engine_kwargs:
        assert stats["preemptions"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_equals_the_plain_engine_every_architecture(tiny_models: dict[str, Path], arch: str) -> None:
    prompts, max_tokens = _repetitive_workload(seed=1)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    kwargs = {"num_kv_blocks": 48, "max_num_batched_tokens": 96, "num_speculative_tokens": 6}
    want, _, _ = _generate(tiny_models[arch], prompts, params, **kwargs)
    got, stats, _ = _generate(tiny_models[arch], prompts, params, speculative="ngram", **kwargs)
    _assert_same_outputs(got, want)
    assert stats["spec_accepted_tokens"] > 0


def test_prefix_cache_holds_only_verified_tokens(tiny_llama: Path) -> None:
    """A second wave whose prompts are the first wave's prompt + output hits blocks written while
    speculating; had a block been hashed with a rejected draft's K/V in it, greedy would diverge."""
    prompts, max_tokens = _repetitive_workload(seed=2, num_prompts=8)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    llm = LLM(model=str(tiny_llama), dtype="float64", speculative="ngram")
    first = llm.generate(prompts, params)
    second_prompts = [p + o.token_ids for p, o in zip(prompts, first, strict=True)]
    second = llm.generate(second_prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert sum(o.num_cached_tokens for o in second) > sum(len(p) for p in prompts) // 2
    assert llm.engine.stats()["spec_accepted_tokens"] > 0
    plain = LLM(model=str(tiny_llama), dtype="float64", enable_prefix_caching=False)
    want = plain.generate(second_prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    _assert_same_outputs(second, want)


def test_stop_conditions_apply_to_each_accepted_token(tiny_llama: Path) -> None:
    prompts, _ = _repetitive_workload(seed=3, num_prompts=8)
    free = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True) for _ in prompts]
    reference, _, _ = _generate(tiny_llama, prompts, free)
    # Stop on a token the request emits midway (often inside an accepted run of drafts), or as EOS;
    # min_tokens holds both off for a while.
    params = []
    for i, out in enumerate(reference):
        stop_token = out.token_ids[len(out.token_ids) // 2]
        if i % 2:
            params.append(SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[stop_token], min_tokens=i))
        else:
            params.append(SamplingParams(max_tokens=40, temperature=0.0, min_tokens=i))
    llm_plain, llm_spec = (LLM(model=str(tiny_llama), dtype="float64", speculative=s) for s in (None, "ngram"))
    for engine in (llm_plain.engine, llm_spec.engine):
        engine.eos_token_ids = frozenset({reference[0].token_ids[20], reference[2].token_ids[10]})
    want = llm_plain.generate(prompts, params)
    got = llm_spec.generate(prompts, params)
    _assert_same_outputs(got, want)
    assert any(o.finish_reason == "stop" for o in got) and llm_spec.engine.stats()["spec_accepted_tokens"] > 0


def test_logprobs_and_opt_out(tiny_llama: Path) -> None:
    prompts, _ = _repetitive_workload(seed=4, num_prompts=6)
    params = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=3) for _ in prompts]
    params[0] = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=3, speculative=False)
    want, _, _ = _generate(tiny_llama, prompts, params)
    got, stats, _ = _generate(tiny_llama, prompts, params, speculative="ngram")
    _assert_same_outputs(got, want)
    assert got[0].spec_proposed == 0 and stats["spec_accepted_tokens"] > 0
    for g, w in zip(got, want, strict=True):
        assert g.logprobs is not None and w.logprobs is not None and len(g.logprobs) == len(w.logprobs)
        for a, b in zip(g.logprobs, w.logprobs, strict=True):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-9)
            assert a.top.keys() == b.top.keys()


# -- sampling: the same distribution -----------------------------------------------------------------------

VOCAB = 32
TOP_K = 4
NUM_SAMPLES = 6000


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32-token vocabulary: the joint law of three tokens under top-k=4 has 64 cells to count."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return save_random_model(config, tmp_path_factory.mktemp("small-vocab"), std=0.15)


Law = dict[tuple[int, ...], dict[int, float]]  # prefix of generated tokens -> P(next token)


def _exact_law(model_dir: Path, prompt: list[int], length: int) -> tuple[dict[tuple[int, ...], float], Law]:
    """P(first `length` tokens) under temperature 1 and top-k, straight from transformers; and the
    conditional law of each next token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    joint: dict[tuple[int, ...], float] = {(): 1.0}
    conditional: Law = {}
    for _ in range(length):
        grown = {}
        for prefix, p in joint.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1]
            values, ids = logits.topk(TOP_K)
            conditional[prefix] = dict(zip(ids.tolist(), torch.softmax(values, -1).tolist(), strict=True))
            for token, q in conditional[prefix].items():
                grown[(*prefix, token)] = p * q
        joint = grown
    return joint, conditional


def _oracle_proposer(conditional: Law):  # noqa: ANN202 - a replacement for NgramProposer.propose
    """Drafts chosen to exercise every branch of the rejection rule: by request, the likeliest
    continuation (mostly accepted), the second likeliest (often rejected), or a token outside the
    top-k (always rejected; the residual is then the whole distribution)."""

    def propose(request: Request) -> list[int]:
        prefix = tuple(request.output_token_ids)
        kind = (request.params.seed or 0) % 3
        drafts: list[int] = []
        for _ in range(request.params.max_tokens - len(prefix) - 1):
            options = conditional[prefix]
            ranked = sorted(options, key=options.__getitem__, reverse=True)
            token = ranked[0] if kind == 0 else ranked[1] if kind == 1 else min(set(range(VOCAB)) - set(options))
            drafts.append(token)
            if token not in options:
                break
            prefix = (*prefix, token)
        return drafts

    return propose


def _marginal(joint: dict[tuple[int, ...], float], length: int) -> dict[tuple[int, ...], float]:
    law: dict[tuple[int, ...], float] = collections.defaultdict(float)
    for cell, p in joint.items():
        law[cell[:length]] += p
    return dict(law)


def _chi_square(counts: collections.Counter, law: dict[tuple[int, ...], float]) -> tuple[float, int]:
    """Pearson's statistic, cells with an expected count under 5 pooled; and its degrees of freedom."""
    assert set(counts) <= set(law), "a sequence outside top-k was generated"
    n = sum(counts.values())
    statistic, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for cell, p in law.items():
        expected = n * p
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + counts[cell], pooled_exp + expected
            continue
        statistic += (counts[cell] - expected) ** 2 / expected
        cells += 1
    if pooled_exp > 0:
        statistic += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    return statistic, cells - 1


def _chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1 % point of chi-square(df), Wilson-Hilferty (no scipy here)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampled_distribution_is_unchanged(small_vocab_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four tokens sampled with top-k, 6,000 seeded requests: the joint law of the output matches
    the model's exact one (chi-square at 0.1 %) with drafts verified, as it does without."""
    rng = random.Random(0)
    prompt = [rng.randrange(3, VOCAB) for _ in range(12)]
    length = 4
    joint, conditional = _exact_law(small_vocab_model, prompt, length)
    params = [
        SamplingParams(max_tokens=length, temperature=1.0, top_k=TOP_K, seed=i, ignore_eos=True)
        for i in range(NUM_SAMPLES)
    ]
    # Every draft is verified, however many decodes share a step (the cost model would drop most).
    monkeypatch.setattr(speculative_module, "FIXED_COST_ROWS", 1e9)
    for speculative in (None, "ngram"):
        llm = LLM(
            model=str(small_vocab_model),
            dtype="float64",
            max_num_seqs=256,
            speculative=speculative,
            max_speculative_tokens_per_step=1024,
        )
        if llm.engine.proposer is not None:
            # n-gram drafts of a random model are almost never in its top-k; verification is under test here.
            llm.engine.proposer.propose = _oracle_proposer(conditional)  # type: ignore[method-assign]
        outputs = llm.generate([prompt] * NUM_SAMPLES, params)
        statistic, df = _chi_square(collections.Counter(tuple(o.token_ids) for o in outputs), joint)
        assert statistic < _chi_square_critical(df), (speculative, statistic, df)
        # More power where a bias would show: the first two tokens, per kind of draft.
        first_two = _marginal(joint, 2)
        for kind in range(3):
            counts = collections.Counter(tuple(o.token_ids[:2]) for o in outputs[kind::3])
            statistic, df = _chi_square(counts, first_two)
            assert statistic < _chi_square_critical(df), (speculative, kind, statistic, df)
        if speculative:
            stats = llm.engine.stats()
            assert 0.1 * stats["spec_proposed_tokens"] < stats["spec_accepted_tokens"]
            assert stats["spec_accepted_tokens"] < 0.8 * stats["spec_proposed_tokens"]
            # Seeded requests are reproducible with speculation too.
            again = llm.generate([prompt] * 60, params[:60])
            assert [o.token_ids for o in again] == [o.token_ids for o in outputs[:60]]


def test_sampling_with_penalties_does_not_speculate(tiny_llama: Path) -> None:
    prompts, _ = _repetitive_workload(seed=5, num_prompts=4)
    params = SamplingParams(max_tokens=16, temperature=0.8, repetition_penalty=1.2, seed=7)
    want, _, _ = _generate(tiny_llama, prompts, [params] * 4)
    got, stats, _ = _generate(tiny_llama, prompts, [params] * 4, speculative="ngram")
    assert stats["spec_proposed_tokens"] == 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_draft_tokens_per_step_are_capped(tiny_llama: Path) -> None:
    """Many decodes share `max_speculative_tokens_per_step` (a big batch is compute-bound)."""
    prompts, max_tokens = _repetitive_workload(seed=6, num_prompts=12)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    llm = LLM(model=str(tiny_llama), dtype="float64", speculative="ngram", max_speculative_tokens_per_step=6)
    drafts_per_step: list[int] = []
    execute = llm.engine.runner.execute

    def recording_execute(batch):  # noqa: ANN001, ANN202
        drafts_per_step.append(sum(len(r.spec_token_ids) for r in batch.requests))
        return execute(batch)

    llm.engine.runner.execute = recording_execute  # type: ignore[method-assign]
    got = llm.generate(prompts, params)
    want, _, _ = _generate(tiny_llama, prompts, params)
    _assert_same_outputs(got, want)
    assert max(drafts_per_step) <= 6 and sum(drafts_per_step) == llm.engine.stats()["spec_proposed_tokens"] > 0
