"""HTTP routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import json
from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from producer.gateway.errors import APIError
from producer.gateway.requests import parse_chat, parse_completion
from producer.gateway.service import Gateway

router = APIRouter()


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def caller(request: Request) -> tuple[Gateway, str]:
    """The gateway and the caller's owner fingerprint (the 401 of a missing or wrong key): routes whose
    objects belong to the key that made them (files, batches)."""
    gateway = _gateway(request)
    return gateway, gateway.keys.owner(request.headers.get("authorization"))


# Bodies past this are refused before they are read whole: a prompt at the wire cap (1,000,000
# characters) is at most 6 MB of JSON-escaped text, and nothing bigger is worth holding in memory.
MAX_BODY_BYTES = 16 * 2**20


def _too_large() -> APIError:
    return APIError(413, f"The request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")


async def _json_body(request: Request) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}"[:300], code="invalid_json") from None


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    gateway = _gateway(request)
    gateway.authorize(request)
    plan = parse_completion(await _json_body(request), gateway.settings.max_choices)
    return await gateway.serve(plan, request)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    gateway = _gateway(request)
    gateway.authorize(request)
    plan = parse_chat(await _json_body(request), gateway.settings.max_choices, gateway.settings.default_max_tokens)
    return await gateway.serve(plan, request)


@router.get("/v1/models")
async def models(request: Request) -> Response:
    gateway = _gateway(request)
    gateway.authorize(request)
    return JSONResponse(await run_in_threadpool(gateway.list_models))


@router.get("/v1/models/{model:path}")
async def model(request: Request, model: str) -> Response:
    gateway = _gateway(request)
    gateway.authorize(request)
    listed = await run_in_threadpool(gateway.list_models)
    for entry in listed["data"]:
        if entry["id"] == model:
            return JSONResponse(entry)
    raise APIError(
        404, f"The model {model!r} does not exist or no worker serves it", param="model", code="model_not_found"
    )


@router.get("/health")
async def health(request: Request) -> Response:
    """200 when Redis answers (the gateway can queue work), 503 otherwise; live models for information."""
    gateway = _gateway(request)
    try:
        await gateway.client.redis.ping()
    except redis.RedisError as exc:
        return JSONResponse({"status": "unavailable", "redis": str(exc)[:200]}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry = _gateway(request).metrics.registry
    return Response(await run_in_threadpool(generate_latest, registry), media_type=CONTENT_TYPE_LATEST)
