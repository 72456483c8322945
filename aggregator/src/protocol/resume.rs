//! Where an assigned partition resumes: what the broker says (the committed offset
//! and its metadata) against what the store says (its checkpoint rows).
//!
//! The rules, in order (DESIGN.md, "Offsets, replay and exactly-once effect"):
//! 1. A commit whose metadata is Tally's checkpoint for that offset: resume from it.
//! 2. A commit without usable metadata (a broker that drops it, like tansu) for which
//!    the store holds the checkpoint saved for exactly that offset by the newest run
//!    (no higher generation in the store): resume from that.
//! 3. A commit without Tally state anywhere: an offset reset by other tools (or
//!    `tally replay --from-offset`): an external reset at that offset, with a
//!    generation above every one the store has seen for the partition.
//! 4. No commit at all, but the store has checkpoints (the group's offsets expired or
//!    were deleted): resume from the store's latest checkpoint, exactly as the group
//!    had it, never from the log's start (which would rebuild open windows partially
//!    and, with a higher through-offset, overwrite more complete rows).
//! 5. Nothing anywhere: a new partition, from its first record, generation 0.
//!
//! A checkpoint that is an external reset's claim ([`Checkpoint::external_reset`],
//! saved before any row of the reset's generation) resumes as that same reset, with
//! the claimed generation.
//!
//! `tally replay` resolves the group's current state with the same function, so the
//! aggregator and the replay never disagree about where a partition stands.

use tally_schemas::Checkpoint;

use crate::engine::Resume;

/// What the consumer group holds for a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommittedOffset {
    /// The group never committed this partition (or its offsets expired).
    None,
    /// A committed offset with its metadata text (empty when the broker dropped it).
    At { offset: i64, metadata: String },
}

/// What the store holds for a partition (for the group and topic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCheckpoints {
    /// The checkpoint saved for exactly the committed offset, if any.
    pub exact: Option<Checkpoint>,
    /// The newest checkpoint saved (highest generation, then highest offset).
    pub latest: Option<Checkpoint>,
}

/// Where the consumer starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The partition's first available record.
    Beginning,
    Offset(i64),
}

/// Which rule decided the resume (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeSource {
    CommitMetadata,
    StoreCheckpoint,
    ExternalReset,
    StoreLatest,
    Fresh,
}

/// The decision for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeDecision {
    pub resume: Resume,
    pub start: StartAt,
    pub source: ResumeSource,
}

impl ResumeDecision {
    /// The checkpoint this decision resumes from (`None` for an external reset,
    /// whose state before the offset is unknown).
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        match self.resume {
            Resume::Checkpoint(checkpoint) => Some(checkpoint),
            Resume::ExternalReset { .. } => None,
        }
    }

    /// The offset the decision resumes at (`0` for a fresh partition).
    pub fn next_offset(&self) -> i64 {
        match self.resume {
            Resume::Checkpoint(checkpoint) => checkpoint.next_offset,
            Resume::ExternalReset { next_offset, .. } => next_offset,
        }
    }

    /// The generation rows are written with after this decision.
    pub fn generation(&self) -> u16 {
        match self.resume {
            Resume::Checkpoint(checkpoint) => checkpoint.generation,
            Resume::ExternalReset { generation, .. } => generation,
        }
    }
}

/// Decides where a partition resumes; see the module documentation.
pub fn decide(committed: &CommittedOffset, store: StoreCheckpoints) -> ResumeDecision {
    let decision = decide_source(committed, store);
    match decision.resume {
        // A saved reset claim resumes as that very reset, with its claimed generation.
        Resume::Checkpoint(checkpoint) if checkpoint.external_reset => ResumeDecision {
            resume: Resume::ExternalReset {
                next_offset: checkpoint.next_offset,
                generation: checkpoint.generation,
            },
            start: StartAt::Offset(checkpoint.next_offset),
            source: ResumeSource::ExternalReset,
        },
        _ => decision,
    }
}

fn decide_source(committed: &CommittedOffset, store: StoreCheckpoints) -> ResumeDecision {
    match committed {
        CommittedOffset::At { offset, metadata } => {
            if let Ok(checkpoint) = Checkpoint::from_metadata(metadata, *offset) {
                return ResumeDecision {
                    resume: Resume::Checkpoint(checkpoint),
                    start: StartAt::Offset(*offset),
                    source: ResumeSource::CommitMetadata,
                };
            }
            // Only the newest run's checkpoint: an older generation's row at the same
            // offset belongs to a run that a later reset or replay abandoned.
            let newest = |c: &Checkpoint| {
                store
                    .latest
                    .is_none_or(|latest| c.generation >= latest.generation)
            };
            if let Some(exact) = store
                .exact
                .filter(|c| c.next_offset == *offset && newest(c))
            {
                return ResumeDecision {
                    resume: Resume::Checkpoint(exact),
                    start: StartAt::Offset(*offset),
                    source: ResumeSource::StoreCheckpoint,
                };
            }
            ResumeDecision {
                resume: Resume::ExternalReset {
                    next_offset: *offset,
                    generation: next_generation(store.latest),
                },
                start: StartAt::Offset(*offset),
                source: ResumeSource::ExternalReset,
            }
        }
        CommittedOffset::None => match store.latest {
            Some(latest) => ResumeDecision {
                resume: Resume::Checkpoint(latest),
                start: StartAt::Offset(latest.next_offset),
                source: ResumeSource::StoreLatest,
            },
            None => ResumeDecision {
                resume: Resume::Checkpoint(Checkpoint::fresh(0)),
                start: StartAt::Beginning,
                source: ResumeSource::Fresh,
            },
        },
    }
}

/// A generation above every one the store has seen for the partition.
pub fn next_generation(latest: Option<Checkpoint>) -> u16 {
    latest.map_or(1, |c| c.generation.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(next_offset: i64, generation: u16) -> Checkpoint {
        Checkpoint {
            next_offset,
            max_ts_ms: Some(100),
            closed_through_ms: Some(90),
            generation,
            settings: None,
            external_reset: false,
        }
    }

    #[test]
    fn a_saved_reset_claim_resumes_as_that_reset_with_its_generation() {
        let claim = Checkpoint::reset_claim(12, 6, None);
        for (committed, store) in [
            (
                CommittedOffset::At {
                    offset: 12,
                    metadata: String::new(),
                },
                StoreCheckpoints {
                    exact: Some(claim),
                    latest: Some(claim),
                },
            ),
            (
                CommittedOffset::At {
                    offset: 12,
                    metadata: claim.to_metadata(),
                },
                StoreCheckpoints::default(),
            ),
            (
                CommittedOffset::None,
                StoreCheckpoints {
                    exact: None,
                    latest: Some(claim),
                },
            ),
        ] {
            let decision = decide(&committed, store);
            assert_eq!(decision.source, ResumeSource::ExternalReset);
            assert_eq!(
                decision.resume,
                Resume::ExternalReset {
                    next_offset: 12,
                    generation: 6
                }
            );
        }
        // The next reset elsewhere picks a generation above the claim.
        assert_eq!(next_generation(Some(claim)), 7);
    }

    #[test]
    fn commit_metadata_wins() {
        let meta = checkpoint(7, 2);
        let decision = decide(
            &CommittedOffset::At {
                offset: 7,
                metadata: meta.to_metadata(),
            },
            StoreCheckpoints {
                exact: Some(checkpoint(7, 1)),
                latest: Some(checkpoint(9, 3)),
            },
        );
        assert_eq!(decision.source, ResumeSource::CommitMetadata);
        assert_eq!(decision.resume, Resume::Checkpoint(meta));
        assert_eq!(decision.start, StartAt::Offset(7));
    }

    #[test]
    fn dropped_metadata_resumes_from_the_store_checkpoint_for_that_offset() {
        let exact = checkpoint(7, 2);
        for metadata in ["", "not tally", &checkpoint(8, 2).to_metadata()] {
            let decision = decide(
                &CommittedOffset::At {
                    offset: 7,
                    metadata: metadata.to_owned(),
                },
                StoreCheckpoints {
                    exact: Some(exact),
                    latest: Some(checkpoint(20, 2)),
                },
            );
            assert_eq!(decision.source, ResumeSource::StoreCheckpoint, "{metadata}");
            assert_eq!(decision.resume, Resume::Checkpoint(exact));
        }
    }

    #[test]
    fn an_older_runs_checkpoint_at_the_reset_offset_is_not_resumed() {
        // A reset lands on an offset where an abandoned run (generation 3) once saved
        // a checkpoint; the newest run is generation 5.
        let decision = decide(
            &CommittedOffset::At {
                offset: 9,
                metadata: String::new(),
            },
            StoreCheckpoints {
                exact: Some(checkpoint(9, 3)),
                latest: Some(Checkpoint::reset_claim(8, 5, None)),
            },
        );
        assert_eq!(decision.source, ResumeSource::ExternalReset);
        assert_eq!(decision.generation(), 6);
    }

    #[test]
    fn an_offset_without_state_anywhere_is_an_external_reset_with_a_new_generation() {
        let decision = decide(
            &CommittedOffset::At {
                offset: 5,
                metadata: String::new(),
            },
            StoreCheckpoints {
                // A checkpoint for another offset is not this commit's state.
                exact: Some(checkpoint(6, 4)),
                latest: Some(checkpoint(20, 4)),
            },
        );
        assert_eq!(decision.source, ResumeSource::ExternalReset);
        assert_eq!(
            decision.resume,
            Resume::ExternalReset {
                next_offset: 5,
                generation: 5
            }
        );
        let decision = decide(
            &CommittedOffset::At {
                offset: 5,
                metadata: String::new(),
            },
            StoreCheckpoints::default(),
        );
        assert_eq!(decision.generation(), 1);
        assert_eq!(decision.checkpoint(), None);
    }

    #[test]
    fn a_group_that_lost_its_offsets_resumes_from_the_store_not_the_log_start() {
        let latest = checkpoint(40, 3);
        let decision = decide(
            &CommittedOffset::None,
            StoreCheckpoints {
                exact: None,
                latest: Some(latest),
            },
        );
        assert_eq!(decision.source, ResumeSource::StoreLatest);
        assert_eq!(decision.start, StartAt::Offset(40));
        assert_eq!(decision.resume, Resume::Checkpoint(latest));
    }

    #[test]
    fn nothing_anywhere_starts_fresh_from_the_beginning() {
        let decision = decide(&CommittedOffset::None, StoreCheckpoints::default());
        assert_eq!(decision.source, ResumeSource::Fresh);
        assert_eq!(decision.start, StartAt::Beginning);
        assert_eq!(decision.next_offset(), 0);
        assert_eq!(decision.generation(), 0);
    }
}
