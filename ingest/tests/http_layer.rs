//! The HTTP/1.1 layer seen from a raw socket (issue 11.3 and 11.4): keep-alive after an
//! early rejection, the JSON errors of requests hyper cannot parse, `Host` rules,
//! transfer codings, and HTTP/2 prior knowledge.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const READ_TIMEOUT: Duration = Duration::from_secs(5);
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n";

/// One parsed answer read off the socket.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn says_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|value| value.eq_ignore_ascii_case("close"))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The edge's error shape: JSON with a stable code, the request id in the body
    /// equal to the `x-request-id` header.
    fn assert_json_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        let json = self.json();
        assert_eq!(json["error"], code, "{self:?}");
        assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
        let id = self.header("x-request-id").expect("x-request-id header");
        assert!(!id.is_empty());
        assert_eq!(json["request_id"], id, "{self:?}");
    }
}

/// A client connection that writes raw bytes and reads answers one at a time.
struct RawConnection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawConnection {
    async fn open(address: SocketAddr) -> Self {
        RawConnection {
            stream: TcpStream::connect(address).await.unwrap(),
            buffer: Vec::new(),
        }
    }

    /// Writes; a server that already closed may refuse the bytes, which is fine.
    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Reads more bytes; false at EOF (or a reset).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(READ_TIMEOUT, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(read)) => {
                self.buffer.extend_from_slice(&chunk[..read]);
                true
            }
            Err(_) => panic!("no answer within {READ_TIMEOUT:?}"),
        }
    }

    /// The next answer, or `None` when the server closed the connection first.
    async fn response(&mut self) -> Option<RawResponse> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head_len) = parsed.parse(&self.buffer).unwrap() {
                let status = parsed.code.unwrap();
                let headers: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|header| {
                        (
                            header.name.to_owned(),
                            String::from_utf8_lossy(header.value).into_owned(),
                        )
                    })
                    .collect();
                let length: usize = headers
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |(_, value)| value.parse().unwrap());
                while self.buffer.len() < head_len + length {
                    assert!(self.fill().await, "connection closed inside a body");
                }
                let body = self.buffer[head_len..head_len + length].to_vec();
                self.buffer.drain(..head_len + length);
                return Some(RawResponse {
                    status,
                    headers,
                    body,
                });
            }
            if !self.fill().await {
                assert!(
                    self.buffer.is_empty(),
                    "connection closed inside an answer: {:?}",
                    String::from_utf8_lossy(&self.buffer)
                );
                return None;
            }
        }
    }

    /// True when the server closes the connection without sending anything more.
    async fn closed(&mut self) -> bool {
        self.buffer.is_empty() && !self.fill().await
    }
}

/// Issue 11.3: after an answer sent before the body was read, the connection either
/// goes on (the next request on it is answered) or the answer says `Connection: close`
/// (and the server closes it). A small rest of the body is drained and the connection
/// kept; a body too large to drain gets `Connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_rejection_keeps_the_connection_or_says_close() {
    let cluster = TestCluster::start();
    let config = tally_ingest::IngestConfig {
        max_body_bytes: 1024,
        ..cluster.config()
    };
    let server = TestServer::start(config).await;
    let chunk = |text: &str| format!("{:x}\r\n{text}\r\n", text.len());
    let chunked = |head: &str| {
        format!(
            "{head}\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n{}",
            chunk("{\"key\":")
        )
    };
    let rest_of_chunked = format!("{}{}0\r\n\r\n", chunk(" \"x\","), chunk(" \"value\": 1}"));
    let fixed = |head: &str, length: usize| {
        format!(
            "{head}\r\nhost: test\r\ncontent-length: {length}\r\n\r\n{}",
            "x".repeat(length / 2)
        )
    };
    let over_limit = "x".repeat(2000 - 1000);

    // (name, head and first part of the body, rest of the body, status, code, kept open)
    let cases: Vec<(&str, String, String, u16, &str, bool)> = vec![
        (
            "404 before a chunked body",
            chunked("POST /nope HTTP/1.1\r\ncontent-type: application/json"),
            rest_of_chunked.clone(),
            404,
            "not_found",
            true,
        ),
        (
            "405 before a chunked body",
            chunked("PUT /increment HTTP/1.1\r\ncontent-type: application/json"),
            rest_of_chunked.clone(),
            405,
            "method_not_allowed",
            true,
        ),
        (
            "415 before a chunked body",
            chunked("POST /increment HTTP/1.1\r\ncontent-type: text/plain"),
            rest_of_chunked.clone(),
            415,
            "unsupported_media_type",
            true,
        ),
        (
            "415 before a content-length body",
            fixed("POST /increments HTTP/1.1\r\ncontent-type: text/csv", 600),
            "y".repeat(300),
            415,
            "unsupported_media_type",
            true,
        ),
        (
            "413 declared, small enough to drain",
            fixed("POST /increment HTTP/1.1\r\ncontent-type: application/json", 2000),
            over_limit,
            413,
            "body_too_large",
            true,
        ),
        (
            "413 found while reading a chunked body",
            format!(
                "POST /increment HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{}",
                chunk(&" ".repeat(800))
            ),
            format!("{}0\r\n\r\n", chunk(&" ".repeat(800))),
            413,
            "body_too_large",
            false,
        ),
        (
            "413 declared, too large to drain",
            "POST /increment HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: 10000000\r\n\r\n{".to_owned(),
            " ".repeat(4096),
            413,
            "body_too_large",
            false,
        ),
    ];

    for (name, first_part, rest, status, code, kept_open) in cases {
        let mut connection = RawConnection::open(server.address).await;
        connection.send(first_part.as_bytes()).await;
        // The server may answer now, before the rest of the body arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        connection.send(rest.as_bytes()).await;
        connection.send(HEALTHZ).await;

        let answer = connection
            .response()
            .await
            .unwrap_or_else(|| panic!("{name}: no answer"));
        answer.assert_json_error(status, code);
        if answer.says_close() {
            assert!(
                connection.closed().await,
                "{name}: said close, kept the connection"
            );
        } else {
            let next = connection.response().await.unwrap_or_else(|| {
                panic!("{name}: the server closed the connection after an answer that did not say `Connection: close`")
            });
            assert_eq!(next.status, 200, "{name}: {next:?}");
        }
        assert_eq!(answer.says_close(), !kept_open, "{name}: {answer:?}");
    }

    // A client waiting for `100 Continue` gets the rejection at once, with close: the
    // server does not know whether the body is coming.
    let mut connection = RawConnection::open(server.address).await;
    connection
        .send(b"POST /nope HTTP/1.1\r\nhost: test\r\nexpect: 100-continue\r\ncontent-length: 100\r\n\r\n")
        .await;
    let answer = connection.response().await.unwrap();
    answer.assert_json_error(404, "not_found");
    assert!(answer.says_close(), "{answer:?}");

    assert_eq!(cluster.record_count(), 0);
    server.stop().await.unwrap();
}

/// Issue 11.4: requests the HTTP parser refuses are answered like every other error:
/// JSON with a stable code and the request id, then the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_requests_get_json_errors_with_a_request_id() {
    let cluster = TestCluster::start();
    let server = TestServer::start(cluster.config()).await;
    let many_headers: String = (0..150).map(|n| format!("x-h{n}: {n}\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "garbage request line",
            b"THIS IS NOT HTTP\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "invalid header line",
            b"GET /healthz HTTP/1.1\r\nhost: test\r\nno colon here\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "unknown HTTP version",
            b"GET /healthz HTTP/7.1\r\nhost: test\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "invalid content-length",
            b"POST /increment HTTP/1.1\r\nhost: test\r\ncontent-length: 12abc\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "URI too long",
            format!("GET /{} HTTP/1.1\r\nhost: test\r\n\r\n", "a".repeat(70_000)).into_bytes(),
            414,
            "uri_too_long",
        ),
        (
            "too many headers",
            format!("GET /healthz HTTP/1.1\r\nhost: test\r\n{many_headers}\r\n").into_bytes(),
            431,
            "headers_too_large",
        ),
        (
            "head just over the 80 KiB limit",
            format!(
                "GET /healthz HTTP/1.1\r\nhost: test\r\nx-big: {}\r\n\r\n",
                "b".repeat(82 * 1024)
            )
            .into_bytes(),
            431,
            "headers_too_large",
        ),
        (
            "headers too large",
            format!(
                "GET /healthz HTTP/1.1\r\nhost: test\r\nx-big: {}\r\n\r\n",
                "b".repeat(500_000)
            )
            .into_bytes(),
            431,
            "headers_too_large",
        ),
    ];
    for (name, request, status, code) in cases {
        let mut connection = RawConnection::open(server.address).await;
        connection.send(&request).await;
        let answer = connection
            .response()
            .await
            .unwrap_or_else(|| panic!("{name}: no answer"));
        assert_eq!(answer.status, status, "{name}: {answer:?}");
        answer.assert_json_error(status, code);
        assert!(answer.says_close(), "{name}: {answer:?}");
        assert!(connection.closed().await, "{name}: connection kept");
    }

    // The refusals are counted like every other one.
    let metrics = HttpClient::default()
        .get(&server.url("/metrics"))
        .await
        .text;
    for code in ["malformed_request", "uri_too_long", "headers_too_large"] {
        assert!(
            metrics.contains(&format!(
                "tally_ingest_rejections_total{{reason=\"{code}\"}}"
            )),
            "{code} not counted:\n{metrics}"
        );
    }
    server.stop().await.unwrap();
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or any request with two, is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_is_required_exactly_once() {
    let cluster = TestCluster::start();
    let server = TestServer::start(cluster.config()).await;
    let (body, _) = random_increment(1);
    let post = |headers: &str| {
        format!(
            "POST /increment HTTP/1.1\r\n{headers}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    for (name, request) in [
        ("no host", post("")),
        ("two hosts", post("host: a\r\nhost: b\r\n")),
        (
            "two hosts on HTTP/1.0",
            "GET /healthz HTTP/1.0\r\nhost: a\r\nhost: b\r\n\r\n".to_owned(),
        ),
    ] {
        let mut connection = RawConnection::open(server.address).await;
        connection.send(request.as_bytes()).await;
        let answer = connection
            .response()
            .await
            .unwrap_or_else(|| panic!("{name}: no answer"));
        answer.assert_json_error(400, "invalid_host");
        assert!(answer.says_close(), "{name}: {answer:?}");
    }
    assert_eq!(
        cluster.record_count(),
        0,
        "a request without Host was produced"
    );

    // HTTP/1.0 clients need not send Host; an empty Host is allowed (RFC 9112 §3.2).
    for request in [
        &b"GET /healthz HTTP/1.0\r\n\r\n"[..],
        &b"GET /healthz HTTP/1.1\r\nhost:\r\n\r\n"[..],
    ] {
        let mut connection = RawConnection::open(server.address).await;
        connection.send(request).await;
        let answer = connection.response().await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    server.stop().await.unwrap();
}

/// The edge decodes no transfer coding but `chunked`: `gzip, chunked` is refused, not
/// read as if it were plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_other_than_chunked_are_refused() {
    let cluster = TestCluster::start();
    let server = TestServer::start(cluster.config()).await;
    let (body, _) = random_increment(1);
    let chunked_body = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    for coding in ["gzip, chunked", "gzip,chunked", "identity, chunked"] {
        let mut connection = RawConnection::open(server.address).await;
        connection
            .send(
                format!(
                    "POST /increment HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ntransfer-encoding: {coding}\r\n\r\n{chunked_body}"
                )
                .as_bytes(),
            )
            .await;
        let answer = connection.response().await.unwrap();
        answer.assert_json_error(400, "unsupported_transfer_encoding");
        assert!(answer.says_close(), "{answer:?}");
    }
    // Two header lines that together say `gzip, chunked` are the same thing.
    let mut connection = RawConnection::open(server.address).await;
    connection
        .send(
            format!(
                "POST /increment HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n{chunked_body}"
            )
            .as_bytes(),
        )
        .await;
    connection
        .response()
        .await
        .unwrap()
        .assert_json_error(400, "unsupported_transfer_encoding");
    assert_eq!(cluster.record_count(), 0);

    // Plain `chunked` (any case) is read as usual.
    let mut connection = RawConnection::open(server.address).await;
    connection
        .send(
            format!(
                "POST /increment HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ntransfer-encoding: Chunked\r\n\r\n{chunked_body}"
            )
            .as_bytes(),
        )
        .await;
    let answer = connection.response().await.unwrap();
    assert_eq!(answer.status, 202, "{answer:?}");
    server.stop().await.unwrap();
}

/// The edge speaks HTTP/1.1 only: an HTTP/2 prior-knowledge preface gets the
/// connection closed (README, "The HTTP edge").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_gets_the_connection_closed() {
    let cluster = TestCluster::start();
    let server = TestServer::start(cluster.config()).await;
    let mut connection = RawConnection::open(server.address).await;
    connection
        .send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await;
    assert!(connection.closed().await);
    server.stop().await.unwrap();
}
