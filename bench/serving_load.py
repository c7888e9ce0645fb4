"""The serving benchmark's load: Poisson arrivals of streamed completions through the openai SDK, and their figures.

The same code drives every system: one `AsyncOpenAI` client, `/v1/completions` with `stream=True`, fixed
output lengths (`ignore_eos` and `min_tokens`, extensions that tokenrelay's gateway and vLLM both accept).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from openai import AsyncOpenAI

from bench.workloads import percentile


@dataclass(slots=True)
class Slo:
    """What a request must meet to count towards goodput."""

    ttft_s: float = 2.0
    tpot_s: float = 0.150


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it: times are seconds since the run began."""

    sent_at: float
    ttft_s: float | None = None
    latency_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    chunk_gaps_s: list[float] = field(default_factory=list)  # between content chunks (a chunk may hold tokens)
    chunks: int = 0
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.error is None and self.latency_s is not None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vLLM's definition: (latency - TTFT) / (tokens - 1))."""
        if not self.completed or self.ttft_s is None or self.output_tokens < 2:
            return None
        assert self.latency_s is not None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def meets(self, slo: Slo) -> bool:
        tpot = self.tpot_s
        return self.ttft_s is not None and self.ttft_s <= slo.ttft_s and tpot is not None and tpot <= slo.tpot_s


def poisson_offsets(count: int, rate: float, seed: int) -> list[float]:
    """Arrival times (s from the start) of `count` requests at `rate` per second, exponential gaps."""
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


async def _one(
    client: AsyncOpenAI, model: str, prompt: str, max_tokens: int, record: RequestRecord, started: float
) -> None:
    try:
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "min_tokens": max_tokens},
        )
        last = None
        async for chunk in stream:
            now = time.perf_counter() - started
            if chunk.usage is not None:
                record.output_tokens = chunk.usage.completion_tokens
                record.prompt_tokens = chunk.usage.prompt_tokens
            if not chunk.choices or not chunk.choices[0].text:
                continue
            record.chunks += 1
            if last is None:
                record.ttft_s = now - record.sent_at
            else:
                record.chunk_gaps_s.append(now - last)
            last = now
        record.latency_s = time.perf_counter() - started - record.sent_at
    except asyncio.CancelledError:
        record.error = "cut off at the run's time limit"
        raise
    except Exception as exc:  # noqa: BLE001 - a failed request is a figure of the run, not a crash of it
        record.error = f"{type(exc).__name__}: {exc}"[:300]


async def run_rate(
    client: AsyncOpenAI,
    model: str,
    prompts: list[str],
    offsets: list[float],
    max_tokens: int,
    max_seconds: float,
) -> tuple[list[RequestRecord], float]:
    """Sends prompts[i] at offsets[i]; returns the records and the seconds from the first send to the last
    finish (or to `max_seconds`, when requests still open then are cut off and count as not completed)."""
    started = time.perf_counter()
    records = [RequestRecord(sent_at=offset) for offset in offsets]

    async def send_at(i: int) -> None:
        await asyncio.sleep(max(0.0, offsets[i] - (time.perf_counter() - started)))
        records[i].sent_at = time.perf_counter() - started  # the real send time, not the planned one
        await _one(client, model, prompts[i], max_tokens, records[i], started)

    tasks = [asyncio.create_task(send_at(i)) for i in range(len(prompts))]
    _, pending = await asyncio.wait(tasks, timeout=max_seconds)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    ends = [r.sent_at + r.latency_s for r in records if r.completed and r.latency_s is not None]
    return records, (max(ends) if ends and not pending else time.perf_counter() - started)


def replay_in_process(
    engine: Any, tag: str, prompts: list[str], offsets: list[float], max_tokens: int
) -> tuple[list[RequestRecord], float]:
    """The same arrivals straight into an engine in this process (no HTTP, no Redis, no worker loop):
    the difference to the served figures is what the service path costs."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    records = [RequestRecord(sent_at=offset) for offset in offsets]
    last: dict[int, float] = {}
    started = time.perf_counter()
    sent = 0
    while sent < len(offsets) or engine.has_unfinished():
        now = time.perf_counter() - started
        while sent < len(offsets) and offsets[sent] <= now:
            engine.add_request(f"{tag}-{sent}", prompts[sent], params)
            records[sent].sent_at = now
            sent += 1
        if not engine.has_unfinished():
            time.sleep(min(0.005, max(0.0, offsets[sent] - now)))
            continue
        outputs = engine.step()
        now = time.perf_counter() - started
        for out in outputs:
            i = int(out.request_id.rsplit("-", 1)[1])
            record = records[i]
            if out.new_token_ids:
                if record.ttft_s is None:
                    record.ttft_s = now - record.sent_at
                else:
                    record.chunk_gaps_s.append(now - last[i])
                last[i] = now
                record.chunks += 1
            record.output_tokens = len(out.token_ids)
            if out.finished:
                record.latency_s = now - record.sent_at
    return records, max(r.sent_at + (r.latency_s or 0.0) for r in records)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


def summarise(records: list[RequestRecord], seconds: float, max_tokens: int, slo: Slo) -> dict[str, Any]:
    """One rate's figures for one system."""
    done = [r for r in records if r.completed]
    ttft = [r.ttft_s for r in done if r.ttft_s is not None]
    tpot = [t for r in done if (t := r.tpot_s) is not None]
    gaps = [g for r in done for g in r.chunk_gaps_s]
    tokens = sum(r.output_tokens for r in done)
    good = sum(r.meets(slo) for r in done)
    errors = sorted({r.error for r in records if r.error})
    return {
        "requests": len(records),
        "completed": len(done),
        "seconds": round(seconds, 2),
        "completed_requests_per_s": round(len(done) / seconds, 3),
        "output_tokens_per_s": round(tokens / seconds, 2),
        "ttft_ms": {"p50": _ms(percentile(ttft, 50)), "p99": _ms(percentile(ttft, 99))},
        "tpot_ms": {"p50": _ms(percentile(tpot, 50)), "p99": _ms(percentile(tpot, 99))},
        "itl_ms": {"p50": _ms(percentile(gaps, 50)), "p99": _ms(percentile(gaps, 99))},
        "goodput_requests_per_s": round(good / seconds, 3),
        "slo_attainment": round(good / len(records), 3) if records else None,
        "tokens_per_chunk": round(tokens / max(1, sum(r.chunks for r in done)), 2),
        "prompt_tokens_mean": round(statistics.mean(p), 1)
        if (p := [r.prompt_tokens for r in done if r.prompt_tokens])
        else None,
        "short_outputs": sum(r.output_tokens != max_tokens for r in done),
        "errors": errors[:5],
        # the slowest first tokens, to tell a cold start or a burst of arrivals from a slow service
        "slowest_ttft": [
            {"sent_s": round(r.sent_at, 2), "ttft_ms": _ms(r.ttft_s), "tpot_ms": _ms(r.tpot_s)}
            for r in sorted(done, key=lambda r: r.ttft_s or 0.0, reverse=True)[:3]
        ],
    }
