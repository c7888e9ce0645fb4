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
