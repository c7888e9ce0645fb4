"""The Lua argument tables and the scripts built from them agree, and callers must pass every name."""

from __future__ import annotations

import re

import pytest
import redis

from producer import scripts as producer_scripts
from producer.lua import Argv
from producer.protocol import ErrorCode, FinishReason, Keys, Priority, Request, done_event, new_request_id
from worker import scripts as worker_scripts

SCRIPTS = {
    "ADMIT": (worker_scripts.ADMIT_ARGV, worker_scripts.ADMIT),
    "PUBLISH": (worker_scripts.PUBLISH_ARGV, worker_scripts.PUBLISH),
    "HEARTBEAT": (worker_scripts.HEARTBEAT_ARGV, worker_scripts.HEARTBEAT),
    "HAND_BACK": (worker_scripts.HAND_BACK_ARGV, worker_scripts.HAND_BACK),
    "SUBMIT": (producer_scripts.SUBMIT_ARGV, producer_scripts.SUBMIT),
    "CANCEL": (producer_scripts.CANCEL_ARGV, producer_scripts.CANCEL),
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_script_reads_its_named_arguments_in_table_order_and_no_other_fixed_position(name: str) -> None:
    argv, text = SCRIPTS[name]
    header = re.findall(r"^local (\w+) = (?:tonumber\()?ARGV\[(\d+)\]\)?$", text, flags=re.M)
    assert header == [(n, str(i)) for i, n in enumerate(argv.names, 1)]
    body = text.split("\n", len(argv.names))[-1]
    assert not re.search(r"ARGV\[\s*\d+\s*\]", body)  # repeated groups start at the table's tail
    assert "$" not in text  # every placeholder was filled
    for arg in argv.names:
        assert re.search(rf"\b{arg}\b", body), f"{name} never uses {arg}"


def test_what_lua_writes_comes_from_the_enums() -> None:
    assert f"'reason', '{ErrorCode.INVALID_REQUEST}'" in worker_scripts.ADMIT
    assert f"'reason', '{ErrorCode.MAX_DELIVERIES}'" in worker_scripts.ADMIT
    cancelled = f"'{FinishReason.CANCELLED}'"
    assert cancelled in worker_scripts.ADMIT and cancelled in producer_scripts.CANCEL
    names = "{" + ", ".join(f"'{p}'" for p in sorted(Priority, key=lambda p: p.rank)) + "}"
    assert f"local prio_names = {names}" in worker_scripts.ADMIT and names in producer_scripts.SUBMIT


def test_building_arguments_needs_every_name_once_and_no_other() -> None:
    argv = worker_scripts.HAND_BACK_ARGV
    assert argv.args("id", 1, group="g", consumer="c", req_prefix="p") == ["g", "c", "p", "id", 1]
    with pytest.raises(TypeError, match=r"missing \['req_prefix'\]"):
        argv.args(group="g", consumer="c")
    with pytest.raises(TypeError, match=r"unknown \['ttl'\]"):
        argv.args(group="g", consumer="c", req_prefix="p", ttl=5)


def test_a_table_and_a_script_that_disagree_are_refused() -> None:
    argv = Argv(("first", "second"))
    with pytest.raises(ValueError, match="never uses"):
        argv.script("return first")
    with pytest.raises(ValueError, match="by position"):
        argv.script("return {first, second, ARGV[2]}")
    with pytest.raises(ValueError, match="repeat"):
        Argv(("a", "a"))
    with pytest.raises(ValueError, match="not among the names"):
        Argv(("a",), numbers=frozenset({"b"}))


def test_the_generated_header_reads_what_the_caller_built(redis_url: str) -> None:
    argv = Argv(("word", "count"), numbers=frozenset({"count"}))
    script = argv.script("return {word, count + 1, #ARGV - $named, ARGV[$tail]}")
    client = redis.Redis.from_url(redis_url)
    assert client.eval(script, 0, *argv.args("extra", word="hi", count=41)) == [b"hi", 42, 1, b"extra"]


def test_submit_and_cancel_arguments_are_built_by_name(redis_url: str) -> None:
    keys = Keys("lua-test")
    request = Request(new_request_id(), "lua-test", prompt="hi", priority=Priority.LOW)
    args = producer_scripts.submit_args([request], max_depth=0, ttl_s=60)
    assert args[:3] == [0, 60, "workers"] and args[3:5] == [request.request_id, 3]
    client = redis.Redis.from_url(redis_url)
    submit = client.register_script(producer_scripts.SUBMIT)
    [[verdict, _entry]] = submit(keys=producer_scripts.submit_keys(keys, [request]), args=args)
    assert verdict == b"ok" and client.hget(keys.request(request.request_id), "prio") == b"low"
    cancel = client.register_script(producer_scripts.CANCEL)
    event = done_event(FinishReason.CANCELLED, {})
    reply = cancel(
        keys=producer_scripts.cancel_keys(keys, request.request_id),
        args=producer_scripts.cancel_args(keys, request.request_id, event, 60),
    )
    assert reply == b"cancelled" and client.xlen(keys.queue(Priority.LOW)) == 0
