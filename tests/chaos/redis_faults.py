"""Redis itself under faults: SIGKILL and restart from its AOF, SIGSTOP, CLIENT PAUSE, while work flows.

Workers and clients are left to find their own way back (they reconnect with backoff). A probe
client keeps asking for a result with a short timeout the whole time, to show that a call made
while Redis is away ends with an error in bounded time instead of hanging.
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer.client import Client
from tests.chaos.harness import MODEL, Cluster
from tests.chaos.ledger import Audit, Ledger, Spec
from tests.queue_helpers import wait_for
from worker.redis_server import RedisServer

FAULTS = ("kill", "sigstop", "pause")


@dataclass(slots=True)
class Probe:
    """Submits one-token requests and waits `timeout` for each, all through the faults."""

    url: str
    timeout: float = 1.0
    calls: int = 0
    timeouts: int = 0  # TimeoutError: the caller's deadline passed while Redis was away
    connection_errors: int = 0
    longest_s: float = 0.0  # the longest any one call took, errors included
    _halt: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Probe:
        self._thread = threading.Thread(target=self._run, name="chaos-probe", daemon=True)
        self._thread.start()
        return self

    def halt(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(60)

    def _run(self) -> None:
        client = Client(self.url, model=MODEL, reconnect_s=self.timeout)
        while not self._halt.wait(0.05):
            started = time.monotonic()
            try:
                client.result(client.submit("probe", max_tokens=1), timeout=self.timeout)
            except TimeoutError:
                self.timeouts += 1
            except redis.RedisError:
                self.connection_errors += 1
            self.calls += 1
            self.longest_s = max(self.longest_s, time.monotonic() - started)


@dataclass(slots=True)
class RedisChaosReport:
    fault: str
    audit: Audit
    faults: int
    outage_s: float  # Redis unavailable, in total
    max_deliveries_seen: int  # the highest claim count (epoch) of any request
    max_deliveries: int
    probe: dict[str, Any]
    worker_retries: int  # Redis round trips the workers retried
    seconds: float
    drained: bool

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__slots__ if name != "audit"}  # type: ignore[attr-defined]
        return {**self.audit.as_dict(), **out, "outage_s": round(self.outage_s, 1), "seconds": round(self.seconds, 1)}


def _inject(server: RedisServer, fault: str, outage: float) -> None:
    if fault == "kill":
        server.kill()  # SIGKILL: whatever is not in the AOF file is gone
        time.sleep(outage)
        server.start(timeout=60)  # same port and directory: it loads the AOF
    elif fault == "sigstop":
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        time.sleep(outage)
        server.process.send_signal(signal.SIGCONT)
    else:
        admin = redis.Redis(host="127.0.0.1", port=server.port)
        admin.execute_command("CLIENT", "PAUSE", int(outage * 1000), "ALL")
        admin.close()
        time.sleep(outage)


def _max_epoch(client: redis.Redis, ledger: Ledger) -> int:
    pipe = client.pipeline(transaction=False)
    for request_id in ledger.accepted:
        pipe.hget(ledger.keys.request(request_id), "epoch")
    return max((int(e) for e in pipe.execute() if e is not None), default=0)


def run_redis_chaos(
    log_dir: Path,
    specs: list[Spec],
    *,
    fault: str,
    rate: float,
    workers: int = 3,
    interval: tuple[float, float] = (1.0, 3.0),
    outage: tuple[float, float] = (0.3, 2.0),
    seed: int = 0,
    max_num_seqs: int = 32,
    step_delay_s: float = 0.005,
    max_deliveries: int = 3,
    drain_s: float = 120.0,
    fsync: str = "everysec",
    aof_in_memory: bool = False,
) -> RedisChaosReport:
    """Faults of one kind on Redis (persisted with AOF, `fsync` its appendfsync policy) while `specs` are
    submitted, then a drain. Under "everysec" a SIGKILL can lose acknowledged writes when the disk is slow
    (see RedisServer); the audit then reports them, though no part of tokenrelay dropped anything.
    `aof_in_memory` puts the AOF on /dev/shm (where there is one): a SIGKILL of redis-server still loses
    what it had not written, but no fsync can stall, so Redis's speed does not hang on the disk's."""
    assert fault in FAULTS, fault
    rng = random.Random(seed)
    started = time.monotonic()
    faults, outage_total = 0, 0.0
    shm = Path("/dev/shm")
    in_memory = aof_in_memory and shm.is_dir() and os.access(shm, os.W_OK)
    with (
        tempfile.TemporaryDirectory(prefix="tokenrelay-aof-", dir=shm if in_memory else None) as aof_dir,
        RedisServer(aof_dir, persist=True, fsync=fsync) as server,
    ):
        cluster = Cluster(
            server.url,
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
            ledger = Ledger(server.url, MODEL, specs, rate).start()
            probe = Probe(server.url).start()
            while not ledger.submitting_done.wait(rng.uniform(*interval)):
                pause = rng.uniform(*outage)
                _inject(server, fault, pause)
                faults += 1
                outage_total += pause
            probe.halt()
            drained = ledger.wait(drain_s)
            ledger.stop()
            check = redis.Redis(host="127.0.0.1", port=server.port)
            wait_for(lambda: check.ping(), 30, what="redis back")
            audit = ledger.audit(check)
            max_epoch = _max_epoch(check, ledger)
            retries = sum(
                line.get("event", "").startswith("redis round trip failed")
                for p in cluster.started
                for line in p.logs()
            )
        finally:
            cluster.stop()
    probe_report = {
        "calls": probe.calls,
        "timeouts": probe.timeouts,
        "connection_errors": probe.connection_errors,
        "longest_s": round(probe.longest_s, 2),
    }
    return RedisChaosReport(
        fault,
        audit,
        faults,
        outage_total,
        max_epoch,
        max_deliveries,
        probe_report,
        retries,
        time.monotonic() - started,
        drained,
    )
