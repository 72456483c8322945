//! The ScyllaDB write path: rows/s of the backend's `write_rows` against a plain
//! loop of the same prepared, timestamped INSERTs with the same concurrency, on the
//! same CQL node, in one run.
//!
//! Usage: `scylla_write [ROWS_PER_PHASE=200000] [CONCURRENCY=256] [ROWS_PER_CALL=50000] [ROUNDS=2]`
//!
//! The node is kassandra-tester (an in-memory CQL node, see
//! /work/shared/notes/cql-test-node.md) behind the proxy of
//! `sink/tests/support/cql_node.rs` (seeded so the driver finds it; the proxy
//! completes the PREPARED answers the node's parser gets wrong), both on a thread of
//! their own, so they get one core and the clients the other; both phases go
//! through the proxy. Phases alternate, `ROUNDS` times each, every phase
//! with fresh keys (so each writes new rows into a node of similar size):
//! - `plain`: one `scylla::Session`, the INSERT the backend prepares, each row bound
//!   and given its version as the write timestamp, executed in the pattern of the
//!   driver's `examples/parallel.rs`: a semaphore of CONCURRENCY permits and one
//!   spawned task per statement;
//! - `write_rows`: `ScyllaStore::write_rows` (connected with `max_concurrency` =
//!   CONCURRENCY) in calls of ROWS_PER_CALL rows, the size of one aggregator flush
//!   of ~1 s at 50k rows/s.
//!
//! After the phases a sample of rows of every phase is read back through the store
//! and compared, so both paths are shown to write the same rows (a drift of the
//! plain INSERT from the backend's table fails here). For each phase it prints the
//! rows/s and the CPU the node thread and this process used, so a node that is
//! the cap shows up as its thread near one core in both.
//!
//! The plain INSERT mirrors `INSERT_ROW`/`row_values` in `sink/src/scylla_store.rs`;
//! keep them in step.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../sink/tests/support/cql_node.rs"]
mod cql_node;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::Consistency;
use scylla::value::CqlTimestamp;
use support::{arg, SplitMix64, WINDOW_MS};
use tally_sink::row::bucket_of;
use tally_sink::scylla_store::ScyllaStore;
use tally_sink::store::ScyllaOptions;
use tally_sink::{WindowRow, WindowStore};
use uuid::Uuid;

const USAGE: &str =
    "usage: scylla_write [ROWS_PER_PHASE=200000] [CONCURRENCY=256] [ROWS_PER_CALL=50000] [ROUNDS=2]";
const KEYSPACE: &str = "tally_bench";
const T0: i64 = 1_790_000_000_000;

/// CPU seconds (user + system) of a thread of this process, or of the whole process.
fn cpu_seconds(task: Option<&str>) -> anyhow::Result<f64> {
    let path = match task {
        Some(tid) => format!("/proc/self/task/{tid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(&path)?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("malformed {path}"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// Starts the CQL node (behind the proxy the sink's CQL tests use) on a thread of
/// its own; returns the proxy's address, the thread's id (node and proxy share it),
/// and a sender that stops it.
fn start_node() -> anyhow::Result<(
    std::net::SocketAddr,
    String,
    tokio::sync::oneshot::Sender<()>,
)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop_rx = std::sync::Mutex::new(Some(stop_rx));
    std::thread::Builder::new()
        .name("cql-node".into())
        .spawn(move || {
            let tid = std::fs::read_link("/proc/thread-self")
                .ok()
                .and_then(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            let served = cql_node::with_cql_node(move |addr| {
                let ready = ready_tx.clone();
                let tid = tid.clone();
                let stop = stop_rx.lock().unwrap().take();
                async move {
                    let proxy = cql_node::start_proxy(addr, Default::default()).await?;
                    let _ = ready.send((proxy, tid));
                    if let Some(stop) = stop {
                        let _ = stop.await;
                    }
                    Ok(())
                }
            });
            if let Err(err) = served {
                eprintln!("CQL node failed: {err:#}");
            }
        })?;
    let (addr, tid) = ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the CQL node did not start")?;
    Ok((addr, tid, stop_tx))
}

/// One node: replication 1, consistency ONE; set field by field, so settings added
/// to `ScyllaOptions` later keep their defaults.
#[allow(clippy::field_reassign_with_default)]
fn store_options(concurrency: usize) -> ScyllaOptions {
    let mut options = ScyllaOptions::default();
    options.replication = "{'class': 'SimpleStrategy', 'replication_factor': 1}".into();
    options.consistency = "ONE".into();
    options.max_concurrency = concurrency;
    options
}

fn rows_for_phase(phase: u64, count: usize) -> Vec<WindowRow> {
    let mut rng = SplitMix64(0xbe7c_0000 + phase);
    (0..count)
        .map(|index| {
            let window_start_ms = T0 + (index as i64 % 6) * WINDOW_MS;
            let count = 1 + rng.below(50) as i64;
            WindowRow {
                key: Uuid::from_u64_pair(rng.next_u64(), rng.next_u64()),
                window_start_ms,
                window_end_ms: window_start_ms + WINDOW_MS,
                partition: (index % 4) as i32,
                sum: count * 7,
                count,
                is_final: index % 3 == 0,
                through_offset: index as i64 * 13,
                generation: 1,
            }
        })
        .collect()
}

/// The plain loop: the driver's `parallel.rs` pattern with the backend's statement.
async fn plain_phase(
    session: &Arc<Session>,
    insert: &scylla::statement::prepared::PreparedStatement,
    rows: &[WindowRow],
    concurrency: usize,
    bucket_ms: i64,
) -> anyhow::Result<()> {
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    // (failed statements, the first error)
    let failures = Arc::new(std::sync::Mutex::new((0usize, None::<String>)));
    for row in rows {
        let permit = permits.clone().acquire_owned().await?;
        let session = Arc::clone(session);
        let mut statement = insert.clone().bind(&(
            row.key,
            CqlTimestamp(bucket_of(row.window_start_ms, bucket_ms)),
            CqlTimestamp(row.window_start_ms),
            row.partition,
            CqlTimestamp(row.window_end_ms),
            row.sum,
            row.count,
            row.is_final,
            row.through_offset,
            i32::from(row.generation),
        ))?;
        statement.set_timestamp(Some(row.version()));
        let failures = Arc::clone(&failures);
        tokio::spawn(async move {
            if let Err(err) = session.execute_bound_unpaged(&statement).await {
                let mut failures = failures.lock().unwrap();
                failures.0 += 1;
                failures.1.get_or_insert_with(|| err.to_string());
            }
            drop(permit);
        });
    }
    // Every permit back: every statement finished.
    let _all = permits.acquire_many(u32::try_from(concurrency)?).await?;
    let failures = failures.lock().unwrap();
    if let (count, Some(first)) = &*failures {
        bail!("{count} plain INSERTs failed, first: {first}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rows_per_phase: usize = arg(&args, 0, Some(200_000), USAGE)?;
    let concurrency: usize = arg(&args, 1, Some(256), USAGE)?;
    let rows_per_call: usize = arg(&args, 2, Some(50_000), USAGE)?;
    let rounds: u64 = arg(&args, 3, Some(2), USAGE)?;
    if rows_per_phase == 0 || concurrency == 0 || rows_per_call == 0 || rounds == 0 {
        bail!("every argument must be positive\n{USAGE}");
    }
    let (addr, node_tid, stop_node) = start_node()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let options = store_options(concurrency);
        let store = ScyllaStore::connect(&[addr.to_string()], KEYSPACE, &options)
            .await
            .context("connecting the ScyllaDB backend")?;
        let session = Arc::new(
            SessionBuilder::new()
                .known_node(addr.to_string())
                .connection_timeout(Duration::from_secs(5))
                .build()
                .await
                .context("connecting the plain session")?,
        );
        let mut insert = session
            .prepare(format!(
                "INSERT INTO {KEYSPACE}.window_sums (key, bucket, window_start, partition, window_end, sum, count, final, through_offset, generation) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await
            .context("preparing the plain INSERT")?;
        insert.set_consistency(Consistency::One);
        insert.set_is_idempotent(true);

        println!(
            "CQL node kassandra-tester on {addr} (own thread); {rows_per_phase} rows per phase, concurrency {concurrency}, write_rows calls of {rows_per_call} rows"
        );
        println!(
            "{:<12} {:>6} {:>12} {:>9} {:>11} {:>14}",
            "phase", "round", "rows/s", "seconds", "node cores", "client cores"
        );
        let mut rates: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
        let mut written: Vec<Vec<WindowRow>> = Vec::new();
        for round in 0..rounds {
            for phase in ["plain", "write_rows"] {
                let rows = rows_for_phase(written.len() as u64, rows_per_phase);
                let node_before = cpu_seconds(Some(&node_tid))?;
                let process_before = cpu_seconds(None)?;
                let started = Instant::now();
                match phase {
                    "plain" => {
                        plain_phase(&session, &insert, &rows, concurrency, store.bucket_ms()).await?
                    }
                    _ => {
                        for call in rows.chunks(rows_per_call) {
                            store.write_rows(call).await.context("write_rows")?;
                        }
                    }
                }
                let seconds = started.elapsed().as_secs_f64();
                let node = cpu_seconds(Some(&node_tid))? - node_before;
                let client = cpu_seconds(None)? - process_before - node;
                let rate = rows.len() as f64 / seconds;
                rates.entry(phase).or_default().push(rate);
                println!(
                    "{phase:<12} {:>6} {rate:>12.0} {seconds:>9.2} {:>11.2} {:>14.2}",
                    round + 1,
                    node / seconds,
                    client / seconds
                );
                written.push(rows);
            }
        }
        // Both paths wrote the same thing: read a sample of each phase back.
        for (phase, rows) in written.iter().enumerate() {
            for row in rows.iter().step_by((rows.len() / 200).max(1)) {
                let found = store
                    .read_rows(row.key, row.window_start_ms, row.window_end_ms, 10)
                    .await
                    .context("reading back")?;
                if found.as_slice() != std::slice::from_ref(row) {
                    bail!("phase {phase}: row {row:?} read back as {found:?}");
                }
            }
        }
        let mean = |name: &str| {
            let values = &rates[name];
            values.iter().sum::<f64>() / values.len() as f64
        };
        println!(
            "read back a sample of every phase: identical rows\nratio write_rows / plain (means of {rounds} rounds): {:.2} ({:.0} / {:.0} rows/s)",
            mean("write_rows") / mean("plain"),
            mean("write_rows"),
            mean("plain")
        );
        Ok::<(), anyhow::Error>(())
    })?;
    let _ = stop_node.send(());
    Ok(())
}
