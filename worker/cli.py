"""The `tokenrelay` command: demo (and, as the service grows, worker, submit, status)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from producer.logs import configure_logging

    parser = argparse.ArgumentParser(prog="tokenrelay", description="Queue-driven LLM inference over Redis Streams.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="stream four prompts through the default model")
    demo.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == "demo":
        from worker.demo import run_demo

        return run_demo(args.max_tokens)
    return 2


if __name__ == "__main__":
    sys.exit(main())
