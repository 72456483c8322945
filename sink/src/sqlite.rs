//! The embedded backend: one SQLite file, WAL, version-guarded upserts.
//!
//! rusqlite is synchronous, so every operation runs on tokio's blocking pool. Writes
//! take the one writer connection behind a mutex (a single writer is all SQLite
//! allows anyway); reads use a small pool of their own connections, so a long flush
//! never holds up the read API, and WAL lets other processes (`tally verify`, a
//! second aggregator in the dev playground) read meanwhile.
//!
//! Layout (see [`CREATE_SCHEMA`]): `window_sums` is a `WITHOUT ROWID` table keyed
//! `(window_start, key, partition)` with the key as its 16 UUID bytes, plus the index
//! `window_sums_by_minute_key (window_start / 60000, key, window_start, partition)`:
//! per minute, each key's windows in order, so a key's range read is one index range
//! per minute touched (the same shape as ScyllaDB's one query per bucket). Both keep
//! the write cost flat however large the table grows, because what a flush writes is
//! the current windows: their rows sit at the right edge of the table's B-tree, and
//! their index entries in the current minute's part of the index, so a flush touches
//! the same pages whether the file holds a thousand rows from earlier minutes or ten
//! million. (Earlier builds bucketed the index by the hour, whose part grows through
//! the hour; opening such a file drops that index and builds this one, once. A
//! key-first table, or a key-first index without the hour, puts each key's new row on
//! its own page of that key's history: one page per active key per flush, more and
//! more of them out of cache as the file grows; measured in BENCHMARKS.md.) The index
//! gets one entry per new row and none on the provisional updates that follow. The
//! view `window_sums_readable` shows the rows with text keys and times for the
//! `sqlite3` shell.
//!
//! Retention (`--retention` on the aggregator): after a flush commits, the writer
//! deletes, in its own bounded transaction that the flush never waits for, final
//! rows whose window ended more than the retention ago, and checkpoints saved more
//! than the retention ago.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use tally_schemas::Checkpoint;
use uuid::Uuid;

use crate::error::SinkError;
use crate::row::WindowRow;
use crate::store::{
    checkpoints_to_prune, now_ms, record_retention, CheckpointScope, Retention, StoreOptions,
    WindowStore,
};

/// How long a statement waits for another process's write lock before failing
/// with a retryable error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Read connections per store.
const READERS: usize = 4;

/// Rows one pruning transaction deletes at most (a few ms of work).
pub const PRUNE_BATCH: i64 = 10_000;

/// How often the writer looks for expired rows when the last look found few.
const PRUNE_INTERVAL_MS: i64 = 5_000;

/// `window_sums` exactly as this build expects it: (name, declared type, position in
/// the primary key, 0 = not in it). Checked at open so a file written by another
/// build fails loudly instead of being misread.
const WINDOW_SUMS_COLUMNS: [(&str, &str, i64); 10] = [
    ("window_start", "INTEGER", 1),
    ("key", "BLOB", 2),
    ("partition", "INTEGER", 3),
    ("window_end", "INTEGER", 0),
    ("sum", "INTEGER", 0),
    ("count", "INTEGER", 0),
    ("final", "INTEGER", 0),
    ("through_offset", "INTEGER", 0),
    ("version", "INTEGER", 0),
    ("generation", "INTEGER", 0),
];

const CHECKPOINTS_COLUMNS: [(&str, &str, i64); 11] = [
    ("consumer_group", "TEXT", 1),
    ("topic", "TEXT", 2),
    ("partition", "INTEGER", 3),
    ("next_offset", "INTEGER", 4),
    ("max_ts", "INTEGER", 0),
    ("closed_through", "INTEGER", 0),
    ("generation", "INTEGER", 5),
    ("window_ms", "INTEGER", 0),
    ("grace_ms", "INTEGER", 0),
    ("saved_at", "INTEGER", 0),
    ("external_reset", "INTEGER", 0),
];

const METADATA_COLUMNS: [(&str, &str, i64); 2] = [("name", "TEXT", 1), ("value", "TEXT", 0)];

/// The schema, created if missing. `key` and `partition` are SQLite keywords (usable
/// as names, but quoted to be safe). Times are ms since the epoch; `key` is the
/// UUID's 16 bytes (byte order is the text order, so rows sort as their keys do).
pub const CREATE_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS window_sums (
    window_start   INTEGER NOT NULL,
    "key"          BLOB    NOT NULL,
    "partition"    INTEGER NOT NULL,
    window_end     INTEGER NOT NULL,
    sum            INTEGER NOT NULL,
    count          INTEGER NOT NULL,
    final          INTEGER NOT NULL,
    through_offset INTEGER NOT NULL,
    version        INTEGER NOT NULL,
    generation     INTEGER NOT NULL,
    PRIMARY KEY (window_start, "key", "partition")
) WITHOUT ROWID;
DROP INDEX IF EXISTS window_sums_by_key;
CREATE INDEX IF NOT EXISTS window_sums_by_minute_key
    ON window_sums (window_start / 60000, "key", window_start, "partition");
CREATE VIEW IF NOT EXISTS window_sums_readable AS
SELECT lower(substr(hex("key"), 1, 8) || '-' || substr(hex("key"), 9, 4) || '-' ||
             substr(hex("key"), 13, 4) || '-' || substr(hex("key"), 17, 4) || '-' ||
             substr(hex("key"), 21, 12)) AS "key",
       strftime('%Y-%m-%dT%H:%M:%fZ', window_start / 1000.0, 'unixepoch') AS window_start,
       strftime('%Y-%m-%dT%H:%M:%fZ', window_end / 1000.0, 'unixepoch') AS window_end,
       "partition", sum, count, final, through_offset, generation
FROM window_sums;
CREATE TABLE IF NOT EXISTS checkpoints (
    consumer_group TEXT    NOT NULL,
    topic          TEXT    NOT NULL,
    "partition"    INTEGER NOT NULL,
    next_offset    INTEGER NOT NULL,
    max_ts         INTEGER,
    closed_through INTEGER,
    generation     INTEGER NOT NULL,
    window_ms      INTEGER,
    grace_ms       INTEGER,
    saved_at       INTEGER NOT NULL,
    external_reset INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer_group, topic, "partition", next_offset, generation)
);
CREATE TABLE IF NOT EXISTS tally_metadata (
    name  TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);
"#;

/// The version guard: the row is replaced only by a strictly more complete one, so
/// replays, duplicates and late (zombie) writes can never regress it.
const UPSERT_ROW: &str = r#"
INSERT INTO window_sums
    (window_start, "key", "partition", window_end, sum, count, final, through_offset, version, generation)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
ON CONFLICT (window_start, "key", "partition") DO UPDATE SET
    window_end = excluded.window_end,
    sum = excluded.sum,
    count = excluded.count,
    final = excluded.final,
    through_offset = excluded.through_offset,
    version = excluded.version,
    generation = excluded.generation
WHERE excluded.version > window_sums.version
"#;

/// Rows per multi-row upsert: one statement for this many rows (10 parameters each,
/// far below SQLite's limit) saves the per-statement work (reset, cursor opening,
/// VDBE entry) that dominated the writer's CPU per row. Rows are still upserted one
/// after another, in the order given, each with the version guard.
const UPSERT_CHUNK: usize = 64;

/// [`UPSERT_ROW`] for [`UPSERT_CHUNK`] rows.
static UPSERT_CHUNK_ROWS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let values: Vec<String> = (0..UPSERT_CHUNK)
        .map(|row| {
            let first = row * 10;
            let marks: Vec<String> = (1..=10).map(|i| format!("?{}", first + i)).collect();
            format!("({})", marks.join(", "))
        })
        .collect();
    UPSERT_ROW.replace(
        "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        &format!("VALUES {}", values.join(",\n    ")),
    )
});

/// Binds `row` as the `slot`-th row of an upsert (parameters `slot * 10 + 1..=10`).
fn bind_row(
    statement: &mut rusqlite::CachedStatement<'_>,
    slot: usize,
    row: &WindowRow,
) -> rusqlite::Result<()> {
    let first = slot * 10;
    statement.raw_bind_parameter(first + 1, row.window_start_ms)?;
    statement.raw_bind_parameter(first + 2, &row.key.as_bytes()[..])?;
    statement.raw_bind_parameter(first + 3, row.partition)?;
    statement.raw_bind_parameter(first + 4, row.window_end_ms)?;
    statement.raw_bind_parameter(first + 5, row.sum)?;
    statement.raw_bind_parameter(first + 6, row.count)?;
    statement.raw_bind_parameter(first + 7, row.is_final)?;
    statement.raw_bind_parameter(first + 8, row.through_offset)?;
    statement.raw_bind_parameter(first + 9, row.version())?;
    statement.raw_bind_parameter(first + 10, row.generation)
}

const ROW_COLUMNS: &str = r#""key", window_start, "partition", window_end, sum, count, final, through_offset, generation"#;

/// The width of the per-key index's buckets: a minute (in the index expression).
/// A flush inserts one index entry per new window of every key it writes, next to
/// that key's earlier entries of the same bucket: the pages it touches grow with the
/// bucket's entries (keys × windows per bucket). An hour's bucket of 100,000 keys
/// made a flush into a 10 M-row store 9× slower than a minute's (BENCHMARKS.md,
/// "Large store"); a range read probes one bucket per minute instead.
pub const INDEX_BUCKET_MS: i64 = 60_000;

/// One key's rows of a range within one minute bucket, through
/// `window_sums_by_minute_key`.
pub const READ_RANGE: &str = r#"SELECT "key", window_start, "partition", window_end, sum, count, final, through_offset, generation
    FROM window_sums
    WHERE window_start / 60000 = ?1 AND "key" = ?2 AND window_start >= ?3 AND window_start < ?4
    ORDER BY window_start, "partition" LIMIT ?5"#;

/// Expired final rows, oldest first, a bounded batch at a time (a range of the
/// primary key from its left edge).
const PRUNE_ROWS: &str = r#"DELETE FROM window_sums WHERE (window_start, "key", "partition") IN (
    SELECT window_start, "key", "partition" FROM window_sums
    WHERE window_start < ?1 AND window_end <= ?1 AND final = 1
    ORDER BY window_start LIMIT ?2)"#;

/// When the writer last pruned, and whether a prune is running.
#[derive(Debug, Default)]
struct PruneState {
    running: AtomicBool,
    last_ms: AtomicI64,
    /// The last batch was full: more expired rows are waiting.
    backlog: AtomicBool,
}

/// The embedded window store: a SQLite file addressed as `sqlite://PATH`.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    readers: Arc<[Mutex<Connection>]>,
    next_reader: Arc<AtomicUsize>,
    path: PathBuf,
    /// The retention this process enforces (ms), if it is a writer with one.
    retention_ms: Option<i64>,
    pruning: Arc<PruneState>,
}

impl SqliteStore {
    /// Opens the database at `path`, creating parent directories, the file and the
    /// tables if missing. Fails with [`SinkError::Schema`] if the tables exist with
    /// other columns than this build writes (naming an earlier build's layout).
    /// Opened this way the store enforces no retention (a reader).
    pub fn open(path: &Path) -> Result<Self, SinkError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|err| {
                SinkError::Unavailable(format!("cannot create {}: {err}", parent.display()))
            })?;
        }
        let connection = open_connection(path)?;
        let journal_mode: String = connection
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(sqlite_error)?;
        if !journal_mode.eq_ignore_ascii_case("wal") {
            return Err(SinkError::Config(format!(
                "{}: SQLite refused WAL journal mode (got {journal_mode}); is it on a network filesystem?",
                path.display()
            )));
        }
        // FULL, not NORMAL: in WAL mode NORMAL may lose the last transactions on power
        // loss, but the aggregator commits Kafka offsets right after a write returns,
        // so a write must survive an OS crash. One fsync per `write_rows` call (one
        // transaction per flush) is cheap.
        connection
            .pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite_error)?;
        // Checked before creating anything, so a file of an earlier layout is named as
        // such instead of failing on a missing column.
        check_earlier_layout(&connection, path)?;
        connection
            .execute_batch(CREATE_SCHEMA)
            .map_err(sqlite_error)?;
        check_columns(&connection, "window_sums", &WINDOW_SUMS_COLUMNS)?;
        check_without_rowid(&connection, "window_sums")?;
        check_columns(&connection, "checkpoints", &CHECKPOINTS_COLUMNS)?;
        check_columns(&connection, "tally_metadata", &METADATA_COLUMNS)?;
        let readers = (0..READERS)
            .map(|_| {
                let reader = open_connection(path)?;
                reader
                    .pragma_update(None, "query_only", true)
                    .map_err(sqlite_error)?;
                // Plans that do not depend on bound values. Without this, SQLite (3.54)
                // marks a statement whose LIMIT or `x = ?` it planned with the bound
                // value as stale whenever that value changes or the bindings are
                // cleared (as rusqlite's statement cache does after every use), and
                // re-plans it: every range read was parsed and planned again.
                reader
                    .set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
                    .map_err(sqlite_error)?;
                Ok(Mutex::new(reader))
            })
            .collect::<Result<Vec<_>, SinkError>>()?;
        Ok(SqliteStore {
            writer: Arc::new(Mutex::new(connection)),
            readers: readers.into(),
            next_reader: Arc::new(AtomicUsize::new(0)),
            path: path.to_path_buf(),
            retention_ms: None,
            pruning: Arc::new(PruneState::default()),
        })
    }

    /// [`open`](Self::open), then, for a writer with a retention, records it in the
    /// store and prunes by it after each flush.
    pub async fn open_with(path: &Path, options: &StoreOptions) -> Result<Self, SinkError> {
        let path = path.to_path_buf();
        let mut store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
            .await
            .map_err(|_| SinkError::Unavailable("SQLite open task cancelled".into()))??;
        if let Retention::Enforce(retention_ms) = options.retention {
            record_retention(&store, retention_ms).await?;
            store.retention_ms = retention_ms;
        }
        Ok(store)
    }

    /// The retention this store prunes by, if any.
    pub fn retention_ms(&self) -> Option<i64> {
        self.retention_ms
    }

    /// Deletes one bounded batch of expired rows and the expired checkpoints now, and
    /// returns how many rows went. Nothing without a retention. (The writer does this
    /// on its own after flushes; this is for tests and tools.)
    pub async fn prune_expired(&self) -> Result<usize, SinkError> {
        let Some(retention_ms) = self.retention_ms else {
            return Ok(0);
        };
        self.with_writer(move |connection| prune_batch(connection, now_ms(), retention_ms))
            .await
    }

    /// Starts a prune in the background after a flush when one is due, at most one at
    /// a time. The flush that triggered it has already committed: it never waits.
    fn prune_if_due(&self) {
        let Some(retention_ms) = self.retention_ms else {
            return;
        };
        let state = &self.pruning;
        let now = now_ms();
        let due = state.backlog.load(Ordering::Relaxed)
            || now.saturating_sub(state.last_ms.load(Ordering::Relaxed)) >= PRUNE_INTERVAL_MS;
        if !due || state.running.swap(true, Ordering::AcqRel) {
            return;
        }
        state.last_ms.store(now, Ordering::Relaxed);
        let writer = Arc::clone(&self.writer);
        let state = Arc::clone(&self.pruning);
        // Detached on purpose: dropping the handle does not cancel it.
        let pruning = tokio::task::spawn_blocking(move || {
            let result = {
                let mut connection = writer.lock().unwrap_or_else(PoisonError::into_inner);
                prune_batch(&mut connection, now_ms(), retention_ms)
            };
            match result {
                Ok(deleted) => {
                    state
                        .backlog
                        .store(deleted >= PRUNE_BATCH as usize, Ordering::Relaxed);
                    if deleted > 0 {
                        tracing::debug!(deleted, "pruned rows past retention");
                    }
                }
                Err(err) => tracing::warn!(%err, "pruning rows past retention failed; will retry"),
            }
            state.running.store(false, Ordering::Release);
        });
        drop(pruning);
    }

    /// Runs `work` with the writer connection on the blocking pool.
    async fn with_writer<T, F>(&self, work: F) -> Result<T, SinkError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, SinkError> + Send + 'static,
    {
        run_blocking(Arc::clone(&self.writer), work).await
    }

    /// Runs `work` with one of the read connections on the blocking pool.
    async fn with_reader<T, F>(&self, work: F) -> Result<T, SinkError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, SinkError> + Send + 'static,
    {
        let readers = Arc::clone(&self.readers);
        let index = self.next_reader.fetch_add(1, Ordering::Relaxed) % readers.len().max(1);
        spawn_blocking_result(move || {
            let mut connection = readers[index]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            work(&mut connection)
        })
        .await
    }
}

fn open_connection(path: &Path) -> Result<Connection, SinkError> {
    let connection = Connection::open(path).map_err(sqlite_error)?;
    connection
        .busy_timeout(BUSY_TIMEOUT)
        .map_err(sqlite_error)?;
    Ok(connection)
}

async fn run_blocking<T, F>(connection: Arc<Mutex<Connection>>, work: F) -> Result<T, SinkError>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> Result<T, SinkError> + Send + 'static,
{
    spawn_blocking_result(move || {
        // A panic while holding the lock leaves no half-done transaction behind
        // (dropping a rusqlite transaction rolls it back), so the connection is
        // still sound: recover it instead of failing forever.
        let mut connection = connection.lock().unwrap_or_else(PoisonError::into_inner);
        work(&mut connection)
    })
    .await
}

async fn spawn_blocking_result<T, F>(work: F) -> Result<T, SinkError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, SinkError> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join_error) if join_error.is_panic() => {
            std::panic::resume_unwind(join_error.into_panic())
        }
        Err(_) => Err(SinkError::Unavailable(
            "SQLite task cancelled (runtime shutting down)".into(),
        )),
    }
}

/// One pruning transaction: at most [`PRUNE_BATCH`] expired final rows, then the
/// checkpoints saved more than the retention ago. Returns the rows deleted.
fn prune_batch(
    connection: &mut Connection,
    now_ms: i64,
    retention_ms: i64,
) -> Result<usize, SinkError> {
    let horizon = now_ms.saturating_sub(retention_ms);
    let transaction = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sqlite_error)?;
    let deleted = transaction
        .prepare_cached(PRUNE_ROWS)
        .map_err(sqlite_error)?
        .execute(params![horizon, PRUNE_BATCH])
        .map_err(sqlite_error)?;
    transaction
        .prepare_cached("DELETE FROM checkpoints WHERE saved_at <= ?1")
        .map_err(sqlite_error)?
        .execute(params![horizon])
        .map_err(sqlite_error)?;
    transaction.commit().map_err(sqlite_error)?;
    Ok(deleted)
}

#[async_trait]
impl WindowStore for SqliteStore {
    async fn write_rows(&self, rows: &[WindowRow]) -> Result<(), SinkError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut rows = rows.to_vec();
        // In primary-key order the upserts walk the B-tree sequentially instead of
        // jumping around it (measured: 4.7 → 2.7 µs per row on a large table).
        rows.sort_unstable_by_key(|row| (row.window_start_ms, row.key, row.partition));
        self.with_writer(move |connection| {
            // IMMEDIATE takes the write lock up front, so a concurrent writer in another
            // process makes us wait (busy_timeout) rather than fail mid-transaction.
            let transaction = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sqlite_error)?;
            {
                let mut chunks = rows.chunks_exact(UPSERT_CHUNK);
                if chunks.len() > 0 {
                    let mut upsert = transaction
                        .prepare_cached(&UPSERT_CHUNK_ROWS)
                        .map_err(sqlite_error)?;
                    for chunk in &mut chunks {
                        for (slot, row) in chunk.iter().enumerate() {
                            bind_row(&mut upsert, slot, row).map_err(sqlite_error)?;
                        }
                        upsert.raw_execute().map_err(sqlite_error)?;
                    }
                }
                let mut upsert = transaction
                    .prepare_cached(UPSERT_ROW)
                    .map_err(sqlite_error)?;
                for row in chunks.remainder() {
                    bind_row(&mut upsert, 0, row).map_err(sqlite_error)?;
                    upsert.raw_execute().map_err(sqlite_error)?;
                }
            }
            transaction.commit().map_err(sqlite_error)
        })
        .await?;
        self.prune_if_due();
        Ok(())
    }

    async fn read_rows(
        &self,
        key: Uuid,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<WindowRow>, SinkError> {
        if limit == 0 || from_ms >= to_ms {
            return Ok(Vec::new());
        }
        self.with_reader(move |connection| {
            let mut select = connection
                .prepare_cached(READ_RANGE)
                .map_err(sqlite_error)?;
            let mut rows = Vec::new();
            // SQLite's integer division truncates toward zero, as Rust's does, so these
            // are the index expression's values; they only grow with the time.
            for bucket in from_ms / INDEX_BUCKET_MS..=(to_ms - 1) / INDEX_BUCKET_MS {
                let left = i64::try_from(limit - rows.len()).unwrap_or(i64::MAX);
                let found = select
                    .query_map(
                        params![bucket, key.as_bytes(), from_ms, to_ms, left],
                        raw_row,
                    )
                    .map_err(sqlite_error)?;
                rows.extend(collect_rows(found)?);
                if rows.len() >= limit {
                    break;
                }
            }
            Ok(rows)
        })
        .await
    }

    async fn scan_rows(
        &self,
        from_ms: i64,
        to_ms: i64,
        _keys: &[Uuid],
    ) -> Result<Vec<WindowRow>, SinkError> {
        self.with_reader(move |connection| {
            let sql = format!(
                r#"SELECT {ROW_COLUMNS} FROM window_sums
                   WHERE window_start >= ?1 AND window_start < ?2
                   ORDER BY window_start, "key", "partition""#
            );
            let mut select = connection.prepare_cached(&sql).map_err(sqlite_error)?;
            let rows = select
                .query_map(params![from_ms, to_ms], raw_row)
                .map_err(sqlite_error)?;
            collect_rows(rows)
        })
        .await
    }

    async fn save_checkpoint(
        &self,
        scope: &CheckpointScope,
        checkpoint: &Checkpoint,
    ) -> Result<(), SinkError> {
        let scope = scope.clone();
        let checkpoint = *checkpoint;
        self.with_writer(move |connection| {
            let transaction = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sqlite_error)?;
            transaction
                .prepare_cached(
                    r#"INSERT INTO checkpoints
                        (consumer_group, topic, "partition", next_offset, max_ts, closed_through,
                         generation, window_ms, grace_ms, saved_at, external_reset)
                       VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                       ON CONFLICT (consumer_group, topic, "partition", next_offset, generation)
                       DO UPDATE SET
                        max_ts = excluded.max_ts,
                        closed_through = excluded.closed_through,
                        window_ms = excluded.window_ms,
                        grace_ms = excluded.grace_ms,
                        saved_at = excluded.saved_at,
                        external_reset = excluded.external_reset"#,
                )
                .map_err(sqlite_error)?
                .execute(params![
                    scope.group,
                    scope.topic,
                    scope.partition,
                    checkpoint.next_offset,
                    checkpoint.max_ts_ms,
                    checkpoint.closed_through_ms,
                    checkpoint.generation,
                    checkpoint.settings.map(|s| s.window_ms),
                    checkpoint.settings.map(|s| s.grace_ms),
                    now_ms(),
                    checkpoint.external_reset,
                ])
                .map_err(sqlite_error)?;
            let stored: Vec<i64> = transaction
                .prepare_cached(
                    r#"SELECT next_offset FROM checkpoints
                       WHERE consumer_group = ?1 AND topic = ?2 AND "partition" = ?3"#,
                )
                .map_err(sqlite_error)?
                .query_map(params![scope.group, scope.topic, scope.partition], |row| {
                    row.get(0)
                })
                .map_err(sqlite_error)?
                .collect::<Result<_, _>>()
                .map_err(sqlite_error)?;
            {
                let mut delete = transaction
                    .prepare_cached(
                        r#"DELETE FROM checkpoints WHERE consumer_group = ?1 AND topic = ?2
                           AND "partition" = ?3 AND next_offset = ?4"#,
                    )
                    .map_err(sqlite_error)?;
                for offset in checkpoints_to_prune(checkpoint.next_offset, &stored) {
                    delete
                        .execute(params![scope.group, scope.topic, scope.partition, offset])
                        .map_err(sqlite_error)?;
                }
            }
            transaction.commit().map_err(sqlite_error)
        })
        .await
    }

    async fn load_checkpoint(
        &self,
        scope: &CheckpointScope,
        next_offset: Option<i64>,
    ) -> Result<Option<Checkpoint>, SinkError> {
        let scope = scope.clone();
        self.with_writer(move |connection| {
            let base = r#"SELECT next_offset, max_ts, closed_through, generation, window_ms, grace_ms,
                                 external_reset
                          FROM checkpoints
                          WHERE consumer_group = ?1 AND topic = ?2 AND "partition" = ?3"#;
            let raw = match next_offset {
                Some(offset) => connection
                    .prepare_cached(&format!(
                        "{base} AND next_offset = ?4 ORDER BY generation DESC LIMIT 1"
                    ))
                    .map_err(sqlite_error)?
                    .query_row(
                        params![scope.group, scope.topic, scope.partition, offset],
                        raw_checkpoint,
                    )
                    .optional(),
                None => connection
                    .prepare_cached(&format!("{base} ORDER BY generation DESC, next_offset DESC LIMIT 1"))
                    .map_err(sqlite_error)?
                    .query_row(
                        params![scope.group, scope.topic, scope.partition],
                        raw_checkpoint,
                    )
                    .optional(),
            }
            .map_err(sqlite_error)?;
            raw.map(checkpoint_from_raw).transpose()
        })
        .await
    }

    async fn load_metadata(&self, name: &str) -> Result<Option<String>, SinkError> {
        let name = name.to_owned();
        self.with_reader(move |connection| {
            connection
                .prepare_cached("SELECT value FROM tally_metadata WHERE name = ?1")
                .map_err(sqlite_error)?
                .query_row(params![name], |row| row.get(0))
                .optional()
                .map_err(sqlite_error)
        })
        .await
    }

    async fn compare_and_set_metadata(
        &self,
        name: &str,
        expected: Option<&str>,
        value: &str,
    ) -> Result<bool, SinkError> {
        let (name, expected, value) = (
            name.to_owned(),
            expected.map(str::to_owned),
            value.to_owned(),
        );
        self.with_writer(move |connection| {
            // IMMEDIATE: the read and the write are one step for every other writer.
            let transaction = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sqlite_error)?;
            let current: Option<String> = transaction
                .prepare_cached("SELECT value FROM tally_metadata WHERE name = ?1")
                .map_err(sqlite_error)?
                .query_row(params![name], |row| row.get(0))
                .optional()
                .map_err(sqlite_error)?;
            if current != expected {
                return Ok(false);
            }
            transaction
                .prepare_cached(
                    "INSERT INTO tally_metadata (name, value) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                )
                .map_err(sqlite_error)?
                .execute(params![name, value])
                .map_err(sqlite_error)?;
            transaction.commit().map_err(sqlite_error)?;
            Ok(true)
        })
        .await
    }

    async fn probe(&self) -> Result<(), SinkError> {
        self.with_writer(|connection| {
            connection
                .query_row("SELECT count(*) FROM window_sums WHERE 0", [], |row| {
                    row.get::<_, i64>(0)
                })
                .map(|_| ())
                .map_err(sqlite_error)
        })
        .await
    }

    fn describe(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }
}

/// A `window_sums` row as SQLite stores it, before validation.
type RawRow = (Vec<u8>, i64, i64, i64, i64, i64, bool, i64, i64);

fn raw_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
        row.get(8)?,
    ))
}

fn collect_rows(
    rows: impl Iterator<Item = rusqlite::Result<RawRow>>,
) -> Result<Vec<WindowRow>, SinkError> {
    rows.map(|raw| row_from_raw(raw.map_err(sqlite_error)?))
        .collect()
}

fn row_from_raw(raw: RawRow) -> Result<WindowRow, SinkError> {
    let (key, window_start_ms, partition, window_end_ms, sum, count, is_final, through, generation) =
        raw;
    let bad = |what: &str| {
        SinkError::BadRow(format!(
            "window_sums row at {window_start_ms} for key {key:02x?}: {what}"
        ))
    };
    Ok(WindowRow {
        key: Uuid::from_slice(&key).map_err(|_| bad("key is not 16 bytes"))?,
        window_start_ms,
        window_end_ms,
        partition: i32::try_from(partition).map_err(|_| bad("partition out of range"))?,
        sum,
        count,
        is_final,
        through_offset: through,
        generation: u16::try_from(generation).map_err(|_| bad("generation out of range"))?,
    })
}

type RawCheckpoint = (
    i64,
    Option<i64>,
    Option<i64>,
    i64,
    Option<i64>,
    Option<i64>,
    bool,
);

fn raw_checkpoint(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawCheckpoint> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
    ))
}

fn checkpoint_from_raw(raw: RawCheckpoint) -> Result<Checkpoint, SinkError> {
    let (
        next_offset,
        max_ts_ms,
        closed_through_ms,
        generation,
        window_ms,
        grace_ms,
        external_reset,
    ) = raw;
    Ok(Checkpoint {
        external_reset,
        settings: checkpoint_settings(next_offset, window_ms, grace_ms)?,
        next_offset,
        max_ts_ms,
        closed_through_ms,
        generation: u16::try_from(generation).map_err(|_| {
            SinkError::BadRow(format!(
                "checkpoint at offset {next_offset}: generation {generation} out of range"
            ))
        })?,
    })
}

/// The pinned settings of a checkpoint row: both columns or neither.
pub(crate) fn checkpoint_settings(
    next_offset: i64,
    window_ms: Option<i64>,
    grace_ms: Option<i64>,
) -> Result<Option<tally_schemas::SumSettings>, SinkError> {
    match (window_ms, grace_ms) {
        (Some(window_ms), Some(grace_ms)) => Ok(Some(tally_schemas::SumSettings {
            window_ms,
            grace_ms,
        })),
        (None, None) => Ok(None),
        _ => Err(SinkError::BadRow(format!(
            "checkpoint at offset {next_offset}: window_ms and grace_ms must both be set or both be null"
        ))),
    }
}

/// Names a file written by an earlier build (text keys, a rowid table) as such, with
/// what to do, before the schema check would report a column mismatch.
fn check_earlier_layout(connection: &Connection, path: &Path) -> Result<(), SinkError> {
    let key_type: Option<String> = connection
        .query_row(
            "SELECT type FROM pragma_table_info('window_sums') WHERE name = 'key'",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(sqlite_error)?;
    if key_type.is_some_and(|ty| ty.eq_ignore_ascii_case("TEXT")) {
        return Err(SinkError::Schema(format!(
            "{}: table window_sums has the layout of an earlier Tally build (text keys, \
             PRIMARY KEY (key, window_start, partition) in a rowid table); this build keeps \
             16-byte keys in a WITHOUT ROWID table keyed (window_start, key, partition). \
             There is no migration: move the file aside (`tally dev` does so itself at every \
             start) and rebuild the rows from Kafka by starting the aggregators on a new \
             file with a new consumer group (--group)",
            path.display()
        )));
    }
    Ok(())
}

fn check_without_rowid(connection: &Connection, table: &str) -> Result<(), SinkError> {
    let without_rowid: bool = connection
        .query_row(
            "SELECT wr FROM pragma_table_list WHERE name = ?1 AND schema = 'main'",
            params![table],
            |row| row.get(0),
        )
        .map_err(sqlite_error)?;
    if without_rowid {
        Ok(())
    } else {
        Err(SinkError::Schema(format!(
            "table {table} is a rowid table; this build expects WITHOUT ROWID; use another file"
        )))
    }
}

/// Compares a table's columns with what this build writes (names, declared types,
/// primary-key positions; order does not matter).
fn check_columns(
    connection: &Connection,
    table: &str,
    expected: &[(&str, &str, i64)],
) -> Result<(), SinkError> {
    let mut info = connection
        .prepare(&format!("PRAGMA table_info({table})"))
        .map_err(sqlite_error)?;
    let mut found: Vec<(String, String, i64)> = info
        .query_map([], |row| Ok((row.get(1)?, row.get(2)?, row.get(5)?)))
        .map_err(sqlite_error)?
        .collect::<Result<_, _>>()
        .map_err(sqlite_error)?;
    let mut wanted: Vec<(String, String, i64)> = expected
        .iter()
        .map(|&(name, ty, pk)| (name.to_owned(), ty.to_owned(), pk))
        .collect();
    for columns in [&mut found, &mut wanted] {
        for column in columns.iter_mut() {
            column.0.make_ascii_lowercase();
            column.1.make_ascii_uppercase();
        }
        columns.sort();
    }
    if found == wanted {
        Ok(())
    } else {
        Err(SinkError::Schema(format!(
            "table {table} has columns {found:?}, this build expects {wanted:?} \
             (name, type, primary-key position); migrate or use another file"
        )))
    }
}

/// Transient conditions (lock contention, I/O, full disk) are retryable; anything
/// else means the file or its schema is not what this build expects.
fn sqlite_error(err: rusqlite::Error) -> SinkError {
    match err.sqlite_error_code() {
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::OutOfMemory
            | ErrorCode::OperationInterrupted
            | ErrorCode::FileLockingProtocolFailed,
        ) => SinkError::Unavailable(format!("SQLite: {err}")),
        Some(
            ErrorCode::ReadOnly
            | ErrorCode::PermissionDenied
            | ErrorCode::AuthorizationForStatementDenied,
        ) => SinkError::Config(format!("SQLite: {err}")),
        Some(_) => SinkError::Schema(format!("SQLite: {err}")),
        None => match err {
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::InvalidColumnType(..) => SinkError::BadRow(format!("SQLite: {err}")),
            other => SinkError::Schema(format!("SQLite: {other}")),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn busy_and_io_errors_are_retryable_schema_errors_are_not() {
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert!(sqlite_error(busy).is_retryable());
        let io = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
            None,
        );
        assert!(sqlite_error(io).is_retryable());
        let missing = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some("no such column: sum".into()),
        );
        assert!(matches!(sqlite_error(missing), SinkError::Schema(_)));
    }

    #[test]
    fn the_index_and_the_range_read_use_the_bucket_width_of_the_code() {
        // The SQL spells the width out; the bucket loop of `read_rows` uses the constant.
        let expression = format!("window_start / {INDEX_BUCKET_MS}");
        assert!(CREATE_SCHEMA.contains(&format!("ON window_sums ({expression},")));
        assert!(READ_RANGE.contains(&format!("WHERE {expression} = ?1")));
    }

    #[tokio::test]
    async fn range_reads_reuse_their_prepared_statement() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("plan.sqlite")).unwrap();
        let key = Uuid::from_u128(7);
        // Windows on both sides of a bucket boundary of 2026: one index range per bucket.
        let hour = 1_790_000_000_000 / INDEX_BUCKET_MS * INDEX_BUCKET_MS;
        let (from, to) = (hour - 2 * INDEX_BUCKET_MS, hour + 2 * INDEX_BUCKET_MS);
        let rows: Vec<WindowRow> = (0..20)
            .map(|w| {
                let start = hour - 10 * 10_000 + w * 10_000;
                WindowRow {
                    key,
                    window_start_ms: start,
                    window_end_ms: start + 10_000,
                    partition: 0,
                    sum: w + 1,
                    count: 1,
                    is_final: true,
                    through_offset: w,
                    generation: 0,
                }
            })
            .collect();
        store.write_rows(&rows).await.unwrap();
        let replans = |reset: bool| {
            let mut replans = 0;
            for reader in store.readers.iter() {
                let connection = reader.lock().unwrap();
                let select = connection.prepare_cached(READ_RANGE).unwrap();
                replans += if reset {
                    select.reset_status(rusqlite::StatementStatus::RePrepare)
                } else {
                    select.get_status(rusqlite::StatementStatus::RePrepare)
                };
            }
            replans
        };
        // Warm up: each reader prepares the statement (and plans it once).
        for _ in 0..READERS {
            assert_eq!(store.read_rows(key, from, to, 4_096).await.unwrap(), rows);
        }
        replans(true);
        // Reads across four buckets (one query each, the later ones with fewer rows
        // left), with other limits, one after another on every reader.
        for limit in [4_096, 15, 4_096, 10, 3] {
            for _ in 0..READERS {
                let read = store.read_rows(key, from, to, limit).await.unwrap();
                assert_eq!(read, rows[..limit.min(rows.len())]);
            }
        }
        assert_eq!(replans(false), 0, "re-plans of the range read");
    }
}
