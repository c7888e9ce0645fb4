"""The gateway end to end with the official openai client: real gateway, worker and redis-server processes.

The worker runs the no-op engine (token i of a request is text " x"), so these tests check the HTTP
and queue plumbing; tests/producer/gateway/test_chat.py checks sampling semantics on a real model.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest
import redis

from producer.client import Client
from producer.protocol import Keys
from tests.queue_helpers import read_events, wait_for
from tests.stack_helpers import GatewayProcess, Stack

pytestmark = pytest.mark.slow


def _openai(stack: Stack, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway.url}/v1", api_key="unused", max_retries=0, **kwargs)  # type: ignore[arg-type]


def test_completion_non_streamed_with_n_and_prompt_lists(noop_stack: Stack) -> None:
    client = _openai(noop_stack)
    result = client.completions.create(model="tiny", prompt="a b c", max_tokens=5)
    assert result.object == "text_completion" and result.model == "tiny"
    (choice,) = result.choices
    assert choice.text == " x" * 5 and choice.finish_reason == "length" and choice.index == 0
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (3, 5, 8)

    many = client.completions.create(model="tiny", prompt=["a", "a b"], n=2, max_tokens=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.usage is not None and many.usage.prompt_tokens == 1 + 2  # each prompt counted once
    assert many.usage.completion_tokens == 4 * 2

    tokens = client.completions.create(model="tiny", prompt=[7, 8, 9, 10], max_tokens=1)
    assert tokens.usage is not None and tokens.usage.prompt_tokens == 4


def test_completion_streamed_matches_and_ends_with_done(noop_stack: Stack) -> None:
    client = _openai(noop_stack)
    chunks = list(
        client.completions.create(
            model="tiny", prompt="a b", max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == " x" * 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert len({c.id for c in chunks}) == 1
    with httpx.stream(
        "POST",
        f"{noop_stack.gateway.url}/v1/completions",
        timeout=30,
        json={"model": "tiny", "prompt": "a", "max_tokens": 2, "stream": True},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_streamed_choices_interleave_and_each_finishes(noop_stack: Stack) -> None:
    chunks = list(
        _openai(noop_stack).completions.create(
            model="tiny", prompt=["a", "b c"], n=2, max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
    )
    texts: dict[int, str] = {}
    finished: dict[int, str | None] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert texts == dict.fromkeys(range(4), " x x x") and finished == dict.fromkeys(range(4), "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 1 + 2


def test_async_client_streamed_and_not(noop_stack: Stack) -> None:
    async def scenario() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=f"{noop_stack.gateway.url}/v1", api_key="unused", max_retries=0)
        whole = await client.completions.create(model="tiny", prompt="q", max_tokens=3)
        stream = await client.completions.create(model="tiny", prompt="q", max_tokens=3, stream=True)
        pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
        await client.close()
        return whole.choices[0].text, "".join(pieces)

    whole, streamed = asyncio.run(scenario())
    assert whole == streamed == " x x x"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"five": 1}}, "logit_bias"),
        ({"prompt": "x", "guided_regex": "(?<=a)b"}, "guided_regex"),
        ({"prompt": "x", "suffix": "end"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "frobnicate": True}, "frobnicate"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_unsupported_or_invalid_fields_answer_400_naming_them(noop_stack: Stack, body: dict, param: str) -> None:
    response = httpx.post(f"{noop_stack.gateway.url}/v1/completions", json={"model": "tiny", **body}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]


def test_chat_refusals_and_openai_client_errors(noop_stack: Stack) -> None:
    url = f"{noop_stack.gateway.url}/v1/chat/completions"
    cases = [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
        ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ]
    for extra, param in cases:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}
        response = httpx.post(url, json=body, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (param, response.text)
    assert httpx.post(url, content=b"{not json", timeout=30).status_code == 400
    with pytest.raises(openai.BadRequestError) as raised:
        _openai(noop_stack).completions.create(model="tiny", prompt="x", extra_body={"logit_bias": {"1": 500}})
    assert raised.value.body["param"] == "logit_bias"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        _openai(noop_stack).completions.create(model="no-such-model", prompt="x")


def test_models_health_and_metrics(noop_stack: Stack) -> None:
    client = _openai(noop_stack)
    client.completions.create(model="tiny", prompt="m", max_tokens=1)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].owned_by == "tokenrelay"
    assert client.models.retrieve("tiny").id == "tiny"
    # OpenAI's shape, plus what the workers serve with under a key of our own
    assert models.data[0].model_extra["tokenrelay"] == {"workers": 1, "engine_options": [{"engine": "noop"}]}
    assert httpx.get(f"{noop_stack.gateway.url}/health", timeout=10).json() == {"status": "ok"}
    text = httpx.get(f"{noop_stack.gateway.url}/metrics", timeout=10).text
    assert 'tokenrelay_gateway_requests_total{endpoint="completions",outcome="length"}' in text
    assert 'tokenrelay_queue_depth{model="tiny",priority="normal"}' in text
    assert 'tokenrelay_live_workers{model="tiny"} 1.0' in text
    assert 'tokenrelay_gateway_http_requests_total{path="/v1/completions",status="200"}' in text
    assert "tokenrelay_gateway_ttft_seconds_count" in text


def _running(stack: Stack) -> list[str]:
    client = redis.Redis.from_url(stack.redis.url)
    keys = Keys("tiny")
    return [
        k.decode() for k in client.scan_iter(match=f"{keys.request_prefix}*") if client.hget(k, "state") == b"running"
    ]


def test_client_disconnect_cancels_streamed_request(noop_stack: Stack) -> None:
    body = {"model": "tiny", "prompt": "long", "max_tokens": 1_000_000, "stream": True}
    with httpx.stream("POST", f"{noop_stack.gateway.url}/v1/completions", json=body, timeout=30) as response:
        (request_id,) = response.headers["x-tokenrelay-request-ids"].split(",")
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: {") for line in got)
    events = wait_for(
        lambda: [
            e
            for e in read_events(redis.Redis.from_url(noop_stack.redis.url), Keys("tiny"), request_id)
            if e.type.terminal
        ],
        30,
        what="cancelled event",
    )
    assert events[0].finish_reason == "cancelled"
    assert events[0].usage is not None and events[0].usage["completion_tokens"] < 1_000_000


def test_client_disconnect_cancels_non_streamed_request(noop_stack: Stack) -> None:
    body = {"model": "tiny", "prompt": "long", "max_tokens": 1_000_000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{noop_stack.gateway.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    wait_for(lambda: not _running(noop_stack), 30, what="no running requests after the client left")
    text = httpx.get(f"{noop_stack.gateway.url}/metrics", timeout=10).text
    assert 'tokenrelay_gateway_requests_total{endpoint="completions",outcome="client_disconnected"}' in text


def test_queue_full_answers_429_with_retry_after(noop_stack: Stack) -> None:
    # a model no worker reads: its backlog only grows (the gateway of this stack allows 50)
    redis.Redis.from_url(noop_stack.redis.url).sadd(Keys("ghost").models, "ghost")
    filler = Client(noop_stack.redis.url, model="ghost", max_queue_depth=0)
    filler.submit_requests([r for r in (_ghost_request(i) for i in range(50))])
    response = httpx.post(
        f"{noop_stack.gateway.url}/v1/completions", json={"model": "ghost", "prompt": "x"}, timeout=30
    )
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):
        _openai(noop_stack).completions.create(model="ghost", prompt="x")


def _ghost_request(i: int):  # noqa: ANN202 - producer.protocol.Request
    from producer.client import build_request

    return build_request("ghost", f"filler {i}", max_tokens=1)


def test_api_keys_from_file_and_environment(noop_stack: Stack, tmp_path: Path) -> None:
    import hashlib

    key_file = tmp_path / "keys"
    key_file.write_text("# gateway keys\nplain-key\nsha256:" + hashlib.sha256(b"hashed-key").hexdigest() + "\n")
    gateway = GatewayProcess(
        noop_stack.redis.url,
        tmp_path / "gateway.log",
        "--api-key-file",
        str(key_file),
        env={"TOKENRELAY_API_KEYS": "env-key-1,env-key-2"},
    )
    try:
        gateway.wait_ready()
        body = {"model": "tiny", "prompt": "k", "max_tokens": 1}
        url = f"{gateway.url}/v1/completions"
        missing = httpx.post(url, json=body, timeout=30)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401
        for key in ("plain-key", "hashed-key", "env-key-2"):
            client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)
            assert client.completions.create(model="tiny", prompt="k", max_tokens=1).choices[0].text == " x"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="nope", max_retries=0).models.list()
        assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200  # probes need no key
    finally:
        gateway.stop()
    lines = [json.loads(line) for line in (tmp_path / "gateway.log").read_text().splitlines() if line.startswith("{")]
    assert not any("plain-key" in json.dumps(line) or "env-key" in json.dumps(line) for line in lines)
