"""The `tokenrelay` command: dispatches to the worker's subcommands (worker/commands.py) and the
producer's (producer/cli.py). Only `worker` and `demo` import torch, and only once they build an engine."""

from __future__ import annotations

import argparse
import sys

from producer import cli as producer_cli
from worker import commands as worker_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenrelay", description="Queue-driven LLM inference over Redis Streams.")
    sub = parser.add_subparsers(dest="command", required=True)
    worker_commands.add_commands(sub)
    producer_cli.add_commands(sub)
    return parser


RUNNERS = {**worker_commands.RUNNERS, **producer_cli.RUNNERS}


def main(argv: list[str] | None = None) -> int:
    from producer.logs import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return RUNNERS[args.command](args)
    except producer_cli.UsageError as exc:
        print(f"tokenrelay {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
