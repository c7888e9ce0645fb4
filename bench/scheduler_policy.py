# ruff: noqa: E402
"""Scheduler policy sweep: the serving benchmark's arrivals into our engine under several scheduler settings.

Prints one JSON object. Not a test. What the serving benchmark leaves to us to tune is the scheduler's
policy: the step's token budget (`max_num_batched_tokens`, which is also the prefill chunk size) and
how many requests run at once (`max_num_seqs`); decodes always go before prefill chunks. This replays
bench/serving.py's Poisson arrivals and prompts (the default model, real weights, fp32, both threads,
64 output tokens) straight into LLMEngine in this process, once per setting and rate, so the policy is
measured apart from the service path. Rates sit around saturation, where a policy can move a request
across the SLO; below it every setting meets the SLO and goodput is the arrival rate. Rounds rotate the
order of the settings so a drift in the machine's speed favours none of them; the figures are the
per-round medians, with each setting's goodput as a ratio to the default's in the same round.

    python bench/scheduler_policy.py [--rates 2,3,4] [--rounds 2] [--save]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse
import gc
import time
from datetime import datetime
from typing import Any

from bench.serving import replay_rates
from bench.serving_load import Slo
from bench.workloads import emit_report, machine_info, median

DEFAULT = {"max_num_batched_tokens": 2048, "max_num_seqs": 64}
POLICIES: dict[str, dict[str, int]] = {
    # the offline engine's defaults; a worker serves with 512 tokens. Names have no commas (--policies splits on them)
    "default": DEFAULT,
    "1024-token budget": {**DEFAULT, "max_num_batched_tokens": 1024},
    "512-token budget": {**DEFAULT, "max_num_batched_tokens": 512},
    "256-token budget": {**DEFAULT, "max_num_batched_tokens": 256},
    "128-token budget": {**DEFAULT, "max_num_batched_tokens": 128},
    "32 running": {**DEFAULT, "max_num_seqs": 32},
    "16 running": {**DEFAULT, "max_num_seqs": 16},
    "512 tokens 32 running": {"max_num_batched_tokens": 512, "max_num_seqs": 32},
}
FIGURES = ("goodput_requests_per_s", "slo_attainment", "completed_requests_per_s", "output_tokens_per_s")
LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms")


def run_policy(name: str, rates: list[float], args: argparse.Namespace, slo: Slo) -> list[dict[str, Any]]:
    from engine import LLM

    llm = LLM(model=None, dtype="float32", num_threads=args.threads, **POLICIES[name])
    llm.generate(["[warm-up] Hello"] * 2)
    figures = replay_rates(llm.engine, rates, args, slo, name)
    del llm
    gc.collect()
    return figures


def combine(rounds: list[list[dict[str, Any]]], defaults: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per rate: medians over rounds of each figure, and the goodput ratio to the default in each round."""
    out = []
    for i, rate in enumerate(r["rate"] for r in rounds[0]):
        per_round = [figures[i] for figures in rounds]
        row: dict[str, Any] = {"rate": rate}
        for key in FIGURES:
            row[key] = median([r[key] for r in per_round])
        for key in LATENCIES:
            row[key] = {q: median([r[key][q] for r in per_round if r[key][q] is not None]) for q in ("p50", "p99")}
        ratios = [
            round(r["goodput_requests_per_s"] / d[i]["goodput_requests_per_s"], 3)
            for r, d in zip(per_round, defaults, strict=True)
            if d[i]["goodput_requests_per_s"]
        ]
        row["goodput_vs_default_per_round"] = ratios
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="2,3,4", help="comma-separated requests/s (default 2,3,4)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--policies", default=None, help="comma-separated subset of: " + ", ".join(POLICIES))
    parser.add_argument("--slo-ttft-s", type=float, default=2.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=150.0)
    parser.add_argument("--save", action="store_true", help="also write bench/results/scheduler-policy-<time>.json")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    names = [n.strip() for n in args.policies.split(",")] if args.policies else list(POLICIES)
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        parser.error(f"unknown policies {unknown}; known: {list(POLICIES)}")
    default_name = next(iter(POLICIES))
    if default_name not in names:
        names.insert(0, default_name)  # every ratio is to the default of the same round
    slo = Slo(ttft_s=args.slo_ttft_s, tpot_s=args.slo_tpot_ms / 1000)
    from producer.logs import configure_logging

    configure_logging(level="warning", json=True)
    started = time.monotonic()
    results: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(run_policy(name, rates, args, slo))
    report: dict[str, Any] = {
        "benchmark": "scheduler-policy",
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "model": "SmolLM2-135M-Instruct, real weights, fp32",
            "path": "bench/serving.py's arrivals and prompts straight into LLMEngine in this process",
            "rates_requests_per_s": rates,
            "requests_per_rate": args.requests,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "order": "rotated each round",
            "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
            "threads": args.threads,
        },
        "policies": {
            name: {"settings": POLICIES[name], "rates": combine(results[name], results[default_name])} for name in names
        },
        "seconds": round(time.monotonic() - started),
    }
    emit_report(report, "scheduler-policy", args.save)


if __name__ == "__main__":
    main()
