//! The Redis store: the production backend.
//!
//! Data model (all keys under the configured namespace `ns`):
//! - `ns:key:<sha256 hex>`: a hash with the record's fields (`id`, `name`, `tenant`, `role`,
//!   `subject`, `kind`, `created_at`, `expires_at`, `revoked_at`; times in Unix seconds, absent
//!   fields are unset). The request path reads it with one `HGETALL`.
//! - `ns:id:<key id>`: a string holding the sha256 hex of that key, to find a record by id.
//! - `ns:ids`: a sorted set of key ids scored by creation time, for listing.
//! - `ns:invalidate`: the pub/sub channel; every mutation publishes the changed key's digest
//!   hex in the same Lua script that writes it, so no write is ever left unannounced.
//!
//! Every call goes over one multiplexed connection (reconnected on failure) and is bounded by
//! the configured timeout, so a dead Redis yields an error, never a hang.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::{subscriber, InvalidationSink, KeyRecord, Store, StoreError};
use crate::key::{KeyDigest, KeyKind};

/// Marks a key revoked by id and announces it, in one atomic step: resolves the id, sets
/// `revoked_at` unless it is already set, publishes the digest on the invalidation channel,
/// and returns the digest hex (nil for an unknown id).
/// KEYS: id key. ARGV: record key prefix, time, channel.
const REVOKE_SCRIPT: &str = r#"
local hex = redis.call('GET', KEYS[1])
if not hex then return false end
redis.call('HSETNX', ARGV[1] .. hex, 'revoked_at', ARGV[2])
redis.call('PUBLISH', ARGV[3], hex)
return hex
"#;

/// Creates a record and announces it (so no instance keeps an "unknown" verdict for it), in
/// one atomic step; returns 0 if the id is taken.
/// KEYS: record key, id key, ids key. ARGV: hex, created_at, id, channel, field/value pairs.
const INSERT_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
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
    /// Health-check period of the invalidation subscription.
    pub health_check_interval: Duration,
}

/// A [`Store`] on a standalone Redis server.
pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    ns: String,
    timeout: Duration,
    health_check_interval: Duration,
    revoke: Script,
    insert: Script,
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
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(RedisStore {
            client,
            conn,
            ns: settings.namespace.clone(),
            timeout: settings.timeout,
            health_check_interval: settings.health_check_interval,
            revoke: Script::new(REVOKE_SCRIPT),
            insert: Script::new(INSERT_SCRIPT),
        })
    }

    /// The pub/sub channel that announces changed keys.
    pub fn channel(&self) -> String {
        format!("{}:invalidate", self.ns)
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
        self.outcome(tokio::time::timeout(self.timeout, f).await)
    }

    /// Runs an idempotent call, once more if the connection had dropped: the connection
    /// manager reconnects after the first failure (e.g. after a Redis restart), so the retry
    /// spares the caller a needless `503`.
    async fn idempotent<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(self.timeout, f(self.conn.clone())).await {
            Ok(Err(e)) if e.is_connection_dropped() || e.is_io_error() => {
                tracing::debug!(error = %e, "redis connection dropped; retrying once");
            }
            first => return self.outcome(first),
        }
        self.call(f(self.conn.clone())).await
    }

    fn outcome<T>(
        &self,
        r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Unavailable(e.to_string())),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    async fn fetch(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        let key = self.record_key(digest);
        let fields: HashMap<String, String> = self
            .idempotent(|mut c| {
                let key = key.clone();
                async move { c.hgetall(key).await }
            })
            .await?;
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
        let hex = record.digest.to_hex();
        let mut inv = self.insert.key(self.record_key(&record.digest));
        inv.key(self.id_key(&record.id))
            .key(self.ids_key())
            .arg(&hex)
            .arg(record.created_at)
            .arg(&record.id)
            .arg(self.channel());
        for (field, value) in encode(record) {
            inv.arg(field).arg(value);
        }
        let created: i64 = self.call(inv.invoke_async(&mut conn)).await?;
        if created == 0 {
            return Err(StoreError::Conflict(format!("key id {} exists", record.id)));
        }
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let key = self.id_key(id);
        let hex: Option<String> = self
            .idempotent(|mut c| {
                let key = key.clone();
                async move { c.get(key).await }
            })
            .await?;
        let Some(hex) = hex else { return Ok(None) };
        let digest = KeyDigest::from_hex(&hex)
            .ok_or_else(|| StoreError::Corrupt(format!("id index of {id} is not a digest")))?;
        self.fetch(&digest).await
    }

    async fn list(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        let key = self.ids_key();
        let ids: Vec<String> = self
            .idempotent(|mut c| {
                let key = key.clone();
                async move { c.zrange(key, 0, -1).await }
            })
            .await?;
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
        let (id_key, prefix, channel) =
            (self.id_key(id), format!("{}:key:", self.ns), self.channel());
        // Idempotent: HSETNX keeps the first revocation time, and a repeated PUBLISH is harmless.
        let hex: Option<String> = self
            .idempotent(|mut c| {
                let mut inv = self.revoke.key(&id_key);
                inv.arg(&prefix).arg(at).arg(&channel);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let Some(hex) = hex else { return Ok(None) };
        let digest = KeyDigest::from_hex(&hex)
            .ok_or_else(|| StoreError::Corrupt(format!("id index of {id} is not a digest")))?;
        self.fetch(&digest).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.idempotent(
            |mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await },
        )
        .await
        .map(drop)
    }

    fn start(self: Arc<Self>, sink: Arc<dyn InvalidationSink>) -> Result<(), StoreError> {
        // Down until the first SUBSCRIBE is confirmed.
        sink.link(false);
        tokio::spawn(subscriber::run(
            self.client.clone(),
            self.channel(),
            self.timeout,
            self.health_check_interval,
            sink,
        ));
        Ok(())
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
