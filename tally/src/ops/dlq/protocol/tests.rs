#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

const T: i64 = 1_000;

fn settings() -> Settings {
    Settings {
        run: "me".into(),
        input_topic: "increments".into(),
        delivery_timeout_ms: T,
        limit: 100,
        batch: 10,
        reason: None,
        include_redriven: false,
        dry_run: false,
        max_wait_ms: 10 * T,
    }
}

fn source(partition: i32, offset: i64) -> SourceId {
    SourceId {
        topic: "increments".into(),
        partition,
        offset,
    }
}

fn letter(at: i64, source: Option<SourceId>, reason: &str) -> LetterMeta {
    LetterMeta {
        at: Coord {
            partition: 0,
            offset: at,
        },
        source,
        reason: Some(reason.into()),
        redriven: false,
    }
}

fn payload(n: u8) -> Payload {
    Payload {
        key: Some(vec![n]),
        value: Some(vec![n, n]),
        timestamp_ms: Some(i64::from(n)),
    }
}

fn read(entries: Vec<(i64, Entry)>, end: i64) -> Event {
    Event::JournalRead {
        entries: entries.into_iter().map(|(o, e)| (o, Ok(e))).collect(),
        end,
    }
}

#[test]
fn claim_timing() {
    assert_eq!(claim_expiry(10, T), 10 + 3 * T);
    assert!(may_enqueue(10, 10 + T - 1, T));
    assert!(!may_enqueue(10, 10 + T, T));
    assert_eq!(claim_expiry(i64::MAX - 1, T), i64::MAX);
}

/// A whole run over an empty journal: two sources, one with two copies.
#[test]
fn a_run_claims_reads_back_produces_and_confirms() {
    let mut run = Run::new(settings());
    assert_eq!(run.start(), Command::ReadJournal { from: 0 });
    assert_eq!(run.on(read(vec![], 0), 0), Command::ScanLetters);
    let a = source(1, 5);
    let b = source(0, 7);
    assert_eq!(
        run.offer(&letter(0, Some(a.clone()), "late"), || payload(1)),
        Verdict::Chosen
    );
    assert_eq!(
        run.offer(&letter(1, Some(a.clone()), "late"), || payload(9)),
        Verdict::CopyOf(Coord {
            partition: 0,
            offset: 0
        })
    );
    assert_eq!(
        run.offer(&letter(2, Some(b.clone()), "late"), || payload(2)),
        Verdict::Chosen
    );
    assert_eq!(
        run.offer(&letter(3, None, "late"), || payload(3)),
        Verdict::Unidentified
    );
    assert_eq!(
        run.on(Event::Scanned, 0),
        Command::InputEnds {
            partitions: vec![0, 1]
        }
    );
    let Command::Append { entries } = run.on(
        Event::Ends {
            ends: vec![(0, 40), (1, 50)],
        },
        100,
    ) else {
        panic!("claims expected")
    };
    assert_eq!(entries.len(), 2);
    let Entry::Claim(claim) = &entries[0] else {
        panic!()
    };
    assert_eq!(claim.source, a);
    assert_eq!(
        claim.target,
        Coord {
            partition: 1,
            offset: 50
        }
    );
    assert_eq!(claim.expires_ms, 100 + 3 * T);
    assert_eq!(
        run.on(
            Event::Appended {
                offsets: vec![0, 1]
            },
            120
        ),
        Command::ReadJournal { from: 0 }
    );
    let Command::Produce { records } = run.on(
        read(vec![(0, entries[0].clone()), (1, entries[1].clone())], 2),
        130,
    ) else {
        panic!("produce expected")
    };
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].partition, 1);
    assert_eq!(records[0].payload, payload(1));
    assert_eq!(records[1].source, b);
    let out_a = Coord {
        partition: 1,
        offset: 50,
    };
    let out_b = Coord {
        partition: 0,
        offset: 40,
    };
    let Command::Commit { entries } = run.on(
        Event::Produced {
            results: vec![Ok(out_a), Ok(out_b)],
        },
        140,
    ) else {
        panic!("commit expected")
    };
    assert!(matches!(&entries[0], Entry::Done(d) if d.output == out_a && !d.found));
    assert_eq!(run.on(Event::Committed, 150), Command::Finish);
    assert_eq!(run.summary().redriven.len(), 2);
    assert_eq!(run.summary().copies, 1);
    assert_eq!(run.summary().unidentified, 1);
}

#[test]
fn re_driven_and_claimed_sources_are_not_chosen() {
    let mut run = Run::new(settings());
    let done = source(0, 1);
    let claimed = source(0, 2);
    let entries = vec![
        (
            0,
            Entry::Done(Done {
                source: done.clone(),
                run: "old".into(),
                output: Coord {
                    partition: 0,
                    offset: 99,
                },
                found: false,
            }),
        ),
        (
            1,
            Entry::Claim(Claim {
                source: claimed.clone(),
                run: "other".into(),
                letter: Coord {
                    partition: 0,
                    offset: 4,
                },
                target: Coord {
                    partition: 0,
                    offset: 10,
                },
                expires_ms: 1_000_000,
            }),
        ),
    ];
    // The claim expires beyond this run's patience: left alone, reported.
    assert_eq!(run.on(read(entries, 2), 0), Command::ScanLetters);
    assert_eq!(
        run.summary().claims_deferred,
        vec![(claimed.clone(), 1_000_000)]
    );
    assert_eq!(
        run.offer(&letter(0, Some(done), "late"), || payload(0)),
        Verdict::Redriven(Coord {
            partition: 0,
            offset: 99
        })
    );
    assert_eq!(
        run.offer(&letter(1, Some(claimed), "late"), || payload(0)),
        Verdict::Claimed {
            expires_ms: 1_000_000
        }
    );
    assert_eq!(run.on(Event::Scanned, 0), Command::Finish);
}

#[test]
fn filters_and_the_limit_leave_letters_pending() {
    let mut run = Run::new(Settings {
        reason: Some("late".into()),
        limit: 1,
        ..settings()
    });
    run.on(read(vec![], 0), 0);
    let other_topic = SourceId {
        topic: "elsewhere".into(),
        partition: 0,
        offset: 1,
    };
    assert_eq!(
        run.offer(&letter(0, Some(other_topic), "late"), || payload(0)),
        Verdict::OtherTopic
    );
    assert_eq!(
        run.offer(&letter(1, Some(source(0, 1)), "invalid_json"), || payload(
            0
        )),
        Verdict::Pending(PassOver::Reason)
    );
    let mut redriven = letter(2, Some(source(0, 2)), "late");
    redriven.redriven = true;
    assert_eq!(
        run.offer(&redriven, || payload(0)),
        Verdict::Pending(PassOver::RedrivenRecord)
    );
    assert_eq!(
        run.offer(&letter(3, Some(source(0, 3)), "late"), || payload(0)),
        Verdict::Chosen
    );
    assert_eq!(
        run.offer(&letter(4, Some(source(0, 4)), "late"), || payload(0)),
        Verdict::Pending(PassOver::Limit)
    );
    // A later copy of a letter passed over by the filter can still be chosen.
    let mut run = Run::new(Settings {
        reason: Some("late".into()),
        ..settings()
    });
    run.on(read(vec![], 0), 0);
    run.offer(&letter(0, Some(source(0, 9)), "invalid_json"), || {
        payload(0)
    });
    assert_eq!(
        run.offer(&letter(1, Some(source(0, 9)), "late"), || payload(0)),
        Verdict::Chosen
    );
}

#[test]
fn a_dry_run_changes_nothing() {
    let mut run = Run::new(Settings {
        dry_run: true,
        ..settings()
    });
    let claim = Entry::Claim(Claim {
        source: source(0, 1),
        run: "crashed".into(),
        letter: Coord {
            partition: 0,
            offset: 0,
        },
        target: Coord {
            partition: 0,
            offset: 0,
        },
        expires_ms: 0,
    });
    assert_eq!(run.on(read(vec![(0, claim)], 1), 50), Command::ScanLetters);
    run.offer(&letter(3, Some(source(0, 3)), "late"), || payload(0));
    assert_eq!(run.on(Event::Scanned, 0), Command::Finish);
    assert_eq!(run.summary().would_redrive.len(), 1);
}

fn crashed_claim(offset: i64, target: i64, expires_ms: i64) -> Entry {
    Entry::Claim(Claim {
        source: source(0, offset),
        run: "crashed".into(),
        letter: Coord {
            partition: 0,
            offset,
        },
        target: Coord {
            partition: 0,
            offset: target,
        },
        expires_ms,
    })
}

#[test]
fn expired_claims_are_looked_up_then_done_or_voided() {
    let mut run = Run::new(settings());
    let journal = vec![
        (0, crashed_claim(1, 30, 5_000)),
        (1, crashed_claim(2, 20, 6_000)),
    ];
    // Waits for the later expiry, reads the journal again, looks up from the
    // lowest recorded end.
    assert_eq!(
        run.on(read(journal, 2), 1_000),
        Command::WaitUntil { until_ms: 6_000 }
    );
    assert_eq!(run.on(Event::Woke, 6_000), Command::ReadJournal { from: 2 });
    assert_eq!(
        run.on(read(vec![], 2), 6_000),
        Command::Lookup {
            partition: 0,
            from: 20,
            sources: vec![source(0, 1), source(0, 2)]
        }
    );
    let landed = Coord {
        partition: 0,
        offset: 31,
    };
    let Command::Append { entries } = run.on(
        Event::Found {
            partition: 0,
            found: vec![(source(0, 1), landed)],
        },
        6_010,
    ) else {
        panic!("resolution expected")
    };
    assert_eq!(entries.len(), 2);
    assert!(matches!(&entries[0], Entry::Done(d) if d.output == landed && d.found));
    assert!(matches!(&entries[1], Entry::Void(v) if v.claim_at == 1));
    assert_eq!(
        run.on(
            Event::Appended {
                offsets: vec![2, 3]
            },
            6_020
        ),
        Command::ReadJournal { from: 2 }
    );
    assert_eq!(
        run.on(
            read(vec![(2, entries[0].clone()), (3, entries[1].clone())], 4),
            6_030
        ),
        Command::ScanLetters
    );
    // The found one is re-driven; the voided one is pending and chosen again.
    assert!(matches!(
        run.offer(&letter(1, Some(source(0, 1)), "late"), || payload(1)),
        Verdict::Redriven(_)
    ));
    assert_eq!(
        run.offer(&letter(2, Some(source(0, 2)), "late"), || payload(2)),
        Verdict::Chosen
    );
    assert_eq!(run.summary().claims_found, 1);
    assert_eq!(run.summary().claims_voided, 1);
}

/// Found by the property test: a claim that expires while the lookups run was not
/// looked up after its expiry, so it must not be voided.
#[test]
fn a_claim_expiring_during_the_lookups_is_left_alone() {
    let mut run = Run::new(Settings {
        max_wait_ms: 0,
        ..settings()
    });
    let journal = vec![
        (0, crashed_claim(1, 30, 5_000)),
        (1, crashed_claim(2, 20, 9_000)),
    ];
    assert!(matches!(
        run.on(read(journal, 2), 6_000),
        Command::Lookup { .. }
    ));
    let Command::Append { entries } = run.on(
        Event::Found {
            partition: 0,
            found: vec![],
        },
        10_000,
    ) else {
        panic!("resolution expected")
    };
    assert_eq!(entries.len(), 1);
    assert!(matches!(&entries[0], Entry::Void(v) if v.claim_at == 0));
}

#[test]
fn a_claim_that_lost_is_not_produced() {
    let mut run = Run::new(settings());
    run.on(read(vec![], 0), 0);
    run.offer(&letter(0, Some(source(0, 1)), "late"), || payload(1));
    run.on(Event::Scanned, 0);
    let Command::Append { entries } = run.on(Event::Ends { ends: vec![(0, 5)] }, 10) else {
        panic!()
    };
    run.on(Event::Appended { offsets: vec![1] }, 20);
    // Another run's claim at offset 0 came first.
    let theirs = crashed_claim(1, 5, 99_999);
    assert_eq!(
        run.on(read(vec![(0, theirs), (1, entries[0].clone())], 2), 30),
        Command::Finish
    );
    assert_eq!(run.summary().claims_lost, 1);
    assert!(run.summary().redriven.is_empty());
}

#[test]
fn a_run_too_slow_after_claiming_produces_nothing() {
    let mut run = Run::new(settings());
    run.on(read(vec![], 0), 0);
    run.offer(&letter(0, Some(source(0, 1)), "late"), || payload(1));
    run.on(Event::Scanned, 0);
    let Command::Append { entries } = run.on(Event::Ends { ends: vec![(0, 5)] }, 10) else {
        panic!()
    };
    run.on(Event::Appended { offsets: vec![0] }, 20);
    assert!(matches!(
        run.on(read(vec![(0, entries[0].clone())], 1), 10 + T),
        Command::Fail { .. }
    ));
}

#[test]
fn a_failed_delivery_aborts_and_leaves_the_claims() {
    let mut run = Run::new(settings());
    run.on(read(vec![], 0), 0);
    run.offer(&letter(0, Some(source(0, 1)), "late"), || payload(1));
    run.on(Event::Scanned, 0);
    let Command::Append { entries } = run.on(Event::Ends { ends: vec![(0, 5)] }, 10) else {
        panic!()
    };
    run.on(Event::Appended { offsets: vec![0] }, 20);
    run.on(read(vec![(0, entries[0].clone())], 1), 30);
    assert!(matches!(
        run.on(
            Event::Produced {
                results: vec![Err("timed out".into())]
            },
            40
        ),
        Command::Abort { .. }
    ));
}

#[test]
fn an_unreadable_journal_record_stops_the_run() {
    let mut run = Run::new(settings());
    assert!(matches!(
        run.on(
            Event::JournalRead {
                entries: vec![(0, Err("bad".into()))],
                end: 1
            },
            0
        ),
        Command::Fail { .. }
    ));
}

#[test]
fn events_out_of_order_stop_the_run() {
    let mut run = Run::new(settings());
    assert!(matches!(run.on(Event::Committed, 0), Command::Fail { .. }));
}

#[test]
fn batches_are_claimed_one_after_another() {
    let mut run = Run::new(Settings {
        batch: 2,
        ..settings()
    });
    run.on(read(vec![], 0), 0);
    for i in 0..3 {
        run.offer(&letter(i, Some(source(0, i)), "late"), || payload(0));
    }
    let mut journal_len = 0;
    let mut command = run.on(Event::Scanned, 0);
    let mut batches = Vec::new();
    loop {
        match command {
            Command::InputEnds { .. } => {
                command = run.on(Event::Ends { ends: vec![(0, 0)] }, 1);
            }
            Command::Append { entries } => {
                batches.push(entries.len());
                let offsets: Vec<i64> = (journal_len..journal_len + entries.len() as i64).collect();
                let read_back = offsets.iter().copied().zip(entries.clone()).collect();
                journal_len += entries.len() as i64;
                run.on(Event::Appended { offsets }, 2);
                command = run.on(read(read_back, journal_len), 3);
            }
            Command::Produce { records } => {
                let results = records
                    .iter()
                    .map(|r| {
                        Ok(Coord {
                            partition: 0,
                            offset: r.source.offset,
                        })
                    })
                    .collect();
                command = run.on(Event::Produced { results }, 4);
            }
            Command::Commit { entries } => {
                journal_len += entries.len() as i64;
                command = run.on(Event::Committed, 5);
            }
            Command::Finish => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(batches, vec![2, 1]);
    assert_eq!(run.summary().redriven.len(), 3);
}
