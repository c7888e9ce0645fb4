"""Producer-side Lua scripts: submit (idempotent, with admission control) and cancel.

Each runs atomically in Redis, so a retried submit can never enqueue twice and a cancel can never
race a worker's claim into two terminal events. Every key a script touches is passed in KEYS and
shares the model's hash tag.
"""

from __future__ import annotations

from producer.protocol import GROUP, Keys, Priority

# KEYS: meta, target queue, high, normal, low   ARGV: id, payload, max_depth, ttl, group, priority
SUBMIT = """
local meta, queue = KEYS[1], KEYS[2]
local id, payload, max_depth, ttl, group, prio = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]
if redis.call('EXISTS', meta) == 1 then
  return {'duplicate', redis.call('HGET', meta, 'entry') or ''}
end
if max_depth > 0 then
  -- backlog = entries not yet delivered to any worker (in-flight ones are in the PEL)
  local depth = 0
  for i = 3, 5 do
    local n = redis.call('XLEN', KEYS[i])
    if n > 0 then
      local ok, pending = pcall(redis.call, 'XPENDING', KEYS[i], group)
      if ok then n = n - pending[1] end
    end
    depth = depth + n
  end
  if depth >= max_depth then return {'full', tostring(depth)} end
end
if redis.call('EXISTS', queue) == 0 then
  redis.call('XGROUP', 'CREATE', queue, group, '0', 'MKSTREAM')
end
local entry = redis.call('XADD', queue, '*', 'id', id, 'm', payload)
redis.call('HSET', meta, 'state', 'queued', 'entry', entry, 'prio', prio, 'epoch', 0)
redis.call('EXPIRE', meta, ttl)
return {'ok', entry}
"""

# KEYS: meta, result stream, high, normal, low   ARGV: cancelled done-event payload, ttl
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
redis.call('HSET', meta, 'cancel', '1')
return 'requested'
"""


def submit_keys(keys: Keys, request_id: str, priority: Priority) -> list[str]:
    return [keys.request(request_id), keys.queue(priority), *keys.queues]


def submit_args(request_id: str, payload: bytes, max_depth: int, ttl_s: int, priority: Priority) -> list[object]:
    return [request_id, payload, max_depth, ttl_s, GROUP, priority.value]


def cancel_keys(keys: Keys, request_id: str) -> list[str]:
    return [keys.request(request_id), keys.result(request_id), *keys.queues]
