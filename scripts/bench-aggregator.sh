#!/usr/bin/env bash
# End-to-end benchmark of `tally aggregator` against a raw rdkafka consumer that
# reads the same pre-filled topic and does nothing, on the same broker, in one run.
#
# The broker is tansu (Kafka-compatible, memory storage, loopback only; installed
# by scripts/ensure-tansu.sh). The topic is filled once by the `prefill` example:
# by default 3,000,000 increments in 4 partitions over 100,000 keys, Zipf(1.0)
# popularity, event time advancing 20 records/ms, jitter up to 1.5 s (inside the
# 2 s grace), so nothing is late, future-stamped or poison. Then, each consumer in
# a fresh group reading from the beginning:
#
#   headline, uncapped (fetch.wait.max.ms=10 on both sides: tansu holds every
#   fetch for the full fetch.wait.max.ms, so librdkafka's 500 ms default caps any
#   consumer near 200k records/s; a real Kafka broker answers as soon as data is
#   there, so this is the comparison that matters in production):
#     1. raw: an rdkafka BaseConsumer poll loop (aggregator/examples/raw_consume.rs)
#     2. tally aggregator --store sqlite://<fresh file> --kafka-option fetch.wait.max.ms=10
#        --flush-interval 1s (every other flag at its default)
#     3. (--also-tally) the same with other tally binaries, e.g. one built from main
#     4. (--large-store) the same on a store already holding that many rows of
#        earlier windows (filled once by aggregator/examples/fill_store.rs, copied
#        per run): the cost must stay flat as the store grows
#     5. raw again (brackets the noise of a shared machine)
#   context, capped (librdkafka defaults on both sides, unless --no-capped):
#     6. raw BaseConsumer   7. tally aggregator without --kafka-option
#
# Every rate is measured from the first record to the N-th (startup and group join
# excluded): the raw consumer times itself; the aggregator is timed through its
# /metrics, polled every --poll-interval s until tally_aggregator_records_total (all
# outcomes) reaches N, the N-th record's time interpolated between two samples.
# Each sample also records tally_aggregator_freshness_seconds (the age of the oldest
# counted increment not yet flushed), flushes and rows written. After each
# aggregator run the process is stopped with SIGTERM (its final flush writes every
# open window) and the store is checked through its own scan API
# (aggregator/examples/check_store.rs): rows = distinct (key, window) pairs sent,
# sum of `sum` and of `count` = what was sent (and the pre-filled rows untouched).
#
# Usage: scripts/bench-aggregator.sh [options]
#   --records N         records in the topic (env BENCH_RECORDS, default 3000000)
#   --partitions P      partitions (env BENCH_PARTITIONS, default 4)
#   --keys K            distinct keys (env BENCH_KEYS, default 100000)
#   --events-per-sec R  event-time density (env BENCH_EVENTS_PER_SEC, default 20000)
#   --fetch-wait-ms MS  fetch.wait.max.ms of the uncapped runs (default 10)
#   --large-store ROWS  also run on a store pre-filled with ROWS rows (e.g. 10000000)
#   --no-capped         skip the capped context runs
#   --tally PATH        the tally binary to measure (default: build this tree)
#   --also-tally L=PATH extra uncapped aggregator run with another binary, labelled L
#                       (repeatable; e.g. main=/tmp/tally-main)
#   --profile DIR       after the measured runs, one more uncapped run of each tally
#                       binary under `perf record -e cpu-clock --call-graph dwarf`
#                       (DIR/perf-*.data), broken down per stage and thread by
#                       scripts/bench-profile-stages.sh (DIR/stages-*.txt); these runs
#                       are not in the ratios (perf's unwinding costs CPU)
#   --callgrind DIR     one more uncapped run of the tally binary under valgrind's
#                       callgrind (exact instruction counts; ~50x slower, so use it
#                       with a smaller --records), DIR/callgrind.out
#   --poll-interval S   seconds between /metrics samples (env BENCH_POLL_INTERVAL, 0.1)
#   --no-build          use the binaries already in target/release
#   --keep              keep the temp dir (logs, stores, metric samples)
# Extra aggregator flags for every aggregator run: env BENCH_AGGREGATOR_ARGS.
# Needs: curl, a Rust toolchain (and perf for --profile).
set -euo pipefail

RECORDS="${BENCH_RECORDS:-3000000}"
PARTITIONS="${BENCH_PARTITIONS:-4}"
KEYS="${BENCH_KEYS:-100000}"
EVENTS_PER_SEC="${BENCH_EVENTS_PER_SEC:-20000}"
POLL_INTERVAL="${BENCH_POLL_INTERVAL:-0.1}"
FETCH_WAIT_MS=10
LARGE_STORE=0
CAPPED=1
TALLY=""
ALSO_TALLY=()
PROFILE_DIR=""
CALLGRIND_DIR=""
BUILD=1
KEEP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --records) RECORDS="$2"; shift 2 ;;
    --partitions) PARTITIONS="$2"; shift 2 ;;
    --keys) KEYS="$2"; shift 2 ;;
    --events-per-sec) EVENTS_PER_SEC="$2"; shift 2 ;;
    --fetch-wait-ms) FETCH_WAIT_MS="$2"; shift 2 ;;
    --large-store) LARGE_STORE="$2"; shift 2 ;;
    --no-capped) CAPPED=0; shift ;;
    --tally) TALLY="$2"; shift 2 ;;
    --also-tally) ALSO_TALLY+=("$2"); shift 2 ;;
    --profile) PROFILE_DIR="$2"; shift 2 ;;
    --callgrind) CALLGRIND_DIR="$2"; shift 2 ;;
    --poll-interval) POLL_INTERVAL="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
RECORDS="${RECORDS//_/}"
LARGE_STORE="${LARGE_STORE//_/}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }
if [[ -n "$PROFILE_DIR" ]]; then
  command -v perf >/dev/null || { echo "--profile needs perf (apt-get install linux-perf)" >&2; exit 1; }
  mkdir -p "$PROFILE_DIR"
  PROFILE_DIR="$(cd "$PROFILE_DIR" && pwd)"
fi
if [[ -n "$CALLGRIND_DIR" ]]; then
  command -v valgrind >/dev/null || { echo "--callgrind needs valgrind (apt-get install valgrind)" >&2; exit 1; }
  mkdir -p "$CALLGRIND_DIR"
  CALLGRIND_DIR="$(cd "$CALLGRIND_DIR" && pwd)"
fi

TANSU="$("$ROOT/scripts/ensure-tansu.sh")"
if [[ "$BUILD" == 1 ]]; then
  [[ -n "$TALLY" ]] || cargo build --release -p tally --bin tally >&2
  cargo build --release -p tally-aggregator --example prefill --example raw_consume \
    --example fill_store --example check_store >&2
fi
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
TALLY="${TALLY:-$TARGET_DIR/release/tally}"
EXAMPLES="$TARGET_DIR/release/examples"
[[ -x "$TALLY" ]] || { echo "no tally binary at $TALLY" >&2; exit 1; }

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

# CPU clock ticks (user + system) used so far by a running process.
cpu_ticks() { local f; read -r -a f <"/proc/$1/stat"; echo $((f[13] + f[14])); }
TICKS="$(getconf CLK_TCK)"
field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; } # name line

# ---- broker and topic ---------------------------------------------------------
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
EXPECTED_SUM="$(field sum "$PREFILL")"
EXPECTED_ROWS="$(field key_windows "$PREFILL")"
FROM_MS="$(field from_ms "$PREFILL")"
TO_MS="$(field to_ms "$PREFILL")"
PRODUCE_RATE="$(field rate "$PREFILL")"
[[ "$(field partition_mismatches "$PREFILL")" == 0 ]] || { echo "prefill: records landed in unexpected partitions" >&2; exit 1; }
EXPECTED=("$FROM_MS" "$TO_MS" "$EXPECTED_ROWS" "$EXPECTED_SUM" "$RECORDS")

# ---- the large store template -------------------------------------------------
TEMPLATE=""
if [[ "$LARGE_STORE" -gt 0 ]]; then
  WINDOWS=$(( (LARGE_STORE + KEYS - 1) / KEYS ))
  TEMPLATE="$WORK_DIR/template.sqlite"
  echo "filling a store with $KEYS keys x $WINDOWS earlier windows..." >&2
  FILL="$("$EXAMPLES/fill_store" "sqlite://$TEMPLATE" "$KEYS" "$WINDOWS" "$FROM_MS" 1 "$PARTITIONS")"
  echo "fill: $FILL" >&2
  FILLED=("$(field from_ms "$FILL")" "$(field to_ms "$FILL")" "$(field rows "$FILL")" "$(field sum "$FILL")" "$(field count "$FILL")")
  FILL_ROWS="$(field rows "$FILL")"
  FILL_RATE="$(field rate "$FILL")"
fi

RUN_ID="$$-$RANDOM"
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
RESULTS="$WORK_DIR/results.txt"
: >"$RESULTS"

# ---- raw consumer -------------------------------------------------------------
# Appends "label|rate|seconds|consumer cores|broker cores|extra" to $RESULTS.
raw_consume() { # label group librdkafka-settings
  local label="$1" group="$2" settings="$3" out="$WORK_DIR/raw-$2.txt" before after line cpu seconds
  before="$(cpu_ticks "$TANSU_PID")"
  local TIMEFORMAT='%U %S'
  { time RAW_CONSUME_EXTRA="$settings" "$EXAMPLES/raw_consume" "$BROKERS" "$TOPIC" "$group" "$RECORDS" base >"$out" 2>"$WORK_DIR/raw-$group.log"; } 2>"$WORK_DIR/raw-$group.time"
  after="$(cpu_ticks "$TANSU_PID")"
  line="$(cat "$out")"
  echo "$label: $line" >&2
  seconds="$(field seconds "$line")"
  cpu="$(awk '{ printf "%.2f", $1 + $2 }' "$WORK_DIR/raw-$group.time")"
  printf '%s|%s|%s|~%s|%s|%s\n' "$label" "$(field rate "$line")" "$seconds" \
    "$(awk -v c="$cpu" -v s="$seconds" 'BEGIN { printf "%.2f", c / s }')" \
    "$(awk -v t="$((after - before))" -v k="$TICKS" -v s="$seconds" 'BEGIN { printf "%.2f", t / k / s }')" \
    "" >>"$RESULTS"
}

# ---- aggregator ---------------------------------------------------------------
# One /metrics sample: "time records rows_written aggregator_ticks broker_ticks
# flush_seconds_sum flushes freshness_seconds".
sample() { # pid port
  local now="$EPOCHREALTIME" metrics
  metrics="$(curl -fsS --max-time 2 "http://127.0.0.1:$2/metrics" 2>/dev/null)" || return 1
  awk -v now="$now" -v agg="$(cpu_ticks "$1")" -v broker="$(cpu_ticks "$TANSU_PID")" '
    /^tally_aggregator_records_total/ { records += $2 }
    /^tally_aggregator_rows_written_total/ { rows += $2 }
    /^tally_aggregator_flush_duration_seconds_sum/ { flush = $2 }
    /^tally_aggregator_flush_duration_seconds_count/ { flushes = $2 }
    /^tally_aggregator_freshness_seconds/ { fresh = $2 }
    END { printf "%s %d %d %d %d %.6f %d %.3f\n", now, records, rows, agg, broker, flush, flushes, fresh }
  ' <<<"$metrics"
}

# Runs one aggregator to N records, stops it, checks its store; appends a result.
run_aggregator() { # label tally-binary store-template-or-empty profiler(none|perf|callgrind) extra flags...
  local label="$1" binary="$2" template="$3" profiler="$4"
  shift 4
  local slug="agg-${#PIDS[@]}" port store pid started samples line count perf_pid="" wrapper=()
  port="$(free_port)"
  store="$WORK_DIR/$slug.sqlite"
  if [[ -n "$template" ]]; then
    cp "$template" "$store"
    for suffix in -wal -shm; do [[ -e "$template$suffix" ]] && cp "$template$suffix" "$store$suffix"; done
  fi
  [[ "$profiler" != callgrind ]] || wrapper=(valgrind --tool=callgrind "--callgrind-out-file=$CALLGRIND_DIR/callgrind.out")
  # shellcheck disable=SC2086 # BENCH_AGGREGATOR_ARGS is a list of flags
  "${wrapper[@]}" "$binary" aggregator --brokers "$BROKERS" --topic "$TOPIC" --dlq-topic "$TOPIC.dlq" \
    --group "bench-$slug-$RUN_ID" --store "sqlite://$store" --flush-interval 1s \
    --metrics-listen "127.0.0.1:$port" "$@" ${BENCH_AGGREGATOR_ARGS:-} \
    >"$WORK_DIR/$slug.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  started="$EPOCHREALTIME"
  if [[ "$profiler" == perf ]]; then
    perf record -e cpu-clock -F 999 --call-graph dwarf,16384 -p "$pid" \
      -o "$PROFILE_DIR/perf-$slug.data" >"$WORK_DIR/perf-$slug.log" 2>&1 &
    perf_pid=$!
    PIDS+=("$perf_pid")
  fi
  samples="$WORK_DIR/$slug-samples.txt"
  : >"$samples"
  local deadline=$((SECONDS + 900))
  while :; do
    kill -0 "$pid" 2>/dev/null || { cat "$WORK_DIR/$slug.log" >&2; echo "$label: aggregator exited" >&2; exit 1; }
    ((SECONDS < deadline)) || { echo "$label: did not consume $RECORDS records in time" >&2; exit 1; }
    if line="$(sample "$pid" "$port")"; then
      echo "$line" >>"$samples"
      read -r _ count _ <<<"$line"
      ((count >= RECORDS)) && break
    fi
    sleep "$POLL_INTERVAL"
  done
  if [[ -n "$perf_pid" ]]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
  fi
  local rss_kib
  rss_kib="$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status")"
  # The clock starts at the first sample with records > 0; the N-th record's time
  # is interpolated between the last two samples.
  local stats
  stats="$(awk -v n="$RECORDS" -v ticks="$TICKS" '
    $2 > 0 && !t0 { t0 = $1; c0 = $2; a0 = $4; b0 = $5; f0 = $6; k0 = $7; r0 = $3 }
    t0 && !t1 { fresh[++nf] = $8; if ($8 > fmax) fmax = $8 }
    { if ($2 >= n && !t1) { t1 = pt + (n - pc) / ($2 - pc) * ($1 - pt); a1 = $4; b1 = $5; r1 = $3; f1 = $6; k1 = $7 } pt = $1; pc = $2 }
    END {
      s = t1 - t0
      # median of the freshness samples of the timed part
      for (i = 1; i <= nf; i++) for (j = i + 1; j <= nf; j++) if (fresh[j] < fresh[i]) { x = fresh[i]; fresh[i] = fresh[j]; fresh[j] = x }
      med = nf ? fresh[int((nf + 1) / 2)] : 0
      printf "%.0f %.3f %.2f %.2f %.2f %d %.2f %d %.2f %.2f %d\n", (n - c0) / s, s, (a1 - a0) / ticks / s, (b1 - b0) / ticks / s, (a1 - a0) / ticks / (n - c0) * 1e6, k1 - k0, f1 - f0, r1 - r0, fmax, med, nf
    }' "$samples")"
  local rate seconds cores broker_cores us_per_record flushes flush_seconds rows fresh_max fresh_median fresh_samples
  read -r rate seconds cores broker_cores us_per_record flushes flush_seconds rows fresh_max fresh_median fresh_samples <<<"$stats"
  echo "$label: rate=$rate seconds=$seconds cores=$cores" >&2

  kill -TERM "$pid"
  for _ in $(seq 1 3000); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then echo "$label: aggregator did not stop within 300 s" >&2; exit 1; fi
  wait "$pid" 2>/dev/null || true
  local check=("${EXPECTED[@]}") verdict
  [[ -z "$template" ]] || check+=("${FILLED[@]}")
  if verdict="$("$EXAMPLES/check_store" "sqlite://$store" "${check[@]}" 2>&1)"; then
    verdict="exact ($(head -1 <<<"$verdict" | sed 's/^ok //; s/ \[.*//')$([[ -z "$template" ]] || echo "; pre-filled rows untouched"))"
  else
    verdict="NOT EXACT: $(tr '\n' ';' <<<"$verdict")"
    STORE_FAILURES=$((STORE_FAILURES + 1))
  fi
  echo "$label: store $verdict" >&2
  printf '%s|%s|%s|%s|%s|%s\n' "$label" "$rate" "$seconds" "$cores" "$broker_cores" \
    "$us_per_record us/record; $flushes flushes, ${flush_seconds} s in flushes; $rows rows written; freshness max ${fresh_max} s, median ${fresh_median} s over $fresh_samples samples; peak RSS $((rss_kib / 1024)) MiB; store $verdict" >>"$RESULTS"
  rm -f "$store" "$store-wal" "$store-shm"
  if [[ "$profiler" == perf ]]; then
    echo "$label: perf profile in $PROFILE_DIR/perf-$slug.data" >>"$PROFILE_DIR/runs.txt"
    "$ROOT/scripts/bench-profile-stages.sh" "$PROFILE_DIR/perf-$slug.data" "$RECORDS" >"$PROFILE_DIR/stages-$slug.txt"
    PROFILES+=("$label|$PROFILE_DIR/stages-$slug.txt")
  fi
}
PROFILES=()
STORE_FAILURES=0

# ---- the runs -----------------------------------------------------------------
UNCAPPED="fetch.wait.max.ms=$FETCH_WAIT_MS"
raw_consume "raw BaseConsumer #1 (uncapped)" "raw1-$RUN_ID" "$UNCAPPED"
run_aggregator "tally aggregator (uncapped)" "$TALLY" "" none --kafka-option "$UNCAPPED"
for also in "${ALSO_TALLY[@]}"; do
  run_aggregator "tally aggregator [${also%%=*}] (uncapped)" "${also#*=}" "" none --kafka-option "$UNCAPPED"
done
if [[ -n "$TEMPLATE" ]]; then
  run_aggregator "tally aggregator, $FILL_ROWS-row store (uncapped)" "$TALLY" "$TEMPLATE" none \
    --kafka-option "$UNCAPPED"
fi
raw_consume "raw BaseConsumer #2 (uncapped)" "raw2-$RUN_ID" "$UNCAPPED"
if [[ "$CAPPED" == 1 ]]; then
  raw_consume "raw BaseConsumer (capped: defaults)" "raw3-$RUN_ID" ""
  run_aggregator "tally aggregator (capped: defaults)" "$TALLY" "" none
fi
# Profiled runs come last and are not in any ratio.
if [[ -n "$PROFILE_DIR" ]]; then
  run_aggregator "profiled: tally aggregator (uncapped)" "$TALLY" "" perf --kafka-option "$UNCAPPED"
  for also in "${ALSO_TALLY[@]}"; do
    run_aggregator "profiled: tally aggregator [${also%%=*}] (uncapped)" "${also#*=}" "" perf --kafka-option "$UNCAPPED"
  done
fi
if [[ -n "$CALLGRIND_DIR" ]]; then
  run_aggregator "callgrind: tally aggregator (uncapped)" "$TALLY" "" callgrind --kafka-option "$UNCAPPED"
fi

# ---- report -------------------------------------------------------------------
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"
rate_of() { awk -F'|' -v l="$1" '$1 == l { print $2 }' "$RESULTS"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
RAW_MEAN="$(awk -v a="$(rate_of "raw BaseConsumer #1 (uncapped)")" -v b="$(rate_of "raw BaseConsumer #2 (uncapped)")" 'BEGIN { printf "%.0f", (a + b) / 2 }')"
AGG="$(rate_of "tally aggregator (uncapped)")"

echo
echo "machine: $(nproc) cores, load average $LOAD_BEFORE before, $LOAD_AFTER after (other work on the machine skews all rates)"
echo "tansu memory://, $PARTITIONS partitions, $RECORDS records, $KEYS keys (Zipf 1.0), $EVENTS_PER_SEC records per event-second; produced at $PRODUCE_RATE/s"
echo "tally: $TALLY$(for also in "${ALSO_TALLY[@]}"; do printf '; [%s] %s' "${also%%=*}" "${also#*=}"; done)"
[[ -z "$TEMPLATE" ]] || echo "large store: $FILL_ROWS rows of earlier windows, written at $FILL_RATE rows/s"
echo "rates from the first record to the $RECORDS-th; cores = process CPU (user+sys) / timed seconds ('~': includes startup and group join)"
printf "%-46s %11s %8s %7s %7s\n" consumer "records/s" seconds cores broker
while IFS='|' read -r label rate seconds cores broker _; do
  printf "%-46s %11s %8s %7s %7s\n" "$label" "$rate" "$seconds" "$cores" "$broker"
done <"$RESULTS"
echo
while IFS='|' read -r label _ _ _ _ extra; do
  [[ -z "$extra" ]] || echo "$label: $extra"
done <"$RESULTS"
echo
echo "HEADLINE uncapped ratio aggregator / mean(raw #1, raw #2 = $RAW_MEAN): $(ratio "$AGG" "$RAW_MEAN") (target >= 0.80)"
for also in "${ALSO_TALLY[@]}"; do
  label="tally aggregator [${also%%=*}] (uncapped)"
  echo "  [${also%%=*}] uncapped ratio: $(ratio "$(rate_of "$label")" "$RAW_MEAN")"
done
if [[ -n "$TEMPLATE" ]]; then
  LARGE="$(rate_of "tally aggregator, $FILL_ROWS-row store (uncapped)")"
  echo "large store: $FILL_ROWS-row store / empty store: $(ratio "$LARGE" "$AGG") (target >= 0.90); against raw: $(ratio "$LARGE" "$RAW_MEAN")"
fi
if [[ "$CAPPED" == 1 ]]; then
  echo "context, capped (librdkafka defaults): aggregator / raw: $(ratio "$(rate_of "tally aggregator (capped: defaults)")" "$(rate_of "raw BaseConsumer (capped: defaults)")")"
fi
for profile in "${PROFILES[@]}"; do
  echo
  echo "== ${profile%%|*}: where the CPU goes (perf cpu-clock samples, ${profile#*|})"
  cat "${profile#*|}"
done
[[ -z "$CALLGRIND_DIR" ]] || echo "callgrind profile: $CALLGRIND_DIR/callgrind.out (callgrind_annotate --inclusive=yes $CALLGRIND_DIR/callgrind.out)"
if [[ "$STORE_FAILURES" -gt 0 ]]; then
  echo "STORE CHECK FAILED in $STORE_FAILURES run(s)" >&2
  exit 1
fi
