//! What `tally verify` costs, whole log and bounded ranges: a `tally dev` playground
//! (mock cluster, aggregator, SQLite) is filled with records produced directly, then
//! verify runs over everything, over the first and over the last five minutes.
//!
//! ```sh
//! cargo build --release -p tally --bin tally --example verify_bench
//! target/release/examples/verify_bench --tally target/release/tally [--records 300000]
//! ```
//!
//! The records span an hour of event time over 10,000 keys and 8 partitions (the mock
//! cluster keeps at most 5 MB per partition, about 45,000 records). The mock cannot
//! look offsets up by time, so a range that starts late is read from each partition's
//! start (its records passed over); a range that ends early stops reading early.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn main() {
    let mut tally = "target/release/tally".to_owned();
    let mut records: i64 = 300_000;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap();
        match flag.as_str() {
            "--tally" => tally = value,
            "--records" => records = value.parse().unwrap(),
            other => panic!("unknown option {other}"),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut dev = Command::new(&tally)
        .args([
            "dev",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--partitions",
            "8",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    let (mut kafka, mut store) = (String::new(), String::new());
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("kafka: ") {
            kafka = rest.to_owned();
        } else if let Some(rest) = line.strip_prefix("store: ") {
            store = rest.to_owned();
        } else if line == "ready" {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});

    // An hour of event time ending ten minutes ago, in order, over 10,000 keys.
    let span: i64 = 3_600_000;
    let first = now_ms() - 600_000 - span;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let started = Instant::now();
    runtime.block_on(async {
        for chunk in (0..records).collect::<Vec<_>>().chunks(50_000) {
            let bodies: Vec<(String, String, i64)> = chunk
                .iter()
                .map(|&i| {
                    let key = uuid::Uuid::from_u128(0x5a5a_0000 + (i * 7_919 % 10_000) as u128);
                    let value = format!(r#"{{"key":"{key}","value":{}}}"#, i % 100 + 1);
                    (
                        key.hyphenated().to_string(),
                        value,
                        first + i * span / records,
                    )
                })
                .collect();
            let mut pending = Vec::new();
            for (key, value, timestamp) in &bodies {
                let record = FutureRecord::to("increments")
                    .key(key.as_bytes())
                    .payload(value.as_bytes())
                    .timestamp(*timestamp);
                pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
            }
            for delivery in pending {
                delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
        }
    });
    eprintln!("produced {records} records in {:.1?}", started.elapsed());
    let path = store.strip_prefix("sqlite://").unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let counted: i64 = rusqlite::Connection::open(&path)
            .and_then(|c| {
                c.query_row("SELECT coalesce(sum(count), 0) FROM window_sums", [], |r| {
                    r.get(0)
                })
            })
            .unwrap_or(0);
        if counted == records {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the playground counted {counted} of {records}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("counted in {:.1?}", started.elapsed());

    let five_minutes = 300_000;
    let runs: [(&str, Option<(i64, i64)>); 3] = [
        ("whole log", None),
        ("first 5 minutes", Some((first, first + five_minutes))),
        (
            "last 5 minutes",
            Some((first + span - five_minutes, first + span)),
        ),
    ];
    println!("{records} records, 8 partitions, 10,000 keys, an hour of event time");
    println!("| range | wall s | records read | passed over | records/s | windows compared | store rows | rows/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, range) in runs {
        let mut command = Command::new(&tally);
        command.args(["verify", "--brokers", &kafka, "--store", &store]);
        if let Some((from, to)) = range {
            command.args(["--from", &from.to_string(), "--to", &to.to_string()]);
        }
        let began = Instant::now();
        let output = command.output().unwrap();
        let wall = began.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success(),
            "verify found differences or failed:\n{stderr}"
        );
        let line = |prefix: &str| -> Vec<String> {
            stderr
                .lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} line in {stderr}"))
                .split_whitespace()
                .map(|t| {
                    t.trim_matches(|c| c == '(' || c == ')' || c == ',')
                        .to_owned()
                })
                .collect()
        };
        let before = |tokens: &[String], word: &str| -> String {
            let at = tokens.iter().position(|t| t == word).unwrap();
            tokens[at - 1].clone()
        };
        // verify: read N records (M passed over …) in Xs (R records/s)
        let read = line("verify: read");
        // verify: W windows compared against S store rows in Ys (Q rows/s), D differences
        let compared: Vec<String> = stderr
            .lines()
            .find(|l| l.contains("windows compared against"))
            .unwrap_or_else(|| panic!("no comparison line in {stderr}"))
            .split_whitespace()
            .map(|t| {
                t.trim_matches(|c| c == '(' || c == ')' || c == ',')
                    .to_owned()
            })
            .collect();
        println!(
            "| {name} | {wall:.2} | {} | {} | {} | {} | {} | {} |",
            read[2],
            read[4],
            before(&read, "records/s"),
            compared[1],
            compared[5],
            before(&compared, "rows/s"),
        );
        eprintln!("{stderr}");
    }
    let _ = dev.kill();
    let _ = dev.wait();
}
