#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The dead-letter producer against librdkafka's mock cluster (the real Kafka
//! protocol over TCP): records come back byte for byte with every header, and a
//! send with the brokers down fails within its delivery deadline.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::{Offset, TopicPartitionList};
use tally_schemas::{names, RejectReason};
use tally_sink::dlq::{DeadLetter, DeadLetterProducer};
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
