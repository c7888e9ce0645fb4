"""Periodic maintenance (run by Celery beat): reclaim sweep, trimming, result expiry, dead-letter report.

Workers already take over each other's requests (XAUTOCLAIM), ack-and-delete what they answer and
put TTLs on what they write. These jobs cover what no live worker can: requests of a model whose
workers are all gone, deadlines that pass in a queue nobody reads, keys that lost their TTL, stream
entries acked but never deleted, and a summary of new dead letters for whoever is on call.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import redis
import structlog

from producer import fleet
from producer.batches.ledger import JOB_LUA
from producer.connection import SyncRedis, register_script
from producer.errors import ProtocolError
from producer.protocol import (
    DEFAULT_LIMITS,
    DEFAULT_PREFIX,
    DEFAULT_RESULT_TTL_S,
    GROUP,
    ErrorCode,
    Keys,
    error_event,
    unpack,
)

log = structlog.get_logger(__name__)

# KEYS: queue, meta, result   ARGV: group, entry id, error payload, ttl
# Answers a request whose deadline passed with an error, unless it already ended. Bumping the epoch
# fences out any worker that still holds it: its writes are refused, so there is one terminal event.
EXPIRE_REQUEST = (
    JOB_LUA
    + """
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'done' then
  redis.call('HINCRBY', KEYS[2], 'epoch', 1)
  redis.call('HSET', KEYS[2], 'state', 'done')
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('XADD', KEYS[3], '*', 'm', ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  job_end(KEYS[2], ARGV[3], '2', false)  -- maintenance queues no work: the gateways' sweep refills
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if state == 'done' then return 'settled' end
return 'expired'
"""
)


def _models(client: SyncRedis, prefix: str) -> list[str]:
    return fleet.served_models(client, prefix)


def _deadline(fields: dict[bytes, bytes]) -> tuple[str | None, float | None]:
    try:
        body = unpack(fields.get(b"m"), DEFAULT_LIMITS.max_request_bytes)
    except ProtocolError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    deadline = body.get("deadline")
    request_id = body.get("id") if isinstance(body.get("id"), str) else None
    return request_id, float(deadline) if isinstance(deadline, (int, float)) else None


def reclaim_sweep(
    client: SyncRedis,
    prefix: str = DEFAULT_PREFIX,
    claim_idle_s: float = 10.0,
    scan_count: int = 1000,
    result_ttl_s: int = DEFAULT_RESULT_TTL_S,
    partitions: int = 1,
) -> dict[str, dict[str, int]]:
    """Per model: expire past-deadline requests nobody is running; count orphans; prune dead heartbeats.

    Looks at the oldest `scan_count` queued entries of each queue (the likeliest to be late) and the
    pending entries idle past `claim_idle_s` (their worker is silent). Live workers take orphans over by
    themselves; with none left, orphans wait for the next worker and are only counted here.
    """
    expire = register_script(client, EXPIRE_REQUEST)
    report: dict[str, dict[str, int]] = {}
    now = time.time()
    for view in fleet.view(client, prefix, partitions=partitions):
        model_keys, counts = Keys(view.model, prefix), Counter[str]()
        stale = set(_heartbeat_names(client, model_keys)) - {w["name"] for w in view.workers}
        if stale:
            counts["pruned_heartbeats"] = int(client.hdel(model_keys.workers, *stale))
        for keys, queue in [(k, q) for k in model_keys.partitions(partitions) for q in k.queues]:
            entries: Any = client.xrange(queue, count=scan_count)
            try:
                idle: Any = client.xpending_range(
                    queue, GROUP, min="-", max="+", count=scan_count, idle=int(claim_idle_s * 1000)
                )
            except redis.ResponseError:
                idle = []  # no group yet: nothing was ever delivered
            counts["orphaned"] += len(idle)
            pending_ids = {p["message_id"] for p in idle}
            if pending_ids:
                entries = [e for e in entries if e[0] not in pending_ids] + [
                    e for pid in pending_ids for e in _entries(client.xrange(queue, pid, pid))
                ]
            for entry_id, fields in entries:
                request_id, deadline = _deadline(fields)
                if request_id is None or deadline is None or deadline > now:
                    continue
                event = error_event(ErrorCode.DEADLINE, "deadline passed while no worker was running the request")
                verdict = expire(
                    keys=[queue, keys.request(request_id), keys.result(request_id)],
                    args=[GROUP, entry_id, event, result_ttl_s],
                )
                counts[verdict.decode() if isinstance(verdict, bytes) else str(verdict)] += 1
        report[view.model] = dict(counts)
        if counts.get("expired") or (counts.get("orphaned") and not view.live):
            log.warning("reclaim sweep", model=view.model, live_workers=len(view.workers), **counts)
    return report


def _entries(reply: Any) -> list[Any]:
    return list(reply or [])


def _heartbeat_names(client: SyncRedis, keys: Keys) -> list[str]:
    names: Any = client.hgetall(keys.workers).keys()
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _after(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def trim_acked(
    client: SyncRedis, prefix: str = DEFAULT_PREFIX, dead_letter_retention_s: float = 7 * 86_400, partitions: int = 1
) -> dict[str, int]:
    """Drops request entries every worker is done with (acked) and dead letters past their retention."""
    trimmed: dict[str, int] = {}
    for model in _models(client, prefix):
        trimmed[model] = sum(
            _trim_partition(client, keys, dead_letter_retention_s)
            for keys in Keys(model, prefix).partitions(partitions)
        )
    return trimmed


def _trim_partition(client: SyncRedis, keys: Keys, dead_letter_retention_s: float) -> int:
    count = 0
    for queue in keys.queues:
        try:
            groups: Any = client.xinfo_groups(queue)
        except redis.ResponseError:
            continue  # no such stream yet
        group = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), None)
        if group is None:
            continue
        last = group["last-delivered-id"]
        keep_from = _after(last.decode() if isinstance(last, bytes) else str(last))
        pending: Any = client.xpending(queue, GROUP)
        if pending["pending"]:
            oldest = pending["min"]
            oldest = oldest.decode() if isinstance(oldest, bytes) else str(oldest)
            keep_from = min(keep_from, oldest, key=lambda i: tuple(int(p) for p in i.split("-")))
        count += int(client.xtrim(queue, minid=keep_from, approximate=False))
    horizon = int((time.time() - dead_letter_retention_s) * 1000)
    return count + int(client.xtrim(keys.dead, minid=f"{max(0, horizon)}-0", approximate=False))


def expire_results(
    client: SyncRedis, prefix: str = DEFAULT_PREFIX, ttl_s: int = DEFAULT_RESULT_TTL_S, scan_count: int = 1000
) -> int:
    """Puts a TTL back on result streams, request records and cancel sets that have none (a safety net)."""
    fixed = 0
    for kind in ("res", "req", "cancel"):
        batch: list[Any] = []
        for key in client.scan_iter(match=f"{prefix}:{{*}}:{kind}:*", count=scan_count):
            batch.append(key)
            if len(batch) >= scan_count:
                fixed += _expire_unbounded(client, batch, ttl_s)
                batch = []
        fixed += _expire_unbounded(client, batch, ttl_s)
    if fixed:
        log.warning("keys without a TTL were given one", count=fixed, ttl_s=ttl_s)
    return fixed


def _expire_unbounded(client: SyncRedis, keys: list[Any], ttl_s: int) -> int:
    if not keys:
        return 0
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.ttl(key)
    unbounded = [key for key, ttl in zip(keys, pipe.execute(), strict=True) if ttl == -1]
    for key in unbounded:
        pipe.expire(key, ttl_s)
    pipe.execute()
    return len(unbounded)


def dead_letter_report(
    client: SyncRedis, prefix: str = DEFAULT_PREFIX, limit: int = 10_000, samples: int = 5, partitions: int = 1
) -> dict[str, dict[str, Any]]:
    """Dead letters that arrived since the last report, per model (all its partitions): counts by reason
    and a few samples."""
    report: dict[str, dict[str, Any]] = {}
    for model in _models(client, prefix):
        new, total, reasons, found = 0, 0, Counter[str](), []
        for keys in Keys(model, prefix).partitions(partitions):
            cursor: Any = client.get(keys.dead_cursor)
            start = "(" + cursor.decode() if cursor else "-"
            entries: Any = client.xrange(keys.dead, min=start, max="+", count=limit)
            if not entries:
                continue
            new += len(entries)
            total += int(client.xlen(keys.dead))
            reasons.update(fields.get(b"reason", b"?").decode() for _, fields in entries)
            found += entries[-samples:]
            client.set(keys.dead_cursor, entries[-1][0])
        if not new:
            continue
        report[model] = {
            "new": new,
            "total": total,
            "reasons": dict(reasons),
            "samples": [
                {
                    "entry": e.decode(),
                    "id": f.get(b"id", b"").decode(),
                    "reason": f.get(b"reason", b"").decode(),
                    "message": f.get(b"message", b"").decode()[:200],
                }
                for e, f in found[-samples:]
            ],
        }
        log.warning("new dead letters", model=model, new=new, reasons=dict(reasons))
    return report
