//! The decision endpoint as Envoy's gRPC `ext_authz` filter and Istio's `envoyExtAuthzGrpc`
//! provider call it (`server.authz_caller = "grpc"`): the unary call
//! `envoy.service.auth.v3.Authorization/Check` over HTTP/2.
//!
//! The `CheckRequest`'s `attributes.request.http` describes the original request: its method,
//! its path (with the query), its host and its headers (the `headers` map, or `header_map`
//! under Envoy's `encode_raw_headers`). keygate builds that request's head and decides on it
//! as on any other caller's (`decide_original`: route, credential, verify, authorize; the same
//! metrics, `mode="authz"`, and the same access log line); the HTTP decision then becomes the
//! `CheckResponse`:
//!
//! - allowed: status `OK` and an `ok_response` whose `headers` are the identity headers (each
//!   replacing any of its name) and whose `headers_to_remove` are `Authorization` and every
//!   header in the identity namespace the client sent;
//! - refused: the status for the HTTP code (`401` `UNAUTHENTICATED`, `403`
//!   `PERMISSION_DENIED`, `503` `UNAVAILABLE`, `400` `INVALID_ARGUMENT`, `404` `NOT_FOUND`,
//!   `429` `RESOURCE_EXHAUSTED`), its `message` the refusal's code (`key_revoked`), and a
//!   `denied_response` with the HTTP code, the `WWW-Authenticate`, `Retry-After`,
//!   `RateLimit-Policy`, `RateLimit`, `Content-Type` and `X-Request-Id` headers present, and keygate's JSON error as the body: what Envoy answers its client.
//!
//! A decision, allowing or refusing, is a successful call (`grpc-status: 0`). The call itself
//! fails only when it cannot be decided on: a request that is not gRPC (not an HTTP/2 `POST`
//! of `application/grpc`) gets `415`; another method or codec `UNIMPLEMENTED`; a compressed
//! or oversized message (over 1 MiB), or a body that is not one message, the status `grpc.rs`
//! says; a message that is not a `CheckRequest`, or one without `attributes.request.http`,
//! `INVALID_ARGUMENT`.
//!
//! Only this caller's endpoint reads a request body at all: with any other caller a gRPC call
//! is an ordinary check request, decided on its own head, its body never read, so no client
//! of another gateway can name a request in a `CheckRequest`.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, RETRY_AFTER, WWW_AUTHENTICATE};
use http::request::Parts;
use http::{HeaderName, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use prost::Message;

use super::{original, App, Caller, Peer, ProxyBody, X_ENVOY_AUTH_HEADERS_TO_REMOVE};
use crate::proxy::request_id::X_REQUEST_ID;
use crate::rejection::Rejection;

mod grpc;
mod proto;

use grpc::{Code, Failure};
pub use grpc::{GrpcBody, MAX_MESSAGE};

/// The one method served.
pub const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";

/// The most headers an original request may have (Envoy's own default is 100). The message
/// bound alone would admit more than a header map can hold.
const MAX_HEADERS: usize = 4096;

/// Answers one call to the decision endpoint in gRPC mode (see the module docs).
pub async fn check(app: &App, req: Request<Incoming>, peer: &Peer) -> Response<GrpcBody> {
    let (parts, body) = req.into_parts();
    if parts.version != Version::HTTP_2 || parts.method != Method::POST {
        return grpc::not_grpc();
    }
    match grpc::content_type(parts.headers.get(CONTENT_TYPE)) {
        None => return grpc::not_grpc(),
        Some(false) => {
            return grpc::fail(Failure::new(
                Code::Unimplemented,
                "only protobuf messages are accepted",
            ))
        }
        Some(true) => {}
    }
    if parts.uri.path() != CHECK {
        return grpc::fail(Failure::new(
            Code::Unimplemented,
            "only envoy.service.auth.v3.Authorization/Check is served",
        ));
    }
    let message = match grpc::read_message(&parts.headers, body, grpc::READ_DEADLINE).await {
        Ok(m) => m,
        Err(failure) => return refused(failure),
    };
    let http = match proto::CheckRequest::decode(message) {
        Ok(r) => r.attributes.and_then(|a| a.request).and_then(|r| r.http),
        Err(_) => {
            return refused(Failure::new(
                Code::InvalidArgument,
                "the message is not a CheckRequest",
            ))
        }
    };
    let Some(http) = http else {
        return refused(Failure::new(
            Code::InvalidArgument,
            "the CheckRequest has no attributes.request.http",
        ));
    };
    let (mut head, _) = Request::new(()).into_parts();
    let named =
        original_head(&mut head, http).and_then(|()| original::original(Caller::Grpc, &mut head));
    let (answer, decision) = super::decide_original(
        app,
        Request::from_parts(head, ()),
        named,
        peer,
        Caller::Grpc,
    )
    .await;
    grpc::respond(&check_response(answer, decision).await)
}

/// A call that could not be decided on.
fn refused(failure: Failure) -> Response<GrpcBody> {
    tracing::debug!(code = ?failure.code, message = failure.message, "check call refused");
    grpc::fail(failure)
}

/// Fills `head` with the original request `http` describes. Read as an HTTP/1.1 head: `Host`
/// names the host. A header keygate cannot read is refused rather than dropped, since a
/// dropped header could be one the upstream would still get and `headers_to_remove` would
/// then miss.
fn original_head(head: &mut Parts, http: proto::HttpRequest) -> Result<(), Rejection> {
    head.version = Version::HTTP_11;
    let invalid = Rejection::InvalidOriginalRequest;
    let headers = &mut head.headers;
    let mut add = |name: &str, value: Vec<u8>| {
        // Pseudo-headers (`:authority`, `:path`, ...) are the fields `host`, `path`, `method`.
        if name.starts_with(':') {
            return Ok(());
        }
        if headers.len() >= MAX_HEADERS {
            return Err(invalid);
        }
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid)?;
        let value = http::HeaderValue::from_bytes(&value).map_err(|_| invalid)?;
        headers.append(name, value);
        Ok(())
    };
    match http.header_map {
        Some(map) if !map.headers.is_empty() => {
            if !http.headers.is_empty() {
                return Err(invalid);
            }
            for h in map.headers {
                let value = if h.raw_value.is_empty() {
                    h.value.into_bytes()
                } else {
                    h.raw_value
                };
                add(&h.key, value)?;
            }
        }
        _ => {
            for (name, value) in http.headers {
                add(&name, value.into_bytes())?;
            }
        }
    }
    if !http.host.is_empty() {
        let host = http::HeaderValue::from_str(&http.host).map_err(|_| Rejection::InvalidHost)?;
        headers.insert(HOST, host);
    }
    if !http.id.is_empty() && !headers.contains_key(&X_REQUEST_ID) {
        if let Ok(id) = http::HeaderValue::from_str(&http.id) {
            headers.insert(X_REQUEST_ID.clone(), id);
        }
    }
    head.method = Method::from_bytes(http.method.as_bytes()).map_err(|_| invalid)?;
    let path = http::HeaderValue::from_str(&http.path).map_err(|_| Rejection::InvalidPath)?;
    head.uri = original::origin_form(&path)?;
    Ok(())
}

/// The HTTP answer to a decision, and the decision, as a `CheckResponse` (see the module docs).
async fn check_response(
    answer: Response<ProxyBody>,
    decision: Result<(), Rejection>,
) -> proto::CheckResponse {
    use proto::{CheckResponse, DeniedHttpResponse, HttpResponse, HttpStatus, OkHttpResponse};
    let (parts, body) = answer.into_parts();
    let Err(refusal) = decision else {
        let mut ok = OkHttpResponse::default();
        for (name, value) in &parts.headers {
            if *name == X_ENVOY_AUTH_HEADERS_TO_REMOVE {
                let names = value.to_str().unwrap_or_default().split(", ");
                ok.headers_to_remove
                    .extend(names.filter(|n| !n.is_empty()).map(str::to_owned));
            } else if *name != X_REQUEST_ID {
                ok.headers.push(header(name, value));
            }
        }
        return CheckResponse {
            status: Some(proto::Status {
                code: Code::Ok as i32,
                message: String::new(),
            }),
            http_response: Some(HttpResponse::OkResponse(ok)),
        };
    };
    // A decision's body is keygate's own, whole in memory: collecting it does not wait.
    let body = match body {
        Either::Right(full) => full
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default(),
        Either::Left(_) => Bytes::new(),
    };
    let headers = [
        &WWW_AUTHENTICATE,
        &RETRY_AFTER,
        &crate::limit::RATELIMIT_POLICY,
        &crate::limit::RATELIMIT,
        &CONTENT_TYPE,
        &X_REQUEST_ID,
    ]
    .into_iter()
    .filter_map(|name| parts.headers.get(name).map(|v| header(name, v)))
    .collect();
    CheckResponse {
        status: Some(proto::Status {
            code: code_for(parts.status) as i32,
            message: refusal.code().to_owned(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(parts.status.as_u16()),
            }),
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })),
    }
}

/// The gRPC status of a refusal with HTTP `status`.
fn code_for(status: StatusCode) -> Code {
    match status.as_u16() {
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        400 => Code::InvalidArgument,
        404 => Code::NotFound,
        429 => Code::ResourceExhausted,
        // 503 (the key store cannot answer), and any other server-side failure.
        500..=599 => Code::Unavailable,
        _ => Code::PermissionDenied,
    }
}

/// One header of the answer, replacing any of its name where Envoy sets it.
fn header(name: &HeaderName, value: &http::HeaderValue) -> proto::HeaderValueOption {
    let (value, raw_value) = match value.to_str() {
        Ok(v) => (v.to_owned(), Vec::new()),
        Err(_) => (String::new(), value.as_bytes().to_vec()),
    };
    proto::HeaderValueOption {
        header: Some(proto::HeaderValue {
            key: name.as_str().to_owned(),
            value,
            raw_value,
        }),
        append_action: proto::OVERWRITE_IF_EXISTS_OR_ADD,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn http(method: &str, path: &str, headers: &[(&str, &str)]) -> proto::HttpRequest {
        proto::HttpRequest {
            id: String::new(),
            method: method.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
            path: path.into(),
            host: "api.example".into(),
            header_map: None,
        }
    }

    fn head(http: proto::HttpRequest) -> (Parts, Result<(), Rejection>) {
        let (mut head, _) = Request::new(()).into_parts();
        let r = original_head(&mut head, http);
        (head, r)
    }

    #[test]
    fn the_head_is_the_described_request_without_pseudo_headers() {
        let (h, r) = head(http(
            "DELETE",
            "/v1/things/7?force=1",
            &[
                (":authority", "api.example"),
                (":path", "/v1/things/7?force=1"),
                ("authorization", "Bearer x"),
            ],
        ));
        assert_eq!(r, Ok(()));
        assert_eq!(h.method, Method::DELETE);
        assert_eq!(h.uri, "/v1/things/7?force=1");
        assert_eq!(h.headers[HOST], "api.example");
        assert_eq!(h.headers["authorization"], "Bearer x");
        assert_eq!(h.headers.len(), 2);
    }

    #[test]
    fn raw_headers_are_read_from_header_map_and_repeat() {
        let mut req = http("GET", "/", &[]);
        req.header_map = Some(proto::HeaderMap {
            headers: vec![
                proto::HeaderValue {
                    key: "x-a".into(),
                    value: String::new(),
                    raw_value: b"1".to_vec(),
                },
                proto::HeaderValue {
                    key: "x-a".into(),
                    value: "2".into(),
                    raw_value: Vec::new(),
                },
            ],
        });
        let (h, r) = head(req);
        assert_eq!(r, Ok(()));
        let all: Vec<_> = h.headers.get_all("x-a").iter().collect();
        assert_eq!(all, ["1", "2"]);
    }

    #[test]
    fn unreadable_originals_are_refused() {
        let bad = |req: proto::HttpRequest, want: Rejection| {
            assert_eq!(head(req).1, Err(want));
        };
        let invalid = Rejection::InvalidOriginalRequest;
        bad(http("", "/", &[]), invalid);
        bad(http("G T", "/", &[]), invalid);
        bad(http("GET", "http://evil/a", &[]), Rejection::InvalidPath);
        bad(http("GET", "", &[]), Rejection::InvalidPath);
        bad(http("GET", "/", &[("bad name", "v")]), invalid);
        bad(http("GET", "/", &[("x-a", "line\nbreak")]), invalid);
        let mut host = http("GET", "/", &[]);
        host.host = "a\u{7f}b".into();
        bad(host, Rejection::InvalidHost);
        let mut both = http("GET", "/", &[("x-a", "1")]);
        both.header_map = Some(proto::HeaderMap {
            headers: vec![proto::HeaderValue {
                key: "x-b".into(),
                value: "2".into(),
                raw_value: Vec::new(),
            }],
        });
        bad(both, invalid);
        let many: Vec<(String, String)> = (0..=MAX_HEADERS)
            .map(|i| (format!("x-h{i}"), String::new()))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (&**k, &**v)).collect();
        bad(http("GET", "/", &many), invalid);
    }

    #[test]
    fn refusals_map_to_grpc_codes() {
        for (http, code) in [
            (401, Code::Unauthenticated),
            (403, Code::PermissionDenied),
            (503, Code::Unavailable),
            (400, Code::InvalidArgument),
            (404, Code::NotFound),
            (429, Code::ResourceExhausted),
        ] {
            assert_eq!(code_for(StatusCode::from_u16(http).unwrap()), code);
        }
    }
}
