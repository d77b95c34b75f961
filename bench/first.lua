-- Scenario "first" (and "sse"): every request carries a new Idempotency-Key
-- (cell prefix + counter), so each one takes a lock, goes upstream and (for
-- a cacheable answer) writes a record: the full cost of the engine.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local counter = 0

function init(args)
   common.args(args)
end

function request()
   counter = counter + 1
   return common.keyed(common.prefix .. "-" .. counter)
end
