//! The socket beneath hyper: turns hyper's own bare answers into the edge's JSON errors.
//!
//! When hyper cannot parse a request head it answers by itself, before any handler
//! runs, with an empty `400`, `414` or `431` (and closes the connection); hyper 1.x
//! has no hook to shape that answer. [`HttpLayerErrors`] wraps the connection's
//! socket and recognises such an answer on its way out: a head with one of those
//! statuses, `content-length: 0` and no `x-request-id` header, a header that every
//! answer of the edge's handler carries (`handlers::handle` adds it to each one). It
//! writes in its place the JSON error with a stable code and a fresh request id (the
//! client's id could not be read: its headers did not parse), `connection: close`, and
//! counts the refusal like every other one. Everything else passes through untouched.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::IngestError;
use crate::handlers::Route;
use crate::metrics::IngestMetrics;
use crate::request_id::RequestId;
use crate::responses;

/// A connection's socket with hyper's bare error answers replaced by JSON ones.
pub(crate) struct HttpLayerErrors<T> {
    inner: T,
    metrics: IngestMetrics,
    /// When the first bytes since the last answer arrived: the start of the request
    /// being read, for the latency of a replaced answer.
    request_started: Option<Instant>,
    /// The replacement answer and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl<T> HttpLayerErrors<T> {
    pub(crate) fn new(inner: T, metrics: IngestMetrics) -> Self {
        HttpLayerErrors {
            inner,
            metrics,
            request_started: None,
            replacement: None,
        }
    }
}

impl<T: AsyncWrite + Unpin> HttpLayerErrors<T> {
    /// Writes what is left of the replacement answer; ready when nothing is left.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.replacement {
            if *written == bytes.len() {
                break;
            }
            let count = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if count == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += count;
        }
        Poll::Ready(Ok(()))
    }

    /// If `bytes` begin with one of hyper's bare error heads, queues the edge's answer
    /// instead and returns how many bytes of `bytes` it stands for.
    fn try_replace(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Option<io::Result<usize>> {
        if self.replacement.is_some() {
            return None;
        }
        let bare = BareErrorHead::parse(bytes)?;
        let error = match bare.status {
            StatusCode::URI_TOO_LONG => IngestError::UriTooLong,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => IngestError::HeadersTooLarge,
            _ => IngestError::MalformedRequest,
        };
        let request_id = RequestId::generate();
        let elapsed = self
            .request_started
            .map_or(0.0, |started| started.elapsed().as_secs_f64());
        self.metrics.observe_rejection(error.code());
        self.metrics
            .observe_request(Route::Unknown, error.status(), elapsed);
        tracing::debug!(
            code = error.code(),
            request_id = request_id.as_str(),
            "request refused by the HTTP parser"
        );
        let answer =
            responses::error_http_bytes(bare.version, &error, &request_id, bare.date.as_deref());
        self.replacement = Some((answer, 0));
        match self.poll_replacement(cx) {
            Poll::Ready(Err(error)) => Some(Err(error)),
            // The rest goes out on the next write, flush or shutdown.
            Poll::Ready(Ok(())) | Poll::Pending => Some(Ok(bare.length)),
        }
    }
}

/// One of hyper's own error answers, as it starts a write.
struct BareErrorHead {
    /// `HTTP/1.1`, or `HTTP/1.0` on a connection whose earlier requests were 1.0.
    version: &'static str,
    status: StatusCode,
    /// Bytes of the head, `\r\n\r\n` included.
    length: usize,
    date: Option<Vec<u8>>,
}

impl BareErrorHead {
    fn parse(bytes: &[u8]) -> Option<BareErrorHead> {
        // Cheap test first: this runs on every write of the connection.
        let version = match bytes.get(..9)? {
            b"HTTP/1.1 " => "HTTP/1.1",
            b"HTTP/1.0 " => "HTTP/1.0",
            _ => return None,
        };
        let status = match bytes.get(9..13)? {
            b"400 " => StatusCode::BAD_REQUEST,
            b"414 " => StatusCode::URI_TOO_LONG,
            b"431 " => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            _ => return None,
        };
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut head = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(length) = head.parse(bytes).ok()? else {
            return None;
        };
        let mut empty_body = false;
        let mut date = None;
        for header in head.headers.iter() {
            if header
                .name
                .eq_ignore_ascii_case(tally_schemas::names::REQUEST_ID_HEADER)
            {
                // An answer of the edge's handler.
                return None;
            }
            if header.name.eq_ignore_ascii_case("content-length") {
                empty_body = header.value == b"0";
            }
            if header.name.eq_ignore_ascii_case("date") {
                date = Some(header.value.to_vec());
            }
        }
        empty_body.then_some(BareErrorHead {
            version,
            status,
            length,
            date,
        })
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HttpLayerErrors<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.request_started.is_none() && buf.filled().len() > before {
            this.request_started = Some(Instant::now());
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HttpLayerErrors<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        if let Some(result) = this.try_replace(cx, buf) {
            return Poll::Ready(result);
        }
        this.request_started = None;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        // hyper queues a head as a buffer of its own: its bare answer is the first one.
        if let Some(first) = bufs.iter().find(|buf| !buf.is_empty()) {
            if let Some(result) = this.try_replace(cx, first) {
                return Poll::Ready(result);
            }
        }
        this.request_started = None;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn metrics() -> IngestMetrics {
        IngestMetrics::register(&prometheus::Registry::new()).unwrap()
    }

    #[test]
    fn recognises_only_bare_error_heads() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 10:06:49 GMT\r\n\r\n";
        let head = BareErrorHead::parse(bare).unwrap();
        assert_eq!(head.version, "HTTP/1.1");
        assert_eq!(head.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(head.length, bare.len());
        assert_eq!(
            head.date.as_deref(),
            Some(&b"Tue, 01 Dec 2026 10:06:49 GMT"[..])
        );
        // After an HTTP/1.0 keep-alive request hyper answers in HTTP/1.0, without
        // `connection: close` (found by the http_request fuzz target).
        let bare_1_0 = b"HTTP/1.0 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        let head = BareErrorHead::parse(bare_1_0).unwrap();
        assert_eq!(
            (head.version, head.status),
            ("HTTP/1.0", StatusCode::BAD_REQUEST)
        );
        for not_bare in [
            // The handler's answers carry the request id.
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nx-request-id: abc\r\ncontent-length: 0\r\n\r\n"[..],
            // A body follows.
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}",
            // Other statuses, incomplete heads, bodies.
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"{\"error\":\"x\"}",
            b"",
        ] {
            assert!(
                BareErrorHead::parse(not_bare).is_none(),
                "{:?}",
                String::from_utf8_lossy(not_bare)
            );
        }
    }

    #[tokio::test]
    async fn replaces_a_bare_answer_and_passes_the_rest_through() {
        let (near, mut far) = tokio::io::duplex(4096);
        let mut wrapped = HttpLayerErrors::new(near, metrics());
        let passed = b"HTTP/1.1 200 OK\r\nx-request-id: a\r\ncontent-length: 2\r\n\r\n{}";
        wrapped.write_all(passed).await.unwrap();
        let bare = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        let written = std::pin::pin!(&mut wrapped).poll_write(
            &mut Context::from_waker(futures::task::noop_waker_ref()),
            bare,
        );
        assert!(matches!(written, Poll::Ready(Ok(count)) if count == bare.len()));
        wrapped.shutdown().await.unwrap();
        drop(wrapped);
        let mut out = Vec::new();
        far.read_to_end(&mut out).await.unwrap();
        let out = String::from_utf8(out).unwrap();
        let (first, second) = out.split_at(passed.len());
        assert_eq!(first.as_bytes(), passed);
        assert!(
            second.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{second}"
        );
        assert!(second.contains("\r\nconnection: close\r\n"), "{second}");
        let body = second.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "malformed_request");
        assert!(second.contains(&format!(
            "x-request-id: {}\r\n",
            json["request_id"].as_str().unwrap()
        )));
    }
}
