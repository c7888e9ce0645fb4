"""Decode steps on a quiet machine and beside a busy process, for the engine's OpenMP settings.

Each setting runs `bench/decode_step.py` in its own process (libgomp reads its spin count once, at
load), on quiet cores and then with `--busy` processes spinning beside it, the settings in rotating
order over `--rounds`. Settings: libgomp's spin count at 5,000, 30,000 and 300,000 turns (its own
default) with a fixed thread count, and the engine's default (300,000 turns, threads adapted to the
load: engine/cpu_threads.py). Prints one JSON object: the median step per setting, load and running
count, and each setting's ratio to the default.

    python bench/contention.py [--running 1,8] [--rounds 2] [--busy 1] [--save]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.workloads import emit_report, machine_info  # noqa: E402

SETTINGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "spin 5000, fixed threads": ({"GOMP_SPINCOUNT": "5000"}, ["--no-adaptive-threads"]),
    "spin 30000, fixed threads": ({"GOMP_SPINCOUNT": "30000"}, ["--no-adaptive-threads"]),
    "spin 300000, fixed threads": ({"GOMP_SPINCOUNT": "300000"}, ["--no-adaptive-threads"]),
    "default (spin 300000, adaptive threads)": ({}, []),
}
DEFAULT = "default (spin 300000, adaptive threads)"


def run_one(env: dict[str, str], flags: list[str], running: str, steps: int, threads: int) -> dict[str, Any]:
    command = [sys.executable, str(ROOT / "bench" / "decode_step.py"), "--running", running]
    command += ["--steps", str(steps), "--threads", str(threads), *flags]
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run(command, env={**clean, **env}, capture_output=True, text=True, timeout=1800, check=True)
    text = out.stdout
    start = text.find("\n{") + 1 if not text.startswith("{") else 0  # logs may come first
    return json.loads(text[start:])


def busy_processes(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--running", default="1,8")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", type=int, default=1, help="busy processes beside the engine in the busy runs")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    names = list(SETTINGS)
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    for load in ("quiet", "busy"):
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                env, flags = SETTINGS[name]
                competitors = busy_processes(args.busy) if load == "busy" else []
                try:
                    time.sleep(0.5 if competitors else 0.0)
                    report = run_one(env, flags, args.running, args.steps, args.threads)
                finally:
                    for p in competitors:
                        p.kill()
                        p.wait()
                runs.append(
                    {
                        "setting": name,
                        "load": load,
                        "round": round_,
                        "openmp_spin": report["openmp_spin"],
                        "threads_at_end": report["threads_at_end"],
                        "thread_changes": report["thread_changes"],
                        "step_ms": {str(r["running"]): r["step_ms_median"] for r in report["results"]},
                    }
                )
                print(f"{load} {name}: {runs[-1]['step_ms']} threads {report['threads_at_end']}", file=sys.stderr)
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for load in ("quiet", "busy"):
        for name in names:
            mine = [r for r in runs if r["setting"] == name and r["load"] == load]
            medians.setdefault(load, {})[name] = {
                n: round(statistics.median(r["step_ms"][n] for r in mine), 1) for n in args.running.split(",")
            }
    ratios = {
        load: {
            name: {n: round(v / medians[load][DEFAULT][n], 2) for n, v in per.items()}
            for name, per in medians[load].items()
        }
        for load in medians
    }
    report = {
        "benchmark": "contention",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(threads=args.threads),
        "settings": {"running": args.running, "steps": args.steps, "rounds": args.rounds, "busy": args.busy},
        "median_step_ms": medians,
        "ratio_to_default": ratios,
        "runs": runs,
        "seconds": round(time.monotonic() - started),
        "notes": "busy: that many `while True: pass` processes beside the engine; step_ms keyed by running requests",
    }
    emit_report(report, "contention", args.save)


if __name__ == "__main__":
    main()
