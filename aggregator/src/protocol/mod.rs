//! The commit protocol as a pure state machine: events in, commands out.
//!
//! This is where every decision that exactness rests on is made: which rows and
//! checkpoints to write, when an offset may be committed (and with which metadata),
//! what a revoked partition does, where an assigned partition resumes, what a lost
//! range of offsets does, and when the aggregator must stop. It owns one window
//! [`PartitionEngine`](crate::engine::PartitionEngine) per owned partition. It does
//! no I/O, reads no clock (time arrives in the events) and knows nothing of rdkafka
//! or tokio: the consumer shell (`crate::consumer`) translates Kafka and store
//! events into [`Event`]s and executes the [`Command`]s, and the property test
//! (`tests/engine_model.rs`) drives the very same type against a simulated log, store
//! and group.
//!
//! # Layout
//! - this file: [`Protocol`], its records, flushes, commits and dead letters;
//! - `messages`: [`Event`], [`Command`] and what they carry;
//! - `ownership`: assignment, revokes, lost offsets;
//! - [`partition`]: the state of one owned partition (engine, assignment epoch,
//!   flushes not yet durable, the committable checkpoint, unacknowledged letters);
//! - [`resume`]: where an assigned partition resumes (commit metadata vs store
//!   checkpoint vs external reset), shared with `tally replay`;
//! - [`replay`]: planning `tally replay --from` / `--from-offset`.
//!
//! # The rules
//! 1. Rows first, then the checkpoint row, then the commit: a checkpoint is
//!    committable once the store row of the checkpoint and every row of its partition
//!    from that flush and earlier ones are durable ([`Event::Written`]).
//! 2. Never commit past a dead letter that Kafka has not acknowledged: the source
//!    offset counts as processed only after its letter is durable. Checkpoint rows
//!    follow the same rule (a group whose offsets expired resumes from the store's
//!    latest checkpoint row). "Past" includes an overflow letter of a window the
//!    checkpoint holds final: a resume from it judges that record already final and
//!    would never send its letter again.
//! 3. Commit only forward, and only for the assignment that produced the checkpoint.
//! 4. At most one checkpoint row saved and not yet committed per partition, so the
//!    store always keeps the row of the offset the broker holds (it keeps
//!    [`tally_sink::store::CHECKPOINTS_KEPT`] per partition), even when commits fail
//!    for a long time on a broker that drops commit metadata.
//! 5. A revoked partition gets one last flush; it is committed only if that flush and
//!    every earlier one are durable and its letters acknowledged within the deadline,
//!    else handed over uncommitted (the next owner replays; nothing is lost).
//! 6. An external reset (an offset without Tally state) first saves its claim, a
//!    checkpoint row with its new generation, and writes no row before that claim is
//!    durable: a second reset then always takes a higher generation, even if the
//!    first never got as far as a checkpoint.
//! 7. Offsets that vanished (the log start moved past the next offset to read) never
//!    lower a stored row: by default the partition halts there, uncommitted past the
//!    gap; with `accept_data_loss` it restarts at the log start as an external reset
//!    (the windows the gap can touch are frozen). Either way it is counted.
//! 8. A checkpoint pinned with other window/grace settings than this process has, an
//!    unreadable store checkpoint, a permanent store error or a dead letter that can
//!    never be delivered: stop, uncommitted.

mod messages;
mod ownership;
pub mod partition;
pub mod replay;
pub mod resume;

use std::collections::{BTreeMap, HashMap, VecDeque};

use tally_schemas::{decode_increment, RejectReason, SumSettings};

use crate::engine::{EngineConfig, RecordOutcome};
pub use messages::{
    AssignedPartition, Command, DeadLetterOut, Event, HandOver, Record, WriteBatch,
};
use partition::{PartitionState, Phase};
pub use resume::{CommittedOffset, ResumeDecision, ResumeSource, StartAt, StoreCheckpoints};

/// Identifies one store write (a flush, or the last flush of revoked partitions).
pub type FlushId = u64;
/// Identifies one dead letter until Kafka acknowledges it.
pub type LetterId = u64;

/// Settings of the protocol.
#[derive(Debug, Clone, Copy)]
pub struct ProtocolConfig {
    pub engine: EngineConfig,
    /// After offsets vanished: continue from the log start (frozen like an external
    /// reset) instead of halting the partition.
    pub accept_data_loss: bool,
    /// Dead letters sent but not acknowledged, or waiting for a retry, before
    /// [`Protocol::may_read`] says to stop reading (bounded memory).
    pub max_outstanding_letters: usize,
    /// Idle markers (see [`IdleMarkers`]); `None`: never ask for one.
    pub idle_markers: Option<IdleMarkers>,
}

/// When to ask for an idle marker, and how to stamp it.
///
/// A partition that has read nothing for `idle_after_ms` while it holds open windows
/// gets a marker stamped `now - stamp_lag_ms` when that would close its earliest open
/// window (at most one per `idle_after_ms`). The lag keeps markers from making any
/// acknowledged edge record late: the edge answers `202` only for a record the broker
/// took within its delivery timeout of its timestamp, so with `stamp_lag_ms` at least
/// that timeout (plus the clock skew between hosts) every record still to come carries
/// a timestamp above the marker's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleMarkers {
    pub idle_after_ms: i64,
    pub stamp_lag_ms: i64,
}

/// Why the aggregator must stop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error(
        "partition {partition}: its checkpoint pins {pinned}, but this process was started with \
         {configured}; start with the pinned values or change them with `tally replay --from \
         TIME --window W --grace G`"
    )]
    SettingsMismatch {
        partition: i32,
        pinned: SumSettings,
        configured: SumSettings,
    },
    #[error("partition {partition}: the store checkpoint could not be read: {error}")]
    StoreLookup { partition: i32, error: String },
    #[error("permanent store error, nothing committed: {0}")]
    PermanentStoreError(String),
    #[error(
        "partition {partition} offset {offset}: the dead letter can never be delivered \
         ({error}); nothing past it is committed"
    )]
    UndeliverableLetter {
        partition: i32,
        offset: i64,
        error: String,
    },
}

/// Counts of what the protocol decided, for metrics (monotonic; the shell exports
/// differences).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub counted: u64,
    pub already_final: u64,
    pub poison: u64,
    pub late: u64,
    pub future_timestamp: u64,
    pub sum_overflow: u64,
    pub invalid_timestamp: u64,
    /// Idle markers read.
    pub markers: u64,
    /// Idle markers asked for.
    pub markers_requested: u64,
    /// Records of partitions not owned (or being revoked), ignored.
    pub ignored: u64,
    /// Acknowledged dead letters by reason code.
    pub letters_acked: BTreeMap<&'static str, u64>,
    pub late_by_partition: BTreeMap<i32, u64>,
    /// Offsets that vanished before they were read, by partition.
    pub lost_offsets: BTreeMap<i32, u64>,
}

/// A read-only view of one owned partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionView {
    pub partition: i32,
    pub next_offset: i64,
    pub committed_offset: Option<i64>,
    pub watermark_ms: Option<i64>,
    pub open_windows: usize,
    pub open_key_windows: usize,
    pub unflushed_since_ms: Option<i64>,
    pub heap_bytes: usize,
    pub halted: bool,
    pub revoking: bool,
}

#[derive(Debug, Clone)]
struct OutstandingLetter {
    epoch: u64,
    letter: DeadLetterOut,
}

/// The protocol; see the module documentation.
#[derive(Debug)]
pub struct Protocol {
    config: ProtocolConfig,
    partitions: BTreeMap<i32, PartitionState>,
    next_epoch: u64,
    next_flush: FlushId,
    next_letter: LetterId,
    /// The regular flush being written (at most one at a time).
    flush_in_flight: Option<FlushId>,
    /// The `now_ms` of the first record counted into the flush in flight (the oldest
    /// count it makes durable).
    flush_in_flight_since_ms: Option<i64>,
    letters: HashMap<LetterId, OutstandingLetter>,
    letters_to_retry: VecDeque<LetterId>,
    store_available: bool,
    shutting_down: bool,
    stopped: Option<ProtocolError>,
    stats: Stats,
}

impl Protocol {
    pub fn new(config: ProtocolConfig) -> Self {
        Protocol {
            config,
            partitions: BTreeMap::new(),
            next_epoch: 1,
            next_flush: 1,
            next_letter: 1,
            flush_in_flight: None,
            flush_in_flight_since_ms: None,
            letters: HashMap::new(),
            letters_to_retry: VecDeque::new(),
            store_available: true,
            shutting_down: false,
            stopped: None,
            stats: Stats::default(),
        }
    }

    /// Handles one event, returning the commands to execute (in order).
    pub fn handle(&mut self, event: Event<'_>) -> Vec<Command> {
        let mut out = Vec::new();
        self.handle_into(event, &mut out);
        out
    }

    /// Like [`Protocol::handle`], appending to `out` (no allocation on the
    /// per-record path unless a record is rejected).
    pub fn handle_into(&mut self, event: Event<'_>, out: &mut Vec<Command>) {
        if self.stopped.is_some() {
            return;
        }
        match event {
            Event::Record { record, now_ms } => self.on_record(record, now_ms, out),
            Event::FlushTick { now_ms } => self.on_flush_tick(now_ms, out),
            Event::Written { flush } => self.on_written(flush, out),
            Event::WriteFailed { error, .. } => {
                self.stop(ProtocolError::PermanentStoreError(error), out)
            }
            Event::StoreAvailability { available } => self.on_store_availability(available, out),
            Event::LetterAcked { id } => self.on_letter_acked(id, out),
            Event::LetterFailed {
                id,
                permanent,
                error,
            } => self.on_letter_failed(id, permanent, error, out),
            Event::Assigned { partitions } => self.on_assigned(partitions, out),
            Event::AssignLookupFailed { partition, error } => {
                self.stop(ProtocolError::StoreLookup { partition, error }, out)
            }
            Event::Revoked { partitions } => self.on_revoked(&partitions, out),
            Event::RevokeSettled { partitions } => self.on_revoke_settled(&partitions, out),
            Event::CommitResult { offsets, ok } => self.on_commit_result(&offsets, ok, out),
            Event::LogRange {
                partition,
                log_start,
                log_end,
            } => self.on_log_range(partition, log_start, log_end, out),
            Event::Shutdown => {
                self.shutting_down = true;
                let all: Vec<i32> = self.partitions.keys().copied().collect();
                self.on_revoked(&all, out);
            }
        }
    }

    // ------------------------------------------------------------ queries

    /// False while too many dead letters are outstanding: stop reading for now.
    pub fn may_read(&self) -> bool {
        self.letters.len() < self.config.max_outstanding_letters && self.stopped.is_none()
    }

    /// True once nothing more needs waiting for before [`Event::RevokeSettled`]:
    /// every flush of these partitions is durable and every letter acknowledged.
    pub fn revoke_ready(&self, partitions: &[i32]) -> bool {
        partitions.iter().all(|partition| {
            self.partitions
                .get(partition)
                .is_none_or(|state| state.is_settled())
        })
    }

    /// The reason the protocol stopped, if it did.
    pub fn stopped(&self) -> Option<&ProtocolError> {
        self.stopped.as_ref()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Owned partitions (including those being revoked).
    pub fn owned(&self) -> Vec<i32> {
        self.partitions.keys().copied().collect()
    }

    pub fn views(&self) -> impl Iterator<Item = PartitionView> + '_ {
        self.partitions.iter().map(|(&partition, state)| {
            let engine = &state.engine;
            PartitionView {
                partition,
                next_offset: engine.next_offset(),
                committed_offset: state.committed.map(|c| c.offset),
                watermark_ms: engine.watermark_ms(),
                open_windows: engine.open_window_groups(),
                open_key_windows: engine.open_windows(),
                unflushed_since_ms: engine.unflushed_since_ms(),
                heap_bytes: engine.approx_heap_bytes(),
                halted: state.halted.is_some(),
                revoking: state.phase == Phase::Revoking,
            }
        })
    }

    /// The regular flush being written, if any.
    pub fn flush_in_flight(&self) -> Option<FlushId> {
        self.flush_in_flight
    }

    /// The wall-clock time (`now_ms` of its event) of the oldest counted record that
    /// is not durable yet: still in an engine, or in the flush being written. The
    /// store reflects every record counted before it (freshness).
    pub fn oldest_not_durable_ms(&self) -> Option<i64> {
        self.partitions
            .values()
            .filter_map(|state| state.engine.unflushed_since_ms())
            .chain(self.flush_in_flight_since_ms)
            .min()
    }

    // ------------------------------------------------------------ records

    fn on_record(&mut self, record: Record<'_>, now_ms: i64, out: &mut Vec<Command>) {
        let Some(state) = self.partitions.get_mut(&record.partition) else {
            self.stats.ignored += 1;
            return;
        };
        if state.phase != Phase::Active || state.halted.is_some() {
            self.stats.ignored += 1;
            return;
        }
        let offset = record.offset;
        if offset < state.engine.next_offset() {
            // Already decided in this ownership (a refetch after a seek).
            return;
        }
        state.last_read_ms = Some(now_ms);
        if record.marker {
            match record.timestamp_ms {
                Some(timestamp_ms) => state.engine.marker(offset, timestamp_ms, now_ms),
                None => state.engine.skip(offset),
            }
            self.stats.markers += 1;
            return;
        }
        let (reason, error) = match record.value.map(decode_increment) {
            Some(Ok(increment)) => {
                let timestamp_ms = record.timestamp_ms.unwrap_or(-1);
                match state.engine.record(
                    offset,
                    increment.key,
                    timestamp_ms,
                    increment.value,
                    now_ms,
                ) {
                    RecordOutcome::Counted => {
                        self.stats.counted += 1;
                        return;
                    }
                    RecordOutcome::AlreadyFinal => {
                        self.stats.already_final += 1;
                        return;
                    }
                    RecordOutcome::Rejected(reason) => {
                        let stats = &mut self.stats;
                        match reason {
                            RejectReason::Late => {
                                stats.late += 1;
                                *stats.late_by_partition.entry(record.partition).or_insert(0) += 1;
                            }
                            RejectReason::FutureTimestamp => stats.future_timestamp += 1,
                            RejectReason::SumOverflow => stats.sum_overflow += 1,
                            RejectReason::InvalidTimestamp => stats.invalid_timestamp += 1,
                            _ => stats.poison += 1,
                        }
                        (reason, rejection_text(reason, record.timestamp_ms))
                    }
                }
            }
            Some(Err(invalid)) => {
                state.engine.skip(offset);
                self.stats.poison += 1;
                (invalid.reason, invalid.detail)
            }
            None => {
                state.engine.skip(offset);
                self.stats.poison += 1;
                (RejectReason::InvalidJson, "record has no value".to_owned())
            }
        };
        let letter = DeadLetterOut {
            key: record.key.map(<[u8]>::to_vec),
            payload: record.value.map(<[u8]>::to_vec),
            reason,
            error,
            partition: record.partition,
            offset,
            timestamp_ms: record.timestamp_ms,
            redriven_from: record.redriven_from.map(<[u8]>::to_vec),
        };
        let overflow_window_end = match reason {
            RejectReason::SumOverflow => record
                .timestamp_ms
                .and_then(|ts| self.config.engine.window_containing(ts))
                .map(|window| window.end_ms),
            _ => None,
        };
        state.letter_sent(offset, overflow_window_end);
        let id = self.next_letter;
        self.next_letter += 1;
        self.letters.insert(
            id,
            OutstandingLetter {
                epoch: state.epoch,
                letter: letter.clone(),
            },
        );
        out.push(Command::SendLetter { id, letter });
    }

    // ------------------------------------------------------------ flushes and commits

    /// Idle partitions whose earliest open window a marker stamped now would close.
    fn ask_for_idle_markers(&mut self, now_ms: i64, out: &mut Vec<Command>) {
        let Some(rule) = self.config.idle_markers else {
            return;
        };
        let grace_ms = self.config.engine.grace_ms;
        for (&partition, state) in self.partitions.iter_mut() {
            if state.phase != Phase::Active || state.halted.is_some() {
                continue;
            }
            let last_read = *state.last_read_ms.get_or_insert(now_ms);
            let quiet = |since: i64| now_ms.saturating_sub(since) >= rule.idle_after_ms;
            if !quiet(last_read) || state.last_marker_ms.is_some_and(|at| !quiet(at)) {
                continue;
            }
            let timestamp_ms = now_ms.saturating_sub(rule.stamp_lag_ms);
            let closes = state
                .engine
                .earliest_open_end_ms()
                .is_some_and(|end| end <= timestamp_ms.saturating_sub(grace_ms));
            if !closes
                || state
                    .engine
                    .max_ts_ms()
                    .is_some_and(|max| timestamp_ms <= max)
            {
                continue;
            }
            state.last_marker_ms = Some(now_ms);
            self.stats.markers_requested += 1;
            out.push(Command::SendMarker {
                partition,
                timestamp_ms,
            });
        }
    }

    fn on_flush_tick(&mut self, now_ms: i64, out: &mut Vec<Command>) {
        self.ask_for_idle_markers(now_ms, out);
        while let Some(id) = self.letters_to_retry.pop_front() {
            if let Some(outstanding) = self.letters.get(&id) {
                out.push(Command::SendLetter {
                    id,
                    letter: outstanding.letter.clone(),
                });
            }
        }
        self.commit_what_is_committable(false, out);
        if self.flush_in_flight.is_some() || self.shutting_down {
            return;
        }
        let flush = self.next_flush;
        let mut batch = WriteBatch {
            flush,
            rows: Vec::new(),
            checkpoints: Vec::new(),
        };
        let since = self
            .partitions
            .values()
            .filter(|state| state.phase == Phase::Active)
            .filter_map(|state| state.engine.unflushed_since_ms())
            .min();
        for (&partition, state) in self.partitions.iter_mut() {
            if state.phase == Phase::Active {
                state.flush_into(partition, flush, false, &mut batch);
            }
        }
        if batch.rows.is_empty() && batch.checkpoints.is_empty() {
            return;
        }
        self.next_flush += 1;
        self.flush_in_flight = Some(flush);
        self.flush_in_flight_since_ms = since;
        out.push(Command::WriteRows(batch));
    }

    fn on_written(&mut self, flush: FlushId, out: &mut Vec<Command>) {
        if self.flush_in_flight == Some(flush) {
            self.flush_in_flight = None;
            self.flush_in_flight_since_ms = None;
        }
        for state in self.partitions.values_mut() {
            state.on_written(flush);
        }
        self.commit_what_is_committable(false, out);
    }

    /// Commits, for every active partition, the newest durable checkpoint if the
    /// rules allow it (one commit command for all of them).
    fn commit_what_is_committable(&mut self, sync: bool, out: &mut Vec<Command>) {
        let mut offsets = Vec::new();
        for (&partition, state) in self.partitions.iter_mut() {
            if state.phase != Phase::Active {
                continue;
            }
            if let Some(checkpoint) = state.take_committable() {
                offsets.push((partition, checkpoint));
            }
        }
        if !offsets.is_empty() {
            out.push(Command::Commit { offsets, sync });
        }
    }

    fn on_commit_result(&mut self, offsets: &[(i32, i64)], ok: bool, out: &mut Vec<Command>) {
        for &(partition, offset) in offsets {
            if let Some(state) = self.partitions.get_mut(&partition) {
                state.on_commit_result(offset, ok);
            }
        }
        if ok {
            // A commit may have been the only thing holding a newer checkpoint back.
            self.commit_what_is_committable(false, out);
        }
    }

    fn on_store_availability(&mut self, available: bool, out: &mut Vec<Command>) {
        if self.store_available == available {
            return;
        }
        self.store_available = available;
        let partitions: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(_, state)| state.phase == Phase::Active && state.halted.is_none())
            .map(|(&partition, _)| partition)
            .collect();
        if partitions.is_empty() {
            return;
        }
        out.push(if available {
            Command::Resume { partitions }
        } else {
            Command::Pause { partitions }
        });
    }

    // ------------------------------------------------------------ dead letters

    fn on_letter_acked(&mut self, id: LetterId, out: &mut Vec<Command>) {
        let Some(outstanding) = self.letters.remove(&id) else {
            return;
        };
        *self
            .stats
            .letters_acked
            .entry(outstanding.letter.reason.code())
            .or_insert(0) += 1;
        let partition = outstanding.letter.partition;
        if let Some(state) = self.partitions.get_mut(&partition) {
            if state.epoch == outstanding.epoch {
                state.letter_acked(outstanding.letter.offset);
            }
        }
        self.commit_what_is_committable(false, out);
    }

    fn on_letter_failed(
        &mut self,
        id: LetterId,
        permanent: bool,
        error: String,
        out: &mut Vec<Command>,
    ) {
        let Some(outstanding) = self.letters.get(&id) else {
            return;
        };
        if permanent {
            let letter = &outstanding.letter;
            let error = ProtocolError::UndeliverableLetter {
                partition: letter.partition,
                offset: letter.offset,
                error,
            };
            self.stop(error, out);
            return;
        }
        self.letters_to_retry.push_back(id);
    }

    fn stop(&mut self, error: ProtocolError, out: &mut Vec<Command>) {
        if self.stopped.is_none() {
            self.stopped = Some(error.clone());
            out.push(Command::Stop { error });
        }
    }
}

fn rejection_text(reason: RejectReason, timestamp_ms: Option<i64>) -> String {
    match reason {
        RejectReason::Late => format!(
            "event time {timestamp_ms:?} falls in a window already closed by the partition watermark"
        ),
        RejectReason::FutureTimestamp => {
            format!("event time {timestamp_ms:?} is too far ahead of the wall clock")
        }
        RejectReason::SumOverflow => "the window sum would overflow i64".to_owned(),
        RejectReason::InvalidTimestamp => "record has no usable timestamp".to_owned(),
        other => other.code().to_owned(),
    }
}

#[cfg(test)]
mod tests;
