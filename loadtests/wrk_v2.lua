-- wrk script: POST one fixed KServe V2 body again and again and check every reply.
-- Environment: BODY_FILE (the request body), HDRLEN (Inference-Header-Content-Length for a binary
-- body, or empty), MARKER (text every good reply contains, e.g. an output name), SEQUENCES (n:
-- each request's body has its text SEQUENCE_ID replaced by the next of the ids 1..n, in turn).
-- done() prints one line: RESULT {"requests":..,"ok":..,"bad":..,"errors":..,"p50_us":..,"p99_us":..}
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local hl = os.getenv("HDRLEN")
if hl ~= nil and hl ~= "" then wrk.headers["Inference-Header-Content-Length"] = hl end
local marker = os.getenv("MARKER") or ""

local sequences = tonumber(os.getenv("SEQUENCES") or "")
if sequences ~= nil then
  local bodies, next_id = nil, 0
  function request()  -- one preformatted request per id, in turn (formatted once wrk.path is set)
    if bodies == nil then
      bodies = {}
      for id = 1, sequences do
        bodies[id] = wrk.format(nil, nil, nil, (string.gsub(wrk.body, "SEQUENCE_ID", tostring(id))))
      end
    end
    next_id = next_id % sequences + 1
    return bodies[next_id]
  end
end

ok, bad = 0, 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function response(status, headers, body)
  if status == 200 and (marker == "" or (body ~= nil and string.find(body, marker, 1, true))) then
    ok = ok + 1
  else
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local good, wrong = 0, 0
  for _, t in ipairs(threads) do
    good = good + t:get("ok")
    wrong = wrong + t:get("bad")
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"ok":%d,"bad":%d,"errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, good, wrong, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
