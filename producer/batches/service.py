"""Batches: create (validate, then start on the queue), retrieve, list, cancel, and the sweep that any
gateway replica runs (expiry, a validation whose gateway died, output files).

No replica owns a batch. The one that accepts a create validates the file and starts the batch under a
lease; if it dies before the start, any replica's sweep takes the lease over and validates again (the
request ids are derived from the batch and the line, so a replayed start queues nothing twice). Once
started, the batch runs in the workers' scripts (producer.batches.ledger) whatever happens to gateways.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from producer.batch.runner import URLS, BatchOptions
from producer.batches import ledger
from producer.batches.objects import TERMINAL, batch_object, check_metadata, not_found, parse_window
from producer.batches.outputs import Files, Outputs
from producer.batches.validate import Checked, check_lines, first_model
from producer.connection import AsyncRedis, as_text, register_script
from producer.gateway.errors import APIError, invalid
from producer.protocol import DEFAULT_RESULT_TTL_S, FinishReason, JobKeys, Keys, Priority, done_event, partition_of

log = structlog.get_logger(__name__)

RENDER_MARGIN_S = 86_400  # the input file is kept at least this long past the batch's window
_WRITE_CHUNK = 500  # lines per pipeline while a validated file is written to its ledger


@dataclass(slots=True, frozen=True)
class BatchConfig:
    window: int = 256  # lines of one batch in flight at once
    max_lines: int = 50_000  # OpenAI's limit
    max_window_s: int = 7 * 86_400  # the longest completion_window accepted ("24h" is OpenAI's only one)
    priority: Priority = Priority.LOW
    keep_s: int = 30 * 86_400  # how long a batch object is kept after its creation
    output_ttl_s: int = 30 * 86_400  # output and error files, from the batch's end
    result_ttl_s: int = DEFAULT_RESULT_TTL_S  # owner records and result streams of the lines (the workers')
    lease_s: int = 30  # validation lease; a create whose gateway is silent this long is validated again
    default_max_tokens: int = 1024
    max_choices: int = 128

    def options(self) -> BatchOptions:
        return BatchOptions(
            window=self.window,
            priority=self.priority,
            default_max_tokens=self.default_max_tokens,
            max_choices=self.max_choices,
        )


class Batches:
    """The Batch API over Redis, for one gateway process (any number of them share the work)."""

    def __init__(
        self,
        redis: AsyncRedis,
        files: Files,
        served: Callable[[], Awaitable[set[str]]],
        prefix: str,
        partitions: int,
        config: BatchConfig,
    ) -> None:
        self.redis, self.files, self.served = redis, files, served
        self.prefix, self.partitions, self.config = prefix, partitions, config
        self.jobs = JobKeys(prefix)
        self.outputs = Outputs(redis, files, self.jobs, config.options(), config.output_ttl_s)
        self._tasks: set[asyncio.Task[None]] = set()
        self._scripts = {
            script: register_script(redis, script)
            for script in (ledger.START, ledger.FAIL, ledger.TAKE_LEASE, ledger.RENEW_LEASE, ledger.CLOSE, ledger.PUMP)
        }

    # -- where a batch lives ----------------------------------------------------------------------------

    def _keys(self, model: str, batch_hex: str) -> Keys:
        return Keys(model, self.prefix, partition_of(batch_hex, self.partitions))

    async def _ledger(self, batch_id: str) -> str | None:
        where = await self.redis.hget(self.jobs.batch_models, batch_id)
        if where is None:
            return None
        partition, _, model = as_text(where).partition(":")
        return Keys(model, self.prefix, int(partition)).batch(batch_id)

    async def _fields(self, batch_id: str, owner: str) -> tuple[str, dict[str, str]]:
        key = await self._ledger(batch_id) if batch_id.startswith("batch_") else None
        raw = await self.redis.hgetall(key) if key else {}
        fields = {as_text(k): as_text(v) for k, v in raw.items()}
        if not fields or fields.get("owner", "") != owner:
            raise not_found(batch_id)
        assert key is not None
        return key, fields

    # -- create -----------------------------------------------------------------------------------------

    async def create(self, body: Any, owner: str) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.")
        endpoint = body.get("endpoint")
        if endpoint not in URLS:
            raise invalid("endpoint", f"must be one of {', '.join(URLS)}", code="unsupported_endpoint")
        window_s = parse_window(body.get("completion_window", "24h"), self.config.max_window_s)
        metadata = check_metadata(body.get("metadata"))
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise invalid("input_file_id", "must name a file uploaded with purpose 'batch'")
        try:
            source = await self.files.get(input_file_id, owner)
        except APIError as exc:
            if exc.status == 404:
                raise APIError(404, exc.message, param="input_file_id", code="file_not_found") from None
            raise
        if source.get("purpose") != "batch":
            raise invalid("input_file_id", f"the file's purpose is {source.get('purpose')!r}, not 'batch'")
        await self._keep_input(input_file_id, window_s + RENDER_MARGIN_S)
        raw = [line async for line in self.files.lines(input_file_id, owner)]
        batch_hex = secrets.token_hex(16)
        batch_id = f"batch_{batch_hex}"
        model = first_model(raw)
        now = int(time.time())
        token = secrets.token_hex(8)
        # a file naming no usable model still gets a ledger (that fails at once) under a stand-in model name
        keys = self._keys(model if model and _valid_model(model) else "-", batch_hex)
        key = keys.batch(batch_id)
        fields: dict[str, Any] = {
            "id": batch_id,
            "status": "validating",
            "endpoint": endpoint,
            "model": model or "",
            "input_file_id": input_file_id,
            "completion_window": body.get("completion_window", "24h"),
            "created_at": now,
            "expires_at": now + window_s,
            "metadata": json.dumps(metadata) if metadata is not None else "",
            "owner": owner,
            "window": self.config.window,
            "total": 0,
            "completed": 0,
            "failed": 0,
            "inflight": 0,
            "queue": keys.queue(self.config.priority),
            "prio": self.config.priority.value,
            "req_prefix": keys.request_prefix,
            "res_prefix": keys.result_prefix,
            "ttl": self.config.result_ttl_s,
            "keep": self.config.keep_s,
            "events": keys.events,
            "validator": token,
            "lease_until": now + self.config.lease_s,
        }
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # str and int values
        pipe.expire(key, self.config.keep_s)
        await pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.jobs.batch_models, batch_id, f"{keys.partition}:{keys.model}")
        pipe.zadd(self.jobs.batches, {batch_id: time.time()})
        pipe.zadd(self.jobs.batches_active, {batch_id: now + window_s})
        if model is None or model not in await self.served():
            pipe.sadd(self.jobs.outboxes, keys.events)  # no worker's model: delivery would not look there
        await pipe.execute()
        log.info("batch created", batch_id=batch_id, model=model, lines=len(raw), input_file_id=input_file_id)
        self._spawn(self._validate(batch_id, key, token, raw))
        return batch_object({k: str(v) for k, v in fields.items()})

    async def _keep_input(self, file_id: str, seconds: int) -> None:
        """The output is rendered from the input file: it must outlive the batch's window."""
        left: Any = await self.redis.ttl(self.jobs.file(file_id))
        if 0 <= left < seconds:
            pipe = self.redis.pipeline(transaction=False)
            pipe.expire(self.jobs.file(file_id), seconds)
            pipe.expire(self.jobs.file_data(file_id), seconds)
            pipe.hset(self.jobs.file(file_id), "expires_at", int(time.time()) + seconds)
            await pipe.execute()

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:  # a Redis outage mid-validation: the lease runs out and a sweep retries
                log.exception("batch validation failed; a sweep retries it")

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _validate(self, batch_id: str, key: str, token: str, raw: list[bytes] | None = None) -> None:
        fields = {as_text(k): as_text(v) for k, v in (await self.redis.hgetall(key)).items()}
        if raw is None:
            raw = [line async for line in self.files.lines(fields["input_file_id"], fields.get("owner", ""))]
        served = await self.served()
        checked: Checked = await asyncio.to_thread(
            check_lines,
            raw,
            fields["endpoint"],
            batch_id.removeprefix("batch_"),
            served,
            self.config.options(),
            self.config.max_lines,
            float(fields["expires_at"]),
        )
        if checked.error_count:
            errors = json.dumps([e.as_dict() for e in checked.errors])
            status = await self._script(ledger.FAIL, key, ledger.FAIL_ARGV.args(token=token, errors=errors))
            log.info("batch failed validation", batch_id=batch_id, errors=checked.error_count, status=as_text(status))
            return
        if not await self._write_lines(key, token, checked):
            return
        status = await self._script(ledger.START, key, ledger.START_ARGV.args(token=token))
        log.info("batch started", batch_id=batch_id, lines=len(checked.lines), status=as_text(status))

    async def _write_lines(self, key: str, token: str, checked: Checked) -> bool:
        """The validated lines into the ledger, in chunks, renewing the lease; False: the lease was lost."""
        keep = self.config.keep_s
        await self.redis.delete(key + ":todo", key + ":req", key + ":left")
        lines = checked.lines
        for start in range(0, len(lines), _WRITE_CHUNK):
            renewed = await self._script(
                ledger.RENEW_LEASE, key, ledger.TAKE_LEASE_ARGV.args(token=token, lease_s=self.config.lease_s)
            )
            if not renewed:
                return False
            pipe = self.redis.pipeline(transaction=False)
            chunk = range(start, min(start + _WRITE_CHUNK, len(lines)))
            pipe.rpush(key + ":todo", *chunk)
            pipe.hset(key + ":left", mapping={str(i): len(lines[i]) for i in chunk})
            pipe.hset(
                key + ":req",
                mapping={
                    f"{i}.{k}": request.request_id.encode() + request.encode()
                    for i in chunk
                    for k, request in enumerate(lines[i])
                },
            )
            for suffix in (":todo", ":left", ":req"):  # a validation cut short leaves nothing without a TTL
                pipe.expire(key + suffix, keep)
            await pipe.execute()
        await self.redis.hset(key, "total", len(lines))
        return True

    async def _script(self, script: str, key: str, args: list[Any]) -> Any:
        return await self._scripts[script]([key], args)

    # -- read, list, cancel -----------------------------------------------------------------------------

    async def get(self, batch_id: str, owner: str) -> dict[str, Any]:
        key, fields = await self._fields(batch_id, owner)
        if fields.get("status") in ("in_progress",) and time.time() >= float(fields.get("expires_at") or 0):
            await self._close(key, "expired")
            _, fields = await self._fields(batch_id, owner)
        return batch_object(fields)

    async def list(self, owner: str, after: str | None, limit: int) -> dict[str, Any]:
        start = 0
        if after:
            rank: Any = await self.redis.zrevrank(self.jobs.batches, after)
            if rank is None:
                raise invalid("after", f"no batch {after[:80]!r} to list after")
            start = rank + 1
        data: list[dict[str, Any]] = []
        has_more = False
        while len(data) <= limit:
            ids = [as_text(i) for i in await self.redis.zrevrange(self.jobs.batches, start, start + 99)]
            if not ids:
                break
            start += len(ids)
            for batch_id in ids:
                try:
                    found = batch_object((await self._fields(batch_id, owner))[1])
                except APIError:
                    continue  # another caller's, or expired: the index is pruned by the sweep
                if len(data) == limit:
                    has_more = True
                    break
                data.append(found)
            if has_more:
                break
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }

    async def cancel(self, batch_id: str, owner: str) -> dict[str, Any]:
        key, fields = await self._fields(batch_id, owner)
        if fields.get("status") in ("completed", "failed", "expired"):
            raise APIError(
                409, f"Cannot cancel a batch with status '{fields['status']}'.", code="batch_not_cancellable"
            )
        status = await self._close(key, "cancelled")
        log.info("batch cancel", batch_id=batch_id, status=status)
        return batch_object((await self._fields(batch_id, owner))[1])

    async def _close(self, key: str, reason: str) -> str:
        model_keys = key.rsplit(":batch:", 1)[0]
        cancelled = done_event(FinishReason.CANCELLED, {}, worker="batch")
        args = ledger.CLOSE_ARGV.args(reason=reason, cancelled_payload=cancelled, cancel_prefix=f"{model_keys}:cancel:")
        return as_text(await self._script(ledger.CLOSE, key, args))

    # -- the sweep --------------------------------------------------------------------------------------

    async def sweep(self) -> dict[str, int]:
        """One pass over the active batches; safe on every replica at once (each step is a script or a lease)."""
        counts = {"expired": 0, "taken_over": 0, "rendered": 0}
        now = time.time()
        active: Any = await self.redis.zrange(self.jobs.batches_active, 0, -1, withscores=True)
        for raw_id, _ in active:
            batch_id = as_text(raw_id)
            key = await self._ledger(batch_id)
            values = await self.redis.hmget(key, "status", "lease_until", "expires_at") if key else [None] * 3
            status = as_text(values[0]) if values[0] is not None else None
            if key is None or status is None:
                await self.redis.zrem(self.jobs.batches_active, batch_id)
            elif status in TERMINAL:
                if await self.outputs.render(batch_id, key) == "done":
                    counts["rendered"] += 1
                await self.redis.zrem(self.jobs.batches_active, batch_id)
            elif status == "validating" and float(as_text(values[1] or 0)) < now:
                token = secrets.token_hex(8)
                args = ledger.TAKE_LEASE_ARGV.args(token=token, lease_s=self.config.lease_s)
                if await self._script(ledger.TAKE_LEASE, key, args):
                    log.warning("batch validation taken over: its gateway went silent", batch_id=batch_id)
                    counts["taken_over"] += 1
                    self._spawn(self._validate(batch_id, key, token))
            elif status == "in_progress" and now >= float(as_text(values[2] or 0)):
                await self._close(key, "expired")
                log.info("batch expired", batch_id=batch_id)
                counts["expired"] += 1
            elif status == "in_progress":
                await self._script(ledger.PUMP, key, [])
        return counts

    async def run_sweeps(self, interval_s: float) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # Redis away for a moment: the next pass tries again
                log.warning("batch sweep failed", exc_info=True)
            await asyncio.sleep(interval_s)

    # -- output files -----------------------------------------------------------------------------------

    async def materialize(self, file_id: str, owner: str) -> bool:
        """The FileStore's resolver: renders a finished batch's output files when one is first asked for (or
        waits while another replica renders them)."""
        match = re.match(r"^file-(batch_[0-9a-f]{32})-(output|errors)$", file_id)
        if not match:
            return False
        key = await self._ledger(match.group(1))
        if key is None or await self.redis.hget(key, "owner") != owner.encode():
            return False
        return await self.outputs.wait_rendered(match.group(1), key)


def _valid_model(model: str) -> bool:
    try:
        Keys(model)
    except ValueError:
        return False
    return True
