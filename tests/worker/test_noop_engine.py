"""NoopEngine honours the engine contract the worker relies on."""

from __future__ import annotations

import pytest

from engine.config import SamplingParams
from worker.noop_engine import NoopEngine


def test_one_token_per_request_per_step_until_max_tokens() -> None:
    engine = NoopEngine(max_num_seqs=4)
    engine.add_request("a", "one two", SamplingParams(max_tokens=2))
    engine.add_request("b", [5, 6, 7], SamplingParams(max_tokens=3))
    assert engine.num_free_slots == 2 and engine.has_unfinished()
    first = engine.step()
    assert [(o.request_id, o.new_token_ids, o.finished) for o in first] == [("a", [2], False), ("b", [3], False)]
    second = engine.step()
    assert second[0].finished and second[0].finish_reason == "length" and second[0].text == " x x"
    assert [o.new_token_ids for o in engine.step()] == [[5]]
    assert not engine.has_unfinished() and engine.stats()["generated_tokens"] == 5


def test_abort_and_refusals() -> None:
    engine = NoopEngine()
    engine.add_request("a", "p", SamplingParams(max_tokens=9))
    engine.step()
    aborted = engine.abort("a")
    assert aborted is not None and aborted.finish_reason == "abort" and engine.abort("a") is None
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("b", "")
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("c", [-1])
