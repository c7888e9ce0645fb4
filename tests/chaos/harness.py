"""Fault injection: no-op worker processes killed (SIGKILL) or paused (SIGSTOP) at random under load.

`run_worker_chaos` starts a Redis and `workers` worker processes, submits the specs at a pace, and
meanwhile a monkey thread picks a random worker every so often and either kills it with SIGKILL
(a replacement starts at once, as a supervisor would) or stops it with SIGSTOP for longer than the
claim threshold and then lets it go on (SIGCONT): its requests have been taken over by then, and
whatever it still tries to write must be fenced off. The ledger audits the outcome.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.chaos.ledger import Audit, Ledger, Spec
from tests.chaos.proxy import FaultProxy
from tests.queue_helpers import WorkerProcess, wait_for
from worker.redis_server import RedisServer

MODEL = "tiny"  # the name WorkerProcess serves; with --engine noop no model is loaded
HEARTBEAT_S, CLAIM_IDLE_S = 0.2, 1.0


def full_scale() -> bool:
    """`make chaos` (and bench/reliability.py) set TOKENRELAY_CHAOS=full for the big versions."""
    return os.environ.get("TOKENRELAY_CHAOS", "") == "full"


class Cluster:
    """Worker processes with the no-op engine, replaceable by slot."""

    def __init__(
        self, redis_url: str, log_dir: Path, workers: int, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.redis_url, self.log_dir, self.extra = redis_url, log_dir, list(extra)
        self.env = {"TOKENRELAY_LOG_LEVEL": "warning", **(env or {})}
        self.started: list[WorkerProcess] = []
        self.slots = [self._spawn() for _ in range(workers)]

    def _spawn(self) -> WorkerProcess:
        process = WorkerProcess(
            self.redis_url,
            Path("no-model"),
            self.log_dir / f"worker-{len(self.started)}.log",
            ["--engine", "noop", *self.extra],
            env=self.env,
        )
        self.started.append(process)
        return process

    def wait_ready(self) -> None:
        for process in self.slots:
            process.wait_ready()

    def replace(self, slot: int) -> WorkerProcess:
        self.slots[slot] = self._spawn()
        return self.slots[slot]

    def fenced_writes(self) -> int:
        """Requests that a worker learned it had lost (taken over while it was paused or cut off)."""
        return sum(line.get("event", "").startswith("ownership lost") for p in self.started for line in p.logs())

    def stop(self) -> list[int | None]:
        """SIGTERM to every live worker (after SIGCONT); their exit codes (None: had to be killed)."""
        codes: list[int | None] = []
        for process in self.slots:
            if process.process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.wait_ready()  # a replacement still importing would die of SIGTERM, not drain
                process.signal(signal.SIGTERM)
                try:
                    codes.append(process.wait(30))
                except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: reported as None
                    codes.append(None)
        for process in self.started:
            process.kill()
        return codes


@dataclass(slots=True)
class Monkey:
    """Every U(interval) seconds one fault, drawn by `weights`: `kill` (SIGKILL a random worker and start a
    replacement), `stop` (SIGSTOP one past the claim threshold, SIGCONT it later) or `cut` (sever every
    connection to Redis at once, through the proxy). The first faults are one of each kind, in a random
    order, so that even a short run has them all."""

    cluster: Cluster
    interval: tuple[float, float]
    weights: dict[str, float]
    seed: int
    proxy: FaultProxy | None = None
    kills: int = 0
    pauses: int = 0
    cuts: int = 0
    _halt: threading.Event = field(default_factory=threading.Event)
    _paused: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> Monkey:
        self._thread = threading.Thread(target=self._run, name="chaos-monkey", daemon=True)
        self._thread.start()
        return self

    def halt(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._lock:
            for slot in list(self._paused):
                self._resume(slot)

    def _run(self) -> None:
        rng = random.Random(self.seed)
        first = rng.sample(list(self.weights), len(self.weights))
        while not self._halt.wait(rng.uniform(*self.interval)):
            with self._lock:
                choices = [s for s in range(len(self.cluster.slots)) if s not in self._paused]
            if len(choices) < 2:  # always leave one worker running
                continue
            slot = rng.choice(choices)
            fault = first.pop(0) if first else rng.choices(list(self.weights), list(self.weights.values()))[0]
            if fault == "cut" and self.proxy is not None:
                self.proxy.cut_all()
                self.cuts += 1
            elif fault == "stop":
                with self._lock:
                    self._paused.add(slot)
                    self.cluster.slots[slot].signal(signal.SIGSTOP)
                    self.pauses += 1
                pause = rng.uniform(1.5, 3.0) * CLAIM_IDLE_S
                threading.Timer(pause, self._resume_locked, args=(slot,)).start()
            else:
                self.cluster.slots[slot].process.kill()  # SIGKILL: no drain, no hand-back
                self.cluster.slots[slot].process.wait()
                self.kills += 1
                self.cluster.replace(slot)

    def _resume_locked(self, slot: int) -> None:
        with self._lock:
            self._resume(slot)

    def _resume(self, slot: int) -> None:
        if slot in self._paused:
            self._paused.discard(slot)
            self.cluster.slots[slot].signal(signal.SIGCONT)


@dataclass(slots=True)
class ChaosReport:
    audit: Audit
    kills: int
    pauses: int
    cuts: int
    fenced: int
    exit_codes: list[int | None]
    seconds: float
    drained: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.audit.as_dict(),
            "kills": self.kills,
            "pauses": self.pauses,
            "cuts": self.cuts,
            "fenced": self.fenced,
            "exit_codes": self.exit_codes,
            "seconds": round(self.seconds, 1),
            "drained": self.drained,
        }


def run_worker_chaos(
    log_dir: Path,
    specs: list[Spec],
    *,
    rate: float,
    workers: int = 3,
    interval: tuple[float, float] = (0.5, 1.5),
    weights: dict[str, float] | None = None,
    seed: int = 0,
    max_num_seqs: int = 32,
    step_delay_s: float = 0.005,
    max_deliveries: int = 3,
    drain_s: float = 120.0,
) -> ChaosReport:
    """The whole run against a private Redis, every connection through a FaultProxy; faults stop once
    everything is submitted, then it drains."""
    weights = weights or {"kill": 0.5, "stop": 0.3, "cut": 0.2}
    started = time.monotonic()
    with RedisServer() as server:
        proxy = FaultProxy(server.port).start()
        cluster = Cluster(
            proxy.url(),
            log_dir,
            workers,
            "--max-num-seqs",
            str(max_num_seqs),
            "--noop-step-delay",
            str(step_delay_s),
            "--max-deliveries",
            str(max_deliveries),
        )
        try:
            cluster.wait_ready()
            ledger = Ledger(proxy.url(), MODEL, specs, rate).start()
            monkey = Monkey(cluster, interval, weights, seed, proxy).start()
            wait_for(
                ledger.submitting_done.is_set,
                timeout=len(specs) / rate * 4 + 60,
                interval=0.1,
                what="every request submitted",
            )
            monkey.halt()
            drained = ledger.wait(drain_s)
            ledger.stop()
            audit = ledger.audit(redis.Redis.from_url(server.url))
            fenced = cluster.fenced_writes()
        finally:
            codes = cluster.stop()
            proxy.close()
    return ChaosReport(
        audit, monkey.kills, monkey.pauses, monkey.cuts, fenced, codes, time.monotonic() - started, drained
    )
