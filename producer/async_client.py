"""AsyncClient: the asyncio twin of Client (same protocol, same scripts, same semantics)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis

from producer.client import (
    _MAX_KEYS_PER_READ,
    _READ_BLOCK_MS,
    _UNKNOWN_CHECK_S,
    ClientConfig,
    _block_ms,
    _Models,
    build_request,
)
from producer.errors import QueueFull, RequestFailed
from producer.protocol import EVENT_FIELD, Event, Keys, Request, decode_event, done_event
from producer.reconnect import RETRYABLE, Reconnect
from producer.results import UNKNOWN, CancelOutcome, Completion, ResultFold
from producer.scripts import CANCEL, SUBMIT, cancel_args, cancel_keys, submit_args, submit_batches, submit_keys


class AsyncClient:
    """`await AsyncClient(url).generate([...])`; `async for event in client.stream(id)`."""

    def __init__(self, redis_url: str | None = None, *, model: str | None = None, prefix: str | None = None,
                 max_queue_depth: int | None = None, client: aioredis.Redis | None = None, **config: Any) -> None:
        self.config = ClientConfig.from_env(redis_url=redis_url, model=model, prefix=prefix,
                                            max_queue_depth=max_queue_depth, **config)
        self.redis = client if client is not None else aioredis.Redis.from_url(
            self.config.redis_url, socket_connect_timeout=5, socket_timeout=_READ_BLOCK_MS / 1000 + 10)
        self._submit = self.redis.register_script(SUBMIT)
        self._cancel = self.redis.register_script(CANCEL)
        self._models = _Models(self.config.model)

    def keys(self, model: str | None = None) -> Keys:
        return Keys(model or self.config.model, self.config.prefix)

    async def submit(self, prompt: str | list[int] | None = None, **kwargs: Any) -> str:
        """See Client.submit."""
        model = kwargs.pop("model", None) or self.config.model
        return (await self.submit_requests([build_request(model, prompt, **kwargs)]))[0]

    async def submit_requests(self, requests: Sequence[Request]) -> list[str]:
        """See Client.submit_requests (same retry of a lost connection under the same ids)."""
        batches = submit_batches(requests)
        reconnect = Reconnect(self.config.reconnect_s)
        while True:
            pipe = self.redis.pipeline(transaction=False)
            for batch in batches:
                await self._submit(keys=submit_keys(self.keys(batch[0].model), batch),
                                   args=submit_args(batch, self.config.max_queue_depth, self.config.result_ttl_s),
                                   client=pipe)
            try:
                replies: Any = await pipe.execute()
                break
            except RETRYABLE as exc:
                await asyncio.sleep(reconnect.delay(exc))
        accepted: list[str] = []
        full: QueueFull | None = None
        verdicts = [v for reply in replies for v in reply]
        for request, (verdict, detail) in zip([r for b in batches for r in b], verdicts, strict=True):
            if verdict == b"full":
                full = full or QueueFull(request.model, int(detail), self.config.max_queue_depth)
                continue
            self._models.remember(request.request_id, request.model)
            accepted.append(request.request_id)
        if full is not None:
            full.accepted = accepted
            raise full
        return accepted

    async def events(self, request_id: str, *, model: str | None = None, after: str = "0-0",
                     timeout: float | None = None) -> AsyncIterator[Event]:
        keys = self.keys(self._models.of(request_id, model))
        key = keys.result(request_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        last, reconnect = after, Reconnect(self.config.reconnect_s, deadline)
        while True:
            try:
                reply: Any = await self.redis.xread({key: last}, count=512, block=_block_ms(deadline))
                # nothing came: does Redis know the request at all? (else this would wait forever)
                # (one key per EXISTS: the producer's ACL grants it per key pattern)
                known = bool(reply) or bool(await self.redis.exists(keys.request(request_id))) or bool(
                    await self.redis.exists(key))
                reconnect.ok()
            except RETRYABLE as exc:
                await asyncio.sleep(reconnect.delay(exc))
                continue
            if not known:
                raise RequestFailed(request_id, *UNKNOWN)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    event = decode_event(fields.get(EVENT_FIELD.encode()), last)
                    yield event
                    if event.type.terminal:
                        return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"request {request_id}: no terminal event within {timeout} s")

    async def stream(self, request_id: str, **kwargs: Any) -> AsyncIterator[Event]:
        """Deltas (and any `restart`) then `done`; raises RequestFailed on an error event."""
        completion = Completion(request_id)
        async for event in self.events(request_id, **kwargs):
            completion.apply(event)
            completion.raise_for_error()
            yield event

    async def result(self, request_id: str, timeout: float | None = None, *, model: str | None = None) -> Completion:
        completion = Completion(request_id)
        async for event in self.events(request_id, model=model, timeout=timeout):
            completion.apply(event)
        return completion.raise_for_error()

    async def cancel(self, request_id: str, *, model: str | None = None) -> CancelOutcome:
        keys = self.keys(self._models.of(request_id, model))
        args = cancel_args(keys, request_id, done_event("cancelled", {}), self.config.result_ttl_s)
        reply: Any = await self._cancel(keys=cancel_keys(keys, request_id), args=args)
        return CancelOutcome(reply.decode())

    async def generate(self, prompts: Sequence[str | list[int]], timeout: float | None = None,
                       **kwargs: Any) -> list[Completion]:
        """Submits every prompt, waits for all concurrently; completions in order."""
        model = kwargs.pop("model", None) or self.config.model
        ids = await self.submit_requests([build_request(model, p, **kwargs) for p in prompts])
        done = await self.wait_all(ids, model=model, timeout=timeout)
        return [done[i].raise_for_error() for i in ids]

    async def wait_all(self, request_ids: Sequence[str], *, model: str | None = None,
                       timeout: float | None = None) -> dict[str, Completion]:
        """Folds many result streams over one connection (see Client.wait_all)."""
        fold = ResultFold(self.keys(model), request_ids, _MAX_KEYS_PER_READ)
        deadline = None if timeout is None else time.monotonic() + timeout
        reconnect = Reconnect(self.config.reconnect_s, deadline)
        checked = time.monotonic()
        while fold.positions:
            chunks = fold.chunks()
            got = 0
            try:
                if time.monotonic() - checked >= _UNKNOWN_CHECK_S:
                    pipe = self.redis.pipeline(transaction=False)
                    for key in fold.existence_checks():
                        pipe.exists(key)
                    fold.settle_unknown(await pipe.execute())
                    checked = time.monotonic()
                for chunk in chunks:
                    block = _block_ms(deadline) if len(chunks) == 1 else None
                    got += fold.feed(await self.redis.xread(chunk, count=512, block=block))  # type: ignore[arg-type]
                reconnect.ok()
            except RETRYABLE as exc:
                await asyncio.sleep(reconnect.delay(exc))
                continue
            if deadline is not None and time.monotonic() >= deadline and fold.positions:
                raise TimeoutError(f"{len(fold.positions)} of {len(request_ids)} requests unfinished after {timeout} s")
            if not got and len(chunks) > 1:
                await asyncio.sleep(0.005)
        return fold.completions

    async def close(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
