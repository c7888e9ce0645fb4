# ruff: noqa: E402
"""Reliability run: the full fault, fuzz, load and security suites, then docs/RELIABILITY.md from their figures.

Prints one JSON object and writes the page (bench/reliability_page.py renders it). Not a test: the
short versions of the same runs are in tests/chaos and tests/security and take part in `make test`.
`--quick` shrinks every run to check the script itself (the page it writes says so).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/reliability.py`, this file's folder comes first on sys.path and would shadow the
# standard library's `queue` module (bench/queue.py) for everything imported after it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import json
import os
import platform
import re
import subprocess
import tempfile
import time
from typing import Any

os.environ["TOKENRELAY_CHAOS"] = "full"  # the pytest parts below run their full versions too

from bench.load import scale_out, soak
from bench.queue import capacity
from bench.reliability_page import render
from tests.chaos.gateway_fuzz import run_gateway_fuzz
from tests.chaos.harness import run_worker_chaos
from tests.chaos.ledger import random_specs
from tests.chaos.redis_faults import FAULTS, run_redis_chaos
from tests.chaos.worker_fuzz import run_worker_fuzz
from tests.stack_helpers import start_stack
from worker.redis_server import RedisServer

ROOT = _HERE.parent


def _pytest(*args: str) -> dict[str, Any]:
    """A pytest run in a subprocess: its closing summary, parsed."""
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENRELAY_CHAOS": "full"},
    )
    tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail)}
    return {
        "args": list(args),
        "returncode": out.returncode,
        **counts,
        "summary": tail,
        "seconds": round(time.monotonic() - started, 1),
    }


def _atheris(runs: int, work: Path) -> dict[str, Any]:
    corpus = work / "atheris-corpus"
    corpus.mkdir(exist_ok=True)
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "tests.chaos.atheris_decode", f"-runs={runs}", "-max_len=2048", "-seed=1", str(corpus)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    done = re.search(r"Done (\d+) runs", out.stderr)
    progress = re.findall(r"^#(\d+)\s", out.stderr, re.MULTILINE)  # libFuzzer's status lines: runs so far
    cov = re.findall(r"cov: (\d+)", out.stderr)
    if not progress:  # the fuzzer never started (import error, bad flag): not a finding about the decoder
        raise RuntimeError(f"atheris did not start:\n{out.stderr[-3000:]}")
    return {
        "runs": int(done.group(1)) if done else int(progress[-1]),
        "crashes": int(out.returncode != 0),
        "crash_report": out.stderr[-2000:] if out.returncode else None,
        "coverage_edges": int(cov[-1]) if cov else None,
        "seconds": round(time.monotonic() - started, 1),
    }


def _gateway(work: Path, examples: int) -> dict[str, Any]:
    from engine.models.default_model import default_model_dir
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model("llama", work / "tiny-llama", tokenizer_from=default_model_dir())
    (work / "gateway").mkdir()
    stack = start_stack(work / "gateway", gateway_env={"TOKENRELAY_REQUEST_TIMEOUT_S": "0.5"}, model_dir=model)
    try:
        report = run_gateway_fuzz(stack.gateway.url, examples)
    finally:
        stack.close()
    return {**report.as_dict(), "failures": report.server_errors[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small versions of everything, to check the script")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "RELIABILITY.md")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="run nothing: write the page from the JSON an earlier run printed (e.g. bench/results/reliability.json)",
    )
    args = parser.parse_args()
    if args.render is not None:
        args.page.write_text(render(json.loads(args.render.read_text())))
        return
    q = args.quick
    from producer.logs import configure_logging

    configure_logging(level="warning", json=True)
    result: dict[str, Any] = {
        "quick": q,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, {_redis_version()}",
    }
    started = time.monotonic()

    def done(name: str, value: Any) -> None:
        # a progress line per part: a run of most of an hour that fails late still shows what it measured
        result[name] = value
        print(json.dumps({name: value, "elapsed_s": round(time.monotonic() - started)}), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        logs = work / "logs"
        done(
            "worker_chaos",
            run_worker_chaos(
                logs,
                random_specs(600 if q else 10_000, seed=7),
                rate=100.0 if q else 150.0,
                interval=(0.3, 0.9),
                seed=7,
            ).as_dict(),
        )
        # a seed per fault kind: each run gets its own fault schedule (the runs in reliability.json before
        # this change all used seed 11, so they shared one schedule)
        done(
            "redis_faults",
            [
                run_redis_chaos(
                    logs,
                    random_specs(400 if q else 3_000, seed=11 + i),
                    fault=fault,
                    rate=80.0 if q else 100.0,
                    seed=11 + i,
                ).as_dict()
                for i, fault in enumerate(FAULTS)
            ],
        )
        with RedisServer() as server:
            fuzz = run_worker_fuzz(
                server.url, logs, 3_000 if q else 100_000, 1_000 if q else 10_000, 100 if q else 1_000
            )
        done("fuzz_worker", {**fuzz.as_dict(), "violation_samples": fuzz.violations[:5]})
        done("fuzz_atheris", _atheris(20_000 if q else 1_000_000, work))
        # the pytest parts run their full sizes even in --quick (TOKENRELAY_CHAOS=full above)
        done("fuzz_client", {**_pytest("tests/chaos/test_fuzz.py", "-k", "client_side"), "examples": 5_000})
        done("fuzz_gateway", _gateway(work, 20 if q else 250))
        with RedisServer() as server:
            done(
                "capacity_one_worker",
                capacity(server.url, logs, 3_000 if q else 20_000, 32 if q else 256, 200 if q else 2_000),
            )
        done("scale_out", scale_out(logs, rounds=3 if q else 8))
        # ten times the request rate per worker: where the machine's two cores, not the queue, run out first
        done("scale_out_busy", scale_out(logs, slots=32, step_s=0.01, rounds=4 if q else 16))
        done(
            "security", {"tls_caps_logs": _pytest("tests/security"), "acl": _pytest("tests/compose/test_redis_acl.py")}
        )
        done("soak", soak(logs, minutes=1.0 if q else 10.0, sample_s=5.0 if q else 15.0))
    result["seconds"] = round(time.monotonic() - started)
    print(json.dumps(result, indent=2))
    args.page.parent.mkdir(parents=True, exist_ok=True)
    args.page.write_text(render(result))


def _redis_version() -> str:
    from worker.redis_server import find_redis_server

    out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"v=(\S+)", out)
    return f"redis-server {match.group(1) if match else '?'}"


if __name__ == "__main__":
    main()
