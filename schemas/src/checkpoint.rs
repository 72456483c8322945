//! The replay state that must travel with an offset commit.
//!
//! A restarted aggregator resumes a partition at `next_offset` and must decide exactly
//! as the live run did. For that it needs the partition's `max_ts` as it stood just
//! before `next_offset` (so lateness is judged the same way), the closed-through
//! boundary (windows ending at or before it are durably final and never rewritten),
//! and the replay generation (so every later write keeps winning over older runs).
//!
//! The state is stored as compact JSON in the Kafka commit metadata and, for brokers
//! that drop commit metadata, in a checkpoint row of the store.

use serde::{Deserialize, Serialize};

use crate::settings::SumSettings;

/// Replay state of one partition at one committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// First offset not yet durably reflected in final rows: where a restart resumes.
    pub next_offset: i64,
    /// Largest counted event time (ms) among records before `next_offset`.
    pub max_ts_ms: Option<i64>,
    /// Windows whose end (ms) is at or before this are final in the store.
    pub closed_through_ms: Option<i64>,
    /// Replay generation; rows of a higher generation win over lower ones.
    pub generation: u16,
    /// The window size and grace the state was computed with (`None` in checkpoints
    /// of builds that did not pin them, and in plans that leave them to the store).
    pub settings: Option<SumSettings>,
    /// An external offset reset at `next_offset`, claimed with `generation`: nothing
    /// is known before the offset, and the windows the first usable record can share
    /// with earlier records stay frozen (see the aggregator's `Resume::ExternalReset`).
    /// Saved before any row of that generation is written, so the next reset picks a
    /// higher generation even if this one never got further.
    pub external_reset: bool,
}

/// Marks Tally's metadata so foreign commit metadata is never misread as ours.
const METADATA_VERSION: u8 = 1;

/// The metadata JSON: short field names, because Kafka bounds commit metadata
/// (`offset.metadata.max.bytes`, 4 KiB by default).
#[derive(Serialize, Deserialize)]
struct Envelope {
    tally: u8,
    next: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_ts: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    closed: Option<i64>,
    #[serde(default)]
    gen: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    w: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    g: Option<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    reset: bool,
}

/// Commit metadata that is not Tally's, or is for a different offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointDecodeError {
    #[error("commit metadata is not Tally checkpoint JSON: {0}")]
    NotTally(String),
    #[error("checkpoint version {0} is not understood by this build")]
    UnknownVersion(u8),
    #[error("checkpoint is for offset {found}, but the commit is at {expected}")]
    OffsetMismatch { expected: i64, found: i64 },
}

impl Checkpoint {
    /// A partition with no history: start at `next_offset`, nothing known yet.
    pub fn fresh(next_offset: i64) -> Self {
        Checkpoint {
            next_offset,
            max_ts_ms: None,
            closed_through_ms: None,
            generation: 0,
            settings: None,
            external_reset: false,
        }
    }

    /// The claim of an external reset at `next_offset` with `generation`.
    pub fn reset_claim(next_offset: i64, generation: u16, settings: Option<SumSettings>) -> Self {
        Checkpoint {
            next_offset,
            max_ts_ms: None,
            closed_through_ms: None,
            generation,
            settings,
            external_reset: true,
        }
    }

    /// Encodes the state as commit metadata (a few dozen bytes of JSON).
    pub fn to_metadata(&self) -> String {
        let envelope = Envelope {
            tally: METADATA_VERSION,
            next: self.next_offset,
            max_ts: self.max_ts_ms,
            closed: self.closed_through_ms,
            gen: self.generation,
            w: self.settings.map(|s| s.window_ms),
            g: self.settings.map(|s| s.grace_ms),
            reset: self.external_reset,
        };
        // Serialising plain integers cannot fail; fall back to an empty string
        // (which decodes as "no state") rather than panicking.
        serde_json::to_string(&envelope).unwrap_or_default()
    }

    /// Decodes commit metadata written by [`Checkpoint::to_metadata`] for the
    /// committed offset `committed_offset`.
    pub fn from_metadata(
        metadata: &str,
        committed_offset: i64,
    ) -> Result<Checkpoint, CheckpointDecodeError> {
        let envelope: Envelope = serde_json::from_str(metadata)
            .map_err(|err| CheckpointDecodeError::NotTally(err.to_string()))?;
        if envelope.tally != METADATA_VERSION {
            return Err(CheckpointDecodeError::UnknownVersion(envelope.tally));
        }
        if envelope.next != committed_offset {
            return Err(CheckpointDecodeError::OffsetMismatch {
                expected: committed_offset,
                found: envelope.next,
            });
        }
        let settings = match (envelope.w, envelope.g) {
            (Some(window_ms), Some(grace_ms)) => Some(SumSettings {
                window_ms,
                grace_ms,
            }),
            (None, None) => None,
            _ => {
                return Err(CheckpointDecodeError::NotTally(
                    "window and grace must come together".into(),
                ))
            }
        };
        Ok(Checkpoint {
            next_offset: envelope.next,
            max_ts_ms: envelope.max_ts,
            closed_through_ms: envelope.closed,
            generation: envelope.gen,
            settings,
            external_reset: envelope.reset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips() {
        let checkpoint = Checkpoint {
            next_offset: 42,
            max_ts_ms: Some(1_700_000_000_123),
            closed_through_ms: Some(1_700_000_000_000),
            generation: 3,
            settings: Some(SumSettings {
                window_ms: 10_000,
                grace_ms: 2_000,
            }),
            external_reset: false,
        };
        let text = checkpoint.to_metadata();
        assert!(text.len() < 128, "metadata too long: {text}");
        assert_eq!(Checkpoint::from_metadata(&text, 42), Ok(checkpoint));
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn metadata_of_earlier_builds_reads_without_settings() {
        let text = r#"{"tally":1,"next":7,"max_ts":30,"closed":20,"gen":2}"#;
        let checkpoint = Checkpoint::from_metadata(text, 7).unwrap();
        assert_eq!(checkpoint.settings, None);
        assert_eq!(checkpoint.generation, 2);
        assert!(Checkpoint::from_metadata(r#"{"tally":1,"next":7,"w":10}"#, 7).is_err());
    }

    #[test]
    fn a_reset_claim_round_trips() {
        let claim = Checkpoint::reset_claim(9, 4, None);
        let text = claim.to_metadata();
        assert!(text.contains("\"reset\":true"), "{text}");
        assert_eq!(Checkpoint::from_metadata(&text, 9), Ok(claim));
        assert!(!Checkpoint::fresh(9).to_metadata().contains("reset"));
    }

    #[test]
    fn fresh_checkpoint_round_trips() {
        let checkpoint = Checkpoint::fresh(0);
        assert_eq!(
            Checkpoint::from_metadata(&checkpoint.to_metadata(), 0),
            Ok(checkpoint)
        );
    }

    #[test]
    fn foreign_or_mismatched_metadata_is_refused() {
        assert!(matches!(
            Checkpoint::from_metadata("", 0),
            Err(CheckpointDecodeError::NotTally(_))
        ));
        assert!(matches!(
            Checkpoint::from_metadata("{\"next\":1}", 1),
            Err(CheckpointDecodeError::NotTally(_))
        ));
        assert!(matches!(
            Checkpoint::from_metadata("{\"tally\":9,\"next\":1}", 1),
            Err(CheckpointDecodeError::UnknownVersion(9))
        ));
        let text = Checkpoint::fresh(5).to_metadata();
        assert_eq!(
            Checkpoint::from_metadata(&text, 6),
            Err(CheckpointDecodeError::OffsetMismatch {
                expected: 6,
                found: 5
            })
        );
    }
}
