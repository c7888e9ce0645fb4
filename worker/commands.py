"""The worker side of the `tokenrelay` command: worker, demo. Torch loads only once a command builds an engine."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from producer.cli import UsageError, command_options
from worker.settings import add_worker_flags


def add_commands(sub: Any) -> None:
    """The worker-side subcommands; RUNNERS runs each."""
    p = sub.add_parser(
        "worker",
        help="serve a model from its Redis request streams",
        description="Serve one model from its Redis request streams. Every flag is also a "
        "TOKENRELAY_<FIELD> variable; a flag wins over its variable.",
    )
    add_worker_flags(p)

    p = sub.add_parser("demo", help="embedded Redis + a worker + four prompts streamed side by side")
    p.add_argument("--max-tokens", type=int, default=96)


def _worker(args: argparse.Namespace) -> int:
    from worker.settings import WorkerSettings

    try:
        settings = WorkerSettings.from_env(**command_options(args))
    except ValueError as exc:  # EngineConfig's and WorkerSettings' own checks, or a variable that does not parse
        raise UsageError(str(exc)) from None
    from worker.service import run_worker

    return run_worker(settings)


def _demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(args.max_tokens)


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {"worker": _worker, "demo": _demo}
