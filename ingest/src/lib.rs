//! Tally's HTTP edge: validates increments and produces them to Kafka, answering
//! `202 Accepted` only after the broker acknowledged every record of the request.
//!
//! Modules:
//! - [`config`]: [`IngestConfig`], every setting as a clap flag with an env var.
//! - [`error`]: [`IngestError`], the one error type; it separates client input from
//!   infrastructure failure, maps to an HTTP status and stable code, and says whether
//!   a retry can help.
//! - `server`: the accept loop (connection cap, header-read timeout, graceful drain
//!   and producer flush on shutdown); entry points [`run`] and [`run_with`].
//! - `connection`: the socket wrapper that answers requests hyper cannot parse with
//!   the edge's JSON errors.
//! - `handlers`: routing and the request handlers (HTTP framing checks, auth, rate
//!   limit, content type, bounded body read, decode, produce, respond, keep-alive).
//! - `producer`: the idempotent Kafka producer (acks=all, Java-compatible murmur2
//!   partitioning), all-or-nothing admission into its bounded queue, the readiness
//!   probe, and an in-memory stand-in for Kafka.
//! - [`offline`]: the edge without network or broker (raw bytes in, raw answers out)
//!   and the checks the fuzz targets assert; used by `fuzz/` and the corpus tests.
//! - `responses`: the JSON bodies of `202` answers and of errors.
//! - `auth`: bearer tokens, compared in constant time and never logged.
//! - `rate_limit`: per-client token buckets with bounded memory.
//! - `request_id`: `x-request-id` accepted when sane, generated otherwise.
//! - `metrics`: every `tally_ingest_*` metric, registered into the caller's registry.
//!
//! # HTTP API
//!
//! | Route | Body | Success |
//! |---|---|---|
//! | `POST /increment` | `application/json`: `{"key": "<uuid>", "value": <1..=2^63-1>}` | `202` |
//! | `POST /increments` | `application/json` (a JSON array of increments) or `application/x-ndjson` (one per line) | `202` |
//! | `GET /healthz` | | `200 {"status":"ok"}` while the process serves |
//! | `GET /readyz` | | `200` when broker metadata for the topic is reachable, else `503` |
//! | `GET /metrics` | | Prometheus text format |
//! | `GET /v1/windows/...` | | delegated to the [`ReadHandler`] given to [`run_with`], `404` without one |
//!
//! A `202` is a promise that every record of the request is durable: it is sent only
//! after Kafka acknowledged each record (`acks=all`, idempotent producer). Its body
//! names where each record went, in request order:
//!
//! ```json
//! {"accepted":2,"records":[{"partition":3,"offset":41},{"partition":0,"offset":7}],"request_id":"9b2e…"}
//! ```
//!
//! Every error is JSON with a stable `error` code (see [`IngestError::code`]):
//!
//! ```json
//! {"error":"invalid_value","message":"value must be at least 1, found 0","request_id":"9b2e…"}
//! ```
//!
//! A batch (`POST /increments`) is validated as a whole: if any item breaks the
//! contract nothing is produced and the `422` names the invalid items (the first 100;
//! `invalid_count` says how many there were):
//!
//! ```json
//! {"error":"invalid_items","message":"2 of 3 items are invalid; nothing was produced",
//!  "request_id":"…","invalid_count":2,
//!  "items":[{"index":0,"error":"invalid_key","message":"…"},{"index":2,"error":"invalid_value","message":"…"}]}
//! ```
//!
//! | Status | `error` | When |
//! |---|---|---|
//! | 400 | `invalid_json`, `body_read_failed` | body is not well-formed JSON / the client broke off the body |
//! | 400 | `malformed_request`, `invalid_host`, `unsupported_transfer_encoding` | HTTP layer, any path, connection closed: request line or header does not parse / HTTP/1.1 without `Host` or two `Host`s / a transfer coding other than `chunked` |
//! | 401 | `unauthorized` | auth is on and the bearer token is missing or unknown |
//! | 404 | `not_found` | unknown route |
//! | 405 | `method_not_allowed` | known route, wrong method (`Allow` names the right one) |
//! | 408 | `request_timeout` | the request (body included) did not complete within `--request-timeout` |
//! | 413 | `body_too_large`, `too_many_items` | body over `--max-body-bytes`, batch over `--max-batch-items` |
//! | 414 | `uri_too_long` | HTTP layer: request target over 64 KiB (connection closed) |
//! | 415 | `unsupported_media_type` | wrong or missing `Content-Type` |
//! | 422 | a rule code from `RejectReason` (`invalid_key`, `invalid_value`, `unknown_field`, …), `invalid_items` or `empty_batch` | the contract is broken / a batch without items |
//! | 431 | `headers_too_large` | HTTP layer: over 100 headers or a head over 80 KiB (connection closed) |
//! | 429 | `rate_limited` | the client's token bucket is empty (`Retry-After`) |
//! | 503 | `broker_unavailable`, `queue_full` | not acknowledged within `--delivery-timeout`, or the producer queue is full (`Retry-After`) |
//!
//! A `503 broker_unavailable` means "not known to be durable": some or all records of
//! the request may still reach Kafka, so a retry can duplicate them (at-least-once at
//! the edge). A `503 queue_full` means nothing of the request was produced: room for
//! all its records is reserved before the first is enqueued.
//!
//! HTTP/1.1 only (an HTTP/2 prior-knowledge preface gets the connection closed).
//! An answer sent before the body was read drains the rest of the body (at most
//! 64 KiB, 1 s) to keep the connection; otherwise it says `Connection: close`.
//! Every response carries `x-request-id`; the same id is the Kafka record header
//! `x-request-id` and a field of the request's tracing span.
//!
//! Kafka record: key = canonical (lower-case) UUID text, value =
//! [`Increment::to_json`](tally_schemas::Increment::to_json), timestamp = acceptance
//! time in ms (CreateTime), header `x-request-id`. Partitioner `murmur2_random`, the
//! same placement as Java clients.
//!
//! Auth (when any token is configured) applies to the increment routes and to
//! `/v1/windows/...`; `/healthz`, `/readyz` and `/metrics` stay open for probes and
//! scrapers. The rate-limit identity is the bearer token when auth is on, else the
//! peer IP address.

pub mod config;
pub mod error;
pub mod offline;

mod auth;
mod connection;
mod handlers;
mod metrics;
mod producer;
mod rate_limit;
mod request_id;
mod responses;
mod server;

pub use config::{AuthToken, IngestConfig};
pub use error::IngestError;
pub use server::{run, run_with, ReadHandler};
