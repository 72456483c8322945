-- wrk script: POST /increment with a valid body, cycling through 4096 random keys so
-- records spread over all partitions as real traffic would. Requests are formatted
-- once per thread in init(), so the load generator does the same (cheap) work for
-- both servers. wrk itself reports "Non-2xx or 3xx responses" if any request failed.
local requests = {}
local count = 4096
local index = 0

local function hex(digits)
  local parts = {}
  for i = 1, digits / 4 do
    parts[i] = string.format("%04x", math.random(0, 0xffff))
  end
  return table.concat(parts)
end

function init(args)
  math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1000000))
  local headers = { ["Content-Type"] = "application/json" }
  for i = 1, count do
    local key = hex(8) .. "-" .. hex(4) .. "-4" .. hex(4):sub(2) .. "-a" .. hex(4):sub(2) .. "-" .. hex(12)
    local body = string.format('{"key":"%s","value":%d}', key, math.random(1, 1000))
    requests[i] = wrk.format("POST", "/increment", headers, body)
  end
end

function request()
  index = index % count + 1
  return requests[index]
end
