//! End-to-end tests of `tally verify`'s range and of a log that no longer starts at
//! offset 0, against the mock cluster, a real `tally aggregator` and the SQLite store.
//!
//! The mock cluster cannot look offsets up by time, so these runs take verify's
//! fallback (read each partition from its first offset, pass over records before the
//! start time); the seek by `offsets_for_times` itself is covered by the plan's unit
//! tests only (no broker here answers it). The mock keeps at most 5 MB per partition
//! and deletes the oldest records beyond: that is the truncated log here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use support::*;
use uuid::Uuid;

const WINDOW_MS: i64 = 2_000;

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

/// `tally verify` over `range` (`--from`, `--to` values or none): (exit ok, stdout, stderr).
fn verify(kafka: &Kafka, store: &Path, range: &[&str]) -> (bool, String, String) {
    let store_url = format!("sqlite://{}", store.display());
    let mut args = vec![
        "verify",
        "--brokers",
        &kafka.bootstrap,
        "--store",
        &store_url,
        "--window",
        "2s",
        "--grace",
        "500ms",
    ];
    args.extend_from_slice(range);
    let output = run_tally(&args);
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// The number after `label` in verify's summary (e.g. "read 120 records").
fn figure(stderr: &str, label: &str) -> u64 {
    let at = stderr
        .find(label)
        .unwrap_or_else(|| panic!("{label:?} not in {stderr}"));
    stderr[at + label.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {label:?} in {stderr}"))
}

fn tamper(store: &Path, key: Uuid, window_start: i64) {
    let changed = rusqlite::Connection::open(store)
        .unwrap()
        .execute(
            "UPDATE window_sums SET sum = sum + 1 WHERE key = ?1 AND window_start = ?2",
            rusqlite::params![key.as_bytes(), window_start],
        )
        .unwrap();
    assert_eq!(changed, 1);
}

#[test]
fn verify_with_a_range_stops_past_to_and_compares_only_that_range() {
    let kafka = Kafka::start(1);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let _aggregator = start_aggregator(&kafka, "verify-range", &store, &dir.path().join("a.log"));
    let keys = [Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3)];
    // 60 s of event time, two records a second, ending two minutes ago.
    let base = (now_ms() - 180_000).div_euclid(WINDOW_MS) * WINDOW_MS;
    let records: Vec<(Uuid, i64, i64)> = (0..120)
        .map(|i| (keys[i % 3], (i % 7 + 1) as i64, base + i as i64 * 500))
        .collect();
    produce_increments(&kafka, &records);
    let expected = per_window(&records, WINDOW_MS);
    wait_for(
        Duration::from_secs(60),
        "the store to hold every window",
        || stored_per_window(&store) == expected,
    );

    let from = (base + 20_000).to_string();
    let to = (base + 40_000).to_string();
    let range = ["--from", from.as_str(), "--to", to.as_str()];
    let (clean, differences, stderr) = verify(&kafka, &store, &range);
    assert!(clean, "{differences}");
    // 10 windows of 3 keys in [base + 20 s, base + 40 s).
    assert!(stderr.contains("30 windows compared"), "{stderr}");
    // It stopped once the watermark (max event time - 500 ms) reached the end of the
    // last window before --to, base + 40 s: the record at base + 40.5 s is the 82nd,
    // and none after it was read.
    assert_eq!(figure(&stderr, "read"), 82, "{stderr}");
    // The mock cannot seek by time: the 39 records stamped before the first window
    // minus the grace (base + 19.5 s) were read and passed over.
    assert_eq!(figure(&stderr, "records ("), 39, "{stderr}");

    // A damaged window outside the range is not this range's business...
    tamper(&store, keys[0], base);
    let (clean, differences, _) = verify(&kafka, &store, &range);
    assert!(clean, "{differences}");
    // ...but the whole log finds it, and so does a range that holds it.
    let (clean, differences, _) = verify(&kafka, &store, &[]);
    assert!(!clean);
    assert_eq!(differences.lines().count(), 1, "{differences}");
    tamper(&store, keys[1], base + 30_000);
    let (clean, differences, _) = verify(&kafka, &store, &range);
    assert!(!clean);
    assert_eq!(differences.lines().count(), 1, "{differences}");
    assert!(differences.contains(&keys[1].to_string()), "{differences}");
}

#[test]
fn verify_on_a_truncated_log_skips_and_counts_the_windows_that_may_hold_deleted_records() {
    let kafka = Kafka::start(1);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let _aggregator = start_aggregator(
        &kafka,
        "verify-truncated",
        &store,
        &dir.path().join("a.log"),
    );
    let keys: Vec<Uuid> = (0..50).map(|i| Uuid::from_u128(0x1000 + i)).collect();
    let base = (now_ms() - 240_000).div_euclid(WINDOW_MS) * WINDOW_MS;
    // 80,000 records over 80 s of event time: about 9 MB, beyond the 5 MB the mock
    // keeps per partition. They are produced a slice at a time, each counted before
    // the next, so the aggregator always reads records before the log deletes them and
    // the store holds the windows whose records are then gone from the log.
    let records: Vec<(Uuid, i64, i64)> = (0..80_000)
        .map(|i| (keys[i % keys.len()], (i % 5 + 1) as i64, base + i as i64))
        .collect();
    for (slice, chunk) in records.chunks(5_000).enumerate() {
        produce_increments(&kafka, chunk);
        let produced = (slice as i64 + 1) * 5_000;
        wait_for(
            Duration::from_secs(60),
            "the records so far to be counted",
            || {
                stored_per_window(&store)
                    .values()
                    .map(|(_, count)| count)
                    .sum::<i64>()
                    == produced
            },
        );
    }
    let expected = per_window(&records, WINDOW_MS);
    assert_eq!(stored_per_window(&store), expected);

    let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .create()
        .unwrap();
    let (low, high) = consumer
        .fetch_watermarks(TOPIC, 0, Duration::from_secs(10))
        .unwrap();
    assert_eq!(high, 80_000);
    assert!(
        low > 0,
        "the mock cluster kept the whole log; the test needs it truncated"
    );

    let (clean, differences, stderr) = verify(&kafka, &store, &[]);
    assert!(clean, "a truncated log is not a difference: {differences}");
    assert!(
        stderr.contains(&format!("partition 0 starts at offset {low}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("windows skipped: they may hold records deleted from the log"),
        "{stderr}"
    );
    // The first surviving record is stamped base + low ms: windows up to the first
    // boundary at or after its window end plus the grace are left out, the rest compared.
    let first_surviving = base + low;
    let first_compared = {
        let end = first_surviving.div_euclid(WINDOW_MS) * WINDOW_MS + WINDOW_MS;
        (end + 500 + WINDOW_MS - 1).div_euclid(WINDOW_MS) * WINDOW_MS
    };
    let compared_windows = expected
        .keys()
        .filter(|(_, start)| *start >= first_compared)
        .count();
    assert!(
        stderr.contains(&format!("{compared_windows} windows compared")),
        "{compared_windows} windows from {first_compared}: {stderr}"
    );
    // A difference among the windows still in the log is found.
    let (key, start) = expected
        .keys()
        .find(|(_, start)| *start >= first_compared + WINDOW_MS)
        .copied()
        .unwrap();
    tamper(&store, key, start);
    let (clean, differences, _) = verify(&kafka, &store, &[]);
    assert!(!clean);
    assert_eq!(differences.lines().count(), 1, "{differences}");
}

#[test]
fn with_a_retention_old_windows_are_pruned_and_verify_skips_them_instead_of_reporting_them() {
    let kafka = Kafka::start(1);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let _aggregator = spawn_aggregator(
        &AggregatorOptions {
            bootstrap: &kafka.bootstrap,
            group: "verify-retention",
            store: &store,
            metrics_port: free_port(),
            extra: &["--retention", "5m"],
        },
        "verify-retention",
        &dir.path().join("a.log"),
    );
    let keys = [Uuid::from_u128(1), Uuid::from_u128(2)];
    // Eight minutes of event time ending one minute ago, a record every 100 ms.
    let base = (now_ms() - 540_000).div_euclid(WINDOW_MS) * WINDOW_MS;
    let records: Vec<(Uuid, i64, i64)> = (0..4_800)
        .map(|i| (keys[i % 2], 1, base + i as i64 * 100))
        .collect();
    produce_increments(&kafka, &records);
    let expected = per_window(&records, WINDOW_MS);
    let horizon = now_ms() - 300_000;
    let kept = |start: i64| start + WINDOW_MS > horizon;
    // Windows that ended more than five minutes ago are pruned by the aggregator's
    // writer after its flushes; the later ones stay.
    wait_for(
        Duration::from_secs(90),
        "expired windows to be pruned",
        || {
            let stored = stored_per_window(&store);
            stored.keys().all(|(_, start)| kept(*start))
                && expected
                    .iter()
                    .filter(|((_, start), _)| *start + WINDOW_MS > now_ms() - 240_000)
                    .all(|(window, sums)| stored.get(window) == Some(sums))
        },
    );
    let (clean, differences, stderr) = verify(&kafka, &store, &[]);
    assert!(
        clean,
        "windows past retention are not differences: {differences}"
    );
    assert!(stderr.contains("(the store's retention)"), "{stderr}");
    assert!(
        !stderr.contains(" 0 windows skipped: they ended before"),
        "some windows were past retention: {stderr}"
    );
}
