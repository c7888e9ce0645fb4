"""TLS: a throwaway CA, redis-server on a TLS-only port with client certificates required, and the
end-to-end path (worker process, client) over rediss://. Plain text, an untrusted server and a client
without a certificate are all refused."""

from __future__ import annotations

import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import redis

from producer.client import Client
from producer.protocol import EventType
from tests.queue_helpers import WorkerProcess
from tests.security.certs import issue, make_ca
from worker.redis_server import RedisServer, find_redis_server, free_port

pytestmark = pytest.mark.slow


def _has_tls(binary: str) -> bool:
    ldd = shutil.which("ldd")
    return ldd is not None and "libssl" in subprocess.run([ldd, binary], capture_output=True, text=True).stdout


def test_the_queue_runs_end_to_end_over_mutual_tls(tmp_path: Path) -> None:
    if not _has_tls(find_redis_server()):
        pytest.skip("this redis-server is built without TLS")
    ca, ca_cert, ca_key = make_ca(tmp_path)
    server_pair = issue(tmp_path, "redis", ca_cert, ca_key, server=True)
    client_pair = issue(tmp_path, "tokenrelay", ca_cert, ca_key, server=False)
    tls = {"ssl_ca_certs": str(ca.cert), "ssl_certfile": str(client_pair.cert), "ssl_keyfile": str(client_pair.key)}
    port = free_port()
    extra = [
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(server_pair.cert),
        "--tls-key-file",
        str(server_pair.key),
        "--tls-ca-cert-file",
        str(ca.cert),
        "--tls-auth-clients",
        "yes",
    ]
    url = f"rediss://127.0.0.1:{port}/0?" + urllib.parse.urlencode({**tls, "ssl_cert_reqs": "required"})
    with RedisServer(port=port, extra_args=extra, connection_kwargs={"ssl": True, **tls}) as server:
        worker = WorkerProcess(
            url,
            Path("no-model"),
            tmp_path / "worker.log",
            ["--engine", "noop"],
            env={"TOKENRELAY_LOG_LEVEL": "warning"},
        )
        try:
            worker.wait_ready()
            client = Client(url, model="tiny")
            completions = client.generate(["a b", "c"], max_tokens=3, timeout=30)
            streamed = list(client.stream(client.submit("d e f", max_tokens=4), timeout=30))
        finally:
            worker.kill()
        assert [c.token_ids for c in completions] == [[2, 3, 4], [1, 2, 3]]
        assert [e.type for e in streamed][-1] is EventType.DONE
        assert sum((e.token_ids for e in streamed), []) == [3, 4, 5, 6]
        assert not [line for line in worker.logs() if line.get("level") in ("warning", "error")]
        (tmp_path / "other").mkdir()
        other, _, _ = make_ca(tmp_path / "other", "someone else")
        refused = [
            redis.Redis(port=server.port, socket_timeout=2),  # plain text to the TLS port
            redis.Redis(port=server.port, ssl=True, ssl_ca_certs=str(other.cert)),  # does not trust this server
            redis.Redis(port=server.port, ssl=True, ssl_ca_certs=str(ca.cert)),  # presents no client certificate
        ]
        for attempt in refused:
            with pytest.raises(redis.ConnectionError):
                attempt.ping()
