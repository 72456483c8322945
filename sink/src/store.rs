//! The window store trait and store addressing.

use std::ops::ControlFlow;
use std::sync::Arc;

use async_trait::async_trait;
use tally_schemas::{Checkpoint, PinnedSettings, SumSettings};
use uuid::Uuid;

use crate::error::SinkError;
use crate::row::{WindowRow, WindowTotal};

/// Identifies whose checkpoint a checkpoint row is: one consumer group's view of one
/// partition of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckpointScope {
    pub group: String,
    pub topic: String,
    pub partition: i32,
}

/// A durable home for window rows and per-partition checkpoints.
///
/// Every write is an absolute, version-guarded upsert: a row replaces the stored row
/// of the same (key, window_start, partition) only if its [`WindowRow::version`] is
/// higher. Writing the same rows twice, or in any order, leaves the same result.
#[async_trait]
pub trait WindowStore: Send + Sync + 'static {
    /// Durably writes the rows (all or some may already be there). Returns only
    /// once every row is durable; on error, any subset may have been written.
    async fn write_rows(&self, rows: &[WindowRow]) -> Result<(), SinkError>;

    /// The first rows (at most `limit`, at least 1 is asked) of `key` whose window
    /// starts in `[from_ms, to_ms)`, ordered by (window_start, partition). An answer of
    /// `limit` rows may stop inside a window: continue from that window's start (see
    /// [`visit_windows`], which does this). One range query per ScyllaDB bucket
    /// touched, one index range on SQLite.
    async fn read_rows(
        &self,
        key: Uuid,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<WindowRow>, SinkError>;

    /// The rows whose window starts in `[from_ms, to_ms)`, for `tally verify`: at least
    /// those of `keys`. SQLite scans the time range (every key, so rows no key of the
    /// log explains show up too); ScyllaDB, which cannot range-scan time without reading
    /// the whole table, reads each key's buckets of the range.
    async fn scan_rows(
        &self,
        from_ms: i64,
        to_ms: i64,
        keys: &[Uuid],
    ) -> Result<Vec<WindowRow>, SinkError>;

    /// Records the checkpoint that a Kafka commit at `checkpoint.next_offset` stands
    /// for. Written before the Kafka commit, so brokers that drop commit metadata
    /// still let a restart find its replay state. Rows are keyed by offset *and*
    /// generation: a late save from an older run never replaces a newer run's row at
    /// the same offset (a lookup takes the highest generation).
    async fn save_checkpoint(
        &self,
        scope: &CheckpointScope,
        checkpoint: &Checkpoint,
    ) -> Result<(), SinkError>;

    /// The checkpoint saved for exactly `next_offset`, or with `None` the latest one:
    /// the highest generation, then the highest `next_offset` (a group whose offsets
    /// expired resumes from it; an external offset reset takes a generation above it).
    async fn load_checkpoint(
        &self,
        scope: &CheckpointScope,
        next_offset: Option<i64>,
    ) -> Result<Option<Checkpoint>, SinkError>;

    /// A store-wide metadata entry (small text, such as the pinned settings), if set.
    async fn load_metadata(&self, name: &str) -> Result<Option<String>, SinkError>;

    /// Sets the entry `name` to `value` if it holds `expected` now (`None`: unset).
    /// Returns `false`, writing nothing, if it holds something else: another process
    /// got there first, so reload and decide again.
    async fn compare_and_set_metadata(
        &self,
        name: &str,
        expected: Option<&str>,
        value: &str,
    ) -> Result<bool, SinkError>;

    /// A cheap round trip that succeeds only if writes would (circuit-breaker probe).
    async fn probe(&self) -> Result<(), SinkError>;

    /// Where the store is, for logs and `tally dev`'s banner (no secrets).
    fn describe(&self) -> String;
}

/// The settings pinned in `store`, or `None` for a store no aggregator has used yet.
pub async fn load_settings(store: &dyn WindowStore) -> Result<Option<PinnedSettings>, SinkError> {
    store
        .load_metadata(PinnedSettings::METADATA_NAME)
        .await?
        .map(|text| {
            PinnedSettings::from_json(&text).map_err(|err| {
                SinkError::Schema(format!("{}: {err}", PinnedSettings::METADATA_NAME))
            })
        })
        .transpose()
}

/// Pins `configured` in a store used for the first time, or checks it against what
/// the store pinned: a mismatch is a [`SinkError::Config`] naming both values.
pub async fn pin_settings(
    store: &dyn WindowStore,
    configured: SumSettings,
) -> Result<PinnedSettings, SinkError> {
    // Two processes may pin at once: the compare-and-set lets exactly one win, and
    // the loser checks against the winner's values.
    for _ in 0..3 {
        if let Some(pinned) = load_settings(store).await? {
            pinned
                .check(configured)
                .map_err(|err| SinkError::Config(err.to_string()))?;
            return Ok(pinned);
        }
        let fresh =
            PinnedSettings::new(configured).map_err(|err| SinkError::Config(err.to_string()))?;
        if store
            .compare_and_set_metadata(PinnedSettings::METADATA_NAME, None, &fresh.to_json())
            .await?
        {
            return Ok(fresh);
        }
    }
    Err(SinkError::Unavailable(
        "the pinned settings kept changing while being read".into(),
    ))
}

/// The store metadata entry pinning the ScyllaDB partition bucket (kept apart from
/// [`PinnedSettings::METADATA_NAME`]): `{"bucket_ms": 86400000}`.
pub const BUCKET_METADATA_NAME: &str = "window_sums_bucket";

/// The store metadata entry recording the retention the aggregators enforce:
/// `{"retention_ms": 604800000}`, or `{"retention_ms": null}` when rows are kept forever.
pub const RETENTION_METADATA_NAME: &str = "window_sums_retention";

/// The default ScyllaDB bucket: one day.
pub const DEFAULT_BUCKET_MS: i64 = 86_400_000;

/// What a process does about retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retention {
    /// A reader (`tally ingest`, `query`, `verify`, `replay`): the retention the
    /// aggregators recorded in the store is what holds.
    #[default]
    AsRecorded,
    /// A writer (`tally aggregator`): keep window rows this many ms after their window
    /// ended (`None`: forever), and record it in the store for the readers.
    Enforce(Option<i64>),
}

/// How to open a store, beyond its address.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Settings only the ScyllaDB backend uses.
    pub scylla: ScyllaOptions,
    /// ScyllaDB's partition bucket in ms (pinned in the store on first use; a process
    /// started with another value is refused). SQLite has no buckets and ignores it.
    pub bucket_ms: i64,
    pub retention: Retention,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            scylla: ScyllaOptions::default(),
            bucket_ms: DEFAULT_BUCKET_MS,
            retention: Retention::AsRecorded,
        }
    }
}

impl From<ScyllaOptions> for StoreOptions {
    fn from(scylla: ScyllaOptions) -> Self {
        StoreOptions {
            scylla,
            ..StoreOptions::default()
        }
    }
}

/// Pins `bucket_ms` in a store used for the first time, or checks it against the pinned
/// one: a mismatch is a [`SinkError::Config`] naming both.
pub async fn pin_bucket(store: &dyn WindowStore, bucket_ms: i64) -> Result<i64, SinkError> {
    if bucket_ms <= 0 {
        return Err(SinkError::Config(format!(
            "the ScyllaDB bucket must be positive, got {bucket_ms} ms"
        )));
    }
    let wanted = format!("{{\"bucket_ms\":{bucket_ms}}}");
    for _ in 0..3 {
        match store.load_metadata(BUCKET_METADATA_NAME).await? {
            Some(text) => {
                let pinned =
                    parse_ms_entry(BUCKET_METADATA_NAME, &text, "bucket_ms")?.ok_or_else(|| {
                        SinkError::Schema(format!("{BUCKET_METADATA_NAME}: bucket_ms is null"))
                    })?;
                if pinned != bucket_ms {
                    return Err(SinkError::Config(format!(
                        "the store pins a ScyllaDB bucket of {pinned} ms ({}), but this process \
                         was started with {bucket_ms} ms ({}); start it with \
                         --scylla-bucket {} (rows are partitioned by it, so it cannot change \
                         for an existing table)",
                        humanize_ms(pinned),
                        humanize_ms(bucket_ms),
                        humanize_ms(pinned)
                    )));
                }
                return Ok(pinned);
            }
            None => {
                if store
                    .compare_and_set_metadata(BUCKET_METADATA_NAME, None, &wanted)
                    .await?
                {
                    return Ok(bucket_ms);
                }
            }
        }
    }
    Err(SinkError::Unavailable(
        "the pinned bucket kept changing while being read".into(),
    ))
}

/// The retention recorded in `store` by its aggregators (ms; `None`: rows are kept).
pub async fn load_retention(store: &dyn WindowStore) -> Result<Option<i64>, SinkError> {
    match store.load_metadata(RETENTION_METADATA_NAME).await? {
        Some(text) => parse_ms_entry(RETENTION_METADATA_NAME, &text, "retention_ms"),
        None => Ok(None),
    }
}

/// Records `retention_ms` as the store's retention (a writer's setting wins: the last
/// aggregator started decides, and says so in its log when it changed the value).
pub async fn record_retention(
    store: &dyn WindowStore,
    retention_ms: Option<i64>,
) -> Result<(), SinkError> {
    if retention_ms.is_some_and(|ms| ms <= 0) {
        return Err(SinkError::Config(
            "the retention must be positive (leave it unset to keep rows forever)".into(),
        ));
    }
    let wanted = match retention_ms {
        Some(ms) => format!("{{\"retention_ms\":{ms}}}"),
        None => "{\"retention_ms\":null}".to_owned(),
    };
    for _ in 0..3 {
        let current = store.load_metadata(RETENTION_METADATA_NAME).await?;
        if current.as_deref() == Some(wanted.as_str()) {
            return Ok(());
        }
        if store
            .compare_and_set_metadata(RETENTION_METADATA_NAME, current.as_deref(), &wanted)
            .await?
        {
            if let Some(previous) = current {
                tracing::info!(previous = %previous, now = %wanted, "store retention changed");
            }
            return Ok(());
        }
    }
    Err(SinkError::Unavailable(
        "the recorded retention kept changing while being set".into(),
    ))
}

/// The effective retention of a store opened with `retention`.
pub(crate) async fn effective_retention(
    store: &dyn WindowStore,
    retention: Retention,
) -> Result<Option<i64>, SinkError> {
    match retention {
        Retention::Enforce(ms) => {
            record_retention(store, ms).await?;
            Ok(ms)
        }
        Retention::AsRecorded => load_retention(store).await,
    }
}

/// Reads `{"<field>": <ms or null>}`.
fn parse_ms_entry(name: &str, text: &str, field: &str) -> Result<Option<i64>, SinkError> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|err| SinkError::Schema(format!("{name}: {err}: {text}")))?;
    match value.get(field) {
        Some(serde_json::Value::Null) => Ok(None),
        Some(number) => number
            .as_i64()
            .filter(|ms| *ms > 0)
            .map(Some)
            .ok_or_else(|| {
                SinkError::Schema(format!("{name}: {field} is not a positive integer: {text}"))
            }),
        None => Err(SinkError::Schema(format!("{name}: no {field}: {text}"))),
    }
}

/// `86400000` → `1day`, for messages.
pub(crate) fn humanize_ms(ms: i64) -> String {
    u64::try_from(ms)
        .map(|ms| humantime::format_duration(std::time::Duration::from_millis(ms)).to_string())
        .unwrap_or_else(|_| format!("{ms}ms"))
}

/// Wall-clock ms since the epoch (retention is decided against it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Rows per store call when [`visit_windows`] streams a range.
pub const READ_CHUNK_ROWS: usize = 4_096;

/// Streams the windows of `key` starting in `[from_ms, to_ms)`, oldest first, each
/// summed over the partition rows that `keep` accepts (readers drop rows of replaced
/// settings and rows past retention), reading at most `chunk_rows` rows per store call.
/// Stops early when `visit` breaks. Memory stays at one chunk whatever the range.
pub async fn visit_windows(
    store: &dyn WindowStore,
    key: Uuid,
    from_ms: i64,
    to_ms: i64,
    chunk_rows: usize,
    keep: impl Fn(&WindowRow) -> bool,
    mut visit: impl FnMut(WindowTotal) -> ControlFlow<()>,
) -> Result<(), SinkError> {
    let chunk_rows = chunk_rows.max(2);
    let mut cursor = from_ms;
    while cursor < to_ms {
        let mut rows = store.read_rows(key, cursor, to_ms, chunk_rows).await?;
        let next = if rows.len() >= chunk_rows {
            // The chunk may end inside its last window: read that window again with
            // the next chunk, whole.
            let last_start = rows.last().map_or(cursor, |row| row.window_start_ms);
            if rows.first().map(|row| row.window_start_ms) == Some(last_start) {
                return Err(SinkError::BadRow(format!(
                    "window {last_start} of key {key} has {} or more partition rows",
                    rows.len()
                )));
            }
            rows.retain(|row| row.window_start_ms < last_start);
            Some(last_start)
        } else {
            None
        };
        rows.retain(|row| keep(row));
        for window in WindowTotal::from_rows(&rows) {
            if visit(window).is_break() {
                return Ok(());
            }
        }
        match next {
            Some(start) => cursor = start,
            None => break,
        }
    }
    Ok(())
}

/// How many checkpoints at or below the newest saved offset a store keeps per
/// [`CheckpointScope`] (the saved one included). More than one, because a save is
/// followed by a Kafka commit that may fail: the restart then resumes at an earlier
/// commit and must still find that commit's checkpoint.
pub const CHECKPOINTS_KEPT: usize = 8;

/// The checkpoint offsets to delete after saving one at `saved_offset`, given the
/// offsets the store currently holds for the scope (any order, `saved_offset`
/// included or not).
///
/// Keeps `saved_offset` and the [`CHECKPOINTS_KEPT`]` - 1` highest offsets below it;
/// everything lower goes. Offsets *above* `saved_offset` are never pruned here: they
/// belong either to a run abandoned by an offset reset (pruned once later saves pass
/// them) or to another owner of the partition whose checkpoint a delayed save from a
/// revoked owner must not destroy.
pub fn checkpoints_to_prune(saved_offset: i64, stored_offsets: &[i64]) -> Vec<i64> {
    let mut below: Vec<i64> = stored_offsets
        .iter()
        .copied()
        .filter(|&offset| offset < saved_offset)
        .collect();
    below.sort_unstable_by(|a, b| b.cmp(a));
    below.dedup();
    below
        .into_iter()
        .skip(CHECKPOINTS_KEPT.saturating_sub(1))
        .collect()
}

/// A parsed store address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://PATH` (relative or absolute path to the database file).
    Sqlite { path: std::path::PathBuf },
    /// `scylla://host:port[,host:port]/keyspace`.
    Scylla {
        nodes: Vec<String>,
        keyspace: String,
    },
}

impl std::str::FromStr for StoreUrl {
    type Err = SinkError;

    fn from_str(url: &str) -> Result<Self, SinkError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(SinkError::Config("sqlite:// needs a file path".into()));
            }
            return Ok(StoreUrl::Sqlite { path: path.into() });
        }
        if let Some(rest) = url.strip_prefix("scylla://") {
            let (hosts, keyspace) = rest.split_once('/').ok_or_else(|| {
                SinkError::Config(format!(
                    "{url}: expected scylla://host:port[,host:port]/keyspace"
                ))
            })?;
            let nodes: Vec<String> = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(str::to_owned)
                .collect();
            let keyspace_ok = is_valid_keyspace(keyspace);
            if nodes.is_empty() || !keyspace_ok {
                return Err(SinkError::Config(format!(
                    "{url}: expected scylla://host:port[,host:port]/keyspace with a keyspace of letters, digits and _"
                )));
            }
            return Ok(StoreUrl::Scylla {
                nodes,
                keyspace: keyspace.to_owned(),
            });
        }
        Err(SinkError::Config(format!(
            "{url}: unknown store; use sqlite://PATH or scylla://host:port/keyspace"
        )))
    }
}

/// A keyspace name we are willing to put into CQL text: a letter, then letters,
/// digits or `_`, at most 48 characters (ScyllaDB's own limit).
pub(crate) fn is_valid_keyspace(keyspace: &str) -> bool {
    keyspace.len() <= 48
        && keyspace
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
        && keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Settings that only the ScyllaDB backend uses.
#[derive(Debug, Clone)]
pub struct ScyllaOptions {
    /// Replication clause used when the keyspace is created, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}`.
    pub replication: String,
    /// Consistency level name for writes and reads (default `LOCAL_QUORUM`).
    pub consistency: String,
    /// Maximum concurrent statements in flight from one `write_rows` call.
    pub max_concurrency: usize,
    /// Username/password authentication, when the cluster requires it.
    pub auth: Option<crate::scylla_session::ScyllaAuth>,
    /// TLS to every node, when set.
    pub tls: Option<crate::scylla_session::ScyllaTls>,
    /// Route requests only to this datacenter (token and shard aware within it).
    pub local_dc: Option<String>,
}

impl Default for ScyllaOptions {
    fn default() -> Self {
        ScyllaOptions {
            replication: "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}".into(),
            consistency: "LOCAL_QUORUM".into(),
            max_concurrency: 256,
            auth: None,
            tls: None,
            local_dc: None,
        }
    }
}

/// Opens (and creates if missing) the store at `url`.
pub async fn open_store(
    url: &str,
    options: &StoreOptions,
) -> Result<Arc<dyn WindowStore>, SinkError> {
    match url.parse::<StoreUrl>()? {
        StoreUrl::Sqlite { path } => Ok(Arc::new(
            crate::sqlite::SqliteStore::open_with(&path, options).await?,
        )),
        StoreUrl::Scylla { nodes, keyspace } => Ok(Arc::new(
            crate::scylla_store::ScyllaStore::connect_with(&nodes, &keyspace, options).await?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_saved_offset_and_the_newest_below_it() {
        let stored: Vec<i64> = (0..20).map(|i| i * 10).collect();
        let pruned = checkpoints_to_prune(190, &stored);
        // 190 plus the 7 highest below it (180..=120) stay.
        let expected: Vec<i64> = (0..12).rev().map(|i| i * 10).collect();
        assert_eq!(pruned, expected);
        assert!(checkpoints_to_prune(190, &stored[12..]).is_empty());
    }

    #[test]
    fn prune_never_touches_offsets_above_the_saved_one() {
        // A reset back to 5 (or a late save from a revoked owner) leaves 100..=170 alone.
        let stored = [100, 110, 120, 130, 140, 150, 160, 170, 5, 4, 3, 2, 1, 0];
        let pruned = checkpoints_to_prune(5, &stored);
        assert_eq!(pruned, Vec::<i64>::new());
        let stored = [100, 110, 120, 130, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0];
        assert_eq!(checkpoints_to_prune(9, &stored), vec![1, 0]);
    }

    #[test]
    fn prune_with_few_checkpoints_is_empty() {
        assert!(checkpoints_to_prune(7, &[]).is_empty());
        assert!(checkpoints_to_prune(7, &[7, 6, 5]).is_empty());
    }
}
