# ruff: noqa: E402
"""Gateway benchmark: CPU per streamed token of each process on the service path, without a model.

Prints one JSON object. Not a test. A no-op worker (one token per request per step, `--noop-step-delay`
apart) serves streamed /v1/completions through the gateway to the openai SDK's async client, `--streams`
at a time. Per process (gateway, Redis, worker, client) it reports the CPU seconds the streams cost, per
token, with the gateway's result-stream reads multiplexed (producer.read_mux, the default) and with one
blocking XREAD per stream (TOKENRELAY_MULTIPLEX_READS=false), alternating, in one run. On two cores every
microsecond here is taken from the engine's threads, so this is what the service path costs a model.

    python bench/gateway.py --save            # 32 streams x 64 tokens x 3, 3 rounds of each setting
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse
import asyncio
import statistics
import tempfile
import time
from typing import Any

import psutil
from openai import AsyncOpenAI

from bench.queue import start_worker, stop_worker, wait_ready
from bench.workloads import emit_report, machine_info
from tests.stack_helpers import GatewayProcess
from worker.redis_server import RedisServer

MODEL = "noop"  # the no-op engine's model name
SETTINGS = {"multiplexed": "true", "per_stream": "false"}


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def drive(url: str, streams: int, tokens: int, waves: int) -> int:
    """`waves` times, `streams` concurrent streamed completions; returns the chunks received."""
    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)

    async def one(index: int) -> int:
        stream = await client.completions.create(model=MODEL, prompt=f"p {index}", max_tokens=tokens, stream=True)
        return sum([1 async for _ in stream])

    received = 0
    for _ in range(waves):
        received += sum(await asyncio.gather(*(one(i) for i in range(streams))))
    await client.close()
    return received


def measure(redis: RedisServer, log_dir: Path, multiplex: str, args: argparse.Namespace) -> dict[str, Any]:
    worker = start_worker(
        redis.url, log_dir, "--engine", "noop", "--noop-step-delay", str(args.step_s), "--max-num-seqs", "1024"
    )
    gateway = GatewayProcess(
        redis.url, log_dir / f"gateway-{multiplex}.log", env={"TOKENRELAY_MULTIPLEX_READS": multiplex}
    )
    try:
        wait_ready(redis.url, MODEL, worker)
        gateway.wait_ready()
        url = f"{gateway.url}/v1"
        asyncio.run(drive(url, args.streams, args.tokens, 1))  # warm: imports, connections, scripts
        assert redis.process is not None
        processes = {
            "gateway": psutil.Process(gateway.process.pid),
            "redis": psutil.Process(redis.process.pid),
            "worker": psutil.Process(worker.pid),
            "client": psutil.Process(),
        }
        before = {name: cpu_s(p) for name, p in processes.items()}
        started = time.perf_counter()
        chunks = asyncio.run(drive(url, args.streams, args.tokens, args.waves))
        wall = time.perf_counter() - started
        spent = {name: cpu_s(p) - before[name] for name, p in processes.items()}
    finally:
        gateway.stop()
        stop_worker(worker)
    tokens = args.streams * args.tokens * args.waves
    return {
        "tokens": tokens,
        "chunks": chunks,
        "seconds": round(wall, 2),
        "cpu_us_per_token": {name: round(s / tokens * 1e6, 1) for name, s in spent.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=32, help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--waves", type=int, default=3, help="rounds of --streams streams per measurement")
    parser.add_argument("--step-s", type=float, default=0.02, help="the no-op worker's step time")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each setting, alternating")
    parser.add_argument("--save", action="store_true", help="also write bench/results/gateway-<time>.json")
    args = parser.parse_args()
    from producer.logs import configure_logging

    configure_logging(level="warning", json=True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp, RedisServer() as redis:
        for round_index in range(args.rounds):
            order = list(SETTINGS) if round_index % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                runs[name].append(measure(redis, Path(tmp), SETTINGS[name], args))
    medians = {
        name: {
            proc: statistics.median(r["cpu_us_per_token"][proc] for r in results)
            for proc in results[0]["cpu_us_per_token"]
        }
        for name, results in runs.items()
    }
    service = ("gateway", "redis", "worker")  # what the service spends; the client is the caller's
    report = {
        "benchmark": "gateway",
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k != "save"},
        "path": "openai SDK (async, streamed /v1/completions) -> gateway -> Redis -> no-op worker",
        "runs": runs,
        "median_cpu_us_per_token": medians,
        "ratios": {
            "gateway_multiplexed_vs_per_stream": round(
                medians["multiplexed"]["gateway"] / medians["per_stream"]["gateway"], 3
            ),
            "service_multiplexed_vs_per_stream": round(
                sum(medians["multiplexed"][p] for p in service) / sum(medians["per_stream"][p] for p in service), 3
            ),
        },
    }
    emit_report(report, "gateway", args.save)


if __name__ == "__main__":
    main()
