"""`tokenrelay batch --http URL`: the same JSONL file run through a gateway's Batch API instead of Redis.

Uploads the file (/v1/files), creates the batch (/v1/batches), follows its counts on the progress bar and
writes the output as the direct mode does: every line to OUTPUT (answers and failures), the failures also
to the errors file. The batch runs on the server: this process may stop at any time (Ctrl-C cancels the
batch and writes what finished; a killed process leaves it running, and `--batch-id` picks it up again).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from producer.batch.files import BatchInputError, scan_input
from producer.batch.runner import URLS, BatchSummary

TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass(slots=True)
class HTTPBatch:
    base_url: str
    api_key: str | None = None
    poll_s: float = 0.5
    completion_window: str = "24h"
    timeout_s: float = 60.0

    def client(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.AsyncClient(base_url=self.base_url.rstrip("/"), headers=headers, timeout=self.timeout_s)


def endpoint_of(path: Path) -> str:
    """The one endpoint every line names (a batch over HTTP has one, as OpenAI's do)."""
    urls = set()
    with path.open("rb") as source:
        for number, raw in enumerate(source, start=1):
            if raw.strip():
                record = json.loads(raw)
                urls.add(record.get("url") if isinstance(record, dict) else None)
                if len(urls) > 1:
                    raise BatchInputError(f"{path}:{number}: --http runs one endpoint per batch; lines name {urls}")
    (url,) = urls or {None}
    if url not in URLS:
        raise BatchInputError(f"{path}: url {url!r} is not one of {', '.join(URLS)}")
    return str(url)


async def _checked(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            error = response.json().get("error", {})
        except ValueError:
            error = {"message": response.text[:300]}
        raise BatchInputError(f"the gateway answered {response.status_code}: {error.get('message')}")
    return response.json()


async def run_http_batch(
    input_path: Path,
    output_path: Path,
    errors_path: Path,
    options: HTTPBatch,
    batch_id: str | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> BatchSummary:
    started = time.monotonic()
    scan = scan_input(input_path)
    endpoint = endpoint_of(input_path)
    stop = stop or asyncio.Event()
    summary = BatchSummary(total=scan.lines)
    async with options.client() as http:
        if batch_id is None:
            with input_path.open("rb") as handle:
                uploaded = await _checked(
                    await http.post(
                        "/v1/files",
                        files={"file": (input_path.name, handle, "application/jsonl")},
                        data={"purpose": "batch"},
                    )
                )
            body = {
                "input_file_id": uploaded["id"],
                "endpoint": endpoint,
                "completion_window": options.completion_window,
            }
            batch = await _checked(await http.post("/v1/batches", json=body))
            batch_id = str(batch["id"])
        if on_start is not None:
            on_start(scan.lines, 0)
        shown = 0
        while True:
            batch = await _checked(await http.get(f"/v1/batches/{batch_id}"))
            counts = batch.get("request_counts") or {}
            done = int(counts.get("completed", 0)) + int(counts.get("failed", 0))
            if on_progress is not None and done > shown:
                on_progress(done - shown)
                shown = done
            if batch["status"] in TERMINAL:
                break
            if stop.is_set() and batch["status"] not in ("cancelling",):
                summary.interrupted = True
                await _checked(await http.post(f"/v1/batches/{batch_id}/cancel"))
            if stop.is_set():
                await asyncio.sleep(options.poll_s)
                continue
            try:
                await asyncio.wait_for(stop.wait(), options.poll_s)
            except TimeoutError:
                pass
        if batch["status"] == "failed":
            first = ((batch.get("errors") or {}).get("data") or [{}])[0]
            raise BatchInputError(f"the batch failed validation: line {first.get('line')}: {first.get('message')}")
        output = await _content(http, batch.get("output_file_id"))
        errors = await _content(http, batch.get("error_file_id"))
    output_path.write_bytes(output + errors)
    errors_path.write_bytes(errors)
    summary.succeeded = output.count(b"\n")
    summary.failed = errors.count(b"\n")
    summary.interrupted = summary.interrupted or batch["status"] != "completed"
    summary.elapsed_s = round(time.monotonic() - started, 3)
    return summary


async def _content(http: httpx.AsyncClient, file_id: str | None) -> bytes:
    if not file_id:
        return b""
    response = await http.get(f"/v1/files/{file_id}/content")
    if response.status_code >= 400:
        raise BatchInputError(f"the gateway answered {response.status_code} for {file_id}")
    return response.content
