//! The SQLite store's flush cost on an empty file and on a file that already holds
//! millions of rows of earlier windows (issue 8: the cost must stay flat as the store
//! grows), through the real `SqliteStore::write_rows`.
//!
//! The flushes are shaped like the aggregator's at 20,000 records/s over 100,000
//! keys: each 10 s window has 58,000 distinct keys (20,000 always there, the rest
//! drawn from the other 80,000), written as ten growing provisional flushes and then
//! the final one (377,000 row writes per window, a sixth of them new rows). The
//! prefilled rows are final rows of windows a day earlier.
//!
//! ```sh
//! cargo run --release -p tally-sink --example sqlite_write_cost -- [prefill rows] [windows] [--retention]
//! ```
//!
//! With `--retention`, the store is opened as an aggregator with a one-hour retention,
//! so every prefilled row is expired and the writer prunes them while it flushes.
//! Prints wall and CPU time per row written and the bytes the process wrote to disk
//! (`/proc/self/io`), which, unlike time, does not depend on what else the machine runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use tally_sink::store::{now_ms, Retention, StoreOptions};
use tally_sink::{SqliteStore, WindowRow, WindowStore};
use uuid::Uuid;

const WINDOW_MS: i64 = 10_000;
const KEYS: u128 = 100_000;
const KEYS_PER_WINDOW: usize = 58_000;
const ALWAYS: usize = 20_000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn key(n: u128) -> Uuid {
    // Spread over the key space, as random UUIDs are.
    Uuid::from_u128(n.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) ^ 0x5a5a)
}

fn window_keys(rng: &mut Rng) -> Vec<Uuid> {
    let mut chosen: Vec<u128> = (0..ALWAYS as u128).collect();
    let mut seen = std::collections::HashSet::new();
    while chosen.len() < KEYS_PER_WINDOW {
        let n = ALWAYS as u128 + u128::from(rng.next()) % (KEYS - ALWAYS as u128);
        if seen.insert(n) {
            chosen.push(n);
        }
    }
    chosen.into_iter().map(key).collect()
}

fn row(key: Uuid, start: i64, sum: i64, through: i64, is_final: bool) -> WindowRow {
    WindowRow {
        key,
        window_start_ms: start,
        window_end_ms: start + WINDOW_MS,
        partition: (key.as_u128() % 4) as i32,
        sum,
        count: sum,
        is_final,
        through_offset: through,
        generation: 0,
    }
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(") ")
        .next()
        .unwrap_or_default()
        .split(' ')
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("write_bytes: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let prefill: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(0);
    let windows: i64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(6);
    let retention = args.iter().any(|a| a == "--retention");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cost.sqlite");
    let options = StoreOptions {
        retention: Retention::Enforce(retention.then_some(3_600_000)),
        ..StoreOptions::default()
    };
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let now = now_ms().div_euclid(WINDOW_MS) * WINDOW_MS;
    let mut through = 0i64;

    // Prefill: final rows of windows a day before the measured ones, written in big
    // calls (one transaction each) by a store without retention, so nothing is pruned.
    let started = Instant::now();
    {
        let store = SqliteStore::open(&path).unwrap();
        let mut written = 0usize;
        let mut start = now - 86_400_000 - (prefill / KEYS_PER_WINDOW) as i64 * WINDOW_MS;
        while written < prefill {
            let mut rows = Vec::with_capacity(10 * KEYS_PER_WINDOW);
            for _ in 0..10 {
                for key in window_keys(&mut rng) {
                    through += 1;
                    rows.push(row(key, start, 7, through, true));
                }
                start += WINDOW_MS;
            }
            written += rows.len();
            store.write_rows(&rows).await.unwrap();
        }
        eprintln!("prefilled {written} rows in {:.1?}", started.elapsed());
    }

    let store = SqliteStore::open_with(&path, &options).await.unwrap();
    let (cpu0, io0, started) = (cpu_seconds(), written_bytes(), Instant::now());
    let mut rows_written = 0usize;
    for window in 0..windows {
        let start = now - (windows - window) * WINDOW_MS;
        let keys = window_keys(&mut rng);
        for flush in 0..10 {
            let upto = keys.len() * (flush + 1) / 10;
            let rows: Vec<WindowRow> = keys[..upto]
                .iter()
                .map(|key| {
                    through += 1;
                    row(*key, start, flush as i64 + 1, through, false)
                })
                .collect();
            rows_written += rows.len();
            store.write_rows(&rows).await.unwrap();
        }
        let rows: Vec<WindowRow> = keys
            .iter()
            .map(|key| {
                through += 1;
                row(*key, start, 11, through, true)
            })
            .collect();
        rows_written += rows.len();
        store.write_rows(&rows).await.unwrap();
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let io = written_bytes().saturating_sub(io0);
    let left: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT count(*) FROM window_sums", [], |r| r.get(0))
        .unwrap();
    println!(
        "prefill {prefill:>10} rows{}: {rows_written} row writes in {wall:.1}s: {:.2} µs/row wall, {:.2} µs/row CPU, {:.0} bytes written/row; {left} rows in the file after",
        if retention { ", pruning (retention 1h)" } else { "" },
        wall * 1e6 / rows_written as f64,
        cpu * 1e6 / rows_written as f64,
        io as f64 / rows_written as f64,
    );
}
