-- ARGV: app, channel, mid, action, at, actor, keep
-- Run after registry_redis_move.lua (prepended at load), which defines newer() and move().
local info = redis.call('HMGET', KEYS[5], 'app', 'build', 'version')
if not info[1] or info[1] ~= ARGV[1] then return {'unknown'} end
return move(ARGV[2], ARGV[3], info[2], info[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]))
