//! `tally replay`: rebuild windows from a time or from offsets.
//!
//! Run it while the aggregators of the group are stopped: it joins the group,
//! waits until it owns every partition (refusing if a running member keeps some),
//! commits the replay positions and leaves. Start the aggregators again afterwards
//! and they rebuild.
//!
//! `--from TIME`: per partition, the new position is the first offset whose event
//! time is at or after the start of TIME's window (Kafka's offsets-for-times), never
//! later than what the group already committed. The committed state says: no
//! history before that offset, windows ending at or before that window start stay as
//! they are, and a new generation, so rebuilt rows replace the old ones even though
//! their offsets are lower. Running it twice rebuilds the same rows again with a
//! higher generation: the same sums.
//!
//! `--from-offset P:O[,P:O…]`: commits the offsets without Tally state, exactly like
//! a reset by Kafka's own tools; the aggregator then rebuilds, per partition, only
//! the windows after the window of the first replayed record.

use std::collections::HashMap;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tally_schemas::Checkpoint;
use tally_sink::store::CheckpointScope;

use super::{admin_consumer, partitions, Brokers, KAFKA_TIMEOUT};
use crate::read_api::{parse_time_ms, rfc3339_ms};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("start").required(true).args(["from", "from_offset"])))]
pub struct ReplayArgs {
    #[command(flatten)]
    pub kafka: super::TopicArgs,
    #[arg(long, env = "TALLY_GROUP", default_value = "tally-aggregator")]
    pub group: String,
    /// The aggregators' store (its checkpoint rows are updated too).
    #[command(flatten)]
    pub store: super::StoreArgs,
    /// Rebuild windows from this time on (RFC 3339, e.g. 2026-11-21T10:00:00Z).
    #[arg(long)]
    pub from: Option<String>,
    /// Rebuild from these offsets, `PARTITION:OFFSET[,PARTITION:OFFSET…]`.
    #[arg(long, value_delimiter = ',')]
    pub from_offset: Vec<String>,
    /// Window size the aggregators use (aligns `--from` to a window start).
    #[arg(long, env = "TALLY_WINDOW", default_value = "10s", value_parser = tally_aggregator::config::parse_duration)]
    pub window: std::time::Duration,
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let store = args.store.open().await?;
    if let Some(from) = &args.from {
        let window_ms = super::window_ms(args.window)?;
        let at = parse_time_ms(from).map_err(anyhow::Error::msg)?;
        let window_start = at.div_euclid(window_ms) * window_ms;
        let plan = {
            let (brokers, group, topic) = (
                args.kafka.brokers.clone(),
                args.group.clone(),
                args.kafka.topic.clone(),
            );
            tokio::task::spawn_blocking(move || {
                plan_from_time(&brokers, &group, &topic, window_start)
            })
            .await
            .context("planning task")??
        };
        let mut checkpoints = Vec::new();
        for (partition, current) in plan {
            let scope = CheckpointScope {
                group: args.group.clone(),
                topic: args.kafka.topic.clone(),
                partition,
            };
            // The generation must exceed every earlier one of this partition.
            let latest = store.load_checkpoint(&scope, None).await?;
            let generation = current
                .generation
                .max(latest.map_or(0, |c| c.generation))
                .checked_add(1)
                .context("replay generation overflow")?;
            let checkpoint = Checkpoint {
                generation,
                ..current
            };
            store.save_checkpoint(&scope, &checkpoint).await?;
            println!(
                "partition {partition}: from offset {} with generation {generation} (windows from {})",
                checkpoint.next_offset,
                rfc3339_ms(window_start)
            );
            checkpoints.push((partition, checkpoint));
        }
        let (brokers, group, topic) = (
            args.kafka.brokers.clone(),
            args.group.clone(),
            args.kafka.topic.clone(),
        );
        tokio::task::spawn_blocking(move || commit(&brokers, &group, &topic, &checkpoints, true))
            .await
            .context("commit task")??;
    } else {
        let mut checkpoints = Vec::new();
        for item in &args.from_offset {
            let (partition, offset) = item
                .split_once(':')
                .with_context(|| format!("{item:?}: expected PARTITION:OFFSET"))?;
            let partition: i32 = partition
                .parse()
                .with_context(|| format!("{item:?}: bad partition"))?;
            let offset: i64 = offset
                .parse()
                .with_context(|| format!("{item:?}: bad offset"))?;
            anyhow::ensure!(offset >= 0, "{item:?}: offsets are non-negative");
            checkpoints.push((partition, Checkpoint::fresh(offset)));
            println!("partition {partition}: from offset {offset} (external-reset rules)");
        }
        let (brokers, group, topic) = (
            args.kafka.brokers.clone(),
            args.group.clone(),
            args.kafka.topic.clone(),
        );
        tokio::task::spawn_blocking(move || commit(&brokers, &group, &topic, &checkpoints, false))
            .await
            .context("commit task")??;
    }
    println!(
        "committed; start the aggregators of group {} to rebuild",
        args.group
    );
    Ok(())
}

/// For each partition: the state a replay from `window_start` resumes with (before
/// the generation bump).
fn plan_from_time(
    brokers: &Brokers,
    group: &str,
    topic: &str,
    window_start: i64,
) -> anyhow::Result<Vec<(i32, Checkpoint)>> {
    let consumer = admin_consumer(brokers, group)?;
    let ids = partitions(&consumer, topic)?;
    let mut query = TopicPartitionList::new();
    let mut all = TopicPartitionList::new();
    for &partition in &ids {
        query.add_partition_offset(topic, partition, Offset::Offset(window_start))?;
        all.add_partition(topic, partition);
    }
    let by_time = consumer
        .offsets_for_times(query, KAFKA_TIMEOUT)
        .context("looking up offsets for the replay time")?;
    let committed = consumer
        .committed_offsets(all, KAFKA_TIMEOUT)
        .context("reading the group's committed offsets")?;
    let committed: HashMap<i32, (Offset, String)> = committed
        .elements_for_topic(topic)
        .iter()
        .map(|e| (e.partition(), (e.offset(), e.metadata().to_owned())))
        .collect();
    let mut plan = Vec::new();
    for element in by_time.elements_for_topic(topic) {
        let partition = element.partition();
        let target = match element.offset() {
            Offset::Offset(offset) if offset >= 0 => offset,
            // Either no record is that recent, or the broker cannot look offsets up
            // by time (librdkafka's mock cluster cannot): find it by reading.
            _ => scan_for_time(brokers, topic, partition, window_start)?,
        };
        let current = committed.get(&partition);
        let current_offset = match current {
            Some((Offset::Offset(offset), _)) => Some(*offset),
            _ => None,
        };
        let checkpoint = match current_offset {
            // The group has not read that far yet: keep its position and state, only
            // the generation changes (skipping forward would lose records).
            Some(offset) if offset <= target => current
                .and_then(|(_, metadata)| Checkpoint::from_metadata(metadata, offset).ok())
                .unwrap_or(Checkpoint {
                    next_offset: offset,
                    max_ts_ms: None,
                    closed_through_ms: Some(window_start),
                    generation: 0,
                    settings: None,
                }),
            _ => Checkpoint {
                next_offset: target,
                max_ts_ms: None,
                closed_through_ms: Some(window_start),
                generation: current
                    .and_then(|(offset, metadata)| match offset {
                        Offset::Offset(o) => Checkpoint::from_metadata(metadata, *o).ok(),
                        _ => None,
                    })
                    .map_or(0, |c| c.generation),
                settings: None,
            },
        };
        plan.push((partition, checkpoint));
    }
    plan.sort_by_key(|(partition, _)| *partition);
    Ok(plan)
}

/// The first offset of `partition` whose timestamp is at or after `time_ms`, or the
/// partition's end if there is none, found by reading the partition from its start.
fn scan_for_time(
    brokers: &Brokers,
    topic: &str,
    partition: i32,
    time_ms: i64,
) -> anyhow::Result<i64> {
    use rdkafka::message::Message;
    let consumer = admin_consumer(
        brokers,
        &format!("tally-replay-scan-{}", uuid::Uuid::new_v4()),
    )?;
    let (low, high) = consumer.fetch_watermarks(topic, partition, KAFKA_TIMEOUT)?;
    if low >= high {
        return Ok(high);
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    let mut last_progress = std::time::Instant::now();
    loop {
        let Some(message) = consumer.poll(std::time::Duration::from_millis(200)) else {
            anyhow::ensure!(
                last_progress.elapsed() < KAFKA_TIMEOUT,
                "reading {topic}/{partition} stalled"
            );
            continue;
        };
        last_progress = std::time::Instant::now();
        let message = message?;
        if message
            .timestamp()
            .to_millis()
            .is_some_and(|ts| ts >= time_ms)
        {
            return Ok(message.offset());
        }
        if message.offset() + 1 >= high {
            return Ok(high);
        }
    }
}

fn commit(
    brokers: &Brokers,
    group: &str,
    topic: &str,
    checkpoints: &[(i32, Checkpoint)],
    with_metadata: bool,
) -> anyhow::Result<()> {
    let mut list = TopicPartitionList::new();
    for (partition, checkpoint) in checkpoints {
        list.add_partition_offset(topic, *partition, Offset::Offset(checkpoint.next_offset))?;
        if with_metadata {
            if let Some(mut element) = list.find_partition(topic, *partition) {
                element.set_metadata(checkpoint.to_metadata());
            }
        }
    }
    // Commit as a member of the group that owns every partition: this works on
    // brokers that refuse commits from outside an existing group (librdkafka's mock
    // cluster), and proves that no aggregator of the group is running (one would
    // own some partitions).
    let consumer: rdkafka::consumer::BaseConsumer = brokers
        .config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        .create()
        .context("creating the replay consumer")?;
    consumer.subscribe(&[topic])?;
    let wanted = partitions(&consumer, topic)?.len();
    let deadline = std::time::Instant::now() + GROUP_EMPTY_WAIT;
    loop {
        // Polling drives the group protocol; fetched records are ignored.
        let _ = consumer.poll(std::time::Duration::from_millis(200));
        let owned = consumer.assignment()?.elements_for_topic(topic).len();
        if owned == wanted {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the replay joined group {group} but owns {owned} of {wanted} partitions: stop its aggregators first"
        );
    }
    consumer
        .commit(&list, CommitMode::Sync)
        .with_context(|| format!("committing the replay offsets for group {group}"))?;
    consumer.unsubscribe();
    Ok(())
}

/// How long `replay` waits to own every partition (a crashed member holds its
/// partitions until its session times out).
const GROUP_EMPTY_WAIT: std::time::Duration = std::time::Duration::from_secs(45);
