"""The producer side of the `tokenrelay` command: serve, batch, submit, status, webhooks. Never imports torch."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from producer.client import ClientConfig
from producer.gateway.settings import add_gateway_flags
from producer.protocol import Priority
from producer.settings import add_flags

CLIENT_FLAGS = {"redis_url": "--redis"}
CLIENT_HELP = {
    "redis_url": "Redis URL",
    "prefix": "key prefix",
    "partitions": "request streams per model (the workers' --partitions)",
}


class UsageError(Exception):
    """A command's settings are invalid: reported as `tokenrelay <command>: error: ...`, exit status 2."""


PRIORITIES = [p.value for p in Priority]


def command_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags of a command, without the dispatcher's own entries."""
    return {k: v for k, v in vars(args).items() if k != "command"}


def _client_args(p: argparse.ArgumentParser) -> None:
    add_flags(p, ClientConfig, flags=CLIENT_FLAGS, helps=CLIENT_HELP, only=("redis_url", "prefix", "partitions"))


def add_commands(sub: Any) -> None:
    """The producer-side subcommands; RUNNERS runs each."""
    p = sub.add_parser("serve", help="the OpenAI-compatible HTTP gateway (/v1/completions, /v1/chat/completions)")
    add_gateway_flags(p)

    p = sub.add_parser("batch", help="run an OpenAI Batch API JSONL file through the queue (resumable)")
    p.add_argument("input", help="JSONL: custom_id, method, url, body per line")
    p.add_argument("-o", "--output", required=True, help="JSONL results; rerunning skips custom_ids already in it")
    p.add_argument("--errors", help="failed lines also go here (default: OUTPUT's name + .errors.jsonl)")
    _client_args(p)
    p.add_argument("--window", type=int, default=256, help="requests in flight at once")
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request, queue time included")
    p.add_argument("--priority", choices=PRIORITIES, default=Priority.LOW.value)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--http", metavar="URL", help="run it through a gateway's Batch API (/v1/files, /v1/batches) instead"
    )
    p.add_argument("--api-key", help="--http: the gateway's bearer key (env TOKENRELAY_API_KEY)")
    p.add_argument("--completion-window", default="24h", help="--http: the batch's window (past it, it expires)")
    p.add_argument("--batch-id", help="--http: follow a batch created earlier instead of uploading the file again")

    p = sub.add_parser("submit", help="submit one prompt and stream the answer to the terminal")
    p.add_argument("prompt")
    _client_args(p)
    p.add_argument("--model", help="model name (env TOKENRELAY_MODEL)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--priority", choices=PRIORITIES, default=Priority.NORMAL.value)
    p.add_argument("--timeout", type=float, help="deadline in seconds from now (queue time counts)")
    p.add_argument("--no-stream", action="store_true", help="print the whole answer at the end")

    p = sub.add_parser("status", help="queues, pending, dead letters and live workers (with their engine options)")
    _client_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("webhooks", help="webhook helpers: `webhooks secret` prints a new whsec_ signing secret")
    p.add_argument("action", choices=["secret"])


def _serve(args: argparse.Namespace) -> int:
    from producer.gateway.server import run_gateway
    from producer.gateway.settings import GatewaySettings

    try:
        settings = GatewaySettings.from_env(**command_options(args))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return run_gateway(settings)


def _batch(args: argparse.Namespace) -> int:
    from producer.batch.cli import run_batch_command

    return run_batch_command(args)


def _submit(args: argparse.Namespace) -> int:
    from producer.client import Client
    from producer.errors import QueueFull, RequestFailed
    from producer.protocol import EventType

    client = Client(args.redis_url, model=args.model, prefix=args.prefix, partitions=args.partitions)
    params = {
        k: v
        for k, v in {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}.items()
        if v is not None
    }
    prompt = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
    try:
        request_id = client.submit(
            max_tokens=args.max_tokens,
            priority=args.priority,
            timeout=args.timeout,
            stream=not args.no_stream,
            **prompt,
            **params,
        )
        print(f"request {request_id}", file=sys.stderr)
        for event in client.stream(request_id):
            if event.type is EventType.RESTART:
                print("\n[a worker was lost: generation starts over]", file=sys.stderr)
            elif event.type is EventType.DELTA or event.full_output:
                print(event.text, end="", flush=True)
            if event.type is EventType.DONE:
                print()
                print(json.dumps({"finish_reason": event.finish_reason, "usage": event.usage}), file=sys.stderr)
    except (QueueFull, RequestFailed, ValueError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:

    from producer.connection import connect
    from producer.status import as_dicts, gather, render

    config = ClientConfig.from_env(redis_url=args.redis_url, prefix=args.prefix, partitions=args.partitions)
    statuses = gather(connect(config.redis_url, socket_connect_timeout=5), config.prefix, partitions=config.partitions)
    print(json.dumps(as_dicts(statuses), indent=2) if args.json else render(statuses))
    return 0


def _webhooks(args: argparse.Namespace) -> int:
    from producer.webhooks.signing import new_secret

    print(new_secret())
    return 0


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _serve,
    "batch": _batch,
    "submit": _submit,
    "status": _status,
    "webhooks": _webhooks,
}
