"""Wire protocol: key names, round trips, and defensive decoding of whatever arrives."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.errors import ProtocolError
from producer.protocol import (
    SCHEMA_VERSION,
    EventType,
    Keys,
    Limits,
    Priority,
    Request,
    decode_event,
    decode_request,
    delta_event,
    done_event,
    error_event,
    new_request_id,
    restart_event,
)


def _body(**overrides):  # noqa: ANN003, ANN202
    body = {
        "v": SCHEMA_VERSION,
        "id": "a" * 32,
        "model": "m",
        "prompt": "hi",
        "params": {"max_tokens": 4},
        "stream": True,
        "priority": "normal",
        "deadline": None,
        "submitted_at": 1.0,
        "metadata": None,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def _pack(body) -> bytes:  # noqa: ANN001
    return msgpack.packb(body, use_bin_type=True)


def test_keys_share_one_hash_tag_per_model_under_the_prefix() -> None:
    keys = Keys("SmolLM2-135M-Instruct", prefix="acme")
    per_model = [*keys.queues, keys.request("x"), keys.result("x"), keys.dead, keys.workers]
    assert all(k.startswith("acme:{SmolLM2-135M-Instruct}:") for k in per_model)
    assert keys.queues == [f"acme:{{SmolLM2-135M-Instruct}}:q:{p}" for p in ("high", "normal", "low")]
    assert keys.models == "acme:models"
    with pytest.raises(ValueError, match="model"):
        Keys("bad{tag}")
    with pytest.raises(ValueError, match="prefix"):
        Keys("m", prefix="has space")


def test_request_ids_are_128_random_bits_in_hex() -> None:
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_request_round_trip_keeps_every_field() -> None:
    request = Request(
        new_request_id(),
        "m",
        messages=[{"role": "user", "content": "hé"}],
        params={"max_tokens": 8, "temperature": 0, "stop": "x"},
        stream=False,
        priority=Priority.HIGH,
        deadline=123.5,
        submitted_at=100.0,
        metadata={"k": [1, b"b"]},
    )
    decoded = decode_request(request.encode(), expected_id=request.request_id)
    assert decoded.messages == request.messages and decoded.priority is Priority.HIGH
    assert decoded.params == {"max_tokens": 8, "temperature": 0.0, "stop": ["x"]}
    assert (decoded.stream, decoded.deadline, decoded.metadata) == (False, 123.5, {"k": [1, b"b"]})


def test_unknown_top_level_fields_are_ignored() -> None:
    decoded = decode_request(_pack(_body(future_field={"x": 1})))
    assert decoded.prompt == "hi"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"v": 2}, "schema version 2"),
        ({"v": "1"}, "schema version"),
        ({"id": "A" * 32}, "id"),
        ({"model": 7}, "model"),
        ({"prompt": ...}, "exactly one of"),
        ({"messages": [{"role": "user", "content": "x"}]}, "exactly one of"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": ..., "prompt_token_ids": [1, -2]}, "prompt_token_ids"),
        ({"prompt": ..., "prompt_token_ids": [True]}, "prompt_token_ids"),
        ({"prompt": ..., "messages": [{"role": "user"}]}, "messages"),
        ({"params": {"temperature": math.nan}}, "temperature"),
        ({"params": {"temperature": math.inf}}, "temperature"),
        ({"params": {"max_tokens": -1}}, "max_tokens"),
        ({"params": {"max_tokens": 2**64 - 1}}, "max_tokens"),
        ({"params": {"max_tokens": "8"}}, "max_tokens"),
        ({"params": {"temprature": 0.5}}, "unknown sampling parameter"),
        ({"params": {"logprobs": 21}}, "logprobs"),
        ({"params": {"stop": [""]}}, "stop"),
        ({"params": []}, "params"),
        ({"stream": 1}, "stream"),
        ({"priority": "urgent"}, "priority"),
        ({"deadline": math.nan}, "deadline"),
        ({"metadata": {1: 2}}, "not valid msgpack"),
    ],
)
def test_invalid_fields_are_named_in_the_error(overrides: dict, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_request(_pack(_body(**overrides)))


def test_size_caps_apply_before_unpacking() -> None:
    limits = Limits(max_request_bytes=1_000, max_prompt_chars=100, max_metadata_bytes=50)
    with pytest.raises(ProtocolError, match="over the limit of 1000"):
        decode_request(b"\x00" * 1_001, limits)  # not even msgpack: the size check comes first
    with pytest.raises(ProtocolError, match="prompt"):
        decode_request(_pack(_body(prompt="x" * 101)), limits)
    with pytest.raises(ProtocolError, match="metadata"):
        decode_request(_pack(_body(metadata="y" * 60)), limits)


def test_ext_types_and_timestamps_are_rejected() -> None:
    with pytest.raises(ProtocolError, match="extension type 5"):
        decode_request(_pack(_body(metadata=msgpack.ExtType(5, b"x"))))
    with pytest.raises(ProtocolError, match="metadata"):
        decode_request(_pack(_body(metadata=msgpack.Timestamp(1, 0))))


def test_deep_nesting_is_rejected_not_a_crash() -> None:
    with pytest.raises(ProtocolError):
        decode_request(b"\x81\xa8metadata" + b"\x91" * 100_000 + b"\xc0")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_raise_anything_but_protocol_error(data: bytes) -> None:
    try:
        decode_request(data)
    except ProtocolError as exc:
        assert exc.code in ("invalid_request", "unsupported_version")


_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=8),
)
_value = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "v",
                "id",
                "model",
                "prompt",
                "messages",
                "prompt_token_ids",
                "params",
                "stream",
                "priority",
                "deadline",
                "submitted_at",
                "metadata",
                "extra",
            ]
        ),
        _value,
        max_size=12,
    )
)
def test_random_shapes_decode_or_fail_cleanly(body: dict) -> None:
    try:
        request = decode_request(_pack(body))
    except ProtocolError:
        return
    # whatever passes is well-formed
    assert isinstance(request.params, dict) and request.model
    assert sum(x is not None for x in (request.prompt, request.messages, request.prompt_token_ids)) == 1


def test_events_round_trip() -> None:
    delta = decode_event(delta_event("hé", [1, 2], [[1, -0.5, [[1, -0.5], [3, -1.0]]]]), "5-0")
    assert (delta.type, delta.text, delta.token_ids, delta.entry_id) == (EventType.DELTA, "hé", [1, 2], "5-0")
    assert delta.logprobs == [[1, -0.5, [[1, -0.5], [3, -1.0]]]]
    done = decode_event(
        done_event("length", {"completion_tokens": 2}, metadata={"a": 1}, worker="w", text="ab", token_ids=[1, 2])
    )
    assert (done.type, done.finish_reason, done.metadata, done.full_output, done.text) == (
        EventType.DONE,
        "length",
        {"a": 1},
        True,
        "ab",
    )
    error = decode_event(error_event("deadline", "too late"))
    assert (error.type, error.code, error.message) == (EventType.ERROR, "deadline", "too late")
    assert decode_event(restart_event("w2")).type is EventType.RESTART
    assert EventType.DONE.terminal and EventType.ERROR.terminal and not EventType.RESTART.terminal
