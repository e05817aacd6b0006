-- wrk script of bench/overhead.py: small non-stream chat completions, attributed in turn to four
-- jobs ("job_id" in the body), so the sidecar's metering and ledger paths run on every request.
-- The figures are printed as one line, "WRKJSON {...}", for overhead.py to read.

local bodies = {}
for job = 1, 4 do
  bodies[job] = string.format(
    '{"model": "fake-bench-model", "messages": [{"role": "user", "content": "Say hello"}], '
      .. '"max_tokens": 16, "job_id": %d}',
    job
  )
end

local prepared = {}
local sent = 0

function init(args)
  for i, body in ipairs(bodies) do
    prepared[i] = wrk.format("POST", nil, { ["Content-Type"] = "application/json" }, body)
  end
end

function request()
  sent = sent + 1
  return prepared[(sent % #prepared) + 1]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"mean": %.2f, "p50": %d, "p90": %d, "p99": %d, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max
  ))
end
