//! The one error type of the edge.
//!
//! Every failure is either the client's input (a 4xx: fix the request, retrying it
//! unchanged will not help, except after `429`/`408`) or the infrastructure's (a 503
//! at request time: retry later; or a startup failure returned by `run`). Client
//! input never becomes a 5xx.

use std::time::Duration;

use http::StatusCode;
use rdkafka::error::KafkaError;
use tally_schemas::{BatchRejection, InvalidIncrement};

/// Why a request was refused, or why the server could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    // ---- client input -------------------------------------------------------------
    /// The body of `POST /increment` breaks the increment contract.
    #[error("{0}")]
    InvalidIncrement(InvalidIncrement),

    /// The body of `POST /increments` is refused as a whole.
    #[error("{0}")]
    InvalidBatch(BatchRejection),

    /// The body is larger than `--max-body-bytes` (detected before or while reading).
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },

    /// The client broke off or garbled the body (connection reset, bad chunking).
    #[error("could not read the request body: {0}")]
    BodyRead(String),

    /// `Content-Type` is missing or not one the route accepts.
    #[error("content type must be {expected}")]
    UnsupportedMediaType { expected: &'static str },

    /// Auth is on and the bearer token is missing or not accepted.
    #[error("missing or invalid bearer token")]
    Unauthorized,

    /// The client's token bucket is empty.
    #[error("rate limit exceeded; retry after {}s", retry_after.as_secs())]
    RateLimited { retry_after: Duration },

    /// No such route.
    #[error("no such route")]
    NotFound,

    /// The route exists but not for this method.
    #[error("method not allowed; use {allow}")]
    MethodNotAllowed { allow: &'static str },

    /// The request (headers to answer, body included) took longer than `--request-timeout`.
    #[error("request did not complete within {}", humantime::format_duration(*.0))]
    RequestTimeout(Duration),

    // ---- refused at the HTTP layer (the connection is closed after the answer) ----
    /// The request line or a header could not be parsed as HTTP/1.1 (found by hyper;
    /// answered by the connection wrapper, `connection.rs`).
    #[error("the request could not be parsed as HTTP/1.1 (request line or a header is malformed)")]
    MalformedRequest,

    /// The request target is longer than the parser accepts.
    #[error("the request target (URI) is too long")]
    UriTooLong,

    /// The request head has too many header lines or is too large.
    #[error("the request headers are too many or too large")]
    HeadersTooLarge,

    /// `Host` is missing (HTTP/1.1), repeated or not a host name (RFC 9112 §3.2).
    #[error("{0}")]
    InvalidHost(&'static str),

    /// A transfer coding other than `chunked`; the edge decodes no other.
    #[error(
        "transfer coding {0:?} is not supported: send the body as is or chunked, uncompressed"
    )]
    UnsupportedTransferEncoding(String),

    // ---- infrastructure -----------------------------------------------------------
    /// The broker did not acknowledge every record within the delivery timeout, or
    /// refused them. The records are not known to be durable.
    #[error("broker did not acknowledge the records: {detail}")]
    BrokerUnavailable { detail: String },

    /// The producer's local queue is full: the broker is slower than the input.
    #[error("producer queue is full")]
    QueueFull,

    /// The server is not ready (used by `/readyz`).
    #[error("not ready: {0}")]
    NotReady(String),

    /// Something on our side failed while answering (e.g. encoding metrics).
    #[error("internal error: {0}")]
    Internal(String),

    /// Settings are inconsistent or unreadable; the server does not start.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The Kafka client could not be created.
    #[error("kafka client: {0}")]
    Kafka(#[from] KafkaError),

    /// The metrics could not be registered (e.g. registered twice in one registry).
    #[error("metrics registration: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl IngestError {
    /// True when the client's request caused the error (a 4xx).
    pub fn is_client_input(&self) -> bool {
        matches!(
            self,
            IngestError::InvalidIncrement(_)
                | IngestError::InvalidBatch(_)
                | IngestError::BodyTooLarge { .. }
                | IngestError::BodyRead(_)
                | IngestError::UnsupportedMediaType { .. }
                | IngestError::Unauthorized
                | IngestError::RateLimited { .. }
                | IngestError::NotFound
                | IngestError::MethodNotAllowed { .. }
                | IngestError::RequestTimeout(_)
                | IngestError::MalformedRequest
                | IngestError::UriTooLong
                | IngestError::HeadersTooLarge
                | IngestError::InvalidHost(_)
                | IngestError::UnsupportedTransferEncoding(_)
        )
    }

    /// True when the connection is closed after this answer whatever the state of the
    /// body: the request was refused at the HTTP layer, where what follows on the
    /// connection cannot be trusted to be the next request.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            IngestError::MalformedRequest
                | IngestError::UriTooLong
                | IngestError::HeadersTooLarge
                | IngestError::InvalidHost(_)
                | IngestError::UnsupportedTransferEncoding(_)
        )
    }

    /// True when sending the same request again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            IngestError::RateLimited { .. }
                | IngestError::RequestTimeout(_)
                | IngestError::BodyRead(_)
                | IngestError::BrokerUnavailable { .. }
                | IngestError::QueueFull
                | IngestError::NotReady(_)
        )
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::InvalidIncrement(invalid) => status_of_invalid(invalid),
            IngestError::InvalidBatch(BatchRejection::Framing(invalid)) => {
                status_of_invalid(invalid)
            }
            IngestError::InvalidBatch(BatchRejection::Items(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            IngestError::InvalidBatch(BatchRejection::TooManyItems { .. }) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            IngestError::InvalidBatch(BatchRejection::Empty) => StatusCode::UNPROCESSABLE_ENTITY,
            IngestError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::BodyRead(_) => StatusCode::BAD_REQUEST,
            IngestError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::Unauthorized => StatusCode::UNAUTHORIZED,
            IngestError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            IngestError::NotFound => StatusCode::NOT_FOUND,
            IngestError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            IngestError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            IngestError::MalformedRequest
            | IngestError::InvalidHost(_)
            | IngestError::UnsupportedTransferEncoding(_) => StatusCode::BAD_REQUEST,
            IngestError::UriTooLong => StatusCode::URI_TOO_LONG,
            IngestError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            IngestError::BrokerUnavailable { .. }
            | IngestError::QueueFull
            | IngestError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Internal(_)
            | IngestError::Config(_)
            | IngestError::Kafka(_)
            | IngestError::Metrics(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code in the `error` field of the JSON body; also the `reason` label
    /// of `tally_ingest_rejections_total`. A fixed, small set.
    pub fn code(&self) -> &'static str {
        match self {
            IngestError::InvalidIncrement(invalid) => invalid.reason.code(),
            IngestError::InvalidBatch(BatchRejection::Framing(invalid)) => invalid.reason.code(),
            IngestError::InvalidBatch(BatchRejection::Items(_)) => "invalid_items",
            IngestError::InvalidBatch(BatchRejection::TooManyItems { .. }) => "too_many_items",
            IngestError::InvalidBatch(BatchRejection::Empty) => "empty_batch",
            IngestError::BodyTooLarge { .. } => "body_too_large",
            IngestError::BodyRead(_) => "body_read_failed",
            IngestError::UnsupportedMediaType { .. } => "unsupported_media_type",
            IngestError::Unauthorized => "unauthorized",
            IngestError::RateLimited { .. } => "rate_limited",
            IngestError::NotFound => "not_found",
            IngestError::MethodNotAllowed { .. } => "method_not_allowed",
            IngestError::RequestTimeout(_) => "request_timeout",
            IngestError::MalformedRequest => "malformed_request",
            IngestError::UriTooLong => "uri_too_long",
            IngestError::HeadersTooLarge => "headers_too_large",
            IngestError::InvalidHost(_) => "invalid_host",
            IngestError::UnsupportedTransferEncoding(_) => "unsupported_transfer_encoding",
            IngestError::BrokerUnavailable { .. } => "broker_unavailable",
            IngestError::QueueFull => "queue_full",
            IngestError::NotReady(_) => "not_ready",
            IngestError::Internal(_) => "internal",
            IngestError::Config(_) => "invalid_config",
            IngestError::Kafka(_) => "kafka_client",
            IngestError::Metrics(_) => "metrics",
        }
    }

    /// The `Retry-After` to send, when waiting is the remedy.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            IngestError::RateLimited { retry_after } => Some(*retry_after),
            // The queue drains in milliseconds once the broker keeps up again.
            IngestError::QueueFull => Some(Duration::from_secs(1)),
            // A broker outage usually lasts longer than a queue burst; ask clients to
            // back off a little more so they do not pile onto a recovering cluster.
            IngestError::BrokerUnavailable { .. } | IngestError::NotReady(_) => {
                Some(Duration::from_secs(5))
            }
            _ => None,
        }
    }
}

/// Malformed JSON is a 400; well-formed JSON that breaks a rule is a 422.
fn status_of_invalid(invalid: &InvalidIncrement) -> StatusCode {
    if invalid.reason.is_malformed() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tally_schemas::{decode_batch, decode_increment, BatchFormat};

    #[test]
    fn client_input_is_never_a_server_error() {
        let samples = [
            IngestError::InvalidIncrement(decode_increment(b"{").unwrap_err()),
            IngestError::BodyTooLarge { limit: 1 },
            IngestError::Unauthorized,
            IngestError::RateLimited {
                retry_after: Duration::from_secs(1),
            },
            IngestError::RequestTimeout(Duration::from_secs(1)),
        ];
        for error in samples {
            assert!(error.is_client_input());
            assert!(error.status().is_client_error(), "{error:?}");
        }
    }

    #[test]
    fn statuses_follow_the_contract() {
        let malformed = decode_increment(b"{\"key\":").unwrap_err();
        assert_eq!(
            IngestError::InvalidIncrement(malformed).status(),
            StatusCode::BAD_REQUEST
        );
        let broken_rule = decode_increment(br#"{"key":"x","value":1}"#).unwrap_err();
        let error = IngestError::InvalidIncrement(broken_rule);
        assert_eq!(error.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(error.code(), "invalid_key");

        let batch = decode_batch(b"{\"key\":1}\n", BatchFormat::Ndjson, 10).unwrap_err();
        let batch = IngestError::InvalidBatch(batch);
        assert_eq!(batch.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(batch.code(), "invalid_items");
        let too_many =
            IngestError::InvalidBatch(BatchRejection::TooManyItems { count: 3, limit: 2 });
        assert_eq!(too_many.status(), StatusCode::PAYLOAD_TOO_LARGE);

        assert!(IngestError::QueueFull.is_retryable());
        assert!(!IngestError::QueueFull.is_client_input());
        assert_eq!(
            IngestError::QueueFull.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(IngestError::QueueFull.retry_after().is_some());
    }
}
