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
#
# It builds keygate with the `profiling` profile, starts nginx as a keep-alive upstream that
# answers `200 ok`, runs keygate under callgrind (one proxy worker, the embedded file store,
# one key), warms it up with wrk, zeroes the counters, drives it for RUN_SECONDS and divides
# the instructions by the requests wrk counted. The callgrind profile is kept for
# `callgrind_annotate`.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in valgrind callgrind_control callgrind_annotate wrk nginx; do
  if ! command -v "$tool" >/dev/null; then
    echo "instructions.sh needs $tool: apt-get install -y valgrind wrk nginx" >&2
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

"$keygate" keys create --keys-file "$dir/keys.toml" --tenant acme --role member \
  --name instructions --output json >"$dir/created.json"
sed -n 's/.*"key": *"\([^"]*\)".*/\1/p' "$dir/created.json" >"$dir/key"
cat >"$dir/wrk.lua" <<EOF
wrk.headers["Authorization"] = "Bearer $(cat "$dir/key")"
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
  RUST_LOG=warn KEYGATE__LOG__ACCESS=false KEYGATE__SERVER__WORKERS=1 \
    "${callgrind[@]}" "$keygate" serve --keys-file "$dir/keys.toml" \
    --listen "127.0.0.1:$proxy" --admin-listen "127.0.0.1:$admin" \
    --upstream "http://127.0.0.1:$upstream" >"$dir/proxy.log" 2>&1 &
fi
target=$!
pids+=("$target")
wait_for "$upstream"
wait_for "$proxy"

wrk -t1 -c"$connections" -d3s -s "$dir/wrk.lua" "http://127.0.0.1:$proxy/things" >/dev/null
callgrind_control -z "$target" >/dev/null 2>&1
requests=$(wrk -t1 -c"$connections" -d"${run_seconds}s" -s "$dir/wrk.lua" \
  "http://127.0.0.1:$proxy/things" | sed -n 's/^REQUESTS //p')
callgrind_control -d "$target" >/dev/null 2>&1
profile=$(ls -t "$dir"/callgrind.out.*.* | head -1)
instructions=$(callgrind_annotate "$profile" 2>/dev/null |
  sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)
echo "${PROXY:-keygate}: requests: $requests; instructions: $instructions; per request: $((instructions / requests))"
echo "profile: $profile (callgrind_annotate --inclusive=yes $profile)"
