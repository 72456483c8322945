//! Read benchmark: `GET /v1/windows/{key}` for the last hour and the last day through
//! the real `tally ingest --store` process, against a bare loop of the same store
//! calls in this process, at the same fixed concurrency, on SQLite or on the CQL test
//! node (kassandra-tester behind the proxy of `sink/tests/support/cql_node.rs`).
//!
//! ```sh
//! cargo build --release -p tally --bin tally --example read_bench
//! target/release/examples/read_bench --backend sqlite,cql --tally target/release/tally
//! ```
//!
//! `--backend` is `sqlite`, `cql`, or both one after the other in one run (`sqlite,cql`).
//!
//! Options: `--keys K` (default 60) keys with one row per 10 s window over the last two
//! days each (60 keys: 1,036,800 rows); `--concurrency C` (16); `--seconds S` (15, per
//! measurement); `--bucket` (ScyllaDB bucket, default `1h`: the test node cannot range
//! read, so it returns whole buckets, and hour buckets keep that close to what
//! ScyllaDB reads).
//!
//! The bare loop does what the handler does below HTTP: one `visit_windows` over the
//! range with the same row filter (pinned settings), the range's total and the first
//! 1,000 windows kept. The HTTP side adds routing, auth and rate-limit checks (off),
//! the JSON answer and the HTTP exchange, with the load generator in this process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../sink/tests/support/cql_node.rs"]
mod cql_node;

use std::ops::ControlFlow;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Empty};
use tally_schemas::SumSettings;
use tally_sink::store::{visit_windows, READ_CHUNK_ROWS};
use tally_sink::{RangeTotal, WindowRow, WindowStore, WindowTotal};
use uuid::Uuid;

const WINDOW_MS: i64 = 10_000;
const PAGE: usize = 1_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

struct Args {
    backend: String,
    tally: String,
    keys: u128,
    concurrency: usize,
    seconds: u64,
    bucket: String,
}

fn args() -> Args {
    let mut args = Args {
        backend: "sqlite".into(),
        tally: "target/release/tally".into(),
        keys: 60,
        concurrency: 16,
        seconds: 15,
        bucket: "1h".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => args.backend = value,
            "--tally" => args.tally = value,
            "--keys" => args.keys = value.parse().unwrap(),
            "--concurrency" => args.concurrency = value.parse().unwrap(),
            "--seconds" => args.seconds = value.parse().unwrap(),
            "--bucket" => args.bucket = value,
            other => panic!("unknown option {other}"),
        }
    }
    args
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn key(n: u128) -> Uuid {
    Uuid::from_u128(n.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) ^ 0x5a5a)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Two days of final 10 s windows per key, ending at `end`.
async fn prefill(store: &dyn WindowStore, keys: u128, end: i64) -> usize {
    let windows = 2 * DAY / WINDOW_MS;
    let mut written = 0;
    for k in 0..keys {
        let rows: Vec<WindowRow> = (0..windows)
            .map(|w| {
                let start = end - (windows - w) * WINDOW_MS;
                WindowRow {
                    key: key(k),
                    window_start_ms: start,
                    window_end_ms: start + WINDOW_MS,
                    partition: (k % 6) as i32,
                    sum: w + 1,
                    count: 1,
                    is_final: true,
                    through_offset: w,
                    generation: 0,
                }
            })
            .collect();
        for chunk in rows.chunks(20_000) {
            store.write_rows(chunk).await.unwrap();
        }
        written += rows.len();
    }
    written
}

/// What the handler computes for one request, without the JSON.
async fn bare_read(
    store: &dyn WindowStore,
    settings: &tally_schemas::PinnedSettings,
    key: Uuid,
    range: (i64, i64),
) -> (RangeTotal, usize) {
    let mut total = RangeTotal::default();
    let mut windows: Vec<WindowTotal> = Vec::with_capacity(PAGE);
    visit_windows(
        store,
        key,
        range.0,
        range.1,
        READ_CHUNK_ROWS,
        |row| settings.row_is_current(row.window_start_ms, row.window_end_ms, row.generation),
        |window| {
            total.add(&window);
            if windows.len() < PAGE {
                windows.push(window);
            }
            ControlFlow::Continue(())
        },
    )
    .await
    .unwrap();
    (total, windows.len())
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    reads_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn figures(mut latencies_us: Vec<u64>, seconds: f64) -> Figures {
    latencies_us.sort_unstable();
    let at = |q: f64| {
        let i =
            ((latencies_us.len() as f64 * q) as usize).min(latencies_us.len().saturating_sub(1));
        latencies_us.get(i).copied().unwrap_or(0) as f64 / 1000.0
    };
    Figures {
        reads_per_s: latencies_us.len() as f64 / seconds,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    }
}

async fn run_bare(
    store: Arc<dyn WindowStore>,
    settings: Arc<tally_schemas::PinnedSettings>,
    keys: u128,
    range_ms: i64,
    end: i64,
    args: &Args,
) -> Figures {
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|task| {
            let (store, settings) = (Arc::clone(&store), Arc::clone(&settings));
            tokio::spawn(async move {
                let mut rng = Rng(0x9e37_79b9 ^ ((task as u64 + 1) * 0x1000_0001));
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let k = key(u128::from(rng.next()) % keys);
                    let began = Instant::now();
                    let (total, windows) =
                        bare_read(&*store, &settings, k, (end - range_ms, end)).await;
                    assert!(total.windows > 0 && windows > 0);
                    latencies.push(began.elapsed().as_micros() as u64);
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    figures(latencies, started.elapsed().as_secs_f64())
}

async fn run_http(
    address: std::net::SocketAddr,
    keys: u128,
    range_ms: i64,
    end: i64,
    args: &Args,
) -> Figures {
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|task| {
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(address).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(connection);
                let mut rng = Rng(0x9e37_79b9 ^ ((task as u64 + 1) * 0x1000_0001));
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let k = key(u128::from(rng.next()) % keys);
                    let target = format!("/v1/windows/{k}?from={}&to={end}", end - range_ms);
                    let request = http::Request::get(target)
                        .header(http::header::HOST, "bench")
                        .body(Empty::<bytes::Bytes>::new())
                        .unwrap();
                    let began = Instant::now();
                    let response = sender.send_request(request).await.unwrap();
                    assert_eq!(response.status(), 200);
                    // Every byte is read, none copied: the load generator shares the
                    // two cores with the process it measures, so it does no more work
                    // than a client must (what it answers is checked by `check_same`).
                    let mut body = response.into_body();
                    let mut bytes = 0;
                    while let Some(frame) = body.frame().await {
                        if let Ok(data) = frame.unwrap().into_data() {
                            bytes += data.len();
                        }
                    }
                    assert!(bytes > 0);
                    latencies.push(began.elapsed().as_micros() as u64);
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    figures(latencies, started.elapsed().as_secs_f64())
}

/// Before measuring: the HTTP answer for one key says what the bare read computes
/// (same total, same number of windows listed), so both sides do the same work.
async fn check_same(
    address: std::net::SocketAddr,
    store: &dyn WindowStore,
    settings: &tally_schemas::PinnedSettings,
    range: (i64, i64),
) {
    let k = key(0);
    let (total, windows) = bare_read(store, settings, k, range).await;
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(format!("/v1/windows/{k}?from={}&to={}", range.0, range.1))
        .header(http::header::HOST, "bench")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["total"]["sum"], total.sum);
    assert_eq!(answer["total"]["count"], total.count);
    assert_eq!(answer["total"]["windows"], total.windows);
    assert_eq!(answer["total"]["final"], total.all_final);
    assert_eq!(answer["windows"].as_array().map(Vec::len), Some(windows));
}

/// The 1, 5 and 15 minute load averages: the two cores are shared, so figures
/// say what else ran.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

struct Ingest(Child);

impl Drop for Ingest {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_ingest(
    args: &Args,
    brokers: &str,
    store_url: &str,
    extra: &[&str],
) -> (Ingest, std::net::SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let concurrency = (args.concurrency * 2).to_string();
    let child = Command::new(&args.tally)
        .args([
            "ingest",
            "--listen",
            &listen,
            "--brokers",
            brokers,
            "--store",
            store_url,
            "--read-concurrency",
            &concurrency,
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let ingest = Ingest(child);
    let address: std::net::SocketAddr = listen.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "tally ingest did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (ingest, address)
}

fn main() {
    let args = args();
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    // One backend after the other, each torn down before the next starts.
    for backend in args.backend.split(',') {
        assert!(
            backend == "sqlite" || backend == "cql",
            "unknown backend {backend:?} (sqlite, cql or both: sqlite,cql)"
        );
        run_backend(&args, backend, &brokers);
    }
    drop(cluster);
}

fn run_backend(args: &Args, backend: &str, brokers: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let end = now_ms().div_euclid(WINDOW_MS) * WINDOW_MS;

    // The CQL test node runs on its own thread (kassandra-tester wants a LocalSet).
    let stop = Arc::new(tokio::sync::Notify::new());
    let node = if backend == "cql" {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            cql_node::with_cql_node(move |addr| {
                let (tx, stop) = (tx.clone(), Arc::clone(&stop));
                async move {
                    let proxy = cql_node::start_proxy(addr, Default::default()).await?;
                    tx.send(proxy).unwrap();
                    stop.notified().await;
                    Ok(())
                }
            })
            .unwrap();
        });
        Some((rx.recv().unwrap(), thread))
    } else {
        None
    };

    let (store_url, extra): (String, Vec<String>) = match &node {
        Some((proxy, _)) => (
            format!("scylla://{proxy}/tally_bench"),
            vec![
                "--scylla-replication".into(),
                "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
                "--scylla-consistency".into(),
                "ONE".into(),
                "--scylla-bucket".into(),
                args.bucket.clone(),
            ],
        ),
        None => (
            format!("sqlite://{}", dir.path().join("read.sqlite").display()),
            Vec::new(),
        ),
    };
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();

    runtime.block_on(async {
        let bucket_ms = humantime::parse_duration(&args.bucket).unwrap().as_millis() as i64;
        let options = tally_sink::StoreOptions {
            scylla: tally_sink::ScyllaOptions {
                replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
                consistency: "ONE".into(),
                max_concurrency: 64,
                ..tally_sink::ScyllaOptions::default()
            },
            bucket_ms,
            retention: tally_sink::Retention::Enforce(None),
        };
        let store = tally_sink::open_store(&store_url, &options).await.unwrap();
        let settings = Arc::new(
            tally_sink::pin_settings(
                &*store,
                SumSettings {
                    window_ms: WINDOW_MS,
                    grace_ms: 2_000,
                },
            )
            .await
            .unwrap(),
        );
        let started = Instant::now();
        let rows = prefill(&*store, args.keys, end).await;
        eprintln!(
            "{}: {rows} rows written in {:.1?}",
            backend,
            started.elapsed()
        );

        let (ingest, address) = start_ingest(args, brokers, &store_url, &extra).await;
        println!(
            "backend {}, {rows} rows, {} keys, concurrency {}, {} s per measurement, load average {}",
            backend, args.keys, args.concurrency, args.seconds, load_average()
        );
        println!("| range | path | reads/s | p50 ms | p99 ms | HTTP / bare |");
        println!("|---|---|---:|---:|---:|---:|");
        for (name, range_ms) in [("last hour", HOUR), ("last day", DAY)] {
            check_same(address, &*store, &settings, (end - range_ms, end)).await;
            let bare = run_bare(
                Arc::clone(&store),
                Arc::clone(&settings),
                args.keys,
                range_ms,
                end,
                args,
            )
            .await;
            let http = run_http(address, args.keys, range_ms, end, args).await;
            for (path, f) in [("bare loop", bare), ("HTTP", http)] {
                let ratio = if path == "HTTP" {
                    format!("{:.2}", http.reads_per_s / bare.reads_per_s)
                } else {
                    String::new()
                };
                println!(
                    "| {name} | {path} | {:.0} | {:.2} | {:.2} | {ratio} |",
                    f.reads_per_s, f.p50_ms, f.p99_ms
                );
            }
        }
        println!("load average after: {}", load_average());
        drop(ingest);
    });
    stop.notify_one();
    if let Some((_, thread)) = node {
        let _ = thread.join();
    }
}
