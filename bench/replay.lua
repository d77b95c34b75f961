-- Scenario "replay": requests cycle over a small fixed set of keys (100 by
-- default, second script argument). run.sh runs a warm-up pass first so that
-- every key is completed and the measured run is all replays.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")
common.setup_post()

local reqs = {}
local i = 0

function init(args)
   local prefix = common.prefix(args)
   local nkeys = tonumber(args[2] or "100")
   for k = 1, nkeys do
      reqs[k] = wrk.format(nil, nil, {
         ["Content-Type"] = "application/json",
         ["Idempotency-Key"] = prefix .. "-replay-" .. k,
      })
   end
end

function request()
   i = i % #reqs + 1
   return reqs[i]
end
