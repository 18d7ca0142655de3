-- One announce, atomically (tracker.swarm_redis.RedisSwarm): the replay guard, expiry of a
-- bounded batch of dead members, the release counters, the member's entry, and the ranked
-- answer. Loaded once at start. ARGV (see RedisSwarm._announce_args): 1 prefix, 2 node,
-- 3 manifest, 4 app, 5 now, 6 expiry, 7 event, 8 left, 9 from_peers, 10 from_cdn,
-- 11 uploaded, 12 peer JSON, 13 numwant, 14 candidates per swarm, 15 partial swarms,
-- 16 replay window, 17 digest, 18 "<left> <answer fragment>", 19 unknown score, 20 port,
-- 21 how long a build's set of completed nodes outlives its latest completion (seconds).
-- Returns false for a replay, else {seeders, leechers, fragment, score, fragment, score, ...}.
local P = ARGV[1]
local node, mid, app = ARGV[2], ARGV[3], ARGV[4]
local now, expiry = tonumber(ARGV[5]), tonumber(ARGV[6])
local event = ARGV[7]
local left, fp = tonumber(ARGV[8]), tonumber(ARGV[9])
local fc, up = tonumber(ARGV[10]), tonumber(ARGV[11])
local info = ARGV[12]
local want = tonumber(ARGV[13])
local limit, partial = tonumber(ARGV[14]), tonumber(ARGV[15])
local window = tonumber(ARGV[16])
if not redis.call('SET', P .. 'seen:' .. ARGV[17], '1', 'NX', 'EX', window) then
  return false
end
local sw, seeds, pi = P .. 'sw:' .. mid, P .. 'seeds:' .. mid, P .. 'pi:' .. mid
local rel = P .. 'rel:' .. mid
-- expire a bounded batch of dead members of this swarm
local dead = redis.call('ZRANGEBYSCORE', sw, '-inf', now, 'LIMIT', 0, 100)
local pj = P .. 'pj:' .. mid
for _, d in ipairs(dead) do
  redis.call('ZREM', sw, d); redis.call('ZREM', seeds, d); redis.call('HDEL', pi, d)
  redis.call('HDEL', pj, d)
end
local old = nil
local raw = redis.call('HGET', pi, node)
if raw then old = cjson.decode(raw) end
local ofp, ofc, oup = 0, 0, 0
if old then ofp, ofc, oup = old['fp'], old['fc'], old['up'] end
-- a node's completion of a build counts once, whatever its earlier announces said of left
local completed = 0
if event == 'completed' then
  local done = P .. 'done:' .. mid
  completed = redis.call('SADD', done, node)
  redis.call('EXPIRE', done, ARGV[21])
end
redis.call('HSET', P .. 'releases', mid, app)
if fp > ofp then redis.call('HINCRBY', rel, 'from_peers', fp - ofp) end
if fc > ofc then redis.call('HINCRBY', rel, 'from_cdn', fc - ofc) end
if up > oup then redis.call('HINCRBY', rel, 'uploaded', up - oup) end
redis.call('HINCRBY', rel, 'completed', completed)
if completed == 1 then
  redis.call('HINCRBY', P .. 'adopt:' .. mid, tostring(math.floor(now / 60)), 1)
end
if event == 'stopped' then
  redis.call('ZREM', sw, node); redis.call('ZREM', seeds, node); redis.call('HDEL', pi, node)
  redis.call('HDEL', pj, node)
else
  local d = cjson.decode(info)
  d['fp'] = math.max(fp, ofp); d['fc'] = math.max(fc, ofc); d['up'] = math.max(up, oup)
  redis.call('HSET', pi, node, cjson.encode(d))
  if tonumber(ARGV[20]) > 0 then
    redis.call('HSET', pj, node, ARGV[18])
  else
    redis.call('HDEL', pj, node)  -- it does not serve: counted, never handed out
  end
  redis.call('ZADD', sw, expiry, node)
  if left == 0 then redis.call('ZADD', seeds, expiry, node) else redis.call('ZREM', seeds, node) end
  redis.call('ZADD', P .. 'appm:' .. app, now, mid)
end
local live = redis.call('ZCOUNT', sw, '(' .. now, '+inf')
local nseeds = redis.call('ZCOUNT', seeds, '(' .. now, '+inf')
local out = {nseeds, live - nseeds}
if want == 0 then return out end
-- Candidates, one per node (its entry in the requested build wins: that swarm is collected
-- first), never the announcer, never a flagged node (score "0"); ranked as core.rank_peers
-- does, and only the answer goes back: fragment and score string per peer.
local unknown = tonumber(ARGV[19])
local seen, cands = {}, {}
local function collect(m)
  local members = redis.call('ZREVRANGEBYSCORE', P .. 'sw:' .. m, '+inf', now, 'LIMIT', 0, limit)
  if #members == 0 then return 0 end
  local infos = redis.call('HMGET', P .. 'pj:' .. m, unpack(members))
  local scores = redis.call('HMGET', P .. 'qs', unpack(members))
  local usable = 0
  for i, n in ipairs(members) do
    local v, s = infos[i], scores[i]
    if v and n ~= node and s ~= '0' then
      usable = usable + 1
      if not seen[n] then
        seen[n] = true
        local sp = string.find(v, ' ', 1, true)
        cands[#cands + 1] = {
          own = (m == mid), score = (s and tonumber(s)) or unknown, raw = s or '',
          left = tonumber(string.sub(v, 1, sp - 1)), node = n, frag = string.sub(v, sp + 1)
        }
      end
    end
  end
  return usable
end
-- the build's own swarm comes first in answers: partial seeds only when it cannot fill one
if collect(mid) < want then
  local others = redis.call('ZREVRANGEBYSCORE', P .. 'appm:' .. app, '+inf', now - 3600,
                            'LIMIT', 0, partial + 1)
  for _, m in ipairs(others) do
    if m ~= mid then collect(m) end
  end
end
table.sort(cands, function(x, y)
  if x.own ~= y.own then return x.own end
  if x.score ~= y.score then return x.score > y.score end
  if x.left ~= y.left then return x.left < y.left end
  return x.node < y.node
end)
for k = 1, math.min(want, #cands) do
  out[#out + 1] = cands[k].frag; out[#out + 1] = cands[k].raw
end
return out
