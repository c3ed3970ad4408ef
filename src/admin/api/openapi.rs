//! The OpenAPI 3 document of the management API (`openapi.json` beside this file), served at
//! `/v1/openapi.json` to anyone, with the configured roles filled in.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response};
use http_body_util::Full;
use serde_json::{json, Value};

use super::{Admin, Resp};
use crate::policy::{self, Roles};

/// The OpenAPI 3 document of this API, as written.
pub(super) const OPENAPI: &str = include_str!("openapi.json");

/// `GET /v1/openapi.json`.
pub(super) fn serve(admin: &Admin) -> Resp {
    // Asked for rarely (tools, people): built per request rather than kept.
    let mut resp = Response::new(Full::new(document(&admin.roles)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The document as served: the static one, with the configured roles as the enum of `Role`
/// (any role of a new key) and `AccountRole` (the same but the organization admin's).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_json() {
        let v: Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(v["openapi"].as_str().map(|s| &s[..2]), Some("3."));
    }

    #[test]
    fn the_served_document_lists_the_configured_roles() {
        let roles = Roles::new(["admin", "member", "deployer"].map(String::from));
        let v: Value = serde_json::from_slice(&document(&roles)).unwrap();
        let schemas = &v["components"]["schemas"];
        assert_eq!(
            schemas["Role"]["enum"],
            json!(["admin", "member", "deployer", "admin-readonly"])
        );
        assert_eq!(
            schemas["AccountRole"]["enum"],
            json!(["member", "deployer", "admin-readonly"])
        );
    }
}
