//! The ScyllaDB backend (`scylla://host:port[,host:port]/keyspace`).
//!
//! - Keyspace and tables are created at connect if missing (replication from
//!   [`ScyllaOptions`]); the statements are prepared once, at connect, which also
//!   type-checks them against the live schema, so a mismatching table fails there
//!   with [`SinkError::Schema`].
//! - Prepared statements carry their partition-key layout, so the driver's default
//!   policy routes each one to a replica and shard owning it (token/shard aware).
//! - Each row is its own statement, with the row's completeness version as the
//!   write timestamp (set through the driver's statement API, never by `USING
//!   TIMESTAMP` in the text): ScyllaDB keeps the cell with the highest timestamp, so
//!   a stale or partial row can never overwrite a more complete one. Statements run
//!   with at most `max_concurrency` in flight; no multi-partition batches.
//!
//! Time columns are CQL `timestamp` (ms since the epoch, [`CqlTimestamp`]).

use std::ops::ControlFlow;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::{
    DbError, ExecutionError, IntoRowsResultError, NewSessionError, NextPageError, NextRowError,
    PagerExecutionError, PrepareError, RequestAttemptError, RequestError,
};
use scylla::response::query_result::QueryResult;
use scylla::response::PagingState;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use scylla::value::CqlTimestamp;
use tally_schemas::Checkpoint;
use uuid::Uuid;

use crate::error::SinkError;
use crate::row::WindowRow;
use crate::store::{
    checkpoints_to_prune, CheckpointScope, ScyllaOptions, WindowStore, CHECKPOINTS_KEPT,
};

/// `read_rows` queries one partition per window; refuse ranges needing more.
pub const MAX_READ_WINDOWS: i64 = 100_000;

/// Rows per page for the full-table scan.
const SCAN_PAGE_SIZE: i32 = 5_000;

/// Upper bound on pages read while looking for checkpoints to prune (normally one).
const PRUNE_MAX_PAGES: usize = 16;

/// How long the driver waits to open a connection to a node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The scope the probe writes to: partition -1 is never a Kafka partition, so it
/// cannot collide with a real checkpoint.
const PROBE_GROUP: &str = "tally.probe";
const PROBE_TOPIC: &str = "tally.probe";
const PROBE_PARTITION: i32 = -1;

/// A `window_sums` row as selected: (key, window_start, partition, window_end, sum,
/// count, final, through_offset, generation). Regular columns may be null in a
/// foreign or damaged row, which then reads as [`SinkError::BadRow`].
type RawRow = (
    Uuid,
    CqlTimestamp,
    i32,
    Option<CqlTimestamp>,
    Option<i64>,
    Option<i64>,
    Option<bool>,
    Option<i64>,
    Option<i32>,
);

/// The bound values of the row upsert, in `INSERT_ROW` column order.
type RowValues = (
    Uuid,
    CqlTimestamp,
    i32,
    CqlTimestamp,
    i64,
    i64,
    bool,
    i64,
    i32,
);

/// A `tally_checkpoints` row as selected: (next_offset, max_ts, closed_through,
/// generation, window_ms, grace_ms).
type RawCheckpoint = (
    i64,
    Option<i64>,
    Option<i64>,
    Option<i32>,
    Option<i64>,
    Option<i64>,
    Option<bool>,
);

/// The bound values of the checkpoint insert.
type CheckpointValues<'a> = (
    &'a str,
    &'a str,
    i32,
    i64,
    Option<i64>,
    Option<i64>,
    i32,
    Option<i64>,
    Option<i64>,
    bool,
);

/// The ScyllaDB window store. All statements are prepared once in [`connect`](Self::connect).
pub struct ScyllaStore {
    session: Session,
    description: String,
    max_concurrency: usize,
    insert_row: PreparedStatement,
    select_window: PreparedStatement,
    scan_all: PreparedStatement,
    insert_checkpoint: PreparedStatement,
    select_checkpoint_exact: PreparedStatement,
    select_checkpoint_latest: PreparedStatement,
    select_checkpoint_offsets: PreparedStatement,
    delete_checkpoint: PreparedStatement,
    select_metadata: PreparedStatement,
    insert_metadata_revision: PreparedStatement,
}

impl std::fmt::Debug for ScyllaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaStore")
            .field("store", &self.description)
            .field("max_concurrency", &self.max_concurrency)
            .finish_non_exhaustive()
    }
}

impl ScyllaStore {
    /// Connects to `nodes`, creates `keyspace` (with `options.replication`) and the
    /// tables if missing, and prepares every statement.
    pub async fn connect(
        nodes: &[String],
        keyspace: &str,
        options: &ScyllaOptions,
    ) -> Result<Self, SinkError> {
        validate_keyspace(keyspace)?;
        validate_replication(&options.replication)?;
        let consistency = parse_consistency(&options.consistency)?;
        if options.max_concurrency == 0 {
            return Err(SinkError::Config(
                "ScyllaDB max_concurrency must be at least 1".into(),
            ));
        }
        if nodes.is_empty() {
            return Err(SinkError::Config("no ScyllaDB node given".into()));
        }

        let builder = SessionBuilder::new()
            .known_nodes(nodes)
            .connection_timeout(CONNECT_TIMEOUT);
        let session = crate::scylla_session::configure(
            builder,
            options.auth.as_ref(),
            options.tls.as_ref(),
            options.local_dc.as_deref(),
        )?
        .build()
        .await
        .map_err(new_session_error)?;

        for ddl in schema_statements(keyspace, &options.replication) {
            session
                .query_unpaged(ddl.as_str(), ())
                .await
                .map_err(|err| execution_error("creating the schema", err))?;
        }

        let prepare = |cql: String| {
            let session = &session;
            async move {
                let mut statement = session
                    .prepare(cql.as_str())
                    .await
                    .map_err(|err| prepare_error(&cql, err))?;
                statement.set_consistency(consistency);
                // Every statement here is safe to repeat: upserts carry a fixed
                // timestamp, reads and deletes are naturally idempotent.
                statement.set_is_idempotent(true);
                Ok::<_, SinkError>(statement)
            }
        };
        let ks = keyspace;
        let row_columns = "key, window_start, partition, window_end, sum, count, final, through_offset, generation";
        let checkpoint_columns =
            "next_offset, max_ts, closed_through, generation, window_ms, grace_ms, external_reset";
        let checkpoint_scope = "consumer_group = ? AND topic = ? AND partition = ?";

        let insert_row = prepare(format!(
            "INSERT INTO {ks}.window_sums ({row_columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .await?;
        let select_window = prepare(format!(
            "SELECT {row_columns} FROM {ks}.window_sums WHERE key = ? AND window_start = ?"
        ))
        .await?;
        let mut scan_all = prepare(format!("SELECT {row_columns} FROM {ks}.window_sums")).await?;
        scan_all.set_page_size(SCAN_PAGE_SIZE);
        let insert_checkpoint = prepare(format!(
            "INSERT INTO {ks}.tally_checkpoints (consumer_group, topic, partition, {checkpoint_columns}) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .await?;
        let select_checkpoint_exact = prepare(format!(
            "SELECT {checkpoint_columns} FROM {ks}.tally_checkpoints WHERE {checkpoint_scope} AND next_offset = ?"
        ))
        .await?;
        // The latest is the highest generation, then the highest offset: all rows of
        // the scope are read (a handful: pruning keeps CHECKPOINTS_KEPT per run).
        let select_checkpoint_latest = prepare(format!(
            "SELECT {checkpoint_columns} FROM {ks}.tally_checkpoints WHERE {checkpoint_scope}"
        ))
        .await?;
        let mut select_checkpoint_offsets = prepare(format!(
            "SELECT next_offset, generation FROM {ks}.tally_checkpoints WHERE {checkpoint_scope}"
        ))
        .await?;
        select_checkpoint_offsets.set_page_size(page_size_for_prune());
        // One row at a time, by its full key (no range deletes).
        let delete_checkpoint = prepare(format!(
            "DELETE FROM {ks}.tally_checkpoints WHERE {checkpoint_scope} AND next_offset = ? AND generation = ?"
        ))
        .await?;

        let select_metadata = prepare(format!(
            "SELECT revision, value FROM {ks}.tally_metadata WHERE name = ?"
        ))
        .await?;
        // A lightweight transaction: of several writers racing for the same next
        // revision, exactly one wins.
        let insert_metadata_revision = prepare(format!(
            "INSERT INTO {ks}.tally_metadata (name, revision, value) VALUES (?, ?, ?) IF NOT EXISTS"
        ))
        .await?;

        let store = ScyllaStore {
            session,
            description: format!("scylla://{}/{keyspace}", nodes.join(",")),
            max_concurrency: options.max_concurrency,
            insert_row,
            select_window,
            scan_all,
            insert_checkpoint,
            select_checkpoint_exact,
            select_checkpoint_latest,
            select_checkpoint_offsets,
            delete_checkpoint,
            select_metadata,
            insert_metadata_revision,
        };
        store.check_types()?;
        Ok(store)
    }

    /// Type-checks bound values and selected columns against the live schema, so a
    /// table created by another build (e.g. `window_start bigint`) fails at connect.
    fn check_types(&self) -> Result<(), SinkError> {
        let sample = WindowRow {
            key: Uuid::nil(),
            window_start_ms: 0,
            window_end_ms: 0,
            partition: 0,
            sum: 0,
            count: 0,
            is_final: false,
            through_offset: 0,
            generation: 0,
        };
        let mismatch =
            |what: &str, err: &dyn std::fmt::Display| SinkError::Schema(format!("{what}: {err}"));
        self.insert_row
            .clone()
            .bind(&row_values(&sample))
            .map_err(|err| mismatch("window_sums columns", &err))?;
        let checkpoint = Checkpoint::fresh(0);
        self.insert_checkpoint
            .clone()
            .bind(&checkpoint_values(PROBE_GROUP, PROBE_TOPIC, 0, &checkpoint))
            .map_err(|err| mismatch("tally_checkpoints columns", &err))?;
        for (statement, check) in [
            (&self.select_window, type_check::<RawRow> as TypeCheck),
            (&self.scan_all, type_check::<RawRow>),
            (&self.select_checkpoint_exact, type_check::<RawCheckpoint>),
            (&self.select_checkpoint_latest, type_check::<RawCheckpoint>),
            (&self.select_checkpoint_offsets, type_check::<(i64, i32)>),
            (&self.select_metadata, type_check::<(i32, Option<String>)>),
        ] {
            check(statement).map_err(|err| mismatch(statement.get_statement(), &err))?;
        }
        Ok(())
    }

    /// The newest revision of a metadata entry: each change is a new row, so the
    /// history of (for example) settings changes stays readable.
    async fn latest_metadata(
        &self,
        name: &str,
    ) -> Result<Option<(i32, Option<String>)>, SinkError> {
        let result = self
            .session
            .execute_unpaged(&self.select_metadata, (name,))
            .await
            .map_err(|err| execution_error("reading store metadata", err))?;
        Ok(rows_of::<(i32, Option<String>)>(result)?
            .into_iter()
            .max_by_key(|(revision, _)| *revision))
    }

    async fn write_row(&self, row: &WindowRow) -> Result<(), SinkError> {
        let mut statement = self
            .insert_row
            .clone()
            .bind(&row_values(row))
            .map_err(|err| SinkError::Schema(format!("binding a window_sums row: {err}")))?;
        // The version is the write timestamp (the protocol's "microseconds"; only
        // its order matters): ScyllaDB keeps the highest, whatever the arrival order.
        statement.set_timestamp(Some(row.version()));
        self.session
            .execute_bound_unpaged(&statement)
            .await
            .map_err(|err| execution_error("writing window_sums", err))?;
        Ok(())
    }

    async fn read_window(
        &self,
        key: Uuid,
        window_start_ms: i64,
    ) -> Result<Vec<WindowRow>, SinkError> {
        let result = self
            .session
            .execute_unpaged(&self.select_window, (key, CqlTimestamp(window_start_ms)))
            .await
            .map_err(|err| execution_error("reading window_sums", err))?;
        rows_of::<RawRow>(result)?
            .into_iter()
            .map(row_from_raw)
            .collect()
    }

    /// After saving `saved_offset`, deletes the checkpoints [`checkpoints_to_prune`]
    /// names. Rows are read in clustering order (highest offset first) a page at a
    /// time, stopping as soon as enough rows at or below `saved_offset` were seen:
    /// pruned rows are tombstones further down the partition, and reading on would
    /// scan them all.
    async fn prune_checkpoints(
        &self,
        scope: &CheckpointScope,
        saved_offset: i64,
    ) -> Result<(), SinkError> {
        let mut seen: Vec<(i64, i32)> = Vec::new();
        let mut paging_state = PagingState::start();
        for _ in 0..PRUNE_MAX_PAGES {
            let (result, next_page) = self
                .session
                .execute_single_page(
                    &self.select_checkpoint_offsets,
                    (scope.group.as_str(), scope.topic.as_str(), scope.partition),
                    paging_state,
                )
                .await
                .map_err(|err| execution_error("reading checkpoints", err))?;
            seen.extend(rows_of::<(i64, i32)>(result)?);
            let at_or_below = seen
                .iter()
                .filter(|&&(offset, _)| offset <= saved_offset)
                .count();
            if at_or_below > CHECKPOINTS_KEPT {
                break;
            }
            match next_page.into_paging_control_flow() {
                ControlFlow::Continue(state) => paging_state = state,
                ControlFlow::Break(()) => break,
            }
        }
        let offsets: Vec<i64> = seen.iter().map(|(offset, _)| *offset).collect();
        let pruned = checkpoints_to_prune(saved_offset, &offsets);
        for (offset, generation) in seen.iter().filter(|(offset, _)| pruned.contains(offset)) {
            self.session
                .execute_unpaged(
                    &self.delete_checkpoint,
                    (
                        scope.group.as_str(),
                        scope.topic.as_str(),
                        scope.partition,
                        *offset,
                        *generation,
                    ),
                )
                .await
                .map_err(|err| execution_error("pruning checkpoints", err))?;
        }
        Ok(())
    }
}

#[async_trait]
impl WindowStore for ScyllaStore {
    async fn write_rows(&self, rows: &[WindowRow]) -> Result<(), SinkError> {
        // Stops at the first failure (dropping the statements still in flight): the
        // caller retries the whole call, which is harmless since upserts are versioned.
        futures::stream::iter(rows.iter().map(Ok))
            .try_for_each_concurrent(self.max_concurrency, |row| self.write_row(row))
            .await
    }

    async fn read_rows(
        &self,
        key: Uuid,
        from_ms: i64,
        to_ms: i64,
        window_ms: i64,
    ) -> Result<Vec<WindowRow>, SinkError> {
        let starts = window_starts(from_ms, to_ms, window_ms)?;
        let mut rows: Vec<WindowRow> = futures::stream::iter(starts)
            .map(|start| self.read_window(key, start))
            .buffer_unordered(self.max_concurrency)
            .try_concat()
            .await?;
        rows.sort_by_key(|row| (row.window_start_ms, row.partition));
        Ok(rows)
    }

    async fn scan_rows(&self, from_ms: i64, to_ms: i64) -> Result<Vec<WindowRow>, SinkError> {
        let mut stream = self
            .session
            .execute_iter(self.scan_all.clone(), ())
            .await
            .map_err(pager_error)?
            .rows_stream::<RawRow>()
            .map_err(|err| SinkError::Schema(format!("window_sums columns: {err}")))?;
        let mut rows = Vec::new();
        while let Some(raw) = stream.next().await {
            let raw = raw.map_err(next_row_error)?;
            let start = raw.1 .0;
            if start >= from_ms && start < to_ms {
                rows.push(row_from_raw(raw)?);
            }
        }
        rows.sort_by_key(|row| (row.window_start_ms, row.partition, row.key));
        Ok(rows)
    }

    async fn save_checkpoint(
        &self,
        scope: &CheckpointScope,
        checkpoint: &Checkpoint,
    ) -> Result<(), SinkError> {
        self.session
            .execute_unpaged(
                &self.insert_checkpoint,
                checkpoint_values(&scope.group, &scope.topic, scope.partition, checkpoint),
            )
            .await
            .map_err(|err| execution_error("saving a checkpoint", err))?;
        self.prune_checkpoints(scope, checkpoint.next_offset).await
    }

    async fn load_checkpoint(
        &self,
        scope: &CheckpointScope,
        next_offset: Option<i64>,
    ) -> Result<Option<Checkpoint>, SinkError> {
        let scope_values = (scope.group.as_str(), scope.topic.as_str(), scope.partition);
        let result = match next_offset {
            Some(offset) => {
                let values = (scope_values.0, scope_values.1, scope_values.2, offset);
                self.session
                    .execute_unpaged(&self.select_checkpoint_exact, values)
                    .await
            }
            None => {
                self.session
                    .execute_unpaged(&self.select_checkpoint_latest, scope_values)
                    .await
            }
        }
        .map_err(|err| execution_error("loading a checkpoint", err))?;
        // The filters below are what the CQL already guarantees on ScyllaDB; keeping
        // them client-side makes the result independent of the server's ordering.
        let chosen = rows_of::<RawCheckpoint>(result)?
            .into_iter()
            .filter(|raw| next_offset.is_none_or(|offset| raw.0 == offset))
            .max_by_key(|raw| (raw.3, raw.0));
        chosen.map(checkpoint_from_raw).transpose()
    }

    async fn load_metadata(&self, name: &str) -> Result<Option<String>, SinkError> {
        Ok(self
            .latest_metadata(name)
            .await?
            .and_then(|(_, value)| value))
    }

    async fn compare_and_set_metadata(
        &self,
        name: &str,
        expected: Option<&str>,
        value: &str,
    ) -> Result<bool, SinkError> {
        let latest = self.latest_metadata(name).await?;
        let (revision, current) =
            latest.map_or((0, None), |(revision, value)| (revision + 1, value));
        if current.as_deref() != expected {
            return Ok(false);
        }
        let result = self
            .session
            .execute_unpaged(&self.insert_metadata_revision, (name, revision, value))
            .await
            .map_err(|err| execution_error("writing store metadata", err))?;
        lwt_applied(result)
    }

    async fn probe(&self) -> Result<(), SinkError> {
        // A real write at the configured consistency, so the circuit closes only when
        // writes would succeed; it overwrites one fixed row outside any real scope.
        self.session
            .execute_unpaged(
                &self.insert_checkpoint,
                checkpoint_values(
                    PROBE_GROUP,
                    PROBE_TOPIC,
                    PROBE_PARTITION,
                    &Checkpoint::fresh(0),
                ),
            )
            .await
            .map_err(|err| execution_error("probe write", err))?;
        Ok(())
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// The DDL run at connect, all idempotent (`IF NOT EXISTS`).
fn schema_statements(keyspace: &str, replication: &str) -> [String; 4] {
    [
        format!("CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.window_sums (key uuid, window_start timestamp, \
             partition int, window_end timestamp, sum bigint, count bigint, final boolean, \
             through_offset bigint, generation int, PRIMARY KEY ((key, window_start), partition))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.tally_checkpoints (consumer_group text, topic text, \
             partition int, next_offset bigint, max_ts bigint, closed_through bigint, generation int, \
             window_ms bigint, grace_ms bigint, external_reset boolean, \
             PRIMARY KEY ((consumer_group, topic, partition), next_offset, generation)) \
             WITH CLUSTERING ORDER BY (next_offset DESC, generation DESC)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.tally_metadata (name text, revision int, value text, \
             PRIMARY KEY (name, revision))"
        ),
    ]
}

/// One page holds the kept checkpoints plus the one to prune.
fn page_size_for_prune() -> i32 {
    i32::try_from(CHECKPOINTS_KEPT + 1).unwrap_or(i32::MAX)
}

/// The window starts (multiples of `window_ms`) in `[from_ms, to_ms)`.
pub fn window_starts(
    from_ms: i64,
    to_ms: i64,
    window_ms: i64,
) -> Result<impl Iterator<Item = i64>, SinkError> {
    if window_ms <= 0 {
        return Err(SinkError::Config(format!(
            "window size must be positive, got {window_ms} ms"
        )));
    }
    // i128: the arithmetic near i64's ends must not overflow.
    let (from, to, window) = (
        i128::from(from_ms),
        i128::from(to_ms),
        i128::from(window_ms),
    );
    let first = from.div_euclid(window) * window;
    let first = if first < from { first + window } else { first };
    let count = if first >= to {
        0
    } else {
        (to - first + window - 1) / window
    };
    if count > i128::from(MAX_READ_WINDOWS) {
        return Err(SinkError::Config(format!(
            "reading [{from_ms}, {to_ms}) in {window_ms} ms windows would query {count} partitions \
             (at most {MAX_READ_WINDOWS}); narrow the range"
        )));
    }
    // `count` ≤ MAX_READ_WINDOWS and every start lies in [from, to), so all fit in i64.
    let starts: Vec<i64> = (0..count)
        .filter_map(|i| i64::try_from(first + i * window).ok())
        .collect();
    Ok(starts.into_iter())
}

fn row_values(row: &WindowRow) -> RowValues {
    (
        row.key,
        CqlTimestamp(row.window_start_ms),
        row.partition,
        CqlTimestamp(row.window_end_ms),
        row.sum,
        row.count,
        row.is_final,
        row.through_offset,
        i32::from(row.generation),
    )
}

fn checkpoint_values<'a>(
    group: &'a str,
    topic: &'a str,
    partition: i32,
    checkpoint: &Checkpoint,
) -> CheckpointValues<'a> {
    (
        group,
        topic,
        partition,
        checkpoint.next_offset,
        checkpoint.max_ts_ms,
        checkpoint.closed_through_ms,
        i32::from(checkpoint.generation),
        checkpoint.settings.map(|s| s.window_ms),
        checkpoint.settings.map(|s| s.grace_ms),
        checkpoint.external_reset,
    )
}

fn row_from_raw(raw: RawRow) -> Result<WindowRow, SinkError> {
    let (key, start, partition, end, sum, count, is_final, through_offset, generation) = raw;
    let bad = |what: &str| {
        SinkError::BadRow(format!(
            "window_sums row ({key}, {}, {partition}): {what}",
            start.0
        ))
    };
    let generation = generation.ok_or_else(|| bad("generation is null"))?;
    Ok(WindowRow {
        key,
        window_start_ms: start.0,
        window_end_ms: end.ok_or_else(|| bad("window_end is null"))?.0,
        partition,
        sum: sum.ok_or_else(|| bad("sum is null"))?,
        count: count.ok_or_else(|| bad("count is null"))?,
        is_final: is_final.ok_or_else(|| bad("final is null"))?,
        through_offset: through_offset.ok_or_else(|| bad("through_offset is null"))?,
        generation: u16::try_from(generation)
            .map_err(|_| bad(&format!("generation {generation} out of range")))?,
    })
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
    let settings = crate::sqlite::checkpoint_settings(next_offset, window_ms, grace_ms)?;
    let generation = generation
        .and_then(|g| u16::try_from(g).ok())
        .ok_or_else(|| {
            SinkError::BadRow(format!(
                "checkpoint at offset {next_offset}: generation {generation:?} is missing or out of range"
            ))
        })?;
    Ok(Checkpoint {
        next_offset,
        max_ts_ms,
        closed_through_ms,
        generation,
        settings,
        external_reset: external_reset.unwrap_or(false),
    })
}

/// The `[applied]` column of a lightweight transaction's answer (its first column;
/// the current values follow when it was not applied). A node without lightweight
/// transactions (the in-memory CQL test node) answers with no rows at all: the write
/// then happened unconditionally, after the read in `compare_and_set_metadata` saw the
/// expected value, so it counts as applied (only a concurrent writer of the same
/// revision could differ, which ScyllaDB's answer rules out).
fn lwt_applied(result: QueryResult) -> Result<bool, SinkError> {
    if !result.is_rows() {
        return Ok(true);
    }
    let rows = result
        .into_rows_result()
        .map_err(|err| SinkError::Schema(format!("conditional write answer: {err}")))?;
    let first = rows
        .rows::<scylla::value::Row>()
        .map_err(|err| SinkError::Schema(format!("conditional write answer: {err}")))?
        .next()
        .transpose()
        .map_err(|err| SinkError::Schema(format!("conditional write answer: {err}")))?;
    match first.and_then(|row| row.columns.into_iter().next().flatten()) {
        Some(scylla::value::CqlValue::Boolean(applied)) => Ok(applied),
        other => Err(SinkError::Schema(format!(
            "conditional write answer has no [applied] column: {other:?}"
        ))),
    }
}

type TypeCheck = fn(&PreparedStatement) -> Result<(), scylla::deserialize::TypeCheckError>;

fn type_check<Row>(statement: &PreparedStatement) -> Result<(), scylla::deserialize::TypeCheckError>
where
    Row: for<'frame, 'metadata> DeserializeRow<'frame, 'metadata>,
{
    let specs = statement.get_current_result_set_col_specs();
    Row::type_check(specs.get().as_slice())
}

fn rows_of<Row>(result: QueryResult) -> Result<Vec<Row>, SinkError>
where
    Row: for<'frame, 'metadata> DeserializeRow<'frame, 'metadata>,
{
    let rows = result.into_rows_result().map_err(|err| match err {
        IntoRowsResultError::ResultNotRows(_) => {
            SinkError::Schema("a SELECT returned no rows result".into())
        }
        other => SinkError::Unavailable(format!("unreadable result: {other}")),
    })?;
    rows.rows::<Row>()
        .map_err(|err| SinkError::Schema(format!("result columns: {err}")))?
        .map(|row| row.map_err(|err| SinkError::BadRow(err.to_string())))
        .collect()
}

fn validate_keyspace(keyspace: &str) -> Result<(), SinkError> {
    let valid = crate::store::is_valid_keyspace(keyspace);
    if valid {
        Ok(())
    } else {
        Err(SinkError::Config(format!(
            "keyspace {keyspace:?}: use 1-48 letters, digits and _, starting with a letter"
        )))
    }
}

/// The replication map is pasted into `CREATE KEYSPACE`; accept only a map literal.
fn validate_replication(replication: &str) -> Result<(), SinkError> {
    let trimmed = replication.trim();
    if trimmed.starts_with('{') && trimmed.ends_with('}') && !trimmed.contains(';') {
        Ok(())
    } else {
        Err(SinkError::Config(format!(
            "replication {replication:?}: expected a map such as \
             {{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}}"
        )))
    }
}

/// Parses a consistency level name (`LOCAL_QUORUM`, `quorum`, `one`, …). The same
/// level serves reads and writes, so write-only (ANY, EACH_QUORUM) and serial-only
/// levels are refused.
pub fn parse_consistency(name: &str) -> Result<Consistency, SinkError> {
    let normalized = name.trim().to_ascii_uppercase().replace('-', "_");
    match normalized.as_str() {
        "ONE" => Ok(Consistency::One),
        "TWO" => Ok(Consistency::Two),
        "THREE" => Ok(Consistency::Three),
        "QUORUM" => Ok(Consistency::Quorum),
        "ALL" => Ok(Consistency::All),
        "LOCAL_QUORUM" => Ok(Consistency::LocalQuorum),
        "LOCAL_ONE" => Ok(Consistency::LocalOne),
        "ANY" | "EACH_QUORUM" | "SERIAL" | "LOCAL_SERIAL" => Err(SinkError::Config(format!(
            "consistency {name}: not usable for both reads and writes; use e.g. LOCAL_QUORUM, QUORUM or ONE"
        ))),
        _ => Err(SinkError::Config(format!(
            "unknown consistency level {name:?}; use ONE, TWO, THREE, QUORUM, ALL, LOCAL_QUORUM or LOCAL_ONE"
        ))),
    }
}

fn new_session_error(err: NewSessionError) -> SinkError {
    match err {
        NewSessionError::FailedToResolveAnyHostname(_)
        | NewSessionError::EmptyKnownNodesList
        | NewSessionError::IllegalConfig(_) => {
            SinkError::Config(format!("connecting to ScyllaDB: {err}"))
        }
        other => SinkError::Unavailable(format!("connecting to ScyllaDB: {other}")),
    }
}

fn prepare_error(cql: &str, err: PrepareError) -> SinkError {
    match err {
        PrepareError::AllAttemptsFailed { first_attempt } => {
            attempt_error(&format!("preparing {cql}"), first_attempt)
        }
        other => SinkError::Unavailable(format!("preparing {cql}: {other}")),
    }
}

fn execution_error(context: &str, err: ExecutionError) -> SinkError {
    match err {
        ExecutionError::BadQuery(bad) => SinkError::Schema(format!("{context}: {bad}")),
        ExecutionError::PrepareError(prepare) => prepare_error(context, prepare),
        ExecutionError::LastAttemptError(attempt) => attempt_error(context, attempt),
        // No node, pool, timeout, schema agreement or metadata trouble: all transient.
        other => SinkError::Unavailable(format!("{context}: {other}")),
    }
}

fn pager_error(err: PagerExecutionError) -> SinkError {
    let context = "scanning window_sums";
    match err {
        PagerExecutionError::PrepareError(prepare) => prepare_error(context, prepare),
        PagerExecutionError::SerializationError(ser) => {
            SinkError::Schema(format!("{context}: {ser}"))
        }
        PagerExecutionError::NextPageError(page) => next_page_error(context, page),
        other => SinkError::Unavailable(format!("{context}: {other}")),
    }
}

fn next_row_error(err: NextRowError) -> SinkError {
    let context = "scanning window_sums";
    match err {
        NextRowError::NextPageError(page) => next_page_error(context, page),
        NextRowError::RowDeserializationError(row) => {
            SinkError::BadRow(format!("{context}: {row}"))
        }
        other => SinkError::Unavailable(format!("{context}: {other}")),
    }
}

fn next_page_error(context: &str, err: NextPageError) -> SinkError {
    match err {
        NextPageError::RequestFailure(RequestError::LastAttemptError(attempt)) => {
            attempt_error(context, attempt)
        }
        NextPageError::TypeCheckError(check) => SinkError::Schema(format!("{context}: {check}")),
        other => SinkError::Unavailable(format!("{context}: {other}")),
    }
}

fn attempt_error(context: &str, err: RequestAttemptError) -> SinkError {
    match err {
        RequestAttemptError::DbError(db, message) => db_error(context, db, &message),
        RequestAttemptError::SerializationError(_)
        | RequestAttemptError::CqlRequestSerialization(_) => {
            SinkError::Schema(format!("{context}: {err}"))
        }
        // Broken connections, stream exhaustion, garbled responses: transient.
        other => SinkError::Unavailable(format!("{context}: {other}")),
    }
}

/// Server errors: the statement or schema is wrong (permanent), access is refused
/// (configuration), or the cluster cannot serve it right now (retry).
fn db_error(context: &str, err: DbError, message: &str) -> SinkError {
    let text = format!("{context}: {err} ({message})");
    match err {
        DbError::SyntaxError | DbError::Invalid | DbError::AlreadyExists { .. } => {
            SinkError::Schema(text)
        }
        DbError::AuthenticationError | DbError::Unauthorized | DbError::ConfigError => {
            SinkError::Config(text)
        }
        _ => SinkError::Unavailable(text),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_are_the_aligned_starts_inside_the_range() {
        let starts: Vec<i64> = window_starts(15_000, 50_000, 10_000).unwrap().collect();
        assert_eq!(starts, vec![20_000, 30_000, 40_000]);
        let starts: Vec<i64> = window_starts(20_000, 50_001, 10_000).unwrap().collect();
        assert_eq!(starts, vec![20_000, 30_000, 40_000, 50_000]);
        let starts: Vec<i64> = window_starts(-25_000, -5_000, 10_000).unwrap().collect();
        assert_eq!(starts, vec![-20_000, -10_000]);
        assert_eq!(window_starts(50_000, 50_000, 10_000).unwrap().count(), 0);
        assert_eq!(window_starts(50_000, 10_000, 10_000).unwrap().count(), 0);
    }

    #[test]
    fn window_starts_refuses_huge_ranges_and_bad_sizes() {
        assert!(matches!(
            window_starts(0, 10_000 * (MAX_READ_WINDOWS + 1), 10_000),
            Err(SinkError::Config(_))
        ));
        assert_eq!(
            window_starts(0, 10_000 * MAX_READ_WINDOWS, 10_000)
                .unwrap()
                .count() as i64,
            MAX_READ_WINDOWS
        );
        assert!(matches!(
            window_starts(i64::MIN, i64::MAX, 1),
            Err(SinkError::Config(_))
        ));
        assert!(matches!(window_starts(0, 10, 0), Err(SinkError::Config(_))));
    }

    #[test]
    fn consistency_names_parse_and_unknown_ones_are_config_errors() {
        assert_eq!(
            parse_consistency("LOCAL_QUORUM").unwrap(),
            Consistency::LocalQuorum
        );
        assert_eq!(parse_consistency("one").unwrap(), Consistency::One);
        assert_eq!(
            parse_consistency("local-one").unwrap(),
            Consistency::LocalOne
        );
        assert!(matches!(
            parse_consistency("ANY"),
            Err(SinkError::Config(_))
        ));
        assert!(matches!(
            parse_consistency("MOST"),
            Err(SinkError::Config(_))
        ));
    }

    #[test]
    fn driver_errors_map_to_retryable_or_permanent() {
        let overloaded = RequestAttemptError::DbError(DbError::Overloaded, "busy".into());
        assert!(attempt_error("t", overloaded).is_retryable());
        let invalid = RequestAttemptError::DbError(DbError::Invalid, "no such column".into());
        assert!(matches!(attempt_error("t", invalid), SinkError::Schema(_)));
        assert!(
            execution_error("t", ExecutionError::RequestTimeout(Duration::from_secs(1)))
                .is_retryable()
        );
        assert!(execution_error("t", ExecutionError::EmptyPlan).is_retryable());
    }

    #[test]
    fn replication_must_be_a_map() {
        assert!(
            validate_replication("{'class': 'SimpleStrategy', 'replication_factor': 1}").is_ok()
        );
        assert!(validate_replication("{'class': 'x'}; DROP KEYSPACE k").is_err());
        assert!(validate_replication("SimpleStrategy").is_err());
    }
}
