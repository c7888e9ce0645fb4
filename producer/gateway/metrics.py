"""The gateway's Prometheus metrics: HTTP requests, outcomes, tokens, TTFT and inter-token latency."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.gateway.requests import Endpoint
from producer.metrics import LATENCY_BUCKETS
from producer.results import Completion

_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"})


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.http_requests = Counter(
            "tokenrelay_gateway_http_requests",
            "HTTP requests by path and status",
            ["path", "status"],
            registry=registry,
        )
        self.http_seconds = Histogram(
            "tokenrelay_gateway_http_request_seconds",
            "HTTP request duration (streams: until the last byte)",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge("tokenrelay_gateway_in_flight", "HTTP requests being served", registry=registry)
        self.outcomes = Counter(
            "tokenrelay_gateway_requests",
            "Generation requests (one per choice) by outcome: "
            "stop, length, abort, error:<code>, queue_full, client_disconnected",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.tokens = Counter(
            "tokenrelay_gateway_tokens", "Tokens by kind (prompt, completion)", ["endpoint", "kind"], registry=registry
        )
        self.ttft = Histogram(
            "tokenrelay_gateway_ttft_seconds",
            "Time to first token: from the HTTP request "
            "(streams) or the submit (non-streamed, as the worker measured it)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "tokenrelay_gateway_inter_token_seconds",
            "Gap between streamed tokens",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "tokenrelay_gateway_queue_wait_seconds",
            "Time requests waited in the queue",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def outcome(self, endpoint: Endpoint, outcome: str, count: int = 1) -> None:
        self.outcomes.labels(endpoint.value, outcome).inc(count)

    def finished(self, endpoint: Endpoint, completion: Completion, streamed: bool = True) -> None:
        from producer.gateway.responses import finish_reason

        if completion.error is not None:
            self.outcome(endpoint, f"error:{completion.error[0]}")
            return
        self.outcome(endpoint, finish_reason(completion.finish_reason))
        usage: dict[str, Any] = completion.usage
        self.tokens.labels(endpoint.value, "prompt").inc(int(usage.get("prompt_tokens", 0)))
        self.tokens.labels(endpoint.value, "completion").inc(int(usage.get("completion_tokens", 0)))
        if "queue_wait_s" in usage:
            self.queue_wait.observe(float(usage["queue_wait_s"]))
        if not streamed and "ttft_s" in usage:
            self.ttft.observe(float(usage["ttft_s"]))

    def observe_tokens(self, started: float, last: float | None, now: float, tokens: int) -> None:
        """A streamed delta arrived: TTFT for the first one, the per-token gap for later ones."""
        if last is None:
            self.ttft.observe(now - started)
        elif tokens > 0:
            gap = (now - last) / tokens
            for _ in range(min(tokens, 64)):
                self.inter_token.observe(gap)


class MetricsMiddleware:
    """Counts and times every HTTP request by path and status (pure ASGI: streams are timed to the end)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = path if path in _PATHS else "other"
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.http_requests.labels(label, str(status)).inc()
            self.metrics.http_seconds.labels(label).observe(time.perf_counter() - started)
