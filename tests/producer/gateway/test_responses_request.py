"""Responses API create bodies -> ResponsePlan, and the 400s that name what is not served (no processes)."""

from __future__ import annotations

from typing import Any

import pytest

from producer.gateway.errors import APIError
from producer.gateway.responses_request import parse_response
from producer.gateway.responses_service import seeded


def parse(**body: Any) -> Any:
    return parse_response({"model": "m", "input": "hi", **body}, default_max_tokens=64)


def test_a_string_input_is_one_user_message_and_instructions_lead() -> None:
    plan = parse(instructions="Be brief.", max_output_tokens=7, temperature=0, metadata={"k": "v"})
    assert plan.input == [{"role": "user", "content": "hi"}]
    assert plan.messages([]) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert plan.params == {"max_tokens": 7, "temperature": 0.0}
    assert plan.store and not plan.background and not plan.stream
    assert plan.echo["metadata"] == {"k": "v"} and plan.echo["max_output_tokens"] == 7
    assert parse().params == {"max_tokens": 64}


def test_message_items_with_text_parts_and_earlier_turns() -> None:
    items = [
        {"role": "developer", "content": "rules"},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
        },
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "c"}],
        },
    ]
    plan = parse(input=items, previous_response_id="resp_x")
    assert plan.input == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c"},
    ]
    earlier = [{"role": "user", "content": "0"}, {"role": "assistant", "content": "1"}]
    assert plan.messages(earlier) == [*earlier, *plan.input]
    assert plan.previous_response_id == "resp_x"


def test_text_format_goes_through_the_structured_output_checks() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    plan = parse(text={"format": {"type": "json_schema", "name": "x", "schema": schema, "strict": True}})
    assert plan.params["structured_outputs"] == {"json": schema}
    assert parse(text={"format": {"type": "json_object"}}).params["structured_outputs"] == {"json_object": True}
    assert "structured_outputs" not in parse(text={"format": {"type": "text"}}).params


def test_sampled_requests_are_seeded_and_greedy_ones_are_not() -> None:
    assert "seed" in seeded({"max_tokens": 3})
    assert seeded({"temperature": 0.0}) == {"temperature": 0.0}
    assert seeded({"seed": 5, "temperature": 1.0})["seed"] == 5


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": []}, "input"),
        ({"input": 5}, "input"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"truncation": "auto"}, "truncation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"background": True, "store": False}, "background"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"text": {"format": {"type": "json_schema", "schema": {"type": "nonsense"}}}}, "text.format.schema"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
        ({"instructions": 3}, "instructions"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_refusals_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as raised:
        parse(**body)
    assert raised.value.status == 400 and raised.value.param == param, raised.value.message
    assert param in raised.value.message


def test_model_and_input_are_required() -> None:
    for body, param in (({"input": "x"}, "model"), ({"model": "m"}, "input")):
        with pytest.raises(APIError) as raised:
            parse_response(body, 16)
        assert raised.value.param == param
