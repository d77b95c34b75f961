-- Scenario "contention": all connections send the same key, and the key
-- changes every N requests (argument 2, 1000 by default). bench/run points
-- idemgate's route for this path at an upstream that takes 50 ms, so the
-- first request of each key executes and nearly all the others arrive while
-- it is in flight: 409 request_in_progress, answered from the store alone.
-- (Baselines forward the same requests to the instant upstream.)
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local counter = 0
local per_key

function init(args)
   common.args(args)
   per_key = common.param > 0 and common.param or 1000
end

function request()
   local k = math.floor(counter / per_key)
   counter = counter + 1
   return common.keyed(common.prefix .. "-c" .. k)
end
