"""OpenAI's Files API: POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET /v1/files/{id}/content."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from producer.gateway.errors import APIError, invalid, unsupported
from producer.gateway.files import MAX_EXPIRES_S, MIN_EXPIRES_S, FilePurpose, FileStore
from producer.gateway.idempotency import HEADER
from producer.gateway.multipart import boundary_of, read_form
from producer.gateway.routes import caller
from producer.gateway.service import CLIENT_CLOSED

router = APIRouter()
FORM_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and the small fields beside the file
UPLOAD_PURPOSES = (FilePurpose.BATCH,)
_FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")
MAX_LIST_LIMIT = 10_000


def _check_field(name: str, value: str) -> None:
    """Refuses a bad field as soon as it is read: fields sent before the file stop the upload before it."""
    if name not in _FIELDS:
        raise unsupported(name)
    if name == "purpose" and value not in UPLOAD_PURPOSES:
        raise invalid("purpose", f"{value!r} is not supported: one of {', '.join(UPLOAD_PURPOSES)}")
    if name == "expires_after[anchor]" and value != "created_at":
        raise invalid("expires_after.anchor", f"{value!r} is not supported: only 'created_at'")
    if name == "expires_after[seconds]" and not (value.isdigit() and MIN_EXPIRES_S <= int(value) <= MAX_EXPIRES_S):
        raise invalid("expires_after.seconds", f"{value!r}: an integer from {MIN_EXPIRES_S} to {MAX_EXPIRES_S}")


def _ttl(fields: dict[str, str]) -> int | None:
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if (anchor is None) != (seconds is None):
        raise invalid("expires_after", "needs both anchor and seconds")
    return None if seconds is None else int(seconds)


async def _receive(request: Request, store: FileStore, owner: str, boundary: bytes) -> str:
    """Streams the multipart body into a new file; returns its id (nothing is left behind on failure)."""
    async with store.upload(owner) as upload:
        form = await read_form(
            request.stream(),
            boundary,
            "file",
            upload.append,
            store.max_bytes + FORM_OVERHEAD_BYTES,
            store.too_large,
            _check_field,
        )
        if form.filename is None:
            raise invalid("file", "the form has no file part")
        if "purpose" not in form.fields:
            raise invalid("purpose", "is required")
        created = await upload.commit(form.filename, form.fields["purpose"], _ttl(form.fields))
        return str(created["id"])


def _preflight(request: Request, store: FileStore) -> bytes:
    """What the headers alone refuse, before a byte of the body is read; the form's boundary."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > store.max_bytes + FORM_OVERHEAD_BYTES:
        raise store.too_large()
    return boundary_of(request.headers.get("content-type"))


@router.post("/v1/files")
async def create_file(request: Request) -> Response:
    gateway, owner = caller(request)
    store = gateway.files
    try:
        boundary = _preflight(request, store)
        created = await gateway.idempotency.run(
            "POST /v1/files",
            owner,
            request.headers.get(HEADER),
            lambda: _receive(request, store, owner, boundary),
            lambda file_id: store.get(file_id, owner),
        )
    except APIError as exc:
        # the rest of the body may be large: closing spares reading it (the server would, to reuse the connection)
        exc.headers.setdefault("Connection", "close")
        raise
    except ClientDisconnect:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(created)


def _limit(raw: str | None) -> int:
    if raw is None:
        return MAX_LIST_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIST_LIMIT:
        raise invalid("limit", f"{raw!r}: an integer from 1 to {MAX_LIST_LIMIT}")
    return int(raw)


@router.get("/v1/files")
async def list_files(request: Request) -> Response:
    gateway, owner = caller(request)
    query = request.query_params
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("order", f"{order!r}: 'asc' or 'desc'")
    page = await gateway.files.list(
        owner,
        after=query.get("after") or None,
        limit=_limit(query.get("limit")),
        order=order,
        purpose=query.get("purpose") or None,
    )
    return JSONResponse(page)


@router.get("/v1/files/{file_id}")
async def retrieve_file(request: Request, file_id: str) -> Response:
    gateway, owner = caller(request)
    return JSONResponse(await gateway.files.get(file_id, owner))


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> Response:
    gateway, owner = caller(request)
    file = await gateway.files.get(file_id, owner)  # the 404 comes before the response starts
    return StreamingResponse(
        gateway.files.stream(file),
        media_type="application/octet-stream",
        headers={"Content-Length": str(file["bytes"])},
    )


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> Response:
    gateway, owner = caller(request)
    return JSONResponse(await gateway.files.delete(file_id, owner))
