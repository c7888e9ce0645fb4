"""FileStore: OpenAI file objects and their content in Redis, written as they stream in and read back in chunks.

A file is two keys with one hash tag (so one slot of a cluster): its content string, appended to while the
upload arrives, and its object hash, written last, so that the object's existence is the file's. Both carry
the same TTL. An index sorted set (score: created_at) serves listing; it may name files that expired or were
deleted, and listing prunes those. No replica holds state: any gateway answers for any file.
"""

from __future__ import annotations

import enum
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import redis
import structlog

from producer.connection import AsyncRedis, as_text, register_script
from producer.gateway.errors import APIError, invalid
from producer.gateway.file_scripts import BEGIN, BEGIN_ARGV, COMMIT, COMMIT_ARGV, DELETE, DELETE_ARGV, PAGE, PAGE_ARGV
from producer.protocol import JobKeys

log = structlog.get_logger(__name__)

CHUNK_BYTES = 1 << 20  # one APPEND or GETRANGE: bounds the memory an upload or a download holds
UPLOAD_TTL_S = 3600  # a partial upload whose gateway died expires on its own (renewed by every append)
MIN_EXPIRES_S, MAX_EXPIRES_S = 3600, 2_592_000  # OpenAI's bounds on expires_after.seconds
SCAN_BATCH = 500  # index entries read per round trip while listing
# uploads get 24 random hex digits; a batch's output and error files are named after the batch
_FILE_ID = re.compile(r"^file-(?:[0-9a-f]{24}|batch_[0-9a-f]{32}-(?:output|errors))$")

# (file id, owner) -> True when it created that file: lets another module make files on first read.
Resolver = Callable[[str, str], Awaitable[bool]]


class FilePurpose(enum.StrEnum):
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"  # output and error files of a batch: made by code, never uploaded


class FileContentLost(Exception):
    """The content ended before the object's `bytes`: the file was deleted or expired while it was read."""


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def is_file_id(value: str) -> bool:
    return _FILE_ID.match(value) is not None


def not_found(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", param="id")


def file_object(stored: dict[str, str], file_id: str) -> dict[str, Any]:
    """OpenAI's file object from the stored hash (the owner stays inside)."""
    return {
        "id": file_id,
        "object": "file",
        "bytes": int(stored["bytes"]),
        "created_at": int(stored["created_at"]),
        "filename": stored["filename"],
        "purpose": stored["purpose"],
        "status": "processed",
        "expires_at": int(stored["expires_at"]),
        "status_details": None,
    }


class Upload:
    """One file being written; made by FileStore.upload, which deletes the content unless commit ran."""

    def __init__(self, store: FileStore, file_id: str, owner: str) -> None:
        self.store, self.file_id, self.owner = store, file_id, owner
        self.size = 0
        self.committed = False
        self._buffer = bytearray()

    async def append(self, data: bytes) -> None:
        """Adds content; a 413 once the total passes the store's cap (the caller stops reading the body)."""
        if self.size + len(data) > self.store.max_bytes:
            raise self.store.too_large()
        self.size += len(data)
        self._buffer += data
        if len(self._buffer) >= CHUNK_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if not self._buffer:
            return
        data_key = self.store.keys.file_data(self.file_id)
        pipe = self.store.redis.pipeline(transaction=False)
        pipe.append(data_key, bytes(self._buffer))
        pipe.expire(data_key, UPLOAD_TTL_S)
        await pipe.execute()
        self._buffer.clear()

    async def commit(self, filename: str, purpose: FilePurpose | str, ttl_s: int | None = None) -> dict[str, Any]:
        """Writes the object (the file now exists), then indexes it; returns the OpenAI object."""
        await self._flush()
        store, purpose = self.store, FilePurpose(purpose)
        ttl = store.retention_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ValueError(f"ttl_s: must be > 0, got {ttl}")
        created_at = int(time.time())
        stored = {
            "bytes": str(self.size),
            "created_at": str(created_at),
            "expires_at": str(created_at + ttl),
            "filename": filename,
            "purpose": purpose.value,
            "owner": self.owner,
        }
        pairs = [item for field in stored.items() for item in field]
        keys = [store.keys.file(self.file_id), store.keys.file_data(self.file_id)]
        if not await store._commit(keys, COMMIT_ARGV.args(*pairs, ttl=ttl, size=self.size)):
            raise APIError(500, "The upload's content was lost before it was stored; upload again.", "server_error")
        self.committed = True
        await store.index(self.file_id, created_at)
        log.info("file created", file_id=self.file_id, bytes=self.size, purpose=purpose.value, owner=self.owner)
        return file_object(stored, self.file_id)


class FileStore:
    """Files over the gateway's async Redis client (a Redis or a RedisCluster)."""

    def __init__(self, client: AsyncRedis, keys: JobKeys, max_bytes: int, retention_s: int) -> None:
        self.redis, self.keys = client, keys
        self.max_bytes, self.retention_s = max_bytes, retention_s
        self.resolver: Resolver | None = None  # asked on a miss, before a 404 (batches' output files)
        self.scan_batch = SCAN_BATCH
        self._begin = register_script(client, BEGIN)
        self._commit = register_script(client, COMMIT)
        self._delete = register_script(client, DELETE)
        self._page = register_script(client, PAGE)

    def too_large(self) -> APIError:
        return APIError(
            413, f"The file is over this server's limit of {self.max_bytes} bytes.", param="file", code="file_too_large"
        )

    @asynccontextmanager
    async def upload(self, owner: str, file_id: str | None = None) -> AsyncIterator[Upload]:
        """An Upload whose content is deleted on the way out unless it was committed (errors, aborts)."""
        file_id = file_id or new_file_id()
        if not is_file_id(file_id):
            raise ValueError(f"file id: {file_id!r} is not file-<24 hex digits>")
        keys = [self.keys.file(file_id), self.keys.file_data(file_id)]
        started = as_text(await self._begin(keys, BEGIN_ARGV.args(ttl=UPLOAD_TTL_S)))
        if started != "ok":  # only an id given by the caller can meet another upload or an existing file
            raise APIError(409, f"File {file_id} exists or is being written.", param="id", code="file_" + started)
        upload = Upload(self, file_id, owner)
        try:
            yield upload
        finally:
            if not upload.committed:
                try:
                    await self.redis.delete(self.keys.file_data(file_id))
                except redis.RedisError as exc:  # the upload's own error matters more; the TTL cleans up
                    log.warning("file upload not deleted", file_id=file_id, error=str(exc)[:200])
                log.info("file upload abandoned", file_id=file_id, bytes=upload.size)

    async def create(
        self,
        chunks: AsyncIterator[bytes],
        filename: str,
        purpose: FilePurpose | str,
        owner: str,
        ttl_s: int | None = None,
        file_id: str | None = None,
    ) -> dict[str, Any]:
        """Stores the chunks as a new file; with `file_id`, returns that file instead when it already exists."""
        if file_id is not None and (existing := await self._load(file_id, owner)) is not None:
            return existing
        async with self.upload(owner, file_id) as upload:
            async for chunk in chunks:
                await upload.append(chunk)
            return await upload.commit(filename, purpose, ttl_s)

    async def index(self, file_id: str, created_at: int) -> None:
        """Lists the file; entries older than any TTL could be are dropped on the way."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.files, {file_id: created_at})
        pipe.zremrangebyscore(self.keys.files, "-inf", created_at - max(MAX_EXPIRES_S, self.retention_s) - 1)
        await pipe.execute()

    async def _stored(self, file_id: str) -> dict[str, str] | None:
        if not is_file_id(file_id):
            return None
        raw: dict[Any, Any] = await self.redis.hgetall(self.keys.file(file_id))
        return {as_text(k): as_text(v) for k, v in raw.items()} or None

    async def _load(self, file_id: str, owner: str) -> dict[str, Any] | None:
        stored = await self._stored(file_id)
        if stored is None or stored.get("owner") != owner:
            return None
        return file_object(stored, file_id)

    async def get(self, file_id: str, owner: str) -> dict[str, Any]:
        """The caller's file; another caller's is a 404 like a missing one. A miss asks the resolver first."""
        stored = await self._stored(file_id)
        if stored is None and is_file_id(file_id) and self.resolver is not None:
            if await self.resolver(file_id, owner):
                stored = await self._stored(file_id)
        if stored is None or stored.get("owner") != owner:
            raise not_found(file_id)
        return file_object(stored, file_id)

    async def stream(self, file: dict[str, Any]) -> AsyncIterator[bytes]:
        """The content of a file object that `get` returned, CHUNK_BYTES at a time."""
        data_key, size, offset = self.keys.file_data(file["id"]), int(file["bytes"]), 0
        while offset < size:
            raw = await self.redis.getrange(data_key, offset, min(offset + CHUNK_BYTES, size) - 1)
            chunk = raw if isinstance(raw, bytes) else raw.encode()  # a client that decodes replies
            if not chunk:
                raise FileContentLost(f"{file['id']}: content ends at byte {offset} of {size}")
            offset += len(chunk)
            yield chunk

    async def read(self, file_id: str, owner: str) -> AsyncIterator[bytes]:
        """The content, streamed (raises the 404 of `get` on the first iteration)."""
        async for chunk in self.stream(await self.get(file_id, owner)):
            yield chunk

    async def lines(self, file_id: str, owner: str) -> AsyncIterator[bytes]:
        """The content split on b"\\n" (a trailing b"\\r" dropped too), streamed; no newline at the end is fine."""
        pending: list[bytes] = []
        async for chunk in self.read(file_id, owner):
            *complete, rest = chunk.split(b"\n")
            if complete:
                complete[0] = b"".join([*pending, complete[0]])
                pending.clear()
                for line in complete:
                    yield line.removesuffix(b"\r")
            if rest:
                pending.append(rest)
        if pending:
            yield b"".join(pending).removesuffix(b"\r")

    async def delete(self, file_id: str, owner: str) -> dict[str, Any]:
        """Deletes the caller's file (a miss asks the resolver first, so a file it can make is deletable)."""
        await self.get(file_id, owner)
        keys = [self.keys.file(file_id), self.keys.file_data(file_id)]
        if not await self._delete(keys, DELETE_ARGV.args(owner=owner)):
            raise not_found(file_id)  # deleted or expired since the get
        await self.redis.zrem(self.keys.files, file_id)
        log.info("file deleted", file_id=file_id, owner=owner)
        return {"id": file_id, "object": "file", "deleted": True}

    async def list(
        self,
        owner: str,
        after: str | None = None,
        limit: int = 10_000,
        order: str = "desc",
        purpose: str | None = None,
    ) -> dict[str, Any]:
        """A page of the caller's files, OpenAI's list shape; index entries of vanished files are pruned."""
        found: list[dict[str, Any]] = []
        vanished: list[str] = []
        cursor, score, more = after or "", "", True
        while more and len(found) <= limit:
            reply = await self._page(
                [self.keys.files],
                PAGE_ARGV.args(after=cursor, score=score, count=self.scan_batch, rev=int(order == "desc")),
            )
            if reply is None:
                raise invalid("after", f"{after!r} is not a listed file (deleted or expired): list from the start")
            ids = [as_text(member) for member in reply[::2]]
            if not ids:
                break
            pipe = self.redis.pipeline(transaction=False)
            for file_id in ids:
                pipe.hgetall(self.keys.file(file_id))
            for file_id, raw in zip(ids, await pipe.execute(), strict=True):
                stored = {as_text(k): as_text(v) for k, v in raw.items()}
                if not stored:
                    vanished.append(file_id)
                elif stored.get("owner") == owner and purpose in (None, stored.get("purpose")):
                    found.append(file_object(stored, file_id))
            cursor, score, more = ids[-1], as_text(reply[-1]), len(ids) == self.scan_batch
        if vanished:
            await self.redis.zrem(self.keys.files, *vanished)
        page = found[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(found) > limit,
        }
