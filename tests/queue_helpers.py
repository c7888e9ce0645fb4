"""Helpers for queue tests: a worker on a thread, worker subprocesses, reading result streams raw."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from producer.connection import SyncRedis, connect
from producer.protocol import EVENT_FIELD, Event, EventType, Keys, decode_event
from worker.loop import EngineFailed, Worker
from worker.settings import WorkerSettings

# Fast recovery timings for tests: a worker silent for a second is presumed dead.
FAST = {"heartbeat_s": 0.2, "claim_idle_s": 1.0}


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(interval)


def attempt_in_turn(
    attempts: list[Callable[[], Any]], errors: tuple[type[BaseException], ...]
) -> tuple[threading.Thread, list[type[BaseException]]]:
    """Runs `attempts` one after another on a thread, recording the type of each expected error; the
    caller joins the thread with a guard against a hang and then reads the outcomes."""
    outcomes: list[type[BaseException]] = []

    def run() -> None:
        for attempt in attempts:
            try:
                attempt()
            except errors as exc:
                outcomes.append(type(exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcomes


class WorkerThread:
    """A Worker serving `engine` on a background thread of the test process."""

    def __init__(self, engine: Any, redis_url: str, **settings: Any) -> None:
        self.settings = WorkerSettings(redis_url=redis_url, **{**FAST, **settings})
        self.engine = engine
        self.worker = Worker(engine, self.settings)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        except EngineFailed as exc:
            self.error = exc

    def __enter__(self) -> WorkerThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(drain=False)

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        self.worker.stop(drain=drain)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker thread did not stop"


class WorkerProcess:
    """`python -m worker.cli worker` for a tiny float64 model, JSON logs to a file."""

    def __init__(
        self,
        redis_url: str,
        model_dir: Path,
        log_path: Path,
        extra: list[str],
        env: dict[str, str] | None = None,
        model_name: str = "tiny",
    ) -> None:
        self.log_path = log_path
        self.model_name = model_name
        args = [
            sys.executable,
            "-m",
            "worker.cli",
            "worker",
            "--redis",
            redis_url,
            "--model",
            str(model_dir),
            "--model-name",
            model_name,
            "--dtype",
            "float64",
            "--threads",
            "1",
            "--num-kv-blocks",
            "256",
            "--heartbeat",
            str(FAST["heartbeat_s"]),
            "--claim-idle",
            str(FAST["claim_idle_s"]),
            *extra,
        ]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TOKENRELAY_LOG_JSON": "1", "OMP_NUM_THREADS": "1", **(env or {})},
            )
        self.redis = connect(redis_url)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until its first heartbeat is in Redis (model loaded, serving)."""

        def ready() -> bool:
            assert self.process.poll() is None, f"worker exited early:\n{self.log_path.read_text()[-3000:]}"
            for raw in self.redis.hvals(Keys(self.model_name).workers):
                if msgpack.unpackb(raw).get("pid") == self.pid:
                    return True
            return False

        try:
            wait_for(ready, timeout, 0.1, "worker heartbeat")
        except BaseException:
            self.kill()  # a worker that never came up must not outlive the test
            raise

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 60.0) -> int:
        """Its exit code; past `timeout`, its threads' stacks (faulthandler, SIGUSR1) go into the failure."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGUSR1)
            time.sleep(1.0)
            raise AssertionError(
                f"worker {self.pid} still running after {timeout} s; its log ends:\n{self.log_path.read_text()[-6000:]}"
            ) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait()

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return lines


def read_events(client: SyncRedis, keys: Keys, request_id: str) -> list[Event]:
    """The whole result stream, decoded, without blocking."""
    return [
        decode_event(fields[EVENT_FIELD.encode()], entry_id.decode())
        for entry_id, fields in client.xrange(keys.result(request_id))
    ]


def terminal_count(events: list[Event]) -> int:
    return sum(1 for e in events if e.type.terminal)


def after_last_restart(events: list[Event]) -> list[Event]:
    restarts = [i for i, e in enumerate(events) if e.type is EventType.RESTART]
    return events[restarts[-1] + 1 :] if restarts else events


def run_maintenance(client: SyncRedis, model: str = "tiny") -> None:
    """Every maintenance task once, as the given connection's user; the sweeps must have seen `model`."""
    from producer import maintenance

    assert model in maintenance.reclaim_sweep(client)
    assert model in maintenance.trim_acked(client)
    maintenance.expire_results(client)
    maintenance.dead_letter_report(client)
