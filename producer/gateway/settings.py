"""GatewaySettings: one settings object per gateway process, from CLI flags and TOKENRELAY_* variables."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from producer import settings as loader
from producer.client import DEFAULT_MAX_QUEUE_DEPTH, DEFAULT_REDIS_URL
from producer.protocol import DEFAULT_PREFIX, DEFAULT_RESULT_TTL_S
from producer.settings import setting

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
    redis_connections: int = setting(1024, help="the Redis pool's size: each open stream holds a connection")
    # Responses API (producer/gateway/responses_service.py)
    response_retention_s: int = setting(
        DEFAULT_RESULT_TTL_S,
        help="seconds a stored response stays retrievable after it ends (at most the workers' --result-ttl-s)",
    )
    background_timeout_s: float = setting(3600.0, help="seconds a background response may take, queue time included")

    def __post_init__(self) -> None:
        for name in ("retry_after_s", "request_timeout_s", "default_max_tokens", "max_choices"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port")
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
