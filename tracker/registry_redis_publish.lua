-- ARGV: app, channel, mid, build, version, size, signed, at, actor, keep, release JSON
-- Run after registry_redis_move.lua (prepended at load), which defines newer() and move().
local app, channel, mid, build = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('HEXISTS', KEYS[1], app) == 0 then return {'noapp'} end
local maxb = redis.call('HGET', KEYS[2], 'max_build')
if maxb and not newer(build, maxb) then return {'old', maxb} end
if redis.call('EXISTS', KEYS[5]) == 0 then
  redis.call('HSET', KEYS[5], 'app', app, 'build', build, 'version', ARGV[5], 'size', ARGV[6],
             'signed', ARGV[7], 'uploaded', ARGV[8])
  redis.call('HSET', KEYS[6], mid, ARGV[11])
end
return move(channel, mid, build, ARGV[5], 'publish', ARGV[8], ARGV[9], tonumber(ARGV[10]))
