//! Fills a topic with Tally increments for the end-to-end aggregator benchmark
//! (`scripts/bench-aggregator.sh`).
//!
//! Usage: `prefill BROKERS TOPIC RECORDS [KEYS=100000] [EVENTS_PER_SEC=20000] [SEED=1]`
//!
//! The stream is the one the engine's criterion bench uses: KEYS random (v4-like)
//! UUID keys with Zipf(1.0) popularity, values 1..=100, EVENTS_PER_SEC records per
//! second of event time, timestamps increasing with jitter (90 % up to 50 ms back,
//! 10 % up to 1.5 s back: always inside the default 2 s grace, so nothing is late).
//! Event times are current: the stream ends at the wall clock of the start of the
//! run, so nothing is future-stamped either. Records are what a direct producer
//! sends: key = canonical UUID text, value = `Increment::to_json`, CreateTime =
//! event time, Java-compatible `murmur2_random` partitioning.
//!
//! Prints one line on stdout: `records=N sum=S key_windows=K seconds=T rate=R`
//! (S: the sum of all values; K: distinct (key, 10 s window) pairs, i.e. the rows
//! a default-configured aggregator ends up with).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use tally_schemas::Increment;
use uuid::Uuid;

/// The aggregator's default window, used only to count the expected rows.
const WINDOW_MS: i64 = 10_000;

/// SplitMix64: a small, fast, deterministic generator (same as the engine bench).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

#[derive(Default)]
struct Counting {
    delivered: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        match result {
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
            Err((err, _)) => {
                if self.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("delivery failed: {err}");
                }
                0
            }
        };
    }
}

fn arg<T: std::str::FromStr>(args: &[String], index: usize, default: Option<T>) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    match args.get(index) {
        Some(text) => text
            .replace('_', "")
            .parse()
            .map_err(|err| anyhow::anyhow!("argument {index} ({text:?}): {err}")),
        None => default.with_context(|| {
            "usage: prefill BROKERS TOPIC RECORDS [KEYS=100000] [EVENTS_PER_SEC=20000] [SEED=1]"
        }),
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let brokers: String = arg(&args, 0, None)?;
    let topic: String = arg(&args, 1, None)?;
    let records: u64 = arg(&args, 2, None)?;
    let keys: usize = arg(&args, 3, Some(100_000))?;
    let events_per_sec: u64 = arg(&args, 4, Some(20_000))?;
    let seed: u64 = arg(&args, 5, Some(1))?;
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

    let mut rng = SplitMix64(seed);
    let key_ids: Vec<Uuid> = (0..keys)
        .map(|_| Uuid::from_u64_pair(rng.next_u64(), rng.next_u64()))
        .collect();
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

    let mut sum: i128 = 0;
    let mut key_windows: HashSet<(u32, i64)> = HashSet::new();
    let started = Instant::now();
    let mut payload = String::with_capacity(80);
    for index in 0..records {
        let target = rng.next_f64() * total;
        let rank = cumulative.partition_point(|&c| c < target).min(keys - 1);
        let jitter = if rng.below(10) == 0 {
            rng.below(1_500)
        } else {
            rng.below(50)
        };
        let base = start_ms + i64::try_from(index * 1000 / events_per_sec)?;
        let ts = base - i64::try_from(jitter)?;
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
        "records={records} sum={sum} key_windows={} seconds={seconds:.2} rate={:.0}",
        key_windows.len(),
        records as f64 / seconds
    );
    Ok(())
}
