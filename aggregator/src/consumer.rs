//! The consumer loop: Kafka → window engine → store, committing only after the flush.
//!
//! One task owns the loop. Per-partition engines live behind a mutex shared with the
//! rdkafka context, because rebalance callbacks run inside `recv()` and must reach
//! them: on revoke a partition is flushed, written and committed (bounded by
//! `--revoke-timeout`) before it is handed over; on assign its engine is rebuilt
//! from the committed checkpoint.
//!
//! Order of effects in a flush: dead letters acknowledged → rows written → store
//! checkpoints written → Kafka commit (with the checkpoint as metadata). A crash
//! between any two steps leaves a state from which a restart replays to the same
//! store contents, because every row write is a version-guarded upsert.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::BackoffBuilder;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use prometheus::Registry;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tally_schemas::{decode_increment, Checkpoint, RejectReason};
use tally_sink::dlq::{DeadLetter, DeadLetterProducer};
use tally_sink::store::CheckpointScope;
use tally_sink::{SinkError, WindowRow, WindowStore};
use tracing::{debug, error, info, warn};

use crate::breaker::{CircuitBreaker, CircuitState};
use crate::config::AggregatorConfig;
use crate::engine::{EngineConfig, PartitionEngine, RecordOutcome, Resume};
use crate::error::AggregatorError;
use crate::metrics::AggregatorMetrics;

/// Dead letters awaiting their broker acknowledgement before the loop stops
/// reading to wait for some (keeps memory bounded).
const MAX_DEAD_LETTERS_IN_FLIGHT: usize = 1024;
/// Longest a single store call may take before it counts as failed.
const STORE_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an assignment waits for the store's checkpoint before the process stops.
const ASSIGN_LOOKUP_PATIENCE: Duration = Duration::from_secs(120);
/// Deadline for fetching committed offsets on assignment.
const COMMITTED_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// One owned partition.
struct PartitionState {
    engine: PartitionEngine,
    /// Distinguishes this ownership from earlier ones of the same partition, so late
    /// acknowledgements and stale checkpoints of a previous owner period are ignored.
    assignment: u64,
    /// Source offsets of dead letters not yet acknowledged by Kafka.
    unacked_dead_letters: BTreeSet<i64>,
    /// Last offset committed for this partition during this ownership.
    committed: Option<i64>,
}

/// State shared by the loop and the rebalance callbacks.
struct Shared {
    topic: String,
    group: String,
    engine_config: EngineConfig,
    store: Arc<dyn WindowStore>,
    metrics: AggregatorMetrics,
    revoke_timeout: Duration,
    partitions: Mutex<HashMap<i32, PartitionState>>,
    high_watermarks: Mutex<HashMap<i32, i64>>,
    next_assignment: AtomicU64,
    /// True while the circuit is open: newly assigned partitions start paused.
    paused: AtomicBool,
    /// True while a flush's rows are not yet durable (the store failed): a revoked
    /// partition must then be handed over uncommitted, because its earlier rows may
    /// exist only in that unwritten flush.
    unwritten_flush: AtomicBool,
    /// Held by the task writing a flush; a revoke takes it to wait for that write
    /// before deciding whether the partition may be committed.
    write_gate: Arc<tokio::sync::Mutex<()>>,
    /// Set when the aggregator cannot go on safely (see `Shared::fail`).
    fatal: Mutex<Option<String>>,
    runtime: tokio::runtime::Handle,
}

impl Shared {
    async fn write_durably(
        &self,
        pending: &PendingFlush,
        probe_first: bool,
    ) -> Result<Vec<(i32, u64, Checkpoint)>, SinkError> {
        let store = &self.store;
        let timed = |what: &'static str| {
            move |_| {
                SinkError::Unavailable(format!("{what} timed out after {STORE_CALL_TIMEOUT:?}"))
            }
        };
        if probe_first {
            tokio::time::timeout(STORE_CALL_TIMEOUT, store.probe())
                .await
                .map_err(timed("probe"))??;
        }
        if !pending.rows.is_empty() {
            tokio::time::timeout(STORE_CALL_TIMEOUT, store.write_rows(&pending.rows))
                .await
                .map_err(timed("row write"))??;
        }
        // Only checkpoints whose store row was written may be committed to Kafka
        // (brokers that drop commit metadata rely on that row).
        let mut saved = Vec::with_capacity(pending.checkpoints.len());
        for (partition, assignment, checkpoint) in &pending.checkpoints {
            if !self.may_commit(*partition, *assignment, checkpoint) {
                continue;
            }
            let scope = self.scope(*partition);
            tokio::time::timeout(
                STORE_CALL_TIMEOUT,
                store.save_checkpoint(&scope, checkpoint),
            )
            .await
            .map_err(timed("checkpoint write"))??;
            saved.push((*partition, *assignment, *checkpoint));
        }
        Ok(saved)
    }

    /// A checkpoint may be committed only by the ownership that produced it, only
    /// forward, and only once every dead letter before it was acknowledged.
    fn may_commit(&self, partition: i32, assignment: u64, checkpoint: &Checkpoint) -> bool {
        let partitions = self.partitions();
        let Some(state) = partitions.get(&partition) else {
            return false;
        };
        state.assignment == assignment
            && state
                .committed
                .is_none_or(|done| checkpoint.next_offset > done)
            && state
                .unacked_dead_letters
                .first()
                .is_none_or(|offset| *offset >= checkpoint.next_offset)
    }

    fn partitions(&self) -> MutexGuard<'_, HashMap<i32, PartitionState>> {
        // A poisoned lock means a panic elsewhere already; the data is still
        // consistent per partition, so keep going rather than cascade.
        self.partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn scope(&self, partition: i32) -> CheckpointScope {
        CheckpointScope {
            group: self.group.clone(),
            topic: self.topic.clone(),
            partition,
        }
    }

    /// Runs a store future to completion from a synchronous rebalance callback.
    fn block_on<F: Future>(&self, future: F) -> Option<F::Output> {
        match self.runtime.runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => {
                warn!("rebalance on a current-thread runtime: cannot wait for the store");
                None
            }
            _ => Some(tokio::task::block_in_place(|| {
                self.runtime.block_on(future)
            })),
        }
    }

    /// Decides where an assigned partition resumes, from the Kafka commit metadata,
    /// else the store checkpoint saved for the committed offset, else (an offset reset
    /// by external tools) an external-reset resume with a new generation.
    fn resume_for(&self, partition: i32, offset: Offset, metadata: &str) -> Option<Resume> {
        let Offset::Offset(committed) = offset else {
            // Never committed: start from the earliest record with no history.
            return Some(Resume::Checkpoint(Checkpoint::fresh(0)));
        };
        match Checkpoint::from_metadata(metadata, committed) {
            Ok(checkpoint) => return Some(Resume::Checkpoint(checkpoint)),
            Err(err) if !metadata.is_empty() => {
                debug!(partition, %err, "commit metadata is not usable")
            }
            Err(_) => {}
        }
        let scope = self.scope(partition);
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        // Without the store's checkpoint neither the exact state nor the generation to
        // write with can be known, so guessing is not an option: retry, then stop.
        let lookup = self.block_on(async move {
            let mut delays = backon::ExponentialBuilder::default()
                .with_jitter()
                .with_max_delay(Duration::from_secs(5))
                .with_total_delay(Some(ASSIGN_LOOKUP_PATIENCE))
                .build();
            loop {
                let attempt = async {
                    let exact = store.load_checkpoint(&scope, Some(committed)).await?;
                    let latest = match exact {
                        Some(_) => None,
                        None => store.load_checkpoint(&scope, None).await?,
                    };
                    Ok::<_, SinkError>((exact, latest))
                };
                match attempt.await {
                    Ok(found) => return Ok(found),
                    Err(err) => {
                        metrics.store_errors.inc();
                        match delays.next() {
                            Some(delay) => {
                                warn!(partition, %err, retry_in = ?delay, "store checkpoint lookup failed");
                                tokio::time::sleep(delay).await;
                            }
                            None => return Err(err),
                        }
                    }
                }
            }
        });
        match lookup {
            Some(Ok((Some(checkpoint), _))) => Some(Resume::Checkpoint(checkpoint)),
            Some(Ok((None, latest))) => {
                let generation = latest.map_or(1, |c| c.generation.saturating_add(1));
                info!(
                    partition,
                    committed, generation, "offset without Tally state: external reset"
                );
                Some(Resume::ExternalReset {
                    next_offset: committed,
                    generation,
                })
            }
            Some(Err(err)) => {
                self.fail(format!(
                    "partition {partition}: the store checkpoint for offset {committed} could not be read: {err}"
                ));
                None
            }
            None => {
                self.fail(format!(
                    "partition {partition}: cannot wait for the store on this runtime"
                ));
                None
            }
        }
    }

    /// Records a condition the aggregator cannot continue under; the loop stops
    /// without committing and `run` returns the error (a restart replays).
    fn fail(&self, reason: String) {
        error!(%reason, "aggregator must stop");
        let mut fatal = self
            .fatal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        fatal.get_or_insert(reason);
    }

    fn fatal(&self) -> Option<String> {
        self.fatal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The rdkafka context: rebalance callbacks, commit results, statistics.
pub struct AggregatorContext {
    shared: Arc<Shared>,
}

impl ClientContext for AggregatorContext {
    fn stats(&self, statistics: Statistics) {
        let mut marks = self
            .shared
            .high_watermarks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(topic) = statistics.topics.get(&self.shared.topic) {
            for (id, partition) in &topic.partitions {
                if *id >= 0 && partition.hi_offset >= 0 {
                    marks.insert(*id, partition.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for AggregatorContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            for element in list.elements_for_topic(&self.shared.topic) {
                self.revoke(consumer, element.partition());
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => self.assign(consumer, list),
            Rebalance::Revoke(_) => {}
            Rebalance::Error(err) => error!(%err, "rebalance error"),
        }
    }
}

impl AggregatorContext {
    /// Stop the partition, write what it holds, commit, drop its state.
    fn revoke(&self, consumer: &BaseConsumer<Self>, partition: i32) {
        let Some(mut state) = self.shared.partitions().remove(&partition) else {
            return;
        };
        // A flush may be being written right now (in the background): wait for it, so
        // the decision below sees whether those rows became durable.
        let gate = self.shared.write_gate.clone();
        let timeout = self.shared.revoke_timeout;
        let write_settled = self
            .shared
            .block_on(async move { tokio::time::timeout(timeout, gate.lock_owned()).await })
            .is_some_and(|locked| locked.is_ok());
        if !write_settled || self.shared.unwritten_flush.load(Ordering::Relaxed) {
            info!(
                partition,
                "revoked while a flush is not durable: handing over uncommitted"
            );
            return;
        }
        let flush = state.engine.flush();
        let Some(checkpoint) = flush.checkpoint else {
            info!(
                partition,
                "revoked before its reset anchor was read: nothing to commit"
            );
            return;
        };
        let blocked_by_dead_letters = state
            .unacked_dead_letters
            .first()
            .is_some_and(|offset| *offset < checkpoint.next_offset);
        if blocked_by_dead_letters {
            info!(
                partition,
                "revoked with dead letters unacknowledged: handing over uncommitted"
            );
            return;
        }
        let store = self.shared.store.clone();
        let scope = self.shared.scope(partition);
        let timeout = self.shared.revoke_timeout;
        let rows = flush.rows;
        let written = self.shared.block_on(async move {
            tokio::time::timeout(timeout, async {
                store.write_rows(&rows).await?;
                store.save_checkpoint(&scope, &checkpoint).await
            })
            .await
        });
        match written {
            Some(Ok(Ok(()))) => {
                let list = commit_list(&self.shared.topic, &[(partition, checkpoint)]);
                match list.and_then(|list| consumer.commit(&list, CommitMode::Sync)) {
                    Ok(()) => {
                        self.shared.metrics.commits.with_label_values(&["ok"]).inc();
                        info!(
                            partition,
                            offset = checkpoint.next_offset,
                            "revoked and committed"
                        );
                    }
                    Err(err) => {
                        self.shared
                            .metrics
                            .commits
                            .with_label_values(&["error"])
                            .inc();
                        warn!(partition, %err, "commit on revoke failed; the next owner replays");
                    }
                }
            }
            Some(Ok(Err(err))) => {
                self.shared.metrics.store_errors.inc();
                warn!(partition, %err, "store write on revoke failed; the next owner replays");
            }
            Some(Err(_)) => warn!(
                partition,
                "store write on revoke timed out; the next owner replays"
            ),
            None => {}
        }
        self.shared
            .metrics
            .assigned_partitions
            .set(i64::try_from(self.shared.partitions().len()).unwrap_or(i64::MAX));
    }

    fn assign(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        let committed = consumer.committed_offsets(list.clone(), COMMITTED_FETCH_TIMEOUT);
        let committed = match committed {
            Ok(committed) => committed,
            Err(err) => {
                // Without the committed offsets the state cannot be rebuilt exactly.
                self.shared.fail(format!(
                    "could not fetch committed offsets on assignment: {err}"
                ));
                return;
            }
        };
        let mut adopted = TopicPartitionList::new();
        for element in committed.elements_for_topic(&self.shared.topic) {
            let partition = element.partition();
            let Some(resume) =
                self.shared
                    .resume_for(partition, element.offset(), element.metadata())
            else {
                continue;
            };
            info!(partition, ?resume, "assigned");
            let engine = PartitionEngine::new(self.shared.engine_config, partition, resume);
            let assignment = self.shared.next_assignment.fetch_add(1, Ordering::Relaxed);
            self.shared.partitions().insert(
                partition,
                PartitionState {
                    engine,
                    assignment,
                    unacked_dead_letters: BTreeSet::new(),
                    committed: None,
                },
            );
            adopted.add_partition(&self.shared.topic, partition);
        }
        if self.shared.paused.load(Ordering::Relaxed) {
            if let Err(err) = consumer.pause(&adopted) {
                warn!(%err, "could not pause newly assigned partitions");
            }
        }
        self.shared
            .metrics
            .assigned_partitions
            .set(i64::try_from(self.shared.partitions().len()).unwrap_or(i64::MAX));
    }
}

/// The offsets (with checkpoint metadata) to commit for some partitions of `topic`.
fn commit_list(topic: &str, checkpoints: &[(i32, Checkpoint)]) -> KafkaResult<TopicPartitionList> {
    let mut list = TopicPartitionList::new();
    for (partition, checkpoint) in checkpoints {
        list.add_partition_offset(topic, *partition, Offset::Offset(checkpoint.next_offset))?;
        if let Some(mut element) = list.find_partition(topic, *partition) {
            element.set_metadata(checkpoint.to_metadata());
        }
    }
    Ok(list)
}

/// A dead letter with owned bytes, kept until Kafka acknowledges it.
#[derive(Clone)]
struct OwnedDeadLetter {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    reason: RejectReason,
    error: String,
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    redriven_from: Option<Vec<u8>>,
    assignment: u64,
}

type DeadLetterFuture =
    Pin<Box<dyn Future<Output = (OwnedDeadLetter, Result<(), SinkError>)> + Send>>;

/// What a background flush write reports back to the loop.
struct WriteOutcome {
    pending: PendingFlush,
    /// On success, the checkpoints whose store rows were written (to commit).
    result: Result<Vec<(i32, u64, Checkpoint)>, SinkError>,
    elapsed: Duration,
}

/// Rows and checkpoints of one flush, kept until they are durable.
struct PendingFlush {
    rows: Vec<WindowRow>,
    checkpoints: Vec<(i32, u64, Checkpoint)>,
}

/// The loop's own state (not shared with callbacks).
struct Loop {
    shared: Arc<Shared>,
    consumer: Arc<StreamConsumer<AggregatorContext>>,
    dead_letters: Arc<DeadLetterProducer>,
    in_flight: FuturesUnordered<DeadLetterFuture>,
    retry_letters: VecDeque<OwnedDeadLetter>,
    pending: Option<PendingFlush>,
    /// The flush being written in the background (at most one at a time).
    writing: Option<tokio::task::JoinHandle<WriteOutcome>>,
    breaker: CircuitBreaker,
    backoff: backon::ExponentialBackoff,
    backoff_builder: backon::ExponentialBuilder,
    next_retry_at: Option<Instant>,
    dlq_topic_source: String,
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
        .set("auto.offset.reset", "earliest")
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
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AggregatorError> {
    let store = tally_sink::open_store(&config.store, &config.scylla_options()).await?;
    run_with_store(config, store, registry, shutdown).await
}

/// Runs the aggregator with an already opened store (used by `tally dev`).
pub async fn run_with_store(
    config: AggregatorConfig,
    store: Arc<dyn WindowStore>,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AggregatorError> {
    let engine_config = config.engine_config()?;
    config.validate_kafka_options()?;
    let metrics = AggregatorMetrics::new(&registry)?;
    let shared = Arc::new(Shared {
        topic: config.topic.clone(),
        group: config.group.clone(),
        engine_config,
        store,
        metrics,
        revoke_timeout: config.revoke_timeout,
        partitions: Mutex::new(HashMap::new()),
        high_watermarks: Mutex::new(HashMap::new()),
        next_assignment: AtomicU64::new(1),
        paused: AtomicBool::new(false),
        unwritten_flush: AtomicBool::new(false),
        write_gate: Arc::new(tokio::sync::Mutex::new(())),
        fatal: Mutex::new(None),
        runtime: tokio::runtime::Handle::current(),
    });
    let consumer: StreamConsumer<AggregatorContext> =
        consumer_config(&config.brokers, &config.group, &config.kafka_options)
            .create_with_context(AggregatorContext {
                shared: shared.clone(),
            })?;
    consumer.subscribe(&[&config.topic])?;
    let dead_letters = DeadLetterProducer::with_options(
        &config.brokers,
        &config.dlq_topic,
        config.dlq_delivery_timeout,
        &config.kafka_options,
    )?;
    let backoff_builder = backon::ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(config.retry_max_delay)
        .without_max_times();
    let mut event_loop = Loop {
        shared,
        consumer: Arc::new(consumer),
        dead_letters: Arc::new(dead_letters),
        in_flight: FuturesUnordered::new(),
        retry_letters: VecDeque::new(),
        pending: None,
        writing: None,
        breaker: CircuitBreaker::new(config.breaker_threshold, config.breaker_probe_interval),
        backoff: backoff_builder.build(),
        backoff_builder,
        next_retry_at: None,
        dlq_topic_source: config.topic.clone(),
    };
    info!(topic = %config.topic, group = %config.group, store = %event_loop.shared.store.describe(), "aggregator running");
    event_loop.run(config.flush_interval, shutdown).await;
    if let Some(reason) = event_loop.shared.fatal() {
        // Stop without writing or committing: a restart replays from the last commit.
        if let Some(writing) = event_loop.writing.take() {
            writing.abort();
        }
        event_loop.consumer.unsubscribe();
        return Err(AggregatorError::Fatal(reason));
    }
    event_loop.shut_down(config.shutdown_timeout).await;
    Ok(())
}

impl Loop {
    async fn run(&mut self, flush_interval: Duration, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let consumer = self.consumer.clone();
        // Flushes are written in the background so the loop keeps reading meanwhile.
        let mut writing = self.writing.take();
        loop {
            if self.shared.fatal().is_some() {
                break;
            }
            let reading = self.in_flight.len() < MAX_DEAD_LETTERS_IN_FLIGHT;
            let is_writing = writing.is_some();
            let write_done = async {
                match writing.as_mut() {
                    Some(handle) => handle.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some((letter, result)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.on_dead_letter_done(letter, result);
                }
                outcome = write_done, if is_writing => {
                    writing = None;
                    self.finish_write(outcome);
                }
                _ = tick.tick() => {
                    if writing.is_none() {
                        writing = self.flush_cycle();
                    } else {
                        self.update_gauges();
                    }
                }
                message = consumer.recv(), if reading => match message {
                    Ok(message) => self.on_message(&message),
                    Err(err) => warn!(%err, "consumer error"),
                },
            }
        }
        self.writing = writing;
    }

    fn on_message(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) {
        if let Some(letter) = self.judge(message) {
            self.send_dead_letter(letter);
        }
    }

    /// Decodes one record and feeds it to its partition's engine; returns the dead
    /// letter to send if it cannot be counted. The per-record path: one uncontended
    /// lock, no allocation unless the record is rejected.
    fn judge(&self, message: &rdkafka::message::BorrowedMessage<'_>) -> Option<OwnedDeadLetter> {
        let partition = message.partition();
        let offset = message.offset();
        let timestamp_ms = message.timestamp().to_millis();
        let outcomes = &self.shared.metrics.outcomes;
        let mut partitions = self.shared.partitions();
        let Some(state) = partitions.get_mut(&partition) else {
            warn!(
                partition,
                offset, "record for a partition without state; skipped"
            );
            return None;
        };
        if offset < state.engine.next_offset() {
            return None; // Already processed in this ownership (a refetch after a seek).
        }
        let (reason, error) = match message.payload().map(decode_increment) {
            Some(Ok(increment)) => {
                let outcome = state.engine.record(
                    offset,
                    increment.key,
                    timestamp_ms.unwrap_or(-1),
                    increment.value,
                    now_ms(),
                );
                match outcome {
                    RecordOutcome::Counted => {
                        outcomes.counted.inc();
                        return None;
                    }
                    RecordOutcome::AlreadyFinal => {
                        outcomes.already_final.inc();
                        return None;
                    }
                    RecordOutcome::Rejected(reason) => {
                        outcomes.rejected(reason).inc();
                        (reason, engine_rejection_text(reason, timestamp_ms))
                    }
                }
            }
            Some(Err(invalid)) => {
                state.engine.skip(offset);
                outcomes.poison.inc();
                (invalid.reason, invalid.detail)
            }
            None => {
                state.engine.skip(offset);
                outcomes.poison.inc();
                (RejectReason::InvalidJson, "record has no value".to_owned())
            }
        };
        state.unacked_dead_letters.insert(offset);
        Some(OwnedDeadLetter {
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            reason,
            error,
            partition,
            offset,
            timestamp_ms,
            redriven_from: redriven_from(message),
            assignment: state.assignment,
        })
    }

    fn send_dead_letter(&mut self, letter: OwnedDeadLetter) {
        let producer = self.dead_letters.clone();
        let source_topic = self.dlq_topic_source.clone();
        self.in_flight.push(Box::pin(async move {
            let result = producer
                .send(&DeadLetter {
                    key: letter.key.as_deref(),
                    payload: letter.payload.as_deref(),
                    reason: letter.reason,
                    error: &letter.error,
                    source_topic: &source_topic,
                    source_partition: letter.partition,
                    source_offset: letter.offset,
                    source_timestamp_ms: letter.timestamp_ms,
                    redriven_from: letter.redriven_from.as_deref(),
                })
                .await;
            (letter, result)
        }));
    }

    fn on_dead_letter_done(&mut self, letter: OwnedDeadLetter, result: Result<(), SinkError>) {
        match result {
            Ok(()) => {
                self.shared
                    .metrics
                    .dlq_writes
                    .with_label_values(&[letter.reason.code()])
                    .inc();
                if let Some(state) = self.shared.partitions().get_mut(&letter.partition) {
                    if state.assignment == letter.assignment {
                        state.unacked_dead_letters.remove(&letter.offset);
                    }
                }
            }
            Err(err) => {
                warn!(%err, partition = letter.partition, offset = letter.offset, "dead letter not acknowledged; will retry");
                self.retry_letters.push_back(letter);
            }
        }
    }

    /// One tick: retry dead letters, then start writing either the pending flush
    /// or a new one.
    fn flush_cycle(&mut self) -> Option<tokio::task::JoinHandle<WriteOutcome>> {
        let retries: Vec<_> = self.retry_letters.drain(..).collect();
        for letter in retries {
            self.send_dead_letter(letter);
        }
        self.update_gauges();
        if self.pending.is_none() {
            self.pending = Some(self.take_flush());
        }
        if let Some(at) = self.next_retry_at {
            if Instant::now() < at {
                return None;
            }
        }
        self.start_write()
    }

    fn take_flush(&mut self) -> PendingFlush {
        let mut rows = Vec::new();
        let mut checkpoints = Vec::new();
        for (partition, state) in self.shared.partitions().iter_mut() {
            let flush = state.engine.flush();
            rows.extend(flush.rows);
            if let Some(checkpoint) = flush.checkpoint {
                checkpoints.push((*partition, state.assignment, checkpoint));
            }
        }
        PendingFlush { rows, checkpoints }
    }

    /// Starts writing the pending flush through the circuit breaker, in a task of
    /// its own; [`Loop::finish_write`] commits once it is durable.
    fn start_write(&mut self) -> Option<tokio::task::JoinHandle<WriteOutcome>> {
        let pending = self.pending.take()?;
        if !self.breaker.try_acquire(Instant::now()) {
            self.pending = Some(pending);
            return None;
        }
        // Only revokes take the gate, and they run inside this loop's `recv`, so it
        // is free here; if not, try again next tick.
        let Ok(gate) = self.shared.write_gate.clone().try_lock_owned() else {
            self.pending = Some(pending);
            return None;
        };
        let probing = self.breaker.state() == CircuitState::HalfOpen;
        self.shared
            .metrics
            .circuit_state
            .set(self.breaker.state() as i64);
        // Until this write succeeds its rows are not durable: a revoke meanwhile must
        // not commit (it waits on the gate, then reads this flag).
        self.shared.unwritten_flush.store(true, Ordering::Relaxed);
        let shared = Arc::clone(&self.shared);
        Some(tokio::spawn(async move {
            let started = Instant::now();
            let result = shared.write_durably(&pending, probing).await;
            if result.is_ok() {
                shared.unwritten_flush.store(false, Ordering::Relaxed);
            }
            drop(gate);
            WriteOutcome {
                pending,
                result,
                elapsed: started.elapsed(),
            }
        }))
    }

    /// Handles a finished background write: commit on success, schedule a retry
    /// (and maybe open the circuit) on failure.
    fn finish_write(&mut self, outcome: Result<WriteOutcome, tokio::task::JoinError>) {
        let WriteOutcome {
            pending,
            result,
            elapsed,
        } = match outcome {
            Ok(outcome) => outcome,
            Err(err) => {
                // The rows of that flush are gone from memory and their windows are
                // no longer dirty: no later checkpoint may be committed.
                self.shared
                    .fail(format!("the flush writer task failed: {err}"));
                return;
            }
        };
        match result {
            Ok(saved) => {
                self.shared
                    .metrics
                    .flush_duration
                    .observe(elapsed.as_secs_f64());
                let finals = pending.rows.iter().filter(|row| row.is_final).count();
                let metrics = &self.shared.metrics;
                metrics
                    .rows_written
                    .with_label_values(&["final"])
                    .inc_by(finals as u64);
                metrics
                    .rows_written
                    .with_label_values(&["provisional"])
                    .inc_by((pending.rows.len() - finals) as u64);
                let was_open = self.breaker.state() != CircuitState::Closed;
                self.breaker.on_success();
                self.backoff = self.backoff_builder.build();
                self.next_retry_at = None;
                if was_open {
                    info!("store is back: circuit closed, resuming partitions");
                    self.set_paused(false);
                }
                self.commit(&saved);
            }
            Err(err) if !err.is_retryable() => {
                // A schema mismatch or bad configuration does not heal by retrying:
                // stop loudly without committing (DESIGN: permanent errors).
                self.shared.metrics.store_errors.inc();
                self.shared
                    .fail(format!("permanent store error, nothing committed: {err}"));
                self.pending = Some(pending);
            }
            Err(err) => {
                self.shared.metrics.store_errors.inc();
                let opened = self.breaker.on_failure(Instant::now());
                let delay = self.backoff.next().unwrap_or(Duration::from_secs(1));
                self.next_retry_at = Some(Instant::now() + delay);
                warn!(%err, retry_in = ?delay, "store write failed; nothing committed");
                if opened {
                    warn!("circuit open: pausing partitions until a probe write succeeds");
                    self.set_paused(true);
                }
                self.pending = Some(pending);
            }
        }
        self.shared
            .metrics
            .circuit_state
            .set(self.breaker.state() as i64);
    }

    fn commit(&self, checkpoints: &[(i32, u64, Checkpoint)]) {
        let committable: Vec<(i32, Checkpoint)> = checkpoints
            .iter()
            .filter(|(partition, assignment, checkpoint)| {
                self.shared.may_commit(*partition, *assignment, checkpoint)
            })
            .map(|(partition, _, checkpoint)| (*partition, *checkpoint))
            .collect();
        if committable.is_empty() {
            return;
        }
        // Synchronous, so the result is known (and counted) here; it costs one round
        // trip per flush interval, off the per-record path.
        let result = commit_list(&self.shared.topic, &committable).and_then(|list| {
            match self.shared.runtime.runtime_flavor() {
                tokio::runtime::RuntimeFlavor::CurrentThread => {
                    self.consumer.commit(&list, CommitMode::Sync)
                }
                _ => tokio::task::block_in_place(|| self.consumer.commit(&list, CommitMode::Sync)),
            }
        });
        match result {
            Ok(()) => {
                self.shared.metrics.commits.with_label_values(&["ok"]).inc();
                let mut partitions = self.shared.partitions();
                for (partition, checkpoint) in committable {
                    if let Some(state) = partitions.get_mut(&partition) {
                        state.committed = Some(checkpoint.next_offset);
                    }
                }
            }
            Err(err) => {
                self.shared
                    .metrics
                    .commits
                    .with_label_values(&["error"])
                    .inc();
                warn!(%err, "offset commit failed; the next flush retries");
            }
        }
    }

    fn set_paused(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::Relaxed);
        let assignment = match self.consumer.assignment() {
            Ok(assignment) => assignment,
            Err(err) => {
                warn!(%err, "could not read the assignment");
                return;
            }
        };
        let result = if paused {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        if let Err(err) = result {
            warn!(%err, paused, "could not change partition pause state");
        }
    }

    fn update_gauges(&self) {
        let now = now_ms();
        let marks = self
            .shared
            .high_watermarks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let metrics = &self.shared.metrics;
        let partitions = self.shared.partitions();
        let mut groups = 0usize;
        let mut cells = 0usize;
        let mut oldest_unflushed: Option<i64> = None;
        for (partition, state) in partitions.iter() {
            let engine = &state.engine;
            groups += engine.open_window_groups();
            cells += engine.open_windows();
            if let Some(since) = engine.unflushed_since_ms() {
                oldest_unflushed = Some(oldest_unflushed.map_or(since, |o| o.min(since)));
            }
            let label = partition.to_string();
            if let Some(watermark) = engine.watermark_ms() {
                metrics
                    .watermark_lag
                    .with_label_values(&[&label])
                    .observe((now - watermark).max(0) as f64 / 1000.0);
            }
            if let Some(high) = marks.get(partition) {
                metrics
                    .consumer_lag
                    .with_label_values(&[&label])
                    .set((high - engine.next_offset()).max(0));
            }
        }
        metrics
            .open_windows
            .set(i64::try_from(groups).unwrap_or(i64::MAX));
        metrics
            .keys_in_memory
            .set(i64::try_from(cells).unwrap_or(i64::MAX));
        metrics
            .freshness
            .set(oldest_unflushed.map_or(0.0, |since| (now - since).max(0) as f64 / 1000.0));
    }

    /// Stop reading, wait for dead letters, write the last flush, commit synchronously.
    async fn shut_down(&mut self, deadline: Duration) {
        let work = async {
            if let Some(writing) = self.writing.take() {
                let outcome = writing.await;
                self.finish_write(outcome);
            }
            while let Some((letter, result)) = self.in_flight.next().await {
                self.on_dead_letter_done(letter, result);
            }
            let retries: Vec<_> = self.retry_letters.drain(..).collect();
            for letter in retries {
                self.send_dead_letter(letter);
            }
            while let Some((letter, result)) = self.in_flight.next().await {
                self.on_dead_letter_done(letter, result);
            }
            let fresh = self.take_flush();
            let pending = match self.pending.take() {
                Some(mut older) => {
                    older.rows.extend(fresh.rows);
                    older.checkpoints = fresh.checkpoints;
                    older
                }
                None => fresh,
            };
            let saved = loop {
                match self.shared.write_durably(&pending, false).await {
                    Ok(saved) => break saved,
                    Err(err) => {
                        warn!(%err, "final store write failed; retrying until the shutdown deadline");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            };
            self.commit(&saved);
        };
        match tokio::time::timeout(deadline, work).await {
            Ok(()) => info!("aggregator stopped cleanly"),
            Err(_) => warn!("shutdown deadline passed; uncommitted work will be replayed"),
        }
        self.consumer.unsubscribe();
    }
}

/// The `tally.redriven-from` header of a record, if `tally dlq redrive` put it there.
fn redriven_from(message: &rdkafka::message::BorrowedMessage<'_>) -> Option<Vec<u8>> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    headers
        .iter()
        .find(|header| header.key == tally_schemas::names::REDRIVEN_HEADER)
        .and_then(|header| header.value.map(<[u8]>::to_vec))
}

fn engine_rejection_text(reason: RejectReason, timestamp_ms: Option<i64>) -> String {
    match reason {
        RejectReason::Late => format!(
            "event time {timestamp_ms:?} falls in a window already closed by the partition watermark"
        ),
        RejectReason::FutureTimestamp => {
            format!("event time {timestamp_ms:?} is too far ahead of the wall clock")
        }
        RejectReason::SumOverflow => "the window sum would overflow i64".to_owned(),
        RejectReason::InvalidTimestamp => "record has no usable timestamp".to_owned(),
        other => other.code().to_owned(),
    }
}
