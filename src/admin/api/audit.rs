//! `/v1/audit`: the latest entries of the audit trail, oldest first. An operator sees every
//! tenant's; a tenant's admin only its own tenant's.

use http::StatusCode;
use serde_json::json;

use super::{respond, Call, Outcome};
use crate::manage;
use crate::store;

/// `GET /v1/audit`.
pub(super) async fn list(call: Call<'_>) -> Outcome {
    let limit = call.query.limit;
    // A tenant's admin sees its tenant's entries: read more, then keep its own.
    let read = if call.caller.sees_every_tenant() {
        limit
    } else {
        store::redis::AUDIT_MAX_LEN
    };
    let mut entries = manage::list_audit(call.store, read).await?;
    entries.retain(|e| call.caller.sees(&e.tenant));
    let skip = entries.len().saturating_sub(limit);
    Ok(respond(
        StatusCode::OK,
        &json!({ "items": &entries[skip..], "next_cursor": null }),
    ))
}
