//! `tally verify`: recompute the sums from the topic with the same engine and diff
//! them against the store, reading only what the range needs.
//!
//! - Settings: the window size and grace pinned in the store (`--window`/`--grace`
//!   only for a store no aggregator has pinned yet; a different value is refused).
//!   Windows before the current settings epoch (a replay changed the settings) are
//!   not compared, and stored rows of replaced settings are not counted.
//! - Range: with `--from`, each partition is read from the first record stamped at or
//!   after the first window of the range minus the grace (Kafka's offsets-for-times;
//!   a broker that cannot answer it, such as librdkafka's mock cluster, is read from
//!   its first offset and records before that time are passed over). Records before
//!   it cannot be counted in the range, nor make a record in it late. A partition
//!   stops once its watermark passed the end of the last window before `--to`: every
//!   later record for those windows is late. Only the store rows of the range are read
//!   (one query per key and bucket on ScyllaDB, a range scan on SQLite).
//! - Truncated log: a partition whose first available offset is above 0 lost records
//!   to retention. Windows that may hold them (those starting before the first window
//!   boundary at or after the first surviving record's window end plus the grace, the
//!   rule `tally replay --from-offset` uses) are skipped, counted and named.
//! - Retention of the store: windows that ended more than the retention ago (with a
//!   minute of slack for pruning in flight) are gone by design, skipped and counted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::json;
use tally_aggregator::engine::{EngineConfig, PartitionEngine, RecordOutcome, Resume};
use tally_schemas::{decode_increment, Checkpoint, SumSettings};
use tally_sink::{WindowRow, WindowTotal};
use uuid::Uuid;

use super::{admin_consumer, partitions, Brokers, KAFKA_TIMEOUT};
use crate::read_api::{now_ms, parse_time_ms, rfc3339_ms};

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub kafka: super::TopicArgs,
    #[command(flatten)]
    pub store: super::StoreArgs,
    /// Compare windows starting at or after this (RFC 3339 or epoch ms).
    #[arg(long)]
    pub from: Option<String>,
    /// Compare windows starting before this (RFC 3339 or epoch ms).
    #[arg(long)]
    pub to: Option<String>,
    /// Window size, only for a store no aggregator has pinned settings in yet
    /// (default 10s); otherwise the pinned one is used and another value is refused.
    #[arg(long, env = "TALLY_WINDOW", value_parser = tally_aggregator::config::parse_duration)]
    pub window: Option<std::time::Duration>,
    /// Grace, used only for a store without pinned settings, as the window is (default 2s).
    #[arg(long, env = "TALLY_GRACE", value_parser = tally_aggregator::config::parse_duration)]
    pub grace: Option<std::time::Duration>,
    #[arg(long, env = "TALLY_MAX_FUTURE_SKEW", default_value = "5m", value_parser = tally_aggregator::config::parse_duration)]
    pub max_future_skew: std::time::Duration,
}

/// Windows this close to the retention horizon may be pruned while verify runs.
const RETENTION_SLACK_MS: i64 = 60_000;

fn ms(duration: std::time::Duration) -> anyhow::Result<i64> {
    i64::try_from(duration.as_millis()).context("duration too large")
}

/// Aligns `ms` up to a multiple of `window_ms`.
fn align_up(ms: i64, window_ms: i64) -> i64 {
    let down = ms.div_euclid(window_ms).saturating_mul(window_ms);
    if down == ms {
        ms
    } else {
        down.saturating_add(window_ms)
    }
}

/// The settings to recompute with: the pinned ones, or the flags for a store without.
fn settings(
    pinned: Option<&tally_schemas::PinnedSettings>,
    window: Option<std::time::Duration>,
    grace: Option<std::time::Duration>,
) -> anyhow::Result<(SumSettings, Option<i64>)> {
    let window = window.map(ms).transpose()?;
    let grace = grace.map(ms).transpose()?;
    match pinned {
        Some(pinned) => {
            let current = pinned.current();
            for (flag, given, held) in [
                ("--window", window, current.window_ms),
                ("--grace", grace, current.grace_ms),
            ] {
                if let Some(given) = given {
                    anyhow::ensure!(
                        given == held,
                        "{flag} is {given} ms but the store pins {held} ms; leave it out (verify uses the pinned settings)"
                    );
                }
            }
            Ok((current.settings(), current.from_ms))
        }
        None => {
            let settings = SumSettings {
                window_ms: window.unwrap_or(10_000),
                grace_ms: grace.unwrap_or(2_000),
            };
            anyhow::ensure!(settings.window_ms > 0, "--window must be positive");
            eprintln!(
                "verify: the store has no pinned settings (no aggregator pinned them yet); using {settings}"
            );
            Ok((settings, None))
        }
    }
}

/// What verify compares, and what it leaves out and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Windows starting in `[from_ms, to_ms)` are compared.
    pub from_ms: i64,
    pub to_ms: i64,
    /// Records to seek to: stamped at or after this (`None`: read from the start).
    pub seek_ms: Option<i64>,
    /// A partition is done once its watermark reaches this (`None`: read to the end).
    pub stop_watermark_ms: Option<i64>,
}

impl Plan {
    /// The plan for `--from`/`--to` under `settings`.
    pub fn new(from: Option<i64>, to: Option<i64>, settings: SumSettings) -> Plan {
        let window = settings.window_ms;
        let from_ms = from.map_or(i64::MIN, |from| align_up(from, window));
        let to_ms = to.unwrap_or(i64::MAX);
        Plan {
            from_ms,
            to_ms,
            seek_ms: from.map(|_| from_ms.saturating_sub(settings.grace_ms)),
            // The end of the last window starting before `to`.
            stop_watermark_ms: to.map(|to| {
                to.saturating_sub(1)
                    .div_euclid(window)
                    .saturating_mul(window)
                    .saturating_add(window)
            }),
        }
    }
}

/// Where a partition's reading starts, ends and is cut by truncation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PartitionRead {
    partition: i32,
    /// First offset read.
    start: i64,
    /// One past the last offset read (the high watermark when verify started).
    end: i64,
    /// Records are fed to the engine from the first one stamped at or after this
    /// (when the broker could not look offsets up by time).
    feed_from_ts: Option<i64>,
    /// The first available offset, when records before it were deleted.
    truncated_at: Option<i64>,
}

/// What reading the topic produced.
#[derive(Debug, Default)]
struct Recomputed {
    rows: Vec<WindowRow>,
    records_read: u64,
    records_passed_over: u64,
    /// Per truncated partition: (first available offset, first window compared).
    truncated: BTreeMap<i32, (i64, i64)>,
    seek: Seek,
}

/// How the start of the range was found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Seek {
    /// No `--from`: every partition is read from its first offset.
    #[default]
    FromStart,
    /// Offsets looked up by time.
    ByTime,
    /// The broker cannot look offsets up by time: read from the first offset, the
    /// records before the start time passed over.
    PassOver,
}

/// Returns true when the store matches the recomputation.
pub async fn run(args: VerifyArgs) -> anyhow::Result<bool> {
    let store = args.store.open().await?;
    let pinned = tally_sink::load_settings(&*store).await?;
    let (settings, epoch_from) = settings(pinned.as_ref(), args.window, args.grace)?;
    let retention = tally_sink::load_retention(&*store).await?;
    let config = EngineConfig {
        window_ms: settings.window_ms,
        grace_ms: settings.grace_ms,
        max_future_skew_ms: ms(args.max_future_skew)?,
    };
    let time = |value: &Option<String>| {
        value
            .as_deref()
            .map(parse_time_ms)
            .transpose()
            .map_err(anyhow::Error::msg)
    };
    let plan = Plan::new(time(&args.from)?, time(&args.to)?, settings);

    let brokers = args.kafka.brokers.clone();
    let topic = args.kafka.topic.clone();
    let started = Instant::now();
    let recomputed = tokio::task::spawn_blocking(move || recompute(&brokers, &topic, config, plan))
        .await
        .context("recompute task")??;
    let read_seconds = started.elapsed().as_secs_f64();

    // What is compared: the range, minus windows before the settings epoch, minus
    // windows that may hold deleted records.
    let truncation_from = recomputed
        .truncated
        .values()
        .map(|&(_, first_window)| first_window)
        .max();
    let compare_from = [Some(plan.from_ms), epoch_from, truncation_from]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(plan.from_ms);
    let now = now_ms();
    let expired = |row: &WindowRow| {
        retention.is_some_and(|retention| {
            tally_sink::row::is_expired(row.window_end_ms, retention, now + RETENTION_SLACK_MS)
        })
    };
    let mut expected = Vec::new();
    let mut skipped_truncated: BTreeSet<(i64, Uuid)> = BTreeSet::new();
    let mut skipped_expired: BTreeSet<(i64, Uuid)> = BTreeSet::new();
    for row in recomputed.rows {
        if row.window_start_ms < plan.from_ms || row.window_start_ms >= plan.to_ms {
            continue;
        }
        if epoch_from.is_some_and(|epoch| row.window_start_ms < epoch) {
            continue;
        }
        if truncation_from.is_some_and(|first| row.window_start_ms < first) {
            skipped_truncated.insert((row.window_start_ms, row.key));
        } else if expired(&row) {
            skipped_expired.insert((row.window_start_ms, row.key));
        } else {
            expected.push(row);
        }
    }

    let compared_started = Instant::now();
    let keys: Vec<Uuid> = expected
        .iter()
        .map(|row| row.key)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // An open end of the range is where the log's windows end (ScyllaDB reads a key's
    // buckets one by one, so the range must be finite).
    let starts = || expected.iter().map(|row| row.window_start_ms);
    let read_from = if plan.from_ms == i64::MIN {
        starts().min().unwrap_or(compare_from).max(compare_from)
    } else {
        compare_from
    };
    let read_to = if plan.to_ms == i64::MAX {
        starts()
            .max()
            .map_or(read_from, |last| last.saturating_add(1))
    } else {
        plan.to_ms
    };
    let stored: Vec<WindowRow> = if read_from < read_to {
        store.scan_rows(read_from, read_to, &keys).await?
    } else {
        Vec::new()
    };
    let stored_rows = stored.len();
    let stored: Vec<WindowRow> = stored
        .into_iter()
        .filter(|row| {
            pinned.as_ref().is_none_or(|pinned| {
                pinned.row_is_current(row.window_start_ms, row.window_end_ms, row.generation)
            }) && !expired(row)
        })
        .collect();
    let expected_totals = WindowTotal::from_rows(&expected);
    let differences = diff(&expected_totals, &WindowTotal::from_rows(&stored));
    let compare_seconds = compared_started.elapsed().as_secs_f64();
    for difference in &differences {
        println!("{difference}");
    }

    let rate = |count: f64, seconds: f64| if seconds > 0.0 { count / seconds } else { 0.0 };
    let how = match recomputed.seek {
        Seek::FromStart => "partitions read from their first offset",
        Seek::ByTime => "partitions sought by time",
        Seek::PassOver => {
            "the broker cannot look offsets up by time: partitions read from their first offset"
        }
    };
    eprintln!(
        "verify: read {} records ({} passed over before the start time; {how}) in {:.2}s ({:.0} records/s)",
        recomputed.records_read,
        recomputed.records_passed_over,
        read_seconds,
        rate(recomputed.records_read as f64, read_seconds)
    );
    for (partition, (first_offset, first_window)) in &recomputed.truncated {
        eprintln!(
            "verify: partition {partition} starts at offset {first_offset}: the records before it were deleted (log retention); windows before {} may hold some and are not compared",
            rfc3339_ms(*first_window)
        );
    }
    if !skipped_truncated.is_empty() {
        eprintln!(
            "verify: {} windows skipped: they may hold records deleted from the log",
            skipped_truncated.len()
        );
    }
    if let Some(retention) = retention {
        eprintln!(
            "verify: {} windows skipped: they ended before {} (the store's retention)",
            skipped_expired.len(),
            rfc3339_ms(now.saturating_sub(retention) + RETENTION_SLACK_MS)
        );
    }
    if let Some(epoch) = epoch_from {
        eprintln!(
            "verify: windows before {} were decided by earlier settings and are not compared",
            rfc3339_ms(epoch)
        );
    }
    eprintln!(
        "verify: {} windows compared against {} store rows in {:.2}s ({:.0} rows/s), {} differences",
        expected_totals.len(),
        stored_rows,
        compare_seconds,
        rate(stored_rows as f64, compare_seconds),
        differences.len()
    );
    Ok(differences.is_empty())
}

/// Per partition: where to start reading. With a seek time and a broker that answers
/// offsets-for-times, the first offset stamped at or after it; otherwise the first
/// available offset (records before the seek time are then passed over).
fn plan_partitions(
    consumer: &BaseConsumer,
    topic: &str,
    ids: &[i32],
    plan: Plan,
) -> anyhow::Result<(Vec<PartitionRead>, Seek)> {
    let mut reads = Vec::new();
    for &partition in ids {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
            .with_context(|| format!("reading watermarks of {topic}/{partition}"))?;
        if high > low {
            reads.push(PartitionRead {
                partition,
                start: low,
                end: high,
                feed_from_ts: None,
                truncated_at: (low > 0).then_some(low),
            });
        }
    }
    let Some(seek_ms) = plan.seek_ms else {
        return Ok((reads, Seek::FromStart));
    };
    if reads.is_empty() {
        return Ok((reads, Seek::ByTime));
    }
    let lookup = |time_ms: i64| -> anyhow::Result<HashMap<i32, Offset>> {
        let mut query = TopicPartitionList::new();
        for read in &reads {
            query.add_partition_offset(topic, read.partition, Offset::Offset(time_ms))?;
        }
        let found = consumer
            .offsets_for_times(query, KAFKA_TIMEOUT)
            .context("looking up offsets by time")?;
        Ok(found
            .elements_for_topic(topic)
            .iter()
            .map(|e| (e.partition(), e.offset()))
            .collect())
    };
    // A broker that can look offsets up by time finds a record stamped at or after
    // the epoch in a non-empty partition; librdkafka's mock cluster answers "none" to
    // every time.
    let by_time = lookup(0)
        .map(|found| {
            found
                .values()
                .any(|offset| matches!(offset, Offset::Offset(o) if *o >= 0))
        })
        .unwrap_or(false);
    if !by_time {
        for read in &mut reads {
            read.feed_from_ts = Some(seek_ms);
        }
        return Ok((reads, Seek::PassOver));
    }
    let found = lookup(seek_ms)?;
    for read in &mut reads {
        read.start = match found.get(&read.partition) {
            Some(Offset::Offset(offset)) if *offset >= 0 => (*offset).clamp(read.start, read.end),
            // No record stamped that late: nothing of the range is in this partition.
            _ => read.end,
        };
    }
    Ok((reads, Seek::ByTime))
}

/// The timestamp of the record at `offset` (the first surviving one of a truncated
/// partition that was sought past it).
fn timestamp_at(
    brokers: &Brokers,
    topic: &str,
    partition: i32,
    offset: i64,
) -> anyhow::Result<Option<i64>> {
    let consumer = admin_consumer(brokers, &format!("tally-verify-{}", Uuid::new_v4()))?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + KAFKA_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(message) = consumer.poll(std::time::Duration::from_millis(200)) {
            let message = message?;
            if message.partition() == partition && message.offset() >= offset {
                return Ok(message.timestamp().to_millis());
            }
        }
    }
    anyhow::bail!("no record at {topic}/{partition}@{offset} within {KAFKA_TIMEOUT:?}")
}

/// Reads each partition's part of the log through fresh engines (the same decisions
/// as a live run) and returns the rows of the compared range.
fn recompute(
    brokers: &Brokers,
    topic: &str,
    config: EngineConfig,
    plan: Plan,
) -> anyhow::Result<Recomputed> {
    let consumer = admin_consumer(brokers, &format!("tally-verify-{}", Uuid::new_v4()))?;
    let ids = partitions(&consumer, topic)?;
    let (reads, seek) = plan_partitions(&consumer, topic, &ids, plan)?;
    let mut recomputed = Recomputed {
        seek,
        ..Recomputed::default()
    };
    let first_window_after = |first_ts: i64| {
        let window = config.window_ms;
        let end = first_ts
            .div_euclid(window)
            .saturating_mul(window)
            .saturating_add(window);
        align_up(end.saturating_add(config.grace_ms), window)
    };
    for read in &reads {
        if let Some(low) = read.truncated_at {
            if read.start > low {
                if let Some(ts) = timestamp_at(brokers, topic, read.partition, low)? {
                    recomputed
                        .truncated
                        .insert(read.partition, (low, first_window_after(ts)));
                }
            }
        }
    }
    let mut assignment = TopicPartitionList::new();
    let mut active: HashMap<i32, PartitionRead> = HashMap::new();
    for read in &reads {
        if read.start < read.end {
            assignment.add_partition_offset(topic, read.partition, Offset::Offset(read.start))?;
            active.insert(read.partition, *read);
        }
    }
    if active.is_empty() {
        return Ok(recomputed);
    }
    let now = now_ms();
    let mut engines: HashMap<i32, PartitionEngine> = HashMap::new();
    let in_range =
        |row: &WindowRow| row.window_start_ms >= plan.from_ms && row.window_start_ms < plan.to_ms;
    let mut rows = Vec::new();
    consumer.assign(&assignment)?;
    let mut idle_since = Instant::now();
    while !active.is_empty() {
        let Some(message) = consumer.poll(std::time::Duration::from_millis(500)) else {
            anyhow::ensure!(
                idle_since.elapsed() < KAFKA_TIMEOUT,
                "no records for {KAFKA_TIMEOUT:?} while partitions {:?} were not read to their end",
                active.keys().collect::<Vec<_>>()
            );
            continue;
        };
        idle_since = Instant::now();
        let message = message?;
        let partition = message.partition();
        let offset = message.offset();
        let Some(read) = active.get(&partition).copied() else {
            continue;
        };
        if offset >= read.end {
            active.remove(&partition);
            continue;
        }
        recomputed.records_read += 1;
        let timestamp = message.timestamp().to_millis();
        // The first record read of a truncated partition read from its first offset.
        if let (Some(low), Some(ts)) = (read.truncated_at, timestamp) {
            recomputed
                .truncated
                .entry(partition)
                .or_insert((low, first_window_after(ts)));
        }
        let engine = match engines.get_mut(&partition) {
            Some(engine) => Some(engine),
            None => {
                // Records before the seek time are passed over, as a seek would.
                let starts_here = read
                    .feed_from_ts
                    .is_none_or(|from| timestamp.is_some_and(|ts| ts >= from));
                if starts_here {
                    engines.insert(
                        partition,
                        PartitionEngine::new(
                            config,
                            partition,
                            Resume::Checkpoint(Checkpoint::fresh(offset)),
                        ),
                    );
                    engines.get_mut(&partition)
                } else {
                    recomputed.records_passed_over += 1;
                    None
                }
            }
        };
        let mut done = offset + 1 >= read.end;
        if let Some(engine) = engine {
            if tally_aggregator::consumer::is_marker(&message) {
                // Idle markers advance event time as they did for the aggregator.
                engine.marker(offset, timestamp.unwrap_or(-1), now);
            } else if let Some(Ok(increment)) = message.payload().map(decode_increment) {
                let _: RecordOutcome = engine.record(
                    offset,
                    increment.key,
                    timestamp.unwrap_or(-1),
                    increment.value,
                    now,
                );
            } else {
                engine.skip(offset);
            }
            // Past `--to`: every later record for a window of the range is late.
            if plan
                .stop_watermark_ms
                .is_some_and(|stop| engine.watermark_ms().is_some_and(|w| w >= stop))
            {
                done = true;
            }
            // Keep memory flat on long topics: closed windows leave as rows.
            if offset % 65_536 == 0 || done {
                rows.extend(engine.flush().rows.into_iter().filter(in_range));
            }
        }
        if done {
            active.remove(&partition);
        }
    }
    for engine in engines.values_mut() {
        rows.extend(engine.flush().rows.into_iter().filter(in_range));
    }
    recomputed.rows = latest_rows(rows);
    Ok(recomputed)
}

/// Keeps the most complete version of each (key, window, partition) row.
fn latest_rows(rows: Vec<WindowRow>) -> Vec<WindowRow> {
    let mut latest: HashMap<(Uuid, i64, i32), WindowRow> = HashMap::new();
    for row in rows {
        let slot = latest
            .entry((row.key, row.window_start_ms, row.partition))
            .or_insert(row);
        if row.version() > slot.version() {
            *slot = row;
        }
    }
    latest.into_values().collect()
}

/// One JSON line per window whose totals differ (missing on either side included).
fn diff(expected: &[WindowTotal], stored: &[WindowTotal]) -> Vec<serde_json::Value> {
    let index = |totals: &[WindowTotal]| -> BTreeMap<(i64, Uuid), WindowTotal> {
        totals
            .iter()
            .map(|t| ((t.window_start_ms, t.key), *t))
            .collect()
    };
    let expected = index(expected);
    let stored = index(stored);
    let mut differences = Vec::new();
    let keys: BTreeSet<_> = expected.keys().chain(stored.keys()).collect();
    for key in keys {
        let want = expected.get(key);
        let have = stored.get(key);
        let same = match (want, have) {
            (Some(w), Some(h)) => w.sum == h.sum && w.count == h.count,
            _ => false,
        };
        if !same {
            differences.push(json!({
                "key": key.1.hyphenated().to_string(),
                "window_start": rfc3339_ms(key.0),
                "expected": want.map(|t| json!({"sum": t.sum, "count": t.count})),
                "stored": have.map(|t| json!({"sum": t.sum, "count": t.count, "final": t.is_final})),
            }));
        }
    }
    differences
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TEN_S: SumSettings = SumSettings {
        window_ms: 10_000,
        grace_ms: 2_000,
    };

    #[test]
    fn the_plan_seeks_to_the_first_window_minus_the_grace_and_stops_past_to() {
        let plan = Plan::new(Some(1_005), Some(60_001), TEN_S);
        assert_eq!(plan.from_ms, 10_000, "windows starting at or after --from");
        assert_eq!(plan.seek_ms, Some(8_000));
        assert_eq!(plan.to_ms, 60_001);
        // The last window starting before 60 001 is [60 000, 70 000).
        assert_eq!(plan.stop_watermark_ms, Some(70_000));
        let plan = Plan::new(Some(10_000), Some(60_000), TEN_S);
        assert_eq!((plan.from_ms, plan.seek_ms), (10_000, Some(8_000)));
        assert_eq!(plan.stop_watermark_ms, Some(60_000));
        let open = Plan::new(None, None, TEN_S);
        assert_eq!((open.seek_ms, open.stop_watermark_ms), (None, None));
        assert_eq!((open.from_ms, open.to_ms), (i64::MIN, i64::MAX));
    }

    #[test]
    fn pinned_settings_win_and_other_flags_are_refused() {
        let pinned = tally_schemas::PinnedSettings::new(TEN_S).unwrap();
        let secs = std::time::Duration::from_secs;
        assert_eq!(settings(Some(&pinned), None, None).unwrap(), (TEN_S, None));
        assert_eq!(
            settings(Some(&pinned), Some(secs(10)), Some(secs(2))).unwrap(),
            (TEN_S, None)
        );
        let err = settings(Some(&pinned), Some(secs(60)), None).unwrap_err();
        assert!(err.to_string().contains("pins 10000 ms"), "{err}");
        assert!(settings(Some(&pinned), None, Some(secs(0))).is_err());
        // Without pinned settings the flags (or their defaults) are used.
        assert_eq!(settings(None, None, None).unwrap().0, TEN_S);
        assert_eq!(
            settings(
                None,
                Some(secs(2)),
                Some(std::time::Duration::from_millis(500))
            )
            .unwrap()
            .0,
            SumSettings {
                window_ms: 2_000,
                grace_ms: 500
            }
        );
    }

    #[test]
    fn alignment_rounds_up_to_a_window_start() {
        assert_eq!(align_up(0, 10), 0);
        assert_eq!(align_up(1, 10), 10);
        assert_eq!(align_up(-1, 10), 0);
        assert_eq!(align_up(-11, 10), -10);
        assert_eq!(align_up(i64::MAX, 10), i64::MAX);
    }
}
