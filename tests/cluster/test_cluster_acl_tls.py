"""compose/redis.conf's ACL users on a real Redis Cluster (3 masters + 3 replicas, over mutual TLS where
redis-server is built with it): each role does its job through the real code paths, nothing is refused,
and what each role may not do stays refused."""

from __future__ import annotations

import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import Client
from producer.connection import connect
from producer.protocol import EventType, Keys, Priority
from tests.compose.conftest import ROOT
from tests.queue_helpers import read_events, run_maintenance, terminal_count
from tests.security.certs import issue, make_ca
from tests.stack_helpers import noop_worker
from worker.redis_cluster import RedisClusterServer
from worker.redis_server import find_redis_server

pytestmark = pytest.mark.slow
KEYS = Keys("tiny")


def _has_tls(binary: str) -> bool:
    ldd = shutil.which("ldd")
    return ldd is not None and "libssl" in subprocess.run([ldd, binary], capture_output=True, text=True).stdout


@dataclass
class ACLCluster:
    cluster: RedisClusterServer
    tls: dict[str, str]  # the client's certificate options; empty without TLS

    def url(self, role: str, password: str | None = None) -> str:
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        nodes = self.cluster.url.split("://", 1)[1]
        query = "?" + urllib.parse.urlencode(self.tls) if self.tls else ""
        return f"{scheme}://{role}:{password or f'{role}-dev'}@{nodes}{query}"

    def acl_log(self) -> list[tuple[int, Any, Any, Any]]:
        """Every refusal any node logged, as (port, user, reason, command or key), and the logs emptied."""
        denied = []
        for server in self.cluster.live():
            with self.cluster.client(server.port) as client:
                denied += [(server.port, e["username"], e["reason"], e["object"]) for e in client.acl_log()]
                client.acl_log_reset()
        return denied


@pytest.fixture(scope="module")
def acl_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ACLCluster]:
    binary = find_redis_server()
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    if int(version.split("v=")[1].split(".")[0]) < 7:
        pytest.skip("compose/redis.conf uses ACL selectors: redis-server 7 or newer")
    # Every node loads compose/redis.conf as it is (development passwords); replicas, and masters demoted by
    # a failover, authenticate to their master as the replica user, as in compose/docker-compose.cluster.yml.
    extra = ["--masteruser", "replica", "--masterauth", "replica-dev"]
    admin: dict[str, Any] = {"username": "admin", "password": "admin-dev"}
    tls: dict[str, str] = {}
    if _has_tls(binary):
        directory = tmp_path_factory.mktemp("cluster-tls")
        ca, ca_cert, ca_key = make_ca(directory)
        server_pair = issue(directory, "redis", ca_cert, ca_key, server=True)
        client_pair = issue(directory, "tokenrelay", ca_cert, ca_key, server=False)
        tls = {"ssl_ca_certs": str(ca.cert), "ssl_certfile": str(client_pair.cert), "ssl_keyfile": str(client_pair.key)}
        # nodes reach each other (cluster bus, replication) as TLS clients: they need a client certificate
        extra += [
            "--tls-cluster",
            "yes",
            "--tls-replication",
            "yes",
            "--tls-auth-clients",
            "yes",
            "--tls-cert-file",
            str(server_pair.cert),
            "--tls-key-file",
            str(server_pair.key),
            "--tls-client-cert-file",
            str(client_pair.cert),
            "--tls-client-key-file",
            str(client_pair.key),
            "--tls-ca-cert-file",
            str(ca.cert),
        ]
        admin |= {"ssl": True, **tls}
    cluster = RedisClusterServer(
        masters=3, replicas=1, config_file=ROOT / "compose" / "redis.conf", extra_args=extra, connection_kwargs=admin
    )
    if tls:
        for server in cluster.servers:  # the harness's port is the node's only one, TLS
            server.extra_args += ["--port", "0", "--tls-port", str(server.port)]
    cluster.start()
    yield ACLCluster(cluster, tls)
    cluster.close()


@pytest.fixture
def acl(acl_cluster: ACLCluster) -> ACLCluster:
    acl_cluster.cluster.wait_ok()
    acl_cluster.cluster.flushall()
    acl_cluster.acl_log()
    return acl_cluster


def test_every_role_works_on_the_cluster_and_nothing_is_refused(acl: ACLCluster, tmp_path: Path) -> None:
    worker = noop_worker(acl.url("worker"), tmp_path / "worker.log", "--noop-step-delay", "0.002")
    try:
        worker.redis = connect(acl.url("admin"))  # the helper reads heartbeats with HVALS, which no role needs
        worker.wait_ready()
        client = Client(acl.url("producer"), model="tiny")
        done = client.generate(["a b", "c", "d e f"], max_tokens=3, timeout=60)
        assert [c.text for c in done] == [" x x x"] * 3
        streamed = list(client.stream(client.submit("g h", max_tokens=2), timeout=30))
        assert [e.type for e in streamed][-1] is EventType.DONE
        durable = Client(acl.url("producer"), model="tiny", submit_replicas=1)  # sends WAIT
        ids = [durable.submit(f"p {i}", max_tokens=2) for i in range(6)]
        assert all(r.text == " x x" for r in durable.wait_all(ids, timeout=60).values())
        assert all(terminal_count(read_events(worker.redis, KEYS, i)) == 1 for i in ids)
        janitor = connect(acl.url("maintenance"))  # SCAN runs on every master
        run_maintenance(janitor)
        worker.signal(15)  # a draining worker deregisters with its own rights
        assert worker.wait(30) == 0
    finally:
        worker.kill()
    assert acl.acl_log() == []


def test_wrong_passwords_and_forbidden_commands_are_refused(acl: ACLCluster) -> None:
    # the cluster client reads the slot map as it is built: a bad login fails there, with Redis's reason
    with pytest.raises(redis.RedisClusterException, match="invalid username-password"):
        Client(acl.url("producer", password="wrong"), model="tiny")
    with pytest.raises(redis.RedisClusterException):  # replication is all it may do
        connect(acl.url("replica"))
    # redis-py reports a refused CLUSTER SLOTS as "Cluster mode is not enabled": the ACL log tells the truth
    assert {(user, reason, what) for _, user, reason, what in acl.acl_log() if reason != "auth"} == {
        ("replica", "command", "cluster|slots")
    }
    producer = connect(acl.url("producer"))
    Client(acl.url("producer"), model="tiny").submit("secret prompt", max_tokens=1)
    for forbidden in (
        lambda: producer.xrange(KEYS.queue(Priority.NORMAL)),  # another tenant's prompt
        lambda: producer.delete(KEYS.queue(Priority.NORMAL)),
        lambda: producer.execute_command("CLUSTER", "FAILOVER", target_nodes=producer.get_random_node()),
    ):
        with pytest.raises(redis.RedisError, match="NOPERM|no permissions|permission"):
            forbidden()
    worker = connect(acl.url("worker"))
    with pytest.raises(redis.RedisError, match="NOPERM|no permissions|permission"):
        worker.xread({KEYS.result("a" * 32): "0-0"})


def test_plain_text_and_clients_without_a_certificate_are_refused(acl: ACLCluster) -> None:
    if not acl.tls:
        pytest.skip("this redis-server is built without TLS")
    port = acl.cluster.servers[0].port
    plain = redis.Redis(port=port, username="admin", password="admin-dev", socket_timeout=2)
    no_cert = redis.Redis(
        port=port, username="admin", password="admin-dev", ssl=True, ssl_ca_certs=acl.tls["ssl_ca_certs"]
    )
    for attempt in (plain, no_cert):
        with pytest.raises(redis.ConnectionError):
            attempt.ping()
