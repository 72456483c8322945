//! The re-drive journal: what `tally dlq redrive` did with each source record.
//!
//! The journal is partition 0 of its own topic (default `increments.dlq.redrive`,
//! `cleanup.policy=delete`, `retention.ms=-1`). One partition gives one total order,
//! so every reader folds the same entries in the same order into the same state.
//! A source record (the dead letter's `dlq.source.topic/partition/offset`) is in one
//! of three states:
//!
//! - *pending*: no entry, or its last claim was voided;
//! - *claimed*: a run claimed it and may still put it back, until the claim expires;
//! - *re-driven*: it was put back on the input topic, at a known offset. Terminal.
//!
//! Entries (key = the source record, value = JSON):
//! - `claim`: a run is about to put the record back. Takes effect only on a pending
//!   record, so of concurrent claims the first in log order wins; the others are
//!   ignored by every reader, their runs included.
//! - `done`: the record is on the input topic at `output` (the run saw the broker's
//!   acknowledgement, or a later run found it there).
//! - `void`: a later run found no re-driven copy of the record after the claim had
//!   expired; the record is pending again. Names the claim it voids (its journal
//!   offset), so it has no effect on any later claim.
//!
//! This module is pure: no Kafka, no clock.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a record came from: the topic, partition and offset it had before it was
/// dead-lettered. The identity that "at most once" is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SourceId {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl SourceId {
    /// From the `dlq.source.*` header values; `None` unless all three are present and
    /// well formed.
    pub fn from_headers(
        topic: Option<&str>,
        partition: Option<&str>,
        offset: Option<&str>,
    ) -> Option<SourceId> {
        let topic = topic.filter(|t| valid_topic(t))?;
        Some(SourceId {
            topic: topic.to_owned(),
            partition: partition?.parse().ok().filter(|p: &i32| *p >= 0)?,
            offset: offset?.parse().ok().filter(|o: &i64| *o >= 0)?,
        })
    }
}

/// Kafka topic names are `[a-zA-Z0-9._-]+`, so `/` separates the parts unambiguously.
fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

impl FromStr for SourceId {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = text.rsplitn(3, '/');
        let (offset, partition, topic) = (parts.next(), parts.next(), parts.next());
        SourceId::from_headers(topic, partition, offset)
            .ok_or_else(|| format!("not a source record TOPIC/PARTITION/OFFSET: {text:?}"))
    }
}

impl TryFrom<String> for SourceId {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<SourceId> for String {
    fn from(source: SourceId) -> String {
        source.to_string()
    }
}

/// A position in one partition of a topic the context names, `PARTITION:OFFSET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Coord {
    pub partition: i32,
    pub offset: i64,
}

impl fmt::Display for Coord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.partition, self.offset)
    }
}

impl FromStr for Coord {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parsed = text.split_once(':').and_then(|(p, o)| {
            Some(Coord {
                partition: p.parse().ok().filter(|p: &i32| *p >= 0)?,
                offset: o.parse().ok().filter(|o: &i64| *o >= 0)?,
            })
        });
        parsed.ok_or_else(|| format!("not PARTITION:OFFSET: {text:?}"))
    }
}

impl TryFrom<String> for Coord {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Coord> for String {
    fn from(coord: Coord) -> String {
        coord.to_string()
    }
}

/// A run's intent to put one source record back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub source: SourceId,
    /// The claiming run.
    pub run: String,
    /// The dead letter (in the dead-letter topic) whose bytes are re-driven.
    pub letter: Coord,
    /// The input partition the record goes to, and its end offset before the claim:
    /// a re-driven copy, if the run produced one, is at or after it.
    pub target: Coord,
    /// Wall-clock ms after which the claiming run can no longer append the record.
    pub expires_ms: i64,
}

/// The record is on the input topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub source: SourceId,
    /// The run that wrote this entry.
    pub run: String,
    /// Where the re-driven record is on the input topic.
    pub output: Coord,
    /// True when a later run found the record there (its claimer stopped before it
    /// could say so); false when the claimer saw the broker's acknowledgement.
    pub found: bool,
}

/// An expired claim whose record is not on the input topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Void {
    pub source: SourceId,
    /// The run that wrote this entry.
    pub run: String,
    /// The journal offset of the claim this voids.
    pub claim_at: i64,
}

/// One journal record's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
pub enum Entry {
    Claim(Claim),
    Done(Done),
    Void(Void),
}

impl Entry {
    pub fn source(&self) -> &SourceId {
        match self {
            Entry::Claim(claim) => &claim.source,
            Entry::Done(done) => &done.source,
            Entry::Void(void) => &void.source,
        }
    }

    /// The record value.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising these plain structs cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Entry, String> {
        serde_json::from_slice(bytes).map_err(|err| err.to_string())
    }
}

/// A claim in force: the claim and where it is in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimState {
    pub claim: Claim,
    /// Journal offset of the claim.
    pub at: i64,
}

/// The state of a source record that has entries (no entry means pending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Claimed(ClaimState),
    /// Re-driven: where the record is on the input topic.
    Done(Coord),
}

/// The journal folded into the state of every source record it names.
#[derive(Debug, Default, Clone)]
pub struct Journal {
    states: HashMap<SourceId, State>,
    next_offset: i64,
}

impl Journal {
    pub fn new() -> Journal {
        Journal::default()
    }

    /// The offset after the last entry applied (where the next read starts).
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// Applies the entry at journal `offset`. Entries must come in log order; an
    /// offset already applied is ignored (a re-read).
    pub fn apply(&mut self, offset: i64, entry: &Entry) {
        if offset < self.next_offset {
            return;
        }
        self.next_offset = offset + 1;
        self.apply_unchecked(offset, entry);
    }

    /// Notes that the journal has no entries before `offset` left to apply (records
    /// skipped by the reader: an aborted transaction, a transaction marker, or the
    /// start of the log after retention).
    pub fn skip_to(&mut self, offset: i64) {
        self.next_offset = self.next_offset.max(offset);
    }

    fn apply_unchecked(&mut self, offset: i64, entry: &Entry) {
        let source = entry.source();
        let current = self.states.get(source);
        match entry {
            Entry::Claim(claim) => {
                if current.is_none() {
                    self.states.insert(
                        source.clone(),
                        State::Claimed(ClaimState {
                            claim: claim.clone(),
                            at: offset,
                        }),
                    );
                }
            }
            Entry::Done(done) => {
                if !matches!(current, Some(State::Done(_))) {
                    self.states.insert(source.clone(), State::Done(done.output));
                }
            }
            Entry::Void(void) => {
                if matches!(current, Some(State::Claimed(state)) if state.at == void.claim_at) {
                    self.states.remove(source);
                }
            }
        }
    }

    /// `None` means pending.
    pub fn state(&self, source: &SourceId) -> Option<&State> {
        self.states.get(source)
    }

    /// Every claim in force (neither done nor voided).
    pub fn claims(&self) -> impl Iterator<Item = &ClaimState> {
        self.states.values().filter_map(|state| match state {
            State::Claimed(claim) => Some(claim),
            State::Done(_) => None,
        })
    }

    /// True when the claim at journal offset `at` is the one in force for `source`:
    /// its run, and only its run, may put the record back (until the claim expires).
    pub fn won(&self, source: &SourceId, at: i64) -> bool {
        matches!(self.states.get(source), Some(State::Claimed(state)) if state.at == at)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn source(offset: i64) -> SourceId {
        SourceId {
            topic: "increments".into(),
            partition: 2,
            offset,
        }
    }

    fn claim(offset: i64, run: &str) -> Entry {
        Entry::Claim(Claim {
            source: source(offset),
            run: run.into(),
            letter: Coord {
                partition: 0,
                offset: 9,
            },
            target: Coord {
                partition: 2,
                offset: 100,
            },
            expires_ms: 5_000,
        })
    }

    fn done(offset: i64, output: i64) -> Entry {
        Entry::Done(Done {
            source: source(offset),
            run: "r".into(),
            output: Coord {
                partition: 2,
                offset: output,
            },
            found: false,
        })
    }

    fn void(offset: i64, claim_at: i64) -> Entry {
        Entry::Void(Void {
            source: source(offset),
            run: "r".into(),
            claim_at,
        })
    }

    fn fold(entries: &[Entry]) -> Journal {
        let mut journal = Journal::new();
        for (offset, entry) in entries.iter().enumerate() {
            journal.apply(offset as i64, entry);
        }
        journal
    }

    #[test]
    fn source_ids_and_coords_round_trip_as_text() {
        let id = SourceId {
            topic: "my.topic-1_x".into(),
            partition: 12,
            offset: 345,
        };
        assert_eq!(id.to_string(), "my.topic-1_x/12/345");
        assert_eq!("my.topic-1_x/12/345".parse::<SourceId>(), Ok(id));
        for bad in [
            "", "t/1", "t/-1/2", "t/1/-2", "/1/2", "a/b/1/2", "t/x/1", "t t/1/2",
        ] {
            assert!(bad.parse::<SourceId>().is_err(), "{bad:?}");
        }
        let coord = Coord {
            partition: 3,
            offset: 44,
        };
        assert_eq!(coord.to_string(), "3:44");
        assert_eq!("3:44".parse::<Coord>(), Ok(coord));
        for bad in ["", "3", "3:", ":4", "-1:4", "3:-4", "a:b"] {
            assert!(bad.parse::<Coord>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn source_ids_need_all_three_headers() {
        assert!(SourceId::from_headers(Some("t"), Some("1"), None).is_none());
        assert!(SourceId::from_headers(None, Some("1"), Some("2")).is_none());
        assert!(SourceId::from_headers(Some("t"), Some("one"), Some("2")).is_none());
        assert_eq!(
            SourceId::from_headers(Some("t"), Some("1"), Some("2")),
            Some(SourceId {
                topic: "t".into(),
                partition: 1,
                offset: 2
            })
        );
    }

    #[test]
    fn entries_round_trip_as_json() {
        for entry in [claim(1, "a"), done(1, 7), void(1, 0)] {
            let json = entry.to_json();
            assert_eq!(Entry::from_json(&json), Ok(entry.clone()));
        }
        let text = String::from_utf8(claim(1, "a").to_json()).unwrap();
        assert!(text.contains(r#""entry":"claim""#), "{text}");
        assert!(text.contains(r#""source":"increments/2/1""#), "{text}");
        assert!(Entry::from_json(b"{\"entry\":\"nope\"}").is_err());
        assert!(Entry::from_json(b"not json").is_err());
    }

    #[test]
    fn the_first_claim_wins_and_later_claims_are_ignored() {
        let journal = fold(&[claim(1, "a"), claim(1, "b")]);
        assert!(journal.won(&source(1), 0));
        assert!(!journal.won(&source(1), 1));
        assert_eq!(journal.claims().count(), 1);
    }

    #[test]
    fn done_is_terminal() {
        let journal = fold(&[
            claim(1, "a"),
            done(1, 7),
            claim(1, "b"),
            void(1, 0),
            done(1, 9),
        ]);
        assert_eq!(
            journal.state(&source(1)),
            Some(&State::Done(Coord {
                partition: 2,
                offset: 7
            }))
        );
        assert_eq!(journal.claims().count(), 0);
        // A done without a claim (found by a lookup) is just as final.
        let journal = fold(&[done(1, 7), claim(1, "b")]);
        assert!(matches!(journal.state(&source(1)), Some(State::Done(_))));
    }

    #[test]
    fn a_void_reopens_only_the_claim_it_names() {
        // Voids the claim at 0: pending again, so the claim at 2 wins.
        let journal = fold(&[claim(1, "a"), void(1, 0), claim(1, "b")]);
        assert!(journal.won(&source(1), 2));
        // A second, late void of the claim at 0 does not touch the claim at 2.
        let journal = fold(&[claim(1, "a"), void(1, 0), claim(1, "b"), void(1, 0)]);
        assert!(journal.won(&source(1), 2));
        // A void naming a losing claim has no effect.
        let journal = fold(&[claim(1, "a"), claim(1, "b"), void(1, 1)]);
        assert!(journal.won(&source(1), 0));
        // Pending after a void, with nothing claimed.
        let journal = fold(&[claim(1, "a"), void(1, 0)]);
        assert_eq!(journal.state(&source(1)), None);
    }

    #[test]
    fn sources_are_independent_and_re_reads_are_ignored() {
        let mut journal = fold(&[claim(1, "a"), claim(2, "a"), done(2, 8)]);
        assert!(journal.won(&source(1), 0));
        assert!(matches!(journal.state(&source(2)), Some(State::Done(_))));
        assert_eq!(journal.next_offset(), 3);
        // Offset 1 again (a re-read after a seek): ignored.
        journal.apply(1, &void(1, 0));
        assert!(journal.won(&source(1), 0));
        journal.skip_to(10);
        assert_eq!(journal.next_offset(), 10);
        journal.skip_to(4);
        assert_eq!(journal.next_offset(), 10);
    }
}
