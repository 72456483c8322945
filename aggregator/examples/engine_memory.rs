//! The window engine's own memory accounting for the memory benchmark
//! (`scripts/bench-memory.sh`): the same key-windows `prefill ... open-windows`
//! puts in the topic, fed to one engine per partition exactly as Kafka partitions
//! them, in this process.
//!
//! Usage: `engine_memory RECORDS KEYS PARTITIONS [SEED=1]`
//!
//! Prints one line on stdout: `key_windows=K engine_bytes=B engine_bytes_each=E
//! rss_growth_bytes=G rss_growth_each=H` (B: the engines' `approx_heap_bytes`;
//! G: how much this process's resident set grew while they were filled).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::bail;
use support::{arg, kafka_partition, rss_bytes, SplitMix64, WINDOW_MS};
use tally_aggregator::engine::{EngineConfig, PartitionEngine, Resume};
use tally_schemas::Checkpoint;

const USAGE: &str = "usage: engine_memory RECORDS KEYS PARTITIONS [SEED=1]";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let records: usize = arg(&args, 0, None, USAGE)?;
    let keys: usize = arg(&args, 1, None, USAGE)?;
    let partitions: i32 = arg(&args, 2, None, USAGE)?;
    let seed: u64 = arg(&args, 3, Some(1), USAGE)?;
    if keys == 0 || partitions <= 0 {
        bail!("KEYS and PARTITIONS must be positive");
    }
    let mut rng = SplitMix64(seed);
    let key_ids = support::keys(&mut rng, keys);
    let partition_of: Vec<i32> = key_ids
        .iter()
        .map(|key| kafka_partition(key.hyphenated().to_string().as_bytes(), partitions))
        .collect();
    let now_ms = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis())?;
    let window_ms = now_ms.div_euclid(WINDOW_MS) * WINDOW_MS;

    let (rss_before, _) = rss_bytes("self")?;
    let mut engines: Vec<PartitionEngine> = (0..partitions)
        .map(|partition| {
            PartitionEngine::new(
                EngineConfig::default(),
                partition,
                Resume::Checkpoint(Checkpoint::fresh(0)),
            )
        })
        .collect();
    let mut offsets = vec![0i64; partitions as usize];
    for index in 0..records {
        let rank = index % keys;
        let partition = partition_of[rank] as usize;
        let ts = window_ms + (index % 8_000) as i64;
        let value = 1 + rng.below(100) as i64;
        engines[partition].record(offsets[partition], key_ids[rank], ts, value, now_ms);
        offsets[partition] += 1;
    }
    let (rss_after, _) = rss_bytes("self")?;
    let key_windows: usize = engines.iter().map(PartitionEngine::open_windows).sum();
    let bytes: usize = engines.iter().map(PartitionEngine::approx_heap_bytes).sum();
    let growth = rss_after.saturating_sub(rss_before);
    println!(
        "key_windows={key_windows} engine_bytes={bytes} engine_bytes_each={:.1} rss_growth_bytes={growth} rss_growth_each={:.1}",
        bytes as f64 / key_windows.max(1) as f64,
        growth as f64 / key_windows.max(1) as f64
    );
    Ok(())
}
