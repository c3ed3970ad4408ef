//! Every way the request path can refuse a request, and the one place that turns a refusal
//! into a response: status, RFC 6750 `WWW-Authenticate` challenge and a small JSON body.
//!
//! It also holds the one helper that writes every JSON error body keygate answers, the
//! proxy's refusals, the management API's errors and the admin listener's own 404 and 405
//! alike: [`error_body`], `{"error":"<code>","message":"<human text>"}`, and the responses
//! around it ([`error_response`], [`method_not_allowed`]). It sits at the bottom of the module
//! graph so that both listeners use it without an import pointing up.
//!
//! A refusal's body is made by [`error_body`] once per process and kept, and its header values
//! are static, so a refusal allocates only the response itself.

use std::sync::LazyLock;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// The JSON body of every error answer: `{"error":"<code>","message":"<message>"}`, compact,
/// in that order, with both strings escaped. Neither may hold a secret: callers pass a stable
/// code and a message that repeats no client input it has not checked.
pub fn error_body(code: &str, message: &str) -> String {
    // The key order is fixed by the map serde_json builds (sorted, or insertion order with
    // `preserve_order`): "error" comes first either way.
    serde_json::json!({ "error": code, "message": message }).to_string()
}

/// An error answer: `status`, `Content-Type: application/json` and [`error_body`]; a `503`
/// also says `Retry-After: 1`.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_error(status, Bytes::from(error_body(code, message)))
}

/// The `405` answer for a path that takes only the `allowed` methods: `Allow` lists them, and
/// the message names the same ones (`use GET or POST`), so the two never disagree.
pub fn method_not_allowed(allowed: &[&str]) -> Response<Full<Bytes>> {
    let message = format!("use {}", allowed.join(" or "));
    let mut resp = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &message,
    );
    // Method names are tokens, always valid in a header value.
    if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
        resp.headers_mut().insert(ALLOW, v);
    }
    resp
}

fn json_error(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// Every refusal's body, in the order of [`Rejection::ALL`], made once by [`error_body`]. The
/// strings live as long as the process, so each answer borrows its body and copies nothing.
static BODIES: LazyLock<[&'static str; Rejection::ALL.len()]> = LazyLock::new(|| {
    Rejection::ALL.map(|r| &*Box::leak(error_body(r.code(), r.message()).into_boxed_str()))
});

/// A refused request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No `Authorization: Bearer` credential.
    MissingCredentials,
    /// More than one credential, or an unusable `Authorization` header.
    InvalidRequest,
    /// The token is not shaped like a keygate key.
    MalformedKey,
    /// The token is well formed but no such key exists.
    UnknownKey,
    /// The key is past its expiry.
    KeyExpired,
    /// The key was revoked.
    KeyRevoked,
    /// The key may not do this.
    InsufficientScope,
    /// The store could not answer (fail closed).
    StoreUnavailable,
    /// The upstream refused the connection or reset it.
    UpstreamUnavailable,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The path is malformed or ambiguous (an encoded `/`, `..` above the root, …).
    InvalidPath,
    /// No route matches the request's host, path and method.
    NoRoute,
    /// The client's request body ended before its declared end, or was malformed (a bad chunk
    /// size, a reset stream): the client's failure, not the upstream's.
    InvalidBody,
    /// A header name contains `_` and `server.headers_with_underscores` is `reject`.
    InvalidHeader,
    /// More than one `Host`, an invalid one, none in HTTP/1.1, or an HTTP/2 `Host` that
    /// differs from `:authority`.
    InvalidHost,
    /// The TLS handshake with an `https://` upstream failed (its certificate did not verify,
    /// it refused keygate's): answered like [`Rejection::UpstreamUnavailable`] (the client
    /// can do nothing about it), counted apart for the operator, who can.
    UpstreamTls,
    /// The decision endpoint could not tell which request it is asked about: the configured
    /// caller's headers naming it are missing or repeated, or another gateway's are present
    /// (see `proxy/original.rs`).
    InvalidOriginalRequest,
    /// A rate limit of the key (its role's, or its route's) admits no request now
    /// (`limit/`); the response also says when to retry, and the limit's state.
    RateLimited,
}

const REALM: &str = "Bearer realm=\"keygate\"";

impl Rejection {
    /// Every refusal, in declaration order (its index is its discriminant).
    pub(crate) const ALL: [Rejection; 18] = [
        Rejection::MissingCredentials,
        Rejection::InvalidRequest,
        Rejection::MalformedKey,
        Rejection::UnknownKey,
        Rejection::KeyExpired,
        Rejection::KeyRevoked,
        Rejection::InsufficientScope,
        Rejection::StoreUnavailable,
        Rejection::UpstreamUnavailable,
        Rejection::UpstreamTimeout,
        Rejection::InvalidPath,
        Rejection::NoRoute,
        Rejection::InvalidBody,
        Rejection::InvalidHeader,
        Rejection::InvalidHost,
        Rejection::UpstreamTls,
        Rejection::InvalidOriginalRequest,
        Rejection::RateLimited,
    ];

    /// The stable error code of the JSON body and of the `outcome` metric label.
    pub const fn code(self) -> &'static str {
        match self {
            Rejection::MissingCredentials => "missing_credentials",
            Rejection::InvalidRequest => "invalid_request",
            Rejection::MalformedKey | Rejection::UnknownKey => "invalid_key",
            Rejection::KeyExpired => "key_expired",
            Rejection::KeyRevoked => "key_revoked",
            Rejection::InsufficientScope => "insufficient_scope",
            Rejection::StoreUnavailable => "store_unavailable",
            Rejection::UpstreamUnavailable | Rejection::UpstreamTls => "upstream_unavailable",
            Rejection::UpstreamTimeout => "upstream_timeout",
            Rejection::InvalidPath => "invalid_path",
            Rejection::NoRoute => "no_route",
            Rejection::InvalidBody => "invalid_body",
            Rejection::InvalidHeader => "invalid_header",
            Rejection::InvalidHost => "invalid_host",
            Rejection::InvalidOriginalRequest => "invalid_original_request",
            Rejection::RateLimited => "rate_limited",
        }
    }

    /// The HTTP status.
    pub const fn status(self) -> StatusCode {
        match self {
            Rejection::MissingCredentials
            | Rejection::MalformedKey
            | Rejection::UnknownKey
            | Rejection::KeyExpired
            | Rejection::KeyRevoked => StatusCode::UNAUTHORIZED,
            Rejection::InvalidRequest => StatusCode::BAD_REQUEST,
            Rejection::InsufficientScope => StatusCode::FORBIDDEN,
            Rejection::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::UpstreamUnavailable | Rejection::UpstreamTls => StatusCode::BAD_GATEWAY,
            Rejection::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Rejection::InvalidPath => StatusCode::BAD_REQUEST,
            Rejection::NoRoute => StatusCode::NOT_FOUND,
            Rejection::InvalidBody
            | Rejection::InvalidHeader
            | Rejection::InvalidHost
            | Rejection::InvalidOriginalRequest => StatusCode::BAD_REQUEST,
            Rejection::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The human text of the JSON body.
    const fn message(self) -> &'static str {
        match self {
            Rejection::MissingCredentials => "send the API key as Authorization: Bearer <key>",
            Rejection::InvalidRequest => "send exactly one Authorization: Bearer credential",
            Rejection::MalformedKey => "the API key is malformed",
            Rejection::UnknownKey => "the API key is not valid",
            Rejection::KeyExpired => "the API key has expired",
            Rejection::KeyRevoked => "the API key has been revoked",
            Rejection::InsufficientScope => "the API key may not perform this request",
            Rejection::StoreUnavailable => "the key store is unavailable; retry later",
            Rejection::UpstreamUnavailable | Rejection::UpstreamTls => {
                "the upstream service is unavailable"
            }
            Rejection::UpstreamTimeout => "the upstream service did not answer in time",
            Rejection::InvalidPath => "the request path is malformed or ambiguous",
            Rejection::NoRoute => "no route matches this request",
            Rejection::InvalidBody => "the request body was cut short or malformed",
            Rejection::InvalidHeader => "header names with '_' are refused: spell them with '-'",
            Rejection::InvalidHost => {
                "send exactly one valid Host header, naming the host of the request target"
            }
            Rejection::InvalidOriginalRequest => {
                "the authorizer cannot tell which request to check: the gateway's headers naming it are missing or repeated, or another gateway's are present"
            }
            Rejection::RateLimited => {
                "the API key's rate limit is used up; retry after the seconds in Retry-After"
            }
        }
    }

    /// The JSON body, built once by [`error_body`] (so a refusal allocates only its
    /// response).
    fn body(self) -> &'static str {
        BODIES[self as usize]
    }

    /// The RFC 6750 challenge, for the refusals that have one.
    const fn challenge(self) -> Option<&'static str> {
        match self {
            Rejection::MissingCredentials => Some(REALM),
            Rejection::InvalidRequest => Some(
                "Bearer realm=\"keygate\", error=\"invalid_request\", error_description=\"exactly one bearer credential is required\"",
            ),
            Rejection::MalformedKey | Rejection::UnknownKey => Some(
                "Bearer realm=\"keygate\", error=\"invalid_token\", error_description=\"the API key is not valid\"",
            ),
            Rejection::KeyExpired => Some(
                "Bearer realm=\"keygate\", error=\"invalid_token\", error_description=\"the API key has expired\"",
            ),
            Rejection::KeyRevoked => Some(
                "Bearer realm=\"keygate\", error=\"invalid_token\", error_description=\"the API key has been revoked\"",
            ),
            Rejection::InsufficientScope => Some(
                "Bearer realm=\"keygate\", error=\"insufficient_scope\", error_description=\"the API key may not perform this request\"",
            ),
            _ => None,
        }
    }

    /// The response for this refusal.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = Bytes::from_static(self.body().as_bytes());
        let mut resp = json_error(self.status(), body);
        if let Some(c) = self.challenge() {
            resp.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Rejection; 18] = Rejection::ALL;

    #[test]
    fn all_is_in_declaration_order() {
        for (i, r) in ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }

    #[test]
    fn every_body_is_json_with_its_code() {
        for r in ALL {
            let v: serde_json::Value = serde_json::from_str(r.body()).unwrap();
            assert_eq!(v["error"], r.code(), "{r:?}");
            assert_eq!(v["message"], r.message(), "{r:?}");
            assert!(!r.message().is_empty());
        }
    }

    /// The bodies the proxy answered before they were made by [`error_body`], byte for byte.
    #[test]
    fn refusal_bodies_are_unchanged_on_the_wire() {
        let before = [
            r#"{"error":"missing_credentials","message":"send the API key as Authorization: Bearer <key>"}"#,
            r#"{"error":"invalid_request","message":"send exactly one Authorization: Bearer credential"}"#,
            r#"{"error":"invalid_key","message":"the API key is malformed"}"#,
            r#"{"error":"invalid_key","message":"the API key is not valid"}"#,
            r#"{"error":"key_expired","message":"the API key has expired"}"#,
            r#"{"error":"key_revoked","message":"the API key has been revoked"}"#,
            r#"{"error":"insufficient_scope","message":"the API key may not perform this request"}"#,
            r#"{"error":"store_unavailable","message":"the key store is unavailable; retry later"}"#,
            r#"{"error":"upstream_unavailable","message":"the upstream service is unavailable"}"#,
            r#"{"error":"upstream_timeout","message":"the upstream service did not answer in time"}"#,
            r#"{"error":"invalid_path","message":"the request path is malformed or ambiguous"}"#,
            r#"{"error":"no_route","message":"no route matches this request"}"#,
            r#"{"error":"invalid_body","message":"the request body was cut short or malformed"}"#,
            r#"{"error":"invalid_header","message":"header names with '_' are refused: spell them with '-'"}"#,
            r#"{"error":"invalid_host","message":"send exactly one valid Host header, naming the host of the request target"}"#,
        ];
        for (r, body) in ALL.iter().zip(before) {
            assert_eq!(r.body(), body, "{r:?}");
        }
    }

    #[test]
    fn a_refusal_borrows_its_body() {
        let a = Rejection::KeyRevoked.body();
        let b = Rejection::KeyRevoked.body();
        assert!(std::ptr::eq(a, b), "made once, not per answer");
    }

    #[test]
    fn error_bodies_escape_any_message() {
        let message = "a \"quoted\" \\ line\nand a tab\t\u{1}";
        let body = error_body("invalid_request", message);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "invalid_request");
        assert_eq!(v["message"], message);
        assert!(
            body.starts_with(r#"{"error":"invalid_request","message":"#),
            "{body}"
        );
        assert_eq!(v.as_object().unwrap().len(), 2);
    }

    #[test]
    fn error_responses_are_json_and_503_says_when_to_retry() {
        let resp = error_response(StatusCode::NOT_FOUND, "not_found", "none");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        assert!(resp.headers().get(RETRY_AFTER).is_none());
        let resp = error_response(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "x");
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
    }

    #[test]
    fn a_405_names_the_same_methods_in_allow_and_message() {
        let resp = method_not_allowed(&["GET", "POST"]);
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[ALLOW], "GET, POST");
        let body = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(
            resp.into_body(),
        ))
        .unwrap()
        .unwrap()
        .to_bytes();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"error":"method_not_allowed","message":"use GET or POST"}"#
        );
    }

    #[test]
    fn every_code_is_a_metric_outcome() {
        for r in ALL {
            assert!(crate::metrics::OUTCOMES.contains(&r.code()), "{r:?}");
        }
    }

    #[test]
    fn unauthorized_answers_carry_a_bearer_challenge() {
        for r in ALL {
            let resp = r.into_response();
            let challenge = resp.headers().get(WWW_AUTHENTICATE);
            if resp.status() == StatusCode::UNAUTHORIZED {
                assert!(challenge.unwrap().to_str().unwrap().starts_with("Bearer "));
            }
            assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        }
        let resp = Rejection::StoreUnavailable.into_response();
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
    }
}
