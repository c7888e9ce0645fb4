"""LLMEngine / LLM / AsyncLLM: the public API, validation at the boundary, streaming, abort."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine import LLM, AsyncLLM, SamplingParams
from engine.config import EngineConfig


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> LLM:
    return LLM(model=str(tiny_llama), dtype="float64", num_kv_blocks=64)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"max_tokens": True}, "max_tokens"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_sampling_params_name_the_bad_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_from_dict_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="tempurature"):
        SamplingParams.from_dict({"tempurature": 0.5})
    assert SamplingParams.from_dict({"temperature": 0.5}).temperature == 0.5


def test_engine_config_validation() -> None:
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int3")


def test_unknown_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model: .*never downloads"):
        LLM(model=str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="model"):
        LLM(model="someorg/some-hub-model")


def test_bad_prompts_raise_before_any_step(llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt: is empty"):
        llm.generate([""], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="prompt: is empty"):
        llm.generate([[]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="prompt: .*context"):
        llm.generate([[5] * 5000], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="token id"):
        llm.generate([[5, 10**9]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([3.5], SamplingParams(max_tokens=2))  # type: ignore[list-item]
    assert not llm.engine.has_unfinished()  # nothing half-added stays behind
    assert llm.generate(["fine"], SamplingParams(max_tokens=2))[0].finish_reason == "length"


def test_text_and_token_prompts_agree(llm: LLM) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    by_text = llm.generate(["Hello there, general"], params)[0]
    by_ids = llm.generate([by_text.prompt_token_ids], params)[0]
    assert by_text.token_ids == by_ids.token_ids and by_text.text == by_ids.text
    assert by_text.text == llm.tokenizer.decode(by_text.token_ids, skip_special_tokens=True)


def test_stop_token_ids_and_strings(llm: LLM) -> None:
    base = llm.generate(["abc"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    out = llm.generate(
        ["abc"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id])
    )[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id and out.token_ids == base.token_ids[: first + 1]
    word = base.text[len(base.text) // 2 :].strip()[:3]
    if word:
        cut = llm.generate(["abc"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[word]))[0]
        assert cut.finish_reason == "stop" and cut.stop_reason == word
        assert cut.text == base.text[: base.text.index(word)]


def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    a = llm.generate(["x y z"], params)[0].token_ids
    b = llm.generate(["x y z", "other", "prompts"], params)[0].token_ids
    assert a == b


def test_logprobs_are_returned(llm: LLM) -> None:
    out = llm.generate(["hi"], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True))[0]
    assert out.logprobs is not None and len(out.logprobs) == 3
    for lp, token in zip(out.logprobs, out.token_ids, strict=True):
        assert lp.token_id == token and lp.logprob <= 0 and len(lp.top) == 2
        assert max(lp.top.values()) == pytest.approx(lp.logprob)  # greedy: the sampled token is the top one


def test_abort_frees_blocks(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("to-abort", [5] * 100, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.kv.pool.num_used > 0
    final = engine.abort("to-abort")
    assert final is not None and final.finished and final.finish_reason == "abort"
    assert engine.kv.pool.num_used == 0 and not engine.has_unfinished()
    assert engine.abort("to-abort") is None


def test_async_generate_stream_and_early_exit(tiny_llama: Path) -> None:
    llm = AsyncLLM(model_name=str(tiny_llama), dtype="float64", num_kv_blocks=64)

    async def main() -> None:
        results = await llm.generate(["one", "two"], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        assert [len(r.token_ids) for r in results] == [5, 5]
        pieces = []
        async for delta in llm.stream("one", SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)):
            pieces.append(delta.new_text)
        assert "".join(pieces) == results[0].text and len(pieces) == 5
        with pytest.raises(ValueError, match="prompt"):
            async for _ in llm.stream(""):
                pass
        async for _ in llm.stream("long", SamplingParams(max_tokens=500, ignore_eos=True)):
            break  # leaving early aborts the request
        for _ in range(100):
            if not llm.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        assert not llm.engine.has_unfinished() and llm.engine.kv.pool.num_used == 0

    try:
        asyncio.run(main())
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_default_model_knows_paris() -> None:
    llm = LLM(model=None)
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert out.text.lstrip().startswith("Paris"), out.text


@pytest.mark.parametrize("budget", [2048, 7])
def test_prompt_logprobs_match_transformers(tiny_llama: Path, budget: int) -> None:
    """Scoring the prompt (perplexity, echo) gives transformers' log-probabilities, chunked or not."""
    import torch
    from transformers import AutoModelForCausalLM

    llm = LLM(model=str(tiny_llama), dtype="float64", max_num_batched_tokens=budget)
    prompt = [11, 200, 3000, 45, 45, 9, 18000, 7, 7, 600, 12, 5]
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0], -1)
    for position, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert lp is not None and lp.token_id == prompt[position]
        assert lp.logprob == pytest.approx(expected[position - 1, prompt[position]].item(), abs=1e-9)
        assert len(lp.top) == 2 and max(lp.top.values()) == pytest.approx(expected[position - 1].max().item())
