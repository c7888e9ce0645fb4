"""Prometheus metrics every process shares: the fleet's queues, dead letters and live workers, read at scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from producer import fleet
from producer.connection import SyncRedis
from producer.protocol import DEFAULT_PREFIX
from producer.reconnect import REDIS_ERRORS

# Latency buckets (seconds) shared by the TTFT, inter-token, queue-wait and request histograms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class FleetCollector(Collector):
    """Queue depth and pending per model and priority, dead letters and live workers, from Redis.

    Read when Prometheus scrapes (one pipelined round trip), so every gateway and worker reports the
    same truth and nothing is polled in between.
    """

    def __init__(
        self,
        client: Callable[[], SyncRedis],
        prefix: str = DEFAULT_PREFIX,
        models: list[str] | None = None,
        partitions: int = 1,
    ) -> None:
        self._client = client
        self.prefix = prefix
        self.models = models  # None: every model registered under the prefix
        self.partitions = partitions  # summed: a model's depth is the sum over its partitions

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tokenrelay_redis_up", "1 when the last scrape could read Redis")
        try:
            views = fleet.view(self._client(), self.prefix, self.models, partitions=self.partitions)
        except REDIS_ERRORS:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        depth = GaugeMetricFamily(
            "tokenrelay_queue_depth", "Requests waiting, not yet delivered to a worker", labels=["model", "priority"]
        )
        pending = GaugeMetricFamily(
            "tokenrelay_queue_pending",
            "Requests delivered to a worker and not yet answered",
            labels=["model", "priority"],
        )
        dead = GaugeMetricFamily(
            "tokenrelay_dead_letters", "Entries in the model's dead-letter stream", labels=["model"]
        )
        workers = GaugeMetricFamily("tokenrelay_live_workers", "Workers whose heartbeat is recent", labels=["model"])
        for view in views:
            for priority, count in view.queued.items():
                depth.add_metric([view.model, priority], count)
            for priority, count in view.pending.items():
                pending.add_metric([view.model, priority], count)
            dead.add_metric([view.model], view.dead_letters)
            workers.add_metric([view.model], len(view.workers))
        yield from (up, depth, pending, dead, workers)
