"""A finished batch's output and error files: rendered from its ledger once, by whichever replica gets there
first (its sweep, or the first download), while the others wait for it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import structlog

from producer.batch.runner import BatchOptions, plan_line
from producer.batches.objects import TERMINAL, output_file_id
from producer.batches.render import Rendered, render_line
from producer.connection import AsyncRedis, as_text
from producer.protocol import JobKeys

log = structlog.get_logger(__name__)

RENDER_LOCK_S = 60  # one replica renders a batch's output files; another waits this long at most
_LINES_PER_READ = 500  # input lines whose answers one pipelined round trip reads


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


class Outputs:
    """Renders batches' output files into the file store."""

    def __init__(self, redis: AsyncRedis, files: Files, jobs: JobKeys, options: BatchOptions, ttl_s: int) -> None:
        self.redis, self.files, self.jobs, self.options, self.ttl_s = redis, files, jobs, options, ttl_s

    async def wait_rendered(self, batch_id: str, key: str) -> bool:
        """Renders them, or waits while another replica does; True once they exist."""
        waited_until = time.monotonic() + RENDER_LOCK_S
        while (state := await self.render(batch_id, key)) == "busy" and time.monotonic() < waited_until:
            await asyncio.sleep(0.05)
        return state == "done"

    async def render(self, batch_id: str, key: str) -> str:
        """Writes the output and error files of a finished batch, once: "done" when they exist (now or
        before), "busy" while another replica writes them, "none" for a batch that has no output."""
        fields = {as_text(k): as_text(v) for k, v in (await self.redis.hgetall(key)).items()}
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
                        ttl_s=self.ttl_s,
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
        closing = fields.get("closing") or None
        index, pending = 0, []
        async for raw in self.files.lines(fields["input_file_id"], fields.get("owner", "")):
            if raw.strip():
                record = json.loads(raw)
                # validated before the batch started: this cannot fail now
                pending.append((index, record, plan_line(record, self.options)))
                index += 1
            if len(pending) >= _LINES_PER_READ:
                await self._render_lines(batch_id, key, pending, closing, rendered)
                pending = []
        await self._render_lines(batch_id, key, pending, closing, rendered)
        return rendered

    async def _render_lines(
        self, batch_id: str, key: str, lines: list[tuple[int, dict[str, Any], Any]], closing: str | None, into: Rendered
    ) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for index, _, plan in lines:
            pipe.hmget(key + ":out", [f"{index}.{k}" for k in range(plan.choices)])
        answers: list[Any] = await pipe.execute() if lines else []
        batch_hex = batch_id.removeprefix("batch_")
        for (index, record, plan), payloads in zip(lines, answers, strict=True):
            answered, line = render_line(batch_id, batch_hex, index, record["custom_id"], plan, payloads, closing)
            (into.output if answered else into.errors).append(line)


async def _chunks(lines: list[bytes]) -> AsyncIterator[bytes]:
    for start in range(0, len(lines), 1000):
        yield b"".join(lines[start : start + 1000])
