//! End-to-end: the real `tally` binaries as child processes against librdkafka's
//! mock cluster (real Kafka protocol over TCP) and the SQLite store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message};
use support::*;
use uuid::Uuid;

fn wait_for_totals(
    store: &std::path::Path,
    expected: &HashMap<Uuid, (i64, i64)>,
    limit: Duration,
    logs: &[&std::path::Path],
) {
    let until = std::time::Instant::now() + limit;
    loop {
        let actual = totals(&block_on(store_rows(store)));
        if &actual == expected {
            return;
        }
        if std::time::Instant::now() > until {
            let missing = expected
                .iter()
                .filter(|(k, v)| actual.get(*k) != Some(*v))
                .take(5)
                .collect::<Vec<_>>();
            let extra = actual.keys().filter(|k| !expected.contains_key(*k)).count();
            for log in logs {
                eprintln!("---- {}\n{}", log.display(), read_log(log));
            }
            panic!(
                "store totals differ: {} of {} keys wrong (first: {missing:?}; actual {:?}), {extra} unexpected keys",
                expected.iter().filter(|(k, v)| actual.get(*k) != Some(*v)).count(),
                expected.len(),
                missing.first().and_then(|(k, _)| actual.get(*k)),
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn hundred_thousand_increments_through_ingest_are_counted_exactly() {
    let kafka = Kafka::start(4);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let ingest_port = free_port();
    let ingest_address = format!("127.0.0.1:{ingest_port}");
    let ingest_log = dir.path().join("ingest.log");
    let aggregator_log = dir.path().join("aggregator.log");
    let mut ingest_command = tally();
    ingest_command.args([
        "ingest",
        "--listen",
        &ingest_address,
        "--brokers",
        &kafka.bootstrap,
    ]);
    let _ingest = spawn_logged(ingest_command, "ingest", &ingest_log);
    let _aggregator = spawn_aggregator(
        &AggregatorOptions {
            bootstrap: &kafka.bootstrap,
            group: "e2e-ingest",
            store: &store,
            metrics_port: free_port(),
            extra: &[],
        },
        "aggregator",
        &aggregator_log,
    );
    wait_for(Duration::from_secs(30), "ingest /readyz", || {
        get(&ingest_address, "/readyz").is_some_and(|(status, _)| status == 200)
    });

    let keys: Vec<Uuid> = (0..1000u128)
        .map(|i| Uuid::from_u128(0xabc0_0000 + i))
        .collect();
    let mut expected: HashMap<Uuid, (i64, i64)> = HashMap::new();
    for batch in 0..100 {
        let mut body = String::new();
        for item in 0..1000 {
            let key = keys[(batch * 7 + item) % keys.len()];
            let value = ((batch * 1000 + item) % 13 + 1) as i64;
            let entry = expected.entry(key).or_default();
            entry.0 += value;
            entry.1 += 1;
            body.push_str(&format!("{{\"key\":\"{key}\",\"value\":{value}}}\n"));
        }
        let (status, answer) = http(
            "POST",
            &ingest_address,
            "/increments",
            "application/x-ndjson",
            body.as_bytes(),
        );
        assert_eq!(status, 202, "batch {batch}: {answer}");
        assert!(answer.contains("\"accepted\":1000"), "{answer}");
    }
    assert_eq!(expected.values().map(|v| v.1).sum::<i64>(), 100_000);
    wait_for_totals(
        &store,
        &expected,
        Duration::from_secs(120),
        &[&aggregator_log, &ingest_log],
    );
}

#[test]
fn sigkilled_group_member_restarts_and_totals_stay_exact() {
    let partitions = 6;
    let kafka = Kafka::start(partitions);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let log_a = dir.path().join("a.log");
    let log_a2 = dir.path().join("a-restarted.log");
    let log_b = dir.path().join("b.log");
    let options = |port| AggregatorOptions {
        bootstrap: &kafka.bootstrap,
        group: "e2e-kill",
        store: &store,
        metrics_port: port,
        extra: &[],
    };
    let mut member_a = spawn_aggregator(&options(free_port()), "a", &log_a);
    let _member_b = spawn_aggregator(&options(free_port()), "b", &log_b);

    let producer = producer(&kafka.bootstrap);
    let keys: Vec<Uuid> = (0..500u128)
        .map(|i| Uuid::from_u128(0x5150_0000 + i))
        .collect();
    let mut expected: HashMap<Uuid, (i64, i64)> = HashMap::new();
    let produce_round = |round: usize, expected: &mut HashMap<Uuid, (i64, i64)>| {
        let now = now_ms();
        let records: Vec<_> = (0..2000)
            .map(|i| {
                let key = keys[(round * 31 + i) % keys.len()];
                let value = ((round + i) % 5 + 1) as i64;
                let entry = expected.entry(key).or_default();
                entry.0 += value;
                entry.1 += 1;
                // Event times out of order over the last 400 ms: always within the
                // 500 ms grace, so none is late and every one must be counted.
                increment_record(key, value, now - ((i * 37) % 400) as i64)
            })
            .collect();
        produce_all(&producer, &records);
    };
    for round in 0..8 {
        produce_round(round, &mut expected);
        std::thread::sleep(Duration::from_millis(400));
    }
    // Mid-run: member A dies without any chance to flush or commit.
    member_a.kill_hard();
    for round in 8..14 {
        produce_round(round, &mut expected);
        std::thread::sleep(Duration::from_millis(400));
    }
    let _member_a_again = spawn_aggregator(&options(free_port()), "a-restarted", &log_a2);
    for round in 14..24 {
        produce_round(round, &mut expected);
        std::thread::sleep(Duration::from_millis(400));
    }
    assert_eq!(expected.values().map(|v| v.1).sum::<i64>(), 48_000);
    wait_for_totals(
        &store,
        &expected,
        Duration::from_secs(120),
        &[&log_a, &log_b, &log_a2],
    );
    // And the group committed progress (commits happen only after durable flushes).
    let committed = kafka.committed("e2e-kill", partitions);
    assert!(!committed.is_empty(), "nothing was ever committed");
}

#[test]
fn store_outage_loses_nothing_and_commits_nothing_meanwhile() {
    let partitions = 3;
    let kafka = Kafka::start(partitions);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let log = dir.path().join("aggregator.log");
    let metrics_port = free_port();
    let metrics_address = format!("127.0.0.1:{metrics_port}");
    let _aggregator = spawn_aggregator(
        &AggregatorOptions {
            bootstrap: &kafka.bootstrap,
            group: "e2e-outage",
            store: &store,
            metrics_port,
            extra: &[
                "--breaker-threshold",
                "2",
                "--breaker-probe-interval",
                "1s",
                "--retry-max-delay",
                "1s",
            ],
        },
        "aggregator",
        &log,
    );
    let producer = producer(&kafka.bootstrap);
    let keys: Vec<Uuid> = (0..200u128)
        .map(|i| Uuid::from_u128(0x07a_0000 + i))
        .collect();
    let mut expected: HashMap<Uuid, (i64, i64)> = HashMap::new();
    let batch = |count: usize, expected: &mut HashMap<Uuid, (i64, i64)>| {
        let now = now_ms();
        let records: Vec<_> = (0..count)
            .map(|i| {
                let key = keys[i % keys.len()];
                let entry = expected.entry(key).or_default();
                entry.0 += 2;
                entry.1 += 1;
                increment_record(key, 2, now)
            })
            .collect();
        produce_all(&producer, &records);
    };
    batch(3000, &mut expected);
    wait_for_totals(&store, &expected, Duration::from_secs(60), &[&log]);

    // Take the store away: an exclusive transaction from another connection makes
    // every write of the aggregator fail (SQLITE_BUSY after its busy timeout).
    let blocker = rusqlite::Connection::open(&store).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let committed_before = kafka.committed("e2e-outage", partitions);
    batch(3000, &mut expected);
    wait_for(
        Duration::from_secs(30),
        "store errors to be reported",
        || {
            get(&metrics_address, "/metrics").is_some_and(|(_, scrape)| {
                metric(&scrape, "tally_aggregator_store_errors_total").unwrap_or(0.0) >= 1.0
            })
        },
    );
    std::thread::sleep(Duration::from_secs(8));
    let committed_during = kafka.committed("e2e-outage", partitions);
    let scrape = get(&metrics_address, "/metrics").unwrap().1;
    // Open (1) or half-open (2, a probe write blocked on the locked file): not closed.
    let circuit = metric(&scrape, "tally_aggregator_circuit_state");
    assert!(
        matches!(circuit, Some(state) if state >= 1.0),
        "circuit should not be closed during the outage: {circuit:?}"
    );
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    assert_eq!(
        committed_before, committed_during,
        "offsets were committed while the store was down"
    );

    wait_for_totals(&store, &expected, Duration::from_secs(60), &[&log]);
    // A commit never passes the first record of the earliest open window, and the
    // outage batch's window may still be open: newer records (stamped now, more than
    // window + grace after it) close it.
    batch(300, &mut expected);
    wait_for_totals(&store, &expected, Duration::from_secs(60), &[&log]);
    std::thread::sleep(Duration::from_secs(8));
    eprintln!(
        "DEBUGLOG\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    wait_for(
        Duration::from_secs(30),
        "commits to advance after recovery",
        || {
            let after = kafka.committed("e2e-outage", partitions);
            after
                .iter()
                .any(|(p, o)| committed_during.get(p).is_none_or(|before| o > before))
        },
    );
    let scrape = get(&metrics_address, "/metrics").unwrap().1;
    assert_eq!(metric(&scrape, "tally_aggregator_circuit_state"), Some(0.0));
    assert!(
        metric(&scrape, "tally_aggregator_commits_total{result=\"ok\"}").unwrap_or(0.0) >= 1.0,
        "successful commits are counted"
    );
}

#[test]
fn poison_late_future_and_overflow_records_go_to_the_dead_letter_topic() {
    let kafka = Kafka::start(2);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let log = dir.path().join("aggregator.log");
    let _aggregator = spawn_aggregator(
        &AggregatorOptions {
            bootstrap: &kafka.bootstrap,
            group: "e2e-dlq",
            store: &store,
            metrics_port: free_port(),
            extra: &[],
        },
        "aggregator",
        &log,
    );
    let producer = producer(&kafka.bootstrap);
    let counted = Uuid::from_u128(0xc0c0);
    let overflow = Uuid::from_u128(0xf10f);
    let base = (now_ms() - 120_000) / 2000 * 2000;
    let raw = |key: &str, value: &str, timestamp: i64| {
        (
            key.as_bytes().to_vec(),
            value.as_bytes().to_vec(),
            timestamp,
        )
    };
    let records = vec![
        increment_record(counted, 5, base),
        // Advances the partition's watermark far past `base`'s window.
        increment_record(counted, 7, base + 30_000),
        // Late: its window [base, base+2s) closed when the watermark passed it.
        increment_record(counted, 1000, base + 100),
        // Stamped an hour ahead of the wall clock.
        increment_record(counted, 2000, now_ms() + 3_600_000),
        increment_record(overflow, i64::MAX, base + 30_000),
        increment_record(overflow, 1, base + 30_000),
        raw("k", "not json", base),
        raw("k", r#"{"key":"nope","value":1}"#, base),
        raw("k", &format!(r#"{{"key":"{counted}","value":0}}"#), base),
        raw(
            "k",
            &format!(r#"{{"key":"{counted}","value":1,"extra":1}}"#),
            base,
        ),
    ];
    produce_all(&producer, &records);
    let expected_reasons: BTreeMap<&str, usize> = [
        ("late", 1),
        ("future_timestamp", 1),
        ("sum_overflow", 1),
        ("invalid_json", 1),
        ("invalid_key", 1),
        ("invalid_value", 1),
        ("unknown_field", 1),
    ]
    .into_iter()
    .collect();

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", "e2e-dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[DLQ_TOPIC]).unwrap();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while reasons.values().sum::<usize>() < 7 {
        assert!(
            std::time::Instant::now() < until,
            "dead letters so far: {reasons:?}\n{}",
            read_log(&log)
        );
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message.unwrap();
        let headers = message.headers().expect("dead letters carry headers");
        let header = |name: &str| -> String {
            headers
                .iter()
                .find(|h: &Header<'_, &[u8]>| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_else(|| panic!("missing header {name}"))
        };
        let reason = header("dlq.reason");
        assert_eq!(header("dlq.source.topic"), TOPIC);
        let source_offset: i64 = header("dlq.source.offset").parse().unwrap();
        let source_partition: i32 = header("dlq.source.partition").parse().unwrap();
        assert!(source_offset >= 0 && (0..2).contains(&source_partition));
        assert!(!header("dlq.error").is_empty());
        // The value is the original bytes.
        let payload = message.payload().unwrap_or_default();
        assert!(
            records
                .iter()
                .any(|(_, value, _)| value.as_slice() == payload),
            "dead letter payload is not an original record"
        );
        *reasons.entry(reason).or_default() += 1;
    }
    let reasons: BTreeMap<&str, usize> = reasons.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(reasons, expected_reasons);

    // Only the two valid, timely increments and the first overflow-key record count.
    let mut expected: HashMap<Uuid, (i64, i64)> = HashMap::new();
    expected.insert(counted, (12, 2));
    expected.insert(overflow, (i64::MAX, 1));
    wait_for_totals(&store, &expected, Duration::from_secs(30), &[&log]);
}
