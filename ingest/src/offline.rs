//! The edge without network or broker, for the fuzz targets (`fuzz/`) and the tests
//! that replay their seed corpus.
//!
//! [`OfflineEdge::exchange`] feeds raw bytes into one connection of the real stack
//! (the socket wrapper of `connection.rs`, hyper's HTTP/1.1 server with the edge's
//! settings, the router and handlers) over an in-memory pipe, with an in-memory
//! stand-in for Kafka ([`StandInMode`]), and returns the raw bytes answered.
//! [`Exchange::check`] says whether those answers are what the edge promises;
//! [`check_decoders`] does the same for the strict decoders.
//!
//! The client side never closes its half of the pipe: the connection ends the way an
//! idle one does in production, by the header-read timeout (instant under tokio's
//! paused clock, as the fuzz target runs it).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use prometheus::Registry;
use serde_json::Value;
use tally_schemas::{
    decode_batch, decode_increment, BatchFormat, BatchRejection, Increment, RejectReason,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::IngestConfig;
use crate::error::IngestError;
use crate::handlers::AppState;
use crate::producer::RecordProducer;
pub use crate::producer::StandInMode;
use crate::server::{self, EdgeService};

/// The peer address requests appear to come from.
const PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

/// Size of the in-memory pipe's buffer in each direction.
const PIPE_BYTES: usize = 64 * 1024;

/// Batch limit used by [`check_decoders`].
pub const DECODER_MAX_ITEMS: usize = 64;

/// Every `error` code an answer of the edge may carry: the edge's own and the
/// decoder's rule codes. `openapi.yaml` documents each (`tests/published_contract.rs`).
pub const ERROR_CODES: &[&str] = &[
    "invalid_json",
    "body_read_failed",
    "not_an_object",
    "missing_key",
    "missing_value",
    "duplicate_field",
    "unknown_field",
    "invalid_key",
    "invalid_value",
    "invalid_items",
    "empty_batch",
    "too_many_items",
    "body_too_large",
    "unsupported_media_type",
    "unauthorized",
    "rate_limited",
    "not_found",
    "method_not_allowed",
    "request_timeout",
    "broker_unavailable",
    "queue_full",
    "not_ready",
    "malformed_request",
    "invalid_host",
    "unsupported_transfer_encoding",
    "uri_too_long",
    "headers_too_large",
];

/// Small limits, so that short inputs reach every limit, and short timeouts, so that
/// a test replaying inputs in real time is quick too.
pub fn fuzz_config() -> IngestConfig {
    IngestConfig {
        brokers: "offline".to_owned(),
        max_body_bytes: 2048,
        max_batch_items: 16,
        max_queued_records: 64,
        header_read_timeout: Duration::from_millis(100),
        delivery_timeout: Duration::from_millis(50),
        request_timeout: Duration::from_millis(300),
        ..IngestConfig::default()
    }
}

/// How a fuzz input chooses the stand-in's behaviour: a first byte `0x01` means the
/// queue is full, `0x02` the broker is unavailable (the byte is not sent); anything
/// else is sent as it is, with every record acknowledged.
pub fn split_stand_in_mode(input: &[u8]) -> (StandInMode, &[u8]) {
    match input.split_first() {
        Some((1, rest)) => (StandInMode::QueueFull, rest),
        Some((2, rest)) => (StandInMode::Unavailable, rest),
        _ => (StandInMode::Acknowledge, input),
    }
}

/// The edge's connection stack over an in-memory pipe, with an in-memory Kafka.
pub struct OfflineEdge {
    state: Arc<AppState>,
    http: http1::Builder,
}

impl OfflineEdge {
    /// The edge with `config` (validated as `run` does); no broker is contacted.
    pub fn new(config: IngestConfig) -> Result<Self, IngestError> {
        let state = server::app_state(&config, Registry::new(), None, |config, metrics| {
            Ok(RecordProducer::in_memory(config, metrics))
        })?;
        Ok(OfflineEdge {
            state,
            http: server::http_builder(&config),
        })
    }

    /// How the stand-in for Kafka answers from now on.
    pub fn set_stand_in(&self, mode: StandInMode) {
        self.state.producer.set_stand_in_mode(mode);
    }

    /// Sends `input` on a fresh connection and collects everything answered until the
    /// server closes it.
    pub async fn exchange(&self, input: &[u8]) -> Exchange {
        let (client, server_side) = tokio::io::duplex(PIPE_BYTES);
        let methods = Arc::new(Mutex::new(Vec::new()));
        let service = RecordingService {
            inner: EdgeService {
                state: Arc::clone(&self.state),
                peer: PEER,
            },
            methods: Arc::clone(&methods),
        };
        let connection =
            server::connection(&self.http, server_side, self.state.metrics.clone(), service);
        let (mut reader, mut writer) = tokio::io::split(client);
        let serve = async {
            // Errors (parse errors, timeouts) end the connection; its answers are the
            // result.
            let _ = connection.await;
        };
        let write = async {
            // The server may close before reading everything: that is not an error here.
            let _ = writer.write_all(input).await;
            // Keep the write half open until the server is done.
            writer
        };
        let read = async {
            let mut output = Vec::new();
            let _ = reader.read_to_end(&mut output).await;
            output
        };
        let ((), _writer, output) = tokio::join!(serve, write, read);
        let methods = methods
            .lock()
            .map(|methods| methods.clone())
            .unwrap_or_default();
        Exchange { output, methods }
    }
}

/// Remembers the method of every request that reached the handler, in order.
#[derive(Clone)]
struct RecordingService {
    inner: EdgeService,
    methods: Arc<Mutex<Vec<Method>>>,
}

impl Service<Request<Incoming>> for RecordingService {
    type Response = Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        if let Ok(mut methods) = self.methods.lock() {
            methods.push(request.method().clone());
        }
        self.inner.call(request)
    }
}

/// What one connection answered.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The raw bytes the server sent.
    pub output: Vec<u8>,
    /// The method of each request the handler received, in order.
    pub methods: Vec<Method>,
}

impl Exchange {
    /// Checks the answers against what the edge promises, returning how many final
    /// answers there were:
    /// - a sequence of complete HTTP/1.x answers and nothing else; interim ones only
    ///   `100 Continue`;
    /// - one final answer per request the handler received, in order, plus at most one
    ///   more from the HTTP layer (`400`/`414`/`431`) at the end;
    /// - every final answer has `x-request-id` and `content-length`; a HEAD answer has
    ///   no body;
    /// - no 5xx but `503` (with a 503 code); an error body is JSON with a known
    ///   `error` code, a `message` and the `request_id` of the header; a `202` names as
    ///   many records as it accepted;
    /// - an answer of the HTTP layer says `connection: close`, and nothing follows an
    ///   answer that said so.
    pub fn check(&self) -> Result<usize, String> {
        let mut rest = &self.output[..];
        let mut answered = 0;
        let mut closed = false;
        while !rest.is_empty() {
            if closed {
                return Err(format!(
                    "{} byte(s) after an answer that said connection: close",
                    rest.len()
                ));
            }
            let answer = Answer::parse(rest)?;
            if (100..200).contains(&answer.status) {
                if answer.status != 100 {
                    return Err(format!("interim answer {}", answer.status));
                }
                rest = &rest[answer.head_len..];
                continue;
            }
            let method = self.methods.get(answered);
            let from_http_layer = method.is_none();
            if from_http_layer && !matches!(answer.status, 400 | 414 | 431) {
                return Err(format!(
                    "answer {} to a request the handler never received",
                    answer.status
                ));
            }
            let body_len = if method == Some(&Method::HEAD) {
                0
            } else {
                answer.content_length
            };
            let Some(body) = rest.get(answer.head_len..answer.head_len + body_len) else {
                return Err(format!(
                    "answer {} ends inside its {body_len}-byte body",
                    answer.status
                ));
            };
            answer.check_body(body)?;
            if from_http_layer && !answer.says_close {
                return Err(format!(
                    "HTTP-layer answer {} keeps the connection",
                    answer.status
                ));
            }
            closed = answer.says_close;
            answered += 1;
            rest = &rest[answer.head_len + body_len..];
        }
        if answered < self.methods.len() {
            return Err(format!(
                "{} request(s) reached the handler, {answered} answer(s)",
                self.methods.len()
            ));
        }
        Ok(answered)
    }
}

/// One answer's head, parsed.
struct Answer {
    status: u16,
    head_len: usize,
    content_length: usize,
    request_id: String,
    says_close: bool,
}

impl Answer {
    fn parse(bytes: &[u8]) -> Result<Answer, String> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut head = httparse::Response::new(&mut headers);
        let head_len = match head.parse(bytes) {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) => {
                return Err(format!(
                    "incomplete answer head: {:?}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                ))
            }
            Err(error) => return Err(format!("answer head does not parse: {error}")),
        };
        // hyper answers an HTTP/1.0 request in HTTP/1.0.
        if !matches!(head.version, Some(0 | 1)) {
            return Err(format!("answer in HTTP/1.{:?}", head.version));
        }
        let status = head.code.unwrap_or_default();
        let value = |name: &str| {
            head.headers
                .iter()
                .find(|header| header.name.eq_ignore_ascii_case(name))
                .map(|header| String::from_utf8_lossy(header.value).into_owned())
        };
        let says_close = value("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if (100..200).contains(&status) {
            return Ok(Answer {
                status,
                head_len,
                content_length: 0,
                request_id: String::new(),
                says_close,
            });
        }
        let request_id = value(tally_schemas::names::REQUEST_ID_HEADER)
            .filter(|id| !id.is_empty() && id.bytes().all(|byte| byte.is_ascii_graphic()))
            .ok_or_else(|| format!("answer {status} without a sane x-request-id"))?;
        let content_length = value("content-length")
            .and_then(|length| length.parse().ok())
            .ok_or_else(|| format!("answer {status} without a content-length"))?;
        Ok(Answer {
            status,
            head_len,
            content_length,
            request_id,
            says_close,
        })
    }

    fn check_body(&self, body: &[u8]) -> Result<(), String> {
        let status = self.status;
        if status >= 500 && status != 503 {
            return Err(format!("server error {status}"));
        }
        if body.is_empty() {
            // HEAD answers, and only those, come without a body here.
            return Ok(());
        }
        if status >= 400 {
            let json: Value = serde_json::from_slice(body)
                .map_err(|error| format!("{status} body is not JSON: {error}"))?;
            let code = json["error"]
                .as_str()
                .ok_or_else(|| format!("{status} body without an error code: {json}"))?;
            if !ERROR_CODES.contains(&code) {
                return Err(format!("{status} with an unknown error code {code:?}"));
            }
            if status == 503 && !matches!(code, "broker_unavailable" | "queue_full" | "not_ready") {
                return Err(format!("503 with code {code:?}"));
            }
            if json["message"].as_str().is_none_or(str::is_empty) {
                return Err(format!("{status} {code} without a message"));
            }
            if json["request_id"].as_str() != Some(self.request_id.as_str()) {
                return Err(format!(
                    "{status} {code}: body request_id {} is not the header's {:?}",
                    json["request_id"], self.request_id
                ));
            }
        }
        if status == 202 {
            let json: Value = serde_json::from_slice(body)
                .map_err(|error| format!("202 body is not JSON: {error}"))?;
            let accepted = json["accepted"].as_u64().unwrap_or(0);
            let records = json["records"].as_array().map_or(0, Vec::len) as u64;
            if accepted == 0 || accepted != records {
                return Err(format!("202 accepting {accepted} naming {records} records"));
            }
        }
        Ok(())
    }
}

/// Checks the strict decoders on `body`: no panic (the caller's concern), and
/// - an accepted increment has `value ≥ 1` and survives a round trip through its
///   canonical JSON; a refusal names a rule of the body, never a time or sum reason;
/// - an accepted batch has 1..=[`DECODER_MAX_ITEMS`] items; a refused one names its
///   invalid items in increasing order; `TooManyItems` really has too many;
/// - NDJSON items are judged exactly as the single decoder judges each line.
pub fn check_decoders(body: &[u8]) -> Result<(), String> {
    let single = decode_increment(body);
    match &single {
        Ok(increment) => check_accepted(increment)?,
        Err(error) => check_body_reason(error.reason)?,
    }
    for format in [BatchFormat::JsonArray, BatchFormat::Ndjson] {
        match decode_batch(body, format, DECODER_MAX_ITEMS) {
            Ok(items) => {
                if items.is_empty() || items.len() > DECODER_MAX_ITEMS {
                    return Err(format!("{format:?}: accepted {} items", items.len()));
                }
                for item in &items {
                    check_accepted(item)?;
                }
            }
            Err(BatchRejection::Items(rejections)) => {
                if rejections.is_empty() {
                    return Err(format!("{format:?}: refused with no invalid item"));
                }
                if rejections
                    .windows(2)
                    .any(|pair| pair[0].index >= pair[1].index)
                {
                    return Err(format!("{format:?}: invalid items out of order"));
                }
                for rejection in &rejections {
                    check_body_reason(rejection.error.reason)?;
                }
            }
            Err(BatchRejection::TooManyItems { count, limit }) => {
                if count <= limit {
                    return Err(format!("{format:?}: too many items, {count} ≤ {limit}"));
                }
            }
            Err(BatchRejection::Framing(error)) => check_body_reason(error.reason)?,
            Err(BatchRejection::Empty) => {}
        }
    }
    check_ndjson_lines(body)
}

fn check_accepted(increment: &Increment) -> Result<(), String> {
    if increment.value < 1 {
        return Err(format!("accepted value {}", increment.value));
    }
    let canonical = increment.to_json();
    if decode_increment(canonical.as_bytes()).as_ref() != Ok(increment) {
        return Err(format!("{canonical} does not decode back to itself"));
    }
    if increment.canonical_key() != increment.key.hyphenated().to_string() {
        return Err("canonical key is not the lower-case hyphenated form".to_owned());
    }
    Ok(())
}

fn check_body_reason(reason: RejectReason) -> Result<(), String> {
    match reason {
        RejectReason::InvalidTimestamp
        | RejectReason::Late
        | RejectReason::FutureTimestamp
        | RejectReason::SumOverflow => Err(format!("a body refused for {reason}")),
        _ => Ok(()),
    }
}

/// An NDJSON batch is valid exactly when each non-blank line is, and its items are
/// those lines decoded one by one.
fn check_ndjson_lines(body: &[u8]) -> Result<(), String> {
    let lines: Vec<&[u8]> = body
        .split(|byte| *byte == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .collect();
    if lines.is_empty() || lines.len() > DECODER_MAX_ITEMS {
        return Ok(());
    }
    let one_by_one: Vec<_> = lines.iter().map(|line| decode_increment(line)).collect();
    match decode_batch(body, BatchFormat::Ndjson, DECODER_MAX_ITEMS) {
        Ok(items) => {
            let expected: Vec<Increment> = one_by_one.into_iter().flatten().collect();
            if items != expected || items.len() != lines.len() {
                return Err("NDJSON items differ from the lines decoded one by one".to_owned());
            }
        }
        Err(BatchRejection::Items(rejections)) => {
            let expected: Vec<(usize, RejectReason)> = one_by_one
                .iter()
                .enumerate()
                .filter_map(|(index, verdict)| verdict.as_ref().err().map(|e| (index, e.reason)))
                .collect();
            let found: Vec<(usize, RejectReason)> = rejections
                .iter()
                .map(|rejection| (rejection.index, rejection.error.reason))
                .collect();
            if found != expected {
                return Err(format!(
                    "NDJSON rejections {found:?}, lines one by one {expected:?}"
                ));
            }
        }
        Err(other) => {
            return Err(format!(
                "NDJSON with {} lines refused as {other:?}",
                lines.len()
            ))
        }
    }
    Ok(())
}
