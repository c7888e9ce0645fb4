# ruff: noqa: E402
"""Queue benchmark: the engine through Redis vs in-process, queue capacity, latency the queue adds.

Prints one JSON object. Not a test. (a) the "mixed" workload (64 requests, prompts of U[16,256]
random token ids, outputs of U[16,128] tokens, greedy, ignore_eos, default model fp32) in-process
and through Redis + a worker process in the same run; (b) capacity with the no-op engine: requests/s
submit -> worker -> done, and token events/s published; (c) p50/p99 of submit -> first delta as the
client sees it, minus the engine's own TTFT.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/queue.py`, this file's folder comes first on sys.path and would shadow the
# standard library's `queue` module for everything imported after it (redis, the worker).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import gc
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from typing import Any

from bench.workloads import mixed_workload
from producer.client import Client, build_request
from producer.protocol import EVENT_FIELD, EventType, Keys, decode_event
from producer.results import Completion
from producer.status import gather
from worker.redis_server import RedisServer

MODEL = "SmolLM2-135M-Instruct"
THREADS = 2  # torch threads, as bench/engine.py runs the engine


def in_process(workload: list[tuple[list[int], int]]) -> dict[str, Any]:
    from engine.config import EngineConfig, SamplingParams
    from engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=None, dtype="float32", max_num_seqs=64, num_threads=THREADS))
    engine.add_request("warmup", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
    while engine.has_unfinished():
        engine.step()
    started = time.perf_counter()
    for i, (prompt, out_len) in enumerate(workload):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True))
    tokens = 0
    while engine.has_unfinished():
        tokens += len(engine.step())
    elapsed = time.perf_counter() - started
    return {"seconds": round(elapsed, 2), "output_tokens": tokens, "tokens_per_s": round(tokens / elapsed, 2)}


def start_worker(url: str, log_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    log = open(log_dir / f"worker-{len(list(log_dir.iterdir()))}.log", "wb")  # noqa: SIM115 - lives with the process
    env = {**os.environ, "TOKENRELAY_LOG_JSON": "1", "TOKENRELAY_LOG_LEVEL": "warning"}
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "worker", "--redis", url, *args], stdout=log, stderr=log, env=env
    )


def wait_ready(url: str, model: str, process: subprocess.Popen[bytes]) -> None:
    import redis

    client = redis.Redis.from_url(url)
    while not any(s.workers for s in gather(client) if s.model == model):
        if process.poll() is not None:
            raise RuntimeError("worker exited during start-up")
        time.sleep(0.1)


def stop_worker(process: subprocess.Popen[bytes]) -> int:
    process.terminate()
    return process.wait(60)


def collect(
    client: Client, ids: list[str], model: str, worker: subprocess.Popen[bytes], done_at: dict[str, int] | None = None
) -> tuple[dict[str, Completion], dict[str, float], int]:
    """Folds all result streams; returns completions, first-delta arrival times, and delta events read.

    `done_at`, when given, receives each terminal event's Redis timestamp (ms, from its entry id).
    """
    keys = Keys(model)
    positions = {keys.result(i): "0-0" for i in ids}
    owner = {keys.result(i): i for i in ids}
    completions = {i: Completion(i) for i in ids}
    first: dict[str, float] = {}
    deltas = 0
    while positions:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with code {worker.returncode}; see its log in the bench's temp dir")
        chunk = list(positions)[:1000]
        reply = client.redis.xread({k: positions[k] for k in chunk}, count=1000, block=1000)
        now = time.perf_counter()
        for raw_key, entries in reply or []:
            key = raw_key.decode()
            for entry_id, fields in entries:
                positions[key] = entry_id.decode()
                event = decode_event(fields[EVENT_FIELD.encode()])
                if event.type is EventType.DELTA:
                    deltas += 1
                    first.setdefault(owner[key], now)
                if completions[owner[key]].apply(event):
                    if done_at is not None:
                        done_at[owner[key]] = int(positions[key].split("-")[0])
                    del positions[key]
                    break
    return completions, first, deltas


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def through_redis(url: str, log_dir: Path, workload: list[tuple[list[int], int]]) -> dict[str, Any]:
    worker = start_worker(url, log_dir, "--max-num-seqs", "64", "--dtype", "float32", "--threads", str(THREADS))
    try:
        wait_ready(url, MODEL, worker)
        client = Client(url, model=MODEL, max_queue_depth=0)
        client.generate([[1, 2, 3]], max_tokens=4, temperature=0.0)  # warm-up, as in-process
        requests = [
            build_request(MODEL, prompt, max_tokens=n, temperature=0.0, ignore_eos=True) for prompt, n in workload
        ]
        started = time.perf_counter()
        ids = client.submit_requests(requests)
        submitted = time.perf_counter()
        completions, first, _ = collect(client, ids, MODEL, worker)
        elapsed = time.perf_counter() - started
        stats = next(s for s in gather(client.redis) if s.model == MODEL).workers[0]
    finally:
        stop_worker(worker)
    tokens = sum(len(c.token_ids) for c in completions.values())
    added = [(first[i] - submitted) - completions[i].usage["engine_ttft_s"] for i in ids]
    return {
        "seconds": round(elapsed, 2),
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 2),
        "worker_loop_overhead_pct": stats.get("overhead_pct"),
        "queue_added_ttft_ms": {
            "p50": round(1000 * percentile(added, 0.5), 2),
            "p99": round(1000 * percentile(added, 0.99), 2),
        },
    }


def capacity(url: str, log_dir: Path, n_requests: int, n_streams: int, stream_tokens: int) -> dict[str, Any]:
    client = Client(url, model="noop", max_queue_depth=0)
    # the worker alone: drain a queue filled beforehand, timed by Redis's clock on the done events
    backlog = [build_request("noop", "p", max_tokens=1, stream=False) for _ in range(n_requests)]
    started = time.perf_counter()
    client.submit_requests(backlog)
    submit_rate = n_requests / (time.perf_counter() - started)
    worker = start_worker(url, log_dir, "--engine", "noop", "--max-num-seqs", "512")
    try:
        # nothing reads the result streams while the worker drains (a reader folding 30,000 streams would
        # take CPU from it): wait for the queue to empty, then read the done events' Redis timestamps
        keys = client.keys()
        while sum(client.redis.xlen(k) for k in keys.queues):
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with code {worker.returncode}")
            time.sleep(0.1)
        done_at: dict[str, int] = {}
        collect(client, [r.request_id for r in backlog], "noop", worker, done_at)
        drain_rate = n_requests / max(0.001, (max(done_at.values()) - min(done_at.values())) / 1000)
        wait_ready(url, "noop", worker)
        # end to end: a producer thread submits in batches while the worker serves and this thread
        # folds the result streams; all three share the machine's cores with Redis
        requests = [build_request("noop", "p", max_tokens=1, stream=False) for _ in range(n_requests)]
        started = time.perf_counter()

        def produce() -> None:
            producer = Client(url, model="noop", max_queue_depth=0)
            for i in range(0, n_requests, 500):
                producer.submit_requests(requests[i : i + 500])

        thread = threading.Thread(target=produce)
        thread.start()
        completions, _, _ = collect(client, [r.request_id for r in requests], "noop", worker)
        thread.join()
        request_rate = n_requests / (time.perf_counter() - started)
        assert all(c.finish_reason == "length" for c in completions.values())
        # token events/s: long streams, published as the no-op engine makes them (coalesced per round trip)
        started = time.perf_counter()
        ids = client.submit_requests([build_request("noop", "p", max_tokens=stream_tokens) for _ in range(n_streams)])
        completions, _, deltas = collect(client, ids, "noop", worker)
        elapsed = time.perf_counter() - started
        tokens = sum(len(c.token_ids) for c in completions.values())
        assert tokens == n_streams * stream_tokens
        # latency the queue adds with nothing else going on: one request at a time
        added = []
        for _ in range(200):
            t0 = time.perf_counter()
            rid = client.submit("p", max_tokens=1)
            completion, first, _ = collect(client, [rid], "noop", worker)
            added.append((first[rid] - t0) - completion[rid].usage["engine_ttft_s"])
    finally:
        stop_worker(worker)
    return {
        "requests_per_s": round(request_rate),
        "requests": n_requests,
        "worker_drain_requests_per_s": round(drain_rate),
        "batch_submit_requests_per_s": round(submit_rate),
        "token_events_per_s": round(tokens / elapsed),
        "tokens": tokens,
        "delta_entries": deltas,
        "tokens_per_delta_entry": round(tokens / max(1, deltas), 1),
        "idle_queue_added_ttft_ms": {
            "p50": round(1000 * percentile(added, 0.5), 3),
            "p99": round(1000 * percentile(added, 0.99), 3),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 mixed requests and a smaller capacity run")
    parser.add_argument("--skip-model", action="store_true", help="only (b) and the idle part of (c)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="mixed-workload rounds, each in-process then "
        "through Redis in alternating order (default 2, 1 with --quick)",
    )
    args = parser.parse_args()
    from producer.logs import configure_logging

    configure_logging(level="warning", json=True)
    result: dict[str, Any] = {"quick": args.quick}
    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="bench-queue-") as logs:
        result["capacity_noop"] = capacity(
            server.url,
            Path(logs),
            5_000 if args.quick else 30_000,
            64 if args.quick else 256,
            500 if args.quick else 2_000,
        )
        if not args.skip_model:
            workload = mixed_workload(16 if args.quick else 64)
            rounds = args.rounds or (1 if args.quick else 2)
            local, queued = [], []
            for r in range(rounds):
                # ABBA order, so a drift in the machine's speed does not favour either side
                order = ("local", "queued") if r % 2 == 0 else ("queued", "local")
                for side in order:
                    if side == "local":
                        local.append(in_process(workload))
                        gc.collect()
                    else:
                        queued.append(through_redis(server.url, Path(logs), workload))
            result["mixed_in_process"] = local
            result["mixed_through_redis"] = queued
            result["mixed_ratio"] = round(
                statistics.median(q["tokens_per_s"] for q in queued)
                / statistics.median(x["tokens_per_s"] for x in local),
                3,
            )
    result["note"] = "mixed_ratio: median tokens/s through Redis over median in-process, same run"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
