"""The Redis data model: every key and every state transition of distcomp lives in this file.

Keys (``P`` is the namespace prefix, default ``distcomp``)::

    P:seq              counter giving each task its FIFO position
    P:t:<id>           hash: one task (its spec, state, attempt, result)
    P:q:<bucket>       zset: todo tasks of one resource class, score = -priority*2^32 + seq
    P:buckets          set: resource classes whose P:q:<bucket> may be non-empty
    P:s:running        zset: running task ids by start time   (for listing)
    P:s:finished       zset: finished task ids by end time
    P:s:failed         zset: failed task ids by end time
    P:run:<worker>     set: ids running on that worker
    P:counts           hash: todo/running/finished/failed counts (O(1) status)
    P:workers          set: every worker name ever registered
    P:w:<worker>       hash: the worker's identity, capacity and last reported load
    P:lease:<worker>   string with a TTL: the worker's liveness lease (value = instance token)
    P:leases           zset: worker -> lease deadline (ms, Redis clock), so the reaper only
                       looks at leases that may have expired instead of at every worker
    P:beat             string: time (ms) a worker was last heard from (its reap), to the second,
                       or the end of the last silence given back to the leases
    P:quiet            string: half the longest lease term (ms, at least 2 s): a time without
                       any worker's reap longer than that gives the leases it back (``reap``)
    P:out:<worker>     set: ids of tasks whose outcome that worker reported, until it says it
                       renamed their output files (see ``outputs``)
    P:left:<worker>    hash: a dead worker's chores (see ``reap``): ``dir`` (its results
                       directory) and ``host`` while not taken over, and per requeued task
                       id "attempt[ pid pstart]"
    P:chores:dir:<d>   set: dead workers whose files in results directory d no worker has
                       taken over yet
    P:chores:host:<h>  set: dead workers whose task processes on host h no worker has taken
                       over yet (both indexes keep a reap from reading other hosts' chores)
    P:cancel           set: running ids whose workers must kill them
    P:stop             string: time of the last stop-workers request
    P:wake             pub/sub channel: a notice each time a script makes tasks claimable
                       (submit, retry, requeue, eviction, retryable failure, reaper), so
                       idle workers claim at once instead of at their next poll
    P:drained          pub/sub channel: a notice when a script leaves nothing todo or
                       running, so ``distcomp wait`` returns at once
    P:req:<id>         string with a TTL: the reply of one submit chunk, cancel, retry or
                       requeue of a worker, for a resend of the same request (ten minutes)

Task states are ``todo``, ``running`` (with ``worker`` and ``attempt``), ``finished`` and
``failed``. Every transition is one Lua script, so it is atomic and a concurrent reader never
sees a task in two places or in none. A running task can only be reported by the worker and
attempt that claimed it (fencing): a late report from a taken-over attempt is rejected.

Claims are bounded: todo tasks are bucketed by resource class (memory and cores, in powers of
two), each bucket ordered by priority then FIFO. A claim looks at the head (plus a short
look-ahead) of each bucket whose class can fit, so its cost depends on the number of resource
classes, not on the number of queued tasks. The scripts build key names from the prefix inside
Lua, which standalone Redis allows; distcomp does not support Redis Cluster.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from .redis_client import Pipeline, Redis
from .spec import TaskSpec

SUBMIT_CHUNK = 1000
CLAIM_LOOKAHEAD = 16
# Tasks a claim reads past per bucket that this worker failed in the avoid window (``_CLAIM``).
CLAIM_AVOID_BUDGET = 256
# Seconds a task may be passed over for smaller ones that fit before a worker that could run it
# stops taking those and waits for room for it (``_CLAIM``, ``reserved_by``).
CLAIM_RESERVE_AFTER_S = 300.0
# Seconds a reserving worker may have nothing running and still no room before it gives the
# reservation up: its first claim after its last task ended may see memory measured before.
CLAIM_DRAINED_S = 2.0
# Seconds since its last claim after which a worker's reservation no longer holds others back.
RESERVATION_FRESH_S = 60.0
# Seconds a worker may hold a reservation without taking the task before another worker that
# passes the task over may take the reservation over (one kept busy by better tasks).
RESERVATION_HOLD_S = 600.0
STATES = ("todo", "running", "finished", "failed")
# A task id (spec.TaskSpec.id); SCAN also meets P:t:... keys of a namespace named P:t.
_TASK_ID = re.compile(r"[0-9a-f]{16}")

_LUA_COMMON = r"""
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Seconds, as the clients send ``now``: for the scripts no client hands a time to.
local function now_s()
  local t = redis.call('TIME')
  return t[1] .. string.format('.%06d', tonumber(t[2]))
end
-- The earliest deadline (ms) of a lease that holds: now or, after a silence longer than
-- P:quiet that no reap has given back to the leases yet (``_REAP``), just after the silence
-- began. Read as the deadlines alone, every lease looked expired after an outage of Redis,
-- until the first reap.
local function lease_floor()
  local times = redis.call('MGET', P .. ':beat', P .. ':quiet')
  local last, quiet, now = tonumber(times[1]), tonumber(times[2]), now_ms()
  if last and quiet and now - last > quiet then return last + 1 end
  return now
end
local function live_leases()
  return redis.call('ZRANGEBYSCORE', P .. ':leases', lease_floor(), '+inf')
end
-- Worker w no longer reserves task id (``_CLAIM``): neither names the other.
local function drop_reservation(w, id)
  redis.call('HDEL', P .. ':w:' .. w, 'reserving', 'drained_at', 'reserving_at', 'reserved_at')
  if redis.call('HGET', P .. ':t:' .. id, 'reserved_by') == w then
    redis.call('HDEL', P .. ':t:' .. id, 'reserved_by')
  end
end
local function touch_lease(worker, token, ttl_ms)
  redis.call('SET', P .. ':lease:' .. worker, token, 'PX', ttl_ms)
  redis.call('ZADD', P .. ':leases', now_ms() + tonumber(ttl_ms), worker)
end
local function bucket_of(mem_mb, cpu)
  local m, v = 0, 1
  while v < mem_mb do v = v * 2; m = m + 1 end
  local q = math.ceil(cpu * 4 - 1e-9)
  local c, w = 0, 1
  while w < q do w = w * 2; c = c + 1 end
  if q == 0 then c = -1 end
  return 'm' .. m .. 'c' .. c
end
-- Idle workers wait on P:wake rather than polling fast: one notice per script run, however
-- many tasks it made claimable. A notice carries nothing; a worker that hears it claims. pcall:
-- an ACL user without access to channels (Redis 7 gives new users none by default) still
-- submits and reports; its workers find new tasks by polling instead.
local noticed = false
local function notify()
  if not noticed then
    redis.pcall('PUBLISH', P .. ':wake', '')
    noticed = true
  end
end
local function to_todo(id, tkey)
  notify()
  local f = redis.call('HMGET', tkey, 'req_mem', 'cpu', 'score')
  local b = bucket_of(tonumber(f[1]), tonumber(f[2]))
  redis.call('ZADD', P .. ':q:' .. b, f[3], id)
  redis.call('SADD', P .. ':buckets', b)
  redis.call('HSET', tkey, 'state', 'todo', 'worker', '')
  redis.call('HINCRBY', P .. ':counts', 'todo', 1)
end
local function leave_running(id, worker)
  redis.call('SREM', P .. ':run:' .. worker, id)
  redis.call('ZREM', P .. ':s:running', id)
  redis.call('HINCRBY', P .. ':counts', 'running', -1)
end
-- After a task settled (finished or failed for good): tell waiters when nothing is left.
local function announce_if_drained()
  local c = redis.call('HMGET', P .. ':counts', 'todo', 'running')
  if (tonumber(c[1]) or 0) <= 0 and (tonumber(c[2]) or 0) <= 0 then
    redis.pcall('PUBLISH', P .. ':drained', '')
  end
end
local function to_failed(id, tkey, now)
  redis.call('HSET', tkey, 'state', 'failed')
  redis.call('ZADD', P .. ':s:failed', now, id)
  redis.call('HINCRBY', P .. ':counts', 'failed', 1)
  announce_if_drained()
end
-- A running task leaves running, but not for good: back to todo, unless the user cancelled it
-- while it ran (the flag is taken here). Then it fails as cancelled, so that no eviction,
-- retryable failure, requeue or reaper undoes a cancel. ``reason`` nil keeps the one recorded.
-- Returns 2 put back in todo, 1 failed for good.
local function take_cancel(id)
  return redis.call('SREM', P .. ':cancel', id) == 1
end
local function unrun(id, tkey, cancelled, reason, now)
  if cancelled then
    redis.call('HSET', tkey, 'reason', 'cancelled', 'ended', now)
    to_failed(id, tkey, now)
    return 1
  end
  if reason then redis.call('HSET', tkey, 'reason', reason) end
  to_todo(id, tkey)
  return 2
end
-- Every task the queue lists as running on ``worker`` leaves it, as ``unrun`` says.
local function unrun_worker(worker, reason)
  local ids, now = redis.call('SMEMBERS', P .. ':run:' .. worker), now_s()
  for _, id in ipairs(ids) do
    leave_running(id, worker)
    unrun(id, P .. ':t:' .. id, take_cancel(id), reason, now)
  end
  return #ids
end
-- The client sends a request again when the connection broke, and Redis may have run it the
-- first time. Submit, cancel, retry and requeue of a worker carry a request id and keep their
-- reply under it for a while: a resend gets the first reply (what was added, cancelled,
-- retried, requeued) and changes nothing.
-- The client resends within seconds (redis_client.Redis.exchange); ten minutes is ample.
local function first_reply(rid)
  local r = redis.call('GET', P .. ':req:' .. rid)
  if r then return cjson.decode(r) end
end
local function keep_reply(rid, reply)
  redis.call('SET', P .. ':req:' .. rid, cjson.encode(reply), 'PX', 600000)
  return reply
end
local function owned(tkey, worker, attempt)
  local s = redis.call('HMGET', tkey, 'state', 'worker', 'attempt')
  return s[1] == 'running' and s[2] == worker and s[3] == attempt
end
-- A report whose reply was lost is sent again by the worker: answer it with the outcome
-- recorded the first time instead of rejecting it, so the worker keeps the output files. Only
-- digits may follow the prefix: worker 'a', attempt 1 is not the mark 'a#1#2#1' of worker 'a#1'.
local function replayed(tkey, worker, attempt)
  local r = redis.call('HGET', tkey, 'reported')
  local prefix = worker .. '#' .. attempt .. '#'
  if r and string.sub(r, 1, #prefix) == prefix then
    return tonumber(string.match(string.sub(r, #prefix + 1), '^%d+$')) or 0
  end
  return 0
end
local function report_mark(worker, attempt, outcome)
  return worker .. '#' .. attempt .. '#' .. outcome
end
local function reported(tkey, worker, attempt, outcome)
  redis.call('HSET', tkey, 'reported', report_mark(worker, attempt, outcome))
  return outcome
end
-- A report whose outcome is 1 (finished, or failed for good) makes the attempt's files the
-- task's: the worker renames them after this reply and then says so. Until then the task is
-- listed in P:out:<worker>, so that a worker killed in between does not leave the record and
-- the files disagreeing (``pending_outputs``).
local function recorded(tkey, id, worker, attempt, outcome)
  if outcome == 1 then redis.call('SADD', P .. ':out:' .. worker, id) end
  return reported(tkey, worker, attempt, outcome)
end
-- The ids of P:out:<worker> whose recorded outcome is still that worker's report, each with
-- the attempt whose files are to become the task's. A task retried since leaves the set: its
-- files are no longer the outcome's, and a later outcome of this worker adds it again.
local function pending_outputs(worker)
  local out, prefix, okey = {}, worker .. '#', P .. ':out:' .. worker
  for _, id in ipairs(redis.call('SMEMBERS', okey)) do
    local t = redis.call('HMGET', P .. ':t:' .. id, 'state', 'reported')
    local attempt, outcome
    if (t[1] == 'finished' or t[1] == 'failed') and t[2] and
        string.sub(t[2], 1, #prefix) == prefix then
      attempt, outcome = string.match(string.sub(t[2], #prefix + 1), '^(%d+)#(%d+)$')
    end
    if outcome == '1' then
      out[#out + 1] = {id, tonumber(attempt)}
    else
      redis.call('SREM', okey, id)
    end
  end
  return out
end
-- A record (a task's result, a worker's stats) arrives as one JSON object of strings: one
-- argument instead of two per field, because the client spends longer packing arguments than
-- Redis spends storing them.
local function record_fields(json, also)
  local flat = {}
  for k, v in pairs(cjson.decode(json)) do
    flat[#flat + 1] = k
    flat[#flat + 1] = v
  end
  for _, v in ipairs(also) do flat[#flat + 1] = v end
  return flat
end
local function set_record(key, json)
  local flat = record_fields(json, {})
  if #flat > 0 then redis.call('HSET', key, unpack(flat)) end
end
-- The start of every report: fence it, take the task out of running, record the attempt's
-- result (the JSON record in ARGV[record]) and the field/value pairs in ``also`` in one write.
-- Returns the task key and whether the user had cancelled the task (that flag is done with
-- now), or nil and the replayed outcome.
local function settle(id, worker, attempt, record, also)
  local tkey = P .. ':t:' .. id
  if not owned(tkey, worker, attempt) then return nil, replayed(tkey, worker, attempt) end
  leave_running(id, worker)
  local flat = record_fields(ARGV[record], also)
  if #flat > 0 then redis.call('HSET', tkey, unpack(flat)) end
  return tkey, take_cancel(id)
end
"""

# ARGV: P, request id, now, JSON array of 11 string fields per task.
_SUBMIT = _LUA_COMMON + r"""
local rid, now = ARGV[2], ARGV[3]
local first = first_reply(rid)
if first then return first end
-- ARGV[4] is a JSON array of 11 strings per task: one argument per chunk instead of 11 per
-- task, because the client spends more time packing arguments than Redis spends storing them.
local T = cjson.decode(ARGV[4])
local tprefix, qprefix = P .. ':t:', P .. ':q:'
-- Redis does not undo a script that fails half-way, and a task stored but queued nowhere would
-- be lost: every key this chunk writes is checked to be distcomp's (or absent) first.
local function foreign(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' or t == want then return nil end
  return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. t .. ', not distcomp data')
end
for _, k in ipairs({{P .. ':seq', 'string'}, {P .. ':counts', 'hash'}, {P .. ':buckets', 'set'}}) do
  local err = foreign(k[1], k[2])
  if err then return err end
end
-- The resource class of each distinct (memory, cores) pair is worked out once a chunk. The
-- first pass keeps what the second needs (each new task's key and queue), so the writes cost
-- no more than they would in one pass.
local queue_of_class, buckets, new, tkeys, qkeys, existing = {}, {}, {}, {}, {}, 0
for a = 1, #T, 11 do
  local tkey = tprefix .. T[a]
  if redis.call('EXISTS', tkey) == 1 then
    local err = foreign(tkey, 'hash')
    if err then return err end
    existing = existing + 1
  else
    local class = T[a + 3] .. '/' .. T[a + 4]
    local qkey = queue_of_class[class]
    if not qkey then
      local b = bucket_of(tonumber(T[a + 3]), tonumber(T[a + 4]))
      qkey = qprefix .. b
      local err = foreign(qkey, 'zset')
      if err then return err end
      queue_of_class[class] = qkey
      buckets[#buckets + 1] = b
    end
    local n = #new + 1
    new[n], tkeys[n], qkeys[n] = a, tkey, qkey
  end
end
if #new == 0 then return keep_reply(rid, {0, existing}) end
local seq = redis.call('INCRBY', P .. ':seq', #new) - #new
for n, a in ipairs(new) do
  local tkey = tkeys[n]
  seq = seq + 1
  local score = string.format('%.0f', -tonumber(T[a + 2]) * 4294967296 + seq)
  -- Only what is read later is stored (an absent field reads as ''): a million tasks
  -- should cost little memory and little time.
  redis.call('HSET', tkey, 'type', T[a + 1], 'priority', T[a + 2], 'req_mem', T[a + 3],
    'cpu', T[a + 4], 'params', T[a + 5], 'max_retries', T[a + 9], 'score', score,
    'submitted', now, 'dram_gb', T[a + 10], 'state', 'todo')
  if T[a + 6] ~= '' then redis.call('HSET', tkey, 'timeout', T[a + 6]) end
  if T[a + 7] ~= '' then redis.call('HSET', tkey, 'cwd', T[a + 7]) end
  if T[a + 8] ~= '' then redis.call('HSET', tkey, 'env', T[a + 8]) end
  -- What to_todo does, with the fields already at hand and the counter bumped once a chunk.
  redis.call('ZADD', qkeys[n], score, T[a])
end
redis.call('SADD', P .. ':buckets', unpack(buckets))
redis.call('HINCRBY', P .. ':counts', 'todo', #new)
notify()
return keep_reply(rid, {#new, existing})
"""

# ARGV: P, worker, token, now, free_mem_mb, free_cpu, max_n, avoid_window_s, lookahead,
# charges: JSON object, declared min_dram_gb (as stored) -> MiB the worker charges a task that
# declared it, learned from the peaks of such tasks where they were bigger; any other task is
# charged its requirement (its declaration, raised to its peak when it was evicted); avoid
# budget (CLAIM_AVOID_BUDGET); ms a task may be passed over before it is reserved
# (CLAIM_RESERVE_AFTER_S); ms a reserving worker may find itself drained and still short of room
# before it gives the reservation up (CLAIM_DRAINED_S); ms since a worker's last claim after which
# its reservation holds nobody back (RESERVATION_FRESH_S); ms a worker may hold one without taking
# the task before others may take it over (RESERVATION_HOLD_S); sizes: JSON object like charges,
# with each class's learned size unscaled (what a task is reserved by).
#
# Smaller tasks that fit would keep a larger one that does not waiting as long as they come (to
# the end of the bag: the one long task then runs alone). The best task that does not fit now,
# and that this worker could run once its tasks have ended (its registered room and cores), is
# the ``head``: the first claim that passes it over for a worse one marks when
# (``passed_since``); once that is ``reserve_after`` ago, the worker reserves it: the task names
# the worker (``reserved_by``) and the worker the task (``reserving`` in P:w:<worker>), and the
# worker claims nothing scored worse than it until it has taken it. Other workers go on taking
# what fits them, and take the task itself if it fits them first. A reservation holds while both
# name each other, the task is todo and fits the worker's room, and the worker keeps claiming
# (``reserving_at``, renewed by each of its claims, less than ``fresh`` ms old: a worker that
# stopped claiming, draining for a stop or paused by a fault, holds nothing back); otherwise the
# worker drops it at its next claim, and another worker that passes the task over may take it.
# The reserved task is offered to the claim directly once it fits, wherever it is in its bucket.
# A worker that has had nothing running for ``drained`` ms and still lacks the room (memory the
# node uses for other things) gives it up and records the room it had (``no_room_mb``): it
# reserves no task larger than that again. Claiming, cancelling or retrying the task clears its
# fields.
_CLAIM = _LUA_COMMON + r"""
local worker, token, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local free_mem, free_cpu = tonumber(ARGV[5]), tonumber(ARGV[6])
local max_n, avoid_window, lookahead = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local charges, avoid_budget = cjson.decode(ARGV[10]), tonumber(ARGV[11])
local reserve_after, drained, fresh = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local hold, sizes_of = tonumber(ARGV[15]), cjson.decode(ARGV[16])
if redis.call('GET', P .. ':lease:' .. worker) ~= token then return -1 end
local live, sizes = nil, {}
local wkey = P .. ':w:' .. worker
local me = redis.call('HMGET', wkey, 'room_mb', 'cores', 'reserving', 'drained_at', 'no_room_mb')
sizes[worker] = {tonumber(me[1]) or math.huge, tonumber(me[2]) or math.huge}
-- What a task this worker reserves must fit: its registered room, or less once it found that
-- much was all it had with nothing running, until it finds more so.
local reserve_room = math.min(sizes[worker][1], tonumber(me[5]) or math.huge)
if me[5] and free_mem > tonumber(me[5]) and redis.call('SCARD', P .. ':run:' .. worker) == 0 then
  redis.call('HDEL', wkey, 'no_room_mb')
  reserve_room = sizes[worker][1]
end
-- Whether worker w could ever run a task of mem MiB and cpu cores (what it registered; a
-- worker that registered no size could).
local function could_run(w, mem, cpu)
  local size = sizes[w]
  if size == nil then
    local h = redis.call('HMGET', P .. ':w:' .. w, 'room_mb', 'cores')
    size = {tonumber(h[1]) or math.huge, tonumber(h[2]) or math.huge}
    sizes[w] = size
  end
  return mem <= size[1] and cpu <= size[2] + 1e-9
end
-- Another live worker that has not failed the task and could run it: only then is the task
-- left to it for the avoid window. One too small would leave the task waiting the whole window.
local function others_alive(failed_on, mem, cpu)
  if live == nil then live = live_leases() end
  for _, w in ipairs(live) do
    if w ~= worker and not string.find(failed_on, ',' .. w .. ',', 1, true)
        and could_run(w, mem, cpu) then
      return true
    end
  end
  return false
end
-- The failure's time is Redis's (``_FAIL``), so workers' clocks need not agree on it.
local clock = nil
local function avoided(failed_on, last_fail, mem, cpu)
  if not failed_on or not string.find(failed_on, ',' .. worker .. ',', 1, true) then
    return false
  end
  clock = clock or now_ms()
  if clock - tonumber(last_fail) >= avoid_window * 1000 then return false end
  return others_alive(failed_on, mem, cpu)
end
-- A retried task keeps its place, at the head of its bucket: the tasks this worker failed in the
-- avoid window do not count toward the look-ahead, or a few of them would hide every other task
-- of their bucket from it; nor do tasks that need more memory or cores than this worker has at
-- all (a bucket spans sizes up to twice its floor: 16 tasks of 4 GiB at its head hid the 3 GiB
-- ones behind them from a worker with 3.5 GiB, for ever). Up to ``avoid_budget`` of them per
-- bucket are read past in one claim;
-- the run of them at a bucket's head is read once, not again for each task the claim takes: the
-- bucket's reads start after it (``skip``).
local skip, passed = {}, {}
local function charged(f)
  return math.max(tonumber(f[1]), charges[f[10]] or 0), tonumber(f[2])
end
-- A task's size for reservations: what it is charged, but with a class's learned size as it is,
-- not scaled to the room its growth finds beside the running tasks (``sizes_of``).
local function full_size(f)
  return math.max(tonumber(f[1]), sizes_of[f[10]] or charges[f[10]] or 0), tonumber(f[2])
end
local function could_reserve(f)
  local mem, cpu = full_size(f)
  return reserve_room ~= math.huge and mem <= reserve_room and could_run(worker, mem, cpu)
end
-- Whether another worker holds task id reserved: its lease is live, its record names the task,
-- it keeps claiming (``fresh``) and has not held it ``hold`` ms without taking it.
local function held_elsewhere(id, by)
  if not by or by == worker or
      (redis.call('ZSCORE', P .. ':leases', by) or 0) + 0 < lease_floor() then
    return false
  end
  local h = redis.call('HMGET', P .. ':w:' .. by, 'reserving', 'reserving_at', 'reserved_at')
  return h[1] == id and now_ms() - (tonumber(h[2]) or 0) < fresh and
    now_ms() - (tonumber(h[3]) or 0) < hold
end
local TASK_FIELDS = {'req_mem', 'cpu', 'failed_on', 'last_fail', 'type', 'params', 'cwd', 'env',
  'timeout', 'dram_gb', 'passed_since', 'reserved_by', 'state', 'score'}
-- ``bound``: the score of the task reserved here (its fields ``rf``); nothing worse is claimed.
local reserving, bound, rf = me[3], nil, nil
if reserving then
  rf = redis.call('HMGET', P .. ':t:' .. reserving, unpack(TASK_FIELDS))
  local valid = rf[13] == 'todo' and rf[12] == worker and could_run(worker, full_size(rf))
  -- Drained: nothing runs here, and the task still does not fit.
  local empty = false
  if valid then
    local mem, cpu = charged(rf)
    empty = (mem > free_mem or cpu > free_cpu + 1e-9) and
      redis.call('SCARD', P .. ':run:' .. worker) == 0
  end
  if not valid then
    drop_reservation(worker, reserving)
    reserving = nil
  elseif empty and me[4] and now_ms() - tonumber(me[4]) >= drained then
    drop_reservation(worker, reserving)
    redis.call('HSET', wkey, 'no_room_mb', math.floor(free_mem))
    reserve_room = math.min(reserve_room, math.floor(free_mem))
    reserving = nil
  else
    redis.call('HSET', wkey, 'reserving_at', now_ms())
    if empty and not me[4] then
      redis.call('HSET', wkey, 'drained_at', now_ms())
    elseif me[4] and not empty then
      redis.call('HDEL', wkey, 'drained_at')
    end
    bound = tonumber(rf[14])
  end
end
-- Without a reservation: the best task that does not fit now but could run here (see above),
-- among those the claim reads, until one pass over it is counted (``marked``).
local head, head_score, head_f, marked = nil, nil, nil, false
-- Whether a task that does not fit now could be reserved here; if so and it is the best such
-- task yet, it is the head.
local function consider(id, score, f)
  if not could_reserve(f) or held_elsewhere(id, f[12]) then return false end
  if head_score == nil or score < head_score then head, head_score, head_f = id, score, f end
  return true
end
-- A bucket nothing of which fits now: its best task that could be reserved here is considered,
-- read once per claim (a few tasks deep: one this worker avoids or could not reserve, or another
-- worker holds, does not hide the rest).
local tops = {}
local function consider_top(b)
  if tops[b] == nil then
    tops[b] = false
    local page = redis.call('ZRANGE', P .. ':q:' .. b, 0, 3, 'WITHSCORES')
    for i = 1, #page, 2 do
      local f = redis.call('HMGET', P .. ':t:' .. page[i], unpack(TASK_FIELDS))
      if not avoided(f[3], f[4], tonumber(f[1]), tonumber(f[2])) and
          consider(page[i], tonumber(page[i + 1]), f) then
        tops[b] = true
        break
      end
    end
  end
end
-- The best task of bucket b that fits, scored better than ``than`` (nil: any): id, score, the
-- charged memory and cores, and the task's fields.
local function best_of(b, than)
  local qkey, looked, start, head_run = P .. ':q:' .. b, 0, skip[b] or 0, true
  while looked < lookahead do
    local page = redis.call('ZRANGE', qkey, start, start + lookahead - 1, 'WITHSCORES')
    for i = 1, #page, 2 do
      local score = tonumber(page[i + 1])
      if than ~= nil and score >= than then return nil end
      -- Everything the reply needs too, in the same read.
      local f = redis.call('HMGET', P .. ':t:' .. page[i], unpack(TASK_FIELDS))
      local avoid = avoided(f[3], f[4], tonumber(f[1]), tonumber(f[2]))
      local never = not could_run(worker, tonumber(f[1]), tonumber(f[2]))
      if (avoid or never) and (passed[b] or 0) < avoid_budget then
        passed[b] = (passed[b] or 0) + 1
        if head_run then skip[b] = start + (i + 1) / 2 end
      else
        head_run = false
        looked = looked + 1
        local mem, cpu = charged(f)
        if not avoid and mem <= free_mem and cpu <= free_cpu + 1e-9 then
          return page[i], score, mem, cpu, f
        end
        if not avoid and bound == nil and not marked then consider(page[i], score, f) end
      end
      if looked >= lookahead then return nil end
    end
    if #page < 2 * lookahead then return nil end
    start = start + lookahead
  end
end
local buckets = redis.call('SMEMBERS', P .. ':buckets')
local claimed = {}
while #claimed < max_n do
  local best, best_score, best_bucket, best_mem, best_cpu, best_f = nil, nil, nil, 0, 0, nil
  local short = {}
  for _, b in ipairs(buckets) do
    local m, c = string.match(b, '^m(%d+)c(-?%d+)$')
    m, c = tonumber(m), tonumber(c)
    local mem_floor = 0
    if m > 0 then mem_floor = 2 ^ (m - 1) end
    local cpu_floor = 0
    if c > 0 then cpu_floor = 2 ^ (c - 1) / 4 end
    if mem_floor <= free_mem and cpu_floor <= free_cpu + 1e-9 then
      local id, score, mem, cpu, f = best_of(b, best_score)
      if id then
        best, best_score, best_bucket, best_mem, best_cpu, best_f = id, score, b, mem, cpu, f
      end
    else
      short[#short + 1] = b
    end
  end
  -- Buckets nothing of which fits now: their best task may still be the head.
  if best ~= nil and bound == nil and not marked then
    for _, b in ipairs(short) do consider_top(b) end
  end
  if head ~= nil and best ~= nil and best_score > head_score and bound == nil and not marked then
    marked = true
    local hkey = P .. ':t:' .. head
    local since = tonumber(head_f[11])
    if since == nil then
      redis.call('HSET', hkey, 'passed_since', now_ms())
    elseif now_ms() - since >= reserve_after and
        redis.call('SCARD', P .. ':run:' .. worker) > 0 then
      redis.call('HSET', hkey, 'reserved_by', worker)
      redis.call('HSET', wkey, 'reserving', head, 'reserving_at', now_ms(), 'reserved_at', now_ms())
      redis.call('HDEL', wkey, 'drained_at')
      reserving, bound, rf = head, head_score, head_f
    end
  end
  -- Reserved here: nothing worse than it; it, once it fits, wherever it is in its bucket.
  if bound ~= nil and (best == nil or best_score > bound) then
    best = nil
    local mem, cpu = charged(rf)
    if mem <= free_mem and cpu <= free_cpu + 1e-9 then
      best, best_score, best_mem, best_cpu, best_f = reserving, bound, mem, cpu, rf
      best_bucket = bucket_of(tonumber(rf[1]), tonumber(rf[2]))
    end
  end
  if best == nil then break end
  local qkey = P .. ':q:' .. best_bucket
  redis.call('ZREM', qkey, best)
  if redis.call('ZCARD', qkey) == 0 then
    redis.call('SREM', P .. ':buckets', best_bucket)
    for i, b in ipairs(buckets) do if b == best_bucket then table.remove(buckets, i) break end end
  end
  local tkey = P .. ':t:' .. best
  local attempt = redis.call('HINCRBY', tkey, 'attempt', 1)
  redis.call('HSET', tkey, 'state', 'running', 'worker', worker, 'started', ARGV[4])
  if best_f[11] or best_f[12] then redis.call('HDEL', tkey, 'passed_since', 'reserved_by') end
  if best == reserving then
    drop_reservation(worker, best)
    reserving, bound = nil, nil
  end
  -- What the last attempt recorded is not this one's: a running task showed the end, exit
  -- code and peak of the run before it, and a reap before this attempt's annotation read the
  -- old pid as its process. ``reason`` stays: it says why the task runs again.
  if attempt > 1 then
    redis.call('HDEL', tkey, 'ended', 'exit_code', 'wall_s', 'peak_mem', 'host', 'pid', 'pstart',
      'stdout_tail', 'stderr_tail')
  end
  redis.call('SADD', P .. ':run:' .. worker, best)
  redis.call('ZADD', P .. ':s:running', now, best)
  local f = best_f
  for i = 5, 10 do f[i] = f[i] or '' end
  claimed[#claimed + 1] = {best, attempt, f[5], f[6], f[7], f[8], f[9], f[1], f[2], f[10]}
  free_mem = free_mem - best_mem
  free_cpu = free_cpu - best_cpu
end
-- One JSON string rather than nested arrays: the client decodes it in C.
if #claimed == 0 then return '[]' end
redis.call('HINCRBY', P .. ':counts', 'todo', -#claimed)
redis.call('HINCRBY', P .. ':counts', 'running', #claimed)
return cjson.encode(claimed)
"""

# ARGV: P, id, worker, attempt, now, result record (JSON).
_FINISH = _LUA_COMMON + r"""
local id, worker, attempt = ARGV[2], ARGV[3], ARGV[4]
local tkey, replay = settle(id, worker, attempt, 6,
  {'state', 'finished', 'reason', '', 'reported', report_mark(worker, attempt, 1)})
if not tkey then return replay end
redis.call('SADD', P .. ':out:' .. worker, id)
redis.call('ZADD', P .. ':s:finished', ARGV[5], id)
redis.call('HINCRBY', P .. ':counts', 'finished', 1)
announce_if_drained()
return 1
"""

# ARGV: P, id, worker, attempt, now, retryable (1/0), result record (JSON, with reason).
# Returns 0 rejected (fenced), 1 failed for good, 2 put back in todo for a retry.
_FAIL = _LUA_COMMON + r"""
local id, worker, attempt, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local tkey, cancelled = settle(id, worker, attempt, 7, {})
if not tkey then return cancelled end
local failures = redis.call('HINCRBY', tkey, 'failures', 1)
if ARGV[6] == '1' and failures <= tonumber(redis.call('HGET', tkey, 'max_retries')) then
  local failed_on = redis.call('HGET', tkey, 'failed_on') or ','
  if not string.find(failed_on, ',' .. worker .. ',', 1, true) then
    redis.call('HSET', tkey, 'failed_on', failed_on .. worker .. ',')
  end
  redis.call('HSET', tkey, 'last_fail', now_ms())
  return recorded(tkey, id, worker, attempt, unrun(id, tkey, cancelled, nil, now))
end
to_failed(id, tkey, now)
return recorded(tkey, id, worker, attempt, 1)
"""

# ARGV: P, id, worker, attempt, now, peak_mb, budget, reason_requeue, reason_budget, record,
# reason_no_room ('' for the one written here).
# A task requeued with a peak no live worker has room for would wait forever: it fails instead,
# with a reason naming the largest room on offer (each worker registers its ``room_mb``).
_EVICT = _LUA_COMMON + r"""
local id, worker, attempt, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local tkey, cancelled = settle(id, worker, attempt, 10, {})
if not tkey then return cancelled end
local evictions = redis.call('HINCRBY', tkey, 'evictions', 1)
local peak = tonumber(ARGV[6])
if peak > tonumber(redis.call('HGET', tkey, 'req_mem')) then
  redis.call('HSET', tkey, 'req_mem', peak)
end
-- Cancelled meanwhile: that is its outcome, whatever its budget or size would say.
if cancelled then return recorded(tkey, id, worker, attempt, unrun(id, tkey, true, nil, now)) end
if evictions > tonumber(ARGV[7]) then
  redis.call('HSET', tkey, 'reason', ARGV[9])
  to_failed(id, tkey, now)
  return recorded(tkey, id, worker, attempt, 1)
end
-- The reporting worker is alive whatever its lease's deadline says.
local room = tonumber(redis.call('HGET', P .. ':w:' .. worker, 'room_mb')) or 0
for _, w in ipairs(live_leases()) do
  room = math.max(room, tonumber(redis.call('HGET', P .. ':w:' .. w, 'room_mb')) or 0)
end
local need = tonumber(redis.call('HGET', tkey, 'req_mem'))
if need > room then
  if ARGV[11] ~= '' then
    redis.call('HSET', tkey, 'reason', ARGV[11] .. '; no live worker has room for more (largest: ' ..
      room .. ' MiB)')
  else
    redis.call('HSET', tkey, 'reason', 'needs ' .. need .. ' MiB (peak seen when evicted from ' ..
      worker .. '), more than any live worker has room for (largest: ' .. room .. ' MiB)')
  end
  to_failed(id, tkey, now)
  return recorded(tkey, id, worker, attempt, 1)
end
return recorded(tkey, id, worker, attempt, unrun(id, tkey, cancelled, ARGV[8], now))
"""

# ARGV: P, id, worker, attempt, reason. Back to todo without counting a failure or eviction
# (failed as cancelled if the user cancelled it meanwhile).
_REQUEUE = _LUA_COMMON + r"""
local id, worker, attempt = ARGV[2], ARGV[3], ARGV[4]
local tkey = P .. ':t:' .. id
if not owned(tkey, worker, attempt) then return replayed(tkey, worker, attempt) end
leave_running(id, worker)
-- Cancelled meanwhile, it fails (1): the attempt's files become its outcome, as for a report.
return recorded(tkey, id, worker, attempt, unrun(id, tkey, take_cancel(id), ARGV[5], now_s()))
"""

# ARGV: P, request id, worker, reason. Every task running on the worker goes back to todo
# (cancelled ones fail). A resend must not take the tasks the worker claimed meanwhile.
_REQUEUE_WORKER = _LUA_COMMON + r"""
local first = first_reply(ARGV[2])
if first then return first end
return keep_reply(ARGV[2], unrun_worker(ARGV[3], ARGV[4]))
"""

# ARGV: P, the caller's results directory ('' for none), the caller's host ('' for none: not a
# worker).
# Requeue the running tasks of every worker whose lease has expired. Only leases past their
# deadline are looked at, so the cost does not grow with the number of live workers.
# A dead worker leaves two chores, kept in P:left:<worker> whoever reaps it (a worker or a
# `distcomp status`): its files, for a worker of the same results directory (the outcomes it
# recorded but may not have renamed, and what its requeued attempts wrote), and the processes of
# its requeued tasks, for a worker of the same host. Each task's process is read here, in the
# step that requeues it, before a new attempt can annotate its own. A caller is handed every
# chore that is its own, each once, found through the indexes P:chores:dir:<dir> and
# P:chores:host:<host>: the chores of hosts that never run a worker again cost it nothing.
# Returns {requeued, {{worker, id, attempt} to rename}, {{id, attempt} to delete},
#          {{id, pid, pstart} to kill}}.
_REAP = _LUA_COMMON + r"""
local n, now = 0, now_ms()
-- Leases run down only while workers are heard from. Every live worker reaps at each heartbeat
-- (a quarter of its lease term) and P:beat keeps the time (a worker's reap writes it once it is
-- over a second, or a quarter of P:quiet, old, so most reaps of a large cluster write nothing,
-- while a lone worker's reaps, half of P:quiet apart, each write it). No worker's reap for
-- longer than P:quiet (half the longest lease term, at least 2 s) means that no worker could
-- reach Redis: it was down and restarted from disk (Redis keeps absolute expiry times), frozen,
-- or cut off from every worker; or that every worker is gone. The first reap after such a
-- silence, whoever runs it, gives every lease that was alive before it the silence back, and
-- the silence starts again from there; otherwise that reap would take every running task of
-- the cluster away from workers that were only waiting for Redis. A `distcomp wait` reaping
-- through the silence does not end it.
local times = redis.call('MGET', P .. ':beat', P .. ':quiet')
local last, quiet = tonumber(times[1]), tonumber(times[2])
if last and quiet and now - last > quiet then
  local away = now - last
  local alive = redis.call('ZRANGEBYSCORE', P .. ':leases', '(' .. last, '+inf', 'WITHSCORES')
  for i = 1, #alive, 2 do
    local w, deadline = alive[i], tonumber(alive[i + 1]) + away
    redis.call('ZADD', P .. ':leases', deadline, w)
    redis.call('PEXPIRE', P .. ':lease:' .. w, deadline - now)
  end
  redis.call('SET', P .. ':beat', now)
elseif ARGV[3] ~= '' and (not last or now - last > math.min(1000, (quiet or 0) / 4)) then
  redis.call('SET', P .. ':beat', now)
end
-- Redis does not undo a script that fails half-way: a dead worker leaves P:leases last, once its
-- tasks are back in the queue, so that a reap that failed before is done again by the next one.
for _, w in ipairs(redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', now)) do
  if redis.call('EXISTS', P .. ':lease:' .. w) == 0 then
    local who = redis.call('HMGET', P .. ':w:' .. w, 'host', 'results_dir')
    local ids, left, procs = redis.call('SMEMBERS', P .. ':run:' .. w), {}, false
    for _, id in ipairs(ids) do
      local t = redis.call('HMGET', P .. ':t:' .. id, 'attempt', 'host', 'pid', 'pstart')
      left[#left + 1] = id
      if who[1] and t[2] == who[1] and t[3] and t[4] then
        left[#left + 1] = t[1] .. ' ' .. t[3] .. ' ' .. t[4]
        procs = true
      else
        left[#left + 1] = t[1]
      end
    end
    local files = who[2] and (#ids > 0 or redis.call('EXISTS', P .. ':out:' .. w) == 1)
    if files or procs then
      local lkey = P .. ':left:' .. w
      if files then
        redis.call('HSET', lkey, 'dir', who[2])
        redis.call('SADD', P .. ':chores:dir:' .. who[2], w)
      end
      if procs then
        redis.call('HSET', lkey, 'host', who[1])
        redis.call('SADD', P .. ':chores:host:' .. who[1], w)
      end
      -- In slices: Lua unpacks at most about 8,000 values at once.
      for i = 1, #left, 1000 do
        redis.call('HSET', lkey, unpack(left, i, math.min(i + 999, #left)))
      end
    end
    n = n + unrun_worker(w, 'requeued: worker ' .. w .. ' stopped renewing its lease')
    redis.call('ZREM', P .. ':leases', w)
  end
end
local keep, drop, orphans = {}, {}, {}
-- Take the duty ('dir' or 'host') of dead worker w from its index; then the task entries it
-- covers are read, and the entry goes once no duty is left.
local function take(w, duty, index)
  local lkey = P .. ':left:' .. w
  redis.call('SREM', index, w)
  redis.call('HDEL', lkey, duty)
  if duty == 'dir' then
    for _, o in ipairs(pending_outputs(w)) do keep[#keep + 1] = {w, o[1], o[2]} end
  end
  local flat = redis.call('HGETALL', lkey)
  local rest = false
  for i = 1, #flat, 2 do
    local id, left = flat[i], flat[i + 1]
    if id == 'host' or id == 'dir' then
      rest = true
    else
      local attempt, pid, pstart = string.match(left, '^(%d+) ?(%d*) ?(.*)$')
      if duty == 'dir' then drop[#drop + 1] = {id, tonumber(attempt)} end
      if duty == 'host' and pid ~= '' then orphans[#orphans + 1] = {id, pid, pstart} end
    end
  end
  if not rest then redis.call('DEL', lkey) end
end
for _, duty in ipairs({{'dir', ARGV[2]}, {'host', ARGV[3]}}) do
  if duty[2] ~= '' then
    local index = P .. ':chores:' .. duty[1] .. ':' .. duty[2]
    for _, w in ipairs(redis.call('SMEMBERS', index)) do take(w, duty[1], index) end
  end
end
return {n, keep, drop, orphans}
"""

# ARGV: P, worker. The attempts whose outcome the worker reported and whose files it may not
# have renamed yet: {{id, attempt}, ...}. Drops the ids retried since (``pending_outputs``).
_OUTPUTS = _LUA_COMMON + r"""
return pending_outputs(ARGV[2])
"""

# ARGV: P, worker, token, ttl_ms, force (1/0), info record (JSON).
# Returns {1, ids left running under this name} or {0, holder's info} when the name is taken.
_REGISTER = _LUA_COMMON + r"""
local worker, token = ARGV[2], ARGV[3]
local lkey = P .. ':lease:' .. worker
local holder = redis.call('GET', lkey)
if holder and holder ~= token and ARGV[5] ~= '1' then
  return {0, redis.call('HGETALL', P .. ':w:' .. worker)}
end
touch_lease(worker, token, ARGV[4])
local quiet = math.max(2000, math.floor(tonumber(ARGV[4]) / 2))
if quiet > (tonumber(redis.call('GET', P .. ':quiet')) or 0) then
  redis.call('SET', P .. ':quiet', quiet)
end
redis.call('SADD', P .. ':workers', worker)
local wkey = P .. ':w:' .. worker
redis.call('DEL', wkey)
set_record(wkey, ARGV[6])
return {1, redis.call('SMEMBERS', P .. ':run:' .. worker)}
"""

# ARGV: P, worker, token, ttl_ms, stats record (JSON).
# Returns {status, stop_time, ids to cancel, ids the queue thinks run here}; status 1 renewed,
# 2 re-acquired after it had expired, 0 another instance holds the name.
_HEARTBEAT = _LUA_COMMON + r"""
local worker, token = ARGV[2], ARGV[3]
local lkey = P .. ':lease:' .. worker
local holder = redis.call('GET', lkey)
local status = 1
if holder == false then status = 2 elseif holder ~= token then return {0, '', {}, {}} end
touch_lease(worker, token, ARGV[4])
set_record(P .. ':w:' .. worker, ARGV[5])
local run = P .. ':run:' .. worker
return {status, redis.call('GET', P .. ':stop') or '',
        redis.call('SINTER', P .. ':cancel', run), redis.call('SMEMBERS', run)}
"""

# ARGV: P, worker, token, final stats record (JSON, marked ``stopped``). The worker leaves
# cleanly, its output files all renamed: its lease and P:out:<worker> go and its last stats stay,
# so ``workers`` tells a clean stop from a lost worker and counts all it did. Tasks still listed
# as running under its name (its own requeue failed, or a claim's reply was lost) go back to todo
# here: once the lease is gone the reaper no longer looks at this name. Returns how many, or -1
# when another instance holds the name now: then the name, its tasks and its record are that
# instance's.
_DEREGISTER = _LUA_COMMON + r"""
local worker = ARGV[2]
local lkey = P .. ':lease:' .. worker
local holder = redis.call('GET', lkey)
if holder and holder ~= ARGV[3] then return -1 end
redis.call('DEL', lkey, P .. ':out:' .. worker)
redis.call('ZREM', P .. ':leases', worker)
-- A task it reserved (``_CLAIM``) no longer names it.
local reserving = redis.call('HGET', P .. ':w:' .. worker, 'reserving')
if reserving then drop_reservation(worker, reserving) end
set_record(P .. ':w:' .. worker, ARGV[4])
return unrun_worker(worker, 'requeued: worker ' .. worker .. ' stopped while it was listed there')
"""

# ARGV: P. Delete every key of the namespace in one step: a purge in client-side batches let a
# submit or a report that came in between leave a task's hash without its queue entry (never
# claimed) or counts that no longer match the tasks. Redis is busy for the whole scan (2.3 s for
# a million tasks on the machine of docs/performance.md); workers wait that out as they wait out
# an outage. Returns how many keys went.
_PURGE = r"""
local cursor, n = '0', 0
repeat
  local r = redis.call('SCAN', cursor, 'MATCH', ARGV[1] .. ':*', 'COUNT', 10000)
  cursor = r[1]
  local keys = r[2]
  for i = 1, #keys, 1000 do
    n = n + redis.call('UNLINK', unpack(keys, i, math.min(i + 999, #keys)))
  end
until cursor == '0'
return n
"""

# ARGV: P, request id, now, ids... Cancel: todo -> failed now; running -> flagged for its worker
# to kill.
_CANCEL = _LUA_COMMON + r"""
local rid, now = ARGV[2], ARGV[3]
local first = first_reply(rid)
if first then return first end
local done, flagged = 0, 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local tkey = P .. ':t:' .. id
  local f = redis.call('HMGET', tkey, 'state', 'req_mem', 'cpu')
  if f[1] == 'todo' then
    local b = bucket_of(tonumber(f[2]), tonumber(f[3]))
    redis.call('ZREM', P .. ':q:' .. b, id)
    if redis.call('ZCARD', P .. ':q:' .. b) == 0 then redis.call('SREM', P .. ':buckets', b) end
    redis.call('HINCRBY', P .. ':counts', 'todo', -1)
    redis.call('HSET', tkey, 'reason', 'cancelled', 'ended', now)
    redis.call('HDEL', tkey, 'passed_since', 'reserved_by')
    to_failed(id, tkey, now)
    done = done + 1
  elseif f[1] == 'running' then
    redis.call('SADD', P .. ':cancel', id)
    flagged = flagged + 1
  end
end
return keep_reply(rid, {done, flagged})
"""

# ARGV: P, request id, ids... failed -> todo with fresh retry and eviction budgets.
_RETRY = _LUA_COMMON + r"""
local rid = ARGV[2]
local first = first_reply(rid)
if first then return first end
local n = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local tkey = P .. ':t:' .. id
  if redis.call('HGET', tkey, 'state') == 'failed' then
    redis.call('ZREM', P .. ':s:failed', id)
    redis.call('HINCRBY', P .. ':counts', 'failed', -1)
    redis.call('HSET', tkey, 'failures', 0, 'evictions', 0, 'failed_on', ',', 'reason',
      'retried by user')
    redis.call('HDEL', tkey, 'passed_since', 'reserved_by')
    to_todo(id, tkey)
    n = n + 1
  end
end
return keep_reply(rid, n)
"""

# ARGV: P, id, worker, attempt, record (JSON). Annotate a running task (pid, host) for the
# worker and attempt running it; a late annotation of an earlier attempt is dropped.
_ANNOTATE = _LUA_COMMON + r"""
local tkey = P .. ':t:' .. ARGV[2]
if not owned(tkey, ARGV[3], ARGV[4]) then return 0 end
set_record(tkey, ARGV[5])
return 1
"""


# ARGV: P, JSON array of field names, JSON array of task ids. Reads only. One JSON string back,
# per id its values (false when absent): for a whole export the client would otherwise spend
# most of its time packing HMGETs and parsing their replies in Python.
_READ_TASKS = _LUA_COMMON + r"""
local fields, ids, rows = cjson.decode(ARGV[2]), cjson.decode(ARGV[3]), {}
for i, id in ipairs(ids) do
  rows[i] = redis.call('HMGET', P .. ':t:' .. id, unpack(fields))
end
return cjson.encode(rows)
"""

# ARGV: P, state (running, finished or failed), score, id, count. Reads only. Up to ``count``
# entries of P:s:<state> after (score, id) in the set's order, from its start when score is
# '': {id, score, ...}. A page that starts after the last entry of the previous one, not at an
# index, misses no entry that stays in the set however many leave it meanwhile.
_STATE_PAGE = _LUA_COMMON + r"""
local key, n, start = P .. ':s:' .. ARGV[2], tonumber(ARGV[5]), 0
if ARGV[3] ~= '' then
  -- Ranks lo to hi - 1 hold the ids of that score (a cancel gives a thousand one time), in
  -- id order (all hex digits of one length, which Lua orders as Redis does): bisect them.
  local lo = redis.call('ZCOUNT', key, '-inf', '(' .. ARGV[3])
  local hi = redis.call('ZCOUNT', key, '-inf', ARGV[3])
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if redis.call('ZRANGE', key, mid, mid)[1] <= ARGV[4] then lo = mid + 1 else hi = mid end
  end
  start = lo
end
return redis.call('ZRANGE', key, start, start + n - 1, 'WITHSCORES')
"""

# ARGV: P. Reads only. Every todo id (bucket by bucket) and every running id, at one instant.
# Read in two steps, a task that went from running back to todo between them (a retryable
# failure, an eviction, a reap) was in neither, and `cancel --all` missed it. One step over a
# million queued ids holds Redis for about as long as the client's reads of them did.
_ACTIVE_IDS = _LUA_COMMON + r"""
local out = {}
for _, b in ipairs(redis.call('SMEMBERS', P .. ':buckets')) do
  for _, id in ipairs(redis.call('ZRANGE', P .. ':q:' .. b, 0, -1)) do out[#out + 1] = id end
end
for _, id in ipairs(redis.call('ZRANGE', P .. ':s:running', 0, -1)) do out[#out + 1] = id end
return out
"""


class Submitted(NamedTuple):
    added: int
    existing: int      # already in the queue before this call
    duplicates: int    # repeated within this call, stored once


class Reaped(NamedTuple):
    requeued: int
    keep: list[tuple[str, str, int]]   # (dead worker, id, attempt): files to rename
    drop: list[tuple[str, int]]        # (id, attempt): files of requeued attempts
    orphans: list[tuple[str, int, str]]  # (id, pid, pstart): processes on the caller's host


class LeaseLost(RuntimeError):
    """This worker no longer holds its lease: another instance took the name over."""


@dataclass
class Claim:
    task_id: str
    attempt: int
    type: str
    params: str
    cwd: str
    env: dict[str, str]
    timeout_s: float
    mem_mb: int
    cpu: float
    declared: str = ""  # min_dram_gb as submitted: the class whose real size the worker learns


@dataclass
class Beat:
    status: int
    stop_time: float
    cancel: list[str]
    running: set[str]


def _record(fields: dict[str, Any]) -> str:
    """A hash's fields as the one JSON argument the scripts store with ``set_record``; values
    are stored as the strings Redis would have made of them."""
    return json.dumps({k: "" if v is None else v if isinstance(v, str) else str(v)
                       for k, v in fields.items()}, ensure_ascii=False)


def _str(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


class Queue:
    """All reads and writes of distcomp's Redis state go through this class."""

    def __init__(self, client: Redis, namespace: str = "distcomp") -> None:
        self.r = client
        self.ns = namespace
        self._scripts = {
            name: client.script(src)
            for name, src in (
                ("submit", _SUBMIT), ("claim", _CLAIM), ("finish", _FINISH), ("fail", _FAIL),
                ("evict", _EVICT), ("requeue", _REQUEUE), ("requeue_worker", _REQUEUE_WORKER),
                ("reap", _REAP), ("register", _REGISTER), ("heartbeat", _HEARTBEAT),
                ("deregister", _DEREGISTER), ("cancel", _CANCEL), ("retry", _RETRY),
                ("annotate", _ANNOTATE), ("read_tasks", _READ_TASKS), ("purge", _PURGE),
                ("outputs", _OUTPUTS), ("state_page", _STATE_PAGE),
                ("active_ids", _ACTIVE_IDS),
            )
        }

    def key(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    def _run(self, name: str, *args: Any, client: Any = None) -> Any:
        """Run script ``name`` now, or with a ``pipeline()`` as ``client`` queue it there."""
        if client is not None:
            return client.script(self._scripts[name], self.ns, *args)
        return self._scripts[name](self.ns, *args)

    # -- submission -------------------------------------------------------------------------
    def submit(self, specs: Sequence[TaskSpec], now: float | None = None) -> Submitted:
        """Add tasks; ones already known (same id) are left as they are, and a task that
        appears more than once in ``specs`` is stored once (counted in ``duplicates``).

        Tasks go in chunks, each chunk one atomic script, all chunks in one pipeline round trip
        per batch of chunks, so 100k tasks load in seconds. Task ids are computed here, chunk
        by chunk, while Redis stores the previous batch.
        """
        now = time.time() if now is None else now
        added = existing = duplicates = 0
        seen: set[str] = set()
        # While Redis stores one batch of chunks, this thread packs the next: the batch goes
        # out from a helper thread, which waits on the socket without holding the GIL.
        sender = ThreadPoolExecutor(1)
        in_flight: Future | None = None

        def send(pipe: Any) -> None:
            nonlocal in_flight, added, existing
            if in_flight is not None:
                for a, e in in_flight.result():
                    added, existing = added + a, existing + e
            in_flight = sender.submit(pipe.execute) if pipe is not None else None

        pipe = self.r.pipeline()
        pending = 0
        try:
            for start in range(0, len(specs), SUBMIT_CHUNK):
                fields: list[str] = []
                for spec in specs[start:start + SUBMIT_CHUNK]:
                    task_id = spec.task_id
                    if task_id in seen:
                        duplicates += 1
                        continue
                    seen.add(task_id)
                    fields += [
                        task_id, spec.type, str(spec.priority), str(spec.mem_mb),
                        repr(float(spec.min_cpu)), spec.params,
                        "" if spec.timeout_s is None else repr(spec.timeout_s),
                        spec.cwd or "", json.dumps(spec.env) if spec.env else "",
                        str(spec.max_retries), repr(float(spec.min_dram_gb)),
                    ]
                if not fields:
                    continue
                packed = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
                self._run("submit", uuid.uuid4().hex, repr(now), packed, client=pipe)
                pending += 1
                if pending == 20:
                    send(pipe)
                    pipe = self.r.pipeline()
                    pending = 0
            send(pipe if pending else None)
            send(None)
        finally:
            sender.shutdown(wait=True)
        return Submitted(added, existing, duplicates)

    # -- worker lifecycle -------------------------------------------------------------------
    def register(self, worker: str, token: str, ttl_ms: int, info: dict[str, Any],
                 force: bool = False) -> tuple[bool, Any]:
        ok, payload = self._run("register", worker, token, ttl_ms, int(force), _record(info))
        if ok:
            return True, [_str(x) for x in payload]
        return False, {_str(payload[i]): _str(payload[i + 1]) for i in range(0, len(payload), 2)}

    def heartbeat(self, worker: str, token: str, ttl_ms: int, stats: dict[str, Any]) -> Beat:
        status, stop, cancel, running = self._run("heartbeat", worker, token, ttl_ms,
                                                  _record(stats))
        return Beat(int(status), float(stop or 0), [_str(x) for x in cancel],
                    {_str(x) for x in running})

    def deregister(self, worker: str, token: str, stats: dict[str, Any]) -> int:
        """Leave cleanly, keeping ``stats`` (the last heartbeat's fields) marked stopped.
        Returns how many tasks still listed as running here went back to the queue (or failed
        as cancelled), -1 when another instance holds the name now."""
        return int(self._run("deregister", worker, token, _record({**stats, "stopped": "1"})))

    def reap(self, results_dir: str = "", host: str = "") -> Reaped:
        """Requeue the tasks of workers whose lease expired. A worker passes its (absolute)
        results directory to be handed the files such workers of the same directory left, and
        its host to be handed the processes of their requeued tasks that ran there, whoever
        requeued them: each chore goes to one caller, once. A reap with a host is a worker's,
        which tells that workers are still heard from (see ``_REAP``)."""
        n, keep, drop, orphans = self._run("reap", results_dir, host)
        return Reaped(int(n), [(_str(w), _str(tid), int(a)) for w, tid, a in keep],
                      [(_str(tid), int(a)) for tid, a in drop],
                      [(_str(tid), int(pid), _str(ps)) for tid, pid, ps in orphans])

    def outputs(self, worker: str) -> list[tuple[str, int]]:
        """(id, attempt) of every task whose outcome ``worker`` reported and whose output files
        it has not said it renamed (``outputs_kept``); a task retried since is left out."""
        return [(_str(tid), int(a)) for tid, a in self._run("outputs", worker)]

    def outputs_kept(self, worker: str, ids: Sequence[str], client: Any = None) -> Any:
        """``worker`` renamed the output files of ``ids`` (or found nothing left to rename)."""
        args = ("SREM", self.key("out", worker), *ids)
        if client is not None:
            return client.command(*args)
        return self.r.execute(*args)

    def reasons(self, ids: Sequence[str]) -> list[str]:
        """The reason recorded for each task's last failure or requeue, "" for none."""
        pipe = self.r.pipeline()
        for task_id in ids:
            pipe.command("HGET", self.key("t", task_id), "reason", shape=_str)
        return pipe.execute()

    def requeue_worker(self, worker: str, reason: str) -> int:
        return int(self._run("requeue_worker", uuid.uuid4().hex, worker, reason))

    def claim(self, worker: str, token: str, free_mem_mb: float, free_cpu: float, max_n: int,
              avoid_window_s: float = 60.0, charges: dict[str, float] | None = None,
              client: Any = None, sizes: dict[str, float] | None = None) -> list[Claim] | None:
        """Claim up to ``max_n`` tasks that fit; None when this worker's lease is gone.

        A task is charged its memory requirement, or ``charges[declared]`` when that is more
        (what this worker learned that tasks declaring the same ``min_dram_gb`` use). ``sizes``
        (default ``charges``): those learned sizes as they are, where ``charges`` scales some
        down to the room their growth finds; a task is reserved (``_CLAIM``) by its real size.
        With a ``pipeline()`` as ``client`` the call is only queued: pass its reply to
        ``claims()``."""
        rows = self._run("claim", worker, token, repr(time.time()), repr(float(free_mem_mb)),
                         repr(float(free_cpu)), max_n, repr(avoid_window_s), CLAIM_LOOKAHEAD,
                         json.dumps(charges or {}), CLAIM_AVOID_BUDGET,
                         int(CLAIM_RESERVE_AFTER_S * 1000), int(CLAIM_DRAINED_S * 1000),
                         int(RESERVATION_FRESH_S * 1000), int(RESERVATION_HOLD_S * 1000),
                         json.dumps(sizes if sizes is not None else charges or {}),
                         client=client)
        return rows if client is not None else self.claims(rows)

    @staticmethod
    def claims(rows: Any) -> list[Claim] | None:
        """The tasks a claim script's reply hands over; None when the lease was gone."""
        if rows == -1:
            return None
        return [Claim(task_id=tid, attempt=int(attempt), type=ttype, params=params, cwd=cwd,
                      env=json.loads(env) if env else {}, timeout_s=float(timeout or 0),
                      mem_mb=int(float(mem)), cpu=float(cpu), declared=declared)
                for tid, attempt, ttype, params, cwd, env, timeout, mem, cpu, declared
                in json.loads(rows)]

    # -- reports (each fenced by worker + attempt) ------------------------------------------
    def finish(self, task_id: str, worker: str, attempt: int, result: dict[str, Any],
               client: Any = None) -> Any:
        return self._run("finish", task_id, worker, attempt, repr(time.time()), _record(result),
                         client=client)

    def fail(self, task_id: str, worker: str, attempt: int, result: dict[str, Any],
             retryable: bool, client: Any = None) -> Any:
        return self._run("fail", task_id, worker, attempt, repr(time.time()), int(retryable),
                         _record(result), client=client)

    def evict(self, task_id: str, worker: str, attempt: int, peak_mb: int, budget: int,
              reason: str, budget_reason: str, result: dict[str, Any],
              client: Any = None, no_room_reason: str = "") -> Any:
        """Back to todo needing at least ``peak_mb``, or failed when no live worker has that
        much room (with ``no_room_reason`` when given) or past the eviction ``budget``."""
        return self._run("evict", task_id, worker, attempt, repr(time.time()), peak_mb, budget,
                         reason, budget_reason, _record(result), no_room_reason, client=client)

    def requeue(self, task_id: str, worker: str, attempt: int, reason: str,
                client: Any = None) -> Any:
        return self._run("requeue", task_id, worker, attempt, reason, client=client)

    def annotate(self, task_id: str, worker: str, attempt: int, fields: dict[str, Any],
                 client: Any = None) -> Any:
        return self._run("annotate", task_id, worker, attempt, _record(fields), client=client)

    def notices(self, channel: str = "wake") -> Any:
        """A pub/sub connection subscribed to ``P:wake`` (tasks became claimable) or
        ``P:drained`` (nothing is left todo or running); its first message is the
        subscription's confirmation. Notices published while it is not connected are lost, so
        a (re)subscription is itself a reason to look again."""
        sub = self.r.pubsub()
        sub.subscribe(self.key(channel))
        return sub

    def pipeline(self) -> Pipeline:
        """A pipeline for reports, annotations and a claim: one round trip for all of them.
        A script Redis lost (restart, SCRIPT FLUSH) is loaded and only its commands are sent
        again, so each command still runs once (``redis_client.Pipeline``)."""
        return self.r.pipeline()

    # -- operator commands ------------------------------------------------------------------
    def cancel(self, ids: Iterable[str]) -> tuple[int, int]:
        """Queued tasks fail as cancelled, running ones are flagged for their worker to kill:
        (how many of each). An id given twice counts once."""
        done = flagged = 0
        for chunk in _chunks(dict.fromkeys(ids), 1000):
            d, f = self._run("cancel", uuid.uuid4().hex, repr(time.time()), *chunk)
            done, flagged = done + d, flagged + f
        return done, flagged

    def retry(self, ids: Iterable[str]) -> int:
        return sum(int(self._run("retry", uuid.uuid4().hex, *chunk))
                   for chunk in _chunks(ids, 1000))

    def now(self) -> float:
        """Redis's clock, in seconds: the one clock every node's requests agree on."""
        seconds, micros = self.r.time()
        return seconds + micros / 1e6

    def stop_workers(self) -> None:
        """Every worker registered before now drains and exits; now is Redis's time, which
        workers compare with Redis's time at their registration, not with their own clocks."""
        self.r.set(self.key("stop"), repr(self.now()))

    # -- reads ------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        raw = self.r.hgetall(self.key("counts"))
        counts = {s: int(raw.get(s.encode(), 0)) for s in STATES}
        counts["total"] = sum(counts[s] for s in STATES)
        return counts

    def task(self, task_id: str) -> dict[str, str] | None:
        raw = self.r.hgetall(self.key("t", task_id))
        return {_str(k): _str(v) for k, v in raw.items()} if raw else None

    def holds_reservation(self, worker: str, task_id: str) -> bool:
        """Whether ``worker`` waits for room for ``task_id`` (``_CLAIM``): its lease is held and
        its record names the task. A task's ``reserved_by`` outlives a worker that died or gave
        the reservation up until the next claim that reads it."""
        pipe = self.r.pipeline()
        pipe.pttl(self.key("lease", worker))
        pipe.hmget(self.key("w", worker), "reserving")
        pttl, (reserving,) = pipe.execute()
        return pttl > 0 and _str(reserving or b"") == task_id

    def resolve(self, prefix: str) -> list[str]:
        """Ids that start with ``prefix`` (a full id is a direct lookup, a prefix a scan)."""
        if self.r.exists(self.key("t", prefix)):
            return [prefix]
        if not prefix or not all(c in "0123456789abcdef" for c in prefix):
            return []
        pattern = self.key("t", prefix) + "*"
        cut = len(self.key("t", ""))
        return sorted({_str(k)[cut:] for k in self.r.scan_iter(match=pattern, count=10000)})

    def ids_in_state(self, state: str, limit: int | None = None) -> list[str]:
        """Ids in one state: todo in claim order, the others by time."""
        stop = -1 if limit is None else limit - 1
        if state == "todo":
            merged: list[tuple[float, str]] = []
            for b in self.r.smembers(self.key("buckets")):
                rows = self.r.zrange(self.key("q", _str(b)), 0, stop, withscores=True)
                merged += [(score, _str(tid)) for tid, score in rows]
            merged.sort()
            return [tid for _, tid in merged[:limit]]
        return [_str(x) for x in self.r.zrange(self.key("s", state), 0, stop)]

    def active_ids(self) -> list[str]:
        """Every task todo or running, read at one instant (``_ACTIVE_IDS``)."""
        return [_str(x) for x in self._run("active_ids")]

    def iter_ids_in_state(self, state: str) -> Iterator[str]:
        if state == "todo":
            yield from self.ids_in_state("todo")
            return
        after: tuple[Any, Any] = ("", "")
        while True:
            rows = self._run("state_page", state, *after, 1000)
            yield from (_str(x) for x in rows[::2])
            if len(rows) < 2000:
                return
            after = (rows[-1], rows[-2])

    def iter_tasks(self, fields: Sequence[str], states: Iterable[str] | None = None,
                   chunk: int = 1000) -> Iterator[tuple[str, dict[str, str]]]:
        """Each task once, as its id and its ``state`` and ``fields`` ("" when absent), read
        ``chunk`` hashes per round trip. Without ``states``: every task, in no particular
        order, found by SCAN, which returns every key that exists for the whole scan (tasks are
        only deleted by purge), so none is missed however tasks move meanwhile. With
        ``states``: the tasks listed in those states, in list order, each row kept only if the
        task is still in one of them when read."""
        wanted = set(states or ())
        fields = ["state", *(f for f in fields if f != "state")]
        cut = len(self.key("t", ""))
        if wanted:
            ids: Iterable[str] = (tid for s in STATES if s in wanted
                                  for tid in self.iter_ids_in_state(s))
        else:
            ids = (_str(k)[cut:] for k in self.r.scan_iter(match=self.key("t", "*"),
                                                           count=10000))

        def once() -> Iterator[str]:
            seen: set[str] = set()
            for tid in ids:
                if tid not in seen and _TASK_ID.fullmatch(tid):
                    seen.add(tid)
                    yield tid

        names = json.dumps(fields)
        for batch in _chunks(once(), chunk):
            rows = json.loads(self._run("read_tasks", names, json.dumps(batch)))
            for tid, row in zip(batch, rows):
                state = row[0]
                if state and (not wanted or state in wanted):
                    yield tid, {f: v or "" for f, v in zip(fields, row)}

    def running_on(self, worker: str) -> set[str]:
        return {_str(x) for x in self.r.smembers(self.key("run", worker))}

    def knows_worker(self, name: str) -> bool:
        """Whether a worker of this name ever registered in the namespace (alive or not)."""
        return self.r.sismember(self.key("workers"), name)

    def workers(self) -> list[dict[str, Any]]:
        names = sorted(_str(n) for n in self.r.smembers(self.key("workers")))
        pipe = self.r.pipeline()
        for name in names:
            pipe.hgetall(self.key("w", name))
            pipe.pttl(self.key("lease", name))
            pipe.scard(self.key("run", name))
        rows = pipe.execute()
        out = []
        for i, name in enumerate(names):
            info = {_str(k): _str(v) for k, v in rows[3 * i].items()}
            pttl, running = rows[3 * i + 1], rows[3 * i + 2]
            ttl_ms = int(float(info.get("ttl_ms", 0) or 0))
            alive = pttl > 0
            out.append({
                "name": name,
                "alive": alive,
                "stopped": not alive and bool(info.get("stopped")),
                "heartbeat_age": round((ttl_ms - pttl) / 1000, 1) if alive else None,
                "running": running,
                "host": info.get("host", ""),
                "pid": int(info.get("pid", 0) or 0),
                "cores": float(info.get("cores", 0) or 0),
                "cores_used": float(info.get("cores_used", 0) or 0),
                "mem_total": int(info.get("mem_total", 0) or 0),
                "mem_used": int(info.get("mem_used", 0) or 0),
                "done": int(info.get("done", 0) or 0),
                "evicted": int(info.get("evicted", 0) or 0),
                "started": float(info.get("started", 0) or 0),
                "last_seen": float(info.get("hb", 0) or 0),
                "fault": info.get("fault", ""),
                "reserving": info.get("reserving", "") if alive else "",
                "reserving_since": (round(float(info["reserved_at"]) / 1000, 3)
                                    if alive and info.get("reserved_at") else None),
            })
        return out

    def liveness(self) -> tuple[list[str], int]:
        """The workers heard from (their lease key lives, as ``workers`` says ``alive``), and
        the running tasks of those whose lease is still in P:leases but whose key has expired:
        dead or cut off, not reaped yet. While no worker at all is heard from, the reaper
        cannot tell a dead worker from one cut off from Redis and leaves their leases be
        (docs/design.md, Liveness): those tasks wait for the first worker to be back. Counting
        P:leases alone showed such a worker as alive. Cost: two reads per lease holder."""
        seconds, micros = self.r.time()
        held = [_str(n) for n in
                self.r.zrangebyscore(self.key("leases"), seconds * 1000 + micros // 1000, "+inf")]
        pipe = self.r.pipeline()
        for name in held:
            pipe.pttl(self.key("lease", name))
            pipe.scard(self.key("run", name))
        rows = pipe.execute() if held else []
        live = [name for name, pttl in zip(held, rows[::2]) if pttl > 0]
        stranded = sum(n for pttl, n in zip(rows[::2], rows[1::2]) if pttl <= 0)
        return live, stranded

    def workers_alive(self) -> int:
        return len(self.liveness()[0])

    def unplaceable(self, live: list[str] | None = None) -> int:
        """Todo tasks that no live worker (``live``, as ``liveness`` names them) could ever
        take: they would wait for a bigger node. A resource class wholly beyond the largest
        room or core count counts whole; one that straddles it (2 GB tasks in the class of
        1-2 GB, beside 1.75 GB of room) by its tasks, the first ``UNPLACEABLE_SCAN`` of it in
        claim order. Cost: one read per live worker and per class, and per task read."""
        if live is None:
            live = self.liveness()[0]
        if not live:
            return 0
        pipe = self.r.pipeline()
        for name in live:
            pipe.hmget(self.key("w", name), "room_mb", "cores")
        rows = pipe.execute()
        room = max(float(r[0] or 0) for r in rows)
        cores = max(float(r[1] or 0) for r in rows)
        whole, straddling = [], []
        for b in self.r.smembers(self.key("buckets")):
            m, c = (int(x) for x in _str(b)[1:].split("c"))
            # bucket_of: sizes in (2^(m-1), 2^m] MiB and (2^(c-1), 2^c] quarter cores (class
            # m0 from 0 MiB, c0 from 0 cores, c-1 no core at all)
            mem_floor, mem_top = 2 ** (m - 1) if m > 0 else 0, 2 ** m
            cpu_floor, cpu_top = 2 ** (c - 1) / 4 if c > 0 else 0, 2 ** c / 4 if c >= 0 else 0
            if mem_floor >= room or cpu_floor >= cores:
                whole.append(self.key("q", _str(b)))
            elif mem_top > room or cpu_top > cores:
                straddling.append(self.key("q", _str(b)))
        pipe = self.r.pipeline()
        for key in whole:
            pipe.zcard(key)
        for key in straddling:
            pipe.zrange(key, 0, UNPLACEABLE_SCAN - 1)
        rows = pipe.execute()
        stuck = sum(rows[:len(whole)])
        pipe = self.r.pipeline()
        for ids in rows[len(whole):]:
            for tid in ids:
                pipe.hmget(self.key("t", _str(tid)), "req_mem", "cpu")
        return stuck + sum(float(mem or 0) > room or float(cpu or 0) > cores
                           for mem, cpu in pipe.execute())

    def purge(self) -> int:
        """Delete every key of this namespace (and nothing else), atomically."""
        return int(self._run("purge"))


# Of a resource class that straddles the largest room, how many tasks ``unplaceable`` reads.
UNPLACEABLE_SCAN = 1000


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
