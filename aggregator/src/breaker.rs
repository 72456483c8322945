//! A circuit breaker for store writes, as a pure state machine (time is passed in).
//!
//! Closed: writes go through; `failure_threshold` consecutive failures open it.
//! Open: no writes; partitions stay paused (Kafka keeps the data). After
//! `probe_interval` a probe is allowed (half-open); a successful probe closes the
//! circuit, a failed one re-opens it for another interval.

use std::time::{Duration, Instant};

/// Numeric values exported as the `tally_aggregator_circuit_state` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    failure_threshold: u32,
    probe_interval: Duration,
    consecutive_failures: u32,
    state: CircuitState,
    opened_at: Option<Instant>,
}

impl CircuitBreaker {
    pub fn new(failure_threshold: u32, probe_interval: Duration) -> Self {
        CircuitBreaker {
            failure_threshold: failure_threshold.max(1),
            probe_interval,
            consecutive_failures: 0,
            state: CircuitState::Closed,
            opened_at: None,
        }
    }

    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// True when a write (closed) or a probe (open long enough) may be tried now.
    /// Moves an open circuit to half-open when its probe is due.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.state {
            CircuitState::Closed | CircuitState::HalfOpen => true,
            CircuitState::Open => {
                let due = self
                    .opened_at
                    .is_none_or(|at| now.saturating_duration_since(at) >= self.probe_interval);
                if due {
                    self.state = CircuitState::HalfOpen;
                }
                due
            }
        }
    }

    pub fn on_success(&mut self) {
        self.consecutive_failures = 0;
        self.state = CircuitState::Closed;
        self.opened_at = None;
    }

    /// Records a failure; returns true if this failure opened the circuit.
    pub fn on_failure(&mut self, now: Instant) -> bool {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let was_open = self.state == CircuitState::Open;
        let should_open = self.state == CircuitState::HalfOpen
            || self.consecutive_failures >= self.failure_threshold;
        if should_open {
            self.state = CircuitState::Open;
            self.opened_at = Some(now);
        }
        should_open && !was_open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_after_interval() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(3, Duration::from_secs(2));
        assert!(breaker.try_acquire(start));
        assert!(!breaker.on_failure(start));
        assert!(!breaker.on_failure(start));
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert!(breaker.on_failure(start));
        assert_eq!(breaker.state(), CircuitState::Open);
        assert!(!breaker.try_acquire(start + Duration::from_secs(1)));
        assert!(breaker.try_acquire(start + Duration::from_secs(2)));
        assert_eq!(breaker.state(), CircuitState::HalfOpen);
        // A failed probe re-opens for another interval.
        assert!(breaker.on_failure(start + Duration::from_secs(2)));
        assert!(!breaker.try_acquire(start + Duration::from_secs(3)));
        assert!(breaker.try_acquire(start + Duration::from_secs(4)));
        breaker.on_success();
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert!(breaker.try_acquire(start + Duration::from_secs(4)));
    }

    #[test]
    fn success_resets_the_failure_count() {
        let now = Instant::now();
        let mut breaker = CircuitBreaker::new(2, Duration::from_secs(1));
        breaker.on_failure(now);
        breaker.on_success();
        breaker.on_failure(now);
        assert_eq!(breaker.state(), CircuitState::Closed);
    }
}
