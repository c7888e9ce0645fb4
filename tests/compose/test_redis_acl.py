"""compose/redis.conf against a real redis-server: every role can do its job through the real code paths,
and nothing else (no reading others' prompts, no deleting, no admin commands)."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from producer.client import Client
from producer.connection import register_script
from producer.errors import RequestFailed
from producer.gateway.file_scripts import PAGE, PAGE_ARGV
from producer.protocol import GROUP, JobKeys, Keys, Priority
from producer.webhooks.outbox import emit_event, event_id
from producer.webhooks.signing import new_secret
from tests.compose.conftest import ROOT, ACLServer
from tests.producer.gateway.webhook_receiver import Receiver
from tests.queue_helpers import run_maintenance, wait_for
from tests.stack_helpers import GatewayProcess, celery_client, celery_worker, noop_worker
from worker.redis_server import free_port

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
        _files_round_trip(gateway, admin, acl_server.client("producer"))
        _batches_round_trip(gateway)
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


def _batches_round_trip(gateway: GatewayProcess) -> None:
    """The Batch API's paths as the gateway's and the worker's users: validation and the ledger's lines, the
    workers' scripts settling lines and refilling the window, a cancel that stops queued and running
    requests, the output files, the index."""
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)

    def batch(lines: int, max_tokens: int) -> str:
        body = {"model": "tiny", "prompt": "a b", "max_tokens": max_tokens}
        jsonl = "".join(
            f'{{"custom_id": "{i}", "method": "POST", "url": "/v1/completions", "body": {json.dumps(body)}}}\n'
            for i in range(lines)
        )
        uploaded = sdk.files.create(file=("in.jsonl", io.BytesIO(jsonl.encode())), purpose="batch")
        return sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h").id

    def finished(batch_id: str) -> Any:
        found = sdk.batches.retrieve(batch_id)
        return found if found.status in ("completed", "cancelled", "failed") else None

    first = batch(300, 2)  # more lines than the window: the workers' scripts queue the rest
    done = wait_for(lambda: finished(first), 60, 0.1, "batch done")
    assert done.status == "completed" and done.request_counts.completed == 300
    assert len(sdk.files.content(done.output_file_id).text.splitlines()) == 300
    long = batch(400, 100_000)
    wait_for(lambda: sdk.batches.retrieve(long).request_counts.total == 400, 30, 0.1, "started")
    sdk.batches.cancel(long)
    cancelled = wait_for(lambda: finished(long), 60, 0.1, "cancelled")
    assert cancelled.status == "cancelled" and cancelled.request_counts.failed == 400
    assert len(sdk.files.content(cancelled.error_file_id).text.splitlines()) == 400
    assert [b.id for b in sdk.batches.list(limit=2)] == [long, done.id]


def _files_round_trip(gateway: GatewayProcess, admin: redis.Redis, producer: redis.Redis) -> None:
    """Every Redis path of the Files API as the gateway's user: streamed upload, Idempotency-Key, listing and
    its pruning, ranged reads, delete, an upload refused after its content was written, the page script's
    fallback for a cursor that left the index."""
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    content = b'{"n": 1}\n' * 300_000  # 2.7 MB: several APPENDs and GETRANGEs
    upload = {"file": ("in.jsonl", io.BytesIO(content)), "purpose": "batch", "extra_headers": {"Idempotency-Key": "a"}}
    created = sdk.files.create(**upload)  # type: ignore[arg-type]
    upload["file"] = ("in.jsonl", io.BytesIO(content))
    assert sdk.files.create(**upload).id == created.id  # type: ignore[arg-type]
    gone = sdk.files.create(file=("x", io.BytesIO(b"x")), purpose="batch")
    admin.delete(JobKeys().file(gone.id), JobKeys().file_data(gone.id))  # as their TTL would: listing prunes it
    assert [f.id for f in sdk.files.list()] == [created.id]
    assert sdk.files.content(created.id).read() == content
    assert sdk.files.delete(created.id).deleted
    body = (  # the file part first: its content is stored, then deleted when the purpose after it is refused
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n' + b"x" * 1000 + b"\r\n"
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--b--\r\n'
    )
    headers = {"content-type": "multipart/form-data; boundary=b"}
    refused = httpx.post(f"{gateway.url}/v1/files", content=body, headers=headers, timeout=30)
    assert refused.status_code == 400
    page = register_script(producer, PAGE)
    assert page([JobKeys().files], PAGE_ARGV.args(after="file-" + "0" * 24, score="1", count=10, rev=1)) == []
    assert admin.keys("tr:{file-*") == []


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


def test_webhooks_flow_through_the_producer_and_worker_users(acl_server: ACLServer, tmp_path: Path) -> None:
    """Workers append events (their scripts' XADD), the gateway delivers them, disables a 410 endpoint and
    records a given-up event, each with its own user's rights; the producer still cannot read the outbox."""
    admin = acl_server.client("admin")
    admin.sadd(KEYS.models, "tiny")
    admin.delete(KEYS.events)  # the batches of the test before this one left their events there
    admin.acl_log_reset()
    receiver = Receiver().start()
    receiver.script("/gone", 410)
    secret = new_secret()
    hooks = [
        {"name": "ok", "url": receiver.url("/ok"), "secret": secret},
        {"name": "gone", "url": receiver.url("/gone"), "secret": secret},
        {"name": "down", "url": f"http://127.0.0.1:{free_port()}/", "secret": secret},
    ]
    args = (
        "--webhook-allowed-networks",
        "127.0.0.0/8",
        "--webhook-retry-schedule",
        "0,0.1",
        "--webhook-poll-s",
        "0.05",
    )
    env = {"TOKENRELAY_WEBHOOK_ENDPOINTS": json.dumps(hooks)}
    gateway = GatewayProcess(acl_server.url("producer"), tmp_path / "gateway.log", *args, env=env)
    try:
        gateway.wait_ready()
        emit_event(acl_server.client("worker"), KEYS.events, "batch_acl", "completed", "batch.completed", 1)
        (delivery,) = receiver.wait("/ok", 1)
        assert delivery.headers["webhook-id"] == event_id("batch_acl", "completed")
        wait_for(lambda: admin.hget(JobKeys().hooks_disabled, "gone"), 30, what="gone disabled")
        wait_for(lambda: admin.xlen(JobKeys().hooks_dead) == 1, 30, what="down given up")
    finally:
        gateway.stop()
        receiver.stop()
    denied = admin.acl_log()
    assert denied == [], denied
    producer = acl_server.client("producer")
    _denied(lambda: producer.xrange(KEYS.events))
    # (XADD it may: the cancel script and a batch's cancel end jobs, and where a job ends its event is written)


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
