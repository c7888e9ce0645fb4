"""A multipart/form-data body read as it arrives: the file part goes to a sink chunk by chunk, small fields are kept.

Starlette's `request.form()` spools whole files before the handler runs; this feeds python_multipart's
push parser from `request.stream()` instead, so a body is never held whole and a size cap stops it early.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from producer.gateway.errors import APIError, invalid

MAX_FIELD_BYTES = 4096  # a form field other than the file (purpose, expires_after[...])
MAX_PARTS = 16


@dataclass(slots=True)
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None  # of the file part; None when the body had none


@dataclass(slots=True)
class _Part:
    name: str = ""
    filename: str | None = None
    value: bytearray = field(default_factory=bytearray)


class _Events:
    """python_multipart's callbacks, queued: they run inside a synchronous write, the sink is async."""

    def __init__(self) -> None:
        self.queue: list[tuple[str, bytes]] = []
        self.ended = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": lambda: self.queue.append(("headers", self._disposition)),
            "on_part_data": lambda data, start, end: self.queue.append(("data", bytes(data[start:end]))),
            "on_part_end": lambda: self.queue.append(("end", b"")),
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._disposition = b""

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _end(self) -> None:
        self.ended = True


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data Content-Type (a 400 for anything else)."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise APIError(400, "The body must be multipart/form-data with a boundary.", code="invalid_content_type")
    return options[b"boundary"]


def _open_part(disposition: bytes, file_field: str, form: Form) -> _Part:
    _, options = parse_options_header(disposition)
    name = options.get(b"name", b"").decode("utf-8", "replace")
    part = _Part(name=name)
    if name == file_field:
        if form.filename is not None:
            raise invalid(file_field, "the form has more than one file part")
        raw = options.get(b"filename", b"upload").decode("utf-8", "replace")
        part.filename = form.filename = raw.replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload"
    return part


async def read_form(
    body: AsyncIterator[bytes],
    boundary: bytes,
    file_field: str,
    sink: Callable[[bytes], Awaitable[None]],
    max_body: int,
    too_large: Callable[[], APIError],
    on_field: Callable[[str, str], None] = lambda name, value: None,
) -> Form:
    """Reads the whole body: `file_field`'s content goes to `sink`, other fields are returned (and passed to
    `on_field` as each ends, which may raise to refuse the upload before the file is read). A body past
    `max_body` bytes raises `too_large()` at once."""
    events = _Events()
    parser = MultipartParser(boundary, events.callbacks())  # type: ignore[arg-type]
    form, part, parts, received = Form(), _Part(), 0, 0
    async for chunk in body:
        received += len(chunk)
        if received > max_body:
            raise too_large()
        try:
            parser.write(chunk)
        except MultipartParseError as exc:
            raise APIError(400, f"The multipart body is malformed: {exc}"[:300], code="invalid_multipart") from None
        for kind, data in events.queue:
            if kind == "headers":
                parts += 1
                if parts > MAX_PARTS:
                    raise APIError(400, f"The form has more than {MAX_PARTS} parts.", code="invalid_multipart")
                part = _open_part(data, file_field, form)
            elif kind == "data" and part.filename is not None:
                await sink(data)
            elif kind == "data":
                part.value += data
                if len(part.value) > MAX_FIELD_BYTES:
                    raise invalid(part.name or "form", f"a form field is over {MAX_FIELD_BYTES} bytes")
            elif kind == "end" and part.filename is None:
                form.fields[part.name] = part.value.decode("utf-8", "replace")
                on_field(part.name, form.fields[part.name])
        events.queue.clear()
    if not events.ended:
        raise APIError(400, "The multipart body ended before its closing boundary.", code="invalid_multipart")
    return form
