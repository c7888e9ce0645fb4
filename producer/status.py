"""`tokenrelay status`: queues, pending entries, dead letters and live workers (with their engine options)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import redis

from producer.connection import SyncRedis
from producer.protocol import DEFAULT_PREFIX, GROUP, Keys, Priority


@dataclass(slots=True)
class ModelStatus:
    model: str
    queued: dict[str, int] = field(default_factory=dict)  # per priority: not yet delivered to a worker
    pending: dict[str, int] = field(default_factory=dict)  # per priority: delivered, not yet acked
    dead_letters: int = 0
    workers: list[dict[str, Any]] = field(default_factory=list)  # live ones (heartbeat within 3 intervals)
    stale_workers: list[str] = field(default_factory=list)


def gather(
    client: SyncRedis, prefix: str = DEFAULT_PREFIX, stale_after_s: float = 15.0, partitions: int = 1
) -> list[ModelStatus]:
    members: Any = client.smembers(Keys("x", prefix).models)
    models = sorted(m.decode() for m in members)
    result = []
    now = time.time()
    for model in models:
        keys = Keys(model, prefix)
        status = ModelStatus(model)
        for part in keys.partitions(partitions):  # summed: users see the model, not its partitions
            for priority in Priority:
                key = part.queue(priority)
                length = int(client.xlen(key))
                try:
                    pending = int(client.xpending(key, GROUP)["pending"])
                except redis.ResponseError:
                    pending = 0
                status.queued[priority.value] = status.queued.get(priority.value, 0) + max(0, length - pending)
                status.pending[priority.value] = status.pending.get(priority.value, 0) + pending
            status.dead_letters += int(client.xlen(part.dead))
        heartbeats: Any = client.hgetall(keys.workers)
        for name, raw in sorted(heartbeats.items()):
            info = msgpack.unpackb(raw, raw=False)
            if now - float(info.get("at", 0)) > stale_after_s:
                status.stale_workers.append(name.decode())
            else:
                status.workers.append({"name": name.decode(), **info})
        result.append(status)
    return result


def render(statuses: list[ModelStatus]) -> str:
    if not statuses:
        return "no models registered (no worker has started against this Redis and prefix)"
    lines = []
    for s in statuses:
        lines.append(f"model {s.model}")
        lines.append(
            "  queued   "
            + "  ".join(f"{k}={v}" for k, v in s.queued.items())
            + "    pending "
            + "  ".join(f"{k}={v}" for k, v in s.pending.items())
            + f"    dead letters {s.dead_letters}"
        )
        for w in s.workers:
            lines.append(
                f"  worker {w['name']}: slots {w.get('slots_used', 0)}/{w.get('slots_total', 0)}, "
                f"kv blocks {w.get('kv_blocks_used', 0)}/{w.get('kv_blocks_total', 0)}, "
                f"{w.get('tokens_per_s', 0)} tokens/s{', draining' if w.get('draining') else ''}"
            )
            if w.get("engine_options"):
                options = dict(w["engine_options"])
                kind = options.pop("engine", "")
                lines.append(
                    f"    engine {kind}" + (": " + "  ".join(f"{k}={v}" for k, v in options.items()) if options else "")
                )
        if not s.workers:
            lines.append("  no live workers")
        if s.stale_workers:
            lines.append(f"  stale heartbeats (dead or stopped): {', '.join(s.stale_workers)}")
    return "\n".join(lines)


def as_dicts(statuses: list[ModelStatus]) -> list[dict[str, Any]]:
    return [asdict(s) for s in statuses]
