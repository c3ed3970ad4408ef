//! The auth decision: take the bearer credential from the request head, parse it as a key,
//! and ask the verifier about it. A plain function of the headers, so it can be read and
//! tested without a server.

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::HeaderMap;

use crate::key::Token;
use crate::rejection::Rejection;
use crate::verify::{Identity, Verifier, VerifyError};

/// Longest `Authorization` value looked at; anything longer is not a keygate key.
const MAX_AUTHORIZATION_LEN: usize = 256;

/// Extracts the bearer token: exactly one `Authorization` header, scheme `Bearer` in any case,
/// and a token of the key format. Touches no cache and no store.
pub fn bearer_token(headers: &HeaderMap) -> Result<Token<'_>, Rejection> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(Rejection::MissingCredentials)?;
    if values.next().is_some() {
        return Err(Rejection::InvalidRequest);
    }
    let bytes = value.as_bytes();
    if bytes.len() > MAX_AUTHORIZATION_LEN {
        return Err(Rejection::MalformedKey);
    }
    let Some((scheme, rest)) = split_scheme(bytes) else {
        return Err(Rejection::MissingCredentials);
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        // Another scheme (e.g. Basic) carries no bearer credential.
        return Err(Rejection::MissingCredentials);
    }
    let token = trim_ows(rest);
    if token.is_empty() {
        return Err(Rejection::MissingCredentials);
    }
    Token::parse(token).map_err(|_| Rejection::MalformedKey)
}

fn split_scheme(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let sp = bytes.iter().position(|&b| b == b' ')?;
    Some((&bytes[..sp], &bytes[sp + 1..]))
}

fn trim_ows(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// Authenticates a request: its credential must be a live key.
pub async fn check(
    verifier: &Verifier,
    headers: &HeaderMap,
    now: u64,
) -> Result<Arc<Identity>, Rejection> {
    let digest = bearer_token(headers)?.digest();
    verifier.verify(digest, now).await.map_err(|e| match e {
        VerifyError::Unknown => Rejection::UnknownKey,
        VerifyError::Expired => Rejection::KeyExpired,
        VerifyError::Revoked => Rejection::KeyRevoked,
        VerifyError::Store(err) => {
            tracing::warn!(error = %err, "key store lookup failed");
            Rejection::StoreUnavailable
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{generate, KeyKind};
    use http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let k = generate(KeyKind::User);
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let h = headers(&[&format!("{scheme} {}", k.secret.expose())]);
            assert_eq!(bearer_token(&h).unwrap().digest(), k.digest);
        }
        let h = headers(&[&format!("Bearer   {}  ", k.secret.expose())]);
        assert_eq!(bearer_token(&h).unwrap().digest(), k.digest);
    }

    #[test]
    fn credentials_are_classified() {
        let k = generate(KeyKind::User);
        let good = format!("Bearer {}", k.secret.expose());
        let cases: &[(&[&str], Rejection)] = &[
            (&[], Rejection::MissingCredentials),
            (&["Basic dXNlcjpwYXNz"], Rejection::MissingCredentials),
            (&["Bearer"], Rejection::MissingCredentials),
            (&["Bearer "], Rejection::MissingCredentials),
            (&["Bearer kgu_short"], Rejection::MalformedKey),
            (&[&good, &good], Rejection::InvalidRequest),
        ];
        for (values, want) in cases {
            assert_eq!(
                bearer_token(&headers(values)).unwrap_err(),
                *want,
                "{values:?}"
            );
        }
        let huge = format!("Bearer {}", "a".repeat(10_000));
        assert_eq!(
            bearer_token(&headers(&[&huge])).unwrap_err(),
            Rejection::MalformedKey
        );
        let two = format!("Bearer {} {}", k.secret.expose(), k.secret.expose());
        assert_eq!(
            bearer_token(&headers(&[&two])).unwrap_err(),
            Rejection::MalformedKey
        );
    }
}
