"""Server-sent events: the result streams of a request's choices relayed as OpenAI chunks, then [DONE]."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import anyio
import structlog
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from producer.async_client import AsyncClient
from producer.gateway.metrics import GatewayMetrics
from producer.gateway.requests import Endpoint, GenerationPlan
from producer.gateway.responses import ChunkMaker, finish_reason, tool_calls_reason
from producer.gateway.tool_calls import ToolCallStream, parser_for
from producer.protocol import Event, EventType
from producer.results import Completion

log = structlog.get_logger(__name__)


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


def error_chunk(message: str, kind: str = "server_error", code: str | None = None) -> str:
    return sse({"error": {"message": message, "type": kind, "param": None, "code": code}})


class SSEResponse(StreamingResponse):
    """Listens for the client leaving whatever the ASGI version, so a disconnect ends the stream at once
    (and its `finally` cancels the requests) rather than at the next token written."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def run_then_stop(func: Callable[[], Awaitable[None]]) -> None:
                try:
                    await func()
                except OSError:
                    pass  # the client went away mid-write
                group.cancel_scope.cancel()

            group.start_soon(run_then_stop, partial(self.stream_response, send))
            await run_then_stop(partial(self.listen_for_disconnect, receive))


class Replay:
    """One choice's text already sent; after a `restart`, what is regenerated is sent only past that point."""

    def __init__(self) -> None:
        self.sent_text, self.sent_tokens = "", 0
        self.again_text, self.again_tokens = "", 0
        self.replaying = False

    def restart(self) -> None:
        self.replaying, self.again_text, self.again_tokens = True, "", 0

    def fresh(self, text: str, tokens: int) -> tuple[str, int] | None:
        """(new text, how many of the delta's tokens are new); None when the regenerated text diverged."""
        if not self.replaying:
            self.sent_text += text
            self.sent_tokens += tokens
            return text, tokens
        self.again_text += text
        self.again_tokens += tokens
        overlap = min(len(self.again_text), len(self.sent_text))
        if self.again_text[:overlap] != self.sent_text[:overlap]:
            return None
        new_text = self.again_text[len(self.sent_text) :]
        new_tokens = max(0, self.again_tokens - self.sent_tokens)
        if new_text or new_tokens:
            self.replaying = False
            self.sent_text, self.sent_tokens = self.again_text, self.again_tokens
        return new_text, new_tokens


async def _tagged(
    client: AsyncClient, index: int, request_id: str, model: str, timeout: float
) -> AsyncGenerator[tuple[int, Event | Exception], None]:
    """One choice's events as (index, event); a failed read ends it with (index, the exception)."""
    try:
        async for event in client.events(request_id, model=model, timeout=timeout):
            yield index, event
    except Exception as exc:  # noqa: BLE001 - handed to the relay, which tells the client
        yield index, exc


async def choice_events(
    client: AsyncClient, ids: list[str], model: str, timeout: float
) -> AsyncGenerator[tuple[int, Event | Exception], None]:
    """(choice index, event) as the events of every choice arrive. One choice (the common case) is read
    in place; several are pumped into one queue, a task each, which is two task switches a token more."""
    if len(ids) == 1:
        async for item in _tagged(client, 0, ids[0], model, timeout):
            yield item
        return
    events: asyncio.Queue[tuple[int, Event | Exception]] = asyncio.Queue()

    async def pump(index: int, request_id: str) -> None:
        async for item in _tagged(client, index, request_id, model, timeout):
            await events.put(item)

    tasks = [asyncio.create_task(pump(i, rid)) for i, rid in enumerate(ids)]
    try:
        while True:
            yield await events.get()
    finally:
        for task in tasks:
            task.cancel()


async def relay(
    plan: GenerationPlan, client: AsyncClient, ids: list[str], metrics: GatewayMetrics, started: float, timeout: float
) -> AsyncIterator[str]:
    """Chunks of every choice as their events arrive; unfinished requests are cancelled however it ends."""
    source = choice_events(client, ids, plan.model, timeout)
    completions = [Completion(rid) for rid in ids]
    replays = [Replay() for _ in ids]
    tool_streams = [ToolCallStream(parser_for(plan.tools, plan.model)) if plan.tools else None for _ in ids]
    last_token_at: list[float | None] = [None] * len(ids)
    chunks = ChunkMaker(plan)
    client_left = True  # until the stream ends on its own: then what is unfinished was failed, not abandoned
    try:
        for index in range(len(ids)):
            if plan.endpoint is Endpoint.CHAT:
                yield sse(chunks.role(index))
            elif plan.echo:
                yield sse(chunks.text(index, str(plan.prompts[index // plan.n].get("prompt", "")), None, 0))
        open_choices = len(ids)
        while open_choices:
            index, item = await anext(source)
            if isinstance(item, Exception):
                client_left = False
                yield error_chunk(f"lost the result stream: {item}"[:500], code="stream_lost")
                break
            completion = completions[index]
            completion.apply(item)
            if item.type is EventType.RESTART:
                replays[index].restart()
            elif item.type is EventType.DELTA or (item.type is EventType.DONE and item.full_output):
                fresh = replays[index].fresh(item.text, len(item.token_ids))
                if fresh is None:
                    client_left = False
                    yield error_chunk(
                        "a worker was lost mid-stream and the restarted generation differs from what was already sent",
                        code="restart_diverged",
                    )
                    break
                text, tokens = fresh
                if text or tokens:
                    now = time.monotonic()
                    metrics.observe_tokens(started, last_token_at[index], now, tokens)
                    last_token_at[index] = now
                    logprobs = item.logprobs[len(item.logprobs) - tokens :] if item.logprobs and tokens else None
                    offset = len(replays[index].sent_text) - len(text)
                    if (tool_stream := tool_streams[index]) is None:
                        yield sse(chunks.text(index, text, logprobs, offset))
                    else:
                        for chunk in chunks.deltas(index, tool_stream.feed(text), logprobs):
                            yield sse(chunk)
            if item.type is EventType.ERROR:
                client_left = False
                metrics.outcome(plan.endpoint, f"error:{item.code}")
                yield error_chunk(item.message or "generation failed", code=item.code)
                break
            if item.type is EventType.DONE:
                metrics.finished(plan.endpoint, completion)
                reason = completion.finish_reason
                if (tool_stream := tool_streams[index]) is not None:
                    for chunk in chunks.deltas(index, tool_stream.feed("", final=True), None):
                        yield sse(chunk)
                    reason = tool_calls_reason(finish_reason(reason), tool_stream.called)
                yield sse(chunks.finish(index, reason))
                open_choices -= 1
        else:
            if plan.include_usage:
                yield sse(chunks.usage(completions))
        client_left = False
        yield sse("[DONE]")
    finally:
        # shielded: a disconnect cancels through anyio's scope, which would cancel this await again and
        # skip the cancels of the unfinished requests below
        with anyio.CancelScope(shield=True):
            await source.aclose()
        unfinished = [c.request_id for c in completions if not c.finished]
        if unfinished:
            if client_left:
                metrics.outcome(plan.endpoint, "client_disconnected")
            with anyio.CancelScope(shield=True):
                await cancel_all(client, unfinished, plan.model)


async def cancel_all(client: AsyncClient, request_ids: list[str], model: str) -> None:
    """Best effort: a request that cannot be cancelled still ends at its deadline."""
    for request_id in request_ids:
        try:
            outcome = await client.cancel(request_id, model=model)
            log.info("request cancelled: the client left", request_id=request_id, outcome=outcome.value)
        except Exception as exc:  # noqa: BLE001 - logged; nobody is waiting for the answer any more
            log.warning("cancel failed", request_id=request_id, error=str(exc)[:300])
