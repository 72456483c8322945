//! The re-drive protocol ([`super::protocol::Run`], the code the driver runs) against a
//! simulated broker, through random histories: several runs at once, crashes at every
//! command (with the crashed run's writes still in flight and landing later or never),
//! records that land late (up to the delivery timeout after they were handed over, as
//! librdkafka allows) or not at all, a clock that jumps. Writes become visible when
//! they land and are never rolled back, as on librdkafka's mock cluster, which ignores
//! transaction aborts and fencing (the harder case).
//!
//! Checked after every step: no source record is on the input topic twice. Checked at
//! the end, after one more run that is not interrupted: every source record with a
//! letter is on the input topic exactly once, and the journal says so.
//!
//! `TALLY_REDRIVE_SIM_CASES` raises the number of histories (default 1000).

use std::collections::HashMap;

use proptest::prelude::*;

use super::journal::{Coord, Entry, Journal, SourceId, State};
use super::protocol::{Command, Event, LetterMeta, Payload, Run, Settings};

const T: i64 = 1_000;
const PARTITIONS: i32 = 2;

#[derive(Debug, Clone)]
enum Landing {
    Journal(Entry),
    Input { partition: i32, source: SourceId },
}

#[derive(Debug)]
struct InFlight {
    run: usize,
    lands_by: i64,
    landing: Landing,
    /// Index of this record in its run's produce batch, if the run awaits it.
    produce_slot: Option<usize>,
}

#[derive(Debug, PartialEq, Eq)]
enum Status {
    Alive,
    /// Waiting for its produced records to land or time out.
    AwaitingDelivery,
    Crashed,
    Over,
}

struct SimRun {
    run: Run,
    next: Option<Command>,
    status: Status,
    /// Delivery results of the open produce batch.
    delivered: Vec<Option<Result<Coord, String>>>,
    /// When `next` was returned. The driver hands records to librdkafka right after
    /// the run checked the clock, so they land within the delivery timeout of this.
    issued_at: i64,
}

struct World {
    now: i64,
    journal: Vec<Entry>,
    input: Vec<Vec<Option<SourceId>>>,
    letters: Vec<(LetterMeta, Payload)>,
    in_flight: Vec<InFlight>,
    runs: Vec<SimRun>,
    started: usize,
}

impl World {
    fn new(letters: Vec<(LetterMeta, Payload)>) -> World {
        World {
            now: 1_000_000,
            journal: Vec::new(),
            input: (0..PARTITIONS).map(|_| Vec::new()).collect(),
            letters,
            in_flight: Vec::new(),
            runs: Vec::new(),
            started: 0,
        }
    }

    fn start_run(&mut self, limit: usize, batch: usize, max_wait_ms: i64) {
        self.started += 1;
        let run = Run::new(Settings {
            run: format!("run-{}", self.started),
            input_topic: "increments".into(),
            delivery_timeout_ms: T,
            limit,
            batch,
            reason: None,
            include_redriven: false,
            dry_run: false,
            max_wait_ms,
        });
        let first = run.start();
        self.runs.push(SimRun {
            run,
            next: Some(first),
            status: Status::Alive,
            delivered: Vec::new(),
            issued_at: self.now,
        });
    }

    fn land(&mut self, index: usize) {
        let flight = self.in_flight.swap_remove(index);
        assert!(
            flight.lands_by >= self.now,
            "the simulation landed a write after its deadline"
        );
        let result = match flight.landing {
            Landing::Journal(entry) => {
                self.journal.push(entry);
                None
            }
            Landing::Input { partition, source } => {
                let records = &mut self.input[partition as usize];
                records.push(Some(source));
                Some(Coord {
                    partition,
                    offset: records.len() as i64 - 1,
                })
            }
        };
        if let (Some(slot), Some(coord)) = (flight.produce_slot, result) {
            self.runs[flight.run].delivered[slot] = Some(Ok(coord));
        }
        self.finish_delivery(flight.run);
    }

    /// Time passes: what did not land by its deadline never will.
    fn advance(&mut self, ms: i64) {
        self.now += ms;
        let now = self.now;
        let mut i = 0;
        while i < self.in_flight.len() {
            if self.in_flight[i].lands_by < now {
                let flight = self.in_flight.swap_remove(i);
                if let Some(slot) = flight.produce_slot {
                    self.runs[flight.run].delivered[slot] = Some(Err("timed out".into()));
                }
                self.finish_delivery(flight.run);
            } else {
                i += 1;
            }
        }
    }

    fn finish_delivery(&mut self, run: usize) {
        let sim = &mut self.runs[run];
        if sim.status == Status::AwaitingDelivery && sim.delivered.iter().all(Option::is_some) {
            let results = sim
                .delivered
                .drain(..)
                .map(|r| r.unwrap_or(Err("lost".into())))
                .collect();
            sim.status = Status::Alive;
            let next = sim.run.on(Event::Produced { results }, self.now);
            sim.next = Some(next);
            sim.issued_at = self.now;
        }
    }

    /// A crash: the run stops; whatever it was writing is in flight (or lost).
    fn crash(&mut self, run: usize, writing_lands: bool) {
        let now = self.now;
        let sim = &mut self.runs[run];
        if matches!(sim.status, Status::Crashed | Status::Over) {
            return;
        }
        if writing_lands {
            if let Some(Command::Append { entries } | Command::Commit { entries }) = &sim.next {
                for entry in entries {
                    self.in_flight.push(InFlight {
                        run,
                        lands_by: now + T,
                        landing: Landing::Journal(entry.clone()),
                        produce_slot: None,
                    });
                }
            }
        }
        let sim = &mut self.runs[run];
        sim.status = Status::Crashed;
        sim.next = None;
        // Records already handed to the producer stay in flight (a zombie's appends).
        for flight in &mut self.in_flight {
            if flight.run == run {
                flight.produce_slot = None;
            }
        }
    }

    /// Executes one command of `run`; false when it cannot move now.
    fn step(&mut self, run: usize) -> bool {
        let now = self.now;
        let sim = &mut self.runs[run];
        if sim.status != Status::Alive {
            return false;
        }
        let Some(command) = sim.next.take() else {
            return false;
        };
        let event = match command {
            Command::ReadJournal { from } => Event::JournalRead {
                entries: self
                    .journal
                    .iter()
                    .enumerate()
                    .skip(from.max(0) as usize)
                    .map(|(offset, entry)| (offset as i64, Ok(entry.clone())))
                    .collect(),
                end: self.journal.len() as i64,
            },
            Command::WaitUntil { until_ms } => {
                if now < until_ms {
                    sim.next = Some(Command::WaitUntil { until_ms });
                    return false;
                }
                Event::Woke
            }
            Command::Lookup {
                partition,
                from,
                sources,
            } => {
                let found = self.input[partition as usize]
                    .iter()
                    .enumerate()
                    .skip(from.max(0) as usize)
                    .filter_map(|(offset, source)| {
                        let source = source.as_ref()?;
                        sources.contains(source).then(|| {
                            (
                                source.clone(),
                                Coord {
                                    partition,
                                    offset: offset as i64,
                                },
                            )
                        })
                    })
                    .collect();
                Event::Found { partition, found }
            }
            Command::ScanLetters => {
                for (letter, payload) in &self.letters {
                    sim.run.offer(letter, || payload.clone());
                }
                Event::Scanned
            }
            Command::InputEnds { partitions } => Event::Ends {
                ends: partitions
                    .iter()
                    .map(|&p| (p, self.input[p as usize].len() as i64))
                    .collect(),
            },
            Command::Append { entries } => {
                let first = self.journal.len() as i64;
                let offsets = (first..first + entries.len() as i64).collect();
                self.journal.extend(entries);
                Event::Appended { offsets }
            }
            Command::Produce { records } => {
                sim.delivered = vec![None; records.len()];
                sim.status = Status::AwaitingDelivery;
                let lands_by = sim.issued_at + T;
                for (slot, record) in records.into_iter().enumerate() {
                    self.in_flight.push(InFlight {
                        run,
                        lands_by,
                        landing: Landing::Input {
                            partition: record.partition,
                            source: record.source,
                        },
                        produce_slot: Some(slot),
                    });
                }
                // Handed over when the command was issued: already too late to land?
                self.advance(0);
                return true;
            }
            Command::Commit { entries } => {
                self.journal.extend(entries);
                Event::Committed
            }
            Command::Abort { .. } | Command::Fail { .. } | Command::Finish => {
                sim.status = Status::Over;
                return true;
            }
        };
        let next = sim.run.on(event, now);
        sim.next = Some(next);
        sim.issued_at = now;
        true
    }

    fn copies_on_input(&self) -> HashMap<SourceId, usize> {
        let mut copies = HashMap::new();
        for record in self.input.iter().flatten().flatten() {
            *copies.entry(record.clone()).or_default() += 1;
        }
        copies
    }

    fn check_at_most_once(&self, history: &[String]) {
        for (source, n) in self.copies_on_input() {
            assert!(
                n <= 1,
                "{source} re-driven {n} times\nhistory:\n{}\njournal:\n{}\ninput: {:?}",
                history.join("\n"),
                self.journal
                    .iter()
                    .enumerate()
                    .map(|(i, e)| format!("{i}: {e:?}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.input
            );
        }
    }
}

/// Letters for `sources` distinct source records, each with `1 + copies[i] % 3` copies,
/// interleaved, plus one letter without source headers.
fn letters(copies: &[u8]) -> Vec<(LetterMeta, Payload)> {
    let mut letters = Vec::new();
    let mut at = 0;
    for round in 0..3u8 {
        for (i, n) in copies.iter().enumerate() {
            if round <= n % 3 {
                let source = SourceId {
                    topic: "increments".into(),
                    partition: (i as i32) % PARTITIONS,
                    offset: 100 + i as i64,
                };
                letters.push((
                    LetterMeta {
                        at: Coord {
                            partition: 0,
                            offset: at,
                        },
                        source: Some(source),
                        reason: Some("late".into()),
                        redriven: false,
                    },
                    Payload {
                        key: Some(vec![i as u8]),
                        value: Some(vec![i as u8]),
                        timestamp_ms: Some(i as i64),
                    },
                ));
                at += 1;
            }
        }
    }
    letters.push((
        LetterMeta {
            at: Coord {
                partition: 0,
                offset: at,
            },
            source: None,
            reason: Some("invalid_json".into()),
            redriven: false,
        },
        Payload {
            key: None,
            value: None,
            timestamp_ms: None,
        },
    ));
    letters
}

fn simulate(copies: &[u8], script: &[(u8, u8)], limit: usize, batch: usize) {
    let mut world = World::new(letters(copies));
    let mut history = Vec::new();
    world.start_run(limit, batch, 4 * T);
    for &(op, arg) in script {
        let runs = world.runs.len();
        let what = match op % 10 {
            0..=4 => {
                let run = arg as usize % runs;
                let moved = world.step(run);
                format!("t={} step run {run}: {moved}", world.now)
            }
            5 => {
                let ms = i64::from(arg % 8 + 1) * T / 4;
                world.advance(ms);
                format!("advance {ms} ms to {}", world.now)
            }
            6 if !world.in_flight.is_empty() => {
                let index = arg as usize % world.in_flight.len();
                let what = format!("t={} land {:?}", world.now, world.in_flight[index].landing);
                world.land(index);
                what
            }
            7 => {
                let run = arg as usize % runs;
                world.crash(run, arg % 2 == 0);
                format!("t={} crash run {run}", world.now)
            }
            8 if world.runs.len() < 5 => {
                world.start_run(
                    1 + arg as usize % 6,
                    1 + arg as usize % 3,
                    i64::from(arg % 5) * T,
                );
                format!("t={} start run {}", world.now, world.runs.len() - 1)
            }
            _ => continue,
        };
        history.push(what);
        world.check_at_most_once(&history);
    }
    // The end: no more crashes. The runs still alive finish (time passes when they
    // wait), everything in flight lands or times out, then one more run.
    for _ in 0..10_000 {
        let mut moved = false;
        for run in 0..world.runs.len() {
            let before = format!("{:?}", world.runs[run].next);
            if world.step(run) {
                moved = true;
                history.push(format!("t={} end: run {run} did {before}", world.now));
            }
        }
        if !moved {
            if world.in_flight.is_empty()
                && world
                    .runs
                    .iter()
                    .all(|r| r.status != Status::Alive || r.next.is_none())
            {
                break;
            }
            if !world.in_flight.is_empty() && world.now % 2 == 0 {
                history.push(format!(
                    "t={} end: land {:?}",
                    world.now, world.in_flight[0].landing
                ));
                world.land(0);
            } else {
                world.advance(T / 2);
            }
        }
        world.check_at_most_once(&history);
    }
    world.advance(10 * T);
    history.push(format!("t={} final run", world.now));
    world.start_run(usize::MAX, 3, 10 * T);
    let last = world.runs.len() - 1;
    for _ in 0..10_000 {
        if world.runs[last].status == Status::Over {
            break;
        }
        let before = format!("{:?}", world.runs[last].next);
        if world.step(last) {
            history.push(format!("t={} final: did {before}", world.now));
        } else {
            if world.in_flight.is_empty() {
                world.advance(T / 2);
            } else {
                history.push(format!(
                    "t={} land {:?}",
                    world.now, world.in_flight[0].landing
                ));
                world.land(0);
            }
        }
        world.check_at_most_once(&history);
    }
    assert_eq!(
        world.runs[last].status,
        Status::Over,
        "the final run did not finish\nhistory:\n{}",
        history.join("\n")
    );
    let copies_on_input = world.copies_on_input();
    let mut journal = Journal::new();
    for (offset, entry) in world.journal.iter().enumerate() {
        journal.apply(offset as i64, entry);
    }
    for (letter, _) in &world.letters {
        let Some(source) = &letter.source else {
            continue;
        };
        assert_eq!(
            copies_on_input.get(source),
            Some(&1),
            "{source} not re-driven exactly once\nhistory:\n{}",
            history.join("\n")
        );
        assert!(
            matches!(journal.state(source), Some(State::Done(_))),
            "{source}: {:?}",
            journal.state(source)
        );
    }
    // Only letters' source records were ever produced.
    assert!(world.input.iter().flatten().all(Option::is_some));
}

fn cases() -> u32 {
    std::env::var("TALLY_REDRIVE_SIM_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn each_source_record_is_re_driven_at_most_once_then_exactly_once(
        copies in proptest::collection::vec(any::<u8>(), 1..7),
        script in proptest::collection::vec((any::<u8>(), any::<u8>()), 0..250),
        limit in 1usize..8,
        batch in 1usize..4,
    ) {
        simulate(&copies, &script, limit, batch);
    }
}

/// A history written out: two runs race for the same records while a third crashes
/// after producing, before confirming.
#[test]
fn a_crash_after_producing_and_a_race_still_re_drive_once() {
    let script: Vec<(u8, u8)> = vec![
        (0, 0),
        (0, 0),
        (0, 0),
        (0, 0),
        (0, 0),
        (0, 0), // run 0 up to producing
        (6, 0), // one record lands
        (7, 1), // run 0 crashes before confirming
        (8, 3), // run 1 starts
        (0, 1),
        (0, 1),
        (0, 1), // run 1 reads and waits
        (8, 4), // run 2 starts
        (5, 7),
        (5, 7),
        (5, 7),
        (5, 7), // time passes
        (0, 1),
        (0, 2),
        (0, 1),
        (0, 2),
        (0, 1),
        (0, 2),
        (0, 1),
        (0, 2),
        (6, 0),
        (6, 0),
        (0, 1),
        (0, 2),
        (0, 1),
        (0, 2),
    ];
    simulate(&[2, 1, 0, 2], &script, 8, 2);
}
