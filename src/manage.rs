//! Key management operations, shared by the CLI and the admin API: input validation, key
//! generation, the store calls, and the audit trail. The plaintext key leaves this module
//! exactly once, in [`CreatedKey`], for the caller to show to its owner.
//!
//! Every mutation takes an `actor` (`cli`, or the admin key id of an API call) and appends an
//! audit entry with its outcome, whether it succeeded or not, so no caller can forget to. An
//! audit write that fails is logged and does not undo the mutation, which has already
//! happened.
//!
//! A value that looks like an API key, given where an id, a tenant, a role, a subject or a name
//! belongs (someone pasted the wrong thing), is refused with "that is an API key, not …": it is
//! never repeated in the error, stored, or written to the audit trail. No error message here
//! repeats an input that failed its check, so none can repeat a key.

use std::time::Duration;

use crate::key::{self, KeyKind, Secret, Token};
use crate::policy::{self, Roles};
use crate::store::{self, AuditEntry, KeyRecord, OldKeys, ServiceAccount, Store, StoreError};

/// The audit actor of the command line.
pub const CLI_ACTOR: &str = "cli";

/// The longest grace period of a rotation.
pub const MAX_GRACE: Duration = Duration::from_secs(366 * 86400);

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

/// Whether a value given where an id, a tenant, a role, a subject or a name belongs could be an
/// API key: it holds a key's type prefix (in any case) or parses as a key.
pub fn looks_like_key(v: &str) -> bool {
    let lower = v.to_ascii_lowercase();
    [KeyKind::User, KeyKind::ServiceAccount]
        .iter()
        .any(|k| lower.contains(k.prefix()))
        || Token::parse(v.trim().as_bytes()).is_ok()
}

/// Refuses a pasted key where `what` belongs, without repeating it.
fn not_a_key(field: &'static str, v: &str, what: &str) -> Result<(), ManageError> {
    if looks_like_key(v) {
        return Err(invalid(
            field,
            format!("that is an API key, not {what}; it is neither repeated nor recorded"),
        ));
    }
    Ok(())
}

fn checked(field: &'static str, r: Result<(), String>) -> Result<(), ManageError> {
    r.map_err(|m| {
        let message = m.split_once(": ").map_or(m.as_str(), |(_, m)| m).to_owned();
        ManageError::Invalid { field, message }
    })
}

/// Checks an identifier (a tenant), refusing a pasted key first.
pub fn check_ident(field: &'static str, v: &str) -> Result<(), ManageError> {
    not_a_key(field, v, &format!("a {field}"))?;
    checked(field, store::check_ident(field, v))
}

fn check_subject(v: &str) -> Result<(), ManageError> {
    not_a_key("subject", v, "a subject")?;
    checked("subject", store::check_subject(v))
}

fn check_name(v: &str) -> Result<(), ManageError> {
    not_a_key("name", v, "a name")?;
    checked("name", store::check_name(v))
}

/// Checks the role of a new key: one the configuration defines, or one of the admin API's.
fn check_role(roles: &Roles, role: &str) -> Result<(), ManageError> {
    not_a_key("role", role, "a role")?;
    if store::check_ident("role", role).is_err() {
        // Not repeated: it is no identifier, and could be anything.
        return Err(invalid(
            "role",
            format!(
                "not a role of this configuration; known roles: {}",
                roles.describe()
            ),
        ));
    }
    roles.check(role).map_err(|m| invalid("role", m))
}

/// Parses a span written as a whole number and one unit, `s`, `m`, `h` or `d` (`30d`, `12h`,
/// `90m`, `45s`), with no sign, no leading zero and at most `max_digits` digits. The admin API's
/// document states the same grammar as a pattern, so both accept exactly the same strings.
fn parse_span(v: &str, max_digits: usize) -> Option<Duration> {
    // Bytes, not chars: the last one must be an ASCII unit, so what precedes it is a whole
    // string even when the input is not ASCII.
    let (unit, digits) = v.as_bytes().split_last()?;
    let unit = match unit {
        b's' => 1,
        b'm' => 60,
        b'h' => 3600,
        b'd' => 86400,
        _ => return None,
    };
    let digits = std::str::from_utf8(digits).ok()?;
    let shaped = !digits.is_empty()
        && digits.len() <= max_digits
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if !shaped {
        return None;
    }
    Some(Duration::from_secs(digits.parse::<u64>().ok()? * unit))
}

/// Parses a rotation's grace period: `0s` (none) up to [`MAX_GRACE`], e.g. `10m`.
pub fn parse_grace(v: &str) -> Result<Duration, ManageError> {
    parse_span(v, 8)
        .filter(|d| *d <= MAX_GRACE)
        .ok_or_else(|| {
            invalid(
                "grace",
                "a duration from 0s to 366d, written as a whole number and one unit (s, m, h or d), like 10m or 12h",
            )
        })
}

/// Parses a key lifetime, e.g. `30d`: at least `1s`, at most six digits and one unit.
pub fn parse_lifetime(v: &str) -> Result<Duration, ManageError> {
    parse_span(v, 6)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            invalid(
                "expires_in",
                "a lifetime written as a whole number from 1 and one unit (s, m, h or d), like 30d or 12h",
            )
        })
}

/// Parses an expiry written as an RFC 3339 UTC time to the second, `2030-01-01T00:00:00Z`
/// (from 1970 on), into Unix seconds.
pub fn parse_time(t: &str) -> Result<u64, ManageError> {
    let b = t.as_bytes();
    let shaped = b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    let at = shaped.then(|| store::parse_time(t)).flatten();
    at.ok_or_else(|| {
        invalid(
            "expires_at",
            "a UTC time to the second from 1970 on, like 2030-01-01T00:00:00Z",
        )
    })
}

/// Turns an `expires_in` lifetime (`30d`) or an `expires_at` time (`2030-01-01T00:00:00Z`),
/// at most one of them, into the expiry in Unix seconds; `None` never expires.
pub fn parse_expiry(
    expires_in: Option<&str>,
    expires_at: Option<&str>,
    now: u64,
) -> Result<Option<u64>, ManageError> {
    match (expires_in, expires_at) {
        (Some(_), Some(_)) => Err(invalid(
            "expires_in",
            "give expires_in or expires_at, not both",
        )),
        (Some(d), None) => Ok(Some(now.saturating_add(parse_lifetime(d)?.as_secs()))),
        (None, Some(t)) => Ok(Some(parse_time(t)?)),
        (None, None) => Ok(None),
    }
}

/// Creates a user key with one of the known `roles`.
pub async fn create_key(
    store: &dyn Store,
    roles: &Roles,
    new: NewKey,
    now: u64,
    actor: &str,
) -> Result<CreatedKey, ManageError> {
    let tenant = new.tenant.clone();
    let result = create_key_unaudited(store, roles, new, now).await;
    let target = result.as_ref().map(|c| c.record.id.as_str()).unwrap_or("-");
    audit(store, actor, "keys.create", target, &tenant, &result, now).await;
    result
}

async fn create_key_unaudited(
    store: &dyn Store,
    roles: &Roles,
    new: NewKey,
    now: u64,
) -> Result<CreatedKey, ManageError> {
    check_ident("tenant", &new.tenant)?;
    check_role(roles, &new.role)?;
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
    check_id(id, KEY_ID)?;
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

/// What revoking a key did.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// The key's record, revoked.
    pub record: KeyRecord,
    /// It was revoked before (at `record.revoked_at`): nothing changed.
    pub already: bool,
}

/// Revokes a key by id. Revoking a revoked key changes nothing (it keeps its first revocation
/// time) and says so.
pub async fn revoke_key(
    store: &dyn Store,
    id: &str,
    now: u64,
    actor: &str,
) -> Result<Revocation, ManageError> {
    let result: Result<Revocation, ManageError> = async {
        check_id(id, KEY_ID)?;
        let current = store.get(id).await?.ok_or_else(|| not_found("key", id))?;
        if current.revoked_at.is_some() {
            return Ok(Revocation {
                record: current,
                already: true,
            });
        }
        let record = store
            .revoke(id, now)
            .await?
            .ok_or_else(|| not_found("key", id))?;
        Ok(Revocation {
            record,
            already: false,
        })
    }
    .await;
    let tenant = result
        .as_ref()
        .map(|r| r.record.tenant.as_str())
        .unwrap_or("-");
    let outcome = match &result {
        Ok(r) if r.already => "already_revoked",
        Ok(_) => "success",
        Err(e) => e.code(),
    };
    audit_outcome(store, actor, "keys.revoke", id, tenant, outcome, now).await;
    result
}

/// What a key id is, for the message refusing a pasted key.
const KEY_ID: &str = "a key id (key_…)";
/// What a service account id is, likewise.
const ACCOUNT_ID: &str = "a service account id (sa_…)";

/// Checks a record id given by a caller (it names Redis keys and goes into the audit trail):
/// `what` says what was expected when a pasted key is refused.
fn check_id(id: &str, what: &str) -> Result<(), ManageError> {
    not_a_key("id", id, what)?;
    checked("id", store::check_ident("id", id))
}

/// Checks a key id given by a caller, refusing a pasted key without repeating it.
pub fn check_key_id(id: &str) -> Result<(), ManageError> {
    check_id(id, KEY_ID)
}

/// Checks a service account id given by a caller, likewise.
pub fn check_account_id(id: &str) -> Result<(), ManageError> {
    check_id(id, ACCOUNT_ID)
}

/// What a new service account is.
#[derive(Debug, Clone)]
pub struct NewServiceAccount {
    /// The tenant (organization) it belongs to.
    pub tenant: String,
    /// Its name, unique within the tenant regardless of case.
    pub name: String,
    /// The role its keys carry; never [`policy::ADMIN`].
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

/// Creates a service account, with one of the known `roles` but the organization admin's,
/// and its first key.
pub async fn create_service_account(
    store: &dyn Store,
    roles: &Roles,
    new: NewServiceAccount,
    now: u64,
    actor: &str,
) -> Result<CreatedAccount, ManageError> {
    let tenant = new.tenant.clone();
    let result = create_account_unaudited(store, roles, new, now).await;
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
    roles: &Roles,
    new: NewServiceAccount,
    now: u64,
) -> Result<CreatedAccount, ManageError> {
    check_ident("tenant", &new.tenant)?;
    not_a_key("role", &new.role, "a role")?;
    if policy::is_organization_admin(&new.role) {
        return Err(invalid(
            "role",
            format!(
                "a service account can never have the organization admin role {:?}; give it a workspace role",
                policy::ADMIN
            ),
        ));
    }
    check_role(roles, &new.role)?;
    check_name(&new.name)?;
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
    check_id(id, ACCOUNT_ID)?;
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
    check_id(id, ACCOUNT_ID)?;
    let old = match grace {
        None => OldKeys::RevokeAt(now),
        Some(g) if g.is_zero() => OldKeys::RevokeAt(now),
        Some(g) if g > MAX_GRACE => return Err(invalid("grace", "at most 366d")),
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
        check_id(id, ACCOUNT_ID)?;
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
/// recorded only when they are identifiers and do not look like keys, so the trail holds no
/// garbage and, should someone paste a key where an id belongs, no key.
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
        if store::check_ident("", v).is_ok() && !looks_like_key(v) {
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

    /// The grammar of the OpenAPI document's patterns, at its edges.
    #[test]
    fn spans_and_times_follow_one_exact_grammar() {
        for ok in ["1s", "9m", "30d", "12h", "999999d"] {
            assert!(parse_lifetime(ok).is_ok(), "{ok}");
        }
        for bad in [
            "0s",
            "",
            "d",
            "1",
            "01d",
            "1000000d",
            "-1d",
            "+1d",
            "1 d",
            "1ms",
            "1w",
            "1D",
            "1h30m",
            " 1d",
            "1d ",
            "é",
            "1é",
            "\u{1f600}s",
            "\u{df}\\\u{c3}",
        ] {
            assert!(parse_lifetime(bad).is_err(), "{bad:?}");
        }
        for ok in ["0s", "0d", "10m", "366d", "8784h", "527040m", "31622400s"] {
            assert!(parse_grace(ok).is_ok(), "{ok}");
        }
        for bad in [
            "367d",
            "8785h",
            "527041m",
            "31622401s",
            "00s",
            "999999999s",
            "1y",
        ] {
            assert!(parse_grace(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_time("2030-01-01T00:00:00Z").unwrap(), 1_893_456_000);
        for bad in [
            "2030-01-01T00:00:00",
            "2030-01-01 00:00:00Z",
            "2030-01-01T00:00:00.5Z",
            "2030-01-01T00:00:00+00:00",
            "2030-02-30T00:00:00Z",
            "2030-13-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "2030-01-01t00:00:00z",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pasted_keys_are_recognised_and_never_repeated() {
        let k = key::generate(KeyKind::ServiceAccount);
        let key = k.secret.expose();
        for v in [
            key.to_owned(),
            format!(" {key}\n"),
            key.to_uppercase(),
            "kgu_x".into(),
        ] {
            assert!(looks_like_key(&v), "{v}");
            let e = check_id(&v, KEY_ID).unwrap_err().to_string();
            assert!(e.contains("that is an API key, not a key id"), "{e}");
            assert!(!e.contains(&key[4..12]), "{e}");
        }
        for id in ["key_3fJ9aB", "sa_x", "acme", "kg_u"] {
            assert!(!looks_like_key(id), "{id}");
        }
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
