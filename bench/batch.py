"""Batch benchmark: one batch file through the HTTP Batch API vs `tokenrelay batch` straight to Redis.

Prints one JSON object. Not a test. The same input (short completions, the no-op engine: the cost is
the queue and the batch machinery, not a model) runs through both paths in one run, in alternating
order, over several rounds:

- direct: `tokenrelay batch INPUT -o OUTPUT --redis URL` (a client process holds the window and gathers),
  timed by its own summary (`elapsed_s`: reading the file to the last line written; not its start-up);
- http: the openai SDK uploads the file, creates the batch, polls `retrieve` and downloads the output
  (the window refills inside the workers' scripts; no client or gateway drives it), timed from the
  upload's start to the download's end.

Reports each path's requests/s and their ratio, and for the HTTP path the time from the last line's
terminal event (its result-stream entry id) to the batch's `completed` as recorded in the ledger (the
same script writes both) and as the polling client first saw it.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

# bench/queue.py would shadow the standard library's `queue` for everything imported after it
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from typing import Any

import openai

from bench.workloads import emit_report, machine_info, median, percentile
from producer.connection import connect
from producer.protocol import JobKeys, Keys
from tests.queue_helpers import wait_for
from tests.stack_helpers import GatewayProcess, noop_worker
from worker.redis_server import RedisServer


def write_input(path: Path, requests: int, max_tokens: int) -> None:
    with path.open("w") as out:
        for i in range(requests):
            body = {"model": "tiny", "prompt": f"request {i} of the batch", "max_tokens": max_tokens}
            out.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}))
            out.write("\n")


def direct(redis_url: str, source: Path, work: Path, window: int) -> dict[str, Any]:
    output = work / f"direct-{time.monotonic_ns()}.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "batch", str(source), "-o", str(output), "--redis", redis_url]
        + ["--window", str(window), "--no-progress"],
        check=True,
        capture_output=True,
        env={**os.environ, "TOKENRELAY_LOG_LEVEL": "warning"},
    )
    # the run's own clock (its summary line): the interpreter's start-up is not the queue's cost
    elapsed = json.loads(done.stdout.decode().strip().splitlines()[-1])["elapsed_s"]
    lines = output.read_text().count("\n")
    return {"seconds": round(elapsed, 3), "lines": lines}


def last_terminal_ms(redis: Any, batch_id: str, lines: int) -> int:
    """The newest terminal event among the batch's requests (entry ids carry Redis's clock in ms)."""
    from producer.batches.validate import line_request_id

    keys = Keys("tiny")
    pipe = redis.pipeline(transaction=False)
    for i in range(lines):
        pipe.xrevrange(keys.result(line_request_id(batch_id.removeprefix("batch_"), i, 0)), count=1)
    return max(int(entries[0][0].decode().split("-")[0]) for entries in pipe.execute() if entries)


def http(gateway: GatewayProcess, redis: Any, source: Path, poll_s: float) -> dict[str, Any]:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=120)
    started = time.perf_counter()
    with source.open("rb") as handle:
        file_id = client.files.create(file=handle, purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(poll_s)
        batch = client.batches.retrieve(batch.id)
    seen_ms = time.time() * 1000
    output = client.files.content(batch.output_file_id).text if batch.output_file_id else ""
    elapsed = time.perf_counter() - started
    total = batch.request_counts.total
    last = last_terminal_ms(redis, batch.id, total)
    ledger = Keys("tiny").batch(batch.id)
    finished_ms = int(redis.hget(ledger, "finished_ms") or 0)
    return {
        "seconds": round(elapsed, 3),
        "lines": output.count("\n"),
        "status": batch.status,
        "recorded_completed_after_last_terminal_ms": finished_ms - last,
        "seen_completed_after_last_terminal_ms": round(seen_ms - last, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=256, help="lines in flight, both paths")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between the HTTP client's retrieves")
    parser.add_argument("--save", action="store_true", help="also write bench/results/batch-<time>.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tokenrelay-batch-bench-"))
    server = RedisServer().start()
    worker = noop_worker(server.url, work / "worker.log", "--max-num-seqs", str(args.window))
    gateway = GatewayProcess(
        server.url, work / "gateway.log", "--batch-window", str(args.window), "--batch-sweep-s", "0.2"
    )
    try:
        worker.wait_ready()
        gateway.wait_ready()
        redis = connect(server.url)
        source = work / "input.jsonl"
        write_input(source, args.requests, args.max_tokens)
        rounds: list[dict[str, Any]] = []
        for round_index in range(args.rounds):
            order = ["direct", "http"] if round_index % 2 == 0 else ["http", "direct"]
            result: dict[str, Any] = {"order": order}
            for path in order:
                if path == "direct":
                    result["direct"] = direct(server.url, source, work, args.window)
                else:
                    result["http"] = http(gateway, redis, source, args.poll)
            result["throughput_ratio"] = round(result["direct"]["seconds"] / result["http"]["seconds"], 3)
            rounds.append(result)
            wait_for(lambda: not redis.zcard(JobKeys().batches_active), 30, 0.1, "sweep done")
        ratios = [r["throughput_ratio"] for r in rounds]
        seen = [r["http"]["seen_completed_after_last_terminal_ms"] for r in rounds]
        recorded = [r["http"]["recorded_completed_after_last_terminal_ms"] for r in rounds]
        report = {
            "benchmark": "batch",
            "machine": machine_info(),
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "window": args.window,
            "poll_s": args.poll,
            "rounds": rounds,
            "direct_requests_per_s": round(
                args.requests / statistics.median(r["direct"]["seconds"] for r in rounds), 1
            ),
            "http_requests_per_s": round(args.requests / statistics.median(r["http"]["seconds"] for r in rounds), 1),
            "throughput_ratio_median": median(ratios),
            "target_throughput_ratio": 0.9,
            "recorded_completed_after_last_terminal_ms_p50": percentile(recorded, 50),
            "seen_completed_after_last_terminal_ms_p50": percentile(seen, 50),
            "target_completed_after_last_terminal_p50_ms": 1000,
        }
        emit_report(report, "batch", args.save)
    finally:
        gateway.stop()
        worker.kill()
        server.close()


if __name__ == "__main__":
    main()
