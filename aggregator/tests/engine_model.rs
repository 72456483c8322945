//! The exactness proof, on the code that runs: random histories drive the production
//! commit protocol (`tally_aggregator::protocol::Protocol`, the same type the
//! consumer shell drives) against a simulated log, a version-guarded simulated store
//! with checkpoint rows pruned like the real backends, a simulated consumer group
//! (optionally dropping commit metadata, as tansu does) and a dead-letter topic.
//!
//! The test is the shell: it feeds the protocol the events the shell would and
//! executes its commands against the simulations, one step at a time, so faults land
//! between any two steps: crashes after rows but before checkpoint rows, after
//! checkpoint rows but before the commit, after the commit; rows of an unfinished
//! write arriving later ("zombies") after the new owner wrote; lost or failed commits
//! (a group behind the store); dead-letter acknowledgements lost with the letter
//! written anyway (written twice); cooperative revokes with a write in flight and a
//! deadline; rude partition losses; offsets expired from the group; external offset
//! resets; `tally replay --from` (planned by the production planner) and
//! `--from-offset` at random points. There is no second implementation of the
//! protocol here.
//!
//! Checked after every history, against a brute-force model computed from the log:
//! - every row the protocol ever asks to write is exactly the model's window sum
//!   through the row's `through_offset`, and every decision is the model's;
//! - no accepted write makes a stored row less complete;
//! - no commit passes a rejected record whose dead letter is not in the DLQ topic;
//! - the final store equals, for every (key, window, partition), the model of an
//!   uninterrupted run of the current replay generation, with windows a replay
//!   froze keeping the earlier run's rows (for external resets, which know nothing
//!   before their offset, a frozen window keeps what the store had: any exact prefix
//!   of the earlier run at least as complete as at the reset).
//!
//! Cases: 1500 + 800 by default (about 10 s); `TALLY_PROPTEST_CASES=N` runs N of each.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use proptest::prelude::*;
use tally_aggregator::engine::{EngineConfig, Resume};
use tally_aggregator::protocol::replay::{
    plan_from_offsets, plan_from_time, PartitionPosition, PlannedCommit,
};
use tally_aggregator::protocol::{
    resume, AssignedPartition, Command, CommittedOffset, Event, LetterId, Protocol, ProtocolConfig,
    Record, StartAt, StoreCheckpoints, WriteBatch,
};
use tally_schemas::{Checkpoint, PinnedSettings};
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
    /// Undecodable: dead-lettered as poison.
    Poison,
    /// An idle marker: its timestamp advances event time, nothing else.
    Marker,
    Increment {
        key: Uuid,
        value: i64,
    },
}

#[derive(Debug, Clone, Copy)]
struct LogRecord {
    offset: i64,
    /// The record timestamp (event time).
    ts: i64,
    body: Body,
}

impl LogRecord {
    fn bytes(&self) -> Vec<u8> {
        match self.body {
            Body::Poison => b"{\"key\":".to_vec(),
            Body::Marker => Vec::new(),
            Body::Increment { key, value } => {
                format!(r#"{{"key":"{}","value":{value}}}"#, key.hyphenated()).into_bytes()
            }
        }
    }
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
    any::<[u8; 6]>().prop_map(|[kind, advance, back, key, value, gap]| RecordSpec {
        kind,
        advance,
        back,
        key,
        value,
        gap,
    })
}

fn key_of(index: u8) -> Uuid {
    Uuid::from_u128(0x7a11_0000_0000_4000_8000_0000_0000_0000 | u128::from(index))
}

/// Turns specs into a log: event times mostly increasing with jitter inside and
/// beyond the grace, some far-late, future, negative and poison records, values
/// near i64::MAX now and then (overflow), offset gaps (as transaction markers leave).
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
        clock += i64::from(spec.advance % 4);
        // Small `kind`s are ordinary records, so failures shrink towards them.
        let (ts, poison) = match spec.kind {
            // Idle markers, stamped around the clock (behind it, as the lag makes them,
            // or ahead, closing windows).
            0..=7 if spec.gap % 4 == 0 => {
                let marker_ts = (clock + back % (2 * window + grace + 1) - window).max(0);
                log.push(LogRecord {
                    offset,
                    ts: marker_ts,
                    body: Body::Marker,
                });
                offset += 1;
                continue;
            }
            0..=215 => ((clock - back % (grace + window + 1)).max(0), false),
            216..=225 => (clock, true),
            226..=233 => (-1 - back, false),
            234..=241 => (NOW_MS + MAX_FUTURE_SKEW_MS + 1 + back, false),
            // Exactly at the skew limit: accepted, and everything after is late.
            242 => (NOW_MS + MAX_FUTURE_SKEW_MS, false),
            _ => ((clock - grace - window * (1 + back % 4)).max(0), false),
        };
        let value = match spec.value % 16 {
            13 => i64::MAX,
            14 => i64::MAX / 2 + 1,
            15 => i64::MAX - 3,
            small => 1 + i64::from(small % 5),
        };
        let body = if poison {
            Body::Poison
        } else {
            Body::Increment {
                key: key_of(spec.key % keys),
                value,
            }
        };
        log.push(LogRecord { offset, ts, body });
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
    Poison,
    /// An idle marker (no letter, no count).
    Marker,
}

impl Decision {
    fn is_rejection(self) -> bool {
        !matches!(
            self,
            Decision::Counted | Decision::AlreadyFinal | Decision::Marker
        )
    }
}

#[derive(Debug, Clone, Copy)]
struct CountedIncrement {
    offset: i64,
    key: Uuid,
    start: i64,
    value: i64,
}

/// Where a brute-force walk starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ModelStart {
    offset: i64,
    max_ts: Option<i64>,
    closed_through: Option<i64>,
    /// External reset: the first record with a usable timestamp sets the frozen
    /// boundary to the first window boundary ≥ its window end + grace.
    anchor_pending: bool,
}

impl ModelStart {
    fn beginning() -> Self {
        ModelStart {
            offset: 0,
            max_ts: None,
            closed_through: None,
            anchor_pending: false,
        }
    }
}

/// One partition's decisions and sums, computed by walking its log once.
#[derive(Debug, Clone)]
struct PartitionModel {
    partition: i32,
    window_ms: i64,
    start: ModelStart,
    decisions: HashMap<i64, Decision>,
    counted: Vec<CountedIncrement>,
    /// Window start → offset of the record whose processing closed it.
    closing_offsets: HashMap<i64, i64>,
    final_watermark: Option<i64>,
    /// The closed-through boundary the walk ended with (frozen windows end ≤ it).
    closed_through: Option<i64>,
    /// An external reset that never read its anchor freezes everything.
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
            window_ms: window,
            start,
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
            if record.body == Body::Marker {
                let ts = record.ts;
                let usable = !anchor_pending && (0..=NOW_MS + MAX_FUTURE_SKEW_MS).contains(&ts);
                if usable && max_ts.is_none_or(|m| ts > m) {
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
                model.decisions.insert(record.offset, Decision::Marker);
                continue;
            }
            let Body::Increment { key, value } = record.body else {
                model.decisions.insert(record.offset, Decision::Poison);
                continue;
            };
            let ts = record.ts;
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
                    let frozen = (reach + window - 1) / window * window;
                    model.closed_through =
                        Some(model.closed_through.map_or(frozen, |c| c.max(frozen)));
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

    fn is_frozen(&self, window_start: i64) -> bool {
        self.anchor_never_read
            || self
                .closed_through
                .is_some_and(|c| window_start + self.window_ms <= c)
    }

    /// Sum and count of the key-window over counted records at offsets ≤ `through`.
    fn prefix(&self, key: Uuid, start: i64, through: i64) -> (i64, i64) {
        self.counted
            .iter()
            .filter(|c| c.key == key && c.start == start && c.offset <= through)
            .fold((0i64, 0i64), |(sum, count), c| (sum + c.value, count + 1))
    }

    /// The rows an uninterrupted run ends with.
    fn expected_rows(&self, generation: u16) -> BTreeMap<RowId, ExpectedRow> {
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
                    generation,
                });
            row.sum += c.value;
            row.count += 1;
        }
        rows
    }

    /// Every row must be exactly the model's window through its `through_offset`:
    /// this is what makes duplicate, reordered and zombie writes safe.
    fn check_row(&self, row: &WindowRow) {
        assert_eq!(row.partition, self.partition);
        assert_eq!(row.window_start_ms.rem_euclid(self.window_ms), 0, "{row:?}");
        assert_eq!(
            row.window_end_ms,
            row.window_start_ms + self.window_ms,
            "{row:?}"
        );
        assert!(
            !self.is_frozen(row.window_start_ms),
            "a row for a frozen window: {row:?} (frozen through {:?})",
            self.closed_through
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

    /// A row that is an exact prefix of this model (for windows an external reset
    /// froze: any such row is acceptable, never a wrong sum).
    fn is_exact_prefix(&self, row: &WindowRow) -> bool {
        let (sum, count) = self.prefix(row.key, row.window_start_ms, row.through_offset);
        count > 0 && (row.sum, row.count) == (sum, count)
    }

    fn decision(&self, offset: i64) -> Decision {
        *self.decisions.get(&offset).unwrap_or_else(|| {
            panic!(
                "partition {}: no decision for offset {offset}",
                self.partition
            )
        })
    }
}

// ------------------------------------------------------------------ the store

/// A version-guarded store: a row replaces another only with a higher version.
/// Checkpoint rows are kept and pruned exactly like the real backends.
#[derive(Debug, Default)]
struct Store {
    rows: HashMap<RowId, WindowRow>,
    checkpoints: BTreeMap<i32, BTreeMap<(i64, u16), Checkpoint>>,
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
                    row.count >= current.count && row.through_offset >= current.through_offset,
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

    /// Keyed by (offset, generation), pruned by offset: like the real backends.
    fn save_checkpoint(&mut self, partition: i32, checkpoint: Checkpoint) {
        let saved = self.checkpoints.entry(partition).or_default();
        saved.insert((checkpoint.next_offset, checkpoint.generation), checkpoint);
        let offsets: Vec<i64> = saved.keys().map(|(offset, _)| *offset).collect();
        for offset in tally_sink::store::checkpoints_to_prune(checkpoint.next_offset, &offsets) {
            saved.retain(|(o, _), _| *o != offset);
        }
    }

    /// What the shell's assignment lookups return.
    fn lookup(&self, partition: i32, committed: &CommittedOffset) -> StoreCheckpoints {
        let saved = self.checkpoints.get(&partition);
        let exact = match committed {
            CommittedOffset::At { offset, .. } => saved.and_then(|s| {
                s.values()
                    .filter(|c| c.next_offset == *offset)
                    .max_by_key(|c| c.generation)
                    .copied()
            }),
            CommittedOffset::None => None,
        };
        let latest = saved.and_then(|s| {
            s.values()
                .max_by_key(|c| (c.generation, c.next_offset))
                .copied()
        });
        StoreCheckpoints { exact, latest }
    }
}

// ------------------------------------------------------------------ the simulation

/// An unfinished store write: rows first, then checkpoint rows, then `Written`.
#[derive(Debug, Clone)]
struct InFlightWrite {
    batch: WriteBatch,
    rows_done: usize,
    checkpoints_done: usize,
}

impl InFlightWrite {
    fn new(batch: WriteBatch) -> Self {
        InFlightWrite {
            batch,
            rows_done: 0,
            checkpoints_done: 0,
        }
    }

    /// Applies up to `budget` rows or checkpoint rows; returns true when complete.
    fn progress(&mut self, store: &mut Store, mut budget: usize, coverage: &mut Coverage) -> bool {
        while budget > 0 && self.rows_done < self.batch.rows.len() {
            if !store.write(self.batch.rows[self.rows_done]) {
                coverage.stale_writes_refused += 1;
            }
            self.rows_done += 1;
            budget -= 1;
        }
        while budget > 0 && self.checkpoints_done < self.batch.checkpoints.len() {
            let (partition, checkpoint) = self.batch.checkpoints[self.checkpoints_done];
            store.save_checkpoint(partition, checkpoint);
            self.checkpoints_done += 1;
            budget -= 1;
        }
        self.rows_done == self.batch.rows.len()
            && self.checkpoints_done == self.batch.checkpoints.len()
    }
}

#[derive(Debug)]
struct Instance {
    protocol: Protocol,
    /// Commands the shell has not executed yet.
    pending: VecDeque<Command>,
    /// Writes in order (the shell's writer does one at a time, oldest first).
    writes: VecDeque<InFlightWrite>,
    letters: Vec<(LetterId, i32, i64)>,
    commits: Vec<Vec<(i32, Checkpoint)>>,
    /// Read position (index into the log) and paused flag of owned partitions.
    positions: BTreeMap<i32, (usize, bool)>,
    committed_any: bool,
}

/// How a partition's current run began.
#[derive(Debug, Clone)]
enum SegmentKind {
    /// The first run, from the beginning.
    Initial,
    /// `replay --from`: frozen windows were final at the group's position.
    Replay,
    /// An offset reset without Tally state: frozen windows keep what the store had.
    ExternalReset { snapshot: HashMap<RowId, WindowRow> },
}

#[derive(Debug, Clone)]
struct Segment {
    kind: SegmentKind,
    model: PartitionModel,
    /// The generation its rows are written with (an external reset's is chosen at
    /// assignment, so it is recorded then).
    generation: u16,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Read {
        instance: u8,
        partition: u8,
        count: u8,
    },
    Tick {
        instance: u8,
    },
    Execute {
        instance: u8,
        count: u8,
    },
    Write {
        instance: u8,
        budget: u8,
    },
    Letter {
        instance: u8,
        pick: u8,
        fate: u8,
    },
    Commit {
        instance: u8,
        pick: u8,
        ok: bool,
    },
    Crash {
        instance: u8,
        zombie: bool,
    },
    Move {
        partition: u8,
        steps: u8,
    },
    Lose {
        partition: u8,
    },
    DeliverZombie {
        pick: u8,
    },
    Shutdown {
        instance: u8,
        steps: u8,
    },
    ExternalReset {
        partition: u8,
        pick: u16,
        walk_back: bool,
    },
    ReplayFrom {
        pick: u16,
        steps: u8,
    },
    ReplayFromOffset {
        partition: u8,
        pick: u16,
    },
    ExpireGroup {
        partition: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let small = any::<u8>;
    prop_oneof![
        10 => (small(), small(), 1u8..12).prop_map(|(instance, partition, count)| Op::Read { instance, partition, count }),
        4 => small().prop_map(|instance| Op::Tick { instance }),
        8 => (small(), 1u8..4).prop_map(|(instance, count)| Op::Execute { instance, count }),
        6 => (small(), prop_oneof![1 => Just(0u8), 3 => 1u8..8])
            .prop_map(|(instance, budget)| Op::Write { instance, budget }),
        4 => (small(), small(), small()).prop_map(|(instance, pick, fate)| Op::Letter { instance, pick, fate }),
        4 => (small(), small(), any::<bool>()).prop_map(|(instance, pick, ok)| Op::Commit { instance, pick, ok }),
        2 => (small(), any::<bool>()).prop_map(|(instance, zombie)| Op::Crash { instance, zombie }),
        1 => (small(), 0u8..10).prop_map(|(partition, steps)| Op::Move { partition, steps }),
        1 => small().prop_map(|partition| Op::Lose { partition }),
        1 => small().prop_map(|pick| Op::DeliverZombie { pick }),
        1 => (small(), 0u8..10).prop_map(|(instance, steps)| Op::Shutdown { instance, steps }),
    ]
}

fn replay_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (any::<u8>(), any::<u16>(), any::<bool>())
            .prop_map(|(partition, pick, walk_back)| Op::ExternalReset { partition, pick, walk_back }),
        3 => (any::<u16>(), 0u8..10).prop_map(|(pick, steps)| Op::ReplayFrom { pick, steps }),
        1 => (any::<u8>(), any::<u16>()).prop_map(|(partition, pick)| Op::ReplayFromOffset { partition, pick }),
        1 => any::<u8>().prop_map(|partition| Op::ExpireGroup { partition }),
    ]
}

/// How often the interesting things happened, so a test can prove the histories
/// are not degenerate.
#[derive(Debug, Default, Clone, Copy)]
struct Coverage {
    counted: usize,
    already_final_checked: usize,
    rejected: usize,
    crashes: usize,
    crash_after_rows_before_checkpoint: usize,
    crash_after_checkpoint_before_commit: usize,
    crash_with_commit_in_flight: usize,
    crash_after_commit: usize,
    zombie_rows_delivered: usize,
    zombie_rows_accepted: usize,
    stale_writes_refused: usize,
    commits_applied: usize,
    commits_failed: usize,
    metadata_dropped_resumes: usize,
    letters_written_twice: usize,
    revokes_with_write_in_flight: usize,
    handovers: usize,
    rude_losses: usize,
    external_resets: usize,
    replays_from_time: usize,
    replays_from_offset: usize,
    group_expired_resumes: usize,
    behind_group_resumes: usize,
    final_rows: usize,
    markers: usize,
    windows_closed_by_markers: usize,
}

impl Coverage {
    fn add(&mut self, o: Coverage) {
        macro_rules! sum {
            ($($field:ident),*) => { $( self.$field += o.$field; )* };
        }
        sum!(
            counted,
            already_final_checked,
            rejected,
            crashes,
            crash_after_rows_before_checkpoint,
            crash_after_checkpoint_before_commit,
            crash_with_commit_in_flight,
            crash_after_commit,
            zombie_rows_delivered,
            zombie_rows_accepted,
            stale_writes_refused,
            commits_applied,
            commits_failed,
            metadata_dropped_resumes,
            letters_written_twice,
            revokes_with_write_in_flight,
            handovers,
            rude_losses,
            external_resets,
            replays_from_time,
            replays_from_offset,
            group_expired_resumes,
            behind_group_resumes,
            final_rows,
            markers,
            windows_closed_by_markers
        );
    }
}

struct Sim<'a> {
    config: EngineConfig,
    logs: &'a [Vec<LogRecord>],
    /// The broker drops commit metadata (as tansu does).
    drops_metadata: bool,
    /// Per partition, every run so far (the last is the current one).
    segments: Vec<Vec<Segment>>,
    instances: [Option<Instance>; 2],
    owner: Vec<Option<usize>>,
    group: Vec<CommittedOffset>,
    store: Store,
    dlq: BTreeMap<(i32, i64), usize>,
    zombies: Vec<InFlightWrite>,
    /// A commit without state is waiting for its next assignment to be understood.
    pending_reset: Vec<bool>,
    coverage: Coverage,
}

impl<'a> Sim<'a> {
    fn new(config: EngineConfig, logs: &'a [Vec<LogRecord>], drops_metadata: bool) -> Self {
        let segments = logs
            .iter()
            .enumerate()
            .map(|(p, log)| {
                vec![Segment {
                    kind: SegmentKind::Initial,
                    model: PartitionModel::walk(config, p as i32, log, ModelStart::beginning()),
                    generation: 0,
                }]
            })
            .collect();
        Sim {
            config,
            logs,
            drops_metadata,
            segments,
            instances: [None, None],
            owner: logs.iter().map(|_| None).collect(),
            group: logs.iter().map(|_| CommittedOffset::None).collect(),
            store: Store::default(),
            dlq: BTreeMap::new(),
            zombies: Vec::new(),
            pending_reset: logs.iter().map(|_| false).collect(),
            coverage: Coverage::default(),
        }
    }

    fn current(&self, partition: usize) -> &Segment {
        self.segments[partition]
            .last()
            .expect("every partition has a run")
    }

    fn current_mut(&mut self, partition: usize) -> &mut Segment {
        self.segments[partition]
            .last_mut()
            .expect("every partition has a run")
    }

    fn partition(&self, raw: u8) -> usize {
        usize::from(raw) % self.logs.len()
    }

    fn protocol_config(&self) -> ProtocolConfig {
        ProtocolConfig {
            engine: self.config,
            accept_data_loss: false,
            max_outstanding_letters: 6,
            idle_markers: None,
        }
    }

    fn live(&self, raw: u8) -> Option<usize> {
        let wanted = usize::from(raw) % 2;
        if self.instances[wanted].is_some() {
            Some(wanted)
        } else if self.instances[wanted ^ 1].is_some() {
            Some(wanted ^ 1)
        } else {
            None
        }
    }

    /// Every partition has a live owner (instances start as needed).
    fn ensure_owned(&mut self, partition: usize) {
        if self.owner[partition].is_some() {
            return;
        }
        let instance = partition % 2;
        if self.instances[instance].is_none() {
            self.start_instance(instance);
        }
        self.assign(partition, instance);
    }

    fn start_instance(&mut self, slot: usize) {
        self.instances[slot] = Some(Instance {
            protocol: Protocol::new(self.protocol_config()),
            pending: VecDeque::new(),
            writes: VecDeque::new(),
            letters: Vec::new(),
            commits: Vec::new(),
            positions: BTreeMap::new(),
            committed_any: false,
        });
    }

    fn assign(&mut self, partition: usize, instance: usize) {
        let committed = self.group[partition].clone();
        let store = self.store.lookup(partition as i32, &committed);
        let decision = resume::decide(&committed, store);
        match decision.source {
            resume::ResumeSource::StoreCheckpoint => self.coverage.metadata_dropped_resumes += 1,
            resume::ResumeSource::StoreLatest => self.coverage.group_expired_resumes += 1,
            resume::ResumeSource::ExternalReset if self.pending_reset[partition] => {
                // The reset begins a new run now, knowing nothing before the offset.
                let snapshot = self
                    .store
                    .rows
                    .iter()
                    .filter(|(id, _)| id.2 == partition as i32)
                    .map(|(id, row)| (*id, *row))
                    .collect();
                self.begin_segment(
                    partition,
                    SegmentKind::ExternalReset { snapshot },
                    ModelStart {
                        offset: decision.next_offset(),
                        max_ts: None,
                        closed_through: None,
                        anchor_pending: true,
                    },
                    decision.generation(),
                );
            }
            resume::ResumeSource::ExternalReset => {
                // The same reset again (nothing was committed with state since): the
                // same walk with a newer generation. If another owner resumed an
                // earlier run meanwhile (it looked before the reset's claim was
                // durable), the claim now in the store makes the reset's walk current
                // again.
                if !matches!(
                    self.current(partition).kind,
                    SegmentKind::ExternalReset { .. }
                ) {
                    let reset = self.segments[partition]
                        .iter()
                        .rev()
                        .find(|run| matches!(run.kind, SegmentKind::ExternalReset { .. }))
                        .cloned()
                        .unwrap_or_else(|| panic!("no reset claimed {decision:?}"));
                    self.segments[partition].push(reset);
                }
                self.current_mut(partition).generation = decision.generation();
            }
            _ => {}
        }
        if let Some(checkpoint) = decision.checkpoint() {
            // Resuming a Tally checkpoint continues the run that wrote it. That is
            // the current one, unless a reset that never got as far as its claim was
            // undone by landing on an earlier run's checkpoint: then that run goes on.
            if checkpoint.generation != self.current(partition).generation {
                let resumed = self.segments[partition]
                    .iter()
                    .rev()
                    .find(|run| run.generation == checkpoint.generation)
                    .cloned()
                    .unwrap_or_else(|| panic!("no run wrote {checkpoint:?}"));
                self.segments[partition].push(resumed);
            }
        }
        self.pending_reset[partition] = false;
        if store
            .latest
            .is_some_and(|latest| latest.next_offset > decision.next_offset())
        {
            self.coverage.behind_group_resumes += 1;
        }
        self.owner[partition] = Some(instance);
        let event = Event::Assigned {
            partitions: vec![AssignedPartition {
                partition: partition as i32,
                committed,
                store,
            }],
        };
        self.feed(instance, event);
        // The shell assigns inside the rebalance callback, at once.
        self.execute_matching(instance, |c| matches!(c, Command::Assign { .. }));
    }

    fn feed(&mut self, instance: usize, event: Event<'_>) {
        let Some(inst) = self.instances[instance].as_mut() else {
            return;
        };
        if std::env::var("SIM_DEBUG").is_ok() {
            eprintln!("[{instance}] <- {event:?}");
        }
        let commands = inst.protocol.handle(event);
        if std::env::var("SIM_DEBUG").is_ok() {
            for c in &commands {
                eprintln!("[{instance}] -> {c:?}");
            }
        }
        inst.pending.extend(commands.iter().cloned());
        for command in &commands {
            if let Command::Stop { error } = command {
                panic!("the protocol stopped in a history without permanent faults: {error}");
            }
            if let Command::WriteRows(batch) = command {
                for row in &batch.rows {
                    let partition = row.partition as usize;
                    let segment = self.current(partition);
                    segment.model.check_row(row);
                    // An older generation of the same run: an earlier owner's last rows.
                    assert!(row.generation <= segment.generation, "{row:?}");
                }
            }
        }
    }

    /// Executes pending commands of `instance` that match, in order, leaving others.
    fn execute_matching(&mut self, instance: usize, wanted: impl Fn(&Command) -> bool) {
        let Some(inst) = self.instances[instance].as_mut() else {
            return;
        };
        let (now, later): (Vec<Command>, Vec<Command>) =
            inst.pending.drain(..).partition(|c| wanted(c));
        inst.pending.extend(later);
        for command in now {
            self.execute(instance, command);
        }
    }

    fn execute_next(&mut self, instance: usize) -> bool {
        let Some(command) = self.instances[instance]
            .as_mut()
            .and_then(|inst| inst.pending.pop_front())
        else {
            return false;
        };
        self.execute(instance, command);
        true
    }

    fn execute(&mut self, instance: usize, command: Command) {
        let logs = self.logs;
        if self.instances[instance].is_none() {
            return;
        }
        match command {
            Command::Commit {
                offsets,
                sync: true,
            } => {
                self.apply_commit(instance, &offsets);
            }
            Command::HandOverUncommitted { .. } => self.coverage.handovers += 1,
            Command::OffsetsLost { .. } => panic!("the simulated log loses no offsets"),
            Command::Stop { error } => panic!("stopped: {error}"),
            command => {
                let Some(inst) = self.instances[instance].as_mut() else {
                    return;
                };
                match command {
                    Command::Assign { positions } => {
                        for (partition, decision) in positions {
                            let log = &logs[partition as usize];
                            let index = match decision.start {
                                StartAt::Beginning => 0,
                                StartAt::Offset(offset) => {
                                    log.partition_point(|r| r.offset < offset)
                                }
                            };
                            inst.positions.insert(partition, (index, false));
                        }
                    }
                    Command::WriteRows(batch) => inst.writes.push_back(InFlightWrite::new(batch)),
                    Command::SendLetter { id, letter } => {
                        inst.letters.push((id, letter.partition, letter.offset));
                    }
                    Command::Commit { offsets, .. } => inst.commits.push(offsets),
                    Command::Pause { partitions } | Command::Resume { partitions } => {
                        // Only the circuit breaker pauses, and the simulated store
                        // never refuses: nothing to do but note the position.
                        for partition in partitions {
                            assert!(inst.positions.contains_key(&partition));
                        }
                    }
                    Command::Seek { partition, offset } => {
                        let index = logs[partition as usize].partition_point(|r| r.offset < offset);
                        inst.positions.insert(partition, (index, false));
                    }
                    _ => unreachable!(),
                }
            }
        }
    }

    /// What a commit does to the group (the broker may drop the metadata).
    /// `by_protocol`: a commit the protocol asked for (checked against rule 2), not
    /// one `tally replay` makes.
    fn commit_to_group(&mut self, partition: i32, checkpoint: &Checkpoint, by_protocol: bool) {
        if by_protocol {
            self.check_letters_before_commit(partition, checkpoint.next_offset);
        }
        self.group[partition as usize] = CommittedOffset::At {
            offset: checkpoint.next_offset,
            metadata: if self.drops_metadata {
                String::new()
            } else {
                checkpoint.to_metadata()
            },
        };
    }

    /// Applies a commit to the group (fenced: only partitions the instance owns) and
    /// reports the result. Returns whether it was applied.
    fn apply_commit(&mut self, instance: usize, offsets: &[(i32, Checkpoint)]) -> bool {
        let owned = offsets
            .iter()
            .all(|(partition, _)| self.owner[*partition as usize] == Some(instance));
        if owned {
            for (partition, checkpoint) in offsets {
                self.commit_to_group(*partition, checkpoint, true);
            }
            self.coverage.commits_applied += 1;
            if let Some(inst) = self.instances[instance].as_mut() {
                inst.committed_any = true;
            }
        } else {
            self.coverage.commits_failed += 1;
        }
        let offsets: Vec<(i32, i64)> = offsets.iter().map(|(p, c)| (*p, c.next_offset)).collect();
        self.feed(instance, Event::CommitResult { offsets, ok: owned });
        owned
    }

    /// Rule 2: a commit never passes a rejected record whose letter is not durable.
    fn check_letters_before_commit(&self, partition: i32, next_offset: i64) {
        let segment = self.current(partition as usize);
        for record in &self.logs[partition as usize] {
            if record.offset < segment.model.start.offset || record.offset >= next_offset {
                continue;
            }
            if segment.model.decision(record.offset).is_rejection() {
                assert!(
                    self.dlq.contains_key(&(partition, record.offset)),
                    "partition {partition}: commit at {next_offset} passes offset {} whose dead letter is not in the DLQ",
                    record.offset
                );
            }
        }
    }

    fn read(&mut self, instance: usize, partition: usize, count: usize) {
        let log = &self.logs[partition];
        for _ in 0..count {
            let Some(inst) = self.instances[instance].as_mut() else {
                return;
            };
            if !inst.protocol.may_read() {
                return;
            }
            let Some(&(index, paused)) = inst.positions.get(&(partition as i32)) else {
                return;
            };
            if paused {
                return;
            }
            let Some(record) = log.get(index).copied() else {
                return;
            };
            inst.positions.insert(partition as i32, (index + 1, false));
            let bytes = record.bytes();
            let event = Event::Record {
                record: Record {
                    partition: partition as i32,
                    offset: record.offset,
                    timestamp_ms: Some(record.ts),
                    key: None,
                    value: (record.body != Body::Marker).then_some(bytes.as_slice()),
                    redriven_from: None,
                    marker: record.body == Body::Marker,
                },
                now_ms: NOW_MS,
            };
            let before = inst.protocol.stats().clone();
            self.feed(instance, event);
            let Some(inst) = self.instances[instance].as_ref() else {
                return;
            };
            let after = inst.protocol.stats().clone();
            self.check_decision(partition, record, &before, &after);
        }
    }

    /// The protocol's decision (seen through its counters) must be the model's.
    fn check_decision(
        &mut self,
        partition: usize,
        record: LogRecord,
        before: &tally_aggregator::protocol::Stats,
        after: &tally_aggregator::protocol::Stats,
    ) {
        let decided = if after.counted > before.counted {
            Decision::Counted
        } else if after.already_final > before.already_final {
            Decision::AlreadyFinal
        } else if after.late > before.late {
            Decision::Late
        } else if after.future_timestamp > before.future_timestamp {
            Decision::Future
        } else if after.invalid_timestamp > before.invalid_timestamp {
            Decision::Invalid
        } else if after.sum_overflow > before.sum_overflow {
            Decision::Overflow
        } else if after.poison > before.poison {
            Decision::Poison
        } else if after.markers > before.markers {
            Decision::Marker
        } else {
            // Ignored (a refetch, or a revoking partition): nothing decided.
            return;
        };
        let segment = self.current(partition);
        let model = segment.model.decision(record.offset);
        let consistent = model == decided
            || (decided == Decision::AlreadyFinal
                && matches!(model, Decision::Counted | Decision::Overflow));
        assert!(
            consistent,
            "partition {partition} offset {}: model {model:?}, protocol {decided:?}",
            record.offset
        );
        match decided {
            Decision::Counted => self.coverage.counted += 1,
            Decision::Marker => {
                let closed = segment
                    .model
                    .closing_offsets
                    .values()
                    .filter(|&&offset| offset == record.offset)
                    .count();
                self.coverage.markers += 1;
                self.coverage.windows_closed_by_markers += closed;
            }
            Decision::AlreadyFinal => {
                // Skipped because the window is durably final: it must be, unless a
                // reset froze it (then the store keeps whatever it had).
                if let (Body::Increment { key, .. }, SegmentKind::Initial | SegmentKind::Replay) =
                    (record.body, &segment.kind)
                {
                    if matches!(model, Decision::Counted | Decision::Overflow)
                        && !segment
                            .model
                            .is_frozen(record.ts / self.config.window_ms * self.config.window_ms)
                    {
                        let start =
                            record.ts.div_euclid(self.config.window_ms) * self.config.window_ms;
                        let stored = self.store.rows.get(&(key, start, partition as i32));
                        assert!(
                            stored.is_some_and(|row| row.is_final),
                            "offset {} judged already final, but the store has {stored:?}",
                            record.offset
                        );
                        self.coverage.already_final_checked += 1;
                    }
                }
            }
            _ => self.coverage.rejected += 1,
        }
    }

    /// Writes up to `budget` rows or checkpoint rows of the oldest unfinished write
    /// (0: every remaining row but no checkpoint row: the write stops in between).
    fn progress_write(&mut self, instance: usize, budget: usize) {
        let Some(inst) = self.instances[instance].as_mut() else {
            return;
        };
        let Some(write) = inst.writes.front_mut() else {
            return;
        };
        let budget = if budget == 0 {
            write.batch.rows.len() - write.rows_done
        } else {
            budget
        };
        if budget == 0 {
            return;
        }
        if write.progress(&mut self.store, budget, &mut self.coverage) {
            let done = inst.writes.pop_front().unwrap();
            self.feed(
                instance,
                Event::Written {
                    flush: done.batch.flush,
                },
            );
        }
    }

    fn deliver_letter(&mut self, instance: usize, pick: usize, fate: u8) {
        let Some(inst) = self.instances[instance].as_mut() else {
            return;
        };
        if inst.letters.is_empty() {
            return;
        }
        let (id, partition, offset) = inst.letters.remove(pick % inst.letters.len());
        // 0..=5: acknowledged; 6: failed, not written; 7: written, but the
        // acknowledgement was lost (reported as a failure: it will be written again).
        let written = fate % 8 != 6;
        if written {
            let copies = self.dlq.entry((partition, offset)).or_insert(0);
            *copies += 1;
            if *copies > 1 {
                self.coverage.letters_written_twice += 1;
            }
        }
        let event = if fate % 8 < 6 {
            Event::LetterAcked { id }
        } else {
            Event::LetterFailed {
                id,
                permanent: false,
                error: "delivery timed out".into(),
            }
        };
        self.feed(instance, event);
    }

    fn finish_commit(&mut self, instance: usize, pick: usize, ok: bool) {
        let Some(inst) = self.instances[instance].as_mut() else {
            return;
        };
        if inst.commits.is_empty() {
            return;
        }
        let offsets = inst.commits.remove(pick % inst.commits.len());
        if ok {
            self.apply_commit(instance, &offsets);
        } else {
            self.coverage.commits_failed += 1;
            let offsets: Vec<(i32, i64)> =
                offsets.iter().map(|(p, c)| (*p, c.next_offset)).collect();
            self.feed(instance, Event::CommitResult { offsets, ok: false });
        }
    }

    /// The instance dies. The unfinished part of its current write may land later
    /// (a zombie); commits it had sent may or may not have reached the broker.
    fn crash(&mut self, instance: usize, zombie: bool) {
        let Some(mut inst) = self.instances[instance].take() else {
            return;
        };
        self.coverage.crashes += 1;
        if let Some(write) = inst.writes.front() {
            if write.rows_done == write.batch.rows.len()
                && write.checkpoints_done < write.batch.checkpoints.len()
            {
                self.coverage.crash_after_rows_before_checkpoint += 1;
            }
        }
        let commit_waiting = !inst.commits.is_empty()
            || inst
                .pending
                .iter()
                .any(|c| matches!(c, Command::Commit { .. }));
        if commit_waiting {
            self.coverage.crash_after_checkpoint_before_commit += 1;
        }
        if inst.committed_any {
            self.coverage.crash_after_commit += 1;
        }
        if zombie {
            if let Some(write) = inst.writes.pop_front() {
                self.zombies.push(write);
            }
        }
        for offsets in inst.commits.drain(..) {
            self.coverage.crash_with_commit_in_flight += 1;
            // A commit that reached the broker before the crash is fine: it was only
            // sent for durable checkpoints.
            if zombie {
                let owned = offsets
                    .iter()
                    .all(|(partition, _)| self.owner[*partition as usize] == Some(instance));
                if owned {
                    for (partition, checkpoint) in &offsets {
                        self.commit_to_group(*partition, checkpoint, true);
                    }
                }
            }
        }
        for owner in self.owner.iter_mut() {
            if *owner == Some(instance) {
                *owner = None;
            }
        }
    }

    /// Runs the revoke flow of the shell: the last flush, up to `steps` units of
    /// progress (the deadline), then settle.
    fn revoke(&mut self, instance: usize, partitions: Vec<i32>, steps: usize) {
        if self.instances[instance]
            .as_ref()
            .is_some_and(|i| !i.writes.is_empty())
        {
            self.coverage.revokes_with_write_in_flight += 1;
        }
        self.feed(
            instance,
            Event::Revoked {
                partitions: partitions.clone(),
            },
        );
        for step in 0..steps {
            let Some(inst) = self.instances[instance].as_ref() else {
                return;
            };
            if inst.protocol.revoke_ready(&partitions) {
                break;
            }
            match step % 3 {
                0 => {
                    if !self.execute_next(instance) {
                        self.progress_write(instance, usize::MAX / 2);
                    }
                }
                1 => self.progress_write(instance, usize::MAX / 2),
                _ => self.deliver_letter(instance, 0, 0),
            }
        }
        // Commands produced meanwhile are executed by the shell as they come.
        self.execute_matching(instance, |c| {
            matches!(c, Command::WriteRows(_) | Command::SendLetter { .. })
        });
        self.feed(
            instance,
            Event::RevokeSettled {
                partitions: partitions.clone(),
            },
        );
        self.execute_matching(instance, |c| {
            matches!(
                c,
                Command::Commit { sync: true, .. } | Command::HandOverUncommitted { .. }
            )
        });
        if let Some(inst) = self.instances[instance].as_mut() {
            for partition in &partitions {
                inst.positions.remove(partition);
            }
        }
        for partition in partitions {
            if self.owner[partition as usize] == Some(instance) {
                self.owner[partition as usize] = None;
            }
        }
    }

    fn shutdown(&mut self, instance: usize, steps: usize) {
        let Some(inst) = self.instances[instance].as_ref() else {
            return;
        };
        let owned = inst.protocol.owned();
        self.revoke(instance, owned, steps);
        // Gone: whatever it had not finished is lost (not a zombie: it exited).
        self.instances[instance] = None;
    }

    fn shutdown_all(&mut self, steps: usize) {
        for instance in 0..2 {
            self.shutdown(instance, steps);
        }
        for owner in self.owner.iter_mut() {
            *owner = None;
        }
    }

    fn deliver_zombie(&mut self, pick: usize) {
        if self.zombies.is_empty() {
            return;
        }
        let mut write = self.zombies.swap_remove(pick % self.zombies.len());
        let before = self.coverage.stale_writes_refused;
        let rows = write.batch.rows.len() - write.rows_done;
        write.progress(&mut self.store, usize::MAX / 2, &mut self.coverage);
        self.coverage.zombie_rows_delivered += rows;
        self.coverage.zombie_rows_accepted += rows - (self.coverage.stale_writes_refused - before);
    }

    /// Starts a new segment for `partition` (a reset or a replay).
    fn begin_segment(
        &mut self,
        partition: usize,
        kind: SegmentKind,
        start: ModelStart,
        generation: u16,
    ) {
        let model =
            PartitionModel::walk(self.config, partition as i32, &self.logs[partition], start);
        self.segments[partition].push(Segment {
            kind,
            model,
            generation,
        });
    }

    /// An offset reset without Tally state at a record the current run counted (the
    /// freeze rule's premise: the anchor was on time in the run that wrote the store).
    fn external_reset(&mut self, partition: usize, pick: usize, walk_back: bool) -> bool {
        let log = &self.logs[partition];
        let model = &self.current(partition).model;
        if model.counted.is_empty() {
            return false;
        }
        let anchor = model.counted[pick % model.counted.len()].offset;
        let mut index = log.partition_point(|r| r.offset < anchor);
        while walk_back
            && index > 0
            && matches!(
                model.decisions.get(&log[index - 1].offset),
                Some(Decision::Invalid | Decision::Future | Decision::Poison)
            )
        {
            index -= 1;
        }
        let offset = log[index].offset;
        self.reset_without_state(partition, offset);
        true
    }

    /// Commits `offset` without Tally state. What it means is decided when the
    /// partition is next assigned, exactly as the shell decides: an external reset,
    /// unless the store happens to hold a checkpoint for that very offset.
    fn reset_without_state(&mut self, partition: usize, offset: i64) {
        self.group[partition] = CommittedOffset::At {
            offset,
            metadata: String::new(),
        };
        self.pending_reset[partition] = true;
    }

    /// `tally replay --from T`, planned by the production planner.
    fn replay_from(&mut self, pick: usize) {
        let window = self.config.window_ms;
        let last_ts = self
            .logs
            .iter()
            .flatten()
            .map(|r| r.ts)
            .filter(|ts| (0..=NOW_MS + MAX_FUTURE_SKEW_MS).contains(ts))
            .max()
            .unwrap_or(0);
        let window_start = (pick as i64 % (last_ts / window + 2)) * window;
        let mut positions = Vec::new();
        for (partition, log) in self.logs.iter().enumerate() {
            let committed = self.group[partition].clone();
            let store = self.store.lookup(partition as i32, &committed);
            let end = log.last().map_or(0, |r| r.offset + 1);
            positions.push(PartitionPosition {
                partition: partition as i32,
                current: resume::decide(&committed, store),
                latest_generation: store.latest.map(|c| c.generation),
                target: log
                    .iter()
                    .find(|r| r.ts >= window_start)
                    .map_or(end, |r| r.offset),
            });
        }
        let pinned = PinnedSettings::new(self.config.sum_settings()).unwrap();
        let plan = plan_from_time(window_start, &positions, &pinned, None).unwrap();
        for (partition, commit) in plan.commits {
            let unknown_state =
                positions[partition as usize].current.source == resume::ResumeSource::ExternalReset;
            self.apply_planned(partition as usize, commit, unknown_state);
        }
        self.coverage.replays_from_time += 1;
    }

    /// What `tally replay` does with a planned commit: save the checkpoint row, then
    /// commit (the broker may drop the metadata).
    /// `unknown_state`: the group stood at an offset without Tally state, so the plan
    /// freezes the windows before the replay time without knowing them.
    fn apply_planned(&mut self, partition: usize, commit: PlannedCommit, unknown_state: bool) {
        match commit {
            PlannedCommit::Checkpoint(checkpoint) => {
                self.store.save_checkpoint(partition as i32, checkpoint);
                self.commit_to_group(partition as i32, &checkpoint, false);
                self.pending_reset[partition] = false;
                // Resuming from a Tally checkpoint walks the log like the live run.
                let start = ModelStart {
                    offset: checkpoint.next_offset,
                    max_ts: checkpoint.max_ts_ms,
                    closed_through: checkpoint.closed_through_ms,
                    anchor_pending: false,
                };
                let kind = if unknown_state {
                    // Freezing windows of an unknown-state run keeps what the store had.
                    SegmentKind::ExternalReset {
                        snapshot: self
                            .store
                            .rows
                            .iter()
                            .filter(|(id, _)| id.2 == partition as i32)
                            .map(|(id, row)| (*id, *row))
                            .collect(),
                    }
                } else {
                    SegmentKind::Replay
                };
                self.begin_segment(partition, kind, start, checkpoint.generation);
            }
            PlannedCommit::WithoutState(offset) => self.reset_without_state(partition, offset),
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Read {
                instance,
                partition,
                count,
            } => {
                let partition = self.partition(partition);
                self.ensure_owned(partition);
                if let Some(owner) = self.owner[partition] {
                    let _ = instance;
                    self.read(owner, partition, usize::from(count));
                }
            }
            Op::Tick { instance } => {
                if let Some(instance) = self.live(instance) {
                    self.feed(instance, Event::FlushTick { now_ms: NOW_MS });
                }
            }
            Op::Execute { instance, count } => {
                if let Some(instance) = self.live(instance) {
                    for _ in 0..count {
                        self.execute_next(instance);
                    }
                }
            }
            Op::Write { instance, budget } => {
                if let Some(instance) = self.live(instance) {
                    self.progress_write(instance, usize::from(budget));
                }
            }
            Op::Letter {
                instance,
                pick,
                fate,
            } => {
                if let Some(instance) = self.live(instance) {
                    self.deliver_letter(instance, usize::from(pick), fate);
                }
            }
            Op::Commit { instance, pick, ok } => {
                if let Some(instance) = self.live(instance) {
                    self.finish_commit(instance, usize::from(pick), ok);
                }
            }
            Op::Crash { instance, zombie } => {
                if let Some(instance) = self.live(instance) {
                    self.crash(instance, zombie);
                }
            }
            Op::Move { partition, steps } => {
                let partition = self.partition(partition);
                if let Some(from) = self.owner[partition] {
                    self.revoke(from, vec![partition as i32], usize::from(steps));
                    let to = from ^ 1;
                    if self.instances[to].is_none() {
                        self.start_instance(to);
                    }
                    self.assign(partition, to);
                }
            }
            Op::Lose { partition } => {
                // The group gives the partition away first (a session timeout); the
                // old owner learns later, and its commits are fenced meanwhile.
                let partition = self.partition(partition);
                if let Some(from) = self.owner[partition] {
                    self.coverage.rude_losses += 1;
                    let to = from ^ 1;
                    if self.instances[to].is_none() {
                        self.start_instance(to);
                    }
                    self.assign(partition, to);
                    self.revoke_lost(from, partition as i32);
                }
            }
            Op::DeliverZombie { pick } => self.deliver_zombie(usize::from(pick)),
            Op::Shutdown { instance, steps } => {
                if let Some(instance) = self.live(instance) {
                    self.shutdown(instance, usize::from(steps));
                }
            }
            Op::ExternalReset {
                partition,
                pick,
                walk_back,
            } => {
                self.shutdown_all(2);
                let partition = self.partition(partition);
                if self.external_reset(partition, usize::from(pick), walk_back) {
                    self.coverage.external_resets += 1;
                }
            }
            Op::ReplayFrom { pick, steps } => {
                self.shutdown_all(usize::from(steps));
                self.replay_from(usize::from(pick));
            }
            Op::ReplayFromOffset { partition, pick } => {
                self.shutdown_all(3);
                let partition = self.partition(partition);
                let log = &self.logs[partition];
                let model = &self.current(partition).model;
                if model.counted.is_empty() {
                    return;
                }
                let anchor = model.counted[usize::from(pick) % model.counted.len()].offset;
                let offset = log[log.partition_point(|r| r.offset < anchor)].offset;
                let plan = plan_from_offsets(&[format!("{partition}:{offset}")]).unwrap();
                for (partition, commit) in plan.commits {
                    self.apply_planned(partition as usize, commit, false);
                }
                self.coverage.replays_from_offset += 1;
            }
            Op::ExpireGroup { partition } => {
                // Kafka expires the offsets of an empty group.
                self.shutdown_all(3);
                let partition = self.partition(partition);
                let latest = self
                    .store
                    .lookup(partition as i32, &CommittedOffset::None)
                    .latest;
                // Only once the current run has saved state (else expiry would
                // resume an older run: the model would have to follow it back).
                if latest.is_some_and(|c| c.generation == self.current(partition).generation)
                    && !self.pending_reset[partition]
                {
                    self.group[partition] = CommittedOffset::None;
                }
            }
        }
    }

    /// The old owner's revoke of a partition it already lost: its last flush is
    /// written, but the commit is fenced (it no longer owns the partition).
    fn revoke_lost(&mut self, instance: usize, partition: i32) {
        if self.instances[instance].is_none() {
            return;
        }
        self.feed(
            instance,
            Event::Revoked {
                partitions: vec![partition],
            },
        );
        self.execute_matching(instance, |c| {
            matches!(c, Command::WriteRows(_) | Command::SendLetter { .. })
        });
        self.feed(
            instance,
            Event::RevokeSettled {
                partitions: vec![partition],
            },
        );
        self.execute_matching(instance, |c| {
            matches!(
                c,
                Command::Commit { sync: true, .. } | Command::HandOverUncommitted { .. }
            )
        });
        if let Some(inst) = self.instances[instance].as_mut() {
            inst.positions.remove(&partition);
        }
    }

    /// Everything catches up: every partition read to its end, every write, letter
    /// and commit finished; then the remaining zombie writes land.
    fn finish(&mut self) {
        for partition in 0..self.logs.len() {
            self.ensure_owned(partition);
        }
        for _round in 0..64 {
            let mut busy = false;
            for partition in 0..self.logs.len() {
                if let Some(owner) = self.owner[partition] {
                    // A paused partition (circuit) does not occur here; read all.
                    self.read(owner, partition, usize::MAX / 2);
                }
            }
            for instance in 0..2 {
                if self.instances[instance].is_none() {
                    continue;
                }
                self.feed(instance, Event::FlushTick { now_ms: NOW_MS });
                while self.execute_next(instance) {
                    busy = true;
                }
                while self.instances[instance]
                    .as_ref()
                    .is_some_and(|i| !i.writes.is_empty())
                {
                    self.progress_write(instance, usize::MAX / 2);
                    busy = true;
                }
                while self.instances[instance]
                    .as_ref()
                    .is_some_and(|i| !i.letters.is_empty())
                {
                    self.deliver_letter(instance, 0, 0);
                    busy = true;
                }
                while self.instances[instance]
                    .as_ref()
                    .is_some_and(|i| !i.commits.is_empty())
                {
                    self.finish_commit(instance, 0, true);
                    busy = true;
                }
                let unread = self.instances[instance].as_ref().is_some_and(|inst| {
                    inst.positions
                        .iter()
                        .any(|(p, (index, _))| *index < self.logs[*p as usize].len())
                });
                busy |= unread;
            }
            if !busy {
                break;
            }
        }
        while !self.zombies.is_empty() {
            self.deliver_zombie(0);
        }
    }

    /// The final store against the segments' models.
    fn check_final_store(&mut self) {
        for partition in 0..self.logs.len() {
            let runs = &self.segments[partition];
            let expected: Vec<BTreeMap<RowId, ExpectedRow>> = runs
                .iter()
                .map(|run| run.model.expected_rows(run.generation))
                .collect();
            let mut ids: BTreeSet<RowId> = expected
                .iter()
                .flat_map(|rows| rows.keys().copied())
                .collect();
            ids.extend(
                self.store
                    .rows
                    .keys()
                    .filter(|id| id.2 == partition as i32)
                    .copied(),
            );
            for id in ids {
                let stored = self.store.rows.get(&id);
                match expectation(runs, &expected, id) {
                    Expect::Exact(row) => {
                        let actual = stored.map(|r| ExpectedRow {
                            sum: r.sum,
                            count: r.count,
                            is_final: r.is_final,
                            generation: r.generation,
                        });
                        assert_eq!(actual, row, "row {id:?} (runs: {})", runs.len());
                        if row.is_some_and(|r| r.is_final) {
                            self.coverage.final_rows += 1;
                        }
                    }
                    Expect::Frozen { at_reset } => {
                        // A window an external reset froze keeps what the store had:
                        // never less complete than at the reset, and never a wrong
                        // sum (an exact prefix of the run of its generation).
                        match (stored, at_reset) {
                            (None, None) => {}
                            (None, Some(before)) => {
                                panic!("frozen row {id:?} vanished: {before:?}")
                            }
                            (Some(row), before) => {
                                if let Some(before) = before {
                                    assert!(
                                        row.version() >= before.version(),
                                        "{row:?} < {before:?}"
                                    );
                                }
                                let writer = runs
                                    .iter()
                                    .rev()
                                    .find(|run| run.generation == row.generation)
                                    .unwrap_or_else(|| {
                                        panic!(
                                            "no run wrote generation {}: {row:?}",
                                            row.generation
                                        )
                                    });
                                assert!(
                                    writer.model.is_exact_prefix(row),
                                    "frozen row is no exact prefix: {row:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What the final store must hold for one row.
enum Expect {
    /// Exactly this (or no row).
    Exact(Option<ExpectedRow>),
    /// A window frozen by an external reset, with the row the store had then.
    Frozen { at_reset: Option<WindowRow> },
}

/// The newest run that did not freeze the window decides it; a replay freezes only
/// windows that were final, so the earlier run's row stands; an external reset
/// freezes without knowing, so what the store had stands.
fn expectation(runs: &[Segment], expected: &[BTreeMap<RowId, ExpectedRow>], id: RowId) -> Expect {
    for (index, run) in runs.iter().enumerate().rev() {
        if !run.model.is_frozen(id.1) {
            return Expect::Exact(expected[index].get(&id).copied());
        }
        if let SegmentKind::ExternalReset { snapshot } = &run.kind {
            return Expect::Frozen {
                at_reset: snapshot.get(&id).copied(),
            };
        }
    }
    Expect::Exact(None)
}

fn assert_no_stray_rows(sim: &Sim<'_>) {
    for (id, row) in &sim.store.rows {
        assert_eq!(id.2, row.partition);
        assert!((id.2 as usize) < sim.logs.len());
    }
}

// ------------------------------------------------------------------ property 1

#[derive(Debug, Clone)]
struct Scenario {
    config: EngineConfig,
    logs: Vec<Vec<LogRecord>>,
    drops_metadata: bool,
    ops: Vec<Op>,
}

fn scenario(
    max_partitions: usize,
    max_records: usize,
    max_ops: usize,
    with_replays: bool,
) -> impl Strategy<Value = Scenario> {
    (
        engine_config(),
        1..=max_partitions,
        1u8..=4,
        0i64..20,
        any::<bool>(),
    )
        .prop_flat_map(
            move |(config, partitions, keys, start_ts, drops_metadata)| {
                let ops = if with_replays {
                    proptest::collection::vec(prop_oneof![12 => op(), 1 => replay_op()], 0..max_ops)
                        .boxed()
                } else {
                    proptest::collection::vec(op(), 0..max_ops).boxed()
                };
                (
                    proptest::collection::vec(
                        proptest::collection::vec(record_spec(), 0..max_records),
                        partitions,
                    ),
                    ops,
                )
                    .prop_map(move |(specs, ops)| Scenario {
                        config,
                        logs: specs
                            .iter()
                            .map(|specs| build_log(config, keys, start_ts, specs))
                            .collect(),
                        drops_metadata,
                        ops,
                    })
            },
        )
}

fn run_scenario(scenario: &Scenario) -> Coverage {
    let mut sim = Sim::new(scenario.config, &scenario.logs, scenario.drops_metadata);
    for &op in &scenario.ops {
        sim.apply(op);
    }
    sim.finish();
    sim.check_final_store();
    assert_no_stray_rows(&sim);
    sim.coverage
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(1_500)))]

    /// Crashes at every step, rebalances, lost commits and acknowledgements, dropped
    /// metadata, zombie writes: the store ends up exactly equal to an uninterrupted
    /// run, and no write ever lowered completeness.
    #[test]
    fn store_equals_the_uninterrupted_run(scenario in scenario(3, 60, 140, false)) {
        run_scenario(&scenario);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(800)))]

    /// The same with external offset resets, `replay --from` and `--from-offset` and
    /// expired group offsets at random points: rebuilt windows hold exactly the
    /// current replay's sums, frozen ones keep the earlier run's rows.
    #[test]
    fn replays_and_resets_rebuild_exactly_the_unfrozen_windows(scenario in scenario(2, 50, 140, true)) {
        run_scenario(&scenario);
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
        ts,
        body: Body::Increment { key: k, value },
    };
    let log = vec![
        inc(0, 5, 1),
        inc(1, 11, 2),
        LogRecord {
            offset: 2,
            ts: 11,
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
    let decisions: Vec<Decision> = (0..=8).map(|o| model.decisions[&o]).collect();
    assert_eq!(
        decisions,
        vec![
            Decision::Counted,
            Decision::Counted,
            Decision::Poison,
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
    let rows = model.expected_rows(0);
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

fn ordinary_log(config: EngineConfig, records: u8) -> Vec<LogRecord> {
    let specs: Vec<RecordSpec> = (0..records)
        .map(|n| RecordSpec {
            kind: 0,
            advance: n % 3 + 1,
            back: n.wrapping_mul(37),
            key: n,
            value: n,
            gap: n,
        })
        .collect();
    build_log(config, 3, 0, &specs)
}

/// Crashes at each boundary of one write: after its rows, after its checkpoint rows,
/// after the commit; and a zombie of the dead owner's write after the new owner.
#[test]
fn crashes_at_every_boundary_of_a_write() {
    let config = EngineConfig::new(10, 2, MAX_FUTURE_SKEW_MS).unwrap();
    let logs = vec![ordinary_log(config, 60)];
    for drops_metadata in [false, true] {
        for (budget, commit) in [(1, false), (200, false), (200, true)] {
            let scenario = Scenario {
                config,
                logs: logs.clone(),
                drops_metadata,
                ops: vec![
                    Op::Read {
                        instance: 0,
                        partition: 0,
                        count: 25,
                    },
                    Op::Tick { instance: 0 },
                    Op::Execute {
                        instance: 0,
                        count: 3,
                    },
                    Op::Write {
                        instance: 0,
                        budget: 200,
                    },
                    Op::Execute {
                        instance: 0,
                        count: 3,
                    },
                    Op::Commit {
                        instance: 0,
                        pick: 0,
                        ok: true,
                    },
                    Op::Read {
                        instance: 0,
                        partition: 0,
                        count: 20,
                    },
                    Op::Tick { instance: 0 },
                    Op::Execute {
                        instance: 0,
                        count: 3,
                    },
                    Op::Write {
                        instance: 0,
                        budget,
                    },
                    Op::Execute {
                        instance: 0,
                        count: 3,
                    },
                    Op::Commit {
                        instance: 0,
                        pick: 0,
                        ok: commit,
                    },
                    Op::Crash {
                        instance: 0,
                        zombie: true,
                    },
                    Op::Read {
                        instance: 1,
                        partition: 0,
                        count: 60,
                    },
                    Op::Tick { instance: 1 },
                    Op::Execute {
                        instance: 1,
                        count: 3,
                    },
                    Op::Write {
                        instance: 1,
                        budget: 200,
                    },
                    Op::DeliverZombie { pick: 0 },
                ],
            };
            run_scenario(&scenario);
        }
    }
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
        let scenario = scenario(3, 60, 140, false)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        total.add(run_scenario(&scenario));
    }
    let mut replays = Coverage::default();
    for _ in 0..200 {
        let scenario = scenario(2, 50, 140, true)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        replays.add(run_scenario(&scenario));
    }
    println!("histories: {total:#?}\nreplays: {replays:#?}");
    // Rare combinations need a few occurrences, the common ones many.
    let (rare, common) = (8, 20);
    let minimum = common;
    for (what, count) in [
        (
            "crash with a commit in flight",
            total.crash_with_commit_in_flight,
        ),
        ("resumes behind the store", total.behind_group_resumes),
        (
            "crash after checkpoint rows before commit",
            total.crash_after_checkpoint_before_commit,
        ),
    ] {
        assert!(
            count >= rare,
            "only {count} x {what} in the sampled histories"
        );
    }
    for (what, count) in [
        ("counted", total.counted),
        (
            "already final checked in the store",
            total.already_final_checked,
        ),
        ("rejected", total.rejected),
        ("crashes", total.crashes),
        (
            "crash after rows before checkpoint rows",
            total.crash_after_rows_before_checkpoint,
        ),
        ("crash after a commit", total.crash_after_commit),
        ("zombie rows delivered", total.zombie_rows_delivered),
        ("zombie rows accepted", total.zombie_rows_accepted),
        ("stale writes refused", total.stale_writes_refused),
        ("commits applied", total.commits_applied),
        ("commits failed", total.commits_failed),
        (
            "resumes with dropped metadata",
            total.metadata_dropped_resumes,
        ),
        ("letters written twice", total.letters_written_twice),
        (
            "revokes with a write in flight",
            total.revokes_with_write_in_flight,
        ),
        ("hand-overs", total.handovers),
        ("rude losses", total.rude_losses),
        ("final rows", total.final_rows),
        ("idle markers read", total.markers),
        (
            "windows closed by idle markers",
            total.windows_closed_by_markers,
        ),
        ("replays: external resets", replays.external_resets),
        ("replays: from time", replays.replays_from_time),
        ("replays: from offset", replays.replays_from_offset),
        ("replays: group expired", replays.group_expired_resumes),
        ("replays: final rows", replays.final_rows),
    ] {
        assert!(
            count >= minimum,
            "only {count} x {what} in the sampled histories"
        );
    }
}

/// The checkpoint a resume starts from is exactly what `resume::decide` returns for
/// what the broker and the store hold: the harness and the shell ask the same way.
#[test]
fn the_harness_resumes_like_the_shell() {
    let checkpoint = Checkpoint {
        next_offset: 3,
        max_ts_ms: Some(9),
        closed_through_ms: Some(5),
        generation: 1,
        settings: None,
        external_reset: false,
    };
    let mut store = Store::default();
    store.save_checkpoint(0, checkpoint);
    let committed = CommittedOffset::At {
        offset: 3,
        metadata: String::new(),
    };
    let decision = resume::decide(&committed, store.lookup(0, &committed));
    assert_eq!(decision.resume, Resume::Checkpoint(checkpoint));
}

/// Found by a CI run: a `replay --from-offset` becomes an external reset whose claim
/// is still in flight when another owner looks and resumes the earlier run from a
/// late (zombie) checkpoint; once the claim is durable, the next owner resumes the
/// reset again, freezing its windows. The model must follow it back to the reset.
#[test]
fn a_reset_resumed_again_after_an_earlier_run_was_resumed_keeps_its_freeze() {
    let k = key_of(0);
    let inc = |offset, ts| LogRecord {
        offset,
        ts,
        body: Body::Increment { key: k, value: 1 },
    };
    let scenario = Scenario {
        config: EngineConfig::new(10, 10, 50).unwrap(),
        logs: vec![vec![
            inc(0, 15),
            inc(1, 9),
            inc(2, 18),
            inc(3, 18),
            inc(4, 18),
        ]],
        drops_metadata: false,
        ops: vec![
            Op::Read {
                instance: 0,
                partition: 0,
                count: 1,
            },
            Op::Lose { partition: 0 },
            Op::Tick { instance: 91 },
            Op::Execute {
                instance: 1,
                count: 1,
            },
            Op::Crash {
                instance: 31,
                zombie: true,
            },
            Op::ReplayFromOffset {
                partition: 0,
                pick: 19135,
            },
            Op::Read {
                instance: 0,
                partition: 0,
                count: 1,
            },
            Op::DeliverZombie { pick: 0 },
            Op::Lose { partition: 0 },
            Op::Write {
                instance: 2,
                budget: 1,
            },
            Op::Move {
                partition: 0,
                steps: 0,
            },
            Op::Read {
                instance: 0,
                partition: 0,
                count: 1,
            },
        ],
    };
    run_scenario(&scenario);
}
