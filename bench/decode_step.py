"""Decode-step microbenchmark: the time of one engine step with N requests all decoding, and where it goes.

For each N (default 8, 32, 64): N requests with random prompts of `--prompt-len` tokens (the mixed
workload's mean context) are prefilled, then `--steps` steps are timed in which every request decodes
one token. With `--profile`, one more run of the steps under torch.profiler splits the step into
GEMM (linear layers, LM head), paged attention (K/V write + kernel), elementwise (norms, rotary,
SiLU), the runner's per-step metadata, sampling, and the rest (Python, scheduler, outputs).
Prints one JSON object.

    python bench/decode_step.py [--running 8,32,64] [--steps 20] [--profile] [--save]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.workloads import emit_report, machine_info, peak_rss_mb  # noqa: E402

# Profiler event names -> category. Labels from `_instrument` are exact; aten ops by prefix.
CATEGORIES = {
    "tr::prepare": "metadata",
    "tr::backend_prepare": "metadata",
    "tr::attention": "attention",
    "tr::sample": "sampler",
    "tr::postprocess": "postprocess",
    "tr::schedule": "scheduler",
}
GEMM_OPS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear", "aten::matmul")


def _wrap(obj: Any, name: str, label: str) -> None:
    import torch

    inner: Callable[..., Any] = getattr(obj, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(label):
            return inner(*args, **kwargs)

    setattr(obj, name, wrapped)


def _instrument(engine: Any) -> None:
    """Labels the step's parts for the profiler (instance attributes: the classes stay untouched)."""
    _wrap(engine.scheduler, "schedule", "tr::schedule")
    _wrap(engine.runner, "_prepare", "tr::prepare")
    _wrap(engine.runner.backend, "prepare", "tr::backend_prepare")
    _wrap(engine.runner.backend, "forward", "tr::attention")
    _wrap(engine, "_sample", "tr::sample")
    _wrap(engine, "_append_tokens", "tr::postprocess")


def _breakdown(prof: Any, steps: int) -> dict[str, float]:
    """ms per step by category, from the profiler's top-level view of each op (self CPU for aten ops
    under no label, total for labels)."""
    per: dict[str, float] = defaultdict(float)
    labelled = 0.0
    for evt in prof.key_averages():
        if evt.key in CATEGORIES:
            per[CATEGORIES[evt.key]] += evt.cpu_time_total / 1000
            labelled += evt.cpu_time_total / 1000
    gemm = sum(e.cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS[:1]) / 1000
    if gemm == 0:
        gemm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / 1000
    per["gemm"] = gemm
    return {k: round(v / steps, 2) for k, v in sorted(per.items())}


def measure(engine: Any, running: int, prompt_len: int, steps: int, profile: bool, seed: int) -> dict[str, Any]:
    import torch

    from engine import SamplingParams

    rng = random.Random(seed)
    vocab = engine.vocab_size
    params = SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True)
    ids = [f"n{running}-{i}" for i in range(running)]
    for rid in ids:
        engine.add_request(rid, [rng.randrange(vocab) for _ in range(prompt_len)], params)
    # Prefill until every request decodes (and one more step so none has a pending prefill chunk).
    while engine.scheduler.num_waiting or any(
        r.num_tokens - r.num_computed_tokens > 1 for _, r in engine.scheduler.running
    ):
        engine.step()
    for _ in range(3):
        engine.step()
    times, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        engine.step()
        times.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    result: dict[str, Any] = {
        "running": running,
        "step_ms_median": round(statistics.median(times), 2),
        "step_ms_min": round(min(times), 2),
        "step_ms_runs": [round(x, 1) for x in times],
        # CPU time of this process per step: with one thread, robust to other work on the machine.
        "step_cpu_ms_median": round(statistics.median(cpu), 2),
        "mean_context": round(
            statistics.mean(r.num_computed_tokens for _, r in engine.scheduler.running),
            1,
        ),
    }
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                engine.step()
            wall = (time.perf_counter() - t) * 1000 / steps
        parts = _breakdown(prof, steps)
        # The labels are disjoint and GEMMs run inside none of them; the rest (embedding, norms, rotary,
        # SiLU, the model's Python) is what remains.
        parts["other"] = round(wall - sum(parts.values()), 2)
        result["profiled_step_ms"] = round(wall, 2)
        result["breakdown_ms"] = parts
        result["top_ops"] = [
            {"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 2)}
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        ]
    for rid in ids:
        engine.abort(rid)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--running", default="8,32,64")
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-adaptive-threads", action="store_true", help="keep --threads whatever the load")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()

    from engine import LLM  # before torch: engine.omp sets OpenMP's spin count while it still counts
    from engine.omp import SPIN_SETTING

    llm = LLM(
        model=None,
        num_threads=args.threads,
        max_num_seqs=64,
        max_num_batched_tokens=2048,
        adaptive_threads=not args.no_adaptive_threads,
    )
    import torch

    engine = llm.engine
    if args.profile:
        _instrument(engine)
    results = [
        measure(engine, int(n), args.prompt_len, args.steps, args.profile, seed=i)
        for i, n in enumerate(args.running.split(","))
    ]
    report = {
        "benchmark": "decode_step",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(threads=torch.get_num_threads()),
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "attention_backend": engine.attention_backend,
        "openmp_spin": SPIN_SETTING,
        "adaptive_threads": engine.threads is not None,
        "threads_at_end": engine.stats()["threads"],
        "thread_changes": engine.threads.changes if engine.threads is not None else 0,
        "results": results,
        "peak_rss_mb": round(peak_rss_mb()),
    }
    emit_report(report, "decode-step", args.save)


if __name__ == "__main__":
    main()
