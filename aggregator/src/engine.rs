//! The window engine: one pure state machine per Kafka partition.
//!
//! It turns the partition's records, read in offset order, into exact per-key sums
//! over event-time tumbling windows. It does no I/O and never reads a clock: the
//! wall-clock time needed for the future-timestamp check is passed in.
//!
//! # Decisions (DESIGN.md, "Windows and time")
//! A record at event time `ts` falls into the window `[start, start + W)` with
//! `start = floor(ts / W)·W`. Per partition, `max_ts` is the largest event time of
//! the records counted so far and `watermark = max_ts − grace`; a window closes when
//! `watermark ≥ its end`. [`PartitionEngine::record`] decides, in this order:
//! 1. `ts < 0` → [`RejectReason::InvalidTimestamp`];
//! 2. `ts > now + max_future_skew` → [`RejectReason::FutureTimestamp`];
//! 3. the window end is not representable as an i64 → `InvalidTimestamp`;
//! 4. window end ≤ watermark → [`RejectReason::Late`];
//! 5. window end ≤ the closed-through boundary (windows already final in the store
//!    from an earlier run, or frozen by an external offset reset) →
//!    [`RecordOutcome::AlreadyFinal`]: the record moves `max_ts` exactly as the run
//!    that counted it did, but nothing is written;
//! 6. the window's sum would overflow i64 → [`RejectReason::SumOverflow`];
//! 7. otherwise [`RecordOutcome::Counted`].
//!
//! Rejected records never move `max_ts`, so lateness is decided from the log alone.
//!
//! # Why a restart or a replay is exact
//! * Every row is a pure function of the log: a provisional row written "through
//!   offset X" holds the sum of exactly the records counted into its window at
//!   offsets ≤ X, and a final row carries the offset of the record whose processing
//!   closed its window (not the flush time). Two runs of the same generation that
//!   write the same (key, window, partition, through_offset) write the same row, and
//!   a row with a higher `through_offset` is at least as complete. The store keeps
//!   only the highest version (generation, through_offset, final), so duplicate,
//!   reordered or late ("zombie") writes can never make a row less complete.
//! * The checkpoint of a flush resumes at the first offset of the earliest (by
//!   offset) window that is still open, with `max_ts` as it stood just before that
//!   offset. Every record of an open window is at or after that offset, so open
//!   windows are rebuilt completely; records of windows that were already closed
//!   replay as `AlreadyFinal` (their final rows are durable once the flush is), and
//!   late records replay as late because `max_ts` evolves exactly as in the live run.

use std::collections::BTreeMap;
use std::mem::size_of;

use hashbrown::HashMap;
use tally_schemas::{Checkpoint, RejectReason, SumSettings};
use tally_sink::WindowRow;
use uuid::Uuid;

/// Default tumbling window length (DESIGN.md): 10 s.
pub const DEFAULT_WINDOW_MS: i64 = 10_000;
/// Default grace: a window closes 2 s of event time after its end.
pub const DEFAULT_GRACE_MS: i64 = 2_000;
/// Default allowance for producer clocks running ahead of ours: 5 min.
pub const DEFAULT_MAX_FUTURE_SKEW_MS: i64 = 300_000;

/// Window length, grace and future-skew allowance, all in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tumbling window length; must be > 0.
    pub window_ms: i64,
    /// How far event time must pass a window's end before it closes; must be ≥ 0.
    pub grace_ms: i64,
    /// How far ahead of the wall clock an event time may be; must be ≥ 0.
    pub max_future_skew_ms: i64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            window_ms: DEFAULT_WINDOW_MS,
            grace_ms: DEFAULT_GRACE_MS,
            max_future_skew_ms: DEFAULT_MAX_FUTURE_SKEW_MS,
        }
    }
}

/// A configuration the engine cannot work with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EngineConfigError {
    #[error("window length must be positive, got {0} ms")]
    NonPositiveWindow(i64),
    #[error("grace must not be negative, got {0} ms")]
    NegativeGrace(i64),
    #[error("max future skew must not be negative, got {0} ms")]
    NegativeFutureSkew(i64),
}

/// One tumbling window `[start_ms, end_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
}

impl EngineConfig {
    /// A validated configuration.
    pub fn new(
        window_ms: i64,
        grace_ms: i64,
        max_future_skew_ms: i64,
    ) -> Result<Self, EngineConfigError> {
        let config = EngineConfig {
            window_ms,
            grace_ms,
            max_future_skew_ms,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks window > 0, grace ≥ 0 and skew ≥ 0.
    pub fn validate(&self) -> Result<(), EngineConfigError> {
        if self.window_ms <= 0 {
            return Err(EngineConfigError::NonPositiveWindow(self.window_ms));
        }
        if self.grace_ms < 0 {
            return Err(EngineConfigError::NegativeGrace(self.grace_ms));
        }
        if self.max_future_skew_ms < 0 {
            return Err(EngineConfigError::NegativeFutureSkew(
                self.max_future_skew_ms,
            ));
        }
        Ok(())
    }

    /// The nearest valid configuration (used by [`PartitionEngine::new`], which
    /// cannot fail: a caller that skipped [`EngineConfig::validate`] still gets
    /// well-defined arithmetic).
    fn sanitized(self) -> Self {
        EngineConfig {
            window_ms: self.window_ms.max(1),
            grace_ms: self.grace_ms.max(0),
            max_future_skew_ms: self.max_future_skew_ms.max(0),
        }
    }

    /// The window containing `timestamp_ms`, or `None` when its start or end would
    /// not fit in an i64 (event times within one window length of the i64 limits).
    pub fn window_containing(&self, timestamp_ms: i64) -> Option<Window> {
        let window_ms = self.window_ms.max(1);
        // div_euclid floors towards −∞, so negative times get the window below them.
        let start_ms = timestamp_ms.div_euclid(window_ms).checked_mul(window_ms)?;
        let end_ms = start_ms.checked_add(window_ms)?;
        Some(Window { start_ms, end_ms })
    }

    /// The settings that decide sums (pinned in checkpoints and in the store).
    pub fn sum_settings(&self) -> SumSettings {
        SumSettings {
            window_ms: self.window_ms,
            grace_ms: self.grace_ms,
        }
    }

    /// The smallest window boundary ≥ `time_ms` (saturating at `i64::MAX`).
    fn boundary_at_or_after(&self, time_ms: i64) -> i64 {
        let window_ms = self.window_ms.max(1);
        let past_boundary = time_ms.rem_euclid(window_ms);
        if past_boundary == 0 {
            time_ms
        } else {
            time_ms
                .checked_add(window_ms - past_boundary)
                .unwrap_or(i64::MAX)
        }
    }
}

/// Where a partition's engine starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Normal restart / assignment: state from the commit metadata or store checkpoint.
    Checkpoint(Checkpoint),
    /// Offsets reset by external tools (no Tally metadata) or `replay --from-offset`:
    /// start at `next_offset` knowing nothing of the history before it. Windows that
    /// records before `next_offset` may have contributed to are frozen (never
    /// rewritten): when the first record with a usable timestamp (the "anchor") is
    /// read, `closed_through` becomes the first window boundary at or after the
    /// anchor's window end + grace, and the anchor itself is `AlreadyFinal`.
    /// `generation` is the new generation to write with.
    ///
    /// Limits, inherent to knowing nothing before the offset: the bound is exact
    /// when the anchor was on time in the run that wrote the store (a record that
    /// run found late says nothing about how far its max_ts had gone), and frozen
    /// windows keep whatever the store holds, so a reset forward past records of a
    /// window that was not yet final leaves that window without them.
    ExternalReset { next_offset: i64, generation: u16 },
}

/// What [`PartitionEngine::record`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Added to its window.
    Counted,
    /// Its window is already final in the store (restored or frozen boundary), or
    /// the offset was already processed (a redelivery): nothing to write or
    /// dead-letter.
    AlreadyFinal,
    /// Not counted; goes to the dead-letter topic with this reason.
    Rejected(RejectReason),
}

/// What one [`PartitionEngine::flush`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flush {
    /// Final rows of windows closed since the last flush and provisional rows of open
    /// windows that changed since the last flush.
    pub rows: Vec<WindowRow>,
    /// The state to commit once `rows` and every earlier flush's rows are durable.
    /// `None` only while an [`Resume::ExternalReset`] has not yet read its anchor
    /// record: nothing is committable then (committing Tally metadata would forget
    /// that the history before the reset offset is unknown). Keep the previous
    /// commit.
    pub checkpoint: Option<Checkpoint>,
}

/// Sum, count and "changed since the last flush" of one key in one window.
///
/// 16 bytes: the count and the dirty flag share one word, so a table entry with its
/// 16-byte key is 32 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Cell {
    sum: i64,
    /// `count << 1 | dirty`.
    count_and_dirty: u64,
}

impl Cell {
    const DIRTY: u64 = 1;

    fn count(self) -> i64 {
        // At most 2^63 − 1 after the shift, so the conversion cannot fail.
        i64::try_from(self.count_and_dirty >> 1).unwrap_or(i64::MAX)
    }

    fn is_dirty(self) -> bool {
        self.count_and_dirty & Self::DIRTY != 0
    }

    fn mark_clean(&mut self) {
        self.count_and_dirty &= !Self::DIRTY;
    }

    /// Adds `value` unless the sum would overflow; returns whether it was added.
    fn try_add(&mut self, value: i64) -> bool {
        let Some(sum) = self.sum.checked_add(value) else {
            return false;
        };
        self.sum = sum;
        // The count cannot realistically reach 2^63; saturate rather than wrap.
        let count = (self.count_and_dirty >> 1)
            .saturating_add(1)
            .min(u64::MAX >> 1);
        self.count_and_dirty = (count << 1) | Self::DIRTY;
        true
    }
}

/// The table of one window: key (as u128, hashed in one step) → cell.
type CellTable = HashMap<u128, Cell>;

/// The open state of one window across all keys.
#[derive(Debug)]
struct WindowGroup {
    /// Offset of the first record counted into this window: every record of the
    /// window is at or after it (offsets arrive in order), so a replay from here
    /// rebuilds the window completely.
    first_offset: i64,
    /// The partition's `max_ts` just before `first_offset`, for the checkpoint.
    max_ts_before_first: Option<i64>,
    cells: CellTable,
    /// How many cells are dirty, so flushes skip unchanged windows without a scan.
    dirty_cells: usize,
}

/// A window closed by the watermark whose final rows have not been flushed yet.
#[derive(Debug)]
struct ClosedWindow {
    start_ms: i64,
    /// Offset of the record whose processing closed the window: the final rows'
    /// `through_offset`, the same in every run whatever the flush timing.
    closing_offset: i64,
    cells: CellTable,
}

/// The window engine of one partition. See the module documentation.
#[derive(Debug)]
pub struct PartitionEngine {
    config: EngineConfig,
    partition: i32,
    generation: u16,
    /// The next offset to process (everything before it has been decided).
    next_offset: i64,
    max_ts: Option<i64>,
    /// Windows ending at or before this are final in the store: never rewritten.
    closed_through: Option<i64>,
    /// After an external reset: the frozen boundary is set by the first usable record.
    awaiting_anchor: bool,
    open: BTreeMap<i64, WindowGroup>,
    closed_unflushed: Vec<ClosedWindow>,
    unflushed_since_ms: Option<i64>,
}

impl PartitionEngine {
    /// An engine for `partition` resuming from `resume`. An invalid `config` is
    /// clamped to the nearest valid one (validate it with [`EngineConfig::new`]).
    pub fn new(config: EngineConfig, partition: i32, resume: Resume) -> Self {
        let (next_offset, max_ts, closed_through, generation, awaiting_anchor) = match resume {
            Resume::Checkpoint(checkpoint) => (
                checkpoint.next_offset,
                checkpoint.max_ts_ms,
                checkpoint.closed_through_ms,
                checkpoint.generation,
                false,
            ),
            Resume::ExternalReset {
                next_offset,
                generation,
            } => (next_offset, None, None, generation, true),
        };
        PartitionEngine {
            config: config.sanitized(),
            partition,
            generation,
            next_offset,
            max_ts,
            closed_through,
            awaiting_anchor,
            open: BTreeMap::new(),
            closed_unflushed: Vec::new(),
            unflushed_since_ms: None,
        }
    }

    /// Decides one decoded, valid increment at `offset` (offsets arrive strictly
    /// increasing, gaps allowed). `now_ms` is the wall clock, used only for the
    /// future-timestamp check. An offset below [`PartitionEngine::next_offset`] was
    /// already decided (a redelivery) and is ignored as `AlreadyFinal`.
    pub fn record(
        &mut self,
        offset: i64,
        key: Uuid,
        timestamp_ms: i64,
        value: i64,
        now_ms: i64,
    ) -> RecordOutcome {
        if offset < self.next_offset {
            return RecordOutcome::AlreadyFinal;
        }
        self.next_offset = offset.saturating_add(1);

        if timestamp_ms < 0 {
            return RecordOutcome::Rejected(RejectReason::InvalidTimestamp);
        }
        if timestamp_ms > now_ms.saturating_add(self.config.max_future_skew_ms) {
            return RecordOutcome::Rejected(RejectReason::FutureTimestamp);
        }
        let Some(window) = self.config.window_containing(timestamp_ms) else {
            return RecordOutcome::Rejected(RejectReason::InvalidTimestamp);
        };
        if self.awaiting_anchor {
            self.anchor_external_reset(window);
        }
        if self
            .watermark_ms()
            .is_some_and(|watermark| window.end_ms <= watermark)
        {
            return RecordOutcome::Rejected(RejectReason::Late);
        }
        if self
            .closed_through
            .is_some_and(|closed_through| window.end_ms <= closed_through)
        {
            // The run that counted it moved max_ts with it; so must we, or later
            // lateness decisions would differ from that run's.
            self.advance_max_ts(timestamp_ms, offset);
            return RecordOutcome::AlreadyFinal;
        }

        let max_ts_before = self.max_ts;
        let group = self
            .open
            .entry(window.start_ms)
            .or_insert_with(|| WindowGroup {
                first_offset: offset,
                max_ts_before_first: max_ts_before,
                cells: CellTable::default(),
                dirty_cells: 0,
            });
        // A new cell starts at 0 and 0 + v never overflows, so an overflow always
        // hits an existing cell: rejecting leaves no empty cell or group behind.
        let cell = group.cells.entry(key.as_u128()).or_default();
        let was_dirty = cell.is_dirty();
        if !cell.try_add(value) {
            return RecordOutcome::Rejected(RejectReason::SumOverflow);
        }
        if !was_dirty {
            group.dirty_cells += 1;
        }
        if self.unflushed_since_ms.is_none() {
            self.unflushed_since_ms = Some(now_ms);
        }
        self.advance_max_ts(timestamp_ms, offset);
        RecordOutcome::Counted
    }

    /// A record at `offset` that contributes nothing (poison: undecodable body).
    /// Advances the position only.
    pub fn skip(&mut self, offset: i64) {
        if offset >= self.next_offset {
            self.next_offset = offset.saturating_add(1);
        }
    }

    /// The rows to write now, and the checkpoint that becomes committable once they
    /// (and all earlier flushes' rows) are durable. Clears the "changed" marks, so
    /// the caller must write the rows or restart from its last commit.
    pub fn flush(&mut self) -> Flush {
        let closed_cells: usize = self.closed_unflushed.iter().map(|w| w.cells.len()).sum();
        let dirty_cells: usize = self.open.values().map(|group| group.dirty_cells).sum();
        let mut rows = Vec::with_capacity(closed_cells + dirty_cells);

        for closed in self.closed_unflushed.drain(..) {
            let window_end_ms = closed.start_ms + self.config.window_ms;
            rows.extend(closed.cells.into_iter().map(|(key, cell)| WindowRow {
                key: Uuid::from_u128(key),
                window_start_ms: closed.start_ms,
                window_end_ms,
                partition: self.partition,
                sum: cell.sum,
                count: cell.count(),
                is_final: true,
                through_offset: closed.closing_offset,
                generation: self.generation,
            }));
        }

        // Provisional rows are "through" the last processed offset: every record
        // counted so far is at or before it.
        let through_offset = self.next_offset - 1;
        for (&start_ms, group) in self.open.iter_mut() {
            if group.dirty_cells == 0 {
                continue;
            }
            let window_end_ms = start_ms + self.config.window_ms;
            for (&key, cell) in group.cells.iter_mut() {
                if !cell.is_dirty() {
                    continue;
                }
                cell.mark_clean();
                rows.push(WindowRow {
                    key: Uuid::from_u128(key),
                    window_start_ms: start_ms,
                    window_end_ms,
                    partition: self.partition,
                    sum: cell.sum,
                    count: cell.count(),
                    is_final: false,
                    through_offset,
                    generation: self.generation,
                });
            }
            group.dirty_cells = 0;
        }

        self.unflushed_since_ms = None;
        Flush {
            rows,
            checkpoint: self.committable_checkpoint(),
        }
    }

    /// The next offset to read (one past the last record decided or skipped).
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// The largest event time counted (or replayed as already final) so far.
    pub fn max_ts_ms(&self) -> Option<i64> {
        self.max_ts
    }

    /// `max_ts − grace`: windows ending at or before it are closed.
    pub fn watermark_ms(&self) -> Option<i64> {
        // max_ts ≥ 0 and grace ≥ 0, so this cannot overflow.
        self.max_ts.map(|max_ts| max_ts - self.config.grace_ms)
    }

    /// Windows ending at or before this were final before this run and are never
    /// rewritten (restored from a checkpoint or frozen by an external reset).
    pub fn closed_through_ms(&self) -> Option<i64> {
        self.closed_through
    }

    /// Open key-windows (cells of windows not yet closed).
    pub fn open_windows(&self) -> usize {
        self.open.values().map(|group| group.cells.len()).sum()
    }

    /// Open windows (each holding any number of keys).
    pub fn open_window_groups(&self) -> usize {
        self.open.len()
    }

    /// The `now_ms` of the first record counted since the last flush (freshness).
    pub fn unflushed_since_ms(&self) -> Option<i64> {
        self.unflushed_since_ms
    }

    /// Heap bytes held by the engine's tables (exact for the hash tables, estimated
    /// for the few tree nodes).
    pub fn approx_heap_bytes(&self) -> usize {
        // A B-tree entry costs its key and value plus a share of node overhead;
        // twice the payload is a generous bound for a handful of windows.
        let tree_entry_bytes = 2 * (size_of::<i64>() + size_of::<WindowGroup>());
        let open: usize = self
            .open
            .values()
            .map(|group| tree_entry_bytes + group.cells.allocation_size())
            .sum();
        let closed: usize = self
            .closed_unflushed
            .iter()
            .map(|window| window.cells.allocation_size())
            .sum();
        open + closed + self.closed_unflushed.capacity() * size_of::<ClosedWindow>()
    }

    /// The Kafka partition this engine decides for.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The generation every row and checkpoint is written with.
    pub fn generation(&self) -> u16 {
        self.generation
    }

    /// The engine's (sanitized) configuration.
    pub fn config(&self) -> EngineConfig {
        self.config
    }

    /// Freezes, after an external reset, every window that records before the reset
    /// offset may have contributed to. Those records have event times ≤ the old
    /// run's max_ts, and the anchor was on time in that run (end > max_ts − grace),
    /// so they lie before `anchor end + grace`: freezing only the anchor's own
    /// window would let a window that an out-of-order (within grace) record before
    /// the reset contributed to be rebuilt without it.
    fn anchor_external_reset(&mut self, anchor: Window) {
        self.awaiting_anchor = false;
        let reach = anchor.end_ms.saturating_add(self.config.grace_ms);
        let frozen_through = self.config.boundary_at_or_after(reach);
        self.closed_through = Some(
            self.closed_through
                .map_or(frozen_through, |c| c.max(frozen_through)),
        );
    }

    /// Moves `max_ts` forward to `timestamp_ms` (if later) and closes every window
    /// the new watermark passed, on behalf of the record at `offset`.
    fn advance_max_ts(&mut self, timestamp_ms: i64, offset: i64) {
        if self.max_ts.is_some_and(|max_ts| timestamp_ms <= max_ts) {
            return;
        }
        self.max_ts = Some(timestamp_ms);
        let watermark = timestamp_ms - self.config.grace_ms;
        // Open windows are ordered by start, so the closed ones are a prefix.
        while let Some(entry) = self.open.first_entry() {
            // The end fits: the window was created through `window_containing`.
            if *entry.key() + self.config.window_ms > watermark {
                break;
            }
            let (start_ms, group) = entry.remove_entry();
            self.closed_unflushed.push(ClosedWindow {
                start_ms,
                closing_offset: offset,
                cells: group.cells,
            });
        }
    }

    /// The state a restart needs after this flush is durable; see [`Flush::checkpoint`].
    fn committable_checkpoint(&self) -> Option<Checkpoint> {
        if self.awaiting_anchor {
            return None;
        }
        // Resume at the earliest (by offset, not by time) open window's first record.
        let earliest_open = self.open.values().min_by_key(|group| group.first_offset);
        let (next_offset, max_ts_ms) = match earliest_open {
            Some(group) => (group.first_offset, group.max_ts_before_first),
            None => (self.next_offset, self.max_ts),
        };
        // Every window ending at or before the watermark is closed and its final rows
        // are in this flush or an earlier one.
        let closed_through_ms = match (self.closed_through, self.watermark_ms()) {
            (Some(closed), Some(watermark)) => Some(closed.max(watermark)),
            (closed, watermark) => closed.or(watermark),
        };
        Some(Checkpoint {
            next_offset,
            max_ts_ms,
            closed_through_ms,
            generation: self.generation,
            settings: Some(self.config.sum_settings()),
            external_reset: false,
        })
    }
}

#[cfg(test)]
mod tests;
