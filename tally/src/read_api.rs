//! The read side (CQRS): window totals for one key, as JSON. Shared by
//! `GET /v1/windows/{key}?from=&to=` (served by the ingest edge in `tally dev`, and by
//! `tally ingest --store`) and `tally query`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::json;
use tally_sink::{WindowStore, WindowTotal};
use uuid::Uuid;

/// Range used when `from` is not given: the last hour.
const DEFAULT_LOOKBACK: Duration = Duration::from_secs(3600);

/// Milliseconds since the epoch as RFC 3339 with milliseconds (UTC).
pub fn rfc3339_ms(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        Err(_) => ms.to_string(),
    }
}

/// Parses a time given as RFC 3339 (`2026-11-21T10:00:00Z`) or as epoch milliseconds.
pub fn parse_time_ms(text: &str) -> Result<i64, String> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let time = humantime::parse_rfc3339_weak(text)
        .map_err(|err| format!("{text:?} is neither RFC 3339 nor epoch milliseconds: {err}"))?;
    let since = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("{text:?} is before 1970"))?;
    i64::try_from(since.as_millis()).map_err(|_| format!("{text:?} is too far in the future"))
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// One window as the API and `tally query` print it.
pub fn total_json(total: &WindowTotal) -> serde_json::Value {
    json!({
        "key": total.key.hyphenated().to_string(),
        "window_start": rfc3339_ms(total.window_start_ms),
        "window_end": rfc3339_ms(total.window_end_ms),
        "sum": total.sum,
        "count": total.count,
        "final": total.is_final,
    })
}

/// The range a request asks for, with defaults: `[now - 1h, now + window)`.
pub fn resolve_range(
    from: Option<&str>,
    to: Option<&str>,
    window_ms: i64,
) -> Result<(i64, i64), String> {
    let now = now_ms();
    let lookback = i64::try_from(DEFAULT_LOOKBACK.as_millis()).unwrap_or(i64::MAX);
    let from = match from {
        Some(text) => parse_time_ms(text)?,
        None => now.saturating_sub(lookback),
    };
    let to = match to {
        Some(text) => parse_time_ms(text)?,
        None => now.saturating_add(window_ms),
    };
    if to <= from {
        return Err("`to` must be after `from`".to_owned());
    }
    Ok((from, to))
}

/// Reads the totals of `key` for windows starting in `[from_ms, to_ms)`.
pub async fn read_totals(
    store: &dyn WindowStore,
    key: Uuid,
    from_ms: i64,
    to_ms: i64,
    window_ms: i64,
) -> Result<Vec<WindowTotal>, tally_sink::SinkError> {
    let rows = store.read_rows(key, from_ms, to_ms, window_ms).await?;
    Ok(WindowTotal::from_rows(&rows))
}

/// The handler the ingest edge routes `GET /v1/windows/...` to.
pub fn handler(store: Arc<dyn WindowStore>, window_ms: i64) -> tally_ingest::ReadHandler {
    Arc::new(move |request: http::Request<()>| {
        let store = Arc::clone(&store);
        Box::pin(async move { answer(&*store, &request, window_ms).await })
    })
}

async fn answer(
    store: &dyn WindowStore,
    request: &http::Request<()>,
    window_ms: i64,
) -> Response<Full<Bytes>> {
    if request.method() != http::Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        );
    }
    // The live page's static files come through the same hook (tally/src/ui.rs).
    if request.uri().path() == "/ui" || request.uri().path().starts_with("/ui/") {
        return crate::ui::answer(request.uri().path());
    }
    let Some(key_text) = request.uri().path().strip_prefix("/v1/windows/") else {
        return error(StatusCode::NOT_FOUND, "not_found", "use /v1/windows/{key}");
    };
    let Ok(key) = Uuid::try_parse(key_text) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_key",
            "the path must end in a UUID",
        );
    };
    let mut from = None;
    let mut to = None;
    for pair in request.uri().query().unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("from", value)) => from = Some(value.to_owned()),
            Some(("to", value)) => to = Some(value.to_owned()),
            _ => {}
        }
    }
    let (from_ms, to_ms) = match resolve_range(from.as_deref(), to.as_deref(), window_ms) {
        Ok(range) => range,
        Err(message) => return error(StatusCode::BAD_REQUEST, "invalid_range", &message),
    };
    match read_totals(store, key, from_ms, to_ms, window_ms).await {
        Ok(totals) => {
            let windows: Vec<_> = totals.iter().map(total_json).collect();
            let body = json!({
                "key": key.hyphenated().to_string(),
                "from": rfc3339_ms(from_ms),
                "to": rfc3339_ms(to_ms),
                "windows": windows,
            });
            respond(StatusCode::OK, body)
        }
        Err(err) if err.is_retryable() => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            &err.to_string(),
        ),
        Err(err) => error(StatusCode::BAD_REQUEST, "invalid_query", &err.to_string()),
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    respond(status, json!({ "error": code, "message": message }))
}

fn respond(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
