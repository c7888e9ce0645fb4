"""Responses API events derived from result-stream entries (no processes): order, numbering, restarts, ends.

Every derived sequence is also validated against the openai SDK's own event models and folded by its
stream accumulator (what `client.responses.stream(...)` runs), so a shape the SDK would refuse fails here.
"""

from __future__ import annotations

from typing import Any, get_args

import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from producer.gateway.responses_events import ResponseEvents, Status, live_status, response_object
from producer.gateway.responses_store import StoredResponse, entry_ms, request_id_of, response_id
from producer.protocol import ErrorCode, Event, EventType, FinishReason, JobKeys, Keys
from producer.results import Completion

# each event type's own SDK model (the union has no discriminator to validate by)
MODELS = {get_args(cls.model_fields["type"].annotation)[0]: cls for cls in get_args(get_args(ResponseStreamEvent)[0])}
RID = "ab" * 16


def record(background: bool = True) -> StoredResponse:
    return StoredResponse(RID, "tiny", 1_700_000_000, background, echo={"metadata": {}, "store": True})


def delta(text: str, at: int) -> Event:
    return Event(EventType.DELTA, f"1700000000{at:03d}-0", text=text, token_ids=[1] * max(1, len(text) // 2))


def done(reason: FinishReason = FinishReason.STOP, at: int = 999) -> Event:
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "cached_tokens": 2}
    return Event(EventType.DONE, f"1700000001{at:03d}-0", finish_reason=reason, usage=usage)


def restart(at: int) -> Event:
    return Event(EventType.RESTART, f"1700000000{at:03d}-1")


def derive(entries: list[Event], background: bool = True) -> list[dict[str, Any]]:
    derived = ResponseEvents(record(background))
    out = derived.opening()
    for entry in entries:
        out += derived.feed(entry)
    return out


def through_sdk(events: list[dict[str, Any]]) -> ResponseStreamState[Any]:
    """The events as the SDK parses and folds them; raises where it would."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for event in events:
        state.handle_event(MODELS[event["type"]].model_validate(event))
    return state


def deltas(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def test_a_completed_background_response_in_openai_order() -> None:
    events = derive([delta("Hel", 1), delta("lo", 2), done()])
    assert [e["type"] for e in events] == [
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "queued" and events[2]["response"]["status"] == "in_progress"
    final = events[-1]["response"]
    assert final["id"] == "resp_" + RID and final["status"] == "completed" and final["completed_at"] == 1_700_000_001
    assert final["output"][0]["content"][0]["text"] == "Hello" == deltas(events)
    assert final["usage"] == {
        "input_tokens": 5,
        "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 8,
    }
    state = through_sdk(events)
    assert state._completed_response is not None and state._completed_response.output_text == "Hello"


def test_the_sequence_is_a_pure_function_of_the_entries() -> None:
    entries = [delta("a", 1), delta("b", 2), restart(3), delta("ab", 4), delta("c", 5), done()]
    assert derive(entries) == derive(entries)


def test_a_foreground_response_opens_in_progress_without_queued() -> None:
    events = derive([delta("x", 1), done()], background=False)
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["status"] == "in_progress"
    through_sdk(events)


def test_a_restart_that_regenerates_the_same_text_is_invisible() -> None:
    entries = [delta("Hel", 1), restart(2), delta("He", 3), delta("llo w", 4), delta("orld", 5), done()]
    events = derive(entries)
    assert deltas(events) == "Hello world" and not [e for e in events if e["type"] == "error"]
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Hel", "lo w", "orld"]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hello world"
    through_sdk(events)


def test_a_restart_that_diverges_is_an_error_event_and_the_end_holds_the_text_generated() -> None:
    events = derive([delta("Hel", 1), restart(2), delta("Xy", 3), delta("z", 4), done()])
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "restart_diverged"
    assert deltas(events) == "Hel"  # nothing after the divergence
    text_done = next(e for e in events if e["type"] == "response.output_text.done")
    assert text_done["text"] == "Xyz" and events[-1]["type"] == "response.completed"
    state = through_sdk(events)
    assert state._completed_response is not None and state._completed_response.output_text == "Xyz"


def test_a_restarted_attempt_that_ends_short_of_the_text_sent_is_a_divergence() -> None:
    events = derive([delta("Hello", 1), restart(2), delta("He", 3), done()])
    assert [e["code"] for e in events if e["type"] == "error"] == ["restart_diverged"]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "He"


def test_cut_short_is_incomplete_and_cancelled_ends_with_status_cancelled() -> None:
    events = derive([delta("abc", 1), done(FinishReason.LENGTH)])
    final = events[-1]
    assert final["type"] == "response.incomplete" and final["response"]["status"] == "incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"
    through_sdk(events)
    cancelled = derive([delta("ab", 1), done(FinishReason.CANCELLED)])
    assert cancelled[-1]["type"] == "response.incomplete" and cancelled[-1]["response"]["status"] == "cancelled"
    assert cancelled[-1]["response"]["output"][0]["status"] == "incomplete"
    through_sdk(cancelled)
    queued_then_cancelled = derive([done(FinishReason.CANCELLED)])
    assert queued_then_cancelled[-1]["response"]["output"] == []
    assert "response.output_item.added" not in [e["type"] for e in queued_then_cancelled]


def test_an_error_event_fails_the_response() -> None:
    failure = Event(EventType.ERROR, "1700000000500-0", code=ErrorCode.INVALID_REQUEST, message="too long")
    events = derive([failure])
    assert [e["type"] for e in events] == [
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.failed",
    ]
    final = events[-1]["response"]
    assert final["status"] == "failed" and final["output"] == []
    assert final["error"] == {"code": "invalid_prompt", "message": "[invalid_request] too long"}
    through_sdk(events)
    midway = derive(
        [delta("ab", 1), Event(EventType.ERROR, "1700000000600-0", code=ErrorCode.DEADLINE, message="late")]
    )
    assert midway[-1]["response"]["error"]["code"] == "server_error"
    assert midway[-2]["type"] == "response.output_item.done" and midway[-2]["item"]["status"] == "incomplete"
    through_sdk(midway)


def test_an_empty_completion_still_has_its_message() -> None:
    events = derive([done()])
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == ""
    assert through_sdk(events)._completed_response is not None


@pytest.mark.parametrize(
    ("state", "text", "cancelled", "status"),
    [
        ("queued", "", False, Status.QUEUED),
        ("running", "", False, Status.IN_PROGRESS),
        ("running", "ab", True, Status.CANCELLED),
        (None, "ab", False, Status.IN_PROGRESS),
    ],
)
def test_live_status(state: str | None, text: str, cancelled: bool, status: Status) -> None:
    completion = Completion(RID, text=text)
    assert live_status(completion, state, cancelled) is status


def test_a_response_in_progress_shows_its_text_so_far() -> None:
    shown = response_object(record(), Status.IN_PROGRESS, Completion(RID, text="par"))
    assert shown["output"][0]["status"] == "in_progress" and shown["usage"] is None
    assert shown["completed_at"] is None and shown["object"] == "response"


def test_ids() -> None:
    assert request_id_of(response_id(RID)) == RID
    assert request_id_of("resp_" + "A" * 32) is None and request_id_of(RID) is None and request_id_of("resp_x") is None
    assert entry_ms("1700000000123-4") == 1_700_000_000_123


def test_a_record_lives_in_its_requests_slot_and_the_locator_names_no_model() -> None:
    keys = Keys("tiny", prefix="acme").for_request("f" * 32, 3)
    slot = keys.request("f" * 32).partition("}")[0]
    assert keys.response("f" * 32) == keys.response_prefix + "f" * 32 and keys.response("f" * 32).startswith(slot + "}")
    assert JobKeys("acme").response_model("f" * 32) == "acme:responses:" + "f" * 32
