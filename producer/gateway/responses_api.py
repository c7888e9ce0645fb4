"""HTTP routes of the Responses API: /v1/responses and /v1/responses/{response_id}[/cancel|/input_items]."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from producer.gateway.errors import unsupported
from producer.gateway.responses_service import Responses
from producer.gateway.routes import _json_body

router = APIRouter()


def _responses(request: Request) -> Responses:
    return Responses(request.app.state.gateway)


@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    responses = _responses(request)
    responses.owner(request)  # a 401 before the body is read
    return await responses.create(await _json_body(request), request)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(
    request: Request,
    response_id: str,
    stream: bool = False,
    starting_after: int | None = None,
    include: Annotated[list[str] | None, Query()] = None,
    include_obfuscation: bool | None = None,
) -> Response:
    """The response now, or (`stream=true`) its events after `starting_after`, live to the end."""
    if include:
        raise unsupported("include")
    if starting_after is not None and not stream:
        raise unsupported("starting_after", "is only allowed with stream=true")
    responses = _responses(request)
    record = await responses.find(response_id, request)
    if stream:
        return await responses.stream(record, starting_after)
    return JSONResponse(await responses.retrieve(record))


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(request: Request, response_id: str) -> Response:
    responses = _responses(request)
    return JSONResponse(await responses.cancel(await responses.find(response_id, request)))


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> Response:
    responses = _responses(request)
    return JSONResponse(await responses.delete(await responses.find(response_id, request)))


def _part(message: dict[str, str]) -> dict[str, object]:
    if message["role"] == "assistant":
        return {"type": "output_text", "text": message["content"], "annotations": []}
    return {"type": "input_text", "text": message["content"]}


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    request: Request,
    response_id: str,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    include: Annotated[list[str] | None, Query()] = None,
) -> Response:
    """The items this response was given (its own input, without the instructions or earlier turns)."""
    if include:
        raise unsupported("include")
    responses = _responses(request)
    record = await responses.find(response_id, request)
    items = [
        {
            "id": f"msg_{record.request_id}_{index}",
            "type": "message",
            "role": message["role"],
            "status": "completed",
            "content": [_part(message)],
        }
        for index, message in enumerate(record.input)
    ]
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return JSONResponse(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )
