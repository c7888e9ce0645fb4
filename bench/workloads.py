"""Benchmark workloads and summary statistics (standard library only: peers' environments import it too)."""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

Request = tuple[list[int], int]  # prompt token ids, tokens to generate


def mixed_workload(num_requests: int = 64, vocab: int = 49152, seed: int = 0) -> list[Request]:
    """ "mixed": prompts of U[16,256] random token ids, outputs of U[16,128] tokens (seed 0)."""
    rng = random.Random(seed)
    return [
        ([rng.randrange(vocab) for _ in range(rng.randint(16, 256))], rng.randint(16, 128)) for _ in range(num_requests)
    ]


def uniform_workload(
    num_requests: int = 32, prompt_len: int = 128, output_len: int = 64, vocab: int = 49152, seed: int = 0
) -> list[Request]:
    """ "uniform": every request the same shape (vLLM's reference figures include 32 x 128 in / 64 out)."""
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(prompt_len)], output_len) for _ in range(num_requests)]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def peak_rss_mb() -> float:
    """Peak resident set size of this process or of any child it waited for, whichever is larger
    (vLLM runs its engine core in a child process)."""
    rss = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def machine_info(**extra: Any) -> dict[str, Any]:
    """What a benchmark's JSON says of the machine it ran on: cores, platform, Python, load at the start."""
    load = [round(x, 2) for x in os.getloadavg()]
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    return {**info, **extra, "loadavg_at_start": load}


def emit_report(report: dict[str, Any], name: str, save: bool) -> None:
    """Prints a benchmark's JSON; with `save`, also writes it to bench/results/<name>-<local time>.json."""
    text = json.dumps(report, indent=2)
    print(text)
    if save:
        out = Path(__file__).resolve().parent / "results" / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
