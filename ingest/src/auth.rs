//! Bearer-token authentication.
//!
//! Tokens are compared in constant time: the presented token and every configured
//! token are reduced to 64-bit SipHash digests under a random per-process key, and the
//! digests (fixed length, so no length leak) are compared with `subtle` against every
//! configured token without stopping early. A digest match is then confirmed by a
//! constant-time comparison of the bytes themselves. An attacker who cannot predict the
//! key learns nothing from timing. Tokens are never logged or used as labels; the rate
//! limiter identifies a client by the index of its token.

use std::hash::{BuildHasher, RandomState};

use http::header::AUTHORIZATION;
use http::HeaderMap;
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::config::AuthToken;

/// The accepted tokens; empty means auth is off.
pub(crate) struct TokenAuthenticator {
    hash_key: RandomState,
    tokens: Vec<AuthToken>,
    digests: Vec<u64>,
}

/// Outcome of checking a request's `Authorization` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthOutcome {
    /// Auth is off: everybody is let in.
    Open,
    /// The token at this index of the configured list was presented.
    Token(usize),
    /// Missing, malformed or unknown token.
    Denied,
}

impl TokenAuthenticator {
    pub(crate) fn new(tokens: Vec<AuthToken>) -> Self {
        let hash_key = RandomState::new();
        let digests = tokens
            .iter()
            .map(|token| hash_key.hash_one(token.as_bytes()))
            .collect();
        TokenAuthenticator {
            hash_key,
            tokens,
            digests,
        }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Checks `Authorization: Bearer <token>`.
    pub(crate) fn check(&self, headers: &HeaderMap) -> AuthOutcome {
        if !self.is_enabled() {
            return AuthOutcome::Open;
        }
        let Some(presented) = headers
            .get(AUTHORIZATION)
            .and_then(|value| bearer_token(value.as_bytes()))
        else {
            return AuthOutcome::Denied;
        };
        let presented_digest = self.hash_key.hash_one(presented);
        // Scan every token without an early exit; remember the matching index.
        let mut found = subtle::Choice::from(0);
        let mut found_index = 0u64;
        for (index, digest) in self.digests.iter().enumerate() {
            let matches = digest.ct_eq(&presented_digest);
            found_index = u64::conditional_select(&found_index, &(index as u64), matches);
            found |= matches;
        }
        if !bool::from(found) {
            return AuthOutcome::Denied;
        }
        let index = usize::try_from(found_index).unwrap_or(usize::MAX);
        match self.tokens.get(index) {
            Some(token) if bool::from(token.as_bytes().ct_eq(presented)) => {
                AuthOutcome::Token(index)
            }
            _ => AuthOutcome::Denied,
        }
    }
}

/// The token of a `Bearer` credential (scheme case-insensitive), if well-formed.
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if header.len() <= SCHEME.len() || !header[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let token = header[SCHEME.len()..].trim_ascii();
    if token.is_empty() {
        None
    } else {
        Some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers_with(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(authorization) {
            headers.insert(AUTHORIZATION, value);
        }
        headers
    }

    #[test]
    fn open_when_no_tokens() {
        let auth = TokenAuthenticator::new(Vec::new());
        assert_eq!(auth.check(&HeaderMap::new()), AuthOutcome::Open);
    }

    #[test]
    fn accepts_only_configured_tokens() {
        let auth = TokenAuthenticator::new(vec![AuthToken::new("alpha"), AuthToken::new("beta")]);
        assert_eq!(
            auth.check(&headers_with("Bearer beta")),
            AuthOutcome::Token(1)
        );
        assert_eq!(
            auth.check(&headers_with("bearer alpha")),
            AuthOutcome::Token(0)
        );
        assert_eq!(
            auth.check(&headers_with("Bearer gamma")),
            AuthOutcome::Denied
        );
        assert_eq!(
            auth.check(&headers_with("Bearer alph")),
            AuthOutcome::Denied
        );
        assert_eq!(
            auth.check(&headers_with("Bearer alphaa")),
            AuthOutcome::Denied
        );
        assert_eq!(
            auth.check(&headers_with("Basic alpha")),
            AuthOutcome::Denied
        );
        assert_eq!(auth.check(&headers_with("Bearer ")), AuthOutcome::Denied);
        assert_eq!(auth.check(&HeaderMap::new()), AuthOutcome::Denied);
    }
}
