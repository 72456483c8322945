//! The ScyllaDB backend (`scylla://host:port[,host:port]/keyspace`).
//!
//! - Data model: `window_sums` is `PRIMARY KEY ((key, bucket), window_start,
//!   partition)`. A key's windows of one bucket (a day by default, `--scylla-bucket`)
//!   share a partition, clustered by window start, so a range read is one paged query
//!   per bucket touched. The bucket size is pinned in the store metadata
//!   ([`BUCKET_METADATA_NAME`]) when the table is first used: a process started with
//!   another one is refused, and so is a table of the earlier per-window layout
//!   (`PRIMARY KEY ((key, window_start), partition)`), with what to do instead.
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
//! - Retention (`--retention` on the aggregator): rows are written `USING TTL ?` with
//!   the seconds left until their window's end plus the retention (event time, so a
//!   replay cannot extend it); a row already past it is not written at all.
//!   Checkpoint rows live for the retention after they were saved (`USING TTL`).
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
    DbError, ExecutionError, IntoRowsResultError, NewSessionError, PrepareError,
    RequestAttemptError,
};
use scylla::response::query_result::QueryResult;
use scylla::response::PagingState;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use scylla::value::CqlTimestamp;
use tally_schemas::Checkpoint;
use uuid::Uuid;

use crate::error::SinkError;
use crate::row::{bucket_of, WindowRow};
use crate::store::{
    checkpoints_to_prune, effective_retention, pin_bucket, CheckpointScope, ScyllaOptions,
    StoreOptions, WindowStore, BUCKET_METADATA_NAME, CHECKPOINTS_KEPT,
};

/// A read may touch at most this many buckets (ranges are bounded by the callers
/// long before: the read API's maximum range is a month).
pub const MAX_READ_BUCKETS: i64 = 10_000;

/// Rows per page of a range read.
const READ_PAGE_ROWS: usize = 5_000;

/// Upper bound on pages read while looking for checkpoints to prune (normally one).
const PRUNE_MAX_PAGES: usize = 16;

/// How long the driver waits to open a connection to a node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest TTL ScyllaDB accepts (20 years, in seconds).
pub const MAX_TTL_SECONDS: i32 = 630_720_000;

/// The scope the probe writes to: partition -1 is never a Kafka partition, so it
/// cannot collide with a real checkpoint.
const PROBE_GROUP: &str = "tally.probe";
const PROBE_TOPIC: &str = "tally.probe";
const PROBE_PARTITION: i32 = -1;

/// `window_sums` as this build expects it: partition key, then clustering columns.
const PARTITION_KEY: [&str; 2] = ["key", "bucket"];
const CLUSTERING_KEY: [&str; 2] = ["window_start", "partition"];

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
    CqlTimestamp,
    i32,
    CqlTimestamp,
    i64,
    i64,
    bool,
    i64,
    i32,
);

/// The same with the TTL (`USING TTL ?`) last.
type RowValuesWithTtl = (
    Uuid,
    CqlTimestamp,
    CqlTimestamp,
    i32,
    CqlTimestamp,
    i64,
    i64,
    bool,
    i64,
    i32,
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
    bucket_ms: i64,
    /// The retention rows are written with (ms), if any.
    retention_ms: Option<i64>,
    insert_row: PreparedStatement,
    insert_row_ttl: PreparedStatement,
    select_range: PreparedStatement,
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
            .field("bucket_ms", &self.bucket_ms)
            .field("retention_ms", &self.retention_ms)
            .finish_non_exhaustive()
    }
}

impl ScyllaStore {
    /// [`connect_with`](Self::connect_with) with the default bucket, as a reader.
    pub async fn connect(
        nodes: &[String],
        keyspace: &str,
        options: &ScyllaOptions,
    ) -> Result<Self, SinkError> {
        Self::connect_with(nodes, keyspace, &StoreOptions::from(options.clone())).await
    }

    /// Connects to `nodes`, creates `keyspace` (with `options.scylla.replication`) and
    /// the tables if missing, refuses a table of another layout, pins or checks the
    /// bucket, records or reads the retention, and prepares every statement.
    pub async fn connect_with(
        nodes: &[String],
        keyspace: &str,
        store_options: &StoreOptions,
    ) -> Result<Self, SinkError> {
        let options = &store_options.scylla;
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
        check_layout(&session, keyspace).await?;

        let prepare = |cql: String| prepare_on(&session, consistency, cql);
        let ks = keyspace;
        let insert_columns = "key, bucket, window_start, partition, window_end, sum, count, final, through_offset, generation";
        let row_columns = "key, window_start, partition, window_end, sum, count, final, through_offset, generation";
        let checkpoint_columns =
            "next_offset, max_ts, closed_through, generation, window_ms, grace_ms, external_reset";
        let checkpoint_scope = "consumer_group = ? AND topic = ? AND partition = ?";
        let insert_checkpoint_cql = |ttl: Option<i32>| {
            let using = ttl.map_or_else(String::new, |seconds| format!(" USING TTL {seconds}"));
            format!(
                "INSERT INTO {ks}.tally_checkpoints (consumer_group, topic, partition, {checkpoint_columns}) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?){using}"
            )
        };

        let insert_row = prepare(format!(
            "INSERT INTO {ks}.window_sums ({insert_columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .await?;
        let insert_row_ttl = prepare(format!(
            "INSERT INTO {ks}.window_sums ({insert_columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?"
        ))
        .await?;
        let select_range = prepare(format!(
            "SELECT {row_columns} FROM {ks}.window_sums \
             WHERE key = ? AND bucket = ? AND window_start >= ? AND window_start < ?"
        ))
        .await?;
        let insert_checkpoint = prepare(insert_checkpoint_cql(None)).await?;
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

        let mut store = ScyllaStore {
            session,
            description: format!("scylla://{}/{keyspace}", nodes.join(",")),
            max_concurrency: options.max_concurrency,
            bucket_ms: store_options.bucket_ms,
            retention_ms: None,
            insert_row,
            insert_row_ttl,
            select_range,
            insert_checkpoint,
            select_checkpoint_exact,
            select_checkpoint_latest,
            select_checkpoint_offsets,
            delete_checkpoint,
            select_metadata,
            insert_metadata_revision,
        };
        store.bucket_ms = pin_bucket(&store, store_options.bucket_ms).await?;
        store.retention_ms = effective_retention(&store, store_options.retention).await?;
        if let Some(retention_ms) = store.retention_ms {
            store.insert_checkpoint = prepare_on(
                &store.session,
                consistency,
                insert_checkpoint_cql(Some(ttl_of(retention_ms))),
            )
            .await?;
        }
        store.check_types()?;
        Ok(store)
    }

    /// The bucket rows are partitioned by (ms).
    pub fn bucket_ms(&self) -> i64 {
        self.bucket_ms
    }

    /// The retention rows are written with (ms), if any.
    pub fn retention_ms(&self) -> Option<i64> {
        self.retention_ms
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
            .bind(&row_values(&sample, 0))
            .map_err(|err| mismatch("window_sums columns", &err))?;
        if self.retention_ms.is_some() {
            // A server that drops `USING TTL ?` from the statement (reporting one bind
            // marker fewer) fails here instead of silently keeping rows forever.
            self.insert_row_ttl
                .clone()
                .bind(&row_values_with_ttl(&sample, 0, 1))
                .map_err(|err| mismatch("window_sums insert USING TTL", &err))?;
        }
        let checkpoint = Checkpoint::fresh(0);
        self.insert_checkpoint
            .clone()
            .bind(&checkpoint_values(PROBE_GROUP, PROBE_TOPIC, 0, &checkpoint))
            .map_err(|err| mismatch("tally_checkpoints columns", &err))?;
        self.select_range
            .clone()
            .bind(&(
                Uuid::nil(),
                CqlTimestamp(0),
                CqlTimestamp(0),
                CqlTimestamp(0),
            ))
            .map_err(|err| mismatch("window_sums range read", &err))?;
        for (statement, check) in [
            (&self.select_range, type_check::<RawRow> as TypeCheck),
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

    async fn write_row(&self, row: &WindowRow, now_ms: i64) -> Result<(), SinkError> {
        let bucket = bucket_of(row.window_start_ms, self.bucket_ms);
        let bound = match self.retention_ms {
            None => self.insert_row.clone().bind(&row_values(row, bucket)),
            Some(retention_ms) => {
                let Some(ttl) = row_ttl_seconds(row.window_end_ms, retention_ms, now_ms) else {
                    // Already past retention: readers treat it as gone, and a TTL of 0
                    // would mean "forever".
                    return Ok(());
                };
                self.insert_row_ttl
                    .clone()
                    .bind(&row_values_with_ttl(row, bucket, ttl))
            }
        };
        let mut statement =
            bound.map_err(|err| SinkError::Schema(format!("binding a window_sums row: {err}")))?;
        // The version is the write timestamp (the protocol's "microseconds"; only
        // its order matters): ScyllaDB keeps the highest, whatever the arrival order.
        statement.set_timestamp(Some(row.version()));
        self.session
            .execute_bound_unpaged(&statement)
            .await
            .map_err(|err| execution_error("writing window_sums", err))?;
        Ok(())
    }

    /// The rows of one key and bucket in `[from_ms, to_ms)`, appended to `rows` until
    /// it holds `limit`. Returns false when `limit` was reached.
    async fn read_bucket(
        &self,
        key: Uuid,
        bucket: i64,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
        rows: &mut Vec<WindowRow>,
    ) -> Result<bool, SinkError> {
        let mut paging_state = PagingState::start();
        let mut found = Vec::new();
        loop {
            let wanted = limit
                .saturating_sub(rows.len() + found.len())
                .clamp(1, READ_PAGE_ROWS);
            let mut statement = self.select_range.clone();
            statement.set_page_size(i32::try_from(wanted).unwrap_or(i32::MAX));
            let (result, next_page) = self
                .session
                .execute_single_page(
                    &statement,
                    (
                        key,
                        CqlTimestamp(bucket),
                        CqlTimestamp(from_ms),
                        CqlTimestamp(to_ms),
                    ),
                    paging_state,
                )
                .await
                .map_err(|err| execution_error("reading window_sums", err))?;
            for raw in rows_of::<RawRow>(result)? {
                let row = row_from_raw(raw)?;
                // What the CQL restricts already; kept so the answer does not depend
                // on the server honouring every restriction (the CQL test node reads
                // whole partitions).
                if row.window_start_ms >= from_ms && row.window_start_ms < to_ms {
                    found.push(row);
                }
            }
            if rows.len() + found.len() >= limit {
                break;
            }
            match next_page.into_paging_control_flow() {
                ControlFlow::Continue(state) => paging_state = state,
                ControlFlow::Break(()) => break,
            }
        }
        found.sort_by_key(|row| (row.window_start_ms, row.partition));
        let room = limit.saturating_sub(rows.len());
        let complete = found.len() < room || (found.len() == room && room == 0);
        found.truncate(room);
        rows.extend(found);
        Ok(complete && rows.len() < limit)
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
        let now_ms = crate::store::now_ms();
        // Stops at the first failure (dropping the statements still in flight): the
        // caller retries the whole call, which is harmless since upserts are versioned.
        futures::stream::iter(rows.iter().map(Ok))
            .try_for_each_concurrent(self.max_concurrency, |row| self.write_row(row, now_ms))
            .await
    }

    async fn read_rows(
        &self,
        key: Uuid,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<WindowRow>, SinkError> {
        let mut rows = Vec::new();
        for (bucket, from, to) in bucket_ranges(from_ms, to_ms, self.bucket_ms)? {
            if limit == 0
                || !self
                    .read_bucket(key, bucket, from, to, limit, &mut rows)
                    .await?
            {
                break;
            }
        }
        Ok(rows)
    }

    async fn scan_rows(
        &self,
        from_ms: i64,
        to_ms: i64,
        keys: &[Uuid],
    ) -> Result<Vec<WindowRow>, SinkError> {
        // Checked once up front, so a bad range fails before any query.
        bucket_ranges(from_ms, to_ms, self.bucket_ms)?;
        let mut rows: Vec<WindowRow> = futures::stream::iter(keys.iter().copied())
            .map(|key| self.read_rows(key, from_ms, to_ms, usize::MAX))
            .buffer_unordered(self.max_concurrency)
            .try_concat()
            .await?;
        rows.sort_by_key(|row| (row.window_start_ms, row.key, row.partition));
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

/// Prepares `cql` with the configured consistency.
async fn prepare_on(
    session: &Session,
    consistency: Consistency,
    cql: String,
) -> Result<PreparedStatement, SinkError> {
    let mut statement = session
        .prepare(cql.as_str())
        .await
        .map_err(|err| prepare_error(&cql, err))?;
    statement.set_consistency(consistency);
    // Every statement here is safe to repeat: upserts carry a fixed timestamp, reads
    // and deletes are naturally idempotent.
    statement.set_is_idempotent(true);
    Ok(statement)
}

/// The DDL run at connect, all idempotent (`IF NOT EXISTS`).
fn schema_statements(keyspace: &str, replication: &str) -> [String; 4] {
    [
        format!("CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.window_sums (key uuid, bucket timestamp, \
             window_start timestamp, partition int, window_end timestamp, sum bigint, count bigint, \
             final boolean, through_offset bigint, generation int, \
             PRIMARY KEY ((key, bucket), window_start, partition)) \
             WITH CLUSTERING ORDER BY (window_start ASC, partition ASC)"
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

/// Refuses a `window_sums` whose primary key is not this build's (`CREATE TABLE IF NOT
/// EXISTS` leaves an existing table as it is), naming the earlier layout and what to do.
async fn check_layout(session: &Session, keyspace: &str) -> Result<(), SinkError> {
    let result = session
        .query_unpaged(
            "SELECT column_name, kind FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ?",
            (keyspace, "window_sums"),
        )
        .await
        .map_err(|err| execution_error("reading the window_sums layout", err))?;
    let columns = rows_of::<(String, Option<String>)>(result)?;
    layout_problem(keyspace, &columns).map_or(Ok(()), |problem| Err(SinkError::Schema(problem)))
}

/// What is wrong with a `window_sums` of these (column, kind) pairs, if anything.
pub fn layout_problem(keyspace: &str, columns: &[(String, Option<String>)]) -> Option<String> {
    let of_kind = |kind: &str| -> std::collections::BTreeSet<&str> {
        columns
            .iter()
            .filter(|(_, k)| k.as_deref() == Some(kind))
            .map(|(name, _)| name.as_str())
            .collect()
    };
    let partition_key = of_kind("partition_key");
    let clustering = of_kind("clustering");
    let wanted_partition: std::collections::BTreeSet<&str> = PARTITION_KEY.into_iter().collect();
    let wanted_clustering: std::collections::BTreeSet<&str> = CLUSTERING_KEY.into_iter().collect();
    if partition_key == wanted_partition && clustering == wanted_clustering {
        return None;
    }
    let drop_hint = format!(
        "there is no migration: drop it (`DROP TABLE {keyspace}.window_sums;` and \
         `DELETE FROM {keyspace}.tally_metadata WHERE name = '{BUCKET_METADATA_NAME}';`) or use a \
         new keyspace, then rebuild the rows from Kafka by starting the aggregators with a \
         new consumer group (--group)"
    );
    let old_partition: std::collections::BTreeSet<&str> =
        ["key", "window_start"].into_iter().collect();
    if partition_key == old_partition {
        return Some(format!(
            "table {keyspace}.window_sums has the layout of an earlier Tally build, \
             PRIMARY KEY ((key, window_start), partition), which needs one query per window \
             to read a range; this build reads and writes PRIMARY KEY ((key, bucket), \
             window_start, partition); {drop_hint}"
        ));
    }
    Some(format!(
        "table {keyspace}.window_sums has partition key {partition_key:?} and clustering \
         columns {clustering:?}; this build expects PRIMARY KEY ((key, bucket), window_start, \
         partition); {drop_hint}"
    ))
}

/// One page holds the kept checkpoints plus the one to prune.
fn page_size_for_prune() -> i32 {
    i32::try_from(CHECKPOINTS_KEPT + 1).unwrap_or(i32::MAX)
}

/// The buckets a read of `[from_ms, to_ms)` touches, oldest first, each with the part
/// of the range inside it: `(bucket start, from, to)`.
pub fn bucket_ranges(
    from_ms: i64,
    to_ms: i64,
    bucket_ms: i64,
) -> Result<Vec<(i64, i64, i64)>, SinkError> {
    if bucket_ms <= 0 {
        return Err(SinkError::Config(format!(
            "bucket size must be positive, got {bucket_ms} ms"
        )));
    }
    if from_ms >= to_ms {
        return Ok(Vec::new());
    }
    // i128: the arithmetic near i64's ends must not overflow.
    let (from, to, bucket) = (
        i128::from(from_ms),
        i128::from(to_ms),
        i128::from(bucket_ms),
    );
    let first = from.div_euclid(bucket) * bucket;
    let last = (to - 1).div_euclid(bucket) * bucket;
    let count = (last - first) / bucket + 1;
    if count > i128::from(MAX_READ_BUCKETS) {
        return Err(SinkError::Config(format!(
            "reading [{from_ms}, {to_ms}) would query {count} buckets of {bucket_ms} ms \
             (at most {MAX_READ_BUCKETS}); narrow the range"
        )));
    }
    let clamp =
        |value: i128| i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX });
    Ok((0..count)
        .map(|i| {
            let start = first + i * bucket;
            (
                clamp(start),
                clamp(start.max(from)),
                clamp((start + bucket).min(to)),
            )
        })
        .collect())
}

/// Seconds a row of a window ending at `window_end_ms` has left under a retention of
/// `retention_ms` at `now_ms` (rounded up, at most [`MAX_TTL_SECONDS`]); `None` when it
/// is already past it.
pub fn row_ttl_seconds(window_end_ms: i64, retention_ms: i64, now_ms: i64) -> Option<i32> {
    if crate::row::is_expired(window_end_ms, retention_ms, now_ms) {
        return None;
    }
    let left_ms = i128::from(window_end_ms) + i128::from(retention_ms) - i128::from(now_ms);
    let seconds = (left_ms + 999) / 1000;
    Some(i32::try_from(seconds.min(i128::from(MAX_TTL_SECONDS))).unwrap_or(MAX_TTL_SECONDS))
}

/// A retention as a TTL in seconds (rounded up, at most [`MAX_TTL_SECONDS`]).
fn ttl_of(retention_ms: i64) -> i32 {
    let seconds = (i128::from(retention_ms) + 999) / 1000;
    i32::try_from(seconds.clamp(1, i128::from(MAX_TTL_SECONDS))).unwrap_or(MAX_TTL_SECONDS)
}

fn row_values(row: &WindowRow, bucket: i64) -> RowValues {
    (
        row.key,
        CqlTimestamp(bucket),
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

fn row_values_with_ttl(row: &WindowRow, bucket: i64, ttl: i32) -> RowValuesWithTtl {
    let v = row_values(row, bucket);
    (v.0, v.1, v.2, v.3, v.4, v.5, v.6, v.7, v.8, v.9, ttl)
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

    const DAY: i64 = 86_400_000;

    #[test]
    fn bucket_ranges_split_the_range_at_bucket_boundaries() {
        assert_eq!(
            bucket_ranges(DAY + 5, DAY + 10, DAY).unwrap(),
            vec![(DAY, DAY + 5, DAY + 10)]
        );
        assert_eq!(
            bucket_ranges(DAY - 5, 2 * DAY, DAY).unwrap(),
            vec![(0, DAY - 5, DAY), (DAY, DAY, 2 * DAY)]
        );
        assert_eq!(
            bucket_ranges(-5, 5, DAY).unwrap(),
            vec![(-DAY, -5, 0), (0, 0, 5)]
        );
        assert!(bucket_ranges(5, 5, DAY).unwrap().is_empty());
        assert!(bucket_ranges(6, 5, DAY).unwrap().is_empty());
        // A month of day buckets is 31 queries (or 32 when not aligned).
        assert_eq!(bucket_ranges(0, 31 * DAY, DAY).unwrap().len(), 31);
        assert_eq!(bucket_ranges(1, 31 * DAY + 1, DAY).unwrap().len(), 32);
    }

    #[test]
    fn bucket_ranges_refuse_huge_ranges_and_bad_sizes() {
        assert!(matches!(
            bucket_ranges(i64::MIN, i64::MAX, DAY),
            Err(SinkError::Config(_))
        ));
        assert_eq!(
            bucket_ranges(0, MAX_READ_BUCKETS * DAY, DAY).unwrap().len() as i64,
            MAX_READ_BUCKETS
        );
        assert!(bucket_ranges(0, (MAX_READ_BUCKETS + 1) * DAY, DAY).is_err());
        assert!(matches!(bucket_ranges(0, 10, 0), Err(SinkError::Config(_))));
        // Near i64's ends nothing overflows.
        let near_end = bucket_ranges(i64::MAX - 10, i64::MAX, DAY).unwrap();
        assert_eq!(near_end.len(), 1);
        assert_eq!(near_end[0].2, i64::MAX);
    }

    #[test]
    fn row_ttl_counts_from_the_window_end_and_skips_expired_rows() {
        let retention = 7 * DAY;
        let end = 1_790_000_000_000;
        assert_eq!(row_ttl_seconds(end, retention, end), Some(7 * 86_400));
        // Rounded up: a row with 1 ms left still gets a second.
        assert_eq!(
            row_ttl_seconds(end, retention, end + retention - 1),
            Some(1)
        );
        assert_eq!(row_ttl_seconds(end, retention, end + retention), None);
        assert_eq!(row_ttl_seconds(end, retention, end + retention + 1), None);
        // A replay (a later wall clock) only shortens it.
        assert_eq!(row_ttl_seconds(end, retention, end + DAY), Some(6 * 86_400));
        assert_eq!(row_ttl_seconds(end, i64::MAX, end), Some(MAX_TTL_SECONDS));
        assert_eq!(ttl_of(1), 1);
        assert_eq!(ttl_of(DAY), 86_400);
        assert_eq!(ttl_of(i64::MAX), MAX_TTL_SECONDS);
    }

    #[test]
    fn the_earlier_layout_is_named_and_refused() {
        let kinds = |pairs: &[(&str, &str)]| -> Vec<(String, Option<String>)> {
            pairs
                .iter()
                .map(|(n, k)| ((*n).to_owned(), Some((*k).to_owned())))
                .collect()
        };
        let current = kinds(&[
            ("key", "partition_key"),
            ("bucket", "partition_key"),
            ("window_start", "clustering"),
            ("partition", "clustering"),
            ("sum", "regular"),
        ]);
        assert_eq!(layout_problem("ks", &current), None);
        let old = kinds(&[
            ("key", "partition_key"),
            ("window_start", "partition_key"),
            ("partition", "clustering"),
            ("sum", "regular"),
        ]);
        let problem = layout_problem("ks", &old).unwrap();
        assert!(problem.contains("earlier Tally build"), "{problem}");
        assert!(problem.contains("DROP TABLE ks.window_sums"), "{problem}");
        let other = kinds(&[("key", "partition_key"), ("bucket", "clustering")]);
        assert!(layout_problem("ks", &other).unwrap().contains("expects"));
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
