"""Client against a real redis-server: idempotent submit, admission control, cancel, resume, reconnect."""

from __future__ import annotations

import threading

import pytest
import redis

from producer.client import Client, build_request
from producer.errors import NotReplicated, QueueFull, RequestFailed
from producer.protocol import GROUP, EventType, Keys, Priority
from producer.results import CancelOutcome
from tests.queue_helpers import WorkerThread, read_events
from worker.noop_engine import NoopEngine


def _noop_tokens(prompt_len: int, n: int) -> list[int]:
    return [(prompt_len + i) % 32_000 for i in range(n)]


def test_resubmitting_the_same_id_enqueues_once(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    request_id = client.submit("hello", max_tokens=2)
    assert client.submit("hello", max_tokens=2, request_id=request_id) == request_id
    assert client.redis.xlen(Keys("noop").queue(Priority.NORMAL)) == 1


def test_a_single_submit_is_one_evalsha_without_a_script_exists_round_trip(redis_url: str) -> None:
    client = Client(redis_url, model="noop")

    def calls() -> dict[str, int]:
        stats = client.redis.info("commandstats")
        return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("script|exists", "evalsha")}

    client.submit("warm")  # the first call loads the script
    before = calls()
    for _ in range(10):
        client.submit("hello")
    after = calls()
    assert after["script|exists"] == before["script|exists"]  # a pipeline would have asked before each execute
    assert after["evalsha"] - before["evalsha"] == 10


def test_submit_is_refused_with_queue_full_over_the_configured_depth(redis_url: str) -> None:
    client = Client(redis_url, model="noop", max_queue_depth=3)
    ids = [client.submit("x") for _ in range(2)]
    with pytest.raises(QueueFull) as info:
        client.submit_requests([build_request("noop", "y") for _ in range(3)])
    assert info.value.depth == 3 and info.value.limit == 3 and len(info.value.accepted) == 1
    assert len(set(ids + info.value.accepted)) == 3
    assert sum(client.redis.xlen(k) for k in Keys("noop").queues) == 3


def test_bad_params_are_refused_before_anything_is_sent(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    with pytest.raises(ValueError, match="temperature"):
        client.submit("x", temperature=-1)
    assert not client.redis.keys("*")


def test_cancelling_a_queued_request_finishes_it_without_a_worker(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    request_id = client.submit("x", max_tokens=5)
    assert client.cancel(request_id) is CancelOutcome.CANCELLED
    assert client.result(request_id, timeout=5).finish_reason == "cancelled"
    assert client.cancel(request_id) is CancelOutcome.FINISHED
    assert client.cancel("0" * 32) is CancelOutcome.UNKNOWN
    with WorkerThread(NoopEngine(), redis_url, model_name="noop") as worker:
        later = client.submit("y", max_tokens=2)
        assert client.result(later, timeout=10).token_ids == _noop_tokens(1, 2)
    assert worker.engine.generated_tokens == 2  # the cancelled one never ran
    assert len(read_events(client.redis, Keys("noop"), request_id)) == 1


def test_generate_returns_completions_in_order(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    with WorkerThread(NoopEngine(max_num_seqs=4), redis_url, model_name="noop", max_num_seqs=4):
        prompts = ["a", "a b", "a b c", "a b c d", "e", "f g"]
        streamed = client.generate(prompts, max_tokens=3)
        whole = client.generate(prompts, max_tokens=3, stream=False, metadata={"job": 7})
    for prompt, s, w in zip(prompts, streamed, whole, strict=True):
        n = len(prompt.split())
        assert s.token_ids == w.token_ids == _noop_tokens(n, 3)
        assert s.text == w.text == " x x x" and w.metadata == {"job": 7}
        assert s.usage["completion_tokens"] == 3 and s.usage["prompt_tokens"] == n


def test_a_result_stream_resumes_from_any_entry_id(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    with WorkerThread(NoopEngine(step_delay_s=0.002), redis_url, model_name="noop", publish_interval_s=0.005):
        request_id = client.submit("p", max_tokens=40)
        events = list(client.events(request_id, timeout=20))
    assert events[-1].type is EventType.DONE and len(events) >= 3
    middle = events[len(events) // 2]
    resumed = list(client.events(request_id, after=middle.entry_id, timeout=5))
    assert [e.entry_id for e in resumed] == [e.entry_id for e in events[len(events) // 2 + 1 :]]
    assert sum((e.token_ids for e in events if e.type is EventType.DELTA), []) == _noop_tokens(1, 40)


def test_streaming_survives_dropped_connections(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    admin = redis.Redis.from_url(redis_url)
    with WorkerThread(NoopEngine(step_delay_s=0.01), redis_url, model_name="noop"):
        request_id = client.submit("p q", max_tokens=60)
        tokens, kills = [], 0
        for event in client.stream(request_id, timeout=30):
            tokens += event.token_ids
            if event.type is EventType.DELTA and kills < 2:
                kills += 1
                # every other client's connection: ours and the worker's Redis thread both reconnect
                assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
    assert kills == 2
    assert tokens == _noop_tokens(2, 60)  # nothing lost, nothing twice (publish retries are idempotent)
    assert terminal_events(client, request_id) == 1


def terminal_events(client: Client, request_id: str) -> int:
    return sum(e.type.terminal for e in read_events(client.redis, Keys("noop"), request_id))


def test_result_raises_request_failed_on_an_error_event(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    with WorkerThread(NoopEngine(), redis_url, model_name="noop"):
        request_id = client.submit("x", timeout=-1.0)  # already past its deadline
        with pytest.raises(RequestFailed) as info:
            client.result(request_id, timeout=10)
    assert info.value.code == "deadline"


def test_wait_all_folds_many_streams_at_once(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    with WorkerThread(NoopEngine(max_num_seqs=64), redis_url, model_name="noop"):
        ids = client.submit_requests([build_request("noop", "w " * (i % 5 + 1), max_tokens=2) for i in range(300)])
        results = client.wait_all(ids, timeout=30)
    assert all(results[i].finish_reason == "length" and len(results[i].token_ids) == 2 for i in ids)
    pending = sum(client.redis.xpending(k, GROUP)["pending"] for k in Keys("noop").queues)
    assert pending == 0


def test_stream_times_out_when_nothing_comes(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    request_id = client.submit("x")
    done = threading.Event()
    with pytest.raises(TimeoutError):
        for _ in client.stream(request_id, timeout=0.3):
            done.set()
    assert not done.is_set()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"timeout": [1]}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": 5, "deadline": "soon"}, "deadline"),
        ({"metadata": {"big": 2**70}}, "cannot be encoded"),
        ({"metadata": {1, 2}}, "cannot be encoded"),
        ({"temperature": object()}, "params.temperature"),  # params are checked before encoding
    ],
)
def test_wrong_types_are_value_errors_naming_the_field(kwargs: dict, match: str) -> None:
    """Found by fuzzing build_request: these raised TypeError or OverflowError from inside the client."""
    with pytest.raises(ValueError, match=match):
        build_request("noop", "x", **kwargs)


def test_waiting_for_a_request_redis_does_not_know_is_an_error_not_a_hang(redis_url: str) -> None:
    """An id never submitted (a typo, another model) or whose results expired: nothing will ever arrive,
    so waiting with no timeout would wait forever. The client asks Redis once a read comes back empty."""
    client = Client(redis_url, model="noop")
    unknown = "0" * 32
    with pytest.raises(RequestFailed) as info:
        client.result(unknown, timeout=60)  # a regression shows as TimeoutError here, not as a hang
    assert info.value.code == "unknown_request" and "submit it again" in info.value.message
    with WorkerThread(NoopEngine(), redis_url, model_name="noop"):
        known = client.submit("a b", max_tokens=2)
        done = client.wait_all([known, unknown], timeout=60)
    assert done[known].token_ids == [2, 3] and done[known].error is None
    assert done[unknown].finished and done[unknown].error is not None and done[unknown].error[0] == "unknown_request"
    with pytest.raises(RequestFailed, match="unknown_request"):
        done[unknown].raise_for_error()


def test_durable_submits_without_a_replica_fail_with_not_replicated(redis_url: str) -> None:
    client = Client(redis_url, model="noop", submit_replicas=1, submit_wait_ms=20, reconnect_s=0.3)
    with pytest.raises(NotReplicated, match="0 of 1 replicas"):
        client.submit("x")
    # the submit did reach the master (retries were no-ops there): the id is known, queued once
    assert client.redis.xlen(Keys("noop").queue(Priority.NORMAL)) == 1
