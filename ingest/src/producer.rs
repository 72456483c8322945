//! The Kafka side of the edge: an idempotent producer whose acknowledgements decide
//! every `202`, and the readiness probe.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::Serialize;
use tally_schemas::names::REQUEST_ID_HEADER;
use tally_schemas::Increment;

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

pub(crate) struct RecordProducer {
    producer: FutureProducer,
    topic: String,
    delivery_timeout: Duration,
    ready_timeout: Duration,
    metrics: IngestMetrics,
    /// Last readiness verdict; the async mutex also makes concurrent probes wait for
    /// the one in progress instead of each starting a blocking metadata request.
    last_readiness: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl RecordProducer {
    pub(crate) fn new(config: &IngestConfig, metrics: IngestMetrics) -> Result<Self, IngestError> {
        let producer: FutureProducer = producer_config(config).create()?;
        Ok(RecordProducer {
            producer,
            topic: config.topic.clone(),
            delivery_timeout: config.delivery_timeout,
            ready_timeout: config.ready_timeout,
            metrics,
            last_readiness: tokio::sync::Mutex::new(None),
        })
    }

    /// Produces the increments and waits until the broker acknowledged every one of
    /// them, at most the delivery timeout (and never past the request's deadline).
    /// Returns their positions in input order.
    ///
    /// All records are enqueued before the first wait, so a batch costs one round trip,
    /// not one per record. On failure some records may still be written: the caller
    /// answers 503 ("not known to be durable"), never 202.
    pub(crate) async fn produce(
        &self,
        increments: &[Increment],
        request_id: &RequestId,
        accepted_at_ms: i64,
        request_deadline: tokio::time::Instant,
    ) -> Result<Vec<RecordPosition>, IngestError> {
        let deadline = request_deadline.min(tokio::time::Instant::now() + self.delivery_timeout);
        let record_count = increments.len() as u64;
        let mut deliveries = Vec::with_capacity(increments.len());
        for (index, increment) in increments.iter().enumerate() {
            // Enqueueing 10 000 records takes milliseconds: let other requests run.
            if index % ENQUEUE_YIELD_EVERY == ENQUEUE_YIELD_EVERY - 1 {
                tokio::task::yield_now().await;
            }
            let key = increment.canonical_key();
            let value = increment.to_json();
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                key: REQUEST_ID_HEADER,
                value: Some(request_id.as_bytes()),
            });
            let record = FutureRecord::to(&self.topic)
                .key(key.as_str())
                .payload(value.as_str())
                .timestamp(accepted_at_ms)
                .headers(headers);
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    self.metrics
                        .observe_produce_error(ProduceErrorKind::QueueFull, record_count);
                    return Err(IngestError::QueueFull);
                }
                Err((error, _)) => {
                    self.metrics
                        .observe_produce_error(ProduceErrorKind::EnqueueFailed, record_count);
                    return Err(IngestError::BrokerUnavailable {
                        detail: format!("could not enqueue the record: {error}"),
                    });
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
            let failure = match outcome {
                Ok(Ok(Ok(delivered))) => {
                    positions.push(RecordPosition {
                        partition: delivered.partition,
                        offset: delivered.offset,
                    });
                    continue;
                }
                Ok(Ok(Err((
                    KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
                    _,
                )))) => (
                    ProduceErrorKind::TimedOut,
                    "librdkafka gave up on the record after the delivery timeout".to_owned(),
                ),
                Ok(Ok(Err((error, _)))) => (
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
            let (kind, detail) = failure;
            self.metrics.observe_produce_error(kind, record_count);
            return Err(IngestError::BrokerUnavailable { detail });
        }
        self.metrics.observe_records_accepted(record_count);
        Ok(positions)
    }

    /// Ready when the producer is healthy and a broker answers a metadata request for
    /// the topic (which exists and has partitions) within the ready timeout.
    pub(crate) async fn check_ready(&self) -> Result<(), IngestError> {
        let mut last = self.last_readiness.lock().await;
        if let Some((checked_at, verdict)) = last.as_ref() {
            if checked_at.elapsed() < READINESS_CACHE_TIME {
                return verdict.clone().map_err(IngestError::NotReady);
            }
        }
        let producer = self.producer.clone();
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
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }

    pub(crate) fn in_flight_records(&self) -> i32 {
        self.producer.in_flight_count()
    }
}

fn probe_metadata(producer: &FutureProducer, topic: &str, timeout: Duration) -> Result<(), String> {
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
        // Bounded producer queue: when full, requests get 503 queue_full at once.
        .set(
            "queue.buffering.max.messages",
            config.max_queued_records.to_string(),
        )
        // Small produce requests are latency-bound: do not let Nagle hold them back.
        .set("socket.nagle.disable", "true")
        // Reconnect to a returning broker within a second (as Java clients do), not
        // librdkafka's default of up to 10 s.
        .set("reconnect.backoff.max.ms", "1000");
    client_config
}
