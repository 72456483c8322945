//! Accepted increments end up in Kafka exactly as promised: key, value, CreateTime,
//! `x-request-id` header, Java-compatible partition, and the partition/offset the 202
//! named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use futures::FutureExt;
use http::{Method, StatusCode};
use http_body_util::Full;

#[test]
fn java_murmur2_matches_kafkas_own_test_vectors() {
    // From Kafka's UtilsTest.testMurmur2.
    let vectors: [(&str, i32); 6] = [
        ("21", -973_932_308),
        ("foobar", -790_332_482),
        ("a-little-bit-long-string", -985_981_536),
        ("a-little-bit-longer-string", -1_486_304_829),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        ("abc", 479_470_107),
    ];
    for (input, expected) in vectors {
        assert_eq!(
            java_murmur2(input.as_bytes()),
            expected,
            "murmur2({input:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_increments_are_stored_as_promised() {
    let cluster = TestCluster::start();
    let server = TestServer::start(cluster.config()).await;
    let client = HttpClient::default();

    struct Sent {
        key: String,
        value: i64,
        request_id: String,
        partition: i64,
        offset: i64,
        sent_at: i64,
        answered_at: i64,
    }
    let mut sent = Vec::new();
    for index in 0..24i64 {
        let key = uuid::Uuid::new_v4().hyphenated().to_string();
        // Every third key is sent upper-case: Kafka must get the canonical lower-case form.
        let written_key = if index % 3 == 0 {
            key.to_uppercase()
        } else {
            key.clone()
        };
        let value = index * 1_000_000_007 + 1;
        let request_id = format!("test-{index}-{}", &key[..8]);
        let sent_at = now_millis();
        let answer = client
            .send(
                Method::POST,
                &server.url("/increment"),
                &[
                    ("content-type", "application/json"),
                    ("x-request-id", &request_id),
                ],
                format!(r#"{{"key":"{written_key}","value":{value}}}"#),
            )
            .await;
        let answered_at = now_millis();
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
        assert_eq!(answer.headers["x-request-id"], request_id.as_str());
        assert_eq!(answer.json["accepted"], 1);
        assert_eq!(answer.json["request_id"], request_id.as_str());
        let record = &answer.json["records"][0];
        sent.push(Sent {
            key,
            value,
            request_id,
            partition: record["partition"].as_i64().unwrap(),
            offset: record["offset"].as_i64().unwrap(),
            sent_at,
            answered_at,
        });
    }

    let stored = cluster.read_records(sent.len());
    assert_eq!(stored.len(), sent.len(), "every 202 must be in the topic");
    let mut partitions_used = std::collections::HashSet::new();
    for item in &sent {
        let partition = i32::try_from(item.partition).unwrap();
        partitions_used.insert(partition);
        assert_eq!(
            partition,
            java_partition(item.key.as_bytes(), PARTITIONS),
            "key {} is not where Java's murmur2 partitioner puts it",
            item.key
        );
        let record = stored
            .get(&(partition, item.offset))
            .unwrap_or_else(|| panic!("no record at {partition}/{}", item.offset));
        assert_eq!(record.key.as_deref(), Some(item.key.as_str()));
        assert_eq!(
            record.value.as_deref(),
            Some(format!(r#"{{"key":"{}","value":{}}}"#, item.key, item.value).as_str())
        );
        assert_eq!(record.request_id.as_deref(), Some(item.request_id.as_str()));
        match record.timestamp {
            rdkafka::Timestamp::CreateTime(millis) => assert!(
                (item.sent_at..=item.answered_at).contains(&millis),
                "timestamp {millis} outside the request window {}..={}",
                item.sent_at,
                item.answered_at
            ),
            other => panic!("expected CreateTime, got {other:?}"),
        }
    }
    assert!(
        partitions_used.len() > 1,
        "24 random keys should spread over partitions"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_request_id_is_returned_and_written() {
    let cluster = TestCluster::start();
    let server = TestServer::start(cluster.config()).await;
    let client = HttpClient::default();
    let (body, key) = random_increment(5);
    // A request id with a space is not sane: the server must replace it.
    let answer = client
        .send(
            Method::POST,
            &server.url("/increment"),
            &[
                ("content-type", "application/json; charset=utf-8"),
                ("x-request-id", "not sane"),
            ],
            body,
        )
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    let request_id = answer.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(request_id, "not sane");
    assert_eq!(
        uuid::Uuid::parse_str(&request_id)
            .unwrap()
            .get_version_num(),
        4
    );
    assert_eq!(answer.json["request_id"], request_id.as_str());
    let stored = cluster.read_records(1);
    let record = stored.values().next().unwrap();
    assert_eq!(record.key.as_deref(), Some(key.as_str()));
    assert_eq!(record.request_id.as_deref(), Some(request_id.as_str()));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_both_framings_are_accepted_in_order() {
    let cluster = TestCluster::start();
    let server = TestServer::start(cluster.config()).await;
    let client = HttpClient::default();

    let array: Vec<(String, String)> = (1..=5).map(random_increment).collect();
    let array_body = format!(
        "[{}]",
        array
            .iter()
            .map(|(body, _)| body.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    let ndjson: Vec<(String, String)> = (6..=9).map(random_increment).collect();
    let ndjson_body = ndjson
        .iter()
        .map(|(body, _)| format!("{body}\n"))
        .collect::<String>()
        + "\n";

    let array_answer = client
        .post_json(&server.url("/increments"), array_body)
        .await;
    assert_eq!(
        array_answer.status,
        StatusCode::ACCEPTED,
        "{}",
        array_answer.text
    );
    let ndjson_answer = client
        .send(
            Method::POST,
            &server.url("/increments"),
            &[("content-type", "application/x-ndjson")],
            ndjson_body,
        )
        .await;
    assert_eq!(
        ndjson_answer.status,
        StatusCode::ACCEPTED,
        "{}",
        ndjson_answer.text
    );

    let stored = cluster.read_records(9);
    for (items, answer) in [(&array, &array_answer), (&ndjson, &ndjson_answer)] {
        assert_eq!(answer.json["accepted"], items.len());
        let records = answer.json["records"].as_array().unwrap();
        assert_eq!(records.len(), items.len());
        for ((body, key), position) in items.iter().zip(records) {
            let partition = position["partition"].as_i64().unwrap() as i32;
            let offset = position["offset"].as_i64().unwrap();
            assert_eq!(partition, java_partition(key.as_bytes(), PARTITIONS));
            let record = &stored[&(partition, offset)];
            assert_eq!(record.key.as_deref(), Some(key.as_str()));
            assert_eq!(record.value.as_deref(), Some(body.as_str()));
            assert_eq!(
                record.request_id.as_deref(),
                answer.json["request_id"].as_str()
            );
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_metrics_and_the_read_hook() {
    let cluster = TestCluster::start();
    let read_handler: tally_ingest::ReadHandler = Arc::new(|request: http::Request<()>| {
        let path = request.uri().path().to_owned();
        async move {
            let mut response = http::Response::new(Full::new(Bytes::from(format!("read {path}"))));
            *response.status_mut() = StatusCode::OK;
            response
        }
        .boxed()
    });
    let server = TestServer::start_with(cluster.config(), Some(read_handler)).await;
    let client = HttpClient::default();

    let health = client.get(&server.url("/healthz")).await;
    assert_eq!(health.status, StatusCode::OK);
    let ready = client.get(&server.url("/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text);
    let window = client.get(&server.url("/v1/windows/abc?from=1")).await;
    assert_eq!(window.status, StatusCode::OK);
    assert_eq!(window.text, "read /v1/windows/abc");
    assert!(window.headers.contains_key("x-request-id"));

    let (body, _) = random_increment(1);
    assert_eq!(
        client
            .post_json(&server.url("/increment"), body)
            .await
            .status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        client
            .post_json(&server.url("/increment"), "{")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );

    let metrics = client.get(&server.url("/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);
    for expected in [
        r#"tally_ingest_requests_total{route="increment",status="202"} 1"#,
        r#"tally_ingest_requests_total{route="increment",status="400"} 1"#,
        r#"tally_ingest_requests_total{route="readyz",status="200"} 1"#,
        r#"tally_ingest_rejections_total{reason="invalid_json"} 1"#,
        r#"tally_ingest_produce_errors_total{kind="timed_out"} 0"#,
        "tally_ingest_records_accepted_total 1",
        r#"tally_ingest_request_duration_seconds_count{route="increment"} 2"#,
        "tally_ingest_in_flight_requests 1",
        "tally_ingest_open_connections",
    ] {
        assert!(
            metrics.text.contains(expected),
            "missing {expected:?} in\n{}",
            metrics.text
        );
    }
    server.stop().await.unwrap();

    // Without a read handler the read route does not exist.
    let server = TestServer::start(cluster.config()).await;
    assert_eq!(
        client.get(&server.url("/v1/windows/abc")).await.status,
        StatusCode::NOT_FOUND
    );
    server.stop().await.unwrap();
}
