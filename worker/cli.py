"""The `tokenrelay` command: worker, serve, batch, submit, status, demo. Only `worker` and `demo` import torch."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from worker.settings import add_worker_flags


def _worker_parser(sub: Any) -> None:
    p = sub.add_parser("worker", help="serve a model from its Redis request streams")
    add_worker_flags(p)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", dest="redis_url", help="Redis URL (env TOKENRELAY_REDIS_URL)")
    p.add_argument("--prefix", help="key prefix (default tr)")


def _gateway_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="the OpenAI-compatible HTTP gateway (/v1/completions, /v1/chat/completions)")
    _client_args(p)
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--api-key-file", help="bearer keys, one per line (or sha256:<hex>); env TOKENRELAY_API_KEYS")
    p.add_argument("--max-queue-depth", type=int, help="backlog past which a model answers 429")
    p.add_argument("--request-timeout", dest="request_timeout_s", type=float, help="seconds, queue time included")
    p.add_argument("--default-max-tokens", type=int, help="for chat requests that set no limit")


def _batch_parser(sub: Any) -> None:
    p = sub.add_parser("batch", help="run an OpenAI Batch API JSONL file through the queue (resumable)")
    p.add_argument("input", help="JSONL: custom_id, method, url, body per line")
    p.add_argument("-o", "--output", required=True, help="JSONL results; rerunning skips custom_ids already in it")
    p.add_argument("--errors", help="failed lines also go here (default: OUTPUT's name + .errors.jsonl)")
    _client_args(p)
    p.add_argument("--window", type=int, default=256, help="requests in flight at once")
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request, queue time included")
    p.add_argument("--priority", choices=["high", "normal", "low"], default="low")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenrelay", description="Queue-driven LLM inference over Redis Streams.")
    sub = parser.add_subparsers(dest="command", required=True)
    _worker_parser(sub)
    p = sub.add_parser("submit", help="submit one prompt and stream the answer to the terminal")
    p.add_argument("prompt")
    _client_args(p)
    p.add_argument("--model", help="model name (env TOKENRELAY_MODEL)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
    p.add_argument("--timeout", type=float, help="deadline in seconds from now (queue time counts)")
    p.add_argument("--no-stream", action="store_true", help="print the whole answer at the end")
    _gateway_parser(sub)
    _batch_parser(sub)
    p = sub.add_parser("status", help="queues, pending, dead letters and live workers")
    _client_args(p)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("demo", help="embedded Redis + a worker + four prompts streamed side by side")
    p.add_argument("--max-tokens", type=int, default=96)
    return parser


def main(argv: list[str] | None = None) -> int:
    from producer.logs import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging()
    if args.command == "worker":
        from worker.service import run_worker
        from worker.settings import WorkerSettings

        options = {k: v for k, v in vars(args).items() if k != "command"}
        try:
            settings = WorkerSettings.from_env(**options)
        except ValueError as exc:  # EngineConfig's and WorkerSettings' own checks, or a variable that does not parse
            print(f"tokenrelay worker: error: {exc}", file=sys.stderr)
            return 2
        return run_worker(settings)
    if args.command == "serve":
        from producer.gateway.server import run_gateway
        from producer.gateway.settings import GatewaySettings

        return run_gateway(GatewaySettings.from_env(**{k: v for k, v in vars(args).items() if k != "command"}))
    if args.command == "batch":
        from producer.batch.cli import run_batch_command

        return run_batch_command(args)
    if args.command == "submit":
        return _submit(args)
    if args.command == "status":
        return _status(args)
    if args.command == "demo":
        from worker.demo import run_demo

        return run_demo(args.max_tokens)
    return 2


def _submit(args: argparse.Namespace) -> int:
    from producer.client import Client
    from producer.errors import QueueFull, RequestFailed
    from producer.protocol import EventType

    client = Client(args.redis_url, model=args.model, prefix=args.prefix)
    params = {k: v for k, v in {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}.items()
              if v is not None}
    prompt = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
    try:
        request_id = client.submit(max_tokens=args.max_tokens, priority=args.priority, timeout=args.timeout,
                                   stream=not args.no_stream, **prompt, **params)
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
    import redis

    from producer.client import ClientConfig
    from producer.protocol import DEFAULT_PREFIX
    from worker.status import as_dicts, gather, render

    config = ClientConfig.from_env(redis_url=args.redis_url, prefix=args.prefix)
    statuses = gather(redis.Redis.from_url(config.redis_url, socket_connect_timeout=5), config.prefix or DEFAULT_PREFIX)
    print(json.dumps(as_dicts(statuses), indent=2) if args.json else render(statuses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
