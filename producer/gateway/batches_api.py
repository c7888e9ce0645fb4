"""HTTP routes of the Batch API: /v1/batches (create, list), /v1/batches/{id} (retrieve), .../cancel."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from producer.gateway.errors import invalid
from producer.gateway.idempotency import HEADER
from producer.gateway.routes import _json_body, caller

router = APIRouter()


@router.post("/v1/batches")
async def create_batch(request: Request) -> Response:
    gateway, owner = caller(request)
    body = await _json_body(request)

    async def create() -> str:
        return str((await gateway.batches.create(body, owner))["id"])

    created = await gateway.idempotency.run(
        "POST /v1/batches", owner, request.headers.get(HEADER), create, lambda i: gateway.batches.get(i, owner)
    )
    return JSONResponse(created)


@router.get("/v1/batches")
async def list_batches(request: Request) -> Response:
    gateway, owner = caller(request)
    raw_limit = request.query_params.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise invalid("limit", "must be an integer from 1 to 100")
    listed = await gateway.batches.list(owner, request.query_params.get("after") or None, int(raw_limit))
    return JSONResponse(listed)


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(request: Request, batch_id: str) -> Response:
    gateway, owner = caller(request)
    return JSONResponse(await gateway.batches.get(batch_id, owner))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> Response:
    gateway, owner = caller(request)
    return JSONResponse(await gateway.batches.cancel(batch_id, owner))
