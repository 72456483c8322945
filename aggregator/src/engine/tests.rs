#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

const NOW_MS: i64 = 1_000_000;

fn key(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn config(window_ms: i64, grace_ms: i64) -> EngineConfig {
    EngineConfig::new(window_ms, grace_ms, 1_000).unwrap()
}

fn fresh(config: EngineConfig) -> PartitionEngine {
    PartitionEngine::new(config, 3, Resume::Checkpoint(Checkpoint::fresh(0)))
}

fn counted() -> RecordOutcome {
    RecordOutcome::Counted
}

fn rejected(reason: RejectReason) -> RecordOutcome {
    RecordOutcome::Rejected(reason)
}

/// Rows sorted for comparison (the hash tables iterate in a random order).
fn sorted(mut rows: Vec<WindowRow>) -> Vec<WindowRow> {
    rows.sort_by_key(|row| (row.window_start_ms, row.key, row.is_final));
    rows
}

fn row(
    key_n: u128,
    window: (i64, i64),
    sum: i64,
    count: i64,
    is_final: bool,
    through_offset: i64,
) -> WindowRow {
    WindowRow {
        key: key(key_n),
        window_start_ms: window.0,
        window_end_ms: window.1,
        partition: 3,
        sum,
        count,
        is_final,
        through_offset,
        generation: 0,
    }
}

// ---------------------------------------------------------------- configuration

#[test]
fn default_config_is_the_documented_one() {
    let config = EngineConfig::default();
    assert_eq!(config.window_ms, 10_000);
    assert_eq!(config.grace_ms, 2_000);
    assert_eq!(config.max_future_skew_ms, 300_000);
    assert_eq!(config.validate(), Ok(()));
}

#[test]
fn config_validation_refuses_unusable_values() {
    assert_eq!(
        EngineConfig::new(0, 0, 0),
        Err(EngineConfigError::NonPositiveWindow(0))
    );
    assert_eq!(
        EngineConfig::new(-5, 0, 0),
        Err(EngineConfigError::NonPositiveWindow(-5))
    );
    assert_eq!(
        EngineConfig::new(10, -1, 0),
        Err(EngineConfigError::NegativeGrace(-1))
    );
    assert_eq!(
        EngineConfig::new(10, 0, -1),
        Err(EngineConfigError::NegativeFutureSkew(-1))
    );
    assert!(EngineConfig::new(1, 0, 0).is_ok());
}

#[test]
fn engine_clamps_an_unvalidated_config() {
    let invalid = EngineConfig {
        window_ms: 0,
        grace_ms: -7,
        max_future_skew_ms: -1,
    };
    let engine = PartitionEngine::new(invalid, 0, Resume::Checkpoint(Checkpoint::fresh(0)));
    assert_eq!(
        engine.config(),
        EngineConfig {
            window_ms: 1,
            grace_ms: 0,
            max_future_skew_ms: 0
        }
    );
}

// ---------------------------------------------------------------- window math

#[test]
fn window_math_floors_and_is_half_open() {
    let config = config(10_000, 0);
    let window = |ts| config.window_containing(ts).map(|w| (w.start_ms, w.end_ms));
    assert_eq!(window(0), Some((0, 10_000)));
    assert_eq!(window(1), Some((0, 10_000)));
    assert_eq!(window(9_999), Some((0, 10_000)));
    assert_eq!(window(10_000), Some((10_000, 20_000)));
    assert_eq!(
        window(1_700_000_012_345),
        Some((1_700_000_010_000, 1_700_000_020_000))
    );
    // Negative times floor towards −∞ (div_euclid), not towards zero.
    assert_eq!(window(-1), Some((-10_000, 0)));
    assert_eq!(window(-10_000), Some((-10_000, 0)));
    assert_eq!(window(-10_001), Some((-20_000, -10_000)));
    // The lowest representable window start; below it there is no window.
    let lowest_start = i64::MIN / 10_000 * 10_000;
    assert_eq!(
        window(lowest_start),
        Some((lowest_start, lowest_start + 10_000))
    );
    assert_eq!(window(lowest_start - 1), None);
    assert_eq!(window(i64::MIN), None);
}

#[test]
fn window_math_at_the_top_of_the_range() {
    let config = config(10_000, 0);
    let last_full_start = (i64::MAX / 10_000 - 1) * 10_000;
    // The last window whose end fits.
    assert_eq!(
        config.window_containing(last_full_start + 9_999),
        Some(Window {
            start_ms: last_full_start,
            end_ms: last_full_start + 10_000
        })
    );
    // The window containing i64::MAX would end past it.
    assert_eq!(config.window_containing(last_full_start + 10_000), None);
    assert_eq!(config.window_containing(i64::MAX), None);
    // A one-millisecond window ending exactly at i64::MAX fits.
    let unit = EngineConfig::new(1, 0, 0).unwrap();
    assert_eq!(
        unit.window_containing(i64::MAX - 1),
        Some(Window {
            start_ms: i64::MAX - 1,
            end_ms: i64::MAX
        })
    );
    assert_eq!(unit.window_containing(i64::MAX), None);
    // Window length i64::MAX: only [0, MAX) exists for non-negative times.
    let huge = EngineConfig::new(i64::MAX, 0, 0).unwrap();
    assert_eq!(
        huge.window_containing(5),
        Some(Window {
            start_ms: 0,
            end_ms: i64::MAX
        })
    );
    assert_eq!(huge.window_containing(i64::MAX), None);
}

#[test]
fn boundary_rounding_saturates() {
    let config = config(10, 0);
    assert_eq!(config.boundary_at_or_after(0), 0);
    assert_eq!(config.boundary_at_or_after(1), 10);
    assert_eq!(config.boundary_at_or_after(10), 10);
    assert_eq!(config.boundary_at_or_after(-1), 0);
    assert_eq!(config.boundary_at_or_after(i64::MAX), i64::MAX);
}

// ---------------------------------------------------------------- decisions

#[test]
fn negative_timestamps_are_invalid() {
    let mut engine = fresh(config(10, 0));
    assert_eq!(
        engine.record(0, key(1), -1, 5, NOW_MS),
        rejected(RejectReason::InvalidTimestamp)
    );
    assert_eq!(
        engine.record(1, key(1), i64::MIN, 5, NOW_MS),
        rejected(RejectReason::InvalidTimestamp)
    );
    assert_eq!(engine.max_ts_ms(), None);
    assert_eq!(engine.next_offset(), 2);
    assert_eq!(engine.open_windows(), 0);
    assert_eq!(engine.record(2, key(1), 0, 5, NOW_MS), counted());
}

#[test]
fn future_timestamps_are_rejected_past_the_skew_only() {
    let mut engine = PartitionEngine::new(
        EngineConfig::new(10, 0, 100).unwrap(),
        0,
        Resume::Checkpoint(Checkpoint::fresh(0)),
    );
    assert_eq!(
        engine.record(0, key(1), 1_101, 1, 1_000),
        rejected(RejectReason::FutureTimestamp)
    );
    assert_eq!(
        engine.max_ts_ms(),
        None,
        "a future record must not move max_ts"
    );
    // Exactly at now + skew is still accepted.
    assert_eq!(engine.record(1, key(1), 1_100, 1, 1_000), counted());
    assert_eq!(engine.max_ts_ms(), Some(1_100));
    // A huge `now` does not overflow the comparison.
    assert_eq!(engine.record(2, key(1), 5_000, 1, i64::MAX), counted());
}

#[test]
fn unrepresentable_windows_are_invalid_after_the_future_check() {
    let mut engine = PartitionEngine::new(
        EngineConfig::new(10, 0, 0).unwrap(),
        0,
        Resume::Checkpoint(Checkpoint::fresh(0)),
    );
    // With a realistic clock a timestamp near i64::MAX is a future timestamp ...
    assert_eq!(
        engine.record(0, key(1), i64::MAX, 1, NOW_MS),
        rejected(RejectReason::FutureTimestamp)
    );
    // ... and when the clock allows it, its window end does not fit: invalid.
    assert_eq!(
        engine.record(1, key(1), i64::MAX, 1, i64::MAX),
        rejected(RejectReason::InvalidTimestamp)
    );
    assert_eq!(engine.max_ts_ms(), None);
    let last_start = (i64::MAX / 10 - 1) * 10;
    assert_eq!(
        engine.record(2, key(1), last_start + 9, 1, i64::MAX),
        counted()
    );
}

#[test]
fn a_window_closes_exactly_when_the_watermark_reaches_its_end() {
    let mut engine = fresh(config(10_000, 2_000));
    assert_eq!(engine.record(0, key(1), 5_000, 1, NOW_MS), counted());
    // watermark 9_999 < end 10_000: still open, still countable.
    assert_eq!(engine.record(1, key(2), 11_999, 1, NOW_MS), counted());
    assert_eq!(engine.watermark_ms(), Some(9_999));
    assert_eq!(engine.open_window_groups(), 2);
    assert_eq!(engine.record(2, key(1), 9_999, 1, NOW_MS), counted());
    // watermark 10_000 == end: closes, on behalf of offset 3.
    assert_eq!(engine.record(3, key(2), 12_000, 1, NOW_MS), counted());
    assert_eq!(engine.watermark_ms(), Some(10_000));
    assert_eq!(engine.open_window_groups(), 1);
    assert_eq!(
        engine.record(4, key(1), 9_999, 1, NOW_MS),
        rejected(RejectReason::Late)
    );
    assert_eq!(engine.record(5, key(1), 10_000, 1, NOW_MS), counted());
    let flush = engine.flush();
    assert_eq!(
        sorted(flush.rows),
        vec![
            row(1, (0, 10_000), 2, 2, true, 3),
            row(1, (10_000, 20_000), 1, 1, false, 5),
            row(2, (10_000, 20_000), 2, 2, false, 5),
        ]
    );
}

#[test]
fn grace_zero_closes_a_window_at_the_first_record_of_the_next() {
    let mut engine = fresh(config(10, 0));
    assert_eq!(engine.record(0, key(1), 9, 1, NOW_MS), counted());
    assert_eq!(engine.open_window_groups(), 1);
    assert_eq!(engine.record(1, key(1), 10, 1, NOW_MS), counted());
    assert_eq!(engine.open_window_groups(), 1);
    assert_eq!(
        engine.record(2, key(1), 9, 1, NOW_MS),
        rejected(RejectReason::Late)
    );
    assert_eq!(
        sorted(engine.flush().rows),
        vec![
            row(1, (0, 10), 1, 1, true, 1),
            row(1, (10, 20), 1, 1, false, 2)
        ]
    );
}

#[test]
fn late_is_decided_by_the_window_end_not_the_record_time() {
    let mut engine = fresh(config(10, 5));
    assert_eq!(engine.record(0, key(1), 24, 1, NOW_MS), counted());
    // watermark 19: window [10, 20) is open although 12 < 19.
    assert_eq!(engine.record(1, key(1), 12, 1, NOW_MS), counted());
    // window [0, 10) ended before the watermark: late.
    assert_eq!(
        engine.record(2, key(1), 9, 1, NOW_MS),
        rejected(RejectReason::Late)
    );
}

#[test]
fn rejected_records_never_move_max_ts_or_count() {
    let mut engine = fresh(config(10, 0));
    assert_eq!(engine.record(0, key(1), 15, i64::MAX, NOW_MS), counted());
    assert_eq!(
        engine.record(1, key(1), 3, 1, NOW_MS),
        rejected(RejectReason::Late)
    );
    assert_eq!(
        engine.record(2, key(1), 19, 1, NOW_MS),
        rejected(RejectReason::SumOverflow)
    );
    assert_eq!(
        engine.record(3, key(1), NOW_MS + 5_000, 1, NOW_MS),
        rejected(RejectReason::FutureTimestamp)
    );
    assert_eq!(
        engine.record(4, key(1), -3, 1, NOW_MS),
        rejected(RejectReason::InvalidTimestamp)
    );
    engine.skip(5);
    assert_eq!(engine.max_ts_ms(), Some(15));
    assert_eq!(engine.next_offset(), 6);
    assert_eq!(
        engine.flush().rows,
        vec![row(1, (10, 20), i64::MAX, 1, false, 5)]
    );
}

#[test]
fn overflow_is_per_key_window_and_negative_overflow_counts_too() {
    let mut engine = fresh(config(10, 0));
    assert_eq!(engine.record(0, key(1), 1, i64::MAX - 1, NOW_MS), counted());
    assert_eq!(engine.record(1, key(1), 2, 1, NOW_MS), counted());
    assert_eq!(
        engine.record(2, key(1), 3, 1, NOW_MS),
        rejected(RejectReason::SumOverflow)
    );
    // Another key in the same window, and the same key in the next window, are fine.
    assert_eq!(engine.record(3, key(2), 4, i64::MAX, NOW_MS), counted());
    assert_eq!(engine.record(4, key(1), 11, i64::MAX, NOW_MS), counted());
    // The engine does not assume positive values.
    assert_eq!(engine.record(5, key(3), 12, i64::MIN, NOW_MS), counted());
    assert_eq!(
        engine.record(6, key(3), 13, -1, NOW_MS),
        rejected(RejectReason::SumOverflow)
    );
    assert_eq!(
        sorted(engine.flush().rows),
        vec![
            row(1, (0, 10), i64::MAX, 2, true, 4),
            row(2, (0, 10), i64::MAX, 1, true, 4),
            row(1, (10, 20), i64::MAX, 1, false, 6),
            row(3, (10, 20), i64::MIN, 1, false, 6),
        ]
    );
}

#[test]
fn decision_order_timestamp_checks_before_late_before_already_final() {
    // Restored: windows ending ≤ 100 are final; max_ts 95 (watermark 95 with grace 0).
    let resume = Resume::Checkpoint(Checkpoint {
        next_offset: 10,
        max_ts_ms: Some(95),
        closed_through_ms: Some(100),
        generation: 0,
        settings: None,
        external_reset: false,
    });
    let mut engine = PartitionEngine::new(config(10, 0), 0, resume);
    // Negative: invalid, even though its window is also closed and final.
    assert_eq!(
        engine.record(10, key(1), -5, 1, NOW_MS),
        rejected(RejectReason::InvalidTimestamp)
    );
    // Window [80, 90) ends ≤ watermark and ≤ closed_through: late wins, as in the live run.
    assert_eq!(
        engine.record(11, key(1), 85, 1, NOW_MS),
        rejected(RejectReason::Late)
    );
    // Window [90, 100) ends after the watermark but ≤ closed_through: already final.
    assert_eq!(
        engine.record(12, key(1), 91, 1, NOW_MS),
        RecordOutcome::AlreadyFinal
    );
    assert_eq!(engine.max_ts_ms(), Some(95), "91 < 95 does not move it");
    assert_eq!(
        engine.record(13, key(1), 99, i64::MAX, NOW_MS),
        RecordOutcome::AlreadyFinal
    );
    assert_eq!(
        engine.max_ts_ms(),
        Some(99),
        "already-final records move max_ts"
    );
    assert_eq!(engine.record(14, key(1), 100, 1, NOW_MS), counted());
    assert_eq!(engine.open_windows(), 1);
}

#[test]
fn already_final_records_move_max_ts_for_later_lateness() {
    // Restored with no max_ts (e.g. a replay boundary): [20, 30) and earlier are final.
    let resume = Resume::Checkpoint(Checkpoint {
        next_offset: 0,
        max_ts_ms: None,
        closed_through_ms: Some(30),
        generation: 0,
        settings: None,
        external_reset: false,
    });
    let mut engine = PartitionEngine::new(config(10, 5), 3, resume);
    assert_eq!(
        engine.record(0, key(1), 29, 1, NOW_MS),
        RecordOutcome::AlreadyFinal
    );
    assert_eq!(engine.max_ts_ms(), Some(29));
    // The run that counted 29 judged [10, 20) late from then on; so does the replay.
    assert_eq!(
        engine.record(1, key(1), 19, 1, NOW_MS),
        rejected(RejectReason::Late)
    );
    assert_eq!(engine.record(2, key(1), 31, 1, NOW_MS), counted());
    assert_eq!(
        engine.record(3, key(2), 22, 1, NOW_MS),
        RecordOutcome::AlreadyFinal
    );
    assert_eq!(engine.max_ts_ms(), Some(31));
    assert_eq!(engine.record(4, key(2), 45, 1, NOW_MS), counted());
    assert_eq!(
        sorted(engine.flush().rows),
        vec![
            row(1, (30, 40), 1, 1, true, 4),
            row(2, (40, 50), 1, 1, false, 4),
        ]
    );
}

#[test]
fn redelivered_offsets_are_ignored() {
    let mut engine = fresh(config(10, 0));
    assert_eq!(engine.record(5, key(1), 1, 1, NOW_MS), counted());
    assert_eq!(
        engine.record(5, key(1), 1, 1, NOW_MS),
        RecordOutcome::AlreadyFinal
    );
    assert_eq!(
        engine.record(2, key(1), 1, 1, NOW_MS),
        RecordOutcome::AlreadyFinal
    );
    engine.skip(3);
    assert_eq!(engine.next_offset(), 6);
    assert_eq!(engine.flush().rows, vec![row(1, (0, 10), 1, 1, false, 5)]);
}

// ---------------------------------------------------------------- flushing

#[test]
fn flush_writes_only_changed_open_cells() {
    let mut engine = fresh(config(10, 100));
    engine.record(0, key(1), 1, 10, NOW_MS);
    engine.record(1, key(2), 2, 20, NOW_MS);
    engine.record(2, key(1), 12, 5, NOW_MS);
    assert_eq!(
        sorted(engine.flush().rows),
        vec![
            row(1, (0, 10), 10, 1, false, 2),
            row(2, (0, 10), 20, 1, false, 2),
            row(1, (10, 20), 5, 1, false, 2),
        ]
    );
    assert_eq!(engine.flush().rows, vec![], "nothing changed");
    engine.skip(3);
    assert_eq!(engine.flush().rows, vec![], "a skip changes no cell");
    engine.record(4, key(2), 3, 1, NOW_MS);
    engine.skip(5);
    assert_eq!(
        engine.flush().rows,
        vec![row(2, (0, 10), 21, 2, false, 5)],
        "only the changed cell, through the last processed offset"
    );
    assert_eq!(engine.open_windows(), 3);
    assert_eq!(engine.open_window_groups(), 2);
}

#[test]
fn closing_emits_every_cell_final_even_if_already_flushed() {
    let mut engine = fresh(config(10, 0));
    engine.record(0, key(1), 1, 10, NOW_MS);
    engine.record(1, key(2), 2, 20, NOW_MS);
    assert_eq!(engine.flush().rows.len(), 2);
    engine.record(2, key(2), 3, 1, NOW_MS);
    engine.skip(3);
    engine.record(4, key(3), 25, 7, NOW_MS);
    assert_eq!(engine.open_windows(), 1);
    assert_eq!(
        sorted(engine.flush().rows),
        vec![
            row(1, (0, 10), 10, 1, true, 4),
            row(2, (0, 10), 21, 2, true, 4),
            row(3, (20, 30), 7, 1, false, 4),
        ]
    );
}

#[test]
fn final_rows_carry_the_closing_offset_whatever_the_flush_timing() {
    let records = [
        (0, 1, 5),
        (1, 2, 7),
        (2, 1, 13),
        (3, 1, 14),
        (4, 2, 27),
        (5, 1, 29),
    ];
    let final_rows = |flush_after: &[i64]| {
        let mut engine = fresh(config(10, 2));
        let mut rows = Vec::new();
        for &(offset, key_n, ts) in &records {
            engine.record(offset, key(key_n), ts, 1, NOW_MS);
            if flush_after.contains(&offset) {
                rows.extend(engine.flush().rows);
            }
        }
        rows.extend(engine.flush().rows);
        sorted(rows.into_iter().filter(|row| row.is_final).collect())
    };
    let expected = vec![
        row(1, (0, 10), 1, 1, true, 2),
        row(2, (0, 10), 1, 1, true, 2),
        row(1, (10, 20), 2, 2, true, 4),
    ];
    assert_eq!(final_rows(&[]), expected);
    assert_eq!(final_rows(&[0, 1, 2, 3, 4, 5]), expected);
    assert_eq!(final_rows(&[3]), expected);
}

#[test]
fn unflushed_since_tracks_the_first_counted_record_after_a_flush() {
    let mut engine = fresh(config(10, 0));
    assert_eq!(engine.unflushed_since_ms(), None);
    engine.record(0, key(1), -1, 1, 100);
    engine.skip(1);
    assert_eq!(engine.unflushed_since_ms(), None, "nothing counted");
    engine.record(2, key(1), 1, 1, 200);
    engine.record(3, key(1), 2, 1, 300);
    assert_eq!(engine.unflushed_since_ms(), Some(200));
    engine.flush();
    assert_eq!(engine.unflushed_since_ms(), None);
    engine.record(4, key(1), 3, 1, 400);
    assert_eq!(engine.unflushed_since_ms(), Some(400));
}

#[test]
fn heap_bytes_grow_with_open_windows_and_are_released_at_flush() {
    let mut engine = fresh(config(10, 0));
    assert_eq!(engine.approx_heap_bytes(), 0);
    for n in 0..1_000 {
        engine.record(n, key(n as u128), 1, 1, NOW_MS);
    }
    let loaded = engine.approx_heap_bytes();
    assert!(loaded >= 1_000 * 33, "{loaded} bytes for 1000 key-windows");
    assert!(loaded <= 1_000 * 100, "{loaded} bytes for 1000 key-windows");
    engine.record(1_000, key(0), 15, 1, NOW_MS);
    assert_eq!(engine.open_windows(), 1);
    assert!(
        engine.approx_heap_bytes() >= loaded,
        "closed, not yet flushed"
    );
    assert_eq!(engine.flush().rows.len(), 1_001);
    assert!(engine.approx_heap_bytes() < loaded / 10);
}

// ---------------------------------------------------------------- checkpoints

#[test]
fn checkpoint_of_an_empty_engine_is_its_resume_state() {
    let restored = Checkpoint {
        next_offset: 42,
        max_ts_ms: Some(1_234),
        closed_through_ms: Some(1_000),
        generation: 7,
        settings: Some(config(10, 500).sum_settings()),
        external_reset: false,
    };
    let mut engine = PartitionEngine::new(config(10, 500), 0, Resume::Checkpoint(restored));
    assert_eq!(engine.flush().checkpoint, Some(restored));
    let mut fresh_engine = fresh(config(10, 0));
    assert_eq!(
        fresh_engine.flush().checkpoint,
        Some(Checkpoint {
            settings: Some(config(10, 0).sum_settings()),
            external_reset: false,
            ..Checkpoint::fresh(0)
        })
    );
}

#[test]
fn checkpoint_resumes_at_the_earliest_open_window_by_offset() {
    let mut engine = fresh(config(10, 10));
    engine.skip(0);
    engine.record(1, key(1), 25, 1, NOW_MS); // opens [20, 30) at 1, max_ts before: None
    engine.record(2, key(1), 17, 1, NOW_MS); // opens [10, 20) at 2, max_ts before: 25
    engine.record(3, key(2), 28, 1, NOW_MS);
    let checkpoint = engine.flush().checkpoint.unwrap();
    assert_eq!(
        checkpoint,
        Checkpoint {
            next_offset: 1,
            max_ts_ms: None,
            closed_through_ms: Some(18),
            generation: 0,
            settings: Some(engine.config().sum_settings()),
            external_reset: false,
        },
        "the earliest window in time ([10, 20)) is not the earliest by offset"
    );
    // [10, 20) closes at 30; [20, 30) is still the earliest by offset.
    engine.record(4, key(1), 30, 1, NOW_MS);
    assert_eq!(engine.flush().checkpoint.unwrap().next_offset, 1);
    // [20, 30) closes at 40; [30, 40) opened at offset 4 after max_ts 28.
    engine.record(5, key(1), 40, 1, NOW_MS);
    assert_eq!(
        engine.flush().checkpoint.unwrap(),
        Checkpoint {
            next_offset: 4,
            max_ts_ms: Some(28),
            closed_through_ms: Some(30),
            generation: 0,
            settings: Some(engine.config().sum_settings()),
            external_reset: false,
        }
    );
    // Everything closed: resume after the last record with the current max_ts.
    engine.record(6, key(1), 100, 1, NOW_MS);
    engine.skip(7);
    engine.flush();
    engine.record(8, key(1), 5, 1, NOW_MS); // late
    let flush = engine.flush();
    assert_eq!(flush.rows, vec![]);
    assert_eq!(
        flush.checkpoint.unwrap(),
        Checkpoint {
            next_offset: 6,
            max_ts_ms: Some(40),
            closed_through_ms: Some(90),
            generation: 0,
            settings: Some(engine.config().sum_settings()),
            external_reset: false,
        }
    );
}

#[test]
fn checkpoint_keeps_a_restored_boundary_above_the_watermark() {
    let resume = Resume::Checkpoint(Checkpoint {
        next_offset: 0,
        max_ts_ms: Some(10),
        closed_through_ms: Some(50),
        generation: 2,
        settings: None,
        external_reset: false,
    });
    let mut engine = PartitionEngine::new(config(10, 0), 0, resume);
    engine.record(0, key(1), 55, 1, NOW_MS);
    let flush = engine.flush();
    assert_eq!(flush.rows[0].generation, 2);
    assert_eq!(
        flush.checkpoint.unwrap(),
        Checkpoint {
            next_offset: 0,
            max_ts_ms: Some(10),
            closed_through_ms: Some(55),
            generation: 2,
            settings: Some(engine.config().sum_settings()),
            external_reset: false,
        }
    );
}

/// Runs `records` (offset, key, ts, value; value 0 = poison) through an engine
/// resumed from `resume`, flushing after every offset in `flush_after` and at the
/// end; returns every outcome, every row and every checkpoint.
#[allow(clippy::type_complexity)]
fn run(
    config: EngineConfig,
    resume: Resume,
    records: &[(i64, u128, i64, i64)],
    flush_after: &[i64],
) -> (
    Vec<(i64, Option<RecordOutcome>)>,
    Vec<WindowRow>,
    Vec<(i64, Option<Checkpoint>)>,
) {
    let mut engine = PartitionEngine::new(config, 3, resume);
    let (mut outcomes, mut rows, mut checkpoints) = (Vec::new(), Vec::new(), Vec::new());
    for &(offset, key_n, ts, value) in records {
        if offset < engine.next_offset() {
            continue;
        }
        if value == 0 {
            engine.skip(offset);
            outcomes.push((offset, None));
        } else {
            outcomes.push((
                offset,
                Some(engine.record(offset, key(key_n), ts, value, NOW_MS)),
            ));
        }
        if flush_after.contains(&offset) {
            let flush = engine.flush();
            rows.extend(flush.rows);
            checkpoints.push((offset, flush.checkpoint));
        }
    }
    let flush = engine.flush();
    rows.extend(flush.rows);
    checkpoints.push((i64::MAX, flush.checkpoint));
    (outcomes, rows, checkpoints)
}

#[test]
fn resuming_from_any_checkpoint_decides_as_the_live_run() {
    let config = config(10, 4);
    let records: Vec<(i64, u128, i64, i64)> = vec![
        (0, 1, 3, 1),
        (1, 2, 8, 2),
        (2, 1, 12, 3),
        (3, 1, 0, 0),
        (4, 2, 6, 4),  // within grace of 12: counted into [0, 10)
        (5, 1, 15, 5), // closes [0, 10)
        (6, 2, 9, 6),  // late
        (7, 2, 11, i64::MAX),
        (8, 2, 19, 1),  // overflow in [10, 20), later than max_ts
        (9, 2, 24, 7),  // closes [10, 20)
        (10, 1, 18, 8), // late
        (12, 2, 21, 9),
        (13, 1, 34, 10), // closes [20, 30)
        (14, 2, 31, 11),
    ];
    let all_offsets: Vec<i64> = records.iter().map(|r| r.0).collect();
    let (live_outcomes, live_rows, checkpoints) = run(
        config,
        Resume::Checkpoint(Checkpoint::fresh(0)),
        &records,
        &all_offsets,
    );
    let live_final: Vec<WindowRow> = sorted(live_rows.into_iter().filter(|r| r.is_final).collect());
    assert_eq!(live_final.len(), 5);
    for (after, checkpoint) in checkpoints {
        let checkpoint = checkpoint.unwrap();
        let (outcomes, rows, _) = run(config, Resume::Checkpoint(checkpoint), &records, &[]);
        for (offset, outcome) in outcomes {
            let live = live_outcomes.iter().find(|(o, _)| *o == offset).unwrap().1;
            let consistent = outcome == live
                || (outcome == Some(RecordOutcome::AlreadyFinal)
                    && live.is_some_and(|l| {
                        l == counted() || l == rejected(RejectReason::SumOverflow)
                    }));
            assert!(
                consistent,
                "after {after}: offset {offset} live {live:?} replay {outcome:?}"
            );
        }
        // Windows final at the checkpoint are not rewritten; the others are rebuilt
        // to the same final rows.
        for replayed in rows.iter().filter(|r| r.is_final) {
            assert!(live_final.contains(replayed), "after {after}: {replayed:?}");
            let closed_through = checkpoint.closed_through_ms.unwrap_or(i64::MIN);
            assert!(replayed.window_end_ms > closed_through);
        }
        for live in &live_final {
            let closed_through = checkpoint.closed_through_ms.unwrap_or(i64::MIN);
            if live.window_end_ms > closed_through {
                assert!(rows.contains(live), "after {after}: missing {live:?}");
            }
        }
    }
}

// ---------------------------------------------------------------- external reset

#[test]
fn external_reset_freezes_windows_up_to_the_anchor_plus_grace() {
    let resume = Resume::ExternalReset {
        next_offset: 100,
        generation: 4,
    };
    let mut engine = PartitionEngine::new(config(10, 3), 3, resume);
    assert_eq!(engine.flush().checkpoint, None, "nothing committable yet");
    engine.skip(100);
    assert_eq!(
        engine.record(101, key(1), -1, 1, NOW_MS),
        rejected(RejectReason::InvalidTimestamp)
    );
    assert_eq!(
        engine.record(102, key(1), NOW_MS + 10_000, 1, NOW_MS),
        rejected(RejectReason::FutureTimestamp)
    );
    assert_eq!(engine.flush().checkpoint, None, "still no anchor");
    assert_eq!(engine.closed_through_ms(), None);
    // The anchor: window [20, 30) + grace 3 reaches 33 → frozen through 40.
    assert_eq!(
        engine.record(103, key(1), 27, 1, NOW_MS),
        RecordOutcome::AlreadyFinal
    );
    assert_eq!(engine.closed_through_ms(), Some(40));
    assert_eq!(engine.max_ts_ms(), Some(27));
    // [30, 40) may hold records from before the reset offset: frozen.
    assert_eq!(
        engine.record(104, key(1), 31, 1, NOW_MS),
        RecordOutcome::AlreadyFinal
    );
    assert_eq!(engine.record(105, key(1), 40, 1, NOW_MS), counted());
    // Earlier frozen windows are late or already final, never counted.
    assert_eq!(
        engine.record(106, key(1), 5, 1, NOW_MS),
        rejected(RejectReason::Late)
    );
    let flush = engine.flush();
    assert_eq!(
        flush.rows,
        vec![WindowRow {
            generation: 4,
            ..row(1, (40, 50), 1, 1, false, 106)
        }]
    );
    assert_eq!(
        flush.checkpoint,
        Some(Checkpoint {
            next_offset: 105,
            max_ts_ms: Some(31),
            closed_through_ms: Some(40),
            generation: 4,
            settings: Some(engine.config().sum_settings()),
            external_reset: false,
        })
    );
}

#[test]
fn external_reset_with_grace_zero_freezes_only_the_anchor_window() {
    let resume = Resume::ExternalReset {
        next_offset: 0,
        generation: 1,
    };
    let mut engine = PartitionEngine::new(config(10, 0), 3, resume);
    assert_eq!(
        engine.record(0, key(1), 20, 1, NOW_MS),
        RecordOutcome::AlreadyFinal
    );
    assert_eq!(engine.closed_through_ms(), Some(30));
    assert_eq!(engine.record(1, key(1), 30, 1, NOW_MS), counted());
}

#[test]
fn external_reset_anchor_on_a_boundary_with_grace_a_multiple_of_the_window() {
    let resume = Resume::ExternalReset {
        next_offset: 0,
        generation: 1,
    };
    let mut engine = PartitionEngine::new(config(10, 20), 3, resume);
    engine.record(0, key(1), 10, 1, NOW_MS);
    // [10, 20) end 20 + grace 20 = 40, already a boundary.
    assert_eq!(engine.closed_through_ms(), Some(40));
    assert_eq!(
        engine.record(1, key(1), 39, 1, NOW_MS),
        RecordOutcome::AlreadyFinal
    );
    assert_eq!(engine.record(2, key(1), 40, 1, NOW_MS), counted());
}

#[test]
fn external_reset_replay_from_its_own_checkpoint_is_deterministic() {
    let config = config(10, 5);
    let records: Vec<(i64, u128, i64, i64)> = vec![
        (50, 1, 0, 0),
        (51, 1, 33, 1), // anchor: [30, 40) + grace 5 → frozen through 50
        (52, 2, 38, 2), // frozen
        (53, 1, 51, 3), // opens [50, 60)
        (54, 2, 55, 4),
        (55, 1, 62, 5), // opens [60, 70)
        (56, 2, 53, 6), // within grace
        (57, 1, 66, 7), // closes [50, 60)
        (58, 2, 49, 8), // late
        (59, 1, 68, 9),
    ];
    let resume = Resume::ExternalReset {
        next_offset: 50,
        generation: 9,
    };
    let offsets: Vec<i64> = records.iter().map(|r| r.0).collect();
    let (live_outcomes, live_rows, checkpoints) = run(config, resume, &records, &offsets);
    assert_eq!(checkpoints[0], (50, None));
    let live_final: Vec<WindowRow> = sorted(live_rows.into_iter().filter(|r| r.is_final).collect());
    assert_eq!(live_final.len(), 2);
    assert!(live_final
        .iter()
        .all(|r| r.generation == 9 && r.through_offset == 57 && r.window_start_ms == 50));
    for (after, checkpoint) in checkpoints.into_iter().skip(1) {
        let checkpoint = checkpoint.unwrap();
        assert_eq!(checkpoint.generation, 9);
        let (outcomes, rows, _) = run(config, Resume::Checkpoint(checkpoint), &records, &[]);
        for (offset, outcome) in outcomes {
            let live = live_outcomes.iter().find(|(o, _)| *o == offset).unwrap().1;
            assert!(
                outcome == live
                    || (outcome == Some(RecordOutcome::AlreadyFinal) && live == Some(counted())),
                "after {after}: offset {offset} live {live:?} replay {outcome:?}"
            );
        }
        for replayed in rows.iter().filter(|r| r.is_final) {
            assert!(live_final.contains(replayed), "after {after}: {replayed:?}");
        }
    }
}
