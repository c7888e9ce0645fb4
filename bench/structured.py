"""Structured-outputs benchmark: what constraining requests by a JSON Schema costs the engine.

The "mixed" workload (bench/workloads.py: random-id prompts of U[16,256] tokens, EOS ignored) on the
default model in fp32 at temperature 0.7, with 0 %, 50 % and 100 % of the requests constrained by a
realistic JSON Schema (a product record), in one process, interleaved over rounds. A constrained
request ends where its schema ends; an unconstrained one generates as many tokens as the same request
did under the schema (learnt in the first pass), so all three shares do the same work and the ratios
measure the constraint's cost, not shorter outputs. Reports output tokens/s of each as a ratio to 0 %,
the mask time per step (p50/p99), compile time (p50/p99) over 100 distinct schemas, and the share of
constrained outputs that validate. Prints one JSON object.

    python bench/structured.py --quick          # 16 requests, two rounds
    python bench/structured.py --save           # 64 requests, three rounds; writes bench/results/
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.workloads import emit_report, machine_info, median, mixed_workload, percentile  # noqa: E402

PEERS_DIR = Path(os.environ.get("PEERS_DIR", Path.home() / ".cache" / "peers"))
TARGETS = {"ratio_50": 0.95, "ratio_100": 0.9, "valid_share": 1.0}
SHARES = (0, 50, 100)


def product_schema(variant: int = 0) -> dict[str, Any]:
    """An extraction schema of the kind web apps send; `variant` makes distinct ones for the compile figures."""
    rng = random.Random(variant)
    currencies = rng.sample(["USD", "EUR", "GBP", "JPY", "CHF", "SEK", "CAD"], 3 + variant % 3)
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 40 + variant % 20},
            "price": {"type": "number", "minimum": 0, "maximum": 10_000 + variant},
            "currency": {"enum": currencies},
            "in_stock": {"type": "boolean"},
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 2 + variant % 4},
            "dimensions": {
                "type": "object",
                "properties": {f"d{variant % 7}": {"type": "number"}, "unit": {"enum": ["cm", "in"]}},
                "required": ["unit"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "price", "currency", "in_stock"],
        "additionalProperties": False,
    }


def run_share(
    engine: Any, workload: list[tuple[list[int], int]], share: int, tag: str, lengths: list[int] | None = None
) -> dict[str, Any]:
    """One pass of the workload with `share` % constrained. Unconstrained request i generates
    `lengths[i]` tokens when given (what the constrained request i produced), so every share does
    the same work and the ratios measure the constraint's cost, not shorter outputs."""
    from engine import SamplingParams

    schema = product_schema()
    constrained_ids = set()
    started = time.perf_counter()
    engine.sampler.constraints.mask_seconds.clear()
    for i, (prompt, n) in enumerate(workload):
        constrained = i * share // 100 != (i + 1) * share // 100  # spreads the constrained ones evenly
        params = SamplingParams(
            max_tokens=n if constrained or lengths is None else lengths[i],
            temperature=0.7,
            seed=i,
            ignore_eos=True,
            structured_outputs={"json": schema} if constrained else None,
        )
        engine.add_request(f"{tag}-{i}", prompt, params)
        if constrained:
            constrained_ids.add(f"{tag}-{i}")
    tokens = steps = 0
    finished: dict[str, Any] = {}
    while engine.has_unfinished():
        outputs = engine.step()
        steps += 1
        for out in outputs:
            tokens += len(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out
    seconds = time.perf_counter() - started
    masks = sorted(engine.sampler.constraints.mask_seconds)
    return {
        "share": share,
        "seconds": seconds,
        "output_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "steps": steps,
        "mask_ms": [m * 1000 for m in masks],
        "constrained": [finished[i] for i in sorted(constrained_ids)],
        "lengths": [len(finished[f"{tag}-{i}"].token_ids) for i in range(len(workload))],
    }


def validate(outputs: list[Any]) -> dict[str, Any]:
    import jsonschema

    schema = product_schema()
    reasons: dict[str, int] = {}
    valid = 0
    for out in outputs:
        reasons[out.finish_reason] = reasons.get(out.finish_reason, 0) + 1
        if out.finish_reason == "stop":
            try:
                jsonschema.validate(json.loads(out.text), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
    stopped = reasons.get("stop", 0)
    return {
        "finish_reasons": reasons,
        "stopped": stopped,
        "valid": valid,
        "valid_share": valid / stopped if stopped else None,
    }


def compile_times(engine: Any, count: int) -> list[float]:
    from engine.structured.spec import StructuredOutputs

    compiler = engine.grammars.compiler
    compiler.tokenizer()  # built once per engine; not part of a schema's compile
    seconds = []
    for variant in range(1, count + 1):
        spec = StructuredOutputs(json=product_schema(variant))
        started = time.perf_counter()
        compiler.submit(spec).result()
        seconds.append((time.perf_counter() - started) * 1000)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 requests, two rounds")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", action="store_true", help="also write bench/results/structured-<time>.json")
    args = parser.parse_args()
    requests = args.requests or (16 if args.quick else 64)
    rounds = args.rounds or (2 if args.quick else 3)

    import structlog
    import torch

    from engine import LLM, SamplingParams

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is the JSON

    torch.set_num_threads(args.threads)
    # No prefix cache: every share runs the same prompts, and later runs must not find them cached.
    llm = LLM(model=None, num_threads=args.threads, enable_prefix_caching=False)
    engine = llm.engine
    llm.generate(
        [[1, 2, 3, 4]] * 2,
        [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, structured_outputs={"json": product_schema()})],
    )  # warm-up: kernels, llguidance's tokenizer, the schema's grammar

    workload = mixed_workload(requests)
    run_share(engine, workload[:8], 50, "warm-up")  # unmeasured: the first long prompts run slower
    runs: dict[int, list[dict[str, Any]]] = {s: [] for s in SHARES}
    lengths: list[int] | None = None
    for round_index in range(rounds):
        # The all-constrained pass comes first once, to learn each request's length; later rounds
        # rotate the order so that drift of this machine's speed spreads over all three.
        order = [100, 0, 50] if round_index == 0 else [SHARES[(round_index + k) % 3] for k in range(3)]
        for share in order:
            run = run_share(engine, workload, share, f"r{round_index}s{share}", lengths)
            lengths = lengths or run["lengths"]
            runs[share].append(run)
            print(f"[round {round_index + 1}/{rounds}] {share}% constrained: {run['output_tokens']} tokens, "
                  f"{run['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)  # fmt: skip

    compile_ms = compile_times(engine, 100)
    systems: dict[str, Any] = {}
    for share, share_runs in runs.items():
        masks = [m for r in share_runs for m in r["mask_ms"]]
        systems[f"{share}%"] = {
            "tokens_per_s": median([r["tokens_per_s"] for r in share_runs]),
            "tokens_per_s_runs": [round(r["tokens_per_s"], 2) for r in share_runs],
            "output_tokens": [r["output_tokens"] for r in share_runs],
            "steps": [r["steps"] for r in share_runs],
            "mask_ms_p50": percentile(masks, 50),
            "mask_ms_p99": percentile(masks, 99),
            "masked_steps": len(masks),
            # Noise-robust view of the cost: the share of the run's wall time spent masking.
            "mask_time_share": sum(masks) / 1000 / sum(r["seconds"] for r in share_runs),
            **({"validation": validate([o for r in share_runs for o in r["constrained"]])} if share else {}),
        }
    base = systems["0%"]["tokens_per_s"]
    ratios = {f"{s}%_vs_0%": systems[f"{s}%"]["tokens_per_s"] / base for s in SHARES if s}
    # Each round's share against the same round's 0 %: drift between rounds cancels out.
    paired = {
        f"{s}%_vs_0%_per_round": [
            round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in zip(runs[s], runs[0], strict=True)
        ]
        for s in SHARES
        if s
    }
    shares_valid = [systems[f"{s}%"]["validation"]["valid_share"] for s in SHARES if s]
    vllm_python = PEERS_DIR / "vllmenv" / "bin" / "python"
    report = {
        "benchmark": "structured",
        "workload": "mixed",
        "requests": requests,
        "rounds": rounds,
        "threads": args.threads,
        "temperature": 0.7,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "systems": systems,
        "ratios": ratios,
        "paired_ratios": paired,
        "paired_ratio_medians": {k: median(v) for k, v in paired.items()},
        "compile_ms_p50": percentile(compile_ms, 50),
        "compile_ms_p99": percentile(compile_ms, 99),
        "compile_schemas": len(compile_ms),
        "vllm_cpu": f"not run: no vLLM CPU build at {vllm_python}"
        if not vllm_python.exists()
        else "not run: installed, but this benchmark does not drive vLLM's structured outputs yet",
        "targets_met": {
            "50% >= 0.95 of 0%": ratios["50%_vs_0%"] >= TARGETS["ratio_50"],
            "100% >= 0.9 of 0%": ratios["100%_vs_0%"] >= TARGETS["ratio_100"],
            "100% of stopped outputs validate": all(v == 1.0 for v in shares_valid if v is not None),
        },
    }
    emit_report(report, "structured", args.save)


if __name__ == "__main__":
    main()
