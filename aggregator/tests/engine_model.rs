//! Model-based property tests of the window engine (DESIGN.md, "Offsets, replay and
//! exactly-once effect"): for any crash point, any rebalance and any replay, the
//! store ends up exactly equal to an uninterrupted run.
//!
//! A simulation drives partition engines owned by two consumer instances, a
//! version-guarded store (a row is replaced only by a higher version, exactly like
//! the real backends) and a Kafka commit log, through random histories: reads,
//! flushes, partial store writes, commits, instance crashes (losing or delaying the
//! unwritten rows), graceful revokes, rude partition losses, and "zombie" writes of
//! a dead owner that reach the store after the new owner's. At the end every
//! partition catches up with its log and flushes, and the remaining zombies land.
//!
//! Checked against a brute-force model computed from the log alone:
//! - every row the engine ever produces equals the model's sum/count of its window
//!   through the row's `through_offset` (final rows: through the closing offset);
//! - every decision equals the model's (a replay may answer `AlreadyFinal` for a
//!   record the live run counted or found overflowing, and then that key-window must
//!   already be final in the store);
//! - no accepted write ever makes a stored row less complete;
//! - the final store equals the model exactly (sum, count, final flag, generation).
//!
//! The second property replays with a new generation (an external offset reset, or a
//! checkpoint with a replay boundary) and checks that frozen windows keep the first
//! run's rows, rebuilt windows hold the replay's, and no increment counted before the
//! replay offset is lost from a rebuilt window.
//!
//! Cases: 8000 + 2000 by default; `TALLY_PROPTEST_CASES=N` runs N of each.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, VecDeque};

use proptest::prelude::*;
use tally_aggregator::engine::{EngineConfig, PartitionEngine, RecordOutcome, Resume};
use tally_schemas::{Checkpoint, RejectReason};
use tally_sink::WindowRow;
use uuid::Uuid;

/// The wall clock, fixed so that the future-timestamp decision is deterministic.
const NOW_MS: i64 = 1_000;
const MAX_FUTURE_SKEW_MS: i64 = 50;

fn cases(default: u32) -> u32 {
    std::env::var("TALLY_PROPTEST_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

// ------------------------------------------------------------------ the log

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// Undecodable: the consumer skips it.
    Poison,
    Increment {
        key: Uuid,
        ts: i64,
        value: i64,
    },
}

#[derive(Debug, Clone, Copy)]
struct LogRecord {
    offset: i64,
    body: Body,
}

/// Raw random choices for one record, turned into a record by [`build_log`]
/// (so that shrinking works on small numbers).
#[derive(Debug, Clone, Copy)]
struct RecordSpec {
    kind: u8,
    advance: u8,
    back: u8,
    key: u8,
    value: u8,
    gap: u8,
}

fn record_spec() -> impl Strategy<Value = RecordSpec> {
    (
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
    )
        .prop_map(|(kind, advance, back, key, value, gap)| RecordSpec {
            kind,
            advance,
            back,
            key,
            value,
            gap,
        })
}

fn key_of(index: u8) -> Uuid {
    Uuid::from_u128(0x7a11_0000_0000_0000_0000_0000_0000_0000 | u128::from(index))
}

/// Turns specs into a log: event times mostly increasing with jitter inside and
/// beyond the grace, some far-late, future, negative and poison records, values
/// near i64::MAX now and then (overflow), offset gaps.
fn build_log(
    config: EngineConfig,
    keys: u8,
    start_ts: i64,
    specs: &[RecordSpec],
) -> Vec<LogRecord> {
    let window = config.window_ms;
    let grace = config.grace_ms;
    let mut clock = start_ts;
    let mut offset = 0i64;
    let mut log = Vec::with_capacity(specs.len());
    for spec in specs {
        let back = i64::from(spec.back);
        // Small `kind`s are ordinary records, so failures shrink towards them.
        let ts = match spec.kind {
            0..=215 => {
                clock += i64::from(spec.advance % 4);
                Some((clock - back % (grace + window + 1)).max(0))
            }
            216..=225 => None,
            226..=233 => Some(-1 - back),
            234..=241 => Some(NOW_MS + MAX_FUTURE_SKEW_MS + 1 + back),
            // Exactly at the skew limit: accepted, and everything after is late.
            242 => Some(NOW_MS + MAX_FUTURE_SKEW_MS),
            _ => Some((clock - grace - window * (1 + back % 4)).max(0)),
        };
        let value = match spec.value % 16 {
            13 => i64::MAX,
            14 => i64::MAX / 2 + 1,
            15 => i64::MAX - 3,
            small => 1 + i64::from(small % 5),
        };
        let body = match ts {
            None => Body::Poison,
            Some(ts) => Body::Increment {
                key: key_of(spec.key % keys),
                ts,
                value,
            },
        };
        log.push(LogRecord { offset, body });
        offset += match spec.gap % 8 {
            6 => 2,
            7 => 3,
            _ => 1,
        };
    }
    log
}

fn engine_config() -> impl Strategy<Value = EngineConfig> {
    (
        prop_oneof![Just(5i64), Just(10)],
        prop_oneof![Just(0i64), Just(2), Just(5), Just(10), Just(25)],
    )
        .prop_map(|(window, grace)| EngineConfig::new(window, grace, MAX_FUTURE_SKEW_MS).unwrap())
}

// ------------------------------------------------------------------ the model

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Counted,
    AlreadyFinal,
    Late,
    Future,
    Invalid,
    Overflow,
}

#[derive(Debug, Clone, Copy)]
struct CountedIncrement {
    offset: i64,
    key: Uuid,
    start: i64,
    value: i64,
}

/// Where a brute-force walk starts.
#[derive(Debug, Clone, Copy)]
struct ModelStart {
    offset: i64,
    max_ts: Option<i64>,
    closed_through: Option<i64>,
    /// External reset: the first record with a usable timestamp sets the frozen
    /// boundary to the first window boundary ≥ its window end + grace.
    anchor_pending: bool,
    generation: u16,
}

impl ModelStart {
    fn beginning() -> Self {
        ModelStart {
            offset: 0,
            max_ts: None,
            closed_through: None,
            anchor_pending: false,
            generation: 0,
        }
    }
}

/// One partition's decisions and sums, computed by walking its log once.
#[derive(Debug, Clone)]
struct PartitionModel {
    partition: i32,
    generation: u16,
    window_ms: i64,
    decisions: HashMap<i64, Decision>,
    counted: Vec<CountedIncrement>,
    /// Window start → offset of the record whose processing closed it.
    closing_offsets: HashMap<i64, i64>,
    final_watermark: Option<i64>,
    /// The closed-through boundary the walk ended with (frozen windows end ≤ it).
    closed_through: Option<i64>,
    /// An external reset that never read its anchor rebuilds nothing.
    anchor_never_read: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ExpectedRow {
    sum: i64,
    count: i64,
    is_final: bool,
    generation: u16,
}

type RowId = (Uuid, i64, i32);

impl PartitionModel {
    fn walk(config: EngineConfig, partition: i32, log: &[LogRecord], start: ModelStart) -> Self {
        let window = config.window_ms;
        let grace = config.grace_ms;
        let mut model = PartitionModel {
            partition,
            generation: start.generation,
            window_ms: window,
            decisions: HashMap::new(),
            counted: Vec::new(),
            closing_offsets: HashMap::new(),
            final_watermark: None,
            closed_through: start.closed_through,
            anchor_never_read: false,
        };
        let mut max_ts = start.max_ts;
        let mut anchor_pending = start.anchor_pending;
        let mut sums: HashMap<(Uuid, i64), i64> = HashMap::new();
        let mut open_starts: Vec<i64> = Vec::new();
        for record in log.iter().filter(|r| r.offset >= start.offset) {
            let Body::Increment { key, ts, value } = record.body else {
                continue;
            };
            let decision = if ts < 0 {
                Decision::Invalid
            } else if ts > NOW_MS + MAX_FUTURE_SKEW_MS {
                Decision::Future
            } else {
                let window_start = ts / window * window;
                let window_end = window_start + window;
                if anchor_pending {
                    anchor_pending = false;
                    let reach = window_end + grace;
                    model.closed_through = Some((reach + window - 1) / window * window);
                }
                if max_ts.is_some_and(|m| window_end <= m - grace) {
                    Decision::Late
                } else if model.closed_through.is_some_and(|c| window_end <= c) {
                    Decision::AlreadyFinal
                } else {
                    let sum = sums.entry((key, window_start)).or_insert(0);
                    match sum.checked_add(value) {
                        None => Decision::Overflow,
                        Some(new_sum) => {
                            *sum = new_sum;
                            model.counted.push(CountedIncrement {
                                offset: record.offset,
                                key,
                                start: window_start,
                                value,
                            });
                            if !open_starts.contains(&window_start) {
                                open_starts.push(window_start);
                            }
                            Decision::Counted
                        }
                    }
                }
            };
            if matches!(decision, Decision::Counted | Decision::AlreadyFinal)
                && max_ts.is_none_or(|m| ts > m)
            {
                max_ts = Some(ts);
                let watermark = ts - grace;
                open_starts.retain(|&s| {
                    let closes = s + window <= watermark;
                    if closes {
                        model.closing_offsets.insert(s, record.offset);
                    }
                    !closes
                });
            }
            model.decisions.insert(record.offset, decision);
        }
        model.final_watermark = max_ts.map(|m| m - grace);
        model.anchor_never_read = anchor_pending;
        model
    }

    /// Sum and count of the key-window over counted records at offsets ≤ `through`.
    fn prefix(&self, key: Uuid, start: i64, through: i64) -> (i64, i64) {
        self.counted
            .iter()
            .filter(|c| c.key == key && c.start == start && c.offset <= through)
            .fold((0i64, 0i64), |(sum, count), c| (sum + c.value, count + 1))
    }

    /// The rows an uninterrupted run ends with.
    fn expected_rows(&self) -> BTreeMap<RowId, ExpectedRow> {
        let mut rows: BTreeMap<RowId, ExpectedRow> = BTreeMap::new();
        for c in &self.counted {
            let is_final = self
                .final_watermark
                .is_some_and(|watermark| c.start + self.window_ms <= watermark);
            let row = rows
                .entry((c.key, c.start, self.partition))
                .or_insert(ExpectedRow {
                    sum: 0,
                    count: 0,
                    is_final,
                    generation: self.generation,
                });
            row.sum += c.value;
            row.count += 1;
        }
        rows
    }

    /// Every row the engine produces must be exactly the model's window through
    /// its `through_offset`: this is what makes duplicate and reordered writes safe.
    fn check_row(&self, row: &WindowRow) {
        assert_eq!(row.partition, self.partition);
        assert_eq!(row.generation, self.generation, "{row:?}");
        assert_eq!(row.window_start_ms.rem_euclid(self.window_ms), 0, "{row:?}");
        assert_eq!(
            row.window_end_ms,
            row.window_start_ms + self.window_ms,
            "{row:?}"
        );
        let closing = self.closing_offsets.get(&row.window_start_ms).copied();
        if row.is_final {
            assert_eq!(
                closing,
                Some(row.through_offset),
                "final row not through its closing offset: {row:?}"
            );
        } else {
            assert!(
                closing.is_none_or(|closing| row.through_offset < closing),
                "provisional row at or after its window closed ({closing:?}): {row:?}"
            );
        }
        let (sum, count) = self.prefix(row.key, row.window_start_ms, row.through_offset);
        assert!(
            count > 0,
            "row for a key-window with nothing counted: {row:?}"
        );
        assert_eq!(
            (row.sum, row.count),
            (sum, count),
            "row differs from the model through offset {}: {row:?}",
            row.through_offset
        );
    }

    /// The engine's decision must be the model's; a replay may find the window of a
    /// record the live run counted (or found overflowing) already final.
    fn check_outcome(&self, offset: i64, outcome: RecordOutcome) -> Decision {
        let decision = *self
            .decisions
            .get(&offset)
            .expect("decision for every increment");
        let consistent = matches!(
            (decision, outcome),
            (Decision::Counted, RecordOutcome::Counted)
                | (
                    Decision::Counted | Decision::Overflow | Decision::AlreadyFinal,
                    RecordOutcome::AlreadyFinal
                )
                | (Decision::Late, RecordOutcome::Rejected(RejectReason::Late))
                | (
                    Decision::Future,
                    RecordOutcome::Rejected(RejectReason::FutureTimestamp)
                )
                | (
                    Decision::Invalid,
                    RecordOutcome::Rejected(RejectReason::InvalidTimestamp)
                )
                | (
                    Decision::Overflow,
                    RecordOutcome::Rejected(RejectReason::SumOverflow)
                )
        );
        assert!(
            consistent,
            "partition {} offset {offset}: model {decision:?}, engine {outcome:?}",
            self.partition
        );
        decision
    }
}

// ------------------------------------------------------------------ the store

/// A version-guarded store: a row replaces another only with a higher version.
#[derive(Debug, Default)]
struct Store {
    rows: HashMap<RowId, WindowRow>,
}

impl Store {
    /// Returns whether the row was accepted.
    fn write(&mut self, row: WindowRow) -> bool {
        let id = (row.key, row.window_start_ms, row.partition);
        if let Some(current) = self.rows.get(&id) {
            if current.version() >= row.version() {
                return false;
            }
            // The history of accepted writes of this cell never loses completeness.
            if current.generation == row.generation {
                assert!(
                    row.count >= current.count,
                    "accepted a less complete row: {current:?} then {row:?}"
                );
                if current.is_final {
                    assert!(
                        row.is_final && row.sum == current.sum && row.count == current.count,
                        "a final row changed: {current:?} then {row:?}"
                    );
                }
            } else {
                assert!(row.generation > current.generation);
            }
        }
        self.rows.insert(id, row);
        true
    }

    fn snapshot(&self) -> BTreeMap<RowId, ExpectedRow> {
        self.rows
            .iter()
            .map(|(&id, row)| {
                (
                    id,
                    ExpectedRow {
                        sum: row.sum,
                        count: row.count,
                        is_final: row.is_final,
                        generation: row.generation,
                    },
                )
            })
            .collect()
    }
}

// ------------------------------------------------------------------ the simulation

/// What the commit log holds for a partition.
#[derive(Debug, Clone, Copy)]
enum Committed {
    /// A Tally commit with its metadata.
    Tally(Checkpoint),
    /// An offset set by external tools (no metadata); resumed as an external reset.
    External { offset: i64, generation: u16 },
}

impl Committed {
    fn resume(self) -> Resume {
        match self {
            Committed::Tally(checkpoint) => Resume::Checkpoint(checkpoint),
            Committed::External { offset, generation } => Resume::ExternalReset {
                next_offset: offset,
                generation,
            },
        }
    }
}

/// One flush on its way to the store: rows[..written] are durable.
#[derive(Debug)]
struct InFlight {
    rows: Vec<WindowRow>,
    written: usize,
    checkpoint: Option<Checkpoint>,
}

#[derive(Debug)]
struct Owner {
    instance: usize,
    engine: PartitionEngine,
    /// Index in the partition's log of the next record to read.
    read_index: usize,
    in_flight: VecDeque<InFlight>,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Read {
        partition: u8,
        count: u8,
    },
    Flush {
        partition: u8,
    },
    /// Writes up to `rows` rows of the oldest flush not yet durable.
    Write {
        partition: u8,
        rows: u8,
    },
    Commit {
        partition: u8,
    },
    /// The instance dies: rows not yet written are lost, or delivered later
    /// (per flush, by the bits of `zombie_mask`).
    Crash {
        instance: u8,
        zombie_mask: u8,
    },
    /// Cooperative revoke: flush, write, commit, drop; the other instance takes over.
    Revoke {
        partition: u8,
    },
    /// The owner loses the partition without committing; its unwritten rows are
    /// lost or become zombies. The other instance takes over.
    Abandon {
        partition: u8,
        zombie: bool,
    },
    DeliverZombie {
        pick: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    // Partition and instance numbers are taken modulo the scenario's counts.
    let partition = any::<u8>;
    prop_oneof![
        8 => (partition(), 1u8..12).prop_map(|(partition, count)| Op::Read { partition, count }),
        3 => partition().prop_map(|partition| Op::Flush { partition }),
        3 => (partition(), 1u8..8).prop_map(|(partition, rows)| Op::Write { partition, rows }),
        3 => partition().prop_map(|partition| Op::Commit { partition }),
        1 => (any::<u8>(), any::<u8>())
            .prop_map(|(instance, zombie_mask)| Op::Crash { instance, zombie_mask }),
        1 => partition().prop_map(|partition| Op::Revoke { partition }),
        1 => (partition(), any::<bool>())
            .prop_map(|(partition, zombie)| Op::Abandon { partition, zombie }),
        1 => any::<u8>().prop_map(|pick| Op::DeliverZombie { pick }),
    ]
}

/// How often the interesting things happened, so a test can prove the histories
/// are not degenerate.
#[derive(Debug, Default, Clone, Copy)]
struct Coverage {
    counted: usize,
    already_final: usize,
    already_final_checked_in_store: usize,
    late: usize,
    future: usize,
    invalid: usize,
    overflow: usize,
    poison: usize,
    resumes_mid_log: usize,
    crashes_with_owners: usize,
    zombie_rows_delivered: usize,
    zombie_rows_accepted: usize,
    stale_writes_refused: usize,
    partial_writes: usize,
    final_rows: usize,
    provisional_rows: usize,
    commits: usize,
}

impl Coverage {
    fn add(&mut self, other: Coverage) {
        self.counted += other.counted;
        self.already_final += other.already_final;
        self.already_final_checked_in_store += other.already_final_checked_in_store;
        self.late += other.late;
        self.future += other.future;
        self.invalid += other.invalid;
        self.overflow += other.overflow;
        self.poison += other.poison;
        self.resumes_mid_log += other.resumes_mid_log;
        self.crashes_with_owners += other.crashes_with_owners;
        self.zombie_rows_delivered += other.zombie_rows_delivered;
        self.zombie_rows_accepted += other.zombie_rows_accepted;
        self.stale_writes_refused += other.stale_writes_refused;
        self.partial_writes += other.partial_writes;
        self.final_rows += other.final_rows;
        self.provisional_rows += other.provisional_rows;
        self.commits += other.commits;
    }
}

struct Sim<'a> {
    config: EngineConfig,
    logs: &'a [Vec<LogRecord>],
    models: Vec<PartitionModel>,
    owners: Vec<Option<Owner>>,
    committed: Vec<Committed>,
    store: Store,
    zombies: Vec<Vec<WindowRow>>,
    next_instance: usize,
    /// Whether `AlreadyFinal` promises a final row in the store (true unless the
    /// frozen windows of an external reset or replay boundary may be provisional).
    already_final_means_final_in_store: bool,
    coverage: Coverage,
}

impl<'a> Sim<'a> {
    fn new(config: EngineConfig, logs: &'a [Vec<LogRecord>], models: Vec<PartitionModel>) -> Self {
        Sim {
            config,
            logs,
            models,
            owners: logs.iter().map(|_| None).collect(),
            committed: logs
                .iter()
                .map(|_| Committed::Tally(Checkpoint::fresh(0)))
                .collect(),
            store: Store::default(),
            zombies: Vec::new(),
            next_instance: 0,
            already_final_means_final_in_store: true,
            coverage: Coverage::default(),
        }
    }

    fn partition(&self, raw: u8) -> usize {
        usize::from(raw) % self.logs.len()
    }

    fn assign(&mut self, partition: usize, instance: usize) {
        let resume = self.committed[partition].resume();
        let engine = PartitionEngine::new(self.config, partition as i32, resume);
        if engine.next_offset() > 0 {
            self.coverage.resumes_mid_log += 1;
        }
        // The consumer seeks to the resume offset.
        let read_index = self.logs[partition].partition_point(|r| r.offset < engine.next_offset());
        self.owners[partition] = Some(Owner {
            instance,
            engine,
            read_index,
            in_flight: VecDeque::new(),
        });
    }

    fn ensure_owned(&mut self, partition: usize) {
        if self.owners[partition].is_none() {
            let instance = self.next_instance;
            self.next_instance ^= 1;
            self.assign(partition, instance);
        }
    }

    fn read(&mut self, partition: usize, count: usize) {
        self.ensure_owned(partition);
        for _ in 0..count {
            let owner = self.owners[partition].as_mut().unwrap();
            let Some(record) = self.logs[partition].get(owner.read_index).copied() else {
                break;
            };
            owner.read_index += 1;
            let Body::Increment { key, ts, value } = record.body else {
                owner.engine.skip(record.offset);
                self.coverage.poison += 1;
                continue;
            };
            let outcome = owner.engine.record(record.offset, key, ts, value, NOW_MS);
            let decision = self.models[partition].check_outcome(record.offset, outcome);
            let coverage = &mut self.coverage;
            match outcome {
                RecordOutcome::Counted => coverage.counted += 1,
                RecordOutcome::AlreadyFinal => coverage.already_final += 1,
                RecordOutcome::Rejected(RejectReason::Late) => coverage.late += 1,
                RecordOutcome::Rejected(RejectReason::FutureTimestamp) => coverage.future += 1,
                RecordOutcome::Rejected(RejectReason::InvalidTimestamp) => coverage.invalid += 1,
                RecordOutcome::Rejected(RejectReason::SumOverflow) => coverage.overflow += 1,
                RecordOutcome::Rejected(other) => panic!("unexpected rejection {other:?}"),
            }
            if outcome == RecordOutcome::AlreadyFinal
                && matches!(decision, Decision::Counted | Decision::Overflow)
                && self.already_final_means_final_in_store
            {
                // The engine skips it because the window is durably final: it must be.
                let start = ts.div_euclid(self.config.window_ms) * self.config.window_ms;
                let stored = self.store.rows.get(&(key, start, partition as i32));
                assert!(
                    stored.is_some_and(|row| row.is_final),
                    "offset {} judged already final, but the store has {stored:?}",
                    record.offset
                );
                self.coverage.already_final_checked_in_store += 1;
            }
        }
    }

    fn flush(&mut self, partition: usize) {
        let Some(owner) = self.owners[partition].as_mut() else {
            return;
        };
        let flush = owner.engine.flush();
        for row in &flush.rows {
            self.models[partition].check_row(row);
            if row.is_final {
                self.coverage.final_rows += 1;
            } else {
                self.coverage.provisional_rows += 1;
            }
        }
        owner.in_flight.push_back(InFlight {
            rows: flush.rows,
            written: 0,
            checkpoint: flush.checkpoint,
        });
    }

    fn write(&mut self, partition: usize, max_rows: usize) {
        let Some(owner) = self.owners[partition].as_mut() else {
            return;
        };
        let Some(in_flight) = owner
            .in_flight
            .iter_mut()
            .find(|f| f.written < f.rows.len())
        else {
            return;
        };
        let end = (in_flight.written + max_rows).min(in_flight.rows.len());
        if end < in_flight.rows.len() {
            self.coverage.partial_writes += 1;
        }
        for row in &in_flight.rows[in_flight.written..end] {
            if !self.store.write(*row) {
                self.coverage.stale_writes_refused += 1;
            }
        }
        in_flight.written = end;
    }

    fn write_all(&mut self, partition: usize) {
        self.write(partition, usize::MAX / 2);
        while self.owners[partition]
            .as_ref()
            .is_some_and(|o| o.in_flight.iter().any(|f| f.written < f.rows.len()))
        {
            self.write(partition, usize::MAX / 2);
        }
    }

    /// Commits the checkpoint of the newest flush whose rows, and all earlier
    /// flushes' rows, are durable.
    fn commit(&mut self, partition: usize) {
        let Some(owner) = self.owners[partition].as_mut() else {
            return;
        };
        let mut newest = None;
        while owner
            .in_flight
            .front()
            .is_some_and(|f| f.written == f.rows.len())
        {
            let done = owner.in_flight.pop_front().unwrap();
            newest = done.checkpoint.or(newest);
        }
        if let Some(checkpoint) = newest {
            assert!(checkpoint.next_offset <= owner.engine.next_offset());
            self.committed[partition] = Committed::Tally(checkpoint);
            self.coverage.commits += 1;
        }
    }

    fn drop_owner(&mut self, partition: usize, zombie_mask: u8) {
        let Some(owner) = self.owners[partition].take() else {
            return;
        };
        for (index, in_flight) in owner.in_flight.into_iter().enumerate() {
            let unwritten = &in_flight.rows[in_flight.written..];
            if !unwritten.is_empty() && zombie_mask & (1 << (index % 8)) != 0 {
                self.zombies.push(unwritten.to_vec());
            }
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Read { partition, count } => {
                let partition = self.partition(partition);
                self.read(partition, usize::from(count));
            }
            Op::Flush { partition } => {
                let partition = self.partition(partition);
                self.flush(partition);
            }
            Op::Write { partition, rows } => {
                let partition = self.partition(partition);
                self.write(partition, usize::from(rows));
            }
            Op::Commit { partition } => {
                let partition = self.partition(partition);
                self.commit(partition);
            }
            Op::Crash {
                instance,
                zombie_mask,
            } => {
                let instance = usize::from(instance % 2);
                if self.owners.iter().flatten().any(|o| o.instance == instance) {
                    self.coverage.crashes_with_owners += 1;
                }
                for partition in 0..self.logs.len() {
                    if self.owners[partition]
                        .as_ref()
                        .is_some_and(|o| o.instance == instance)
                    {
                        self.drop_owner(partition, zombie_mask);
                    }
                }
            }
            Op::Revoke { partition } => {
                let partition = self.partition(partition);
                if let Some(instance) = self.owners[partition].as_ref().map(|o| o.instance) {
                    self.flush(partition);
                    self.write_all(partition);
                    self.commit(partition);
                    self.drop_owner(partition, 0);
                    self.assign(partition, instance ^ 1);
                }
            }
            Op::Abandon { partition, zombie } => {
                let partition = self.partition(partition);
                if let Some(instance) = self.owners[partition].as_ref().map(|o| o.instance) {
                    self.drop_owner(partition, if zombie { u8::MAX } else { 0 });
                    self.assign(partition, instance ^ 1);
                }
            }
            Op::DeliverZombie { pick } => self.deliver_zombie(usize::from(pick)),
        }
    }

    fn deliver_zombie(&mut self, pick: usize) {
        if self.zombies.is_empty() {
            return;
        }
        let rows = self.zombies.swap_remove(pick % self.zombies.len());
        for row in rows {
            self.coverage.zombie_rows_delivered += 1;
            if self.store.write(row) {
                self.coverage.zombie_rows_accepted += 1;
            }
        }
    }

    /// Every partition catches up with its log, flushes, writes and commits; then
    /// the remaining zombie writes land, after the new owners' writes.
    fn finish(&mut self) {
        for partition in 0..self.logs.len() {
            self.read(partition, usize::MAX);
            self.flush(partition);
            self.write_all(partition);
            self.commit(partition);
        }
        while !self.zombies.is_empty() {
            self.deliver_zombie(0);
        }
    }
}

fn assert_store_equals(store: &Store, expected: &BTreeMap<RowId, ExpectedRow>) {
    let actual = store.snapshot();
    for (id, row) in expected {
        assert_eq!(actual.get(id), Some(row), "row {id:?}");
    }
    for (id, row) in &actual {
        assert!(expected.contains_key(id), "unexpected row {id:?}: {row:?}");
    }
}

// ------------------------------------------------------------------ property 1

#[derive(Debug, Clone)]
struct Scenario {
    config: EngineConfig,
    logs: Vec<Vec<LogRecord>>,
    ops: Vec<Op>,
}

fn scenario(
    max_partitions: usize,
    max_records: usize,
    max_ops: usize,
) -> impl Strategy<Value = Scenario> {
    (engine_config(), 1..=max_partitions, 1u8..=4, 0i64..20).prop_flat_map(
        move |(config, partitions, keys, start_ts)| {
            (
                proptest::collection::vec(
                    proptest::collection::vec(record_spec(), 0..max_records),
                    partitions,
                ),
                proptest::collection::vec(op(), 0..max_ops),
            )
                .prop_map(move |(specs, ops)| Scenario {
                    config,
                    logs: specs
                        .iter()
                        .map(|specs| build_log(config, keys, start_ts, specs))
                        .collect(),
                    ops,
                })
        },
    )
}

fn run_scenario(scenario: &Scenario) -> Coverage {
    let models: Vec<PartitionModel> = scenario
        .logs
        .iter()
        .enumerate()
        .map(|(p, log)| {
            PartitionModel::walk(scenario.config, p as i32, log, ModelStart::beginning())
        })
        .collect();
    let mut expected = BTreeMap::new();
    for model in &models {
        expected.extend(model.expected_rows());
    }
    let mut sim = Sim::new(scenario.config, &scenario.logs, models);
    for &op in &scenario.ops {
        sim.apply(op);
    }
    sim.finish();
    assert_store_equals(&sim.store, &expected);
    sim.coverage
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(8_000)))]

    /// Crashes, rebalances, partial and zombie writes: the store ends up exactly
    /// equal to an uninterrupted run, and no write ever lowered completeness.
    #[test]
    fn store_equals_the_uninterrupted_run(scenario in scenario(4, 80, 120)) {
        run_scenario(&scenario);
    }
}

// ------------------------------------------------------------------ property 2

/// How the second run starts.
#[derive(Debug, Clone, Copy)]
enum ReplayKind {
    /// `replay --from-offset` / a reset by Kafka's tools: no Tally metadata.
    ExternalReset,
    /// `replay --from <time>`: a checkpoint of generation + 1 whose closed-through
    /// boundary is the replay time, starting early enough for every later window.
    BoundaryCheckpoint,
}

#[derive(Debug, Clone)]
struct ReplayScenario {
    first: Scenario,
    kind: ReplayKind,
    /// Per partition: which replay offset / boundary.
    picks: Vec<(u16, bool)>,
    second_ops: Vec<Op>,
}

fn replay_scenario() -> impl Strategy<Value = ReplayScenario> {
    (
        scenario(2, 60, 40),
        prop_oneof![
            Just(ReplayKind::ExternalReset),
            Just(ReplayKind::BoundaryCheckpoint)
        ],
        proptest::collection::vec((any::<u16>(), any::<bool>()), 2),
        proptest::collection::vec(op(), 0..60),
    )
        .prop_map(|(first, kind, picks, second_ops)| ReplayScenario {
            first,
            kind,
            picks,
            second_ops,
        })
}

/// Chooses a replay start for one partition; returns the commit to resume from
/// and the model's starting point.
fn replay_start(
    config: EngineConfig,
    log: &[LogRecord],
    first_run: &PartitionModel,
    kind: ReplayKind,
    (pick, walk_back): (u16, bool),
) -> (Committed, ModelStart) {
    let end_offset = log.last().map_or(0, |r| r.offset + 1);
    match kind {
        ReplayKind::ExternalReset => {
            // The frozen boundary is derived from the anchor, which must have been on
            // time in the first run (see `Resume::ExternalReset`): start at a record
            // the first run counted, or just before it on records without a usable
            // timestamp (which do not anchor).
            let offset = if first_run.counted.is_empty() {
                end_offset
            } else {
                let anchor = first_run.counted[usize::from(pick) % first_run.counted.len()].offset;
                let mut index = log.partition_point(|r| r.offset < anchor);
                while walk_back
                    && index > 0
                    && matches!(
                        first_run.decisions.get(&log[index - 1].offset),
                        None | Some(Decision::Invalid | Decision::Future)
                    )
                {
                    index -= 1;
                }
                log[index].offset
            };
            (
                Committed::External {
                    offset,
                    generation: 1,
                },
                ModelStart {
                    offset,
                    max_ts: None,
                    closed_through: None,
                    anchor_pending: true,
                    generation: 1,
                },
            )
        }
        ReplayKind::BoundaryCheckpoint => {
            let last_ts = log
                .iter()
                .filter_map(|r| match r.body {
                    Body::Increment { ts, .. }
                        if (0..=NOW_MS + MAX_FUTURE_SKEW_MS).contains(&ts) =>
                    {
                        Some(ts)
                    }
                    _ => None,
                })
                .max()
                .unwrap_or(0);
            let windows = last_ts / config.window_ms + 2;
            let boundary = i64::from(pick) % windows * config.window_ms;
            // Start at the first record of any window after the boundary.
            let offset = log
                .iter()
                .find(|r| matches!(r.body, Body::Increment { ts, .. } if ts >= boundary && ts <= NOW_MS + MAX_FUTURE_SKEW_MS))
                .map_or(end_offset, |r| r.offset);
            let checkpoint = Checkpoint {
                next_offset: offset,
                max_ts_ms: None,
                closed_through_ms: Some(boundary),
                generation: 1,
                settings: None,
            };
            (
                Committed::Tally(checkpoint),
                ModelStart {
                    offset,
                    max_ts: None,
                    closed_through: Some(boundary),
                    anchor_pending: false,
                    generation: 1,
                },
            )
        }
    }
}

fn run_replay_scenario(scenario: &ReplayScenario) -> Coverage {
    let config = scenario.first.config;
    let logs = &scenario.first.logs;
    let first_models: Vec<PartitionModel> = logs
        .iter()
        .enumerate()
        .map(|(p, log)| PartitionModel::walk(config, p as i32, log, ModelStart::beginning()))
        .collect();
    let mut first_expected = BTreeMap::new();
    for model in &first_models {
        first_expected.extend(model.expected_rows());
    }

    // First run, to the end (zombies of it may still land during the replay).
    let mut sim = Sim::new(config, logs, first_models.clone());
    for &op in &scenario.first.ops {
        sim.apply(op);
    }
    let leftover_zombies = std::mem::take(&mut sim.zombies);
    sim.finish();
    assert_store_equals(&sim.store, &first_expected);
    sim.zombies = leftover_zombies;

    // The replay: every owner stops; each partition restarts from the replay commit.
    let mut second_models = Vec::new();
    let mut expected = BTreeMap::new();
    for (p, log) in logs.iter().enumerate() {
        sim.owners[p] = None;
        let (committed, start) = replay_start(
            config,
            log,
            &first_models[p],
            scenario.kind,
            scenario.picks[p],
        );
        sim.committed[p] = committed;
        let second = PartitionModel::walk(config, p as i32, log, start);
        // Windows frozen by the replay keep the first run's rows; the others are
        // the replay's.
        let frozen = |row_start: i64| {
            second.anchor_never_read
                || second
                    .closed_through
                    .is_some_and(|c| row_start + config.window_ms <= c)
        };
        for (id, row) in first_models[p].expected_rows() {
            if frozen(id.1) {
                expected.insert(id, row);
            }
        }
        for (id, row) in second.expected_rows() {
            assert!(
                !frozen(id.1),
                "the replay counted into a frozen window {id:?}"
            );
            expected.insert(id, row);
        }
        // No increment the first run counted before the replay offset may be lost:
        // its window must be frozen, or the replay would rebuild it without it.
        if !second.anchor_never_read && second.closed_through.is_some() {
            for c in first_models[p]
                .counted
                .iter()
                .filter(|c| c.offset < start.offset)
            {
                assert!(
                    frozen(c.start),
                    "partition {p}: offset {} (window {}) precedes the replay offset {} but its window is rebuilt (frozen through {:?})",
                    c.offset,
                    c.start,
                    start.offset,
                    second.closed_through
                );
            }
        }
        second_models.push(second);
    }
    sim.models = second_models;
    sim.already_final_means_final_in_store = false;
    for &op in &scenario.second_ops {
        sim.apply(op);
    }
    sim.finish();
    assert_store_equals(&sim.store, &expected);
    sim.coverage
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2_000)))]

    /// A replay with a new generation rebuilds exactly the windows after its
    /// boundary, never rewrites the frozen ones, and loses nothing from either.
    #[test]
    fn replay_with_a_new_generation_rebuilds_only_unfrozen_windows(scenario in replay_scenario()) {
        run_replay_scenario(&scenario);
    }
}

// ------------------------------------------------------------------ fixed histories

/// The model itself on a hand-checked log, so a broken model cannot make the
/// properties vacuous.
#[test]
fn model_decides_a_known_log() {
    let config = EngineConfig::new(10, 2, MAX_FUTURE_SKEW_MS).unwrap();
    let k = key_of(0);
    let inc = |offset, ts, value| LogRecord {
        offset,
        body: Body::Increment { key: k, ts, value },
    };
    let log = vec![
        inc(0, 5, 1),
        inc(1, 11, 2),
        LogRecord {
            offset: 2,
            body: Body::Poison,
        },
        inc(3, 9, 3),           // within grace
        inc(4, 12, 4),          // closes [0, 10)
        inc(5, 8, 5),           // late
        inc(6, NOW_MS + 51, 6), // future
        inc(7, -1, 7),          // invalid
        inc(8, 13, i64::MAX),   // overflow in [10, 20)
    ];
    let model = PartitionModel::walk(config, 0, &log, ModelStart::beginning());
    let decisions: Vec<Decision> = [0, 1, 3, 4, 5, 6, 7, 8]
        .iter()
        .map(|o| model.decisions[o])
        .collect();
    assert_eq!(
        decisions,
        vec![
            Decision::Counted,
            Decision::Counted,
            Decision::Counted,
            Decision::Counted,
            Decision::Late,
            Decision::Future,
            Decision::Invalid,
            Decision::Overflow
        ]
    );
    assert_eq!(model.closing_offsets.get(&0), Some(&4));
    assert_eq!(model.final_watermark, Some(10));
    let rows = model.expected_rows();
    assert_eq!(
        rows[&(k, 0, 0)],
        ExpectedRow {
            sum: 4,
            count: 2,
            is_final: true,
            generation: 0
        }
    );
    assert_eq!(
        rows[&(k, 10, 0)],
        ExpectedRow {
            sum: 6,
            count: 2,
            is_final: false,
            generation: 0
        }
    );
    assert_eq!(model.prefix(k, 10, 3), (2, 1));
}

/// A crash between the store write and the commit, then a zombie of the dead
/// owner's last (unwritten) flush landing after the new owner caught up.
#[test]
fn crash_after_write_before_commit_then_zombie() {
    let config = EngineConfig::new(10, 2, MAX_FUTURE_SKEW_MS).unwrap();
    let specs: Vec<RecordSpec> = (0..40u8)
        .map(|n| RecordSpec {
            kind: 0,
            advance: n % 3,
            back: n.wrapping_mul(37),
            key: n,
            value: n,
            gap: n,
        })
        .collect();
    let logs = vec![build_log(config, 3, 0, &specs)];
    let scenario = Scenario {
        config,
        logs,
        ops: vec![
            Op::Read {
                partition: 0,
                count: 15,
            },
            Op::Flush { partition: 0 },
            Op::Write {
                partition: 0,
                rows: 100,
            },
            Op::Commit { partition: 0 },
            Op::Read {
                partition: 0,
                count: 10,
            },
            Op::Flush { partition: 0 },
            Op::Write {
                partition: 0,
                rows: 100,
            },
            Op::Read {
                partition: 0,
                count: 5,
            },
            Op::Flush { partition: 0 },
            Op::Crash {
                instance: 0,
                zombie_mask: u8::MAX,
            },
            Op::Read {
                partition: 0,
                count: 30,
            },
        ],
    };
    run_scenario(&scenario);
}

/// The random histories really contain what the properties are about: a
/// generator that silently stopped producing crashes, zombies or replays would
/// make them pass vacuously.
#[test]
fn histories_cover_the_interesting_cases() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};

    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(Config::default().rng_algorithm),
    );
    let mut total = Coverage::default();
    for _ in 0..300 {
        let scenario = scenario(4, 80, 120)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        total.add(run_scenario(&scenario));
    }
    let mut replays = Coverage::default();
    for _ in 0..100 {
        let scenario = replay_scenario().new_tree(&mut runner).unwrap().current();
        replays.add(run_replay_scenario(&scenario));
    }
    println!("histories: {total:#?}\nreplays: {replays:#?}");
    let minimum = 20;
    for (what, count) in [
        ("counted", total.counted),
        ("already final", total.already_final),
        (
            "already final checked in the store",
            total.already_final_checked_in_store,
        ),
        ("late", total.late),
        ("future", total.future),
        ("invalid", total.invalid),
        ("overflow", total.overflow),
        ("poison", total.poison),
        ("resumes mid-log", total.resumes_mid_log),
        ("crashes", total.crashes_with_owners),
        ("zombie rows delivered", total.zombie_rows_delivered),
        ("zombie rows accepted", total.zombie_rows_accepted),
        ("stale writes refused", total.stale_writes_refused),
        ("partial writes", total.partial_writes),
        ("final rows", total.final_rows),
        ("provisional rows", total.provisional_rows),
        ("commits", total.commits),
        ("replays: already final", replays.already_final),
        ("replays: counted", replays.counted),
        ("replays: resumes mid-log", replays.resumes_mid_log),
        ("replays: final rows", replays.final_rows),
    ] {
        assert!(
            count >= minimum,
            "only {count} x {what} in the sampled histories"
        );
    }
}
