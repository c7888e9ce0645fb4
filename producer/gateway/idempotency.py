"""Idempotency-Key for create routes: a retried POST answers with what the first one made instead of a twin.

The record, at JobKeys.idempotency(sha256 of route, caller and key), is reserved with SET NX as `pending:<token>`
before the create runs (a short TTL, renewed while it runs, so a gateway that dies frees it soon), then holds
`done:<object id>` for a day. A retry while the first is pending is a 409; a create that fails releases the
reservation, so the retry runs the create again. The key alone names the request: a retry with another body
gets the first object all the same (as OpenAI's and Stripe's keys do within their window).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis
import structlog

from producer.connection import AsyncRedis, register_script
from producer.gateway.errors import APIError
from producer.lua import Argv
from producer.protocol import JobKeys

log = structlog.get_logger(__name__)
T = TypeVar("T")

HEADER = "Idempotency-Key"
PENDING_TTL_S = 30
DONE_TTL_S = 86_400
MAX_KEY_CHARS = 255
_PENDING, _DONE = "pending:", "done:"

# KEYS: the record. Acts only while the record still holds this request's reservation (it may have
# expired and been taken by a retry): 'expire' renews it, 'finish' stores the object id, 'release' deletes it.
_OWNED_ARGV = Argv(("reservation", "action", "value", "ttl"), numbers=frozenset({"ttl"}))
_OWNED = _OWNED_ARGV.script("""
if redis.call('GET', KEYS[1]) ~= reservation then return 0 end
if action == 'expire' then redis.call('EXPIRE', KEYS[1], ttl)
elseif action == 'finish' then redis.call('SET', KEYS[1], value, 'EX', ttl)
else redis.call('DEL', KEYS[1]) end
return 1
""")


def record_digest(route: str, owner: str, key: str) -> str:
    """Names the record: the same key from another caller or on another route is another record."""
    return hashlib.sha256("\n".join((route, owner, key)).encode()).hexdigest()


def in_use() -> APIError:
    return APIError(
        409,
        f"A request with this {HEADER} is still being processed; retry once it has finished.",
        code="idempotency_key_in_use",
    )


class Idempotency:
    """`await idempotency.run(route, owner, key, create, fetch)`: `create()` makes the object and returns its
    id, `fetch(id)` returns the object (the answer of the first call and of every retry)."""

    def __init__(self, redis_client: AsyncRedis, keys: JobKeys) -> None:
        self.redis, self.keys = redis_client, keys
        self._owned = register_script(redis_client, _OWNED)

    async def run(
        self,
        route: str,
        owner: str,
        key: str | None,
        create: Callable[[], Awaitable[str]],
        fetch: Callable[[str], Awaitable[T]],
    ) -> T:
        if key is None:
            return await fetch(await create())
        if not 0 < len(key) <= MAX_KEY_CHARS or not key.isprintable():
            raise APIError(400, f"{HEADER}: 1 to {MAX_KEY_CHARS} printable characters", param=HEADER)
        record = self.keys.idempotency(record_digest(route, owner, key))
        reservation = _PENDING + secrets.token_hex(8)
        while not await self.redis.set(record, reservation, nx=True, ex=PENDING_TTL_S):
            value = await self.redis.get(record)
            if value is None:
                continue  # it expired or was released between the two calls: reserve again
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text.startswith(_PENDING):
                raise in_use()
            log.info("idempotent replay", route=route, object_id=text.removeprefix(_DONE))
            return await fetch(text.removeprefix(_DONE))
        renewing = asyncio.create_task(self._renew(record, reservation))
        try:
            object_id = await create()
        except BaseException:
            renewing.cancel()
            await self._act(record, reservation, "release")
            raise
        renewing.cancel()
        await self._act(record, reservation, "finish", _DONE + object_id, DONE_TTL_S)
        return await fetch(object_id)

    async def _act(self, record: str, reservation: str, action: str, value: str = "", ttl: int = 0) -> None:
        args = _OWNED_ARGV.args(reservation=reservation, action=action, value=value, ttl=ttl)
        try:
            await self._owned([record], args)
        except redis.RedisError as exc:  # the reservation then lapses by its TTL: retries see 409 until then
            log.warning("idempotency record not updated", action=action, error=str(exc)[:200])

    async def _renew(self, record: str, reservation: str) -> None:
        while True:
            await asyncio.sleep(PENDING_TTL_S / 3)
            await self._act(record, reservation, "expire", ttl=PENDING_TTL_S)
