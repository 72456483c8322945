//! What goes in and out of the protocol: [`Event`]s from the shell, [`Command`]s
//! for it to execute, and the records, batches and letters they carry.

use tally_schemas::{Checkpoint, RejectReason};
use tally_sink::WindowRow;

use super::{CommittedOffset, FlushId, LetterId, ProtocolError, ResumeDecision, StoreCheckpoints};

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
    /// The record carries the `tally.marker` header: an idle marker, not an increment.
    pub marker: bool,
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
    /// Append an idle marker stamped `timestamp_ms` to `partition` of the input topic
    /// (best effort: a lost marker only delays the close until the next one).
    SendMarker {
        partition: i32,
        timestamp_ms: i64,
    },
    /// Stop without committing anything more; a restart replays from the last commit.
    Stop {
        error: ProtocolError,
    },
}
