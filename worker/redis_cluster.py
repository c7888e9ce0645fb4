"""A private Redis Cluster of local redis-server processes (tests and benchmarks): form, fail over, reshard.

Formed with CLUSTER commands (ADDSLOTSRANGE, MEET, REPLICATE), so no `redis-cli` is needed. Each node's
cluster bus listens on its port + 10000, so ports are picked where both are free.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from worker.redis_server import RedisServer

SLOTS = 16384


def free_cluster_port() -> int:
    """A port that is free and whose cluster bus port (+10000) is free too."""
    for _ in range(1000):
        port = random.randint(20_000, 50_000)
        if all(_bindable(p) for p in (port, port + 10_000)):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass(slots=True, frozen=True)
class ClusterNodeInfo:
    """One line of CLUSTER NODES."""

    node_id: str
    port: int
    master: bool
    master_id: str | None
    slots: tuple[tuple[int, int], ...]
    failed: bool

    def owns(self, slot: int) -> bool:
        return any(start <= slot <= end for start, end in self.slots)


class RedisClusterServer:
    """`with RedisClusterServer() as cluster: Client(cluster.url)`: 3 masters + 3 replicas by default."""

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1_000,
        extra_args: Sequence[str] = (),
        connection_kwargs: dict[str, Any] | None = None,
        persist: bool = False,
        fsync: str = "everysec",
        config_file: str | Path | None = None,
    ) -> None:
        self.num_masters, self.num_replicas = masters, replicas
        self.connection_kwargs = connection_kwargs or {}
        args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
            *extra_args,
        ]
        self.servers = [
            RedisServer(
                port=free_cluster_port(),
                extra_args=args,
                persist=persist,
                fsync=fsync,
                connection_kwargs=self.connection_kwargs,
                config_file=config_file,
            )
            for _ in range(masters * (1 + replicas))
        ]
        self._orphaned: dict[int, tuple[tuple[int, int], ...]] = {}  # killed master's port -> its slots

    @property
    def url(self) -> str:
        """The tokenrelay cluster URL form: every startup node, comma-separated."""
        nodes = ",".join(f"127.0.0.1:{s.port}" for s in self.servers[: self.num_masters])
        return f"redis+cluster://{nodes}/0"

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, **self.connection_kwargs)

    def start(self, timeout: float = 30.0) -> RedisClusterServer:
        for server in self.servers:
            server.start()
        clients = [self.client(s.port) for s in self.servers]
        ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients]
        per = SLOTS // self.num_masters
        for i, client in enumerate(clients[: self.num_masters]):
            end = SLOTS - 1 if i == self.num_masters - 1 else (i + 1) * per - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, end)

        def met() -> bool:
            # Every node must know every other by its real id (a node still in handshake is listed under a
            # temporary one). A MEET can be lost while a node learns its own address: repeat it until then.
            known = [{n.node_id for n in self.nodes(s.port)} for s in self.servers]
            for client, seen in zip(clients[1:], known[1:], strict=True):
                if not set(ids) <= seen:
                    client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.servers[0].port)
            return all(set(ids) <= seen for seen in known)

        self._wait(met, timeout, "nodes did not meet")
        for i, client in enumerate(clients[self.num_masters :]):
            client.execute_command("CLUSTER", "REPLICATE", ids[i % self.num_masters])
        self.wait_ok(timeout)
        for client in clients:
            client.close()
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and each master has its replicas linked."""

        def ok() -> bool:
            for server in self.live():
                with self.client(server.port) as client:
                    if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                        return False
                    info = client.info("replication")
                    if info["role"] == "slave" and info.get("master_link_status") != "up":
                        return False
            return True

        self._wait(ok, timeout, "cluster not ok")

    def live(self) -> list[RedisServer]:
        return [s for s in self.servers if s.process is not None]

    def nodes(self, port: int | None = None) -> list[ClusterNodeInfo]:
        """CLUSTER NODES as seen from `port` (default: any live node)."""
        port = port or self.live()[0].port
        with self.client(port) as client:
            text = client.execute_command("CLUSTER", "NODES")
        text = text.decode() if isinstance(text, bytes) else text
        found = []
        for line in text.strip().splitlines():
            parts = line.split()
            flags = parts[2].split(",")
            slots = []
            for part in parts[8:]:
                if part.startswith("["):
                    continue  # a slot being migrated: [slot->-id] / [slot-<-id]
                start, _, end = part.partition("-")
                slots.append((int(start), int(end or start)))
            found.append(
                ClusterNodeInfo(
                    parts[0],
                    int(parts[1].split(":")[1].split("@")[0]),
                    "master" in flags,
                    None if parts[3] == "-" else parts[3],
                    tuple(slots),
                    "fail" in flags or "fail?" in flags,
                )
            )
        return found

    def masters(self) -> list[ClusterNodeInfo]:
        return [n for n in self.nodes() if n.master and not n.failed and n.slots]

    def master_of(self, key: str) -> ClusterNodeInfo:
        slot = self.keyslot(key)
        return next(n for n in self.masters() if n.owns(slot))

    def keyslot(self, key: str) -> int:
        with self.client(self.live()[0].port) as client:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def kill(self, port: int) -> None:
        """SIGKILL one node (a master's replica takes over after the node timeout)."""
        node = next(n for n in self.nodes() if n.port == port)
        if node.slots:
            self._orphaned[port] = node.slots
        self.server(port).kill()

    def restart(self, port: int, timeout: float = 30.0) -> None:
        """Starts a killed node again from its nodes.conf: it rejoins, as a replica if it was replaced."""
        self.server(port).start()
        self._orphaned.pop(port, None)
        self.wait_ok(timeout)

    def wait_failover(self, dead_port: int, timeout: float = 30.0) -> ClusterNodeInfo:
        """Until a replica of the killed master owns its slots and the cluster is ok again; the new master."""
        slot = self._orphaned[dead_port][0][0]

        def promoted() -> bool:
            try:
                return any(n.owns(slot) and n.port != dead_port for n in self.masters())
            except redis.RedisError:
                return False

        self._wait(promoted, timeout, f"no replica took over from :{dead_port}")
        self.wait_ok(timeout)
        return next(n for n in self.masters() if n.owns(slot))

    def move_slot(self, slot: int, to_port: int, batch: int = 100) -> None:
        """Reshard one slot to another master the way `redis-cli --cluster reshard` does (keys migrate while
        clients run: they see ASK during the move and MOVED after it)."""
        source = next(n for n in self.masters() if n.owns(slot))
        target = next(n for n in self.masters() if n.port == to_port)
        if source.port == target.port:
            return
        with self.client(source.port) as src, self.client(target.port) as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
            while True:
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "REPLACE", "KEYS", *keys)
            for node in self.masters():
                with self.client(node.port) as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)

    def flushall(self) -> None:
        for node in self.masters():
            with self.client(node.port) as client:
                client.flushall()

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def __enter__(self) -> RedisClusterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _wait(condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster: {what} within {timeout} s")
            time.sleep(0.05)
