"""Worker-side Lua scripts: admit (take over + read + claim), publish (fenced), heartbeat, hand back.

Fencing: every claim of a request increments `epoch` in its `req:<id>` hash and records the claiming
`worker`. A worker publishes, acks and refreshes only while the epoch and owner it holds are still the
current ones, checked inside the same atomic script that writes. A worker that was paused and resumes
after another took its requests over finds a newer epoch and writes nothing; it is told which requests
it lost. A Redis that comes back with older data (see PUBLISH) is caught by the same records.

All scripts take KEYS = [queue high, queue normal, queue low, dead letters, workers hash, this
worker's cancel set]; keys
derived from a request id read inside the script share the model's hash tag (same slot). Their ARGV
are named in the `*_ARGV` tables (producer.lua): the Relay builds its lists from the same tables.
"""

from __future__ import annotations

from producer.batches.ledger import JOB_LUA
from producer.lua import Argv, priority_table

_CLAIM_NAMES = (
    "group",
    "consumer",
    "req_prefix",
    "res_prefix",
    "ttl",
    "max_deliveries",
    "dead_maxlen",
    "restart_payload",
    "cancelled_payload",
    "dead_payload",
)

_CLAIM = (
    JOB_LUA
    + """
local prio_names = $priority_names

local function settle(queue, entry)
  redis.call('XACK', queue, group, entry)
  redis.call('XDEL', queue, entry)
end

-- Returns {queue index, entry id, request id, payload, epoch, verdict}; only 'ok' is work to do.
local function claim(qi, entry, fields)
  local queue = KEYS[qi]
  local id, payload = nil, ''
  for i = 1, #fields, 2 do
    if fields[i] == 'id' then id = fields[i + 1] elseif fields[i] == 'm' then payload = fields[i + 1] end
  end
  if type(id) ~= 'string' or #id ~= 32 or string.find(id, '[^0-9a-f]') then
    -- no reply address: straight to the dead letters
    settle(queue, entry)
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', dead_maxlen, '*', 'reason', '$code_invalid_request', 'message',
               'entry has no valid id field', 'queue', queue, 'entry', entry, 'worker', consumer,
               'raw', string.sub(cmsgpack.pack(fields), 1, 65536))
    return {qi, entry, '', '', 0, 'bad_id'}
  end
  local meta, result = req_prefix .. id, res_prefix .. id
  local known = redis.call('HMGET', meta, 'state', 'entry', 'cancel')
  if known[2] and known[2] ~= entry then settle(queue, entry); return {qi, entry, id, '', 0, 'duplicate'} end
  if known[1] == 'done' then settle(queue, entry); return {qi, entry, id, '', 0, 'done'} end
  local epoch = redis.call('HINCRBY', meta, 'epoch', 1)
  if not known[1] then redis.call('EXPIRE', meta, ttl) end  -- entered without submit: no TTL yet
  if epoch > max_deliveries then
    redis.call('HSET', meta, 'state', 'done', 'entry', entry)
    redis.call('XADD', result, '*', 'm', dead_payload)
    redis.call('EXPIRE', result, ttl)
    job_end(meta, dead_payload, '2')
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', dead_maxlen, '*', 'reason', '$code_max_deliveries', 'message',
               'delivered ' .. (epoch - 1) .. ' times without finishing', 'id', id, 'queue', queue,
               'entry', entry, 'worker', consumer, 'bytes', #payload, 'raw', string.sub(payload, 1, 65536))
    settle(queue, entry)
    return {qi, entry, id, '', epoch, 'dead'}
  end
  if known[3] == '1' then
    redis.call('HSET', meta, 'state', 'done', 'entry', entry)
    redis.call('XADD', result, '*', 'm', cancelled_payload)
    redis.call('EXPIRE', result, ttl)
    job_end(meta, cancelled_payload, '4')
    settle(queue, entry)
    return {qi, entry, id, '', epoch, '$finish_cancelled'}
  end
  redis.call('HSET', meta, 'state', 'running', 'entry', entry, 'prio', prio_names[qi], 'worker', consumer, 'seq', 0)
  if epoch > 1 then
    -- a takeover: the client drops what the lost worker sent
    redis.call('XADD', result, '*', 'm', restart_payload)
    redis.call('EXPIRE', result, ttl)
  end
  return {qi, entry, id, payload, epoch, 'ok'}
end
"""
)

# The names, then pre-read entries (from a blocking XREADGROUP) as: queue index, entry id, n fields, fields...
# New entries are read from queues first_queue..last_queue (1 high .. 3 low): a worker reading several
# partitions takes one priority class at a time across all of them.
ADMIT_ARGV = Argv(
    (
        *_CLAIM_NAMES,
        "budget",
        "autoclaim",
        "min_idle_ms",
        "cursor_high",
        "cursor_normal",
        "cursor_low",
        "first_queue",
        "last_queue",
    ),
    numbers=frozenset({"max_deliveries", "budget", "first_queue", "last_queue"}),
)
ADMIT = ADMIT_ARGV.script(
    _CLAIM
    + """
local cursors = {cursor_high, cursor_normal, cursor_low}
local out = {}
local function take(qi, entry, fields)
  local r = claim(qi, entry, fields)
  out[#out + 1] = r
  if r[6] == 'ok' then budget = budget - 1 end
end
local i = $tail
while i <= #ARGV do
  local n = tonumber(ARGV[i + 2])
  local fields = {}
  for j = 1, n do fields[j] = ARGV[i + 2 + j] end
  take(tonumber(ARGV[i]), ARGV[i + 1], fields)
  i = i + 3 + n
end
if autoclaim == '1' then
  for qi = 1, 3 do
    if budget <= 0 then break end
    local r = redis.call('XAUTOCLAIM', KEYS[qi], group, consumer, min_idle_ms, cursors[qi], 'COUNT', budget)
    cursors[qi] = r[1]
    for _, e in ipairs(r[2]) do
      if type(e) == 'table' and type(e[2]) == 'table' then
        take(qi, e[1], e[2])
      elseif type(e) == 'table' then
        redis.call('XACK', KEYS[qi], group, e[1])  -- Redis 6.2 returns deleted entries with nil fields
      end
    end
  end
end
for qi = first_queue, last_queue do
  if budget <= 0 then break end
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', budget, 'STREAMS', KEYS[qi], '>')
  if r then
    for _, e in ipairs(r[1][2]) do take(qi, e[1], e[2]) end
  end
end
return {cursors[1], cursors[2], cursors[3], out}
"""
)

# The names, then per item: id, epoch, seq, n events, events..., ending, n dead fields, dead fields...
# `ending` is 0 unless the last event is terminal, else its outcome for a batch line (producer.batches.ledger).
# Returns {statuses (0 written, 1 already written by an earlier try, 2 lost), lost ids, ids to cancel,
# how many of the lost were found rolled back (below)}.
#
# Redis that forgets acknowledged writes (restarted from an AOF that lagged, a failover to a replica that
# had not caught up) shows up here as a claim record older than the worker's: a lower seq (events this
# claim wrote are gone from the result stream), a lower epoch (the claim itself is gone), or the same
# epoch under another owner (the request was claimed again after the claim was forgotten). None of that
# happens otherwise. The stream may then lack events a client already saw, so the script never writes
# on top of it: a running claim is forfeited (owner cleared, entry handed back as long idle), and the
# next claim starts the request over with a `restart`; a request no longer claimed gets the `restart`
# now, ahead of whatever its next claim writes.
PUBLISH_ARGV = Argv(
    ("group", "consumer", "req_prefix", "res_prefix", "ttl", "dead_maxlen", "restart_payload", "n_items"),
    numbers=frozenset({"n_items"}),
)
PUBLISH = PUBLISH_ARGV.script(
    JOB_LUA
    + """
local queues = $queues
local statuses, lost, cancelled = {}, {}, {}
local to_ack = $to_ack
local rolled_back = 0
local i = $tail
for n = 1, n_items do
  local id, epoch, seq, n_events = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local first_event = i + 4
  local ending = ARGV[first_event + n_events]
  local terminal = ending ~= '0'
  local n_dead = tonumber(ARGV[first_event + n_events + 1])
  local first_dead = first_event + n_events + 2
  i = first_dead + n_dead
  local meta = req_prefix .. id
  local m = redis.call('HMGET', meta, 'epoch', 'state', 'seq', 'prio', 'entry', 'worker')
  local status = 0
  local ours = m[1] == epoch and m[6] == consumer
  if ours and tonumber(m[3] or '0') > seq then
    status = 1
  elseif m[2] and m[2] ~= 'done' and (tonumber(m[1]) or 0) <= tonumber(epoch)
      and not (ours and tonumber(m[3] or '0') == seq) then
    status, rolled_back = 2, rolled_back + 1
    if m[2] == 'running' then
      redis.call('HSET', meta, 'worker', '')  -- fences out whoever holds it now, this worker included
      if queues[m[4]] and m[5] then
        redis.call('XCLAIM', queues[m[4]], group, consumer, 0, m[5], 'IDLE', 1000000000000, 'JUSTID')
      end
    else
      redis.call('XADD', res_prefix .. id, '*', 'm', restart_payload)
      redis.call('EXPIRE', res_prefix .. id, ttl)
    end
  elseif not ours or m[2] ~= 'running' then
    status = 2
  else
    local result = res_prefix .. id
    for e = first_event, first_event + n_events - 1 do redis.call('XADD', result, '*', 'm', ARGV[e]) end
    if seq == 0 or terminal then redis.call('EXPIRE', result, ttl) end  -- the TTL runs from the end
    if not terminal then
      redis.call('HSET', meta, 'seq', seq + 1)
    else
      -- the terminal event and the ack land in one script: never acked without it, never written twice
      redis.call('HSET', meta, 'seq', seq + 1, 'state', 'done')
      job_end(meta, ARGV[first_event + n_events - 1], ending)
      local acks = to_ack[m[4]]
      if acks and m[5] then acks[#acks + 1] = m[5] end
      if n_dead > 0 then
        redis.call('XADD', KEYS[4], 'MAXLEN', '~', dead_maxlen, '*', unpack(ARGV, first_dead, first_dead + n_dead - 1))
      end
    end
  end
  statuses[n] = status
  if status == 2 then lost[#lost + 1] = id end
end
for prio, ids in pairs(to_ack) do
  if #ids > 0 then
    redis.call('XACK', queues[prio], group, unpack(ids))
    redis.call('XDEL', queues[prio], unpack(ids))
  end
end
-- cancellations: O(requests being cancelled), not O(requests held)
cancelled = redis.call('SPOP', KEYS[6], 1000)
return {statuses, lost, cancelled, rolled_back}
""",
    queues=priority_table(lambda i: f"KEYS[{i}]"),
    to_ack=priority_table(lambda i: "{}"),
)

# The names, then (id, epoch, queue index, entry) quads.
# Keeps this worker's entries fresh (idle 0) so no one takes them over; returns the ids it lost. The
# heartbeat payload is written to KEYS[5] unless empty (partitions other than 0 carry none).
HEARTBEAT_ARGV = Argv(("group", "consumer", "req_prefix", "ttl", "heartbeat"))
HEARTBEAT = HEARTBEAT_ARGV.script("""
local lost = {}
for i = $tail, #ARGV, 4 do
  local meta = req_prefix .. ARGV[i]
  local m = redis.call('HMGET', meta, 'epoch', 'worker')
  if m[1] == ARGV[i + 1] and m[2] == consumer then
    redis.call('XCLAIM', KEYS[tonumber(ARGV[i + 2])], group, consumer, 0, ARGV[i + 3], 'JUSTID')
    redis.call('EXPIRE', meta, ttl)
  else
    lost[#lost + 1] = ARGV[i]
  end
end
if heartbeat ~= '' then redis.call('HSET', KEYS[5], consumer, heartbeat) end
return lost
""")

# The names, then (id, epoch, queue index, entry) quads.
# Marks still-owned entries as long idle, so the next XAUTOCLAIM of any live worker takes them.
HAND_BACK_ARGV = Argv(("group", "consumer", "req_prefix"))
HAND_BACK = HAND_BACK_ARGV.script("""
local n = 0
for i = $tail, #ARGV, 4 do
  local m = redis.call('HMGET', req_prefix .. ARGV[i], 'epoch', 'worker')
  if m[1] == ARGV[i + 1] and m[2] == consumer then
    redis.call('XCLAIM', KEYS[tonumber(ARGV[i + 2])], group, consumer, 0, ARGV[i + 3], 'IDLE', 1000000000000,
               'JUSTID')
    n = n + 1
  end
end
return n
""")
