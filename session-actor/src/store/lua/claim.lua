-- Takes ownership of a session: raises the epoch and returns what the new owner resumes from.
-- KEYS[1] meta hash, KEYS[2] journal stream
-- Returns {epoch, {meta field, value, ...}, {payload, ...}}
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local meta = redis.call('HGETALL', KEYS[1])
local entries = redis.call('XRANGE', KEYS[2], '-', '+')
local payloads = {}
for i, e in ipairs(entries) do
  payloads[i] = e[2][2]
end
return {epoch, meta, payloads}
