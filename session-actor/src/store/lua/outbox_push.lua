-- Appends deliveries to a domain's outbox stream, dropping any (session, recipient, seq)
-- already there, so a receiver sees each message once even when a session redelivers after a
-- crash; then trims the stream to its capacity, remembering the newest id trimmed so a
-- receiver resuming before it is told of the gap.
-- KEYS[1] outbox stream, KEYS[2] hash "<session>/<recipient>" -> last seq, and
--         '~dropped' -> newest trimmed id
-- ARGV[1] capacity, ARGV[2] notification channel, ARGV[3] domain; then
-- ("<session>/<recipient>", seq, payload) triples. When anything was added, the domain is
-- published on the channel so every node's streams of it wake up.
local added = 0
for i = 4, #ARGV, 3 do
  local last = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > last then
    redis.call('XADD', KEYS[1], '*', 'e', ARGV[i + 2])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    added = added + 1
  end
end
local over = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[1])
if over > 0 then
  local old = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', over)
  for _, e in ipairs(old) do
    redis.call('XDEL', KEYS[1], e[1])
  end
  redis.call('HSET', KEYS[2], '~dropped', old[#old][1])
end
if added > 0 then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return added
