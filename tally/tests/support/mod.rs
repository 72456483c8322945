//! Shared pieces of the end-to-end tests: an in-process Kafka-protocol cluster, the
//! real `tally` binary as child processes, a tiny HTTP client and store readers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tally_sink::{WindowRow, WindowStore};
use uuid::Uuid;

pub const TOPIC: &str = "increments";
pub const DLQ_TOPIC: &str = "increments.dlq";
pub const REDRIVE_JOURNAL_TOPIC: &str = "increments.dlq.redrive";

/// librdkafka's mock cluster: real Kafka protocol on localhost, in this process.
pub struct Kafka {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
    pub bootstrap: String,
}

impl Kafka {
    pub fn start(partitions: i32) -> Kafka {
        let cluster = MockCluster::new(3).unwrap();
        cluster.create_topic(TOPIC, partitions, 1).unwrap();
        cluster.create_topic(DLQ_TOPIC, 1, 1).unwrap();
        // `tally dlq redrive` creates its journal with CreateTopics, which the mock
        // cluster lacks.
        cluster.create_topic(REDRIVE_JOURNAL_TOPIC, 1, 1).unwrap();
        let bootstrap = cluster.bootstrap_servers();
        Kafka { cluster, bootstrap }
    }

    /// Committed offsets of `group` on every partition of the input topic, read
    /// without joining the group.
    pub fn committed(&self, group: &str, partitions: i32) -> HashMap<i32, i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition(TOPIC, partition);
        }
        let committed = consumer
            .committed_offsets(list, Duration::from_secs(10))
            .unwrap();
        committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect()
    }
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn kill_hard(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then wait for a clean exit within `deadline`.
    pub fn terminate(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < until,
                "{} did not exit after SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn tally() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
        .env_remove("KAFKA_BROKERS")
        .stdin(Stdio::null());
    command
}

/// Writes a child's stderr to `log` so a failing test can show it.
pub fn spawn_logged(mut command: Command, name: &str, log: &Path) -> Proc {
    let file = std::fs::File::create(log).unwrap();
    command.stdout(Stdio::null()).stderr(file);
    Proc {
        child: command.spawn().unwrap(),
        name: name.to_owned(),
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct AggregatorOptions<'a> {
    pub bootstrap: &'a str,
    pub group: &'a str,
    pub store: &'a Path,
    pub metrics_port: u16,
    pub extra: &'a [&'a str],
}

pub fn spawn_aggregator(options: &AggregatorOptions<'_>, name: &str, log: &Path) -> Proc {
    let mut command = tally();
    command.args([
        "aggregator",
        "--brokers",
        options.bootstrap,
        "--group",
        options.group,
        "--store",
        &format!("sqlite://{}", options.store.display()),
        "--window",
        "2s",
        "--grace",
        "500ms",
        "--flush-interval",
        "200ms",
        "--metrics-listen",
        &format!("127.0.0.1:{}", options.metrics_port),
    ]);
    command.args(options.extra);
    spawn_logged(command, name, log)
}

/// Minimal HTTP/1.1 client over one connection per call.
pub fn http(
    method: &str,
    address: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub fn get(address: &str, path: &str) -> Option<(u16, String)> {
    std::net::TcpStream::connect(address).ok()?;
    Some(http("GET", address, path, "text/plain", b""))
}

/// Polls `check` until it returns true or `limit` passes.
pub fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Reads every row of the SQLite store (fresh connection each time).
pub async fn store_rows(path: &Path) -> Vec<WindowRow> {
    if !path.exists() {
        return Vec::new();
    }
    let store = tally_sink::sqlite::SqliteStore::open(path).unwrap();
    store
        .scan_rows(i64::MIN, i64::MAX, &[])
        .await
        .unwrap_or_default()
}

/// Sum and count per key over all windows and partitions.
pub fn totals(rows: &[WindowRow]) -> HashMap<Uuid, (i64, i64)> {
    let mut totals: HashMap<Uuid, (i64, i64)> = HashMap::new();
    for row in rows {
        let entry = totals.entry(row.key).or_default();
        entry.0 += row.sum;
        entry.1 += row.count;
    }
    totals
}

/// The value of one sample line of a Prometheus text scrape, e.g.
/// `tally_aggregator_circuit_state`.
pub fn metric(scrape: &str, name_with_labels: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(name_with_labels)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits for a line starting with `prefix` on a child's stdout.
pub fn wait_line(reader: &mut impl BufRead, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let read = reader.read_line(&mut line).unwrap();
        assert!(read > 0, "stdout closed before {prefix:?}");
        if line.starts_with(prefix) {
            return line.trim_end().to_owned();
        }
    }
}

pub fn data_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

pub fn buffered(child: &mut Child) -> BufReader<std::process::ChildStdout> {
    BufReader::new(child.stdout.take().unwrap())
}

pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

/// Produces raw records directly (as a non-HTTP producer would) and waits for acks.
pub fn produce_all(producer: &FutureProducer, records: &[(Vec<u8>, Vec<u8>, i64)]) {
    block_on(async {
        let mut pending = Vec::with_capacity(records.len());
        for (key, value, timestamp) in records {
            let record = FutureRecord::to(TOPIC)
                .key(key)
                .payload(value)
                .timestamp(*timestamp);
            pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        for delivery in pending {
            delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
    });
}

pub fn increment_record(key: Uuid, value: i64, timestamp: i64) -> (Vec<u8>, Vec<u8>, i64) {
    (
        key.hyphenated().to_string().into_bytes(),
        format!(r#"{{"key":"{key}","value":{value}}}"#).into_bytes(),
        timestamp,
    )
}

/// Runs `tally ARGS` to completion, printing what it said (shown when a test fails).
pub fn run_tally(args: &[&str]) -> std::process::Output {
    let output = tally().args(args).output().unwrap();
    eprintln!(
        "tally {}\n-- stdout\n{}-- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Produces valid increments `(key, value, event time)` directly, as a Kafka client
/// would, and waits for every acknowledgement.
pub fn produce_increments(kafka: &Kafka, records: &[(Uuid, i64, i64)]) {
    let producer = producer(&kafka.bootstrap);
    for chunk in records.chunks(20_000) {
        let raw: Vec<_> = chunk
            .iter()
            .map(|(key, value, timestamp)| increment_record(*key, *value, *timestamp))
            .collect();
        produce_all(&producer, &raw);
    }
}

/// Per (key, window start): (sum, count) of `records`, all valid and on time.
pub fn per_window(
    records: &[(Uuid, i64, i64)],
    window_ms: i64,
) -> HashMap<(Uuid, i64), (i64, i64)> {
    let mut sums: HashMap<(Uuid, i64), (i64, i64)> = HashMap::new();
    for (key, value, timestamp) in records {
        let entry = sums
            .entry((*key, timestamp.div_euclid(window_ms) * window_ms))
            .or_default();
        entry.0 += value;
        entry.1 += 1;
    }
    sums
}

/// Per (key, window start): (sum, count) the SQLite store at `store` holds.
pub fn stored_per_window(store: &Path) -> HashMap<(Uuid, i64), (i64, i64)> {
    let mut sums: HashMap<(Uuid, i64), (i64, i64)> = HashMap::new();
    for row in block_on(store_rows(store)) {
        let entry = sums.entry((row.key, row.window_start_ms)).or_default();
        entry.0 += row.sum;
        entry.1 += row.count;
    }
    sums
}
