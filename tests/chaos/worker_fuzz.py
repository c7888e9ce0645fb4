"""A live worker process fed fuzzed stream entries, chunk by chunk, with every answer checked.

Each chunk is pushed onto the request streams, drained by a no-op worker, then audited: an entry
with a usable id has exactly one terminal event (an `error` when the decoder refuses its payload),
an entry without one is in the dead letters. The worker's RSS is sampled after every chunk.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from producer.errors import ProtocolError
from producer.protocol import GROUP, EventType, Keys, decode_request
from tests.chaos.fuzz_cases import MODEL, generate, mutants
from tests.queue_helpers import WorkerProcess, read_events, wait_for

KEYS = Keys(MODEL)
PROTOCOL_CODES = {"invalid_request", "unsupported_version", "unknown_model"}
Case = tuple[dict[str, Any], str | None, str, str]  # fields, reply id, expected outcome, stream entry id


@dataclass(slots=True)
class WorkerFuzzReport:
    entries: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {"dead": 0, "refused": 0, "decodable": 0})
    violations: list[str] = field(default_factory=list)  # what was not answered as it must be
    rss_mb: list[float] = field(default_factory=list)  # the worker's, after each chunk
    worker_alive: bool = True
    error_log_lines: int = 0

    @property
    def rss_growth_mb(self) -> float:
        """After the first chunk (imports, caches, allocator pools warm), how much the RSS grew."""
        return max(self.rss_mb[1:]) - self.rss_mb[1] if len(self.rss_mb) > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            **self.outcomes,
            "violations": len(self.violations),
            "rss_mb_first": round(self.rss_mb[0], 1) if self.rss_mb else None,
            "rss_mb_last": round(self.rss_mb[-1], 1) if self.rss_mb else None,
            "rss_growth_mb": round(self.rss_growth_mb, 2),
            "worker_alive": self.worker_alive,
            "error_log_lines": self.error_log_lines,
        }


def expected_outcome(fields: dict[str, Any], request_id: str | None) -> str:
    """'dead' (no reply address), 'refused' (the decoder says no: an error event), or 'decodable'."""
    if request_id is None:
        return "dead"
    try:
        request = decode_request(fields["m"], expected_id=request_id)
    except ProtocolError:
        return "refused"
    if request.model != MODEL:
        return "refused"
    if request.params.get("max_tokens", 16) > 64:  # a mutant asking for a million tokens: keep the run short
        fields["m"] = dataclasses.replace(request, params={**request.params, "max_tokens": 64}).encode()
    return "decodable"


def _drained(client: redis.Redis) -> bool:
    pending = sum(client.xpending(k, GROUP)["pending"] for k in KEYS.queues if client.exists(k))
    return pending == 0 and sum(client.xlen(k) for k in KEYS.queues) == 0


def _audit(client: redis.Redis, cases: list[Case], report: WorkerFuzzReport) -> None:
    dead_entries = {f[b"entry"].decode() for _, f in client.xrange(KEYS.dead) if b"entry" in f}
    for fields, request_id, expected, entry_id in cases:
        report.outcomes[expected] += 1
        if request_id is None:
            if entry_id not in dead_entries:
                report.violations.append(f"not dead-lettered: {fields!r:.200}")
            continue
        events = read_events(client, KEYS, request_id)
        terminals = [e for e in events if e.type.terminal]
        if len(terminals) != 1 or events[-1] is not terminals[0]:
            report.violations.append(f"{len(terminals)} terminal events: {fields!r:.200}")
        elif expected == "refused" and (
            [e.type for e in events] != [EventType.ERROR]
            or events[0].code not in PROTOCOL_CODES
            or entry_id not in dead_entries
        ):
            report.violations.append(f"refused payload answered {events!r:.200}: {fields!r:.200}")
    ids = [r for _, r, _, _ in cases if r]
    client.delete(KEYS.dead, *(KEYS.result(r) for r in ids), *(KEYS.request(r) for r in ids))


def run_worker_fuzz(
    redis_url: str, log_dir: Path, total: int, chunk: int, seeds: int, rng_seed: int = 5
) -> WorkerFuzzReport:
    """`seeds` hypothesis-drawn entries, then their mutants up to `total`, fed `chunk` at a time."""
    drawn = generate(seeds)
    rng = random.Random(rng_seed)
    report = WorkerFuzzReport()
    worker = WorkerProcess(
        redis_url,
        Path("no-model"),
        log_dir / "fuzz-worker.log",
        ["--engine", "noop", "--max-num-seqs", "64"],
        env={"TOKENRELAY_LOG_LEVEL": "warning", "TOKENRELAY_DEAD_LETTER_MAXLEN": "1000000"},
    )
    try:
        worker.wait_ready()
        client = redis.Redis.from_url(redis_url)
        for first in range(0, total, chunk):
            batch = drawn if first == 0 else []  # the hypothesis draws themselves, then their mutants
            batch = batch + mutants(drawn, min(chunk, total - first) - len(batch), rng)
            pipe = client.pipeline(transaction=False)
            outcomes = []
            for fields, request_id in batch:
                outcomes.append(expected_outcome(fields, request_id))
                pipe.xadd(KEYS.queues[rng.randrange(3)], fields)
            entry_ids = [e.decode() for e in pipe.execute()]
            wait_for(lambda: _drained(client), 300, 0.1, "the worker to answer the chunk")
            _audit(client, [(f, r, o, e) for (f, r), o, e in zip(batch, outcomes, entry_ids, strict=True)], report)
            report.entries += len(batch)
            report.rss_mb.append(psutil.Process(worker.pid).memory_info().rss / 2**20)
        report.worker_alive = worker.process.poll() is None
        report.error_log_lines = sum(line.get("level") in ("error", "critical") for line in worker.logs())
    finally:
        worker.kill()
    return report
