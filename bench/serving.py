# ruff: noqa: E402
"""Serving benchmark: tokenrelay's gateway -> Redis -> worker against vLLM-CPU's OpenAI server, Poisson load.

Prints one JSON object. Not a test. Both services run the default model (SmolLM2-135M-Instruct, real
weights, fp32, both cores) and are driven by the same client (bench/serving_load.py: the openai SDK's
async client, streamed /v1/completions, greedy, fixed output lengths) with the same prompts (passages
of bench/data/prose.txt, each behind a prefix unique to its rate and index, so no prefix-cache hits
across requests) arriving as a Poisson process at each rate in turn. Both services stay up for the
whole run and take turns (ABBA over rates), so a drift in the machine's speed favours neither; the one
not measured is frozen (SIGSTOP) meanwhile, since an idle service still wakes up now and then and on
two cores every wake-up stalls the measured one's threads. Afterwards the same arrivals go straight
into tokenrelay's engine in this process (`engine_in_process`): what the service path costs. Per rate
and service: completed requests/s, output tokens/s, TTFT, TPOT and inter-chunk latency percentiles,
and goodput (requests meeting the TTFT and TPOT SLOs, per second); ratios where both ran. vLLM runs
only when ../shared/peers/ has installed it ($PEERS_DIR/vllmenv); otherwise the report says it was skipped.

    python bench/serving.py --quick --save     # 3 rates x 10 requests of 32 tokens, about 2 minutes
    python bench/serving.py --save             # 6 rates x 32 requests of 64 tokens
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ would come first on sys.path: bench/queue.py would shadow the standard
# library's `queue` and bench/engine.py the `engine` package.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse
import asyncio
import dataclasses
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import psutil
from openai import AsyncOpenAI

from bench.peer_env import PEERS_DIR, VLLM_PYTHON, vllm_env, vllm_installed
from bench.queue import start_worker, stop_worker, wait_ready
from bench.serving_load import Slo, poisson_offsets, replay_in_process, run_rate, summarise
from bench.speculative import passages
from bench.workloads import emit_report, machine_info
from producer.protocol import DEFAULT_MODEL_NAME
from tests.stack_helpers import GatewayProcess
from worker.redis_server import RedisServer, free_port

# 3 req/s sits between the last rate where both services are arrival-bound (2: every request meets
# the SLO, so goodput is the arrival rate for both) and one past saturation (4): without it the highest
# rate where either meets the SLO is one where goodput ties by construction.
RATES = (0.25, 0.5, 1.0, 2.0, 3.0, 4.0)
QUICK_RATES = (0.5, 2.0, 8.0)
SLO_ATTAINMENT = 0.9  # a service "meets the SLO" at a rate when this share of its requests does
# vLLM-CPU 0.32's own defaults for its OpenAI server (vllm/engine/arg_utils.py, UsageContext.OPENAI_API_SERVER
# on CPU), passed as flags: its start-up log does not print them, and a later vLLM with other defaults
# is still run the same way. Runs before 2026-12-03 left them to vLLM (`scheduler_from_log`, always {}).
VLLM_SCHEDULER = {"max_num_batched_tokens": 2048, "max_num_seqs": 128}
SCHEDULER_FIELDS = (
    "max_num_seqs",
    "max_num_batched_tokens",
    "block_size",
    "num_kv_blocks",
    "kv_cache_memory_gb",
    "enable_prefix_caching",
    "preemption_mode",
    "swap_space_gb",
    "speculative",
    "dtype",
    "num_threads",
)


@dataclass(slots=True)
class Service:
    name: str
    base_url: str  # ends in /v1
    model: str
    processes: list[subprocess.Popen[Any]]
    settings: dict[str, Any]
    stop: Any  # () -> None
    records: list[dict[str, Any]] = field(default_factory=list)
    probe: Any = None  # () -> dict: what the service says of itself after a rate (tokenrelay: its worker)


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds used so far by these processes and their live descendants."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for process in [root, *root.children(recursive=True)]:
                times = process.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def freeze(pids: list[int]) -> list[psutil.Process]:
    """SIGSTOP these processes and their descendants: an idle service still wakes up (timers, polling
    threads, OpenMP), and on two cores each wake-up stalls the measured service's threads."""
    stopped = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for process in [root, *root.children(recursive=True)]:
                process.suspend()
                stopped.append(process)
        except psutil.NoSuchProcess:
            continue
    return stopped


def thaw(processes: list[psutil.Process]) -> None:
    for process in reversed(processes):
        try:
            process.resume()
        except psutil.NoSuchProcess:
            continue


def machine_cpu_s() -> tuple[float, float]:
    """CPU seconds so far, all cores: busy (steal excluded), and stolen by the hypervisor."""
    times = psutil.cpu_times()
    steal = getattr(times, "steal", 0.0)
    return sum(times) - times.idle - getattr(times, "iowait", 0.0) - steal, steal


def served_config(threads: int) -> Any:
    """The EngineConfig of a worker started with `--dtype float32 --threads N`: its own settings loader,
    on the same flags and TOKENRELAY_* environment (so its chunk budget, not the offline engine's)."""
    from worker.settings import WorkerSettings

    return WorkerSettings.from_env(dtype="float32", num_threads=threads).engine_config()


def start_tokenrelay(redis: RedisServer, log_dir: Path, threads: int) -> Service:
    worker = start_worker(redis.url, log_dir, "--dtype", "float32", "--threads", str(threads))
    gateway = GatewayProcess(redis.url, log_dir / "gateway.log", env={"TOKENRELAY_LOG_LEVEL": "warning"})
    try:
        wait_ready(redis.url, DEFAULT_MODEL_NAME, worker)
        gateway.wait_ready()
    except BaseException:
        gateway.stop()
        stop_worker(worker)
        raise
    config = served_config(threads)  # what the worker ran with
    scheduler = {name: getattr(config, name) for name in SCHEDULER_FIELDS}
    scheduler["policy"] = "running requests first, then waiting; chunked prefill within the step's token budget"

    def stop() -> None:
        gateway.stop()
        stop_worker(worker)

    settings = {
        "path": "openai SDK -> gateway (tokenrelay serve) -> Redis -> one worker process",
        "worker_flags": ["--dtype", "float32", "--threads", str(threads)],
        "scheduler": scheduler,
    }
    processes = [worker, gateway.process, *([redis.process] if redis.process else [])]

    def probe() -> dict[str, Any]:
        """The worker's compute threads (engine.cpu_threads) and step-loop timing, from its heartbeat."""
        import redis as redis_py

        from producer.status import gather

        workers = [w for s in gather(redis_py.Redis.from_url(redis.url)) for w in s.workers]
        keys = ("threads", "thread_changes", "steps", "step_s", "overhead_s")  # cumulative since the worker started
        return {k: workers[0].get(k) for k in keys} if workers else {}

    return Service("tokenrelay", f"{gateway.url}/v1", DEFAULT_MODEL_NAME, processes, settings, stop, probe=probe)


def start_vllm(log_dir: Path, threads: int, timeout_s: float) -> Service:
    from engine.models.default_model import default_model_dir

    port = free_port()
    model = str(default_model_dir())
    flags = ["--model", model, "--dtype", "float32", "--max-model-len", "2048", "--seed", "0", "--port", str(port)]
    flags += [arg for name, value in VLLM_SCHEDULER.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    log_path = log_dir / "vllm.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", *flags],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=vllm_env(threads),
            start_new_session=True,  # its engine core is a child: stopped with the group
        )

    def stop() -> None:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    started = time.monotonic()
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None or time.monotonic() - started > timeout_s:
            stop()
            raise RuntimeError(f"vLLM's server did not come up; its log ends:\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    settings = {
        "path": "openai SDK -> vllm.entrypoints.openai.api_server (vllm-cpu)",
        "flags": flags[2:],
        "env": {k: v for k, v in vllm_env(threads).items() if k.startswith("VLLM_") or k == "LD_PRELOAD"},
        "scheduler": VLLM_SCHEDULER,
        "start_up_s": round(time.monotonic() - started, 1),
    }
    return Service("vllm_cpu", f"{url}/v1", model, [process], settings, stop)


def prompts_for(rate_index: int, count: int) -> list[str]:
    texts = passages()
    return [f"[{rate_index}.{i}] {texts[(rate_index * 7 + i) % len(texts)]}" for i in range(count)]


async def measure(services: list[Service], rates: list[float], args: argparse.Namespace, slo: Slo) -> None:
    clients = {s.name: AsyncOpenAI(base_url=s.base_url, api_key="bench", max_retries=0, timeout=600) for s in services}
    for service in services:  # warm-up: connections, the first forward passes
        await run_rate(clients[service.name], service.model, ["[warm-up] Hello"] * 2, [0.0, 0.0], 4, 120)
    bench_pid = os.getpid()
    for index, rate in enumerate(rates):
        count = args.requests
        offsets = poisson_offsets(count, rate, seed=index)
        prompts = prompts_for(index, count)
        max_seconds = args.max_seconds or offsets[-1] + 60 + count * args.max_tokens * 0.1
        for service in services if index % 2 == 0 else services[::-1]:
            ours = [bench_pid, *(p.pid for s in services for p in s.processes)]
            mine = [p.pid for p in service.processes]
            idle = [p.pid for s in services if s is not service for p in s.processes]  # the service not measured
            load_before = os.getloadavg()[0]
            cpu_before = (*machine_cpu_s(), tree_cpu_s(ours), tree_cpu_s(mine), tree_cpu_s(idle))
            began = time.monotonic()
            frozen = freeze(idle) if args.freeze_idle else []
            try:
                records, seconds = await run_rate(
                    clients[service.name], service.model, prompts, offsets, args.max_tokens, max_seconds
                )
            finally:
                thaw(frozen)
            wall = time.monotonic() - began
            busy, steal, bench_cpu, service_cpu, idle_cpu = (
                after - before
                for after, before in zip(
                    (*machine_cpu_s(), tree_cpu_s(ours), tree_cpu_s(mine), tree_cpu_s(idle)), cpu_before, strict=True
                )
            )
            figures = summarise(records, seconds, args.max_tokens, slo)
            figures["rate"] = rate
            if service.probe is not None:
                figures["worker"] = service.probe()
            figures["machine"] = {  # cores, on average over the rate's run
                "loadavg_1m_before": round(load_before, 2),
                "loadavg_1m_after": round(os.getloadavg()[0], 2),
                "service_cores": round(service_cpu / wall, 2),
                "idle_service_cores": round(idle_cpu / wall, 2),  # the other service, waiting for its turn
                "other_processes_cores": round(max(0.0, busy - bench_cpu) / wall, 2),  # not this benchmark's
                "steal_cores": round(steal / wall, 2),
            }
            service.records.append(figures)
            print(f"rate {rate} {service.name}: {_line(figures)}", file=sys.stderr, flush=True)
    for client in clients.values():
        await client.close()


def replay(rates: list[float], args: argparse.Namespace, slo: Slo) -> dict[str, Any]:
    """Each rate's arrivals and prompts straight into tokenrelay's engine in this process, configured as
    the worker is (served_config)."""
    from engine import LLM

    config = served_config(args.threads)
    llm = LLM(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    llm.generate(["[warm-up] Hello"] * 2)
    figures = replay_rates(llm.engine, rates, args, slo, "engine in process")
    path = "the same arrivals into LLMEngine in the benchmark's process, no service around it"
    return {"path": path, "rates": figures}


def replay_rates(
    engine: Any, rates: list[float], args: argparse.Namespace, slo: Slo, label: str
) -> list[dict[str, Any]]:
    """Every rate's arrivals (`args.requests`, `args.max_tokens`) into `engine`, one rate after another."""
    figures = []
    for index, rate in enumerate(rates):
        offsets = poisson_offsets(args.requests, rate, seed=index)
        records, seconds = replay_in_process(
            engine, f"rate{index}", prompts_for(index, args.requests), offsets, args.max_tokens
        )
        figures.append({**summarise(records, seconds, args.max_tokens, slo), "rate": rate})
        print(f"rate {rate} {label}: {_line(figures[-1])}", file=sys.stderr, flush=True)
    return figures


def _line(f: dict[str, Any]) -> str:
    return (
        f"{f['completed']}/{f['requests']} done, {f['output_tokens_per_s']} tok/s, TTFT p50 {f['ttft_ms']['p50']} ms, "
        f"TPOT p50 {f['tpot_ms']['p50']} ms, goodput {f['goodput_requests_per_s']} req/s"
    )


def compare(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    """tokenrelay / vLLM per rate (above 1 is better for rates and throughput, worse for latencies), and
    the issue's two targets."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    per_rate = []
    for a, b in zip(ours, theirs, strict=True):
        per_rate.append(
            {
                "rate": a["rate"],
                "goodput": ratio(a["goodput_requests_per_s"], b["goodput_requests_per_s"]),
                "output_tokens_per_s": ratio(a["output_tokens_per_s"], b["output_tokens_per_s"]),
                "completed_requests_per_s": ratio(a["completed_requests_per_s"], b["completed_requests_per_s"]),
                **{
                    f"{m}_{q}": ratio(a[f"{m}_ms"][q], b[f"{m}_ms"][q])
                    for m in ("ttft", "tpot")
                    for q in ("p50", "p99")
                },
            }
        )
    meeting = [
        i
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
        if max(a["slo_attainment"] or 0, b["slo_attainment"] or 0) >= SLO_ATTAINMENT
    ]
    top = per_rate[meeting[-1]] if meeting else None
    # compared on the figures, not the ratio: a service with goodput where the other has none leads
    top_met = (
        ours[meeting[-1]]["goodput_requests_per_s"] >= 1.1 * theirs[meeting[-1]]["goodput_requests_per_s"]
        and ours[meeting[-1]]["goodput_requests_per_s"] > 0
        if meeting
        else None
    )
    light = per_rate[0]["ttft_p99"]
    return {
        "per_rate": per_rate,
        "targets": {
            "goodput_at_highest_rate_either_meets_slo": {
                "rate": top["rate"] if top else None,
                "target": ">= 1.1",
                "value": top["goodput"] if top else None,
                "met": top_met,
            },
            "ttft_p99_at_lightest_rate": {
                "target": "<= 1.0",
                "value": light,
                "met": light <= 1.0 if light is not None else None,
            },
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"rates {QUICK_RATES}, 10 requests, 32 tokens")
    parser.add_argument("--rates", default=None, help=f"comma-separated requests/s (default {RATES})")
    parser.add_argument("--requests", type=int, default=None, help="requests per rate (default 32; 10 with --quick)")
    parser.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (default 64; 32 quick)")
    parser.add_argument("--max-seconds", type=float, default=None, help="cut-off per rate (default: from its size)")
    parser.add_argument("--slo-ttft-s", type=float, default=2.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=150.0)
    parser.add_argument("--threads", type=int, default=2, help="cores each service computes on")
    parser.add_argument(
        "--replay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run each rate's arrivals into the engine in this process, without the service (default: on)",
    )
    parser.add_argument(
        "--freeze-idle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SIGSTOP the service not being measured during the other's turn (default: on)",
    )
    parser.add_argument("--with-vllm", choices=["auto", "no"], default="auto", help="auto: when installed")
    parser.add_argument("--vllm-start-timeout", type=float, default=600.0)
    parser.add_argument("--save", action="store_true", help="also write bench/results/serving-<time>.json")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")] if args.rates else list(QUICK_RATES if args.quick else RATES)
    args.requests = args.requests or (10 if args.quick else 32)
    args.max_tokens = args.max_tokens or (32 if args.quick else 64)
    slo = Slo(ttft_s=args.slo_ttft_s, tpot_s=args.slo_tpot_ms / 1000)
    from producer.logs import configure_logging

    configure_logging(level="warning", json=True)
    started = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "serving",
        "quick": args.quick,
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "model": DEFAULT_MODEL_NAME,
            "endpoint": "/v1/completions, stream, temperature 0, ignore_eos, min_tokens = max_tokens",
            "rates_requests_per_s": rates,
            "requests_per_rate": args.requests,
            "max_tokens": args.max_tokens,
            "max_seconds_per_rate": args.max_seconds,
            "arrivals": "Poisson, seed = rate index, the same schedule for every service",
            "prompts": "bench/data/prose.txt passages behind a prefix unique to rate and index",
            "slo": {**dataclasses.asdict(slo), "attainment_for_meets": SLO_ATTAINMENT},
            "threads": args.threads,
            "idle_service": "frozen (SIGSTOP) during the other's turn" if args.freeze_idle else "left running",
        },
        "systems": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp, RedisServer() as redis:
        log_dir = Path(tmp)
        services = [start_tokenrelay(redis, log_dir, args.threads)]
        try:
            if args.with_vllm == "no":
                report["systems"]["vllm_cpu"] = {"skipped": "--with-vllm no"}
            elif not vllm_installed():
                report["systems"]["vllm_cpu"] = {
                    "skipped": f"not installed: {PEERS_DIR / 'vllmenv'} is missing (../shared/peers/README.md)"
                }
            else:
                try:
                    services.append(start_vllm(log_dir, args.threads, args.vllm_start_timeout))
                except RuntimeError as exc:  # tokenrelay's figures still stand alone
                    report["systems"]["vllm_cpu"] = {"skipped": "failed to start", "error": str(exc)[-2000:]}
            asyncio.run(measure(services, rates, args, slo))
        finally:
            for service in services:
                service.stop()
    if args.replay:  # after the services are gone: the machine is this process's alone
        report["engine_in_process"] = replay(rates, args, slo)
    for service in services:
        report["systems"][service.name] = {"settings": service.settings, "rates": service.records}
    if len(services) == 2:
        report["tokenrelay_vs_vllm_cpu"] = compare(services[0].records, services[1].records)
    report["seconds"] = round(time.monotonic() - started)
    report["notes"] = (
        "TPOT = (latency - TTFT) / (output tokens - 1) per request; itl_ms is the gap between streamed chunks "
        "(tokenrelay coalesces tokens into fewer chunks when steps are fast: tokens_per_chunk says how many); "
        "goodput counts requests meeting both SLOs over the rate's seconds (first send to last finish); "
        "machine.other_processes_cores is the CPU the rest of the machine took during the rate"
    )
    emit_report(report, "serving", args.save)


if __name__ == "__main__":
    main()
