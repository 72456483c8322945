//! The accept loop and the shutdown sequence.
//!
//! - Connection cap: a semaphore permit is taken before `accept`, so at the cap new
//!   connections wait in the kernel's listen backlog instead of costing memory here.
//! - Header-read timeout: hyper closes a connection that does not deliver complete
//!   request headers in time (slowloris); the request timeout covers the body.
//! - HTTP/1.1 only (hyper's http1 server): an HTTP/2 prior-knowledge preface gets the
//!   connection closed. Requests hyper cannot parse are answered with the edge's JSON
//!   errors by the socket wrapper of `connection.rs`.
//! - Shutdown: when the shutdown future resolves the listener is closed, every
//!   connection finishes its in-flight request and closes (hyper-util graceful
//!   shutdown), up to `--shutdown-timeout`; then the producer is flushed within
//!   what is left of that deadline. Connections still open at the deadline are cut.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::auth::TokenAuthenticator;
use crate::config::IngestConfig;
use crate::connection::HttpLayerErrors;
use crate::error::IngestError;
use crate::handlers::{self, AppState, WarningGate};
use crate::metrics::{GaugeGuard, IngestMetrics};
use crate::producer::RecordProducer;
use crate::rate_limit::RateLimiter;

/// The read side plugged in by the `tally` binary: answers `GET /v1/windows/...`
/// (after auth and rate limiting) and the live page's static files under `GET /ui`.
/// It receives the request head (method, URI, headers).
pub type ReadHandler =
    Arc<dyn Fn(http::Request<()>) -> BoxFuture<'static, http::Response<Full<Bytes>>> + Send + Sync>;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Serves the ingest edge on `listener` until `shutdown` resolves, then drains and
/// flushes. Metrics are registered into `registry`, which `/metrics` exports.
pub async fn run(
    config: IngestConfig,
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), IngestError> {
    run_with(config, listener, registry, shutdown, None).await
}

/// Like [`run`], with an optional handler for `GET /v1/windows/...` (404 when `None`).
pub async fn run_with(
    config: IngestConfig,
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
    read_handler: Option<ReadHandler>,
) -> Result<(), IngestError> {
    let state = app_state(&config, registry, read_handler, RecordProducer::new)?;
    tracing::info!(
        address = %listener.local_addr().map_or_else(|_| "unknown".to_owned(), |address| address.to_string()),
        brokers = %config.brokers,
        topic = %config.topic,
        auth = state.auth.is_enabled(),
        rate_limit = config.rate_limit,
        "ingest edge serving"
    );
    serve(state, listener, &config, shutdown).await
}

/// Validates `config` and builds what every request shares, with the producer that
/// `make_producer` creates (Kafka, or the in-memory stand-in of `offline`).
pub(crate) fn app_state(
    config: &IngestConfig,
    registry: Registry,
    read_handler: Option<ReadHandler>,
    make_producer: impl FnOnce(&IngestConfig, IngestMetrics) -> Result<RecordProducer, IngestError>,
) -> Result<Arc<AppState>, IngestError> {
    config.validate()?;
    let auth = TokenAuthenticator::new(config.load_auth_tokens()?);
    let rate_limiter = RateLimiter::new(
        config.rate_limit,
        config.rate_burst,
        config.rate_limit_max_clients,
    );
    let metrics = IngestMetrics::register(&registry)?;
    let producer = make_producer(config, metrics.clone())?;
    Ok(Arc::new(AppState {
        max_body_bytes: config.max_body_bytes,
        max_batch_items: config.max_batch_items,
        request_timeout: config.request_timeout,
        auth,
        rate_limiter,
        producer,
        metrics,
        registry,
        read_handler,
        infra_warnings: WarningGate::default(),
    }))
}

/// Largest request head (request line and headers); larger ones get
/// `431 headers_too_large`. It leaves room for hyper's own limit on the request target
/// (64 KiB, `414 uri_too_long`), and makes the limit exact: without it hyper applies
/// its ~400 KB read buffer, which a head arriving in one read can exceed unnoticed.
pub(crate) const MAX_REQUEST_HEAD_BYTES: usize = 80 * 1024;

/// The HTTP/1.1 settings of every connection.
pub(crate) fn http_builder(config: &IngestConfig) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_header_size(MAX_REQUEST_HEAD_BYTES)
        .keep_alive(true);
    http
}

/// One client connection: hyper's HTTP/1.1 server over the socket wrapper that gives
/// hyper's own error answers the edge's JSON shape.
pub(crate) fn connection<T, S>(
    http: &http1::Builder,
    socket: T,
    metrics: IngestMetrics,
    service: S,
) -> http1::Connection<TokioIo<HttpLayerErrors<T>>, S>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = Full<Bytes>>,
{
    http.serve_connection(TokioIo::new(HttpLayerErrors::new(socket, metrics)), service)
}

/// The edge's request handler as a hyper service, for one connection.
#[derive(Clone)]
pub(crate) struct EdgeService {
    pub(crate) state: Arc<AppState>,
    pub(crate) peer: SocketAddr,
}

impl Service<http::Request<Incoming>> for EdgeService {
    type Response = http::Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        let state = Arc::clone(&self.state);
        let peer = self.peer;
        Box::pin(async move { Ok(handlers::handle(state, peer, request).await) })
    }
}

async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    config: &IngestConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), IngestError> {
    let http = http_builder(config);
    let connection_permits = Arc::new(Semaphore::new(config.max_connections));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = Arc::clone(&connection_permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        // Reap finished connection tasks so the set holds only live ones (≤ the cap).
        while connections.try_join_next().is_some() {}

        // Answers are written in one go; do not let Nagle hold the last segment back.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "could not set TCP_NODELAY");
        }
        let service = EdgeService {
            state: Arc::clone(&state),
            peer,
        };
        let connection = graceful.watch(connection(&http, stream, state.metrics.clone(), service));
        let open_connection = GaugeGuard::increment(state.metrics.open_connections());
        connections.spawn(async move {
            // Both released when the connection ends, however it ends.
            let _permit = permit;
            let _open_connection = open_connection;
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }

    drop(listener);
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    tracing::info!(
        open_connections = connections.len(),
        "shutting down: no new connections, finishing in-flight requests"
    );
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open_connections = connections.len(),
            "shutdown deadline reached; closing the remaining connections"
        );
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}

    let flush_time = deadline.saturating_duration_since(tokio::time::Instant::now());
    match state.producer.flush(flush_time).await {
        Ok(()) => tracing::info!("producer flushed; ingest edge stopped"),
        // Only records whose requests got no 202 can be left: a 202 waits for the ack.
        Err(error) => tracing::warn!(
            %error,
            unflushed_records = state.producer.in_flight_records(),
            "producer flush did not complete before the shutdown deadline"
        ),
    }
    Ok(())
}
