-- Scenario "replay": requests cycle over a fixed set of keys (argument 2,
-- 100 by default) that bench/run completed just before the run, so every
-- request is answered from the store without the upstream.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local reqs = {}
local i = 0

function init(args)
   common.args(args)
   local nkeys = common.param > 0 and common.param or 100
   for k = 1, nkeys do
      reqs[k] = common.keyed(common.prefix .. "-replay-" .. k)
   end
end

function request()
   i = i % #reqs + 1
   return reqs[i]
end
