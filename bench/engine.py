"""Engine benchmark: tokenrelay against Hugging Face and (when installed beside us) vLLM's CPU build.

Workload "mixed": 64 requests, prompts of U[16,256] random token ids (seed 0), outputs of U[16,128]
tokens, greedy, EOS ignored; the default model's real weights in fp32. Systems run one at a time,
each in a fresh process, interleaved over rounds; medians are reported, and ratios against the
other systems of the same run (this machine's speed drifts). Prints one JSON object.

    python bench/engine.py                  # full: tokenrelay, HF static x16, HF continuous (+ vLLM if set up)
    python bench/engine.py --quick          # 16 requests, under three minutes
    python bench/engine.py --with-sequential --rounds 3 --save
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder would come first on sys.path and `bench/engine.py` would shadow
# the `engine` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.peer_env import VLLM_PYTHON, vllm_env, vllm_installed  # noqa: E402
from bench.workloads import emit_report, machine_info, median, percentile  # noqa: E402

TARGETS = {
    "vs_hf_static": 4.0,
    "vs_vllm_cpu": 1.10,  # issue 15 (stretch 1.25)
    "cold_start_s": 10.0,
    "peak_rss_mb": 1536,
    "kv_slots_used_fraction": 0.96,
}


def _vllm_command(args: argparse.Namespace, spawned_at: float) -> tuple[list[str], dict[str, str]] | None:
    if not vllm_installed():
        return None
    from engine.models.default_model import default_model_dir

    env = vllm_env(args.threads)
    command = [
        str(VLLM_PYTHON),
        str(ROOT / "bench/peers/vllm_child.py"),
        "--model",
        str(default_model_dir()),
        "--workload",
        args.workload,
        "--requests",
        str(args.requests),
        "--spawned-at",
        str(spawned_at),
    ]
    return command, env


def run_system(system: str, args: argparse.Namespace) -> dict[str, Any]:
    spawned_at = time.time()
    if system == "vllm_cpu":
        spec = _vllm_command(args, spawned_at)
        assert spec is not None
        command, env = spec
    else:
        command = [
            sys.executable,
            str(ROOT / "bench/engine_systems.py"),
            system,
            "--workload",
            args.workload,
            "--requests",
            str(args.requests),
            "--threads",
            str(args.threads),
            "--spawned-at",
            str(spawned_at),
        ]
        env = dict(os.environ, TOKENRELAY_LOG_LEVEL="warning")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-1500:]}
    result = json.loads(lines[-1])
    result["tokens_per_s"] = result["output_tokens"] / result["seconds"]
    result["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[-1].get("error"), "stderr_tail": runs[-1].get("stderr_tail")}
    ttft = [t for r in good for t in r.get("ttft_s", [])]
    summary: dict[str, Any] = {
        "tokens_per_s": median([r["tokens_per_s"] for r in good]),
        "tokens_per_s_runs": [round(r["tokens_per_s"], 2) for r in good],
        "loadavg_runs": [r.get("loadavg_at_end") for r in good],
        "output_tokens": good[0]["output_tokens"],
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
        "cold_start_s": median([r["cold_start_s"] for r in good]),
    }
    for key in ("kv_slots_used_fraction", "preemptions", "steps", "attention_backend", "errors"):
        if key in good[0]:
            summary[key] = good[0][key]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 requests, one round, no vLLM unless asked")
    parser.add_argument("--workload", choices=["mixed", "uniform"], default="mixed")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--with-sequential", action="store_true", help="HF one request at a time (slow)")
    parser.add_argument("--with-vllm", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--systems", default=None, help="comma-separated subset to run")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--save", action="store_true", help="also write bench/results/engine-<time>.json")
    args = parser.parse_args()
    args.requests = args.requests or (16 if args.quick else 64 if args.workload == "mixed" else 32)

    systems = ["tokenrelay", "hf_static", "hf_continuous"]
    if args.with_vllm == "yes" or (args.with_vllm == "auto" and vllm_installed() and not args.quick):
        systems.append("vllm_cpu")
    if args.with_sequential:
        systems.append("hf_sequential")
    if args.systems:
        systems = [s for s in args.systems.split(",") if s]

    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    orders = []
    for round_index in range(args.rounds):
        # Rotated each round, so that no system always runs first (or right after the slowest one).
        shift = round_index % len(systems)
        order = systems[shift:] + systems[:shift]
        orders.append(order)
        for system in order:
            print(f"[round {round_index + 1}/{args.rounds}] {system} ...", file=sys.stderr, flush=True)
            runs[system].append(run_system(system, args))
            print(
                f"    {json.dumps({k: v for k, v in runs[system][-1].items() if k != 'ttft_s'})[:300]}",
                file=sys.stderr,
                flush=True,
            )

    results = {s: summarise(r) for s, r in runs.items()}
    ours = results.get("tokenrelay", {}).get("tokens_per_s")
    ratios = {
        f"tokenrelay_vs_{s}": ours / r["tokens_per_s"]
        for s, r in results.items()
        if s != "tokenrelay" and ours and r.get("tokens_per_s")
    }
    # Per round, each system against tokenrelay's run of the same round: the machine's drift between
    # rounds cancels out of these.
    paired = {
        f"tokenrelay_vs_{s}": [
            round(ours_run["tokens_per_s"] / run["tokens_per_s"], 3)
            for ours_run, run in zip(runs.get("tokenrelay", []), r, strict=False)
            if "error" not in ours_run and "error" not in run
        ]
        for s, r in runs.items()
        if s != "tokenrelay"
    }
    paired_median = {k: median(v) for k, v in paired.items() if v}
    vs_vllm = paired_median.get("tokenrelay_vs_vllm_cpu", ratios.get("tokenrelay_vs_vllm_cpu"))
    tr = results.get("tokenrelay", {})
    checks = {
        "vs_hf_static >= 4": ratios.get("tokenrelay_vs_hf_static", 0) >= TARGETS["vs_hf_static"],
        "vs_vllm_cpu >= 1.10 (median of paired rounds)": vs_vllm >= TARGETS["vs_vllm_cpu"]
        if vs_vllm is not None
        else None,
        "cold_start <= 10 s": (tr.get("cold_start_s") or 1e9) <= TARGETS["cold_start_s"],
        "peak_rss <= 1.5 GB": (tr.get("peak_rss_mb") or 1e9) <= TARGETS["peak_rss_mb"],
        "kv_slots_used >= 96 %": (tr.get("kv_slots_used_fraction") or 0) >= TARGETS["kv_slots_used_fraction"],
    }
    report = {
        "benchmark": "engine",
        "workload": args.workload,
        "requests": args.requests,
        "rounds": args.rounds,
        "round_orders": orders,
        "threads": args.threads,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "systems": results,
        "ratios": ratios,
        "paired_ratios": paired,
        "paired_ratio_medians": paired_median,
        "targets_met": checks,
    }
    emit_report(report, f"engine-{args.workload}", args.save)


if __name__ == "__main__":
    main()
