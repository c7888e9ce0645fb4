"""Responses: the Responses API over the queue (create, retrieve, stream, cancel, delete), stateless per replica.

A response is one queued request, always streamed into its result stream; its record (responses_store)
holds the rest. Any gateway answers any call about it from Redis alone: the status from the result
stream's terminal event, else a cancel accepted, else the owner record's state; the events from the
result stream's entries (responses_events), so a stream resumed on another replica continues exactly.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import redis
import structlog
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from producer.client import build_request
from producer.errors import ProtocolError, QueueFull, RequestFailed
from producer.gateway.errors import APIError, from_protocol_error, from_queue_full, from_request_failed, invalid
from producer.gateway.idempotency import HEADER as IDEMPOTENCY_HEADER
from producer.gateway.requests import Endpoint
from producer.gateway.responses_events import ResponseEvents, Status, ended_status, live_status, response_object
from producer.gateway.responses_request import ResponsePlan, parse_response
from producer.gateway.responses_store import ResponseStore, StoredResponse, entry_ms, request_id_of
from producer.gateway.service import CLIENT_CLOSED, REQUEST_IDS_HEADER, Gateway, wait_for_disconnect
from producer.gateway.streaming import SSEResponse
from producer.protocol import ErrorCode, Event, new_request_id
from producer.protocol import Request as WireRequest
from producer.results import CancelOutcome, Completion

log = structlog.get_logger(__name__)
RESULT_MARGIN_S = 30.0  # past the request's deadline, how long a reader waits for the worker's deadline error


def sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


def seeded(params: dict[str, Any]) -> dict[str, Any]:
    """Sampled requests get a seed when they bring none: a worker that takes over a lost request then
    draws the same tokens again, so a `restart` repeats what was streamed instead of contradicting it."""
    if params.get("seed") is not None or params.get("temperature", 1.0) == 0:
        return params
    return {**params, "seed": secrets.randbelow(2**31)}


def not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id {response_id[:80]!r} not found.", param="response_id")


@dataclass(slots=True)
class Snapshot:
    """A response as its result stream stands now."""

    completion: Completion
    status: Status
    terminal_entry: str | None = None

    @property
    def completed_at(self) -> int | None:
        return entry_ms(self.terminal_entry) // 1000 if self.terminal_entry else None


class Responses:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.client = gateway.client
        self.settings = gateway.settings
        self.store = ResponseStore(gateway.client, gateway.settings.response_retention_s)

    def owner(self, request: Request) -> str:
        return self.gateway.keys.owner(request.headers.get("authorization"))

    # -- create -------------------------------------------------------------------------------------

    async def create(self, body: Any, request: Request) -> Response:
        owner = self.owner(request)
        plan = parse_response(body, self.settings.default_max_tokens)
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and plan.background and not plan.stream:
            # a retried background create answers the response the first one made, on any replica

            async def start() -> str:
                return (await self._start(plan, owner))[0].id

            async def fetch(response_id: str) -> dict[str, Any]:
                return await self.retrieve(await self.find(response_id, request))

            return JSONResponse(await self.gateway.idempotency.run("POST /v1/responses", owner, key, start, fetch))
        record, timeout = await self._start(plan, owner)
        headers = {REQUEST_IDS_HEADER: record.request_id}
        if plan.stream:
            events = self._events(record, None, timeout + RESULT_MARGIN_S, created=True)
            return SSEResponse(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        if plan.background:
            return JSONResponse(response_object(record, Status.QUEUED), headers=headers)
        return await self._wait(record, request, timeout + RESULT_MARGIN_S, headers)

    async def _start(self, plan: ResponsePlan, owner: str) -> tuple[StoredResponse, float]:
        """The record (when stored) and the queued request; returns the record and the request's timeout."""
        await self.gateway.check_model(plan.model)
        history = await self._history(plan.previous_response_id, owner) if plan.previous_response_id else []
        record = StoredResponse(
            new_request_id(),
            plan.model,
            int(time.time()),
            plan.background,
            owner,
            {**plan.echo, "store": plan.store},
            history,
            plan.input,
            stored=plan.store,
        )
        timeout = self.settings.background_timeout_s if plan.background else self.settings.request_timeout_s
        wire = self._wire(plan, record, timeout)
        if plan.store:
            await self.store.create(record, timeout + RESULT_MARGIN_S)
        try:
            await self.client.submit_requests([wire])
        except QueueFull as exc:
            await self._forget(record)
            self.gateway.metrics.outcome(Endpoint.RESPONSES, "queue_full")
            raise from_queue_full(exc, self.settings.retry_after_s) from None
        except BaseException:
            await self._forget(record)
            raise
        log.info(
            "response submitted",
            response_id=record.id,
            model=plan.model,
            background=plan.background,
            stream=plan.stream,
            store=plan.store,
        )
        return record, timeout

    def _wire(self, plan: ResponsePlan, record: StoredResponse, timeout: float) -> WireRequest:
        try:
            return build_request(
                plan.model,
                messages=plan.messages(record.history),
                stream=True,
                priority=plan.priority,
                timeout=timeout,
                request_id=record.request_id,
                **seeded(plan.params),
            )
        except ProtocolError as exc:
            raise from_protocol_error(exc, {"messages": "input"}) from None

    async def _forget(self, record: StoredResponse) -> None:
        """Best effort, after a submit that failed: a record left behind expires with its TTL."""
        if not record.stored:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.store.delete(record, finished=False)
            except Exception as exc:  # noqa: BLE001 - the submit's own error is the one to answer
                log.warning("could not forget a response never queued", response_id=record.id, error=str(exc)[:300])

    async def _history(self, previous_id: str, owner: str) -> list[dict[str, str]]:
        """The turns a previous response leaves: its own history and input, then what it answered."""
        request_id = request_id_of(previous_id)
        previous = await self.store.load(request_id) if request_id else None
        if previous is None or previous.owner != owner:
            raise invalid("previous_response_id", f"no response with id {previous_id[:80]!r} was found")
        snapshot = await self._snapshot(previous)
        if snapshot is None or snapshot.status not in (Status.COMPLETED, Status.INCOMPLETE):
            status = "expired" if snapshot is None else snapshot.status.value
            raise invalid("previous_response_id", f"the previous response is {status}: only a finished one continues")
        return [*previous.history, *previous.input, {"role": "assistant", "content": snapshot.completion.text}]

    async def _wait(
        self, record: StoredResponse, request: Request, timeout: float, headers: dict[str, str]
    ) -> Response:
        """A foreground create without a stream: the whole response once it ends (a client that leaves
        cancels it, as chat completions do)."""
        waiting = asyncio.create_task(self._fold(record, timeout))
        gone = asyncio.create_task(wait_for_disconnect(request))
        done, _ = await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if waiting not in done:
            waiting.cancel()
            await self._cancel_quietly(record)
            self.gateway.metrics.outcome(Endpoint.RESPONSES, "client_disconnected")
            return Response(status_code=CLIENT_CLOSED)
        try:
            snapshot = waiting.result()
        except TimeoutError:
            await self._cancel_quietly(record)
            raise APIError(
                504, "No answer within the request timeout.", type="timeout_error", code=ErrorCode.DEADLINE
            ) from None
        completion = snapshot.completion
        self.gateway.metrics.finished(Endpoint.RESPONSES, completion, streamed=False)
        if completion.error is not None:
            raise from_request_failed(RequestFailed(record.request_id, *completion.error)) from None
        return JSONResponse(
            response_object(record, snapshot.status, completion, snapshot.completed_at), headers=headers
        )

    async def _fold(self, record: StoredResponse, timeout: float) -> Snapshot:
        completion = Completion(record.request_id)
        async for event in self.client.events(record.request_id, model=record.model, timeout=timeout):
            if completion.apply(event):
                await self._settle(record, event.entry_id)
                return Snapshot(completion, ended_status(completion), event.entry_id)
        raise AssertionError("the result stream ended without a terminal event")

    async def _settle(self, record: StoredResponse, terminal_entry: str) -> None:
        if record.stored:
            await self.store.settle(record, terminal_entry)

    async def _cancel_quietly(self, record: StoredResponse) -> None:
        """Best effort, whatever cancelled the caller: a request that is not cancelled ends at its deadline."""
        with anyio.CancelScope(shield=True):
            try:
                outcome = await self.client.cancel(record.request_id, model=record.model)
                log.info("response cancelled: the client left", response_id=record.id, outcome=outcome.value)
            except Exception as exc:  # noqa: BLE001 - logged; nobody waits for the answer any more
                log.warning("cancel failed", response_id=record.id, error=str(exc)[:300])

    # -- the event stream ---------------------------------------------------------------------------

    async def _events(
        self, record: StoredResponse, starting_after: int | None, timeout: float, created: bool = False
    ) -> AsyncIterator[str]:
        """The numbered events of the response, those after `starting_after`, following it live to its end.

        The stream of the create call itself (`created`) counts in the metrics and, unless background,
        cancels the request when the client leaves before the end."""
        derived = ResponseEvents(record)
        after = -1 if starting_after is None else starting_after
        finished = False
        try:
            for event in derived.opening():
                if event["sequence_number"] > after:
                    yield sse(event)
            async for entry in self.client.events(record.request_id, model=record.model, timeout=timeout):
                for event in derived.feed(entry):
                    if event["sequence_number"] > after:
                        yield sse(event)
                if entry.type.terminal:
                    finished = True
                    await self._settle(record, entry.entry_id)
                    if created:
                        self.gateway.metrics.finished(Endpoint.RESPONSES, derived.completion)
                    return
        except (RequestFailed, TimeoutError, redis.RedisError) as exc:
            finished = isinstance(exc, RequestFailed)  # Redis knows nothing of it: nothing left to cancel
            log.warning("response stream lost", response_id=record.id, error=str(exc)[:300])
            yield sse(derived.lost(f"lost the result stream: {exc}"[:500]))
        finally:
            if created and not finished and not record.background:
                await self._cancel_quietly(record)

    # -- reads and changes of stored responses ------------------------------------------------------

    async def find(self, response_id: str, request: Request) -> StoredResponse:
        """The caller's stored response by id; 404 for an unknown id and for another key's response."""
        owner = self.owner(request)
        request_id = request_id_of(response_id)
        record = await self.store.load(request_id) if request_id else None
        if record is None or record.owner != owner:
            raise not_found(response_id)
        return record

    async def _snapshot(self, record: StoredResponse) -> Snapshot | None:
        """The response now; None when its request expired (or never reached the queue)."""
        completion, terminal, seen = await self._read(record)
        if terminal is None:
            state = await self.store.state(record)
            if state == "done":  # it ended since the read, or its result stream expired
                completion, terminal, seen = await self._read(record)
            if terminal is None:
                if (state is None and not seen) or state == "done":
                    return None
                return Snapshot(completion, live_status(completion, state, record.cancelled))
        await self._settle(record, terminal.entry_id)
        return Snapshot(completion, ended_status(completion), terminal.entry_id)

    async def _read(self, record: StoredResponse) -> tuple[Completion, Event | None, bool]:
        """The result stream folded: the completion, its terminal event if written, whether it had entries."""
        events = await self.store.results(record)
        completion = Completion(record.request_id)
        for event in events:
            if completion.apply(event):
                return completion, event, True
        return completion, None, bool(events)

    async def current(self, record: StoredResponse) -> Snapshot:
        snapshot = await self._snapshot(record)
        if snapshot is None:
            raise not_found(record.id)
        return snapshot

    async def retrieve(self, record: StoredResponse) -> dict[str, Any]:
        snapshot = await self.current(record)
        return response_object(record, snapshot.status, snapshot.completion, snapshot.completed_at)

    async def stream(self, record: StoredResponse, starting_after: int | None) -> Response:
        await self.current(record)  # an expired request is a 404, not a stream that ends at once
        timeout = max(self.settings.background_timeout_s, self.settings.request_timeout_s) + RESULT_MARGIN_S
        return SSEResponse(
            self._events(record, starting_after, timeout),
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def cancel(self, record: StoredResponse) -> dict[str, Any]:
        """Background only (as OpenAI); idempotent: a response already ended or cancelled comes back as it is."""
        if not record.background:
            raise APIError(400, "Only background responses can be cancelled.", param="response_id")
        snapshot = await self.current(record)
        if not snapshot.status.terminal:
            outcome = await self.client.cancel(record.request_id, model=record.model)
            if outcome in (CancelOutcome.CANCELLED, CancelOutcome.REQUESTED):
                await self.store.mark_cancelled(record)
            log.info("response cancel", response_id=record.id, outcome=outcome.value)
        return await self.retrieve(record)

    async def delete(self, record: StoredResponse) -> dict[str, Any]:
        """Forgets the response; one still running is cancelled first."""
        snapshot = await self._snapshot(record)
        finished = snapshot is None or snapshot.completion.finished
        if not finished:
            await self.client.cancel(record.request_id, model=record.model)
        await self.store.delete(record, finished)
        log.info("response deleted", response_id=record.id)
        return {"id": record.id, "object": "response.deleted", "deleted": True}
