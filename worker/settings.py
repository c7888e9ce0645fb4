"""WorkerSettings: one settings object per worker process, from CLI flags and TOKENRELAY_* variables."""

from __future__ import annotations

import os
import re
import secrets
import socket
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from producer.protocol import DEFAULT_MODEL_NAME, DEFAULT_PREFIX, DEFAULT_RESULT_TTL_S, Keys, check_model_name

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
ENGINES = ("llm", "noop")


def _consumer_name() -> str:
    # unique per process: a restarted worker must not inherit a dead one's pending entries by name
    return f"{socket.gethostname()[:32]}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass(slots=True)
class WorkerSettings:
    redis_url: str = DEFAULT_REDIS_URL
    prefix: str = DEFAULT_PREFIX
    model: str | None = None  # a local HF folder; None: the default model
    model_name: str | None = None  # the name clients address; None: the folder's name
    engine: str = "llm"  # llm | noop (one token per request per step, for queue load tests)
    dtype: str = "auto"
    max_num_seqs: int = 64
    num_threads: int | None = None
    num_kv_blocks: int | None = None
    noop_step_delay_s: float = 0.0
    heartbeat_s: float = 1.0  # claim refresh and stats interval
    claim_idle_s: float = 10.0  # entries idle this long belong to a dead worker and are taken over
    max_deliveries: int = 3  # claims of one request before it is dead-lettered
    drain_grace_s: float = 30.0  # SIGTERM: how long to finish in-flight work before handing it back
    publish_interval_s: float = 0.0  # minimum gap between publish round trips (0: one per step, coalesced)
    result_ttl_s: int = DEFAULT_RESULT_TTL_S
    dead_letter_maxlen: int = 10_000
    metrics_port: int = 0  # Prometheus metrics over HTTP on this port; 0: none
    metrics_host: str = "0.0.0.0"  # noqa: S104 - scraped from other hosts and containers
    consumer: str = field(default_factory=_consumer_name)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine: must be one of {ENGINES}, got {self.engine!r}")
        if self.model_name is not None:
            check_model_name(self.model_name)
        for name in ("heartbeat_s", "claim_idle_s", "drain_grace_s", "result_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0")
        if self.claim_idle_s < 2 * self.heartbeat_s:
            raise ValueError("claim_idle_s: must be at least twice heartbeat_s, or live workers lose their work")
        if self.max_deliveries < 1 or self.max_num_seqs < 1:
            raise ValueError("max_deliveries and max_num_seqs: must be >= 1")

    @property
    def served_model(self) -> str:
        if self.model_name:
            return self.model_name
        if self.engine == "noop":
            return "noop"
        if self.model is None:
            return DEFAULT_MODEL_NAME
        return os.path.basename(os.path.normpath(self.model))

    @property
    def keys(self) -> Keys:
        return Keys(self.served_model, self.prefix)

    @classmethod
    def from_env(cls, **overrides: Any) -> WorkerSettings:
        """Defaults, then TOKENRELAY_<FIELD> variables, then explicit overrides (CLI flags)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(f"TOKENRELAY_{f.name.upper()}")
            if raw is not None and f.name != "consumer":
                values[f.name] = _parse(raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        """For the start-up log line: everything set, with any Redis password masked."""
        values = {k: v for k, v in asdict(self).items() if v is not None}
        values["redis_url"] = re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", self.redis_url)
        values["served_model"] = self.served_model
        return values


def _parse(raw: str, type_name: Any) -> Any:
    text = str(type_name)
    if text.startswith("int"):
        return int(raw)
    if text.startswith("float"):
        return float(raw)
    return raw
