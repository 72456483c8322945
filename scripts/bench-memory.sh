#!/usr/bin/env bash
# Memory of a running `tally aggregator` holding 1,000,000 open key-windows: the
# process's resident set (/proc/PID/status) per open key-window, next to the window
# engine's own accounting for the same key-windows.
#
# 1. tansu (as in scripts/bench-aggregator.sh), topic `increments` with 4 partitions,
#    filled by `prefill ... open-windows`: 1,000,000 records, each with its own key,
#    all stamped in the first 8 s of the current 10 s window, so every record opens
#    one key-window and none closes (the watermark stays 4 s short of the end).
# 2. An idle aggregator on an empty topic with as many partitions: the process's
#    fixed cost (runtime, librdkafka, SQLite, metrics) with no window open.
# 3. `tally aggregator --store sqlite://<fresh file> --kafka-option fetch.wait.max.ms=10`
#    on the filled topic, until it has counted every record, reports
#    tally_aggregator_keys_in_memory = 1,000,000, and has flushed them all (the
#    provisional rows are written); then RSS is read twice, 2 s apart.
# 4. `engine_memory`: the same key-windows fed to one engine per partition (same
#    keys, same partitioning) in a separate process: the engines' approx_heap_bytes
#    and how much that process's RSS grew.
#
# Usage: scripts/bench-memory.sh [--records N] [--partitions P] [--no-build] [--keep]
#   --records     key-windows to open (env BENCH_RECORDS, default 1000000)
#   --partitions  partitions (env BENCH_PARTITIONS, default 4)
# Extra aggregator flags: env BENCH_AGGREGATOR_ARGS.
set -euo pipefail

RECORDS="${BENCH_RECORDS:-1000000}"
PARTITIONS="${BENCH_PARTITIONS:-4}"
BUILD=1
KEEP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --records) RECORDS="$2"; shift 2 ;;
    --partitions) PARTITIONS="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
RECORDS="${RECORDS//_/}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }
TANSU="$("$ROOT/scripts/ensure-tansu.sh")"
if [[ "$BUILD" == 1 ]]; then
  cargo build --release -p tally --bin tally >&2
  cargo build --release -p tally-aggregator --example prefill --example engine_memory >&2
fi
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
TALLY="$TARGET_DIR/release/tally"
EXAMPLES="$TARGET_DIR/release/examples"

WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/bench-memory.XXXXXX")"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ "$KEEP" == 1 ]]; then echo "kept $WORK_DIR" >&2; else rm -rf "$WORK_DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_is_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local port
  for _ in $(seq 1 100); do
    port=$((20000 + RANDOM % 40000))
    if ! port_is_open "$port"; then echo "$port"; return 0; fi
  done
  return 1
}
field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }
# KiB of one /proc/PID/status field.
status_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }
metric() { # port name: sum over label sets
  curl -fsS --max-time 2 "http://127.0.0.1:$1/metrics" 2>/dev/null |
    awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%d\n", s }'
}

BROKER_PORT="$(free_port)"
BROKERS="127.0.0.1:$BROKER_PORT"
"$TANSU" broker --listener-url "tcp://$BROKERS" --advertised-listener-url "tcp://$BROKERS" \
  --storage-engine memory://tansu/ >"$WORK_DIR/tansu.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 1 100); do port_is_open "$BROKER_PORT" && break; sleep 0.1; done
port_is_open "$BROKER_PORT" || { cat "$WORK_DIR/tansu.log" >&2; exit 1; }
for topic in increments idle; do
  "$TANSU" topic create "$topic" --partitions "$PARTITIONS" --broker "tcp://$BROKERS" >/dev/null
done
"$TANSU" topic create increments.dlq --partitions 1 --broker "tcp://$BROKERS" >/dev/null

PREFILL="$("$EXAMPLES/prefill" "$BROKERS" increments "$RECORDS" "$RECORDS" 20000 1 open-windows)"
echo "prefill: $PREFILL" >&2
[[ "$(field key_windows "$PREFILL")" == "$RECORDS" ]] || { echo "prefill did not open $RECORDS key-windows" >&2; exit 1; }

start_aggregator() { # name topic port
  # shellcheck disable=SC2086
  "$TALLY" aggregator --brokers "$BROKERS" --topic "$2" --dlq-topic increments.dlq \
    --group "memory-$1-$$" --store "sqlite://$WORK_DIR/$1.sqlite" --flush-interval 1s \
    --kafka-option fetch.wait.max.ms=10 --metrics-listen "127.0.0.1:$3" ${BENCH_AGGREGATOR_ARGS:-} \
    >"$WORK_DIR/$1.log" 2>&1 &
  PIDS+=("$!")
}
wait_for() { # seconds description command...
  local deadline=$((SECONDS + $1)) what="$2"
  shift 2
  until "$@"; do
    ((SECONDS < deadline)) || { echo "timed out waiting for $what" >&2; exit 1; }
    sleep 0.5
  done
}

# ---- idle aggregator ------------------------------------------------------------
IDLE_PORT="$(free_port)"
start_aggregator idle idle "$IDLE_PORT"
IDLE_PID="${PIDS[-1]}"
assigned() { [[ "$(metric "$1" tally_aggregator_assigned_partitions)" -ge "$PARTITIONS" ]]; }
wait_for 60 "the idle aggregator's assignment" assigned "$IDLE_PORT"
sleep 3
IDLE_RSS="$(status_kib "$IDLE_PID" VmRSS)"
kill -TERM "$IDLE_PID"; wait "$IDLE_PID" 2>/dev/null || true

# ---- aggregator with the open key-windows -----------------------------------------
PORT="$(free_port)"
start_aggregator full increments "$PORT"
PID="${PIDS[-1]}"
loaded() {
  [[ "$(metric "$1" tally_aggregator_records_total)" -ge "$RECORDS" &&
     "$(metric "$1" tally_aggregator_keys_in_memory)" -ge "$RECORDS" &&
     "$(metric "$1" tally_aggregator_rows_written_total)" -ge "$RECORDS" ]]
}
wait_for 600 "$RECORDS open key-windows, counted and flushed" loaded "$PORT"
sleep 2
RSS_1="$(status_kib "$PID" VmRSS)"
sleep 2
RSS="$(status_kib "$PID" VmRSS)"
ANON="$(status_kib "$PID" RssAnon)"
FILE="$(status_kib "$PID" RssFile)"
PEAK="$(status_kib "$PID" VmHWM)"
KEY_WINDOWS="$(metric "$PORT" tally_aggregator_keys_in_memory)"
OPEN_WINDOWS="$(metric "$PORT" tally_aggregator_open_windows)"
kill -TERM "$PID"; wait "$PID" 2>/dev/null || true

ENGINE="$("$EXAMPLES/engine_memory" "$RECORDS" "$RECORDS" "$PARTITIONS" 1)"
echo "engine: $ENGINE" >&2
[[ "$(field key_windows "$ENGINE")" == "$KEY_WINDOWS" ]] || echo "note: the engine example opened $(field key_windows "$ENGINE") key-windows, the aggregator $KEY_WINDOWS" >&2

each() { awk -v kib="$1" -v n="$KEY_WINDOWS" 'BEGIN { printf "%.1f", kib * 1024 / n }'; }
mib() { awk -v kib="$1" 'BEGIN { printf "%.1f", kib / 1024 }'; }
echo
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "aggregator holding $KEY_WINDOWS open key-windows in $OPEN_WINDOWS windows over $PARTITIONS partitions (all counted and flushed):"
printf "  %-44s %10s %14s\n" "" "MiB" "bytes each"
printf "  %-44s %10s %14s\n" "process RSS (VmRSS), total" "$(mib "$RSS")" "$(each "$RSS")"
printf "  %-44s %10s %14s\n" "  of which anonymous (RssAnon)" "$(mib "$ANON")" "$(each "$ANON")"
printf "  %-44s %10s %14s\n" "  of which file-backed (RssFile: binary, libs)" "$(mib "$FILE")" "$(each "$FILE")"
printf "  %-44s %10s %14s\n" "process RSS minus an idle aggregator's" "$(mib "$((RSS - IDLE_RSS))")" "$(each "$((RSS - IDLE_RSS))")"
printf "  %-44s %10s %14s\n" "peak RSS during the run (VmHWM)" "$(mib "$PEAK")" "$(each "$PEAK")"
printf "  %-44s %10s\n" "idle aggregator RSS (no window open)" "$(mib "$IDLE_RSS")"
printf "  %-44s %10s\n" "RSS 2 s earlier (steady?)" "$(mib "$RSS_1")"
printf "  %-44s %10s %14s\n" "engine accounting (approx_heap_bytes)" \
  "$(awk -v b="$(field engine_bytes "$ENGINE")" 'BEGIN { printf "%.1f", b / 1048576 }')" "$(field engine_bytes_each "$ENGINE")"
printf "  %-44s %10s %14s\n" "engine alone: its process's RSS growth" \
  "$(awk -v b="$(field rss_growth_bytes "$ENGINE")" 'BEGIN { printf "%.1f", b / 1048576 }')" "$(field rss_growth_each "$ENGINE")"
echo "goal: <= 150 bytes per open key-window, process total: $(awk -v e="$(each "$RSS")" 'BEGIN { print (e <= 150 ? "met" : "NOT met") }')"
