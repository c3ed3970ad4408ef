//! `/v1/service-accounts`: service accounts and their keys. Creating and rotating return the
//! new key exactly once (`key`, `key_id`, `key_shown_once`); showing lists every key the
//! account has had, never a key itself; removing revokes them all.

use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::caller::Caller;
use super::error::{ApiError, Failure};
use super::request::{parse_json, present, Empty};
use super::{page, respond, Call, Outcome};
use crate::manage::{self, CreatedAccount, NewServiceAccount, RotateExpiry};
use crate::store::{KeyRecord, ServiceAccount, Store};

/// `GET /v1/service-accounts`: the accounts of the caller's tenant, or of the tenant asked for.
pub(super) async fn list(call: Call<'_>) -> Outcome {
    let tenant = call.caller.list_tenant(call.query.tenant.clone())?;
    let accounts = manage::list_service_accounts(call.store, tenant.as_deref()).await?;
    Ok(page(&accounts, &call.query))
}

/// `GET /v1/service-accounts/{id}`: the account and its keys' records.
pub(super) async fn show(call: Call<'_>) -> Outcome {
    let (account, keys) = visible(call.store, &call.caller, call.id).await?;
    let mut v = json!(account);
    v["keys"] = json!(keys);
    Ok(respond(StatusCode::OK, &v))
}

/// `POST /v1/service-accounts`: a new account and its first key.
pub(super) async fn create(call: Call<'_>) -> Outcome {
    let body: CreateAccount = parse_json(&call.body, false)?;
    let tenant = body
        .tenant
        .unwrap_or_else(|| call.caller.tenant().to_owned());
    call.caller.may_write(&tenant)?;
    let expires_at = expiry(
        body.expires_in.as_deref(),
        body.expires_at.as_deref(),
        body.never_expire,
        call.now,
    )?
    .unwrap_or(None);
    let new = NewServiceAccount {
        tenant,
        name: body.name,
        role: body.role,
        expires_at,
    };
    let created = manage::create_service_account(
        call.store,
        &call.admin.roles,
        new,
        call.now,
        call.caller.actor(),
    )
    .await?;
    Ok(respond(StatusCode::CREATED, &with_key(&created)))
}

/// `POST /v1/service-accounts/{id}/rotate`: a new key; the old ones stop working now, or when
/// the grace period ends.
pub(super) async fn rotate(call: Call<'_>) -> Outcome {
    let body: Rotate = parse_json(&call.body, true)?;
    let expiry = match expiry(
        body.expires_in.as_deref(),
        body.expires_at.as_deref(),
        body.never_expire,
        call.now,
    )? {
        None => RotateExpiry::SameLifetime,
        Some(None) => RotateExpiry::Never,
        Some(Some(at)) => RotateExpiry::At(at),
    };
    let grace = body.grace.as_deref().map(manage::parse_grace).transpose()?;
    visible(call.store, &call.caller, call.id).await?;
    let (id, now, actor) = (call.id, call.now, call.caller.actor());
    let rotated = manage::rotate_service_account(call.store, id, expiry, grace, now, actor).await?;
    Ok(respond(StatusCode::OK, &with_key(&rotated)))
}

/// `DELETE /v1/service-accounts/{id}`: the account goes, and every key it has stops working.
pub(super) async fn remove(call: Call<'_>) -> Outcome {
    let _: Empty = parse_json(&call.body, true)?;
    visible(call.store, &call.caller, call.id).await?;
    let (id, now, actor) = (call.id, call.now, call.caller.actor());
    let account = manage::remove_service_account(call.store, id, now, actor).await?;
    Ok(respond(StatusCode::OK, &json!(account)))
}

/// A service account the caller may see; others' are reported absent.
async fn visible(
    store: &dyn Store,
    caller: &Caller,
    id: &str,
) -> Result<(ServiceAccount, Vec<KeyRecord>), Failure> {
    let (account, keys) = manage::show_service_account(store, id).await?;
    if !caller.sees(&account.tenant) {
        return Err(ApiError::not_found("service account", id).into());
    }
    Ok((account, keys))
}

/// An account with its new key, shown this once.
fn with_key(created: &CreatedAccount) -> Value {
    let mut v = json!(created.account);
    v["key"] = json!(created.key.secret.expose());
    v["key_id"] = json!(created.key.record.id);
    v["key_shown_once"] = json!(true);
    v
}

/// `None`: no expiry given; `Some(None)`: never expires; `Some(Some(t))`: expires at `t`.
fn expiry(
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

/// The body of `POST /v1/service-accounts`.
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

/// The body of `POST /v1/service-accounts/{id}/rotate`.
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
    fn an_account_expiry_is_one_of_never_a_lifetime_or_a_time() {
        assert_eq!(expiry(None, None, None, 0).unwrap(), None);
        assert_eq!(expiry(None, None, Some(false), 0).unwrap(), None);
        assert_eq!(expiry(None, None, Some(true), 0).unwrap(), Some(None));
        assert_eq!(
            expiry(Some("1m"), None, None, 100).unwrap(),
            Some(Some(160))
        );
        assert_eq!(
            expiry(Some("1m"), None, Some(false), 100).unwrap(),
            Some(Some(160))
        );
        assert!(expiry(Some("1d"), None, Some(true), 0).is_err());
        assert!(expiry(None, Some("2030-01-01T00:00:00Z"), Some(true), 0).is_err());
    }
}
