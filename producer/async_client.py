"""AsyncClient: the asyncio I/O shell over producer.client_core (same operations, same semantics as Client)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis

from producer.client import ClientBase
from producer.client_commands import Command, Exists, Operation, Read, RunScript, RunScriptsDurably, Sleep
from producer.connection import AsyncRedis, connect_async, run_durably_async
from producer.protocol import Event, Request
from producer.read_mux import MuxRefused, ReadMux
from producer.results import CancelOutcome, Completion

T = TypeVar("T")


class AsyncClient(ClientBase[AsyncRedis]):
    """`await AsyncClient(url).generate([...])`; `async for event in client.stream(id)`."""

    connect = staticmethod(connect_async)

    async def submit(self, prompt: str | list[int] | None = None, **kwargs: Any) -> str:
        """See Client.submit."""
        return (await self.submit_requests(self._core.requests([prompt], kwargs)))[0]

    async def submit_requests(self, requests: Sequence[Request]) -> list[str]:
        """See Client.submit_requests (same retry of a lost connection under the same ids)."""
        return await self._run(self._core.submit(requests))

    async def events(
        self, request_id: str, *, model: str | None = None, after: str = "0-0", timeout: float | None = None
    ) -> AsyncIterator[Event]:
        async for event in self._drive(self._core.events(request_id, model, after, timeout)):
            yield event

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
        return await self._run(self._core.cancel(request_id, model))

    async def generate(
        self, prompts: Sequence[str | list[int]], timeout: float | None = None, **kwargs: Any
    ) -> list[Completion]:
        """Submits every prompt, waits for all concurrently; completions in order."""
        return await self._run(self._core.generate(prompts, timeout, kwargs))

    async def wait_all(
        self, request_ids: Sequence[str], *, model: str | None = None, timeout: float | None = None
    ) -> dict[str, Completion]:
        """Folds many result streams over one connection (see Client.wait_all)."""
        return await self._run(self._core.wait_all(request_ids, model, timeout))

    async def close(self) -> None:
        if self._mux is not None:
            await self._mux.close()
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- I/O: what the core decides, carried out with redis.asyncio -------------------------------------

    _mux: ReadMux | None = None
    _mux_loop: asyncio.AbstractEventLoop | None = None

    def _read_mux(self) -> ReadMux | None:
        """This loop's ReadMux (config.multiplex_reads, plain Redis only); None: every read goes on its own."""
        if not self.config.multiplex_reads or not isinstance(self.redis, aioredis.Redis):
            return None
        loop = asyncio.get_running_loop()
        if self._mux is None or self._mux_loop is not loop:  # a mux's futures and connection belong to one loop
            self._mux, self._mux_loop = ReadMux(self.redis, self.config.prefix), loop
        return self._mux

    async def _run(self, operation: Operation[T]) -> T:
        async for event in self._drive(operation):
            raise AssertionError(f"{event} from an operation that returns a value")
        return operation.value

    async def _drive(self, operation: Operation[Any]) -> AsyncIterator[Event]:
        for step in operation:
            if isinstance(step, Event):
                yield step
                continue
            try:
                operation.reply(await self._send(step))
            except Exception as exc:  # the operation retries what it can and raises the rest
                operation.fail(exc)

    async def _send(self, command: Command) -> Any:
        if isinstance(command, Read):
            if command.block and len(command.streams) == 1 and (mux := self._read_mux()) is not None:
                ((key, last),) = command.streams.items()
                if mux.serves(key):
                    try:
                        return await mux.read(key, last, command.block, command.count)
                    except MuxRefused:
                        pass  # an ACL refused the shared read: this one, and every one after it, goes alone
            return await self.redis.xread(
                command.streams,  # type: ignore[arg-type]
                count=command.count,
                block=command.block,
            )
        if isinstance(command, RunScript):
            return await self._scripts[command.source](keys=command.keys, args=command.args)
        if isinstance(command, Sleep):
            return await asyncio.sleep(command.seconds)
        if isinstance(command, RunScriptsDurably):
            calls = [(c.source, c.keys, c.args) for c in command.calls]
            return await run_durably_async(self.redis, calls, command.replicas, command.wait_ms)
        pipe = self.redis.pipeline(transaction=False)
        if isinstance(command, Exists):
            for key in command.keys:
                pipe.exists(key)
            return await pipe.execute()
        for call in command.calls:
            await self._scripts[call.source](keys=call.keys, args=call.args, client=pipe)
        return await pipe.execute()
