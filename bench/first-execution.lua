-- Scenario "first-execution": every request carries a new Idempotency-Key
-- (round prefix, thread id, counter), so each one takes a lock, goes upstream
-- and writes a record: the full cost of the engine.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")
common.setup_post()

function setup(thread)
   common.number_thread(thread)
end

local prefix
local counter = 0

function init(args)
   prefix = common.prefix(args) .. "-t" .. tostring(bench_tid or 0) .. "-"
end

function request()
   counter = counter + 1
   return wrk.format(nil, nil, {
      ["Content-Type"] = "application/json",
      ["Idempotency-Key"] = prefix .. counter,
   })
end
