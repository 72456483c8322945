//! The playground's live page in a real browser. Starts the real `tally dev`, sends
//! increments through the edge (and one poison record straight to Kafka, as a direct
//! producer would), then loads the printed `ui:` URL in headless Chromium and reads the
//! rendered DOM: the key's total, its windows, and the pipeline health (assigned
//! partitions, records/s, dead letters by reason).
//!
//! `tally ingest --store` serves the same page with the metrics it has (the edge's), and
//! says so on the page; without `--store` there is no page.
//!
//! Chromium is Debian's `chromium` package (`scripts/test.sh` installs it); without it
//! this test fails, it never skips. `TALLY_CHROMIUM` names another binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{http, parse_prometheus, DevProcess};

const KEY: &str = "0b7e3d52-6a5c-4f8e-9a41-1c2d3e4f5a6b";
const OTHER_KEY: &str = "9f8e7d6c-5b4a-4392-8170-fedcba987654";
const PARTITIONS: usize = 2;

fn chromium() -> String {
    std::env::var("TALLY_CHROMIUM").unwrap_or_else(|_| "chromium".to_owned())
}

/// The DOM after the page ran for `virtual_ms` of (virtual) time.
fn dump_dom(url: &str, virtual_ms: u64) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={virtual_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run `{}` ({err}): the live page is tested in headless Chromium; \
                 install Debian's `chromium` package (scripts/test.sh does)",
                chromium()
            )
        });
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut dom = String::new();
        stdout.read_to_string(&mut dom).unwrap();
        dom
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let dom = reader.join().unwrap();
    if !status.success() || !dom.contains("</html>") {
        let mut stderr = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
        panic!("chromium exited with {status}; stderr:\n{stderr}\nDOM:\n{dom}");
    }
    dom
}

/// The opening tag and the text of the element with `id` (no nested elements).
fn element<'a>(dom: &'a str, id: &str) -> (&'a str, &'a str) {
    let marker = format!("id=\"{id}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no element #{id} in the DOM:\n{dom}"));
    let start = dom[..at].rfind('<').unwrap();
    let tag_end = at + dom[at..].find('>').unwrap();
    let text_end = tag_end + dom[tag_end..].find('<').unwrap();
    (&dom[start..=tag_end], dom[tag_end + 1..text_end].trim())
}

fn send(dev: &DevProcess, key: &str, value: i64) {
    let response = http(
        dev.ingest,
        "POST",
        "/increment",
        &[("Content-Type", "application/json")],
        format!(r#"{{"key":"{key}","value":{value}}}"#).as_bytes(),
    );
    assert_eq!(response.status, 202, "{}", response.text());
}

fn produce_poison(bootstrap: &str) {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    producer
        .send(
            BaseRecord::to("increments")
                .key("not-a-uuid")
                .payload(r#"{"key":"not-a-uuid","value":1}"#),
        )
        .map_err(|(err, _)| err)
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
}

#[test]
fn live_page_shows_the_keys_total_windows_and_health_in_a_browser() {
    let partitions = PARTITIONS.to_string();
    let dev = DevProcess::start_with(&["--partitions", &partitions]);
    let ui = dev
        .ui
        .clone()
        .unwrap_or_else(|| panic!("tally dev printed no `ui:` line: {:?}", dev.banner));
    assert_eq!(ui, format!("http://{}/ui", dev.ingest), "{:?}", dev.banner);

    for value in [2, 3, 10] {
        send(&dev, KEY, value);
    }
    send(&dev, OTHER_KEY, 1000);
    produce_poison(dev.kafka.as_deref().expect("a `kafka:` line"));

    // The store has the sums and the aggregator has dead-lettered the poison record.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let read = http(dev.ingest, "GET", &format!("/v1/windows/{KEY}"), &[], b"");
        let stored: i64 = read.json()["windows"]
            .as_array()
            .map(|windows| windows.iter().filter_map(|w| w["sum"].as_i64()).sum())
            .unwrap_or(0);
        let letters = parse_prometheus(&dev.scrape())
            .value_of(r#"tally_aggregator_dlq_writes_total{reason="invalid_key"}"#);
        if stored == 15 && letters == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "store sum {stored}, invalid_key letters {letters:?} after 60 s\n{}",
            dev.stderr_tail()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    let dom = dump_dom(&format!("{ui}?key={KEY}"), 8_000);

    let (tag, total) = element(&dom, "total");
    assert_eq!(total, "15", "the page's total for {KEY}: {tag}{total}");
    assert!(
        tag.contains(&format!("data-key=\"{KEY}\"")) && tag.contains("data-state=\"loaded\""),
        "{tag}"
    );
    let (_, windows) = element(&dom, "window-count");
    let windows: usize = windows.parse().unwrap();
    assert!(windows >= 1, "windows shown: {windows}");
    let (_, finals) = element(&dom, "final-count");
    let (_, open) = element(&dom, "open-count");
    assert_eq!(
        finals.parse::<usize>().unwrap() + open.parse::<usize>().unwrap(),
        windows
    );
    // One table row per window, with its sum, and bars in the chart.
    let table = &dom[dom.find("id=\"windows\"").unwrap()..];
    let table = &table[..table.find("</table>").unwrap()];
    assert_eq!(table.matches("<tr class=").count(), windows, "{table}");
    assert!(dom.contains("<rect"), "no bars in the chart");
    assert!(
        !dom.contains(">1,000<") && !dom.contains(">1000<"),
        "another key's sum is shown"
    );

    // Health from this process's metrics.
    let (_, assigned) = element(&dom, "partitions");
    assert_eq!(assigned, PARTITIONS.to_string());
    let (_, rate) = element(&dom, "records-rate");
    assert!(rate.parse::<f64>().is_ok(), "records/s: {rate:?}");
    let letters = &dom[dom.find("id=\"dead-letters\"").unwrap()..];
    let row = &letters[letters
        .find("data-reason=\"invalid_key\"")
        .unwrap_or_else(|| panic!("no invalid_key row: {letters}"))..];
    let count = &row[row.find("class=\"num\">").unwrap() + "class=\"num\">".len()..];
    assert!(
        count.starts_with("1<"),
        "invalid_key letters: {}",
        &count[..20.min(count.len())]
    );
    let (_, read_error) = element(&dom, "read-error");
    assert_eq!(read_error, "", "the page reported a read error");

    let status = dev.terminate(Duration::from_secs(45));
    assert!(status.success(), "tally dev exited with {status}");
}

#[test]
fn ingest_with_a_store_serves_the_page_and_says_what_it_cannot_show() {
    let kafka = support::Kafka::start(1);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tally.sqlite");
    let with_store = format!("127.0.0.1:{}", support::free_port());
    let without_store = format!("127.0.0.1:{}", support::free_port());
    let mut command = support::tally();
    command.args([
        "ingest",
        "--listen",
        &with_store,
        "--brokers",
        &kafka.bootstrap,
    ]);
    command
        .arg("--store")
        .arg(format!("sqlite://{}", store.display()));
    let _ingest = support::spawn_logged(command, "ingest", &dir.path().join("ingest.log"));
    let mut command = support::tally();
    command.args([
        "ingest",
        "--listen",
        &without_store,
        "--brokers",
        &kafka.bootstrap,
    ]);
    let _bare = support::spawn_logged(command, "ingest-bare", &dir.path().join("bare.log"));
    for address in [&with_store, &without_store] {
        support::wait_for(Duration::from_secs(30), "ingest /readyz", || {
            support::get(address, "/readyz").is_some_and(|(status, _)| status == 200)
        });
    }
    let (status, _) = support::get(&without_store, "/ui").unwrap();
    assert_eq!(
        status, 404,
        "without --store there is no read side, so no page"
    );

    let dom = dump_dom(&format!("http://{with_store}/ui?key={KEY}"), 4_000);
    let (_, scope) = element(&dom, "health-scope");
    assert!(
        scope.contains("ingest edge only") && scope.contains("--metrics-listen"),
        "the page should say which health it cannot show: {scope:?}"
    );
    let (_, total) = element(&dom, "total");
    assert_eq!(total, "0", "no increments were sent");
    let (_, lag) = element(&dom, "consumer-lag");
    assert_eq!(lag, "n/a");
    let (_, accepted) = element(&dom, "accepted-rate");
    assert!(
        accepted.parse::<f64>().is_ok(),
        "the edge's own rate: {accepted:?}"
    );
    assert!(
        dom.contains("no aggregator in this process"),
        "dead letters: {dom}"
    );
}
