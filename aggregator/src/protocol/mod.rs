//! The commit protocol as a pure state machine: events in, commands out.
//!
//! This is where every decision that exactness rests on is made: which rows and
//! checkpoints to write, when an offset may be committed (and with which metadata),
//! what a revoked partition does, where an assigned partition resumes, what a lost
//! range of offsets does, and when the aggregator must stop. It owns one window
//! [`PartitionEngine`] per owned partition. It does no I/O, reads no clock (time
//! arrives in the events) and knows nothing of rdkafka or tokio: the consumer shell
//! (`crate::consumer`) translates Kafka and store events into [`Event`]s and executes
//! the [`Command`]s, and the property test (`tests/engine_model.rs`) drives the very
//! same type against a simulated log, store and group.
//!
//! # Layout
//! - this file: [`Protocol`], [`Event`], [`Command`] and the rules that span partitions;
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

pub mod partition;
pub mod replay;
pub mod resume;

use std::collections::{BTreeMap, HashMap, VecDeque};

use tally_schemas::{decode_increment, Checkpoint, RejectReason, SumSettings};
use tally_sink::WindowRow;

use crate::engine::{EngineConfig, PartitionEngine, RecordOutcome, Resume};
use partition::{Committed, LostRange, PartitionState, Phase};
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
}

/// One record as read from the input topic.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub partition: i32,
    pub offset: i64,
    /// The record's CreateTime (event time), if it has one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// The `tally.redriven-from` header, if `tally dlq redrive` put the record back.
    pub redriven_from: Option<&'a [u8]>,
}

/// What the broker and the store say about one newly assigned partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedPartition {
    pub partition: i32,
    pub committed: CommittedOffset,
    pub store: StoreCheckpoints,
}

/// Everything that happens to the aggregator.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// A record of an owned partition; `now_ms` is the wall clock (only the
    /// future-timestamp check and freshness use it).
    Record {
        record: Record<'a>,
        now_ms: i64,
    },
    /// Time to flush changed windows (and to retry commits and dead letters).
    FlushTick {
        now_ms: i64,
    },
    /// A [`Command::WriteRows`] is durable: its rows, then its checkpoint rows.
    Written {
        flush: FlushId,
    },
    /// A write failed in a way retrying cannot fix (schema mismatch, bad
    /// configuration). Transient failures are retried by the writer.
    WriteFailed {
        flush: FlushId,
        error: String,
    },
    /// The store stopped (circuit open) or started (probe succeeded) taking writes.
    StoreAvailability {
        available: bool,
    },
    LetterAcked {
        id: LetterId,
    },
    /// `permanent`: the letter can never be delivered (too large, topic missing,
    /// not authorised); otherwise it is retried at the next tick.
    LetterFailed {
        id: LetterId,
        permanent: bool,
        error: String,
    },
    Assigned {
        partitions: Vec<AssignedPartition>,
    },
    /// The store checkpoint of an assigned partition could not be read.
    AssignLookupFailed {
        partition: i32,
        error: String,
    },
    /// Partitions are being taken away: make their last flush.
    Revoked {
        partitions: Vec<i32>,
    },
    /// The revoke's waiting time is over (everything settled or the deadline
    /// passed): commit what may be committed, hand the rest over, drop the state.
    RevokeSettled {
        partitions: Vec<i32>,
    },
    /// The result of a [`Command::Commit`].
    CommitResult {
        offsets: Vec<(i32, i64)>,
        ok: bool,
    },
    /// The broker reported an offset out of range; these are the partition's
    /// available offsets `[log_start, log_end)`.
    LogRange {
        partition: i32,
        log_start: i64,
        log_end: i64,
    },
    /// Stop: the last flush of every owned partition, like a revoke of all of them.
    Shutdown,
}

/// A dead letter to produce (the shell adds the source topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterOut {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub reason: RejectReason,
    pub error: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub redriven_from: Option<Vec<u8>>,
}

/// Rows and checkpoint rows to write, in that order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteBatch {
    pub flush: FlushId,
    pub rows: Vec<WindowRow>,
    pub checkpoints: Vec<(i32, Checkpoint)>,
}

/// Why a revoked partition was handed over without a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    /// A flush holding its rows was not durable by the deadline.
    FlushNotDurable,
    /// Dead letters were not acknowledged by the deadline.
    LettersUnacknowledged,
    /// Nothing committable yet (an external reset whose anchor was not read).
    NoCheckpoint,
    /// The partition halted on lost offsets.
    Halted,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Start reading the assigned partitions where these decisions say
    /// ([`ResumeDecision::start`]).
    Assign {
        positions: Vec<(i32, ResumeDecision)>,
    },
    WriteRows(WriteBatch),
    SendLetter {
        id: LetterId,
        letter: DeadLetterOut,
    },
    /// Commit these offsets, each with its checkpoint as metadata. `sync`: during a
    /// revoke or shutdown, before the partitions are handed over.
    Commit {
        offsets: Vec<(i32, Checkpoint)>,
        sync: bool,
    },
    Pause {
        partitions: Vec<i32>,
    },
    Resume {
        partitions: Vec<i32>,
    },
    /// Read the partition from this offset on (after accepting lost offsets).
    Seek {
        partition: i32,
        offset: i64,
    },
    HandOverUncommitted {
        partition: i32,
        why: HandOver,
    },
    /// Offsets `[from, to)` vanished before they were read (`accepted`: continuing,
    /// frozen; otherwise the partition halted).
    OffsetsLost {
        partition: i32,
        from: i64,
        to: i64,
        accepted: bool,
    },
    /// Stop without committing anything more; a restart replays from the last commit.
    Stop {
        error: ProtocolError,
    },
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
            Event::FlushTick { .. } => self.on_flush_tick(out),
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

    fn on_flush_tick(&mut self, out: &mut Vec<Command>) {
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
        out.push(Command::WriteRows(batch));
    }

    fn on_written(&mut self, flush: FlushId, out: &mut Vec<Command>) {
        if self.flush_in_flight == Some(flush) {
            self.flush_in_flight = None;
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

    // ------------------------------------------------------------ rebalances

    fn on_assigned(&mut self, assigned: Vec<AssignedPartition>, out: &mut Vec<Command>) {
        let configured = self.config.engine.sum_settings();
        let mut positions = Vec::with_capacity(assigned.len());
        // External resets claim their generation in the store before anything else.
        let mut claims = WriteBatch {
            flush: self.next_flush,
            rows: Vec::new(),
            checkpoints: Vec::new(),
        };
        for partition in assigned {
            let decision = resume::decide(&partition.committed, partition.store);
            if let Some(pinned) = decision.checkpoint().and_then(|c| c.settings) {
                if pinned != configured {
                    let error = ProtocolError::SettingsMismatch {
                        partition: partition.partition,
                        pinned,
                        configured,
                    };
                    self.stop(error, out);
                    return;
                }
            }
            let committed = match &partition.committed {
                CommittedOffset::At { offset, .. } => Some(Committed {
                    offset: *offset,
                    with_state: decision.source != ResumeSource::ExternalReset,
                }),
                CommittedOffset::None => None,
            };
            let latest_generation = partition.store.latest.map_or(0, |latest| latest.generation);
            let epoch = self.next_epoch;
            self.next_epoch += 1;
            let engine =
                PartitionEngine::new(self.config.engine, partition.partition, decision.resume);
            let mut state = PartitionState::new(engine, epoch, committed, latest_generation);
            if let Resume::ExternalReset {
                next_offset,
                generation,
            } = decision.resume
            {
                let claim = Checkpoint::reset_claim(next_offset, generation, Some(configured));
                state.claim_reset(partition.partition, claim, &mut claims);
            }
            self.partitions.insert(partition.partition, state);
            positions.push((partition.partition, decision));
        }
        let paused: Vec<i32> = positions.iter().map(|(p, _)| *p).collect();
        out.push(Command::Assign { positions });
        if !claims.checkpoints.is_empty() {
            self.next_flush += 1;
            out.push(Command::WriteRows(claims));
        }
        if !self.store_available && !paused.is_empty() {
            out.push(Command::Pause { partitions: paused });
        }
    }

    fn on_revoked(&mut self, partitions: &[i32], out: &mut Vec<Command>) {
        let flush = self.next_flush;
        let mut batch = WriteBatch {
            flush,
            rows: Vec::new(),
            checkpoints: Vec::new(),
        };
        for partition in partitions {
            if let Some(state) = self.partitions.get_mut(partition) {
                if state.phase == Phase::Active {
                    state.flush_into(*partition, flush, true, &mut batch);
                    state.phase = Phase::Revoking;
                }
            }
        }
        if batch.rows.is_empty() && batch.checkpoints.is_empty() {
            return;
        }
        self.next_flush += 1;
        out.push(Command::WriteRows(batch));
    }

    fn on_revoke_settled(&mut self, partitions: &[i32], out: &mut Vec<Command>) {
        let mut offsets = Vec::new();
        for partition in partitions {
            let Some(state) = self.partitions.remove(partition) else {
                continue;
            };
            let (commit, why) = state.settle();
            if let Some(checkpoint) = commit {
                offsets.push((*partition, checkpoint));
            }
            if let Some(why) = why {
                out.push(Command::HandOverUncommitted {
                    partition: *partition,
                    why,
                });
            }
            // Letters of a dropped partition are re-judged and re-sent by its next
            // owner: forget them so they do not hold reading back.
            let epoch = state.epoch;
            self.letters.retain(|_, letter| {
                !(letter.letter.partition == *partition && letter.epoch == epoch)
            });
        }
        let letters = &self.letters;
        self.letters_to_retry.retain(|id| letters.contains_key(id));
        if !offsets.is_empty() {
            out.push(Command::Commit {
                offsets,
                sync: true,
            });
        }
    }

    // ------------------------------------------------------------ lost offsets

    fn on_log_range(
        &mut self,
        partition: i32,
        log_start: i64,
        log_end: i64,
        out: &mut Vec<Command>,
    ) {
        let accept = self.config.accept_data_loss;
        let engine_config = self.config.engine;
        let Some(state) = self.partitions.get_mut(&partition) else {
            return;
        };
        if state.phase != Phase::Active || state.halted.is_some() {
            return;
        }
        let expected = state.engine.next_offset();
        // Below the log start: deleted before they were read. Beyond the log end:
        // the log was truncated or recreated; what follows is not what was counted.
        let lost = if log_start > expected {
            Some(LostRange {
                from: expected,
                to: log_start,
            })
        } else if expected > log_end {
            Some(LostRange {
                from: log_end,
                to: expected,
            })
        } else {
            None
        };
        let Some(range) = lost else {
            return;
        };
        *self.stats.lost_offsets.entry(partition).or_insert(0) +=
            u64::try_from(range.to - range.from).unwrap_or(u64::MAX);
        out.push(Command::OffsetsLost {
            partition,
            from: range.from,
            to: range.to,
            accepted: accept,
        });
        if !accept {
            state.halted = Some(range);
            out.push(Command::Pause {
                partitions: vec![partition],
            });
            return;
        }
        // Continue at the log start, knowing nothing of what came before, with a
        // generation above every earlier one: exactly an external reset. What this
        // engine already counted is flushed first (it is before the gap).
        let restart_at = log_start.min(log_end);
        let generation = state
            .engine
            .generation()
            .max(state.latest_generation)
            .saturating_add(1);
        state.latest_generation = generation;
        let carried = state.engine.flush().rows;
        state.carried_rows.extend(carried);
        state.engine = PartitionEngine::new(
            engine_config,
            partition,
            Resume::ExternalReset {
                next_offset: restart_at,
                generation,
            },
        );
        let mut claim = WriteBatch {
            flush: self.next_flush,
            rows: Vec::new(),
            checkpoints: Vec::new(),
        };
        let settings = Some(engine_config.sum_settings());
        state.claim_reset(
            partition,
            Checkpoint::reset_claim(restart_at, generation, settings),
            &mut claim,
        );
        self.next_flush += 1;
        out.push(Command::WriteRows(claim));
        out.push(Command::Seek {
            partition,
            offset: restart_at,
        });
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
