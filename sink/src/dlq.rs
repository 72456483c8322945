//! The dead-letter producer: records that can never be counted go to `increments.dlq`
//! with their original key and bytes, and headers saying why and where from.
//!
//! The aggregator treats a source offset as processed only after [`DeadLetterProducer::send`]
//! returned `Ok`, i.e. after the broker acknowledged the dead letter (acks=all,
//! idempotent producer). A failed send is a broker problem, never a reason to drop
//! the record: it is reported as the retryable [`SinkError::DeadLetter`].

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tally_schemas::{names, RejectReason};

use crate::error::SinkError;

/// One record to dead-letter, borrowed from the consumed message.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    /// The source record's key bytes, copied unchanged.
    pub key: Option<&'a [u8]>,
    /// The source record's value bytes, copied unchanged.
    pub payload: Option<&'a [u8]>,
    /// Why the record cannot be counted (`dlq.reason` = [`RejectReason::code`]).
    pub reason: RejectReason,
    /// Human-readable detail (`dlq.error`).
    pub error: &'a str,
    pub source_topic: &'a str,
    pub source_partition: i32,
    pub source_offset: i64,
    /// The source record's timestamp in ms; `None` leaves `dlq.source.timestamp` out.
    pub source_timestamp_ms: Option<i64>,
    /// The source record's `tally.redriven-from` header, copied so that a re-driven
    /// record that fails again is recognisable (and not re-driven in a loop).
    pub redriven_from: Option<&'a [u8]>,
}

/// An idempotent, acks=all Kafka producer for dead letters.
#[derive(Clone)]
pub struct DeadLetterProducer {
    producer: FutureProducer,
    topic: String,
    delivery_timeout: Duration,
}

impl std::fmt::Debug for DeadLetterProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterProducer")
            .field("topic", &self.topic)
            .field("delivery_timeout", &self.delivery_timeout)
            .finish_non_exhaustive()
    }
}

impl DeadLetterProducer {
    /// A producer for `topic` on `brokers`. `delivery_timeout` bounds how long one
    /// [`send`](Self::send) may take (librdkafka's `message.timeout.ms`, retries
    /// included); it must be at least 1 ms, since 0 would mean "forever".
    pub fn new(brokers: &str, topic: &str, delivery_timeout: Duration) -> Result<Self, SinkError> {
        Self::with_options(brokers, topic, delivery_timeout, &[])
    }

    /// Like [`new`](Self::new), with extra librdkafka settings (TLS, SASL, …) applied
    /// first, so the settings the delivery guarantee rests on always win.
    pub fn with_options(
        brokers: &str,
        topic: &str,
        delivery_timeout: Duration,
        extra: &[tally_schemas::KafkaOption],
    ) -> Result<Self, SinkError> {
        let timeout_ms = delivery_timeout.as_millis();
        if timeout_ms == 0 || timeout_ms > i32::MAX as u128 {
            return Err(SinkError::Config(format!(
                "dead-letter delivery timeout must be between 1 ms and {} ms, got {delivery_timeout:?}",
                i32::MAX
            )));
        }
        if topic.is_empty() {
            return Err(SinkError::Config(
                "dead-letter topic must not be empty".into(),
            ));
        }
        let mut config = ClientConfig::new();
        for option in extra {
            config.set(option.key.as_str(), option.value.as_str());
        }
        let producer: FutureProducer = config
            .set("bootstrap.servers", brokers)
            .set("client.id", "tally-dlq")
            // Exactly once per send and no reordering on retries; acks=all so an
            // acknowledged dead letter survives a broker loss.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", timeout_ms.to_string())
            // Each send is awaited by the consumer loop: batch briefly, not for long.
            .set("linger.ms", "5")
            .create()
            .map_err(|err| SinkError::Config(format!("dead-letter producer: {err}")))?;
        Ok(DeadLetterProducer {
            producer,
            topic: topic.to_owned(),
            delivery_timeout,
        })
    }

    /// The topic dead letters are written to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes one dead letter and returns once the broker acknowledged it.
    pub async fn send(&self, letter: &DeadLetter<'_>) -> Result<(), SinkError> {
        let partition = letter.source_partition.to_string();
        let offset = letter.source_offset.to_string();
        let timestamp = letter.source_timestamp_ms.map(|ts| ts.to_string());
        let mut headers = OwnedHeaders::new_with_capacity(6)
            .insert(header(names::DLQ_REASON_HEADER, letter.reason.code()))
            .insert(header(names::DLQ_ERROR_HEADER, letter.error))
            .insert(header(names::DLQ_SOURCE_TOPIC_HEADER, letter.source_topic))
            .insert(header(names::DLQ_SOURCE_PARTITION_HEADER, &partition))
            .insert(header(names::DLQ_SOURCE_OFFSET_HEADER, &offset));
        if let Some(timestamp) = &timestamp {
            headers = headers.insert(header(names::DLQ_SOURCE_TIMESTAMP_HEADER, timestamp));
        }
        if let Some(source) = letter.redriven_from {
            headers = headers.insert(Header {
                key: names::REDRIVEN_HEADER,
                value: Some(source),
            });
        }

        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = letter.key {
            record = record.key(key);
        }
        if let Some(payload) = letter.payload {
            record = record.payload(payload);
        }
        // The queue wait is bounded by the same deadline as delivery, so a send
        // returns within about twice the delivery timeout even if the local queue
        // stays full.
        match self.producer.send(record, self.delivery_timeout).await {
            Ok(_delivery) => Ok(()),
            Err((err, _message)) => Err(SinkError::DeadLetter(format!(
                "{} record from {}/{}@{} not acknowledged: {err}",
                letter.reason.code(),
                letter.source_topic,
                letter.source_partition,
                letter.source_offset
            ))),
        }
    }

    /// Waits up to `timeout` for queued dead letters to be delivered (shutdown).
    pub async fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        // librdkafka's flush blocks the calling thread.
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|err| SinkError::DeadLetter(format!("flush task failed: {err}")))?
            .map_err(|err| SinkError::DeadLetter(format!("flush: {err}")))
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}
