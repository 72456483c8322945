//! Infrastructure failures and limits: broker outage (503 within the deadline, never a
//! 202 without an ack, recovery), full producer queue, graceful shutdown, header-read
//! and request timeouts, the connection cap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_gives_503_within_the_deadline_and_recovers() {
    let cluster = TestCluster::start();
    let delivery_timeout = Duration::from_millis(1500);
    let config = tally_ingest::IngestConfig {
        delivery_timeout,
        request_timeout: Duration::from_secs(10),
        ..cluster.config()
    };
    let server = TestServer::start(config).await;
    let client = HttpClient::default();
    let url = server.url("/increment");

    // Warm up: metadata known, connections open.
    let (body, _) = random_increment(1);
    let warm = client.post_json(&url, body).await;
    assert_eq!(warm.status, StatusCode::ACCEPTED, "{}", warm.text);
    let mut accepted: Vec<(i32, i64, String)> = vec![record_of(&warm)];

    cluster.all_brokers_down();
    // Several concurrent requests during the outage: none may be answered 202.
    let during_outage: Vec<_> = (0..8)
        .map(|value| {
            let (body, _) = random_increment(value + 1);
            let client = &client;
            let url = &url;
            async move {
                let started = Instant::now();
                let answer = client.post_json(url, body).await;
                (answer, started.elapsed())
            }
        })
        .collect();
    for (answer, elapsed) in futures::future::join_all(during_outage).await {
        eprintln!("outage answer after {elapsed:?}: {}", answer.text);
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            answer.text
        );
        assert_eq!(answer.error_code(), "broker_unavailable");
        assert!(answer.headers.contains_key("retry-after"));
        assert!(
            elapsed <= delivery_timeout + Duration::from_millis(1000),
            "503 took {elapsed:?}, deadline {delivery_timeout:?}"
        );
    }
    let ready = client.get(&server.url("/readyz")).await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.text
    );
    assert_eq!(ready.error_code(), "not_ready");

    cluster.all_brokers_up();
    // Recovery: within a bounded time requests are acknowledged again.
    let recovered_by = Instant::now() + Duration::from_secs(30);
    let mut recovered = false;
    while Instant::now() < recovered_by {
        let (body, _) = random_increment(42);
        let answer = client.post_json(&url, body).await;
        if answer.status == StatusCode::ACCEPTED {
            accepted.push(record_of(&answer));
            recovered = true;
            break;
        }
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            answer.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "no 202 within 30s after the brokers came back");
    for _ in 0..5 {
        let (body, _) = random_increment(7);
        let answer = client.post_json(&url, body).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
        accepted.push(record_of(&answer));
    }

    // Every 202 is really in the topic, at the position it named.
    let stored = cluster.read_records(accepted.len());
    for (partition, offset, request_id) in &accepted {
        let record = stored
            .get(&(*partition, *offset))
            .unwrap_or_else(|| panic!("202'd record {partition}/{offset} missing"));
        assert_eq!(record.request_id.as_deref(), Some(request_id.as_str()));
    }
    server.stop().await.unwrap();
}

fn record_of(answer: &Answer) -> (i32, i64, String) {
    let record = &answer.json["records"][0];
    (
        record["partition"].as_i64().unwrap() as i32,
        record["offset"].as_i64().unwrap(),
        answer.json["request_id"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_gives_503_queue_full_at_once() {
    let cluster = TestCluster::start();
    let config = tally_ingest::IngestConfig {
        max_queued_records: 1,
        max_batch_items: 1,
        delivery_timeout: Duration::from_secs(3),
        ..cluster.config()
    };
    let server = TestServer::start(config).await;
    let client = HttpClient::default();
    let url = server.url("/increment");
    let (body, _) = random_increment(1);
    assert_eq!(
        client.post_json(&url, body).await.status,
        StatusCode::ACCEPTED
    );

    // With the brokers down the first record stays queued, so the second finds the
    // one-record queue full.
    cluster.all_brokers_down();
    let (first_body, _) = random_increment(2);
    let first = {
        let client = HttpClient::default();
        let url = url.clone();
        tokio::spawn(async move { client.post_json(&url, first_body).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (second_body, _) = random_increment(3);
    let started = Instant::now();
    let second = client.post_json(&url, second_body).await;
    assert_eq!(
        second.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        second.text
    );
    assert_eq!(second.error_code(), "queue_full");
    assert_eq!(second.headers["retry-after"], "1");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "queue_full must not wait for the broker"
    );
    let first = first.await.unwrap();
    assert_eq!(
        first.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        first.text
    );
    assert_eq!(first.error_code(), "broker_unavailable");
    cluster.all_brokers_up();
    server.stop().await.unwrap();
}

/// Issue 7: a batch `503 queue_full` must mean that nothing of that request was
/// produced. The queue holds 10 records; one is waiting for a broker that is down, so a
/// batch of 10 does not fit. It must be refused before any of it is enqueued: once
/// the brokers are back, the topic holds the waiting record and none of the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_does_not_fit_the_queue_is_refused_whole() {
    let cluster = TestCluster::start();
    let config = tally_ingest::IngestConfig {
        max_queued_records: 10,
        max_batch_items: 10,
        delivery_timeout: Duration::from_secs(8),
        request_timeout: Duration::from_secs(12),
        ..cluster.config()
    };
    let server = TestServer::start(config).await;
    let client = HttpClient::default();
    let (warm_up, _) = random_increment(1);
    let answer = client.post_json(&server.url("/increment"), warm_up).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);

    cluster.all_brokers_down();
    let (waiting_body, waiting_key) = random_increment(2);
    let waiting = {
        let client = HttpClient::default();
        let url = server.url("/increment");
        tokio::spawn(async move { client.post_json(&url, waiting_body).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let batch_keys: Vec<String> = (0..10)
        .map(|_| uuid::Uuid::new_v4().hyphenated().to_string())
        .collect();
    let batch = format!(
        "[{}]",
        batch_keys
            .iter()
            .map(|key| format!(r#"{{"key":"{key}","value":5}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let refused = client.post_json(&server.url("/increments"), batch).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.text
    );
    assert_eq!(refused.error_code(), "queue_full");

    cluster.all_brokers_up();
    let waiting = waiting.await.unwrap();
    assert_eq!(waiting.status, StatusCode::ACCEPTED, "{}", waiting.text);
    // Shutdown flushes the producer: whatever was enqueued is now in the topic.
    server.stop().await.unwrap();

    let total = cluster.record_count();
    let records = cluster.read_records(usize::try_from(total).unwrap());
    let keys: Vec<String> = records
        .values()
        .filter_map(|record| record.key.clone())
        .collect();
    assert!(keys.contains(&waiting_key), "{keys:?}");
    let leaked: Vec<&String> = keys.iter().filter(|key| batch_keys.contains(key)).collect();
    assert!(
        leaked.is_empty(),
        "{} record(s) of a batch answered 503 queue_full reached the topic",
        leaked.len()
    );
    assert_eq!(total, 2, "the warm-up and the waiting record, nothing else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_in_flight_request() {
    let cluster = TestCluster::start();
    let server = TestServer::start(cluster.config()).await;
    let client = HttpClient::default();
    let url = server.url("/increment");
    let (body, _) = random_increment(1);
    assert_eq!(
        client.post_json(&url, body).await.status,
        StatusCode::ACCEPTED
    );

    // Slow brokers keep the next request in flight while shutdown begins.
    cluster
        .mock
        .broker_round_trip_time(-1, Duration::from_millis(1500))
        .unwrap();
    let (body, key) = random_increment(9);
    let in_flight = {
        let client = HttpClient::default();
        let url = url.clone();
        tokio::spawn(async move { client.post_json(&url, body).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut server = server;
    server.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The listener is closed: new connections are refused.
    assert!(TcpStream::connect(server.address).await.is_err());

    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    assert_eq!(answer.headers["connection"], "close");
    server.stop().await.unwrap();

    let (partition, offset, _) = record_of(&answer);
    cluster
        .mock
        .broker_round_trip_time(-1, Duration::ZERO)
        .unwrap();
    let stored = cluster.read_records(2);
    assert_eq!(
        stored[&(partition, offset)].key.as_deref(),
        Some(key.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_slow_bodies_are_cut_off() {
    let cluster = TestCluster::start();
    let config = tally_ingest::IngestConfig {
        header_read_timeout: Duration::from_millis(500),
        delivery_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(1),
        ..cluster.config()
    };
    let server = TestServer::start(config).await;

    // Headers never completed: the connection is closed after the header-read timeout.
    let mut slow_headers = TcpStream::connect(server.address).await.unwrap();
    slow_headers
        .write_all(b"POST /increment HTTP/1.1\r\nhost: test\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut response = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        slow_headers.read_to_end(&mut response),
    )
    .await;
    assert!(
        read.is_ok(),
        "connection still open 5s after a 500ms header timeout"
    );
    assert!(started.elapsed() >= Duration::from_millis(400));

    // Body announced but never sent: 408 after the request timeout.
    let mut slow_body = TcpStream::connect(server.address).await.unwrap();
    slow_body
        .write_all(b"POST /increment HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"key\":")
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(5), slow_body.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("request_timeout"), "{response}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_until_one_closes() {
    let cluster = TestCluster::start();
    let config = tally_ingest::IngestConfig {
        max_connections: 2,
        header_read_timeout: Duration::from_secs(20),
        ..cluster.config()
    };
    let server = TestServer::start(config).await;
    let request = b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n";

    let mut first = TcpStream::connect(server.address).await.unwrap();
    let mut second = TcpStream::connect(server.address).await.unwrap();
    for stream in [&mut first, &mut second] {
        stream.write_all(request).await.unwrap();
        let mut buffer = [0u8; 512];
        let read = stream.read(&mut buffer).await.unwrap();
        assert!(String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200"));
    }
    // The third connection is accepted by the kernel but not served while two are open.
    let mut third = TcpStream::connect(server.address).await.unwrap();
    third.write_all(request).await.unwrap();
    let mut buffer = [0u8; 512];
    let early = tokio::time::timeout(Duration::from_millis(700), third.read(&mut buffer)).await;
    assert!(
        early.is_err(),
        "a third connection was served above the cap of 2"
    );
    drop(first);
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buffer))
        .await
        .expect("third connection not served after one closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200"));

    drop(second);
    drop(third);
    server.stop().await.unwrap();
}
