//! Planning `tally replay` (shared with the aggregator's resume rules).
//!
//! `--from TIME` rebuilds, per partition, every window from TIME's window start `T`
//! on, with a new generation so the rebuilt rows win. Let `c` be where the group
//! stands (resolved by [`super::resume::decide`], exactly as an aggregator would
//! resume: commit metadata, else the store checkpoint, …) and `target` the first
//! offset whose event time is ≥ `T`:
//! - `c ≤ target` (the group has not read that far): keep the group's position and
//!   state, only raise the generation. Resuming from `c` decides exactly as the live
//!   run did, and every window from `T` on has all its records at or after `target`.
//! - `c > target`: resume at `target` with no event-time history and the closed-through
//!   boundary `min(T, closed(c))`: windows final at `c` stay as they are; a window
//!   before `T` that was still open at `c` is rebuilt too, which is complete because
//!   every record of a window open at `c` is at or after `c`. (Freezing everything
//!   before `T` would leave such a window provisional, and short, forever.)
//!
//! A settings change (`--window`/`--grace`) applies from `T` on and needs every window
//! before `T` to be final already (rebuilding one with the new window size would mix
//! two sizes in one epoch); all partitions then share one generation, which the new
//! settings epoch records so readers can tell stale rows of the old settings.
//!
//! `--from-offset P:O` commits offsets without Tally state, exactly like Kafka's own
//! reset tools: the aggregator treats it as an external reset (see
//! [`crate::engine::Resume::ExternalReset`]).

use tally_schemas::{Checkpoint, PinnedSettings, SettingsError, SumSettings};

use super::resume::ResumeDecision;
use crate::engine::Resume;

/// What the replay knows about one partition before planning.
#[derive(Debug, Clone, Copy)]
pub struct PartitionPosition {
    pub partition: i32,
    /// Where the group stands, as the aggregator would resume.
    pub current: ResumeDecision,
    /// The highest generation the store has seen for the partition.
    pub latest_generation: Option<u16>,
    /// The first offset whose event time is at or after the replay's window start
    /// (the partition's end offset if there is none).
    pub target: i64,
}

/// What to commit for a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlannedCommit {
    /// Commit at `checkpoint.next_offset` with Tally metadata (and save the
    /// checkpoint row in the store first).
    Checkpoint(Checkpoint),
    /// Commit this offset without metadata: an external reset.
    WithoutState(i64),
}

impl PlannedCommit {
    pub fn offset(&self) -> i64 {
        match self {
            PlannedCommit::Checkpoint(checkpoint) => checkpoint.next_offset,
            PlannedCommit::WithoutState(offset) => *offset,
        }
    }
}

/// A replay plan: per-partition commits and, for a settings change, the new
/// settings history to pin in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayPlan {
    pub commits: Vec<(i32, PlannedCommit)>,
    pub pinned: Option<PinnedSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("partition {partition}: the replay generation would overflow")]
    GenerationOverflow { partition: i32 },
    #[error(
        "partition {partition}: windows before the settings change are not all final yet \
         (final through {closed_through:?}); choose an earlier --from, or let the aggregators \
         run until the watermark passes it"
    )]
    NotFinalBeforeChange {
        partition: i32,
        closed_through: Option<i64>,
    },
    #[error(
        "partition {partition}: the group's position has no Tally state (an external offset \
         reset), so a settings change cannot know which windows are final; run the \
         aggregators first or replay without changing settings"
    )]
    UnknownStateForChange { partition: i32 },
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("{0:?}: expected PARTITION:OFFSET with a non-negative offset")]
    BadOffsetItem(String),
}

/// Plans `--from` with window start `window_start_ms`. `settings` are the settings
/// the store pins now; `change` the new ones, if the replay changes them.
pub fn plan_from_time(
    window_start_ms: i64,
    positions: &[PartitionPosition],
    pinned: &PinnedSettings,
    change: Option<SumSettings>,
) -> Result<ReplayPlan, ReplayError> {
    let settings = change.unwrap_or_else(|| pinned.current().settings());
    // A settings change gives every partition one generation (the epoch's).
    let shared_generation = match change {
        Some(_) => {
            let mut highest = 0u16;
            for position in positions {
                highest = highest.max(base_generation(position));
            }
            Some(
                highest
                    .checked_add(1)
                    .ok_or(ReplayError::GenerationOverflow {
                        partition: positions.first().map_or(0, |p| p.partition),
                    })?,
            )
        }
        None => None,
    };
    let mut commits = Vec::with_capacity(positions.len());
    for position in positions {
        let partition = position.partition;
        let generation = match shared_generation {
            Some(generation) => generation,
            None => base_generation(position)
                .checked_add(1)
                .ok_or(ReplayError::GenerationOverflow { partition })?,
        };
        let commit = match position.current.resume {
            Resume::Checkpoint(current) => {
                if change.is_some()
                    && current
                        .closed_through_ms
                        .is_none_or(|closed| closed < window_start_ms)
                {
                    return Err(ReplayError::NotFinalBeforeChange {
                        partition,
                        closed_through: current.closed_through_ms,
                    });
                }
                if current.next_offset <= position.target {
                    PlannedCommit::Checkpoint(Checkpoint {
                        generation,
                        settings: Some(settings),
                        external_reset: false,
                        ..current
                    })
                } else {
                    PlannedCommit::Checkpoint(Checkpoint {
                        next_offset: position.target,
                        max_ts_ms: None,
                        closed_through_ms: current
                            .closed_through_ms
                            .map(|closed| closed.min(window_start_ms)),
                        generation,
                        settings: Some(settings),
                        external_reset: false,
                    })
                }
            }
            Resume::ExternalReset { next_offset, .. } => {
                if change.is_some() {
                    return Err(ReplayError::UnknownStateForChange { partition });
                }
                if next_offset <= position.target {
                    // Still an external reset there; the aggregator picks a new generation.
                    PlannedCommit::WithoutState(next_offset)
                } else {
                    // Nothing is known of the windows before T: keep them all.
                    PlannedCommit::Checkpoint(Checkpoint {
                        next_offset: position.target,
                        max_ts_ms: None,
                        closed_through_ms: Some(window_start_ms),
                        generation,
                        settings: Some(settings),
                        external_reset: false,
                    })
                }
            }
        };
        commits.push((partition, commit));
    }
    commits.sort_by_key(|(partition, _)| *partition);
    let pinned = match (change, shared_generation) {
        (Some(new), Some(generation)) => {
            Some(pinned.changed_from(window_start_ms, new, generation)?)
        }
        _ => None,
    };
    Ok(ReplayPlan { commits, pinned })
}

/// Parses `--from-offset` items `PARTITION:OFFSET`; each becomes a commit without
/// Tally state (an external reset).
pub fn plan_from_offsets(items: &[String]) -> Result<ReplayPlan, ReplayError> {
    let mut commits = Vec::with_capacity(items.len());
    for item in items {
        let bad = || ReplayError::BadOffsetItem(item.clone());
        let (partition, offset) = item.split_once(':').ok_or_else(bad)?;
        let partition: i32 = partition.trim().parse().map_err(|_| bad())?;
        let offset: i64 = offset.trim().parse().map_err(|_| bad())?;
        if offset < 0 || partition < 0 {
            return Err(bad());
        }
        commits.push((partition, PlannedCommit::WithoutState(offset)));
    }
    commits.sort_by_key(|(partition, _)| *partition);
    commits.dedup_by_key(|(partition, _)| *partition);
    Ok(ReplayPlan {
        commits,
        pinned: None,
    })
}

fn base_generation(position: &PartitionPosition) -> u16 {
    position
        .current
        .generation()
        .max(position.latest_generation.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::protocol::resume::{ResumeSource, StartAt};

    const TEN_S: SumSettings = SumSettings {
        window_ms: 10,
        grace_ms: 2,
    };

    fn at(checkpoint: Checkpoint) -> ResumeDecision {
        ResumeDecision {
            resume: Resume::Checkpoint(checkpoint),
            start: StartAt::Offset(checkpoint.next_offset),
            source: ResumeSource::CommitMetadata,
        }
    }

    fn state(next_offset: i64, closed: Option<i64>, generation: u16) -> Checkpoint {
        Checkpoint {
            next_offset,
            max_ts_ms: Some(55),
            closed_through_ms: closed,
            generation,
            settings: Some(TEN_S),
            external_reset: false,
        }
    }

    fn pinned() -> PinnedSettings {
        PinnedSettings::new(TEN_S).unwrap()
    }

    #[test]
    fn a_group_behind_the_target_keeps_its_state_with_a_new_generation() {
        let current = state(10, Some(30), 2);
        let plan = plan_from_time(
            40,
            &[PartitionPosition {
                partition: 0,
                current: at(current),
                latest_generation: Some(3),
                target: 25,
            }],
            &pinned(),
            None,
        )
        .unwrap();
        assert_eq!(
            plan.commits,
            vec![(
                0,
                PlannedCommit::Checkpoint(Checkpoint {
                    generation: 4,
                    ..current
                })
            )]
        );
        assert_eq!(plan.pinned, None);
    }

    #[test]
    fn a_group_ahead_rebuilds_from_the_target_and_keeps_only_final_windows() {
        // Windows final through 30 at the group's position; replay from 40: the open
        // window [30, 40) is rebuilt too, not frozen provisional.
        let plan = plan_from_time(
            40,
            &[PartitionPosition {
                partition: 1,
                current: at(state(50, Some(30), 0)),
                latest_generation: None,
                target: 20,
            }],
            &pinned(),
            None,
        )
        .unwrap();
        assert_eq!(
            plan.commits,
            vec![(
                1,
                PlannedCommit::Checkpoint(Checkpoint {
                    next_offset: 20,
                    max_ts_ms: None,
                    closed_through_ms: Some(30),
                    generation: 1,
                    settings: Some(TEN_S),
                    external_reset: false,
                })
            )]
        );
        // Windows final beyond T are rebuilt from T on.
        let plan = plan_from_time(
            40,
            &[PartitionPosition {
                partition: 1,
                current: at(state(50, Some(70), 0)),
                latest_generation: None,
                target: 20,
            }],
            &pinned(),
            None,
        )
        .unwrap();
        assert!(matches!(
            plan.commits[0].1,
            PlannedCommit::Checkpoint(Checkpoint {
                closed_through_ms: Some(40),
                ..
            })
        ));
    }

    #[test]
    fn a_settings_change_needs_final_windows_before_it_and_shares_one_generation() {
        let new = SumSettings {
            window_ms: 20,
            grace_ms: 2,
        };
        let positions = [
            PartitionPosition {
                partition: 0,
                current: at(state(50, Some(60), 1)),
                latest_generation: Some(1),
                target: 20,
            },
            PartitionPosition {
                partition: 1,
                current: at(state(5, Some(40), 4)),
                latest_generation: None,
                target: 30,
            },
        ];
        let plan = plan_from_time(40, &positions, &pinned(), Some(new)).unwrap();
        let generations: Vec<u16> = plan
            .commits
            .iter()
            .map(|(_, commit)| match commit {
                PlannedCommit::Checkpoint(c) => {
                    assert_eq!(c.settings, Some(new));
                    c.generation
                }
                PlannedCommit::WithoutState(_) => panic!("{commit:?}"),
            })
            .collect();
        assert_eq!(generations, vec![5, 5]);
        let pinned_after = plan.pinned.unwrap();
        assert_eq!(pinned_after.current().settings(), new);
        assert_eq!(pinned_after.current().generation, 5);

        let not_final = [PartitionPosition {
            current: at(state(50, Some(30), 1)),
            ..positions[0]
        }];
        assert_eq!(
            plan_from_time(40, &not_final, &pinned(), Some(new)),
            Err(ReplayError::NotFinalBeforeChange {
                partition: 0,
                closed_through: Some(30)
            })
        );
        // Unaligned change points are refused by the settings history.
        assert!(matches!(
            plan_from_time(30, &positions, &pinned(), Some(new)),
            Err(ReplayError::NotFinalBeforeChange { .. } | ReplayError::Settings(_))
        ));
    }

    #[test]
    fn an_external_reset_position_stays_one_or_freezes_before_the_target() {
        let reset = ResumeDecision {
            resume: Resume::ExternalReset {
                next_offset: 10,
                generation: 3,
            },
            start: StartAt::Offset(10),
            source: ResumeSource::ExternalReset,
        };
        let behind = PartitionPosition {
            partition: 2,
            current: reset,
            latest_generation: Some(2),
            target: 12,
        };
        let plan = plan_from_time(40, &[behind], &pinned(), None).unwrap();
        assert_eq!(plan.commits, vec![(2, PlannedCommit::WithoutState(10))]);
        let ahead = PartitionPosition {
            target: 4,
            ..behind
        };
        let plan = plan_from_time(40, &[ahead], &pinned(), None).unwrap();
        assert!(matches!(
            plan.commits[0].1,
            PlannedCommit::Checkpoint(Checkpoint {
                next_offset: 4,
                closed_through_ms: Some(40),
                generation: 4,
                ..
            })
        ));
        assert_eq!(
            plan_from_time(40, &[ahead], &pinned(), Some(TEN_S)),
            Err(ReplayError::UnknownStateForChange { partition: 2 })
        );
    }

    #[test]
    fn offset_items_parse_strictly() {
        let plan = plan_from_offsets(&["1:5".into(), "0:7".into()]).unwrap();
        assert_eq!(
            plan.commits,
            vec![
                (0, PlannedCommit::WithoutState(7)),
                (1, PlannedCommit::WithoutState(5))
            ]
        );
        for bad in ["1", "x:1", "1:x", "1:-1", "-1:0"] {
            assert!(plan_from_offsets(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
