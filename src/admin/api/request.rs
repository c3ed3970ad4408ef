//! Reading a management API request's input, bounded and strict: the body (at most
//! [`MAX_BODY`] bytes), a JSON object whose unknown fields are errors, and the query string of
//! a list. No error message repeats a value the client sent, which could be a pasted key: it
//! names fields and types only.

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::manage;

/// Largest request body accepted.
pub(super) const MAX_BODY: usize = 64 * 1024;
/// Largest oversized body read and discarded before answering 413.
const MAX_DRAIN: u64 = 1024 * 1024;

/// Largest page of a list.
const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;

/// The query parameters an operation takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Params {
    /// None at all.
    None,
    /// `limit` (the audit trail).
    Limit,
    /// `tenant`, `limit` and `cursor` (a paged list).
    Page,
}

impl Params {
    /// Their names, as the OpenAPI document lists them.
    pub(super) fn names(self) -> &'static [&'static str] {
        match self {
            Params::None => &[],
            Params::Limit => &["limit"],
            Params::Page => &["tenant", "limit", "cursor"],
        }
    }

    fn takes(self, name: &str) -> bool {
        self.names().contains(&name)
    }

    /// What an error message says the operation takes: `tenant, limit and cursor`.
    fn describe(self) -> String {
        match self.names() {
            [] => "no query parameters".to_owned(),
            [one] => (*one).to_owned(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
        }
    }
}

/// The query string of a list.
#[derive(Debug)]
pub(super) struct Query {
    pub(super) tenant: Option<String>,
    pub(super) limit: usize,
    pub(super) cursor: usize,
}

impl Query {
    /// Parses a query string into the parameters `params` admits; any other is an error.
    pub(super) fn parse(q: Option<&str>, params: Params) -> Result<Query, ApiError> {
        let mut out = Query {
            tenant: None,
            limit: DEFAULT_LIMIT,
            cursor: 0,
        };
        // Only digits, as the document's patterns say (no sign, no spaces).
        let number = |v: &str, max_digits: usize| {
            (!v.is_empty() && v.len() <= max_digits && v.bytes().all(|b| b.is_ascii_digit()))
                .then(|| v.parse::<usize>().ok())
                .flatten()
        };
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "limit" if params.takes(k) => {
                    out.limit = number(v, 4)
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            ApiError::bad(format!("limit: a number from 1 to {MAX_LIMIT}"))
                        })?;
                }
                "cursor" if params.takes(k) => {
                    out.cursor = number(v, 9).ok_or_else(|| {
                        ApiError::bad("cursor: the next_cursor of the previous page")
                    })?;
                }
                "tenant" if params.takes(k) => {
                    manage::check_ident("tenant", v)?;
                    out.tenant = Some(v.to_owned());
                }
                // The name is not repeated: it could be anything, a pasted key included.
                _ if manage::looks_like_key(k) => {
                    return Err(ApiError::bad(
                        "query: that is an API key, not a query parameter; it is neither repeated nor recorded",
                    ))
                }
                _ => {
                    return Err(ApiError::bad(format!(
                        "unknown query parameter; this endpoint takes {}",
                        params.describe()
                    )));
                }
            }
        }
        Ok(out)
    }
}

/// Reads the whole body, at most [`MAX_BODY`] bytes.
pub(super) async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is limited to {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > MAX_BODY as u64) {
        // Read (and drop) a moderately oversized body, so the client, still sending it, gets
        // the answer instead of a reset connection. A larger one is refused unread; hyper then
        // closes the connection.
        if n <= MAX_DRAIN {
            let mut body = req.into_body();
            while let Some(Ok(_)) = body.frame().await {}
        }
        return Err(too_large());
    }
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(_) => Err(ApiError::bad("the request body could not be read")),
    }
}

/// Parses a JSON body strictly; an empty body is `{}` where `empty_ok`.
pub(super) fn parse_json<T: DeserializeOwned>(body: &[u8], empty_ok: bool) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        if !empty_ok {
            return Err(ApiError::bad("request body: a JSON object is required"));
        }
        b"{}"
    } else {
        body
    };
    let msg = |e: serde_json::Error| {
        // Bounded too: an unknown field's name is echoed, and names can be long.
        let text: String = redact_strings(&e.to_string()).chars().take(300).collect();
        ApiError::bad(format!("request body: {text}"))
    };
    // Only an object: serde would otherwise read a struct from an array, field by position.
    let value: Value = serde_json::from_slice(body).map_err(msg)?;
    if !value.is_object() {
        return Err(ApiError::bad("request body: a JSON object is required"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let text = msg(e.into_inner()).message;
        if path == "." || manage::looks_like_key(&path) {
            ApiError::bad(text)
        } else {
            let detail = text.trim_start_matches("request body: ");
            ApiError::bad(format!("request body: {path}: {detail}"))
        }
    })
}

/// Removes quoted values from a parser message: it names fields and types, but never echoes
/// what the client sent (which could be a pasted key). Field names in backticks stay, unless
/// one looks like a key (`{"kgu_…": 1}` is an unknown field named like a key).
fn redact_strings(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut quoted = false;
    for c in msg.chars() {
        if c == '"' {
            if !quoted {
                out.push_str("\"…\"");
            }
            quoted = !quoted;
        } else if !quoted {
            out.push(c);
        }
    }
    let mut parts: Vec<&str> = out.split('`').collect();
    for part in parts.iter_mut().skip(1).step_by(2) {
        if manage::looks_like_key(part) {
            *part = "…";
        }
    }
    parts.join("`")
}

/// A body that must be empty or `{}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Empty {}

/// An optional field that, when present, must have a value: `"tenant": null` is refused like
/// any other wrong type (the document does not admit it), not read as "absent".
pub(super) fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_operation_takes_only_its_query_parameters() {
        let q = Query::parse(Some("tenant=acme&limit=5&cursor=10"), Params::Page).unwrap();
        assert_eq!(
            (q.tenant.as_deref(), q.limit, q.cursor),
            (Some("acme"), 5, 10)
        );
        let q = Query::parse(None, Params::Page).unwrap();
        assert_eq!((q.tenant, q.limit, q.cursor), (None, DEFAULT_LIMIT, 0));
        assert_eq!(
            Query::parse(Some("limit=7"), Params::Limit).unwrap().limit,
            7
        );
        for (q, params) in [
            ("cursor=1", Params::Limit),
            ("tenant=acme", Params::Limit),
            ("limit=1", Params::None),
            ("x=1", Params::Page),
            ("limit=0", Params::Page),
            ("limit=1001", Params::Page),
            ("limit=+5", Params::Limit),
            ("cursor=", Params::Page),
            ("tenant=a%20b", Params::Page),
        ] {
            let e = Query::parse(Some(q), params).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{q}");
        }
    }

    #[test]
    fn unknown_parameters_are_answered_with_the_known_ones() {
        for (params, says) in [
            (Params::None, "this endpoint takes no query parameters"),
            (Params::Limit, "this endpoint takes limit"),
            (Params::Page, "this endpoint takes tenant, limit and cursor"),
        ] {
            let e = Query::parse(Some("x=1"), params).unwrap_err();
            assert!(e.message.ends_with(says), "{}", e.message);
        }
    }

    #[test]
    fn a_key_pasted_as_a_query_parameter_is_not_repeated() {
        let key = crate::key::generate(crate::key::KeyKind::User);
        let q = key.secret.expose().to_owned();
        for params in [Params::None, Params::Limit, Params::Page] {
            let e = Query::parse(Some(&q), params).unwrap_err();
            assert!(e.message.contains("that is an API key"), "{}", e.message);
            assert!(!e.message.contains(&q[4..]), "{}", e.message);
        }
    }

    #[test]
    fn bodies_must_be_json_objects() {
        assert!(parse_json::<Empty>(b"", true).is_ok());
        assert!(parse_json::<Empty>(b" {} ", true).is_ok());
        for bad in [&b""[..], b"[]", b"null", b"{", b"{\"x\": 1}"] {
            assert!(parse_json::<Empty>(bad, false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parser_messages_redact_quoted_values_and_key_like_names() {
        assert_eq!(
            redact_strings(r#"invalid type: string "kgu_x", expected u8"#),
            r#"invalid type: string "…", expected u8"#
        );
        assert_eq!(
            redact_strings("unknown field `kgu_abc`, expected `role`"),
            "unknown field `…`, expected `role`"
        );
    }
}
