#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The embedded store: version guard, ranges, checkpoints, reopening, schema check.
//! Version ordering is proven here (and not on the CQL test node, which ignores
//! write timestamps).

use std::path::Path;

use proptest::prelude::*;
use tally_schemas::Checkpoint;
use tally_sink::sqlite::SqliteStore;
use tally_sink::store::{CheckpointScope, CHECKPOINTS_KEPT};
use tally_sink::{SinkError, WindowRow, WindowStore};
use uuid::Uuid;

const WINDOW: i64 = 10_000;

fn key(n: u128) -> Uuid {
    Uuid::from_u128(0x5a5a_0000_0000_4000_8000_0000_0000_0000 | n)
}

fn row(
    key: Uuid,
    start: i64,
    partition: i32,
    sum: i64,
    through: i64,
    is_final: bool,
    generation: u16,
) -> WindowRow {
    WindowRow {
        key,
        window_start_ms: start,
        window_end_ms: start + WINDOW,
        partition,
        sum,
        count: sum,
        is_final,
        through_offset: through,
        generation,
    }
}

fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(&dir.join("nested/dir/tally.db")).unwrap()
}

fn scope(partition: i32) -> CheckpointScope {
    CheckpointScope {
        group: "tally".into(),
        topic: "increments".into(),
        partition,
    }
}

fn checkpoint(next_offset: i64, generation: u16) -> Checkpoint {
    Checkpoint {
        next_offset,
        max_ts_ms: Some(next_offset * 100),
        closed_through_ms: Some(next_offset * 10),
        generation,
        settings: Some(tally_schemas::SumSettings {
            window_ms: 10,
            grace_ms: next_offset % 3,
        }),
        external_reset: next_offset % 2 == 1,
    }
}

/// Every permutation of `items` (Heap's algorithm; fine for ≤ 6 items).
fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
    fn heap<T: Clone>(k: usize, items: &mut Vec<T>, out: &mut Vec<Vec<T>>) {
        if k <= 1 {
            out.push(items.clone());
            return;
        }
        for i in 0..k {
            heap(k - 1, items, out);
            let j = if k.is_multiple_of(2) { i } else { 0 };
            items.swap(j, k - 1);
        }
    }
    let mut out = Vec::new();
    heap(items.len(), &mut items.to_vec(), &mut out);
    out
}

#[tokio::test]
async fn the_most_complete_row_wins_in_every_arrival_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let k = key(1);
    let provisional = row(k, 0, 3, 5, 10, false, 0);
    let more_complete = row(k, 0, 3, 8, 20, false, 0);
    let finished = row(k, 0, 3, 9, 25, true, 0);
    // Written after the final one in some orders: must never replace it.
    let stale = row(k, 0, 3, 6, 15, false, 0);
    // A replay generation wins even with a lower offset and not final.
    let replayed = row(k, 0, 3, 7, 3, false, 1);

    let without_replay = [provisional, more_complete, finished, stale];
    let with_replay = [provisional, more_complete, finished, stale, replayed];
    let orders = permutations(&without_replay);
    assert_eq!(orders.len(), 24);
    for (case, order) in orders.iter().enumerate() {
        // A window start per case keeps the cases apart in one file.
        let start = case as i64 * WINDOW;
        for written in order {
            store
                .write_rows(&[WindowRow {
                    window_start_ms: start,
                    window_end_ms: start + WINDOW,
                    ..*written
                }])
                .await
                .unwrap();
        }
        let rows = store
            .read_rows(k, start, start + WINDOW, 100)
            .await
            .unwrap();
        let expected = WindowRow {
            window_start_ms: start,
            window_end_ms: start + WINDOW,
            ..finished
        };
        assert_eq!(rows, vec![expected], "order {order:?}");
    }

    let orders = permutations(&with_replay);
    assert_eq!(orders.len(), 120);
    let key_with_replay = key(2);
    for (case, order) in orders.iter().enumerate() {
        let start = case as i64 * WINDOW;
        let rows: Vec<WindowRow> = order
            .iter()
            .map(|r| WindowRow {
                key: key_with_replay,
                window_start_ms: start,
                window_end_ms: start + WINDOW,
                ..*r
            })
            .collect();
        // Half the cases in one call (one transaction), half one call per row.
        if case.is_multiple_of(2) {
            store.write_rows(&rows).await.unwrap();
        } else {
            for r in &rows {
                store.write_rows(std::slice::from_ref(r)).await.unwrap();
            }
        }
        let read = store
            .read_rows(key_with_replay, start, start + WINDOW, 100)
            .await
            .unwrap();
        let expected = WindowRow {
            key: key_with_replay,
            window_start_ms: start,
            window_end_ms: start + WINDOW,
            ..replayed
        };
        assert_eq!(read, vec![expected], "order {order:?}");
    }
}

#[tokio::test]
async fn writing_the_same_rows_twice_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let rows = [
        row(key(1), 0, 0, 5, 10, true, 0),
        row(key(1), 0, 1, 6, 11, false, 0),
        row(key(2), WINDOW, 0, 7, 12, false, 2),
    ];
    store.write_rows(&rows).await.unwrap();
    let first = store.scan_rows(i64::MIN, i64::MAX, &[]).await.unwrap();
    store.write_rows(&rows).await.unwrap();
    store.write_rows(&rows[1..2]).await.unwrap();
    let second = store.scan_rows(i64::MIN, i64::MAX, &[]).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(first.len(), 3);
    // An equal version with different content (impossible from the engine) does not
    // replace either: only a strictly higher version does.
    store
        .write_rows(&[WindowRow {
            sum: 999,
            ..rows[0]
        }])
        .await
        .unwrap();
    assert_eq!(
        store.scan_rows(i64::MIN, i64::MAX, &[]).await.unwrap(),
        first
    );
    store.write_rows(&[]).await.unwrap();
}

#[tokio::test]
async fn read_rows_is_from_inclusive_to_exclusive_and_ordered() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (a, b) = (key(1), key(2));
    let mut rows = Vec::new();
    for start in [0, WINDOW, 2 * WINDOW, 3 * WINDOW] {
        for partition in [4, 1] {
            rows.push(row(a, start, partition, start / WINDOW + 1, 7, true, 0));
        }
        rows.push(row(b, start, 0, 100, 7, false, 0));
    }
    store.write_rows(&rows).await.unwrap();

    let read = store.read_rows(a, WINDOW, 3 * WINDOW, 100).await.unwrap();
    let seen: Vec<(i64, i32)> = read
        .iter()
        .map(|r| (r.window_start_ms, r.partition))
        .collect();
    assert_eq!(
        seen,
        vec![(WINDOW, 1), (WINDOW, 4), (2 * WINDOW, 1), (2 * WINDOW, 4)]
    );
    assert!(read
        .iter()
        .all(|r| r.key == a && r.sum == r.window_start_ms / WINDOW + 1));
    // A bound between window starts.
    let read = store
        .read_rows(a, WINDOW + 1, 3 * WINDOW + 1, 100)
        .await
        .unwrap();
    let starts: Vec<i64> = read.iter().map(|r| r.window_start_ms).collect();
    assert_eq!(starts, vec![2 * WINDOW, 2 * WINDOW, 3 * WINDOW, 3 * WINDOW]);
    assert!(store
        .read_rows(a, WINDOW, WINDOW, 100)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .read_rows(key(3), 0, 10 * WINDOW, 100)
        .await
        .unwrap()
        .is_empty());

    let scanned = store.scan_rows(WINDOW, 2 * WINDOW, &[]).await.unwrap();
    assert_eq!(scanned.len(), 3);
    // In primary-key order: (window_start, key, partition).
    let order: Vec<(i64, Uuid, i32)> = scanned
        .iter()
        .map(|r| (r.window_start_ms, r.key, r.partition))
        .collect();
    assert_eq!(order, vec![(WINDOW, a, 1), (WINDOW, a, 4), (WINDOW, b, 0)]);
    assert_eq!(store.scan_rows(0, 4 * WINDOW, &[]).await.unwrap().len(), 12);
    assert!(store
        .scan_rows(4 * WINDOW, 5 * WINDOW, &[])
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn rows_are_stored_with_the_documented_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/tally.db");
    let store = SqliteStore::open(&path).unwrap();
    let k = Uuid::parse_str("0A1B2C3D-0000-4000-8000-00000000ABCD").unwrap();
    let written = row(k, 1_790_000_020_000, 7, 42, 1234, true, 3);
    store.write_rows(&[written]).await.unwrap();
    let connection = rusqlite::Connection::open(&path).unwrap();
    let stored: (Vec<u8>, i64, i64, i64, i64, i64, i64, i64, i64, i64) = connection
        .query_row(
            r#"SELECT "key", window_start, "partition", window_end, sum, count, final, through_offset, version, generation FROM window_sums"#,
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?)),
        )
        .unwrap();
    assert_eq!(
        stored,
        (
            k.as_bytes().to_vec(),
            1_790_000_020_000,
            7,
            1_790_000_030_000,
            42,
            42,
            1,
            1234,
            written.version(),
            3
        )
    );
    // What the `sqlite3` shell shows through the view.
    let readable: (String, String, String) = connection
        .query_row(
            r#"SELECT "key", window_start, window_end FROM window_sums_readable"#,
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        readable,
        (
            "0a1b2c3d-0000-4000-8000-00000000abcd".to_owned(),
            "2026-09-21T14:13:40.000Z".to_owned(),
            "2026-09-21T14:13:50.000Z".to_owned()
        )
    );
    let journal: String = connection
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
    let without_rowid: bool = connection
        .query_row(
            "SELECT wr FROM pragma_table_list WHERE name = 'window_sums'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(without_rowid);
}

#[tokio::test]
async fn a_key_range_read_uses_the_key_index_not_a_time_scan() {
    // A per-key read must not scan every key's rows of the range: that is what keeps
    // reads cheap on a store with many keys.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.db");
    SqliteStore::open(&path).unwrap();
    let connection = rusqlite::Connection::open(&path).unwrap();
    let plan: Vec<String> = connection
        .prepare(&format!(
            "EXPLAIN QUERY PLAN {}",
            tally_sink::sqlite::READ_RANGE
        ))
        .unwrap()
        .query_map(rusqlite::params![0, vec![0u8; 16], 0, 10, 5], |r| r.get(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let plan = plan.join("; ");
    assert!(
        plan.contains("USING INDEX window_sums_by_minute_key") && plan.contains("key=?"),
        "{plan}"
    );
    assert!(!plan.contains("TEMP B-TREE"), "no sort needed: {plan}");
}

#[tokio::test]
async fn a_file_with_the_earlier_hour_index_gets_the_minute_index_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hour-index.db");
    let k = key(9);
    let rows: Vec<WindowRow> = (0..12)
        .map(|w| {
            row(
                k,
                3 * 3_600_000 - 6 * WINDOW + w * WINDOW,
                0,
                w + 1,
                1,
                true,
                0,
            )
        })
        .collect();
    {
        let store = SqliteStore::open(&path).unwrap();
        store.write_rows(&rows).await.unwrap();
    }
    // What an earlier build left: the per-key index bucketed by the hour.
    {
        let connection = rusqlite::Connection::open(&path).unwrap();
        connection
            .execute_batch(
                r#"DROP INDEX window_sums_by_minute_key;
                CREATE INDEX window_sums_by_key
                    ON window_sums (window_start / 3600000, "key", window_start, "partition");"#,
            )
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let indexes: Vec<String> = rusqlite::Connection::open(&path)
        .unwrap()
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'window_sums' AND sql IS NOT NULL ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(indexes, vec!["window_sums_by_minute_key".to_owned()]);
    let read = store
        .read_rows(
            k,
            3 * 3_600_000 - 6 * WINDOW,
            3 * 3_600_000 + 6 * WINDOW,
            100,
        )
        .await
        .unwrap();
    assert_eq!(read, rows);
}

#[tokio::test]
async fn read_rows_stops_at_the_limit_and_windows_are_read_whole_across_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let k = key(4);
    // 50 windows across an hour boundary (and the per-key index's minute buckets).
    let base = 3 * 3_600_000 - 20 * WINDOW;
    let mut rows = Vec::new();
    for window in 0..50 {
        for partition in 0..3 {
            rows.push(row(
                k,
                base + window * WINDOW,
                partition,
                window + 1,
                5,
                window < 40,
                0,
            ));
        }
    }
    // Another key in the same hours stays out.
    rows.push(row(key(5), base + 19 * WINDOW, 0, 1_000, 5, true, 0));
    store.write_rows(&rows).await.unwrap();
    let first = store
        .read_rows(k, base, base + 50 * WINDOW, 7)
        .await
        .unwrap();
    assert_eq!(first, rows[..7].to_vec());
    // A limit reached in the second hour bucket.
    let across = store
        .read_rows(k, base + 18 * WINDOW, base + 50 * WINDOW, 9)
        .await
        .unwrap();
    assert_eq!(across, rows[18 * 3..18 * 3 + 9].to_vec());
    let all = store
        .read_rows(k, base, base + 50 * WINDOW, 1_000)
        .await
        .unwrap();
    assert_eq!(all, rows[..150].to_vec());
    // Chunks of 7 rows cut windows of 3 partitions; every window still comes out whole.
    for chunk in [4, 5, 7, 150, 1_000] {
        let mut seen = Vec::new();
        tally_sink::store::visit_windows(
            &store,
            k,
            base + 5 * WINDOW,
            base + 45 * WINDOW,
            chunk,
            |_| true,
            |w| {
                seen.push(w);
                std::ops::ControlFlow::Continue(())
            },
        )
        .await
        .unwrap();
        assert_eq!(seen.len(), 40, "chunk {chunk}");
        for (i, window) in seen.iter().enumerate() {
            let n = i as i64 + 5;
            assert_eq!(window.window_start_ms, base + n * WINDOW);
            assert_eq!(
                (window.sum, window.count),
                (3 * (n + 1), 3 * (n + 1)),
                "chunk {chunk}"
            );
            assert_eq!(window.is_final, n < 40);
        }
    }
    // A window with more partition rows than a chunk is an error, not a loop.
    let err = tally_sink::store::visit_windows(
        &store,
        k,
        base,
        base + WINDOW,
        3,
        |_| true,
        |_| std::ops::ControlFlow::Continue(()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SinkError::BadRow(_)), "{err:?}");
    // `keep` drops rows before summing; `visit` can stop early.
    let mut seen = Vec::new();
    tally_sink::store::visit_windows(
        &store,
        k,
        base,
        base + 50 * WINDOW,
        100,
        |r| r.partition != 1,
        |w| {
            seen.push(w);
            if seen.len() == 2 {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].count, 2 * 2);
}

#[tokio::test]
async fn checkpoints_load_exactly_or_latest_and_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.load_checkpoint(&scope(0), None).await.unwrap(), None);
    for offset in (0..20).map(|i| i * 10) {
        store
            .save_checkpoint(&scope(0), &checkpoint(offset, 1))
            .await
            .unwrap();
    }
    store
        .save_checkpoint(&scope(1), &checkpoint(5, 0))
        .await
        .unwrap();
    let other_group = CheckpointScope {
        group: "other".into(),
        ..scope(0)
    };
    store
        .save_checkpoint(&other_group, &checkpoint(1_000, 9))
        .await
        .unwrap();

    assert_eq!(
        store.load_checkpoint(&scope(0), Some(190)).await.unwrap(),
        Some(checkpoint(190, 1))
    );
    assert_eq!(
        store.load_checkpoint(&scope(0), Some(120)).await.unwrap(),
        Some(checkpoint(120, 1))
    );
    assert_eq!(
        store.load_checkpoint(&scope(0), Some(110)).await.unwrap(),
        None,
        "pruned"
    );
    assert_eq!(
        store.load_checkpoint(&scope(0), Some(195)).await.unwrap(),
        None,
        "never saved"
    );
    assert_eq!(
        store.load_checkpoint(&scope(0), None).await.unwrap(),
        Some(checkpoint(190, 1))
    );
    assert_eq!(
        store.load_checkpoint(&scope(1), None).await.unwrap(),
        Some(checkpoint(5, 0))
    );
    assert_eq!(
        store.load_checkpoint(&other_group, None).await.unwrap(),
        Some(checkpoint(1_000, 9))
    );

    let path = dir.path().join("nested/dir/tally.db");
    let count = |partition: i32| -> i64 {
        rusqlite::Connection::open(&path)
            .unwrap()
            .query_row(
                r#"SELECT count(*) FROM checkpoints WHERE consumer_group = 'tally' AND "partition" = ?1"#,
                [partition],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(count(0), CHECKPOINTS_KEPT as i64);

    // Saving the same offset and generation again replaces it (no duplicate row).
    let replaced = Checkpoint {
        max_ts_ms: None,
        closed_through_ms: None,
        ..checkpoint(190, 1)
    };
    store.save_checkpoint(&scope(0), &replaced).await.unwrap();
    assert_eq!(
        store.load_checkpoint(&scope(0), Some(190)).await.unwrap(),
        Some(replaced)
    );
    assert_eq!(count(0), CHECKPOINTS_KEPT as i64);

    // An offset reset back to 50 (a new generation): the checkpoints above it stay (a
    // revoked owner's late save must not erase them), and the latest is the reset's:
    // the highest generation comes first.
    store
        .save_checkpoint(&scope(0), &checkpoint(50, 3))
        .await
        .unwrap();
    assert_eq!(
        store.load_checkpoint(&scope(0), Some(50)).await.unwrap(),
        Some(checkpoint(50, 3))
    );
    assert_eq!(
        store.load_checkpoint(&scope(0), Some(190)).await.unwrap(),
        Some(replaced)
    );
    assert_eq!(
        store.load_checkpoint(&scope(0), None).await.unwrap(),
        Some(checkpoint(50, 3))
    );
    // Saves below the old ones keep their own recent history.
    for offset in [60, 70, 80, 90, 100, 105, 110, 115] {
        store
            .save_checkpoint(&scope(0), &checkpoint(offset, 3))
            .await
            .unwrap();
    }
    assert_eq!(
        store.load_checkpoint(&scope(0), Some(105)).await.unwrap(),
        Some(checkpoint(105, 3))
    );
    assert_eq!(
        store.load_checkpoint(&scope(0), Some(50)).await.unwrap(),
        None,
        "pruned below 115"
    );
}

#[tokio::test]
async fn reopening_the_file_keeps_rows_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        row(key(9), 0, 2, 11, 40, true, 0),
        row(key(9), WINDOW, 2, 3, 41, false, 0),
    ];
    {
        let store = open(dir.path());
        store.write_rows(&rows).await.unwrap();
        store
            .save_checkpoint(&scope(2), &checkpoint(41, 0))
            .await
            .unwrap();
    }
    let store = open(dir.path());
    assert_eq!(
        store.read_rows(key(9), 0, 2 * WINDOW, 100).await.unwrap(),
        rows.to_vec()
    );
    assert_eq!(
        store.load_checkpoint(&scope(2), Some(41)).await.unwrap(),
        Some(checkpoint(41, 0))
    );
    store.probe().await.unwrap();
    assert!(store.describe().starts_with("sqlite://"));
    assert!(store.describe().ends_with("tally.db"));
}

#[tokio::test]
async fn a_table_with_other_columns_is_a_schema_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreign.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE window_sums (key TEXT, window_start INTEGER, total INTEGER, PRIMARY KEY (key, window_start));",
        )
        .unwrap();
    match SqliteStore::open(&path) {
        Err(SinkError::Schema(message)) => assert!(message.contains("window_sums"), "{message}"),
        other => panic!("expected a schema error, got {other:?}"),
    }

    // Same names, one type changed.
    let path = dir.path().join("retyped.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            r#"CREATE TABLE window_sums ("key" TEXT, window_start INTEGER, "partition" INTEGER, window_end INTEGER,
               sum REAL, count INTEGER, final INTEGER, through_offset INTEGER, version INTEGER, generation INTEGER,
               PRIMARY KEY ("key", window_start, "partition"));"#,
        )
        .unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(err, SinkError::Schema(_)), "{err:?}");
    assert!(!err.is_retryable());

    // Exactly the layout of the previous build: named as such, with what to do.
    let path = dir.path().join("earlier.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            r#"CREATE TABLE window_sums ("key" TEXT NOT NULL, window_start INTEGER NOT NULL,
               "partition" INTEGER NOT NULL, window_end INTEGER NOT NULL, sum INTEGER NOT NULL,
               count INTEGER NOT NULL, final INTEGER NOT NULL, through_offset INTEGER NOT NULL,
               version INTEGER NOT NULL, generation INTEGER NOT NULL,
               PRIMARY KEY ("key", window_start, "partition"));
               CREATE INDEX window_sums_by_start ON window_sums (window_start);"#,
        )
        .unwrap();
    match SqliteStore::open(&path) {
        Err(SinkError::Schema(message)) => {
            assert!(message.contains("earlier Tally build"), "{message}");
            assert!(message.contains("no migration"), "{message}");
            assert!(message.contains("--group"), "{message}");
        }
        other => panic!("expected a schema error, got {other:?}"),
    }

    // Same columns, but a rowid table.
    let path = dir.path().join("rowid.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            r#"CREATE TABLE window_sums (window_start INTEGER NOT NULL, "key" BLOB NOT NULL,
               "partition" INTEGER NOT NULL, window_end INTEGER NOT NULL, sum INTEGER NOT NULL,
               count INTEGER NOT NULL, final INTEGER NOT NULL, through_offset INTEGER NOT NULL,
               version INTEGER NOT NULL, generation INTEGER NOT NULL,
               PRIMARY KEY (window_start, "key", "partition"));"#,
        )
        .unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(err.to_string().contains("WITHOUT ROWID"), "{err}");
}

#[tokio::test]
async fn two_connections_to_one_file_can_write_concurrently() {
    // Like two aggregator processes sharing the dev playground's file.
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    let second = open(dir.path());
    let write = |store: SqliteStore, partition: i32| async move {
        for i in 0..30 {
            store
                .write_rows(&[row(key(7), i * WINDOW, partition, i, i, false, 0)])
                .await
                .unwrap();
        }
    };
    tokio::join!(write(first.clone(), 0), write(second, 1));
    assert_eq!(
        first
            .scan_rows(i64::MIN, i64::MAX, &[])
            .await
            .unwrap()
            .len(),
        60
    );
}

fn versioned_write() -> impl Strategy<Value = (u128, i64, u16, i64, bool, i64)> {
    // (key, window index, generation, through_offset, final, sum)
    (
        0u128..3,
        0i64..2,
        0u16..3,
        0i64..50,
        any::<bool>(),
        1i64..1_000,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any set of versioned writes, in any order and any grouping into calls, ends
    /// with each row at its highest version.
    #[test]
    fn any_order_ends_at_the_highest_version(
        writes in prop::collection::vec(versioned_write(), 1..24),
        shuffle_seed in any::<u64>(),
        chunk in 1usize..6,
    ) {
        let rows: Vec<WindowRow> = writes
            .iter()
            .map(|&(k, w, generation, through, is_final, sum)| row(key(k), w * WINDOW, 0, sum, through, is_final, generation))
            .collect();
        // Deterministic shuffle from the seed (proptest shrinks the seed too).
        let mut order = rows.clone();
        let mut state = shuffle_seed | 1;
        for i in (1..order.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            order.swap(i, (state % (i as u64 + 1)) as usize);
        }

        let mut expected: std::collections::BTreeMap<(i64, Uuid), WindowRow> = Default::default();
        for r in &rows {
            let slot = expected.entry((r.window_start_ms, r.key)).or_insert(*r);
            // Equal versions keep the first written, as the store does.
            if r.version() > slot.version() {
                *slot = *r;
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let stored = runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(&dir.path().join("p.db")).unwrap();
            for calls in order.chunks(chunk) {
                store.write_rows(calls).await.unwrap();
            }
            store.scan_rows(i64::MIN, i64::MAX, &[]).await.unwrap()
        });
        let stored_versions: Vec<i64> = stored.iter().map(WindowRow::version).collect();
        let expected_versions: Vec<i64> = expected.values().map(WindowRow::version).collect();
        prop_assert_eq!(stored_versions, expected_versions);
    }
}

#[tokio::test]
async fn metadata_is_compare_and_set_and_pins_settings_once() {
    use tally_schemas::SumSettings;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.load_metadata("m").await.unwrap(), None);
    assert!(store
        .compare_and_set_metadata("m", None, "a")
        .await
        .unwrap());
    // A second "first" writer loses and writes nothing.
    assert!(!store
        .compare_and_set_metadata("m", None, "b")
        .await
        .unwrap());
    assert!(!store
        .compare_and_set_metadata("m", Some("x"), "b")
        .await
        .unwrap());
    assert_eq!(
        store.load_metadata("m").await.unwrap().as_deref(),
        Some("a")
    );
    assert!(store
        .compare_and_set_metadata("m", Some("a"), "b")
        .await
        .unwrap());
    assert_eq!(
        store.load_metadata("m").await.unwrap().as_deref(),
        Some("b")
    );

    let ten_s = SumSettings {
        window_ms: 10_000,
        grace_ms: 2_000,
    };
    let pinned = tally_sink::pin_settings(&store, ten_s).await.unwrap();
    assert_eq!(pinned.current().settings(), ten_s);
    // Reopened with the same values: fine; with others: refused, naming both.
    let reopened = open(dir.path());
    tally_sink::pin_settings(&reopened, ten_s).await.unwrap();
    let other = SumSettings {
        window_ms: 60_000,
        grace_ms: 2_000,
    };
    let err = tally_sink::pin_settings(&reopened, other)
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(
        text.contains("window 10000 ms") && text.contains("window 60000 ms"),
        "{text}"
    );
    assert_eq!(
        tally_sink::load_settings(&reopened).await.unwrap(),
        Some(pinned)
    );
}

const DAY: i64 = 86_400_000;

#[tokio::test]
async fn retention_prunes_expired_final_rows_and_old_checkpoints_in_bounded_batches() {
    use tally_sink::store::{load_retention, now_ms, Retention, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("retained.db");
    let writer_options = |retention| StoreOptions {
        retention: Retention::Enforce(retention),
        ..StoreOptions::default()
    };
    let store = SqliteStore::open_with(&path, &writer_options(Some(DAY)))
        .await
        .unwrap();
    assert_eq!(store.retention_ms(), Some(DAY));
    assert_eq!(load_retention(&store).await.unwrap(), Some(DAY));

    let now = now_ms();
    let start = |ago: i64| (now - ago).div_euclid(WINDOW) * WINDOW;
    let old_final = row(key(1), start(3 * DAY), 0, 5, 10, true, 0);
    // Its window ended more than a day ago too, but it is not final: kept.
    let old_provisional = row(key(2), start(3 * DAY), 0, 6, 11, false, 0);
    // Ended less than a day ago: kept.
    let recent_final = row(key(1), start(DAY - 60_000), 0, 7, 12, true, 0);
    store
        .write_rows(&[old_final, old_provisional, recent_final])
        .await
        .unwrap();
    store
        .save_checkpoint(&scope(0), &checkpoint(10, 0))
        .await
        .unwrap();
    store
        .save_checkpoint(&scope(1), &checkpoint(20, 0))
        .await
        .unwrap();
    let connection = rusqlite::Connection::open(&path).unwrap();
    connection
        .execute(
            r#"UPDATE checkpoints SET saved_at = ?1 WHERE "partition" = 0"#,
            [now - 2 * DAY],
        )
        .unwrap();

    // A reader never prunes, whatever the store records.
    let reader = SqliteStore::open(&path).unwrap();
    assert_eq!(reader.prune_expired().await.unwrap(), 0);
    assert_eq!(load_retention(&reader).await.unwrap(), Some(DAY));

    // The flush above may already have pruned in the background; either way, after
    // one explicit batch exactly the expired final row and the old checkpoint are gone.
    store.prune_expired().await.unwrap();
    let left = store.scan_rows(i64::MIN, i64::MAX, &[]).await.unwrap();
    assert_eq!(left, vec![old_provisional, recent_final]);
    assert_eq!(store.load_checkpoint(&scope(0), None).await.unwrap(), None);
    assert_eq!(
        store.load_checkpoint(&scope(1), None).await.unwrap(),
        Some(checkpoint(20, 0))
    );

    // A backlog is deleted a bounded batch per transaction.
    let backlog: Vec<WindowRow> = (0..tally_sink::sqlite::PRUNE_BATCH + 5)
        .map(|i| row(key(i as u128 + 10), start(2 * DAY), 0, 1, 1, true, 0))
        .collect();
    let connection_count = |c: &rusqlite::Connection| -> i64 {
        c.query_row("SELECT count(*) FROM window_sums", [], |r| r.get(0))
            .unwrap()
    };
    // Written through a reader-options store so no background prune races the count.
    reader.write_rows(&backlog).await.unwrap();
    assert_eq!(connection_count(&connection), backlog.len() as i64 + 2);
    assert_eq!(
        store.prune_expired().await.unwrap(),
        tally_sink::sqlite::PRUNE_BATCH as usize
    );
    assert_eq!(connection_count(&connection), 5 + 2);

    // And the writer prunes on its own after its flushes, without being asked.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        store
            .write_rows(&[row(key(3), start(0), 0, 1, 1, false, 0)])
            .await
            .unwrap();
        if connection_count(&connection) == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the writer did not prune the backlog after its flushes"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // A writer started without retention records that rows are kept.
    let keeper = SqliteStore::open_with(&path, &writer_options(None))
        .await
        .unwrap();
    assert_eq!(load_retention(&keeper).await.unwrap(), None);
    assert_eq!(keeper.prune_expired().await.unwrap(), 0);
    let err = SqliteStore::open_with(&path, &writer_options(Some(0)))
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Config(_)), "{err:?}");
}

#[tokio::test]
async fn the_bucket_is_a_scylladb_setting_that_sqlite_ignores() {
    use tally_sink::store::StoreOptions;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bucket.db");
    for bucket_ms in [DAY, 3_600_000] {
        let options = StoreOptions {
            bucket_ms,
            ..StoreOptions::default()
        };
        let store = SqliteStore::open_with(&path, &options).await.unwrap();
        assert_eq!(
            store
                .load_metadata(tally_sink::store::BUCKET_METADATA_NAME)
                .await
                .unwrap(),
            None
        );
    }
}

#[tokio::test]
async fn checkpoint_rows_of_different_generations_never_replace_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let newer = checkpoint(40, 5);
    store.save_checkpoint(&scope(0), &newer).await.unwrap();
    // A late save of an older run at the same offset (a zombie, or a run a replay
    // abandoned) is kept apart and never answers.
    let older = Checkpoint {
        max_ts_ms: Some(1),
        ..checkpoint(40, 2)
    };
    store.save_checkpoint(&scope(0), &older).await.unwrap();
    assert_eq!(
        store.load_checkpoint(&scope(0), Some(40)).await.unwrap(),
        Some(newer)
    );
    // The latest is the highest generation first, then the highest offset: a reset
    // backwards (higher generation, lower offset) is the latest run.
    store
        .save_checkpoint(&scope(0), &checkpoint(90, 4))
        .await
        .unwrap();
    assert_eq!(
        store.load_checkpoint(&scope(0), None).await.unwrap(),
        Some(newer)
    );
}

/// A write larger than one multi-row upsert statement (64 rows) goes through the
/// chunked statement and the single-row remainder: every row lands, and the version
/// guard holds per row inside a chunk (stale rows next to newer ones in the same
/// statement change nothing, newer ones replace).
#[tokio::test]
async fn large_writes_upsert_every_row_with_the_version_guard() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let count = 64 * 3 + 9;
    let first: Vec<WindowRow> = (0..count)
        .map(|i| {
            row(
                key(i as u128),
                (i as i64 % 3) * WINDOW,
                (i % 4) as i32,
                10,
                100,
                false,
                0,
            )
        })
        .collect();
    store.write_rows(&first).await.unwrap();
    // Even rows: more complete (a higher offset, final); odd rows: stale (a lower offset).
    let second: Vec<WindowRow> = first
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if i % 2 == 0 {
                WindowRow {
                    sum: 20,
                    count: 20,
                    through_offset: 200,
                    is_final: true,
                    ..*r
                }
            } else {
                WindowRow {
                    sum: 5,
                    count: 5,
                    through_offset: 50,
                    ..*r
                }
            }
        })
        .collect();
    store.write_rows(&second).await.unwrap();
    let mut stored = store.scan_rows(0, 3 * WINDOW, &[]).await.unwrap();
    stored.sort_by_key(|r| r.key);
    let mut expected: Vec<WindowRow> = first
        .iter()
        .zip(&second)
        .enumerate()
        .map(|(i, (old, new))| if i % 2 == 0 { *new } else { *old })
        .collect();
    expected.sort_by_key(|r| r.key);
    assert_eq!(stored.len(), count);
    assert_eq!(stored, expected);
}
