# ruff: noqa: E402
"""Cluster benchmark: one hot model on a single Redis vs a 3-master Redis Cluster with P=1 and P=3 partitions.

Prints one JSON object. Not a test. The no-op engine, one model, the same load on each system:
N short requests (max_tokens 4, streamed) submitted in batches by producer threads while collector
threads fold their result streams, served by the same number of no-op worker processes. Per system:
end-to-end requests/s, and each master's Redis CPU (INFO cpu: used_cpu_sys + used_cpu_user) per 1,000
requests, its share of the total, and its publish-script calls (INFO commandstats: the publish script
is the only caller of SPOP). The systems run in alternating order over rounds; ratios are of medians.
The throughput cluster has no replicas (on 2 cores a replica only takes CPU from the masters). Then
durable submits' cost: latency of single `submit()` calls on a 3+3 cluster, submit_replicas 0 vs 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/cluster.py`, this file's folder comes first on sys.path and would shadow the
# standard library's `queue` module (bench/queue.py) for everything imported after it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import queue
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgpack
import psutil
import redis

from bench.queue import start_worker, stop_worker
from bench.workloads import emit_report, machine_info, percentile
from producer.client import Client, build_request
from producer.connection import connect
from producer.protocol import Keys
from worker.redis_cluster import RedisClusterServer
from worker.redis_server import RedisServer, find_redis_server

P = 3
MAX_TOKENS = 4
BATCH = 100  # requests per submit_requests call
WINDOW = 8  # batches a producer may have submitted and not yet seen finish


@dataclass(slots=True)
class System:
    name: str
    url: str
    partitions: int
    model: str
    masters: dict[str, int]  # a name per master ("shard0", ...) -> its port


def spread_model(cluster: RedisClusterServer, partitions: int) -> str:
    """A model name whose partitions hash to as many different masters (tests/cluster's way)."""
    for i in range(1000):
        name = f"hot{i}"
        if len({cluster.master_of(k.queues[0]).port for k in Keys(name).partitions(partitions)}) == partitions:
            return name
    raise RuntimeError("no model name spreads its partitions over the masters")


def shard_counters(masters: dict[str, int]) -> dict[str, tuple[float, int]]:
    """Per master: CPU seconds used so far, and publish-script calls (SPOP) so far."""
    counters = {}
    for name, port in masters.items():
        with redis.Redis(port=port) as client:
            cpu: Any = client.info("cpu")
            stats: Any = client.info("commandstats")
        publishes = int(stats.get("cmdstat_spop", {}).get("calls", 0))
        counters[name] = (cpu["used_cpu_sys"] + cpu["used_cpu_user"], publishes)
    return counters


def start_workers(system: System, count: int, log_dir: Path) -> list[subprocess.Popen[bytes]]:
    workers = [
        start_worker(
            system.url,
            log_dir,
            "--engine",
            "noop",
            "--model-name",
            system.model,
            "--max-num-seqs",
            "64",
            "--partitions",
            str(system.partitions),
        )
        for _ in range(count)
    ]
    client = connect(system.url)
    deadline = time.monotonic() + 60
    pids = {w.pid for w in workers}
    # ready: every worker's heartbeat is in Redis (it has created the groups and is reading)
    while not pids <= {msgpack.unpackb(v).get("pid") for v in client.hvals(Keys(system.model).workers)}:
        if any(w.poll() is not None for w in workers) or time.monotonic() > deadline:
            raise RuntimeError(f"a worker did not start; see its log in {log_dir}")
        time.sleep(0.1)
    client.close()
    return workers


def drive(system: System, clients: list[Client], n_requests: int) -> float:
    """Seconds from the first submit to the last terminal event: a producer and a collector thread per pair
    of clients, each producer submitting its share in batches while its collector folds them."""
    failures: list[BaseException] = []

    def guarded(work: Any) -> Any:
        def run(*args: Any) -> None:
            try:
                work(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                failures.append(exc)

        return run

    def produce(client: Client, requests: list[Any], window: queue.Queue[list[str] | None]) -> None:
        for i in range(0, len(requests), BATCH):
            window.put(client.submit_requests(requests[i : i + BATCH]))  # blocks while WINDOW are open
        window.put(None)

    def collect(client: Client, window: queue.Queue[list[str] | None]) -> None:
        while (ids := window.get()) is not None:
            done = client.wait_all(ids, timeout=120)
            if any(len(c.token_ids) != MAX_TOKENS for c in done.values()):
                raise AssertionError(f"{system.name}: a request finished with the wrong number of tokens")

    producers = len(clients) // 2
    threads = []
    for p in range(producers):
        share = [build_request(system.model, "p", max_tokens=MAX_TOKENS) for _ in range(n_requests // producers)]
        window: queue.Queue[list[str] | None] = queue.Queue(WINDOW)
        threads += [
            threading.Thread(target=guarded(produce), args=(clients[2 * p], share, window)),
            threading.Thread(target=guarded(collect), args=(clients[2 * p + 1], window)),
        ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return time.perf_counter() - started


def run_system(system: System, n_requests: int, workers: int, producers: int, log_dir: Path) -> dict[str, Any]:
    processes = start_workers(system, workers, log_dir)
    # long-lived clients, made before the measurement: a cluster client's start-up (CLUSTER SLOTS, COMMAND)
    # is not per request
    clients = [
        Client(system.url, model=system.model, partitions=system.partitions, max_queue_depth=0)
        for _ in range(2 * producers)
    ]
    try:
        drive(system, clients, 4 * BATCH * producers)  # warm-up: connections, scripts on every node, slots
        before = shard_counters(system.masters)
        cpu_before = process_cpu(processes)
        seconds = drive(system, clients, n_requests)
        cpu_after = process_cpu(processes)
        after = shard_counters(system.masters)
    finally:
        for client in clients:
            client.close()
        codes = [stop_worker(p) for p in processes]
    if any(codes):
        raise RuntimeError(f"{system.name}: worker exit codes {codes}")
    n = n_requests // producers * producers
    cpu = {name: after[name][0] - before[name][0] for name in system.masters}
    publishes = {name: after[name][1] - before[name][1] for name in system.masters}
    total = sum(cpu.values())
    return {
        "requests": n,
        "seconds": round(seconds, 3),
        "requests_per_s": round(n / seconds),
        "redis_cpu_s_per_1000_requests": {k: round(1000 * v / n, 4) for k, v in cpu.items()},
        "redis_cpu_s_per_1000_requests_total": round(1000 * total / n, 4),
        "cpu_share": {k: round(v / total, 3) if total else None for k, v in cpu.items()},
        "publish_calls": publishes,
        "redis_cpu_utilisation": round(total / seconds, 3),
        # where the machine's 2 cores went: no-op workers, and this process (producers and collectors)
        "workers_cpu_s_per_1000_requests": round(1000 * (cpu_after[0] - cpu_before[0]) / n, 4),
        "clients_cpu_s_per_1000_requests": round(1000 * (cpu_after[1] - cpu_before[1]) / n, 4),
    }


def process_cpu(workers: list[subprocess.Popen[bytes]]) -> tuple[float, float]:
    """CPU seconds so far of the worker processes together, and of this process."""

    def used(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    return sum(used(psutil.Process(w.pid)) for w in workers), used(psutil.Process())


def flush(system: System) -> None:
    for port in system.masters.values():
        with redis.Redis(port=port) as client:
            client.flushall()


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds: requests/s, and per shard CPU per 1,000 requests and share."""
    shards = runs[0]["cpu_share"]
    return {
        "requests_per_s": statistics.median(r["requests_per_s"] for r in runs),
        "redis_cpu_s_per_1000_requests": {
            s: round(statistics.median(r["redis_cpu_s_per_1000_requests"][s] for r in runs), 4) for s in shards
        },
        "redis_cpu_s_per_1000_requests_total": round(
            statistics.median(r["redis_cpu_s_per_1000_requests_total"] for r in runs), 4
        ),
        "max_cpu_share": statistics.median(max(v for v in r["cpu_share"].values() if v is not None) for r in runs),
        "publish_calls_per_1000_requests": round(
            statistics.median(1000 * sum(r["publish_calls"].values()) / r["requests"] for r in runs), 1
        ),
    }


def one_shard_arithmetic(p1: dict[str, Any]) -> dict[str, Any]:
    """How far one shard goes: from the P=1 cluster run, where one master carries the whole model."""
    cpu_per_request = p1["redis_cpu_s_per_1000_requests_total"] / 1000
    publishes_per_request = p1["publish_calls_per_1000_requests"] / 1000
    cpu_per_publish = cpu_per_request / publishes_per_request
    return {
        "basis": "cluster_p1 medians; a single-threaded Redis tops out at 1 CPU-second per second",
        "requests_per_s_per_shard": round(1 / cpu_per_request),
        "publishes_per_s_per_shard": round(1 / cpu_per_publish),
        "publish_calls_per_request": round(publishes_per_request, 3),
        "requests_per_publish": round(1 / publishes_per_request, 1),
        "note": "publishes/s counts all of a shard's CPU (submits, admits, heartbeats included) against its "
        "publish calls at this mix (4-token requests, 2 workers x 64 slots); shards needed for N "
        "workers at S steps/s: N*S / publishes_per_s_per_shard",
    }


def durable_cost(n_submits: int) -> dict[str, Any]:
    """p50/p99 of single submit() calls, submit_replicas 0 vs 1, on 3 masters + 3 replicas (blocks alternate)."""
    with RedisClusterServer(masters=3, replicas=1, node_timeout_ms=5_000) as cluster:
        model = spread_model(cluster, P)
        clients = {
            replicas: Client(cluster.url, model=model, partitions=P, max_queue_depth=0, submit_replicas=replicas)
            for replicas in (0, 1)
        }
        latencies: dict[int, list[float]] = {0: [], 1: []}
        for client in clients.values():
            for _ in range(50):  # warm-up: scripts, connections to every master
                client.submit("p", max_tokens=MAX_TOKENS)
        block = 50
        for b in range(2 * n_submits // block):
            replicas = b % 2
            for _ in range(block):
                started = time.perf_counter()
                clients[replicas].submit("p", max_tokens=MAX_TOKENS)
                latencies[replicas].append(time.perf_counter() - started)
        for client in clients.values():
            client.close()
        waits = 0  # the WAITs the masters ran: durable submits really waited for their replicas
        for node in cluster.masters():
            with cluster.client(node.port) as admin:
                stats: Any = admin.info("commandstats")
            waits += int(stats.get("cmdstat_wait", {}).get("calls", 0))

    def figures(values: list[float]) -> dict[str, float]:
        return {
            "p50_ms": round(1000 * percentile(values, 50), 3),
            "p99_ms": round(1000 * percentile(values, 99), 3),
            "mean_ms": round(1000 * statistics.mean(values), 3),
        }

    plain, durable = figures(latencies[0]), figures(latencies[1])
    return {
        "cluster": "3 masters + 3 replicas, partitions 3",
        "submits_each": len(latencies[0]),
        "submit_replicas_0": plain,
        "submit_replicas_1": durable,
        "wait_calls_on_masters": waits,
        "added_p50_ms": round(durable["p50_ms"] - plain["p50_ms"], 3),
        "added_p99_ms": round(durable["p99_ms"] - plain["p99_ms"], 3),
        "p50_ratio": round(durable["p50_ms"] / plain["p50_ms"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, one round, fewer submits")
    parser.add_argument(
        "--requests", type=int, default=None, help="requests per system per round (default 20,000; 5,000 with --quick)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds, systems in alternating order (default 3; 1 with --quick)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument(
        "--submits", type=int, default=None, help="single submits per durable setting (default 1,000; 300 with --quick)"
    )
    parser.add_argument("--save", action="store_true", help="also write bench/results/cluster-<time>.json")
    args = parser.parse_args()
    n_requests = args.requests or (5_000 if args.quick else 20_000)
    rounds = args.rounds or (1 if args.quick else 3)
    n_submits = args.submits or (300 if args.quick else 1_000)
    from producer.logs import configure_logging

    configure_logging(level="warning", json=True)
    started = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "cluster",
        "quick": args.quick,
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(
            redis=subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True).stdout.split()[2]
        ),
        "settings": {
            "engine": "noop",
            "requests": n_requests,
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "rounds": rounds,
            "workers": args.workers,
            "max_num_seqs": 64,
            "producers": args.producers,
            "submit_batch": BATCH,
            "producer_window_batches": WINDOW,
            "cluster_masters": 3,
            "cluster_replicas_throughput": 0,
            "partitions": P,
            "durable_submits_each": n_submits,
        },
    }
    with (
        tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp,
        RedisServer() as single,
        RedisClusterServer(masters=3, replicas=0, node_timeout_ms=5_000) as cluster,
    ):
        log_dir = Path(tmp)
        model = spread_model(cluster, P)
        masters = {f"shard{i}": n.port for i, n in enumerate(sorted(cluster.masters(), key=lambda n: n.slots[0]))}
        partition_shard = {
            i: next(s for s, port in masters.items() if port == cluster.master_of(k.queues[0]).port)
            for i, k in enumerate(Keys(model).partitions(P))
        }
        systems = [
            System("single", single.url, 1, model, {"single": single.port}),
            System("cluster_p1", cluster.url, 1, model, masters),
            System("cluster_p3", cluster.url, P, model, masters),
        ]
        report["settings"]["model"] = model
        report["settings"]["partition_shards"] = partition_shard
        runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in systems}
        for r in range(rounds):
            order = systems if r % 2 == 0 else systems[::-1]  # ABC CBA: drift favours no system
            for system in order:
                runs[system.name].append(run_system(system, n_requests, args.workers, args.producers, log_dir))
                flush(system)
                print(
                    f"round {r} {system.name}: {runs[system.name][-1]['requests_per_s']} requests/s",
                    file=sys.stderr,
                    flush=True,
                )
        report["durable_submits"] = durable_cost(n_submits)
    summary = {name: summarise(r) for name, r in runs.items()}
    ratio = round(summary["cluster_p3"]["requests_per_s"] / summary["single"]["requests_per_s"], 3)
    max_share = summary["cluster_p3"]["max_cpu_share"]
    report["runs"] = runs
    report["summary"] = summary
    report["ratios"] = {
        name: round(s["requests_per_s"] / summary["single"]["requests_per_s"], 3) for name, s in summary.items()
    }
    report["targets"] = {
        "cluster_p3_vs_single_requests_per_s": {"target": ">= 0.8", "value": ratio, "met": ratio >= 0.8},
        "cluster_p3_max_shard_cpu_share": {"target": "<= 0.40", "value": max_share, "met": max_share <= 0.40},
    }
    report["one_shard"] = one_shard_arithmetic(summary["cluster_p1"])
    report["seconds"] = round(time.monotonic() - started)
    report["note"] = (
        "2 cores run Redis, the workers and the producers together: the cluster cannot be faster "
        "here, only show the load splitting and what the cluster client costs; requests/s are "
        "medians over rounds, ratios of medians"
    )
    emit_report(report, "cluster", args.save)


if __name__ == "__main__":
    main()
