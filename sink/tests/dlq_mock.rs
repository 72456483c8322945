#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The dead-letter producer against librdkafka's mock cluster (the real Kafka
//! protocol over TCP): records come back byte for byte with every header, a send
//! with the brokers down fails within its delivery deadline as a retryable error,
//! and every permanent condition the mock can produce (too large, refused record,
//! missing topic, not authorised) is reported as undeliverable, at once.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tally_schemas::{names, KafkaOption, RejectReason};
use tally_sink::dlq::{DeadLetter, DeadLetterProducer, Undeliverable, MAX_ERROR_HEADER_BYTES};
use tally_sink::SinkError;

const BROKERS: i32 = 3;

struct Received {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

async fn consume(bootstrap: &str, topic: &str, count: usize) -> Vec<Received> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "dlq-test")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let mut received = Vec::new();
    while received.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("dead letter not consumed within 30 s")
            .unwrap();
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        received.push(Received {
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        });
    }
    received
}

fn header(name: &str, value: &str) -> (String, Option<Vec<u8>>) {
    (name.to_owned(), Some(value.as_bytes().to_vec()))
}

#[tokio::test]
async fn dead_letters_keep_bytes_and_carry_every_header() {
    let cluster = MockCluster::new(BROKERS).unwrap();
    cluster.create_topic(names::DLQ_TOPIC, 1, BROKERS).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let producer =
        DeadLetterProducer::new(&bootstrap, names::DLQ_TOPIC, Duration::from_secs(20)).unwrap();
    assert_eq!(producer.topic(), names::DLQ_TOPIC);

    // Not valid UTF-8 and not JSON: the bytes must come back unchanged.
    let poison: &[u8] = b"{\"key\": \xff\xfe not json";
    let key: &[u8] = b"0f0e0d0c-0000-4000-8000-000000000001";
    producer
        .send(&DeadLetter {
            key: Some(key),
            payload: Some(poison),
            reason: RejectReason::InvalidJson,
            error: "expected value at line 1 column 9",
            source_topic: names::INCREMENTS_TOPIC,
            source_partition: 7,
            source_offset: 123_456_789_012,
            source_timestamp_ms: Some(1_790_000_000_123),
            redriven_from: None,
        })
        .await
        .unwrap();
    // No key, no value, no timestamp (a tombstone-like record).
    producer
        .send(&DeadLetter {
            key: None,
            payload: None,
            reason: RejectReason::Late,
            error: "window [10000, 20000) closed at watermark 21000",
            source_topic: "direct",
            source_partition: 0,
            source_offset: 0,
            source_timestamp_ms: None,
            redriven_from: None,
        })
        .await
        .unwrap();
    producer.flush(Duration::from_secs(5)).await.unwrap();

    let received = consume(&bootstrap, names::DLQ_TOPIC, 2).await;
    assert_eq!(received[0].key.as_deref(), Some(key));
    assert_eq!(received[0].payload.as_deref(), Some(poison));
    assert_eq!(
        received[0].headers,
        vec![
            header(names::DLQ_REASON_HEADER, "invalid_json"),
            header(names::DLQ_ERROR_HEADER, "expected value at line 1 column 9"),
            header(names::DLQ_SOURCE_TOPIC_HEADER, "increments"),
            header(names::DLQ_SOURCE_PARTITION_HEADER, "7"),
            header(names::DLQ_SOURCE_OFFSET_HEADER, "123456789012"),
            header(names::DLQ_SOURCE_TIMESTAMP_HEADER, "1790000000123"),
        ]
    );
    assert_eq!(received[1].key, None);
    assert_eq!(received[1].payload, None);
    assert_eq!(
        received[1].headers,
        vec![
            header(names::DLQ_REASON_HEADER, "late"),
            header(
                names::DLQ_ERROR_HEADER,
                "window [10000, 20000) closed at watermark 21000"
            ),
            header(names::DLQ_SOURCE_TOPIC_HEADER, "direct"),
            header(names::DLQ_SOURCE_PARTITION_HEADER, "0"),
            header(names::DLQ_SOURCE_OFFSET_HEADER, "0"),
        ]
    );
}

#[tokio::test]
async fn a_send_with_the_brokers_down_fails_within_its_deadline() {
    let cluster = MockCluster::new(BROKERS).unwrap();
    cluster.create_topic(names::DLQ_TOPIC, 1, BROKERS).unwrap();
    for broker in 1..=BROKERS {
        cluster.broker_down(broker).unwrap();
    }
    let producer = DeadLetterProducer::new(
        &cluster.bootstrap_servers(),
        names::DLQ_TOPIC,
        Duration::from_millis(1_500),
    )
    .unwrap();
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        producer.send(&DeadLetter {
            key: Some(b"k"),
            payload: Some(b"v"),
            reason: RejectReason::InvalidValue,
            error: "value must be a positive integer",
            source_topic: names::INCREMENTS_TOPIC,
            source_partition: 1,
            source_offset: 9,
            source_timestamp_ms: Some(1),
            redriven_from: None,
        }),
    )
    .await
    .expect("send must give up on its own, not hang");
    let err = result.expect_err("no broker acknowledged, so send must not return Ok");
    assert!(matches!(err, SinkError::DeadLetter(_)), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(err.undeliverable(), None);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_zero_delivery_timeout_is_refused() {
    let err = DeadLetterProducer::new("127.0.0.1:9", names::DLQ_TOPIC, Duration::ZERO).unwrap_err();
    assert!(matches!(err, SinkError::Config(_)), "{err:?}");
}

/// Compile-time check: the consumer loop keeps sends in flight on a multi-threaded
/// runtime, so the send future must be `Send`.
#[allow(dead_code)]
fn send_future_is_send(producer: &DeadLetterProducer, letter: &DeadLetter<'_>) {
    fn is_send<T: Send>(_: T) {}
    is_send(producer.send(letter));
    is_send(producer.flush(Duration::from_secs(1)));
}

type Cluster = MockCluster<'static, DefaultProducerContext>;

fn letter(payload: &[u8]) -> DeadLetter<'_> {
    DeadLetter {
        key: Some(b"0f0e0d0c-0000-4000-8000-000000000002"),
        payload: Some(payload),
        reason: RejectReason::InvalidJson,
        error: "expected value at line 1 column 1",
        source_topic: names::INCREMENTS_TOPIC,
        source_partition: 3,
        source_offset: 42,
        source_timestamp_ms: Some(1_790_000_000_000),
        redriven_from: None,
    }
}

/// Sends one letter on a fresh cluster prepared by `prepare`, with a delivery deadline
/// far longer than the test allows: a permanent error must come back on its own, not
/// after librdkafka retried until the deadline. Returns the result and the number of
/// records the dead-letter topic holds afterwards.
async fn send_once(
    prepare: impl FnOnce(&Cluster),
    extra: &[&str],
    payload: &[u8],
    delivery_timeout: Duration,
) -> (Result<(), SinkError>, i64) {
    let cluster = MockCluster::new(BROKERS).unwrap();
    cluster.create_topic(names::DLQ_TOPIC, 1, BROKERS).unwrap();
    prepare(&cluster);
    let extra: Vec<KafkaOption> = extra.iter().map(|o| o.parse().unwrap()).collect();
    let producer = DeadLetterProducer::with_options(
        &cluster.bootstrap_servers(),
        names::DLQ_TOPIC,
        delivery_timeout,
        &extra,
    )
    .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), producer.send(&letter(payload)))
        .await
        .expect("the send must end on its own, well before its delivery deadline");
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", "dlq-count")
        .create()
        .unwrap();
    // Undo the injected faults, so the count reads the log itself.
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    cluster
        .topic_error(names::DLQ_TOPIC, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    let (low, high) = reader
        .fetch_watermarks(names::DLQ_TOPIC, 0, Duration::from_secs(10))
        .unwrap();
    (result, high - low)
}

fn expect_undeliverable(result: Result<(), SinkError>, kind: Undeliverable) {
    let err = result.expect_err("the letter cannot be delivered");
    assert_eq!(err.undeliverable(), Some(kind), "{err:?}");
    assert!(!err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains(kind.code()), "{err}");
}

const LONG: Duration = Duration::from_secs(120);

#[tokio::test]
async fn a_letter_over_the_producers_size_limit_is_undeliverable() {
    // The source record fitted its topic; with the headers it does not fit here.
    let (result, stored) =
        send_once(|_| {}, &["message.max.bytes=2000"], &[b'x'; 1990], LONG).await;
    expect_undeliverable(result, Undeliverable::TooLarge);
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn letters_the_broker_refuses_are_undeliverable_with_their_kind() {
    use RDKafkaRespErr::*;
    for (refusal, kind) in [
        (
            RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            Undeliverable::TooLarge,
        ),
        (
            RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE,
            Undeliverable::TooLarge,
        ),
        (RD_KAFKA_RESP_ERR_INVALID_RECORD, Undeliverable::Rejected),
        (
            RD_KAFKA_RESP_ERR_UNSUPPORTED_FOR_MESSAGE_FORMAT,
            Undeliverable::Rejected,
        ),
        (
            RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
            Undeliverable::NotAuthorized,
        ),
        (
            RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED,
            Undeliverable::NotAuthorized,
        ),
    ] {
        let (result, stored) = send_once(
            |cluster| cluster.request_errors(RDKafkaApiKey::Produce, &[refusal]),
            &[],
            b"{oops",
            LONG,
        )
        .await;
        eprintln!("{refusal:?}: {result:?}");
        expect_undeliverable(result, kind);
        assert_eq!(stored, 0, "{refusal:?}");
    }
}

#[tokio::test]
async fn a_topic_the_metadata_says_does_not_exist_is_undeliverable() {
    // The mock creates a topic on first use, so "missing" is the metadata's answer
    // for an existing one. The producer allows half its delivery deadline for a new
    // topic's metadata to appear before it calls the topic missing.
    let (result, stored) = send_once(
        |cluster| {
            cluster
                .topic_error(
                    names::DLQ_TOPIC,
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
                )
                .unwrap()
        },
        &[],
        b"{oops",
        Duration::from_secs(4),
    )
    .await;
    expect_undeliverable(result, Undeliverable::TopicMissing);
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn a_topic_the_producer_may_not_write_is_undeliverable() {
    let (result, stored) = send_once(
        |cluster| {
            cluster
                .topic_error(
                    names::DLQ_TOPIC,
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
                )
                .unwrap()
        },
        &[],
        b"{oops",
        LONG,
    )
    .await;
    expect_undeliverable(result, Undeliverable::NotAuthorized);
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn a_producer_the_cluster_refuses_an_id_is_undeliverable() {
    // The idempotent producer cannot get its producer id: a fatal producer error,
    // named by its cause.
    let (result, stored) = send_once(
        |cluster| {
            cluster.request_errors(
                RDKafkaApiKey::InitProducerId,
                &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED],
            )
        },
        &[],
        b"{oops",
        LONG,
    )
    .await;
    expect_undeliverable(result, Undeliverable::NotAuthorized);
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn transient_broker_errors_are_retried_until_the_letter_is_delivered_once() {
    use RDKafkaRespErr::*;
    let (result, stored) = send_once(
        |cluster| {
            cluster.request_errors(
                RDKafkaApiKey::Produce,
                &[
                    RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                    RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                    RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                ],
            )
        },
        &[],
        b"{oops",
        LONG,
    )
    .await;
    result.unwrap();
    assert_eq!(stored, 1);
}

#[tokio::test]
async fn a_long_error_text_is_cut_so_the_headers_stay_small() {
    let cluster = MockCluster::new(BROKERS).unwrap();
    cluster.create_topic(names::DLQ_TOPIC, 1, BROKERS).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let producer =
        DeadLetterProducer::new(&bootstrap, names::DLQ_TOPIC, Duration::from_secs(20)).unwrap();
    let error = "x".repeat(10 * MAX_ERROR_HEADER_BYTES);
    producer
        .send(&DeadLetter {
            error: &error,
            ..letter(b"{oops")
        })
        .await
        .unwrap();
    let received = consume(&bootstrap, names::DLQ_TOPIC, 1).await;
    let (_, text) = received[0]
        .headers
        .iter()
        .find(|(name, _)| name == names::DLQ_ERROR_HEADER)
        .unwrap();
    assert_eq!(
        text.as_deref(),
        Some(&error.as_bytes()[..MAX_ERROR_HEADER_BYTES])
    );
}
