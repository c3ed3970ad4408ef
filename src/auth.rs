//! The auth decision: take the bearer credential from the request head, parse it as a key,
//! and ask the verifier about it. A plain function of the headers, so it can be read and
//! tested without a server.

use http::header::AUTHORIZATION;
use http::HeaderMap;

use crate::identity::Identity;
use crate::key::{KeyDigest, Token};
use crate::rejection::Rejection;
use crate::verify::{Verifier, VerifyError};

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
) -> Result<Identity, Rejection> {
    verify(verifier, bearer_token(headers)?.digest(), now).await
}

/// The identity of the key with `digest` if the key is live at `now`; otherwise the refusal
/// that says why (unknown, expired, revoked), or `store_unavailable` when the store cannot
/// answer (fail closed).
pub async fn verify(
    verifier: &Verifier,
    digest: KeyDigest,
    now: u64,
) -> Result<Identity, Rejection> {
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

    proptest::proptest! {
        /// Any header bytes a client can send: a classified refusal or a real key, never a
        /// panic; and a key is accepted only if it is the one generated.
        #[test]
        fn any_authorization_bytes_are_classified(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            if let Ok(v) = HeaderValue::from_bytes(&raw) {
                let mut h = HeaderMap::new();
                h.insert(AUTHORIZATION, v);
                proptest::prop_assert!(bearer_token(&h).is_err());
            }
        }

        #[test]
        fn a_key_with_junk_around_it_is_refused(pre in "[ -~]{1,8}", post in "[!-~]{1,8}") {
            let k = generate(KeyKind::User);
            for value in [
                format!("Bearer {pre}{}", k.secret.expose()),
                format!("Bearer {}{post}", k.secret.expose()),
            ] {
                let mut h = HeaderMap::new();
                h.insert(AUTHORIZATION, HeaderValue::from_str(&value).unwrap());
                // Leading or trailing blanks are trimmed; anything else breaks the key.
                if let Ok(t) = bearer_token(&h) {
                    proptest::prop_assert_eq!(t.digest(), k.digest);
                    proptest::prop_assert!(pre.trim().is_empty());
                }
            }
        }
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
