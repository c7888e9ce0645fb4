"""Structured outputs in the engine: outputs parse and validate, unconstrained rows are untouched,
preemption, compile failures and timeouts, min_tokens against a grammar, logit_bias, allowed_token_ids."""

from __future__ import annotations

import json
import random
import re
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from engine import LLM, SamplingParams
from engine.request import Request
from engine.sampler import Sampler
from engine.structured.compiler import GrammarCompiler
from engine.structured.constraint import LogitsConstraints, TokenConstraint


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """Objects, arrays with min/maxItems, enums, nesting, string length and number bounds."""
    kinds = ["string", "integer", "number", "boolean", "enum", "null"] + (["array", "object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        low = rng.randint(0, 3)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randint(0, 6)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": -10, "maximum": rng.choice([0.5, 10, 1000])}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2, None, True, "a b"], rng.randint(1, 4))}
    if kind == "array":
        low = rng.randint(0, 2)
        return {
            "type": "array",
            "items": random_schema(rng, depth + 1),
            "minItems": low,
            "maxItems": low + rng.randint(0, 2),
        }
    if kind == "object":
        return random_object(rng, depth + 1)
    return {"type": kind}


def random_object(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    names = rng.sample(["id", "name", "tags", "score", "ok", "kind", "items"], rng.randint(1, 4))
    return {
        "type": "object",
        "properties": {n: random_schema(rng, depth) for n in names},
        "required": rng.sample(names, rng.randint(0, len(names))),
        "additionalProperties": False,
    }


REGEXES = [
    r"[0-9]{3}-[0-9]{4}",
    r"(yes|no|maybe)",
    r"[a-z]{2,5}@[a-z]{3}\.(com|org)",
    r"-?[0-9]{1,4}(\.[0-9]{1,2})?",
    r"[A-Z][a-z]{0,6}( [A-Z][a-z]{0,6}){0,2}",
    r"(ab|cd)+x",
    r"\((true|false), [0-9]\)",
]
CHOICES = [["yes", "no"], ["positive", "negative", "neutral"], ["A", "B", "C", "D"], ["hello world", "hi"]]


def _engine(tiny_llama: Path, **kwargs: Any) -> LLM:
    return LLM(model=str(tiny_llama), dtype="float64", **kwargs)


def _is_valid_prefix(llm: LLM, params: SamplingParams, token_ids: list[int]) -> bool:
    """A fresh matcher accepts every token: what was generated can still be completed."""
    assert params.structured_outputs is not None
    compiler = GrammarCompiler(llm.tokenizer, llm.engine.vocab_size, llm.engine.eos_token_ids)
    matcher = compiler.submit(params.structured_outputs).result().deep_copy()
    return matcher.consume_tokens(token_ids) and not matcher.is_error()


@pytest.mark.slow
def test_generated_schemas_regexes_and_choices_validate(tiny_llama: Path) -> None:
    rng = random.Random(1234)
    schemas = [random_object(rng) for _ in range(110)]
    params = [
        SamplingParams(temperature=1.0, max_tokens=64, seed=i, structured_outputs={"json": s})
        for i, s in enumerate(schemas)
    ]
    params += [
        SamplingParams(temperature=1.0, max_tokens=24, seed=i, structured_outputs={"regex": r})
        for i, r in enumerate(REGEXES * 3)
    ]
    params += [
        SamplingParams(temperature=1.0, max_tokens=8, seed=i, structured_outputs={"choice": c})
        for i, c in enumerate(CHOICES * 3)
    ]
    llm = _engine(tiny_llama)
    outputs = llm.generate(["Answer:"] * len(params), params)
    finished = {"stop": 0, "length": 0}
    for out, p in zip(outputs, params, strict=True):
        spec = p.structured_outputs
        assert spec is not None and out.finish_reason in finished, (out.finish_reason, out.error)
        finished[out.finish_reason] += 1
        if out.finish_reason == "length":
            assert _is_valid_prefix(llm, p, out.token_ids), (spec, out.text)
        elif spec.json is not None:
            jsonschema.validate(json.loads(out.text), spec.json)
        elif spec.regex is not None:
            assert re.fullmatch(spec.regex, out.text), (spec.regex, out.text)
        else:
            assert out.text in (spec.choice or [])
    assert finished["stop"] > len(params) // 2, finished  # most really finished: the check had teeth
    stats = llm.engine.stats()["structured"]
    assert stats["masked_rows"] > 0 and stats["compiles"] > 100 and stats["mask_ms_p99"] is not None


def test_unconstrained_requests_are_untouched_by_constrained_neighbours(tiny_llama: Path) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = [[5, 6, 7, 8] * 5, "The weather today", [300, 301, 302]]
    alone = _engine(tiny_llama).generate(prompts, greedy)
    constrained = [
        SamplingParams(temperature=0.0, max_tokens=12, structured_outputs={"json": random_object(random.Random(3))}),
        SamplingParams(temperature=0.7, seed=1, max_tokens=12, logit_bias={5: 50.0}, allowed_token_ids=[5, 6, 7]),
    ]
    mixed = _engine(tiny_llama).generate(prompts + ["x", "y"], [greedy] * 3 + constrained)
    for a, m in zip(alone, mixed[:3], strict=True):
        assert m.token_ids == a.token_ids
        # Another batch shape changes the matmuls' summation order, so logits agree to rounding only;
        # the sampler's own rows are bit-identical (test_sampler_rows_without_constraints_are_bit_identical).
        assert [lp.logprob for lp in m.logprobs or []] == pytest.approx(
            [lp.logprob for lp in a.logprobs or []], rel=1e-9
        )
    assert set(mixed[4].token_ids) <= {5, 6, 7}


def test_sampler_rows_without_constraints_are_bit_identical() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 64, dtype=torch.float64)
    plain = [Request(f"p{i}", [1], SamplingParams(temperature=0, logprobs=3)) for i in range(2)]
    biased = Request("b", [1], SamplingParams(temperature=0, logprobs=3, logit_bias={1: 100.0}))
    biased.constraint = TokenConstraint(biased.params, 64)
    without = Sampler(64)(logits[[0, 2]], plain)
    mixed = Sampler(64)(logits, [plain[0], biased, plain[1]])
    assert mixed.token_ids[1] == 1
    assert [mixed.token_ids[0], mixed.token_ids[2]] == without.token_ids
    assert [mixed.logprobs[0], mixed.logprobs[2]] == without.logprobs  # exact floats, top lists included


def test_the_unconstrained_path_never_enters_the_mask_code(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> None:
        raise AssertionError("mask code ran for an unconstrained batch")

    monkeypatch.setattr(LogitsConstraints, "apply", refuse)
    outputs = _engine(tiny_llama).generate(["a b c", [4, 5, 6]], SamplingParams(temperature=0.8, max_tokens=6))
    assert all(o.finish_reason in ("stop", "length") for o in outputs)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_constrained_requests_still_validate(tiny_llama: Path, mode: str) -> None:
    schema = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 6, "maxItems": 8}
    params = SamplingParams(temperature=0.0, max_tokens=80, structured_outputs={"json": schema})
    prompts = [[5 + i] * 40 for i in range(4)]
    reference = _engine(tiny_llama).generate(prompts, params)
    swap = {"swap_space_gb": 0.1, "preemption_mode": "swap"} if mode == "swap" else {"preemption_mode": "recompute"}
    llm = _engine(tiny_llama, num_kv_blocks=14, **swap)
    outputs = llm.generate(prompts, params)
    stats = llm.engine.stats()
    assert stats["preemptions"] > 0 and (mode == "recompute" or stats["swapped_out"] > 0)
    for out, ref in zip(outputs, reference, strict=True):
        assert out.token_ids == ref.token_ids
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), schema)
        else:
            assert _is_valid_prefix(llm, params, out.token_ids)


def test_chunked_prefill_prefix_hits_and_stop_strings(tiny_llama: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "string", "maxLength": 5}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    params = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs={"json": schema})
    prompt = "one two three four five six seven eight nine ten " * 6
    llm = _engine(tiny_llama, max_num_batched_tokens=24)
    first = llm.generate([prompt], params)[0]
    again = llm.generate([prompt], params)[0]
    assert again.num_cached_tokens > 0 and again.token_ids == first.token_ids
    jsonschema.validate(json.loads(first.text), schema)
    # A stop string cuts the output: what is left is a prefix of the constrained output.
    cut = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=40, stop=[","], structured_outputs={"json": schema})
    )[0]
    assert cut.finish_reason == "stop" and first.text.startswith(cut.text) and cut.text != first.text


def test_min_tokens_yields_to_a_grammar_that_wants_to_stop(tiny_llama: Path) -> None:
    # In the engine: the grammar completes after one token, min_tokens asks for five.
    params = SamplingParams(
        temperature=1.0, seed=0, max_tokens=10, min_tokens=5, structured_outputs={"choice": ["yes"]}
    )
    out = _engine(tiny_llama).generate(["q"], params)[0]
    assert out.finish_reason == "stop" and out.text == "yes"
    # In the sampler: a matcher that only allows EOS against min_tokens banning EOS: EOS it is.
    engine = _engine(tiny_llama).engine
    spec = SamplingParams(structured_outputs={"choice": ["yes"]}).structured_outputs
    assert spec is not None
    matcher = engine.grammars.compiler.submit(spec).result().deep_copy()
    assert matcher.consume_tokens(engine.tokenizer.encode("yes")) and matcher.is_stopped()
    request = Request("r", [1], SamplingParams(temperature=0, min_tokens=5), eos_token_ids=engine.eos_token_ids)
    request.constraint = TokenConstraint(request.params, engine.vocab_size)
    request.constraint.matcher = matcher
    logits = torch.randn(1, engine.vocab_size, dtype=torch.float64)
    assert Sampler(engine.vocab_size)(logits, [request]).token_ids == sorted(engine.eos_token_ids)[:1]


def test_logit_bias_and_allowed_token_ids(tiny_llama: Path) -> None:
    llm = _engine(tiny_llama)
    forced = llm.generate(["x"], SamplingParams(temperature=1.0, seed=0, max_tokens=5, logit_bias={"42": 100}))[0]
    assert forced.token_ids == [42] * 5
    allowed = llm.generate(["x"], SamplingParams(temperature=1.0, seed=0, max_tokens=20, allowed_token_ids=[10, 11]))
    assert set(allowed[0].token_ids) <= {10, 11}
    # allowed_token_ids yields to a grammar they contradict: the grammar's output, not an empty row.
    both = SamplingParams(temperature=0, max_tokens=5, allowed_token_ids=[10], structured_outputs={"choice": ["no"]})
    assert llm.generate(["x"], both)[0].text == "no"


def test_token_ids_past_the_vocabulary_are_refused(tiny_llama: Path) -> None:
    engine = _engine(tiny_llama).engine
    vocab = engine.vocab_size
    with pytest.raises(ValueError, match="logit_bias: token id"):
        engine.add_request("a", "x", SamplingParams(logit_bias={vocab: 1.0}))
    with pytest.raises(ValueError, match="allowed_token_ids: token id"):
        engine.add_request("b", "x", SamplingParams(allowed_token_ids=[1, vocab + 5]))
    assert not engine.has_unfinished()


def test_compile_failure_and_timeout_end_only_that_request(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    original = GrammarCompiler._compile

    def slow_or_broken(self: GrammarCompiler, key: str, spec: Any) -> Any:
        if spec.regex == "slow":
            release.wait(timeout=60)
        if spec.regex == "broken":
            raise ValueError("structured_outputs.regex: the backend refused it")
        return original(self, key, spec)

    monkeypatch.setattr(GrammarCompiler, "_compile", slow_or_broken)
    llm = _engine(tiny_llama, grammar_compile_timeout_s=0.2)
    plain = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    try:
        outputs = llm.generate(
            ["a", "b", "c"],
            [
                SamplingParams(structured_outputs={"regex": "slow"}),
                SamplingParams(structured_outputs={"regex": "broken"}),
                plain,
            ],
        )
    finally:
        release.set()
    slow, broken, ok = outputs
    assert slow.finish_reason == "error" and "compilation took over" in (slow.error or "")
    assert broken.finish_reason == "error" and broken.error == "structured_outputs.regex: the backend refused it"
    assert ok.finish_reason == "length" and len(ok.token_ids) == 30 and ok.error is None
    assert not llm.engine.has_unfinished()


def test_abort_while_compiling(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    original = GrammarCompiler._compile

    def blocked(self: GrammarCompiler, key: str, spec: Any) -> Any:
        release.wait(timeout=60)
        return original(self, key, spec)

    monkeypatch.setattr(GrammarCompiler, "_compile", blocked)
    engine = _engine(tiny_llama).engine
    engine.add_request("r", "x", SamplingParams(structured_outputs={"regex": "[a-z]+"}))
    assert engine.has_unfinished() and engine.step() == [] and engine.stats()["structured"]["waiting_for_grammar"] == 1
    out = engine.abort("r")
    release.set()
    assert out is not None and out.finish_reason == "abort" and not engine.has_unfinished()


def test_int8_weights_and_kv_with_seeds_and_shared_constraints(tiny_llama: Path) -> None:
    """Many requests with one constraint (as n > 1 sends them) share a compile, not a matcher state;
    a seed gives the same constrained output again; int8 weights and KV change nothing of that."""
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["x", "y", "z"]},
              "maxItems": 3}}, "required": ["tags"], "additionalProperties": False}  # fmt: skip
    llm = LLM(model=str(tiny_llama), dtype="float32", quantization="int8", kv_cache_dtype="int8")
    params = [
        SamplingParams(temperature=1.0, seed=i % 4, max_tokens=40, structured_outputs={"json": schema})
        for i in range(8)
    ]
    outputs = llm.generate(["Tags:"] * 8, params)
    for out in outputs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    assert [o.token_ids for o in outputs[:4]] == [o.token_ids for o in outputs[4:]]
    stats = llm.engine.stats()["structured"]
    assert stats["grammar_cache_misses"] == 1 and stats["grammar_cache_hits"] == 7


def test_logprobs_are_those_of_the_masked_distribution() -> None:
    """As vLLM's processed logprobs: after bias and masks, before temperature."""
    torch.manual_seed(1)
    logits = torch.randn(1, 32, dtype=torch.float64)
    params = SamplingParams(temperature=0.5, seed=3, logprobs=3, allowed_token_ids=[4, 9, 20], logit_bias={9: 1.0})
    request = Request("r", [1], params)
    request.generator = torch.Generator().manual_seed(3)
    request.constraint = TokenConstraint(params, 32)
    result = Sampler(32)(logits, [request])
    expected = logits[0, [4, 9, 20]] + torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    expected = dict(zip([4, 9, 20], torch.log_softmax(expected, -1).tolist(), strict=True))
    lp = result.logprobs[0]
    assert lp is not None and result.token_ids[0] in expected
    assert lp.top == pytest.approx(expected) and lp.logprob == pytest.approx(expected[result.token_ids[0]])
