//! Where key records live. The [`Store`] trait is all the rest of keygate knows of a store:
//! the verifier asks it to look a digest up; the CLI and the admin API (through
//! [`crate::manage`]) create, list, show and revoke keys, manage service accounts and append to
//! the audit trail. A store never sees a plaintext key and knows nothing about HTTP.
//!
//! Promise of every mutation that can change a verdict (create, revoke, rotate, remove): the
//! write and its invalidation are one step, so no running instance keeps serving the old
//! verdict once the write is visible.

mod cluster;
pub mod file;
pub mod redis;
pub(crate) mod sentinel;
mod subscriber;

use std::sync::Arc;
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
    /// When the key was last seen in a request, Unix seconds, recorded at most once per
    /// `store.last_used_interval` (so up to that much behind); `None`: never used.
    #[serde(serialize_with = "ser_opt_time")]
    pub last_used_at: Option<u64>,
}

#[cfg(test)]
impl KeyRecord {
    /// A live user key of `alice` in tenant `acme` with role `admin`, for unit tests.
    pub(crate) fn example(digest: KeyDigest) -> Self {
        KeyRecord {
            id: "key_1".into(),
            digest,
            name: "n".into(),
            tenant: "acme".into(),
            role: "admin".into(),
            subject: "alice".into(),
            kind: KeyKind::User,
            created_at: 1,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
        }
    }
}

impl KeyRecord {
    /// Whether the key has expired at `now` (Unix seconds).
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|e| now >= e)
    }
}

/// A service account: a non-user account of a tenant, known to the proxy only through its keys
/// (kind `service_account`, subject = the account id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceAccount {
    /// Public id (`sa_…`).
    pub id: String,
    /// Name, unique within the tenant regardless of case.
    pub name: String,
    /// The tenant (organization) the account belongs to.
    pub tenant: String,
    /// The role its keys carry; never the organization admin role.
    pub role: String,
    /// Creation time, Unix seconds.
    #[serde(serialize_with = "ser_time")]
    pub created_at: u64,
    /// Expiry of the current key, Unix seconds; `None` never expires.
    #[serde(serialize_with = "ser_opt_time")]
    pub expires_at: Option<u64>,
    /// Id of the current key (the latest created or rotated).
    pub key_id: String,
}

impl ServiceAccount {
    /// The form of the name that must be unique within a tenant.
    pub fn name_key(name: &str) -> String {
        name.to_lowercase()
    }
}

/// What happens to a service account's previous keys when it is rotated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldKeys {
    /// Revoked at this time (Unix seconds): they stop working at once.
    RevokeAt(u64),
    /// Kept working until this time (Unix seconds), then expired: the grace period.
    ExpireAt(u64),
}

/// One line of the audit trail: who did what to which record, when, and how it went. Never
/// holds a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// When, Unix seconds.
    #[serde(
        serialize_with = "ser_time",
        deserialize_with = "de_time",
        rename = "time"
    )]
    pub at: u64,
    /// `cli`, or the id of the admin key that made the API call.
    pub actor: String,
    /// E.g. `keys.create`, `service_accounts.rotate`.
    pub action: String,
    /// Id of the affected record (`-` when the request never got as far as one).
    pub target: String,
    /// Tenant of the affected record (`-` when unknown).
    pub tenant: String,
    /// `success`, or the error code of the failure.
    pub outcome: String,
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
    /// The store can be read but not written (a keys file on a read-only mount).
    #[error("{0}")]
    ReadOnly(String),
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

    /// Creates a service account together with its first key, and announces the key; fails
    /// with [`StoreError::Conflict`] if the tenant already has an account of that name
    /// (compared with [`ServiceAccount::name_key`]).
    async fn create_account(
        &self,
        account: &ServiceAccount,
        key: &KeyRecord,
    ) -> Result<(), StoreError> {
        let _ = (account, key);
        Err(unsupported())
    }
    /// Finds a service account by id.
    async fn get_account(&self, id: &str) -> Result<Option<ServiceAccount>, StoreError> {
        let _ = id;
        Err(unsupported())
    }
    /// Lists service accounts, oldest first, optionally only one tenant's.
    async fn list_accounts(&self, tenant: Option<&str>) -> Result<Vec<ServiceAccount>, StoreError> {
        let _ = tenant;
        Err(unsupported())
    }
    /// Adds `new_key` as the account's current key and applies `old` to every other key of the
    /// account that is not revoked yet, announcing every changed key, in one step. Returns the
    /// updated account; `Ok(None)` for an unknown id.
    async fn rotate_account(
        &self,
        id: &str,
        new_key: &KeyRecord,
        old: OldKeys,
    ) -> Result<Option<ServiceAccount>, StoreError> {
        let _ = (id, new_key, old);
        Err(unsupported())
    }
    /// Deletes a service account and revokes every key of it at `at`, announcing them, in one
    /// step. Returns the removed account; `Ok(None)` for an unknown id.
    async fn remove_account(
        &self,
        id: &str,
        at: u64,
    ) -> Result<Option<ServiceAccount>, StoreError> {
        let _ = (id, at);
        Err(unsupported())
    }
    /// The keys of a service account, oldest first.
    async fn account_keys(&self, id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let _ = id;
        Err(unsupported())
    }

    /// Records when keys were last used: sets each record's `last_used_at` to the given time
    /// unless it is already later. Not an invalidation (no verdict depends on it), and keys
    /// that do not exist are skipped.
    async fn touch(&self, used: &[(KeyDigest, u64)]) -> Result<(), StoreError> {
        let _ = used;
        Ok(())
    }

    /// Appends an entry to the audit trail.
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let _ = entry;
        Err(unsupported())
    }
    /// The latest `limit` audit entries, oldest first.
    async fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let _ = limit;
        Err(unsupported())
    }

    /// Starts the store's background work (reloading a file, following invalidations),
    /// reporting every key whose record may have changed to `sink`. Called once by the server.
    fn start(self: Arc<Self>, sink: Arc<dyn InvalidationSink>) -> Result<(), StoreError> {
        let _ = sink;
        Ok(())
    }

    /// Problems that do not stop the store from serving (shown by `/readyz`).
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// Whether the store can only be read (a keys file on a read-only mount): last-used
    /// times are then kept in memory only, and writes fail.
    fn read_only(&self) -> bool {
        false
    }
}

/// For stores that hold only keys (test doubles, benchmarks).
fn unsupported() -> StoreError {
    StoreError::Unavailable("this store supports keys only".into())
}

/// Checks an identifier that also travels in headers (ids, tenants, roles).
pub fn check_ident(field: &str, v: &str) -> Result<(), String> {
    if v.is_empty()
        || v.len() > 64
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!(
            "{field}: 1 to 64 characters of letters, digits and -_."
        ));
    }
    Ok(())
}

/// Checks a subject (a user name or account id; travels in a header).
pub fn check_subject(v: &str) -> Result<(), String> {
    if v.is_empty()
        || v.len() > 128
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@:+".contains(&b))
    {
        return Err("subject: 1 to 128 characters of letters, digits and -_.@:+".into());
    }
    Ok(())
}

/// Checks a bookkeeping name.
pub fn check_name(v: &str) -> Result<(), String> {
    if v.trim().is_empty() || v.chars().count() > 128 || v.chars().any(char::is_control) {
        return Err("name: 1 to 128 characters, no control characters".into());
    }
    Ok(())
}

/// Receives "this key's record may have changed" from a store's background work; the
/// verifier implements it by evicting the cached verdicts.
#[async_trait]
pub trait InvalidationSink: Send + Sync + 'static {
    /// One key's record changed (created, revoked, edited or removed).
    async fn invalidate(&self, digest: &KeyDigest);
    /// One key was revoked. A revocation is final, so the sink may hold the verdict itself
    /// instead of reading the record again; by default it just evicts.
    async fn revoked(&self, digest: &KeyDigest) {
        self.invalidate(digest).await
    }
    /// Any record may have changed (e.g. invalidations were missed while disconnected).
    fn invalidate_all(&self);
    /// The store's invalidation feed went up or down.
    fn link(&self, up: bool);
    /// Every invalidation published before `at` has been applied (or covered by a flush): the
    /// feed was known good at `at`. A store that reports this promises to keep reporting it
    /// while the feed is good; from then on cached verdicts are trusted only for
    /// `cache.trust_while_unsubscribed` after the latest `at`, whether or not a failure has
    /// been noticed. Stores without such a feed never call it.
    fn synced(&self, at: std::time::Instant) {
        let _ = at;
    }
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

/// Parses an RFC 3339 UTC time into Unix seconds.
pub fn parse_time(s: &str) -> Option<u64> {
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
}

fn de_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    parse_time(&s).ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not an RFC 3339 time")))
}

fn ser_opt_time<S: serde::Serializer>(t: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&format_time(*t)),
        None => s.serialize_none(),
    }
}

/// Which store to use.
#[derive(Debug, Clone)]
pub enum StoreSettings {
    /// Redis.
    Redis(redis::RedisSettings),
    /// Redis, on the master Redis Sentinel names.
    Sentinel(redis::SentinelSettings),
    /// Redis Cluster.
    Cluster(redis::ClusterSettings),
    /// The embedded file store at this path.
    File(std::path::PathBuf),
}

/// Opens the configured store. A keys file must exist unless `create_file` is set (the
/// key-management commands create it; `serve` refuses a missing one, so a typo in the path is
/// not mistaken for an empty key set).
pub fn open(settings: &StoreSettings, create_file: bool) -> Result<Arc<dyn Store>, StoreError> {
    match settings {
        StoreSettings::Redis(r) => Ok(Arc::new(redis::RedisStore::new(r)?)),
        StoreSettings::Sentinel(s) => Ok(Arc::new(redis::RedisStore::with_sentinels(s)?)),
        StoreSettings::Cluster(c) => Ok(Arc::new(redis::RedisStore::on_cluster(c)?)),
        StoreSettings::File(path) => Ok(Arc::new(file::FileStore::open(path, create_file)?)),
    }
}
