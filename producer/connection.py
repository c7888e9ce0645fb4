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

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_PASSWORD = re.compile(r"//([^:@/]*):[^@/]*@")

SyncRedis = redis.Redis | RedisCluster
AsyncRedis = aioredis.Redis | AsyncRedisCluster


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
    name = str(args[0]).upper()
    if name in ("EVAL", "EVALSHA") and len(args) >= 3:
        return list(args[3 : 3 + int(args[2])])
    if name in ("XREAD", "XREADGROUP"):
        words = [a.upper() if isinstance(a, str) else a for a in args]
        if "STREAMS" in words:
            rest = args[words.index("STREAMS") + 1 :]
            return list(rest[: len(rest) // 2])
    return None


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


def connect_async(url: str, max_connections: int | None = None, pool_timeout: float = 60.0,
                  **kwargs: Any) -> AsyncRedis:
    """The asyncio twin of `connect`. `max_connections` bounds the pool: on one Redis a call past it waits up
    to `pool_timeout` for a free connection; on a cluster the bound is per node."""
    if not is_cluster_url(url):
        if max_connections is None:
            return aioredis.Redis.from_url(url, **kwargs)
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=pool_timeout,
                                                        **kwargs)
        return aioredis.Redis(connection_pool=pool)
    nodes, options = cluster_nodes(url)
    startup = [AsyncClusterNode(h, p) for h, p in nodes]
    if max_connections is None:
        return AsyncCluster(startup_nodes=startup, **options, **kwargs)
    return BoundedAsyncRedisCluster(max_connections, pool_timeout, startup_nodes=startup,
                                    max_connections=max_connections, **options, **kwargs)


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
