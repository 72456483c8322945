//! The protocol's state of one owned partition.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use tally_schemas::Checkpoint;
use tally_sink::WindowRow;

use super::{FlushId, HandOver, WriteBatch};

use crate::engine::PartitionEngine;

/// The group's committed offset for the partition, as far as this ownership knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Committed {
    pub offset: i64,
    /// False for an offset without Tally state (an external reset): a checkpoint at
    /// the same offset is then still worth committing, for its metadata.
    pub with_state: bool,
}

/// Offsets that vanished before they were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LostRange {
    pub from: i64,
    pub to: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Active,
    /// Its last flush is made; records are ignored until the revoke settles.
    Revoking,
}

#[derive(Debug)]
pub(super) struct PartitionState {
    pub engine: PartitionEngine,
    /// Distinguishes this ownership from earlier ones of the same partition, so late
    /// acknowledgements of a previous ownership are ignored.
    pub epoch: u64,
    pub phase: Phase,
    pub committed: Option<Committed>,
    /// The highest generation the store had seen for the partition at assignment.
    pub latest_generation: u16,
    /// Source offsets of dead letters not yet acknowledged.
    pub letters: BTreeSet<i64>,
    /// The unacknowledged `sum_overflow` letters among them, with their window's end:
    /// a resume whose closed-through boundary covers that window judges the record
    /// already final and would not send the letter again.
    pub overflow_letters: BTreeMap<i64, i64>,
    /// Set when offsets vanished and the partition halted there.
    pub halted: Option<LostRange>,
    /// Rows of an engine replaced after lost offsets, written with the next flush.
    pub carried_rows: Vec<WindowRow>,
    /// Flushes holding rows or a checkpoint row of this partition, not yet durable.
    unwritten: BTreeSet<FlushId>,
    /// Checkpoints saved with a flush that is not durable yet, oldest first.
    pending: VecDeque<(FlushId, Checkpoint)>,
    /// The newest checkpoint whose row, and every row of this partition up to its
    /// flush, is durable: what may be committed.
    durable: Option<Checkpoint>,
    /// Offset of a checkpoint row saved (or being saved) and not committed yet.
    saved_uncommitted: Option<i64>,
    commit_in_flight: Option<i64>,
    /// The engine's last flush had no checkpoint (an external reset before its anchor).
    without_checkpoint: bool,
    /// The write holding an external reset's claim, not yet durable: no row of the
    /// reset's generation may be written before it.
    claim: Option<FlushId>,
}

impl PartitionState {
    pub fn new(
        engine: PartitionEngine,
        epoch: u64,
        committed: Option<Committed>,
        latest_generation: u16,
    ) -> Self {
        PartitionState {
            engine,
            epoch,
            phase: Phase::Active,
            committed,
            latest_generation,
            letters: BTreeSet::new(),
            overflow_letters: BTreeMap::new(),
            halted: None,
            carried_rows: Vec::new(),
            unwritten: BTreeSet::new(),
            pending: VecDeque::new(),
            durable: None,
            saved_uncommitted: None,
            commit_in_flight: None,
            without_checkpoint: false,
            claim: None,
        }
    }

    /// Queues the claim of an external reset (a checkpoint row) in `batch`; the
    /// partition's rows wait until it is durable.
    pub fn claim_reset(&mut self, partition: i32, claim: Checkpoint, batch: &mut WriteBatch) {
        batch.checkpoints.push((partition, claim));
        self.pending.push_back((batch.flush, claim));
        self.unwritten.insert(batch.flush);
        self.saved_uncommitted = Some(claim.next_offset);
        self.claim = Some(batch.flush);
    }

    /// Adds this partition's flush to `batch`. `last`: the flush of a revoke, whose
    /// checkpoint row is saved even if an earlier one still awaits its commit.
    pub fn flush_into(
        &mut self,
        partition: i32,
        flush: FlushId,
        last: bool,
        batch: &mut WriteBatch,
    ) {
        let engine_flush = self.engine.flush();
        let mut contributed = !engine_flush.rows.is_empty() || !self.carried_rows.is_empty();
        batch.rows.append(&mut self.carried_rows);
        batch.rows.extend(engine_flush.rows);
        self.without_checkpoint = engine_flush.checkpoint.is_none();
        if let Some(checkpoint) = engine_flush.checkpoint {
            let already_saved = self.durable == Some(checkpoint)
                || self
                    .pending
                    .back()
                    .is_some_and(|(_, pending)| *pending == checkpoint);
            let one_at_a_time = last || self.saved_uncommitted.is_none();
            // A checkpoint row promises that everything before it is done, dead
            // letters included: a group without a commit resumes from the store's
            // latest row, so a row past an unacknowledged letter would skip it.
            if self.advances(&checkpoint)
                && one_at_a_time
                && !already_saved
                && !self.blocked_by_letters(&checkpoint)
            {
                batch.checkpoints.push((partition, checkpoint));
                self.pending.push_back((flush, checkpoint));
                self.saved_uncommitted = Some(checkpoint.next_offset);
                contributed = true;
            }
        }
        if contributed {
            self.unwritten.insert(flush);
        }
    }

    /// A write finished: checkpoints whose flush and every earlier one are durable
    /// become committable.
    pub fn on_written(&mut self, flush: FlushId) {
        if !self.unwritten.remove(&flush) {
            return;
        }
        if self.claim == Some(flush) {
            self.claim = None;
        }
        let oldest_unwritten = self.unwritten.first().copied();
        while let Some(&(pending_flush, checkpoint)) = self.pending.front() {
            if oldest_unwritten.is_some_and(|oldest| oldest <= pending_flush) {
                break;
            }
            self.pending.pop_front();
            self.durable = Some(checkpoint);
        }
    }

    /// The checkpoint to commit now, if the rules allow one (and marks it in flight).
    pub fn take_committable(&mut self) -> Option<Checkpoint> {
        if self.commit_in_flight.is_some() {
            return None;
        }
        let checkpoint = self.committable()?;
        self.commit_in_flight = Some(checkpoint.next_offset);
        Some(checkpoint)
    }

    fn committable(&self) -> Option<Checkpoint> {
        let checkpoint = self.durable?;
        if !self.advances(&checkpoint) || self.blocked_by_letters(&checkpoint) {
            return None;
        }
        Some(checkpoint)
    }

    /// True while a letter that a resume from `checkpoint` would not send again is
    /// unacknowledged: one before its offset, or an overflow in a window it holds final.
    fn blocked_by_letters(&self, checkpoint: &Checkpoint) -> bool {
        let skipped = self
            .letters
            .first()
            .is_some_and(|&offset| offset < checkpoint.next_offset);
        let judged_final = checkpoint.closed_through_ms.is_some_and(|closed| {
            self.overflow_letters
                .values()
                .any(|&window_end| window_end <= closed)
        });
        skipped || judged_final
    }

    /// A letter for the record at `offset` was sent; `overflow_window_end` for
    /// `sum_overflow` letters.
    pub fn letter_sent(&mut self, offset: i64, overflow_window_end: Option<i64>) {
        self.letters.insert(offset);
        if let Some(end) = overflow_window_end {
            self.overflow_letters.insert(offset, end);
        }
    }

    pub fn letter_acked(&mut self, offset: i64) {
        self.letters.remove(&offset);
        self.overflow_letters.remove(&offset);
    }

    /// Forward only; an offset without Tally state may be recommitted with it.
    fn advances(&self, checkpoint: &Checkpoint) -> bool {
        self.committed.is_none_or(|done| {
            checkpoint.next_offset > done.offset
                || (!done.with_state && checkpoint.next_offset >= done.offset)
        })
    }

    pub fn on_commit_result(&mut self, offset: i64, ok: bool) {
        if self.commit_in_flight != Some(offset) {
            return;
        }
        self.commit_in_flight = None;
        if !ok {
            return;
        }
        if self.committed.is_none_or(|done| offset >= done.offset) {
            self.committed = Some(Committed {
                offset,
                with_state: true,
            });
        }
        if self.saved_uncommitted.is_some_and(|saved| saved <= offset) {
            self.saved_uncommitted = None;
        }
    }

    /// Nothing left to wait for: every flush durable, every letter acknowledged.
    pub fn is_settled(&self) -> bool {
        self.unwritten.is_empty() && self.letters.is_empty()
    }

    /// The decision when a revoke settles: the checkpoint to commit (the newest
    /// durable one the rules allow, even if a later flush did not make it), and why
    /// the rest goes uncommitted, if anything does.
    pub fn settle(&self) -> (Option<Checkpoint>, Option<HandOver>) {
        let commit = self.committable();
        let why = if !self.unwritten.is_empty() {
            Some(HandOver::FlushNotDurable)
        } else if !self.letters.is_empty() {
            Some(HandOver::LettersUnacknowledged)
        } else if self.without_checkpoint {
            Some(HandOver::NoCheckpoint)
        } else if self.halted.is_some() {
            Some(HandOver::Halted)
        } else {
            None
        };
        (commit, why)
    }
}
