-- Shared by every bench scenario: the request body, the key prefix taken
-- from the script arguments, and a done() that prints one JSON line that
-- bench/run.sh parses (marker "BENCHJSON ").

local M = {}

-- An 80-byte JSON body, padded so the length is exact whatever the fields.
local head = '{"order_id":"ord_000123","amount_cents":1999,"currency":"EUR","note":"'
local tail = '"}'
M.body = head .. string.rep("x", 80 - #head - #tail) .. tail
assert(#M.body == 80, "body must be 80 bytes")

function M.setup_post()
   wrk.method = "POST"
   wrk.path = "/v1/orders"
   wrk.body = M.body
   wrk.headers["Content-Type"] = "application/json"
end

-- Called from setup(): numbers threads so keys from two threads never meet.
local next_tid = 0
function M.number_thread(thread)
   thread:set("bench_tid", next_tid)
   next_tid = next_tid + 1
end

-- args[1] is a per-round prefix chosen by run.sh so that keys of one round
-- are never the keys of another.
function M.prefix(args)
   return (args and args[1]) or "run"
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
