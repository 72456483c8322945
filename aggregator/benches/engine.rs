//! The window engine alone, on one core: records/s on a realistic stream, and heap
//! bytes per open key-window.
//!
//! Run with `cargo bench -p tally-aggregator --bench engine`. The stream: 100 000
//! keys with Zipf(1.0) popularity, 20 000 records per second of event time (so a
//! 10 s window sees ~200 000 records and tens of thousands of keys), timestamps
//! increasing with jitter (90 % within 50 ms, 10 % up to 1.5 s back, inside the
//! 2 s grace), values 1..=100, the default window and grace. The memory report
//! (printed first) loads up to 1.5 M key-windows and divides the engine's heap
//! bytes (exact for its hash tables) by the open key-windows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput};
use tally_aggregator::engine::{EngineConfig, PartitionEngine, Resume};
use tally_schemas::Checkpoint;
use uuid::Uuid;

const KEYS: usize = 100_000;
const RECORDS: usize = 2_000_000;
const RECORDS_PER_EVENT_MS: i64 = 20;
const START_TS_MS: i64 = 1_700_000_000_000;
/// The wall clock given to the engine: far enough ahead that nothing is "future".
const NOW_MS: i64 = START_TS_MS + 10_000_000;

/// SplitMix64: a small, fast, deterministic generator (no extra dependency).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

#[derive(Clone, Copy)]
struct Event {
    key: Uuid,
    ts: i64,
    value: i64,
}

/// Random (v4-like) keys and a Zipf(1.0) popularity over them.
fn zipf_stream(records: usize, seed: u64) -> Vec<Event> {
    let mut rng = SplitMix64(seed);
    let keys: Vec<Uuid> = (0..KEYS)
        .map(|_| Uuid::from_u64_pair(rng.next_u64(), rng.next_u64()))
        .collect();
    let mut cumulative = Vec::with_capacity(KEYS);
    let mut total = 0.0;
    for rank in 1..=KEYS {
        total += 1.0 / rank as f64;
        cumulative.push(total);
    }
    (0..records)
        .map(|index| {
            let target = rng.next_f64() * total;
            let rank = cumulative.partition_point(|&c| c < target).min(KEYS - 1);
            let jitter = if rng.below(10) == 0 {
                rng.below(1_500)
            } else {
                rng.below(50)
            };
            Event {
                key: keys[rank],
                ts: START_TS_MS + index as i64 / RECORDS_PER_EVENT_MS - jitter as i64,
                value: 1 + rng.below(100) as i64,
            }
        })
        .collect()
}

fn fresh_engine() -> PartitionEngine {
    PartitionEngine::new(
        EngineConfig::default(),
        0,
        Resume::Checkpoint(Checkpoint::fresh(0)),
    )
}

/// Feeds the whole stream, flushing every `flush_every` records; returns the engine
/// (so that dropping it is not timed) and the rows produced.
fn run(events: &[Event], flush_every: usize) -> (PartitionEngine, usize) {
    let mut engine = fresh_engine();
    let mut rows = 0;
    for (offset, event) in events.iter().enumerate() {
        black_box(engine.record(offset as i64, event.key, event.ts, event.value, NOW_MS));
        if (offset + 1) % flush_every == 0 {
            rows += black_box(engine.flush()).rows.len();
        }
    }
    rows += engine.flush().rows.len();
    (engine, rows)
}

fn throughput(criterion: &mut Criterion) {
    let events = zipf_stream(RECORDS, 7);
    let mut group = criterion.benchmark_group("engine");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));
    // 20 000 records = 1 s of this stream's event time: the default flush interval
    // when the consumer keeps up. 1 000 000: a catch-up (replay) at full speed.
    for flush_every in [20_000usize, 1_000_000] {
        let (_, rows) = run(&events, flush_every);
        println!("flush every {flush_every} records: {rows} rows for {RECORDS} records");
        group.bench_function(
            format!("zipf_100k_keys/flush_every_{flush_every}"),
            |bencher| {
                bencher.iter_batched(
                    || (),
                    |()| run(&events, flush_every),
                    BatchSize::PerIteration,
                )
            },
        );
    }
    group.finish();
}

/// Heap bytes per open key-window at several table sizes (hash tables double, so
/// the figure moves with the load factor), and after the realistic stream.
fn memory_report() {
    println!("bytes per open key-window (approx_heap_bytes / open_windows):");
    for key_windows in [100_000usize, 500_000, 1_000_000, 1_500_000] {
        let mut engine = fresh_engine();
        let mut rng = SplitMix64(11);
        // Two open windows, half of the key-windows in each.
        for offset in 0..key_windows {
            let key = Uuid::from_u64_pair(rng.next_u64(), rng.next_u64());
            let ts = START_TS_MS + if offset % 2 == 0 { 0 } else { 10_000 };
            engine.record(offset as i64, key, ts, 1, NOW_MS);
        }
        assert_eq!(engine.open_windows(), key_windows);
        let bytes = engine.approx_heap_bytes();
        println!(
            "  {key_windows:>9} key-windows in 2 windows: {bytes:>11} bytes = {:.1} bytes each",
            bytes as f64 / key_windows as f64
        );
    }
    let (engine, _) = run(&zipf_stream(RECORDS, 7), 20_000);
    println!(
        "  zipf stream end: {} key-windows in {} windows: {:.1} bytes each",
        engine.open_windows(),
        engine.open_window_groups(),
        engine.approx_heap_bytes() as f64 / engine.open_windows() as f64
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: skip the
    // (slow in debug) memory report there.
    if std::env::args().any(|arg| arg == "--bench") {
        memory_report();
    }
    let mut criterion = Criterion::default().configure_from_args();
    throughput(&mut criterion);
    criterion.final_summary();
}
