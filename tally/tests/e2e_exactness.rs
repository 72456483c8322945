//! End-to-end regression tests of the exactness holes closed by the commit protocol,
//! each against the real `tally` binary on librdkafka's mock cluster:
//! - settings that decide sums are pinned: another `--window` refuses to start, and
//!   `tally replay --from T --window W` changes them explicitly;
//! - offsets deleted by retention never lower a stored row (halt by default,
//!   `--accept-data-loss` goes on with the touched windows frozen);
//! - `tally replay --from` on a group behind, with the commit metadata dropped,
//!   resumes from the store checkpoint (no window left provisional and short);
//! - a dead letter that can never be delivered stops the aggregator uncommitted;
//! - with every broker down, SIGTERM ends within `--shutdown-timeout`;
//! - a rebalance costs about one `--revoke-timeout`, whatever the partition count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use support::*;
use uuid::Uuid;

/// `tally aggregator` with its window and grace given here.
fn aggregator(
    kafka: &Kafka,
    group: &str,
    store: &Path,
    window: &str,
    grace: &str,
    metrics_port: u16,
    extra: &[&str],
) -> Command {
    let mut command = tally();
    command.args([
        "aggregator",
        "--brokers",
        &kafka.bootstrap,
        "--group",
        group,
        "--store",
        &format!("sqlite://{}", store.display()),
        "--window",
        window,
        "--grace",
        grace,
        "--flush-interval",
        "200ms",
        "--metrics-listen",
        &format!("127.0.0.1:{metrics_port}"),
    ]);
    command.args(extra);
    command
}

fn wait_exit(proc: &mut Proc, limit: Duration) -> std::process::ExitStatus {
    let until = Instant::now() + limit;
    loop {
        if let Some(status) = proc.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < until, "{} did not exit", proc.name);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Like `wait_for`, printing a child's log when it times out.
fn wait_showing(limit: Duration, what: &str, log: &Path, mut check: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < until,
            "timed out waiting for {what}; log:\n{}",
            read_log(log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn rows(store: &Path) -> Vec<tally_sink::WindowRow> {
    block_on(store_rows(store))
}

fn scrape(port: u16) -> String {
    get(&format!("127.0.0.1:{port}"), "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default()
}

#[test]
fn other_window_settings_are_refused_and_replay_changes_them_explicitly() {
    let kafka = Kafka::start(1);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let key = Uuid::from_u128(0x5e7);
    let base = (now_ms() / 60_000) * 60_000 - 120_000;
    produce_increments(
        &kafka,
        &[
            (key, 1, base + 100),
            (key, 2, base + 2_100),
            (key, 3, base + 5_000),
        ],
    );
    let port = free_port();
    let mut first = spawn_logged(
        aggregator(&kafka, "settings", &store, "2s", "500ms", port, &[]),
        "aggregator",
        &dir.path().join("first.log"),
    );
    wait_for(Duration::from_secs(60), "the first run's rows", || {
        rows(&store).iter().map(|r| r.count).sum::<i64>() == 3
    });
    assert!(first.terminate(Duration::from_secs(30)).success());

    // Another window size against the pinned store: refused, naming both values.
    let log = dir.path().join("refused.log");
    let mut refused = spawn_logged(
        aggregator(&kafka, "settings", &store, "4s", "500ms", free_port(), &[]),
        "aggregator",
        &log,
    );
    let status = wait_exit(&mut refused, Duration::from_secs(30));
    let text = read_log(&log);
    assert!(!status.success(), "started with other settings:\n{text}");
    assert!(
        text.contains("window 2000 ms") && text.contains("window 4000 ms"),
        "{text}"
    );
    assert_eq!(
        rows(&store).iter().map(|r| r.count).sum::<i64>(),
        3,
        "nothing written under the wrong settings"
    );

    // The explicit change, from a boundary of both window sizes before which every
    // window is final (the watermark stands at base + 4.5 s).
    let from = (base + 4_000).to_string();
    let output = run_tally(&[
        "replay",
        "--brokers",
        &kafka.bootstrap,
        "--group",
        "settings",
        "--store",
        &format!("sqlite://{}", store.display()),
        "--from",
        &from,
        "--window",
        "4s",
    ]);
    assert!(output.status.success());
    produce_increments(
        &kafka,
        &[
            (key, 10, base + 8_500),
            (key, 20, base + 11_900),
            (key, 5, base + 20_000),
        ],
    );
    let port = free_port();
    let _second = spawn_logged(
        aggregator(&kafka, "settings", &store, "4s", "500ms", port, &[]),
        "aggregator",
        &dir.path().join("second.log"),
    );
    wait_for(
        Duration::from_secs(60),
        "a 4 s window holding 10 + 20",
        || {
            rows(&store).iter().any(|r| {
                r.window_start_ms == base + 8_000
                    && r.window_end_ms == base + 12_000
                    && (r.sum, r.count) == (30, 2)
            })
        },
    );
    // The 2 s windows before the change are as they were.
    let before: Vec<_> = rows(&store)
        .into_iter()
        .filter(|r| r.window_end_ms <= base + 4_000)
        .map(|r| {
            (
                r.window_start_ms - base,
                r.window_end_ms - r.window_start_ms,
                r.sum,
            )
        })
        .collect();
    assert_eq!(before, vec![(0, 2_000, 1), (2_000, 2_000, 2)]);
}

/// The measured hole: one open 60 s window holding 1,000 stored records; the
/// aggregator stops; 60,000 more records arrive and the broker's retention (the mock
/// cluster keeps about 5 MB per partition) deletes the oldest offsets.
#[test]
fn offsets_deleted_by_retention_never_lower_a_stored_row() {
    let kafka = Kafka::start(1);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let key = Uuid::from_u128(0xde1);
    let window = 60_000;
    let base = (now_ms() / window) * window - 10 * window;
    let first: Vec<_> = (0..1_000).map(|i| (key, 1, base + 10 + i / 100)).collect();
    produce_increments(&kafka, &first);
    let port = free_port();
    let mut run = spawn_logged(
        aggregator(&kafka, "retention", &store, "60s", "5s", port, &[]),
        "aggregator",
        &dir.path().join("first.log"),
    );
    wait_for(Duration::from_secs(60), "1,000 records stored", || {
        rows(&store).iter().any(|r| r.count == 1_000)
    });
    assert!(run.terminate(Duration::from_secs(30)).success());
    assert_eq!(kafka.committed("retention", 1).get(&0), Some(&0));

    let more: Vec<_> = (0..60_000)
        .map(|i| (key, 1, base + 20 + i / 1_000))
        .collect();
    produce_increments(&kafka, &more);
    let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .create()
        .unwrap();
    let (log_start, log_end) = consumer
        .fetch_watermarks(TOPIC, 0, Duration::from_secs(10))
        .unwrap();
    assert!(
        log_start > 0,
        "retention deleted nothing: [{log_start}, {log_end})"
    );

    // Default: the partition halts there, loudly, and nothing is lowered or committed.
    let log = dir.path().join("halted.log");
    let port = free_port();
    let mut halted = spawn_logged(
        aggregator(&kafka, "retention", &store, "60s", "5s", port, &[]),
        "aggregator",
        &log,
    );
    let lost = "tally_aggregator_lost_offsets_total{partition=\"0\"}".to_string();
    wait_for(
        Duration::from_secs(60),
        "the lost offsets to be counted",
        || metric(&scrape(port), &lost).is_some_and(|n| n >= log_start as f64),
    );
    let text = read_log(&log);
    assert!(
        text.contains("offsets vanished") && text.contains(&format!("to={log_start}")),
        "{text}"
    );
    let (status, body) = get(&format!("127.0.0.1:{port}"), "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    std::thread::sleep(Duration::from_secs(2));
    let stored: Vec<_> = rows(&store);
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].count, 1_000,
        "a stored row was lowered: {stored:?}"
    );
    assert_eq!(kafka.committed("retention", 1).get(&0), Some(&0));
    assert!(halted.terminate(Duration::from_secs(30)).success());

    // Accepting the loss: it goes on from the log start; the window the gap touches
    // stays exactly as stored (frozen), never replaced by a partial sum.
    let later: Vec<_> = (0..50).map(|i| (key, 1, base + 2 * window + i)).collect();
    produce_increments(&kafka, &later);
    let log = dir.path().join("accepted.log");
    let _accepted = spawn_logged(
        aggregator(
            &kafka,
            "retention",
            &store,
            "60s",
            "5s",
            free_port(),
            &["--accept-data-loss"],
        ),
        "aggregator",
        &log,
    );
    wait_showing(Duration::from_secs(90), "the later window", &log, || {
        rows(&store)
            .iter()
            .any(|r| r.window_start_ms == base + 2 * window && r.count == 50)
    });
    let window_row = rows(&store)
        .into_iter()
        .find(|r| r.window_start_ms == base)
        .unwrap();
    assert_eq!(window_row.count, 1_000, "{window_row:?}");
    wait_for(Duration::from_secs(30), "a commit past the gap", || {
        kafka
            .committed("retention", 1)
            .get(&0)
            .is_some_and(|offset| *offset >= log_start)
    });
}

/// `tally replay --from` on a group that is behind the replay time, on a broker that
/// dropped the commit metadata: the plan must start from the store's checkpoint
/// (where the aggregator would resume), or the window open at the group's position
/// stays provisional and short forever.
#[test]
fn replay_from_time_on_a_behind_group_without_metadata_resumes_from_the_store() {
    let kafka = Kafka::start(1);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let store_url = format!("sqlite://{}", store.display());
    let key = Uuid::from_u128(0xbe41);
    let base = (now_ms() / 2_000) * 2_000 - 60_000;
    // Ten records in [base, base + 2 s): the window stays open (grace 500 ms).
    let first: Vec<_> = (0..10).map(|i| (key, 1, base + 100 + i * 50)).collect();
    produce_increments(&kafka, &first);
    let mut run = spawn_logged(
        aggregator(&kafka, "behind", &store, "2s", "500ms", free_port(), &[]),
        "aggregator",
        &dir.path().join("first.log"),
    );
    wait_for(Duration::from_secs(60), "ten records stored", || {
        rows(&store).iter().any(|r| r.count == 10)
    });
    assert!(run.terminate(Duration::from_secs(30)).success());
    let committed = *kafka.committed("behind", 1).get(&0).unwrap();
    assert_eq!(committed, 0, "the open window's first offset");
    // The broker forgets the metadata (re-commit the offset without it).
    let output = run_tally(&[
        "replay",
        "--brokers",
        &kafka.bootstrap,
        "--group",
        "behind",
        "--store",
        &store_url,
        "--from-offset",
        &format!("0:{committed}"),
    ]);
    assert!(output.status.success());

    // Five more records of that window, then the next windows.
    let mut later: Vec<_> = (0..5).map(|i| (key, 1, base + 1_500 + i * 50)).collect();
    later.extend((0..5).map(|i| (key, 2, base + 2_100 + i * 100)));
    later.push((key, 3, base + 6_000));
    produce_increments(&kafka, &later);
    let output = run_tally(&[
        "replay",
        "--brokers",
        &kafka.bootstrap,
        "--group",
        "behind",
        "--store",
        &store_url,
        "--from",
        &(base + 2_000).to_string(),
    ]);
    assert!(output.status.success());
    let _second = spawn_logged(
        aggregator(&kafka, "behind", &store, "2s", "500ms", free_port(), &[]),
        "aggregator",
        &dir.path().join("second.log"),
    );
    wait_for(Duration::from_secs(60), "every window complete", || {
        let by_window: HashMap<i64, (i64, i64, bool)> = rows(&store)
            .iter()
            .map(|r| (r.window_start_ms - base, (r.sum, r.count, r.is_final)))
            .collect();
        by_window.get(&0) == Some(&(15, 15, true))
            && by_window.get(&2_000) == Some(&(10, 5, true))
            && by_window.get(&6_000) == Some(&(3, 1, false))
    });
}

/// A poison record whose dead letter (its bytes plus the headers) is larger than the
/// dead-letter producer allows: retrying cannot help, so the aggregator stops loudly
/// and commits nothing past it.
#[test]
fn a_dead_letter_that_can_never_be_delivered_stops_the_aggregator_uncommitted() {
    let kafka = Kafka::start(1);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let key = Uuid::from_u128(0xb16);
    let ts = now_ms() - 30_000;
    let producer = producer(&kafka.bootstrap);
    let poison = (
        key.hyphenated().to_string().into_bytes(),
        vec![b'x'; 3_000],
        ts + 10,
    );
    produce_all(
        &producer,
        &[
            increment_record(key, 1, ts),
            poison,
            increment_record(key, 1, ts + 20),
        ],
    );
    let log = dir.path().join("aggregator.log");
    let port = free_port();
    let mut run = spawn_logged(
        aggregator(
            &kafka,
            "undeliverable",
            &store,
            "2s",
            "500ms",
            port,
            &["--kafka-option", "message.max.bytes=3000"],
        ),
        "aggregator",
        &log,
    );
    let status = wait_exit(&mut run, Duration::from_secs(90));
    let text = read_log(&log);
    assert!(!status.success(), "{text}");
    assert!(text.contains("can never be delivered"), "{text}");
    assert!(
        kafka
            .committed("undeliverable", 1)
            .get(&0)
            .is_none_or(|offset| *offset <= 1),
        "committed past the undeliverable letter"
    );
}

/// With every broker gone, SIGTERM must still end the process within its deadline
/// (handing over uncommitted: the next owner replays).
#[test]
fn with_every_broker_down_shutdown_ends_within_its_deadline() {
    let kafka = Kafka::start(2);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let key = Uuid::from_u128(0xd0e);
    produce_increments(&kafka, &[(key, 1, now_ms() - 10_000)]);
    let mut run = spawn_logged(
        aggregator(
            &kafka,
            "down",
            &store,
            "2s",
            "500ms",
            free_port(),
            &["--shutdown-timeout", "5s"],
        ),
        "aggregator",
        &dir.path().join("aggregator.log"),
    );
    wait_for(Duration::from_secs(60), "a stored row", || {
        !rows(&store).is_empty()
    });
    for broker in 1..=3 {
        kafka.cluster.broker_down(broker).unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    // `terminate` fails the test if the process is still running after the limit.
    run.terminate(Duration::from_secs(10));
    eprintln!("shutdown took {:?}", started.elapsed());
}

/// A rebalance that revokes many partitions while the store is slow costs about one
/// `--revoke-timeout`, not one per partition: the revoke handles them all at once.
/// (What the group protocol itself takes is the broker's; the first aggregator's log
/// says how long its revoke took.)
#[test]
fn a_rebalance_of_many_partitions_costs_about_one_revoke_timeout() {
    let partitions = 12;
    let kafka = Kafka::start(partitions);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let records: Vec<_> = (0..240u128)
        .map(|i| (Uuid::from_u128(0x7e00 + i), 1, now_ms() - 20_000 + i as i64))
        .collect();
    produce_increments(&kafka, &records);
    let options = ["--revoke-timeout", "4s"];
    let first_log = dir.path().join("first.log");
    let mut first = spawn_logged(
        aggregator(
            &kafka,
            "churn",
            &store,
            "2s",
            "500ms",
            free_port(),
            &options,
        ),
        "first",
        &first_log,
    );
    wait_for(Duration::from_secs(60), "every record stored", || {
        rows(&store).iter().map(|r| r.count).sum::<i64>() == 240
    });
    produce_increments(&kafka, &records[..120]);
    // Hold the store's write lock: the first aggregator's writes wait, so its revoke
    // must give up after the revoke timeout (reads still work: WAL).
    let lock = rusqlite::Connection::open(&store).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let port = free_port();
    let second_log = dir.path().join("second.log");
    let _second = spawn_logged(
        aggregator(&kafka, "churn", &store, "2s", "500ms", port, &options),
        "second",
        &second_log,
    );
    wait_showing(
        Duration::from_secs(120),
        "the second member to own partitions",
        &second_log,
        || metric(&scrape(port), "tally_aggregator_assigned_partitions").is_some_and(|n| n > 0.0),
    );
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let log = read_log(&first_log);
    let took: Vec<u64> = log
        .lines()
        .filter(|line| line.contains("revoke settled"))
        .filter_map(|line| line.split("took_ms=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    // Six partitions at once: one revoke timeout (4 s), give or take; one timeout per
    // partition would be 24 s.
    assert!(
        !took.is_empty() && took.iter().all(|ms| *ms < 6_000),
        "revokes took {took:?} ms:\n{log}"
    );
    assert!(
        log.contains("handed over uncommitted"),
        "the store was locked: the revoke should have given up:\n{log}"
    );
    wait_for(
        Duration::from_secs(90),
        "totals exact after the rebalance",
        || rows(&store).iter().map(|r| r.count).sum::<i64>() == 360,
    );
    assert!(first.terminate(Duration::from_secs(30)).success());
}
