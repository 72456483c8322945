//! End-to-end tests of the operations commands (`query`, `verify`, `replay`, `dlq`)
//! against the mock cluster, a real `tally aggregator` and the SQLite store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message};
use support::*;
use uuid::Uuid;

const WINDOW_MS: i64 = 2000;

/// Ordered records over 20 s of event time, two minutes ago, for three keys.
fn history(keys: &[Uuid]) -> (Vec<(Uuid, i64, i64)>, i64) {
    let base = (now_ms() - 120_000).div_euclid(WINDOW_MS) * WINDOW_MS;
    let records = (0..200)
        .map(|i| {
            (
                keys[i % keys.len()],
                (i % 9 + 1) as i64,
                base + i as i64 * 100,
            )
        })
        .collect();
    (records, base)
}

fn start_aggregator(kafka: &Kafka, group: &str, store: &Path, log: &Path) -> Proc {
    spawn_aggregator(
        &AggregatorOptions {
            bootstrap: &kafka.bootstrap,
            group,
            store,
            metrics_port: free_port(),
            extra: &[],
        },
        group,
        log,
    )
}

#[test]
fn query_prints_windows_and_verify_catches_a_tampered_row() {
    let kafka = Kafka::start(2);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let log = dir.path().join("aggregator.log");
    let _aggregator = start_aggregator(&kafka, "ops-query", &store, &log);
    let keys = [Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3)];
    let (records, base) = history(&keys);
    produce_increments(&kafka, &records);
    let expected = per_window(&records, WINDOW_MS);
    wait_for(
        Duration::from_secs(60),
        "the store to hold every window",
        || stored_per_window(&store) == expected,
    );

    let store_url = format!("sqlite://{}", store.display());
    let from = base.to_string();
    let to = (base + 30_000).to_string();
    let key = keys[1].to_string();
    let output = run_tally(&[
        "query", "--store", &store_url, "--key", &key, "--from", &from, "--to", &to,
    ]);
    assert!(output.status.success());
    let mut lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    // The last line is the total of the range.
    let total = lines.pop().unwrap()["total"].clone();
    let want: Vec<_> = {
        let mut windows: Vec<_> = expected
            .iter()
            .filter(|((k, _), _)| *k == keys[1])
            .collect();
        windows.sort_by_key(|((_, start), _)| *start);
        windows
    };
    assert_eq!(lines.len(), want.len());
    for (line, ((_, _), (sum, count))) in lines.iter().zip(&want) {
        assert_eq!(line["key"], key.as_str());
        assert_eq!(line["sum"], *sum);
        assert_eq!(line["count"], *count);
        assert!(line["window_start"].as_str().unwrap().ends_with('Z'));
        assert!(line["final"].is_boolean());
    }
    // All but the newest windows are final: later records moved the watermark.
    assert!(lines.first().unwrap()["final"].as_bool().unwrap());
    let (sum, count) = want
        .iter()
        .fold((0, 0), |(s, c), (_, (sum, count))| (s + sum, c + count));
    assert_eq!(total["sum"], sum);
    assert_eq!(total["count"], count);
    assert_eq!(total["windows"], want.len());

    let verify = |expect_clean: bool| {
        let output = run_tally(&[
            "verify",
            "--brokers",
            &kafka.bootstrap,
            "--store",
            &store_url,
            "--window",
            "2s",
            "--grace",
            "500ms",
        ]);
        assert_eq!(output.status.success(), expect_clean, "verify exit status");
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(verify(true), "");

    let tamper = rusqlite::Connection::open(&store).unwrap();
    let changed = tamper
        .execute(
            "UPDATE window_sums SET sum = sum + 1 WHERE key = ?1 AND window_start = ?2",
            rusqlite::params![keys[0].as_bytes(), base],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(tamper);
    let differences = verify(false);
    assert_eq!(differences.lines().count(), 1, "{differences}");
    assert!(differences.contains(&keys[0].to_string()));
}

#[test]
fn replay_from_time_rebuilds_later_windows_with_a_new_generation() {
    let kafka = Kafka::start(2);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let group = "ops-replay";
    let keys = [
        Uuid::from_u128(10),
        Uuid::from_u128(11),
        Uuid::from_u128(12),
    ];
    let (records, base) = history(&keys);
    produce_increments(&kafka, &records);
    let expected = per_window(&records, WINDOW_MS);
    let mut aggregator = start_aggregator(&kafka, group, &store, &dir.path().join("a1.log"));
    wait_for(
        Duration::from_secs(60),
        "the store to hold every window",
        || stored_per_window(&store) == expected,
    );
    assert!(aggregator.terminate(Duration::from_secs(30)).success());

    // Damage the store: lose every row from `cut` on, and corrupt one row before it.
    let cut = base + 10_000;
    let damage = rusqlite::Connection::open(&store).unwrap();
    let lost = damage
        .execute("DELETE FROM window_sums WHERE window_start >= ?1", [cut])
        .unwrap();
    assert!(lost > 0);
    damage
        .execute(
            "UPDATE window_sums SET sum = 999999 WHERE key = ?1 AND window_start = ?2",
            rusqlite::params![keys[0].as_bytes(), base],
        )
        .unwrap();
    drop(damage);

    let store_url = format!("sqlite://{}", store.display());
    let from = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(cut as u64))
        .to_string();
    let replay = || {
        let output = run_tally(&[
            "replay",
            "--brokers",
            &kafka.bootstrap,
            "--group",
            group,
            "--store",
            &store_url,
            "--from",
            &from,
            "--window",
            "2s",
        ]);
        assert!(output.status.success());
    };
    replay();
    let mut aggregator = start_aggregator(&kafka, group, &store, &dir.path().join("a2.log"));
    let mut repaired = expected.clone();
    repaired.insert((keys[0], base), (999_999, expected[&(keys[0], base)].1));
    wait_for(
        Duration::from_secs(60),
        "windows from the replay time to be rebuilt",
        || stored_per_window(&store) == repaired,
    );
    let rows = block_on(store_rows(&store));
    assert!(rows
        .iter()
        .filter(|r| r.window_start_ms >= cut)
        .all(|r| r.generation == 1));
    // Windows before the replay time were left exactly as they were.
    assert!(rows
        .iter()
        .filter(|r| r.window_start_ms < cut)
        .all(|r| r.generation == 0));
    assert!(aggregator.terminate(Duration::from_secs(30)).success());

    // Twice: the same sums, one generation higher.
    replay();
    let _aggregator = start_aggregator(&kafka, group, &store, &dir.path().join("a3.log"));
    wait_for(
        Duration::from_secs(60),
        "the second replay to finish",
        || {
            let rows = block_on(store_rows(&store));
            rows.iter()
                .filter(|r| r.window_start_ms >= cut)
                .all(|r| r.generation == 2)
                && stored_per_window(&store) == repaired
        },
    );
}

#[test]
fn dlq_list_filters_by_reason_and_redrive_happens_once() {
    let kafka = Kafka::start(1);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let _aggregator = start_aggregator(&kafka, "ops-dlq", &store, &dir.path().join("a.log"));
    let key = Uuid::from_u128(77);
    let now = now_ms();
    produce_all(
        &producer(&kafka.bootstrap),
        &[
            (b"k1".to_vec(), b"{oops".to_vec(), now),
            (
                key.to_string().into_bytes(),
                format!(r#"{{"key":"{key}","value":0}}"#).into_bytes(),
                now,
            ),
            (b"k3".to_vec(), b"[]".to_vec(), now),
        ],
    );
    let list = |reason: Option<&str>| -> Vec<serde_json::Value> {
        let mut args = vec!["dlq", "list", "--brokers", &kafka.bootstrap];
        if let Some(reason) = reason {
            args.extend(["--reason", reason]);
        }
        let output = run_tally(&args);
        assert!(output.status.success());
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    wait_for(Duration::from_secs(60), "three dead letters", || {
        list(None).len() == 3
    });
    let invalid_value = list(Some("invalid_value"));
    assert_eq!(invalid_value.len(), 1);
    assert_eq!(invalid_value[0]["headers"]["dlq.reason"], "invalid_value");
    assert_eq!(invalid_value[0]["headers"]["dlq.source.topic"], TOPIC);
    assert_eq!(invalid_value[0]["key"], key.to_string());
    assert_eq!(list(Some("invalid_json")).len(), 1);
    assert_eq!(list(Some("not_an_object")).len(), 1);

    let redrive = || {
        let output = run_tally(&[
            "dlq",
            "redrive",
            "--brokers",
            &kafka.bootstrap,
            "--reason",
            "invalid_value",
        ]);
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap().lines().count()
    };
    assert_eq!(redrive(), 1);
    assert_eq!(redrive(), 0, "a letter must be re-driven only once");

    // The input topic got exactly one re-driven record, marked with its source.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", "ops-dlq-check")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[TOPIC]).unwrap();
    let mut redriven = Vec::new();
    let mut seen = 0;
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while seen < 4 && std::time::Instant::now() < until {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(300)) {
            seen += 1;
            if let Some(headers) = message.headers() {
                for header in headers.iter() {
                    let header: Header<'_, &[u8]> = header;
                    if header.key == "tally.redriven-from" {
                        redriven.push(String::from_utf8_lossy(header.value.unwrap()).into_owned());
                    }
                }
            }
        }
    }
    assert_eq!(seen, 4);
    assert_eq!(redriven, vec![format!("0:{}", invalid_value[0]["offset"])]);
}

/// Brokers such as tansu drop offset-commit metadata. The aggregator then finds its
/// replay state in the store's checkpoint row for the committed offset and resumes
/// exactly (same generation), instead of treating the offset as an external reset.
#[test]
fn restart_without_commit_metadata_resumes_from_the_store_checkpoint() {
    let partitions = 2;
    let kafka = Kafka::start(partitions);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let group = "ops-no-metadata";
    let keys = [
        Uuid::from_u128(20),
        Uuid::from_u128(21),
        Uuid::from_u128(22),
    ];
    let (mut records, base) = history(&keys);
    produce_increments(&kafka, &records);
    let mut first = start_aggregator(&kafka, group, &store, &dir.path().join("first.log"));
    let expected = per_window(&records, WINDOW_MS);
    wait_for(Duration::from_secs(60), "the first run's windows", || {
        stored_per_window(&store) == expected
    });
    assert!(first.terminate(Duration::from_secs(30)).success());

    // Re-commit the same offsets without metadata, as such a broker would keep them.
    let committed = kafka.committed(group, partitions);
    assert_eq!(committed.len(), partitions as usize, "{committed:?}");
    let offsets = committed
        .iter()
        .map(|(partition, offset)| format!("{partition}:{offset}"))
        .collect::<Vec<_>>()
        .join(",");
    let store_url = format!("sqlite://{}", store.display());
    let output = run_tally(&[
        "replay",
        "--brokers",
        &kafka.bootstrap,
        "--group",
        group,
        "--store",
        &store_url,
        "--from-offset",
        &offsets,
        "--window",
        "2s",
    ]);
    assert!(output.status.success());

    // More increments, then a second run from the metadata-less commit.
    let later: Vec<(Uuid, i64, i64)> = (0..60)
        .map(|i| (keys[i % keys.len()], 2, base + 20_000 + i as i64 * 100))
        .collect();
    produce_increments(&kafka, &later);
    records.extend(later);
    let second_log = dir.path().join("second.log");
    let _second = start_aggregator(&kafka, group, &store, &second_log);
    let expected = per_window(&records, WINDOW_MS);
    wait_for(Duration::from_secs(60), "the second run's windows", || {
        stored_per_window(&store) == expected
    });
    let log = read_log(&second_log);
    for (partition, offset) in &committed {
        let resumed = format!(
            "partition={partition} resume=Checkpoint(Checkpoint {{ next_offset: {offset}, "
        );
        assert!(
            log.contains(&resumed),
            "partition {partition} did not resume from the store checkpoint:\n{log}"
        );
    }
    assert!(!log.contains("external reset"), "{log}");
    let rows = block_on(store_rows(&store));
    assert!(
        rows.iter().all(|row| row.generation == 0),
        "an exact resume keeps the generation"
    );
}
