//! Every way the request path can refuse a request, and the one place that turns a refusal
//! into a response: status, RFC 6750 `WWW-Authenticate` challenge and a small JSON body.
//! Bodies and header values are static, so a refusal allocates only the response itself.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

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
}

const REALM: &str = "Bearer realm=\"keygate\"";

impl Rejection {
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
            Rejection::UpstreamUnavailable => "upstream_unavailable",
            Rejection::UpstreamTimeout => "upstream_timeout",
            Rejection::InvalidPath => "invalid_path",
            Rejection::NoRoute => "no_route",
            Rejection::InvalidBody => "invalid_body",
            Rejection::InvalidHeader => "invalid_header",
            Rejection::InvalidHost => "invalid_host",
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
            Rejection::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Rejection::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Rejection::InvalidPath => StatusCode::BAD_REQUEST,
            Rejection::NoRoute => StatusCode::NOT_FOUND,
            Rejection::InvalidBody | Rejection::InvalidHeader | Rejection::InvalidHost => {
                StatusCode::BAD_REQUEST
            }
        }
    }

    const fn body(self) -> &'static str {
        match self {
            Rejection::MissingCredentials => {
                r#"{"error":"missing_credentials","message":"send the API key as Authorization: Bearer <key>"}"#
            }
            Rejection::InvalidRequest => {
                r#"{"error":"invalid_request","message":"send exactly one Authorization: Bearer credential"}"#
            }
            Rejection::MalformedKey => {
                r#"{"error":"invalid_key","message":"the API key is malformed"}"#
            }
            Rejection::UnknownKey => {
                r#"{"error":"invalid_key","message":"the API key is not valid"}"#
            }
            Rejection::KeyExpired => {
                r#"{"error":"key_expired","message":"the API key has expired"}"#
            }
            Rejection::KeyRevoked => {
                r#"{"error":"key_revoked","message":"the API key has been revoked"}"#
            }
            Rejection::InsufficientScope => {
                r#"{"error":"insufficient_scope","message":"the API key may not perform this request"}"#
            }
            Rejection::StoreUnavailable => {
                r#"{"error":"store_unavailable","message":"the key store is unavailable; retry later"}"#
            }
            Rejection::UpstreamUnavailable => {
                r#"{"error":"upstream_unavailable","message":"the upstream service is unavailable"}"#
            }
            Rejection::UpstreamTimeout => {
                r#"{"error":"upstream_timeout","message":"the upstream service did not answer in time"}"#
            }
            Rejection::InvalidPath => {
                r#"{"error":"invalid_path","message":"the request path is malformed or ambiguous"}"#
            }
            Rejection::NoRoute => {
                r#"{"error":"no_route","message":"no route matches this request"}"#
            }
            Rejection::InvalidBody => {
                r#"{"error":"invalid_body","message":"the request body was cut short or malformed"}"#
            }
            Rejection::InvalidHeader => {
                r#"{"error":"invalid_header","message":"header names with '_' are refused: spell them with '-'"}"#
            }
            Rejection::InvalidHost => {
                r#"{"error":"invalid_host","message":"send exactly one valid Host header, naming the host of the request target"}"#
            }
        }
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
        let mut resp = Response::new(Full::new(Bytes::from_static(self.body().as_bytes())));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(c) = self.challenge() {
            h.insert(WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        if self == Rejection::StoreUnavailable {
            h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Rejection; 15] = [
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
    ];

    #[test]
    fn every_body_is_json_with_its_code() {
        for r in ALL {
            let v: serde_json::Value = serde_json::from_str(r.body()).unwrap();
            assert_eq!(v["error"], r.code(), "{r:?}");
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
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
        }
        let resp = Rejection::StoreUnavailable.into_response();
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
    }
}
