#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The ScyllaDB backend over the CQL wire, against kassandra-tester (an in-process
//! CQL node) driven by the real `scylla` 1.x driver, through the proxy of
//! `support/cql_node.rs`. See /work/shared/notes/cql-test-node.md for the node's quirks.
//!
//! What this proves: connect() creates the keyspace and the tables with the
//! production DDL (`PRIMARY KEY ((key, bucket), window_start, partition)`), refuses a
//! table of the earlier per-window layout with what to do, pins the bucket and refuses
//! another one; every production statement prepares and type-checks; rows and
//! checkpoints round-trip with the right CQL types (uuid, timestamp = ms, int, bigint,
//! boolean); a range read is one query per bucket touched, carrying (key, bucket,
//! from, to) clipped to the bucket; each row travels as its own statement with the
//! row's version as the protocol-level write timestamp and, with a retention, a TTL
//! counted from the window's end (rows already past it are not sent); checkpoint
//! writes carry the retention as a literal TTL; the probe write works; a table with
//! wrong column types is refused with `SinkError::Schema`.
//!
//! What it cannot prove: the node ignores write timestamps (last write wins), range
//! restrictions (it answers a range read with the whole partition, which the store
//! then filters, as it always does), TTLs (nothing ever expires on it),
//! `CLUSTERING ORDER BY ... DESC`, `LIMIT` and paging. Version ordering is proven on
//! SQLite (tests/sqlite_store.rs) and by the aggregator's property test; expiry,
//! ScyllaDB's own range filtering, ordering and multi-page reads only on real ScyllaDB
//! (docker compose).

#[path = "support/cql_node.rs"]
mod cql_node;

use std::cell::RefCell;
use std::rc::Rc;

use anyhow::{anyhow, ensure, Context};
use cql_node::{int_value, start_proxy, with_cql_node, Seen};
use scylla::client::session_builder::SessionBuilder;
use tally_schemas::Checkpoint;
use tally_sink::row::bucket_of;
use tally_sink::scylla_store::ScyllaStore;
use tally_sink::store::{
    now_ms, CheckpointScope, Retention, ScyllaOptions, StoreOptions, CHECKPOINTS_KEPT,
};
use tally_sink::{SinkError, WindowRow, WindowStore};
use uuid::Uuid;

const WINDOW: i64 = 10_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
/// An event time in 2026 a little before an hour boundary, so timestamps are far
/// from zero and from i32's range, and three windows span two hour buckets.
const T0: i64 = 1_790_002_780_000;

fn options() -> ScyllaOptions {
    ScyllaOptions {
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        consistency: "ONE".into(),
        max_concurrency: 4,
        ..ScyllaOptions::default()
    }
}

fn store_options(bucket_ms: i64, retention: Retention) -> StoreOptions {
    StoreOptions {
        scylla: options(),
        bucket_ms,
        retention,
    }
}

fn row(
    key: Uuid,
    window: i64,
    partition: i32,
    sum: i64,
    through: i64,
    is_final: bool,
) -> WindowRow {
    row_at(key, T0 + window * WINDOW, partition, sum, through, is_final)
}

fn row_at(
    key: Uuid,
    start: i64,
    partition: i32,
    sum: i64,
    through: i64,
    is_final: bool,
) -> WindowRow {
    WindowRow {
        key,
        window_start_ms: start,
        window_end_ms: start + WINDOW,
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
        let seen = Rc::new(RefCell::new(Seen::default()));
        let proxy = start_proxy(addr, Rc::clone(&seen)).await?;
        let nodes = vec![proxy.to_string()];
        // Hour buckets, so a few windows span two of them.
        let store = ScyllaStore::connect_with(&nodes, "tally_test", &store_options(HOUR, Retention::AsRecorded))
            .await
            .context("connect (creates keyspace and tables, prepares statements)")?;
        ensure!(store.describe() == format!("scylla://{proxy}/tally_test"), "{}", store.describe());
        ensure!(store.bucket_ms() == HOUR && store.retention_ms().is_none());
        // Connecting again finds the schema and the pinned bucket in place.
        let store_again = ScyllaStore::connect_with(&nodes, "tally_test", &store_options(HOUR, Retention::AsRecorded)).await?;

        // The tables exist with the production columns: read them with a plain session.
        let raw = SessionBuilder::new().known_node(addr.to_string()).build().await?;
        raw.query_unpaged(
            "SELECT key, bucket, window_start, partition, window_end, sum, count, final, through_offset, generation FROM tally_test.window_sums",
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
        ensure!(bucket_of(rows[0].window_start_ms, HOUR) != bucket_of(rows[6].window_start_ms, HOUR), "two buckets");
        seen.borrow_mut().executes.clear();
        store.write_rows(&rows).await.context("write_rows")?;
        {
            // One EXECUTE per row (no batch), each carrying the row's version as its
            // protocol-level write timestamp, its bucket as the second value, no TTL.
            let seen = seen.borrow();
            ensure!(seen.problems.is_empty(), "proxy could not parse: {:?}", seen.problems);
            let inserts = seen.executes_of("INSERT INTO tally_test.window_sums");
            ensure!(inserts.len() == rows.len(), "{} inserts for {} rows", inserts.len(), rows.len());
            let mut sent: Vec<(Option<i64>, Option<i64>, usize)> = inserts
                .iter()
                .map(|e| (e.timestamp, int_value(&e.values[1]), e.values.len()))
                .collect();
            let mut wanted: Vec<(Option<i64>, Option<i64>, usize)> = rows
                .iter()
                .map(|r| (Some(r.version()), Some(bucket_of(r.window_start_ms, HOUR)), 10))
                .collect();
            sent.sort();
            wanted.sort();
            ensure!(sent == wanted, "sent {sent:?}, wanted {wanted:?}");
        }

        // [from, to) with `to` on a window start: key a's windows 1 and 2 (two buckets),
        // one query per bucket, each clipped to its bucket.
        seen.borrow_mut().executes.clear();
        let read = store
            .read_rows(a, T0 + WINDOW, T0 + 3 * WINDOW, 1_000)
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
        {
            let seen = seen.borrow();
            let selects: Vec<Vec<Option<i64>>> = seen
                .executes_of("FROM tally_test.window_sums WHERE key = ? AND bucket = ?")
                .iter()
                .map(|e| e.values.iter().skip(1).map(int_value).collect())
                .collect();
            let split = bucket_of(T0 + 2 * WINDOW, HOUR);
            ensure!(
                selects
                    == vec![
                        vec![Some(bucket_of(T0, HOUR)), Some(T0 + WINDOW), Some(split)],
                        vec![Some(split), Some(split), Some(T0 + 3 * WINDOW)],
                    ],
                "range queries sent (bucket, from, to): {selects:?}"
            );
        }
        // The limit: the first rows only, in order.
        let first = store.read_rows(a, T0, T0 + 3 * WINDOW, 3).await?;
        ensure!(first.len() == 3 && first[0].window_start_ms == T0 && first[2].window_start_ms == T0 + WINDOW, "{first:?}");

        // A range that does not start on a window start, read through the other connection.
        let read = store_again.read_rows(b, T0 + 1, T0 + 2 * WINDOW + 1, 1_000).await?;
        let starts: Vec<i64> = read.iter().map(|r| r.window_start_ms).collect();
        ensure!(starts == vec![T0 + WINDOW, T0 + 2 * WINDOW], "{starts:?}");
        ensure!(read[0].sum == i64::MAX - 1 && read[0].generation == 7, "{:?}", read[0]);
        ensure!(store.read_rows(Uuid::from_u128(0xc3), T0, T0 + 3 * WINDOW, 1_000).await?.is_empty());
        ensure!(matches!(
            store.read_rows(a, 0, T0, 1_000).await,
            Err(SinkError::Config(_))
        ), "a range of ~500,000 hour buckets is refused");

        // Verify's read: every row of the keys asked for, in (window_start, key, partition) order.
        let scanned = store.scan_rows(T0 + WINDOW, T0 + 2 * WINDOW, &[a, b]).await.context("scan_rows")?;
        let mut expected: Vec<WindowRow> = rows
            .iter()
            .filter(|r| r.window_start_ms == T0 + WINDOW)
            .copied()
            .collect();
        expected.sort_by_key(|r| (r.window_start_ms, r.key, r.partition));
        ensure!(scanned == expected, "scan_rows returned {scanned:#?}");
        ensure!(store.scan_rows(T0, T0 + 3 * WINDOW, &[a, b]).await?.len() == rows.len());
        ensure!(store.scan_rows(T0, T0 + 3 * WINDOW, &[b]).await?.len() == 3);

        // A more complete row replaces the provisional one. (Kassandra keeps the last
        // write whatever its timestamp, so this shows the upsert, not the ordering.)
        ensure!(!rows[6].is_final && rows[6].key == a);
        let completed = WindowRow { sum: 99, is_final: true, through_offset: 150, ..rows[6] };
        store.write_rows(&[completed]).await?;
        let read = store.read_rows(a, completed.window_start_ms, completed.window_end_ms, 1_000).await?;
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
        seen.borrow_mut().executes.clear();
        store.probe().await.context("probe")?;
        let timestamps: Vec<Option<i64>> = seen.borrow().executes.iter().map(|e| e.timestamp).collect();
        ensure!(timestamps == vec![None], "{timestamps:?}");
        store_again.probe().await?;
        ensure!(seen.borrow().problems.is_empty(), "{:?}", seen.borrow().problems);
        Ok(())
    })
    .unwrap();
}

#[test]
fn the_bucket_is_pinned_and_another_one_is_refused() {
    with_cql_node(|addr| async move {
        let seen = Rc::new(RefCell::new(Seen::default()));
        let nodes = vec![start_proxy(addr, seen).await?.to_string()];
        // The default bucket is a day; the first process pins it.
        let store = ScyllaStore::connect(&nodes, "tally_bucket", &options()).await?;
        ensure!(store.bucket_ms() == DAY);
        let pinned = store
            .load_metadata(tally_sink::store::BUCKET_METADATA_NAME)
            .await?;
        ensure!(
            pinned.as_deref() == Some(r#"{"bucket_ms":86400000}"#),
            "{pinned:?}"
        );
        for retention in [Retention::AsRecorded, Retention::Enforce(None)] {
            match ScyllaStore::connect_with(&nodes, "tally_bucket", &store_options(HOUR, retention))
                .await
            {
                Err(SinkError::Config(message)) => {
                    ensure!(
                        message.contains("1day") && message.contains("1h"),
                        "{message}"
                    );
                    ensure!(message.contains("--scylla-bucket 1day"), "{message}");
                }
                Err(other) => return Err(anyhow!("expected a config error, got {other:?}")),
                Ok(_) => return Err(anyhow!("a process with another bucket was let in")),
            }
        }
        ScyllaStore::connect_with(
            &nodes,
            "tally_bucket",
            &store_options(DAY, Retention::AsRecorded),
        )
        .await?;
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_table_of_the_earlier_layout_is_refused_with_what_to_do() {
    with_cql_node(|addr| async move {
        let raw = SessionBuilder::new().known_node(addr.to_string()).build().await?;
        raw.query_unpaged(
            "CREATE KEYSPACE IF NOT EXISTS tally_old WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
            (),
        )
        .await?;
        // The DDL of the previous build, one partition per window.
        raw.query_unpaged(
            "CREATE TABLE IF NOT EXISTS tally_old.window_sums (key uuid, window_start timestamp, \
             partition int, window_end timestamp, sum bigint, count bigint, final boolean, \
             through_offset bigint, generation int, PRIMARY KEY ((key, window_start), partition))",
            (),
        )
        .await?;
        let nodes = vec![start_proxy(addr, Rc::default()).await?.to_string()];
        match ScyllaStore::connect(&nodes, "tally_old", &options()).await {
            Err(SinkError::Schema(message)) => {
                ensure!(message.contains("earlier Tally build"), "{message}");
                ensure!(message.contains("DROP TABLE tally_old.window_sums"), "{message}");
                ensure!(message.contains("--group"), "{message}");
                Ok(())
            }
            Err(other) => Err(anyhow!("expected a schema error, got {other:?}")),
            Ok(_) => Err(anyhow!("connected to a table of the earlier layout")),
        }
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
        // The right primary key, but window_start as bigint instead of timestamp.
        raw.query_unpaged(
            "CREATE TABLE IF NOT EXISTS tally_foreign.window_sums (key uuid, bucket timestamp, \
             window_start bigint, partition int, window_end timestamp, sum bigint, count bigint, \
             final boolean, through_offset bigint, generation int, \
             PRIMARY KEY ((key, bucket), window_start, partition))",
            (),
        )
        .await?;
        let nodes = vec![start_proxy(addr, Rc::default()).await?.to_string()];
        match ScyllaStore::connect(&nodes, "tally_foreign", &options()).await {
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

#[test]
fn with_a_retention_rows_carry_a_ttl_from_their_window_end_and_expired_rows_are_not_sent() {
    with_cql_node(|addr| async move {
        let seen = Rc::new(RefCell::new(Seen::default()));
        let nodes = vec![start_proxy(addr, Rc::clone(&seen)).await?.to_string()];
        let retention = 7 * DAY;
        let writer = ScyllaStore::connect_with(
            &nodes,
            "tally_ttl",
            &store_options(DAY, Retention::Enforce(Some(retention))),
        )
        .await?;
        ensure!(writer.retention_ms() == Some(retention));
        // Readers learn it from the store.
        let reader = ScyllaStore::connect(&nodes, "tally_ttl", &options()).await?;
        ensure!(reader.retention_ms() == Some(retention));
        ensure!(tally_sink::store::load_retention(&reader).await? == Some(retention));
        // The checkpoint insert carries the retention as a literal TTL.
        ensure!(
            seen.borrow()
                .prepares
                .iter()
                .any(|p| p.contains("tally_checkpoints") && p.ends_with("USING TTL 604800")),
            "{:?}",
            seen.borrow().prepares
        );

        let key = Uuid::from_u128(0x77);
        let now = now_ms();
        let start = |ago: i64| (now - ago).div_euclid(WINDOW) * WINDOW;
        let fresh = row_at(key, start(60_000), 0, 5, 1, false);
        let six_days_old = row_at(key, start(6 * DAY), 0, 6, 2, true);
        let expired = row_at(key, start(8 * DAY), 0, 7, 3, true);
        seen.borrow_mut().executes.clear();
        let before = now_ms();
        writer.write_rows(&[fresh, six_days_old, expired]).await?;
        let after = now_ms();
        {
            let seen_now = seen.borrow();
            let inserts = seen_now.executes_of("INSERT INTO tally_ttl.window_sums");
            ensure!(
                inserts.len() == 2,
                "the expired row is not written: {} inserts",
                inserts.len()
            );
            for insert in inserts {
                ensure!(insert.values.len() == 11, "{} values", insert.values.len());
                let start = int_value(&insert.values[2]).unwrap();
                let written = [fresh, six_days_old]
                    .into_iter()
                    .find(|r| r.window_start_ms == start)
                    .unwrap();
                let ttl = int_value(&insert.values[10]).unwrap();
                // Seconds from the write to window end + retention, rounded up.
                let most = (written.window_end_ms + retention - before + 999) / 1000;
                let least = (written.window_end_ms + retention - after + 999) / 1000;
                ensure!(
                    (least..=most).contains(&ttl),
                    "TTL {ttl} not in {least}..={most}"
                );
                ensure!(insert.timestamp == Some(written.version()));
            }
        }
        // Rows written are read back (the node never expires them, so this shows the
        // statement, not the expiry).
        let read = reader.read_rows(key, start(7 * DAY), now, 100).await?;
        ensure!(read == vec![six_days_old, fresh], "{read:?}");

        // A node that drops `USING TTL ?` (this one, without the proxy's help) is
        // refused rather than silently keeping rows forever.
        match ScyllaStore::connect_with(
            &[addr.to_string()],
            "tally_ttl",
            &store_options(DAY, Retention::Enforce(Some(retention))),
        )
        .await
        {
            Err(SinkError::Schema(message)) => {
                ensure!(message.contains("window_sums"), "{message}")
            }
            Err(other) => return Err(anyhow!("expected a schema error, got {other:?}")),
            Ok(_) => return Err(anyhow!("a node without TTL support was accepted")),
        }
        Ok(())
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
        let nodes = vec![start_proxy(addr, Rc::default()).await?.to_string()];
        let store = ScyllaStore::connect(&nodes, "tally_meta_test", &options()).await?;
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
