"""OpenAI bodies -> GenerationPlan, response shapes, stream replay after a restart (no processes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from producer.gateway.errors import APIError
from producer.gateway.requests import Endpoint, parse_chat, parse_completion
from producer.gateway.responses import completion_logprobs, finish_reason, full_response
from producer.gateway.streaming import Replay
from producer.results import Completion


def test_completion_plan_maps_openai_fields_to_sampling_params() -> None:
    plan = parse_completion(
        {
            "model": "m",
            "prompt": ["a", "b"],
            "n": 2,
            "seed": 7,
            "max_tokens": 5,
            "temperature": 0.5,
            "stop": "x",
            "logprobs": 3,
            "echo": True,
            "user": "u",
            "top_k": 4,
            "speculative": False,
        },
        max_choices=16,
    )
    assert plan.endpoint is Endpoint.COMPLETIONS and plan.choices == 4 and plan.echo
    assert plan.params == {
        "max_tokens": 5,
        "temperature": 0.5,
        "seed": 7,
        "stop": ["x"],
        "top_k": 4,
        "speculative": False,
        "logprobs": 3,
        "prompt_logprobs": 3,
    }
    assert [plan.choice_params(i)["seed"] for i in range(2)] == [7, 8]
    assert parse_completion({"model": "m", "prompt": "q"}, 16).params["max_tokens"] == 16  # OpenAI's default


def test_chat_plan_normalises_messages() -> None:
    plan = parse_chat(
        {
            "model": "m",
            "max_completion_tokens": 9,
            "logprobs": True,
            "top_logprobs": 2,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ],
        },
        16,
        100,
    )
    assert plan.prompts == [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "ab"},
                {"role": "assistant", "content": ""},
            ]
        }
    ]
    assert plan.params["max_tokens"] == 9 and plan.logprobs == 2
    assert parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}, 16, 100).params == {
        "max_tokens": 100
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": "x", "n": 20}, "n"),
        ({"model": "m", "prompt": [1, "a"]}, "prompt"),
        ({"prompt": "x"}, "model"),
        ({"model": "m", "prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"model": "m", "prompt": "x", "priority": "urgent"}, "priority"),
    ],
)
def test_refusals_name_the_field(body: dict, param: str) -> None:
    with pytest.raises(APIError) as raised:
        parse_completion(body, max_choices=16)
    assert raised.value.status == 400 and raised.value.param == param


def test_full_response_counts_each_prompt_once_and_maps_finish_reasons() -> None:
    plan = parse_completion({"model": "m", "prompt": ["p1", "p2"], "n": 2}, 16)
    completions = []
    for i in range(4):
        completion = Completion(f"{i}", text=f"t{i}", finish_reason=["stop", "length", "cancelled", "stop"][i])
        completion.usage = {"prompt_tokens": 10 + i // 2, "completion_tokens": 3}
        completions.append(completion)
    body = full_response(plan, completions)
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length", "abort", "stop"]
    assert body["usage"]["prompt_tokens"] == 21 and body["usage"]["completion_tokens"] == 12
    assert finish_reason(None) == "stop"


def test_echoed_logprobs_recover_the_first_prompt_token() -> None:
    prompt = [[], [5, -0.5, [[5, -0.5, " sky"]], " sky"], [6, -1.0, [], " is"]]
    out = completion_logprobs([[7, -0.1, [[7, -0.1, " blue"]], " blue"]], 0, prompt, "The sky is")
    assert out["tokens"] == ["The", " sky", " is", " blue"]
    assert out["token_logprobs"] == [None, -0.5, -1.0, -0.1] and out["text_offset"] == [0, 3, 7, 10]
    assert completion_logprobs([[9, -2.0, [[9, -2.0]]]], 4)["tokens"] == ["token_id:9"]  # no tokenizer


def test_replay_after_restart_sends_only_what_is_new() -> None:
    replay = Replay()
    assert replay.fresh("Hello", 1) == ("Hello", 1) and replay.fresh(" wor", 1) == (" wor", 1)
    replay.restart()
    assert replay.fresh("Hel", 1) == ("", 0)  # regenerated, already shown
    assert replay.fresh("lo wor", 1) == ("", 0)
    assert replay.fresh("ld", 1) == ("ld", 1)
    replay.restart()
    assert replay.fresh("Help", 1) is None  # a different continuation cannot be taken back


def test_the_producer_side_imports_no_torch() -> None:
    """The producer checks constraints with the engine's torch-free spec module (so both sides refuse the same
    things) and loads nothing else of the engine (engine.omp, two stdlib imports, comes with the package): no torch,
    transformers or numpy."""
    code = (
        "import sys, producer.gateway.app, producer.batch.cli, producer.celery_app, producer.maintenance; "
        "heavy = {'torch', 'transformers', 'numpy'} & {m.split('.')[0] for m in sys.modules}; "
        "engine = {m for m in sys.modules if m.split('.')[0] == 'engine'}; "
        "allowed = {'engine', 'engine.omp', 'engine.config', 'engine.structured', 'engine.structured.spec'}; "
        "assert not heavy and engine <= allowed, (heavy, engine - allowed)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
