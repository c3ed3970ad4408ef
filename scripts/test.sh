#!/usr/bin/env bash
# Runs keygate's whole test suite. Integration tests start their own redis-server processes on
# free loopback ports (never 6379), so the only thing needed besides Rust is the redis-server
# binary; it is installed here when missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing redis-server and redis-tools" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq redis-server redis-tools >/dev/null
    else
        echo "test.sh: keygate's tests need redis-server. Install it with:" >&2
        echo "    sudo apt-get install -y redis-server redis-tools" >&2
        exit 1
    fi
fi

if [ "${CI:-}" = "true" ]; then
    cargo fmt --all -- --check
    cargo clippy --all-targets --locked -- -D warnings
fi
# The benches run too (a short smoke pass each), so the last lines are theirs: end with one
# summary line of every test binary's counts.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --all-targets --locked 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
