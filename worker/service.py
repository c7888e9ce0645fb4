"""A worker process: settings -> engine -> Worker, with SIGTERM/SIGINT draining and a clean exit code."""

from __future__ import annotations

import faulthandler
import signal
from types import FrameType
from typing import TYPE_CHECKING

import structlog

from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from engine.interface import Engine

log = structlog.get_logger(__name__)


def build_engine(settings: WorkerSettings) -> Engine:
    """The engine a worker serves; heavy imports (torch) happen here, not at CLI start-up."""
    if settings.engine == "noop":
        from worker.noop_engine import NoopEngine

        return NoopEngine(max_num_seqs=settings.max_num_seqs, step_delay_s=settings.noop_step_delay_s)
    from engine.engine import LLMEngine

    return LLMEngine(settings.engine_config())


def run_worker(settings: WorkerSettings) -> int:
    """Serves until SIGTERM/SIGINT: the first drains (finish in-flight, grace period), a second hands back."""
    from worker.loop import EngineFailed, Worker

    log.info("worker settings", **settings.describe())
    from worker.metrics import WorkerMetrics, serve_metrics

    engine = build_engine(settings)
    metrics = WorkerMetrics(settings.served_model, settings.max_num_seqs)
    if settings.metrics_port:
        serve_metrics(metrics, settings)
    worker = Worker(engine, settings, metrics=metrics)
    signals_seen = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread, which may be holding the logger's lock
        # (or any other): take no lock here, only leave a note the step loop acts on.
        nonlocal signals_seen
        signals_seen += 1
        worker.signalled = (signal.Signals(signum).name, signals_seen == 1)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: every thread's stack to stderr, for a worker that hangs
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        worker.run()
    except EngineFailed:
        return 1  # logged with its traceback; a supervisor restarts the process
    return 0
