"""Redis that forgets what it acknowledged: every client still ends with exactly the right tokens.

A Redis restarted from an AOF that lagged (appendfsync everysec with a slow disk) or a failover to a
replica that had not caught up comes back with an older copy of the data: claims, published deltas
and their sequence numbers can be gone after a client has already read them. Here the rollback is
exact and repeatable: SAVE a snapshot, let work go on, SIGKILL, restart from the snapshot.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from producer.client import Client
from producer.errors import RequestFailed
from producer.protocol import EventType, Keys
from producer.results import Completion
from tests.queue_helpers import WorkerThread, read_events, terminal_count, wait_for
from worker.noop_engine import NoopEngine
from worker.redis_server import RedisServer

pytestmark = pytest.mark.slow
KEYS = Keys("noop")
MAX_TOKENS = 200
EXPECTED = [2 + i for i in range(MAX_TOKENS)]  # the no-op engine's answer to a two-word prompt


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as server:  # no AOF: a restart loads the last SAVE, nothing after it
        yield server


def _tokens_written(client: redis.Redis, request_id: str) -> int:
    return sum(len(e.token_ids) for e in read_events(client, KEYS, request_id) if e.type is EventType.DELTA)


class LiveReader:
    """A client that has been reading the result stream since before the rollback, and rides it out."""

    def __init__(self, url: str, request_id: str) -> None:
        self.client = Client(url, model="noop", reconnect_s=60.0)
        self.request_id = request_id
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.completion = self.client.result(self.request_id, timeout=120)
        except BaseException as exc:  # noqa: BLE001 -- reported by the test
            self.error = exc

    def join(self) -> Completion:
        self._thread.join(150)
        assert self.error is None, self.error
        assert self.completion is not None
        return self.completion


def _roll_back(server: RedisServer, before: int, request_id: str, check: redis.Redis) -> None:
    """Waits until `before` more tokens are published after the snapshot, then restarts Redis from it."""
    check.execute_command("SAVE")
    at_save = _tokens_written(check, request_id)
    wait_for(lambda: _tokens_written(check, request_id) >= at_save + before, 30, what="tokens after the snapshot")
    server.kill()
    server.start(timeout=30)


def _assert_exact(check: redis.Redis, request_id: str, live: Completion) -> None:
    events = read_events(check, KEYS, request_id)
    folded = Completion(request_id)
    for event in events:
        folded.apply(event)
    assert folded.token_ids == EXPECTED  # what a client reading the stream from the start gets
    assert live.token_ids == EXPECTED  # what the client that saw the forgotten deltas ended with
    assert terminal_count(events) == 1 and events[-1].type is EventType.DONE
    assert any(e.type is EventType.RESTART for e in events)


def test_deltas_redis_forgot_make_the_request_start_over(server: RedisServer) -> None:
    check = redis.Redis.from_url(server.url)
    with WorkerThread(NoopEngine(step_delay_s=0.01), server.url, model_name="noop") as worker:
        request_id = Client(server.url, model="noop").submit("a b", max_tokens=MAX_TOKENS)
        live = LiveReader(server.url, request_id)
        wait_for(lambda: _tokens_written(check, request_id) >= 10, 30, what="the request to stream")
        _roll_back(server, 40, request_id, check)  # the claim survives; the last 40+ tokens do not
        completion = live.join()
        assert worker.worker.relay.rollbacks >= 1
    _assert_exact(check, request_id, completion)


def test_a_claim_redis_forgot_starts_the_request_over(server: RedisServer) -> None:
    check = redis.Redis.from_url(server.url)
    request_id = Client(server.url, model="noop").submit("a b", max_tokens=MAX_TOKENS)
    check.execute_command("SAVE")  # the request queued, not yet claimed
    live = LiveReader(server.url, request_id)
    with WorkerThread(NoopEngine(step_delay_s=0.01), server.url, model_name="noop") as worker:
        wait_for(lambda: _tokens_written(check, request_id) >= 40, 30, what="the request to stream")
        server.kill()
        server.start(timeout=30)
        completion = live.join()
        assert worker.worker.relay.rollbacks >= 1
    _assert_exact(check, request_id, completion)


def test_two_claims_under_one_epoch_are_both_fenced_out(server: RedisServer) -> None:
    """After a rollback another worker can claim a request again under the epoch the first still holds;
    the claim record then names an owner other than the worker publishing, and neither may write on."""
    check = redis.Redis.from_url(server.url)
    with WorkerThread(NoopEngine(step_delay_s=0.01), server.url, model_name="noop") as worker:
        request_id = Client(server.url, model="noop").submit("a b", max_tokens=MAX_TOKENS)
        live = LiveReader(server.url, request_id)
        wait_for(lambda: _tokens_written(check, request_id) >= 20, 30, what="the request to stream")
        check.hset(KEYS.request(request_id), "worker", "someone-else")  # as that second claim leaves it
        completion = live.join()
        assert worker.worker.relay.rollbacks >= 1
    _assert_exact(check, request_id, completion)
    assert int(check.hget(KEYS.request(request_id), "epoch")) == 2  # one re-run, not a dead letter's worth


def test_a_submit_redis_forgot_is_reported_to_whoever_waits_for_it(server: RedisServer) -> None:
    """The one loss no worker can repair: Redis acknowledged the submit, then came back without it. The
    producer cannot get it back, but a client waiting on it is told, rather than waiting forever."""
    check = redis.Redis.from_url(server.url)
    client = Client(server.url, model="noop", reconnect_s=60.0)
    check.execute_command("SAVE")
    request_id = client.submit("a b", max_tokens=2)  # acknowledged after the snapshot
    server.kill()
    server.start(timeout=30)
    with pytest.raises(RequestFailed) as info:
        client.result(request_id, timeout=60)
    assert info.value.code == "unknown_request"
