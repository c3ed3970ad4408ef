//! Key management operations, shared by the CLI (and later the admin API): input validation,
//! key generation, and the store calls. The plaintext key leaves this module exactly once, in
//! [`CreatedKey`], for the caller to show to its owner.

use std::time::{Duration, UNIX_EPOCH};

use crate::key::{self, KeyKind, Secret};
use crate::store::{self, KeyRecord, Store, StoreError};

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
    /// No key with that id.
    #[error("no key with id {0}")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
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
    };
    store.insert(&record).await?;
    Ok(CreatedKey {
        record,
        secret: generated.secret,
    })
}

/// Shows one key's record.
pub async fn show_key(store: &dyn Store, id: &str) -> Result<KeyRecord, ManageError> {
    store
        .get(id)
        .await?
        .ok_or_else(|| ManageError::NotFound(id.to_owned()))
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
pub async fn revoke_key(store: &dyn Store, id: &str, now: u64) -> Result<KeyRecord, ManageError> {
    store
        .revoke(id, now)
        .await?
        .ok_or_else(|| ManageError::NotFound(id.to_owned()))
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
