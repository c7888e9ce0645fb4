"""The FileStore's Lua scripts: each touches one file's two keys (one slot), or the index alone.

KEYS of the file scripts: the object hash, then the content string. Their ARGV are named in the `*_ARGV`
tables (producer.lua).
"""

from __future__ import annotations

from producer.lua import Argv

# Claims the content key for a new upload. 'exists': the file is there; 'busy': another upload writes it.
BEGIN_ARGV = Argv(("ttl",))
BEGIN = BEGIN_ARGV.script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
if not redis.call('SET', KEYS[2], '', 'NX', 'EX', ttl) then return 'busy' end
return 'ok'
""")

# Writes the object (field/value pairs after the names) once the content holds exactly `size` bytes, and
# gives both keys the file's TTL. 0: the content is gone (it expired while the upload stalled).
COMMIT_ARGV = Argv(("ttl", "size"), numbers=frozenset({"size"}))
COMMIT = COMMIT_ARGV.script("""
if redis.call('EXISTS', KEYS[2]) == 0 or redis.call('STRLEN', KEYS[2]) ~= size then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, $tail))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return 1
""")

# Deletes the file if `owner` owns it: 1 deleted, 0 not there (or another's).
DELETE_ARGV = Argv(("owner",))
DELETE = DELETE_ARGV.script("""
if redis.call('HGET', KEYS[1], 'owner') ~= owner then return 0 end
redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])  -- one key a call: ACL selectors grant a command on each key kind apart
return 1
""")

# KEYS: the index. Up to `count` members after `after` (all from the start when it is ''), newest first when
# rev is 1, with their scores. A cursor that left the index is placed by `score` when given (listing reads on
# from where its last page ended even if that file was deleted meanwhile); without one the answer is nil.
PAGE_ARGV = Argv(("after", "score", "count", "rev"), numbers=frozenset({"count"}))
PAGE = PAGE_ARGV.script("""
local start = 0
if after ~= '' then
  local rank
  if rev == '1' then rank = redis.call('ZREVRANK', KEYS[1], after) else rank = redis.call('ZRANK', KEYS[1], after) end
  if rank then
    start = rank + 1
  elseif score == '' then
    return false
  else
    -- members of equal score sort by name: count those that come before `after` in this order
    if rev == '1' then
      start = redis.call('ZCOUNT', KEYS[1], '(' .. score, '+inf')
    else
      start = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. score)
    end
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], score, score)) do
      if (rev == '1' and member > after) or (rev ~= '1' and member < after) then start = start + 1 end
    end
  end
end
if rev == '1' then
  return redis.call('ZREVRANGE', KEYS[1], start, start + count - 1, 'WITHSCORES')
end
return redis.call('ZRANGE', KEYS[1], start, start + count - 1, 'WITHSCORES')
""")
