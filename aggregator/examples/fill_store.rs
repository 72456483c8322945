//! Fills a window store with rows of earlier windows, for the "large store" mode of
//! `scripts/bench-aggregator.sh` (the aggregator's cost must stay flat as the store
//! grows).
//!
//! Usage: `fill_store STORE_URL KEYS WINDOWS BEFORE_MS [SEED=1] [PARTITIONS=4]`
//!
//! Writes KEYS × WINDOWS final rows: the KEYS keys `prefill` draws from SEED (so the
//! benchmark's keys already have history, as they would in production), each in
//! the WINDOWS 10 s windows just before BEFORE_MS, in the partition Kafka assigns
//! the key. Rows go through the store's own `write_rows` (whatever its layout), in
//! calls of about 100,000 rows, like a long-running aggregator's flushes.
//!
//! Prints one line on stdout: `rows=R sum=S count=C from_ms=F to_ms=T seconds=T rate=R`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Instant;

use anyhow::{bail, Context};
use support::{arg, kafka_partition, SplitMix64, WINDOW_MS};
use tally_sink::WindowRow;

const USAGE: &str = "usage: fill_store STORE_URL KEYS WINDOWS BEFORE_MS [SEED=1] [PARTITIONS=4]";

/// Rows per `write_rows` call.
const ROWS_PER_CALL: usize = 100_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url: String = arg(&args, 0, None, USAGE)?;
    let keys: usize = arg(&args, 1, None, USAGE)?;
    let windows: i64 = arg(&args, 2, None, USAGE)?;
    let before_ms: i64 = arg(&args, 3, None, USAGE)?;
    let seed: u64 = arg(&args, 4, Some(1), USAGE)?;
    let partitions: i32 = arg(&args, 5, Some(4), USAGE)?;
    if keys == 0 || windows <= 0 || partitions <= 0 {
        bail!("KEYS, WINDOWS and PARTITIONS must be positive");
    }
    let store = tally_sink::open_store(&url, &tally_sink::StoreOptions::default())
        .await
        .with_context(|| format!("opening {url}"))?;

    let mut rng = SplitMix64(seed);
    let mut key_ids = support::keys(&mut rng, keys);
    // In key order, so each call touches one key range of the store.
    key_ids.sort();
    let last_start = before_ms.div_euclid(WINDOW_MS) * WINDOW_MS - WINDOW_MS;
    let first_start = last_start - (windows - 1) * WINDOW_MS;
    let keys_per_call = (ROWS_PER_CALL / windows as usize).max(1);

    let started = Instant::now();
    let (mut rows_written, mut sum, mut count) = (0u64, 0i128, 0i128);
    let mut values = SplitMix64(seed ^ 0x5eed);
    for chunk in key_ids.chunks(keys_per_call) {
        let mut rows = Vec::with_capacity(chunk.len() * windows as usize);
        for key in chunk {
            let partition = kafka_partition(key.hyphenated().to_string().as_bytes(), partitions);
            for window in 0..windows {
                let window_start_ms = first_start + window * WINDOW_MS;
                let row_count = 1 + values.below(20) as i64;
                let row_sum = row_count * (1 + values.below(100) as i64);
                rows.push(WindowRow {
                    key: *key,
                    window_start_ms,
                    window_end_ms: window_start_ms + WINDOW_MS,
                    partition,
                    sum: row_sum,
                    count: row_count,
                    is_final: true,
                    through_offset: window * 1_000,
                    generation: 0,
                });
                sum += i128::from(row_sum);
                count += i128::from(row_count);
            }
        }
        store
            .write_rows(&rows)
            .await
            .with_context(|| format!("writing rows after {rows_written}"))?;
        rows_written += rows.len() as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "rows={rows_written} sum={sum} count={count} from_ms={first_start} to_ms={} seconds={seconds:.1} rate={:.0}",
        last_start + WINDOW_MS,
        rows_written as f64 / seconds
    );
    Ok(())
}
