//! The rules of ownership: where an assigned partition starts (and the claim an
//! external reset writes first), what a revoked partition does with its last flush,
//! when it may be committed or must be handed over, and what a lost range of offsets
//! does (rules 3, 5, 6 and 7 of the module documentation).

use tally_schemas::Checkpoint;

use super::partition::{Committed, LostRange, PartitionState, Phase};
use super::resume;
use super::{
    AssignedPartition, Command, CommittedOffset, Protocol, ProtocolError, ResumeSource, WriteBatch,
};
use crate::engine::{PartitionEngine, Resume};

impl Protocol {
    pub(super) fn on_assigned(&mut self, assigned: Vec<AssignedPartition>, out: &mut Vec<Command>) {
        let configured = self.config.engine.sum_settings();
        let mut positions = Vec::with_capacity(assigned.len());
        // External resets claim their generation in the store before anything else.
        let mut claims = WriteBatch {
            flush: self.next_flush,
            rows: Vec::new(),
            checkpoints: Vec::new(),
        };
        for partition in assigned {
            let decision = resume::decide(&partition.committed, partition.store);
            if let Some(pinned) = decision.checkpoint().and_then(|c| c.settings) {
                if pinned != configured {
                    let error = ProtocolError::SettingsMismatch {
                        partition: partition.partition,
                        pinned,
                        configured,
                    };
                    self.stop(error, out);
                    return;
                }
            }
            let committed = match &partition.committed {
                CommittedOffset::At { offset, .. } => Some(Committed {
                    offset: *offset,
                    with_state: decision.source != ResumeSource::ExternalReset,
                }),
                CommittedOffset::None => None,
            };
            let latest_generation = partition.store.latest.map_or(0, |latest| latest.generation);
            let epoch = self.next_epoch;
            self.next_epoch += 1;
            let engine =
                PartitionEngine::new(self.config.engine, partition.partition, decision.resume);
            let mut state = PartitionState::new(engine, epoch, committed, latest_generation);
            if let Resume::ExternalReset {
                next_offset,
                generation,
            } = decision.resume
            {
                let claim = Checkpoint::reset_claim(next_offset, generation, Some(configured));
                state.claim_reset(partition.partition, claim, &mut claims);
            }
            self.partitions.insert(partition.partition, state);
            positions.push((partition.partition, decision));
        }
        let paused: Vec<i32> = positions.iter().map(|(p, _)| *p).collect();
        out.push(Command::Assign { positions });
        if !claims.checkpoints.is_empty() {
            self.next_flush += 1;
            out.push(Command::WriteRows(claims));
        }
        if !self.store_available && !paused.is_empty() {
            out.push(Command::Pause { partitions: paused });
        }
    }

    pub(super) fn on_revoked(&mut self, partitions: &[i32], out: &mut Vec<Command>) {
        let flush = self.next_flush;
        let mut batch = WriteBatch {
            flush,
            rows: Vec::new(),
            checkpoints: Vec::new(),
        };
        for partition in partitions {
            if let Some(state) = self.partitions.get_mut(partition) {
                if state.phase == Phase::Active {
                    state.flush_into(*partition, flush, true, &mut batch);
                    state.phase = Phase::Revoking;
                }
            }
        }
        if batch.rows.is_empty() && batch.checkpoints.is_empty() {
            return;
        }
        self.next_flush += 1;
        out.push(Command::WriteRows(batch));
    }

    pub(super) fn on_revoke_settled(&mut self, partitions: &[i32], out: &mut Vec<Command>) {
        let mut offsets = Vec::new();
        for partition in partitions {
            let Some(state) = self.partitions.remove(partition) else {
                continue;
            };
            let (commit, why) = state.settle();
            if let Some(checkpoint) = commit {
                offsets.push((*partition, checkpoint));
            }
            if let Some(why) = why {
                out.push(Command::HandOverUncommitted {
                    partition: *partition,
                    why,
                });
            }
            // Letters of a dropped partition are re-judged and re-sent by its next
            // owner: forget them so they do not hold reading back.
            let epoch = state.epoch;
            self.letters.retain(|_, letter| {
                !(letter.letter.partition == *partition && letter.epoch == epoch)
            });
        }
        let letters = &self.letters;
        self.letters_to_retry.retain(|id| letters.contains_key(id));
        if !offsets.is_empty() {
            out.push(Command::Commit {
                offsets,
                sync: true,
            });
        }
    }

    // ------------------------------------------------------------ lost offsets

    pub(super) fn on_log_range(
        &mut self,
        partition: i32,
        log_start: i64,
        log_end: i64,
        out: &mut Vec<Command>,
    ) {
        let accept = self.config.accept_data_loss;
        let engine_config = self.config.engine;
        let Some(state) = self.partitions.get_mut(&partition) else {
            return;
        };
        if state.phase != Phase::Active || state.halted.is_some() {
            return;
        }
        let expected = state.engine.next_offset();
        // Below the log start: deleted before they were read. Beyond the log end:
        // the log was truncated or recreated; what follows is not what was counted.
        let lost = if log_start > expected {
            Some(LostRange {
                from: expected,
                to: log_start,
            })
        } else if expected > log_end {
            Some(LostRange {
                from: log_end,
                to: expected,
            })
        } else {
            None
        };
        let Some(range) = lost else {
            return;
        };
        *self.stats.lost_offsets.entry(partition).or_insert(0) +=
            u64::try_from(range.to - range.from).unwrap_or(u64::MAX);
        out.push(Command::OffsetsLost {
            partition,
            from: range.from,
            to: range.to,
            accepted: accept,
        });
        if !accept {
            state.halted = Some(range);
            out.push(Command::Pause {
                partitions: vec![partition],
            });
            return;
        }
        // Continue at the log start, knowing nothing of what came before, with a
        // generation above every earlier one: exactly an external reset. What this
        // engine already counted is flushed first (it is before the gap).
        let restart_at = log_start.min(log_end);
        let generation = state
            .engine
            .generation()
            .max(state.latest_generation)
            .saturating_add(1);
        state.latest_generation = generation;
        let carried = state.engine.flush().rows;
        state.carried_rows.extend(carried);
        state.engine = PartitionEngine::new(
            engine_config,
            partition,
            Resume::ExternalReset {
                next_offset: restart_at,
                generation,
            },
        );
        let mut claim = WriteBatch {
            flush: self.next_flush,
            rows: Vec::new(),
            checkpoints: Vec::new(),
        };
        let settings = Some(engine_config.sum_settings());
        state.claim_reset(
            partition,
            Checkpoint::reset_claim(restart_at, generation, settings),
            &mut claim,
        );
        self.next_flush += 1;
        out.push(Command::WriteRows(claim));
        out.push(Command::Seek {
            partition,
            offset: restart_at,
        });
    }
}
