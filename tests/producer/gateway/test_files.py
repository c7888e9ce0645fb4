"""The Files API end to end: two real gateway replicas over one real redis-server, the openai SDK as the client.

Both replicas take the keys `key-a` and `key-b` (two owners) and cap files at 4 MiB, so the content of a
test file spans several APPENDs and GETRANGEs. No worker runs: files touch only Redis.
"""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis
import redis.asyncio as aioredis

from producer.gateway.auth import APIKeys
from producer.gateway.files import FileStore, new_file_id
from producer.gateway.idempotency import record_digest
from producer.protocol import JobKeys
from tests.queue_helpers import wait_for
from tests.stack_helpers import GatewayProcess
from worker.redis_server import RedisServer

pytestmark = pytest.mark.slow
CAP = 4 * 2**20
KEYS = JobKeys()
OWNER_A = APIKeys.load(env="key-a").owner("Bearer key-a")
PAYLOAD = bytes(range(256)) * (10 * 2**10 + 7)  # 2.5 MiB and change, every byte value


@dataclass
class Replicas:
    redis: RedisServer
    one: GatewayProcess
    two: GatewayProcess

    def sdk(self, gateway: GatewayProcess, key: str = "key-a") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)

    @property
    def db(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url)

    def leftovers(self) -> list[bytes]:
        """Every file-related key in Redis."""
        return sorted(self.db.scan_iter(match="tr:{file-*}:*")) + sorted(self.db.scan_iter(match=KEYS.files))


@pytest.fixture(scope="module")
def replicas_once(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    directory = tmp_path_factory.mktemp("files")
    server = RedisServer().start()
    env = {"TOKENRELAY_API_KEYS": "key-a,key-b"}
    gateways = [
        GatewayProcess(server.url, directory / f"gateway-{i}.log", "--max-file-bytes", str(CAP), env=env)
        for i in range(2)
    ]
    try:
        for gateway in gateways:
            gateway.wait_ready()
        yield Replicas(server, *gateways)
    finally:
        for gateway in gateways:
            gateway.stop()
        server.close()


@pytest.fixture
def replicas(replicas_once: Replicas) -> Replicas:
    replicas_once.db.flushall()
    return replicas_once


def _upload(sdk: openai.OpenAI, content: bytes = b'{"a": 1}\n', name: str = "in.jsonl", **kwargs: object):  # noqa: ANN202
    return sdk.files.create(file=(name, io.BytesIO(content)), purpose="batch", **kwargs)  # type: ignore[arg-type]


def test_upload_on_one_replica_read_and_delete_on_the_other(replicas: Replicas) -> None:
    one, two = replicas.sdk(replicas.one), replicas.sdk(replicas.two)
    created = _upload(one, PAYLOAD, "data.bin")
    assert created.id.startswith("file-") and len(created.id) == 5 + 24
    assert (created.object, created.bytes, created.filename, created.purpose) == (
        "file",
        len(PAYLOAD),
        "data.bin",
        "batch",
    )
    assert created.status == "processed" and created.status_details is None
    assert created.expires_at == created.created_at + 7 * 86_400  # the default retention
    assert two.files.retrieve(created.id) == created
    assert two.files.content(created.id).read() == PAYLOAD
    assert [f.id for f in two.files.list()] == [created.id]
    deleted = two.files.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "file")
    for call in (one.files.retrieve, one.files.content, one.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(created.id)
    assert replicas.leftovers() == [] and one.files.list().data == []


def test_list_pages_by_created_at_with_after_order_and_limit(replicas: Replicas) -> None:
    one, two = replicas.sdk(replicas.one), replicas.sdk(replicas.two)
    made = [_upload(one if i % 2 else two, f"{i}\n".encode()) for i in range(5)]
    # newest first; files of the same second sort by id (the index's order)
    newest_first = [f.id for f in sorted(made, key=lambda f: (f.created_at, f.id), reverse=True)]
    first = one.files.list(limit=2)
    assert [f.id for f in first.data] == newest_first[:2] and first.has_more
    assert (first.first_id, first.last_id) == (newest_first[0], newest_first[1])  # type: ignore[attr-defined]
    second = two.files.list(limit=2, after=newest_first[1])
    assert [f.id for f in second.data] == newest_first[2:4] and second.has_more
    last = one.files.list(limit=2, after=newest_first[3])
    assert [f.id for f in last.data] == newest_first[4:] and not last.has_more
    assert [f.id for f in one.files.list(limit=2)] == newest_first  # the SDK follows the pages itself
    assert [f.id for f in two.files.list(order="asc", limit=3)] == newest_first[::-1]
    assert [f.id for f in one.files.list(order="asc", after=newest_first[2])] == newest_first[:2][::-1]
    assert one.files.list(purpose="batch_output").data == []
    for params, param in (({"limit": 0}, "limit"), ({"limit": 10_001}, "limit"), ({"order": "up"}, "order")):
        response = httpx.get(f"{replicas.one.url}/v1/files", params=params, headers=_auth("key-a"), timeout=10)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_listing_prunes_vanished_files_and_refuses_a_cursor_that_left(replicas: Replicas) -> None:
    sdk = replicas.sdk(replicas.one)
    kept, vanished = _upload(sdk), _upload(sdk)
    replicas.db.delete(KEYS.file(vanished.id), KEYS.file_data(vanished.id))  # as its TTL would
    assert [f.id for f in sdk.files.list()] == [kept.id]
    assert replicas.db.zrange(KEYS.files, 0, -1) == [kept.id.encode()]
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.files.list(after=vanished.id)
    assert raised.value.body["param"] == "after"  # type: ignore[index]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_unknown_ids_answer_openai_404_body(replicas: Replicas) -> None:
    sdk = replicas.sdk(replicas.one)
    for file_id in ("file-" + "0" * 24, "not-a-file-id"):
        with pytest.raises(openai.NotFoundError):
            sdk.files.retrieve(file_id)
        for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
            response = httpx.request(
                method, f"{replicas.two.url}/v1/files/{file_id}{path}", headers=_auth("key-a"), timeout=10
            )
            assert response.status_code == 404
            assert response.json() == {
                "error": {
                    "message": f"No such File object: {file_id}",
                    "type": "invalid_request_error",
                    "param": "id",
                    "code": None,
                }
            }


def test_files_are_scoped_to_the_key_that_made_them(replicas: Replicas) -> None:
    mine, theirs = replicas.sdk(replicas.one, "key-a"), replicas.sdk(replicas.two, "key-b")
    created = _upload(mine, b"private\n")
    other = _upload(theirs, b"theirs\n")
    for call in (theirs.files.retrieve, theirs.files.content, theirs.files.delete):
        with pytest.raises(openai.NotFoundError) as raised:
            call(created.id)
        assert raised.value.body["message"] == f"No such File object: {created.id}"  # type: ignore[index]
    assert [f.id for f in theirs.files.list()] == [other.id]
    assert [f.id for f in mine.files.list()] == [created.id]
    assert mine.files.content(created.id).read() == b"private\n"
    with pytest.raises(openai.AuthenticationError):
        replicas.sdk(replicas.one, "wrong").files.list()
    assert httpx.get(f"{replicas.one.url}/v1/files", timeout=10).status_code == 401


def test_idempotency_key_answers_the_first_file(replicas: Replicas) -> None:
    one, two = replicas.sdk(replicas.one), replicas.sdk(replicas.two)
    first = _upload(one, b"once\n", extra_headers={"Idempotency-Key": "k-1"})
    again = _upload(two, b"a different body\n", extra_headers={"Idempotency-Key": "k-1"})
    assert again == first
    assert _upload(one, b"once\n", extra_headers={"Idempotency-Key": "k-2"}).id != first.id
    # another caller's key of the same name is its own
    assert _upload(replicas.sdk(replicas.one, "key-b"), extra_headers={"Idempotency-Key": "k-1"}).id != first.id
    assert len(one.files.list().data) == 2
    ttl = replicas.db.ttl(KEYS.idempotency(record_digest("POST /v1/files", OWNER_A, "k-1")))
    assert 86_000 < ttl <= 86_400


def test_idempotency_key_in_use_is_409_and_a_failed_create_frees_it(replicas: Replicas) -> None:
    sdk = replicas.sdk(replicas.one)
    record = KEYS.idempotency(record_digest("POST /v1/files", OWNER_A, "busy"))
    replicas.db.set(record, "pending:someone", ex=30)  # a first request still running
    with pytest.raises(openai.ConflictError) as raised:
        _upload(sdk, extra_headers={"Idempotency-Key": "busy"})
    assert raised.value.body["code"] == "idempotency_key_in_use"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):  # refused: the reservation is released
        sdk.files.create(
            file=("x", io.BytesIO(b"x")), purpose="fine-tune", extra_headers={"Idempotency-Key": "retry-me"}
        )  # type: ignore[arg-type]
    assert _upload(sdk, extra_headers={"Idempotency-Key": "retry-me"}).bytes == len(b'{"a": 1}\n')
    contents = {key.removesuffix(b":data") for key in replicas.leftovers() if key.endswith(b":data")}
    assert contents == {key.removesuffix(b":file") for key in replicas.leftovers() if key.endswith(b":file")}


def test_expires_after_sets_expires_at_and_the_keys_ttl(replicas: Replicas) -> None:
    sdk = replicas.sdk(replicas.one)
    created = _upload(sdk, expires_after={"anchor": "created_at", "seconds": 3600})
    assert created.expires_at == created.created_at + 3600
    for key in (KEYS.file(created.id), KEYS.file_data(created.id)):
        assert 3000 < replicas.db.ttl(key) <= 3600
    for seconds, param in ((60, "expires_after.seconds"), (2_592_001, "expires_after.seconds")):
        with pytest.raises(openai.BadRequestError) as raised:
            _upload(sdk, expires_after={"anchor": "created_at", "seconds": seconds})
        assert raised.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as raised:
        _upload(sdk, expires_after={"anchor": "last_active_at", "seconds": 3600})  # type: ignore[typeddict-item]
    assert raised.value.body["param"] == "expires_after.anchor"  # type: ignore[index]


def _form_head(boundary: str = "bnd", purpose: str = "batch") -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    ).encode()


def test_bad_forms_are_400_naming_the_field_and_leave_nothing(replicas: Replicas) -> None:
    url, headers = f"{replicas.one.url}/v1/files", _auth("key-a")
    cases = [
        ({"files": {"file": ("x", b"x")}}, "purpose"),
        ({"files": {"file": ("x", b"x")}, "data": {"purpose": "fine-tune"}}, "purpose"),
        ({"files": {"file": ("x", b"x")}, "data": {"purpose": "batch_output"}}, "purpose"),
        ({"data": {"purpose": "batch"}, "files": {"other": ("x", b"x")}}, "other"),
        (
            {"files": {"file": ("x", b"x")}, "data": {"purpose": "batch", "expires_after[seconds]": "3600"}},
            "expires_after",
        ),
    ]
    for kwargs, param in cases:
        response = httpx.post(url, headers=headers, timeout=10, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (param, response.text)
    malformed = [
        ({"content-type": "application/json"}, b"{}"),
        ({"content-type": "multipart/form-data; boundary=bnd"}, _form_head() + b"no closing boundary"),
    ]
    for extra, body in malformed:
        response = httpx.post(url, headers={**headers, **extra}, content=body, timeout=10)
        assert response.status_code == 400, response.text
    assert replicas.leftovers() == []


def test_a_file_at_the_cap_is_stored_one_byte_more_is_413(replicas: Replicas) -> None:
    sdk = replicas.sdk(replicas.one)
    assert _upload(sdk, b"x" * CAP).bytes == CAP
    with pytest.raises(openai.APIStatusError) as raised:
        _upload(sdk, b"x" * (CAP + 1))
    assert raised.value.status_code == 413 and raised.value.body["code"] == "file_too_large"  # type: ignore[index]
    assert len(sdk.files.list().data) == 1


def test_a_declared_length_over_the_cap_is_413_before_the_body_is_read(replicas: Replicas) -> None:
    with socket.create_connection(("127.0.0.1", replicas.one.port), timeout=30) as conn:
        conn.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer key-a\r\n"
            b"Content-Type: multipart/form-data; boundary=bnd\r\nContent-Length: 1000000000000\r\n\r\n"
        )  # and not a byte of the body
        answer = b""
        while b"file_too_large" not in answer and (data := conn.recv(65536)):
            answer += data
    assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer.lower()


def test_a_chunked_body_over_the_cap_is_cut_off_and_its_content_deleted(replicas: Replicas) -> None:
    chunk, total = b"y" * 65536, 1600  # 100 MiB offered, 4 MiB allowed
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield _form_head()
        for _ in range(total):
            sent += 1
            yield chunk
        yield b"\r\n--bnd--\r\n"

    response = httpx.post(
        f"{replicas.two.url}/v1/files",
        content=body(),  # no Content-Length: sent chunked
        headers={**_auth("key-a"), "content-type": "multipart/form-data; boundary=bnd"},
        timeout=60,
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
    assert sent < total // 2  # the server stopped reading; the client stopped sending
    assert replicas.leftovers() == []


def test_a_client_that_leaves_mid_upload_leaves_nothing_behind(replicas: Replicas) -> None:
    with socket.create_connection(("127.0.0.1", replicas.one.port), timeout=30) as conn:
        conn.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer key-a\r\n"
            b"Content-Type: multipart/form-data; boundary=bnd\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        part = _form_head() + b"z" * (3 * 2**20)  # past one APPEND: content is in Redis when the client goes
        conn.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        (partial,) = wait_for(lambda: replicas.leftovers(), 30, what="the upload's content in Redis")
        assert partial.endswith(b":data") and 0 < replicas.db.ttl(partial) <= 3600  # a dead gateway's expires
        assert replicas.sdk(replicas.two).files.list().data == []  # no object yet: not a file
    wait_for(lambda: replicas.leftovers() == [], 30, what="the partial content deleted")
    assert replicas.sdk(replicas.one).files.list().data == []


def test_file_store_api_lines_resolver_and_explicit_ids(replicas: Replicas) -> None:
    """The API other modules (batches) call in process: create from chunks, lines, the resolver, and listing
    that scans past other owners' files a few index entries at a time."""

    async def pieces(*parts: bytes) -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async def scenario() -> None:
        client = aioredis.Redis.from_url(replicas.redis.url)
        store = FileStore(client, KEYS, max_bytes=CAP, retention_s=600)
        made = await store.create(pieces(b'{"a"', b': 1}\r\n{"b": 2}\n\n', b'{"c": 3}'), "x.jsonl", "batch", OWNER_A)
        assert [line async for line in store.lines(made["id"], OWNER_A)] == [b'{"a": 1}', b'{"b": 2}', b"", b'{"c": 3}']
        assert b"".join([c async for c in store.read(made["id"], OWNER_A)]) == b'{"a": 1}\r\n{"b": 2}\n\n{"c": 3}'
        assert made["expires_at"] == made["created_at"] + 600
        empty = await store.create(pieces(), "empty.jsonl", "batch", OWNER_A)
        assert empty["bytes"] == 0 and [line async for line in store.lines(empty["id"], OWNER_A)] == []
        big = b"".join(b"%07d" % i + b"x" * 992 + b"\n" for i in range(2300))  # lines across 1 MiB reads
        long = await store.create(pieces(big[:5000], big[5000:]), "big.jsonl", "batch", OWNER_A)
        assert [line async for line in store.lines(long["id"], OWNER_A)] == big.split(b"\n")[:-1]
        await store.delete(long["id"], OWNER_A)

        lazy = new_file_id()
        asked: list[tuple[str, str]] = []

        async def resolver(file_id: str, owner: str) -> bool:
            asked.append((file_id, owner))
            if file_id != lazy:
                return False
            await store.create(pieces(b"made late\n"), "out.jsonl", "batch_output", owner, file_id=file_id)
            return True

        store.resolver = resolver
        assert (await store.get(lazy, OWNER_A))["purpose"] == "batch_output"
        assert [line async for line in store.lines(lazy, OWNER_A)] == [b"made late"]
        again = await store.create(pieces(b"ignored"), "other", "batch", OWNER_A, file_id=lazy)
        assert again["filename"] == "out.jsonl" and again["bytes"] == len(b"made late\n")
        with pytest.raises(Exception, match="No such File object"):
            await store.get(new_file_id(), OWNER_A)
        assert len(asked) == 2  # the hit did not ask

        for i in range(7):  # another owner's files interleaved in the index
            await store.create(pieces(b"%d" % i), "b", "batch", "someone-else")
        store.scan_batch = 2
        page = await store.list(OWNER_A, limit=1, purpose="batch_output")
        assert [f["id"] for f in page["data"]] == [lazy] and not page["has_more"]
        everything = await store.list(OWNER_A, order="asc")
        assert {f["id"] for f in everything["data"]} == {made["id"], empty["id"], lazy}
        await client.aclose()

    asyncio.run(scenario())
    # the gateway sees what the store made in process, with the purpose filter
    assert [f.purpose for f in replicas.sdk(replicas.two).files.list(purpose="batch_output")] == ["batch_output"]


def test_a_concurrent_upload_of_the_same_explicit_id_is_refused(replicas: Replicas, tmp_path: Path) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(replicas.redis.url)
        store = FileStore(client, KEYS, max_bytes=CAP, retention_s=600)
        file_id = new_file_id()
        async with store.upload(OWNER_A, file_id) as first:
            await first.append(b"first")
            with pytest.raises(Exception, match="exists or is being written") as raised:
                async with store.upload(OWNER_A, file_id):
                    pass
            assert getattr(raised.value, "status", None) == 409
            await first.commit("a", "batch")
        assert b"".join([c async for c in store.read(file_id, OWNER_A)]) == b"first"
        await client.aclose()

    asyncio.run(scenario())
