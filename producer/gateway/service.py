"""Gateway: turns a GenerationPlan into queued requests and their results into an HTTP answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from producer import fleet
from producer.async_client import AsyncClient
from producer.batches.service import BatchConfig, Batches
from producer.connection import SyncRedis
from producer.errors import ProtocolError, QueueFull, RequestFailed
from producer.gateway.auth import APIKeys
from producer.gateway.errors import (
    APIError,
    from_protocol_error,
    from_queue_full,
    from_request_failed,
    model_not_found,
)
from producer.gateway.files import FileStore
from producer.gateway.idempotency import Idempotency
from producer.gateway.metrics import GatewayMetrics
from producer.gateway.requests import GenerationPlan
from producer.gateway.responses import full_response
from producer.gateway.settings import GatewaySettings
from producer.gateway.streaming import SSEResponse, cancel_all, relay
from producer.protocol import ErrorCode, JobKeys
from producer.protocol import Request as WireRequest

log = structlog.get_logger(__name__)
REQUEST_IDS_HEADER = "X-Tokenrelay-Request-Ids"  # the queue's ids of the choices, for tracing and cancel
CLIENT_CLOSED = 499  # nginx's code for "the client closed the connection": only metrics and logs see it


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the HTTP client goes away (the body has been read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def model_metadata(view: fleet.ModelView) -> dict[str, Any]:
    """The `tokenrelay` key of a /v1/models entry: the engine options its live workers serve with, each
    distinct set once (workers of one model may differ, e.g. while a rollout changes the quantization)."""
    distinct: list[dict[str, Any]] = []
    for worker in view.workers:
        options = worker.get("engine_options") or {}
        if options not in distinct:
            distinct.append(options)
    return {"workers": len(view.workers), "engine_options": distinct}


def batch_config(settings: GatewaySettings) -> BatchConfig:
    return BatchConfig(
        window=settings.batch_window,
        max_lines=settings.batch_max_lines,
        max_window_s=settings.batch_max_window_s,
        keep_s=settings.batch_retention_s,
        output_ttl_s=settings.batch_retention_s,
        default_max_tokens=settings.default_max_tokens,
        max_choices=settings.max_choices,
    )


class Gateway:
    def __init__(
        self, settings: GatewaySettings, client: AsyncClient, admin: SyncRedis, keys: APIKeys, metrics: GatewayMetrics
    ) -> None:
        self.settings = settings
        self.client = client
        self.admin = admin  # sync connection for /v1/models and scrapes, used from the thread pool
        self.keys = keys
        self.metrics = metrics
        jobs = JobKeys(settings.prefix)
        self.files = FileStore(client.redis, jobs, settings.max_file_bytes, settings.file_retention_s)
        self.idempotency = Idempotency(client.redis, jobs)
        self.batches = Batches(
            client.redis, self.files, self.served_models, settings.prefix, settings.partitions, batch_config(settings)
        )
        self.files.resolver = self.batches.materialize
        self._models: set[str] = set()
        self._models_at = 0.0

    def authorize(self, request: Request) -> None:
        self.keys.check(request.headers.get("authorization"))

    async def served_models(self) -> set[str]:
        """The models some worker has registered (uncached: batches check every line against it once)."""
        members: Any = await self.client.redis.smembers(self.client.keys("x").models)
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    async def check_model(self, model: str) -> None:
        """404 unless some worker has registered the model (the set is cached for a moment)."""
        now = time.monotonic()
        if model not in self._models or now - self._models_at > self.settings.models_cache_s:
            members: Any = await self.client.redis.smembers(self.client.keys("x").models)
            self._models = {m.decode() if isinstance(m, bytes) else str(m) for m in members}
            self._models_at = now
        if model not in self._models:
            raise model_not_found(model)

    def list_models(self) -> dict[str, Any]:
        """The models that live workers serve (heartbeats), OpenAI's list shape."""
        data = []
        for view in fleet.view(self.admin, self.settings.prefix, partitions=self.settings.partitions):
            if view.live:
                started = min(float(w.get("started_at", w.get("at", 0))) for w in view.workers)
                data.append(
                    {
                        "id": view.model,
                        "object": "model",
                        "created": int(started),
                        "owned_by": "tokenrelay",
                        "workers": len(view.workers),
                        "tokenrelay": model_metadata(view),
                    }
                )
        return {"object": "list", "data": data}

    def _requests(self, plan: GenerationPlan) -> list[WireRequest]:
        try:
            return plan.requests(stream=plan.stream, priority=plan.priority, timeout=self.settings.request_timeout_s)
        except ProtocolError as exc:
            raise from_protocol_error(exc) from None

    async def _submit(self, plan: GenerationPlan) -> list[str]:
        try:
            return await self.client.submit_requests(self._requests(plan))
        except QueueFull as exc:
            await cancel_all(self.client, exc.accepted, plan.model)
            self.metrics.outcome(plan.endpoint, "queue_full", plan.choices)
            raise from_queue_full(exc, self.settings.retry_after_s) from None

    async def serve(self, plan: GenerationPlan, request: Request) -> Response:
        await self.check_model(plan.model)
        ids = await self._submit(plan)
        log.info(
            "generation submitted", endpoint=plan.endpoint.value, model=plan.model, request_ids=ids, stream=plan.stream
        )
        if plan.stream:
            stream = relay(plan, self.client, ids, self.metrics, time.monotonic(), self._result_timeout)
            return SSEResponse(
                stream,
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", REQUEST_IDS_HEADER: ",".join(ids)},
            )
        return await self._answer(plan, ids, request)

    @property
    def _result_timeout(self) -> float:
        # the worker answers a request past its deadline with an error; the margin covers the round trip
        return self.settings.request_timeout_s + 30.0

    async def _answer(self, plan: GenerationPlan, ids: list[str], request: Request) -> Response:
        waiting = asyncio.create_task(self.client.wait_all(ids, model=plan.model, timeout=self._result_timeout))
        gone = asyncio.create_task(wait_for_disconnect(request))
        done, _ = await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if waiting not in done:
            waiting.cancel()
            await cancel_all(self.client, ids, plan.model)
            self.metrics.outcome(plan.endpoint, "client_disconnected", len(ids))
            return Response(status_code=CLIENT_CLOSED)
        try:
            results = waiting.result()
        except TimeoutError:
            await cancel_all(self.client, ids, plan.model)
            raise APIError(
                504, "No answer within the request timeout.", type="timeout_error", code=ErrorCode.DEADLINE
            ) from None
        completions = [results[i] for i in ids]
        for completion in completions:
            self.metrics.finished(plan.endpoint, completion, streamed=False)
        for completion in completions:
            try:
                completion.raise_for_error()
            except RequestFailed as exc:
                raise from_request_failed(exc) from None
        return JSONResponse(full_response(plan, completions), headers={REQUEST_IDS_HEADER: ",".join(ids)})
