-- One peer-quality report, atomically (tracker.swarm_redis.RedisSwarm): the replay guard, then
-- per entry the same arithmetic as tracker.core.update_quality and quality_score (the tests
-- check the two agree). Loaded once at start. ARGV: 1 prefix, 2 reporter, 3 replay window,
-- 4 digest, 5 reporters that flag a peer, 6 rate at which speed is one half, 7 now, then five
-- per entry: node, bytes, rate, failures, corrupt. Returns 0 for a replay, else 1.
local P = ARGV[1]
local reporter = ARGV[2]
local window = tonumber(ARGV[3])
local flag_at, rate_half = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = ARGV[7]
if not redis.call('SET', P .. 'seen:' .. ARGV[4], '1', 'NX', 'EX', window) then
  return 0
end
local i = 8
while i <= #ARGV do
  local node = ARGV[i]
  local nbytes, rate = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local failures, corrupt = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  i = i + 5
  local q = P .. 'q:' .. node
  local cur = redis.call('HMGET', q, 'mib', 'failures', 'corrupt', 'rate', 'reports', 'cr')
  local mib = (tonumber(cur[1]) or 0) + nbytes / 1048576
  local f = (tonumber(cur[2]) or 0) + failures
  local c = (tonumber(cur[3]) or 0) + corrupt
  local r = tonumber(cur[4]) or 0
  if nbytes > 0 and rate > 0 then
    if r <= 0 then r = rate else r = 0.7 * r + 0.3 * rate end
  end
  local reports = (tonumber(cur[5]) or 0) + 1
  local cr = tonumber(cur[6]) or 0
  if corrupt > 0 and redis.call('SADD', P .. 'qc:' .. node, reporter) == 1 then cr = cr + 1 end
  redis.call('HSET', q, 'mib', tostring(mib), 'failures', f, 'corrupt', c,
             'rate', tostring(r), 'reports', reports, 'cr', cr)
  local score = 0
  if cr >= flag_at then
    redis.call('HSETNX', P .. 'flagged', node, now)
  else
    local rel = (1 + mib) / (2 + mib + f + 16 * c)
    local speed = 0.5
    if r > 0 then speed = r / (r + rate_half) end
    score = 0.7 * rel + 0.3 * speed
  end
  redis.call('HSET', P .. 'qs', node, tostring(score))
end
return 1
