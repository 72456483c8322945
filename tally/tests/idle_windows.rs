//! A fresh `tally dev`, three increments and no further traffic: the windows become
//! final on their own, through idle markers the aggregator appends to its idle
//! partitions (see README, "Idle partitions"). Default settings throughout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{http, DevProcess};

#[test]
fn windows_become_final_after_the_idle_period_without_more_traffic() {
    let dev = DevProcess::start();
    let key = "3f2b8c1e-9d4a-4e6b-8a1c-5b7d9e0f1a2b";
    for value in [2, 3, 4] {
        let accepted = http(
            dev.ingest,
            "POST",
            "/increment",
            &[("Content-Type", "application/json")],
            format!(r#"{{"key":"{key}","value":{value}}}"#).as_bytes(),
        );
        assert_eq!(accepted.status, 202, "{}", accepted.text());
    }
    let sent_at = Instant::now();
    // Window 10 s + grace 2 s + marker lag 10 s after the last increment, plus a
    // flush: about 23 s at most. Allow for a slow machine.
    let deadline = sent_at + Duration::from_secs(90);
    let answer = loop {
        let response = http(dev.ingest, "GET", &format!("/v1/windows/{key}"), &[], b"");
        assert_eq!(response.status, 200, "{}", response.text());
        let body: serde_json::Value =
            serde_json::from_str(&response.text()).expect("a JSON answer");
        let windows = body["windows"].as_array().cloned().unwrap_or_default();
        if !windows.is_empty() && windows.iter().all(|w| w["final"] == true) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "windows still not final {:?} after the increments: {body}\n{}",
            sent_at.elapsed(),
            dev.stderr_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(answer["total"]["sum"], 9, "{answer}");
    assert_eq!(answer["total"]["count"], 3, "{answer}");
    assert_eq!(answer["total"]["final"], true, "{answer}");

    let scrape = dev.scrape();
    let value = |name: &str| -> f64 {
        scrape
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    // Markers are never counted nor dead-lettered.
    assert!(
        value("tally_aggregator_idle_markers_total ") >= 1.0,
        "{scrape}"
    );
    assert_eq!(
        value(r#"tally_aggregator_records_total{outcome="counted"} "#),
        3.0
    );
    let letters: f64 = scrape
        .lines()
        .filter(|line| line.starts_with("tally_aggregator_dlq_writes_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(letters, 0.0, "{scrape}");
    let status = dev.terminate(Duration::from_secs(45));
    assert!(status.success(), "tally dev exited with {status}");
}
