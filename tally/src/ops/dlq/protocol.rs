//! One `tally dlq redrive` run as a pure state machine: events in, commands out. The
//! Kafka driver in `dlq.rs` executes the commands; the property test in `sim_tests.rs`
//! executes them against a simulated broker with crashes, zombies and concurrent runs.
//!
//! A run:
//! 1. reads the journal (see [`super::journal`]);
//! 2. resolves the claims of interrupted runs: once a claim has expired, it reads the
//!    claim's target partition from the claim's recorded end offset and writes `done`
//!    if a re-driven copy of the record is there, `void` if not;
//! 3. scans the dead-letter topic and chooses, per pending source record, its first
//!    matching letter (copies are never chosen twice);
//! 4. per batch: notes the target partitions' end offsets, appends `claim`s, reads the
//!    journal back to see which claims won, produces the winners' records (only while
//!    `now < claim time + delivery timeout`) and appends their `done`s.
//!
//! Why each source record is put back at most once:
//! - A record is produced only by the run whose claim is in force, and only within
//!   one delivery timeout T of the claim time; librdkafka gives up on a record T after
//!   it was handed over, so every copy that run can ever append lands before
//!   claim time + 2T, before the claim expires (claim time + 3T; the third T covers
//!   requests still in the network and clock skew between runs).
//! - A claim is voided only after it expired and after a lookup, started after the
//!   expiry, found no copy between the target's pre-claim end and the current end:
//!   so its run appended nothing and never will. Only then can a new claim win.
//! - `done` is written only for a copy that is on the input topic, and ends the story.
//!
//! On brokers with transactions (Apache Kafka) the driver also uses a transactional
//! producer with one fixed `transactional.id`: a new run fences older ones, and a run
//! that died mid-batch has its records aborted (invisible to `read_committed`
//! consumers). The argument above does not rely on that, because librdkafka's mock
//! cluster ignores aborts and fencing.
//!
//! And why nothing is lost silently: a record leaves *pending* only for *claimed*
//! (which every later run resolves once it expires) or *re-driven*; letters passed
//! over (filters, the limit, no source headers) stay pending and `tally dlq list`
//! shows every letter's state.

use std::collections::{BTreeMap, HashMap};

use super::journal::{Claim, ClaimState, Coord, Done, Entry, Journal, SourceId, State, Void};

/// A claim expires this many delivery timeouts after its claim time.
pub const LEASE_TIMEOUTS: i64 = 3;

/// When a claim made at `claim_time_ms` expires.
pub fn claim_expiry(claim_time_ms: i64, delivery_timeout_ms: i64) -> i64 {
    claim_time_ms.saturating_add(delivery_timeout_ms.saturating_mul(LEASE_TIMEOUTS))
}

/// Whether a run that claimed at `claim_time_ms` may still hand records to the producer.
pub fn may_enqueue(claim_time_ms: i64, now_ms: i64, delivery_timeout_ms: i64) -> bool {
    now_ms < claim_time_ms.saturating_add(delivery_timeout_ms)
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// This run's id (unique per run).
    pub run: String,
    /// The topic records are put back on; letters from other topics are passed over.
    pub input_topic: String,
    /// librdkafka's `message.timeout.ms` of the re-drive producer.
    pub delivery_timeout_ms: i64,
    /// Most source records this run re-drives.
    pub limit: usize,
    /// Source records claimed and produced together.
    pub batch: usize,
    /// Only letters with this `dlq.reason`.
    pub reason: Option<String>,
    /// Also letters of records that had been re-driven before.
    pub include_redriven: bool,
    /// Choose, report, change nothing.
    pub dry_run: bool,
    /// Longest this run waits for other runs' claims to expire; claims expiring later
    /// are left for a later run.
    pub max_wait_ms: i64,
}

/// What a dead letter says about itself (from its headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LetterMeta {
    /// Where the letter is in the dead-letter topic.
    pub at: Coord,
    pub source: Option<SourceId>,
    pub reason: Option<String>,
    /// The letter's record had itself been re-driven (`tally.redriven-from`).
    pub redriven: bool,
}

/// The bytes a re-driven record carries: the original key, value and event time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
}

/// Why a pending letter was not chosen by this run (it stays pending).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassOver {
    /// `--reason` names another reason.
    Reason,
    /// Its record had been re-driven before (see `--include-redriven`).
    RedrivenRecord,
    /// `--limit` source records were chosen already.
    Limit,
}

/// What this run makes of one letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This run will re-drive the letter's source record.
    Chosen,
    /// An earlier letter of the same source record was chosen.
    CopyOf(Coord),
    /// The source record was re-driven already, to this input position.
    Redriven(Coord),
    /// A run claimed the source record; its claim expires then.
    Claimed { expires_ms: i64 },
    /// Not chosen now; stays pending.
    Pending(PassOver),
    /// No (valid) `dlq.source.*` headers: it cannot be de-duplicated, so it is never
    /// re-driven.
    Unidentified,
    /// From another topic than `--topic`.
    OtherTopic,
}

/// A chosen letter.
#[derive(Debug, Clone)]
struct Candidate {
    letter: Coord,
    source: SourceId,
    payload: Payload,
}

/// One record to put back on the input topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redrive {
    pub source: SourceId,
    /// The letter whose bytes these are (header `tally.redriven-from`).
    pub letter: Coord,
    /// The input partition: the source record's own.
    pub partition: i32,
    pub payload: Payload,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Read the journal from `from` to its current end: [`Event::JournalRead`].
    ReadJournal { from: i64 },
    /// Sleep until the wall clock reads `until_ms`: [`Event::Woke`].
    WaitUntil { until_ms: i64 },
    /// Read input partition `partition` from `from` to its end as of now, and report
    /// the records whose `tally.redrive.source` is one of `sources`: [`Event::Found`].
    Lookup {
        partition: i32,
        from: i64,
        sources: Vec<SourceId>,
    },
    /// Offer every dead letter to [`Run::offer`], then [`Event::Scanned`].
    ScanLetters,
    /// The current end offsets of these input partitions: [`Event::Ends`].
    InputEnds { partitions: Vec<i32> },
    /// Append these entries to the journal (a transaction of their own) and report
    /// their offsets: [`Event::Appended`].
    Append { entries: Vec<Entry> },
    /// Begin a transaction and produce these records: [`Event::Produced`], one result
    /// per record, in order.
    Produce { records: Vec<Redrive> },
    /// Append these entries in the open transaction, then commit it: [`Event::Committed`].
    Commit { entries: Vec<Entry> },
    /// Abort the open transaction and stop with this error.
    Abort { error: String },
    /// Stop with this error (no transaction open).
    Fail { error: String },
    /// The run is over; see [`Run::summary`].
    Finish,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Journal records from the requested offset on (`Err`: a record that is not an
    /// entry), and the offset the read stopped at.
    JournalRead {
        entries: Vec<(i64, Result<Entry, String>)>,
        end: i64,
    },
    Woke,
    Found {
        partition: i32,
        found: Vec<(SourceId, Coord)>,
    },
    Scanned,
    Ends {
        ends: Vec<(i32, i64)>,
    },
    Appended {
        offsets: Vec<i64>,
    },
    /// Per record: where it landed, or why the producer gave up on it.
    Produced {
        results: Vec<Result<Coord, String>>,
    },
    Committed,
}

/// A record this run put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redriven {
    pub letter: Coord,
    pub source: SourceId,
    pub output: Coord,
}

/// What the run did and saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub redriven: Vec<Redriven>,
    /// Dry run: what would be re-driven.
    pub would_redrive: Vec<(Coord, SourceId)>,
    /// Interrupted runs' claims resolved: the record was found on the input topic.
    pub claims_found: usize,
    /// Interrupted runs' claims resolved: the record was not there (pending again).
    pub claims_voided: usize,
    /// Claims of other runs that expire too late for this run to wait (source, expiry).
    pub claims_deferred: Vec<(SourceId, i64)>,
    /// Claims of this run that lost to another run's earlier claim.
    pub claims_lost: usize,
    pub copies: usize,
    pub already_redriven: usize,
    pub claimed_elsewhere: usize,
    pub passed_over: usize,
    pub over_limit: usize,
    pub unidentified: usize,
    pub other_topic: usize,
}

#[derive(Debug)]
enum Phase {
    Start,
    Waiting,
    Rereading,
    LookingUp {
        lookups: Vec<Command>,
        found: HashMap<SourceId, Coord>,
        /// The expired claims being looked up, as decided before the lookups.
        doubts: Vec<ClaimState>,
    },
    Resolving,
    ReadingResolution,
    Scanning,
    Ending {
        batch: Vec<usize>,
    },
    Claiming {
        batch: Vec<usize>,
        claim_time_ms: i64,
    },
    ReadingClaims {
        batch: Vec<usize>,
        claim_time_ms: i64,
        offsets: Vec<i64>,
    },
    Producing {
        winners: Vec<usize>,
    },
    Committing {
        redriven: Vec<Redriven>,
    },
    Over,
}

/// One re-drive run.
#[derive(Debug)]
pub struct Run {
    settings: Settings,
    journal: Journal,
    phase: Phase,
    chosen: Vec<Candidate>,
    chosen_sources: HashMap<SourceId, Coord>,
    /// Index of the first chosen candidate not yet in a batch.
    next_candidate: usize,
    summary: Summary,
}

impl Run {
    pub fn new(settings: Settings) -> Run {
        Run {
            settings,
            journal: Journal::new(),
            phase: Phase::Start,
            chosen: Vec::new(),
            chosen_sources: HashMap::new(),
            next_candidate: 0,
            summary: Summary::default(),
        }
    }

    pub fn start(&self) -> Command {
        Command::ReadJournal { from: 0 }
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Offers one dead letter (only between [`Command::ScanLetters`] and
    /// [`Event::Scanned`]); `payload` is called only for a chosen letter.
    pub fn offer(&mut self, letter: &LetterMeta, payload: impl FnOnce() -> Payload) -> Verdict {
        let verdict = self.judge(letter);
        let summary = &mut self.summary;
        match &verdict {
            Verdict::Chosen => {}
            Verdict::CopyOf(_) => summary.copies += 1,
            Verdict::Redriven(_) => summary.already_redriven += 1,
            Verdict::Claimed { .. } => summary.claimed_elsewhere += 1,
            Verdict::Pending(PassOver::Limit) => summary.over_limit += 1,
            Verdict::Pending(_) => summary.passed_over += 1,
            Verdict::Unidentified => summary.unidentified += 1,
            Verdict::OtherTopic => summary.other_topic += 1,
        }
        if verdict == Verdict::Chosen {
            if let Some(source) = &letter.source {
                self.chosen_sources.insert(source.clone(), letter.at);
                self.chosen.push(Candidate {
                    letter: letter.at,
                    source: source.clone(),
                    payload: payload(),
                });
            }
        }
        verdict
    }

    fn judge(&self, letter: &LetterMeta) -> Verdict {
        if !matches!(self.phase, Phase::Scanning) {
            // Not offered at the right time: choose nothing.
            return Verdict::Pending(PassOver::Limit);
        }
        let Some(source) = &letter.source else {
            return Verdict::Unidentified;
        };
        match self.journal.state(source) {
            Some(State::Done(output)) => return Verdict::Redriven(*output),
            Some(State::Claimed(claim)) => {
                return Verdict::Claimed {
                    expires_ms: claim.claim.expires_ms,
                }
            }
            None => {}
        }
        if let Some(first) = self.chosen_sources.get(source) {
            return Verdict::CopyOf(*first);
        }
        if source.topic != self.settings.input_topic {
            return Verdict::OtherTopic;
        }
        if let Some(reason) = &self.settings.reason {
            if letter.reason.as_deref() != Some(reason.as_str()) {
                return Verdict::Pending(PassOver::Reason);
            }
        }
        if letter.redriven && !self.settings.include_redriven {
            return Verdict::Pending(PassOver::RedrivenRecord);
        }
        if self.chosen.len() >= self.settings.limit {
            return Verdict::Pending(PassOver::Limit);
        }
        Verdict::Chosen
    }

    /// Feeds one event (`now_ms`: the wall clock when it happened) and returns what to
    /// do next.
    pub fn on(&mut self, event: Event, now_ms: i64) -> Command {
        let phase = std::mem::replace(&mut self.phase, Phase::Over);
        match (phase, event) {
            (Phase::Start, Event::JournalRead { entries, end }) => {
                if let Err(error) = self.apply(entries, end) {
                    return self.fail(error);
                }
                if self.settings.dry_run {
                    return self.scan();
                }
                self.plan_resolution(now_ms)
            }
            (Phase::Waiting, Event::Woke) => {
                self.phase = Phase::Rereading;
                self.read_journal()
            }
            (Phase::Rereading, Event::JournalRead { entries, end }) => {
                if let Err(error) = self.apply(entries, end) {
                    return self.fail(error);
                }
                self.look_up(now_ms)
            }
            (
                Phase::LookingUp {
                    lookups,
                    mut found,
                    doubts,
                },
                Event::Found { found: more, .. },
            ) => {
                found.extend(more);
                self.next_lookup(lookups, found, doubts)
            }
            (Phase::Resolving, Event::Appended { .. }) => {
                self.phase = Phase::ReadingResolution;
                self.read_journal()
            }
            (Phase::ReadingResolution, Event::JournalRead { entries, end }) => {
                if let Err(error) = self.apply(entries, end) {
                    return self.fail(error);
                }
                self.scan()
            }
            (Phase::Scanning, Event::Scanned) => {
                if self.settings.dry_run {
                    self.summary.would_redrive = self
                        .chosen
                        .iter()
                        .map(|c| (c.letter, c.source.clone()))
                        .collect();
                    return Command::Finish;
                }
                self.next_batch()
            }
            (Phase::Ending { batch }, Event::Ends { ends }) => self.claim(batch, &ends, now_ms),
            (
                Phase::Claiming {
                    batch,
                    claim_time_ms,
                },
                Event::Appended { offsets },
            ) => {
                if offsets.len() != batch.len() {
                    return self.fail(format!(
                        "wrote {} claims, the broker reported {} offsets",
                        batch.len(),
                        offsets.len()
                    ));
                }
                self.phase = Phase::ReadingClaims {
                    batch,
                    claim_time_ms,
                    offsets,
                };
                self.read_journal()
            }
            (
                Phase::ReadingClaims {
                    batch,
                    claim_time_ms,
                    offsets,
                },
                Event::JournalRead { entries, end },
            ) => {
                if let Err(error) = self.apply(entries, end) {
                    return self.fail(error);
                }
                self.produce(batch, claim_time_ms, &offsets, now_ms)
            }
            (Phase::Producing { winners }, Event::Produced { results }) => {
                self.confirm(winners, results)
            }
            (Phase::Committing { redriven }, Event::Committed) => {
                self.summary.redriven.extend(redriven);
                self.next_batch()
            }
            (phase, event) => self.fail(format!(
                "re-drive protocol error: {event:?} while {phase:?}"
            )),
        }
    }

    fn fail(&mut self, error: String) -> Command {
        self.phase = Phase::Over;
        Command::Fail { error }
    }

    fn read_journal(&self) -> Command {
        Command::ReadJournal {
            from: self.journal.next_offset(),
        }
    }

    fn apply(
        &mut self,
        entries: Vec<(i64, Result<Entry, String>)>,
        end: i64,
    ) -> Result<(), String> {
        for (offset, entry) in entries {
            match entry {
                Ok(entry) => self.journal.apply(offset, &entry),
                // An entry this build cannot read could be a claim or a done: going on
                // without it could put a record back twice.
                Err(err) => {
                    return Err(format!(
                        "journal record at offset {offset} is not a re-drive entry ({err}); \
                         refusing to re-drive"
                    ))
                }
            }
        }
        self.journal.skip_to(end);
        Ok(())
    }

    /// Claims of other runs that expire within this run's patience: wait for the last
    /// of them, then look their records up.
    fn plan_resolution(&mut self, now_ms: i64) -> Command {
        let patience = now_ms.saturating_add(self.settings.max_wait_ms);
        let mut until = None::<i64>;
        for claim in self.journal.claims() {
            let expires = claim.claim.expires_ms;
            if expires <= patience {
                until = Some(until.map_or(expires, |u| u.max(expires)));
            }
        }
        match until {
            None => self.look_up(now_ms),
            Some(until_ms) if until_ms > now_ms => {
                self.phase = Phase::Waiting;
                Command::WaitUntil { until_ms }
            }
            Some(_) => self.look_up(now_ms),
        }
    }

    /// Looks up the records of every claim expired by now (the journal was read after
    /// they expired, and each lookup reads the partition's end after that). Only these
    /// claims are resolved, however long the lookups take: a claim that expires
    /// meanwhile was not looked up after its expiry.
    fn look_up(&mut self, now_ms: i64) -> Command {
        let mut by_partition: BTreeMap<i32, (i64, Vec<SourceId>)> = BTreeMap::new();
        let mut deferred = Vec::new();
        let mut doubts = Vec::new();
        for state in self.journal.claims() {
            let claim = &state.claim;
            if claim.expires_ms <= now_ms {
                doubts.push(state.clone());
                let entry = by_partition
                    .entry(claim.target.partition)
                    .or_insert((claim.target.offset, Vec::new()));
                entry.0 = entry.0.min(claim.target.offset);
                entry.1.push(claim.source.clone());
            } else {
                deferred.push((claim.source.clone(), claim.expires_ms));
            }
        }
        deferred.sort();
        self.summary.claims_deferred = deferred;
        let lookups: Vec<Command> = by_partition
            .into_iter()
            .rev() // popped from the back: lowest partition first
            .map(|(partition, (from, mut sources))| {
                sources.sort();
                Command::Lookup {
                    partition,
                    from,
                    sources,
                }
            })
            .collect();
        self.next_lookup(lookups, HashMap::new(), doubts)
    }

    fn next_lookup(
        &mut self,
        mut lookups: Vec<Command>,
        found: HashMap<SourceId, Coord>,
        mut doubts: Vec<ClaimState>,
    ) -> Command {
        if let Some(lookup) = lookups.pop() {
            self.phase = Phase::LookingUp {
                lookups,
                found,
                doubts,
            };
            return lookup;
        }
        // Every claim in doubt was looked up: done where found, void where not.
        let mut entries = Vec::new();
        doubts.sort_by_key(|c| c.at);
        for claim in doubts {
            let source = claim.claim.source;
            match found.get(&source) {
                Some(output) => {
                    self.summary.claims_found += 1;
                    entries.push(Entry::Done(Done {
                        source,
                        run: self.settings.run.clone(),
                        output: *output,
                        found: true,
                    }));
                }
                None => {
                    self.summary.claims_voided += 1;
                    entries.push(Entry::Void(Void {
                        source,
                        run: self.settings.run.clone(),
                        claim_at: claim.at,
                    }));
                }
            }
        }
        if entries.is_empty() {
            return self.scan();
        }
        self.phase = Phase::Resolving;
        Command::Append { entries }
    }

    fn scan(&mut self) -> Command {
        self.phase = Phase::Scanning;
        Command::ScanLetters
    }

    fn next_batch(&mut self) -> Command {
        let start = self.next_candidate;
        let end = (start + self.settings.batch.max(1)).min(self.chosen.len());
        if start >= end {
            self.phase = Phase::Over;
            return Command::Finish;
        }
        self.next_candidate = end;
        let batch: Vec<usize> = (start..end).collect();
        let mut partitions: Vec<i32> = batch
            .iter()
            .map(|&i| self.chosen[i].source.partition)
            .collect();
        partitions.sort_unstable();
        partitions.dedup();
        self.phase = Phase::Ending { batch };
        Command::InputEnds { partitions }
    }

    fn claim(&mut self, batch: Vec<usize>, ends: &[(i32, i64)], now_ms: i64) -> Command {
        let expires_ms = claim_expiry(now_ms, self.settings.delivery_timeout_ms);
        let mut entries = Vec::with_capacity(batch.len());
        for &i in &batch {
            let candidate = &self.chosen[i];
            let partition = candidate.source.partition;
            let Some(&(_, end)) = ends.iter().find(|(p, _)| *p == partition) else {
                return self.fail(format!(
                    "no end offset for partition {partition} of {}",
                    self.settings.input_topic
                ));
            };
            entries.push(Entry::Claim(Claim {
                source: candidate.source.clone(),
                run: self.settings.run.clone(),
                letter: candidate.letter,
                target: Coord {
                    partition,
                    offset: end,
                },
                expires_ms,
            }));
        }
        self.phase = Phase::Claiming {
            batch,
            claim_time_ms: now_ms,
        };
        Command::Append { entries }
    }

    fn produce(
        &mut self,
        batch: Vec<usize>,
        claim_time_ms: i64,
        offsets: &[i64],
        now_ms: i64,
    ) -> Command {
        if let Some(&last) = offsets.iter().max() {
            if self.journal.next_offset() <= last {
                return self.fail(format!(
                    "the journal read stopped at {} before this run's claim at {last}",
                    self.journal.next_offset()
                ));
            }
        }
        let mut winners = Vec::new();
        for (&i, &at) in batch.iter().zip(offsets) {
            if self.journal.won(&self.chosen[i].source, at) {
                winners.push(i);
            } else {
                self.summary.claims_lost += 1;
            }
        }
        if winners.is_empty() {
            return self.next_batch();
        }
        if !may_enqueue(claim_time_ms, now_ms, self.settings.delivery_timeout_ms) {
            return self.fail(format!(
                "more than the delivery timeout ({} ms) passed between claiming and \
                 producing; nothing was produced, and the next run re-drives these \
                 records once the claims expire at {} ms",
                self.settings.delivery_timeout_ms,
                claim_expiry(claim_time_ms, self.settings.delivery_timeout_ms)
            ));
        }
        let records = winners
            .iter()
            .map(|&i| {
                let candidate = &self.chosen[i];
                Redrive {
                    source: candidate.source.clone(),
                    letter: candidate.letter,
                    partition: candidate.source.partition,
                    payload: candidate.payload.clone(),
                }
            })
            .collect();
        self.phase = Phase::Producing { winners };
        Command::Produce { records }
    }

    fn confirm(&mut self, winners: Vec<usize>, results: Vec<Result<Coord, String>>) -> Command {
        if results.len() != winners.len() {
            self.phase = Phase::Over;
            return Command::Abort {
                error: format!(
                    "produced {} records, got {} delivery reports",
                    winners.len(),
                    results.len()
                ),
            };
        }
        let mut redriven = Vec::with_capacity(winners.len());
        let mut failures = Vec::new();
        for (&i, result) in winners.iter().zip(results) {
            let candidate = &self.chosen[i];
            match result {
                Ok(output) => redriven.push(Redriven {
                    letter: candidate.letter,
                    source: candidate.source.clone(),
                    output,
                }),
                Err(err) => failures.push(format!("{}: {err}", candidate.source)),
            }
        }
        if !failures.is_empty() {
            // Their claims stay in force; once they expire, the next run finds out
            // whether the records landed anyway.
            self.phase = Phase::Over;
            return Command::Abort {
                error: format!(
                    "{} record(s) not acknowledged ({}); the next run resolves them once \
                     their claims expire",
                    failures.len(),
                    failures.join("; ")
                ),
            };
        }
        let entries = redriven
            .iter()
            .map(|r| {
                Entry::Done(Done {
                    source: r.source.clone(),
                    run: self.settings.run.clone(),
                    output: r.output,
                    found: false,
                })
            })
            .collect();
        self.phase = Phase::Committing { redriven };
        Command::Commit { entries }
    }
}

#[cfg(test)]
mod tests;
