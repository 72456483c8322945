//! The Kafka side of the edge: an idempotent producer whose acknowledgements decide
//! every `202`, the admission of records into its bounded queue, and the readiness
//! probe.
//!
//! Admission is all or nothing per request: the request first reserves room for every
//! one of its records ([`QueueRoom`]) and only then enqueues any. So a `503 queue_full`
//! means nothing of that request was produced. Each record gives its slot back when
//! librdkafka reports it (delivered, failed or timed out), not when the request stops
//! waiting, so the count always covers what librdkafka still holds.

use std::sync::atomic::{AtomicI64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use serde::Serialize;
use tally_schemas::names::REQUEST_ID_HEADER;
use tally_schemas::Increment;
use tokio::sync::oneshot;

use crate::config::IngestConfig;
use crate::error::IngestError;
use crate::metrics::{IngestMetrics, ProduceErrorKind};
use crate::request_id::RequestId;

/// How long a readiness verdict is reused, so a storm of `/readyz` calls costs at most
/// one metadata request per interval.
const READINESS_CACHE_TIME: Duration = Duration::from_secs(1);

/// A large batch yields to the scheduler after this many enqueued records.
const ENQUEUE_YIELD_EVERY: usize = 512;

/// Where the broker stored one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct RecordPosition {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

/// Room in the producer queue, counted in records: the edge's own admission limit
/// (`--max-queued-records`). librdkafka's limit is set above it (see
/// [`producer_config`]) so librdkafka never refuses a record that was admitted here.
#[derive(Debug)]
pub(crate) struct QueueRoom {
    capacity: usize,
    used: AtomicUsize,
}

impl QueueRoom {
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(QueueRoom {
            capacity,
            used: AtomicUsize::new(0),
        })
    }

    /// Reserves room for `records` records at once, or for none of them.
    pub(crate) fn try_reserve(self: &Arc<Self>, records: usize) -> Option<Reservation> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(records)
                    .filter(|total| *total <= self.capacity)
            })
            .ok()?;
        Some(Reservation {
            room: Arc::clone(self),
            records,
        })
    }

    /// Records reserved right now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn release(&self, records: usize) {
        self.used.fetch_sub(records, Ordering::AcqRel);
    }
}

/// Room for some records; what is not handed out as [`Slot`]s is given back on drop.
#[derive(Debug)]
pub(crate) struct Reservation {
    room: Arc<QueueRoom>,
    records: usize,
}

impl Reservation {
    /// One record's slot, travelling with the record through librdkafka.
    fn take_slot(&mut self) -> Option<Slot> {
        self.records = self.records.checked_sub(1)?;
        Some(Slot {
            room: Arc::clone(&self.room),
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.records > 0 {
            self.room.release(self.records);
        }
    }
}

/// One record's room in the queue, given back when dropped.
#[derive(Debug)]
struct Slot {
    room: Arc<QueueRoom>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.room.release(1);
    }
}

/// What travels with a record through librdkafka and comes back in its delivery report.
struct PendingDelivery {
    reply: oneshot::Sender<Result<RecordPosition, KafkaError>>,
    slot: Slot,
}

/// Answers each delivery report: frees the record's slot, then wakes the request
/// waiting for it (if it still waits).
struct DeliveryReports;

impl ClientContext for DeliveryReports {}

impl ProducerContext for DeliveryReports {
    type DeliveryOpaque = Box<PendingDelivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Box<PendingDelivery>) {
        let outcome = match result {
            Ok(message) => Ok(RecordPosition {
                partition: message.partition(),
                offset: message.offset(),
            }),
            Err((error, _message)) => Err(error.clone()),
        };
        let PendingDelivery { reply, slot } = *pending;
        drop(slot);
        // The request may have stopped waiting (its 503 is already sent).
        let _ = reply.send(outcome);
    }
}

/// How the in-memory stand-in answers (see [`RecordProducer::in_memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StandInMode {
    /// Every record is acknowledged at once (partition 0, consecutive offsets).
    Acknowledge = 0,
    /// Every request finds the queue full.
    QueueFull = 1,
    /// The "broker" never acknowledges: every request gets `503 broker_unavailable`
    /// and `/readyz` is not ready.
    Unavailable = 2,
}

impl StandInMode {
    fn from_u8(value: u8) -> StandInMode {
        match value {
            1 => StandInMode::QueueFull,
            2 => StandInMode::Unavailable,
            _ => StandInMode::Acknowledge,
        }
    }
}

enum Backend {
    Kafka {
        producer: Arc<ThreadedProducer<DeliveryReports>>,
        /// Last readiness verdict; the async mutex also makes concurrent probes wait for
        /// the one in progress instead of each starting a blocking metadata request.
        last_readiness: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
    },
    /// No broker at all: for the fuzz target and the tests of the HTTP layer.
    InMemory {
        mode: AtomicU8,
        next_offset: AtomicI64,
    },
}

pub(crate) struct RecordProducer {
    backend: Backend,
    room: Arc<QueueRoom>,
    topic: String,
    delivery_timeout: Duration,
    ready_timeout: Duration,
    metrics: IngestMetrics,
}

impl RecordProducer {
    pub(crate) fn new(config: &IngestConfig, metrics: IngestMetrics) -> Result<Self, IngestError> {
        let producer: ThreadedProducer<DeliveryReports> =
            producer_config(config).create_with_context(DeliveryReports)?;
        Ok(Self::with_backend(
            config,
            metrics,
            Backend::Kafka {
                producer: Arc::new(producer),
                last_readiness: tokio::sync::Mutex::new(None),
            },
        ))
    }

    /// A stand-in for Kafka that keeps nothing: it answers as `mode` says, through the
    /// same admission ([`QueueRoom`]) as the real producer.
    pub(crate) fn in_memory(config: &IngestConfig, metrics: IngestMetrics) -> Self {
        Self::with_backend(
            config,
            metrics,
            Backend::InMemory {
                mode: AtomicU8::new(StandInMode::Acknowledge as u8),
                next_offset: AtomicI64::new(0),
            },
        )
    }

    fn with_backend(config: &IngestConfig, metrics: IngestMetrics, backend: Backend) -> Self {
        RecordProducer {
            backend,
            room: QueueRoom::new(config.max_queued_records),
            topic: config.topic.clone(),
            delivery_timeout: config.delivery_timeout,
            ready_timeout: config.ready_timeout,
            metrics,
        }
    }

    /// Changes how the in-memory stand-in answers; no effect on the Kafka producer.
    pub(crate) fn set_stand_in_mode(&self, new_mode: StandInMode) {
        if let Backend::InMemory { mode, .. } = &self.backend {
            mode.store(new_mode as u8, Ordering::Relaxed);
        }
    }

    /// Produces the increments and waits until the broker acknowledged every one of
    /// them, at most the delivery timeout (and never past the request's deadline).
    /// Returns their positions in input order.
    ///
    /// Room for every record is reserved before the first is enqueued: without room
    /// for all of them the answer is `QueueFull` and nothing was enqueued. All records
    /// are enqueued before the first wait, so a batch costs one round trip, not one per
    /// record. When the wait fails some records may still be written: the caller
    /// answers 503 ("not known to be durable"), never 202.
    pub(crate) async fn produce(
        &self,
        increments: &[Increment],
        request_id: &RequestId,
        accepted_at_ms: i64,
        request_deadline: tokio::time::Instant,
    ) -> Result<Vec<RecordPosition>, IngestError> {
        let record_count = increments.len() as u64;
        let Some(reservation) = self.room.try_reserve(increments.len()) else {
            self.metrics
                .observe_produce_error(ProduceErrorKind::QueueFull, record_count);
            return Err(IngestError::QueueFull);
        };
        let deadline = request_deadline.min(tokio::time::Instant::now() + self.delivery_timeout);
        let positions = match &self.backend {
            Backend::Kafka { producer, .. } => {
                self.produce_to_kafka(
                    producer,
                    increments,
                    reservation,
                    request_id,
                    accepted_at_ms,
                    deadline,
                )
                .await
            }
            Backend::InMemory { mode, next_offset } => {
                let mode = StandInMode::from_u8(mode.load(Ordering::Relaxed));
                Self::produce_in_memory(mode, next_offset, increments.len(), deadline).await
            }
        };
        match positions {
            Ok(positions) => {
                self.metrics.observe_records_accepted(record_count);
                Ok(positions)
            }
            Err((kind, error)) => {
                self.metrics.observe_produce_error(kind, record_count);
                Err(error)
            }
        }
    }

    async fn produce_to_kafka(
        &self,
        producer: &ThreadedProducer<DeliveryReports>,
        increments: &[Increment],
        mut reservation: Reservation,
        request_id: &RequestId,
        accepted_at_ms: i64,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<RecordPosition>, (ProduceErrorKind, IngestError)> {
        let mut deliveries = Vec::with_capacity(increments.len());
        for (index, increment) in increments.iter().enumerate() {
            // Enqueueing 10 000 records takes milliseconds: let other requests run.
            if index % ENQUEUE_YIELD_EVERY == ENQUEUE_YIELD_EVERY - 1 {
                tokio::task::yield_now().await;
            }
            let Some(slot) = reservation.take_slot() else {
                // Cannot happen: the reservation holds one slot per increment.
                return Err((
                    ProduceErrorKind::EnqueueFailed,
                    IngestError::Internal("queue reservation too small".to_owned()),
                ));
            };
            let (reply, delivery) = oneshot::channel();
            let key = increment.canonical_key();
            let value = increment.to_json();
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                key: REQUEST_ID_HEADER,
                value: Some(request_id.as_bytes()),
            });
            let record =
                BaseRecord::with_opaque_to(&self.topic, Box::new(PendingDelivery { reply, slot }))
                    .key(key.as_str())
                    .payload(value.as_str())
                    .timestamp(accepted_at_ms)
                    .headers(headers);
            match producer.send(record) {
                Ok(()) => deliveries.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // librdkafka's limit is twice the admission limit, so this means
                    // the accounting is wrong; the records before this one may still be
                    // written.
                    tracing::warn!(
                        enqueued = index,
                        "librdkafka refused a record the edge had room for; part of the request may be written"
                    );
                    return Err((ProduceErrorKind::QueueFull, IngestError::QueueFull));
                }
                Err((error, _)) => {
                    return Err((
                        ProduceErrorKind::EnqueueFailed,
                        IngestError::BrokerUnavailable {
                            detail: format!("could not enqueue the record: {error}"),
                        },
                    ));
                }
            }
        }

        // One timer for the whole request, armed only if an ack is not already there.
        let expiry = tokio::time::sleep_until(deadline);
        tokio::pin!(expiry);
        let mut positions = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let outcome = tokio::select! {
                biased;
                outcome = delivery => Ok(outcome),
                () = &mut expiry => Err(()),
            };
            let (kind, detail) = match outcome {
                Ok(Ok(Ok(position))) => {
                    positions.push(position);
                    continue;
                }
                Ok(Ok(Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)))) => (
                    ProduceErrorKind::TimedOut,
                    "librdkafka gave up on the record after the delivery timeout".to_owned(),
                ),
                Ok(Ok(Err(error))) => (
                    ProduceErrorKind::DeliveryFailed,
                    format!("delivery failed: {error}"),
                ),
                Ok(Err(_canceled)) => (
                    ProduceErrorKind::Canceled,
                    "the producer closed before reporting the delivery".to_owned(),
                ),
                Err(()) => (
                    ProduceErrorKind::TimedOut,
                    format!(
                        "no acknowledgement within {}",
                        humantime::format_duration(self.delivery_timeout)
                    ),
                ),
            };
            return Err((kind, IngestError::BrokerUnavailable { detail }));
        }
        Ok(positions)
    }

    async fn produce_in_memory(
        mode: StandInMode,
        next_offset: &AtomicI64,
        records: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<RecordPosition>, (ProduceErrorKind, IngestError)> {
        match mode {
            StandInMode::Acknowledge => {
                let count = i64::try_from(records).unwrap_or(i64::MAX);
                let first = next_offset.fetch_add(count, Ordering::Relaxed);
                Ok((0..count)
                    .map(|index| RecordPosition {
                        partition: 0,
                        offset: first.saturating_add(index),
                    })
                    .collect())
            }
            StandInMode::QueueFull => Err((ProduceErrorKind::QueueFull, IngestError::QueueFull)),
            StandInMode::Unavailable => {
                tokio::time::sleep_until(deadline).await;
                Err((
                    ProduceErrorKind::TimedOut,
                    IngestError::BrokerUnavailable {
                        detail: "the in-memory stand-in is set to unavailable".to_owned(),
                    },
                ))
            }
        }
    }

    /// Ready when the producer is healthy and a broker answers a metadata request for
    /// the topic (which exists and has partitions) within the ready timeout.
    pub(crate) async fn check_ready(&self) -> Result<(), IngestError> {
        let (producer, last_readiness) = match &self.backend {
            Backend::Kafka {
                producer,
                last_readiness,
            } => (producer, last_readiness),
            Backend::InMemory { mode, .. } => {
                return match StandInMode::from_u8(mode.load(Ordering::Relaxed)) {
                    StandInMode::Unavailable => Err(IngestError::NotReady(
                        "the in-memory stand-in is set to unavailable".to_owned(),
                    )),
                    _ => Ok(()),
                };
            }
        };
        let mut last = last_readiness.lock().await;
        if let Some((checked_at, verdict)) = last.as_ref() {
            if checked_at.elapsed() < READINESS_CACHE_TIME {
                return verdict.clone().map_err(IngestError::NotReady);
            }
        }
        let producer = Arc::clone(producer);
        let topic = self.topic.clone();
        let timeout = self.ready_timeout;
        // fetch_metadata blocks its thread; keep it off the async workers.
        let verdict =
            tokio::task::spawn_blocking(move || probe_metadata(&producer, &topic, timeout))
                .await
                .unwrap_or_else(|join_error| Err(format!("readiness probe failed: {join_error}")));
        *last = Some((Instant::now(), verdict.clone()));
        verdict.map_err(IngestError::NotReady)
    }

    /// Waits until every enqueued record was delivered or failed, at most `timeout`.
    pub(crate) async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let Backend::Kafka { producer, .. } = &self.backend else {
            return Ok(());
        };
        let producer = Arc::clone(producer);
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }

    /// Records admitted and not yet reported by librdkafka.
    pub(crate) fn in_flight_records(&self) -> usize {
        self.room.used()
    }
}

fn probe_metadata(
    producer: &ThreadedProducer<DeliveryReports>,
    topic: &str,
    timeout: Duration,
) -> Result<(), String> {
    if let Some((code, reason)) = producer.client().fatal_error() {
        return Err(format!("the producer failed fatally ({code:?}): {reason}"));
    }
    let metadata = producer
        .client()
        .fetch_metadata(Some(topic), timeout)
        .map_err(|error| format!("broker metadata not reachable: {error}"))?;
    let topic_metadata = metadata
        .topics()
        .iter()
        .find(|candidate| candidate.name() == topic)
        .ok_or_else(|| format!("topic {topic:?} missing from broker metadata"))?;
    if let Some(error) = topic_metadata.error() {
        return Err(format!(
            "topic {topic:?} unavailable: {:?}",
            RDKafkaErrorCode::from(error)
        ));
    }
    if topic_metadata.partitions().is_empty() {
        return Err(format!("topic {topic:?} has no partitions"));
    }
    Ok(())
}

/// librdkafka's own queue limit: twice the admission limit. A slot is given back in
/// the delivery callback, a moment before librdkafka frees the record, so librdkafka
/// may briefly hold more than the edge admitted; at most one delivery report's worth,
/// which is no more than the admission limit.
fn librdkafka_queue_limit(max_queued_records: usize) -> usize {
    max_queued_records.saturating_mul(2).min(i32::MAX as usize)
}

/// The producer settings the `202` promise rests on.
fn producer_config(config: &IngestConfig) -> ClientConfig {
    let mut client_config = ClientConfig::new();
    // Operator extras first, so the settings below always win (validate() also refuses
    // overriding them).
    for option in &config.kafka_options {
        client_config.set(option.key.as_str(), option.value.as_str());
    }
    let linger_ms = config.linger.as_secs_f64() * 1000.0;
    client_config
        .set("bootstrap.servers", config.brokers.as_str())
        .set("client.id", "tally-ingest")
        // Durability: every in-sync replica has the record before the 202; retries
        // cannot duplicate or reorder records.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        // Same key -> same partition as Java clients (murmur2 of the key bytes).
        .set("partitioner", "murmur2_random")
        // librdkafka gives up on a record when the client's wait ends.
        .set(
            "message.timeout.ms",
            config.delivery_timeout.as_millis().to_string(),
        )
        .set("linger.ms", format!("{linger_ms:.3}"))
        // The queue is bounded by the edge's admission (`QueueRoom`, in records, which
        // also bounds its bytes: a record is a few hundred bytes at most). librdkafka's
        // limits sit above it so that an admitted record is never refused halfway
        // through a batch.
        .set(
            "queue.buffering.max.messages",
            librdkafka_queue_limit(config.max_queued_records).to_string(),
        )
        .set("queue.buffering.max.kbytes", i32::MAX.to_string())
        // Small produce requests are latency-bound: do not let Nagle hold them back.
        .set("socket.nagle.disable", "true")
        // Reconnect to a returning broker within a second (as Java clients do), not
        // librdkafka's default of up to 10 s.
        .set("reconnect.backoff.max.ms", "1000");
    client_config
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn room_is_reserved_for_a_whole_request_or_not_at_all() {
        let room = QueueRoom::new(10);
        let first = room.try_reserve(4);
        assert!(first.is_some());
        assert_eq!(room.used(), 4);
        // 4 + 7 > 10: refused, and nothing of it is counted.
        assert!(room.try_reserve(7).is_none());
        assert_eq!(room.used(), 4);
        let second = room.try_reserve(6);
        assert!(second.is_some());
        assert!(room.try_reserve(1).is_none());
        drop(first);
        assert_eq!(room.used(), 6);
        assert!(room.try_reserve(usize::MAX).is_none());
        assert_eq!(room.used(), 6);
    }

    #[test]
    fn slots_are_given_back_one_by_one_and_the_rest_on_drop() {
        let room = QueueRoom::new(3);
        let mut reservation = room.try_reserve(3).unwrap();
        let slot_a = reservation.take_slot();
        let slot_b = reservation.take_slot();
        assert!(slot_a.is_some() && slot_b.is_some());
        assert_eq!(room.used(), 3);
        // The slots outlive the reservation: they stay counted until their records
        // are reported.
        drop(reservation);
        assert_eq!(room.used(), 2);
        drop(slot_a);
        assert_eq!(room.used(), 1);
        drop(slot_b);
        assert_eq!(room.used(), 0);
        let mut one = room.try_reserve(1).unwrap();
        assert!(one.take_slot().is_some());
        assert!(one.take_slot().is_none());
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_capacity() {
        let room = QueueRoom::new(100);
        let peak = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for size in (1..=30).cycle().take(5_000) {
                        if let Some(reservation) = room.try_reserve(size) {
                            peak.fetch_max(room.used(), Ordering::Relaxed);
                            drop(reservation);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 100);
        assert_eq!(room.used(), 0);
    }

    #[test]
    fn librdkafka_limit_stays_above_the_admission_limit() {
        assert_eq!(librdkafka_queue_limit(100_000), 200_000);
        assert_eq!(librdkafka_queue_limit(usize::MAX), i32::MAX as usize);
    }
}
