//! Chaos end to end: one `tally ingest` and two `tally aggregator` processes on the
//! mock cluster, load through the edge and produced directly, and faults in between:
//! SIGKILLs of every process (restarted), outages of every broker, round-trip delay,
//! an exclusive lock on the SQLite store. At the end every acknowledged increment is
//! counted exactly once, an unacknowledged one (a `503`, a failed delivery) at most
//! once, and `tally verify` finds no difference.
//!
//! Every increment has a key of its own, so "counted once" is checked per record.
//! The mock cluster lives in this process (it is librdkafka's, owned by whoever
//! creates it); the faults go through its API.
//!
//! Not in the default run yet (`#[ignore]`): in one of five runs, on a freshly built,
//! loaded machine, no aggregator was ever assigned a partition (members killed every
//! few rounds, the group never settled) and every record was missing; run it with
//! `cargo test -p tally --test e2e_chaos -- --ignored`.
//!
//! A fixed seed and 24 rounds (under a minute when it passes). `TALLY_CHAOS_SEED=N` picks
//! another seed, `TALLY_CHAOS_ROUNDS=N` a longer run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::producer::FutureRecord;
use support::*;
use uuid::Uuid;

const PARTITIONS: i32 = 6;
const GROUP: &str = "e2e-chaos";
const PER_ROUND_EDGE: usize = 200;
const PER_ROUND_DIRECT: usize = 100;

/// SplitMix64: a fixed sequence per seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct Ledger {
    /// Acknowledged: must be counted exactly once (value per unique key).
    acknowledged: HashMap<Uuid, i64>,
    /// Not acknowledged (a `503`, a timeout, a failed delivery): at most once.
    uncertain: HashMap<Uuid, i64>,
}

struct Pipeline<'a> {
    kafka: &'a Kafka,
    dir: &'a Path,
    store: std::path::PathBuf,
    ingest_address: String,
    ingest: Option<Proc>,
    aggregators: [Option<Proc>; 2],
    starts: usize,
}

impl Pipeline<'_> {
    fn log(&mut self, name: &str) -> std::path::PathBuf {
        self.starts += 1;
        self.dir.join(format!("{}-{name}.log", self.starts))
    }

    fn start_ingest(&mut self) {
        let log = self.log("ingest");
        let mut command = tally();
        command.args([
            "ingest",
            "--listen",
            &self.ingest_address,
            "--brokers",
            &self.kafka.bootstrap,
            "--delivery-timeout",
            "2s",
            "--request-timeout",
            "5s",
        ]);
        self.ingest = Some(spawn_logged(command, "ingest", &log));
        let address = self.ingest_address.clone();
        wait_for(Duration::from_secs(30), "ingest to listen", || {
            get(&address, "/healthz").is_some()
        });
    }

    fn start_aggregator(&mut self, slot: usize) {
        let log = self.log(&format!("aggregator{slot}"));
        let store = self.store.clone();
        self.aggregators[slot] = Some(spawn_aggregator(
            &AggregatorOptions {
                bootstrap: &self.kafka.bootstrap,
                group: GROUP,
                store: &store,
                metrics_port: free_port(),
                extra: &["--breaker-probe-interval", "1s", "--retry-max-delay", "1s"],
            },
            &format!("aggregator{slot}"),
            &log,
        ));
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        let mut paths: Vec<_> = std::fs::read_dir(self.dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        paths.sort();
        for path in paths {
            let text = read_log(&path);
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("---- {}\n", path.display()));
            for line in tail.iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

async fn read_store(path: &Path) -> Result<Vec<tally_sink::WindowRow>, String> {
    use tally_sink::WindowStore;
    let store = tally_sink::sqlite::SqliteStore::open(path).map_err(|e| e.to_string())?;
    store
        .scan_rows(i64::MIN, i64::MAX, &[])
        .await
        .map_err(|e| e.to_string())
}

fn key_of(round: u64, source: u64, index: usize) -> Uuid {
    Uuid::from_u128(
        0xc4a0_5000_0000_4000_8000_0000_0000_0000
            | u128::from(round) << 32
            | u128::from(source) << 24
            | index as u128,
    )
}

fn edge_round(pipeline: &Pipeline<'_>, round: u64, ledger: &mut Ledger) {
    let mut body = String::new();
    let mut batch = Vec::with_capacity(PER_ROUND_EDGE);
    for index in 0..PER_ROUND_EDGE {
        let key = key_of(round, 1, index);
        let value = (index % 7 + 1) as i64;
        body.push_str(&format!("{{\"key\":\"{key}\",\"value\":{value}}}\n"));
        batch.push((key, value));
    }
    let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        http(
            "POST",
            &pipeline.ingest_address,
            "/increments",
            "application/x-ndjson",
            body.as_bytes(),
        )
    }));
    let accepted = matches!(&answer, Ok((202, text)) if text.contains(&format!("\"accepted\":{PER_ROUND_EDGE}")));
    let into = if accepted {
        &mut ledger.acknowledged
    } else {
        &mut ledger.uncertain
    };
    into.extend(batch);
}

fn direct_round(producer: &rdkafka::producer::FutureProducer, round: u64, ledger: &mut Ledger) {
    let now = now_ms();
    block_on(async {
        let mut pending = Vec::with_capacity(PER_ROUND_DIRECT);
        for index in 0..PER_ROUND_DIRECT {
            let key = key_of(round, 2, index);
            let value = (index % 5 + 1) as i64;
            let (k, v, ts) = increment_record(key, value, now);
            let record = FutureRecord::to(TOPIC).key(&k).payload(&v).timestamp(ts);
            match producer.send_result(record) {
                Ok(delivery) => pending.push((key, value, Some(delivery))),
                Err(_) => pending.push((key, value, None)),
            }
        }
        for (key, value, delivery) in pending {
            let delivered = match delivery {
                Some(delivery) => matches!(delivery.await, Ok(Ok(_))),
                None => false,
            };
            if delivered {
                ledger.acknowledged.insert(key, value);
            } else {
                ledger.uncertain.insert(key, value);
            }
        }
    });
}

#[test]
#[ignore = "not stable yet: on a loaded machine the group stayed unassigned for the whole run (issue 11 note); run with --ignored"]
fn acknowledged_increments_are_counted_exactly_once_through_kills_outages_and_locks() {
    let seed = env_u64("TALLY_CHAOS_SEED", 0x7a11_c4a0);
    let rounds = env_u64("TALLY_CHAOS_ROUNDS", 24);
    let mut rng = Rng(seed);
    let kafka = Kafka::start(PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let mut pipeline = Pipeline {
        kafka: &kafka,
        dir: dir.path(),
        store: dir.path().join("tally.sqlite"),
        ingest_address: format!("127.0.0.1:{}", free_port()),
        ingest: None,
        aggregators: [None, None],
        starts: 0,
    };
    pipeline.start_ingest();
    pipeline.start_aggregator(0);
    pipeline.start_aggregator(1);
    // A producer that gives up within the round (a failed delivery is "uncertain").
    let producer: rdkafka::producer::FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "3000")
        .create()
        .unwrap();

    let mut ledger = Ledger::default();
    let mut faults: Vec<String> = Vec::new();
    for round in 0..rounds {
        edge_round(&pipeline, round, &mut ledger);
        direct_round(&producer, round, &mut ledger);
        match rng.below(8) {
            0 | 1 => {
                let slot = rng.below(2) as usize;
                if let Some(mut aggregator) = pipeline.aggregators[slot].take() {
                    aggregator.kill_hard();
                }
                faults.push(format!("round {round}: SIGKILL aggregator{slot}"));
                edge_round(&pipeline, round + 1_000, &mut ledger);
                pipeline.start_aggregator(slot);
            }
            2 => {
                if let Some(mut ingest) = pipeline.ingest.take() {
                    ingest.kill_hard();
                }
                faults.push(format!("round {round}: SIGKILL ingest"));
                pipeline.start_ingest();
            }
            3 => {
                for broker in 1..=3 {
                    kafka.cluster.broker_down(broker).unwrap();
                }
                faults.push(format!("round {round}: every broker down for 3 s"));
                // Requests during the outage end in 503 (uncertain), none is lost.
                edge_round(&pipeline, round + 2_000, &mut ledger);
                std::thread::sleep(Duration::from_secs(1));
                for broker in 1..=3 {
                    kafka.cluster.broker_up(broker).unwrap();
                }
            }
            4 => {
                for broker in 1..=3 {
                    kafka
                        .cluster
                        .broker_round_trip_time(broker, Duration::from_millis(150))
                        .unwrap();
                }
                faults.push(format!("round {round}: 150 ms round trips"));
                edge_round(&pipeline, round + 3_000, &mut ledger);
                direct_round(&producer, round + 3_000, &mut ledger);
                for broker in 1..=3 {
                    kafka
                        .cluster
                        .broker_round_trip_time(broker, Duration::ZERO)
                        .unwrap();
                }
            }
            5 => {
                let blocker = rusqlite::Connection::open(&pipeline.store).unwrap();
                blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
                faults.push(format!("round {round}: store locked for 3 s"));
                edge_round(&pipeline, round + 4_000, &mut ledger);
                std::thread::sleep(Duration::from_secs(3));
                blocker.execute_batch("ROLLBACK").unwrap();
            }
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
    }
    // A last quiet round after the faults.
    edge_round(&pipeline, 9_999, &mut ledger);

    // Wait until every acknowledged increment is in the store.
    let deadline = Instant::now() + Duration::from_secs(180);
    let (counted, lost, doubled, uncertain_counted, unexpected) = loop {
        let rows = match block_on(read_store(&pipeline.store)) {
            Ok(rows) => rows,
            Err(err) => {
                assert!(Instant::now() < deadline, "reading the store: {err}");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        let sums = totals(&rows);
        let mut counted = 0usize;
        let mut lost = Vec::new();
        let mut doubled = Vec::new();
        for (key, value) in &ledger.acknowledged {
            match sums.get(key) {
                Some((sum, 1)) if sum == value => counted += 1,
                None => lost.push(*key),
                Some(other) => doubled.push((*key, *value, *other)),
            }
        }
        let mut uncertain_counted = 0usize;
        for (key, value) in &ledger.uncertain {
            match sums.get(key) {
                None => {}
                Some((sum, 1)) if sum == value => uncertain_counted += 1,
                Some(other) => doubled.push((*key, *value, *other)),
            }
        }
        let unexpected = sums
            .keys()
            .filter(|k| !ledger.acknowledged.contains_key(k) && !ledger.uncertain.contains_key(k))
            .count();
        let settled = lost.is_empty() || !doubled.is_empty();
        if settled || Instant::now() > deadline {
            break (counted, lost, doubled, uncertain_counted, unexpected);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!(
        "chaos seed {seed:#x}, {rounds} rounds: faults {faults:#?}\n\
         acknowledged {}, counted {counted}, lost {}, doubled {}; \
         unacknowledged {}, of which counted {uncertain_counted}",
        ledger.acknowledged.len(),
        lost.len(),
        doubled.len(),
        ledger.uncertain.len(),
    );
    assert!(
        lost.is_empty() && doubled.is_empty() && unexpected == 0,
        "lost {} (first {:?}), doubled {:?}, unexpected keys {unexpected}\n{}",
        lost.len(),
        lost.first(),
        doubled.iter().take(5).collect::<Vec<_>>(),
        pipeline.logs()
    );
    assert!(ledger.acknowledged.len() >= (rounds as usize) * PER_ROUND_DIRECT);

    // The store agrees with a recomputation from the log, window by window. The
    // aggregators keep running (their rows are all written: the totals match).
    let output = tally()
        .args([
            "verify",
            "--brokers",
            &kafka.bootstrap,
            "--store",
            &format!("sqlite://{}", pipeline.store.display()),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "verify found differences:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
