//! The management API under `/v1/` on the admin listener: keys, service accounts and the
//! audit trail, JSON in and out, described by the OpenAPI document at `/v1/openapi.json`
//! ([`openapi`]; a test checks that every documented operation answers with a documented
//! status, and one below that the document and [`OPERATIONS`] list the same operations).
//!
//! The document is exact: a request it admits is one the server accepts (unless a record is
//! missing, a name taken, or a time passed), and one it refuses is refused. The roles a key may
//! be given are those of the configuration, so the served document lists them as its `Role`
//! enum.
//!
//! Every call but the document needs `Authorization: Bearer <key>`, verified by the same
//! verifier as the proxy ([`caller`]). What a role may do here is the policy module's
//! ([`crate::policy::admin_api_allows`]): `admin` anything, `admin-readonly` list and show, any
//! other role gets `403 insufficient_scope`. A key manages only its own tenant's records,
//! unless its tenant is the operator tenant (`admin.operator_tenant`); records of other tenants
//! answer `404`, as if absent. Bodies are bounded and parsed strictly (unknown fields are
//! errors, [`request`]), and all input is checked before anything is written, so a bad request
//! never leaves a partial write. The operations themselves are [`crate::manage`]'s, which audit
//! every mutation with the admin key's id as the actor.
//!
//! Layout: this file holds the operation table and the dispatch, in the order a call lives it
//! (route, authenticate, authorize, check the id, parse the query, read the body, run the
//! handler); each resource's handlers are in their own file ([`keys`], [`accounts`],
//! [`audit`]); every error becomes a response in one place ([`error::Failure`]).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::Admin;
use crate::manage::{self, ManageError};
use crate::policy::ApiAccess;
use crate::store::{now_unix, Store};

mod accounts;
mod audit;
mod caller;
mod error;
mod keys;
mod openapi;
mod request;

use caller::Caller;
use error::{ApiError, Failure};
use request::{Params, Query};

type Resp = Response<Full<Bytes>>;

/// What a handler answers: a response, or a failure for [`Failure::into_response`].
type Outcome = Result<Resp, Failure>;

/// One operation of the API.
struct Operation {
    method: Method,
    /// The path below the listener's root as the OpenAPI document writes it; `{id}` stands for
    /// one segment.
    path: &'static str,
    /// What the caller's role must allow, and, for a change, its audit action.
    access: Access,
    /// The query parameters it takes.
    query: Params,
    /// How the path's `{id}` is checked before anything else reads it.
    id: Option<IdCheck>,
    handler: Handler,
}

/// Checks an id given in a path, refusing a pasted key without repeating it.
type IdCheck = fn(&str) -> Result<(), ManageError>;

/// What an operation does to records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Lists or shows them.
    Read,
    /// Changes them; recorded in the audit trail under this action, refusals included.
    Mutate(&'static str),
}

impl Access {
    fn mutates(self) -> bool {
        matches!(self, Access::Mutate(_))
    }

    /// What the caller's role must allow.
    fn needs(self) -> ApiAccess {
        match self {
            Access::Read => ApiAccess::Read,
            Access::Mutate(_) => ApiAccess::Manage,
        }
    }
}

/// How an operation answers.
enum Handler {
    /// Without a key or a role check: the document, which describes the API to anyone.
    Open(fn(&Admin) -> Resp),
    /// For an authenticated caller whose role allows the operation's access.
    Caller(for<'a> fn(Call<'a>) -> BoxFuture<'a, Outcome>),
}

/// An authenticated, authorized call with its checked inputs, as a handler receives it.
struct Call<'a> {
    admin: &'a Admin,
    store: &'a dyn Store,
    caller: Caller,
    /// The path's `{id}`, checked; empty when the path names none.
    id: &'a str,
    query: Query,
    /// The request body (read only for changes; empty otherwise).
    body: Bytes,
    now: u64,
}

/// Every operation of the API, in the OpenAPI document's order. The methods of a path are the
/// `Allow` of its `405`.
static OPERATIONS: [Operation; 11] = [
    Operation {
        method: Method::GET,
        path: "/v1/openapi.json",
        access: Access::Read,
        query: Params::None,
        id: None,
        handler: Handler::Open(openapi::serve),
    },
    Operation {
        method: Method::GET,
        path: "/v1/keys",
        access: Access::Read,
        query: Params::Page,
        id: None,
        handler: Handler::Caller(|call| Box::pin(keys::list(call))),
    },
    Operation {
        method: Method::POST,
        path: "/v1/keys",
        access: Access::Mutate("keys.create"),
        query: Params::None,
        id: None,
        handler: Handler::Caller(|call| Box::pin(keys::create(call))),
    },
    Operation {
        method: Method::GET,
        path: "/v1/keys/{id}",
        access: Access::Read,
        query: Params::None,
        id: Some(manage::check_key_id),
        handler: Handler::Caller(|call| Box::pin(keys::show(call))),
    },
    Operation {
        method: Method::POST,
        path: "/v1/keys/{id}/revoke",
        access: Access::Mutate("keys.revoke"),
        query: Params::None,
        id: Some(manage::check_key_id),
        handler: Handler::Caller(|call| Box::pin(keys::revoke(call))),
    },
    Operation {
        method: Method::GET,
        path: "/v1/service-accounts",
        access: Access::Read,
        query: Params::Page,
        id: None,
        handler: Handler::Caller(|call| Box::pin(accounts::list(call))),
    },
    Operation {
        method: Method::POST,
        path: "/v1/service-accounts",
        access: Access::Mutate("service_accounts.create"),
        query: Params::None,
        id: None,
        handler: Handler::Caller(|call| Box::pin(accounts::create(call))),
    },
    Operation {
        method: Method::GET,
        path: "/v1/service-accounts/{id}",
        access: Access::Read,
        query: Params::None,
        id: Some(manage::check_account_id),
        handler: Handler::Caller(|call| Box::pin(accounts::show(call))),
    },
    Operation {
        method: Method::DELETE,
        path: "/v1/service-accounts/{id}",
        access: Access::Mutate("service_accounts.remove"),
        query: Params::None,
        id: Some(manage::check_account_id),
        handler: Handler::Caller(|call| Box::pin(accounts::remove(call))),
    },
    Operation {
        method: Method::POST,
        path: "/v1/service-accounts/{id}/rotate",
        access: Access::Mutate("service_accounts.rotate"),
        query: Params::None,
        id: Some(manage::check_account_id),
        handler: Handler::Caller(|call| Box::pin(accounts::rotate(call))),
    },
    Operation {
        method: Method::GET,
        path: "/v1/audit",
        access: Access::Read,
        query: Params::Limit,
        id: None,
        handler: Handler::Caller(|call| Box::pin(audit::list(call))),
    },
];

/// Matches `path` against a pattern: the same segments, `{id}` matching any one. Returns
/// whether it matched, and the segment `{id}` matched, if the pattern has one.
fn matches<'a>(pattern: &str, path: &'a str) -> Option<Option<&'a str>> {
    let mut id = None;
    let mut pattern = pattern.split('/');
    let mut path = path.split('/');
    loop {
        match (pattern.next(), path.next()) {
            (None, None) => return Some(id),
            (Some("{id}"), Some(segment)) => id = Some(segment),
            (Some(p), Some(segment)) if p == segment => {}
            _ => return None,
        }
    }
}

/// Finds the operation for a method and a path below `/v1/`, with the path's id, if any. A
/// path no operation has is `404`; a known path with another method is `405`, with the path's
/// methods from the table.
fn route<'a>(
    method: &Method,
    path: &'a str,
) -> Result<(&'static Operation, Option<&'a str>), Failure> {
    // A trailing `/` names the same resource.
    let path = path.trim_end_matches('/');
    let mut allowed: Vec<&'static str> = Vec::new();
    for op in &OPERATIONS {
        if let Some(id) = matches(op.path, path) {
            if op.method == method {
                return Ok((op, id));
            }
            allowed.push(op.method.as_str());
        }
    }
    if allowed.is_empty() {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such API endpoint; see /v1/openapi.json",
        )
        .into())
    } else {
        Err(Failure::MethodNotAllowed(allowed))
    }
}

/// Handles a request under `/v1/`.
pub(crate) async fn handle(admin: &Admin, req: Request<Incoming>) -> Resp {
    serve(admin, req)
        .await
        .unwrap_or_else(Failure::into_response)
}

/// The dispatch. Its order is part of the API's promise: only the route (`404`, `405`) is
/// answered before the caller is authenticated and its role allows the operation; no input is
/// checked and no record read before that, so a refused key learns nothing of the records (a
/// refused change is audited). Then the id is checked, then the query, and a body is read
/// only for a change, after everything else passed.
async fn serve(admin: &Admin, req: Request<Incoming>) -> Outcome {
    let uri = req.uri().clone();
    let (op, id) = route(req.method(), uri.path())?;
    let run = match op.handler {
        Handler::Open(answer) => return Ok(answer(admin)),
        Handler::Caller(run) => run,
    };
    let store: Arc<dyn Store> = admin.app.verifier.store().clone();
    let now = now_unix();
    let caller = Caller::authenticate(admin, req.headers(), now).await?;
    caller.authorize(&*store, op.access, id, now).await?;
    if let (Some(check), Some(id)) = (op.id, id) {
        check(id)?;
    }
    let query = Query::parse(uri.query(), op.query)?;
    let body = if op.access.mutates() {
        request::read_body(req).await?
    } else {
        Bytes::new()
    };
    run(Call {
        admin,
        store: &*store,
        caller,
        id: id.unwrap_or(""),
        query,
        body,
        now,
    })
    .await
}

/// A JSON answer.
fn respond(status: StatusCode, body: &Value) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// One page of a list, from an opaque cursor (the offset of the page's first item). A cursor
/// past the end (the list shrank) is an empty last page.
fn page<T: serde::Serialize>(items: &[T], query: &Query) -> Resp {
    let cursor = query.cursor.min(items.len());
    let end = cursor.saturating_add(query.limit).min(items.len());
    let next = (end < items.len()).then(|| end.to_string());
    respond(
        StatusCode::OK,
        &json!({ "items": &items[cursor..end], "next_cursor": next }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn found(method: Method, path: &str) -> (&'static str, Method, Option<&str>) {
        match route(&method, path) {
            Ok((op, id)) => (op.path, op.method.clone(), id),
            Err(_) => panic!("{method} {path} is not routed"),
        }
    }

    #[test]
    fn routes_match_methods_and_ids() {
        assert_eq!(
            found(Method::POST, "/v1/keys/key_1/revoke"),
            ("/v1/keys/{id}/revoke", Method::POST, Some("key_1"))
        );
        assert_eq!(
            found(Method::DELETE, "/v1/service-accounts/sa_1/"),
            ("/v1/service-accounts/{id}", Method::DELETE, Some("sa_1"))
        );
        assert_eq!(
            found(Method::GET, "/v1/keys/"),
            ("/v1/keys", Method::GET, None)
        );
        // An empty segment is an id like any other, refused by the id check.
        assert_eq!(
            found(Method::POST, "/v1/keys//revoke"),
            ("/v1/keys/{id}/revoke", Method::POST, Some(""))
        );
        for path in [
            "/v1/nope",
            "/v1/",
            "/v1/keys/a/b",
            "/v1/keys/a/revoke/x",
            "/v2/keys",
        ] {
            match route(&Method::GET, path) {
                Err(Failure::Api(e)) => assert_eq!(e.status, StatusCode::NOT_FOUND, "{path}"),
                _ => panic!("{path} is routed"),
            }
        }
    }

    #[test]
    fn allow_lists_the_methods_the_table_has_for_the_path() {
        for (method, path, allowed) in [
            (Method::PUT, "/v1/keys", &["GET", "POST"][..]),
            (Method::GET, "/v1/keys/key_1/revoke", &["POST"]),
            (
                Method::POST,
                "/v1/service-accounts/sa_1",
                &["GET", "DELETE"],
            ),
            (Method::HEAD, "/v1/audit", &["GET"]),
            (Method::DELETE, "/v1/openapi.json", &["GET"]),
        ] {
            match route(&method, path) {
                Err(Failure::MethodNotAllowed(a)) => assert_eq!(a, allowed, "{method} {path}"),
                _ => panic!("{method} {path}: not a 405"),
            }
        }
    }

    #[test]
    fn audit_actions_name_their_resource_and_are_distinct() {
        let actions: Vec<&str> = OPERATIONS
            .iter()
            .filter_map(|op| match op.access {
                Access::Mutate(action) => Some(action),
                Access::Read => None,
            })
            .collect();
        assert_eq!(actions.len(), 5);
        for (i, a) in actions.iter().enumerate() {
            assert!(!actions[..i].contains(a), "{a} twice");
            let (resource, _) = a.split_once('.').unwrap();
            assert!(["keys", "service_accounts"].contains(&resource), "{a}");
        }
        // The methods that change nothing never do.
        for op in &OPERATIONS {
            assert_eq!(op.access.mutates(), op.method != Method::GET, "{}", op.path);
        }
    }

    /// The table and the document describe one API: the same operations, each taking the
    /// query parameters it documents, naming an id where its path has one, needing a key
    /// unless documented open, and reading a body (`413` possible) exactly when it changes
    /// records.
    #[test]
    fn the_operation_table_is_the_documents() {
        let doc: Value = serde_json::from_str(openapi::OPENAPI).unwrap();
        let mut documented = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, spec) in item.as_object().unwrap() {
                if method == "parameters" {
                    continue;
                }
                documented += 1;
                let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let op = OPERATIONS
                    .iter()
                    .find(|op| op.path == path && op.method == method)
                    .unwrap_or_else(|| panic!("{method} {path} is documented, not in the table"));
                let what = format!("{method} {path}");
                let query: Vec<&str> = spec["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "query")
                    .map(|p| p["name"].as_str().unwrap())
                    .collect();
                assert_eq!(query, op.query.names(), "{what}: query parameters");
                assert_eq!(path.contains("{id}"), op.id.is_some(), "{what}: id");
                let open = spec["security"] == json!([]);
                assert_eq!(open, matches!(op.handler, Handler::Open(_)), "{what}: key");
                let body = spec["responses"].get("413").is_some();
                assert_eq!(body, op.access.mutates(), "{what}: body");
            }
        }
        assert_eq!(
            documented,
            OPERATIONS.len(),
            "operations in the table, not documented"
        );
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
        let at = |cursor| Query {
            tenant: None,
            limit: 2,
            cursor,
        };
        let v = body(page(&items, &at(0)));
        assert_eq!(v["items"], json!([0, 1]));
        assert_eq!(v["next_cursor"], "2");
        assert_eq!(body(page(&items, &at(4)))["next_cursor"], Value::Null);
        let v = body(page(&items, &at(6)));
        assert_eq!(
            v["items"],
            json!([]),
            "a cursor past the end is an empty page"
        );
        assert_eq!(v["next_cursor"], Value::Null);
    }
}
