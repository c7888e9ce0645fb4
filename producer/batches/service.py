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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from producer.batch.runner import URLS, BatchOptions, plan_line
from producer.batches import ledger
from producer.batches.render import Rendered, render_line
from producer.batches.validate import Checked, check_lines, first_model
from producer.connection import AsyncRedis, register_script
from producer.gateway.errors import APIError, invalid
from producer.protocol import DEFAULT_RESULT_TTL_S, FinishReason, JobKeys, Keys, Priority, done_event, partition_of

log = structlog.get_logger(__name__)

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_WINDOW = re.compile(r"^([1-9][0-9]{0,6})(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at")
RENDER_MARGIN_S = 86_400  # the input file is kept at least this long past the batch's window
RENDER_LOCK_S = 60  # one replica renders a batch's output files; another waits this long at most
_WRITE_CHUNK = 500  # lines per pipeline while a validated file is written to its ledger


class Files(Protocol):
    """What batches need of the file store (producer.gateway.files.FileStore)."""

    async def get(self, file_id: str, owner: str) -> dict[str, Any]: ...

    def lines(self, file_id: str, owner: str) -> AsyncIterator[bytes]: ...

    async def create(
        self,
        chunks: AsyncIterator[bytes],
        filename: str,
        purpose: str,
        owner: str,
        ttl_s: int | None = None,
        file_id: str | None = None,
    ) -> dict[str, Any]: ...


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


def output_file_id(batch_id: str, kind: str) -> str:
    return f"file-{batch_id}-{kind}"


def parse_window(value: Any, longest: int) -> int:
    if not isinstance(value, str) or not (match := _WINDOW.match(value)):
        raise invalid("completion_window", "must be a duration such as '24h' (digits, then s, m, h or d)")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > longest:
        raise invalid("completion_window", f"must be at most {longest} seconds")
    return seconds


def check_metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > 16
        or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in value.items()
        )
    ):
        raise invalid("metadata", "must map at most 16 keys of up to 64 characters to strings of up to 512")
    return value


def batch_object(fields: dict[str, str]) -> dict[str, Any]:
    """OpenAI's batch object from a ledger hash."""

    def number(name: str) -> int:
        return int(fields.get(name) or 0)

    def moment(name: str) -> int | None:
        return int(fields[name]) if fields.get(name) else None

    status = fields.get("status", "validating")
    completed, failed = number("completed"), number("failed")
    finished = status in TERMINAL and status != "failed"
    errors = json.loads(fields["errors"]) if fields.get("errors") else None
    input_tokens, output_tokens = number("input_tokens"), number("output_tokens")
    return {
        "id": fields["id"],
        "object": "batch",
        "endpoint": fields.get("endpoint"),
        "model": fields.get("model") or None,
        "errors": {"object": "list", "data": errors} if errors is not None else None,
        "input_file_id": fields.get("input_file_id"),
        "completion_window": fields.get("completion_window"),
        "status": status,
        "output_file_id": output_file_id(fields["id"], "output") if finished and completed else None,
        "error_file_id": output_file_id(fields["id"], "errors") if finished and failed else None,
        "created_at": number("created_at"),
        "expires_at": moment("expires_at"),
        **{name: moment(name) for name in _TIMES},
        "request_counts": {"total": number("total"), "completed": completed, "failed": failed},
        "metadata": json.loads(fields["metadata"]) if fields.get("metadata") else None,
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": number("cached_tokens")},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


def not_found(batch_id: str) -> APIError:
    return APIError(404, f"No batch found with id '{batch_id[:80]}'.", param="batch_id", code="batch_not_found")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        partition, _, model = _text(where).partition(":")
        return Keys(model, self.prefix, int(partition)).batch(batch_id)

    async def _fields(self, batch_id: str, owner: str) -> tuple[str, dict[str, str]]:
        key = await self._ledger(batch_id) if batch_id.startswith("batch_") else None
        raw = await self.redis.hgetall(key) if key else {}
        fields = {_text(k): _text(v) for k, v in raw.items()}
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
        fields = {_text(k): _text(v) for k, v in (await self.redis.hgetall(key)).items()}
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
            log.info("batch failed validation", batch_id=batch_id, errors=checked.error_count, status=_text(status))
            return
        if not await self._write_lines(key, token, checked):
            return
        status = await self._script(ledger.START, key, ledger.START_ARGV.args(token=token))
        log.info("batch started", batch_id=batch_id, lines=len(checked.lines), status=_text(status))

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
            ids = [_text(i) for i in await self.redis.zrevrange(self.jobs.batches, start, start + 99)]
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
        return _text(await self._script(ledger.CLOSE, key, args))

    # -- the sweep --------------------------------------------------------------------------------------

    async def sweep(self) -> dict[str, int]:
        """One pass over the active batches; safe on every replica at once (each step is a script or a lease)."""
        counts = {"expired": 0, "taken_over": 0, "rendered": 0}
        now = time.time()
        active: Any = await self.redis.zrange(self.jobs.batches_active, 0, -1, withscores=True)
        for raw_id, _ in active:
            batch_id = _text(raw_id)
            key = await self._ledger(batch_id)
            values = await self.redis.hmget(key, "status", "lease_until", "expires_at") if key else [None] * 3
            status = _text(values[0]) if values[0] is not None else None
            if key is None or status is None:
                await self.redis.zrem(self.jobs.batches_active, batch_id)
            elif status in TERMINAL:
                if await self.render(batch_id, key) == "done":
                    counts["rendered"] += 1
                await self.redis.zrem(self.jobs.batches_active, batch_id)
            elif status == "validating" and float(_text(values[1] or 0)) < now:
                token = secrets.token_hex(8)
                args = ledger.TAKE_LEASE_ARGV.args(token=token, lease_s=self.config.lease_s)
                if await self._script(ledger.TAKE_LEASE, key, args):
                    log.warning("batch validation taken over: its gateway went silent", batch_id=batch_id)
                    counts["taken_over"] += 1
                    self._spawn(self._validate(batch_id, key, token))
            elif status == "in_progress" and now >= float(_text(values[2] or 0)):
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
        waited_until = time.monotonic() + RENDER_LOCK_S
        while (state := await self.render(match.group(1), key)) == "busy" and time.monotonic() < waited_until:
            await asyncio.sleep(0.05)
        return state == "done"

    async def render(self, batch_id: str, key: str) -> str:
        """Writes the output and error files of a finished batch, once: "done" when they exist (now or
        before), "busy" while another replica writes them, "none" for a batch that has no output."""
        fields = {_text(k): _text(v) for k, v in (await self.redis.hgetall(key)).items()}
        if fields.get("rendered"):
            return "done"
        if fields.get("status") not in TERMINAL or fields.get("status") == "failed":
            return "none"
        if not await self.redis.set(key + ":render", "1", nx=True, ex=RENDER_LOCK_S):
            return "busy"
        try:
            rendered = await self._render(batch_id, key, fields)
            owner = fields.get("owner", "")
            for kind, lines in (("output", rendered.output), ("errors", rendered.errors)):
                if lines:
                    file_id = output_file_id(batch_id, kind)
                    # what a renderer that died under an expired lock left half written
                    await self.redis.delete(self.jobs.file_data(file_id))
                    await self.files.create(
                        _chunks(lines),
                        f"{batch_id}_{kind}.jsonl",
                        "batch_output",
                        owner,
                        ttl_s=self.config.output_ttl_s,
                        file_id=file_id,
                    )
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(key, "rendered", int(time.time()))
            pipe.delete(key + ":out")
            await pipe.execute()
            log.info(
                "batch output written", batch_id=batch_id, output=len(rendered.output), errors=len(rendered.errors)
            )
            return "done"
        finally:
            await self.redis.delete(key + ":render")

    async def _render(self, batch_id: str, key: str, fields: dict[str, str]) -> Rendered:
        rendered = Rendered()
        options = self.config.options()
        closing = fields.get("closing") or None
        batch_hex = batch_id.removeprefix("batch_")
        index = 0
        async for raw in self.files.lines(fields["input_file_id"], fields.get("owner", "")):
            if not raw.strip():
                continue
            record = json.loads(raw)
            plan = plan_line(record, options)  # validated before the batch started: this cannot fail now
            names = [f"{index}.{k}" for k in range(plan.choices)]
            payloads: Any = await self.redis.hmget(key + ":out", names)
            answered, line = render_line(batch_id, batch_hex, index, record["custom_id"], plan, payloads, closing)
            (rendered.output if answered else rendered.errors).append(line)
            index += 1
        return rendered


async def _chunks(lines: list[bytes]) -> AsyncIterator[bytes]:
    for start in range(0, len(lines), 1000):
        yield b"".join(lines[start : start + 1000])


def _valid_model(model: str) -> bool:
    try:
        Keys(model)
    except ValueError:
        return False
    return True
