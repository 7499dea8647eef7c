-- Persists delivery progress for one session, fenced by the owner epoch.
-- KEYS[1] meta hash, KEYS[2] journal stream, KEYS[3] id map hash
-- ARGV[1] owner epoch, ARGV[2] trim-through seq (0: none), ARGV[3] number of cursors,
-- then that many (recipient key, seq) pairs, then (id map field, value) pairs.
local cur = redis.call('HGET', KEYS[1], 'epoch')
if cur ~= ARGV[1] then
  return {'fenced', cur or '0'}
end
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  local f = 'c:' .. ARGV[i]
  local old = tonumber(redis.call('HGET', KEYS[1], f) or '0')
  if tonumber(ARGV[i + 1]) > old then
    redis.call('HSET', KEYS[1], f, ARGV[i + 1])
  end
  i = i + 2
end
while i < #ARGV do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local trim = tonumber(ARGV[2])
if trim > 0 then
  redis.call('XTRIM', KEYS[2], 'MINID', '0-' .. (trim + 1))
end
return {'ok'}
