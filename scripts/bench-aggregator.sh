#!/usr/bin/env bash
# End-to-end benchmark of `tally aggregator` against a raw rdkafka consumer that
# reads the same pre-filled topic and does nothing, on the same broker, in one run.
#
# The broker is tansu (Kafka-compatible, memory storage, loopback only; installed
# by scripts/ensure-tansu.sh). The topic is filled once by the `prefill` example
# (Zipf(1.0) keys, current timestamps, see aggregator/examples/prefill.rs); then:
#   1. raw_consume (StreamConsumer, the aggregator's consumer settings, fresh group)
#   2. tally aggregator (fresh group, SQLite store in a temp dir, default window,
#      grace and 1 s flush interval), timed through its /metrics until
#      tally_aggregator_records_total (all outcomes) reaches N
#   3. raw_consume again (brackets the noise of a shared machine)
#   4. (reference, not part of the ratio) raw_consume with fetch.wait.max.ms=10 and
#      fetch.queue.backoff.ms=10: tansu answers every fetch only after the full
#      fetch.wait.max.ms (librdkafka default 500 ms), which caps a default-configured
#      consumer near 200k records/s on loopback; this line shows what the broker
#      delivers when that wait is short.
# Every rate is measured from the first record to the N-th (startup and group join
# excluded). After the timed part the aggregator is stopped gracefully and the store
# is checked: rows = distinct (key, window) pairs sent, sum of sums = sum of values.
#
# Usage: scripts/bench-aggregator.sh [--records N] [--partitions P] [--keys K]
#          [--events-per-sec R] [--poll-interval S] [--base] [--no-unthrottled]
#          [--no-build] [--keep]
#   --records        records in the topic (env BENCH_RECORDS, default 1000000)
#   --partitions     partitions of the topic (env BENCH_PARTITIONS, default 4)
#   --keys           distinct keys (env BENCH_KEYS, default 100000)
#   --events-per-sec event-time density (env BENCH_EVENTS_PER_SEC, default 20000)
#   --poll-interval  seconds between /metrics samples (env BENCH_POLL_INTERVAL, 0.2)
#   --base           also time a BaseConsumer (poll loop) for reference
#   --no-unthrottled skip the reference run of step 4
#   --no-build       use the binaries already in target/release
#   --keep           keep the temp dir (logs, SQLite file, metric samples)
# Extra aggregator flags can be passed in env BENCH_AGGREGATOR_ARGS (e.g.
# "--flush-interval 5s"); extra librdkafka settings for the raw consumers of steps
# 1 and 3 in env BENCH_CONSUMER_CONFIG ("name=value name=value"): give the
# aggregator the same ones, or the ratio compares different clients.
# Needs: curl, sqlite3 (for the store check; skipped if missing), a Rust toolchain.
set -euo pipefail

RECORDS="${BENCH_RECORDS:-1000000}"
PARTITIONS="${BENCH_PARTITIONS:-4}"
KEYS="${BENCH_KEYS:-100000}"
EVENTS_PER_SEC="${BENCH_EVENTS_PER_SEC:-20000}"
POLL_INTERVAL="${BENCH_POLL_INTERVAL:-0.2}"
BASE=0
UNTHROTTLED=1
BUILD=1
KEEP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --records) RECORDS="$2"; shift 2 ;;
    --partitions) PARTITIONS="$2"; shift 2 ;;
    --keys) KEYS="$2"; shift 2 ;;
    --events-per-sec) EVENTS_PER_SEC="$2"; shift 2 ;;
    --poll-interval) POLL_INTERVAL="$2"; shift 2 ;;
    --base) BASE=1; shift ;;
    --no-unthrottled) UNTHROTTLED=0; shift ;;
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
  cargo build --release -p tally-aggregator --example prefill --example raw_consume >&2
fi
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
TALLY="$TARGET_DIR/release/tally"
EXAMPLES="$TARGET_DIR/release/examples"

WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/bench-aggregator.XXXXXX")"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ "$KEEP" == 1 ]]; then
    echo "kept $WORK_DIR" >&2
  else
    rm -rf "$WORK_DIR"
  fi
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
  echo "no free loopback port found" >&2
  return 1
}

# CPU seconds (user + system) used so far by a running process.
cpu_ticks() { local f; read -r -a f <"/proc/$1/stat"; echo $((f[13] + f[14])); }
TICKS="$(getconf CLK_TCK)"

# ---- broker -----------------------------------------------------------------
BROKER_PORT="$(free_port)"
BROKERS="127.0.0.1:$BROKER_PORT"
"$TANSU" broker --listener-url "tcp://$BROKERS" --advertised-listener-url "tcp://$BROKERS" \
  --storage-engine memory://tansu/ >"$WORK_DIR/tansu.log" 2>&1 &
TANSU_PID=$!
PIDS+=("$TANSU_PID")
for _ in $(seq 1 100); do port_is_open "$BROKER_PORT" && break; sleep 0.1; done
port_is_open "$BROKER_PORT" || { cat "$WORK_DIR/tansu.log" >&2; echo "tansu did not start" >&2; exit 1; }
TOPIC="increments"
"$TANSU" topic create "$TOPIC" --partitions "$PARTITIONS" --broker "tcp://$BROKERS" >/dev/null
"$TANSU" topic create "$TOPIC.dlq" --partitions 1 --broker "tcp://$BROKERS" >/dev/null

echo "tansu on $BROKERS; prefilling $RECORDS records ($KEYS keys, $PARTITIONS partitions)..." >&2
PREFILL="$("$EXAMPLES/prefill" "$BROKERS" "$TOPIC" "$RECORDS" "$KEYS" "$EVENTS_PER_SEC")"
echo "prefill: $PREFILL" >&2
field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; } # name line
EXPECTED_SUM="$(field sum "$PREFILL")"
EXPECTED_ROWS="$(field key_windows "$PREFILL")"
PRODUCE_RATE="$(field rate "$PREFILL")"

RUN_ID="$$-$RANDOM"
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---- raw consumer -----------------------------------------------------------
# Prints "rate cpu_seconds startup_seconds".
raw_consume() { # group mode [extra librdkafka settings]
  local out="$WORK_DIR/raw-$1.txt" before after line
  before="$(cpu_ticks "$TANSU_PID")"
  local TIMEFORMAT='%U %S'
  { time RAW_CONSUME_EXTRA="${3:-${BENCH_CONSUMER_CONFIG:-}}" "$EXAMPLES/raw_consume" "$BROKERS" "$TOPIC" "$1" "$RECORDS" "$2" >"$out" 2>"$WORK_DIR/raw-$1.log"; } 2>"$WORK_DIR/raw-$1.time"
  after="$(cpu_ticks "$TANSU_PID")"
  line="$(cat "$out")"
  echo "raw ($2, group $1): $line" >&2
  local cpu
  cpu="$(awk '{ printf "%.2f", $1 + $2 }' "$WORK_DIR/raw-$1.time")"
  echo "$(field rate "$line") $(field seconds "$line") $cpu $(( after - before )) $(field first_record_after "$line")"
}

read -r RAW1_RATE RAW1_SECONDS RAW1_CPU RAW1_BROKER_TICKS RAW1_STARTUP < <(raw_consume "raw1-$RUN_ID" stream)

# ---- aggregator ---------------------------------------------------------------
METRICS_PORT="$(free_port)"
STORE_PATH="$WORK_DIR/bench.sqlite"
# shellcheck disable=SC2086 # BENCH_AGGREGATOR_ARGS is a list of flags
"$TALLY" aggregator --brokers "$BROKERS" --topic "$TOPIC" --dlq-topic "$TOPIC.dlq" \
  --group "bench-$RUN_ID" --store "sqlite://$STORE_PATH" \
  --metrics-listen "127.0.0.1:$METRICS_PORT" ${BENCH_AGGREGATOR_ARGS:-} \
  >"$WORK_DIR/aggregator.log" 2>&1 &
AGG_PID=$!
PIDS+=("$AGG_PID")
AGG_STARTED="$EPOCHREALTIME"

# One sample: "time records rows_written aggregator_cpu_ticks broker_cpu_ticks
# flush_seconds_sum flushes".
sample() {
  local now="$EPOCHREALTIME" metrics
  metrics="$(curl -fsS --max-time 2 "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null)" || return 1
  printf '%s\n' "$metrics" >"$WORK_DIR/aggregator-metrics.txt"
  awk -v now="$now" -v agg="$(cpu_ticks "$AGG_PID")" -v broker="$(cpu_ticks "$TANSU_PID")" '
    /^tally_aggregator_records_total/ { records += $2 }
    /^tally_aggregator_rows_written_total/ { rows += $2 }
    /^tally_aggregator_flush_duration_seconds_sum/ { flush = $2 }
    /^tally_aggregator_flush_duration_seconds_count/ { flushes = $2 }
    END { printf "%s %d %d %d %d %.6f %d\n", now, records, rows, agg, broker, flush, flushes }
  ' <<<"$metrics"
}

SAMPLES="$WORK_DIR/aggregator-samples.txt"
: >"$SAMPLES"
DEADLINE=$((SECONDS + 600))
while :; do
  kill -0 "$AGG_PID" 2>/dev/null || { cat "$WORK_DIR/aggregator.log" >&2; echo "aggregator exited" >&2; exit 1; }
  ((SECONDS < DEADLINE)) || { echo "aggregator did not consume $RECORDS records in time" >&2; exit 1; }
  if line="$(sample)"; then
    echo "$line" >>"$SAMPLES"
    read -r _ count _ _ _ <<<"$line"
    ((count >= RECORDS)) && break
  fi
  sleep "$POLL_INTERVAL"
done

# First sample with records > 0 starts the clock; the N-th record's time is
# interpolated between the last two samples.
read -r AGG_RATE AGG_SECONDS AGG_STARTUP AGG_CPU AGG_BROKER_TICKS AGG_ROWS AGG_FLUSH_SECONDS AGG_FLUSHES < <(awk -v n="$RECORDS" -v start="$AGG_STARTED" -v ticks="$TICKS" '
  $2 > 0 && !t0 { t0 = $1; c0 = $2; a0 = $4; b0 = $5; f0 = $6; k0 = $7 }
  { if ($2 >= n && !t1) { t1 = pt + (n - pc) / ($2 - pc) * ($1 - pt); a1 = $4; b1 = $5; r1 = $3; f1 = $6; k1 = $7 } pt = $1; pc = $2 }
  END {
    printf "%.0f %.3f %.2f %.2f %d %d %.3f %d\n", (n - c0) / (t1 - t0), t1 - t0, t0 - start, (a1 - a0) / ticks, b1 - b0, r1, f1 - f0, k1 - k0
  }' "$SAMPLES")
echo "aggregator: rate=$AGG_RATE seconds=$AGG_SECONDS (first records after ${AGG_STARTUP}s), rows written so far $AGG_ROWS" >&2

# Graceful stop: the final flush writes every open window; then check the store.
kill -TERM "$AGG_PID"
for _ in $(seq 1 300); do kill -0 "$AGG_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$AGG_PID" 2>/dev/null; then echo "aggregator did not stop within 30 s" >&2; exit 1; fi
wait "$AGG_PID" 2>/dev/null || true
STORE_CHECK="skipped (no sqlite3)"
STORE_ROWS="?"
if command -v sqlite3 >/dev/null; then
  IFS='|' read -r STORE_ROWS STORE_SUM STORE_COUNT < <(sqlite3 "$STORE_PATH" \
    'SELECT count(*), sum(sum), sum(count) FROM window_sums;')
  if [[ "$STORE_ROWS" == "$EXPECTED_ROWS" && "$STORE_SUM" == "$EXPECTED_SUM" && "$STORE_COUNT" == "$RECORDS" ]]; then
    STORE_CHECK="ok ($STORE_ROWS rows, sum $STORE_SUM, count $STORE_COUNT)"
  else
    STORE_CHECK="MISMATCH: rows $STORE_ROWS/$EXPECTED_ROWS, sum $STORE_SUM/$EXPECTED_SUM, count $STORE_COUNT/$RECORDS"
  fi
fi

read -r RAW2_RATE RAW2_SECONDS RAW2_CPU RAW2_BROKER_TICKS RAW2_STARTUP < <(raw_consume "raw2-$RUN_ID" stream)
if [[ "$UNTHROTTLED" == 1 ]]; then
  read -r FAST_RATE FAST_SECONDS FAST_CPU FAST_BROKER_TICKS FAST_STARTUP < <(raw_consume "fast-$RUN_ID" stream "fetch.wait.max.ms=10 fetch.queue.backoff.ms=10")
fi
if [[ "$BASE" == 1 ]]; then
  read -r BASE_RATE BASE_SECONDS BASE_CPU BASE_BROKER_TICKS BASE_STARTUP < <(raw_consume "base-$RUN_ID" base)
fi

# ---- report -----------------------------------------------------------------
RAW_MEAN="$(awk -v a="$RAW1_RATE" -v b="$RAW2_RATE" 'BEGIN { printf "%.0f", (a + b) / 2 }')"
RATIO="$(awk -v a="$AGG_RATE" -v b="$RAW_MEAN" 'BEGIN { printf "%.2f", a / b }')"
per_record() { awk -v c="$1" -v s="$2" -v r="$3" 'BEGIN { printf "%.2f", c / s / r * 1e6 }'; } # cpu secs rate -> us/record
broker_cpu() { awk -v t="$1" -v k="$TICKS" -v s="$2" 'BEGIN { printf "%.2f", t / k / s }'; } # ticks secs -> cores

LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

echo
echo "machine: $(nproc) cores, load average $LOAD_BEFORE before, $LOAD_AFTER after (other work on the machine skews all rates)"
[[ -z "${BENCH_CONSUMER_CONFIG:-}" ]] || echo "raw consumers #1/#2 with: $BENCH_CONSUMER_CONFIG"
echo "tansu memory://, $PARTITIONS partitions, $RECORDS records, $KEYS keys (Zipf 1.0), $EVENTS_PER_SEC records per event-second; produced at $PRODUCE_RATE/s"
echo "rates from the first record to the $RECORDS-th; CPU = process CPU (user+sys) over the timed part"
printf "%-22s %12s %9s %14s %14s\n" consumer "records/s" "seconds" "consumer cores" "broker cores"
printf "%-22s %12s %9s %14s %14s\n" "raw StreamConsumer #1" "$RAW1_RATE" "$RAW1_SECONDS" "~$(awk -v c="$RAW1_CPU" -v s="$RAW1_SECONDS" 'BEGIN { printf "%.2f", c / s }')" "$(broker_cpu "$RAW1_BROKER_TICKS" "$RAW1_SECONDS")"
printf "%-22s %12s %9s %14s %14s\n" "tally aggregator" "$AGG_RATE" "$AGG_SECONDS" "$(awk -v c="$AGG_CPU" -v s="$AGG_SECONDS" 'BEGIN { printf "%.2f", c / s }')" "$(broker_cpu "$AGG_BROKER_TICKS" "$AGG_SECONDS")"
printf "%-22s %12s %9s %14s %14s\n" "raw StreamConsumer #2" "$RAW2_RATE" "$RAW2_SECONDS" "~$(awk -v c="$RAW2_CPU" -v s="$RAW2_SECONDS" 'BEGIN { printf "%.2f", c / s }')" "$(broker_cpu "$RAW2_BROKER_TICKS" "$RAW2_SECONDS")"
if [[ "$UNTHROTTLED" == 1 ]]; then
  printf "%-22s %12s %9s %14s %14s\n" "raw, fetch wait 10ms" "$FAST_RATE" "$FAST_SECONDS" "~$(awk -v c="$FAST_CPU" -v s="$FAST_SECONDS" 'BEGIN { printf "%.2f", c / s }')" "$(broker_cpu "$FAST_BROKER_TICKS" "$FAST_SECONDS")"
fi
if [[ "$BASE" == 1 ]]; then
  printf "%-22s %12s %9s %14s %14s\n" "raw BaseConsumer" "$BASE_RATE" "$BASE_SECONDS" "~$(awk -v c="$BASE_CPU" -v s="$BASE_SECONDS" 'BEGIN { printf "%.2f", c / s }')" "$(broker_cpu "$BASE_BROKER_TICKS" "$BASE_SECONDS")"
fi
echo "aggregator CPU: $(per_record "$AGG_CPU" "$AGG_SECONDS" "$AGG_RATE") us per record over the timed part ($AGG_CPU s)"
echo "store flushes in the timed part: $AGG_FLUSHES taking $AGG_FLUSH_SECONDS s in all ($(awk -v f="$AGG_FLUSH_SECONDS" -v s="$AGG_SECONDS" 'BEGIN { printf "%.0f", 100 * f / s }') % of it)"
echo "rows written during the timed part: $AGG_ROWS (aggregator flags: ${BENCH_AGGREGATOR_ARGS:-defaults, 1 s flush interval}); store after graceful stop: $STORE_CHECK"
echo "ratio aggregator / mean(raw #1, raw #2 = $RAW_MEAN): $RATIO (target >= 0.80)"
echo "(raw consumer CPU '~' includes its startup and group join; 'raw, fetch wait 10ms' is a reference, not part of the ratio)"
