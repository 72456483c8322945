//! The settings that decide sums, pinned so that no restart can change them silently.
//!
//! A window sum depends on the window size and on the grace (which decides what is
//! late). Both are pinned twice: in every checkpoint (commit metadata and the store's
//! checkpoint row) and in a store-wide metadata entry ([`PinnedSettings`]) written when
//! the store is first used. A process started with other values refuses to start,
//! naming both.
//!
//! Changing them is explicit: `tally replay --from T --window W --grace G` adds a
//! [`SettingsEpoch`] from `T` on, written with a generation higher than every row
//! before it. Rows from `T` on whose window size or generation does not match their
//! epoch were written under the old settings and are stale: readers skip them
//! ([`PinnedSettings::row_is_current`]).

use serde::{Deserialize, Serialize};

/// Window size and grace, in milliseconds: what decides which record lands in which
/// sum, and which record is late.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SumSettings {
    pub window_ms: i64,
    pub grace_ms: i64,
}

impl std::fmt::Display for SumSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "window {} ms, grace {} ms",
            self.window_ms, self.grace_ms
        )
    }
}

/// The settings in force for windows starting at or after `from_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsEpoch {
    /// First window start this epoch decides; `None` for the first epoch (all time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ms: Option<i64>,
    pub window_ms: i64,
    pub grace_ms: i64,
    /// Rows of this epoch's windows are written with at least this generation; a
    /// lower one was written under an earlier epoch's settings.
    #[serde(default)]
    pub generation: u16,
}

impl SettingsEpoch {
    pub fn settings(&self) -> SumSettings {
        SumSettings {
            window_ms: self.window_ms,
            grace_ms: self.grace_ms,
        }
    }
}

/// The store-wide settings history. Invariants: at least one epoch; the first has no
/// `from_ms`; later ones have strictly increasing `from_ms`, each a boundary of both
/// its own window and the previous epoch's window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedSettings {
    epochs: Vec<SettingsEpoch>,
}

/// Another process pinned other settings than this one was started with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} pins {pinned}, but this process was started with {configured}; start it with \
     the pinned values, or change them explicitly with `tally replay --from TIME --window \
     W --grace G` (a new generation)"
)]
pub struct SettingsMismatch {
    /// Where the pinned value was found (the store, a checkpoint of partition N, …).
    pub what: String,
    pub pinned: SumSettings,
    pub configured: SumSettings,
}

/// Why a settings change cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("window must be positive and grace not negative, got {0}")]
    Invalid(SumSettings),
    #[error(
        "a settings change must start at a boundary of both the old window ({old_window_ms} ms) \
         and the new one ({new_window_ms} ms); {from_ms} is not (nearest earlier: {suggestion})"
    )]
    Unaligned {
        from_ms: i64,
        old_window_ms: i64,
        new_window_ms: i64,
        suggestion: i64,
    },
    #[error("stored settings are not readable: {0}")]
    Unreadable(String),
}

impl PinnedSettings {
    /// The store metadata entry that holds them.
    pub const METADATA_NAME: &'static str = "sum_settings";

    /// The settings of a store used for the first time.
    pub fn new(initial: SumSettings) -> Result<Self, SettingsError> {
        validate(initial)?;
        Ok(PinnedSettings {
            epochs: vec![SettingsEpoch {
                from_ms: None,
                window_ms: initial.window_ms,
                grace_ms: initial.grace_ms,
                generation: 0,
            }],
        })
    }

    /// The epochs, oldest first.
    pub fn epochs(&self) -> &[SettingsEpoch] {
        &self.epochs
    }

    /// The newest epoch: what running aggregators must be configured with.
    pub fn current(&self) -> SettingsEpoch {
        // Non-empty by construction and by `from_json`.
        self.epochs.last().copied().unwrap_or(SettingsEpoch {
            from_ms: None,
            window_ms: 1,
            grace_ms: 0,
            generation: 0,
        })
    }

    /// The epoch deciding windows that start at `window_start_ms`.
    pub fn epoch_at(&self, window_start_ms: i64) -> SettingsEpoch {
        self.epochs
            .iter()
            .rev()
            .find(|epoch| epoch.from_ms.is_none_or(|from| window_start_ms >= from))
            .copied()
            .unwrap_or_else(|| self.current())
    }

    /// The window containing event time `ts_ms` under the epoch it falls in, as
    /// `(start, end)`; `None` when the end would not fit an i64.
    pub fn window_of(&self, ts_ms: i64) -> Option<(i64, i64)> {
        // Epoch boundaries are boundaries of both neighbouring windows, so the epoch
        // of a timestamp is the epoch of its window start.
        let epoch = self.epoch_at(ts_ms);
        let window = epoch.window_ms.max(1);
        let start = ts_ms.div_euclid(window).checked_mul(window)?;
        Some((start, start.checked_add(window)?))
    }

    /// Whether a stored row was written under the settings in force for its window
    /// (rows of an epoch that a settings change replaced are stale).
    pub fn row_is_current(
        &self,
        window_start_ms: i64,
        window_end_ms: i64,
        generation: u16,
    ) -> bool {
        let epoch = self.epoch_at(window_start_ms);
        window_end_ms.checked_sub(window_start_ms) == Some(epoch.window_ms)
            && window_start_ms.rem_euclid(epoch.window_ms.max(1)) == 0
            && generation >= epoch.generation
    }

    /// Fails unless `configured` equals the current settings.
    pub fn check(&self, configured: SumSettings) -> Result<(), SettingsMismatch> {
        let pinned = self.current().settings();
        if pinned == configured {
            Ok(())
        } else {
            Err(SettingsMismatch {
                what: "the store".to_owned(),
                pinned,
                configured,
            })
        }
    }

    /// The history after a change to `settings` for windows from `from_ms` on, whose
    /// rows are written with `generation` or higher. Epochs starting at or after
    /// `from_ms` are replaced (the replay rebuilds their windows).
    pub fn changed_from(
        &self,
        from_ms: i64,
        settings: SumSettings,
        generation: u16,
    ) -> Result<PinnedSettings, SettingsError> {
        validate(settings)?;
        let old_window_ms = self.epoch_at(from_ms).window_ms;
        let aligned = |window: i64| from_ms.rem_euclid(window) == 0;
        if !aligned(old_window_ms) || !aligned(settings.window_ms) {
            let step = lcm(old_window_ms, settings.window_ms);
            return Err(SettingsError::Unaligned {
                from_ms,
                old_window_ms,
                new_window_ms: settings.window_ms,
                suggestion: from_ms.div_euclid(step).saturating_mul(step),
            });
        }
        let mut epochs: Vec<SettingsEpoch> = self
            .epochs
            .iter()
            .filter(|epoch| epoch.from_ms.is_none_or(|from| from < from_ms))
            .copied()
            .collect();
        epochs.push(SettingsEpoch {
            from_ms: Some(from_ms),
            window_ms: settings.window_ms,
            grace_ms: settings.grace_ms,
            generation,
        });
        Ok(PinnedSettings { epochs })
    }

    /// The metadata text.
    pub fn to_json(&self) -> String {
        // Plain integers cannot fail to serialise.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads the metadata text, checking the invariants.
    pub fn from_json(text: &str) -> Result<Self, SettingsError> {
        let pinned: PinnedSettings =
            serde_json::from_str(text).map_err(|err| SettingsError::Unreadable(err.to_string()))?;
        let Some((first, rest)) = pinned.epochs.split_first() else {
            return Err(SettingsError::Unreadable("no epochs".into()));
        };
        if first.from_ms.is_some() {
            return Err(SettingsError::Unreadable(
                "the first epoch must cover all time".into(),
            ));
        }
        let mut previous: Option<i64> = None;
        for epoch in pinned.epochs.iter() {
            validate(epoch.settings())?;
            if let (Some(from), Some(before)) = (epoch.from_ms, previous) {
                if from <= before {
                    return Err(SettingsError::Unreadable(
                        "epochs must start in increasing order".into(),
                    ));
                }
            }
            previous = epoch.from_ms.or(previous);
        }
        if rest.iter().any(|epoch| epoch.from_ms.is_none()) {
            return Err(SettingsError::Unreadable(
                "only the first epoch may cover all time".into(),
            ));
        }
        Ok(pinned)
    }
}

fn validate(settings: SumSettings) -> Result<(), SettingsError> {
    if settings.window_ms <= 0 || settings.grace_ms < 0 {
        return Err(SettingsError::Invalid(settings));
    }
    Ok(())
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: i64, b: i64) -> i64 {
    (a / gcd(a, b).max(1)).saturating_mul(b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TEN_S: SumSettings = SumSettings {
        window_ms: 10_000,
        grace_ms: 2_000,
    };
    const ONE_MIN: SumSettings = SumSettings {
        window_ms: 60_000,
        grace_ms: 5_000,
    };

    #[test]
    fn a_new_store_pins_one_epoch_and_refuses_other_settings() {
        let pinned = PinnedSettings::new(TEN_S).unwrap();
        assert_eq!(pinned.check(TEN_S), Ok(()));
        let err = pinned.check(ONE_MIN).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("window 10000 ms, grace 2000 ms"), "{text}");
        assert!(text.contains("window 60000 ms, grace 5000 ms"), "{text}");
        let round_trip = PinnedSettings::from_json(&pinned.to_json()).unwrap();
        assert_eq!(round_trip, pinned);
    }

    #[test]
    fn a_change_applies_from_its_boundary_and_marks_older_rows_stale() {
        let pinned = PinnedSettings::new(TEN_S).unwrap();
        let changed = pinned.changed_from(120_000, ONE_MIN, 3).unwrap();
        assert_eq!(changed.check(ONE_MIN), Ok(()));
        assert_eq!(changed.epoch_at(119_999).settings(), TEN_S);
        assert_eq!(changed.epoch_at(120_000).settings(), ONE_MIN);
        assert_eq!(changed.window_of(125_000), Some((120_000, 180_000)));
        assert_eq!(changed.window_of(115_000), Some((110_000, 120_000)));
        // Before the change: old rows stay current.
        assert!(changed.row_is_current(110_000, 120_000, 0));
        // After it: a 10 s row, or a 1 min row of an older generation, is stale.
        assert!(!changed.row_is_current(130_000, 140_000, 5));
        assert!(!changed.row_is_current(120_000, 180_000, 2));
        assert!(changed.row_is_current(120_000, 180_000, 3));
        let round_trip = PinnedSettings::from_json(&changed.to_json()).unwrap();
        assert_eq!(round_trip, changed);
    }

    #[test]
    fn a_change_must_start_on_a_common_boundary() {
        let pinned = PinnedSettings::new(TEN_S).unwrap();
        let err = pinned.changed_from(130_000, ONE_MIN, 1).unwrap_err();
        assert_eq!(
            err,
            SettingsError::Unaligned {
                from_ms: 130_000,
                old_window_ms: 10_000,
                new_window_ms: 60_000,
                suggestion: 120_000
            }
        );
        assert!(matches!(
            pinned.changed_from(
                0,
                SumSettings {
                    window_ms: 0,
                    grace_ms: 0
                },
                1
            ),
            Err(SettingsError::Invalid(_))
        ));
    }

    #[test]
    fn an_earlier_change_replaces_later_epochs() {
        let pinned = PinnedSettings::new(TEN_S)
            .unwrap()
            .changed_from(600_000, ONE_MIN, 1)
            .unwrap()
            .changed_from(300_000, TEN_S, 2)
            .unwrap();
        assert_eq!(pinned.epochs().len(), 2);
        assert_eq!(pinned.epoch_at(700_000).generation, 2);
    }

    #[test]
    fn damaged_metadata_is_refused() {
        for text in [
            "",
            "{}",
            r#"{"epochs":[]}"#,
            r#"{"epochs":[{"from_ms":5,"window_ms":10,"grace_ms":0}]}"#,
            r#"{"epochs":[{"window_ms":10,"grace_ms":0},{"window_ms":10,"grace_ms":0}]}"#,
            r#"{"epochs":[{"window_ms":10,"grace_ms":0},{"from_ms":20,"window_ms":10,"grace_ms":0},{"from_ms":10,"window_ms":10,"grace_ms":0}]}"#,
            r#"{"epochs":[{"window_ms":0,"grace_ms":0}]}"#,
        ] {
            assert!(PinnedSettings::from_json(text).is_err(), "{text}");
        }
    }
}
