"""Tool-call parsers: whole outputs, and streams that send only differences and reassemble to the whole."""

from __future__ import annotations

from typing import Any

import pytest

from producer.gateway.tool_calls import Call, ToolCallStream, hermes, named, required

HERMES = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>oops</tool_call> <tool'
REQUIRED = '[{"name": "f", "arguments": {"s": "}\\" {", "n": {"x": [1]}}}, {"name": "g", "arguments": {}}]'


def test_hermes_blocks_become_calls_and_the_rest_content() -> None:
    content, calls = hermes(HERMES, True)
    assert calls == [Call("f", '{"a": 1}')]
    assert content == "Sure.\n\n<tool_call>oops</tool_call> <tool"  # a block that is not a call stays text
    assert hermes("no calls here \n", True) == ("no calls here \n", [])
    assert hermes('<tool_call>{"name": "f", "arguments": {}}', True) == ("", [Call("f", "{}")])  # unclosed at end
    assert hermes("a <tool_c", False) == ("a", [])  # what may begin a tag waits


def test_required_reads_the_enforced_array_including_awkward_strings() -> None:
    assert required(REQUIRED, True) == ("", [Call("f", '{"s": "}\\" {", "n": {"x": [1]}}'), Call("g", "{}")])
    assert named("f")('{"a": ', False) == ("", [Call("f", '{"a": ')])


@pytest.mark.parametrize(("parser", "text"), [(hermes, HERMES), (required, REQUIRED), (named("f"), '{"a": [1, 2]}')])
def test_a_stream_fed_character_by_character_reassembles_to_the_whole(parser: Any, text: str) -> None:
    stream = ToolCallStream(parser)
    deltas = [d for ch in text for d in stream.feed(ch)] + stream.feed("", final=True)
    content = "".join(d.get("content", "") for d in deltas)
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for delta in deltas:
        for piece in delta.get("tool_calls", []):
            if "id" in piece:
                assert piece["id"].startswith("call_") and piece["index"] not in names
                names[piece["index"]] = piece["function"]["name"]
            arguments[piece["index"]] = arguments.get(piece["index"], "") + piece["function"]["arguments"]
    whole_content, calls = parser(text, True)
    assert content == whole_content
    assert [Call(names[i], arguments[i]) for i in sorted(names)] == calls and stream.called == bool(calls)
