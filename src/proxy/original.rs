//! The request a gateway asks the decision endpoint about: each gateway says which request it
//! is checking in its own way, and keygate reads it the way the configured caller says it.
//!
//! - `request` (Envoy's HTTP `ext_authz`, or any caller that sends the request itself): the
//!   check request's own method, path and `Host` are the original's.
//! - `nginx` (`auth_request`): the nginx configuration sets `X-Original-Method` and
//!   `X-Original-URI`, and `Host` (`proxy_set_header Host $host`).
//! - `forward_auth` (Traefik `ForwardAuth`, Caddy `forward_auth`): `X-Forwarded-Method`,
//!   `X-Forwarded-Uri` and `X-Forwarded-Host`, which those gateways always set themselves.
//! - `grpc` (Envoy's gRPC `ext_authz`, Istio's `envoyExtAuthzGrpc`): the original is described
//!   field by field in the `CheckRequest` (`ext_authz/`), and its head, once built from those
//!   fields, is read as `request` reads a check request.
//!
//! Invariant: the original request is read from headers the gateway sets itself, never from
//! headers a client could have sent through it. That is why the caller is configured rather
//! than guessed: a gateway passes the client's own headers to the authorizer, so a client of
//! Traefik could send `X-Original-URI` and a client of Envoy could send `X-Forwarded-Uri`, and
//! an authorizer that honoured whichever it found would decide on a request the client made
//! up. A check request that carries another convention's headers is refused
//! (`invalid_original_request`): a client is trying to name another request, or the caller is
//! configured wrong; either way nothing is allowed.

use http::header::HOST;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use crate::rejection::Rejection;

/// How the decision endpoint's caller names the original request (`server.authz_caller`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The check request is the original (Envoy HTTP `ext_authz`).
    Request,
    /// nginx `auth_request`: `X-Original-Method`, `X-Original-URI`, `Host`.
    Nginx,
    /// Traefik and Caddy forward auth: `X-Forwarded-Method`, `-Uri`, `-Host`.
    ForwardAuth,
    /// Envoy's gRPC `ext_authz` (and Istio's `envoyExtAuthzGrpc`): the
    /// `envoy.service.auth.v3.Authorization/Check` call, whose `CheckRequest` describes the
    /// original. The endpoint then answers that gRPC service and nothing else.
    Grpc,
}

impl Caller {
    /// The caller named by `server.authz_caller`.
    pub fn parse(v: &str) -> Option<Caller> {
        match v {
            "request" | "envoy" => Some(Caller::Request),
            "nginx" => Some(Caller::Nginx),
            "forward_auth" | "traefik" | "caddy" => Some(Caller::ForwardAuth),
            "grpc" | "envoy_grpc" | "istio" => Some(Caller::Grpc),
            _ => None,
        }
    }

    /// The setting's canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            Caller::Request => "request",
            Caller::Nginx => "nginx",
            Caller::ForwardAuth => "forward_auth",
            Caller::Grpc => "grpc",
        }
    }

    /// Whether the gateway forwards the very request it asked about, and so is told which of
    /// its headers to remove (Envoy, over HTTP or gRPC).
    pub fn sends_request(self) -> bool {
        matches!(self, Caller::Request | Caller::Grpc)
    }
}

static X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
static X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
static X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
static X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Longest original URI read from a header (the request head's own cap bounds it too).
const MAX_URI: usize = 8 * 1024;

/// Turns a check request's head into the head of the request it asks about, by `caller`'s
/// convention: the method, the URI (origin form: path and query) and `Host` are replaced, the
/// other headers (the credential among them) are the check request's.
pub fn original(caller: Caller, parts: &mut Parts) -> Result<(), Rejection> {
    let headers = &parts.headers;
    let (nginx, forward) = (
        headers.contains_key(&X_ORIGINAL_METHOD) || headers.contains_key(&X_ORIGINAL_URI),
        headers.contains_key(&X_FORWARDED_METHOD) || headers.contains_key(&X_FORWARDED_URI),
    );
    let (method, uri, host) = match caller {
        Caller::Request | Caller::Grpc if nginx || forward => {
            return Err(Rejection::InvalidOriginalRequest)
        }
        Caller::Request | Caller::Grpc => return Ok(()),
        Caller::Nginx if forward => return Err(Rejection::InvalidOriginalRequest),
        Caller::Nginx => (&X_ORIGINAL_METHOD, &X_ORIGINAL_URI, None),
        Caller::ForwardAuth if nginx => return Err(Rejection::InvalidOriginalRequest),
        Caller::ForwardAuth => (
            &X_FORWARDED_METHOD,
            &X_FORWARDED_URI,
            Some(&X_FORWARDED_HOST),
        ),
    };
    let method = one(headers, method)?;
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|_| Rejection::InvalidOriginalRequest)?;
    let uri = origin_form(one(headers, uri)?)?;
    let host = match host {
        Some(name) => Some(one(headers, name)?.clone()),
        None => None,
    };
    parts.method = method;
    parts.uri = uri;
    if let Some(host) = host {
        parts.headers.insert(HOST, host);
    }
    Ok(())
}

/// The one value of `name`: absent or repeated is refused, as the gateway sets exactly one.
fn one<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<&'h HeaderValue, Rejection> {
    let mut all = headers.get_all(name).iter();
    match (all.next(), all.next()) {
        (Some(v), None) if !v.is_empty() => Ok(v),
        _ => Err(Rejection::InvalidOriginalRequest),
    }
}

/// An origin-form request target (`/path?query`); anything else names no request of this
/// host. Its path is normalised later, as the proxy normalises a request's.
pub(super) fn origin_form(v: &HeaderValue) -> Result<Uri, Rejection> {
    let b = v.as_bytes();
    if b.len() > MAX_URI || b.first() != Some(&b'/') || b.starts_with(b"//") {
        return Err(Rejection::InvalidPath);
    }
    let uri = Uri::try_from(b).map_err(|_| Rejection::InvalidPath)?;
    if uri.scheme().is_some() || uri.authority().is_some() {
        return Err(Rejection::InvalidPath);
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn request_callers_decide_on_the_check_request_itself() {
        let mut p = parts("POST", "/v1/things?a=1", &[("host", "api.example")]);
        original(Caller::Request, &mut p).unwrap();
        assert_eq!(p.method, Method::POST);
        assert_eq!(p.uri, "/v1/things?a=1");
    }

    #[test]
    fn nginx_names_the_original_in_x_original_headers() {
        let mut p = parts(
            "GET",
            "/_keygate",
            &[
                ("host", "api.example"),
                ("x-original-method", "DELETE"),
                ("x-original-uri", "/v1/things/7?force=1"),
            ],
        );
        original(Caller::Nginx, &mut p).unwrap();
        assert_eq!(p.method, Method::DELETE);
        assert_eq!(p.uri, "/v1/things/7?force=1");
        assert_eq!(p.headers[HOST], "api.example");
    }

    #[test]
    fn forward_auth_names_the_original_in_x_forwarded_headers() {
        let mut p = parts(
            "GET",
            "/",
            &[
                ("host", "keygate:9191"),
                ("x-forwarded-method", "PUT"),
                ("x-forwarded-uri", "/a/b"),
                ("x-forwarded-host", "api.example"),
                ("x-forwarded-proto", "https"),
            ],
        );
        original(Caller::ForwardAuth, &mut p).unwrap();
        assert_eq!(p.method, Method::PUT);
        assert_eq!(p.uri, "/a/b");
        assert_eq!(p.headers[HOST], "api.example");
    }

    #[test]
    fn another_conventions_headers_are_refused_for_every_caller() {
        let cases: &[(Caller, &[(&str, &str)])] = &[
            (Caller::Request, &[("x-original-uri", "/public")]),
            (Caller::Request, &[("x-forwarded-method", "GET")]),
            (Caller::Grpc, &[("x-original-uri", "/public")]),
            (Caller::Grpc, &[("x-forwarded-uri", "/public")]),
            (
                Caller::Nginx,
                &[
                    ("x-original-method", "GET"),
                    ("x-original-uri", "/a"),
                    ("x-forwarded-uri", "/public"),
                ],
            ),
            (
                Caller::ForwardAuth,
                &[
                    ("x-forwarded-method", "GET"),
                    ("x-forwarded-uri", "/a"),
                    ("x-forwarded-host", "h"),
                    ("x-original-method", "GET"),
                ],
            ),
        ];
        for (caller, headers) in cases {
            let mut p = parts("GET", "/", headers);
            assert_eq!(
                original(*caller, &mut p),
                Err(Rejection::InvalidOriginalRequest),
                "{caller:?} {headers:?}"
            );
        }
    }

    #[test]
    fn missing_repeated_or_invalid_originals_are_refused() {
        let refused = |caller, headers: &[(&str, &str)], want| {
            let mut p = parts("GET", "/", headers);
            assert_eq!(original(caller, &mut p), Err(want), "{headers:?}");
        };
        let bad = Rejection::InvalidOriginalRequest;
        refused(Caller::Nginx, &[("x-original-uri", "/a")], bad);
        refused(Caller::Nginx, &[("x-original-method", "GET")], bad);
        refused(
            Caller::Nginx,
            &[
                ("x-original-method", "GET"),
                ("x-original-method", "POST"),
                ("x-original-uri", "/a"),
            ],
            bad,
        );
        refused(
            Caller::Nginx,
            &[("x-original-method", "G T"), ("x-original-uri", "/a")],
            bad,
        );
        refused(
            Caller::ForwardAuth,
            &[("x-forwarded-method", "GET"), ("x-forwarded-uri", "/a")],
            bad,
        );
        for uri in ["a/b", "http://evil/a", "//evil/a", "*"] {
            refused(
                Caller::Nginx,
                &[("x-original-method", "GET"), ("x-original-uri", uri)],
                Rejection::InvalidPath,
            );
        }
        let long = format!("/{}", "a".repeat(MAX_URI));
        refused(
            Caller::Nginx,
            &[("x-original-method", "GET"), ("x-original-uri", &long)],
            Rejection::InvalidPath,
        );
    }

    #[test]
    fn caller_names_parse() {
        for (name, caller) in [
            ("request", Caller::Request),
            ("envoy", Caller::Request),
            ("nginx", Caller::Nginx),
            ("forward_auth", Caller::ForwardAuth),
            ("traefik", Caller::ForwardAuth),
            ("caddy", Caller::ForwardAuth),
            ("grpc", Caller::Grpc),
            ("envoy_grpc", Caller::Grpc),
            ("istio", Caller::Grpc),
        ] {
            assert_eq!(Caller::parse(name), Some(caller));
        }
        assert_eq!(Caller::parse("Nginx"), None);
    }
}
