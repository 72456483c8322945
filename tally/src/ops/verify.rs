//! `tally verify`: recompute the sums from the topic with the same engine and diff
//! them against the store.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::Context;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::json;
use tally_aggregator::engine::{EngineConfig, PartitionEngine, RecordOutcome, Resume};
use tally_schemas::{decode_increment, Checkpoint};
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
    #[arg(long, env = "TALLY_GRACE", default_value = "2s", value_parser = tally_aggregator::config::parse_duration)]
    pub grace: std::time::Duration,
    #[arg(long, env = "TALLY_MAX_FUTURE_SKEW", default_value = "5m", value_parser = tally_aggregator::config::parse_duration)]
    pub max_future_skew: std::time::Duration,
}

fn ms(duration: std::time::Duration) -> anyhow::Result<i64> {
    i64::try_from(duration.as_millis()).context("duration too large")
}

/// Returns true when the store matches the recomputation.
pub async fn run(args: VerifyArgs) -> anyhow::Result<bool> {
    let config = EngineConfig {
        window_ms: args.store.window_ms()?,
        grace_ms: ms(args.grace)?,
        max_future_skew_ms: ms(args.max_future_skew)?,
    };
    let from_ms = args
        .from
        .as_deref()
        .map(parse_time_ms)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let to_ms = args
        .to
        .as_deref()
        .map(parse_time_ms)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let (from_ms, to_ms) = (from_ms.unwrap_or(i64::MIN), to_ms.unwrap_or(i64::MAX));

    let brokers = args.kafka.brokers.clone();
    let topic = args.kafka.topic.clone();
    let started = Instant::now();
    let recomputed = tokio::task::spawn_blocking(move || recompute(&brokers, &topic, config))
        .await
        .context("recompute task")??;
    eprintln!(
        "verify: recomputed {} rows from {} in {:.1?}",
        recomputed.len(),
        args.kafka.topic,
        started.elapsed()
    );
    let store = args.store.open().await?;
    let stored = store.scan_rows(from_ms, to_ms).await?;
    let in_range = |row: &WindowRow| row.window_start_ms >= from_ms && row.window_start_ms < to_ms;
    let expected: Vec<WindowRow> = recomputed.into_iter().filter(in_range).collect();
    let differences = diff(
        &WindowTotal::from_rows(&expected),
        &WindowTotal::from_rows(&stored),
    );
    for difference in &differences {
        println!("{difference}");
    }
    eprintln!(
        "verify: {} windows compared, {} differences",
        WindowTotal::from_rows(&expected).len(),
        differences.len()
    );
    Ok(differences.is_empty())
}

/// Reads every partition from the beginning to its current end through fresh
/// engines (the same decisions as a live run from offset 0) and returns all rows.
fn recompute(
    brokers: &Brokers,
    topic: &str,
    config: EngineConfig,
) -> anyhow::Result<Vec<WindowRow>> {
    let consumer = admin_consumer(brokers, &format!("tally-verify-{}", Uuid::new_v4()))?;
    let ids = partitions(&consumer, topic)?;
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for &partition in &ids {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
            .with_context(|| format!("reading watermarks of {topic}/{partition}"))?;
        if high > low {
            ends.insert(partition, high);
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
    }
    let now = now_ms();
    let mut engines: HashMap<i32, PartitionEngine> = ids
        .iter()
        .map(|&p| {
            (
                p,
                PartitionEngine::new(config, p, Resume::Checkpoint(Checkpoint::fresh(0))),
            )
        })
        .collect();
    let mut rows = Vec::new();
    if ends.is_empty() {
        return Ok(rows);
    }
    consumer.assign(&assignment)?;
    let mut idle_since = Instant::now();
    while !ends.is_empty() {
        let Some(message) = consumer.poll(std::time::Duration::from_millis(500)) else {
            anyhow::ensure!(
                idle_since.elapsed() < KAFKA_TIMEOUT,
                "no records for {KAFKA_TIMEOUT:?} while partitions {:?} were not read to their end",
                ends.keys().collect::<Vec<_>>()
            );
            continue;
        };
        idle_since = Instant::now();
        let message = message?;
        let partition = message.partition();
        let offset = message.offset();
        let Some(end) = ends.get(&partition).copied() else {
            continue;
        };
        if offset >= end {
            ends.remove(&partition);
            continue;
        }
        if let Some(engine) = engines.get_mut(&partition) {
            match message.payload().map(decode_increment) {
                Some(Ok(increment)) => {
                    let timestamp = message.timestamp().to_millis().unwrap_or(-1);
                    let _: RecordOutcome =
                        engine.record(offset, increment.key, timestamp, increment.value, now);
                }
                _ => engine.skip(offset),
            }
        }
        if offset + 1 >= end {
            ends.remove(&partition);
        }
        // Keep memory flat on long topics: closed windows leave as rows.
        if offset % 65_536 == 0 {
            if let Some(engine) = engines.get_mut(&partition) {
                rows.extend(engine.flush().rows);
            }
        }
    }
    for engine in engines.values_mut() {
        rows.extend(engine.flush().rows);
    }
    Ok(latest_rows(rows))
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
    let keys: std::collections::BTreeSet<_> = expected.keys().chain(stored.keys()).collect();
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
