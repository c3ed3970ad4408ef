//! Key management operations, shared by the CLI and the admin API: input validation, key
//! generation, the store calls, and the audit trail. The plaintext key leaves this module
//! exactly once, in [`CreatedKey`], for the caller to show to its owner.
//!
//! Every mutation takes an `actor` (`cli`, or the admin key id of an API call) and appends an
//! audit entry with its outcome, whether it succeeded or not, so no caller can forget to. An
//! audit write that fails is logged and does not undo the mutation, which has already
//! happened.

use std::time::{Duration, UNIX_EPOCH};

use crate::key::{self, KeyKind, Secret};
use crate::store::{self, AuditEntry, KeyRecord, OldKeys, ServiceAccount, Store, StoreError};

/// The audit actor of the command line.
pub const CLI_ACTOR: &str = "cli";

/// The organization admin role, which a service account can never have.
pub const ADMIN_ROLE: &str = "admin";

/// A management request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// An input is not acceptable.
    #[error("{field}: {message}")]
    Invalid {
        /// The input at fault.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// No record of that kind with that id.
    #[error("no {kind} with id {id}")]
    NotFound {
        /// `key` or `service account`.
        kind: &'static str,
        /// The id asked for.
        id: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ManageError {
    /// A stable code for the error (audit outcomes, API error bodies).
    pub fn code(&self) -> &'static str {
        match self {
            ManageError::Invalid { .. } => "invalid_request",
            ManageError::NotFound { .. } => "not_found",
            ManageError::Store(StoreError::Conflict(_)) => "conflict",
            ManageError::Store(_) => "store_unavailable",
        }
    }
}

fn not_found(kind: &'static str, id: &str) -> ManageError {
    ManageError::NotFound {
        kind,
        id: id.to_owned(),
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> ManageError {
    ManageError::Invalid {
        field,
        message: message.into(),
    }
}

/// What a new user key is for.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The tenant the key is bound to.
    pub tenant: String,
    /// The key's role in that tenant.
    pub role: String,
    /// Bookkeeping name.
    pub name: String,
    /// Who the key acts for; defaults to the key id.
    pub subject: Option<String>,
    /// Expiry (Unix seconds); `None` never expires.
    pub expires_at: Option<u64>,
}

/// A created key: its record and the plaintext, to be shown once.
#[derive(Debug)]
pub struct CreatedKey {
    /// The stored record.
    pub record: KeyRecord,
    /// The plaintext key.
    pub secret: Secret,
}

fn checked(field: &'static str, r: Result<(), String>) -> Result<(), ManageError> {
    r.map_err(|m| {
        let message = m.split_once(": ").map_or(m.as_str(), |(_, m)| m).to_owned();
        ManageError::Invalid { field, message }
    })
}

fn check_ident(field: &'static str, v: &str) -> Result<(), ManageError> {
    checked(field, store::check_ident(field, v))
}

fn check_subject(v: &str) -> Result<(), ManageError> {
    checked("subject", store::check_subject(v))
}

fn check_name(v: &str) -> Result<(), ManageError> {
    checked("name", store::check_name(v))
}

/// Parses a duration like `30d`, `12h` or `1500ms`.
pub fn parse_duration(d: &str) -> Result<Duration, ManageError> {
    humantime::parse_duration(d).map_err(|e| {
        invalid(
            "duration",
            format!("{d:?} is not a duration like 30d or 12h: {e}"),
        )
    })
}

/// Turns `--expires-in 30d` or `--expires-at 2030-01-01T00:00:00Z` into Unix seconds.
pub fn parse_expiry(
    expires_in: Option<&str>,
    expires_at: Option<&str>,
    now: u64,
) -> Result<Option<u64>, ManageError> {
    match (expires_in, expires_at) {
        (Some(_), Some(_)) => Err(invalid(
            "expires",
            "give --expires-in or --expires-at, not both",
        )),
        (Some(d), None) => {
            let d = humantime::parse_duration(d).map_err(|e| {
                invalid(
                    "expires_in",
                    format!("{d:?} is not a duration like 30d or 12h: {e}"),
                )
            })?;
            if d < Duration::from_secs(1) {
                return Err(invalid("expires_in", "must be at least 1s"));
            }
            Ok(Some(now.saturating_add(d.as_secs())))
        }
        (None, Some(t)) => {
            let at = humantime::parse_rfc3339_weak(t).map_err(|_| {
                invalid(
                    "expires_at",
                    format!("{t:?} is not an RFC 3339 UTC time like 2030-01-01T00:00:00Z"),
                )
            })?;
            let secs = at
                .duration_since(UNIX_EPOCH)
                .map_err(|_| invalid("expires_at", "before 1970"))?
                .as_secs();
            Ok(Some(secs))
        }
        (None, None) => Ok(None),
    }
}

/// Creates a user key.
pub async fn create_key(
    store: &dyn Store,
    new: NewKey,
    now: u64,
    actor: &str,
) -> Result<CreatedKey, ManageError> {
    let tenant = new.tenant.clone();
    let result = create_key_unaudited(store, new, now).await;
    let target = result.as_ref().map(|c| c.record.id.as_str()).unwrap_or("-");
    audit(store, actor, "keys.create", target, &tenant, &result, now).await;
    result
}

async fn create_key_unaudited(
    store: &dyn Store,
    new: NewKey,
    now: u64,
) -> Result<CreatedKey, ManageError> {
    check_ident("tenant", &new.tenant)?;
    check_ident("role", &new.role)?;
    check_name(&new.name)?;
    if let Some(s) = &new.subject {
        check_subject(s)?;
    }
    if new.expires_at.is_some_and(|e| e <= now) {
        return Err(invalid("expires_at", "is in the past"));
    }
    let generated = key::generate(KeyKind::User);
    let id = key::generate_id("key");
    let record = KeyRecord {
        subject: new.subject.unwrap_or_else(|| id.clone()),
        id,
        digest: generated.digest,
        name: new.name,
        tenant: new.tenant,
        role: new.role,
        kind: KeyKind::User,
        created_at: now,
        expires_at: new.expires_at,
        revoked_at: None,
        last_used_at: None,
    };
    store.insert(&record).await?;
    Ok(CreatedKey {
        record,
        secret: generated.secret,
    })
}

/// Shows one key's record.
pub async fn show_key(store: &dyn Store, id: &str) -> Result<KeyRecord, ManageError> {
    store.get(id).await?.ok_or_else(|| not_found("key", id))
}

/// Lists keys, optionally one tenant's.
pub async fn list_keys(
    store: &dyn Store,
    tenant: Option<&str>,
) -> Result<Vec<KeyRecord>, ManageError> {
    if let Some(t) = tenant {
        check_ident("tenant", t)?;
    }
    Ok(store.list(tenant).await?)
}

/// Revokes a key by id; revoking twice keeps the first revocation time.
pub async fn revoke_key(
    store: &dyn Store,
    id: &str,
    now: u64,
    actor: &str,
) -> Result<KeyRecord, ManageError> {
    let result = async {
        check_id("id", id)?;
        store
            .revoke(id, now)
            .await?
            .ok_or_else(|| not_found("key", id))
    }
    .await;
    let tenant = result.as_ref().map(|r| r.tenant.as_str()).unwrap_or("-");
    audit(store, actor, "keys.revoke", id, tenant, &result, now).await;
    result
}

/// Checks a record id given by a caller (it names Redis keys and goes into the audit trail).
fn check_id(field: &'static str, id: &str) -> Result<(), ManageError> {
    check_ident(field, id)
}

/// What a new service account is.
#[derive(Debug, Clone)]
pub struct NewServiceAccount {
    /// The tenant (organization) it belongs to.
    pub tenant: String,
    /// Its name, unique within the tenant regardless of case.
    pub name: String,
    /// The role its keys carry; never [`ADMIN_ROLE`].
    pub role: String,
    /// Expiry of its key (Unix seconds); `None` never expires.
    pub expires_at: Option<u64>,
}

/// A service account with its new key, to be shown once.
#[derive(Debug)]
pub struct CreatedAccount {
    /// The account as stored.
    pub account: ServiceAccount,
    /// Its new key.
    pub key: CreatedKey,
}

/// The expiry of a rotated service account's new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotateExpiry {
    /// The same lifetime as the key it replaces (never, if that one never expired).
    SameLifetime,
    /// Never expires.
    Never,
    /// Expires at this time (Unix seconds).
    At(u64),
}

/// Creates a service account and its first key.
pub async fn create_service_account(
    store: &dyn Store,
    new: NewServiceAccount,
    now: u64,
    actor: &str,
) -> Result<CreatedAccount, ManageError> {
    let tenant = new.tenant.clone();
    let result = create_account_unaudited(store, new, now).await;
    let target = result
        .as_ref()
        .map(|c| c.account.id.as_str())
        .unwrap_or("-");
    audit(
        store,
        actor,
        "service_accounts.create",
        target,
        &tenant,
        &result,
        now,
    )
    .await;
    result
}

async fn create_account_unaudited(
    store: &dyn Store,
    new: NewServiceAccount,
    now: u64,
) -> Result<CreatedAccount, ManageError> {
    check_ident("tenant", &new.tenant)?;
    check_ident("role", &new.role)?;
    check_name(&new.name)?;
    if new.role.eq_ignore_ascii_case(ADMIN_ROLE) {
        return Err(invalid(
            "role",
            "a service account can never have the organization admin role \"admin\"; give it a workspace role",
        ));
    }
    if new.expires_at.is_some_and(|e| e <= now) {
        return Err(invalid("expires_at", "is in the past"));
    }
    let id = key::generate_id("sa");
    let key = account_key(&id, &new.name, &new.tenant, &new.role, new.expires_at, now);
    let account = ServiceAccount {
        id,
        name: new.name,
        tenant: new.tenant,
        role: new.role,
        created_at: now,
        expires_at: new.expires_at,
        key_id: key.record.id.clone(),
    };
    store.create_account(&account, &key.record).await?;
    Ok(CreatedAccount { account, key })
}

/// A fresh service account key (not yet stored).
fn account_key(
    account_id: &str,
    name: &str,
    tenant: &str,
    role: &str,
    expires_at: Option<u64>,
    now: u64,
) -> CreatedKey {
    let generated = key::generate(KeyKind::ServiceAccount);
    CreatedKey {
        record: KeyRecord {
            id: key::generate_id("key"),
            digest: generated.digest,
            name: name.to_owned(),
            tenant: tenant.to_owned(),
            role: role.to_owned(),
            subject: account_id.to_owned(),
            kind: KeyKind::ServiceAccount,
            created_at: now,
            expires_at,
            revoked_at: None,
            last_used_at: None,
        },
        secret: generated.secret,
    }
}

/// Lists service accounts, optionally one tenant's.
pub async fn list_service_accounts(
    store: &dyn Store,
    tenant: Option<&str>,
) -> Result<Vec<ServiceAccount>, ManageError> {
    if let Some(t) = tenant {
        check_ident("tenant", t)?;
    }
    Ok(store.list_accounts(tenant).await?)
}

/// Shows a service account and every key it has had (never the keys themselves).
pub async fn show_service_account(
    store: &dyn Store,
    id: &str,
) -> Result<(ServiceAccount, Vec<KeyRecord>), ManageError> {
    check_id("id", id)?;
    let account = store
        .get_account(id)
        .await?
        .ok_or_else(|| not_found("service account", id))?;
    let keys = store.account_keys(id).await?;
    Ok((account, keys))
}

/// Issues a new key for a service account. Its other keys stop working at once, or, with a
/// `grace`, when the grace period ends (their expiry is brought forward to it).
pub async fn rotate_service_account(
    store: &dyn Store,
    id: &str,
    expiry: RotateExpiry,
    grace: Option<Duration>,
    now: u64,
    actor: &str,
) -> Result<CreatedAccount, ManageError> {
    let result = rotate_unaudited(store, id, expiry, grace, now).await;
    let tenant = result
        .as_ref()
        .map(|c| c.account.tenant.as_str())
        .unwrap_or("-");
    audit(
        store,
        actor,
        "service_accounts.rotate",
        id,
        tenant,
        &result,
        now,
    )
    .await;
    result
}

async fn rotate_unaudited(
    store: &dyn Store,
    id: &str,
    expiry: RotateExpiry,
    grace: Option<Duration>,
    now: u64,
) -> Result<CreatedAccount, ManageError> {
    check_id("id", id)?;
    let old = match grace {
        None => OldKeys::RevokeAt(now),
        Some(g) if g.is_zero() => OldKeys::RevokeAt(now),
        Some(g) if g > Duration::from_secs(366 * 86400) => {
            return Err(invalid("grace", "at most 366d"))
        }
        Some(g) => OldKeys::ExpireAt(now.saturating_add(g.as_secs().max(1))),
    };
    let account = store
        .get_account(id)
        .await?
        .ok_or_else(|| not_found("service account", id))?;
    let expires_at = match expiry {
        RotateExpiry::Never => None,
        RotateExpiry::At(t) if t <= now => return Err(invalid("expires_at", "is in the past")),
        RotateExpiry::At(t) => Some(t),
        RotateExpiry::SameLifetime => {
            let current = store.get(&account.key_id).await?;
            current
                .and_then(|k| Some(k.expires_at?.saturating_sub(k.created_at).max(1)))
                .map(|life| now.saturating_add(life))
        }
    };
    let key = account_key(
        &account.id,
        &account.name,
        &account.tenant,
        &account.role,
        expires_at,
        now,
    );
    let account = store
        .rotate_account(id, &key.record, old)
        .await?
        .ok_or_else(|| not_found("service account", id))?;
    Ok(CreatedAccount { account, key })
}

/// Deletes a service account and revokes every key it has.
pub async fn remove_service_account(
    store: &dyn Store,
    id: &str,
    now: u64,
    actor: &str,
) -> Result<ServiceAccount, ManageError> {
    let result = async {
        check_id("id", id)?;
        store
            .remove_account(id, now)
            .await?
            .ok_or_else(|| not_found("service account", id))
    }
    .await;
    let tenant = result.as_ref().map(|a| a.tenant.as_str()).unwrap_or("-");
    audit(
        store,
        actor,
        "service_accounts.remove",
        id,
        tenant,
        &result,
        now,
    )
    .await;
    result
}

/// The latest `limit` audit entries, oldest first.
pub async fn list_audit(store: &dyn Store, limit: usize) -> Result<Vec<AuditEntry>, ManageError> {
    Ok(store.list_audit(limit).await?)
}

/// Records a mutation refused before it started (an API key without the admin role), under
/// the tenant of the key that tried.
pub async fn audit_denied(
    store: &dyn Store,
    actor: &str,
    action: &str,
    target: &str,
    tenant: &str,
    now: u64,
) {
    audit_outcome(
        store,
        actor,
        action,
        target,
        tenant,
        "insufficient_scope",
        now,
    )
    .await;
}

/// Appends the outcome of a mutation to the audit trail. Ids and tenants given by a caller are
/// only recorded once they passed the identifier check, so the trail holds no garbage (and,
/// should someone paste a key where an id belongs, no key).
async fn audit<T>(
    store: &dyn Store,
    actor: &str,
    action: &str,
    target: &str,
    tenant: &str,
    result: &Result<T, ManageError>,
    now: u64,
) {
    let outcome = match result {
        Ok(_) => "success",
        Err(e) => e.code(),
    };
    audit_outcome(store, actor, action, target, tenant, outcome, now).await;
}

async fn audit_outcome(
    store: &dyn Store,
    actor: &str,
    action: &str,
    target: &str,
    tenant: &str,
    outcome: &str,
    now: u64,
) {
    let clean = |v: &str| {
        if store::check_ident("", v).is_ok() {
            v.to_owned()
        } else {
            "-".to_owned()
        }
    };
    let entry = AuditEntry {
        at: now,
        actor: clean(actor),
        action: action.to_owned(),
        target: clean(target),
        tenant: clean(tenant),
        outcome: outcome.to_owned(),
    };
    if let Err(e) = store.append_audit(&entry).await {
        tracing::warn!(error = %e, action, target = %entry.target, "cannot append to the audit trail");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_inputs_are_parsed() {
        assert_eq!(parse_expiry(None, None, 100).unwrap(), None);
        assert_eq!(parse_expiry(Some("1m"), None, 100).unwrap(), Some(160));
        assert_eq!(
            parse_expiry(Some("30d"), None, 0).unwrap(),
            Some(30 * 86400)
        );
        assert_eq!(
            parse_expiry(None, Some("1970-01-02T00:00:00Z"), 0).unwrap(),
            Some(86400)
        );
        assert!(parse_expiry(Some("1d"), Some("2030-01-01T00:00:00Z"), 0).is_err());
        assert!(parse_expiry(Some("soon"), None, 0).is_err());
        assert!(parse_expiry(None, Some("tomorrow"), 0).is_err());
    }

    #[test]
    fn identifiers_are_checked() {
        assert!(check_ident("tenant", "acme-1.prod_x").is_ok());
        for bad in ["", "a b", "a/b", "ä", &"x".repeat(65)] {
            assert!(check_ident("tenant", bad).is_err(), "{bad}");
        }
        assert!(check_subject("alice@example.com").is_ok());
        assert!(check_subject("a\r\nb").is_err());
        assert!(check_name("CI deploy key ✓").is_ok());
        assert!(check_name("a\nb").is_err());
        assert!(check_name("  ").is_err());
    }
}
