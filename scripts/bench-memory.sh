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
#    This runs twice: with glibc's malloc defaults, and with
#    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072 (a fixed threshold, so large
#    freed blocks go back to the kernel instead of staying in malloc's heaps).
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

# Idle markers off (--idle-after 0s): once the topic is read, the partitions are idle,
# and a marker would close every window (emptying the engine) before the figures are
# taken whenever the run is slower than the window's remaining wall-clock time.
start_aggregator() { # name topic port [VAR=value for its environment]
  local with_env=(env)
  [[ -z "${4:-}" ]] || with_env+=("$4")
  # shellcheck disable=SC2086
  "${with_env[@]}" "$TALLY" aggregator --brokers "$BROKERS" --topic "$2" --dlq-topic increments.dlq \
    --group "memory-$1-$$" --store "sqlite://$WORK_DIR/$1.sqlite" --flush-interval 1s \
    --kafka-option fetch.wait.max.ms=10 --metrics-listen "127.0.0.1:$3" --idle-after 0s ${BENCH_AGGREGATOR_ARGS:-} \
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
# Each variant reads the whole topic in its own group and store; prints one line of
# "name=value" figures (KiB) and keeps its smaps.
loaded() {
  [[ "$(metric "$1" tally_aggregator_records_total)" -ge "$RECORDS" &&
     "$(metric "$1" tally_aggregator_keys_in_memory)" -ge "$RECORDS" &&
     "$(metric "$1" tally_aggregator_rows_written_total)" -ge "$RECORDS" ]]
}
measure() { # name [VAR=value for the aggregator's environment]; figures in $WORK_DIR/name.figures
  local name="$1" port pid
  port="$(free_port)"
  start_aggregator "$name" increments "$port" "${2:-}"
  pid="${PIDS[-1]}"
  wait_for 600 "$RECORDS open key-windows, counted and flushed ($name)" loaded "$port"
  sleep 2
  local earlier
  earlier="$(status_kib "$pid" VmRSS)"
  sleep 2
  cp "/proc/$pid/smaps" "$WORK_DIR/$name.smaps"
  echo "rss=$(status_kib "$pid" VmRSS) anon=$(status_kib "$pid" RssAnon) file=$(status_kib "$pid" RssFile) peak=$(status_kib "$pid" VmHWM) earlier=$earlier key_windows=$(metric "$port" tally_aggregator_keys_in_memory) windows=$(metric "$port" tally_aggregator_open_windows)" >"$WORK_DIR/$name.figures"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
}
# glibc raises its mmap threshold as large blocks are freed, after which freed
# memory (librdkafka's prefetched fetch buffers, the flush's row vectors) stays in
# its heaps; a fixed threshold returns large blocks to the kernel on free.
TUNABLE="GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072"
measure defaults
measure tuned "$TUNABLE"
DEFAULT="$(cat "$WORK_DIR/defaults.figures")"
TUNED="$(cat "$WORK_DIR/tuned.figures")"
KEY_WINDOWS="$(field key_windows "$DEFAULT")"
OPEN_WINDOWS="$(field windows "$DEFAULT")"

ENGINE="$("$EXAMPLES/engine_memory" "$RECORDS" "$RECORDS" "$PARTITIONS" 1)"
echo "engine: $ENGINE" >&2
[[ "$(field key_windows "$ENGINE")" == "$KEY_WINDOWS" ]] || echo "note: the engine example opened $(field key_windows "$ENGINE") key-windows, the aggregator $KEY_WINDOWS" >&2

each() { awk -v kib="$1" -v n="$KEY_WINDOWS" 'BEGIN { printf "%.1f", kib * 1024 / n }'; }
mib() { awk -v kib="$1" 'BEGIN { printf "%.1f", kib / 1024 }'; }
row() { # label kib-default kib-tuned
  printf "  %-46s %9s %9s %12s %12s\n" "$1" "$(mib "$2")" "$(mib "$3")" "$(each "$2")" "$(each "$3")"
}
# Resident memory by mapping: glibc's main heap, its per-thread arenas (anonymous
# read-write mappings starting on a 64 MiB boundary), other anonymous mappings
# (large malloc blocks such as the engine's tables, thread stacks), files.
by_mapping() { # smaps -> "kind|kib" lines
  awk '
    function hex(text,    i, value) {
      value = 0
      for (i = 1; i <= length(text); i++) value = value * 16 + index("0123456789abcdef", substr(text, i, 1)) - 1
      return value
    }
    /^[0-9a-f]+-[0-9a-f]+ / {
      split($1, range, "-"); start = hex(range[1])
      path = (NF >= 6) ? $6 : ""
      if (path == "[heap]") kind = "glibc main heap ([heap])"
      else if (path ~ /^\[stack/) kind = "main thread stack"
      else if (path != "") kind = "files (binary, libraries)"
      else if ($2 == "rw-p" && start - int(start / 67108864) * 67108864 == 0) kind = "glibc per-thread arenas"
      else if ($2 == "rw-p") kind = "other anonymous (large blocks, stacks)"
      else kind = "other"
      next
    }
    /^Rss:/ { rss[kind] += $2 }
    END { for (k in rss) printf "%s|%d\n", k, rss[k] }
  ' "$1"
}
kib_of() { awk -F'|' -v k="$2" '$1 == k { v = $2 } END { print v + 0 }' <<<"$1"; }

echo
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "aggregator holding $KEY_WINDOWS open key-windows in $OPEN_WINDOWS windows over $PARTITIONS partitions (all counted and flushed)"
echo "columns: glibc defaults | with $TUNABLE"
printf "  %-46s %9s %9s %12s %12s\n" "" "MiB" "MiB" "bytes each" "bytes each"
row "process RSS (VmRSS), total" "$(field rss "$DEFAULT")" "$(field rss "$TUNED")"
row "  of which anonymous (RssAnon)" "$(field anon "$DEFAULT")" "$(field anon "$TUNED")"
row "  of which file-backed (RssFile: binary, libs)" "$(field file "$DEFAULT")" "$(field file "$TUNED")"
row "process RSS minus an idle aggregator's" "$(( $(field rss "$DEFAULT") - IDLE_RSS ))" "$(( $(field rss "$TUNED") - IDLE_RSS ))"
row "peak RSS during the run (VmHWM)" "$(field peak "$DEFAULT")" "$(field peak "$TUNED")"
row "RSS 2 s earlier (steady?)" "$(field earlier "$DEFAULT")" "$(field earlier "$TUNED")"
DEFAULT_MAPS="$(by_mapping "$WORK_DIR/defaults.smaps")"
TUNED_MAPS="$(by_mapping "$WORK_DIR/tuned.smaps")"
for kind in "glibc main heap ([heap])" "glibc per-thread arenas" "other anonymous (large blocks, stacks)" "files (binary, libraries)"; do
  row "  $kind" "$(kib_of "$DEFAULT_MAPS" "$kind")" "$(kib_of "$TUNED_MAPS" "$kind")"
done
printf "  %-46s %9s\n" "idle aggregator RSS (no window open)" "$(mib "$IDLE_RSS")"
printf "  %-46s %9s %9s %12s\n" "engine accounting (approx_heap_bytes)" \
  "$(awk -v b="$(field engine_bytes "$ENGINE")" 'BEGIN { printf "%.1f", b / 1048576 }')" "" "$(field engine_bytes_each "$ENGINE")"
printf "  %-46s %9s %9s %12s\n" "engine alone: its process's RSS growth" \
  "$(awk -v b="$(field rss_growth_bytes "$ENGINE")" 'BEGIN { printf "%.1f", b / 1048576 }')" "" "$(field rss_growth_each "$ENGINE")"
verdict() { awk -v e="$(each "$1")" 'BEGIN { print (e <= 150 ? "met" : "NOT met") }'; }
echo "goal <= 150 bytes per open key-window, process total: $(verdict "$(field rss "$DEFAULT")") with glibc defaults, $(verdict "$(field rss "$TUNED")") with the fixed mmap threshold"
