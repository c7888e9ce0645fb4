"""Redis connections from one URL: `redis://`, `rediss://`, `unix://`, and `redis+cluster://` for Redis Cluster.

The cluster form names one or more startup nodes, comma-separated, with the same user, password and
query options as a plain URL (`rediss+cluster://` for TLS); the client discovers the rest of the cluster
and follows MOVED/ASK redirections and failovers by itself:

    redis+cluster://user:password@10.0.0.1:7000,10.0.0.2:7000/0?ssl_cert_reqs=none

Every process that takes a Redis URL (worker, clients, gateway, batch, Celery tasks, status) connects
through `connect` / `connect_async`, so a deployment switches to a cluster by its URL alone.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis._parsers.commands import AsyncCommandsParser, CommandsParser
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import ClusterPipeline as AsyncClusterPipeline
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import SSLConnection, parse_url

from producer.reconnect import REDIS_ERRORS

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_PASSWORD = re.compile(r"//([^:@/]*):[^@/]*@")

SyncRedis = redis.Redis | RedisCluster
AsyncRedis = aioredis.Redis | AsyncRedisCluster


def as_text(value: Any) -> str:
    """A Redis reply value (bytes unless the client decodes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, for logs and status output."""
    return _PASSWORD.sub(r"//\1:***@", url)


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Startup nodes and connection options (user, password, TLS, query options) of a cluster URL."""
    scheme, _, rest = url.partition("://")
    base = CLUSTER_SCHEMES.get(scheme.lower())
    if base is None:
        raise ValueError(f"redis url: {mask_url(url)!r} is not a redis+cluster:// or rediss+cluster:// URL")
    netloc, slash, tail = rest.partition("/")
    credentials, at, hosts = netloc.rpartition("@")
    nodes = [_host_port(part, url) for part in hosts.split(",") if part]
    if not nodes:
        raise ValueError(f"redis url: {mask_url(url)!r} names no node")
    first = f"{base}://{credentials}{at}{nodes[0][0]}:{nodes[0][1]}{slash}{tail}"
    options = dict(parse_url(first))
    for name in ("host", "port"):
        options.pop(name, None)
    if options.pop("db", 0) not in (0, None):
        raise ValueError("redis url: a Redis Cluster has only database 0")
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return nodes, options


def _host_port(part: str, url: str) -> tuple[str, int]:
    host, colon, port = part.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"redis url: node {part!r} of {mask_url(url)!r} must be host:port")
    return host.strip("[]"), int(port)


def connect(url: str, **kwargs: Any) -> SyncRedis:
    """A redis-py client for the URL: `RedisCluster` for the cluster schemes, `Redis` otherwise."""
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, **kwargs)
    nodes, options = cluster_nodes(url)
    return Cluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **options, **kwargs)


def _local_keys(args: Sequence[Any]) -> list[Any] | None:
    """The keys of EVAL/EVALSHA and XREAD/XREADGROUP, read off the arguments; None for other commands."""
    name = _word(args[0])
    if name in ("EVAL", "EVALSHA") and len(args) >= 3:
        return list(args[3 : 3 + int(args[2])])
    if name in ("XREAD", "XREADGROUP"):
        words = [_word(a) for a in args]  # only here: an EVAL's arguments are the payloads
        if "STREAMS" in words:
            rest = args[words.index("STREAMS") + 1 :]
            return list(rest[: len(rest) // 2])
    return None


def _word(arg: Any) -> Any:
    # redis-py passes the command name as str but its keywords as bytes (b"STREAMS")
    return arg.decode("latin-1").upper() if isinstance(arg, bytes) else arg.upper() if isinstance(arg, str) else arg


class _LocalKeys(CommandsParser):
    """redis-py finds the keys of commands whose keys "move" (EVAL in a pipeline, XREAD, XREADGROUP) by
    asking the cluster's default node (COMMAND GETKEYS), and keeps asking it after a failover killed it:
    every such command then fails until the client is rebuilt. These commands' keys are read locally."""

    def get_keys(self, redis_conn: Any, *args: Any) -> Any:
        keys = _local_keys(args)
        return keys if keys is not None else super().get_keys(redis_conn, *args)


class _AsyncLocalKeys(AsyncCommandsParser):
    """_LocalKeys for redis.asyncio's cluster client."""

    async def get_keys(self, *args: Any) -> Any:
        keys = _local_keys(args)
        return tuple(keys) if keys is not None else await super().get_keys(*args)


class Cluster(RedisCluster):
    """RedisCluster whose key lookup survives the loss of its default node (see _LocalKeys)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # the parser is built (and has read the server's command table) inside RedisCluster.__init__
        self.commands_parser.__class__ = _LocalKeys


class AsyncCluster(AsyncRedisCluster):
    """redis.asyncio's RedisCluster with _LocalKeys' key lookup."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands_parser = _AsyncLocalKeys()
        self._node_clients: dict[str, aioredis.Redis] = {}

    def node_client(self, node: AsyncClusterNode) -> aioredis.Redis:
        """A plain client of one node (one connection for a pipeline and the WAIT after it)."""
        if node.name not in self._node_clients:
            # the node's connection options already name its host and port
            pool = aioredis.ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
            self._node_clients[node.name] = aioredis.Redis(connection_pool=pool)
        return self._node_clients[node.name]

    async def aclose(self, *args: Any, **kwargs: Any) -> None:
        for node_client in self._node_clients.values():
            await node_client.aclose()
        await super().aclose(*args, **kwargs)


def connect_async(
    url: str, max_connections: int | None = None, pool_timeout: float = 60.0, **kwargs: Any
) -> AsyncRedis:
    """The asyncio twin of `connect`. `max_connections` bounds the pool: on one Redis a call past it waits up
    to `pool_timeout` for a free connection; on a cluster the bound is per node."""
    if not is_cluster_url(url):
        if max_connections is None:
            return aioredis.Redis.from_url(url, **kwargs)
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout, **kwargs
        )
        return aioredis.Redis(connection_pool=pool)
    nodes, options = cluster_nodes(url)
    startup = [AsyncClusterNode(h, p) for h, p in nodes]
    if max_connections is None:
        return AsyncCluster(startup_nodes=startup, **options, **kwargs)
    return BoundedAsyncRedisCluster(
        max_connections, pool_timeout, startup_nodes=startup, max_connections=max_connections, **options, **kwargs
    )


class BoundedAsyncRedisCluster(AsyncCluster):
    """redis.asyncio's cluster client, waiting for a free connection as a BlockingConnectionPool does.

    Its own pool raises MaxConnectionsError at once when a node's connections are all busy (a gateway with
    many open streams, a batch window). Here at most `bound` commands and pipelines are in flight; each
    holds at most one connection per node, so no node ever needs more than `bound`.
    """

    def __init__(self, bound: int, wait_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._bound = asyncio.Semaphore(bound)
        self._wait_s = wait_s

    async def _slot(self) -> None:
        # Commands sent while the client first discovers the cluster can land on connections that the
        # discovery then closes (seen as "writer is None" under a burst): discover first, then send.
        await self.initialize()
        try:
            await asyncio.wait_for(self._bound.acquire(), self._wait_s)
        except TimeoutError:
            raise redis.ConnectionError(f"no free Redis connection within {self._wait_s} s") from None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self._slot()
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._bound.release()

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> AsyncClusterPipeline:
        if shard_hint:
            raise redis.RedisClusterException("shard_hint is deprecated in cluster mode")
        return _BoundedPipeline(self, transaction)  # type: ignore[abstract]  # redis-py declares it abstract


class _BoundedPipeline(AsyncClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = self.cluster_client
        assert isinstance(client, BoundedAsyncRedisCluster)
        await client._slot()
        try:
            return await super().execute(raise_on_error, allow_redirections)
        finally:
            client._bound.release()


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster | AsyncRedisCluster)


class EvalScript:
    """A Lua script for Redis Cluster, called like redis-py's `Script` (keys, args, client=pipeline).

    It is sent whole with EVAL, which each node caches by its SHA: a replica promoted by a failover, or a
    node that joined, has no script that a SCRIPT LOAD put on the old master, and EVALSHA would answer
    NOSCRIPT there (scripts are not replicated). The cost is the script's few kilobytes per call.
    """

    def __init__(self, client: Any, script: str) -> None:
        self.client, self.script = client, script

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
        target = self.client if client is None else client
        return target.execute_command("EVAL", self.script, len(keys), *keys, *args)


class AsyncEvalScript(EvalScript):
    """EvalScript for redis.asyncio's cluster client and its pipelines."""

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
        result = super().__call__(keys, args, client)
        return (await result) if inspect.iscoroutine(result) else result


def register_script(client: Any, script: str) -> Any:
    """`client.register_script(script)`, or an EVAL-based script on a cluster client (see EvalScript)."""
    if isinstance(client, AsyncRedisCluster):
        return AsyncEvalScript(client, script)
    if isinstance(client, RedisCluster):
        return EvalScript(client, script)
    return client.register_script(script)


ScriptCall = tuple[str, Sequence[Any], Sequence[Any]]  # (Lua source, keys, args)
_TOPOLOGY_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError)


def run_durably(client: SyncRedis, calls: Sequence[ScriptCall], replicas: int, wait_ms: int) -> tuple[list[Any], int]:
    """Runs the scripts, then WAIT on the very connection that ran them (WAIT counts the replicas that have
    that connection's writes). On a cluster, one pipeline per master the calls' keys live on. Returns the
    scripts' replies in order and the fewest replicas any WAIT confirmed."""

    def node_client(key: Any) -> tuple[str, Any]:
        if not isinstance(client, RedisCluster):
            return "", client
        node = client.get_node_from_key(key)
        return node.name, client.get_redis_connection(node)

    replies: list[Any] = [None] * len(calls)
    acked = replicas
    for target, indices in _by_node(calls, node_client):
        pipe = _durable_pipeline(target, calls, indices, replicas, wait_ms)
        try:
            out = pipe.execute()
        except _TOPOLOGY_ERRORS as exc:
            if not _topology_changed(client, exc):
                raise
            try:  # this node is gone or no longer owns the slot: read the slots map again, then retry
                client.nodes_manager.initialize()  # type: ignore[union-attr]
            except REDIS_ERRORS:
                pass  # mid-failover no node may answer yet: the retry reads it again
            raise _retry(exc) from exc
        acked = _collect(replies, indices, out, acked)
    return replies, acked


async def run_durably_async(
    client: AsyncRedis, calls: Sequence[ScriptCall], replicas: int, wait_ms: int
) -> tuple[list[Any], int]:
    """run_durably for redis.asyncio clients."""
    if isinstance(client, AsyncCluster):
        await client.initialize()  # the slots map, before looking a key's node up in it

    def node_client(key: Any) -> tuple[str, Any]:
        if not isinstance(client, AsyncCluster):
            return "", client
        node = client.get_node_from_key(key)
        if node is None:
            raise redis.exceptions.SlotNotCoveredError(f"no master for {key!r} yet")
        return node.name, client.node_client(node)

    replies: list[Any] = [None] * len(calls)
    acked = replicas
    for target, indices in _by_node(calls, node_client):
        pipe = _durable_pipeline(target, calls, indices, replicas, wait_ms)
        try:
            out = await pipe.execute()
        except _TOPOLOGY_ERRORS as exc:
            if not _topology_changed(client, exc):
                raise
            try:
                await client.nodes_manager.initialize()  # type: ignore[union-attr]
            except REDIS_ERRORS:
                pass
            raise _retry(exc) from exc
        acked = _collect(replies, indices, out, acked)
    return replies, acked


def _by_node(calls: Sequence[ScriptCall], node_client: Any) -> list[tuple[Any, list[int]]]:
    """The calls grouped by the node their first key lives on: (that node's plain client, call indices)."""
    groups: dict[str, tuple[Any, list[int]]] = {}
    for i, (_, keys, _) in enumerate(calls):
        name, target = node_client(keys[0])
        groups.setdefault(name, (target, []))[1].append(i)
    return list(groups.values())


def _durable_pipeline(target: Any, calls: Sequence[ScriptCall], indices: list[int], replicas: int, wait_ms: int) -> Any:
    pipe = target.pipeline(transaction=False)
    for i in indices:
        source, keys, args = calls[i]
        pipe.execute_command("EVAL", source, len(keys), *keys, *args)
    pipe.execute_command("WAIT", replicas, wait_ms)
    return pipe


def _collect(replies: list[Any], indices: list[int], out: list[Any], acked: int) -> int:
    """The scripts' replies put in place; the replicas WAIT confirmed folded into the fewest so far."""
    for i, reply in zip(indices, out, strict=False):
        replies[i] = reply
    return min(acked, int(out[-1]))


def _retry(exc: Exception) -> Exception:
    return redis.exceptions.ClusterError(f"topology changed during a durable submit: {exc}")


def _topology_changed(client: Any, exc: Exception) -> bool:
    """A node written to directly is gone, or its slot moved or is moving: on a cluster, the caller reads the
    topology again and retries (a submit is idempotent)."""
    if not is_cluster(client):
        return False
    if isinstance(exc, redis.ResponseError):  # MovedError is an AskError; CLUSTERDOWN a ClusterDownError
        return isinstance(
            exc, redis.exceptions.AskError | redis.exceptions.TryAgainError | redis.exceptions.ClusterDownError
        )
    return True
