"""producer.connection: the URL forms, and scripts and pipelines on a real Redis Cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from producer.connection import (
    _local_keys,
    cluster_nodes,
    connect,
    connect_async,
    is_cluster_url,
    mask_url,
    register_script,
)
from producer.reconnect import RETRYABLE
from tests.queue_helpers import wait_for
from worker.redis_cluster import RedisClusterServer

APPEND = "redis.call('XADD', KEYS[1], '*', 'm', ARGV[1]); return redis.call('XLEN', KEYS[1])"


def test_cluster_url_names_every_node_and_keeps_credentials_and_options() -> None:
    nodes, options = cluster_nodes("rediss+cluster://app:s3cret@10.0.0.1:7000,[::1]:7001/0?ssl_cert_reqs=none")
    assert nodes == [("10.0.0.1", 7000), ("::1", 7001)]
    assert options["username"] == "app" and options["password"] == "s3cret"
    assert options["ssl"] is True and options["ssl_cert_reqs"] == "none"
    assert is_cluster_url("redis+cluster://h:1/0") and not is_cluster_url("redis://h:1/0")


@pytest.mark.parametrize(
    "url, error",
    [
        ("redis+cluster://h1:1/3", "only database 0"),
        ("redis+cluster://h1/0", "host:port"),
        ("redis+cluster:///0", "names no node"),
    ],
)
def test_bad_cluster_urls_are_refused_with_the_reason(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        cluster_nodes(url)


def test_passwords_are_masked() -> None:
    assert mask_url("redis+cluster://app:s3cret@h1:1,h2:2/0") == "redis+cluster://app:***@h1:1,h2:2/0"
    assert mask_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"


def test_stream_reads_keys_are_found_locally_as_redis_py_spells_them() -> None:
    # redis-py sends XREAD/XREADGROUP's keywords as bytes: b"STREAMS"
    args = ("XREADGROUP", b"GROUP", "g", "c", b"COUNT", 1, b"BLOCK", 5, b"STREAMS", "k1", "k2", ">", ">")
    assert _local_keys(args) == ["k1", "k2"]
    assert _local_keys(("XREAD", b"COUNT", 10, b"STREAMS", "k1", "0-0")) == ["k1"]
    assert _local_keys(("EVAL", "return 1", 2, "a", "b", "x")) == ["a", "b"]
    assert _local_keys(("XADD", "k", "*", "f", "v")) is None


@pytest.fixture(scope="module")
def redis_cluster():  # noqa: ANN201
    with RedisClusterServer() as cluster:
        yield cluster


def test_scripts_run_in_pipelines_across_shards_and_survive_a_failover(redis_cluster: RedisClusterServer) -> None:
    client = connect(redis_cluster.url, socket_connect_timeout=5, socket_timeout=10)
    assert isinstance(client, RedisCluster)
    append = register_script(client, APPEND)
    keys = [f"{{t{i}}}:s" for i in range(12)]
    assert len({redis_cluster.master_of(k).port for k in keys}) == 3  # the pipeline really spans shards
    pipe = client.pipeline(transaction=False)
    for key in keys:
        append(keys=[key], args=["a"], client=pipe)
    assert pipe.execute() == [1] * 12
    # The promoted replica never saw a SCRIPT LOAD: EVAL still runs there, and the client finds it.
    dead = redis_cluster.master_of(keys[0])
    replica = next(n for n in redis_cluster.nodes() if n.master_id == dead.node_id)
    with redis_cluster.client(replica.port) as on_replica:  # replication is asynchronous: let it catch up first
        on_replica.execute_command("READONLY")
        wait_for(lambda: on_replica.xlen(keys[0]) == 1, 10, what="the replica has the write")
    redis_cluster.kill(dead.port)
    promoted = redis_cluster.wait_failover(dead.port)
    assert promoted.port == replica.port
    assert wait_for(lambda: _attempt(lambda: append(keys=[keys[0]], args=["b"])), 30, 0.2) == 2
    client.close()


def _attempt(call: Callable[[], Any]) -> Any:
    """The call's result, or None while the client still finds its way after a failover (it retries,
    as every tokenrelay client does through producer.reconnect)."""
    try:
        return call()
    except RETRYABLE:
        return None


def test_stream_reads_ask_no_node_for_their_keys(redis_cluster: RedisClusterServer) -> None:
    # COMMAND GETKEYS on the default node per read: a round trip more, and a dead node after a failover
    client = connect(redis_cluster.url, socket_connect_timeout=5, socket_timeout=10)
    client.xgroup_create("{r}:s", "g", id="0", mkstream=True)
    client.xadd("{r}:s", {"f": "v"})
    for node in redis_cluster.masters():
        with redis_cluster.client(node.port) as admin:
            admin.config_resetstat()
    assert len(client.xread({"{r}:s": "0-0"}, count=1)[0][1]) == 1
    assert len(client.xreadgroup("g", "c", {"{r}:s": ">"}, count=1)[0][1]) == 1
    for node in redis_cluster.masters():
        with redis_cluster.client(node.port) as admin:
            assert "cmdstat_command|getkeys" not in admin.info("commandstats")
    client.close()


def test_async_client_runs_scripts_and_pipelines_on_the_cluster(redis_cluster: RedisClusterServer) -> None:
    async def run() -> list[int]:
        client = connect_async(redis_cluster.url, max_connections=16)
        assert isinstance(client, AsyncRedisCluster)
        append = register_script(client, APPEND)
        first = await append(keys=["{x}:s"], args=["a"])
        pipe = client.pipeline(transaction=False)
        for key in ("{x}:s", "{y}:s", "{z}:s"):
            await append(keys=[key], args=["b"], client=pipe)
        rest = await pipe.execute()
        await client.aclose()
        return [first, *rest]

    assert asyncio.run(run()) == [1, 2, 1, 1]


def test_a_slot_moved_while_in_use_is_followed(redis_cluster: RedisClusterServer) -> None:
    client = connect(redis_cluster.url)
    append = register_script(client, APPEND)
    assert append(keys=["{moving}:s"], args=["a"]) == 1
    source = redis_cluster.master_of("{moving}:s")
    target = next(n for n in redis_cluster.masters() if n.port != source.port)
    redis_cluster.move_slot(redis_cluster.keyslot("{moving}:s"), target.port)
    assert redis_cluster.master_of("{moving}:s").port == target.port
    assert append(keys=["{moving}:s"], args=["b"]) == 2
    client.close()
