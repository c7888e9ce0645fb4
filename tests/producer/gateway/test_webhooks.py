"""Webhook delivery end to end: real redis-server, real gateway processes, a real HTTP receiver in this
process; events are put into the outbox as the jobs' scripts put them (producer.webhooks.outbox)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from producer.protocol.keys import JobKeys, Keys
from producer.webhooks.outbox import emit_event, event_id
from producer.webhooks.signing import new_secret
from tests.producer.gateway.webhook_receiver import Delivery, Receiver
from tests.queue_helpers import wait_for
from tests.stack_helpers import GatewayProcess

pytestmark = pytest.mark.slow
SCHEDULE = "0,0.3,0.6,1"
SDK = openai.OpenAI(api_key="x")
JOBS = JobKeys()
StartGateway = Callable[..., GatewayProcess]


def endpoint(name: str, url: str, secret: str | list[str], events: list[str] | None = None) -> dict[str, Any]:
    return {"name": name, "url": url, "secret": secret, **({"events": events} if events else {})}


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.sadd(Keys("tiny").models, "tiny")  # a served model: its outbox streams are watched
    yield client
    client.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def start_gateway(redis_url: str, tmp_path: Path) -> Iterator[StartGateway]:
    started: list[GatewayProcess] = []

    def start(endpoints: list[dict[str, Any]], *extra: str, allow_loopback: bool = True, ready: bool = True):  # noqa: ANN202
        args = ["--webhook-retry-schedule", SCHEDULE, "--webhook-poll-s", "0.05", "--webhook-timeout-s", "5", *extra]
        if allow_loopback:
            args += ["--webhook-allowed-networks", "127.0.0.0/8"]
        env = {"TOKENRELAY_WEBHOOK_ENDPOINTS": json.dumps(endpoints)}  # secrets: never on a command line
        gateway = GatewayProcess(redis_url, tmp_path / f"gateway-{len(started)}.log", *args, env=env)
        started.append(gateway)
        return gateway.wait_ready() if ready else gateway

    yield start
    for gateway in started:
        gateway.stop()


def emit(admin: redis.Redis, job: str, kind: str = "completed", partition: int = 0) -> str:
    emit_event(admin, Keys("tiny", partition=partition).events, job, kind, f"batch.{kind}", 1_700_000_000)
    return event_id(job, kind)


def unwrapped(delivery: Delivery, secret: str) -> Any:
    return SDK.webhooks.unwrap(delivery.body, delivery.headers, secret=secret)


def test_deliveries_are_signed_as_openai_sends_them_filtered_by_type_and_verify_with_either_rotated_secret(
    admin: redis.Redis, receiver: Receiver, start_gateway: StartGateway
) -> None:
    old, new, other = new_secret(), new_secret(), new_secret()
    failed = emit(admin, "batch_2", "failed", partition=0)  # before any gateway ran: delivered all the same
    gateway = start_gateway(
        [
            endpoint("all", receiver.url("/all"), [old, new]),
            endpoint("done", receiver.url("/done"), other, events=["batch.completed"]),
        ],
        "--partitions",
        "2",
    )
    completed = emit(admin, "batch_1", "completed", partition=1)
    deliveries = receiver.wait("/all", 2)
    assert sorted(d.headers["webhook-id"] for d in deliveries) == sorted([completed, failed])
    for delivery in deliveries:
        assert len(delivery.headers["webhook-signature"].split()) == 2  # one signature per secret
        for secret in (old, new):
            event = unwrapped(delivery, secret)
            assert event.id == delivery.headers["webhook-id"]
        assert json.loads(delivery.body) == {
            "id": event.id,
            "object": "event",
            "type": event.type,
            "created_at": 1_700_000_000,
            "data": {"id": event.data.id},
        }
        with pytest.raises(openai.InvalidWebhookSignatureError):
            unwrapped(delivery, other)
    by_id = {d.headers["webhook-id"]: unwrapped(d, old) for d in deliveries}
    assert (by_id[completed].type, by_id[completed].data.id) == ("batch.completed", "batch_1")
    assert (by_id[failed].type, by_id[failed].data.id) == ("batch.failed", "batch_2")
    (done,) = receiver.wait("/done", 1)
    assert unwrapped(done, other).id == completed
    # the filtered-out event was acked without a request: nothing is left for either endpoint
    wait_for(lambda: all(_pending(admin, "done", p) == 0 for p in (0, 1)), 30, what="done's entries acked")
    assert len(receiver.deliveries("/done")) == 1
    log = gateway.log_path.read_text()
    assert all(s.removeprefix("whsec_") not in log for s in (old, new, other))
    assert '"webhook_endpoints": "***"' in log


def _pending(admin: redis.Redis, name: str, partition: int = 0) -> int:
    return int(admin.xpending(Keys("tiny", partition=partition).events, f"hook:{name}")["pending"])


def test_a_failing_or_absent_receiver_gets_the_event_later_with_the_same_webhook_id(
    admin: redis.Redis, receiver: Receiver, start_gateway: StartGateway
) -> None:
    secret = new_secret()
    receiver.script("/flaky", 500, 503)
    absent = Receiver()  # its port is reserved, nothing listens on it yet
    hooks = [endpoint("flaky", receiver.url("/flaky"), secret), endpoint("absent", absent.url("/a"), secret)]
    start_gateway(hooks, "--webhook-retry-schedule", f"{SCHEDULE},2,4")  # seconds to spare for the listener
    sent = emit(admin, "batch_3")
    attempts = receiver.wait("/flaky", 3)
    assert [d.status for d in attempts] == [500, 503, 200]
    assert {d.headers["webhook-id"] for d in attempts} == {sent}
    assert {d.body for d in attempts} == {attempts[0].body}
    assert all(unwrapped(d, secret).id == sent for d in attempts)
    # the absent receiver's first attempts failed to connect; once it listens, a later attempt lands
    wait_for(lambda: _times_delivered(admin, "absent") >= 2, 30, what="two failed attempts to the absent receiver")
    absent.start()
    try:
        (late,) = absent.wait("/a", 1)
        assert late.headers["webhook-id"] == sent and unwrapped(late, secret).id == sent
    finally:
        absent.stop()
    wait_for(lambda: _pending(admin, "absent") == 0 and _pending(admin, "flaky") == 0, 30, what="both acked")


def _times_delivered(admin: redis.Redis, name: str) -> int:
    rows = admin.xpending_range(Keys("tiny").events, f"hook:{name}", "-", "+", 10)
    return max((int(r["times_delivered"]) for r in rows), default=0)


def test_a_410_disables_the_endpoint_for_every_replica_and_spares_the_others(
    admin: redis.Redis, receiver: Receiver, start_gateway: StartGateway
) -> None:
    secret = new_secret()
    receiver.script("/gone", 410)
    receiver.script("/ok", 500)  # its first attempt fails: its retry shows the retry sweep ran past gone's due time
    gateway = start_gateway(
        [endpoint("gone", receiver.url("/gone"), secret), endpoint("ok", receiver.url("/ok"), secret)]
    )
    first = emit(admin, "batch_4")
    (gone,) = receiver.wait("/gone", 1)
    assert gone.headers["webhook-id"] == first
    wait_for(lambda: admin.hget(JOBS.hooks_disabled, "gone"), 30, what="the disabled flag")
    assert json.loads(admin.hget(JOBS.hooks_disabled, "gone"))["status"] == 410
    receiver.wait("/ok", 2)
    second = emit(admin, "batch_5")
    ok = receiver.wait("/ok", 3)
    assert [d.headers["webhook-id"] for d in ok] == [first, first, second]
    wait_for(lambda: _pending(admin, "ok") == 0, 30, what="ok's entries acked")
    assert len(receiver.deliveries("/gone")) == 1
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'tokenrelay_gateway_webhook_attempts_total{endpoint="gone",outcome="gone"} 1.0' in metrics
    assert 'tokenrelay_gateway_webhook_endpoint_disabled{endpoint="gone"} 1.0' in metrics
    assert "webhook endpoint disabled" in gateway.log_path.read_text()
    # deleting the flag enables it again: the event it answered 410 to, and the one it missed, arrive
    admin.hdel(JOBS.hooks_disabled, "gone")
    _, *later = receiver.wait("/gone", 3)
    assert sorted(d.headers["webhook-id"] for d in later) == sorted([first, second])
    wait_for(lambda: _pending(admin, "gone") == 0, 30, what="gone's entries acked")


def test_a_loopback_destination_is_refused_unless_allowed_and_never_contacted(
    admin: redis.Redis, receiver: Receiver, start_gateway: StartGateway, redis_url: str, tmp_path: Path
) -> None:
    secret = new_secret()
    # a literal loopback address: the configuration itself is refused, with a message naming the endpoint
    literal = json.dumps([endpoint("local", receiver.url("/literal"), secret)])
    refused = subprocess.run(
        [sys.executable, "-m", "worker.cli", "serve", "--redis", redis_url, "--webhook-endpoints", literal],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stderr
    assert "webhook endpoint 'local'" in refused.stderr and "127.0.0.1 is loopback" in refused.stderr
    assert secret not in refused.stderr
    # a name that resolves to loopback: checked at delivery, refused there, never contacted; given up at last
    gateway = start_gateway([endpoint("named", receiver.url("/named", host="localhost"), secret)], allow_loopback=False)
    sent = emit(admin, "batch_6")
    wait_for(lambda: admin.xlen(JOBS.hooks_dead) == 1, 60, what="the refused event given up")
    ((_, dead),) = admin.xrange(JOBS.hooks_dead)
    assert dead[b"id"].decode() == sent and dead[b"endpoint"] == b"named"
    assert b"resolves to 127.0.0.1, which is loopback" in dead[b"last_error"] and dead[b"attempts"] == b"4"
    assert receiver.deliveries("/named") == []
    assert "webhook destination refused" in gateway.log_path.read_text()
    gateway.stop()
    # allowed explicitly, the same endpoint is delivered to
    start_gateway([endpoint("named", receiver.url("/named", host="localhost"), secret)])
    again = emit(admin, "batch_7")
    (delivery,) = receiver.wait("/named", 1)
    assert unwrapped(delivery, secret).id == again


def test_an_attempt_under_way_when_its_gateway_is_killed_is_retried_by_another(
    admin: redis.Redis, receiver: Receiver, start_gateway: StartGateway
) -> None:
    secret = new_secret()
    release = receiver.hold("/slow")
    hooks = [endpoint("slow", receiver.url("/slow"), secret)]
    first = start_gateway(hooks)
    sent = emit(admin, "batch_8")
    receiver.wait("/slow", 1)  # the request is in the receiver's hands, unanswered
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    del receiver.holds["/slow"]
    release.set()
    start_gateway(hooks)
    _, retried = receiver.wait("/slow", 2)
    assert retried.headers["webhook-id"] == sent and unwrapped(retried, secret).id == sent
    wait_for(lambda: _pending(admin, "slow") == 0, 30, what="the retried entry acked")


def test_two_replicas_deliver_each_event_once_when_nothing_fails(
    admin: redis.Redis, receiver: Receiver, start_gateway: StartGateway
) -> None:
    secret = new_secret()
    hooks = [endpoint("app", receiver.url("/app"), secret)]
    start_gateway(hooks)
    start_gateway(hooks)
    sent = {emit(admin, f"batch_{i}") for i in range(40)}
    wait_for(lambda: _settled(admin, "app", len(sent)), 60, what="every event acked")
    delivered = [d.headers["webhook-id"] for d in receiver.deliveries("/app")]
    assert sorted(delivered) == sorted(sent)


def _settled(admin: redis.Redis, name: str, count: int) -> bool:
    """Every entry read by the group and acked: nothing more can be sent."""
    (group,) = [g for g in admin.xinfo_groups(Keys("tiny").events) if g["name"] == f"hook:{name}".encode()]
    return int(group["entries-read"] or 0) == count and int(group["pending"]) == 0


def test_an_endpoint_list_that_is_not_valid_stops_the_gateway_with_a_clear_message(redis_url: str) -> None:
    secret = new_secret()
    cases = {
        "not json": "webhook_endpoints: the setting is not valid JSON",
        json.dumps([endpoint("x", "ftp://example.com/", secret)]): "url: the scheme must be http or https",
        json.dumps([endpoint("x", "https://example.com/", "plain")]): "secret: a webhook secret must start with",
        json.dumps([endpoint("x", "https://exa mple.com/", secret)]): "whitespace",
    }
    for value, message in cases.items():
        env = {**os.environ, "TOKENRELAY_WEBHOOK_ENDPOINTS": value}
        result = subprocess.run(
            [sys.executable, "-m", "worker.cli", "serve", "--redis", redis_url],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and secret not in result.stderr
