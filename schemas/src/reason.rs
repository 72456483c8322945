//! Rejection reasons. The string codes are stable: they appear in HTTP error bodies,
//! in the `dlq.reason` header and as the bounded `reason` metric label.

use std::fmt;

/// Why an increment (HTTP body) or a Kafka record cannot be counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// Not well-formed JSON: syntax error, empty body, trailing bytes, nesting too deep.
    InvalidJson,
    /// Well-formed JSON whose top level is not an object.
    NotAnObject,
    /// `key` is missing from the object.
    MissingKey,
    /// `value` is missing from the object.
    MissingValue,
    /// A field appears twice.
    DuplicateField,
    /// A field other than `key` and `value`.
    UnknownField,
    /// `key` is not a UUID string in the 8-4-4-4-12 hyphenated form.
    InvalidKey,
    /// `value` is not a JSON integer in `1..=2^63-1`.
    InvalidValue,
    /// The Kafka record has no usable timestamp (negative or absent).
    InvalidTimestamp,
    /// The record's window was already closed by its partition's watermark.
    Late,
    /// The record's timestamp is further ahead of the wall clock than allowed.
    FutureTimestamp,
    /// Counting the record would overflow the window's i64 sum.
    SumOverflow,
}

impl RejectReason {
    /// Every reason, for exhaustive tests and for pre-registering metric labels.
    pub const ALL: [RejectReason; 12] = [
        RejectReason::InvalidJson,
        RejectReason::NotAnObject,
        RejectReason::MissingKey,
        RejectReason::MissingValue,
        RejectReason::DuplicateField,
        RejectReason::UnknownField,
        RejectReason::InvalidKey,
        RejectReason::InvalidValue,
        RejectReason::InvalidTimestamp,
        RejectReason::Late,
        RejectReason::FutureTimestamp,
        RejectReason::SumOverflow,
    ];

    /// Stable code used in error bodies, `dlq.reason` headers and metric labels.
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::NotAnObject => "not_an_object",
            RejectReason::MissingKey => "missing_key",
            RejectReason::MissingValue => "missing_value",
            RejectReason::DuplicateField => "duplicate_field",
            RejectReason::UnknownField => "unknown_field",
            RejectReason::InvalidKey => "invalid_key",
            RejectReason::InvalidValue => "invalid_value",
            RejectReason::InvalidTimestamp => "invalid_timestamp",
            RejectReason::Late => "late",
            RejectReason::FutureTimestamp => "future_timestamp",
            RejectReason::SumOverflow => "sum_overflow",
        }
    }

    /// Parses a code back (for `tally dlq list --reason`).
    pub fn from_code(code: &str) -> Option<RejectReason> {
        RejectReason::ALL.into_iter().find(|r| r.code() == code)
    }

    /// True when the JSON could not even be parsed (HTTP 400); every other body
    /// problem is a broken rule (HTTP 422).
    pub fn is_malformed(self) -> bool {
        matches!(self, RejectReason::InvalidJson)
    }

    /// True for reasons decided from the body alone ("poison"), as opposed to
    /// reasons decided by the window engine from time or sums.
    pub fn is_poison(self) -> bool {
        !matches!(
            self,
            RejectReason::Late | RejectReason::FutureTimestamp | RejectReason::SumOverflow
        )
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for reason in RejectReason::ALL {
            assert!(
                seen.insert(reason.code()),
                "duplicate code {}",
                reason.code()
            );
            assert_eq!(RejectReason::from_code(reason.code()), Some(reason));
        }
        assert_eq!(RejectReason::from_code("nope"), None);
    }

    #[test]
    fn only_invalid_json_is_malformed() {
        for reason in RejectReason::ALL {
            assert_eq!(reason.is_malformed(), reason == RejectReason::InvalidJson);
        }
    }
}
