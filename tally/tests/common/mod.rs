//! Shared by the tests that check the repository's deployment files against the code:
//! paths, the real `tally` binary (`tally dev` as a child process that is always
//! reaped), a tiny blocking HTTP/1.1 client and a Prometheus text parser.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The repository root (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tally/ has a parent")
        .to_path_buf()
}

pub fn read_repo_file(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

pub fn tally_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tally")
}

/// Parses YAML into a value with `<<` merge keys applied (docker compose uses them).
pub fn parse_yaml(text: &str, what: &str) -> yaml_serde::Value {
    let mut value: yaml_serde::Value =
        yaml_serde::from_str(text).unwrap_or_else(|err| panic!("{what} is not YAML: {err}"));
    value
        .apply_merge()
        .unwrap_or_else(|err| panic!("{what}: merge keys: {err}"));
    value
}

// ---- tally dev ------------------------------------------------------------------------

/// A running `tally dev`. Killed (SIGKILL) and reaped when dropped, on every path,
/// panics included; [`DevProcess::terminate`] is the graceful way out.
pub struct DevProcess {
    child: Option<Child>,
    /// The ingest edge, `host:port` (from the printed `ingest:` line).
    pub ingest: SocketAddr,
    /// The printed `metrics:` URL's address and path.
    pub metrics_addr: SocketAddr,
    pub metrics_path: String,
    /// The printed `ui:` URL (the live page), if any.
    pub ui: Option<String>,
    /// The printed `kafka:` bootstrap servers, if any.
    pub kafka: Option<String>,
    /// Every line printed on stdout up to `ready`.
    pub banner: Vec<String>,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl DevProcess {
    /// Starts `tally dev --listen 127.0.0.1:0 --data-dir <tempdir>` and waits (bounded)
    /// for `ready`. The ports are the ones the process printed.
    pub fn start() -> DevProcess {
        DevProcess::start_with(&[])
    }

    /// Like [`DevProcess::start`], with extra `tally dev` arguments.
    pub fn start_with(extra: &[&str]) -> DevProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr log");
        let mut command = Command::new(tally_bin());
        command
            .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .env("RUST_LOG", "info,rdkafka=warn,librdkafka=warn");
        // The test environment must not reconfigure the child.
        for (name, _) in std::env::vars() {
            if name.starts_with("TALLY_") || name == "KAFKA_BROKERS" {
                command.env_remove(name);
            }
        }
        let mut child = command.spawn().expect("spawning tally dev");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut process = DevProcess {
            child: Some(child),
            ingest: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_path: String::new(),
            ui: None,
            kafka: None,
            banner: Vec::new(),
            stderr_path,
            _dir: dir,
        };

        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut ingest = None;
        let mut metrics = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines_rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => panic!(
                    "tally dev did not print `ready` within 60 s; printed {:?}\n{}",
                    process.banner,
                    process.stderr_tail()
                ),
            };
            process.banner.push(line.clone());
            if let Some(url) = line.strip_prefix("ingest: ") {
                ingest = Some(url.trim().to_owned());
            } else if let Some(url) = line.strip_prefix("metrics: ") {
                metrics = Some(url.trim().to_owned());
            } else if let Some(url) = line.strip_prefix("ui: ") {
                process.ui = Some(url.trim().to_owned());
            } else if let Some(servers) = line.strip_prefix("kafka: ") {
                process.kafka = Some(servers.trim().to_owned());
            } else if line.trim() == "ready" {
                break;
            }
        }
        let ingest = ingest.unwrap_or_else(|| {
            panic!(
                "no `ingest: http://ADDR` line before `ready`: {:?}",
                process.banner
            )
        });
        let metrics = metrics.unwrap_or_else(|| {
            panic!(
                "no `metrics: http://ADDR/metrics` line before `ready`: {:?}",
                process.banner
            )
        });
        let (ingest_addr, ingest_path) = split_http_url(&ingest);
        assert!(
            ingest_path.is_empty() || ingest_path == "/",
            "ingest URL has a path: {ingest}"
        );
        let (metrics_addr, metrics_path) = split_http_url(&metrics);
        assert_ne!(
            ingest_addr.port(),
            0,
            "tally dev printed port 0 for ingest: {ingest}"
        );
        assert_ne!(
            metrics_addr.port(),
            0,
            "tally dev printed port 0 for metrics: {metrics}"
        );
        process.ingest = ingest_addr;
        process.metrics_addr = metrics_addr;
        process.metrics_path = metrics_path;
        process
    }

    /// The last lines of the child's stderr, for failure messages.
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(30);
        format!(
            "--- tally dev stderr (last lines) ---\n{}",
            lines[start..].join("\n")
        )
    }

    pub fn scrape(&self) -> String {
        let response = http(self.metrics_addr, "GET", &self.metrics_path, &[], b"");
        assert_eq!(
            response.status,
            200,
            "GET {} answered {}: {}",
            self.metrics_path,
            response.status,
            response.text()
        );
        response.text()
    }

    /// Polls the metrics until `sample` (e.g. `tally_aggregator_records_total{outcome="counted"}`)
    /// has at least `at_least`, or panics after `within`.
    pub fn wait_for_sample(&self, sample: &str, at_least: f64, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let text = self.scrape();
            let value = parse_prometheus(&text).value_of(sample);
            if value.is_some_and(|v| v >= at_least) {
                return text;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{sample} did not reach {at_least} within {within:?} (last value {value:?})\n{}",
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, then waits (bounded) for the exit. Panics if it does not exit in time.
    pub fn terminate(mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("child present until terminate");
        let pid = child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for tally dev") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tally dev did not exit within {within:?} of SIGTERM\n{}",
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `http://host:port/path` → (address, path).
fn split_http_url(url: &str) -> (SocketAddr, String) {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("not an http:// URL: {url}"));
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], rest[slash..].to_owned()),
        None => (rest, String::new()),
    };
    let addr = authority
        .to_socket_addrs()
        .unwrap_or_else(|err| panic!("address of {url}: {err}"))
        .next()
        .unwrap_or_else(|| panic!("no address for {url}"));
    (addr, path)
}

// ---- HTTP -----------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("body is not JSON ({err}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), bounded by
/// socket timeouts.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|err| panic!("connecting to {addr}: {err}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("write timeout");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .expect("writing request");
    stream.write_all(body).expect("writing body");
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|err| panic!("{method} {path}: reading the response: {err}"));
    parse_response(&raw, method).unwrap_or_else(|| {
        panic!(
            "{method} {path}: malformed response: {}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_response(raw: &[u8], method: &str) -> Option<HttpResponse> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    let mut headers = BTreeMap::new();
    for line in lines {
        let (name, value) = line.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    let rest = &raw[head_end + 4..];
    let body = if method == "HEAD" {
        Vec::new()
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        decode_chunked(rest)?
    } else if let Some(length) = headers.get("content-length") {
        let length: usize = length.parse().ok()?;
        rest.get(..length)?.to_vec()
    } else {
        rest.to_vec()
    };
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}

fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

// ---- Prometheus text format -----------------------------------------------------------

/// The parts of a scrape the tests need.
#[derive(Debug, Default)]
pub struct Scrape {
    /// `# TYPE` of each family.
    pub families: BTreeMap<String, String>,
    /// Every sample's metric name (`x_bucket`, `x_sum`, ... for histograms).
    pub sample_names: BTreeSet<String>,
    /// `name{labels}` exactly as printed → value.
    pub samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// The value of `name{labels}` as printed (labels in the exporter's order), or of
    /// a label-less `name`.
    pub fn value_of(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }

    /// True when some sample of metric `name` carries `label="value"`.
    pub fn has_labelled(&self, name: &str, label: &str, value: &str) -> bool {
        let prefix = format!("{name}{{");
        let pair = format!("{label}=\"{value}\"");
        self.samples.keys().any(|series| {
            series.starts_with(&prefix)
                && series[prefix.len()..]
                    .trim_end_matches('}')
                    .split(',')
                    .any(|part| part == pair)
        })
    }
}

pub fn parse_prometheus(text: &str) -> Scrape {
    let mut scrape = Scrape::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                scrape.families.insert(name.to_owned(), kind.to_owned());
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let series_end = match line.find('{') {
            Some(brace) => line[brace..].find('}').map(|close| brace + close + 1),
            None => line.find(' '),
        };
        let Some(series_end) = series_end else {
            continue;
        };
        let series = &line[..series_end];
        let name = series.split('{').next().unwrap_or(series);
        scrape.sample_names.insert(name.to_owned());
        if let Some(value) = line[series_end..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            scrape.samples.insert(series.to_owned(), value);
        }
    }
    scrape
}
