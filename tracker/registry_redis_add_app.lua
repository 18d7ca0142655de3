-- KEYS: 1 apps, 2 ver. ARGV: app, row JSON.
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('INCR', KEYS[2])
return 1
