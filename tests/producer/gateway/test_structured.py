"""Structured outputs and tool calls through the gateway with the openai SDK, on a tiny random model.

The model's tokens are random; under a grammar they are random but always valid, which is what is checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
import redis
from pydantic import BaseModel, Field

from producer.client import Client
from producer.errors import ProtocolError
from producer.protocol import Keys
from tests.stack_helpers import Stack, start_stack

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 6}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}


class Answer(BaseModel):
    colour: Literal["red", "green", "blue"]
    score: int = Field(ge=0, le=9)
    word: str = Field(max_length=8)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("structured-stack"), model_dir=tiny_llama)
    yield running
    running.close()


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        **{"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 120, **kwargs}
    )


def test_parse_returns_a_validated_pydantic_object(client: openai.OpenAI) -> None:
    result = client.chat.completions.parse(
        model="tiny", messages=MESSAGES, response_format=Answer, temperature=0, max_tokens=120
    )
    choice = result.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Answer)
    assert Answer.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_json_object_with_logit_bias_returns_parseable_json(client: openai.OpenAI, tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    # any JSON object may go on forever on a random model: a bias towards closing braces (applied before the
    # grammar's mask) ends it, so both fields are exercised
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    closing = {str(i): 100 for i in range(tokenizer.vocab_size) if tokenizer.decode([i]).strip() in ("}", "{}")}
    result = _chat(client, response_format={"type": "json_object"}, logit_bias=closing)
    assert result.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(result.choices[0].message.content), dict)


def _check_calls(message: Any, names: set[str]) -> list[tuple[str, str]]:
    assert message.content is None and message.tool_calls
    calls = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        calls.append((call.function.name, call.function.arguments))
    return calls


def _streamed_calls(client: openai.OpenAI, **kwargs: Any) -> tuple[list[tuple[str, str]], str | None]:
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    reason = None
    for chunk in _chat(client, stream=True, **kwargs):
        choice = chunk.choices[0]
        reason = choice.finish_reason or reason
        for delta in choice.delta.tool_calls or []:
            if delta.id is not None:  # the first delta of a call: its id, type and name
                assert delta.type == "function" and delta.index not in names and delta.function.name
                names[delta.index], arguments[delta.index] = delta.function.name, ""
            arguments[delta.index] += delta.function.arguments or ""
    return [(names[i], arguments[i]) for i in sorted(names)], reason


def test_required_tool_choice_calls_a_tool_and_streams_the_same_call(client: openai.OpenAI) -> None:
    kwargs = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "seed": 1}
    result = _chat(client, **kwargs)
    assert result.choices[0].finish_reason == "tool_calls"
    calls = _check_calls(result.choices[0].message, set(SCHEMAS))
    assert len(calls) == 1
    assert _streamed_calls(client, **kwargs) == (calls, "tool_calls")


def test_a_named_tool_choice_calls_that_tool(client: openai.OpenAI) -> None:
    kwargs = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    result = _chat(client, **kwargs)
    assert result.choices[0].finish_reason == "tool_calls"
    calls = _check_calls(result.choices[0].message, {"get_time"})
    assert len(calls) == 1
    assert _streamed_calls(client, **kwargs) == (calls, "tool_calls")


def test_auto_parses_hermes_tool_calls_and_leaves_other_text_as_content(client: openai.OpenAI) -> None:
    # A random model never writes <tool_call> of its own: a regex makes it write one after some words.
    call = (
        r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-7]\}\}\n</tool_call>'
    )
    forced = {"structured_outputs": {"regex": r"[a-z]{1,6}\n" + call}}
    result = _chat(client, tools=TOOLS, extra_body=forced)
    message = result.choices[0].message
    assert result.choices[0].finish_reason == "tool_calls"
    calls = _check_calls(message.model_copy(update={"content": None}), {"get_weather"})
    assert message.content and message.content.isalpha()
    names: dict[int, str] = {}
    content, arguments = "", ""
    for chunk in _chat(client, tools=TOOLS, extra_body=forced, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            names.setdefault(piece.index, piece.function.name or "")
            arguments += piece.function.arguments or ""
    assert content == message.content and [(names[0], arguments)] == calls
    plain = _chat(client, tools=TOOLS, max_tokens=8)  # no call in the text: content as generated
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


BAD_BODIES = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},)
    + ("response_format.json_schema.schema",),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"uniqueItems": True}}}},)
    + ("response_format.json_schema.schema",),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"lark": "start: /a/"}}, "structured_outputs"),
    ({"guided_regex": "(?=a)b"}, "guided_regex"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"parameters": WEATHER}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"format": "nope"}}}]},)
    + ("tools",),  # auto renders it as it is; a required choice compiles it and refuses the unknown format
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
]


@pytest.mark.parametrize(("extra", "param"), BAD_BODIES)
def test_bad_constraints_and_tools_are_400s_naming_the_param_and_queue_nothing(
    stack: Stack, extra: dict[str, Any], param: str
) -> None:
    if param == "tools" and "tool_choice" not in extra:
        extra = {**extra, "tool_choice": "required"}
    body = {"model": "tiny", "messages": MESSAGES, **extra}
    response = httpx.post(f"{stack.gateway.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    queues = redis.Redis.from_url(stack.redis.url)
    assert sum(queues.xlen(k) for k in Keys("tiny").queues) == 0


@pytest.mark.parametrize(
    "params",
    [
        {"structured_outputs": {"json": {"type": "nonsense"}}},
        {"structured_outputs": {"regex": "(?<=a)b"}},
        {"logit_bias": {5: 101}},
        {"logit_bias": {"x": 1}},
    ],
)
def test_client_submit_refuses_bad_constraints_before_queueing(stack: Stack, params: dict[str, Any]) -> None:
    client = Client(stack.redis.url, model="tiny")
    with pytest.raises(ProtocolError) as raised:
        client.submit("hi", max_tokens=4, **params)
    assert isinstance(raised.value, ValueError) and next(iter(params)) in str(raised.value)
    assert sum(client.redis.xlen(k) for k in Keys("tiny").queues) == 0
    assert client.result(client.submit("hi", max_tokens=4, logit_bias={5: 3})).finish_reason  # int keys are fine
