"""GatewaySettings: one settings object per gateway process, from CLI flags and TOKENRELAY_* variables."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from producer.client import DEFAULT_MAX_QUEUE_DEPTH, DEFAULT_REDIS_URL
from producer.protocol import DEFAULT_PREFIX


@dataclass(slots=True)
class GatewaySettings:
    redis_url: str = DEFAULT_REDIS_URL
    prefix: str = DEFAULT_PREFIX
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_file: str | None = None  # one key per line (or sha256:<hex>); env TOKENRELAY_API_KEYS: comma-separated
    max_queue_depth: int = DEFAULT_MAX_QUEUE_DEPTH  # past this backlog a model answers 429
    retry_after_s: int = 2  # the Retry-After of a 429
    request_timeout_s: float = 600.0  # deadline of each request (queue time counts): 504 past it
    default_max_tokens: int = 1024  # chat requests that set no limit; completions default to 16 like OpenAI
    max_choices: int = 128  # prompts x n of one request
    models_cache_s: float = 2.0  # how long the set of served models is trusted
    redis_connections: int = 1024  # the pool's size: each open stream holds one while it waits for tokens

    def __post_init__(self) -> None:
        for name in ("retry_after_s", "request_timeout_s", "default_max_tokens", "max_choices"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port")

    @classmethod
    def from_env(cls, **overrides: Any) -> GatewaySettings:
        """Defaults, then TOKENRELAY_<FIELD> variables, then explicit overrides (CLI flags)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(f"TOKENRELAY_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(raw, str(f.type))
        values.update({k: v for k, v in overrides.items() if v is not None and k in cls.__dataclass_fields__})
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        values = {k: v for k, v in asdict(self).items() if v is not None}
        values["redis_url"] = re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", self.redis_url)
        return values


def _parse(raw: str, type_name: str) -> Any:
    if type_name.startswith("int"):
        return int(raw)
    if type_name.startswith("float"):
        return float(raw)
    return raw
