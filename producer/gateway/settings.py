"""GatewaySettings: one settings object per gateway process, from CLI flags and TOKENRELAY_* variables."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from producer import settings as loader
from producer.client import DEFAULT_MAX_QUEUE_DEPTH, DEFAULT_REDIS_URL
from producer.protocol import DEFAULT_PREFIX, DEFAULT_RESULT_TTL_S
from producer.settings import setting
from producer.webhooks.config import DeliveryConfig
from producer.webhooks.destinations import parse_networks
from producer.webhooks.endpoints import WebhookEndpoint, load_endpoints
from producer.webhooks.schedule import STANDARD_SCHEDULE, RetrySchedule

MAX_REDIS_STRING = 512 * 2**20 - 2**20
# Flags whose names are shorter than their fields'.
GATEWAY_FLAGS = {"redis_url": "--redis", "request_timeout_s": "--request-timeout"}


@dataclass(slots=True)
class GatewaySettings:
    redis_url: str = setting(DEFAULT_REDIS_URL, help="Redis URL")
    prefix: str = setting(DEFAULT_PREFIX, help="key prefix")
    host: str = setting("127.0.0.1", help="address to listen on")
    port: int = setting(8000, help="TCP port")
    # Keys themselves come from TOKENRELAY_API_KEYS (comma-separated; producer/gateway/auth.py), never a flag.
    api_key_file: str | None = setting(
        None,
        help="bearer keys, one per line (or sha256:<hex>); keys may also come comma-separated in TOKENRELAY_API_KEYS",
    )
    max_queue_depth: int = setting(DEFAULT_MAX_QUEUE_DEPTH, help="backlog past which a model answers 429")
    retry_after_s: int = setting(2, help="the Retry-After of a 429, seconds")
    request_timeout_s: float = setting(600.0, help="seconds per request, queue time included: 504 past it")
    default_max_tokens: int = setting(1024, help="for chat requests that set no limit (completions: 16, as OpenAI)")
    max_choices: int = setting(128, help="prompts x n of one request")
    models_cache_s: float = setting(2.0, help="seconds the set of served models is trusted")
    partitions: int = setting(1, help="request streams per model (the workers' --partitions)")
    redis_connections: int = setting(
        1024, help="the Redis pool's size (on a cluster each open stream holds one; on one Redis they share one)"
    )
    multiplex_reads: bool = setting(
        True, help="one Redis: the open streams' reads share one XREAD (off: a blocking XREAD per stream)"
    )
    # Redis holds a file whole in memory (and a string is at most 512 MiB): keep this well below the maxmemory
    max_file_bytes: int = setting(100 * 2**20, help="largest file POST /v1/files stores (413 past it)")
    file_retention_s: int = setting(7 * 86_400, help="seconds a file is kept when its upload sets no expires_after")
    batch_window: int = setting(256, help="lines of one batch in flight at once (its requests go to the low queue)")
    batch_max_lines: int = setting(50_000, help="request lines one batch may hold (OpenAI's limit)")
    batch_max_window_s: int = setting(7 * 86_400, help="the longest completion_window a batch may ask for")
    batch_retention_s: int = setting(30 * 86_400, help="seconds a batch object is kept; its output files as long")
    batch_sweep_s: float = setting(1.0, help="seconds between this replica's passes over unfinished batches")
    # Webhooks (producer/webhooks): the endpoints hold secrets, so the whole value is masked in logs.
    webhook_endpoints: str | None = setting(
        None,
        secret=True,
        help='webhook endpoints as JSON, or @file: [{"name", "url", "secret" (whsec_..., or a list), "events"}]',
    )
    webhook_retry_schedule: str = setting(
        STANDARD_SCHEDULE, help="seconds before each delivery attempt, counted from the previous one's failure"
    )
    webhook_timeout_s: float = setting(15.0, help="seconds a delivery attempt may take")
    webhook_allowed_networks: str = setting(
        "", help="comma-separated CIDRs webhooks may reach although private, loopback or link-local"
    )
    webhook_concurrency: int = setting(16, help="delivery attempts under way at once, per replica")
    webhook_poll_s: float = setting(1.0, help="seconds between looks for new webhook events and due retries")
    # Responses API (producer/gateway/responses_service.py)
    response_retention_s: int = setting(
        DEFAULT_RESULT_TTL_S,
        help="seconds a stored response stays retrievable after it ends (at most the workers' --result-ttl-s)",
    )
    background_timeout_s: float = setting(3600.0, help="seconds a background response may take, queue time included")

    def __post_init__(self) -> None:
        positive = ("retry_after_s", "request_timeout_s", "default_max_tokens", "max_choices", "file_retention_s")
        batches = ("batch_window", "batch_max_lines", "batch_max_window_s", "batch_retention_s", "batch_sweep_s")
        for name in (*positive, *batches):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0")
        if not 0 < self.max_file_bytes <= MAX_REDIS_STRING:
            raise ValueError(
                f"max_file_bytes: must be in 1..{MAX_REDIS_STRING} (a Redis string's limit, less form overhead)"
            )
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port")
        for name in ("webhook_timeout_s", "webhook_concurrency", "webhook_poll_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0")
        self.webhooks()  # an invalid endpoint list stops the gateway before it serves anything

    def webhooks(self) -> tuple[tuple[WebhookEndpoint, ...], DeliveryConfig]:
        """The configured webhook endpoints (none: no delivery) and how to deliver to them; ValueError if invalid."""
        allowed = parse_networks(self.webhook_allowed_networks)
        config = DeliveryConfig(
            self.prefix,
            self.partitions,
            RetrySchedule.parse(self.webhook_retry_schedule),
            self.webhook_timeout_s,
            self.webhook_poll_s,
            self.webhook_concurrency,
            allowed,
        )
        return load_endpoints(self.webhook_endpoints, allowed), config
        for name in ("response_retention_s", "background_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0")

    @classmethod
    def from_env(cls, **overrides: Any) -> GatewaySettings:
        """Defaults, then TOKENRELAY_<FIELD> variables, then explicit overrides (CLI flags; None: not given)."""
        return loader.load(cls, overrides)

    def describe(self) -> dict[str, Any]:
        return loader.describe(self)


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    loader.add_flags(parser, GatewaySettings, flags=GATEWAY_FLAGS)
