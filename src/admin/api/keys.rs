//! `/v1/keys`: user keys. Listing and showing never return a key; creating one returns it
//! exactly once (`key`, with `key_shown_once`); revoking is by id and idempotent.

use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::caller::Caller;
use super::error::{ApiError, Failure};
use super::request::{parse_json, present, Empty};
use super::{page, respond, Call, Outcome};
use crate::manage::{self, NewKey};
use crate::store::{KeyRecord, Store};

/// `GET /v1/keys`: the keys of the caller's tenant, or of the tenant asked for.
pub(super) async fn list(call: Call<'_>) -> Outcome {
    let tenant = call.caller.list_tenant(call.query.tenant.clone())?;
    let records = manage::list_keys(call.store, tenant.as_deref()).await?;
    Ok(page(&records, &call.query))
}

/// `GET /v1/keys/{id}`.
pub(super) async fn show(call: Call<'_>) -> Outcome {
    let record = visible(call.store, &call.caller, call.id).await?;
    Ok(respond(StatusCode::OK, &json!(record)))
}

/// `POST /v1/keys`: a new key, in the caller's tenant unless the body names another it may
/// manage.
pub(super) async fn create(call: Call<'_>) -> Outcome {
    let body: CreateKey = parse_json(&call.body, false)?;
    let tenant = body
        .tenant
        .unwrap_or_else(|| call.caller.tenant().to_owned());
    call.caller.may_write(&tenant)?;
    let expires_at = manage::parse_expiry(
        body.expires_in.as_deref(),
        body.expires_at.as_deref(),
        call.now,
    )?;
    let new = NewKey {
        tenant,
        role: body.role,
        name: body.name,
        subject: body.subject,
        expires_at,
    };
    let created = manage::create_key(
        call.store,
        &call.admin.roles,
        new,
        call.now,
        call.caller.actor(),
    )
    .await?;
    let mut v = json!(created.record);
    v["key"] = json!(created.secret.expose());
    v["key_shown_once"] = json!(true);
    Ok(respond(StatusCode::CREATED, &v))
}

/// `POST /v1/keys/{id}/revoke`. Revoking a revoked key answers its record, unchanged.
pub(super) async fn revoke(call: Call<'_>) -> Outcome {
    let _: Empty = parse_json(&call.body, true)?;
    visible(call.store, &call.caller, call.id).await?;
    let revoked = manage::revoke_key(call.store, call.id, call.now, call.caller.actor()).await?;
    Ok(respond(StatusCode::OK, &json!(revoked.record)))
}

/// A key the caller may see; others' are reported absent.
async fn visible(store: &dyn Store, caller: &Caller, id: &str) -> Result<KeyRecord, Failure> {
    let record = manage::show_key(store, id).await?;
    if !caller.sees(&record.tenant) {
        return Err(ApiError::not_found("key", id).into());
    }
    Ok(record)
}

/// The body of `POST /v1/keys`.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
