"""compose/redis.conf against a real redis-server: every role can do its job through the real code paths,
and nothing else (no reading others' prompts, no deleting, no admin commands)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis

from producer.client import Client
from producer.errors import RequestFailed
from producer.protocol import GROUP, Keys, Priority
from tests.compose.conftest import ROOT, ACLServer
from tests.queue_helpers import run_maintenance, wait_for
from tests.stack_helpers import GatewayProcess, celery_client, celery_worker, noop_worker

pytestmark = pytest.mark.slow
KEYS = Keys("tiny")


def _denied(action) -> None:  # noqa: ANN001
    with pytest.raises(redis.RedisError, match="NOPERM|can't|no permissions|permission"):
        action()


def test_no_anonymous_access_and_durable_settings(acl_server: ACLServer) -> None:
    anonymous = redis.Redis(port=acl_server.port)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError):  # the admin password came from the environment
        redis.Redis(port=acl_server.port, username="admin", password="admin-dev").ping()
    with pytest.raises(redis.AuthenticationError):  # a lone Redis has no replicas: their user is off
        redis.Redis(port=acl_server.port, username="replica", password="replica-dev").ping()
    admin = acl_server.client("admin")
    config = {**admin.config_get("appendonly"), **admin.config_get("appendfsync"), **admin.config_get("protected-mode")}
    assert config == {"appendonly": "yes", "appendfsync": "everysec", "protected-mode": "yes"}
    assert "admin-test-secret" not in (acl_server.directory / "rendered.conf").read_text()  # only its hash


def test_every_role_works_through_the_real_code_and_nothing_is_refused(acl_server: ACLServer, tmp_path: Path) -> None:
    admin = acl_server.client("admin")
    admin.acl_log_reset()
    worker = noop_worker(acl_server.url("worker"), tmp_path / "worker.log", "--noop-step-delay", "0.002")
    gateway = GatewayProcess(acl_server.url("producer"), tmp_path / "gateway.log")
    try:
        worker.redis = admin  # the test helper reads heartbeats with HVALS, which no role needs
        worker.wait_ready()
        client = Client(acl_server.url("producer"), model="tiny")
        done = client.generate(["a b", "c"], max_tokens=3, timeout=30)
        assert [c.text for c in done] == [" x x x", " x x x"]
        long_id = client.submit("long", max_tokens=1_000_000)
        wait_for(lambda: admin.xlen(KEYS.result(long_id)) > 0, 10, what="tokens")
        assert client.cancel(long_id).value == "requested"
        assert client.result(long_id, timeout=30).finish_reason == "cancelled"
        with pytest.raises(RequestFailed, match="unknown_request"):  # asking Redis whether it knows the id
            client.result("0" * 32, timeout=30)
        assert client.wait_all(["1" * 32], timeout=30)["1" * 32].error is not None
        gateway.wait_ready()
        completion = httpx.post(
            f"{gateway.url}/v1/completions", timeout=30, json={"model": "tiny", "prompt": "q", "max_tokens": 2}
        )
        assert completion.status_code == 200, completion.text
        assert [m["id"] for m in httpx.get(f"{gateway.url}/v1/models", timeout=10).json()["data"]] == ["tiny"]
        assert "tokenrelay_redis_up 1.0" in httpx.get(f"{gateway.url}/metrics", timeout=10).text
        # maintenance, as the maintenance user
        janitor = acl_server.client("maintenance")
        run_maintenance(janitor)
        worker.signal(15)  # a draining worker deregisters with its own rights
        assert worker.wait(30) == 0
    finally:
        gateway.stop()
        worker.kill()
    denied = admin.acl_log()
    assert denied == [], denied


def test_producer_cannot_read_requests_delete_or_administer(acl_server: ACLServer) -> None:
    producer = acl_server.client("producer")
    queue = KEYS.queue(Priority.NORMAL)
    Client(acl_server.url("producer"), model="tiny").submit("secret prompt", max_tokens=1)
    _denied(lambda: producer.xrange(queue))
    _denied(lambda: producer.xreadgroup(GROUP, "spy", {queue: ">"}))
    _denied(lambda: producer.eval("return redis.call('XRANGE', KEYS[1], '-', '+')", 1, queue))
    _denied(lambda: producer.delete(queue))
    _denied(lambda: producer.flushall())
    _denied(lambda: producer.keys("*"))
    _denied(lambda: producer.config_set("appendonly", "no"))
    _denied(lambda: producer.hset(KEYS.workers, "fake", b"x"))
    _denied(lambda: producer.xadd(KEYS.dead, {"a": "b"}))
    _denied(lambda: producer.set("tr:anything", "x"))


def test_worker_cannot_flush_delete_or_read_results(acl_server: ACLServer) -> None:
    worker = acl_server.client("worker")
    _denied(lambda: worker.flushall())
    _denied(lambda: worker.delete(KEYS.queue(Priority.NORMAL)))
    _denied(lambda: worker.xrange(KEYS.queue(Priority.NORMAL)))
    _denied(lambda: worker.xread({KEYS.result("a" * 32): "0-0"}))
    _denied(lambda: worker.config_set("save", ""))
    _denied(lambda: worker.script_flush())
    _denied(lambda: worker.keys("*"))
    _denied(lambda: worker.get("celery-task-meta-x"))


def test_maintenance_and_celery_users_stay_in_their_lanes(acl_server: ACLServer) -> None:
    janitor = acl_server.client("maintenance")
    _denied(lambda: janitor.xadd(KEYS.queue(Priority.HIGH), {"id": "x", "m": b""}))  # cannot inject work
    _denied(lambda: janitor.xreadgroup(GROUP, "spy", {KEYS.queue(Priority.HIGH): ">"}))
    _denied(lambda: janitor.flushall())
    _denied(lambda: janitor.delete(KEYS.dead))
    broker = acl_server.client("celery")
    broker.lpush("tokenrelay", "x")
    broker.delete("tokenrelay")
    _denied(lambda: broker.get(KEYS.request("a" * 32)))
    _denied(lambda: broker.flushall())
    _denied(lambda: broker.keys("*"))


def test_celery_runs_through_its_acl_user(acl_server: ACLServer, tmp_path: Path) -> None:
    admin = acl_server.client("admin")
    worker = noop_worker(acl_server.url("worker"), tmp_path / "worker.log")
    env = {
        **os.environ,
        "TOKENRELAY_REDIS_URL": acl_server.url("producer"),
        "TOKENRELAY_CELERY_BROKER_URL": acl_server.url("celery", db=1),
        "TOKENRELAY_MAINTENANCE_REDIS_URL": acl_server.url("maintenance"),
    }
    celery = celery_worker((tmp_path / "celery.log"), env, "acl", cwd=ROOT)
    try:
        worker.redis = admin
        worker.wait_ready()
        app = celery_client(env["TOKENRELAY_CELERY_BROKER_URL"])
        admin.acl_log_reset()
        result = app.send_task("tokenrelay.generate", args=["a"], kwargs={"model": "tiny", "max_tokens": 2})
        assert result.get(timeout=60)["text"] == " x x"
        assert "tiny" in app.send_task("tokenrelay.maintenance.reclaim_sweep").get(timeout=60)
        time.sleep(0.5)
        denied = [e for e in admin.acl_log() if e.get("username") in ("celery", "producer", "maintenance")]
        assert denied == [], denied
    finally:
        celery.terminate()
        celery.wait(30)
        worker.kill()


def test_the_gateway_keeps_responses_with_the_producer_rights(acl_server: ACLServer, tmp_path: Path) -> None:
    """Create, poll, stream, cancel (queued) and delete stored responses: nothing refused, nothing more."""
    admin = acl_server.client("admin")
    worker = noop_worker(acl_server.url("worker"), tmp_path / "worker.log")
    gateway = GatewayProcess(acl_server.url("producer"), tmp_path / "gateway.log")
    try:
        worker.redis = admin
        worker.wait_ready()
        gateway.wait_ready()
        admin.acl_log_reset()
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)
        # the no-op engine has no chat template: the response fails, which is all the queue needs to show
        created = client.responses.create(model="tiny", input="q", background=True)
        failed = wait_for(lambda: (r := client.responses.retrieve(created.id)).status == "failed" and r, 30)
        assert [e.type for e in client.responses.retrieve(created.id, stream=True)][-1] == "response.failed"
        assert client.responses.cancel(created.id).status == failed.status
        worker.signal(signal.SIGSTOP)  # it reads nothing more: the next response stays queued
        queued = client.responses.create(model="tiny", input="q", background=True)
        assert client.responses.cancel(queued.id).status == "cancelled"
        for response in (created, queued):
            client.responses.delete(response.id)
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(response.id)
    finally:
        gateway.stop()
        worker.kill()
    denied = admin.acl_log()
    assert denied == [], denied
    # deleting is granted on the responses' own keys only
    _denied(lambda: acl_server.client("producer").delete(KEYS.request(queued.id.removeprefix("resp_"))))
