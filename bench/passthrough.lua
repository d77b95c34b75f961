-- Scenario "passthrough": POST with an 80-byte JSON body and no
-- Idempotency-Key: the proxy path alone. The request is static, so wrk
-- builds it once.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")
