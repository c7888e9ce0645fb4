"""Sampling through the gateway on a real (tiny, random) model: chat template, stop, seed, logprobs, echo."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.stack_helpers import Stack, start_stack

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("tiny-stack"), model_dir=tiny_llama)
    yield running
    running.close()


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_goes_through_the_chat_template(client: openai.OpenAI, tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    result = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_completion_tokens=4,  # type: ignore[arg-type]
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    expected = AutoTokenizer.from_pretrained(tiny_llama).apply_chat_template(MESSAGES, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # newer transformers: an encoding
    assert result.usage is not None and result.usage.prompt_tokens == len(expected)
    assert result.usage.completion_tokens == 4 and result.choices[0].finish_reason == "length"
    assert result.object == "chat.completion" and result.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,  # type: ignore[arg-type]
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == result.choices[0].message.content


def test_stop_strings_and_max_tokens(client: openai.OpenAI) -> None:
    common = {"model": "tiny", "prompt": "Once upon a time", "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = client.completions.create(max_tokens=12, **common).choices[0].text  # type: ignore[arg-type]
    stop = next(full[i : i + 3] for i in range(2, len(full) - 3) if full[i : i + 3].strip())
    stopped = client.completions.create(max_tokens=12, stop=[stop], **common)  # type: ignore[arg-type]
    assert stopped.choices[0].text == full[: full.index(stop)] and stopped.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible_and_n_choices_differ(client: openai.OpenAI) -> None:
    common = {
        "model": "tiny",
        "prompt": "Colours:",
        "max_tokens": 8,
        "temperature": 1.0,
        "top_p": 0.95,
        "extra_body": {"ignore_eos": True},
    }
    first = client.completions.create(seed=1234, **common)  # type: ignore[arg-type]
    second = client.completions.create(seed=1234, **common)  # type: ignore[arg-type]
    assert first.choices[0].text == second.choices[0].text
    two = client.completions.create(seed=1234, n=2, **common)  # type: ignore[arg-type]
    assert two.choices[0].text == first.choices[0].text  # choice i samples with seed + i
    assert two.choices[0].text != two.choices[1].text
    penalised = client.completions.create(seed=1234, presence_penalty=1.5, frequency_penalty=1.5, **common)  # type: ignore[arg-type]
    assert penalised.usage is not None and penalised.usage.completion_tokens == 8


def test_completion_logprobs_and_echo(client: openai.OpenAI) -> None:
    prompt = "The sky is"
    result = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True, extra_body={"ignore_eos": True}
    )
    choice = result.choices[0]
    assert result.usage is not None and choice.text.startswith(prompt)
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == result.usage.prompt_tokens + 3
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])  # type: ignore[operator]
    assert "".join(lp.tokens) == choice.text
    assert all(len(top) >= 2 for top in lp.top_logprobs[-3:])  # type: ignore[arg-type]
    # greedy: the sampled token is the most likely one
    for token, logprob, top in zip(lp.tokens[-3:], lp.token_logprobs[-3:], lp.top_logprobs[-3:], strict=True):
        assert max(top.values()) == pytest.approx(logprob) and token in top  # type: ignore[union-attr]


def test_chat_logprobs_streamed_from_asyncio(stack: Stack) -> None:
    async def scenario() -> list[openai.types.chat.ChatCompletionChunk]:
        client = openai.AsyncOpenAI(base_url=f"{stack.gateway.url}/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=3,  # type: ignore[arg-type]
            logprobs=True,
            top_logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
        await client.close()
        return chunks

    chunks = asyncio.run(scenario())
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert len(entries) == 3 and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 and e.bytes == list(e.token.encode()) for e in entries)
    assert not any(e.token.startswith("token_id:") for e in entries)
