-- wrk script: POST a different image file each request (raw body, image/png).
-- BENCH_LIST names a file holding one image path per line.
local bodies = {}
local i = 0

function init(args)
  for path in io.lines(os.getenv("BENCH_LIST")) do
    local f = assert(io.open(path, "rb"))
    bodies[#bodies + 1] = f:read("*a")
    f:close()
  end
  i = math.random(#bodies)
end

function request()
  i = i % #bodies + 1
  return wrk.format("POST", nil, {["Content-Type"] = "image/png"}, bodies[i])
end
