"""Producer-side Lua scripts: submit (idempotent, with admission control) and cancel.

Each runs atomically in Redis, so a retried submit can never enqueue twice and a cancel can never
race a worker's claim into two terminal events. Every key a script touches is passed in KEYS and
shares the model's hash tag. Their ARGV are named in the `*_ARGV` tables (producer.lua), which both
the script text and the argument lists below are built from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from producer.batches.ledger import JOB_LUA
from producer.lua import Argv, priority_table
from producer.protocol import GROUP, Keys, Request, partition_of

# KEYS: high, normal, low, then the meta key of each request
# ARGV: the names, then per request: id, priority index (1-3), payload
# Returns per request {'ok' | 'duplicate', entry id} or {'full', backlog}. One call per batch: the
# backlog is measured once and the per-request work is four commands.
SUBMIT_ARGV = Argv(("max_depth", "ttl", "group"), numbers=frozenset({"max_depth"}))
SUBMIT = SUBMIT_ARGV.script("""
local prio_names = $priority_names
local depth = 0
if max_depth > 0 then
  -- backlog = entries not yet delivered to any worker (in-flight ones are in the PEL)
  for qi = 1, 3 do
    local n = redis.call('XLEN', KEYS[qi])
    if n > 0 then
      local ok, pending = pcall(redis.call, 'XPENDING', KEYS[qi], group)
      if ok then n = n - pending[1] end
    end
    depth = depth + n
  end
end
local out = {}
for r = 1, (#ARGV - $named) / 3 do
  local at = $named + 3 * (r - 1)
  local id, qi, payload = ARGV[at + 1], tonumber(ARGV[at + 2]), ARGV[at + 3]
  local meta, queue = KEYS[3 + r], KEYS[qi]
  if redis.call('EXISTS', meta) == 1 then
    out[r] = {'duplicate', redis.call('HGET', meta, 'entry') or ''}
  elseif max_depth > 0 and depth >= max_depth then
    out[r] = {'full', tostring(depth)}
  else
    if redis.call('EXISTS', queue) == 0 then
      redis.call('XGROUP', 'CREATE', queue, group, '0', 'MKSTREAM')
    end
    local entry = redis.call('XADD', queue, '*', 'id', id, 'm', payload)
    redis.call('HSET', meta, 'state', 'queued', 'entry', entry, 'prio', prio_names[qi], 'epoch', 0)
    redis.call('EXPIRE', meta, ttl)
    depth = depth + 1
    out[r] = {'ok', entry}
  end
end
return out
""")

# KEYS: meta, result stream, high, normal, low   ARGV: the names
CANCEL_ARGV = Argv(("cancelled_payload", "ttl", "cancel_prefix", "request_id"))
CANCEL = CANCEL_ARGV.script(
    JOB_LUA
    + """
local meta, result = KEYS[1], KEYS[2]
local state = redis.call('HGET', meta, 'state')
if not state then return 'unknown' end
if state == 'done' then return 'finished' end
if state == 'queued' then
  -- no worker owns it: finish it here, so it never costs compute
  local queues = $queues
  local prio, entry = unpack(redis.call('HMGET', meta, 'prio', 'entry'))
  if queues[prio] and entry then redis.call('XDEL', queues[prio], entry) end
  redis.call('XADD', result, '*', 'm', cancelled_payload)
  redis.call('EXPIRE', result, ttl)
  redis.call('HSET', meta, 'state', 'done')
  job_end(meta, cancelled_payload, '4')
  return '$finish_cancelled'
end
-- a worker runs it: flag it (a takeover sees the flag) and tell the owner through its own set, so
-- workers look at the requests being cancelled rather than at every request they hold
redis.call('HSET', meta, 'cancel', '1')
local worker = redis.call('HGET', meta, 'worker')
if worker then
  local inbox = cancel_prefix .. worker
  redis.call('SADD', inbox, request_id)
  redis.call('EXPIRE', inbox, ttl)
end
return 'requested'
""",
    queues=priority_table(lambda i: f"KEYS[{i + 2}]"),
)


def submit_batches(requests: Sequence[Request], partitions: int = 1) -> list[list[Request]]:
    """Requests grouped by model and partition (one script call each: its keys share a slot), at most 1,000
    a call."""
    by_slot: dict[tuple[str, int], list[Request]] = {}
    for request in requests:
        by_slot.setdefault((request.model, partition_of(request.request_id, partitions)), []).append(request)
    return [batch[i : i + 1000] for batch in by_slot.values() for i in range(0, len(batch), 1000)]


def partition_depth(max_depth: int, partitions: int) -> int:
    """Each partition's share of a model's backlog limit (0: none), so the partitions together hold about
    `max_depth`."""
    return -(-max_depth // partitions) if max_depth > 0 else 0


def submit_keys(keys: Keys, batch: Sequence[Request]) -> list[str]:
    return [*keys.queues, *(keys.request(r.request_id) for r in batch)]


def submit_args(batch: Sequence[Request], max_depth: int, ttl_s: int) -> list[Any]:
    per_request: list[Any] = []
    for request in batch:
        per_request += [request.request_id, request.priority.rank + 1, request.encode()]
    return SUBMIT_ARGV.args(*per_request, max_depth=max_depth, ttl=ttl_s, group=GROUP)


def cancel_keys(keys: Keys, request_id: str) -> list[str]:
    return [keys.request(request_id), keys.result(request_id), *keys.queues]


def cancel_args(keys: Keys, request_id: str, cancelled_event: bytes, ttl_s: int) -> list[Any]:
    return CANCEL_ARGV.args(
        cancelled_payload=cancelled_event, ttl=ttl_s, cancel_prefix=keys.cancel_prefix, request_id=request_id
    )
