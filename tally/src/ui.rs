//! The playground's live page, `GET /ui`: a key's window sums over time, their total,
//! which windows are final, and pipeline health, refreshed every second. Static files
//! embedded in the binary (no build step, no CDN); the page reads its data from
//! `GET /v1/windows/{key}` and `/metrics` on the same address. Served by `tally dev`
//! and by `tally ingest --store` (through the edge's read-side hook).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

/// The file for `path` (`/ui`, `/ui/`, `/ui/app.js`, `/ui/style.css`), or 404.
pub fn answer(path: &str) -> Response<Full<Bytes>> {
    let (body, content_type) = match path {
        "/ui" | "/ui/" | "/ui/index.html" => (INDEX_HTML, "text/html; charset=utf-8"),
        "/ui/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "/ui/style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        _ => {
            let mut response = Response::new(Full::new(Bytes::from_static(
                br#"{"error":"not_found","message":"no such file under /ui"}"#,
            )));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return response;
        }
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The files change with the binary; a stale page against a newer API is confusing.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Everything the page loads comes from this origin.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_embedded_files_and_nothing_else() {
        for (path, kind) in [
            ("/ui", "text/html"),
            ("/ui/", "text/html"),
            ("/ui/app.js", "text/javascript"),
            ("/ui/style.css", "text/css"),
        ] {
            let response = answer(path);
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let content_type = response.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap_or("");
            assert!(content_type.starts_with(kind), "{path}: {content_type}");
        }
        for path in ["/ui/../Cargo.toml", "/ui/app.js.map", "/ui/x"] {
            assert_eq!(answer(path).status(), StatusCode::NOT_FOUND, "{path}");
        }
        // The page loads only what the binary serves: no CDN, no other origin.
        for file in [INDEX_HTML, APP_JS, STYLE_CSS] {
            let without_svg_namespace = file.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !without_svg_namespace.contains("http://")
                    && !without_svg_namespace.contains("https://"),
                "an embedded file loads something from elsewhere"
            );
        }
        assert!(INDEX_HTML.contains("/ui/app.js") && INDEX_HTML.contains("id=\"total\""));
    }
}
