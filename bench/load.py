"""Scale-out and soak runs for bench/reliability.py: no-op worker processes against one Redis.

Scale-out repeats tests/chaos/scale.py's backlog (a sleeping engine, timed by Redis's clock) at 1, 2,
4 and 8 workers. The soak runs steady traffic for minutes with a short result TTL and samples
Redis's and the workers' memory.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import redis

from tests.chaos.harness import MODEL, Cluster
from tests.chaos.ledger import Ledger, random_specs
from tests.chaos.scale import scale_point
from worker.redis_server import RedisServer


def scale_out(
    log_dir: Path,
    counts: tuple[int, ...] = (1, 2, 4, 8),
    slots: int = 16,
    step_s: float = 0.05,
    max_tokens: int = 20,
    rounds: int = 8,
) -> dict[str, Any]:
    """tests/chaos/scale.py's backlog at each worker count; efficiency against linear from one worker."""
    points = [
        scale_point(log_dir, w, slots=slots, step_s=step_s, max_tokens=max_tokens, rounds=rounds).as_dict()
        for w in counts
    ]
    one = points[0]["requests_per_s"]
    for point in points:
        point["efficiency"] = round(point["requests_per_s"] / (point["workers"] * one), 3)
    return {
        "engine": f"noop, {step_s * 1000:.0f} ms sleep per step",
        "step_s": step_s,
        "slots_per_worker": slots,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "points": points,
    }


def soak(
    log_dir: Path, minutes: float, rate: float = 100.0, workers: int = 3, result_ttl_s: int = 60, sample_s: float = 10.0
) -> dict[str, Any]:
    """Steady traffic for `minutes`; Redis's used memory and the workers' RSS sampled every `sample_s`."""
    specs = random_specs(int(rate * minutes * 60), seed=3)
    samples: list[dict[str, float]] = []
    with RedisServer() as server:
        # results expire after result_ttl_s (a day by default): a soak of minutes sees them come and go
        cluster = Cluster(
            server.url,
            log_dir,
            workers,
            "--max-num-seqs",
            "32",
            "--noop-step-delay",
            "0.005",
            env={"TOKENRELAY_RESULT_TTL_S": str(result_ttl_s)},
        )
        try:
            cluster.wait_ready()
            admin = redis.Redis.from_url(server.url)
            ledger = Ledger(server.url, MODEL, specs, rate, result_ttl_s=result_ttl_s).start()
            started = time.monotonic()
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(sample_s):
                    info: Any = admin.info("memory")
                    rss = sum(psutil.Process(p.pid).memory_info().rss for p in cluster.slots) / 2**20
                    samples.append(
                        {
                            "t_s": round(time.monotonic() - started),
                            "redis_used_mb": round(info["used_memory"] / 2**20, 2),
                            "keys": admin.dbsize(),
                            "workers_rss_mb": round(rss, 1),
                        }
                    )

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            ledger.submitting_done.wait(minutes * 60 * 2 + 60)
            drained = ledger.wait(120)
            stop.set()
            sampler.join()
            ledger.stop()
            wrong = sum(c.finished and c.token_ids != ledger.accepted[i].tokens for i, c in ledger.completions.items())
        finally:
            cluster.stop()
    return {
        "minutes": minutes,
        "rate": rate,
        "requests": len(ledger.accepted),
        "lost": ledger.open,
        "drained": drained,
        "wrong_tokens": wrong,
        "result_ttl_s": result_ttl_s,
        "samples": samples,
        **_bounds(samples),
    }


def _bounds(samples: list[dict[str, float]]) -> dict[str, Any]:
    """Memory in the second third of the run against the last third: bounded means no upward trend."""
    if len(samples) < 6:
        return {}
    third = len(samples) // 3
    middle, last = samples[third : 2 * third], samples[2 * third :]
    out: dict[str, Any] = {}
    for name in ("redis_used_mb", "workers_rss_mb", "keys"):
        a, b = (round(statistics.median(s[name] for s in part), 2) for part in (middle, last))
        out[f"{name}_middle"], out[f"{name}_last"] = a, b
        out[f"{name}_growth"] = round(b / a - 1, 3) if a else None
    return out
