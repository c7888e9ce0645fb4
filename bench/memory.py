"""Memory benchmark: int8 weights, int8 KV cache, swapping and weight offloading against the plain engine.

Every mode runs in a fresh process with the default model (SmolLM2-135M, fp32 activations) and reports:
model memory (bytes of weights), peak RSS, tokens/s on the mixed workload, capacity (concurrent
512-token sequences that fit a fixed KV budget), perplexity on bench/data/prose.txt and greedy agreement
with fp32 over 50 prompts. The swap modes run the mixed workload in a KV pool too small for it, once
recomputing and once swapping preempted requests. Prints one JSON object.

    python bench/memory.py            # all modes, 32 requests
    python bench/memory.py --quick    # 8 requests, fewer windows
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]  # bench/engine.py shadows engine
sys.path.insert(0, str(ROOT))

from bench.workloads import emit_report, mixed_workload, peak_rss_mb  # noqa: E402

PROSE = ROOT / "bench" / "data" / "prose.txt"
KV_BUDGET_GB = 0.25
WINDOW = 512
SCORING_CHUNK = 64
MODES: dict[str, dict[str, Any]] = {
    "fp32": {},
    "int8": {"quantization": "int8"},
    "gguf_q4_1": {"quantization": "gguf"},
    "kv_int8": {"kv_cache_dtype": "int8"},
    "int8+kv_int8": {"quantization": "int8", "kv_cache_dtype": "int8"},
    "offload": {"cpu_offload_gb": 0.25},
    # 200 blocks hold about half of what the 32 mixed requests need at once: running requests outgrow the
    # pool and are preempted (300 blocks, as before, only ever made new requests wait: no preemption)
    "pressure_recompute": {"num_kv_blocks": 200, "preemption_mode": "recompute"},
    "pressure_swap": {"num_kv_blocks": 200, "swap_space_gb": 1.0, "preemption_mode": "swap"},
}


def child(mode: str, requests: int, windows: int, threads: int) -> dict[str, Any]:
    from engine import LLM, SamplingParams
    from engine.memory import model_weight_bytes

    kwargs = dict(MODES[mode], num_threads=threads)
    if "num_kv_blocks" not in kwargs:
        kwargs["kv_cache_memory_gb"] = KV_BUDGET_GB
    llm = LLM(model=None, **kwargs)
    engine = llm.engine
    tokenizer = llm.tokenizer
    result: dict[str, Any] = {
        "weights_mb": model_weight_bytes(engine.runner.adapter.model) / 2**20,
        "kv_blocks": engine.kv.pool.num_blocks,
    }
    blocks_per_sequence = WINDOW // engine.kv.block_size
    result["capacity_512_token_sequences"] = engine.kv.pool.num_blocks // blocks_per_sequence

    # Quality: perplexity over fixed windows of the prose text, then greedy agreement prompts.
    ids = tokenizer.encode(PROSE.read_text())
    chunks = [ids[i : i + WINDOW] for i in range(0, len(ids) - 1, WINDOW)][:windows]
    # Scored in 64-token prefill chunks, so that most positions attend over K/V read back from the cache
    # (a whole window in one chunk attends over its own fresh K/V and never reads a quantized cache).
    budget = engine.scheduler.max_num_batched_tokens
    engine.scheduler.max_num_batched_tokens = SCORING_CHUNK
    scored = llm.generate(chunks, SamplingParams(max_tokens=1, prompt_logprobs=0))
    engine.scheduler.max_num_batched_tokens = budget
    logprobs = [lp.logprob for out in scored for lp in (out.prompt_logprobs or [])[1:] if lp is not None]
    result["perplexity"] = math.exp(-sum(logprobs) / len(logprobs))
    result["scored_tokens"] = len(logprobs)
    sentences = [s.strip() for s in PROSE.read_text().replace("\n", " ").split(". ") if len(s.split()) > 8]
    prompts = [" ".join(s.split()[:12]) for s in sentences[:50]]
    greedy = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    result["greedy"] = [o.token_ids for o in greedy]

    # Speed: the mixed workload.
    workload = mixed_workload(requests)
    started = time.perf_counter()
    outs = llm.generate(
        [p for p, _ in workload], [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in workload]
    )
    elapsed = time.perf_counter() - started
    stats = engine.stats()
    result.update(
        tokens_per_s=sum(len(o.token_ids) for o in outs) / elapsed,
        preemptions=stats["preemptions"],
        swapped_out=stats["swapped_out"],
        peak_rss_mb=peak_rss_mb(),
    )
    return result


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """Exact-match rate, and the mean fraction of each output that matches before the first divergence."""
    exact = sum(a == b for a, b in zip(reference, other, strict=True)) / len(reference)
    prefix = []
    for a, b in zip(reference, other, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(1, len(a)))
    return {"exact_match": exact, "mean_prefix_match": sum(prefix) / len(prefix)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", action="store_true", help="also write bench/results/memory-<time>.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--windows", type=int, default=None)
    args = parser.parse_args()
    requests = args.requests or (8 if args.quick else 32)
    windows = args.windows or (2 if args.quick else 16)
    if args.child:
        print(json.dumps(child(args.child, requests, windows, args.threads)))
        return

    results: dict[str, Any] = {}
    for mode in [m for m in args.modes.split(",") if m]:
        print(f"{mode} ...", file=sys.stderr, flush=True)
        command = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--requests",
            str(requests),
            "--windows",
            str(windows),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(
            command, capture_output=True, text=True, env=dict(os.environ, TOKENRELAY_LOG_LEVEL="warning")
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        results[mode] = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": proc.stderr[-1500:]}

    base = results.get("fp32", {})
    for r in results.values():
        if "error" in r or "error" in base or not base:
            continue
        r["vs_fp32"] = {
            "weights": r["weights_mb"] / base["weights_mb"],
            "tokens_per_s": r["tokens_per_s"] / base["tokens_per_s"],
            "capacity": r["capacity_512_token_sequences"] / max(1, base["capacity_512_token_sequences"]),
            "perplexity_change_pct": 100 * (r["perplexity"] / base["perplexity"] - 1),
            **agreement(base["greedy"], r["greedy"]),
        }
    for r in results.values():
        r.pop("greedy", None)
    if "pressure_swap" in results and "pressure_recompute" in results:
        swap, recompute = results["pressure_swap"], results["pressure_recompute"]
        if "tokens_per_s" in swap and "tokens_per_s" in recompute:
            results["swap_vs_recompute_tokens_per_s"] = swap["tokens_per_s"] / recompute["tokens_per_s"]
    report = {
        "benchmark": "memory",
        "requests": requests,
        "perplexity_windows": windows,
        "kv_budget_gb": KV_BUDGET_GB,
        "when": datetime.now().isoformat(timespec="seconds"),
        "modes": results,
    }
    emit_report(report, "memory", args.save)


if __name__ == "__main__":
    main()
