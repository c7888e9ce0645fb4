"""A redis-server started from compose/redis.conf through compose/redis-entrypoint.sh (ACL users, AOF)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.queue_helpers import wait_for
from worker.redis_server import find_redis_server, free_port

ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {
    "producer": "producer-dev",
    "worker": "worker-dev",
    "maintenance": "maintenance-dev",
    "celery": "celery-dev",
    "admin": "admin-test-secret",
}  # admin's is rendered from the environment


@dataclass
class ACLServer:
    port: int
    directory: Path

    def url(self, role: str, db: int = 0) -> str:
        return f"redis://{role}:{PASSWORDS[role]}@127.0.0.1:{self.port}/{db}"

    def client(self, role: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(role))


def _major_version(binary: str) -> int:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return int(out.split("v=")[1].split(".")[0])


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ACLServer]:
    binary = find_redis_server()
    if _major_version(binary) < 7:
        pytest.skip("compose/redis.conf uses ACL selectors: redis-server 7 or newer")
    directory = tmp_path_factory.mktemp("acl-redis")
    port = free_port()
    env = {
        **os.environ,
        "REDIS_CONF": str(ROOT / "compose" / "redis.conf"),
        "REDIS_CONF_OUT": str(directory / "rendered.conf"),
        "REDIS_SERVER": binary,
        "TOKENRELAY_REDIS_ADMIN_PASSWORD": PASSWORDS["admin"],
    }
    with (directory / "redis.log").open("wb") as log:
        process = subprocess.Popen(
            [
                "sh",
                str(ROOT / "compose" / "redis-entrypoint.sh"),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ],
            cwd=directory,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ACLServer(port, directory)

    def up() -> bool:
        assert process.poll() is None, (directory / "redis.log").read_text()[-2000:]
        try:
            return bool(server.client("admin").ping())
        except redis.ConnectionError:
            return False

    wait_for(up, 20, 0.05, "redis-server with compose/redis.conf")
    yield server
    process.terminate()
    process.wait(10)
