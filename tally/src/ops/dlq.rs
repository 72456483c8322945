//! `tally dlq list|redrive`: inspect dead letters and put chosen ones back, each source
//! record at most once.
//!
//! Dead letters are at least once (a partition judged again after a restart or a
//! rebalance writes its letters again), so the dead-letter topic can hold several
//! copies of the letter for one source record (`dlq.source.topic/partition/offset`).
//! `redrive` de-duplicates by that source record, across copies, runs and crashes,
//! with a journal topic (see [`journal`]) and a claim protocol (see [`protocol`]):
//! claim, read back, produce within the delivery timeout, confirm; an interrupted
//! run's claims are resolved by a later run once they expired, by looking for the
//! re-driven record (header `tally.redrive.source`) on the input topic.
//!
//! Re-driven records keep the original key, value and event time, go to the source
//! record's own partition, and carry `tally.redriven-from: PARTITION:OFFSET` (the
//! letter), `tally.redrive.source` and `tally.redrive.run`. The aggregator copies
//! `tally.redriven-from` into the letter of a re-driven record that fails again, and
//! `redrive` passes over such letters unless `--include-redriven` is given.
//!
//! `list` prints every letter with its source record's state (pending, claimed,
//! re-driven and where to) and whether it is a copy of an earlier letter.

mod journal;
mod protocol;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod sim_tests;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::json;
use tally_schemas::names::{
    DLQ_REASON_HEADER, DLQ_SOURCE_OFFSET_HEADER, DLQ_SOURCE_PARTITION_HEADER,
    DLQ_SOURCE_TIMESTAMP_HEADER, DLQ_SOURCE_TOPIC_HEADER, REDRIVEN_HEADER, REDRIVE_RUN_HEADER,
    REDRIVE_SOURCE_HEADER,
};
use tally_schemas::RejectReason;
use uuid::Uuid;

use self::journal::{Coord, Entry, Journal, SourceId, State};
use self::protocol::{Command, Event, LetterMeta, Payload, Redrive, Run, Settings, Summary};
use super::{partitions, Brokers, KAFKA_TIMEOUT};

/// Source records claimed and produced together (one transaction each).
const BATCH: usize = 100;
/// How long a read may go without progress before it is called stalled. Longer than
/// Kafka's default transaction timeout (60 s): an open transaction of a direct
/// producer holds `read_committed` readers back until it ends.
const READ_STALL: Duration = Duration::from_secs(90);

#[derive(clap::Args, Debug)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub action: DlqAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum DlqAction {
    /// Print dead letters (one JSON object per line) with their headers and state.
    List(DlqCommon),
    /// Put chosen dead letters back on the input topic, each source record at most once.
    Redrive(RedriveArgs),
}

#[derive(clap::Args, Debug)]
pub struct DlqCommon {
    #[command(flatten)]
    pub brokers: Brokers,
    #[arg(long, env = "TALLY_DLQ_TOPIC", default_value = tally_schemas::names::DLQ_TOPIC)]
    pub dlq_topic: String,
    /// The re-drive journal (one partition, `retention.ms=-1`; `redrive` creates it).
    #[arg(long, env = "TALLY_DLQ_JOURNAL_TOPIC", default_value = tally_schemas::names::REDRIVE_JOURNAL_TOPIC)]
    pub journal_topic: String,
    /// Only letters with this `dlq.reason` (e.g. late, invalid_json).
    #[arg(long, value_parser = parse_reason)]
    pub reason: Option<RejectReason>,
    /// `list`: stop after this many letters; `redrive`: re-drive at most this many
    /// source records.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
}

#[derive(clap::Args, Debug)]
pub struct RedriveArgs {
    #[command(flatten)]
    pub common: DlqCommon,
    #[arg(long, env = "TALLY_TOPIC", default_value = tally_schemas::names::INCREMENTS_TOPIC)]
    pub topic: String,
    /// Show what would be re-driven without producing or writing the journal.
    #[arg(long)]
    pub dry_run: bool,
    /// Also re-drive letters of records that were themselves re-driven and failed
    /// again (off by default, so a bad record cannot loop).
    #[arg(long)]
    pub include_redriven: bool,
    /// Delivery deadline of a re-driven record. A claim expires three of these after it
    /// was made; a run interrupted mid-batch is resolved by the next run after that.
    #[arg(long, env = "TALLY_DLQ_REDRIVE_TIMEOUT", default_value = "10s", value_parser = tally_aggregator::config::parse_duration)]
    pub delivery_timeout: Duration,
    /// Longest to wait for the claims of another (interrupted or running) re-drive to
    /// expire; claims expiring later are left to a later run.
    #[arg(long, env = "TALLY_DLQ_CLAIM_WAIT", default_value = "2m", value_parser = tally_aggregator::config::parse_duration)]
    pub claim_wait: Duration,
}

fn parse_reason(text: &str) -> Result<RejectReason, String> {
    RejectReason::from_code(text).ok_or_else(|| {
        let known: Vec<_> = RejectReason::ALL.iter().map(|r| r.code()).collect();
        format!("unknown reason {text:?}; one of {}", known.join(", "))
    })
}

pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    match args.action {
        DlqAction::List(common) => tokio::task::spawn_blocking(move || list(&common)).await??,
        DlqAction::Redrive(redrive_args) => {
            tokio::task::spawn_blocking(move || redrive(&redrive_args)).await??
        }
    }
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(duration: Duration) -> anyhow::Result<i64> {
    i64::try_from(duration.as_millis()).context("duration too large")
}

// ---- reading ---------------------------------------------------------------------

/// A consumer for assigned reads: never joins a group or commits, reads only committed
/// records (an aborted re-drive never shows), reports partition ends.
fn reader(brokers: &Brokers) -> anyhow::Result<BaseConsumer> {
    brokers
        .config()
        .set("group.id", "tally-dlq-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()
        .with_context(|| format!("creating a Kafka consumer for {}", brokers.servers))
}

fn header<'a>(message: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a [u8]> {
    message
        .headers()?
        .iter()
        .find(|h: &Header<'_, &[u8]>| h.key == name)
        .and_then(|h| h.value)
}

fn header_text(message: &BorrowedMessage<'_>, name: &str) -> Option<String> {
    header(message, name).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Reads `[from, to)` of each `(partition, from, to)` and calls `visit` for each record
/// in it; `visit` returning false stops the read. With `read_committed`, aborted
/// records and transaction markers are skipped without being seen, so the end is
/// judged by the consumer's position, not by the last offset seen.
fn read_ranges(
    consumer: &BaseConsumer,
    topic: &str,
    ranges: &[(i32, i64, i64)],
    mut visit: impl FnMut(&BorrowedMessage<'_>) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let mut remaining: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for &(partition, from, to) in ranges {
        if from < to {
            remaining.insert(partition, to);
            assignment.add_partition_offset(topic, partition, Offset::Offset(from))?;
        }
    }
    if remaining.is_empty() {
        return Ok(());
    }
    consumer.assign(&assignment)?;
    let result = (|| {
        let mut last_progress = Instant::now();
        while !remaining.is_empty() {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    last_progress = Instant::now();
                    let partition = message.partition();
                    let Some(&to) = remaining.get(&partition) else {
                        continue;
                    };
                    if message.offset() < to && !visit(&message)? {
                        return Ok(());
                    }
                    if message.offset() + 1 >= to {
                        remaining.remove(&partition);
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => {
                    let positions = consumer.position()?;
                    remaining.retain(|&partition, &mut to| {
                        let position = positions.find_partition(topic, partition).and_then(|e| {
                            match e.offset() {
                                Offset::Offset(o) => Some(o),
                                _ => None,
                            }
                        });
                        position.is_none_or(|p| p < to)
                    });
                    anyhow::ensure!(
                        last_progress.elapsed() < READ_STALL,
                        "reading {topic} stalled (partitions {:?} not read to their end)",
                        remaining.keys().collect::<Vec<_>>()
                    );
                }
                Some(Err(err)) => return Err(err).with_context(|| format!("reading {topic}")),
            }
        }
        Ok(())
    })();
    consumer.unassign()?;
    result
}

fn watermarks(consumer: &BaseConsumer, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
    consumer
        .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
        .with_context(|| format!("reading the end offsets of {topic}/{partition}"))
}

/// Every letter of the dead-letter topic, from its start to its end as of now.
fn scan_letters(
    consumer: &BaseConsumer,
    topic: &str,
    visit: impl FnMut(&BorrowedMessage<'_>) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let mut ranges = Vec::new();
    for partition in partitions(consumer, topic)? {
        let (low, high) = watermarks(consumer, topic, partition)?;
        ranges.push((partition, low, high));
    }
    read_ranges(consumer, topic, &ranges, visit)
}

fn letter_meta(message: &BorrowedMessage<'_>) -> LetterMeta {
    let source = SourceId::from_headers(
        header_text(message, DLQ_SOURCE_TOPIC_HEADER).as_deref(),
        header_text(message, DLQ_SOURCE_PARTITION_HEADER).as_deref(),
        header_text(message, DLQ_SOURCE_OFFSET_HEADER).as_deref(),
    );
    LetterMeta {
        at: Coord {
            partition: message.partition(),
            offset: message.offset(),
        },
        source,
        reason: header_text(message, DLQ_REASON_HEADER),
        redriven: header(message, REDRIVEN_HEADER).is_some(),
    }
}

/// The original record: key, value, and the source's event time (the letter's own
/// timestamp is when it was dead-lettered; used only if the header is missing).
fn letter_payload(message: &BorrowedMessage<'_>) -> Payload {
    let timestamp_ms = header_text(message, DLQ_SOURCE_TIMESTAMP_HEADER)
        .and_then(|t| t.parse().ok())
        .or_else(|| message.timestamp().to_millis());
    Payload {
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        timestamp_ms,
    }
}

/// Whether the journal topic exists (metadata, no auto-creation).
fn journal_exists(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<bool> {
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .with_context(|| format!("reading metadata of {topic}"))?;
    Ok(metadata
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
}

/// Reads journal partition 0 from `from` to its end into an event.
fn read_journal(consumer: &BaseConsumer, topic: &str, from: i64) -> anyhow::Result<Event> {
    let (low, high) = watermarks(consumer, topic, 0)?;
    anyhow::ensure!(
        low == 0 || from >= low,
        "the journal {topic} starts at offset {low}: entries before it were deleted, so \
         records they name could be re-driven twice. Give the journal retention.ms=-1 \
         (and cleanup.policy=delete)"
    );
    let mut entries = Vec::new();
    read_ranges(consumer, topic, &[(0, from.max(low), high)], |message| {
        let entry = match message.payload() {
            Some(bytes) => Entry::from_json(bytes),
            None => Err("no value".to_owned()),
        };
        entries.push((message.offset(), entry));
        Ok(true)
    })?;
    Ok(Event::JournalRead { entries, end: high })
}

/// The whole journal folded, for `list` (unreadable entries are reported, not fatal).
fn load_journal(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Journal> {
    let mut journal = Journal::new();
    if !journal_exists(consumer, topic)? {
        eprintln!("no re-drive journal {topic} yet: no letter has been re-driven");
        return Ok(journal);
    }
    let Event::JournalRead { entries, end } = read_journal(consumer, topic, 0)? else {
        anyhow::bail!("unexpected journal read result");
    };
    for (offset, entry) in entries {
        match entry {
            Ok(entry) => journal.apply(offset, &entry),
            Err(err) => eprintln!("journal record at {topic}/0@{offset} is not an entry: {err}"),
        }
    }
    journal.skip_to(end);
    Ok(journal)
}

// ---- list ------------------------------------------------------------------------

fn letter_json(message: &BorrowedMessage<'_>) -> serde_json::Map<String, serde_json::Value> {
    let mut headers = serde_json::Map::new();
    if let Some(all) = message.headers() {
        for header in all.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned());
            headers.insert(header.key.to_owned(), json!(value));
        }
    }
    let mut object = serde_json::Map::new();
    object.insert("partition".into(), json!(message.partition()));
    object.insert("offset".into(), json!(message.offset()));
    object.insert("timestamp".into(), json!(message.timestamp().to_millis()));
    object.insert(
        "key".into(),
        json!(message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())),
    );
    object.insert(
        "value".into(),
        json!(message
            .payload()
            .map(|v| String::from_utf8_lossy(v).into_owned())),
    );
    object.insert("headers".into(), json!(headers));
    object
}

fn list(args: &DlqCommon) -> anyhow::Result<()> {
    let consumer = reader(&args.brokers)?;
    let journal = load_journal(&consumer, &args.journal_topic)?;
    let mut first_copy: HashMap<SourceId, Coord> = HashMap::new();
    let mut counts: HashMap<&'static str, usize> = HashMap::new();
    let mut shown = 0usize;
    scan_letters(&consumer, &args.dlq_topic, |message| {
        let meta = letter_meta(message);
        let copy_of = meta.source.as_ref().and_then(|source| {
            let first = *first_copy.entry(source.clone()).or_insert(meta.at);
            (first != meta.at).then_some(first)
        });
        let wanted = args
            .reason
            .is_none_or(|r| meta.reason.as_deref() == Some(r.code()));
        if !wanted {
            return Ok(true);
        }
        let mut object = letter_json(message);
        object.insert(
            "source".into(),
            json!(meta.source.as_ref().map(ToString::to_string)),
        );
        let state = match meta.source.as_ref().map(|s| journal.state(s)) {
            None => "unidentified",
            Some(None) => "pending",
            Some(Some(State::Claimed(claim))) => {
                object.insert("claim_expires_ms".into(), json!(claim.claim.expires_ms));
                "claimed"
            }
            Some(Some(State::Done(output))) => {
                object.insert("redriven_to".into(), json!(output.to_string()));
                "redriven"
            }
        };
        object.insert("state".into(), json!(state));
        object.insert("copy_of".into(), json!(copy_of.map(|c| c.to_string())));
        println!("{}", serde_json::Value::Object(object));
        *counts.entry(state).or_default() += 1;
        shown += 1;
        Ok(shown < args.limit)
    })?;
    let mut by_state: Vec<_> = counts.into_iter().collect();
    by_state.sort();
    let by_state: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
    eprintln!("{shown} dead letter(s): {}", by_state.join(", "));
    Ok(())
}

// ---- redrive ---------------------------------------------------------------------

/// The re-drive producer: transactional with one `transactional.id` per journal, so
/// on Apache Kafka a new run fences every older one and aborts what a dead run left
/// open. The settings below win over `--kafka-option`.
fn redrive_producer(
    brokers: &Brokers,
    journal_topic: &str,
    delivery_timeout_ms: i64,
) -> anyhow::Result<FutureProducer> {
    let lease_ms = protocol::claim_expiry(0, delivery_timeout_ms);
    let producer: FutureProducer = brokers
        .config()
        .set(
            "transactional.id",
            format!("tally-dlq-redrive:{journal_topic}"),
        )
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", delivery_timeout_ms.to_string())
        .set("transaction.timeout.ms", lease_ms.to_string())
        .set("linger.ms", "5")
        .create()
        .context("creating the re-drive producer")?;
    producer
        .init_transactions(KAFKA_TIMEOUT)
        .context("initialising the re-drive producer's transactions")?;
    Ok(producer)
}

fn create_journal(brokers: &Brokers, topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = brokers
        .config()
        .create()
        .context("creating a Kafka admin client")?;
    let new_topic = NewTopic::new(topic, 1, TopicReplication::Fixed(-1))
        .set("retention.ms", "-1")
        .set("cleanup.policy", "delete");
    let options = AdminOptions::new().operation_timeout(Some(KAFKA_TIMEOUT));
    let results = futures::executor::block_on(admin.create_topics([&new_topic], &options))
        .with_context(|| format!("creating the re-drive journal {topic}"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!(
                "creating the re-drive journal {name}: {code}; create it with one \
                 partition, retention.ms=-1 and cleanup.policy=delete"
            ),
        }
    }
    Ok(())
}

/// Awaits deliveries in order.
fn await_deliveries(pending: Vec<Result<DeliveryFuture, String>>) -> Vec<Result<Coord, String>> {
    pending
        .into_iter()
        .map(|delivery| {
            let delivery = delivery?;
            match futures::executor::block_on(delivery) {
                Ok(Ok(delivered)) => Ok(Coord {
                    partition: delivered.partition,
                    offset: delivered.offset,
                }),
                Ok(Err((err, _))) => Err(err.to_string()),
                Err(_canceled) => Err("the producer went away".to_owned()),
            }
        })
        .collect()
}

fn send_entries(
    producer: &FutureProducer,
    topic: &str,
    entries: &[Entry],
) -> Vec<Result<Coord, String>> {
    let pending = entries
        .iter()
        .map(|entry| {
            let key = entry.source().to_string();
            let value = entry.to_json();
            let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
                .partition(0)
                .key(key.as_str())
                .payload(value.as_slice());
            producer
                .send_result(record)
                .map_err(|(err, _)| err.to_string())
        })
        .collect();
    await_deliveries(pending)
}

fn send_redrives(
    producer: &FutureProducer,
    topic: &str,
    run_id: &str,
    records: &[Redrive],
) -> Vec<Result<Coord, String>> {
    let pending = records
        .iter()
        .map(|redrive| {
            let letter = redrive.letter.to_string();
            let source = redrive.source.to_string();
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: REDRIVEN_HEADER,
                    value: Some(letter.as_bytes()),
                })
                .insert(Header {
                    key: REDRIVE_SOURCE_HEADER,
                    value: Some(source.as_bytes()),
                })
                .insert(Header {
                    key: REDRIVE_RUN_HEADER,
                    value: Some(run_id.as_bytes()),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
                .partition(redrive.partition)
                .headers(headers);
            if let Some(key) = &redrive.payload.key {
                record = record.key(key.as_slice());
            }
            if let Some(value) = &redrive.payload.value {
                record = record.payload(value.as_slice());
            }
            if let Some(timestamp) = redrive.payload.timestamp_ms {
                record = record.timestamp(timestamp);
            }
            producer
                .send_result(record)
                .map_err(|(err, _)| err.to_string())
        })
        .collect();
    await_deliveries(pending)
}

/// Writes `entries` and commits the open transaction.
fn commit_entries(
    producer: &FutureProducer,
    topic: &str,
    entries: &[Entry],
) -> anyhow::Result<Vec<i64>> {
    let mut offsets = Vec::with_capacity(entries.len());
    for (entry, result) in entries.iter().zip(send_entries(producer, topic, entries)) {
        match result {
            Ok(coord) => offsets.push(coord.offset),
            Err(err) => {
                let _ = producer.abort_transaction(KAFKA_TIMEOUT);
                anyhow::bail!("writing {entry:?} to {topic}: {err}");
            }
        }
    }
    if let Err(err) = producer.commit_transaction(KAFKA_TIMEOUT) {
        let _ = producer.abort_transaction(KAFKA_TIMEOUT);
        return Err(err).with_context(|| format!("committing to {topic}"));
    }
    Ok(offsets)
}

/// Looks for re-driven records of `sources` in `[from, end)` of the input partition.
fn lookup(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    sources: &[SourceId],
) -> anyhow::Result<Event> {
    let (_, end) = watermarks(consumer, topic, partition)?;
    eprintln!(
        "looking for {} record(s) of an interrupted re-drive in {topic}/{partition} offsets {from}..{end}",
        sources.len()
    );
    let wanted: std::collections::HashSet<String> =
        sources.iter().map(ToString::to_string).collect();
    let mut found = Vec::new();
    read_ranges(consumer, topic, &[(partition, from, end)], |message| {
        if let Some(source) = header_text(message, REDRIVE_SOURCE_HEADER) {
            if wanted.contains(&source) {
                if let Ok(source) = source.parse() {
                    found.push((
                        source,
                        Coord {
                            partition,
                            offset: message.offset(),
                        },
                    ));
                }
            }
        }
        Ok(true)
    })?;
    Ok(Event::Found { partition, found })
}

fn redrive(args: &RedriveArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let delivery_timeout_ms = millis(args.delivery_timeout)?;
    anyhow::ensure!(
        delivery_timeout_ms > 0 && delivery_timeout_ms <= i64::from(i32::MAX) / 3,
        "--delivery-timeout must be between 1 ms and {} ms",
        i32::MAX / 3
    );
    let run_id = Uuid::new_v4().to_string();
    let consumer = reader(&common.brokers)?;
    let journal = common.journal_topic.as_str();
    let exists = journal_exists(&consumer, journal)?;
    if !exists && !args.dry_run {
        create_journal(&common.brokers, journal)?;
        // A new topic takes a moment to show in every broker's metadata.
        let until = Instant::now() + KAFKA_TIMEOUT;
        while !journal_exists(&consumer, journal)? {
            anyhow::ensure!(
                Instant::now() < until,
                "the re-drive journal {journal} was created but is not visible yet; run again"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let producer = if args.dry_run {
        None
    } else {
        Some(redrive_producer(
            &common.brokers,
            journal,
            delivery_timeout_ms,
        )?)
    };
    let mut run = Run::new(Settings {
        run: run_id.clone(),
        input_topic: args.topic.clone(),
        delivery_timeout_ms,
        limit: common.limit,
        batch: BATCH,
        reason: common.reason.map(|r| r.code().to_owned()),
        include_redriven: args.include_redriven,
        dry_run: args.dry_run,
        max_wait_ms: millis(args.claim_wait)?,
    });
    let mut command = run.start();
    let mut printed = 0;
    loop {
        let event = match command {
            Command::ReadJournal { from } => {
                if exists || producer.is_some() {
                    read_journal(&consumer, journal, from)?
                } else {
                    Event::JournalRead {
                        entries: Vec::new(),
                        end: 0,
                    }
                }
            }
            Command::WaitUntil { until_ms } => {
                let wait = until_ms.saturating_sub(now_ms()).max(0);
                eprintln!(
                    "waiting {:.1} s for the claims of another re-drive to expire",
                    wait as f64 / 1000.0
                );
                std::thread::sleep(Duration::from_millis(wait.unsigned_abs() + 1));
                Event::Woke
            }
            Command::Lookup {
                partition,
                from,
                sources,
            } => lookup(&consumer, &args.topic, partition, from, &sources)?,
            Command::ScanLetters => {
                scan_letters(&consumer, &common.dlq_topic, |message| {
                    let meta = letter_meta(message);
                    run.offer(&meta, || letter_payload(message));
                    Ok(true)
                })?;
                Event::Scanned
            }
            Command::InputEnds { partitions } => {
                let mut ends = Vec::with_capacity(partitions.len());
                for partition in partitions {
                    ends.push((partition, watermarks(&consumer, &args.topic, partition)?.1));
                }
                Event::Ends { ends }
            }
            Command::Append { entries } => {
                let producer = producer.as_ref().context("a dry run writes nothing")?;
                producer.begin_transaction()?;
                let offsets = commit_entries(producer, journal, &entries)?;
                Event::Appended { offsets }
            }
            Command::Produce { records } => {
                let producer = producer.as_ref().context("a dry run writes nothing")?;
                producer.begin_transaction()?;
                let results = send_redrives(producer, &args.topic, &run_id, &records);
                Event::Produced { results }
            }
            Command::Commit { entries } => {
                let producer = producer.as_ref().context("a dry run writes nothing")?;
                commit_entries(producer, journal, &entries)?;
                Event::Committed
            }
            Command::Abort { error } => {
                if let Some(producer) = &producer {
                    let _ = producer.abort_transaction(KAFKA_TIMEOUT);
                }
                anyhow::bail!("re-drive stopped: {error}");
            }
            Command::Fail { error } => anyhow::bail!("re-drive stopped: {error}"),
            Command::Finish => break,
        };
        command = run.on(event, now_ms());
        // Print each batch's records once it is committed.
        for redriven in &run.summary().redriven[printed..] {
            println!(
                "re-driven {} {} -> {}/{}",
                redriven.letter, redriven.source, args.topic, redriven.output
            );
        }
        printed = run.summary().redriven.len();
    }
    report(run.summary());
    Ok(())
}

fn report(summary: &Summary) {
    for (letter, source) in &summary.would_redrive {
        println!("would re-drive {letter} {source}");
    }
    if !summary.would_redrive.is_empty() {
        eprintln!(
            "dry run: {} source record(s) would be re-driven",
            summary.would_redrive.len()
        );
    }
    if summary.claims_found + summary.claims_voided > 0 {
        eprintln!(
            "an interrupted re-drive's claims: {} record(s) found on the input topic \
             (now marked re-driven), {} not there (pending again)",
            summary.claims_found, summary.claims_voided
        );
    }
    for (source, expires_ms) in &summary.claims_deferred {
        eprintln!(
            "{source} is claimed by another re-drive until {expires_ms} ms; a later run \
             resolves it"
        );
    }
    let passed = [
        (summary.copies, "copies of a record chosen already"),
        (summary.already_redriven, "already re-driven"),
        (summary.claimed_elsewhere, "claimed by another re-drive"),
        (summary.claims_lost, "lost to another re-drive's claim"),
        (
            summary.passed_over,
            "not matching --reason or re-driven before (--include-redriven)",
        ),
        (summary.over_limit, "over --limit (still pending)"),
        (
            summary.unidentified,
            "without dlq.source headers (never re-driven)",
        ),
        (summary.other_topic, "from another topic than --topic"),
    ];
    for (count, what) in passed {
        if count > 0 {
            eprintln!("{count} letter(s) passed over: {what}");
        }
    }
    eprintln!("{} letter(s) re-driven", summary.redriven.len());
}
