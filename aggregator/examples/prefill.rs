//! Fills a topic with Tally increments for the end-to-end aggregator benchmark
//! (`scripts/bench-aggregator.sh`).
//!
//! Usage: `prefill BROKERS TOPIC RECORDS [KEYS=100000] [EVENTS_PER_SEC=20000] [SEED=1] [LAYOUT=stream]`
//!
//! LAYOUT `stream` (the default) is the stream the engine's criterion bench uses: KEYS random (v4-like)
//! UUID keys with Zipf(1.0) popularity, values 1..=100, EVENTS_PER_SEC records per
//! second of event time, timestamps increasing with jitter (90 % up to 50 ms back,
//! 10 % up to 1.5 s back: always inside the default 2 s grace, so nothing is late).
//! Event times are current: the stream ends at the wall clock of the start of the
//! run, so nothing is future-stamped either. Records are what a direct producer
//! sends: key = canonical UUID text, value = `Increment::to_json`, CreateTime =
//! event time, Java-compatible `murmur2_random` partitioning.
//!
//! LAYOUT `open-windows` (for the memory benchmark): record i has key i % KEYS and
//! a timestamp in the first 8 s of the current 10 s window, so with KEYS = RECORDS
//! every record opens its own key-window and, the partition watermarks staying
//! below the window end, none of them closes.
//!
//! Prints one line on stdout: `records=N sum=S key_windows=K from_ms=F to_ms=T
//! partition_mismatches=0 seconds=T rate=R` (S: the sum of all values; K: distinct
//! (key, 10 s window) pairs, i.e. the rows a default-configured aggregator ends up
//! with; [F, T): the window starts they fall in; mismatches: delivered records whose
//! partition differs from `support::kafka_partition`, which the other benchmark
//! examples rely on).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use support::{arg, kafka_partition, SplitMix64, WINDOW_MS};
use tally_schemas::Increment;

const USAGE: &str = "usage: prefill BROKERS TOPIC RECORDS [KEYS=100000] [EVENTS_PER_SEC=20000] [SEED=1] [LAYOUT=stream|open-windows]";

#[derive(Default)]
struct Counting {
    delivered: AtomicU64,
    failed: AtomicU64,
    partitions: AtomicI32,
    partition_mismatches: AtomicU64,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        match result {
            Ok(message) => {
                let expected = message
                    .key()
                    .map(|key| kafka_partition(key, self.partitions.load(Ordering::Relaxed)));
                if expected != Some(message.partition()) {
                    self.partition_mismatches.fetch_add(1, Ordering::Relaxed);
                }
                self.delivered.fetch_add(1, Ordering::Relaxed)
            }
            Err((err, _)) => {
                if self.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("delivery failed: {err}");
                }
                0
            }
        };
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let brokers: String = arg(&args, 0, None, USAGE)?;
    let topic: String = arg(&args, 1, None, USAGE)?;
    let records: u64 = arg(&args, 2, None, USAGE)?;
    let keys: usize = arg(&args, 3, Some(100_000), USAGE)?;
    let events_per_sec: u64 = arg(&args, 4, Some(20_000), USAGE)?;
    let seed: u64 = arg(&args, 5, Some(1), USAGE)?;
    let layout: String = arg(&args, 6, Some("stream".to_owned()), USAGE)?;
    let open_windows = match layout.as_str() {
        "stream" => false,
        "open-windows" => true,
        other => bail!("unknown LAYOUT {other:?}\n{USAGE}"),
    };
    if keys == 0 || events_per_sec == 0 {
        bail!("KEYS and EVENTS_PER_SEC must be positive");
    }

    let producer: BaseProducer<Counting> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("partitioner", "murmur2_random")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "120000")
        .create_with_context(Counting::default())
        .context("creating the producer")?;
    let metadata = producer
        .client()
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .context("reading the topic's metadata")?;
    let partitions = metadata
        .topics()
        .first()
        .map_or(0, |topic| topic.partitions().len());
    producer
        .context()
        .partitions
        .store(i32::try_from(partitions)?, Ordering::Relaxed);

    let mut rng = SplitMix64(seed);
    let key_ids = support::keys(&mut rng, keys);
    let key_texts: Vec<String> = key_ids.iter().map(|k| k.hyphenated().to_string()).collect();
    let mut cumulative = Vec::with_capacity(keys);
    let mut total = 0.0;
    for rank in 1..=keys {
        total += 1.0 / rank as f64;
        cumulative.push(total);
    }

    let now_ms = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis())?;
    let span_ms = i64::try_from(records.saturating_mul(1000) / events_per_sec)?;
    let start_ms = now_ms - span_ms;
    let current_window_ms = now_ms.div_euclid(WINDOW_MS) * WINDOW_MS;

    let mut sum: i128 = 0;
    let mut key_windows: HashSet<(u32, i64)> = HashSet::new();
    let (mut min_window, mut max_window) = (i64::MAX, i64::MIN);
    let started = Instant::now();
    let mut payload = String::with_capacity(80);
    for index in 0..records {
        let (rank, ts) = if open_windows {
            // The first 8 s of the current window: at most 6 s of watermark, 4 s
            // short of the end, and at most 8 s ahead of the clock (allowed: 5 min).
            let rank = usize::try_from(index)? % keys;
            (rank, current_window_ms + i64::try_from(index % 8_000)?)
        } else {
            let target = rng.next_f64() * total;
            let rank = cumulative.partition_point(|&c| c < target).min(keys - 1);
            let jitter = if rng.below(10) == 0 {
                rng.below(1_500)
            } else {
                rng.below(50)
            };
            let base = start_ms + i64::try_from(index * 1000 / events_per_sec)?;
            (rank, base - i64::try_from(jitter)?)
        };
        min_window = min_window.min(ts.div_euclid(WINDOW_MS));
        max_window = max_window.max(ts.div_euclid(WINDOW_MS));
        let value = i64::try_from(1 + rng.below(100))?;
        sum += i128::from(value);
        key_windows.insert((u32::try_from(rank)?, ts.div_euclid(WINDOW_MS)));
        payload.clear();
        payload.push_str(
            &Increment {
                key: key_ids[rank],
                value,
            }
            .to_json(),
        );
        let mut record = BaseRecord::to(&topic)
            .key(key_texts[rank].as_str())
            .payload(payload.as_str())
            .timestamp(ts);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((err, _)) => bail!("producing record {index}: {err}"),
            }
        }
        if index % 1024 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("flushing the producer")?;
    let seconds = started.elapsed().as_secs_f64();
    let context = producer.context();
    let delivered = context.delivered.load(Ordering::Relaxed);
    let failed = context.failed.load(Ordering::Relaxed);
    if delivered != records || failed != 0 {
        bail!("{delivered} of {records} records delivered, {failed} failed");
    }
    println!(
        "records={records} sum={sum} key_windows={} from_ms={} to_ms={} partition_mismatches={} seconds={seconds:.2} rate={:.0}",
        key_windows.len(),
        min_window * WINDOW_MS,
        (max_window + 1) * WINDOW_MS,
        context.partition_mismatches.load(Ordering::Relaxed),
        records as f64 / seconds
    );
    Ok(())
}
