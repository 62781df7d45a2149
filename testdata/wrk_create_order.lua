-- The load of the create benchmarks (bench_test.go): POST /orders from every
-- connection, one request at a time, like pgbench's clients; each wrk thread
-- is its own user.
--   wrk -t2 -c16 -d15s --latency -s testdata/wrk_create_order.lua http://127.0.0.1:8081/orders
wrk.method = "POST"
wrk.body = '{"amount": 1500, "description": "bench"}'
wrk.headers["Content-Type"] = "application/json"

local threads = 0
function setup(thread)
    threads = threads + 1
    thread:set("user", "bench-" .. threads)
end

function init(args)
    wrk.headers["X-User-Id"] = user
end
