//! The writer: one store write at a time, in order, retried with backoff through the
//! circuit breaker. It reports each outcome to the protocol: `Written` once the rows
//! and then the checkpoint rows are durable, `WriteFailed` for an error retrying
//! cannot fix, and the circuit's transitions (`StoreAvailability`) so the protocol
//! pauses and resumes the partitions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use tally_sink::SinkError;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::shell::Shell;
use crate::breaker::{CircuitBreaker, CircuitState};
use crate::protocol::{Event, WriteBatch};

/// Longest a single store call may take before it counts as failed.
const STORE_CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct WriterSettings {
    pub breaker_threshold: u32,
    pub breaker_probe_interval: Duration,
    pub retry_max_delay: Duration,
}

pub(crate) fn spawn(
    shell: Arc<Shell>,
    mut writes: mpsc::Receiver<WriteBatch>,
    settings: WriterSettings,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut breaker =
            CircuitBreaker::new(settings.breaker_threshold, settings.breaker_probe_interval);
        let backoff = backon::ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(settings.retry_max_delay)
            .without_max_times();
        while let Some(batch) = writes.recv().await {
            if shell.stopped() {
                break;
            }
            write_until_done(&shell, &batch, &mut breaker, &backoff).await;
            shell.progress.notify_waiters();
        }
    })
}

async fn write_until_done(
    shell: &Arc<Shell>,
    batch: &WriteBatch,
    breaker: &mut CircuitBreaker,
    backoff: &backon::ExponentialBuilder,
) {
    let mut delays = backoff.build();
    loop {
        if shell.stopped() {
            return;
        }
        if !breaker.try_acquire(Instant::now()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let probing = breaker.state() == CircuitState::HalfOpen;
        shell.metrics.circuit_state.set(breaker.state() as i64);
        let started = Instant::now();
        match write(shell, batch, probing).await {
            Ok(()) => {
                shell
                    .metrics
                    .flush_duration
                    .observe(started.elapsed().as_secs_f64());
                let finals = batch.rows.iter().filter(|row| row.is_final).count();
                let rows = &shell.metrics.rows_written;
                rows.with_label_values(&["final"]).inc_by(finals as u64);
                rows.with_label_values(&["provisional"])
                    .inc_by((batch.rows.len() - finals) as u64);
                let was_open = breaker.state() != CircuitState::Closed;
                breaker.on_success();
                shell.metrics.circuit_state.set(breaker.state() as i64);
                if was_open {
                    info!("store is back: circuit closed, resuming partitions");
                    shell.health.set_circuit_open(false);
                    shell.handle_and_execute(Event::StoreAvailability { available: true });
                }
                shell.handle_and_execute(Event::Written { flush: batch.flush });
                return;
            }
            Err(err) if !err.is_retryable() => {
                shell.metrics.store_errors.inc();
                shell.handle_and_execute(Event::WriteFailed {
                    flush: batch.flush,
                    error: err.to_string(),
                });
                return;
            }
            Err(err) => {
                shell.metrics.store_errors.inc();
                let opened = breaker.on_failure(Instant::now());
                shell.metrics.circuit_state.set(breaker.state() as i64);
                let delay = delays.next().unwrap_or(Duration::from_secs(1));
                warn!(%err, retry_in = ?delay, "store write failed; nothing committed");
                if opened {
                    warn!("circuit open: pausing partitions until a probe write succeeds");
                    shell.health.set_circuit_open(true);
                    shell.handle_and_execute(Event::StoreAvailability { available: false });
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Rows first, then the checkpoint rows (a checkpoint row promises its rows).
async fn write(shell: &Shell, batch: &WriteBatch, probe_first: bool) -> Result<(), SinkError> {
    let timed = |what: &'static str| {
        move |_| SinkError::Unavailable(format!("{what} timed out after {STORE_CALL_TIMEOUT:?}"))
    };
    let store = &shell.store;
    if probe_first {
        tokio::time::timeout(STORE_CALL_TIMEOUT, store.probe())
            .await
            .map_err(timed("probe"))??;
    }
    if !batch.rows.is_empty() {
        tokio::time::timeout(STORE_CALL_TIMEOUT, store.write_rows(&batch.rows))
            .await
            .map_err(timed("row write"))??;
    }
    for (partition, checkpoint) in &batch.checkpoints {
        let scope = shell.scope(*partition);
        tokio::time::timeout(
            STORE_CALL_TIMEOUT,
            store.save_checkpoint(&scope, checkpoint),
        )
        .await
        .map_err(timed("checkpoint write"))??;
    }
    Ok(())
}
