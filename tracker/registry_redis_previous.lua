-- KEYS: 1 ch, 2 h. The newest event whose manifest differs from the head's.
local head = redis.call('HGET', KEYS[1], 'mid')
if not head then return false end
local n = redis.call('LLEN', KEYS[2])
for i = 0, n - 1, 100 do
  for _, e in ipairs(redis.call('LRANGE', KEYS[2], i, i + 99)) do
    local m = cjson.decode(e)['manifest_id']
    if m ~= head then return m end
  end
end
return false
