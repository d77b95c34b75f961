-- Scenario "mixed": 90% of requests carry a new key, 10% retry a key sent
-- 1,000 to 10,000 requests earlier (tens of milliseconds at least: long
-- completed with 50 connections in flight), so they replay: a realistic
-- share of client retries.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local counter = 0

function init(args)
   common.args(args)
   math.randomseed(12345)
end

function request()
   counter = counter + 1
   local n = counter
   if n % 10 == 0 and n > 1100 then
      n = n - 1000 - math.random(0, math.min(n - 1001, 9000))
      -- A multiple of 10 was itself a retry, never a first execution.
      if n % 10 == 0 then n = n - 1 end
   end
   return common.keyed(common.prefix .. "-" .. n)
end
