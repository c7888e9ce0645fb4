"""DeliveryConfig: how a gateway delivers webhooks (the gateway's settings build it; no HTTP client here)."""

from __future__ import annotations

from dataclasses import dataclass

from producer.webhooks.destinations import IPNetwork
from producer.webhooks.schedule import RetrySchedule


@dataclass(slots=True, frozen=True)
class DeliveryConfig:
    prefix: str
    partitions: int  # outbox streams per model: the workers' --partitions
    schedule: RetrySchedule
    timeout_s: float  # one attempt, resolution to response headers
    poll_s: float  # between looks for new events and due retries
    concurrency: int  # attempts under way at once in one replica
    allowed: tuple[IPNetwork, ...] = ()  # networks reachable despite the SSRF guard
