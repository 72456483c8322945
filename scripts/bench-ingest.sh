#!/usr/bin/env bash
# Benchmarks POST /increment of the real ingest edge (in-process librdkafka mock
# cluster, every 202 waits for acks=all) against a bare hyper server that answers 202
# without work: same machine, same load generator (wrk), same settings, one run.
#
# Usage: scripts/bench-ingest.sh [duration=20s] [connections=64] [threads=2] [linger=500us]
# Needs: wrk (Debian package `wrk`), curl, a Rust toolchain.
# Optional: TANSU_BIN=/path/to/tansu adds a third run against a real Kafka-protocol
# broker process (tansu, in-memory storage) instead of the in-process mock cluster.
set -euo pipefail

DURATION="${1:-20s}"
CONNECTIONS="${2:-64}"
THREADS="${3:-2}"
LINGER="${4:-500us}"
WARMUP="5s"
BARE_ADDR="127.0.0.1:18081"
INGEST_ADDR="127.0.0.1:18082"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LUA="$ROOT/ingest/benches/post_increment.lua"
cd "$ROOT"

command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }

cargo build --release -p tally-ingest --example bare_server --example bench_ingest >&2
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
EXAMPLES="$TARGET_DIR/release/examples"

SERVER_PID=""
stop_server() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap stop_server EXIT

wait_until_up() { # url
  for _ in $(seq 1 100); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "server at $1 did not come up" >&2
  exit 1
}

# Prints "requests_per_second p50_ms p99_ms non_2xx" from a wrk --latency report.
summarize() { # wrk-output-file
  awk '
    function ms(value) {
      if (value ~ /us$/) { sub(/us$/, "", value); return value / 1000 }
      if (value ~ /ms$/) { sub(/ms$/, "", value); return value + 0 }
      if (value ~ /s$/)  { sub(/s$/, "", value);  return value * 1000 }
      return value
    }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    $1 == "Requests/sec:" { rps = $2 }
    /Non-2xx or 3xx responses:/ { errors = $NF }
    END { printf "%s %.3f %.3f %d\n", rps, p50, p99, errors }
  ' "$1"
}

run_wrk() { # name url
  local report="$WORK_DIR/$1.txt"
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" -s "$LUA" "$2" >/dev/null
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$LUA" "$2" >"$report"
  echo "---- $1 ----" >&2
  cat "$report" >&2
}

WORK_DIR="$(mktemp -d)"

"$EXAMPLES/bare_server" "$BARE_ADDR" >&2 &
SERVER_PID=$!
wait_until_up "http://$BARE_ADDR/"
run_wrk bare "http://$BARE_ADDR/increment"
stop_server

"$EXAMPLES/bench_ingest" "$INGEST_ADDR" "$LINGER" >&2 &
SERVER_PID=$!
wait_until_up "http://$INGEST_ADDR/readyz"
run_wrk ingest "http://$INGEST_ADDR/increment"
stop_server

if [[ -n "${TANSU_BIN:-}" && -x "${TANSU_BIN}" ]]; then
  TANSU_PORT=19092
  "$TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$TANSU_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$TANSU_PORT" --storage-engine memory://tansu/ --silent >&2 &
  TANSU_PID=$!
  sleep 2
  "$TANSU_BIN" topic create --broker "tcp://127.0.0.1:$TANSU_PORT" --partitions 6 increments >&2
  KAFKA_BROKERS="127.0.0.1:$TANSU_PORT" "$EXAMPLES/bench_ingest" "$INGEST_ADDR" "$LINGER" >&2 &
  SERVER_PID=$!
  wait_until_up "http://$INGEST_ADDR/readyz"
  run_wrk ingest-tansu "http://$INGEST_ADDR/increment"
  stop_server
  kill -TERM "$TANSU_PID" 2>/dev/null || true
  wait "$TANSU_PID" 2>/dev/null || true
fi

read -r BARE_RPS BARE_P50 BARE_P99 BARE_ERRORS < <(summarize "$WORK_DIR/bare.txt")
read -r INGEST_RPS INGEST_P50 INGEST_P99 INGEST_ERRORS < <(summarize "$WORK_DIR/ingest.txt")
RATIO="$(awk -v a="$INGEST_RPS" -v b="$BARE_RPS" 'BEGIN { printf "%.2f", a / b }')"

echo
echo "machine: $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), kernel $(uname -r), load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency (keep-alive), POST /increment, linger $LINGER"
printf "%-8s %12s %10s %10s %8s\n" server "requests/s" "p50 ms" "p99 ms" "non-2xx"
printf "%-8s %12s %10s %10s %8s\n" bare "$BARE_RPS" "$BARE_P50" "$BARE_P99" "$BARE_ERRORS"
printf "%-8s %12s %10s %10s %8s\n" ingest "$INGEST_RPS" "$INGEST_P50" "$INGEST_P99" "$INGEST_ERRORS"
if [[ -f "$WORK_DIR/ingest-tansu.txt" ]]; then
  read -r TANSU_RPS TANSU_P50 TANSU_P99 TANSU_ERRORS < <(summarize "$WORK_DIR/ingest-tansu.txt")
  printf "%-8s %12s %10s %10s %8s   (ingest against a tansu broker process)\n" tansu "$TANSU_RPS" "$TANSU_P50" "$TANSU_P99" "$TANSU_ERRORS"
fi
echo "ratio ingest/bare: $RATIO (target >= 0.60)"
rm -rf "$WORK_DIR"
