"""create_app: the FastAPI application with its Redis clients, API keys, metrics, error handlers and webhook
delivery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from producer.async_client import AsyncClient
from producer.connection import connect, connect_async
from producer.gateway.auth import APIKeys
from producer.gateway.batches_api import router as batches_router
from producer.gateway.errors import APIError
from producer.gateway.files_api import router as files_router
from producer.gateway.metrics import GatewayMetrics, MetricsMiddleware
from producer.gateway.responses_api import router as responses_router
from producer.gateway.routes import router
from producer.gateway.service import Gateway
from producer.gateway.settings import GatewaySettings
from producer.metrics import FleetCollector
from producer.webhooks.deliverer import Deliverer
from producer.webhooks.metrics import WebhookMetrics


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings.from_env()
    keys = APIKeys.load(settings.api_key_file)
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    admin = connect(settings.redis_url, socket_connect_timeout=5, socket_timeout=10)
    registry.register(FleetCollector(lambda: admin, settings.prefix, partitions=settings.partitions))
    endpoints, delivery = settings.webhooks()
    webhook_metrics = WebhookMetrics(registry) if endpoints else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # on one Redis the open streams' blocking reads share one XREAD (producer.read_mux); on a cluster each
        # holds a pool connection, and past the pool's size requests wait for one
        redis_client = connect_async(
            settings.redis_url,
            max_connections=settings.redis_connections,
            pool_timeout=30,
            socket_connect_timeout=5,
            socket_timeout=11,
        )
        client = AsyncClient(
            settings.redis_url,
            prefix=settings.prefix,
            max_queue_depth=settings.max_queue_depth,
            partitions=settings.partitions,
            multiplex_reads=settings.multiplex_reads,
            client=redis_client,
        )
        app.state.gateway = gateway = Gateway(settings, client, admin, keys, metrics)
        sweeps = asyncio.create_task(gateway.batches.run_sweeps(settings.batch_sweep_s))
        # every replica delivers: the outbox's consumer groups share the work out, and no replica is special
        deliverer = Deliverer(redis_client, endpoints, delivery, webhook_metrics) if webhook_metrics else None
        if deliverer is not None:
            deliverer.start()
        try:
            yield
        finally:
            sweeps.cancel()
            await asyncio.gather(sweeps, return_exceptions=True)
            if deliverer is not None:
                await deliverer.stop()
            await client.close()
            admin.close()

    app = FastAPI(
        title="tokenrelay",
        summary="OpenAI-compatible gateway over Redis Streams",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.add_exception_handler(APIError, api_error_handler)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(APIError(400, str(exc)[:500]).body(), status_code=400)

    app.add_exception_handler(RequestValidationError, unexpected)
    app.include_router(router)
    app.include_router(files_router)
    app.include_router(batches_router)
    app.include_router(responses_router)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
