-- Scenario "contention": every request of every connection carries the same
-- Idempotency-Key (new per round). The first one executes; those that arrive
-- while it is in flight get 409 request_in_progress; the rest replay.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")
common.setup_post()

function init(args)
   wrk.headers["Idempotency-Key"] = common.prefix(args) .. "-contention"
end
