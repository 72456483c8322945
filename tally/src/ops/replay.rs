//! `tally replay`: rebuild windows from a time or from offsets.
//!
//! Run it while the aggregators of the group are stopped: it joins the group,
//! waits until it owns every partition (refusing if a running member keeps some),
//! commits the replay positions and leaves. Start the aggregators again afterwards
//! and they rebuild.
//!
//! The plan is the aggregator's own (`tally_aggregator::protocol::replay`): where the
//! group stands is resolved exactly as an aggregator would resume (commit metadata,
//! else the store's checkpoint row for the committed offset, …), so a broker that
//! drops commit metadata plans the same as one that keeps it.
//!
//! `--from TIME [--window W] [--grace G]`: rebuild every window from TIME's window
//! start on with a new generation; with `--window`/`--grace`, the new settings apply
//! from there on (a new settings epoch pinned in the store; every window before it
//! must be final already).
//!
//! `--from-offset P:O[,P:O…]`: commits the offsets without Tally state, exactly like
//! a reset by Kafka's own tools; the aggregator then rebuilds, per partition, only
//! the windows after the window of the first replayed record.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tally_aggregator::protocol::replay::{
    plan_from_offsets, plan_from_time, PartitionPosition, PlannedCommit, ReplayPlan,
};
use tally_aggregator::protocol::resume::{self, CommittedOffset, StoreCheckpoints};
use tally_schemas::{PinnedSettings, SumSettings};
use tally_sink::store::CheckpointScope;
use tally_sink::WindowStore;

use super::{admin_consumer, partitions, Brokers, KAFKA_TIMEOUT};
use crate::read_api::{parse_time_ms, rfc3339_ms};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("start").required(true).args(["from", "from_offset"])))]
pub struct ReplayArgs {
    #[command(flatten)]
    pub kafka: super::TopicArgs,
    #[arg(long, env = "TALLY_GROUP", default_value = "tally-aggregator")]
    pub group: String,
    /// The aggregators' store (its checkpoint rows and pinned settings are updated).
    #[arg(
        long,
        env = "TALLY_STORE",
        default_value = "sqlite://data/tally.sqlite"
    )]
    pub store: String,
    #[command(flatten)]
    pub scylla: tally_aggregator::config::ScyllaArgs,
    /// Rebuild windows from this time on (RFC 3339, e.g. 2026-11-21T10:00:00Z, or
    /// epoch milliseconds).
    #[arg(long)]
    pub from: Option<String>,
    /// Rebuild from these offsets, `PARTITION:OFFSET[,PARTITION:OFFSET…]`.
    #[arg(long, value_delimiter = ',')]
    pub from_offset: Vec<String>,
    /// Change the window size from the --from time on (start the aggregators
    /// with the new value afterwards).
    #[arg(long, requires = "from", value_parser = tally_aggregator::config::parse_duration)]
    pub window: Option<Duration>,
    /// Change the grace from the --from time on.
    #[arg(long, requires = "from", value_parser = tally_aggregator::config::parse_duration)]
    pub grace: Option<Duration>,
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let store = args
        .scylla
        .open(&args.store)
        .await
        .with_context(|| format!("opening {}", args.store))?;
    let topic = args.kafka.topic.clone();
    let plan = match &args.from {
        Some(from) => plan_time(&args, from, store.as_ref()).await?,
        None => {
            let plan = plan_from_offsets(&args.from_offset)?;
            for (partition, commit) in &plan.commits {
                println!(
                    "partition {partition}: from offset {} (external-reset rules)",
                    commit.offset()
                );
            }
            plan
        }
    };
    // Checkpoint rows first (brokers that drop commit metadata rely on them), then the
    // settings epoch, then the commit: a failure before the commit changes nothing the
    // aggregators would act on; run the replay again.
    for (partition, commit) in &plan.commits {
        if let PlannedCommit::Checkpoint(checkpoint) = commit {
            store
                .save_checkpoint(&scope(&args.group, &topic, *partition), checkpoint)
                .await?;
        }
    }
    if let Some(new) = &plan.pinned {
        let current = tally_sink::load_settings(store.as_ref())
            .await?
            .context("the store has no pinned settings")?;
        let changed = store
            .compare_and_set_metadata(
                PinnedSettings::METADATA_NAME,
                Some(&current.to_json()),
                &new.to_json(),
            )
            .await?;
        anyhow::ensure!(
            changed,
            "the store's settings changed meanwhile; run the replay again"
        );
        let epoch = new.current();
        println!(
            "settings from {}: {} (generation {})",
            epoch.from_ms.map_or_else(|| "the start".into(), rfc3339_ms),
            epoch.settings(),
            epoch.generation
        );
    }
    let (brokers, group) = (args.kafka.brokers.clone(), args.group.clone());
    let commits = plan.commits.clone();
    tokio::task::spawn_blocking(move || commit(&brokers, &group, &topic, &commits))
        .await
        .context("commit task")??;
    println!(
        "committed; start the aggregators of group {} to rebuild",
        args.group
    );
    Ok(())
}

fn scope(group: &str, topic: &str, partition: i32) -> CheckpointScope {
    CheckpointScope {
        group: group.to_owned(),
        topic: topic.to_owned(),
        partition,
    }
}

/// The `--from` plan: where every partition stands, then the shared planner.
async fn plan_time(
    args: &ReplayArgs,
    from: &str,
    store: &dyn WindowStore,
) -> anyhow::Result<ReplayPlan> {
    let pinned = tally_sink::load_settings(store).await?.context(
        "the store has no pinned settings: no aggregator has used it yet, so there is nothing to replay",
    )?;
    let at = parse_time_ms(from).map_err(anyhow::Error::msg)?;
    let epoch = pinned.epoch_at(at);
    let change = match (args.window, args.grace) {
        (None, None) => None,
        (window, grace) => {
            let millis = |d: Duration| i64::try_from(d.as_millis()).context("duration too large");
            Some(SumSettings {
                window_ms: window.map(millis).transpose()?.unwrap_or(epoch.window_ms),
                grace_ms: grace.map(millis).transpose()?.unwrap_or(epoch.grace_ms),
            })
        }
    };
    // A change starts where both the old and the new windows have a boundary.
    let step = match change {
        Some(new) => lcm(epoch.window_ms, new.window_ms),
        None => epoch.window_ms,
    };
    let window_start = at.div_euclid(step) * step;

    let (brokers, group, topic) = (
        args.kafka.brokers.clone(),
        args.group.clone(),
        args.kafka.topic.clone(),
    );
    let broker_view =
        tokio::task::spawn_blocking(move || read_positions(&brokers, &group, &topic, window_start))
            .await
            .context("planning task")??;
    let mut positions = Vec::with_capacity(broker_view.len());
    for (partition, committed, target) in broker_view {
        let scope = scope(&args.group, &args.kafka.topic, partition);
        let exact = match &committed {
            CommittedOffset::At { offset, .. } => {
                store.load_checkpoint(&scope, Some(*offset)).await?
            }
            CommittedOffset::None => None,
        };
        let latest = store.load_checkpoint(&scope, None).await?;
        positions.push(PartitionPosition {
            partition,
            current: resume::decide(&committed, StoreCheckpoints { exact, latest }),
            latest_generation: latest.map(|c| c.generation),
            target,
        });
    }
    let plan = plan_from_time(window_start, &positions, &pinned, change)?;
    for (partition, commit) in &plan.commits {
        match commit {
            PlannedCommit::Checkpoint(checkpoint) => println!(
                "partition {partition}: from offset {} with generation {} (windows from {})",
                checkpoint.next_offset,
                checkpoint.generation,
                rfc3339_ms(window_start)
            ),
            PlannedCommit::WithoutState(offset) => println!(
                "partition {partition}: stays at offset {offset} (an offset reset without Tally state)"
            ),
        }
    }
    Ok(plan)
}

fn lcm(a: i64, b: i64) -> i64 {
    fn gcd(a: i64, b: i64) -> i64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    (a / gcd(a, b).max(1)).saturating_mul(b)
}

/// Per partition: the group's committed offset (with metadata) and the first offset
/// whose event time is at or after `window_start`.
fn read_positions(
    brokers: &Brokers,
    group: &str,
    topic: &str,
    window_start: i64,
) -> anyhow::Result<Vec<(i32, CommittedOffset, i64)>> {
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
    let committed: HashMap<i32, CommittedOffset> = committed
        .elements_for_topic(topic)
        .iter()
        .map(|e| {
            let state = match e.offset() {
                Offset::Offset(offset) => CommittedOffset::At {
                    offset,
                    metadata: e.metadata().to_owned(),
                },
                _ => CommittedOffset::None,
            };
            (e.partition(), state)
        })
        .collect();
    let mut positions = Vec::new();
    for element in by_time.elements_for_topic(topic) {
        let partition = element.partition();
        let target = match element.offset() {
            Offset::Offset(offset) if offset >= 0 => offset,
            // Either no record is that recent, or the broker cannot look offsets up
            // by time (librdkafka's mock cluster cannot): find it by reading.
            _ => scan_for_time(brokers, topic, partition, window_start)?,
        };
        let current = committed
            .get(&partition)
            .cloned()
            .unwrap_or(CommittedOffset::None);
        positions.push((partition, current, target));
    }
    positions.sort_by_key(|(partition, _, _)| *partition);
    Ok(positions)
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
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
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
    commits: &[(i32, PlannedCommit)],
) -> anyhow::Result<()> {
    let mut list = TopicPartitionList::new();
    for (partition, commit) in commits {
        list.add_partition_offset(topic, *partition, Offset::Offset(commit.offset()))?;
        if let PlannedCommit::Checkpoint(checkpoint) = commit {
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
    let known = partitions(&consumer, topic)?;
    for (partition, _) in commits {
        anyhow::ensure!(
            known.contains(partition),
            "topic {topic} has no partition {partition}"
        );
    }
    let wanted = known.len();
    let deadline = std::time::Instant::now() + GROUP_EMPTY_WAIT;
    loop {
        // Polling drives the group protocol; fetched records are ignored.
        let _ = consumer.poll(Duration::from_millis(200));
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
const GROUP_EMPTY_WAIT: Duration = Duration::from_secs(45);
