//! Every refusal has its status and stable code, and nothing refused reaches Kafka.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use tally_ingest::AuthToken;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_gets_its_status_and_produces_nothing() {
    let cluster = TestCluster::start();
    let config = tally_ingest::IngestConfig {
        max_body_bytes: 1024,
        max_batch_items: 4,
        max_queued_records: 10,
        ..cluster.config()
    };
    let server = TestServer::start(config).await;
    let client = HttpClient::default();
    let key = uuid::Uuid::new_v4();
    let single = server.url("/increment");
    let batch = server.url("/increments");

    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "malformed",
            "{\"key\":".into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "empty",
            String::new(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "zero",
            format!(r#"{{"key":"{key}","value":0}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
        ),
        (
            "float",
            format!(r#"{{"key":"{key}","value":1.0}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
        ),
        (
            "string value",
            format!(r#"{{"key":"{key}","value":"1"}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
        ),
        (
            "2^63",
            format!(r#"{{"key":"{key}","value":9223372036854775808}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
        ),
        (
            "bad key",
            r#"{"key":"nope","value":1}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_key",
        ),
        (
            "extra field",
            format!(r#"{{"key":"{key}","value":1,"x":1}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_field",
        ),
        (
            "duplicate",
            format!(r#"{{"key":"{key}","value":1,"value":2}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "duplicate_field",
        ),
        (
            "missing value",
            format!(r#"{{"key":"{key}"}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_value",
        ),
        (
            "array",
            "[]".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_an_object",
        ),
        (
            "too large",
            format!(r#"{{"key":"{key}","value":1{}}}"#, " ".repeat(2000)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
    ];
    for (name, body, status, code) in cases {
        let answer = client.post_json(&single, body).await;
        assert_eq!(answer.status, status, "{name}: {}", answer.text);
        assert_eq!(answer.error_code(), code, "{name}: {}", answer.text);
        assert!(
            answer.json["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        let request_id = answer.headers["x-request-id"].to_str().unwrap();
        assert_eq!(answer.json["request_id"], request_id, "{name}");
    }

    // Wrong or missing content type.
    let (body, _) = random_increment(1);
    for content_type in ["text/plain", "application/x-ndjson"] {
        let answer = client
            .send(
                Method::POST,
                &single,
                &[("content-type", content_type)],
                body.clone(),
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type}"
        );
        assert_eq!(answer.error_code(), "unsupported_media_type");
    }
    let answer = client.send(Method::POST, &single, &[], body.clone()).await;
    assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Unknown routes and wrong methods.
    let answer = client.get(&server.url("/nope")).await;
    assert_eq!(
        (answer.status, answer.error_code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let answer = client.get(&single).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.headers["allow"], "POST");
    let answer = client.post_json(&server.url("/healthz"), "").await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);

    // A batch with invalid items is refused whole and names the items.
    let (good_a, _) = random_increment(1);
    let (good_b, _) = random_increment(2);
    let answer = client
        .post_json(
            &batch,
            format!(r#"[{good_a},{{"key":"x","value":1}},{good_b}]"#),
        )
        .await;
    assert_eq!(
        answer.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        answer.text
    );
    assert_eq!(answer.error_code(), "invalid_items");
    assert_eq!(answer.json["invalid_count"], 1);
    assert_eq!(answer.json["items"][0]["index"], 1);
    assert_eq!(answer.json["items"][0]["error"], "invalid_key");
    let answer = client
        .send(
            Method::POST,
            &batch,
            &[("content-type", "application/x-ndjson")],
            format!("{good_a}\n{{\"key\":\n{good_b}\n{{\"key\":\"{key}\",\"value\":-1}}\n"),
        )
        .await;
    assert_eq!(
        answer.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        answer.text
    );
    let items = answer.json["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(
        (items[0]["index"].as_u64(), items[0]["error"].as_str()),
        (Some(1), Some("invalid_json"))
    );
    assert_eq!(
        (items[1]["index"].as_u64(), items[1]["error"].as_str()),
        (Some(3), Some("invalid_value"))
    );
    let answer = client
        .post_json(
            &batch,
            format!("[{good_a},{good_a},{good_a},{good_a},{good_a}]"),
        )
        .await;
    assert_eq!(
        (answer.status, answer.error_code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "too_many_items")
    );
    let answer = client.post_json(&batch, "[").await;
    assert_eq!(
        (answer.status, answer.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_json")
    );
    // Issue 11.5: an empty batch is well-formed JSON the schema's `minItems: 1` refuses.
    let answer = client.post_json(&batch, " [ ] ").await;
    assert_eq!(
        (answer.status, answer.error_code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "empty_batch"),
        "{}",
        answer.text
    );
    let answer = client
        .send(
            Method::POST,
            &batch,
            &[("content-type", "application/x-ndjson")],
            "\n \n",
        )
        .await;
    assert_eq!(
        (answer.status, answer.error_code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "empty_batch"),
        "{}",
        answer.text
    );
    let answer = client.post_json(&batch, good_a.clone()).await;
    assert_eq!(
        answer.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        answer.text
    );

    // Nothing of the above reached Kafka.
    assert_eq!(cluster.record_count(), 0);
    // And the server still accepts a good one afterwards.
    assert_eq!(
        client.post_json(&single, good_a).await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(cluster.record_count(), 1);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_chunked_body_is_refused_while_reading() {
    let cluster = TestCluster::start();
    let config = tally_ingest::IngestConfig {
        max_body_bytes: 1024,
        ..cluster.config()
    };
    let server = TestServer::start(config).await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    stream
        .write_all(
            b"POST /increment HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    // No Content-Length: the limit must be enforced on the bytes as they arrive. Send
    // 4 KiB in 512-byte chunks and never finish the body.
    let chunk = format!("200\r\n{}\r\n", " ".repeat(512));
    for _ in 0..8 {
        if stream.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("body_too_large"), "{response}");
    assert_eq!(cluster.record_count(), 0);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_required_when_configured() {
    let cluster = TestCluster::start();
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), "# ops\nfrom-file\n").unwrap();
    let config = tally_ingest::IngestConfig {
        auth_tokens: vec![AuthToken::new("from-flag")],
        auth_token_file: Some(token_file.path().to_owned()),
        ..cluster.config()
    };
    let server = TestServer::start(config).await;
    let client = HttpClient::default();
    let url = server.url("/increment");
    let (body, _) = random_increment(1);

    for authorization in [
        None,
        Some("Bearer wrong"),
        Some("Basic from-flag"),
        Some("Bearer from-fla"),
    ] {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(value) = authorization {
            headers.push(("authorization", value));
        }
        let answer = client
            .send(Method::POST, &url, &headers, body.clone())
            .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{authorization:?}");
        assert_eq!(answer.error_code(), "unauthorized");
        assert_eq!(answer.headers["www-authenticate"], "Bearer");
    }
    assert_eq!(cluster.record_count(), 0);
    for token in ["from-flag", "from-file"] {
        let authorization = format!("Bearer {token}");
        let answer = client
            .send(
                Method::POST,
                &url,
                &[
                    ("content-type", "application/json"),
                    ("authorization", &authorization),
                ],
                body.clone(),
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::ACCEPTED,
            "{token}: {}",
            answer.text
        );
    }
    // Probes and metrics stay open.
    assert_eq!(
        client.get(&server.url("/healthz")).await.status,
        StatusCode::OK
    );
    let metrics = client.get(&server.url("/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(!metrics.text.contains("from-flag") && !metrics.text.contains("from-file"));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_over_their_rate_get_429_with_retry_after() {
    let cluster = TestCluster::start();
    let config = tally_ingest::IngestConfig {
        rate_limit: 0.5,
        rate_burst: 2,
        auth_tokens: vec![AuthToken::new("one"), AuthToken::new("two")],
        ..cluster.config()
    };
    let server = TestServer::start(config).await;
    let client = HttpClient::default();
    let url = server.url("/increment");
    let send = |token: &'static str| {
        let (body, _) = random_increment(1);
        let client = &client;
        let url = &url;
        async move {
            let authorization = format!("Bearer {token}");
            client
                .send(
                    Method::POST,
                    url,
                    &[
                        ("content-type", "application/json"),
                        ("authorization", &authorization),
                    ],
                    body,
                )
                .await
        }
    };
    assert_eq!(send("one").await.status, StatusCode::ACCEPTED);
    assert_eq!(send("one").await.status, StatusCode::ACCEPTED);
    let limited = send("one").await;
    assert_eq!(
        limited.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        limited.text
    );
    assert_eq!(limited.error_code(), "rate_limited");
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "retry-after {retry_after}");
    // Another token is another client with its own bucket.
    assert_eq!(send("two").await.status, StatusCode::ACCEPTED);
    assert_eq!(cluster.record_count(), 3);
    server.stop().await.unwrap();
}
