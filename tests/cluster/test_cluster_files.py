"""The Files API on a Redis Cluster: each file's keys in its own slot, the index on another, one gateway process."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from producer.connection import connect, connect_async
from producer.gateway.files import FileStore, new_file_id
from producer.protocol import JobKeys
from tests.stack_helpers import GatewayProcess
from worker.redis_cluster import RedisClusterServer

pytestmark = pytest.mark.slow
KEYS = JobKeys()
CAP = 4 * 2**20


def ids_on_every_master(cluster: RedisClusterServer) -> list[str]:
    """One new file id per master (by the slot of its keys' hash tag)."""
    found: dict[int, str] = {}
    while len(found) < len(cluster.masters()):
        file_id = new_file_id()
        found.setdefault(cluster.master_of(KEYS.file(file_id)).port, file_id)
    return list(found.values())


def test_files_across_shards_through_the_gateway(
    cluster_url: str, redis_cluster: RedisClusterServer, tmp_path: Path
) -> None:
    spread = ids_on_every_master(redis_cluster)

    async def pieces(data: bytes) -> AsyncIterator[bytes]:
        yield data

    async def make() -> None:  # the in-process API (batches) on the cluster client
        client = connect_async(cluster_url)
        store = FileStore(client, KEYS, max_bytes=CAP, retention_s=3600)
        for i, file_id in enumerate(spread):
            await store.create(pieces(b"line %d\n" % i), f"{i}.jsonl", "batch_output", "", file_id=file_id)
        await client.aclose()

    asyncio.run(make())
    gateway = GatewayProcess(cluster_url, tmp_path / "gateway.log", "--max-file-bytes", str(CAP)).wait_ready()
    try:
        sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        content = bytes(range(256)) * 10_000  # 2.5 MB: several APPENDs and GETRANGEs
        upload = {"file": ("in.jsonl", io.BytesIO(content)), "purpose": "batch"}
        created = sdk.files.create(**upload, extra_headers={"Idempotency-Key": "once"})  # type: ignore[arg-type]
        upload["file"] = ("in.jsonl", io.BytesIO(content))
        assert sdk.files.create(**upload, extra_headers={"Idempotency-Key": "once"}).id == created.id  # type: ignore[arg-type]
        assert sdk.files.content(created.id).read() == content
        listed = [f.id for f in sdk.files.list(order="asc", limit=2)]
        assert sorted(listed) == sorted([*spread, created.id]) and len(listed) == 4
        assert {f.id for f in sdk.files.list(purpose="batch_output")} == set(spread)
        for i, file_id in enumerate(spread):
            assert sdk.files.content(file_id).read() == b"line %d\n" % i
            assert sdk.files.delete(file_id).deleted
        assert _too_large_chunked(gateway) == 413
        assert [f.id for f in sdk.files.list()] == [created.id]
        sdk.files.delete(created.id)
    finally:
        gateway.stop()
    cluster = connect(cluster_url)
    assert list(cluster.scan_iter(match="tr:{file-*")) == [] and cluster.zcard(KEYS.files) == 0
    cluster.close()


def _too_large_chunked(gateway: GatewayProcess) -> int:
    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
        for _ in range(1600):
            yield b"y" * 65536

    headers = {"content-type": "multipart/form-data; boundary=b"}
    return httpx.post(f"{gateway.url}/v1/files", content=body(), headers=headers, timeout=60).status_code
