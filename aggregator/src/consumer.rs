//! The consumer shell: rdkafka and tokio around the pure commit protocol.
//!
//! Every decision is the protocol's ([`crate::protocol`]); the shell only feeds it
//! events and executes its commands:
//! - this file: setup, the loop (records drained in batches per wake-up, flush
//!   ticks) and shutdown;
//! - [`rebalance`]: rdkafka's callbacks (assignments at the protocol's positions,
//!   revokes, commit results, statistics);
//! - [`writer`]: the one background store writer, with retries and the breaker;
//! - [`dead_letters`]: dead-letter sends and their acknowledgements;
//! - [`gauges`]: metrics from the protocol's counters, once per tick;
//! - [`health`]: what `/readyz` answers;
//! - [`shell`]: the protocol behind its lock, and the command executor.

mod committer;
mod dead_letters;
mod gauges;
mod health;
mod rebalance;
mod shell;
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{FutureExt, StreamExt};
use prometheus::Registry;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use tally_sink::dlq::DeadLetterProducer;
use tally_sink::WindowStore;
use tracing::{info, warn};

pub use health::Health;
pub use rebalance::AggregatorContext;

use crate::config::AggregatorConfig;
use crate::error::AggregatorError;
use crate::metrics::AggregatorMetrics;
use crate::protocol::{Event, IdleMarkers, Protocol, ProtocolConfig, Record};
use shell::{AggregatorConsumer, Shell};

/// Dead letters sent and not yet acknowledged before reading pauses.
const MAX_OUTSTANDING_LETTERS: usize = 1024;
/// Records handed to the protocol per lock (drained without waiting).
const BATCH: usize = 512;
/// Writes the writer may have queued (one flush, revokes, reset claims).
const WRITE_QUEUE: usize = 64;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The consumer settings of `tally aggregator` (also used by the raw-consumer
/// baseline of the benchmark, so both read with the same settings).
pub fn consumer_config(
    brokers: &str,
    group: &str,
    extra: &[tally_schemas::KafkaOption],
) -> ClientConfig {
    let mut config = ClientConfig::new();
    // Operator extras first, so the settings below always win.
    for option in extra {
        config.set(option.key.as_str(), option.value.as_str());
    }
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Every partition is assigned at an explicit position; an offset that is out
        // of range (deleted by retention) must be an error, never a silent jump.
        .set("auto.offset.reset", "error")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", "5000")
        // librdkafka stops prefetching for this long once its queue is full; the
        // default (1 s) leaves the loop idle after every flush pause (measured:
        // 0.81 → 0.97 of a raw consumer's rate on tansu).
        .set("fetch.queue.backoff.ms", "10");
    config
}

/// Runs the aggregator until `shutdown` resolves, with the store at `config.store`.
pub async fn run(
    config: AggregatorConfig,
    registry: Registry,
    health: Health,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AggregatorError> {
    let store = tally_sink::open_store(&config.store, &config.scylla_options()).await?;
    run_with_store(config, store, registry, health, shutdown).await
}

/// Runs the aggregator with an already opened store (used by `tally dev`).
pub async fn run_with_store(
    config: AggregatorConfig,
    store: Arc<dyn WindowStore>,
    registry: Registry,
    health: Health,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AggregatorError> {
    let engine_config = config.engine_config()?;
    config.validate_kafka_options()?;
    let metrics = AggregatorMetrics::new(&registry)?;
    // The settings that decide sums are pinned at first use; other values refuse.
    let pinned = tally_sink::pin_settings(store.as_ref(), engine_config.sum_settings()).await?;
    info!(settings = %pinned.current().settings(), "settings pinned in the store");

    let protocol = Protocol::new(ProtocolConfig {
        engine: engine_config,
        accept_data_loss: config.accept_data_loss,
        max_outstanding_letters: MAX_OUTSTANDING_LETTERS,
        idle_markers: (!config.idle_after.is_zero()).then(|| IdleMarkers {
            idle_after_ms: i64::try_from(config.idle_after.as_millis()).unwrap_or(i64::MAX),
            stamp_lag_ms: i64::try_from(config.idle_marker_lag.as_millis()).unwrap_or(i64::MAX),
        }),
    });
    let dead_letters = dead_letters::DeadLetters::new(
        DeadLetterProducer::with_options(
            &config.brokers,
            &config.dlq_topic,
            config.dlq_delivery_timeout,
            &config.kafka_options,
        )?,
        config.topic.clone(),
    );
    let (writes, to_write) = tokio::sync::mpsc::channel(WRITE_QUEUE);
    let shell = Arc::new(Shell::new(
        config.topic.clone(),
        config.group.clone(),
        store,
        metrics,
        health,
        config.revoke_timeout,
        protocol,
        writes,
        dead_letters,
    ));
    let consumer: Arc<AggregatorConsumer> = Arc::new(
        consumer_config(&config.brokers, &config.group, &config.kafka_options)
            .create_with_context(AggregatorContext::new(Arc::clone(&shell)))?,
    );
    shell.set_consumer(&consumer);
    shell.start_committer().map_err(|err| {
        AggregatorError::Fatal(format!("could not start the commit thread: {err}"))
    })?;
    let writer = writer::spawn(
        Arc::clone(&shell),
        to_write,
        writer::WriterSettings {
            breaker_threshold: config.breaker_threshold,
            breaker_probe_interval: config.breaker_probe_interval,
            retry_max_delay: config.retry_max_delay,
        },
    );
    consumer.subscribe(&[&config.topic])?;
    info!(topic = %config.topic, group = %config.group, store = %shell.store.describe(), "aggregator running");

    consume(&shell, &consumer, config.flush_interval, shutdown).await;

    // Leaving the group gets the last part of the shutdown deadline.
    let until = Instant::now() + config.shutdown_timeout;
    let for_close = (config.shutdown_timeout / 5).min(Duration::from_secs(2));
    let result = if shell.stopped() {
        // Stop without writing or committing: a restart replays from the last commit.
        let reason = shell
            .health
            .readiness()
            .err()
            .unwrap_or_else(|| "stopped".into());
        Err(AggregatorError::Fatal(reason))
    } else {
        shut_down(&shell, until - for_close).await;
        Ok(())
    };
    writer.abort();
    close(consumer, until.saturating_duration_since(Instant::now())).await;
    result
}

/// The loop: records in batches, flush ticks, until shutdown or a stop.
async fn consume(
    shell: &Arc<Shell>,
    consumer: &Arc<AggregatorConsumer>,
    flush_interval: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut gauges = gauges::Gauges::default();
    let mut last_range_check: Option<Instant> = None;
    // One stream for the whole loop: `StreamConsumer::recv` builds a stream per
    // call, which registers and unregisters a waker slot (two mutex round trips)
    // for every record.
    let mut messages = consumer.stream();
    loop {
        if shell.stopped() {
            return;
        }
        let may_read = shell.protocol().may_read();
        tokio::select! {
            biased;
            () = &mut shutdown => return,
            _ = tick.tick() => {
                let now = now_ms();
                shell.handle_and_execute(Event::FlushTick { now_ms: now });
                gauges.update(shell, now);
            }
            () = shell.progress.notified(), if !may_read => {}
            // A Kafka message stream never ends (`None` is not produced).
            Some(message) = messages.next(), if may_read => {
                let mut batch = Vec::with_capacity(BATCH);
                let mut errors = Vec::new();
                match message {
                    Ok(message) => batch.push(message),
                    Err(err) => errors.push(err),
                }
                // Whatever is already fetched, without waiting.
                while batch.len() < BATCH && errors.is_empty() {
                    match messages.next().now_or_never() {
                        Some(Some(Ok(message))) => batch.push(message),
                        Some(Some(Err(err))) => errors.push(err),
                        Some(None) | None => break,
                    }
                }
                records(shell, consumer, &batch);
                drop(batch);
                for err in errors {
                    consumer_error(shell, consumer, err, &mut last_range_check);
                }
            }
        }
    }
}

/// One lock for the whole batch; commands executed after it is released.
fn records(shell: &Arc<Shell>, consumer: &AggregatorConsumer, batch: &[BorrowedMessage<'_>]) {
    if batch.is_empty() {
        return;
    }
    let now_ms = now_ms();
    let mut commands = Vec::new();
    {
        let mut protocol = shell.protocol();
        for message in batch {
            let (marker, redriven_from) = tally_headers(message);
            let record = Record {
                partition: message.partition(),
                offset: message.offset(),
                timestamp_ms: message.timestamp().to_millis(),
                key: message.key(),
                value: message.payload(),
                redriven_from,
                marker,
            };
            protocol.handle_into(Event::Record { record, now_ms }, &mut commands);
        }
    }
    shell.execute(commands, consumer);
}

fn consumer_error(
    shell: &Arc<Shell>,
    consumer: &AggregatorConsumer,
    err: KafkaError,
    last_check: &mut Option<Instant>,
) {
    match err {
        KafkaError::PartitionEOF(_) => {}
        // `auto.offset.reset=error`: some partition's position is out of range. Ask
        // the broker what every owned partition still holds; the protocol decides.
        KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset) => {
            if last_check.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last_check = Some(Instant::now());
            warn!("a partition's offset is out of range: checking what the log still holds");
            let owned = shell.protocol().owned();
            for partition in owned {
                let range = tokio::task::block_in_place(|| {
                    consumer.fetch_watermarks(&shell.topic, partition, Duration::from_secs(10))
                });
                match range {
                    Ok((log_start, log_end)) => {
                        let commands = shell.handle(Event::LogRange {
                            partition,
                            log_start,
                            log_end,
                        });
                        shell.execute(commands, consumer);
                    }
                    Err(err) => warn!(partition, %err, "could not read the partition's offsets"),
                }
            }
        }
        err => warn!(%err, "consumer error"),
    }
}

/// Whether the record is an idle marker (`tally.marker` header). `tally verify` asks
/// the same question of the records it re-reads.
pub fn is_marker(message: &impl Message) -> bool {
    message.headers().is_some_and(|headers| {
        headers
            .iter()
            .any(|header| header.key == tally_schemas::names::MARKER_HEADER)
    })
}

/// Whether the record is an idle marker (as [`is_marker`]) and its
/// `tally.redriven-from` header, if `tally dlq redrive` put one there.
///
/// One `headers()` call per record: librdkafka parses a record's headers on every
/// call when it has none (it caches only a non-empty list), at the cost of a buffer
/// allocation, and that was a quarter of the loop's time when done twice.
fn tally_headers<'a>(message: &'a BorrowedMessage<'_>) -> (bool, Option<&'a [u8]>) {
    let Some(headers) = message.headers() else {
        return (false, None);
    };
    let mut marker = false;
    // The first `tally.redriven-from` header counts, as before.
    let mut redriven_from = None;
    for header in headers.iter() {
        if header.key == tally_schemas::names::MARKER_HEADER {
            marker = true;
        } else if header.key == tally_schemas::names::REDRIVEN_HEADER && redriven_from.is_none() {
            redriven_from = Some(header.value);
        }
    }
    (marker, redriven_from.flatten())
}

/// The last flush of every partition and one synchronous commit, all before
/// `until`; what does not make it is handed over uncommitted (replayed later).
async fn shut_down(shell: &Arc<Shell>, until: Instant) {
    let owned = shell.protocol().owned();
    shell.handle_and_execute(Event::Shutdown);
    let settled = rebalance::wait_until(shell, until, {
        let owned = owned.clone();
        move |shell: &Shell| shell.protocol().revoke_ready(&owned)
    })
    .await;
    if !settled {
        warn!("shutdown deadline reached with writes or dead letters outstanding");
    }
    let commands = shell.handle(Event::RevokeSettled { partitions: owned });
    let shell = Arc::clone(shell);
    let committed = tokio::task::spawn_blocking(move || {
        for command in commands {
            match command {
                crate::protocol::Command::Commit { offsets, .. } => {
                    let patience = until
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(200));
                    if !shell.commit_sync(&offsets, patience) {
                        return false;
                    }
                }
                other => {
                    if let Some(consumer) = shell.consumer() {
                        shell.execute(vec![other], consumer.as_ref());
                    }
                }
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    if committed && settled {
        info!("aggregator stopped cleanly");
    } else {
        warn!("stopped with uncommitted work; the next owner replays it");
    }
}

/// Closes the consumer (leaving the group), giving up after `patience`: with every
/// broker gone librdkafka's close can block for a long time, and nothing is lost by
/// not waiting (the group's session times out instead).
async fn close(consumer: Arc<AggregatorConsumer>, patience: Duration) {
    // A thread of its own, not the blocking pool: the runtime would wait for it.
    let (closed, done) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("tally-close".into())
        .spawn(move || {
            consumer.unsubscribe();
            drop(consumer);
            let _ = closed.send(());
        });
    if spawned.is_err() {
        warn!("could not start the closing thread");
        return;
    }
    if tokio::time::timeout(patience, done).await.is_err() {
        warn!(
            ?patience,
            "the consumer did not close in time; leaving it to the process exit"
        );
    }
}
