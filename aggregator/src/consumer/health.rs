//! What `/readyz` tells: ready only while the aggregator makes progress it can stand
//! behind. Not ready when a fatal error happened, when the store's circuit is open,
//! when a partition halted on lost offsets, or when a partition with lag has not
//! advanced its committed offset for longer than `--stall-timeout`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct PartitionHealth {
    committed: Option<i64>,
    /// When the committed offset last moved (or the partition was assigned).
    advanced_at: Option<Instant>,
    /// The partition's end offset, from the consumer's statistics.
    high_watermark: Option<i64>,
    halted: bool,
}

#[derive(Debug, Default)]
struct HealthState {
    fatal: Option<String>,
    circuit_open: bool,
    partitions: BTreeMap<i32, PartitionHealth>,
}

/// Shared between the aggregator and whatever serves `/readyz`.
#[derive(Debug, Clone)]
pub struct Health {
    state: Arc<Mutex<HealthState>>,
    stall_timeout: Duration,
}

impl Health {
    pub fn new(stall_timeout: Duration) -> Self {
        Health {
            state: Arc::default(),
            stall_timeout,
        }
    }

    fn state(&self) -> MutexGuard<'_, HealthState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Ok` with a short status, or `Err` with why the aggregator is not ready.
    pub fn readiness(&self) -> Result<String, String> {
        self.readiness_at(Instant::now())
    }

    fn readiness_at(&self, now: Instant) -> Result<String, String> {
        let state = self.state();
        if let Some(fatal) = &state.fatal {
            return Err(format!("stopped: {fatal}"));
        }
        if state.circuit_open {
            return Err("the store's circuit is open: nothing is written or committed".into());
        }
        for (partition, health) in &state.partitions {
            if health.halted {
                return Err(format!("partition {partition} halted on lost offsets"));
            }
            let lag = match (health.high_watermark, health.committed) {
                (Some(high), Some(committed)) => high - committed,
                (Some(high), None) => high,
                _ => 0,
            };
            let stalled = health
                .advanced_at
                .is_some_and(|at| now.saturating_duration_since(at) > self.stall_timeout);
            if lag > 0 && stalled {
                return Err(format!(
                    "partition {partition}: no commit for more than {:?} with {lag} records behind",
                    self.stall_timeout
                ));
            }
        }
        Ok(format!("{} partitions", state.partitions.len()))
    }

    pub fn set_fatal(&self, reason: String) {
        self.state().fatal.get_or_insert(reason);
    }

    pub fn set_circuit_open(&self, open: bool) {
        self.state().circuit_open = open;
    }

    pub fn set_halted(&self, partition: i32, halted: bool) {
        self.state().partitions.entry(partition).or_default().halted = halted;
    }

    pub fn assigned(&self, partition: i32, committed: Option<i64>) {
        self.state().partitions.insert(
            partition,
            PartitionHealth {
                committed,
                advanced_at: Some(Instant::now()),
                ..PartitionHealth::default()
            },
        );
    }

    pub fn revoked(&self, partition: i32) {
        self.state().partitions.remove(&partition);
    }

    pub fn committed(&self, partition: i32, offset: i64) {
        let mut state = self.state();
        if let Some(health) = state.partitions.get_mut(&partition) {
            if health.committed.is_none_or(|done| offset > done) {
                health.committed = Some(offset);
                health.advanced_at = Some(Instant::now());
            }
        }
    }

    pub fn high_watermark(&self, partition: i32, high: i64) {
        if let Some(health) = self.state().partitions.get_mut(&partition) {
            health.high_watermark = Some(high);
        }
    }

    /// The committed offset and high watermark of each partition (for the gauges).
    pub fn offsets(&self) -> Vec<(i32, Option<i64>, Option<i64>)> {
        self.state()
            .partitions
            .iter()
            .map(|(p, h)| (*p, h.committed, h.high_watermark))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ready_until_something_stops_progress() {
        let health = Health::new(Duration::from_secs(60));
        assert!(health.readiness().is_ok());
        health.assigned(0, Some(10));
        health.high_watermark(0, 50);
        assert!(health.readiness().is_ok(), "lag, but recently assigned");
        let later = Instant::now() + Duration::from_secs(61);
        let stalled = health.readiness_at(later).unwrap_err();
        assert!(stalled.contains("no commit"), "{stalled}");
        health.committed(0, 50);
        assert!(health.readiness_at(later).is_ok(), "caught up: no lag");

        health.set_circuit_open(true);
        assert!(health.readiness().unwrap_err().contains("circuit"));
        health.set_circuit_open(false);
        health.set_halted(0, true);
        assert!(health.readiness().unwrap_err().contains("halted"));
        health.set_halted(0, false);
        health.set_fatal("boom".into());
        assert!(health.readiness().unwrap_err().contains("boom"));
    }
}
