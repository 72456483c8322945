//! `tally dlq list|redrive`: inspect dead letters and put chosen ones back.
//!
//! `redrive` treats the dead-letter topic like a queue with its own consumer group
//! (`<group>.redrive`, default `tally-dlq-redrive.redrive`): each run looks at the
//! letters after the group's committed position, re-produces those that match
//! `--reason` to the input topic (original key, value and event time, plus the header
//! `tally.redriven-from: PARTITION:OFFSET`), then commits past everything it looked
//! at. So a letter is offered once and re-driven at most once. The aggregator copies
//! `tally.redriven-from` into the dead letter of a re-driven record that fails again,
//! and `redrive` passes over such letters unless `--include-redriven` is given.

use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::json;
use tally_schemas::names::{DLQ_REASON_HEADER, REDRIVEN_HEADER};
use tally_schemas::RejectReason;
use uuid::Uuid;

use super::{admin_consumer, partitions, Brokers, KAFKA_TIMEOUT};

#[derive(clap::Args, Debug)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub action: DlqAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum DlqAction {
    /// Print dead letters (one JSON object per line) with their headers.
    List(DlqCommon),
    /// Re-produce chosen dead letters to the input topic, once.
    Redrive(RedriveArgs),
}

#[derive(clap::Args, Debug)]
pub struct DlqCommon {
    #[command(flatten)]
    pub brokers: Brokers,
    #[arg(long, env = "TALLY_DLQ_TOPIC", default_value = tally_schemas::names::DLQ_TOPIC)]
    pub dlq_topic: String,
    /// Only letters with this `dlq.reason` (e.g. late, invalid_json).
    #[arg(long, value_parser = parse_reason)]
    pub reason: Option<RejectReason>,
    /// Stop after this many letters.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
}

#[derive(clap::Args, Debug)]
pub struct RedriveArgs {
    #[command(flatten)]
    pub common: DlqCommon,
    #[arg(long, env = "TALLY_TOPIC", default_value = tally_schemas::names::INCREMENTS_TOPIC)]
    pub topic: String,
    /// Consumer group that remembers which letters were already offered.
    #[arg(long, default_value = "tally-dlq-redrive")]
    pub redrive_group: String,
    /// Show what would be re-driven without producing or committing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also re-drive letters of records that were themselves re-driven and failed
    /// again (off by default, so a bad record cannot loop).
    #[arg(long)]
    pub include_redriven: bool,
}

fn parse_reason(text: &str) -> Result<RejectReason, String> {
    RejectReason::from_code(text).ok_or_else(|| {
        let known: Vec<_> = RejectReason::ALL.iter().map(|r| r.code()).collect();
        format!("unknown reason {text:?}; one of {}", known.join(", "))
    })
}

pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    match args.action {
        DlqAction::List(common) => {
            tokio::task::spawn_blocking(move || list(&common)).await??;
        }
        DlqAction::Redrive(redrive_args) => redrive(redrive_args).await?,
    }
    Ok(())
}

fn header_text(message: &BorrowedMessage<'_>, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h: &Header<'_, &[u8]>| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn letter_json(message: &BorrowedMessage<'_>) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    if let Some(all) = message.headers() {
        for header in all.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned());
            headers.insert(header.key.to_owned(), json!(value));
        }
    }
    json!({
        "partition": message.partition(),
        "offset": message.offset(),
        "timestamp": message.timestamp().to_millis(),
        "key": message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        "value": message.payload().map(|v| String::from_utf8_lossy(v).into_owned()),
        "headers": headers,
    })
}

fn matches(message: &BorrowedMessage<'_>, reason: Option<RejectReason>) -> bool {
    reason.is_none_or(|r| header_text(message, DLQ_REASON_HEADER).as_deref() == Some(r.code()))
}

/// A letter whose record had already been re-driven once (it failed again).
fn was_redriven(message: &BorrowedMessage<'_>) -> bool {
    header_text(message, REDRIVEN_HEADER).is_some()
}

/// Assigns every partition of the DLQ topic from `start` and calls `visit` for each
/// letter until the ends (as of now) are reached. Returns the end offsets.
fn scan(
    consumer: &BaseConsumer,
    topic: &str,
    start: impl Fn(i32) -> Offset,
    mut visit: impl FnMut(&BorrowedMessage<'_>) -> bool,
) -> anyhow::Result<Vec<(i32, i64)>> {
    let mut ends = Vec::new();
    let mut assignment = TopicPartitionList::new();
    let mut remaining = std::collections::HashMap::new();
    for partition in partitions(consumer, topic)? {
        let (_, high) = consumer.fetch_watermarks(topic, partition, KAFKA_TIMEOUT)?;
        ends.push((partition, high));
        let from = start(partition);
        let begin = match from {
            Offset::Offset(o) => o,
            _ => {
                consumer
                    .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)?
                    .0
            }
        };
        if begin < high {
            remaining.insert(partition, high);
            assignment.add_partition_offset(topic, partition, from)?;
        }
    }
    if remaining.is_empty() {
        return Ok(ends);
    }
    consumer.assign(&assignment)?;
    let mut last_progress = std::time::Instant::now();
    while !remaining.is_empty() {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            anyhow::ensure!(
                last_progress.elapsed() < KAFKA_TIMEOUT,
                "reading {topic} stalled"
            );
            continue;
        };
        last_progress = std::time::Instant::now();
        let message = message?;
        let Some(end) = remaining.get(&message.partition()).copied() else {
            continue;
        };
        if message.offset() + 1 >= end {
            remaining.remove(&message.partition());
        }
        if message.offset() < end && !visit(&message) {
            break;
        }
    }
    Ok(ends)
}

fn list(args: &DlqCommon) -> anyhow::Result<()> {
    let consumer = admin_consumer(&args.brokers, &format!("tally-dlq-list-{}", Uuid::new_v4()))?;
    let mut shown = 0usize;
    scan(
        &consumer,
        &args.dlq_topic,
        |_| Offset::Beginning,
        |message| {
            if matches(message, args.reason) {
                println!("{}", letter_json(message));
                shown += 1;
            }
            shown < args.limit
        },
    )?;
    eprintln!("{shown} dead letter(s)");
    Ok(())
}

struct Chosen {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    timestamp: Option<i64>,
    source: String,
}

async fn redrive(args: RedriveArgs) -> anyhow::Result<()> {
    let brokers = args.common.brokers.clone();
    let group = args.redrive_group.clone();
    let dlq_topic = args.common.dlq_topic.clone();
    let reason = args.common.reason;
    let limit = args.common.limit;
    let include_redriven = args.include_redriven;
    let (chosen, ends) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let consumer = admin_consumer(&brokers, &group)?;
        let mut all = TopicPartitionList::new();
        for partition in partitions(&consumer, &dlq_topic)? {
            all.add_partition(&dlq_topic, partition);
        }
        let committed = consumer.committed_offsets(all, KAFKA_TIMEOUT)?;
        let start = |partition: i32| {
            committed
                .find_partition(&dlq_topic, partition)
                .map(|e| e.offset())
                .filter(|o| matches!(o, Offset::Offset(_)))
                .unwrap_or(Offset::Beginning)
        };
        let mut chosen = Vec::new();
        let mut seen_through: Vec<(i32, i64)> = Vec::new();
        let ends = scan(&consumer, &dlq_topic, start, |message| {
            if matches(message, reason) && (include_redriven || !was_redriven(message)) {
                chosen.push(Chosen {
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec),
                    timestamp: message.timestamp().to_millis(),
                    source: format!("{}:{}", message.partition(), message.offset()),
                });
            }
            seen_through.retain(|(p, _)| *p != message.partition());
            seen_through.push((message.partition(), message.offset() + 1));
            chosen.len() < limit
        })?;
        // Commit only as far as this run looked (the limit may stop it early).
        let stopped_early = chosen.len() >= limit;
        Ok((chosen, if stopped_early { seen_through } else { ends }))
    })
    .await??;

    if args.dry_run {
        eprintln!("dry run: {} letter(s) would be re-driven", chosen.len());
        return Ok(());
    }
    let producer: FutureProducer = args
        .common
        .brokers
        .config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .create()
        .context("creating the re-drive producer")?;
    for letter in &chosen {
        let headers = OwnedHeaders::new().insert(Header {
            key: REDRIVEN_HEADER,
            value: Some(letter.source.as_bytes()),
        });
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&args.topic).headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &letter.value {
            record = record.payload(value.as_slice());
        }
        if let Some(timestamp) = letter.timestamp {
            record = record.timestamp(timestamp);
        }
        producer
            .send(record, KAFKA_TIMEOUT)
            .await
            .map_err(|(err, _)| err)
            .with_context(|| format!("re-driving {}", letter.source))?;
        println!("re-driven {}", letter.source);
    }
    let brokers = args.common.brokers.clone();
    let group = args.redrive_group.clone();
    let dlq_topic = args.common.dlq_topic.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let consumer = admin_consumer(&brokers, &group)?;
        let mut list = TopicPartitionList::new();
        for (partition, offset) in ends {
            list.add_partition_offset(&dlq_topic, partition, Offset::Offset(offset))?;
        }
        consumer
            .commit(&list, CommitMode::Sync)
            .context("recording the re-drive position")
    })
    .await??;
    eprintln!("{} letter(s) re-driven", chosen.len());
    Ok(())
}
