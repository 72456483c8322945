//! Routing and the request handlers.
//!
//! Order of checks: HTTP framing (`Host` exactly once, no transfer coding but
//! `chunked`: 400, connection closed), then for the increment routes: route, method,
//! auth (401), rate limit (429), content type (415), body size while reading (413),
//! decode (400/422), produce and wait for the broker (503), answer 202. Every answer
//! carries the request id and is counted once in the metrics.
//!
//! Keep-alive after an early answer: a request answered before its body was read (404,
//! 405, 415, 401, 429, a declared 413, …) has the rest of its body drained, at most
//! [`DRAIN_MAX_BYTES`] within [`DRAIN_TIMEOUT`], so the next request on the connection
//! can be read. When that is not possible (a larger body, a client waiting for
//! `100 Continue`, a body abandoned part-way: 413 while reading, 408, a broken body) the
//! answer says `connection: close` and hyper closes the connection after it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HOST, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use prometheus::{Encoder, Registry, TextEncoder};
use tally_schemas::names::REQUEST_ID_HEADER;
use tally_schemas::{decode_batch, decode_increment, BatchFormat, Increment};
use tracing::Instrument;

use crate::auth::{AuthOutcome, TokenAuthenticator};
use crate::error::IngestError;
use crate::metrics::{GaugeGuard, IngestMetrics};
use crate::producer::RecordProducer;
use crate::rate_limit::{ClientId, RateLimiter};
use crate::request_id::RequestId;
use crate::responses;
use crate::server::ReadHandler;

/// Bodies above this size are decoded on the blocking pool: parsing a 1 MiB batch
/// takes milliseconds, which would stall every other request on the async worker.
const DECODE_INLINE_MAX_BYTES: usize = 64 * 1024;

/// Most bytes of an unread body drained after an early answer to keep the connection.
pub(crate) const DRAIN_MAX_BYTES: u64 = 64 * 1024;

/// Longest wait for that rest of the body (never past the request's deadline).
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// The routes; also the bounded `route` label of the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Increment,
    Increments,
    Healthz,
    Readyz,
    Metrics,
    Windows,
    /// The playground's live page and its static files (`/ui`, `/ui/...`).
    Ui,
    Unknown,
}

impl Route {
    pub(crate) const ALL: [Route; 8] = [
        Route::Increment,
        Route::Increments,
        Route::Healthz,
        Route::Readyz,
        Route::Metrics,
        Route::Windows,
        Route::Ui,
        Route::Unknown,
    ];

    pub(crate) fn of_path(path: &str) -> Route {
        match path {
            "/increment" => Route::Increment,
            "/increments" => Route::Increments,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            "/metrics" => Route::Metrics,
            _ if path == "/v1/windows" || path.starts_with("/v1/windows/") => Route::Windows,
            _ if path == "/ui" || path.starts_with("/ui/") => Route::Ui,
            _ => Route::Unknown,
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Route::Increment => "increment",
            Route::Increments => "increments",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::Windows => "windows",
            Route::Ui => "ui",
            Route::Unknown => "unknown",
        }
    }

    /// Position in [`Route::ALL`], for the pre-resolved metric handles.
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Everything a request handler needs, shared by all connections.
pub(crate) struct AppState {
    pub(crate) max_body_bytes: usize,
    pub(crate) max_batch_items: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) auth: TokenAuthenticator,
    pub(crate) rate_limiter: Option<RateLimiter>,
    pub(crate) producer: RecordProducer,
    pub(crate) metrics: IngestMetrics,
    pub(crate) registry: Registry,
    pub(crate) read_handler: Option<ReadHandler>,
    pub(crate) infra_warnings: WarningGate,
}

/// Lets through one warning per second: during a broker outage every request fails
/// the same way, and one log line per request would flood the logs (the metrics
/// count every failure).
#[derive(Default)]
pub(crate) struct WarningGate {
    last_second: AtomicU64,
    suppressed: AtomicU64,
}

impl WarningGate {
    /// `Some(n)` when a warning may be logged now, with `n` warnings suppressed since the
    /// last one; `None` when this one should be suppressed.
    pub(crate) fn admit(&self, now: SystemTime) -> Option<u64> {
        let second = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since_epoch| since_epoch.as_secs());
        let last = self.last_second.load(Ordering::Relaxed);
        if second > last
            && self
                .last_second
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// The request body as a handler leaves it.
pub(crate) enum RequestBody {
    /// Not read at all.
    Unread(Incoming),
    /// Read to its end.
    Read,
    /// Reading stopped part-way (too large, too slow, broken): the connection cannot
    /// be reused.
    Abandoned,
}

/// Answers one request. Never fails: every error becomes a JSON answer.
pub(crate) async fn handle(
    state: Arc<AppState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let (head, body) = request.into_parts();
    let mut body = RequestBody::Unread(body);
    let route = Route::of_path(head.uri.path());
    let request_id = RequestId::from_headers(&head.headers);
    let expects_continue = head
        .headers
        .get(EXPECT)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let span = tracing::info_span!(
        "ingest_request",
        request_id = request_id.as_str(),
        route = route.label(),
        method = %head.method,
    );
    let _in_flight = GaugeGuard::increment(state.metrics.in_flight_requests());
    // Every wait below (body, broker, read side) ends by this deadline. Deadlines are
    // applied per wait rather than around the whole handler so that a request arms at
    // most one timer on the fast path.
    let deadline = tokio::time::Instant::now() + state.request_timeout;

    let outcome = async {
        check_framing(&head)?;
        dispatch(&state, route, peer, &request_id, head, &mut body, deadline).await
    }
    .instrument(span.clone())
    .await;

    let mut close = false;
    let mut response = match outcome {
        Ok(response) => response,
        Err(error) => {
            close = error.closes_connection();
            let _entered = span.enter();
            if error.is_client_input() {
                state.metrics.observe_rejection(error.code());
                tracing::debug!(code = error.code(), %error, "request refused");
            } else if let Some(suppressed) = state.infra_warnings.admit(SystemTime::now()) {
                tracing::warn!(code = error.code(), %error, suppressed, "request failed");
            } else {
                tracing::debug!(code = error.code(), %error, "request failed");
            }
            responses::error(&error, &request_id)
        }
    };
    if close || !settle_body(body, expects_continue, deadline).await {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
        .headers_mut()
        .insert(REQUEST_ID_HEADER, request_id.header_value());
    state
        .metrics
        .observe_request(route, response.status(), started.elapsed().as_secs_f64());
    response
}

async fn dispatch(
    state: &AppState,
    route: Route,
    peer: SocketAddr,
    request_id: &RequestId,
    head: Parts,
    body: &mut RequestBody,
    deadline: tokio::time::Instant,
) -> Result<Response<Full<Bytes>>, IngestError> {
    let timed_out = || IngestError::RequestTimeout(state.request_timeout);
    match route {
        Route::Increment => {
            require_post(&head.method)?;
            admit(state, peer, &head.headers)?;
            accept_one(state, request_id, &head.headers, body, deadline).await
        }
        Route::Increments => {
            require_post(&head.method)?;
            admit(state, peer, &head.headers)?;
            accept_batch(state, request_id, &head.headers, body, deadline).await
        }
        Route::Healthz => {
            require_get(&head.method)?;
            Ok(responses::status(StatusCode::OK, "ok"))
        }
        Route::Readyz => {
            require_get(&head.method)?;
            tokio::time::timeout_at(deadline, state.producer.check_ready())
                .await
                .map_err(|_| timed_out())??;
            Ok(responses::status(StatusCode::OK, "ready"))
        }
        Route::Metrics => {
            require_get(&head.method)?;
            metrics_text(&state.registry)
        }
        Route::Windows => {
            require_get(&head.method)?;
            admit(state, peer, &head.headers)?;
            let Some(read_handler) = &state.read_handler else {
                return Err(IngestError::NotFound);
            };
            // The read side needs the head only; a GET body is drained afterwards.
            tokio::time::timeout_at(deadline, read_handler(Request::from_parts(head, ())))
                .await
                .map_err(|_| timed_out())
        }
        Route::Ui => {
            require_get(&head.method)?;
            // Static files only (the page reads its data through `/v1/windows` and
            // `/metrics`, which keep their own checks), so no auth or rate limit here.
            let Some(read_handler) = &state.read_handler else {
                return Err(IngestError::NotFound);
            };
            tokio::time::timeout_at(deadline, read_handler(Request::from_parts(head, ())))
                .await
                .map_err(|_| timed_out())
        }
        Route::Unknown => Err(IngestError::NotFound),
    }
}

/// RFC 9112 §3.2: `Host` exactly once (HTTP/1.0 may omit it) and a host name;
/// RFC 9112 §6.1: the edge decodes no transfer coding but `chunked`.
fn check_framing(head: &Parts) -> Result<(), IngestError> {
    let mut hosts = head.headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => {
            return Err(IngestError::InvalidHost(
                "more than one Host header (RFC 9112 §3.2)",
            ))
        }
        (None, _) if head.version != Version::HTTP_10 => {
            return Err(IngestError::InvalidHost(
                "missing Host header, required in HTTP/1.1 (RFC 9112 §3.2)",
            ))
        }
        (Some(host), None) if !is_valid_host(host.as_bytes()) => {
            return Err(IngestError::InvalidHost(
                "Host header is not a host name with an optional port",
            ))
        }
        _ => {}
    }
    let mut codings = head
        .headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|byte| *byte == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => Ok(()),
        (Some(coding), None) if coding.eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => {
            let listed: Vec<String> = head
                .headers
                .get_all(TRANSFER_ENCODING)
                .iter()
                .map(|value| {
                    String::from_utf8_lossy(value.as_bytes())
                        .chars()
                        .take(64)
                        .collect()
                })
                .collect();
            Err(IngestError::UnsupportedTransferEncoding(listed.join(", ")))
        }
    }
}

/// `uri-host [ ":" port ]`, or empty (allowed when the target has no authority).
fn is_valid_host(value: &[u8]) -> bool {
    if value.is_empty() {
        return true;
    }
    if value.contains(&b'@') {
        return false;
    }
    let Ok(authority) = http::uri::Authority::try_from(value) else {
        return false;
    };
    match authority.as_str().strip_prefix(authority.host()) {
        Some("") => true,
        Some(port) => port
            .strip_prefix(':')
            .is_some_and(|digits| digits.parse::<u16>().is_ok()),
        None => false,
    }
}

/// After the answer is made: true when the connection can carry another request.
/// A body left unread is drained (bounded in bytes and time) so the next request can
/// be found; a client waiting for `100 Continue` is not asked for the body.
async fn settle_body(
    body: RequestBody,
    expects_continue: bool,
    deadline: tokio::time::Instant,
) -> bool {
    let incoming = match body {
        RequestBody::Read => return true,
        RequestBody::Abandoned => return false,
        RequestBody::Unread(incoming) => incoming,
    };
    if incoming.is_end_stream() {
        return true;
    }
    if expects_continue || incoming.size_hint().lower() > DRAIN_MAX_BYTES {
        return false;
    }
    let until = deadline.min(tokio::time::Instant::now() + DRAIN_TIMEOUT);
    tokio::time::timeout_at(until, drain(incoming))
        .await
        .unwrap_or(false)
}

/// Reads and drops a body; false if it breaks or exceeds [`DRAIN_MAX_BYTES`].
async fn drain(mut body: Incoming) -> bool {
    let mut drained: u64 = 0;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return false;
        };
        if let Some(data) = frame.data_ref() {
            drained = drained.saturating_add(data.len() as u64);
            if drained > DRAIN_MAX_BYTES {
                return false;
            }
        }
    }
    true
}

fn require_post(method: &Method) -> Result<(), IngestError> {
    if method == Method::POST {
        Ok(())
    } else {
        Err(IngestError::MethodNotAllowed { allow: "POST" })
    }
}

fn require_get(method: &Method) -> Result<(), IngestError> {
    if method == Method::GET || method == Method::HEAD {
        Ok(())
    } else {
        Err(IngestError::MethodNotAllowed { allow: "GET, HEAD" })
    }
}

/// Auth, then the rate limit; the client identity is the token when auth is on.
fn admit(state: &AppState, peer: SocketAddr, headers: &HeaderMap) -> Result<(), IngestError> {
    let client = match state.auth.check(headers) {
        AuthOutcome::Open => ClientId::Ip(peer.ip()),
        AuthOutcome::Token(index) => ClientId::Token(index),
        AuthOutcome::Denied => return Err(IngestError::Unauthorized),
    };
    if let Some(limiter) = &state.rate_limiter {
        limiter
            .try_acquire(client, Instant::now())
            .map_err(|retry_after| IngestError::RateLimited { retry_after })?;
    }
    Ok(())
}

async fn accept_one(
    state: &AppState,
    request_id: &RequestId,
    headers: &HeaderMap,
    body: &mut RequestBody,
    deadline: tokio::time::Instant,
) -> Result<Response<Full<Bytes>>, IngestError> {
    match media_type(headers) {
        Some(media) if media.eq_ignore_ascii_case("application/json") => {}
        _ => {
            return Err(IngestError::UnsupportedMediaType {
                expected: "application/json",
            })
        }
    }
    let body = read_body(
        headers,
        body,
        state.max_body_bytes,
        deadline,
        state.request_timeout,
    )
    .await?;
    let increment = decode_increment(&body).map_err(IngestError::InvalidIncrement)?;
    let positions = state
        .producer
        .produce(
            std::slice::from_ref(&increment),
            request_id,
            now_millis(),
            deadline,
        )
        .await?;
    Ok(responses::accepted(request_id, &positions))
}

async fn accept_batch(
    state: &AppState,
    request_id: &RequestId,
    headers: &HeaderMap,
    body: &mut RequestBody,
    deadline: tokio::time::Instant,
) -> Result<Response<Full<Bytes>>, IngestError> {
    let format = match media_type(headers) {
        Some(media) if media.eq_ignore_ascii_case("application/json") => BatchFormat::JsonArray,
        Some(media)
            if media.eq_ignore_ascii_case("application/x-ndjson")
                || media.eq_ignore_ascii_case("application/ndjson") =>
        {
            BatchFormat::Ndjson
        }
        _ => {
            return Err(IngestError::UnsupportedMediaType {
                expected: "application/json (a JSON array) or application/x-ndjson",
            })
        }
    };
    let body = read_body(
        headers,
        body,
        state.max_body_bytes,
        deadline,
        state.request_timeout,
    )
    .await?;
    let increments = decode_whole_batch(body, format, state.max_batch_items).await?;
    let positions = state
        .producer
        .produce(&increments, request_id, now_millis(), deadline)
        .await?;
    Ok(responses::accepted(request_id, &positions))
}

async fn decode_whole_batch(
    body: Bytes,
    format: BatchFormat,
    max_items: usize,
) -> Result<Vec<Increment>, IngestError> {
    if body.len() <= DECODE_INLINE_MAX_BYTES {
        return decode_batch(&body, format, max_items).map_err(IngestError::InvalidBatch);
    }
    tokio::task::spawn_blocking(move || decode_batch(&body, format, max_items))
        .await
        .map_err(|join_error| {
            IngestError::Internal(format!("batch decoder stopped: {join_error}"))
        })?
        .map_err(IngestError::InvalidBatch)
}

/// The media type of `Content-Type` without parameters such as `charset`.
fn media_type(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    value.split(';').next().map(str::trim)
}

/// Reads the whole body by `deadline`, refusing (without reading on) anything over
/// `limit` bytes. A body declared too large is refused before it is touched.
async fn read_body(
    headers: &HeaderMap,
    body: &mut RequestBody,
    limit: usize,
    deadline: tokio::time::Instant,
    request_timeout: Duration,
) -> Result<Bytes, IngestError> {
    let declared_length = headers
        .get(CONTENT_LENGTH)
        .and_then(|value: &HeaderValue| value.to_str().ok())
        .and_then(|text| text.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > limit as u64) {
        return Err(IngestError::BodyTooLarge { limit });
    }
    let RequestBody::Unread(incoming) = std::mem::replace(body, RequestBody::Abandoned) else {
        return Err(IngestError::Internal("request body read twice".to_owned()));
    };
    let collected = tokio::time::timeout_at(deadline, Limited::new(incoming, limit).collect())
        .await
        .map_err(|_| IngestError::RequestTimeout(request_timeout))?;
    match collected {
        Ok(collected) => {
            *body = RequestBody::Read;
            Ok(collected.to_bytes())
        }
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(IngestError::BodyTooLarge { limit })
        }
        Err(error) => Err(IngestError::BodyRead(error.to_string())),
    }
}

fn metrics_text(registry: &Registry) -> Result<Response<Full<Bytes>>, IngestError> {
    let encoder = TextEncoder::new();
    let mut buffer = Vec::new();
    encoder
        .encode(&registry.gather(), &mut buffer)
        .map_err(|error| IngestError::Internal(format!("encoding metrics: {error}")))?;
    let mut response = Response::new(Full::new(Bytes::from(buffer)));
    if let Ok(content_type) = HeaderValue::from_str(encoder.format_type()) {
        response.headers_mut().insert(CONTENT_TYPE, content_type);
    }
    Ok(response)
}

/// Acceptance time in Unix milliseconds: the Kafka record's CreateTime.
fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since_epoch| i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_labels() {
        assert_eq!(Route::of_path("/increment"), Route::Increment);
        assert_eq!(Route::of_path("/increments"), Route::Increments);
        assert_eq!(Route::of_path("/v1/windows/abc"), Route::Windows);
        assert_eq!(Route::of_path("/v1/windowsx"), Route::Unknown);
        assert_eq!(Route::of_path("/increment/"), Route::Unknown);
        assert_eq!(Route::of_path("/ui"), Route::Ui);
        assert_eq!(Route::of_path("/ui/app.js"), Route::Ui);
        assert_eq!(Route::of_path("/uix"), Route::Unknown);
        for (index, route) in Route::ALL.into_iter().enumerate() {
            assert_eq!(route.index(), index);
        }
    }

    #[test]
    fn warning_gate_lets_one_warning_through_per_second() {
        let gate = WarningGate::default();
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(gate.admit(start), Some(0));
        assert_eq!(gate.admit(start + Duration::from_millis(300)), None);
        assert_eq!(gate.admit(start + Duration::from_millis(900)), None);
        assert_eq!(gate.admit(start + Duration::from_millis(1_000)), Some(2));
    }

    #[test]
    fn host_values_are_host_names_with_an_optional_port() {
        for good in [
            &b"localhost"[..],
            b"tally_ingest:8080",
            b"[::1]:8080",
            b"10.0.0.1:80",
            b"Example.COM",
            b"",
        ] {
            assert!(is_valid_host(good), "{:?}", String::from_utf8_lossy(good));
        }
        for bad in [
            &b"a b"[..],
            b"user@host",
            b"host:port",
            b"host/path",
            b"h\x7f",
        ] {
            assert!(!is_valid_host(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn framing_wants_one_host_and_no_coding_but_chunked() {
        let head = |version: Version, headers: &[(&str, &str)]| {
            let mut builder = Request::builder().version(version).uri("/increment");
            for (name, value) in headers {
                builder = builder.header(*name, *value);
            }
            builder.body(()).map(|request| request.into_parts().0)
        };
        let code = |version, headers: &[(&str, &str)]| {
            head(version, headers)
                .ok()
                .and_then(|head| check_framing(&head).err())
                .map(|error| error.code())
        };
        assert_eq!(code(Version::HTTP_11, &[("host", "a")]), None);
        assert_eq!(code(Version::HTTP_10, &[]), None);
        assert_eq!(code(Version::HTTP_11, &[]), Some("invalid_host"));
        assert_eq!(
            code(Version::HTTP_10, &[("host", "a"), ("host", "a")]),
            Some("invalid_host")
        );
        let chunked = [("host", "a"), ("transfer-encoding", "CHUNKED")];
        assert_eq!(code(Version::HTTP_11, &chunked), None);
        for refused in [
            "gzip, chunked",
            "chunked, chunked",
            "deflate",
            "chunked;x=1",
            " , gzip",
        ] {
            assert_eq!(
                code(
                    Version::HTTP_11,
                    &[("host", "a"), ("transfer-encoding", refused)]
                ),
                Some("unsupported_transfer_encoding"),
                "{refused}"
            );
        }
    }

    #[test]
    fn media_type_ignores_parameters_and_case() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("Application/JSON; charset=utf-8"),
        );
        assert!(media_type(&headers)
            .is_some_and(|media| media.eq_ignore_ascii_case("application/json")));
        assert_eq!(media_type(&HeaderMap::new()), None);
    }
}
