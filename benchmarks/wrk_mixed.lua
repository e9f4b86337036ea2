-- wrk script: a mix of image embeds, searches and item writes, with every answer's status
-- counted and 429/503 answers checked for Retry-After (printed as JSON by done()).
--   BENCH_LIST  a file holding one PNG path per line
local requests = {}
local i = 0
counts = {}
missing_retry_after = 0
local threads = {}

local function b64(data)
  local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  return ((data:gsub(".", function(x)
    local r, byte = "", x:byte()
    for k = 8, 1, -1 do r = r .. (byte % 2 ^ k - byte % 2 ^ (k - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for k = 1, 6 do c = c + (x:sub(k, k) == "1" and 2 ^ (6 - k) or 0) end
    return chars:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#data % 3 + 1])
end

function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  local n = 0
  for path in io.lines(os.getenv("BENCH_LIST")) do
    local f = assert(io.open(path, "rb"))
    local png = f:read("*a")
    f:close()
    n = n + 1
    local png_headers = {["Content-Type"] = "image/png"}
    requests[#requests + 1] = wrk.format("POST", "/v1/embed", png_headers, png)
    requests[#requests + 1] = wrk.format("POST", "/v1/search?k=5", png_headers, png)
    local item = '{"items":[{"id":"soak/' .. (n % 500) .. '","image":"' .. b64(png)
      .. '","metadata":{"n":' .. n .. '}}]}'
    requests[#requests + 1] = wrk.format("POST", "/v1/items", {["Content-Type"] = "application/json"}, item)
  end
  i = math.random(#requests)
end

function request()
  i = i % #requests + 1
  return requests[i]
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
  if (status == 429 or status == 503) and not (headers["retry-after"] or headers["Retry-After"]) then
    missing_retry_after = missing_retry_after + 1
  end
end

function done(summary, latency, reqs)
  local total = {}
  local missing = 0
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("counts")) do total[status] = (total[status] or 0) + n end
    missing = missing + t:get("missing_retry_after")
  end
  local parts = {}
  for status, n in pairs(total) do parts[#parts + 1] = '"' .. status .. '":' .. n end
  io.write('MIXED {"statuses":{' .. table.concat(parts, ",") .. '},"missing_retry_after":' .. missing .. "}\n")
end
