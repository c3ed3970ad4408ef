//! The management API under `/v1/` on the admin listener: keys, service accounts and the
//! audit trail, JSON in and out, described by the OpenAPI document at `/v1/openapi.json`
//! (`src/openapi.json`; a test checks that every documented operation answers with a
//! documented status).
//!
//! The document is exact: a request it admits is one the server accepts (unless a record is
//! missing, a name taken, or a time passed), and one it refuses is refused. The roles a key may
//! be given are those of the configuration, so the served document lists them as its `Role`
//! enum.
//!
//! Every call but the document needs `Authorization: Bearer <key>`, verified by the same
//! verifier as the proxy. Role `admin` may do anything, `admin-readonly` may list and show,
//! any other role gets `403 insufficient_scope`. A key manages only its own tenant's records,
//! unless its tenant is the operator tenant (`admin.operator_tenant`); records of other tenants
//! answer `404`, as if absent. Bodies are bounded and parsed strictly (unknown fields are
//! errors), and all input is checked before anything is written, so a bad request never leaves
//! a partial write. The operations themselves are [`crate::manage`]'s, which audit every
//! mutation with the admin key's id as the actor.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::Admin;
use crate::identity::Identity;
use crate::manage::{self, ManageError, NewKey, NewServiceAccount, RotateExpiry};
use crate::policy::{self, ApiAccess, Roles};
use crate::rejection::{self, Rejection};
use crate::store::{self, now_unix, Store, StoreError};

/// The OpenAPI 3 document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest oversized body read and discarded before answering 413.
const MAX_DRAIN: u64 = 1024 * 1024;

/// Largest page of a list.
const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;

type Resp = Response<Full<Bytes>>;

/// A refused or failed API call.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    fn not_found(kind: &str, id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {kind} with id {id}"),
        )
    }

    fn response(self) -> Resp {
        rejection::error_response(self.status, self.code, &self.message)
    }
}

impl From<ManageError> for ApiError {
    fn from(e: ManageError) -> Self {
        let status = match &e {
            ManageError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ManageError::NotFound { .. } => StatusCode::NOT_FOUND,
            ManageError::Store(StoreError::Conflict(_)) => StatusCode::CONFLICT,
            ManageError::Store(err) => {
                tracing::warn!(error = %err, "management API: store failed");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let message = match &e {
            ManageError::Store(StoreError::Unavailable(_) | StoreError::Corrupt(_)) => {
                "the key store is unavailable; retry later".to_owned()
            }
            ManageError::Store(StoreError::Conflict(m)) => m.clone(),
            other => other.to_string(),
        };
        ApiError::new(status, e.code(), message)
    }
}

/// An error response, or a refusal of the request path's own kind (401/403/503).
enum Failure {
    Api(ApiError),
    Rejected(Rejection),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Api(e)
    }
}

impl From<ManageError> for Failure {
    fn from(e: ManageError) -> Self {
        Failure::Api(e.into())
    }
}

fn respond(status: StatusCode, body: &Value) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// What a route does, once matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    OpenApi,
    ListKeys,
    CreateKey,
    ShowKey,
    RevokeKey,
    ListAccounts,
    CreateAccount,
    ShowAccount,
    RotateAccount,
    RemoveAccount,
    ListAudit,
}

impl Op {
    /// Whether the operation changes records (and so needs role `admin`).
    fn mutates(self) -> bool {
        matches!(
            self,
            Op::CreateKey
                | Op::RevokeKey
                | Op::CreateAccount
                | Op::RotateAccount
                | Op::RemoveAccount
        )
    }

    /// The audit action of a mutation.
    fn action(self) -> &'static str {
        match self {
            Op::CreateKey => "keys.create",
            Op::RevokeKey => "keys.revoke",
            Op::CreateAccount => "service_accounts.create",
            Op::RotateAccount => "service_accounts.rotate",
            Op::RemoveAccount => "service_accounts.remove",
            _ => "read",
        }
    }
}

/// Matches a path below `/v1/` and a method to an operation and its id, if any.
fn route<'a>(method: &Method, path: &'a str) -> Result<(Op, Option<&'a str>), ApiError> {
    let segments: Vec<&str> = path
        .strip_prefix("/v1/")
        .unwrap_or("")
        .trim_end_matches('/')
        .split('/')
        .collect();
    let (ops, id): (&[(Method, Op)], Option<&str>) = match segments.as_slice() {
        ["openapi.json"] => (&[(Method::GET, Op::OpenApi)], None),
        ["keys"] => (
            &[(Method::GET, Op::ListKeys), (Method::POST, Op::CreateKey)],
            None,
        ),
        ["keys", id] => (&[(Method::GET, Op::ShowKey)], Some(*id)),
        ["keys", id, "revoke"] => (&[(Method::POST, Op::RevokeKey)], Some(*id)),
        ["service-accounts"] => (
            &[
                (Method::GET, Op::ListAccounts),
                (Method::POST, Op::CreateAccount),
            ],
            None,
        ),
        ["service-accounts", id] => (
            &[
                (Method::GET, Op::ShowAccount),
                (Method::DELETE, Op::RemoveAccount),
            ],
            Some(*id),
        ),
        ["service-accounts", id, "rotate"] => (&[(Method::POST, Op::RotateAccount)], Some(*id)),
        ["audit"] => (&[(Method::GET, Op::ListAudit)], None),
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such API endpoint; see /v1/openapi.json",
            ))
        }
    };
    match ops.iter().find(|(m, _)| m == method) {
        Some((_, op)) => Ok((*op, id)),
        None => {
            let allowed: Vec<&str> = ops.iter().map(|(m, _)| m.as_str()).collect();
            Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("use {}", allowed.join(" or ")),
            ))
        }
    }
}

/// Handles a request under `/v1/`.
pub async fn handle(admin: &Admin, req: Request<Incoming>) -> Resp {
    match serve(admin, req).await {
        Ok(resp) => resp,
        Err(Failure::Rejected(r)) => r.into_response(),
        Err(Failure::Api(e)) => {
            let allow = (e.status == StatusCode::METHOD_NOT_ALLOWED)
                .then(|| e.message.trim_start_matches("use ").replace(" or ", ", "));
            let mut resp = e.response();
            if let Some(v) = allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
                resp.headers_mut().insert(ALLOW, v);
            }
            resp
        }
    }
}

/// Who is calling, and which tenants it may see.
struct Caller {
    identity: Arc<Identity>,
    /// Its keys belong to the operator tenant: it manages every tenant.
    operator: bool,
}

impl Caller {
    fn actor(&self) -> &str {
        self.identity.key_id()
    }

    fn sees(&self, tenant: &str) -> bool {
        self.operator || self.identity.tenant() == tenant
    }

    /// The tenant a list is restricted to: the one asked for, if the caller may see it.
    fn list_tenant(&self, asked: Option<String>) -> Result<Option<String>, Failure> {
        match asked {
            Some(t) if !self.sees(&t) => Err(Failure::Rejected(Rejection::InsufficientScope)),
            Some(t) => Ok(Some(t)),
            None if self.operator => Ok(None),
            None => Ok(Some(self.identity.tenant().to_string())),
        }
    }

    /// Refuses a write into a tenant the caller may not manage.
    fn may_write(&self, tenant: &str) -> Result<(), Failure> {
        if self.sees(tenant) {
            Ok(())
        } else {
            Err(Failure::Rejected(Rejection::InsufficientScope))
        }
    }
}

async fn serve(admin: &Admin, req: Request<Incoming>) -> Result<Resp, Failure> {
    let app = &*admin.app;
    let uri = req.uri().clone();
    let (op, id) = route(req.method(), uri.path())?;
    if op == Op::OpenApi {
        // Asked for rarely (tools, people): built per request rather than kept.
        let mut resp = Response::new(Full::new(document(&admin.roles)));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Ok(resp);
    }
    let store = app.verifier.store().clone();
    let now = now_unix();
    let identity = crate::auth::check(&app.verifier, req.headers(), now)
        .await
        .map_err(Failure::Rejected)?;
    let caller = Caller {
        operator: identity.tenant() == admin.operator_tenant,
        identity,
    };
    let needed = if op.mutates() {
        ApiAccess::Manage
    } else {
        ApiAccess::Read
    };
    let allowed = policy::admin_api_allows(caller.identity.role(), needed);
    if !allowed {
        if op.mutates() {
            let tenant = caller.identity.tenant();
            manage::audit_denied(
                &*store,
                caller.actor(),
                op.action(),
                id.unwrap_or("-"),
                tenant,
                now,
            )
            .await;
        }
        return Err(Failure::Rejected(Rejection::InsufficientScope));
    }
    match (op, id) {
        (Op::ShowKey | Op::RevokeKey, Some(id)) => manage::check_key_id(id)?,
        (_, Some(id)) => manage::check_account_id(id)?,
        (_, None) => {}
    }
    let query = Query::parse(uri.query(), op)?;
    let body = if op.mutates() {
        read_body(req).await?
    } else {
        Bytes::new()
    };
    let store = &*store;
    let id = id.unwrap_or("");
    match op {
        Op::OpenApi => unreachable!("answered above"),
        Op::ListKeys => {
            let tenant = caller.list_tenant(query.tenant)?;
            let records = manage::list_keys(store, tenant.as_deref()).await?;
            page(&records, query.limit, query.cursor)
        }
        Op::ShowKey => {
            let record = visible_key(store, &caller, id).await?;
            Ok(respond(StatusCode::OK, &json!(record)))
        }
        Op::CreateKey => {
            let body: CreateKey = parse_json(&body, false)?;
            let tenant = body
                .tenant
                .unwrap_or_else(|| caller.identity.tenant().to_string());
            caller.may_write(&tenant)?;
            let expires_at =
                manage::parse_expiry(body.expires_in.as_deref(), body.expires_at.as_deref(), now)?;
            let created = manage::create_key(
                store,
                &admin.roles,
                NewKey {
                    tenant,
                    role: body.role,
                    name: body.name,
                    subject: body.subject,
                    expires_at,
                },
                now,
                caller.actor(),
            )
            .await?;
            let mut v = json!(created.record);
            v["key"] = json!(created.secret.expose());
            v["key_shown_once"] = json!(true);
            Ok(respond(StatusCode::CREATED, &v))
        }
        Op::RevokeKey => {
            let _: Empty = parse_json(&body, true)?;
            visible_key(store, &caller, id).await?;
            // Revoking a revoked key answers its record, unchanged.
            let revoked = manage::revoke_key(store, id, now, caller.actor()).await?;
            Ok(respond(StatusCode::OK, &json!(revoked.record)))
        }
        Op::ListAccounts => {
            let tenant = caller.list_tenant(query.tenant)?;
            let accounts = manage::list_service_accounts(store, tenant.as_deref()).await?;
            page(&accounts, query.limit, query.cursor)
        }
        Op::ShowAccount => {
            let (account, keys) = visible_account(store, &caller, id).await?;
            let mut v = json!(account);
            v["keys"] = json!(keys);
            Ok(respond(StatusCode::OK, &v))
        }
        Op::CreateAccount => {
            let body: CreateAccount = parse_json(&body, false)?;
            let tenant = body
                .tenant
                .unwrap_or_else(|| caller.identity.tenant().to_string());
            caller.may_write(&tenant)?;
            let expires_at = account_expiry(
                body.expires_in.as_deref(),
                body.expires_at.as_deref(),
                body.never_expire,
                now,
            )?
            .unwrap_or(None);
            let created = manage::create_service_account(
                store,
                &admin.roles,
                NewServiceAccount {
                    tenant,
                    name: body.name,
                    role: body.role,
                    expires_at,
                },
                now,
                caller.actor(),
            )
            .await?;
            Ok(respond(StatusCode::CREATED, &account_with_key(&created)))
        }
        Op::RotateAccount => {
            let body: Rotate = parse_json(&body, true)?;
            let expiry = match account_expiry(
                body.expires_in.as_deref(),
                body.expires_at.as_deref(),
                body.never_expire,
                now,
            )? {
                None => RotateExpiry::SameLifetime,
                Some(None) => RotateExpiry::Never,
                Some(Some(at)) => RotateExpiry::At(at),
            };
            let grace = body.grace.as_deref().map(manage::parse_grace).transpose()?;
            visible_account(store, &caller, id).await?;
            let rotated =
                manage::rotate_service_account(store, id, expiry, grace, now, caller.actor())
                    .await?;
            Ok(respond(StatusCode::OK, &account_with_key(&rotated)))
        }
        Op::RemoveAccount => {
            let _: Empty = parse_json(&body, true)?;
            visible_account(store, &caller, id).await?;
            let account = manage::remove_service_account(store, id, now, caller.actor()).await?;
            Ok(respond(StatusCode::OK, &json!(account)))
        }
        Op::ListAudit => {
            // A tenant's admin sees its tenant's entries: read more, then keep its own.
            let read = if caller.operator {
                query.limit
            } else {
                store::redis::AUDIT_MAX_LEN
            };
            let mut entries = manage::list_audit(store, read).await?;
            entries.retain(|e| caller.sees(&e.tenant));
            let skip = entries.len().saturating_sub(query.limit);
            Ok(respond(
                StatusCode::OK,
                &json!({ "items": &entries[skip..], "next_cursor": null }),
            ))
        }
    }
}

/// A key the caller may see; others' are reported absent.
async fn visible_key(
    store: &dyn Store,
    caller: &Caller,
    id: &str,
) -> Result<store::KeyRecord, Failure> {
    let record = manage::show_key(store, id).await?;
    if !caller.sees(&record.tenant) {
        return Err(ApiError::not_found("key", id).into());
    }
    Ok(record)
}

/// A service account the caller may see; others' are reported absent.
async fn visible_account(
    store: &dyn Store,
    caller: &Caller,
    id: &str,
) -> Result<(store::ServiceAccount, Vec<store::KeyRecord>), Failure> {
    let (account, keys) = manage::show_service_account(store, id).await?;
    if !caller.sees(&account.tenant) {
        return Err(ApiError::not_found("service account", id).into());
    }
    Ok((account, keys))
}

fn account_with_key(created: &manage::CreatedAccount) -> Value {
    let mut v = json!(created.account);
    v["key"] = json!(created.key.secret.expose());
    v["key_id"] = json!(created.key.record.id);
    v["key_shown_once"] = json!(true);
    v
}

/// `None`: no expiry given; `Some(None)`: never expires; `Some(Some(t))`: expires at `t`.
fn account_expiry(
    expires_in: Option<&str>,
    expires_at: Option<&str>,
    never_expire: Option<bool>,
    now: u64,
) -> Result<Option<Option<u64>>, ApiError> {
    let at = manage::parse_expiry(expires_in, expires_at, now)?;
    match (never_expire, at) {
        (Some(true), Some(_)) => Err(ApiError::bad(
            "never_expire: give only one of never_expire, expires_in and expires_at",
        )),
        (Some(true), None) => Ok(Some(None)),
        (_, Some(at)) => Ok(Some(Some(at))),
        (_, None) => Ok(None),
    }
}

/// One page of a list, from an opaque cursor (the offset of the page's first item). A cursor
/// past the end (the list shrank) is an empty last page.
fn page<T: serde::Serialize>(items: &[T], limit: usize, cursor: usize) -> Result<Resp, Failure> {
    let cursor = cursor.min(items.len());
    let end = cursor.saturating_add(limit).min(items.len());
    let next = (end < items.len()).then(|| end.to_string());
    Ok(respond(
        StatusCode::OK,
        &json!({ "items": &items[cursor..end], "next_cursor": next }),
    ))
}

/// The query string of a list.
struct Query {
    tenant: Option<String>,
    limit: usize,
    cursor: usize,
}

impl Query {
    fn parse(q: Option<&str>, op: Op) -> Result<Query, ApiError> {
        let mut out = Query {
            tenant: None,
            limit: DEFAULT_LIMIT,
            cursor: 0,
        };
        let lists = matches!(op, Op::ListKeys | Op::ListAccounts);
        // Only digits, as the document's patterns say (no sign, no spaces).
        let number = |v: &str, max_digits: usize| {
            (!v.is_empty() && v.len() <= max_digits && v.bytes().all(|b| b.is_ascii_digit()))
                .then(|| v.parse::<usize>().ok())
                .flatten()
        };
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "limit" if lists || op == Op::ListAudit => {
                    out.limit = number(v, 4)
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            ApiError::bad(format!("limit: a number from 1 to {MAX_LIMIT}"))
                        })?;
                }
                "cursor" if lists => {
                    out.cursor = number(v, 9).ok_or_else(|| {
                        ApiError::bad("cursor: the next_cursor of the previous page")
                    })?;
                }
                "tenant" if lists => {
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
                    let known = match op {
                        Op::ListKeys | Op::ListAccounts => "tenant, limit and cursor",
                        Op::ListAudit => "limit",
                        _ => "no query parameters",
                    };
                    return Err(ApiError::bad(format!(
                        "unknown query parameter; this endpoint takes {known}"
                    )));
                }
            }
        }
        Ok(out)
    }
}

/// Reads the whole body, at most [`MAX_BODY`] bytes.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
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
fn parse_json<T: DeserializeOwned>(body: &[u8], empty_ok: bool) -> Result<T, ApiError> {
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

/// The OpenAPI document as served: the static one, with the configured roles as the enum of
/// `Role` (any role of a new key) and `AccountRole` (the same but the organization admin's).
fn document(roles: &Roles) -> Bytes {
    let mut doc: Value = serde_json::from_str(OPENAPI).expect("the OpenAPI document is JSON");
    let names = roles.names();
    let account: Vec<&str> = names
        .iter()
        .copied()
        .filter(|r| !policy::is_organization_admin(r))
        .collect();
    let schemas = &mut doc["components"]["schemas"];
    schemas["Role"]["enum"] = json!(names);
    schemas["AccountRole"]["enum"] = json!(account);
    Bytes::from(doc.to_string())
}

/// A body that must be empty or `{}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// An optional field that, when present, must have a value: `"tenant": null` is refused like
/// any other wrong type (the document does not admit it), not read as "absent".
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// `POST /v1/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    #[serde(default, deserialize_with = "present")]
    tenant: Option<String>,
    role: String,
    name: String,
    #[serde(default, deserialize_with = "present")]
    subject: Option<String>,
    #[serde(default, deserialize_with = "present")]
    expires_in: Option<String>,
    #[serde(default, deserialize_with = "present")]
    expires_at: Option<String>,
}

/// `POST /v1/service-accounts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAccount {
    #[serde(default, deserialize_with = "present")]
    tenant: Option<String>,
    name: String,
    role: String,
    #[serde(default, deserialize_with = "present")]
    expires_in: Option<String>,
    #[serde(default, deserialize_with = "present")]
    expires_at: Option<String>,
    #[serde(default, deserialize_with = "present")]
    never_expire: Option<bool>,
}

/// `POST /v1/service-accounts/{id}/rotate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotate {
    #[serde(default, deserialize_with = "present")]
    expires_in: Option<String>,
    #[serde(default, deserialize_with = "present")]
    expires_at: Option<String>,
    #[serde(default, deserialize_with = "present")]
    never_expire: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    grace: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_methods_and_ids() {
        assert_eq!(
            route(&Method::POST, "/v1/keys/key_1/revoke").unwrap(),
            (Op::RevokeKey, Some("key_1"))
        );
        assert_eq!(
            route(&Method::DELETE, "/v1/service-accounts/sa_1").unwrap(),
            (Op::RemoveAccount, Some("sa_1"))
        );
        assert_eq!(
            route(&Method::PUT, "/v1/keys").unwrap_err().status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            route(&Method::GET, "/v1/nope").unwrap_err().status,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn parser_messages_never_echo_values() {
        let e =
            parse_json::<CreateKey>(br#"{"role": 1, "name": "kgu_secret"}"#, false).unwrap_err();
        assert!(!e.message.contains("kgu_secret"), "{}", e.message);
        let e = parse_json::<CreateKey>(br#"{"role": "kgu_secret"}"#, false).unwrap_err();
        assert!(!e.message.contains("kgu_secret"), "{}", e.message);
        let e = parse_json::<CreateKey>(br#"{"x": 1}"#, false).unwrap_err();
        assert!(e.message.contains("unknown field"), "{}", e.message);
        let e = parse_json::<CreateKey>(br#"{"kgu_abc": 1}"#, false).unwrap_err();
        assert!(!e.message.contains("kgu_abc"), "{}", e.message);
        let e =
            parse_json::<CreateKey>(br#"{"role": "member", "name": "n", "tenant": null}"#, false)
                .unwrap_err();
        assert!(e.message.contains("tenant"), "{}", e.message);
        let ok = parse_json::<CreateKey>(br#"{"role": "member", "name": "n"}"#, false).unwrap();
        assert!(ok.tenant.is_none());
    }

    #[test]
    fn pages_follow_the_cursor() {
        let items: Vec<u32> = (0..5).collect();
        let body = |r: Resp| -> Value {
            let b = futures_util::FutureExt::now_or_never(r.into_body().collect())
                .unwrap()
                .unwrap()
                .to_bytes();
            serde_json::from_slice(&b).unwrap()
        };
        let Ok(first) = page(&items, 2, 0) else {
            panic!()
        };
        let v = body(first);
        assert_eq!(v["items"], json!([0, 1]));
        assert_eq!(v["next_cursor"], "2");
        let Ok(last) = page(&items, 2, 4) else {
            panic!()
        };
        assert_eq!(body(last)["next_cursor"], Value::Null);
        let Ok(past) = page(&items, 2, 6) else {
            panic!()
        };
        let v = body(past);
        assert_eq!(
            v["items"],
            json!([]),
            "a cursor past the end is an empty page"
        );
        assert_eq!(v["next_cursor"], Value::Null);
    }

    #[test]
    fn the_document_is_json() {
        let v: Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(v["openapi"].as_str().map(|s| &s[..2]), Some("3."));
    }
}
