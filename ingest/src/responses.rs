//! JSON bodies of the edge's answers. The shapes are documented in the crate docs.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use tally_schemas::names::REQUEST_ID_HEADER;
use tally_schemas::BatchRejection;

use crate::error::IngestError;
use crate::producer::RecordPosition;
use crate::request_id::RequestId;

/// At most this many invalid items are described in a batch `422`; the body stays
/// small even for a 10 000-item batch that is all wrong.
const MAX_LISTED_INVALID_ITEMS: usize = 100;

const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

#[derive(Serialize)]
struct AcceptedBody<'a> {
    accepted: usize,
    records: &'a [RecordPosition],
    request_id: &'a str,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'static str,
    message: String,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    invalid_count: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    items: Vec<InvalidItem<'a>>,
}

#[derive(Serialize)]
struct InvalidItem<'a> {
    index: usize,
    error: &'static str,
    message: &'a str,
}

/// `202 Accepted` naming the partition and offset of every record, in request order.
pub(crate) fn accepted(
    request_id: &RequestId,
    records: &[RecordPosition],
) -> Response<Full<Bytes>> {
    let body = AcceptedBody {
        accepted: records.len(),
        records,
        request_id: request_id.as_str(),
    };
    json_response(StatusCode::ACCEPTED, &body)
}

/// The JSON error answer for `error`, with `Retry-After` / `Allow` when they apply.
pub(crate) fn error(error: &IngestError, request_id: &RequestId) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(error_body(error, request_id))));
    *response.status_mut() = error.status();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, APPLICATION_JSON);
    if let Some(retry_after) = error.retry_after() {
        // Whole seconds, rounded up: "0" would invite an immediate retry.
        let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    }
    if matches!(error, IngestError::Unauthorized) {
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if let IngestError::MethodNotAllowed { allow } = error {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
    }
    response
}

/// The same JSON error answer as raw HTTP/1.x bytes, for the answers written beneath
/// hyper (`connection.rs`); it ends the connection. `version` and `date` are those of
/// the answer it replaces.
pub(crate) fn error_http_bytes(
    version: &str,
    error: &IngestError,
    request_id: &RequestId,
    date: Option<&[u8]>,
) -> Vec<u8> {
    let body = error_body(error, request_id);
    let status = error.status();
    let mut bytes = Vec::with_capacity(body.len() + 256);
    bytes.extend_from_slice(version.as_bytes());
    bytes.push(b' ');
    bytes.extend_from_slice(status.as_str().as_bytes());
    bytes.push(b' ');
    bytes.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    bytes.extend_from_slice(b"\r\ncontent-type: application/json\r\n");
    bytes.extend_from_slice(REQUEST_ID_HEADER.as_bytes());
    bytes.extend_from_slice(b": ");
    bytes.extend_from_slice(request_id.as_bytes());
    bytes.extend_from_slice(b"\r\nconnection: close\r\ncontent-length: ");
    bytes.extend_from_slice(body.len().to_string().as_bytes());
    if let Some(date) = date {
        bytes.extend_from_slice(b"\r\ndate: ");
        bytes.extend_from_slice(date);
    }
    bytes.extend_from_slice(b"\r\n\r\n");
    bytes.extend_from_slice(&body);
    bytes
}

/// The JSON body of an error answer.
fn error_body(error: &IngestError, request_id: &RequestId) -> Vec<u8> {
    let mut body = ErrorBody {
        error: error.code(),
        message: error.to_string(),
        request_id: request_id.as_str(),
        invalid_count: None,
        items: Vec::new(),
    };
    match error {
        IngestError::InvalidIncrement(invalid) => body.message = invalid.detail.clone(),
        IngestError::InvalidBatch(BatchRejection::Framing(invalid)) => {
            body.message = invalid.detail.clone();
        }
        IngestError::InvalidBatch(BatchRejection::Items(rejections)) => {
            body.invalid_count = Some(rejections.len());
            body.message = format!(
                "{} item(s) of the batch are invalid; nothing was produced",
                rejections.len()
            );
            body.items = rejections
                .iter()
                .take(MAX_LISTED_INVALID_ITEMS)
                .map(|rejection| InvalidItem {
                    index: rejection.index,
                    error: rejection.error.reason.code(),
                    message: &rejection.error.detail,
                })
                .collect();
        }
        _ => {}
    }
    to_json_bytes(&body)
}

/// A small JSON answer such as `{"status":"ok"}`.
pub(crate) fn status(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    #[derive(Serialize)]
    struct StatusBody {
        status: &'static str,
    }
    json_response(status, &StatusBody { status: text })
}

/// Serializing these plain structs cannot fail; fall back to an empty object anyway
/// rather than panic.
fn to_json_bytes<T: Serialize>(body: &T) -> Vec<u8> {
    serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec())
}

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(to_json_bytes(body))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, APPLICATION_JSON);
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use http_body_util::BodyExt;
    use tally_schemas::{decode_batch, BatchFormat};

    async fn body_json(response: Response<Full<Bytes>>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn accepted_body_names_every_record() {
        let id = RequestId::generate();
        let response = accepted(
            &id,
            &[
                RecordPosition {
                    partition: 2,
                    offset: 7,
                },
                RecordPosition {
                    partition: 0,
                    offset: 1,
                },
            ],
        );
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let json = body_json(response).await;
        assert_eq!(
            json,
            serde_json::json!({
                "accepted": 2,
                "records": [{"partition": 2, "offset": 7}, {"partition": 0, "offset": 1}],
                "request_id": id.as_str(),
            })
        );
    }

    #[tokio::test]
    async fn batch_error_lists_at_most_a_hundred_items() {
        let body = "{\"key\":1}\n".repeat(150);
        let rejection = decode_batch(body.as_bytes(), BatchFormat::Ndjson, 1000).unwrap_err();
        let id = RequestId::generate();
        let response = error(&IngestError::InvalidBatch(rejection), &id);
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let json = body_json(response).await;
        assert_eq!(json["error"], "invalid_items");
        assert_eq!(json["invalid_count"], 150);
        assert_eq!(
            json["items"].as_array().unwrap().len(),
            MAX_LISTED_INVALID_ITEMS
        );
        assert_eq!(json["items"][3]["index"], 3);
        assert_eq!(json["items"][3]["error"], "invalid_key");
    }

    #[tokio::test]
    async fn retry_after_is_whole_seconds_rounded_up() {
        let id = RequestId::generate();
        let response = error(
            &IngestError::RateLimited {
                retry_after: std::time::Duration::from_millis(1200),
            },
            &id,
        );
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        let response = error(
            &IngestError::RateLimited {
                retry_after: std::time::Duration::from_millis(10),
            },
            &id,
        );
        assert_eq!(response.headers()[RETRY_AFTER], "1");
    }
}
