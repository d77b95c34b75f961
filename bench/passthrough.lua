-- Scenario "passthrough": POST with an 80-byte JSON body and no
-- Idempotency-Key. Also the script every baseline (direct, nginx, HAProxy)
-- runs. The request is static, so wrk builds it once.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")
common.setup_post()
