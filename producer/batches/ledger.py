"""A batch's ledger in Redis, kept by the scripts that write its requests' terminal events.

A batch is pinned to one partition of its model (chosen from its id, like a request), and so are its
lines' requests: their ids start with the batch id's first 8 hex digits. The ledger and its lines then
share a slot with the requests' owner records, queues and result streams, and every script that ends a
request (the worker's publish and claim, the producer's cancel, maintenance's deadline expiry) settles the
request's line in the same atomic step that writes its terminal event: it records the answer, moves the
counts, starts the next waiting line (the in-flight window refills itself) and, after the last line,
finishes the batch and appends its webhook event to the partition's outbox. No process has to stay
alive for a batch to progress or finish, and nothing is recorded twice: a line is recorded only by the
one script that wrote its request's single terminal event, and that record is an HSETNX.

    <batch>            hash: the batch object's fields, counts (completed, failed, inflight, total),
                       usage, and what the scripts need (queue, priority, prefixes, TTLs, outbox)
    <batch>:todo       list: line numbers not started yet, in order
    <batch>:req        hash: "<line>.<choice>" -> request id (32 hex) + wire payload, until started
    <batch>:left       hash: line -> choices still running; "x<line>": one of them failed
    <batch>:live       hash: request id -> "<line>.<choice>", for the requests started and not yet ended
    <batch>:out        hash: "<line>.<choice>" -> the request's terminal event (msgpack)

A request of a batch carries `batch` (the ledger key) and `part` ("<line>.<choice>") in its owner
record. The same scripts announce a background response (producer/gateway/responses_store.py keeps its
record beside the request, `<base>:response:<id>`): `response.completed|incomplete|failed|cancelled`.

Lua cannot safely decode our msgpack (bin types), so whoever writes the terminal event says how it
went, as an outcome string: a code (`1` answered, `3` answered but cut at the length limit, `2` an
error, `4` cancelled) and, for an answer, `:<input tokens>:<output tokens>:<cached tokens>`.
"""

from __future__ import annotations

import enum
from typing import Any

from producer.lua import Argv
from producer.webhooks.outbox import EMIT_LUA


class Outcome(enum.StrEnum):
    """How a request ended, as the scripts that settle batch lines (and announce jobs) read it."""

    COMPLETED = "1"
    FAILED = "2"
    INCOMPLETE = "3"  # answered, but cut at max_tokens
    CANCELLED = "4"


OUTCOME_FAILED = Outcome.FAILED.value


def outcome(kind: Outcome, usage: dict[str, Any] | None = None) -> str:
    """The outcome string of a terminal event, for the scripts that settle a batch line."""
    if kind not in (Outcome.COMPLETED, Outcome.INCOMPLETE):
        return kind.value
    usage = usage or {}
    counts = (int(usage.get(name) or 0) for name in ("prompt_tokens", "completion_tokens", "cached_tokens"))
    return ":".join([kind.value, *map(str, counts)])


# Functions shared by every script that ends a request: `job_end(meta, payload, outcome)` settles the
# request's batch line, if it has one. The batch's own fields are read as one table (batch_load).
JOB_LUA = (
    EMIT_LUA
    + """
local function job_now()
  return tonumber(redis.call('TIME')[1])
end

local function job_keep(key, seconds)
  if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, seconds) end
end

local function batch_load(bkey)
  local v = redis.call('HMGET', bkey, 'status', 'closing', 'window', 'inflight', 'total', 'completed', 'failed',
                       'queue', 'prio', 'req_prefix', 'res_prefix', 'ttl', 'keep', 'events', 'id', 'expires_at')
  return {status = v[1], closing = v[2], window = tonumber(v[3]) or 0, inflight = tonumber(v[4]) or 0,
          total = tonumber(v[5]) or 0, completed = tonumber(v[6]) or 0, failed = tonumber(v[7]) or 0,
          queue = v[8], prio = v[9], req_prefix = v[10], res_prefix = v[11], ttl = v[12], keep = v[13],
          events = v[14], id = v[15], expires_at = tonumber(v[16]) or 0}
end

-- The last line settled (or a batch closed before it started): its final status and webhook event.
local function batch_finish(bkey, b)
  local clock = redis.call('TIME')
  local now = tonumber(clock[1])
  redis.call('HSET', bkey, 'finished_ms', now * 1000 + math.floor(tonumber(clock[2]) / 1000))
  local status = 'completed'
  if b.closing == 'cancelled' then status = 'cancelled' elseif b.closing == 'expired' then status = 'expired' end
  if status == 'completed' then
    redis.call('HSET', bkey, 'status', status, 'finalizing_at', now, 'completed_at', now)
  else
    redis.call('HSET', bkey, 'status', status, status .. '_at', now)
  end
  redis.call('DEL', bkey .. ':todo', bkey .. ':req', bkey .. ':left', bkey .. ':live')
  emit_event(b.events, 'evt_' .. b.id .. '_' .. status, 'batch.' .. status, b.id, now)
end

-- Queues every choice of one line, as the producer's submit would (an owner record that already exists,
-- from a start that was interrupted and replayed, is left as it is).
local function batch_enqueue(bkey, b, line)
  local parts = tonumber(redis.call('HGET', bkey .. ':left', line)) or 0
  for k = 0, parts - 1 do
    local part = line .. '.' .. k
    local v = redis.call('HGET', bkey .. ':req', part)
    if v then
      local id, payload = string.sub(v, 1, 32), string.sub(v, 33)
      local meta = b.req_prefix .. id
      if redis.call('EXISTS', meta) == 0 then
        local entry = redis.call('XADD', b.queue, '*', 'id', id, 'm', payload)
        redis.call('HSET', meta, 'state', 'queued', 'entry', entry, 'prio', b.prio, 'epoch', 0,
                   'batch', bkey, 'part', part)
        redis.call('EXPIRE', meta, b.ttl)
      end
      redis.call('HSET', bkey .. ':live', id, part)
      redis.call('HDEL', bkey .. ':req', part)
    end
  end
  job_keep(bkey .. ':live', b.keep)
end

-- Starts waiting lines while the window has room (unless `refill` is false: the caller may not queue
-- work, and the gateways' sweep refills instead), and finishes the batch once every line is settled.
local function batch_pump(bkey, refill)
  local b = batch_load(bkey)
  if b.status ~= 'in_progress' and b.status ~= 'cancelling' then return end
  if refill and not b.closing and b.expires_at > 0 and job_now() >= b.expires_at then
    -- past the window with lines still waiting: they will not start (the sweep would close it the same way)
    local waiting = redis.call('LLEN', bkey .. ':todo')
    if waiting > 0 then
      redis.call('HSET', bkey, 'closing', 'expired')
      b.closing, b.failed = 'expired', redis.call('HINCRBY', bkey, 'failed', waiting)
      redis.call('DEL', bkey .. ':todo')
    end
  end
  if refill and not b.closing then
    if redis.call('EXISTS', b.queue) == 0 then redis.call('XGROUP', 'CREATE', b.queue, 'workers', '0', 'MKSTREAM') end
    local started = 0
    while b.inflight + started < b.window do
      local line = redis.call('LPOP', bkey .. ':todo')
      if not line then break end
      batch_enqueue(bkey, b, line)
      started = started + 1
    end
    if started > 0 then b.inflight = redis.call('HINCRBY', bkey, 'inflight', started) end
  end
  if b.completed + b.failed >= b.total then batch_finish(bkey, b) end
end

-- One choice of a line ended with `payload` as its terminal event: record it, count the line once all its
-- choices have ended, and refill the window.
local function batch_settle(bkey, part, payload, result, id, refill)
  local status = redis.call('HGET', bkey, 'status')
  if status ~= 'in_progress' and status ~= 'cancelling' then return end
  if redis.call('HSETNX', bkey .. ':out', part, payload) == 0 then return end
  job_keep(bkey .. ':out', redis.call('HGET', bkey, 'keep'))
  redis.call('HDEL', bkey .. ':live', id)
  local line = string.match(part, '^(%d+)')
  local ok, input, output, cached = string.match(result, '^(%d):?(%d*):?(%d*):?(%d*)')
  if ok == '1' or ok == '3' then
    if tonumber(input) then redis.call('HINCRBY', bkey, 'input_tokens', input) end
    if tonumber(output) then redis.call('HINCRBY', bkey, 'output_tokens', output) end
    if tonumber(cached) then redis.call('HINCRBY', bkey, 'cached_tokens', cached) end
  else
    redis.call('HSET', bkey .. ':left', 'x' .. line, '1')
  end
  if redis.call('HINCRBY', bkey .. ':left', line, -1) > 0 then return end
  local failed = redis.call('HGET', bkey .. ':left', 'x' .. line)
  redis.call('HDEL', bkey .. ':left', line, 'x' .. line)
  redis.call('HINCRBY', bkey, failed and 'failed' or 'completed', 1)
  redis.call('HINCRBY', bkey, 'inflight', -1)
  batch_pump(bkey, refill)
end

local job_kinds = {['1'] = 'completed', ['2'] = 'failed', ['3'] = 'incomplete', ['4'] = 'cancelled'}

-- A request ended with `payload` as its terminal event: settle its batch line, if it belongs to one, and
-- announce a background response (the Responses API's record beside the request) to the webhooks.
local function job_end(meta, payload, result, refill)
  local id = string.sub(meta, -32)
  local job = redis.call('HMGET', meta, 'batch', 'part')
  if job[1] then batch_settle(job[1], job[2], payload, result, id, refill ~= false) end
  local base = string.sub(meta, 1, #meta - 37)  -- '<base>:req:<id>'
  if redis.call('HGET', base .. ':response:' .. id, 'background') == '1' then
    local kind = job_kinds[string.sub(result, 1, 1)] or 'failed'
    emit_event(base .. ':events', 'evt_resp_' .. id .. '_' .. kind, 'response.' .. kind, 'resp_' .. id, job_now())
  end
end
"""
)

# KEYS: the ledger   ARGV: the names
# validating -> in_progress under the validator's lease token, then the first window of lines.
START_ARGV = Argv(("token",))
START = START_ARGV.script(
    JOB_LUA
    + """
local bkey = KEYS[1]
local m = redis.call('HMGET', bkey, 'status', 'validator')
if m[1] ~= 'validating' then return m[1] or 'unknown' end
if m[2] ~= token then return 'stale' end
redis.call('HSET', bkey, 'status', 'in_progress', 'in_progress_at', job_now())
batch_pump(bkey, true)
return redis.call('HGET', bkey, 'status')
"""
)

# KEYS: the ledger   ARGV: the names
# validating -> failed (validation found bad lines), under the validator's lease token.
FAIL_ARGV = Argv(("token", "errors"))
FAIL = FAIL_ARGV.script(
    JOB_LUA
    + """
local bkey = KEYS[1]
local m = redis.call('HMGET', bkey, 'status', 'validator', 'events', 'id')
if m[1] ~= 'validating' then return m[1] or 'unknown' end
if m[2] ~= token then return 'stale' end
local now = job_now()
redis.call('HSET', bkey, 'status', 'failed', 'failed_at', now, 'errors', errors)
redis.call('DEL', bkey .. ':todo', bkey .. ':req', bkey .. ':left')
emit_event(m[3], 'evt_' .. m[4] .. '_failed', 'batch.failed', m[4], now)
return 'failed'
"""
)

# KEYS: the ledger   ARGV: the names
# Takes the validation over when the lease of whoever held it ran out (a gateway died validating).
TAKE_LEASE_ARGV = Argv(("token", "lease_s"), numbers=frozenset({"lease_s"}))
TAKE_LEASE = TAKE_LEASE_ARGV.script("""
local m = redis.call('HMGET', KEYS[1], 'status', 'lease_until')
if m[1] ~= 'validating' then return 0 end
local now = tonumber(redis.call('TIME')[1])
if (tonumber(m[2]) or 0) > now then return 0 end
redis.call('HSET', KEYS[1], 'validator', token, 'lease_until', now + lease_s)
return 1
""")

# KEYS: the ledger   ARGV: the names
# Extends the lease while validation writes the lines; 0: someone else holds it now.
RENEW_LEASE = TAKE_LEASE_ARGV.script("""
local m = redis.call('HMGET', KEYS[1], 'status', 'validator')
if m[1] ~= 'validating' or m[2] ~= token then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', tonumber(redis.call('TIME')[1]) + lease_s)
return 1
""")

# KEYS: the ledger   ARGV: the names
# Cancel (reason `cancelled`) or expiry (`expired`): lines not started are counted failed at once (their
# output lines say why); queued requests are cancelled on the spot and settle here; running ones are
# flagged for their worker, which aborts them within a step. The batch finishes when the last settles.
CLOSE_ARGV = Argv(("reason", "cancelled_payload", "cancel_prefix"))
CLOSE = CLOSE_ARGV.script(
    JOB_LUA
    + """
local bkey = KEYS[1]
local b = batch_load(bkey)
if not b.status then return 'unknown' end
if b.closing or (b.status ~= 'validating' and b.status ~= 'in_progress') then return b.status end
local now = job_now()
redis.call('HSET', bkey, 'closing', reason)
b.closing = reason
if b.status == 'validating' then
  batch_finish(bkey, b)
  return redis.call('HGET', bkey, 'status')
end
if reason == 'cancelled' then redis.call('HSET', bkey, 'status', 'cancelling', 'cancelling_at', now) end
local waiting = redis.call('LLEN', bkey .. ':todo')
if waiting > 0 then
  redis.call('HINCRBY', bkey, 'failed', waiting)
  redis.call('DEL', bkey .. ':todo')
end
local live = redis.call('HGETALL', bkey .. ':live')
for i = 1, #live, 2 do
  local id, part = live[i], live[i + 1]
  local meta = b.req_prefix .. id
  local m = redis.call('HMGET', meta, 'state', 'entry', 'worker')
  if m[1] == 'queued' then
    if m[2] then redis.call('XDEL', b.queue, m[2]) end
    redis.call('XADD', b.res_prefix .. id, '*', 'm', cancelled_payload)
    redis.call('EXPIRE', b.res_prefix .. id, b.ttl)
    redis.call('HSET', meta, 'state', 'done')
    job_end(meta, cancelled_payload, '4')
  elseif m[1] == 'running' then
    redis.call('HSET', meta, 'cancel', '1')
    if m[3] and m[3] ~= '' then
      redis.call('SADD', cancel_prefix .. m[3], id)
      redis.call('EXPIRE', cancel_prefix .. m[3], b.ttl)
    end
  elseif not m[1] then
    batch_settle(bkey, part, cancelled_payload, '4', id, true)  -- its record expired: nothing will end it now
  end
end
batch_pump(bkey, true)
return redis.call('HGET', bkey, 'status')
"""
)

# KEYS: the ledger
# Refills the window of a running batch: the sweep's repair for lines settled by a caller that may not
# queue work (maintenance's deadline expiry).
PUMP = Argv(()).script(
    JOB_LUA
    + """
batch_pump(KEYS[1], true)
return redis.call('HGET', KEYS[1], 'status')
"""
)
