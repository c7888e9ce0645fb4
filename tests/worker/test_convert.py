"""Engine -> wire conversions: finish reasons."""

from __future__ import annotations

import pytest

from engine.request import FinishReason as EngineFinishReason
from producer.protocol import FinishReason
from worker.convert import wire_finish_reason


def test_every_engine_finish_reason_has_a_wire_name() -> None:
    assert wire_finish_reason(EngineFinishReason.STOP) is FinishReason.STOP
    assert wire_finish_reason(EngineFinishReason.LENGTH) is FinishReason.LENGTH
    assert wire_finish_reason(EngineFinishReason.ABORT) is FinishReason.CANCELLED  # only cancels abort
    assert wire_finish_reason(None) is FinishReason.STOP
    done = set(EngineFinishReason) - {EngineFinishReason.ERROR}
    assert {wire_finish_reason(r) for r in done} <= set(FinishReason)
    with pytest.raises(AssertionError):  # an engine error goes out as an error event, never as `done`
        wire_finish_reason(EngineFinishReason.ERROR)


def test_tools_reach_the_chat_template(default_model_dir) -> None:  # noqa: ANN001 - a Path fixture
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from producer.protocol import Request, decode_request, new_request_id
    from worker.convert import build_prompt

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    tokenizer.chat_template = (
        "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    sent = Request(new_request_id(), "tiny", messages=[{"role": "user", "content": "hi"}], tools=[tool])
    request = decode_request(sent.encode(), expected_id=sent.request_id)
    engine = SimpleNamespace(tokenizer=tokenizer)
    assert build_prompt(engine, request) == "<tools>get_weather;</tools>user: hi\n"  # type: ignore[arg-type]
    request.tools = None
    assert build_prompt(engine, request) == "user: hi\n"  # type: ignore[arg-type]
