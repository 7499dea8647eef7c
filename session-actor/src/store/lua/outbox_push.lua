-- Appends deliveries to a domain's outbox stream, dropping any (session, recipient, seq)
-- already there, so a receiver sees each message once even when a session redelivers after a
-- crash.
-- KEYS[1] outbox stream, KEYS[2] hash "<session>/<recipient>" -> last seq
-- ARGV[1] approximate max length; then ("<session>/<recipient>", seq, payload) triples.
local added = 0
for i = 2, #ARGV, 3 do
  local last = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > last then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i + 2])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    added = added + 1
  end
end
return added
