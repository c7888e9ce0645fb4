"""The demo: four prompts through an embedded Redis and a worker process, streamed side by side."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

DEMO_PROMPTS = [
    "Explain the benefits of AI in healthcare.",
    "Write a poem about spring.",
    "Summarize the latest AI research trends.",
    "Describe how a message queue helps a web service stay responsive.",
]
_COLORS = ["\x1b[36m", "\x1b[33m", "\x1b[35m", "\x1b[32m"]
_RESET = "\x1b[0m"


class Panes:
    """Shows several token streams side by side: redrawn in place on a terminal, tagged lines otherwise."""

    def __init__(self, titles: list[str], stream: object = sys.stdout) -> None:
        self.titles = titles
        self.texts = ["" for _ in titles]
        self.out = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._drawn_lines = 0
        self._last_draw = 0.0

    def add(self, index: int, text: str) -> None:
        if not text:
            return
        self.texts[index] += text
        if self.tty:
            if time.monotonic() - self._last_draw > 0.05:
                self.draw()
        else:
            self.out.write(f"[{index + 1}] {text!r}\n")  # type: ignore[attr-defined]
            self.out.flush()  # type: ignore[attr-defined]

    def draw(self) -> None:
        width = max(40, shutil.get_terminal_size().columns - 2)
        lines: list[str] = []
        for i, (title, text) in enumerate(zip(self.titles, self.texts, strict=True)):
            lines.append(f"{_COLORS[i % len(_COLORS)]}[{i + 1}] {title}{_RESET}")
            body = " ".join(text.split())
            lines.extend("    " + body[j : j + width - 4] for j in range(0, len(body), width - 4))
            lines.append("")
        if self._drawn_lines:
            self.out.write(f"\x1b[{self._drawn_lines}F\x1b[J")  # type: ignore[attr-defined]
        self.out.write("\n".join(lines) + "\n")  # type: ignore[attr-defined]
        self.out.flush()  # type: ignore[attr-defined]
        self._drawn_lines = len(lines)
        self._last_draw = time.monotonic()


async def _stream_prompts(redis_url: str, max_tokens: int, worker: subprocess.Popen[bytes]) -> None:
    from producer.async_client import AsyncClient
    from producer.client import build_request
    from producer.protocol import DEFAULT_MODEL_NAME, EventType

    client = AsyncClient(redis_url, model=DEFAULT_MODEL_NAME)
    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.9, "seed": 0}
    requests = [
        build_request(DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": p}], **params) for p in DEMO_PROMPTS
    ]
    started = time.monotonic()
    ids = await client.submit_requests(requests)  # all four in one round trip: they queue until the worker is up
    panes = Panes(DEMO_PROMPTS)
    usages: list[dict[str, float]] = [{} for _ in ids]

    async def follow(i: int, request_id: str) -> None:
        async for event in client.stream(request_id):
            if event.type is EventType.RESTART:
                panes.texts[i] = ""
            elif event.type is EventType.DELTA:
                panes.add(i, event.text)
            elif event.type is EventType.DONE:
                usages[i] = event.usage or {}

    async def watch_worker() -> None:
        while worker.poll() is None:
            await asyncio.sleep(0.5)
        raise RuntimeError(f"the worker exited early with code {worker.returncode}")

    streams: asyncio.Future[Any] = asyncio.gather(*(follow(i, r) for i, r in enumerate(ids)))
    watchdog: asyncio.Future[None] = asyncio.ensure_future(watch_worker())
    try:
        await asyncio.wait({streams, watchdog}, return_when=asyncio.FIRST_COMPLETED)
        if watchdog.done():
            streams.cancel()
            watchdog.result()
        await streams
    finally:
        watchdog.cancel()
        await client.close()
    if panes.tty:
        panes.draw()
    elapsed = time.monotonic() - started
    tokens = sum(int(u.get("completion_tokens", 0)) for u in usages)
    print(
        f"\n{tokens} tokens from {len(ids)} concurrent requests through Redis in {elapsed:.1f} s "
        f"(including the worker's start-up; requests waited in the queue meanwhile)"
    )
    for i, usage in enumerate(usages):
        print(
            f"  [{i + 1}] {usage.get('completion_tokens', 0)} tokens, "
            f"queue wait {usage.get('queue_wait_s', 0):.2f} s, time to first token {usage.get('ttft_s', 0):.2f} s"
        )


def run_demo(max_tokens: int = 96) -> int:
    """Embedded redis-server, one worker process with the default model, four prompts streamed live."""
    from worker.redis_server import RedisServer

    with (
        RedisServer() as server,
        tempfile.NamedTemporaryFile("wb", prefix="tokenrelay-worker-", suffix=".log", delete=False) as log_file,
    ):
        print(f"redis-server on 127.0.0.1:{server.port} (embedded, {server.binary})")
        env = {**os.environ, "TOKENRELAY_LOG_JSON": "1"}
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--redis", server.url, "--max-num-seqs", "16"],
            stdout=log_file,
            stderr=log_file,
            env=env,
        )
        print(f"worker pid {worker.pid} loading the default model (logs: {log_file.name})\n")
        try:
            asyncio.run(_stream_prompts(server.url, max_tokens, worker))
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)  # drains: nothing is in flight any more, so it exits at once
            try:
                code = worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                code = worker.wait()
        print(f"worker drained and exited with code {code}; redis-server stopped")
    return 0 if code == 0 else 1
