//! A minimal HTTP server for processes without the ingest edge: `GET /metrics`
//! (Prometheus text), `GET /healthz` (the process is up) and `GET /readyz` (the
//! aggregator is making progress it can stand behind; 503 with the reason if not).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Serves until `stop` flips to true. Returns once the listener is bound.
pub async fn serve(
    listen: &str,
    registry: Registry,
    health: Option<tally_aggregator::Health>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(listen).await?;
    tracing::info!(address = %listener.local_addr()?, "metrics serving");
    Ok(tokio::spawn(accept_loop(listener, registry, health, stop)))
}

/// At most this many metrics connections at once (scrapers are few).
const MAX_CONNECTIONS: usize = 64;

async fn accept_loop(
    listener: TcpListener,
    registry: Registry,
    health: Option<tally_aggregator::Health>,
    stop: watch::Receiver<bool>,
) {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let stopping = crate::shutdown::stopped(stop);
    tokio::pin!(stopping);
    loop {
        let accepted = tokio::select! {
            () = &mut stopping => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue; // Over the cap: drop the connection.
        };
        let registry = registry.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let service =
                service_fn(move |request| respond(request, registry.clone(), health.clone()));
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), connection).await;
            drop(permit);
        });
    }
}

async fn respond(
    request: Request<hyper::body::Incoming>,
    registry: Registry,
    health: Option<tally_aggregator::Health>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => {
            let mut buffer = Vec::new();
            match TextEncoder::new().encode(&registry.gather(), &mut buffer) {
                Ok(()) => (StatusCode::OK, "text/plain; version=0.0.4", buffer),
                Err(err) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    err.to_string().into_bytes(),
                ),
            }
        }
        "/healthz" => (
            StatusCode::OK,
            "application/json",
            b"{\"status\":\"ok\"}".to_vec(),
        ),
        "/readyz" => match health.map(|health| health.readiness()) {
            None | Some(Ok(_)) => (
                StatusCode::OK,
                "application/json",
                b"{\"status\":\"ready\"}".to_vec(),
            ),
            Some(Err(reason)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                serde_json::json!({"status": "not_ready", "reason": reason})
                    .to_string()
                    .into_bytes(),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "application/json",
            b"{\"error\":\"not_found\"}".to_vec(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    Ok(response)
}
