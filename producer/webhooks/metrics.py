"""Prometheus metrics of webhook delivery, registered on the gateway's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from producer.metrics import LATENCY_BUCKETS


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter(
            "tokenrelay_gateway_webhook_attempts",
            "Webhook delivery attempts by endpoint and outcome: delivered, gone (410), failed, refused (SSRF guard)",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.events = Counter(
            "tokenrelay_gateway_webhook_events",
            "Outbox events by endpoint and fate: delivered, filtered (type not wanted), dead (gave up), malformed",
            ["endpoint", "fate"],
            registry=registry,
        )
        self.attempt_seconds = Histogram(
            "tokenrelay_gateway_webhook_attempt_seconds",
            "Duration of a delivery attempt (resolution, connection and response)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "tokenrelay_gateway_webhook_in_flight", "Delivery attempts under way in this replica", registry=registry
        )
        self.disabled = Gauge(
            "tokenrelay_gateway_webhook_endpoint_disabled",
            "1 while an endpoint is disabled (it answered 410 Gone)",
            ["endpoint"],
            registry=registry,
        )
