#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The ScyllaDB backend over the CQL wire, against kassandra-tester (an in-process
//! CQL node) driven by the real `scylla` 1.x driver. See
//! /work/shared/notes/cql-test-node.md for the node's quirks.
//!
//! What this proves: connect() creates the keyspace and both tables with the
//! production DDL, every production statement prepares and type-checks, rows and
//! checkpoints round-trip with the right CQL types (uuid, timestamp = ms, int,
//! bigint, boolean), checkpoint pruning deletes over the wire, the probe write works,
//! and a table with wrong column types is refused with `SinkError::Schema`. A small
//! recording proxy between driver and node parses the EXECUTE frames and shows that
//! each row travels as its own statement carrying the row's version as the
//! protocol-level write timestamp (and checkpoint writes carry none).
//!
//! What it cannot prove: kassandra accepts the write timestamp but ignores it (last
//! write wins), so version ordering is proven on SQLite (tests/sqlite_store.rs) and by
//! the aggregator's property test, and only real ScyllaDB (docker compose) shows it
//! for this backend. Kassandra also ignores `CLUSTERING ORDER BY ... DESC`, `LIMIT`
//! and paging (it returns whole partitions in ascending order, and at most 4 999 rows
//! from a full scan in one page); the backend picks the checkpoint it needs
//! client-side, so the same code is right under both orders, but ScyllaDB's own
//! ordering, LIMIT and multi-page scans are not exercised here.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use anyhow::{anyhow, ensure, Context};
use kassandra_tester::kassandra::frame::request::query::Query;
use kassandra_tester::kassandra::KassandraSession;
use kassandra_tester::KassandraTester;
use scylla::client::session_builder::SessionBuilder;
use tally_schemas::Checkpoint;
use tally_sink::scylla_store::ScyllaStore;
use tally_sink::store::{CheckpointScope, ScyllaOptions, CHECKPOINTS_KEPT};
use tally_sink::{SinkError, WindowRow, WindowStore};
use uuid::Uuid;

const WINDOW: i64 = 10_000;
/// An event time in 2026, so timestamps are far from zero and from i32's range.
const T0: i64 = 1_790_000_000_000;

/// The seed row the driver needs to find the node (see the note).
const PEER_SEED: &str = "INSERT INTO system.peers (peer, host_id, rpc_address, data_center, rack, tokens, schema_version) \
     VALUES ('127.0.0.1', aa1f1ae0-469d-4abf-ae3f-ecb7a17132fe, '127.0.0.1', 'datacenter1', 'rack', ['0'], \
     0b1c3252-f787-4099-8594-157323b71789)";

fn options() -> ScyllaOptions {
    ScyllaOptions {
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        consistency: "ONE".into(),
        max_concurrency: 4,
        ..ScyllaOptions::default()
    }
}

/// Runs `body` against a fresh CQL node and returns its result. `in_scope` discards
/// the closure's own result, so it travels out through a shared cell; a body that
/// never ran is a failure too.
fn with_cql_node<F, Fut>(body: F) -> anyhow::Result<()>
where
    F: Fn(SocketAddr) -> Fut + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let outcome: Rc<RefCell<Option<anyhow::Result<()>>>> = Rc::new(RefCell::new(None));
    let slot = Rc::clone(&outcome);
    let served: anyhow::Result<()> = local.block_on(&runtime, async move {
        let mut node = KassandraSession::new();
        node.process(Query::simple(PEER_SEED).map_err(|e| anyhow!("seed parse: {e}"))?)
            .map_err(|e| anyhow!("seed insert: {e}"))?;
        let body = &body;
        KassandraTester::new(node)
            .in_scope(|addr| {
                let slot = Rc::clone(&slot);
                async move {
                    let result = body(addr).await;
                    *slot.borrow_mut() = Some(result);
                    Ok::<(), anyhow::Error>(())
                }
            })
            .await?;
        Ok(())
    });
    served?;
    let result = outcome.borrow_mut().take();
    result.unwrap_or_else(|| Err(anyhow!("the test body never ran")))
}

/// What the recording proxy saw in the driver's EXECUTE requests: the protocol-level
/// default timestamp of each (None when the flag was not set), or a parse problem.
#[derive(Default)]
struct SeenExecutes {
    timestamps: Vec<Option<i64>>,
    problems: Vec<String>,
}

/// A TCP proxy in front of the CQL node that reads every request frame the driver
/// sends (CQL protocol v4) and records the write timestamp of each EXECUTE. This is
/// how the test sees the row version travel over the wire even though the node
/// itself ignores it.
async fn start_recording_proxy(
    upstream: SocketAddr,
    seen: Rc<RefCell<SeenExecutes>>,
) -> anyhow::Result<SocketAddr> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::task::spawn_local(async move {
        while let Ok((client, _)) = listener.accept().await {
            let seen = Rc::clone(&seen);
            tokio::task::spawn_local(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let requests = async {
                    loop {
                        let mut header = [0u8; 9];
                        if client_read.read_exact(&mut header).await.is_err() {
                            return;
                        }
                        let length =
                            u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
                        let mut body = vec![0u8; length as usize];
                        if client_read.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        const EXECUTE: u8 = 0x0A;
                        if header[4] == EXECUTE {
                            let mut seen = seen.borrow_mut();
                            match execute_timestamp(header[0], header[1], &body) {
                                Ok(timestamp) => seen.timestamps.push(timestamp),
                                Err(problem) => seen.problems.push(problem),
                            }
                        }
                        if server_write.write_all(&header).await.is_err()
                            || server_write.write_all(&body).await.is_err()
                        {
                            return;
                        }
                    }
                };
                let responses = tokio::io::copy(&mut server_read, &mut client_write);
                tokio::select! {
                    _ = requests => {}
                    _ = responses => {}
                }
            });
        }
    });
    Ok(address)
}

/// The default timestamp of a v4 EXECUTE body:
/// `<id: short bytes><consistency: short><flags: byte>[<n: short><n × bytes>]
///  [<page_size: int>][<paging_state: bytes>][<serial_consistency: short>][<timestamp: long>]`.
fn execute_timestamp(version: u8, frame_flags: u8, body: &[u8]) -> Result<Option<i64>, String> {
    struct Reader<'a>(&'a [u8]);
    impl Reader<'_> {
        fn take(&mut self, n: usize) -> Result<&[u8], String> {
            if self.0.len() < n {
                return Err(format!("EXECUTE body truncated (wanted {n} more bytes)"));
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn short(&mut self) -> Result<usize, String> {
            let b = self.take(2)?;
            Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
        }
        fn int(&mut self) -> Result<i32, String> {
            let b = self.take(4)?;
            Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        }
        fn bytes(&mut self) -> Result<(), String> {
            let length = self.int()?;
            if length > 0 {
                self.take(length as usize)?;
            }
            Ok(())
        }
    }
    if version != 0x04 {
        return Err(format!(
            "expected CQL protocol v4 requests, got version byte {version:#x}"
        ));
    }
    // Compression or a custom payload would change the body layout.
    if frame_flags & 0x05 != 0 {
        return Err(format!("unexpected frame flags {frame_flags:#x}"));
    }
    let mut reader = Reader(body);
    let id_length = reader.short()?;
    reader.take(id_length)?;
    reader.short()?; // consistency
    let flags = reader.take(1)?[0];
    if flags & 0x40 != 0 {
        return Err("named values are not expected".into());
    }
    if flags & 0x01 != 0 {
        for _ in 0..reader.short()? {
            reader.bytes()?;
        }
    }
    if flags & 0x04 != 0 {
        reader.int()?; // page size
    }
    if flags & 0x08 != 0 {
        reader.bytes()?; // paging state
    }
    if flags & 0x10 != 0 {
        reader.short()?; // serial consistency
    }
    if flags & 0x20 == 0 {
        return Ok(None);
    }
    let b = reader.take(8)?;
    Ok(Some(i64::from_be_bytes([
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
    ])))
}

fn row(
    key: Uuid,
    window: i64,
    partition: i32,
    sum: i64,
    through: i64,
    is_final: bool,
) -> WindowRow {
    WindowRow {
        key,
        window_start_ms: T0 + window * WINDOW,
        window_end_ms: T0 + (window + 1) * WINDOW,
        partition,
        sum,
        count: sum / 2 + 1,
        is_final,
        through_offset: through,
        generation: 7,
    }
}

fn scope(partition: i32) -> CheckpointScope {
    CheckpointScope {
        group: "tally-aggregators".into(),
        topic: "increments".into(),
        partition,
    }
}

fn checkpoint(next_offset: i64) -> Checkpoint {
    Checkpoint {
        next_offset,
        max_ts_ms: Some(T0 + next_offset),
        closed_through_ms: Some(T0 + next_offset - WINDOW),
        generation: 3,
        settings: Some(tally_schemas::SumSettings {
            window_ms: WINDOW,
            grace_ms: 2_000,
        }),
        external_reset: next_offset % 2 == 1,
    }
}

#[test]
fn scylla_store_round_trips_rows_and_checkpoints_over_cql() {
    with_cql_node(|addr| async move {
        // The main store talks through the recording proxy; a second one connects directly.
        let seen = Rc::new(RefCell::new(SeenExecutes::default()));
        let proxy = start_recording_proxy(addr, Rc::clone(&seen)).await?;
        let nodes = vec![proxy.to_string()];
        let store = ScyllaStore::connect(&nodes, "tally_test", &options())
            .await
            .context("connect (creates keyspace and tables, prepares statements)")?;
        ensure!(store.describe() == format!("scylla://{proxy}/tally_test"), "{}", store.describe());
        // Connecting again finds the schema in place (IF NOT EXISTS) and re-prepares.
        let store_again = ScyllaStore::connect(&[addr.to_string()], "tally_test", &options()).await?;

        // The tables exist with the production columns: read them with a plain session.
        let raw = SessionBuilder::new().known_node(addr.to_string()).build().await?;
        raw.query_unpaged(
            "SELECT key, window_start, partition, window_end, sum, count, final, through_offset, generation FROM tally_test.window_sums",
            (),
        )
        .await
        .context("window_sums exists")?;
        raw.query_unpaged(
            "SELECT consumer_group, topic, partition, next_offset, max_ts, closed_through, generation FROM tally_test.tally_checkpoints",
            (),
        )
        .await
        .context("tally_checkpoints exists")?;

        let (a, b) = (Uuid::from_u128(0xa1), Uuid::from_u128(0xb2));
        let mut rows = Vec::new();
        for window in 0..3 {
            for partition in [5, 2] {
                rows.push(row(a, window, partition, 10 * window + i64::from(partition), 100 + window, window < 2));
            }
            rows.push(row(b, window, 0, i64::MAX - window, 200 + window, false));
        }
        seen.borrow_mut().timestamps.clear();
        store.write_rows(&rows).await.context("write_rows")?;
        {
            // One EXECUTE per row (no batch), each carrying the row's version as its
            // protocol-level write timestamp.
            let seen = seen.borrow();
            ensure!(seen.problems.is_empty(), "proxy could not parse: {:?}", seen.problems);
            let mut sent: Vec<Option<i64>> = seen.timestamps.clone();
            let mut versions: Vec<Option<i64>> = rows.iter().map(|r| Some(r.version())).collect();
            sent.sort();
            versions.sort();
            ensure!(sent == versions, "write timestamps sent {sent:?}, row versions {versions:?}");
        }

        // [from, to) with `to` on a window start: key a's windows 1 and 2, not 0 or 3.
        let read = store
            .read_rows(a, T0 + WINDOW, T0 + 3 * WINDOW, WINDOW)
            .await
            .context("read_rows")?;
        let mut expected: Vec<WindowRow> = rows
            .iter()
            .filter(|r| r.key == a && r.window_start_ms >= T0 + WINDOW)
            .copied()
            .collect();
        expected.sort_by_key(|r| (r.window_start_ms, r.partition));
        ensure!(read == expected, "read_rows returned {read:#?}, expected {expected:#?}");
        ensure!(read[0].partition == 2 && read[1].partition == 5, "ordered by partition");
        ensure!(read.iter().any(|r| r.is_final) && read.iter().any(|r| !r.is_final));

        // A range that does not start on a window start, read through the other connection.
        let read = store_again.read_rows(b, T0 + 1, T0 + 2 * WINDOW + 1, WINDOW).await?;
        let starts: Vec<i64> = read.iter().map(|r| r.window_start_ms).collect();
        ensure!(starts == vec![T0 + WINDOW, T0 + 2 * WINDOW], "{starts:?}");
        ensure!(read[0].sum == i64::MAX - 1 && read[0].generation == 7, "{:?}", read[0]);
        ensure!(store.read_rows(Uuid::from_u128(0xc3), T0, T0 + 3 * WINDOW, WINDOW).await?.is_empty());
        ensure!(matches!(
            store.read_rows(a, 0, T0, WINDOW).await,
            Err(SinkError::Config(_))
        ), "a range of ~10^8 windows is refused");

        let scanned = store.scan_rows(T0 + WINDOW, T0 + 2 * WINDOW).await.context("scan_rows")?;
        let mut expected: Vec<WindowRow> = rows
            .iter()
            .filter(|r| r.window_start_ms == T0 + WINDOW)
            .copied()
            .collect();
        expected.sort_by_key(|r| (r.window_start_ms, r.partition, r.key));
        ensure!(scanned == expected, "scan_rows returned {scanned:#?}");
        ensure!(store.scan_rows(T0, T0 + 3 * WINDOW).await?.len() == rows.len());

        // A more complete row replaces the provisional one. (Kassandra keeps the last
        // write whatever its timestamp, so this shows the upsert, not the ordering.)
        ensure!(!rows[6].is_final && rows[6].key == a);
        let completed = WindowRow { sum: 99, is_final: true, through_offset: 150, ..rows[6] };
        store.write_rows(&[completed]).await?;
        let read = store.read_rows(a, completed.window_start_ms, completed.window_end_ms, WINDOW).await?;
        ensure!(read.contains(&completed) && read.len() == 2, "{read:?}");

        // Checkpoints: exact and latest, pruning by DELETE over the wire.
        ensure!(store.load_checkpoint(&scope(0), None).await?.is_none());
        let saved: Vec<i64> = (1..=12).map(|i| i * 1_000).collect();
        for &offset in &saved {
            store.save_checkpoint(&scope(0), &checkpoint(offset)).await.context("save_checkpoint")?;
        }
        let no_times = Checkpoint { max_ts_ms: None, closed_through_ms: None, ..Checkpoint::fresh(500) };
        store.save_checkpoint(&scope(1), &no_times).await?;

        ensure!(store.load_checkpoint(&scope(0), Some(12_000)).await? == Some(checkpoint(12_000)));
        ensure!(store.load_checkpoint(&scope(0), Some(7_000)).await? == Some(checkpoint(7_000)));
        // A late save of an older generation at the same offset is kept apart: the
        // newest generation still answers.
        let older = Checkpoint { generation: 1, max_ts_ms: Some(1), ..checkpoint(7_000) };
        store.save_checkpoint(&scope(0), &older).await?;
        ensure!(store.load_checkpoint(&scope(0), Some(7_000)).await? == Some(checkpoint(7_000)));
        ensure!(store.load_checkpoint(&scope(0), Some(5_000)).await?.is_some());
        ensure!(store.load_checkpoint(&scope(0), Some(4_000)).await?.is_none(), "pruned");
        ensure!(store.load_checkpoint(&scope(0), Some(6_500)).await?.is_none(), "never saved");
        ensure!(store.load_checkpoint(&scope(0), None).await? == Some(checkpoint(12_000)));
        ensure!(store.load_checkpoint(&scope(1), None).await? == Some(no_times));
        ensure!(store.load_checkpoint(&scope(1), Some(500)).await? == Some(no_times));
        ensure!(store.load_checkpoint(&scope(2), None).await?.is_none());
        let kept = raw
            .query_unpaged(
                "SELECT next_offset FROM tally_test.tally_checkpoints WHERE consumer_group = 'tally-aggregators' AND topic = 'increments' AND partition = 0",
                (),
            )
            .await?
            .into_rows_result()?
            .rows::<(i64,)>()?
            .map(|row| row.map(|(offset,)| offset))
            .collect::<Result<std::collections::BTreeSet<i64>, _>>()?
            .len();
        ensure!(kept == CHECKPOINTS_KEPT, "{kept} checkpoint offsets kept");

        // Checkpoint writes keep the server's clock: no timestamp of ours.
        seen.borrow_mut().timestamps.clear();
        store.probe().await.context("probe")?;
        ensure!(seen.borrow().timestamps == vec![None], "{:?}", seen.borrow().timestamps);
        store_again.probe().await?;
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_table_with_other_column_types_is_a_schema_error() {
    with_cql_node(|addr| async move {
        let raw = SessionBuilder::new().known_node(addr.to_string()).build().await?;
        raw.query_unpaged(
            "CREATE KEYSPACE IF NOT EXISTS tally_foreign WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
            (),
        )
        .await?;
        // window_start as bigint instead of timestamp.
        raw.query_unpaged(
            "CREATE TABLE IF NOT EXISTS tally_foreign.window_sums (key uuid, window_start bigint, partition int, \
             window_end timestamp, sum bigint, count bigint, final boolean, through_offset bigint, generation int, \
             PRIMARY KEY ((key, window_start), partition))",
            (),
        )
        .await?;
        match ScyllaStore::connect(&[addr.to_string()], "tally_foreign", &options()).await {
            Err(SinkError::Schema(message)) => {
                ensure!(message.contains("window_sums"), "{message}");
                Ok(())
            }
            Err(other) => Err(anyhow!("expected a schema error, got {other:?}")),
            Ok(_) => Err(anyhow!("connected to a table with window_start bigint")),
        }
    })
    .unwrap();
}

#[tokio::test]
async fn an_unreachable_node_is_retryable_and_bad_options_are_not() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nodes = vec![format!("127.0.0.1:{port}")];
    let err = ScyllaStore::connect(&nodes, "tally_test", &options())
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");

    let bad_consistency = ScyllaOptions {
        consistency: "MOSTLY".into(),
        ..options()
    };
    let err = ScyllaStore::connect(&nodes, "tally_test", &bad_consistency)
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Config(_)), "{err:?}");
    let err = ScyllaStore::connect(&nodes, "bad-name", &options())
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Config(_)), "{err:?}");
    let no_concurrency = ScyllaOptions {
        max_concurrency: 0,
        ..options()
    };
    let err = ScyllaStore::connect(&nodes, "tally_test", &no_concurrency)
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Config(_)), "{err:?}");
}

#[test]
fn metadata_compare_and_set_and_settings_pinning_over_cql() -> anyhow::Result<()> {
    use tally_schemas::SumSettings;
    with_cql_node(|addr| async move {
        let store =
            ScyllaStore::connect(&[addr.to_string()], "tally_meta_test", &options()).await?;
        ensure!(store.load_metadata("m").await? == None);
        ensure!(store.compare_and_set_metadata("m", None, "a").await?);
        ensure!(!store.compare_and_set_metadata("m", None, "b").await?);
        ensure!(!store.compare_and_set_metadata("m", Some("x"), "b").await?);
        ensure!(store.load_metadata("m").await?.as_deref() == Some("a"));
        ensure!(store.compare_and_set_metadata("m", Some("a"), "b").await?);
        ensure!(store.load_metadata("m").await?.as_deref() == Some("b"));
        let ten_s = SumSettings {
            window_ms: 10_000,
            grace_ms: 2_000,
        };
        tally_sink::pin_settings(&store, ten_s).await?;
        let other = SumSettings {
            window_ms: 10_000,
            grace_ms: 0,
        };
        let refused = tally_sink::pin_settings(&store, other).await;
        ensure!(matches!(refused, Err(SinkError::Config(_))), "{refused:?}");
        Ok(())
    })
}
