//! The Redis store: the production backend.
//!
//! Data model (all keys under the configured namespace `ns`):
//! - `ns:key:<sha256 hex>`: a hash with the record's fields (`id`, `name`, `tenant`, `role`,
//!   `subject`, `kind`, `created_at`, `expires_at`, `revoked_at`; times in Unix seconds, absent
//!   fields are unset). The request path reads it with one `HGETALL`.
//! - `ns:id:<key id>`: a string holding the sha256 hex of that key, to find a record by id.
//! - `ns:ids`: a sorted set of key ids scored by creation time, for listing.
//!
//! Every call goes over one multiplexed connection (reconnected on failure) and is bounded by
//! the configured timeout, so a dead Redis yields an error, never a hang.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::{KeyRecord, Store, StoreError};
use crate::key::{KeyDigest, KeyKind};

/// Marks a key revoked by id, atomically: resolves the id, sets `revoked_at` unless it is
/// already set, and returns the digest hex (nil for an unknown id).
const REVOKE_SCRIPT: &str = r#"
local hex = redis.call('GET', KEYS[1])
if not hex then return false end
redis.call('HSETNX', ARGV[1] .. hex, 'revoked_at', ARGV[2])
return hex
"#;

/// Settings for [`RedisStore`].
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL.
    pub url: String,
    /// Prefix of every key keygate writes.
    pub namespace: String,
    /// Bound on every command, connection set-up included.
    pub timeout: Duration,
}

/// A [`Store`] on a standalone Redis server.
pub struct RedisStore {
    conn: ConnectionManager,
    ns: String,
    timeout: Duration,
    revoke: Script,
}

impl RedisStore {
    /// Creates the store without connecting: keygate starts (unready) while Redis is down and
    /// connects when Redis comes up.
    pub fn new(settings: &RedisSettings) -> Result<Self, StoreError> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| StoreError::Unavailable(format!("invalid redis url: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(RedisStore {
            conn,
            ns: settings.namespace.clone(),
            timeout: settings.timeout,
            revoke: Script::new(REVOKE_SCRIPT),
        })
    }

    fn record_key(&self, digest: &KeyDigest) -> String {
        format!("{}:key:{}", self.ns, digest.to_hex())
    }

    fn id_key(&self, id: &str) -> String {
        format!("{}:id:{}", self.ns, id)
    }

    fn ids_key(&self) -> String {
        format!("{}:ids", self.ns)
    }

    /// Runs one Redis call under the store's timeout.
    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Unavailable(e.to_string())),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    async fn fetch(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.record_key(digest);
        let fields: HashMap<String, String> = self.call(conn.hgetall(&key)).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        decode(*digest, fields).map(Some)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn lookup(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        self.fetch(digest).await
    }

    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let id_key = self.id_key(&record.id);
        let taken: bool = self.call(conn.exists(&id_key)).await?;
        if taken {
            return Err(StoreError::Conflict(format!("key id {} exists", record.id)));
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(self.record_key(&record.digest), &encode(record))
            .ignore()
            .set(&id_key, record.digest.to_hex())
            .ignore()
            .zadd(self.ids_key(), &record.id, record.created_at)
            .ignore();
        self.call(pipe.query_async::<()>(&mut conn)).await
    }

    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let hex: Option<String> = self.call(conn.get(self.id_key(id))).await?;
        let Some(hex) = hex else { return Ok(None) };
        let digest = KeyDigest::from_hex(&hex)
            .ok_or_else(|| StoreError::Corrupt(format!("id index of {id} is not a digest")))?;
        self.fetch(&digest).await
    }

    async fn list(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = self.call(conn.zrange(self.ids_key(), 0, -1)).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(rec) = self.get(&id).await? {
                if tenant.is_none_or(|t| t == rec.tenant) {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    async fn revoke(&self, id: &str, at: u64) -> Result<Option<KeyRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = self.revoke.key(self.id_key(id));
        inv.arg(format!("{}:key:", self.ns)).arg(at);
        let hex: Option<String> = self.call(inv.invoke_async(&mut conn)).await?;
        let Some(hex) = hex else { return Ok(None) };
        let digest = KeyDigest::from_hex(&hex)
            .ok_or_else(|| StoreError::Corrupt(format!("id index of {id} is not a digest")))?;
        self.fetch(&digest).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.call(redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map(drop)
    }
}

fn encode(r: &KeyRecord) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("id", r.id.clone()),
        ("name", r.name.clone()),
        ("tenant", r.tenant.clone()),
        ("role", r.role.clone()),
        ("subject", r.subject.clone()),
        ("kind", r.kind.as_str().to_owned()),
        ("created_at", r.created_at.to_string()),
    ];
    if let Some(e) = r.expires_at {
        f.push(("expires_at", e.to_string()));
    }
    if let Some(e) = r.revoked_at {
        f.push(("revoked_at", e.to_string()));
    }
    f
}

fn decode(digest: KeyDigest, mut f: HashMap<String, String>) -> Result<KeyRecord, StoreError> {
    let mut take = |name: &str| {
        f.remove(name)
            .ok_or_else(|| StoreError::Corrupt(format!("record lacks field {name}")))
    };
    let time = |name: &str, v: String| {
        v.parse::<u64>()
            .map_err(|_| StoreError::Corrupt(format!("field {name} is not a time")))
    };
    let id = take("id")?;
    let name = take("name")?;
    let tenant = take("tenant")?;
    let role = take("role")?;
    let subject = take("subject")?;
    let kind = take("kind")?;
    let kind = KeyKind::from_name(&kind)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown key kind {kind:?}")))?;
    let created_at = time("created_at", take("created_at")?)?;
    let expires_at = take("expires_at")
        .ok()
        .map(|v| time("expires_at", v))
        .transpose()?;
    let revoked_at = take("revoked_at")
        .ok()
        .map(|v| time("revoked_at", v))
        .transpose()?;
    Ok(KeyRecord {
        id,
        digest,
        name,
        tenant,
        role,
        subject,
        kind,
        created_at,
        expires_at,
        revoked_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> KeyRecord {
        KeyRecord {
            id: "key_abc".into(),
            digest: KeyDigest([7; 32]),
            name: "ci".into(),
            tenant: "acme".into(),
            role: "admin".into(),
            subject: "alice".into(),
            kind: KeyKind::User,
            created_at: 100,
            expires_at: Some(200),
            revoked_at: None,
        }
    }

    #[test]
    fn encode_decode_round_trips() {
        let r = record();
        let map = encode(&r)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(decode(r.digest, map).unwrap(), r);
    }

    #[test]
    fn decode_names_the_bad_field() {
        let r = record();
        let mut map: HashMap<String, String> = encode(&r)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        map.insert("expires_at".into(), "soon".into());
        let err = decode(r.digest, map).unwrap_err().to_string();
        assert!(err.contains("expires_at"), "{err}");
    }
}
