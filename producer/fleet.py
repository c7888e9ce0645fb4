"""What producers can see of the fleet: served models, live workers and queue depths (no torch)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from producer.connection import SyncRedis
from producer.protocol import DEFAULT_PREFIX, GROUP, Keys, Priority

# A worker heartbeats every second by default; three missed beats and more mean it is gone.
DEFAULT_STALE_AFTER_S = 15.0


@dataclass(slots=True)
class ModelView:
    """One model's queues and workers as seen at one moment."""

    model: str
    queued: dict[str, int] = field(default_factory=dict)  # per priority: not yet delivered
    pending: dict[str, int] = field(default_factory=dict)  # per priority: delivered, not acked
    dead_letters: int = 0
    workers: list[dict[str, Any]] = field(default_factory=list)  # live heartbeats, decoded

    @property
    def live(self) -> bool:
        return bool(self.workers)


def served_models(client: SyncRedis, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Every model a worker has ever registered under this prefix (live or not)."""
    members: Any = client.smembers(Keys("x", prefix).models)
    return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)


def live_workers(
    raw_heartbeats: dict[Any, Any], now: float | None = None, stale_after_s: float = DEFAULT_STALE_AFTER_S
) -> list[dict[str, Any]]:
    """Decoded heartbeats that are recent enough to belong to a running worker."""
    now = time.time() if now is None else now
    live = []
    for name, raw in sorted(raw_heartbeats.items()):
        try:
            info = msgpack.unpackb(raw, raw=False)
        except Exception:  # noqa: BLE001 - a corrupt heartbeat is not a live worker
            continue
        if isinstance(info, dict) and now - float(info.get("at", 0)) <= stale_after_s:
            live.append({"name": name.decode() if isinstance(name, bytes) else str(name), **info})
    return live


def view(
    client: SyncRedis,
    prefix: str = DEFAULT_PREFIX,
    models: list[str] | None = None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    partitions: int = 1,
) -> list[ModelView]:
    """Queues, dead letters and live workers of each model (summed over its partitions), read in one
    pipelined round trip."""
    models = served_models(client, prefix) if models is None else models
    pipe = client.pipeline(transaction=False)
    for model in models:
        for keys in Keys(model, prefix).partitions(partitions):
            for priority in Priority:
                pipe.xlen(keys.queue(priority))
                pipe.execute_command("XPENDING", keys.queue(priority), GROUP)
            pipe.xlen(keys.dead)
        pipe.hgetall(Keys(model, prefix).workers)
    replies: list[Any] = pipe.execute(raise_on_error=False)
    views, now, at = [], time.time(), 0
    for model in models:
        current = ModelView(model)
        for _ in range(partitions):
            for priority in Priority:
                length, pending = replies[at], replies[at + 1]
                at += 2
                length = length if isinstance(length, int) else 0
                in_flight = int(pending[0]) if isinstance(pending, list) and pending else 0  # NOGROUP: none yet
                current.queued[priority.value] = current.queued.get(priority.value, 0) + max(0, length - in_flight)
                current.pending[priority.value] = current.pending.get(priority.value, 0) + in_flight
            dead = replies[at]
            at += 1
            current.dead_letters += dead if isinstance(dead, int) else 0
        heartbeats = replies[at]
        at += 1
        current.workers = live_workers(heartbeats if isinstance(heartbeats, dict) else {}, now, stale_after_s)
        views.append(current)
    return views
