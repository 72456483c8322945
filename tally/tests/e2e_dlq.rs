//! `tally dlq redrive` and `tally dlq list` against the mock cluster, with the real
//! binary: copies of one letter are re-driven once, a later run re-drives nothing it
//! re-drove before (even from copies that arrived later), and a run killed or failing
//! mid-batch, run again, puts every record back exactly once overall.
//!
//! Letters are written with the aggregator's own dead-letter producer, as a restart or
//! a rebalance writes them: the same source record, several letters.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use support::*;
use tally_schemas::RejectReason;
use tally_sink::dlq::{DeadLetter, DeadLetterProducer};

/// A claim made with this delivery timeout expires after three of them.
const REDRIVE_TIMEOUT: &str = "1s";

/// The value of the source record at `offset` (unique, so the input topic can be
/// counted per source record whatever headers the re-drive adds).
fn value_of(offset: i64) -> String {
    format!("{{\"key\":\"00000000-0000-4000-8000-000000000001\",\"value\":0,\"n\":{offset}}}")
}

/// Writes one letter per entry of `offsets` (repeat an offset for copies), as the
/// aggregator does for source records of partition 0 of the input topic.
fn write_letters(kafka: &Kafka, offsets: &[i64]) {
    let producer =
        DeadLetterProducer::new(&kafka.bootstrap, DLQ_TOPIC, Duration::from_secs(20)).unwrap();
    block_on(async {
        for &offset in offsets {
            let value = value_of(offset);
            producer
                .send(&DeadLetter {
                    key: Some(b"00000000-0000-4000-8000-000000000001"),
                    payload: Some(value.as_bytes()),
                    reason: RejectReason::InvalidValue,
                    error: "value must be at least 1",
                    source_topic: TOPIC,
                    source_partition: 0,
                    source_offset: offset,
                    source_timestamp_ms: Some(1_000 + offset),
                    redriven_from: None,
                })
                .await
                .unwrap();
        }
    });
}

/// Records on the input topic, counted by value.
fn input_counts(kafka: &Kafka) -> HashMap<String, usize> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", "e2e-dlq-count")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let (low, high) = consumer
        .fetch_watermarks(TOPIC, 0, Duration::from_secs(10))
        .unwrap();
    let mut counts = HashMap::new();
    if low == high {
        return counts;
    }
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(TOPIC, 0, Offset::Offset(low))
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let mut next = low;
    while next < high {
        assert!(Instant::now() < until, "input topic not read to {high}");
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.unwrap();
            next = message.offset() + 1;
            let value = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
            *counts.entry(value).or_default() += 1;
        }
    }
    counts
}

fn expect_once_each(kafka: &Kafka, offsets: &[i64]) {
    let counts = input_counts(kafka);
    let want: HashMap<String, usize> = offsets.iter().map(|&o| (value_of(o), 1)).collect();
    assert_eq!(counts, want, "each source record re-driven exactly once");
}

fn redrive_command(kafka: &Kafka) -> Command {
    let mut command = tally();
    command
        .args(["dlq", "redrive", "--brokers", &kafka.bootstrap])
        .env("TALLY_DLQ_REDRIVE_TIMEOUT", REDRIVE_TIMEOUT);
    command
}

fn run(mut command: Command) -> Output {
    let output = command.output().unwrap();
    eprintln!(
        "-- stdout\n{}-- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn redrive(kafka: &Kafka) -> Output {
    run(redrive_command(kafka))
}

fn list(kafka: &Kafka) -> Vec<serde_json::Value> {
    let output = run({
        let mut command = tally();
        command.args(["dlq", "list", "--brokers", &kafka.bootstrap]);
        command
    });
    assert!(output.status.success());
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn copies_of_one_letter_are_re_driven_once_and_list_shows_their_state() {
    let kafka = Kafka::start(1);
    write_letters(&kafka, &[10, 11, 10, 12, 10, 11]);
    let before = list(&kafka);
    assert_eq!(before.len(), 6);

    let output = redrive(&kafka);
    assert!(output.status.success());
    expect_once_each(&kafka, &[10, 11, 12]);
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 3);

    // Before: pending, and the copies named.
    assert!(before.iter().all(|l| l["state"] == "pending"), "{before:?}");
    assert_eq!(before[2]["copy_of"], "0:0");
    assert_eq!(before[5]["copy_of"], "0:1");
    assert_eq!(before[0]["copy_of"], serde_json::Value::Null);
    assert_eq!(before[0]["source"], "increments/0/10");

    // Every copy now says where its record went; copies of one record, one place.
    let after = list(&kafka);
    assert!(after.iter().all(|l| l["state"] == "redriven"), "{after:?}");
    assert_eq!(after[0]["redriven_to"], after[2]["redriven_to"]);
    assert_eq!(after[0]["redriven_to"], after[4]["redriven_to"]);
    assert_ne!(after[0]["redriven_to"], after[1]["redriven_to"]);

    // The re-driven records carry the original value and event time, and their source.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", "e2e-dlq-headers")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(TOPIC, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let message = loop {
        if let Some(message) = consumer.poll(Duration::from_secs(10)) {
            break message.unwrap();
        }
    };
    let offset: i64 = serde_json::from_slice::<serde_json::Value>(message.payload().unwrap())
        .unwrap()["n"]
        .as_i64()
        .unwrap();
    assert_eq!(message.timestamp().to_millis(), Some(1_000 + offset));
    let headers: HashMap<String, String> = message
        .headers()
        .unwrap()
        .iter()
        .map(|h: Header<'_, &[u8]>| {
            (
                h.key.to_owned(),
                String::from_utf8_lossy(h.value.unwrap()).into_owned(),
            )
        })
        .collect();
    assert_eq!(
        headers["tally.redrive.source"],
        format!("increments/0/{offset}")
    );
    assert!(headers.contains_key("tally.redriven-from"));
}

#[test]
fn a_later_run_re_drives_nothing_it_re_drove_before_even_from_new_copies() {
    let kafka = Kafka::start(1);
    write_letters(&kafka, &[20, 21]);
    assert!(redrive(&kafka).status.success());
    expect_once_each(&kafka, &[20, 21]);

    // The aggregator restarted before committing past 20 and wrote its letter again;
    // a new record, 22, failed too.
    write_letters(&kafka, &[20, 22]);
    let output = redrive(&kafka);
    assert!(output.status.success());
    expect_once_each(&kafka, &[20, 21, 22]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).lines().count(),
        1,
        "only the new record"
    );

    // And once more: nothing.
    let output = redrive(&kafka);
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 0);
    expect_once_each(&kafka, &[20, 21, 22]);
}

/// The broker keeps refusing (retriably) the run's third produce request, its
/// confirmations: the records are on the input topic, the journal does not know, and
/// the run is SIGKILLed in that state. The next run must find the records, not repeat
/// them. (The run before this fix produced one request per record and committed its
/// position only at the end, so the kill caught it mid-run as well.)
#[test]
fn a_re_drive_killed_mid_batch_and_run_again_puts_each_record_back_once() {
    let kafka = Kafka::start(1);
    let offsets = [30, 31, 32, 33, 34];
    write_letters(&kafka, &[30, 31, 32, 30, 33, 34, 31]);
    use RDKafkaRespErr::*;
    let mut refusals = vec![RD_KAFKA_RESP_ERR_NO_ERROR, RD_KAFKA_RESP_ERR_NO_ERROR];
    refusals.extend([RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 200]);
    kafka
        .cluster
        .request_errors(RDKafkaApiKey::Produce, &refusals);

    let mut command = redrive_command(&kafka);
    // The refusals must outlast the test's reaction, not the delivery timeout.
    command.env("TALLY_DLQ_REDRIVE_TIMEOUT", "4s");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("killed.log");
    let mut child = spawn_logged(command, "redrive", &log);
    let watcher: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", "e2e-dlq-watch")
        .create()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < until, "the re-drive never produced");
        assert!(
            child.child.try_wait().unwrap().is_none(),
            "the re-drive ended before it was killed:\n{}",
            read_log(&log)
        );
        let (_, high) = watcher
            .fetch_watermarks(TOPIC, 0, Duration::from_secs(10))
            .unwrap();
        if high > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill_hard();
    kafka.cluster.clear_request_errors(RDKafkaApiKey::Produce);

    let output = redrive(&kafka);
    assert!(output.status.success());
    expect_once_each(&kafka, &offsets);
    // The run found the killed run's records instead of producing them again.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("5 record(s) found on the input topic"),
        "{stderr}"
    );
    assert!(redrive(&kafka).status.success());
    expect_once_each(&kafka, &offsets);
    let letters = list(&kafka);
    assert!(
        letters.iter().all(|l| l["state"] == "redriven"),
        "{letters:?}"
    );
}

/// The broker refuses the third produce request of the run: the claims and the
/// records land, the confirmations do not, and the run fails. (The run before this
/// fix produced one request per record and committed its position last, so the
/// refusal hit it mid-run as well.)
#[test]
fn a_re_drive_failing_after_producing_and_run_again_puts_each_record_back_once() {
    let kafka = Kafka::start(1);
    let offsets = [40, 41, 42];
    write_letters(&kafka, &[40, 41, 41, 42]);
    use RDKafkaRespErr::*;
    kafka.cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR_NO_ERROR,
            RD_KAFKA_RESP_ERR_NO_ERROR,
            RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        ],
    );
    kafka.cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED],
    );
    let failed = redrive(&kafka);
    assert!(
        !failed.status.success(),
        "the refused write must fail the run"
    );
    kafka.cluster.clear_request_errors(RDKafkaApiKey::Produce);
    kafka
        .cluster
        .clear_request_errors(RDKafkaApiKey::OffsetCommit);

    assert!(redrive(&kafka).status.success());
    expect_once_each(&kafka, &offsets);
    assert!(redrive(&kafka).status.success());
    expect_once_each(&kafka, &offsets);
}

#[test]
fn a_dry_run_writes_nothing() {
    let kafka = Kafka::start(1);
    write_letters(&kafka, &[50, 50, 51]);
    let output = run({
        let mut command = redrive_command(&kafka);
        command.arg("--dry-run");
        command
    });
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stdout.lines().all(|l| l.starts_with("would re-drive")));
    assert!(input_counts(&kafka).is_empty());
    assert!(list(&kafka).iter().all(|l| l["state"] == "pending"));
}

/// Why re-drive does not rest on transactions alone: librdkafka's mock cluster, where
/// every test here runs, accepts the transactional API but makes aborted records
/// visible to `read_committed` readers and lets a fenced producer go on writing. If
/// this starts failing, the mock has learnt transactions and the re-drive tests could
/// cover them too.
#[test]
fn the_mock_cluster_ignores_transaction_aborts_and_fencing() {
    let kafka = Kafka::start(1);
    let transactional = |id: &str| -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &kafka.bootstrap)
            .set("transactional.id", id)
            .create()
            .unwrap()
    };
    let first = transactional("e2e-mock-txn");
    first.init_transactions(Duration::from_secs(10)).unwrap();
    first.begin_transaction().unwrap();
    block_on(
        first.send(
            FutureRecord::to(TOPIC)
                .partition(0)
                .key("k")
                .payload("aborted"),
            Duration::from_secs(10),
        ),
    )
    .unwrap();
    first.abort_transaction(Duration::from_secs(10)).unwrap();
    // A second producer with the same id would fence the first on Apache Kafka.
    let second = transactional("e2e-mock-txn");
    second.init_transactions(Duration::from_secs(10)).unwrap();
    first.begin_transaction().unwrap();
    block_on(
        first.send(
            FutureRecord::to(TOPIC)
                .partition(0)
                .key("k")
                .payload("fenced"),
            Duration::from_secs(10),
        ),
    )
    .unwrap();
    first.commit_transaction(Duration::from_secs(10)).unwrap();
    let counts = input_counts(&kafka);
    assert_eq!(counts.get("aborted"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("fenced"), Some(&1), "{counts:?}");
}
