"""Scale-out: a backlog served by N no-op worker processes whose engine sleeps a fixed time per step.

A worker's throughput is then set by its slots and the step time (slots / (max_tokens x step)),
not by CPU, so adding processes measures what the queue costs when workers are added. Time is
taken by Redis's clock: from just before the backlog is submitted to the last result entry
written. The CPU that Redis and the workers burn, and that of the measuring client, are reported
beside it, so a run where the machine's cores ran out can be told from one where the queue did.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import redis

from producer.client import Client, build_request
from tests.chaos.harness import MODEL, Cluster
from worker.redis_server import RedisServer


@dataclass(slots=True, frozen=True)
class ScalePoint:
    workers: int
    requests: int
    seconds: float  # Redis's clock, submit to last result entry
    requests_per_s: float
    ideal_requests_per_s: float  # workers x slots / (max_tokens x step): no gap between requests at all
    of_ideal: float
    cpu_cores_used: float  # Redis and the workers, CPU seconds per wall second
    client_cpu_cores: float  # this process: the submitting and stream-folding client
    workers_used: int  # workers that finished at least one request
    peak_in_flight: int  # most requests streaming at once (first to last result entry, Redis's clock)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def _redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def scale_point(log_dir: Path, workers: int, *, slots: int, step_s: float, max_tokens: int, rounds: int) -> ScalePoint:
    """A backlog of workers x slots x rounds requests of `max_tokens` each, served by `workers` processes
    against a private Redis."""
    n = workers * slots * rounds
    with RedisServer() as server:
        cluster = Cluster(server.url, log_dir, workers, "--max-num-seqs", str(slots), "--noop-step-delay", str(step_s))
        try:
            cluster.wait_ready()
            client = Client(server.url, model=MODEL, max_queue_depth=0)
            requests = [build_request(MODEL, "p", max_tokens=max_tokens) for _ in range(n)]
            assert server.process is not None
            pids = [server.process.pid, *(p.pid for p in cluster.slots)]
            me = psutil.Process()
            cpu_before, own_before = _cpu_s(pids), me.cpu_times()
            wall_before, started_ms = time.monotonic(), _redis_ms(client.redis)
            ids = client.submit_requests(requests)
            done = client.wait_all(ids, timeout=600)
            wall = time.monotonic() - wall_before
            cpu, own = _cpu_s(pids) - cpu_before, me.cpu_times()
            pipe = client.redis.pipeline(transaction=False)
            for request_id in ids:
                pipe.xrange(client.keys().result(request_id), count=1)
                pipe.xrevrange(client.keys().result(request_id), count=1)
            ends = [int(entries[0][0].split(b"-")[0]) for entries in pipe.execute()]
            spans = list(zip(ends[::2], ends[1::2], strict=True))
            finished_ms = max(last for _, last in spans)
        finally:
            cluster.stop()
    wrong = [c.request_id for c in done.values() if c.finish_reason != "length" or len(c.token_ids) != max_tokens]
    assert not wrong, f"{len(wrong)} requests did not get their {max_tokens} tokens"
    seconds = (finished_ms - started_ms) / 1000
    ideal = workers * slots / (max_tokens * step_s)
    own_s = own.user + own.system - own_before.user - own_before.system
    return ScalePoint(
        workers,
        n,
        round(seconds, 3),
        round(n / seconds, 1),
        round(ideal, 1),
        round(n / seconds / ideal, 3),
        round(cpu / wall, 3),
        round(own_s / wall, 3),
        len({c.worker for c in done.values()}),
        _peak(spans),
    )


def _peak(spans: list[tuple[int, int]]) -> int:
    """The most intervals open at one instant (an interval ending as another starts counts once)."""
    edges = sorted([(first, 1) for first, _ in spans] + [(last, -1) for _, last in spans])  # ends first on a tie
    open_now = peak = 0
    for _, step in edges:
        open_now += step
        peak = max(peak, open_now)
    return peak
