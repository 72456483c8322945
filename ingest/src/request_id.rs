//! The request id: taken from the client's `x-request-id` when sane, generated otherwise.
//! It is returned in the response, written as the Kafka record header and recorded in
//! the request's tracing span.

use http::{HeaderMap, HeaderValue};
use tally_schemas::names::REQUEST_ID_HEADER;
use uuid::Uuid;

/// Longest client-supplied id kept; longer ones are replaced by a generated id.
const MAX_REQUEST_ID_LEN: usize = 128;

/// A request id made only of visible ASCII, so it is valid both as a header and as text.
#[derive(Debug, Clone)]
pub(crate) struct RequestId(HeaderValue);

impl RequestId {
    /// The client's id if it is 1..=128 visible ASCII characters, else a new UUID v4.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Self {
        match headers.get(REQUEST_ID_HEADER) {
            // Reusing the received value avoids copying it.
            Some(value) if is_sane(value.as_bytes()) => RequestId(value.clone()),
            _ => Self::generate(),
        }
    }

    pub(crate) fn generate() -> Self {
        let mut buffer = Uuid::encode_buffer();
        let text = Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
        RequestId(
            HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        )
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only visible ASCII is ever stored, which is always valid UTF-8.
        std::str::from_utf8(self.0.as_bytes()).unwrap_or_default()
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    pub(crate) fn header_value(&self) -> HeaderValue {
        self.0.clone()
    }
}

fn is_sane(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.len() <= MAX_REQUEST_ID_LEN && bytes.iter().all(u8::is_ascii_graphic)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(REQUEST_ID_HEADER, value);
        }
        headers
    }

    #[test]
    fn keeps_sane_ids() {
        let id = RequestId::from_headers(&with_header(b"abc-123_XYZ"));
        assert_eq!(id.as_str(), "abc-123_XYZ");
        let longest = "a".repeat(128);
        assert_eq!(
            RequestId::from_headers(&with_header(longest.as_bytes())).as_str(),
            longest
        );
    }

    #[test]
    fn replaces_missing_long_or_odd_ids_with_a_uuid() {
        for bad in [
            with_header("a".repeat(129).as_bytes()),
            with_header(b"has space"),
            with_header(b"tab\there"),
            with_header(&[b'a', 0xC3, 0xA9]),
            HeaderMap::new(),
        ] {
            let id = RequestId::from_headers(&bad);
            let parsed = Uuid::parse_str(id.as_str());
            assert!(parsed.is_ok(), "{:?}", id.as_str());
            assert_eq!(parsed.map(|uuid| uuid.get_version_num()).unwrap_or(0), 4);
        }
    }
}
