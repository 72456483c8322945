//! The protocol's rules, one scenario each. The random histories of
//! `tests/engine_model.rs` drive the same type through crashes and faults.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use tally_schemas::Checkpoint;
use uuid::Uuid;

const NOW: i64 = 1_000_000;

fn config(accept_data_loss: bool) -> ProtocolConfig {
    ProtocolConfig {
        engine: EngineConfig::new(10, 2, 1_000_000).unwrap(),
        accept_data_loss,
        max_outstanding_letters: 4,
        idle_markers: None,
    }
}

fn body(key: u128, value: i64) -> Vec<u8> {
    format!(
        r#"{{"key":"{}","value":{value}}}"#,
        Uuid::from_u128(key).hyphenated()
    )
    .into_bytes()
}

fn record(partition: i32, offset: i64, ts: i64, value: &[u8]) -> Event<'_> {
    Event::Record {
        record: Record {
            partition,
            offset,
            timestamp_ms: Some(ts),
            key: None,
            value: Some(value),
            redriven_from: None,
            marker: false,
        },
        now_ms: NOW,
    }
}

fn fresh(partition: i32) -> AssignedPartition {
    AssignedPartition {
        partition,
        committed: CommittedOffset::None,
        store: StoreCheckpoints::default(),
    }
}

fn assigned(protocol: &mut Protocol, partitions: Vec<AssignedPartition>) -> Vec<Command> {
    protocol.handle(Event::Assigned { partitions })
}

fn starts(commands: &[Command]) -> Vec<(i32, StartAt)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Assign { positions } => Some(positions.iter().map(|(p, d)| (*p, d.start))),
            _ => None,
        })
        .flatten()
        .collect()
}

fn write_of(commands: &[Command]) -> WriteBatch {
    commands
        .iter()
        .find_map(|c| match c {
            Command::WriteRows(batch) => Some(batch.clone()),
            _ => None,
        })
        .expect("a write")
}

fn commit_of(commands: &[Command]) -> Option<(Vec<(i32, Checkpoint)>, bool)> {
    commands.iter().find_map(|c| match c {
        Command::Commit { offsets, sync } => Some((offsets.clone(), *sync)),
        _ => None,
    })
}

fn letters_of(commands: &[Command]) -> Vec<(LetterId, DeadLetterOut)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::SendLetter { id, letter } => Some((*id, letter.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn commits_only_after_the_rows_and_checkpoint_row_are_durable() {
    let mut protocol = Protocol::new(config(false));
    let assign = assigned(&mut protocol, vec![fresh(0)]);
    assert_eq!(starts(&assign), vec![(0, StartAt::Beginning)]);
    let value = body(1, 5);
    assert!(protocol.handle(record(0, 0, 3, &value)).is_empty());
    assert!(protocol.handle(record(0, 1, 15, &value)).is_empty()); // closes [0, 10)
    let tick = protocol.handle(Event::FlushTick { now_ms: NOW });
    let batch = write_of(&tick);
    assert!(commit_of(&tick).is_none(), "no commit before the write");
    assert_eq!(batch.rows.len(), 2);
    assert_eq!(batch.checkpoints.len(), 1);
    let (_, checkpoint) = batch.checkpoints[0];
    assert_eq!(checkpoint.next_offset, 1);
    // While the write is in flight, ticks start no second write.
    assert!(protocol
        .handle(Event::FlushTick { now_ms: NOW })
        .iter()
        .all(|c| !matches!(c, Command::WriteRows(_))));
    let written = protocol.handle(Event::Written { flush: batch.flush });
    assert_eq!(commit_of(&written), Some((vec![(0, checkpoint)], false)));
    // The commit succeeds: nothing more to commit until something new is durable.
    assert!(protocol
        .handle(Event::CommitResult {
            offsets: vec![(0, 1)],
            ok: true
        })
        .is_empty());
    assert_eq!(protocol.views().next().unwrap().committed_offset, Some(1));
}

#[test]
fn never_commits_past_an_unacknowledged_dead_letter() {
    let mut protocol = Protocol::new(config(false));
    assigned(&mut protocol, vec![fresh(0)]);
    let good = body(1, 1);
    protocol.handle(record(0, 0, 3, &good));
    let poison = protocol.handle(record(0, 1, 4, b"not json"));
    let [(letter_id, letter)] = letters_of(&poison).try_into().unwrap();
    assert_eq!((letter.partition, letter.offset), (0, 1));
    assert_eq!(letter.reason, RejectReason::InvalidJson);
    protocol.handle(record(0, 2, 30, &good)); // closes [0, 10): checkpoint at 2
    let tick = protocol.handle(Event::FlushTick { now_ms: NOW });
    let batch = write_of(&tick);
    // Rows go out, but no checkpoint row: it would promise the letter is durable.
    assert!(!batch.rows.is_empty());
    assert!(batch.checkpoints.is_empty(), "{batch:?}");
    let written = protocol.handle(Event::Written { flush: batch.flush });
    assert!(
        commit_of(&written).is_none(),
        "the letter at 1 is not acknowledged"
    );
    // A transient failure is retried at the next tick, still without committing.
    let failed = protocol.handle(Event::LetterFailed {
        id: letter_id,
        permanent: false,
        error: "timed out".into(),
    });
    assert!(failed.is_empty());
    let tick = protocol.handle(Event::FlushTick { now_ms: NOW });
    assert_eq!(letters_of(&tick).len(), 1);
    assert!(commit_of(&tick).is_none());
    assert!(protocol
        .handle(Event::LetterAcked { id: letter_id })
        .is_empty());
    // Now the checkpoint row is saved, and committed once durable.
    let batch = write_of(&protocol.handle(Event::FlushTick { now_ms: NOW }));
    assert_eq!(batch.checkpoints[0].1.next_offset, 2);
    let written = protocol.handle(Event::Written { flush: batch.flush });
    assert_eq!(commit_of(&written).unwrap().0[0].1.next_offset, 2);
    assert_eq!(protocol.stats().letters_acked.get("invalid_json"), Some(&1));
}

#[test]
fn a_letter_that_can_never_be_delivered_stops_uncommitted() {
    let mut protocol = Protocol::new(config(false));
    assigned(&mut protocol, vec![fresh(0)]);
    let sent = protocol.handle(record(0, 0, 3, b"{}"));
    let [(id, _)] = letters_of(&sent).try_into().unwrap();
    let failed = protocol.handle(Event::LetterFailed {
        id,
        permanent: true,
        error: "message too large".into(),
    });
    assert!(matches!(
        failed.as_slice(),
        [Command::Stop {
            error: ProtocolError::UndeliverableLetter {
                partition: 0,
                offset: 0,
                ..
            }
        }]
    ));
    // Stopped: nothing more happens.
    assert!(protocol.handle(Event::FlushTick { now_ms: NOW }).is_empty());
    assert!(protocol.stopped().is_some());
    assert!(!protocol.may_read());
}

#[test]
fn too_many_outstanding_letters_stop_reading() {
    let mut protocol = Protocol::new(config(false));
    assigned(&mut protocol, vec![fresh(0)]);
    for offset in 0..4 {
        assert!(protocol.may_read());
        protocol.handle(record(0, offset, 3, b"x"));
    }
    assert!(!protocol.may_read());
}

#[test]
fn one_saved_checkpoint_awaits_its_commit_at_a_time() {
    let mut protocol = Protocol::new(config(false));
    assigned(&mut protocol, vec![fresh(0)]);
    let value = body(1, 1);
    let mut offset = 0;
    let mut ts = 0;
    let mut next = |protocol: &mut Protocol| {
        ts += 20;
        protocol.handle(record(0, offset, ts, &value));
        offset += 1;
    };
    next(&mut protocol);
    next(&mut protocol);
    let first = write_of(&protocol.handle(Event::FlushTick { now_ms: NOW }));
    assert_eq!(first.checkpoints.len(), 1);
    let commit = protocol.handle(Event::Written { flush: first.flush });
    assert!(commit_of(&commit).is_some());
    // The commit fails; the next flush writes rows but no new checkpoint row.
    protocol.handle(Event::CommitResult {
        offsets: vec![(0, first.checkpoints[0].1.next_offset)],
        ok: false,
    });
    next(&mut protocol);
    let tick = protocol.handle(Event::FlushTick { now_ms: NOW });
    // The failed commit is retried at the tick.
    assert!(commit_of(&tick).is_some());
    let second = write_of(&tick);
    assert!(!second.rows.is_empty());
    assert!(second.checkpoints.is_empty(), "{second:?}");
    protocol.handle(Event::Written {
        flush: second.flush,
    });
    protocol.handle(Event::CommitResult {
        offsets: vec![(0, first.checkpoints[0].1.next_offset)],
        ok: true,
    });
    next(&mut protocol);
    let third = write_of(&protocol.handle(Event::FlushTick { now_ms: NOW }));
    assert_eq!(third.checkpoints.len(), 1, "committed: saving again");
}

#[test]
fn a_revoke_flushes_every_revoked_partition_in_one_write_and_commits_synchronously() {
    let mut protocol = Protocol::new(config(false));
    assigned(&mut protocol, vec![fresh(0), fresh(1), fresh(2)]);
    let value = body(1, 1);
    for partition in 0..3 {
        protocol.handle(record(partition, 0, 3, &value));
    }
    let revoke = protocol.handle(Event::Revoked {
        partitions: vec![0, 1],
    });
    let batch = write_of(&revoke);
    let partitions: Vec<i32> = batch.checkpoints.iter().map(|(p, _)| *p).collect();
    assert_eq!(partitions, vec![0, 1]);
    assert!(!protocol.revoke_ready(&[0, 1]));
    // Records of revoking partitions are ignored.
    protocol.handle(record(0, 1, 4, &value));
    protocol.handle(Event::Written { flush: batch.flush });
    assert!(protocol.revoke_ready(&[0, 1]));
    let settled = protocol.handle(Event::RevokeSettled {
        partitions: vec![0, 1],
    });
    let (offsets, sync) = commit_of(&settled).unwrap();
    assert!(sync);
    assert_eq!(
        offsets.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert_eq!(protocol.owned(), vec![2]);
}

#[test]
fn a_revoke_whose_flush_is_not_durable_hands_over_uncommitted() {
    let mut protocol = Protocol::new(config(false));
    assigned(&mut protocol, vec![fresh(0)]);
    let value = body(1, 1);
    protocol.handle(record(0, 0, 3, &value));
    // A regular flush is in flight (the store is slow) when the revoke comes.
    let regular = write_of(&protocol.handle(Event::FlushTick { now_ms: NOW }));
    protocol.handle(record(0, 1, 25, &value));
    let revoke = write_of(&protocol.handle(Event::Revoked {
        partitions: vec![0],
    }));
    // The revoke's own write lands, the regular one does not within the deadline.
    protocol.handle(Event::Written {
        flush: revoke.flush,
    });
    assert!(!protocol.revoke_ready(&[0]));
    let settled = protocol.handle(Event::RevokeSettled {
        partitions: vec![0],
    });
    assert!(commit_of(&settled).is_none(), "{settled:?}");
    assert!(settled.contains(&Command::HandOverUncommitted {
        partition: 0,
        why: HandOver::FlushNotDurable
    }));
    // The late completion of the regular write changes nothing.
    assert!(protocol
        .handle(Event::Written {
            flush: regular.flush
        })
        .is_empty());
}

#[test]
fn a_revoke_with_unacknowledged_letters_hands_over_uncommitted() {
    let mut protocol = Protocol::new(config(false));
    assigned(&mut protocol, vec![fresh(0)]);
    let value = body(1, 1);
    protocol.handle(record(0, 0, 3, b"x"));
    protocol.handle(record(0, 1, 25, &value));
    protocol.handle(record(0, 2, 40, &value));
    let revoke = write_of(&protocol.handle(Event::Revoked {
        partitions: vec![0],
    }));
    protocol.handle(Event::Written {
        flush: revoke.flush,
    });
    assert!(!protocol.revoke_ready(&[0]));
    let settled = protocol.handle(Event::RevokeSettled {
        partitions: vec![0],
    });
    assert!(commit_of(&settled).is_none(), "{settled:?}");
    assert!(
        settled.contains(&Command::HandOverUncommitted {
            partition: 0,
            why: HandOver::LettersUnacknowledged
        }),
        "{settled:?}"
    );
    // Its letters no longer hold reading back.
    assert!(protocol.may_read());
}

#[test]
fn checkpoints_pinned_with_other_settings_stop_the_aggregator() {
    let mut protocol = Protocol::new(config(false));
    let other = Checkpoint {
        next_offset: 5,
        max_ts_ms: None,
        closed_through_ms: None,
        generation: 0,
        settings: Some(SumSettings {
            window_ms: 60,
            grace_ms: 2,
        }),
        external_reset: false,
    };
    let commands = assigned(
        &mut protocol,
        vec![AssignedPartition {
            partition: 3,
            committed: CommittedOffset::At {
                offset: 5,
                metadata: other.to_metadata(),
            },
            store: StoreCheckpoints::default(),
        }],
    );
    let [Command::Stop { error }] = commands.as_slice() else {
        panic!("{commands:?}");
    };
    let text = error.to_string();
    assert!(
        text.contains("window 60 ms") && text.contains("window 10 ms"),
        "{text}"
    );
}

#[test]
fn partitions_assigned_while_the_store_is_down_start_paused() {
    let mut protocol = Protocol::new(config(false));
    assigned(&mut protocol, vec![fresh(0)]);
    assert_eq!(
        protocol.handle(Event::StoreAvailability { available: false }),
        vec![Command::Pause {
            partitions: vec![0]
        }]
    );
    let commands = assigned(&mut protocol, vec![fresh(1)]);
    assert_eq!(
        commands[1],
        Command::Pause {
            partitions: vec![1]
        }
    );
    assert_eq!(
        protocol.handle(Event::StoreAvailability { available: true }),
        vec![Command::Resume {
            partitions: vec![0, 1]
        }]
    );
}

/// The measured hole: a window holding stored records, offsets below the log start
/// deleted by retention while the aggregator was stopped.
fn resumed_before_deleted_offsets(accept: bool) -> (Protocol, Checkpoint) {
    let mut protocol = Protocol::new(config(accept));
    let committed = Checkpoint {
        next_offset: 100,
        max_ts_ms: Some(95),
        closed_through_ms: Some(90),
        generation: 2,
        settings: Some(config(accept).engine.sum_settings()),
        external_reset: false,
    };
    let assign = assigned(
        &mut protocol,
        vec![AssignedPartition {
            partition: 0,
            committed: CommittedOffset::At {
                offset: 100,
                metadata: committed.to_metadata(),
            },
            store: StoreCheckpoints {
                exact: Some(committed),
                latest: Some(committed),
            },
        }],
    );
    assert_eq!(assign.len(), 1);
    assert_eq!(starts(&assign), vec![(0, StartAt::Offset(100))]);
    (protocol, committed)
}

#[test]
fn vanished_offsets_halt_the_partition_by_default() {
    let (mut protocol, _) = resumed_before_deleted_offsets(false);
    let commands = protocol.handle(Event::LogRange {
        partition: 0,
        log_start: 13_406,
        log_end: 61_000,
    });
    assert_eq!(
        commands,
        vec![
            Command::OffsetsLost {
                partition: 0,
                from: 100,
                to: 13_406,
                accepted: false
            },
            Command::Pause {
                partitions: vec![0]
            }
        ]
    );
    assert_eq!(protocol.stats().lost_offsets.get(&0), Some(&13_306));
    // Nothing it might still receive is counted, nothing is written or committed past
    // the gap.
    let value = body(1, 1);
    protocol.handle(record(0, 13_406, 99, &value));
    let tick = protocol.handle(Event::FlushTick { now_ms: NOW });
    assert!(tick.is_empty(), "{tick:?}");
    assert!(protocol.views().next().unwrap().halted);
    // A range that does not concern this partition changes nothing.
    let (mut protocol, _) = resumed_before_deleted_offsets(false);
    assert!(protocol
        .handle(Event::LogRange {
            partition: 0,
            log_start: 50,
            log_end: 500
        })
        .is_empty());
}

#[test]
fn accepted_loss_continues_as_an_external_reset_that_freezes_the_touched_windows() {
    let (mut protocol, committed) = resumed_before_deleted_offsets(true);
    let commands = protocol.handle(Event::LogRange {
        partition: 0,
        log_start: 13_406,
        log_end: 61_000,
    });
    assert_eq!(
        commands[0],
        Command::OffsetsLost {
            partition: 0,
            from: 100,
            to: 13_406,
            accepted: true
        }
    );
    // The reset's generation is claimed before any of its rows, then reading
    // continues at the log start.
    let claim = write_of(&commands);
    assert!(claim.rows.is_empty());
    assert_eq!(
        claim.checkpoints,
        vec![(
            0,
            Checkpoint::reset_claim(
                13_406,
                committed.generation + 1,
                Some(config(true).engine.sum_settings())
            )
        )]
    );
    assert_eq!(
        commands[2],
        Command::Seek {
            partition: 0,
            offset: 13_406
        }
    );
    protocol.handle(Event::Written { flush: claim.flush });
    // The first record after the gap anchors the freeze: its window (and those
    // within the grace after it) are never rewritten with a partial sum.
    let value = body(1, 1);
    protocol.handle(record(0, 13_406, 95, &value));
    protocol.handle(record(0, 13_407, 131, &value));
    let batch = write_of(&protocol.handle(Event::FlushTick { now_ms: NOW }));
    assert!(
        batch.rows.iter().all(|row| row.window_start_ms >= 110),
        "{batch:?}"
    );
    assert!(batch
        .rows
        .iter()
        .all(|row| row.generation > committed.generation));
}

#[test]
fn a_log_behind_the_expected_offset_is_lost_too() {
    let (mut protocol, _) = resumed_before_deleted_offsets(false);
    let commands = protocol.handle(Event::LogRange {
        partition: 0,
        log_start: 0,
        log_end: 40,
    });
    assert!(commands.contains(&Command::OffsetsLost {
        partition: 0,
        from: 40,
        to: 100,
        accepted: false
    }));
}

#[test]
fn an_external_reset_claims_its_generation_before_writing_any_row() {
    let mut protocol = Protocol::new(config(false));
    let reset_at = |protocol: &mut Protocol, offset: i64, latest: Option<Checkpoint>| {
        assigned(
            protocol,
            vec![AssignedPartition {
                partition: 0,
                committed: CommittedOffset::At {
                    offset,
                    metadata: String::new(),
                },
                store: StoreCheckpoints {
                    exact: None,
                    latest,
                },
            }],
        )
    };
    let assign = reset_at(&mut protocol, 7, None);
    let claim = write_of(&assign);
    let settings = Some(config(false).engine.sum_settings());
    assert_eq!(claim.rows, vec![]);
    assert_eq!(
        claim.checkpoints,
        vec![(0, Checkpoint::reset_claim(7, 1, settings))]
    );
    // Until the claim is durable, no row of the new generation is written.
    let value = body(1, 1);
    protocol.handle(record(0, 7, 13, &value));
    let tick = protocol.handle(Event::FlushTick { now_ms: NOW });
    assert!(
        tick.iter().all(|c| !matches!(c, Command::WriteRows(_))),
        "{tick:?}"
    );
    // Durable: the claim is committed (it is the reset's state, with metadata).
    let written = protocol.handle(Event::Written { flush: claim.flush });
    let (offsets, _) = commit_of(&written).unwrap();
    assert_eq!(offsets, vec![(0, Checkpoint::reset_claim(7, 1, settings))]);
    protocol.handle(Event::CommitResult {
        offsets: vec![(0, 7)],
        ok: true,
    });
    let batch = write_of(&protocol.handle(Event::FlushTick { now_ms: NOW }));
    assert!(batch.rows.iter().all(|row| row.generation == 1));
    assert_eq!(batch.checkpoints[0].1.next_offset, 8);
    let written = protocol.handle(Event::Written { flush: batch.flush });
    assert!(commit_of(&written).is_some());

    // A second reset elsewhere, assigned before anything of the first was
    // committed, still takes a higher generation: the claim is the store's latest.
    let mut protocol = Protocol::new(config(false));
    let claim = write_of(&reset_at(
        &mut protocol,
        30,
        Some(Checkpoint::reset_claim(7, 1, settings)),
    ));
    assert_eq!(claim.checkpoints[0].1.generation, 2);
}

#[test]
fn a_permanent_store_error_stops_without_committing() {
    let mut protocol = Protocol::new(config(false));
    assigned(&mut protocol, vec![fresh(0)]);
    let value = body(1, 1);
    protocol.handle(record(0, 0, 3, &value));
    let batch = write_of(&protocol.handle(Event::FlushTick { now_ms: NOW }));
    let failed = protocol.handle(Event::WriteFailed {
        flush: batch.flush,
        error: "schema mismatch".into(),
    });
    assert!(matches!(
        failed.as_slice(),
        [Command::Stop {
            error: ProtocolError::PermanentStoreError(_)
        }]
    ));
    assert!(protocol
        .handle(Event::Written { flush: batch.flush })
        .is_empty());
}

#[test]
fn shutdown_is_a_revoke_of_everything() {
    let mut protocol = Protocol::new(config(false));
    assigned(&mut protocol, vec![fresh(0), fresh(1)]);
    let value = body(1, 1);
    protocol.handle(record(1, 0, 3, &value));
    let commands = protocol.handle(Event::Shutdown);
    let batch = write_of(&commands);
    assert_eq!(batch.checkpoints.len(), 2);
    protocol.handle(Event::Written { flush: batch.flush });
    assert!(protocol.revoke_ready(&protocol.owned()));
    let settled = protocol.handle(Event::RevokeSettled {
        partitions: protocol.owned(),
    });
    assert_eq!(commit_of(&settled).unwrap().0.len(), 2);
    assert!(protocol.owned().is_empty());
    // No more flushes after a shutdown.
    assert!(protocol.handle(Event::FlushTick { now_ms: NOW }).is_empty());
}

fn marker(partition: i32, offset: i64, ts: i64, now_ms: i64) -> Event<'static> {
    Event::Record {
        record: Record {
            partition,
            offset,
            timestamp_ms: Some(ts),
            key: None,
            value: None,
            redriven_from: None,
            marker: true,
        },
        now_ms,
    }
}

fn markers_of(commands: &[Command]) -> Vec<(i32, i64)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::SendMarker {
                partition,
                timestamp_ms,
            } => Some((*partition, *timestamp_ms)),
            _ => None,
        })
        .collect()
}

#[test]
fn an_idle_partition_gets_a_marker_that_closes_its_windows_at_the_markers_offset() {
    let mut protocol = Protocol::new(ProtocolConfig {
        idle_markers: Some(IdleMarkers {
            idle_after_ms: 100,
            stamp_lag_ms: 50,
        }),
        ..config(false)
    });
    assigned(&mut protocol, vec![fresh(0), fresh(1)]);
    let value = body(1, 5);
    let ts = NOW - 1_000;
    assert!(protocol.handle(record(0, 0, ts, &value)).is_empty());
    let first = protocol.handle(Event::FlushTick { now_ms: NOW + 50 });
    assert!(markers_of(&first).is_empty(), "not idle yet");
    let batch = write_of(&first);
    let written = protocol.handle(Event::Written { flush: batch.flush });
    let (offsets, _) = commit_of(&written).expect("the first checkpoint's commit");
    let offsets = offsets.iter().map(|(p, c)| (*p, c.next_offset)).collect();
    protocol.handle(Event::CommitResult { offsets, ok: true });
    // Idle for 100 ms: a marker stamped 50 ms back, for the partition with an open
    // window only (partition 1 has none: nothing to close).
    let idle = protocol.handle(Event::FlushTick { now_ms: NOW + 100 });
    assert_eq!(markers_of(&idle), vec![(0, NOW + 50)]);
    assert_eq!(protocol.stats().markers_requested, 1);
    // At most one per idle period.
    let again = protocol.handle(Event::FlushTick { now_ms: NOW + 150 });
    assert!(markers_of(&again).is_empty());

    // The marker comes back through the log: no count, no letter, the window closes
    // at its offset and the commit moves past it.
    let read = protocol.handle(marker(0, 1, NOW + 50, NOW + 160));
    assert!(letters_of(&read).is_empty());
    assert_eq!(protocol.stats().markers, 1);
    assert_eq!(protocol.stats().counted, 1);
    let tick = protocol.handle(Event::FlushTick { now_ms: NOW + 170 });
    let batch = write_of(&tick);
    let row = batch
        .rows
        .iter()
        .find(|r| r.partition == 0)
        .expect("the row");
    assert!(
        row.is_final && row.through_offset == 1 && row.sum == 5,
        "{row:?}"
    );
    assert_eq!(
        batch
            .checkpoints
            .iter()
            .map(|(p, c)| (*p, c.next_offset))
            .collect::<Vec<_>>(),
        vec![(0, 2)]
    );
    // No open window left: no more markers however long the partition stays idle.
    let written = protocol.handle(Event::Written { flush: batch.flush });
    assert_eq!(
        commit_of(&written).map(|(offsets, _)| offsets[0].1.next_offset),
        Some(2)
    );
    let later = protocol.handle(Event::FlushTick {
        now_ms: NOW + 10_000,
    });
    assert!(markers_of(&later).is_empty());
}

#[test]
fn no_marker_when_it_would_close_nothing_or_markers_are_off() {
    let rule = IdleMarkers {
        idle_after_ms: 100,
        stamp_lag_ms: 5_000,
    };
    let mut protocol = Protocol::new(ProtocolConfig {
        idle_markers: Some(rule),
        ..config(false)
    });
    assigned(&mut protocol, vec![fresh(0)]);
    let value = body(1, 5);
    // The window ends after now - lag - grace: a marker stamped now - lag closes
    // nothing, so none is asked for (and none could make a newer record late).
    assert!(protocol.handle(record(0, 0, NOW - 10, &value)).is_empty());
    let tick = protocol.handle(Event::FlushTick { now_ms: NOW + 200 });
    assert!(markers_of(&tick).is_empty());
    // Once the lag has passed, it does.
    let tick = protocol.handle(Event::FlushTick {
        now_ms: NOW + 5_100,
    });
    assert_eq!(markers_of(&tick), vec![(0, NOW + 100)]);

    let mut off = Protocol::new(config(false));
    assigned(&mut off, vec![fresh(0)]);
    assert!(off.handle(record(0, 0, NOW - 10_000, &value)).is_empty());
    let tick = off.handle(Event::FlushTick {
        now_ms: NOW + 100_000,
    });
    assert!(markers_of(&tick).is_empty());
}

#[test]
fn freshness_counts_from_the_oldest_record_that_is_not_durable_yet() {
    let mut protocol = Protocol::new(config(false));
    assigned(&mut protocol, vec![fresh(0), fresh(1)]);
    assert_eq!(protocol.oldest_not_durable_ms(), None);
    let value = body(1, 5);
    let at = |partition, offset, now_ms| Event::Record {
        record: Record {
            partition,
            offset,
            timestamp_ms: Some(3),
            key: None,
            value: Some(&value),
            redriven_from: None,
            marker: false,
        },
        now_ms,
    };
    protocol.handle(at(0, 0, NOW));
    protocol.handle(at(1, 0, NOW + 300));
    assert_eq!(protocol.oldest_not_durable_ms(), Some(NOW));
    // Handed to the writer, not durable yet: still the oldest.
    let batch = write_of(&protocol.handle(Event::FlushTick {
        now_ms: NOW + 1_000,
    }));
    assert_eq!(protocol.oldest_not_durable_ms(), Some(NOW));
    protocol.handle(at(1, 1, NOW + 1_500));
    assert_eq!(protocol.oldest_not_durable_ms(), Some(NOW));
    // Durable: only what was counted after the flush began is left.
    protocol.handle(Event::Written { flush: batch.flush });
    assert_eq!(protocol.oldest_not_durable_ms(), Some(NOW + 1_500));
    let batch = write_of(&protocol.handle(Event::FlushTick {
        now_ms: NOW + 2_000,
    }));
    protocol.handle(Event::Written { flush: batch.flush });
    assert_eq!(protocol.oldest_not_durable_ms(), None);
}
