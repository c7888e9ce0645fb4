"""The batch runner: a bounded window of requests in flight, results gathered over one connection.

Request ids are derived from the line, the choice and the output file, so a rerun after a kill
finds the requests the killed run left in Redis (submit is idempotent) and reads their answers
instead of computing them again.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.async_client import AsyncClient
from producer.batch.files import ResultWriter, done_ids, read_input, scan_input
from producer.batch.gather import Gatherer
from producer.client import ClientConfig
from producer.connection import connect_async
from producer.errors import ProtocolError, QueueFull, RequestFailed
from producer.gateway.errors import APIError, from_protocol_error, from_request_failed, invalid, model_not_found
from producer.gateway.requests import GenerationPlan, parse_chat, parse_completion
from producer.gateway.responses import full_response
from producer.protocol import FinishReason, Keys, Priority, Request

URLS = ("/v1/completions", "/v1/chat/completions")


@dataclass(slots=True)
class BatchSummary:
    total: int = 0  # lines in the input
    skipped: int = 0  # already in the output from an earlier run
    succeeded: int = 0
    failed: int = 0
    interrupted: bool = False
    elapsed_s: float = 0.0


@dataclass(slots=True)
class BatchOptions:
    window: int = 256  # requests (choices) in flight at once
    request_timeout_s: float = 3600.0
    priority: Priority = Priority.LOW  # bulk work yields to interactive traffic by default
    max_choices: int = 128
    default_max_tokens: int = 1024
    queue_full_backoff_s: float = 1.0


def plan_line(record: dict[str, Any], options: BatchOptions) -> GenerationPlan:
    """The GenerationPlan of one batch input line (method, url, body), or the APIError the gateway would answer."""
    if record.get("method", "POST") != "POST":
        raise invalid("method", "must be POST")
    url, body = record.get("url"), record.get("body")
    if url == "/v1/completions":
        plan = parse_completion(body, options.max_choices)
    elif url == "/v1/chat/completions":
        plan = parse_chat(body, options.max_choices, options.default_max_tokens)
    else:
        raise invalid("url", f"must be one of {', '.join(URLS)}")
    if plan.stream:
        raise invalid("body.stream", "streaming is not available in a batch")
    return plan


class BatchRunner:
    def __init__(
        self,
        client: AsyncClient,
        writer: ResultWriter,
        options: BatchOptions,
        salt: str,
        on_line: Callable[[bool], None],
    ) -> None:
        self.client, self.writer, self.options = client, writer, options
        self.salt = salt  # ties request ids to this output file
        self.on_line = on_line  # called with success after each line is written
        self.window = asyncio.Semaphore(options.window)
        self.gatherer = Gatherer(client.redis, client.config.prefix)
        self.in_flight: dict[str, str] = {}  # request id -> model, for cancelling on interrupt
        self.summary = BatchSummary()
        self._models: set[str] = set()

    def _request_ids(self, raw: bytes, choices: int, attempt: int) -> list[str]:
        base = hashlib.sha256(self.salt.encode() + b"\0" + raw + b"\0" + str(attempt).encode()).hexdigest()
        return [hashlib.sha256(f"{base}:{i}".encode()).hexdigest()[:32] for i in range(choices)]

    async def _known_model(self, model: str) -> bool:
        if model not in self._models:
            members: Any = await self.client.redis.smembers(Keys("x", self.client.config.prefix).models)
            self._models = {m.decode() if isinstance(m, bytes) else str(m) for m in members}
        return model in self._models

    async def run_line(self, record: dict[str, Any]) -> None:
        custom_id = record["custom_id"]
        try:
            plan = plan_line(record, self.options)
            if not await self._known_model(plan.model):
                raise model_not_found(plan.model)
            completions, request_ids = await self._generate(plan, record)
            body = full_response(plan, completions)
            self._write(custom_id, 200, request_ids[0], body, None)
        except APIError as exc:
            error = {"code": exc.code or exc.type, "message": exc.message}
            self._write(custom_id, exc.status, "", exc.body(), error)

    async def _generate(self, plan: GenerationPlan, record: dict[str, Any]) -> tuple[list[Any], list[str]]:
        raw = json.dumps(record, sort_keys=True).encode()
        for attempt in range(3):
            request_ids = self._request_ids(raw, plan.choices, attempt)
            requests = self._requests(plan, request_ids)
            slots = min(plan.choices, self.options.window)  # a line wider than the window runs alone
            for _ in range(slots):
                await self.window.acquire()
            try:
                await self._submit(requests)
                for request_id in request_ids:
                    self.in_flight[request_id] = plan.model
                completions = await self.gatherer.wait(
                    Keys(plan.model, self.client.config.prefix),
                    request_ids,
                    self.options.request_timeout_s + 30,
                    self.client.config.partitions,
                )
            finally:
                for request_id in request_ids:
                    self.in_flight.pop(request_id, None)
                for _ in range(slots):
                    self.window.release()
            # a request an interrupted run cancelled is found again by its id: run it anew
            if not any(c.finish_reason == FinishReason.CANCELLED for c in completions):
                break
        for completion in completions:
            try:
                completion.raise_for_error()
            except RequestFailed as exc:
                raise from_request_failed(exc) from None
        return completions, request_ids

    def _requests(self, plan: GenerationPlan, request_ids: list[str]) -> list[Request]:
        try:
            return plan.requests(
                request_ids, stream=False, priority=self.options.priority, timeout=self.options.request_timeout_s
            )
        except ProtocolError as exc:
            raise from_protocol_error(exc) from None

    async def _submit(self, requests: list[Request]) -> None:
        """Submits, waiting out a full queue (the ids make a retried submit a no-op for what got in)."""
        while True:
            try:
                await self.client.submit_requests(requests)
                return
            except QueueFull:
                await asyncio.sleep(self.options.queue_full_backoff_s)

    def _write(
        self, custom_id: str, status: int, request_id: str, body: dict[str, Any], error: dict[str, Any] | None
    ) -> None:
        self.writer.write(
            {
                "id": f"batch_req_{secrets.token_hex(12)}",
                "custom_id": custom_id,
                "response": {"status_code": status, "request_id": request_id, "body": body},
                "error": error,
            }
        )
        if error is None:
            self.summary.succeeded += 1
        else:
            self.summary.failed += 1
        self.on_line(error is None)

    async def cancel_in_flight(self, in_flight: dict[str, str]) -> None:
        for request_id, model in in_flight.items():
            try:
                await self.client.cancel(request_id, model=model)
            except Exception:  # noqa: BLE001, S110 - best effort on the way out; deadlines end the rest
                pass


async def run_batch_async(
    input_path: Path,
    output_path: Path,
    client: AsyncClient,
    options: BatchOptions,
    errors_path: Path | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_line: Callable[[bool], None] | None = None,
    stop: asyncio.Event | None = None,
) -> BatchSummary:
    started = time.monotonic()
    scan = scan_input(input_path)  # raises BatchInputError before anything is sent
    done = done_ids(output_path) & scan.custom_ids
    if on_start is not None:
        on_start(scan.lines, len(done))
    writer = ResultWriter(output_path, errors_path or default_errors_path(output_path))
    runner = BatchRunner(client, writer, options, str(output_path.resolve()), on_line or (lambda ok: None))
    runner.summary.total, runner.summary.skipped = scan.lines, len(done)
    tasks: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []
    stop = stop or asyncio.Event()
    gatherer = asyncio.create_task(runner.gatherer.run())
    stopping = asyncio.create_task(stop.wait())
    try:
        for record in read_input(input_path):
            if stop.is_set():
                break
            if record["custom_id"] in done:
                continue
            # wait for room before reading on: the file is never read ahead of the window
            while len(tasks) >= options.window and not stop.is_set():
                await asyncio.wait(tasks | {stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                break
            task = asyncio.create_task(runner.run_line(record))
            tasks.add(task)
            task.add_done_callback(functools.partial(_settle, tasks, failures, stop))
        while tasks and not stop.is_set():
            await asyncio.wait(tasks | {stopping}, return_when=asyncio.FIRST_COMPLETED)
        if failures:
            raise failures[0]  # Redis went away for good: stop here, a rerun resumes
    finally:
        stopping.cancel()
        if stop.is_set() or tasks:
            runner.summary.interrupted = True
            in_flight = dict(runner.in_flight)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await runner.cancel_in_flight(in_flight)
        gatherer.cancel()
        await asyncio.gather(gatherer, return_exceptions=True)
        writer.close()
        runner.summary.elapsed_s = round(time.monotonic() - started, 3)
    return runner.summary


def _settle(
    tasks: set[asyncio.Task[None]], failures: list[BaseException], stop: asyncio.Event, task: asyncio.Task[None]
) -> None:
    tasks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        failures.append(task.exception())  # type: ignore[arg-type]
        stop.set()


def batch_client(
    redis_url: str | None, prefix: str | None, partitions: int | None = None, max_connections: int = 16
) -> AsyncClient:
    """An AsyncClient whose pool waits for a free connection: a window of lines submits concurrently."""
    url = ClientConfig.from_env(redis_url=redis_url).redis_url
    client = connect_async(url, max_connections=max_connections, socket_connect_timeout=5, socket_timeout=11)
    return AsyncClient(url, prefix=prefix, partitions=partitions, client=client)


def default_errors_path(output_path: Path) -> Path:
    return output_path.with_name(output_path.name.removesuffix(".jsonl") + ".errors.jsonl")


def run_batch(
    input_path: str | Path,
    output_path: str | Path,
    redis_url: str | None = None,
    *,
    errors_path: str | Path | None = None,
    prefix: str | None = None,
    options: BatchOptions | None = None,
) -> BatchSummary:
    """Blocking: runs the whole file (resuming from the output), returns the counts (Celery calls this)."""

    async def go() -> BatchSummary:
        async with batch_client(redis_url, prefix) as client:
            return await run_batch_async(
                Path(input_path),
                Path(output_path),
                client,
                options or BatchOptions(),
                Path(errors_path) if errors_path else None,
            )

    return asyncio.run(go())
