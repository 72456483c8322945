//! Shared test harness: a librdkafka mock cluster (real Kafka protocol over TCP), the
//! real ingest server on 127.0.0.1:0, a real HTTP client, and a consumer that reads
//! back what was produced.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{Offset, TopicPartitionList};
use tally_ingest::{IngestConfig, IngestError, ReadHandler};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TOPIC: &str = "increments";
pub const PARTITIONS: i32 = 6;

/// Three in-process brokers holding the `increments` topic.
pub struct TestCluster {
    pub mock: MockCluster<'static, DefaultProducerContext>,
    pub bootstrap: String,
}

impl TestCluster {
    pub fn start() -> Self {
        let mock = MockCluster::new(3).unwrap();
        mock.create_topic(TOPIC, PARTITIONS, 3).unwrap();
        let bootstrap = mock.bootstrap_servers();
        TestCluster { mock, bootstrap }
    }

    /// Test defaults: generous request timeout, short enough deadlines to keep tests fast.
    pub fn config(&self) -> IngestConfig {
        IngestConfig {
            brokers: self.bootstrap.clone(),
            topic: TOPIC.to_owned(),
            delivery_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(5),
            ..IngestConfig::default()
        }
    }

    pub fn all_brokers_down(&self) {
        for broker in 1..=3 {
            self.mock.broker_down(broker).unwrap();
        }
    }

    pub fn all_brokers_up(&self) {
        for broker in 1..=3 {
            self.mock.broker_up(broker).unwrap();
        }
    }

    fn consumer(&self) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", "tally-ingest-tests")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .unwrap()
    }

    /// Total records in the topic (sum of high watermarks).
    pub fn record_count(&self) -> i64 {
        let consumer = self.consumer();
        (0..PARTITIONS)
            .map(|partition| {
                let (low, high) = consumer
                    .fetch_watermarks(TOPIC, partition, Duration::from_secs(5))
                    .unwrap();
                high - low
            })
            .sum()
    }

    /// Reads every record of the topic, waiting until at least `expected` are seen.
    pub fn read_records(&self, expected: usize) -> HashMap<(i32, i64), StoredRecord> {
        let consumer = self.consumer();
        let mut assignment = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            assignment
                .add_partition_offset(TOPIC, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let mut records = HashMap::new();
        let give_up = Instant::now() + Duration::from_secs(20);
        while records.len() < expected && Instant::now() < give_up {
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message.unwrap();
            let request_id = message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|header| header.key == "x-request-id")
                    .and_then(|header| header.value)
                    .map(|value| String::from_utf8(value.to_vec()).unwrap())
            });
            records.insert(
                (message.partition(), message.offset()),
                StoredRecord {
                    key: message
                        .key()
                        .map(|key| String::from_utf8(key.to_vec()).unwrap()),
                    value: message
                        .payload()
                        .map(|value| String::from_utf8(value.to_vec()).unwrap()),
                    timestamp: message.timestamp(),
                    request_id,
                },
            );
        }
        records
    }
}

#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub key: Option<String>,
    pub value: Option<String>,
    pub timestamp: rdkafka::Timestamp,
    pub request_id: Option<String>,
}

/// The real server, running `tally_ingest::run_with` on an ephemeral port.
pub struct TestServer {
    pub address: SocketAddr,
    pub registry: prometheus::Registry,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), IngestError>>,
}

impl TestServer {
    pub async fn start(config: IngestConfig) -> Self {
        Self::start_with(config, None).await
    }

    pub async fn start_with(config: IngestConfig, read_handler: Option<ReadHandler>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let registry = prometheus::Registry::new();
        let (shutdown, shutdown_signal) = oneshot::channel::<()>();
        let task = tokio::spawn(tally_ingest::run_with(
            config,
            listener,
            registry.clone(),
            async move {
                let _ = shutdown_signal.await;
            },
            read_handler,
        ));
        TestServer {
            address,
            registry,
            shutdown: Some(shutdown),
            task,
        }
    }

    /// Signals shutdown without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), IngestError> {
        self.begin_shutdown();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server did not stop within 30s")
            .expect("server task panicked")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }
}

/// A decoded answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: serde_json::Value,
    pub text: String,
}

impl Answer {
    pub fn error_code(&self) -> &str {
        self.json["error"].as_str().unwrap_or("<none>")
    }
}

pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        HttpClient {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl HttpClient {
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Answer {
        let mut builder = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(body.into())).unwrap();
        let response = self.client.request(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Answer {
            status,
            headers,
            json,
            text,
        }
    }

    pub async fn post_json(&self, url: &str, body: impl Into<Bytes>) -> Answer {
        self.send(
            Method::POST,
            url,
            &[("content-type", "application/json")],
            body,
        )
        .await
    }

    pub async fn get(&self, url: &str) -> Answer {
        self.send(Method::GET, url, &[], Bytes::new()).await
    }
}

/// Kafka's `Utils.murmur2` (Java), as used by the default partitioner for keyed records.
pub fn java_murmur2(data: &[u8]) -> i32 {
    let length = data.len() as i32;
    let seed: i32 = 0x9747_b28c_u32 as i32;
    let m: i32 = 0x5bd1_e995;
    let r: u32 = 24;
    let mut h: i32 = seed ^ length;
    let length4 = data.len() / 4;
    let byte = |index: usize| i32::from(data[index]) & 0xff;
    for i in 0..length4 {
        let i4 = i * 4;
        let mut k: i32 = byte(i4)
            .wrapping_add(byte(i4 + 1) << 8)
            .wrapping_add(byte(i4 + 2) << 16)
            .wrapping_add(byte(i4 + 3) << 24);
        k = k.wrapping_mul(m);
        k ^= ((k as u32) >> r) as i32;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m);
        h ^= k;
    }
    let tail = data.len() & !3;
    let remainder = data.len() % 4;
    // Java's switch falls through from case 3 to case 1.
    if remainder >= 3 {
        h ^= byte(tail + 2) << 16;
    }
    if remainder >= 2 {
        h ^= byte(tail + 1) << 8;
    }
    if remainder >= 1 {
        h ^= byte(tail);
        h = h.wrapping_mul(m);
    }
    h ^= ((h as u32) >> 13) as i32;
    h = h.wrapping_mul(m);
    h ^= ((h as u32) >> 15) as i32;
    h
}

/// The partition Java's default partitioner picks for a keyed record.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (java_murmur2(key) & 0x7fff_ffff) % partitions
}

pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A fresh random increment body and its canonical key.
pub fn random_increment(value: i64) -> (String, String) {
    let key = uuid::Uuid::new_v4().hyphenated().to_string();
    (format!(r#"{{"key":"{key}","value":{value}}}"#), key)
}
