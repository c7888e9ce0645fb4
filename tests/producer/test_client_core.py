"""The client core without Redis: each operation is driven by hand, the replies are what Redis would say."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from producer.client import ClientConfig
from producer.client_commands import Exists, Read, RunScript, RunScripts, Sleep
from producer.client_core import IDLE_POLL_S, MAX_KEYS_PER_READ, READ_BLOCK_MS, SCRIPTS, ClientCore
from producer.errors import QueueFull, RequestFailed
from producer.protocol import (
    EVENT_FIELD,
    ErrorCode,
    Event,
    FinishReason,
    Keys,
    decode_event,
    delta_event,
    done_event,
)
from producer.results import CancelOutcome
from producer.scripts import CANCEL, SUBMIT


def _core(**settings: Any) -> ClientCore:
    return ClientCore(ClientConfig(model="noop", **settings))


def _entry(entry_id: str, event: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    return entry_id.encode(), {EVENT_FIELD.encode(): event}


def _request_ids(call: RunScript, model: str = "noop") -> list[str]:
    """The ids a submit call enqueues, in order, read off the record keys it touches."""
    prefix = Keys(model).request_prefix
    return [key.removeprefix(prefix) for key in call.keys if key.startswith(prefix)]


def test_submit_retries_a_lost_connection_then_raises_queue_full_with_the_accepted_ids() -> None:
    core = _core(max_queue_depth=5)
    requests = core.requests(["a", "b"], {"max_tokens": 2})
    operation = core.submit(requests)
    send = next(operation)
    assert isinstance(send, RunScript) and send.source == SUBMIT  # one call: no pipeline around it
    assert send.keys == [*Keys("noop").queues, *(Keys("noop").request(r.request_id) for r in requests)]
    operation.fail(redis.ConnectionError("gone"))
    assert isinstance(next(operation), Sleep)
    assert next(operation) == send  # the same ids again: one that got in comes back as a duplicate
    operation.reply([[b"duplicate", b"1-0"], [b"full", b"5"]])
    with pytest.raises(QueueFull) as info:
        next(operation)
    assert info.value.accepted == [requests[0].request_id] and info.value.depth == 5


def test_submits_to_several_partitions_go_out_in_one_pipeline() -> None:
    core = _core(partitions=2)
    requests = core.requests(["a"] * 32, {})  # ids are random: 32 of them land in both partitions
    send = next(core.submit(requests))
    assert isinstance(send, RunScripts) and [call.source for call in send.calls] == [SUBMIT, SUBMIT]
    for request in requests:  # each request's record is written by exactly one of the two calls
        assert sum(any(request.request_id in key for key in call.keys) for call in send.calls) == 1


def test_an_error_that_is_not_a_lost_connection_comes_back_unchanged() -> None:
    operation = _core().submit(_core().requests(["a"], {}))
    next(operation)
    error = redis.ResponseError("NOPERM")
    operation.fail(error)
    with pytest.raises(redis.ResponseError) as info:
        next(operation)
    assert info.value is error


def test_events_yields_each_event_and_resumes_after_the_last_entry_id() -> None:
    core = _core()
    key = Keys("noop").result("r1")
    operation = core.events("r1", None, "0-0", None)
    assert next(operation) == Read({key: "0-0"}, READ_BLOCK_MS)
    operation.reply([(key.encode(), [_entry("1-0", delta_event("he", [1]))])])
    event = next(operation)
    assert isinstance(event, Event) and event.text == "he"
    assert next(operation) == Read({key: "1-0"}, READ_BLOCK_MS)  # data came: no EXISTS asked
    operation.reply([(key.encode(), [_entry("2-0", done_event(FinishReason.STOP, {})), _entry("3-0", b"")])])
    assert next(operation).type.terminal  # type: ignore[union-attr]
    with pytest.raises(StopIteration):
        next(operation)  # the entry after the terminal one is never decoded


def test_events_of_a_request_redis_does_not_know_fails_with_unknown_request() -> None:
    keys = Keys("noop")
    operation = _core().events("r1", None, "0-0", None)
    next(operation)
    operation.reply([])
    assert next(operation) == Exists([keys.request("r1")])
    operation.reply([0])
    assert next(operation) == Exists([keys.result("r1")])  # one key per EXISTS: the ACL grants it per pattern
    operation.reply([0])
    with pytest.raises(RequestFailed) as info:
        next(operation)
    assert info.value.code == ErrorCode.UNKNOWN_REQUEST


def test_events_past_the_deadline_raise_timeout_error() -> None:
    operation = _core().events("r1", None, "0-0", 0.0)
    assert next(operation) == Read({Keys("noop").result("r1"): "0-0"}, 1)
    operation.reply([])
    next(operation)
    operation.reply([1])
    with pytest.raises(TimeoutError):
        next(operation)


def test_cancel_runs_the_cancel_script_with_a_cancelled_done_event() -> None:
    operation = _core().cancel("r1", "other")
    call = next(operation)
    assert isinstance(call, RunScript) and call.source == CANCEL and call.source in SCRIPTS
    assert call.keys[:2] == [Keys("other").request("r1"), Keys("other").result("r1")]
    assert decode_event(call.args[0]).finish_reason == FinishReason.CANCELLED
    operation.reply(b"requested")
    with pytest.raises(StopIteration):
        next(operation)
    assert operation.value is CancelOutcome.REQUESTED


def test_a_submitted_request_is_found_under_its_model_later() -> None:
    core = _core()
    submit = core.submit(core.requests(["a"], {"model": "other"}))
    [request_id] = _request_ids(next(submit), "other")  # type: ignore[arg-type]
    submit.reply([[b"ok", b"1-0"]])
    with pytest.raises(StopIteration):
        next(submit)
    assert submit.value == [request_id]
    assert core.request_keys(request_id, None) == Keys("other")


def test_generate_submits_then_folds_every_result_stream_in_order() -> None:
    keys = Keys("noop")
    operation = _core().generate(["a", "b"], None, {"max_tokens": 1})
    submit = next(operation)
    assert isinstance(submit, RunScript)
    ids = _request_ids(submit)
    operation.reply([[b"ok", b"1-0"], [b"ok", b"2-0"]])
    assert next(operation) == Read({keys.result(i): "0-0" for i in ids}, READ_BLOCK_MS)
    operation.reply(
        [(keys.result(i).encode(), [_entry("5-0", done_event(FinishReason.LENGTH, {}, text=i))]) for i in reversed(ids)]
    )
    with pytest.raises(StopIteration):
        next(operation)
    assert [c.text for c in operation.value] == ids and operation.value[0].finish_reason == FinishReason.LENGTH


def test_wait_all_over_many_streams_reads_chunks_without_blocking_and_pauses_when_idle() -> None:
    ids = [f"r{i}" for i in range(MAX_KEYS_PER_READ + 1)]
    operation = _core().wait_all(ids, None, None)
    chunks = []
    for _ in range(2):
        read = next(operation)
        assert isinstance(read, Read) and read.block is None  # several chunks: none may block the others
        chunks.append(len(read.streams))
        operation.reply([])
    assert chunks == [MAX_KEYS_PER_READ, 1]
    assert next(operation) == Sleep(IDLE_POLL_S)  # nothing anywhere: a short pause, not a busy loop
    first = next(operation)
    operation.fail(redis.TimeoutError("slow"))
    assert isinstance(next(operation), Sleep)
    assert next(operation) == first  # the round starts over after the backoff
