-- Shared by every bench scenario: the request (POST, 80-byte JSON body, to the
-- path of the URL wrk was given), the script arguments and a done() that
-- prints one JSON line that bench/run parses (marker "BENCHJSON ").
--
-- Script arguments (after wrk's "--"): [1] key prefix, unique per cell and
-- round so that no two runs share a key; [2] a number whose meaning depends
-- on the scenario (replay: key count; contention: requests per key).

local M = {}

-- An 80-byte JSON body, padded so the length is exact whatever the fields.
local head = '{"order_id":"ord_000123","amount_cents":1999,"currency":"EUR","note":"'
local tail = '"}'
M.body = head .. string.rep("x", 80 - #head - #tail) .. tail
assert(#M.body == 80, "body must be 80 bytes")

wrk.method = "POST"
wrk.body = M.body
wrk.headers["Content-Type"] = "application/json"

function M.args(args)
   M.prefix = (args and args[1]) or "run"
   M.param = tonumber((args and args[2]) or "0") or 0
end

-- One keyed request. The header table is reused: wrk.format only adds Host
-- and Content-Length to it.
local keyed_headers = { ["Content-Type"] = "application/json" }
function M.keyed(key)
   keyed_headers["Idempotency-Key"] = key
   return wrk.format(nil, nil, keyed_headers, M.body)
end

function done(summary, latency, requests)
   local e = summary.errors
   local dur = summary.duration / 1e6
   io.write(string.format(
      'BENCHJSON {"requests":%d,"duration_s":%.6f,"rps":%.2f,"bytes":%d,' ..
      '"lat_mean_us":%.1f,"lat_max_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,' ..
      '"status_errors":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d}\n',
      summary.requests, dur, summary.requests / dur, summary.bytes,
      latency.mean, latency.max, latency:percentile(50.0), latency:percentile(90.0),
      latency:percentile(99.0), latency:percentile(99.9),
      e.status, e.connect, e.read, e.write, e.timeout))
end

return M
