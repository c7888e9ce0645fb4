"""`tokenrelay batch INPUT -o OUTPUT`: progress bar, Ctrl-C that stops cleanly, a summary line at the end."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import httpx
import redis
from tqdm import tqdm

from producer.batch.files import BatchInputError
from producer.batch.http import HTTPBatch, run_http_batch
from producer.batch.runner import BatchOptions, BatchSummary, batch_client, default_errors_path, run_batch_async
from producer.protocol import Priority

INTERRUPTED = 130  # the shell's code for "stopped by SIGINT"


def run_batch_command(args: argparse.Namespace) -> int:
    options = BatchOptions(window=args.window, request_timeout_s=args.request_timeout, priority=Priority(args.priority))
    bar: tqdm | None = None

    def on_start(total: int, done: int) -> None:
        nonlocal bar
        # throughput and ETA are tqdm's; `initial` makes a resumed run count from where it stands
        bar = tqdm(
            total=total,
            initial=done,
            unit="req",
            smoothing=0.05,
            dynamic_ncols=True,
            disable=args.no_progress,
            file=sys.stderr,
        )

    def on_line(ok: bool) -> None:
        if bar is not None:
            bar.update(1)

    def on_line_count(lines: int) -> None:
        if bar is not None:
            bar.update(lines)

    async def main() -> BatchSummary:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def interrupt() -> None:
            if stop.is_set():
                raise SystemExit(INTERRUPTED)  # a second Ctrl-C: leave now
            print("\ninterrupted: cancelling what is in flight; rerun the same command to resume", file=sys.stderr)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, interrupt)
        if args.http:
            output = Path(args.output)
            api_key = args.api_key or os.environ.get("TOKENRELAY_API_KEY")
            http = HTTPBatch(args.http, api_key=api_key, completion_window=args.completion_window)
            return await run_http_batch(
                Path(args.input),
                output,
                Path(args.errors) if args.errors else default_errors_path(output),
                http,
                args.batch_id,
                on_start,
                on_line_count,
                stop,
            )
        async with batch_client(args.redis_url, args.prefix, args.partitions) as client:
            return await run_batch_async(
                Path(args.input),
                Path(args.output),
                client,
                options,
                Path(args.errors) if args.errors else None,
                on_start,
                on_line,
                stop,
            )

    try:
        summary = asyncio.run(main())
    except BatchInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"error: the gateway failed ({exc}); rerun with --batch-id to follow the batch", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"error: Redis failed ({exc}); rerun the same command to resume", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(dataclasses.asdict(summary)))
    return INTERRUPTED if summary.interrupted else 0
