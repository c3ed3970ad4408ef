//! Where key records live. The [`Store`] trait is all the rest of keygate knows of a store:
//! the verifier asks it to look a digest up, the CLI (and later the admin API) to create, list,
//! show and revoke. A store never sees a plaintext key and knows nothing about HTTP.

pub mod redis;

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Serialize;

use crate::key::{KeyDigest, KeyKind};

/// Everything known about a key except the key itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyRecord {
    /// Public, non-secret id (`key_…`).
    pub id: String,
    /// SHA-256 of the key; never shown in listings.
    #[serde(skip)]
    pub digest: KeyDigest,
    /// Bookkeeping name.
    pub name: String,
    /// The tenant the key is bound to.
    pub tenant: String,
    /// The key's role in its tenant.
    pub role: String,
    /// Who the key acts for (a user name or a service account id).
    pub subject: String,
    /// User key or service account key.
    pub kind: KeyKind,
    /// Creation time, Unix seconds.
    #[serde(serialize_with = "ser_time")]
    pub created_at: u64,
    /// Expiry, Unix seconds; `None` never expires.
    #[serde(serialize_with = "ser_opt_time")]
    pub expires_at: Option<u64>,
    /// Revocation time, Unix seconds, once revoked.
    #[serde(serialize_with = "ser_opt_time")]
    pub revoked_at: Option<u64>,
}

impl KeyRecord {
    /// Whether the key has expired at `now` (Unix seconds).
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|e| now >= e)
    }
}

/// A store operation failed; the request path answers these with `503`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with data keygate cannot read.
    #[error("corrupt record in store: {0}")]
    Corrupt(String),
    /// The operation conflicts with existing data (e.g. a duplicate id).
    #[error("conflict: {0}")]
    Conflict(String),
}

/// The storage interface shared by every backend.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Finds the record for a digest; `Ok(None)` when no such key exists.
    async fn lookup(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError>;
    /// Adds a new record.
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError>;
    /// Finds a record by its public id.
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Lists records, oldest first, optionally only one tenant's.
    async fn list(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, StoreError>;
    /// Marks a key revoked at `at` (kept if already revoked); `Ok(None)` for an unknown id.
    async fn revoke(&self, id: &str, at: u64) -> Result<Option<KeyRecord>, StoreError>;
    /// Checks that the store answers, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// The current time in Unix seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Formats Unix seconds as RFC 3339 (UTC).
pub fn format_time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

fn ser_time<S: serde::Serializer>(t: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(*t))
}

fn ser_opt_time<S: serde::Serializer>(t: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&format_time(*t)),
        None => s.serialize_none(),
    }
}

/// Opens the configured store.
pub fn open(
    settings: &crate::config::StoreSettings,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    match settings {
        crate::config::StoreSettings::Redis(r) => {
            Ok(std::sync::Arc::new(redis::RedisStore::new(r)?))
        }
    }
}
