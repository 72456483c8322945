#!/usr/bin/env bash
# Where the aggregator's CPU goes, per stage, from a `perf record -e cpu-clock
# --call-graph dwarf` profile of one `tally aggregator` run (as written by
# `scripts/bench-aggregator.sh --profile DIR`).
#
# Usage: scripts/bench-profile-stages.sh PERF_DATA RECORDS
#
# Each sample is one tick of cpu-clock on one thread, so samples x period is CPU
# time; dividing by RECORDS gives CPU per record, which does not depend on how busy
# the machine was. Threads are grouped by role: the consumer loop (the main thread,
# where `tally aggregator` runs its loop), the SQLite writer (the blocking-pool
# thread running rusqlite), librdkafka's threads (fetch parsing) and the rest.
# Within the loop and the writer, a sample belongs to the first stage that one of
# its frames matches, walking from the leaf towards the root (so the clock read
# inside librdkafka's queue pop counts as `recv`, the one in `now_ms` as `now_ms`).
set -euo pipefail

[[ $# -eq 2 ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
DATA="$1"
RECORDS="${2//_/}"

perf script -i "$DATA" -F comm,tid,period,ip,sym,dso 2>/dev/null | awk -v records="$RECORDS" '
function stage_of_loop(    i, f) {
  for (i = 1; i <= n; i++) {
    f = frame[i]
    if (f ~ /tally_schemas::increment|serde_json|serde_core|uuid::parser/) return "decode (fast path, serde fallback, contract rules)"
    if (f ~ /PartitionEngine::record/) return "engine: PartitionEngine::record"
    if (f ~ /PartitionEngine::flush|on_flush_tick|take_flush/) return "engine/protocol: flush (once per tick)"
    if (f ~ /consumer::now_ms/) return "now_ms() (once per batch)"
    if (f ~ /WakerSlab|slab::/) return "recv: waker slot (un)registration"
    if (f ~ /drop_in_place<rdkafka::message::BorrowedMessage|rd_kafka_message_destroy|rd_kafka_op_destroy|rd_kafka_event_destroy|drop_in_place<alloc::vec::Vec<rdkafka::message::BorrowedMessage/) return "dropping each message (rd_kafka_op free)"
    if (f ~ /poll_queue|poll_event|rd_kafka_q_pop|rd_kafka_q_serve|rd_kafka_consume|rd_kafka_queue_poll|handle_fetch_event|MessageStream|StreamConsumer<C,R>::recv/) return "recv: librdkafka queue pop"
    if (f ~ /consumer::is_marker|consumer::redriven_from|rd_kafka_message_headers|rd_kafka_header/) return "header checks (marker, redriven-from)"
    if (f ~ /Message>::timestamp|rd_kafka_message_timestamp/) return "message timestamp"
    if (f ~ /prometheus::/) return "metrics counters"
    if (f ~ /Gauges::update/) return "gauges (once per tick)"
    if (f ~ /Protocol::on_record/) return "protocol: on_record rest (partition lookup, stats)"
    if (f ~ /Shell::protocol|futex::Mutex|MutexGuard|pthread_mutex|Mutex<T>::lock/) return "protocol lock"
    if (f ~ /Shell::execute|queue_write|commit_async/) return "executing commands"
    if (f ~ /consumer::records/) return "records(): batch loop rest"
    if (f ~ /tokio::time|Interval/) return "select!: flush-timer arm"
    if (f ~ /tally::shutdown|tokio::signal/) return "select!: shutdown arm"
    if (f ~ /consumer::consume/) return "loop and select! machinery: rest"
  }
  return "other (runtime, kernel outside the above)"
}
function stage_of_writer(    i, f) {
  for (i = 1; i <= n; i++) {
    f = frame[i]
    if (f ~ /fsync|fdatasync/) return "fsync/fdatasync (synchronous=FULL commits)"
    if (f ~ /sys_pwrite|sys_write|vfs_write/) return "write/pwrite syscalls"
    if (f ~ /sys_pread|sys_read|vfs_read/) return "read/pread syscalls (pages not in SQLite cache)"
    if (f ~ /Checkpoint|walCheckpoint|sqlite3WalCheckpoint/) return "SQLite WAL checkpoint (user space)"
    if (f ~ /slice::sort|sort_by|merge_sort|quicksort|ipnsort|driftsort/) return "sorting the flush rows"
    if (f ~ /sqlite3BtreeIndexMoveto|sqlite3BtreeTableMoveto|moveToChild|sqlite3BtreeMovetoUnpacked|moveToLeaf|sqlite3VdbeRecordCompare|vdbeRecordCompare/) return "SQLite B-tree descent (upsert lookups)"
    if (f ~ /sqlite3|rusqlite/) return "SQLite other (VDBE, B-tree insert, pager)"
  }
  return "writer other (runtime, kernel)"
}
BEGIN { RS = ""; FS = "\n" }
{
  split($1, header, " ")
  # header: comm (may contain spaces) tid period
  period = header[length(header)]
  tid = header[length(header) - 1]
  comm = header[1]
  for (h = 2; h < length(header) - 1; h++) comm = comm " " header[h]
  n = 0
  writer = 0
  for (i = 2; i <= NF; i++) {
    line = $i
    sub(/^[ \t]*[0-9a-f]+ /, "", line)
    frame[++n] = line
    if (line ~ /rusqlite|sqlite3/) writer = 1
  }
  if (comm ~ /^rdk:/) role = "librdkafka threads (" (comm ~ /broker/ ? "fetch parsing, broker I/O" : "main") ")"
  else if (writer) role = "SQLite writer (blocking-pool thread)"
  else if (comm ~ /tokio/) role = "tokio workers (other tasks)"
  else if (comm ~ /producer/) role = "dead-letter producer poll thread"
  else role = "consumer loop (main thread)"
  # the loop thread is the one running consumer::consume
  if (role ~ /tokio workers/) for (i = 1; i <= n; i++) if (frame[i] ~ /consumer::consume/) { role = "consumer loop (main thread)"; break }
  cpu[role] += period
  total += period
  if (role ~ /^consumer loop/) loop_stage[stage_of_loop()] += period
  if (role ~ /^SQLite writer/) writer_stage[stage_of_writer()] += period
}
function report(title, table, whole,    k, keys, m, i, j, t) {
  m = 0
  for (k in table) keys[++m] = k
  for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (table[keys[j]] > table[keys[i]]) { t = keys[i]; keys[i] = keys[j]; keys[j] = t }
  printf "%s\n", title
  for (i = 1; i <= m; i++)
    printf "  %-58s %8.3f us/record %6.1f %%\n", keys[i], table[keys[i]] / 1000 / records, 100 * table[keys[i]] / whole
}
END {
  printf "CPU per record by thread (%d records, %.2f s of CPU sampled):\n", records, total / 1e9
  for (r in cpu) by_role[r] = cpu[r]
  report("", by_role, total)
  report("consumer loop thread, by stage (share of that thread):", loop_stage, cpu["consumer loop (main thread)"])
  report("SQLite writer thread, by stage (share of that thread):", writer_stage, cpu["SQLite writer (blocking-pool thread)"])
}'
