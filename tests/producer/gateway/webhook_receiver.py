"""A real HTTP receiver for webhook tests: a threaded http.server that records every request and answers
each path from a script of statuses (200 once the script runs out), optionally holding requests."""

from __future__ import annotations

import ssl
import threading
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.queue_helpers import wait_for
from worker.redis_server import free_port


@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered


class Receiver:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.lock = threading.Lock()
        self.scripts: dict[str, list[int]] = defaultdict(list)
        self.holds: dict[str, threading.Event] = {}
        self.headers: dict[str, dict[str, str]] = {}  # sent with every answer to a path
        self.received: list[Delivery] = []
        self.server: ThreadingHTTPServer | None = None

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def script(self, path: str, *statuses: int) -> None:
        """The next requests to `path` are answered with these statuses, in order."""
        with self.lock:
            self.scripts[path].extend(statuses)

    def hold(self, path: str) -> threading.Event:
        """Requests to `path` wait (unanswered) until the returned event is set."""
        self.holds[path] = threading.Event()
        return self.holds[path]

    def start(self, tls: ssl.SSLContext | None = None) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                held = receiver.holds.get(self.path)
                with receiver.lock:
                    script = receiver.scripts[self.path]
                    status = script.pop(0) if script else 200
                    receiver.received.append(
                        Delivery(self.path, {k.lower(): v for k, v in self.headers.items()}, body, status)
                    )
                if held is not None:
                    held.wait(60)
                self.send_response(status)
                for name, value in receiver.headers.get(self.path, {}).items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for event in self.holds.values():
            event.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def deliveries(self, path: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.received if d.path == path]

    def wait(self, path: str, count: int, timeout: float = 60.0) -> list[Delivery]:
        """The first `count` requests to `path`, once they have arrived."""
        wait_for(lambda: len(self.deliveries(path)) >= count, timeout, 0.02, f"{count} deliveries to {path}")
        return self.deliveries(path)[:count]
