"""AsyncLLM: asyncio streaming over an LLMEngine driven by one background thread."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from engine.config import SamplingParams
from engine.engine import LLMEngine, Prompt
from engine.llm import as_prompt_list, make_config
from engine.request import RequestOutput

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class AsyncLLM:
    """`await llm.generate(prompts)` and `async for delta in llm.stream(prompt)`; many callers at once."""

    def __init__(self, model: str | None = None, *, model_name: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(make_config(model, model_name, **kwargs))
        self._commands: deque[tuple[Any, ...]] = deque()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tokenrelay-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str | None = None, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Yields one RequestOutput per new token (use `.new_text`); the last has `.finished` set.

        Leaving the loop early aborts the request and frees its KV blocks.
        """
        if self._closed:
            raise RuntimeError("AsyncLLM is shut down")
        loop = asyncio.get_running_loop()
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(loop, asyncio.Queue())
        accepted: asyncio.Future[None] = loop.create_future()
        self._send(("add", request_id, prompt, params, priority, stream, accepted))
        finished = False
        try:
            await accepted  # raises the engine's ValueError for a bad request
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._send(("abort", request_id))

    async def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Runs all prompts concurrently; the finished outputs, in order."""

        async def one(prompt: Prompt) -> RequestOutput:
            final = None
            async for out in self.stream(prompt, params):
                final = out
            assert final is not None
            return final

        return list(await asyncio.gather(*(one(p) for p in as_prompt_list(prompts))))

    def shutdown(self) -> None:
        self._closed = True
        self._send(("stop",))
        self._thread.join(timeout=30)

    # -- engine thread ----------------------------------------------------------------------------

    def _send(self, command: tuple[Any, ...]) -> None:
        self._commands.append(command)
        self._wake.set()

    def _run(self) -> None:
        while True:
            while self._commands:
                command = self._commands.popleft()
                if command[0] == "stop":
                    self._fail_all(RuntimeError("AsyncLLM shut down"))
                    return
                self._apply(command)
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - surface it to every caller instead of dying silently
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _apply(self, command: tuple[Any, ...]) -> None:
        if command[0] == "abort":
            self._streams.pop(command[1], None)
            self.engine.abort(command[1])
            return
        _, request_id, prompt, params, priority, stream, accepted = command
        try:
            self.engine.add_request(request_id, prompt, params, priority)
        except Exception as exc:  # noqa: BLE001 - ValueError for bad input; anything else still reaches the caller
            stream.loop.call_soon_threadsafe(_settle, accepted, exc)
            return
        self._streams[request_id] = stream
        stream.loop.call_soon_threadsafe(_settle, accepted, None)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
        self._streams.clear()


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
