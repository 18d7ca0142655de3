-- Shared by the publish and move scripts. KEYS: 1 apps, 2 ch, 3 chs, 4 h, 5 m, 6 releases,
-- 7 seq, 8 ver. Builds travel as decimal strings: `newer` compares them exactly.
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local function move(channel, mid, build, version, action, at, actor, keep)
  local seq = redis.call('INCR', KEYS[7])
  local ev = cjson.encode({seq = seq, manifest_id = mid, action = action, at = at,
                          actor = actor, build = build, version = version})
  redis.call('LPUSH', KEYS[4], ev)
  redis.call('LTRIM', KEYS[4], 0, keep - 1)
  local maxb = redis.call('HGET', KEYS[2], 'max_build')
  if not maxb or newer(build, maxb) then maxb = build end
  redis.call('HSET', KEYS[2], 'seq', seq, 'mid', mid, 'build', build, 'version', version,
             'at', at, 'max_build', maxb)
  redis.call('SADD', KEYS[3], channel)
  local ver = redis.call('INCR', KEYS[8])
  return {'ok', seq, ver}
end
