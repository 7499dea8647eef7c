-- Dedup + epoch check + append, atomically, on one session's keys (one Redis Cluster slot).
-- KEYS[1] meta hash, KEYS[2] journal stream, KEYS[3] id map hash
-- ARGV[1] owner epoch, ARGV[2] seq, ARGV[3] relay id, ARGV[4] encoded envelope,
-- ARGV[5] origin native-id field ('' when the origin gave no id), ARGV[6] relay-id field,
-- ARGV[7] origin native id, ARGV[8] sender field, ARGV[9] sender
local cur = redis.call('HGET', KEYS[1], 'epoch')
if cur ~= ARGV[1] then
  return {'fenced', cur or '0'}
end
if ARGV[5] ~= '' then
  local prev = redis.call('HGET', KEYS[3], ARGV[5])
  if prev then
    return {'dup', prev}
  end
end
local last = redis.call('HGET', KEYS[1], 'seq') or '0'
if tonumber(last) + 1 ~= tonumber(ARGV[2]) then
  return {'step', last}
end
redis.call('XADD', KEYS[2], '0-' .. ARGV[2], 'e', ARGV[4])
redis.call('HSET', KEYS[1], 'seq', ARGV[2])
redis.call('HSET', KEYS[3], ARGV[8], ARGV[9])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[2] .. ':' .. ARGV[3], ARGV[6], ARGV[7])
end
return {'ok'}
