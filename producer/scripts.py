"""Producer-side Lua scripts: submit (idempotent, with admission control) and cancel.

Each runs atomically in Redis, so a retried submit can never enqueue twice and a cancel can never
race a worker's claim into two terminal events. Every key a script touches is passed in KEYS and
shares the model's hash tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from producer.protocol import GROUP, Keys, Request

# KEYS: high, normal, low, then the meta key of each request
# ARGV: max_depth, ttl, group, then per request: id, priority index (1-3), payload
# Returns per request {'ok' | 'duplicate', entry id} or {'full', backlog}. One call per batch: the
# backlog is measured once and the per-request work is four commands.
SUBMIT = """
local max_depth, ttl, group = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local prio_names = {'high', 'normal', 'low'}
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
for r = 1, (#ARGV - 3) / 3 do
  local id, qi, payload = ARGV[1 + 3 * r], tonumber(ARGV[2 + 3 * r]), ARGV[3 + 3 * r]
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
"""

# KEYS: meta, result stream, high, normal, low   ARGV: cancelled done-event payload, ttl, cancel-set prefix, id
CANCEL = """
local meta, result = KEYS[1], KEYS[2]
local state = redis.call('HGET', meta, 'state')
if not state then return 'unknown' end
if state == 'done' then return 'finished' end
if state == 'queued' then
  -- no worker owns it: finish it here, so it never costs compute
  local queues = {high = KEYS[3], normal = KEYS[4], low = KEYS[5]}
  local prio, entry = unpack(redis.call('HMGET', meta, 'prio', 'entry'))
  if queues[prio] and entry then redis.call('XDEL', queues[prio], entry) end
  redis.call('XADD', result, '*', 'm', ARGV[1])
  redis.call('EXPIRE', result, ARGV[2])
  redis.call('HSET', meta, 'state', 'done')
  return 'cancelled'
end
-- a worker runs it: flag it (a takeover sees the flag) and tell the owner through its own set, so
-- workers look at the requests being cancelled rather than at every request they hold
redis.call('HSET', meta, 'cancel', '1')
local worker = redis.call('HGET', meta, 'worker')
if worker then
  local inbox = ARGV[3] .. worker
  redis.call('SADD', inbox, ARGV[4])
  redis.call('EXPIRE', inbox, ARGV[2])
end
return 'requested'
"""


def submit_batches(requests: Sequence[Request]) -> list[list[Request]]:
    """Requests grouped by model (one script call per model: its keys share a slot), at most 1,000 a call."""
    by_model: dict[str, list[Request]] = {}
    for request in requests:
        by_model.setdefault(request.model, []).append(request)
    return [batch[i:i + 1000] for batch in by_model.values() for i in range(0, len(batch), 1000)]


def submit_keys(keys: Keys, batch: Sequence[Request]) -> list[str]:
    return [*keys.queues, *(keys.request(r.request_id) for r in batch)]


def submit_args(batch: Sequence[Request], max_depth: int, ttl_s: int) -> list[Any]:
    args: list[Any] = [max_depth, ttl_s, GROUP]
    for request in batch:
        args += [request.request_id, request.priority.rank + 1, request.encode()]
    return args


def cancel_keys(keys: Keys, request_id: str) -> list[str]:
    return [keys.request(request_id), keys.result(request_id), *keys.queues]


def cancel_args(keys: Keys, request_id: str, cancelled_event: bytes, ttl_s: int) -> list[Any]:
    return [cancelled_event, ttl_s, keys.cancel_prefix, request_id]
