"""A real Redis Cluster per test module: 3 masters + 3 replicas, redis-server processes on free ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from worker.redis_cluster import RedisClusterServer


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterServer]:
    # one cluster per module: forming one (six processes, replicas synced) takes a few seconds
    cluster = RedisClusterServer(masters=3, replicas=1, node_timeout_ms=1_000).start()
    yield cluster
    cluster.close()


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterServer) -> str:
    """The module's cluster, flushed and healthy: each test starts from an empty keyspace."""
    redis_cluster.wait_ok()
    redis_cluster.flushall()
    return redis_cluster.url
