-- Scenario "webhook": "first" as a signed webhook delivery, GitHub's way:
-- the 80-byte body with its HMAC-SHA256 in X-Hub-Signature-256 (computed
-- by bench/run and given as the second script argument: the body never
-- changes) and a new delivery id per request in X-Delivery, the route's
-- idempotency key. Every request is verified, then executed once.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local counter = 0
local headers = { ["Content-Type"] = "application/json" }

function init(args)
   common.args(args)
   headers["X-Hub-Signature-256"] = args[2]
end

function request()
   counter = counter + 1
   headers["X-Delivery"] = common.prefix .. "-" .. counter
   return wrk.format(nil, nil, headers, common.body)
end
