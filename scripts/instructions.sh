#!/usr/bin/env bash
# User-space instructions per request on keygate's cached path, counted by callgrind: unlike
# requests per second, this figure does not move with the machine's other load, so it shows
# small before/after changes. The kernel's share (the TCP work) is not counted.
#
#   scripts/instructions.sh            # needs valgrind, wrk and nginx
#   RUN_SECONDS=20 CONNECTIONS=16 scripts/instructions.sh
#   PROXY=nginx scripts/instructions.sh   # the same count for nginx as a plain proxy_pass
#   KEYGATE_BIN=path/to/keygate scripts/instructions.sh   # a binary already built (a release
#                                         # build counts the same instructions), e.g. to compare
#                                         # two commits without two profiling builds
#   MODE=miss scripts/instructions.sh     # the miss path: needs redis-server, python3, curl too
#   MODE=miss MISS_KEYS=50000 MISS_CACHE=1000 scripts/instructions.sh
#
# It builds keygate with the `profiling` profile, starts nginx as a keep-alive upstream that
# answers `200 ok`, runs keygate under callgrind (one proxy worker, the embedded file store,
# one key), warms it up with wrk, zeroes the counters, drives it for RUN_SECONDS and divides
# the instructions by the requests wrk counted. The callgrind profile is kept for
# `callgrind_annotate`.
#
# MODE=miss counts the miss path instead, as the load harness's miss row drives it: keygate on
# a Redis store (a redis-server of its own on a free port) holding MISS_KEYS records (default
# 50,000, written straight into Redis with the fields `keys create` wrote for a first key),
# a cache of MISS_CACHE verdicts (default 1,000), and wrk sending a random one of the keys per
# request. It also prints the share of requests that went to the store (from /metrics), so the
# figure per request is nearly the figure per miss.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${MODE:-cached}
tools=(valgrind callgrind_control callgrind_annotate wrk nginx)
if [ "$mode" = miss ]; then tools+=(redis-server redis-cli python3 curl); fi
for tool in "${tools[@]}"; do
  if ! command -v "$tool" >/dev/null; then
    echo "instructions.sh needs $tool: apt-get install -y valgrind wrk nginx redis-server curl" >&2
    exit 2
  fi
done

run_seconds=${RUN_SECONDS:-10}
connections=${CONNECTIONS:-8}
dir=$(mktemp -d /tmp/keygate-instructions.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# A port nothing listens on.
free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
}

wait_for() {
  for _ in $(seq 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on port $1: see $dir" >&2
  exit 1
}

if [ -n "${KEYGATE_BIN:-}" ]; then
  keygate=$KEYGATE_BIN
else
  cargo build --profile profiling --quiet
  keygate=${CARGO_TARGET_DIR:-target}/profiling/keygate
fi

upstream=$(free_port)
cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  server { listen 127.0.0.1:$upstream; location / { return 200 "ok"; } }
}
EOF
nginx -p "$dir" -c "$dir/nginx.conf" -g "daemon off;" 2>"$dir/nginx.log" &
pids+=($!)

store=(--keys-file "$dir/keys.toml")
if [ "$mode" = miss ]; then
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$dir" >"$dir/redis.log" 2>&1 &
  pids+=($!)
  wait_for "$redis_port"
  store=(--redis-url "redis://127.0.0.1:$redis_port" --namespace instructions)
fi

"$keygate" "${store[@]}" keys create --tenant acme --role member \
  --name instructions --output json >"$dir/created.json"
sed -n 's/.*"key": *"\([^"]*\)".*/\1/p' "$dir/created.json" >"$dir/key"
if [ "$mode" = miss ]; then
  # MISS_KEYS more records like the first (its fields, a fresh id each), in one pipe.
  first=$(python3 -c 'import hashlib,sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())' \
    "$(cat "$dir/key")")
  redis-cli -p "$redis_port" --raw hgetall "instructions:key:$first" >"$dir/fields"
  python3 - "${MISS_KEYS:-50000}" "$dir/fields" "$dir/keys" "$dir/records.resp" <<'PY'
import hashlib, secrets, sys, zlib
n, fields_path, keys_path, resp_path = int(sys.argv[1]), *sys.argv[2:]
alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
lines = open(fields_path).read().split("\n")
fields = dict(zip(lines[0::2], lines[1::2]))
assert "id" in fields and "tenant" in fields, "the first record was not found"
def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)
with open(keys_path, "w") as keys, open(resp_path, "wb") as cmds:
    for i in range(n):
        body = "kgu_" + "".join(secrets.choice(alphabet) for _ in range(43))
        crc, check = zlib.crc32(body.encode()), ""
        for _ in range(6):
            check = alphabet[crc % 62] + check
            crc //= 62
        key = body + check
        keys.write(key + "\n")
        record = dict(fields, id="key_miss%07d" % i)
        args = ["HSET", "instructions:key:" + hashlib.sha256(key.encode()).hexdigest()]
        for f, v in record.items():
            args += [f, v]
        cmds.write(resp(*args))
PY
  redis-cli -p "$redis_port" --pipe <"$dir/records.resp" >"$dir/pipe.log"
  cat >"$dir/wrk.lua" <<'EOF'
local keys = {}
init = function(args)
  math.randomseed(os.time())
  for line in io.lines(args[1]) do keys[#keys + 1] = line end
end
request = function()
  return wrk.format("GET", "/things", { ["Authorization"] = "Bearer " .. keys[math.random(#keys)] })
end
EOF
else
  cat >"$dir/wrk.lua" <<EOF
wrk.headers["Authorization"] = "Bearer $(cat "$dir/key")"
EOF
fi
cat >>"$dir/wrk.lua" <<'EOF'
done = function(summary) io.write(string.format("REQUESTS %d\n", summary.requests)) end
EOF

proxy=$(free_port)
admin=$(free_port)
callgrind=(valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out.%p")
if [ "${PROXY:-keygate}" = nginx ]; then
  # One nginx process (no master), keepalive to the upstream, like the load harness's.
  cat >"$dir/proxy.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $dir/proxy.pid;
error_log $dir/proxy-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  upstream app { server 127.0.0.1:$upstream; keepalive 64; }
  server {
    listen 127.0.0.1:$proxy;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
  "${callgrind[@]}" nginx -p "$dir" -c "$dir/proxy.conf" >"$dir/proxy.log" 2>&1 &
else
  settings=(RUST_LOG=warn KEYGATE__LOG__ACCESS=false KEYGATE__SERVER__WORKERS=1)
  if [ "$mode" = miss ]; then settings+=("KEYGATE__CACHE__CAPACITY=${MISS_CACHE:-1000}"); fi
  env "${settings[@]}" "${callgrind[@]}" "$keygate" "${store[@]}" serve \
    --listen "127.0.0.1:$proxy" --admin-listen "127.0.0.1:$admin" \
    --upstream "http://127.0.0.1:$upstream" >"$dir/proxy.log" 2>&1 &
fi
target=$!
pids+=("$target")
wait_for "$upstream"
wait_for "$proxy"

# The miss mode's script reads its keys from the file named after `--`.
args=(--)
if [ "$mode" = miss ]; then args+=("$dir/keys"); fi
lookups() {
  curl -s "http://127.0.0.1:$admin/metrics" | sed -n 's/^keygate_store_lookups_total //p'
}
wrk -t1 -c"$connections" -d3s -s "$dir/wrk.lua" "http://127.0.0.1:$proxy/things" "${args[@]}" \
  >/dev/null
if [ "$mode" = miss ]; then before=$(lookups); fi
callgrind_control -z "$target" >/dev/null 2>&1
requests=$(wrk -t1 -c"$connections" -d"${run_seconds}s" -s "$dir/wrk.lua" \
  "http://127.0.0.1:$proxy/things" "${args[@]}" | sed -n 's/^REQUESTS //p')
callgrind_control -d "$target" >/dev/null 2>&1
if [ "$mode" = miss ]; then
  misses=$(($(lookups) - before))
  echo "miss: requests: $requests; store lookups: $misses ($((misses * 100 / requests))%)"
fi
profile=$(ls -t "$dir"/callgrind.out.*.* | head -1)
instructions=$(callgrind_annotate "$profile" 2>/dev/null |
  sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)
echo "${PROXY:-keygate} ($mode): requests: $requests; instructions: $instructions; per request: $((instructions / requests))"
echo "profile: $profile (callgrind_annotate --inclusive=yes $profile)"
