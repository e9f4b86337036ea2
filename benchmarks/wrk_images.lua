-- wrk script: POST different Fashion-MNIST PNGs to an image endpoint.
--   BENCH_LIST         a file holding one image path per line
--   BENCH_PER_REQUEST  images per request: 1 (default) sends a raw image/png body; more sends
--                      them as multipart/form-data file parts (clients that send groups)
--   BENCH_BODIES       instead of images: a file holding one JSON request body per line (such as
--                      {"vector": [...]} for /v1/search), each sent as application/json
-- Requests are formatted once in init, so that the load generator, which shares the cores
-- with the server, spends as little as possible per request.
local requests = {}
local i = 0
local boundary = "swavbenchboundary7d1f"

local function multipart(files, first, last)
  local parts = {}
  for j = first, last do
    parts[#parts + 1] = "--" .. boundary .. "\r\n"
      .. "Content-Disposition: form-data; name=\"image\"; filename=\"" .. j .. ".png\"\r\n"
      .. "Content-Type: image/png\r\n\r\n" .. files[j] .. "\r\n"
  end
  parts[#parts + 1] = "--" .. boundary .. "--\r\n"
  return table.concat(parts)
end

function init(args)
  local bodies = os.getenv("BENCH_BODIES")
  if bodies then
    for line in io.lines(bodies) do
      requests[#requests + 1] = wrk.format("POST", nil, {["Content-Type"] = "application/json"}, line)
    end
    i = math.random(#requests)
    return
  end
  local per = tonumber(os.getenv("BENCH_PER_REQUEST") or "1")
  local files = {}
  for path in io.lines(os.getenv("BENCH_LIST")) do
    local f = assert(io.open(path, "rb"))
    files[#files + 1] = f:read("*a")
    f:close()
  end
  for first = 1, #files - per + 1, per do
    if per == 1 then
      requests[#requests + 1] = wrk.format("POST", nil, {["Content-Type"] = "image/png"}, files[first])
    else
      local headers = {["Content-Type"] = "multipart/form-data; boundary=" .. boundary}
      requests[#requests + 1] = wrk.format("POST", nil, headers, multipart(files, first, first + per - 1))
    end
  end
  i = math.random(#requests)
end

function request()
  i = i % #requests + 1
  return requests[i]
end

-- BENCH_HONOR_RETRY=1: a connection refused with Retry-After waits that long before its next
-- request, as a client that follows the API does (wrk calls delay() right after response()).
-- Defined only then: with a response() hook wrk hands every answer to Lua, which costs.
if os.getenv("BENCH_HONOR_RETRY") == "1" then
  local wait_ms = 0

  function response(status, headers, body)
    if status == 429 or status == 503 then
      wait_ms = 1000 * tonumber(headers["retry-after"] or headers["Retry-After"] or "1")
    end
  end

  function delay()
    local ms = wait_ms
    wait_ms = 0
    return ms
  end
end
