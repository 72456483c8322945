//! The dead-letter producer: records that can never be counted go to `increments.dlq`
//! with their original key and bytes, and headers saying why and where from.
//!
//! The aggregator treats a source offset as processed only after [`DeadLetterProducer::send`]
//! returned `Ok`, i.e. after the broker acknowledged the dead letter (acks=all,
//! idempotent producer). A failed send is never a reason to drop the record. It is one
//! of two errors, decided by [`classify`]:
//! - [`SinkError::DeadLetter`] (retryable): the broker is down, slow or busy; the same
//!   send may succeed later.
//! - [`SinkError::DeadLetterUndeliverable`] (not retryable, [`SinkError::undeliverable`]
//!   names the [`Undeliverable`] kind): the letter is too large for the topic, the
//!   topic does not exist, the producer is not authorised, or the producer can no
//!   longer send at all. Retrying would block the partition forever; the caller must
//!   stop loudly without committing past the record.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tally_schemas::{names, RejectReason};

use crate::error::SinkError;

/// `dlq.error` is cut to this many bytes, so the headers add a bounded amount to the
/// record: a dead-letter topic whose `max.message.bytes` is the input topic's plus
/// 2 KiB always fits a letter.
pub const MAX_ERROR_HEADER_BYTES: usize = 1024;

/// Why a dead letter can never be delivered as it is (see [`classify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Undeliverable {
    /// The record with its headers is larger than the producer's `message.max.bytes`
    /// or the topic's `max.message.bytes`.
    TooLarge,
    /// The broker refused the record itself (invalid record or timestamp, a message
    /// format without headers, a topic policy).
    Rejected,
    /// The topic (or partition) does not exist, as the cluster's metadata says.
    TopicMissing,
    /// The principal may not write to the topic or the cluster, or its credentials
    /// were refused.
    NotAuthorized,
    /// The producer cannot send any more (fatal idempotence error, fenced, or the
    /// broker lacks a feature it needs); only a new process can.
    ProducerUnusable,
}

impl Undeliverable {
    /// Every kind, for zero-initialised metrics.
    pub const ALL: [Undeliverable; 5] = [
        Undeliverable::TooLarge,
        Undeliverable::Rejected,
        Undeliverable::TopicMissing,
        Undeliverable::NotAuthorized,
        Undeliverable::ProducerUnusable,
    ];

    /// A stable snake_case name (log field and metric label).
    pub fn code(self) -> &'static str {
        match self {
            Undeliverable::TooLarge => "too_large",
            Undeliverable::Rejected => "rejected",
            Undeliverable::TopicMissing => "topic_missing",
            Undeliverable::NotAuthorized => "not_authorized",
            Undeliverable::ProducerUnusable => "producer_unusable",
        }
    }
}

/// What a failed dead-letter delivery means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryFailure {
    /// The same send may succeed later (broker down, timeouts, queue full, leader
    /// elections, a topic that the metadata has not shown yet).
    Transient,
    /// The same send can never succeed.
    Permanent(Undeliverable),
}

/// Classifies the error code of a failed produce (librdkafka's delivery report or
/// enqueue error). librdkafka already retries every retriable broker error until the
/// delivery deadline and then reports a local timeout, so a broker error code in a
/// delivery report is one it gave up on at once. Codes not named here are transient:
/// they are network, leadership, replication, throttling or shutdown conditions.
pub fn classify(code: RDKafkaErrorCode) -> DeliveryFailure {
    use RDKafkaErrorCode as E;
    let kind = match code {
        E::MessageSizeTooLarge | E::MessageBatchTooLarge | E::InvalidMessageSize => {
            Undeliverable::TooLarge
        }
        E::InvalidRecord
        | E::InvalidTimestamp
        | E::UnsupportedForMessageFormat
        | E::PolicyViolation
        | E::BadMessage
        | E::BadCompression
        | E::UnsupportedCompressionType
        | E::InvalidArgument => Undeliverable::Rejected,
        // A Produce response with UnknownTopicOrPartition only makes librdkafka refresh
        // its metadata and retry; a delivery report carries the code once the metadata
        // itself says the topic does not exist for `topic.metadata.propagation.max.ms`
        // (30 s by default), so here it means missing, not "still propagating".
        E::UnknownTopicOrPartition
        | E::UnknownTopicId
        | E::UnknownTopic
        | E::UnknownPartition
        | E::InvalidTopic => Undeliverable::TopicMissing,
        E::TopicAuthorizationFailed
        | E::ClusterAuthorizationFailed
        | E::TransactionalIdAuthorizationFailed
        | E::SaslAuthenticationFailed
        | E::Authentication => Undeliverable::NotAuthorized,
        E::Fatal
        | E::Fenced
        | E::ProducerFenced
        | E::Inconsistent
        | E::GaplessGuarantee
        | E::InvalidRequiredAcks
        | E::UnsupportedVersion
        | E::UnsupportedFeature
        | E::NotImplemented => Undeliverable::ProducerUnusable,
        _ => return DeliveryFailure::Transient,
    };
    DeliveryFailure::Permanent(kind)
}

/// Classifies a failed send. `fatal` is the producer's fatal error, if it has one
/// (`Client::fatal_error`): such a producer never sends again, and librdkafka fails
/// its queued messages with `Fatal` or `PurgeQueue`, so the fatal cause (for example
/// ClusterAuthorizationFailed while acquiring the idempotent producer id) decides.
pub fn classify_error(err: &KafkaError, fatal: Option<RDKafkaErrorCode>) -> DeliveryFailure {
    if let Some(cause) = fatal {
        return match classify(cause) {
            DeliveryFailure::Permanent(kind) => DeliveryFailure::Permanent(kind),
            DeliveryFailure::Transient => {
                DeliveryFailure::Permanent(Undeliverable::ProducerUnusable)
            }
        };
    }
    match err.rdkafka_error_code() {
        Some(code) => classify(code),
        // Canceled (the producer went away) and the like: nothing says it is final.
        None => DeliveryFailure::Transient,
    }
}

/// `text` cut to at most `max` bytes at a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

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
        // librdkafka declares a topic missing (and fails its messages with
        // UnknownTopicOrPartition, an undeliverable letter) only after this long; by
        // default (30 s) a shorter delivery deadline would hide it behind a timeout.
        // The operator may set it.
        config.set(
            "topic.metadata.propagation.max.ms",
            (timeout_ms / 2).clamp(1, 30_000).to_string(),
        );
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
            .insert(header(
                names::DLQ_ERROR_HEADER,
                truncated(letter.error, MAX_ERROR_HEADER_BYTES),
            ))
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
        let err = match self.producer.send(record, self.delivery_timeout).await {
            Ok(_delivery) => return Ok(()),
            Err((err, _message)) => err,
        };
        let fatal = self.producer.client().fatal_error();
        let mut detail = format!(
            "{} record from {}/{}@{} not acknowledged by {}: {err}",
            letter.reason.code(),
            letter.source_topic,
            letter.source_partition,
            letter.source_offset,
            self.topic
        );
        if let Some((_, reason)) = &fatal {
            detail.push_str(&format!(" (producer fatal error: {reason})"));
        }
        Err(
            match classify_error(&err, fatal.as_ref().map(|(code, _)| *code)) {
                DeliveryFailure::Transient => SinkError::DeadLetter(detail),
                DeliveryFailure::Permanent(kind) => {
                    SinkError::DeadLetterUndeliverable { kind, detail }
                }
            },
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use RDKafkaErrorCode as E;

    #[test]
    fn size_errors_are_too_large() {
        for code in [
            E::MessageSizeTooLarge,
            E::MessageBatchTooLarge,
            E::InvalidMessageSize,
        ] {
            assert_eq!(
                classify(code),
                DeliveryFailure::Permanent(Undeliverable::TooLarge),
                "{code:?}"
            );
        }
    }

    #[test]
    fn refused_records_are_rejected() {
        for code in [
            E::InvalidRecord,
            E::InvalidTimestamp,
            E::UnsupportedForMessageFormat,
            E::PolicyViolation,
            E::BadMessage,
            E::BadCompression,
            E::UnsupportedCompressionType,
            E::InvalidArgument,
        ] {
            assert_eq!(
                classify(code),
                DeliveryFailure::Permanent(Undeliverable::Rejected),
                "{code:?}"
            );
        }
    }

    #[test]
    fn a_topic_the_metadata_lacks_is_missing() {
        for code in [
            E::UnknownTopicOrPartition,
            E::UnknownTopicId,
            E::UnknownTopic,
            E::UnknownPartition,
            E::InvalidTopic,
        ] {
            assert_eq!(
                classify(code),
                DeliveryFailure::Permanent(Undeliverable::TopicMissing),
                "{code:?}"
            );
        }
    }

    #[test]
    fn authorization_and_authentication_failures_are_not_authorized() {
        for code in [
            E::TopicAuthorizationFailed,
            E::ClusterAuthorizationFailed,
            E::TransactionalIdAuthorizationFailed,
            E::SaslAuthenticationFailed,
            E::Authentication,
        ] {
            assert_eq!(
                classify(code),
                DeliveryFailure::Permanent(Undeliverable::NotAuthorized),
                "{code:?}"
            );
        }
    }

    #[test]
    fn a_producer_that_cannot_continue_is_unusable() {
        for code in [
            E::Fatal,
            E::Fenced,
            E::ProducerFenced,
            E::Inconsistent,
            E::GaplessGuarantee,
            E::InvalidRequiredAcks,
            E::UnsupportedVersion,
            E::UnsupportedFeature,
            E::NotImplemented,
        ] {
            assert_eq!(
                classify(code),
                DeliveryFailure::Permanent(Undeliverable::ProducerUnusable),
                "{code:?}"
            );
        }
    }

    #[test]
    fn outages_timeouts_and_busy_brokers_are_transient() {
        for code in [
            E::MessageTimedOut,
            E::OperationTimedOut,
            E::TimedOutQueue,
            E::RequestTimedOut,
            E::QueueFull,
            E::AllBrokersDown,
            E::BrokerTransportFailure,
            E::Resolve,
            E::LeaderNotAvailable,
            E::NotLeaderForPartition,
            E::BrokerNotAvailable,
            E::NetworkException,
            E::NotEnoughReplicas,
            E::NotEnoughReplicasAfterAppend,
            E::KafkaStorageError,
            E::ThrottlingQuotaExceeded,
            E::OutOfOrderSequenceNumber,
            E::UnknownProducerId,
            E::PurgeQueue,
            E::PurgeInflight,
            E::InvalidMessage,
        ] {
            assert_eq!(classify(code), DeliveryFailure::Transient, "{code:?}");
        }
    }

    #[test]
    fn a_fatal_producer_error_is_named_by_its_cause() {
        let fatal = KafkaError::MessageProduction(E::Fatal);
        let purged = KafkaError::MessageProduction(E::PurgeQueue);
        assert_eq!(
            classify_error(&purged, Some(E::ClusterAuthorizationFailed)),
            DeliveryFailure::Permanent(Undeliverable::NotAuthorized)
        );
        assert_eq!(
            classify_error(&fatal, Some(E::OutOfOrderSequenceNumber)),
            DeliveryFailure::Permanent(Undeliverable::ProducerUnusable)
        );
        assert_eq!(
            classify_error(&fatal, None),
            DeliveryFailure::Permanent(Undeliverable::ProducerUnusable)
        );
        // Without a fatal producer error, a purge is our own shutdown: transient.
        assert_eq!(classify_error(&purged, None), DeliveryFailure::Transient);
        assert_eq!(
            classify_error(&KafkaError::Canceled, None),
            DeliveryFailure::Transient
        );
        assert_eq!(
            classify_error(&KafkaError::MessageProduction(E::MessageSizeTooLarge), None),
            DeliveryFailure::Permanent(Undeliverable::TooLarge)
        );
    }

    #[test]
    fn undeliverable_errors_are_not_retryable_and_name_their_kind() {
        for kind in Undeliverable::ALL {
            let err = SinkError::DeadLetterUndeliverable {
                kind,
                detail: "x".into(),
            };
            assert!(!err.is_retryable());
            assert_eq!(err.undeliverable(), Some(kind));
            assert!(err.to_string().contains(kind.code()), "{err}");
        }
        let transient = SinkError::DeadLetter("broker down".into());
        assert!(transient.is_retryable());
        assert_eq!(transient.undeliverable(), None);
    }

    #[test]
    fn kind_codes_are_distinct_snake_case() {
        let codes: std::collections::HashSet<_> =
            Undeliverable::ALL.iter().map(|k| k.code()).collect();
        assert_eq!(codes.len(), Undeliverable::ALL.len());
        assert!(codes
            .iter()
            .all(|c| c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_')));
    }

    #[test]
    fn the_error_header_is_cut_at_a_character_boundary() {
        assert_eq!(truncated("short", 10), "short");
        let long = "é".repeat(600); // 1200 bytes, 2 per character
        let cut = truncated(&long, MAX_ERROR_HEADER_BYTES);
        assert_eq!(cut.len(), MAX_ERROR_HEADER_BYTES);
        assert_eq!(truncated("aé", 2), "a");
    }
}
