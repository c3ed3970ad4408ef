//! The Redis store: the production backend.
//!
//! Data model (all keys under the configured namespace `ns`):
//! - `ns:key:<sha256 hex>`: a hash with the record's fields (`id`, `name`, `tenant`, `role`,
//!   `subject`, `kind`, `created_at`, `expires_at`, `revoked_at`; times in Unix seconds, absent
//!   fields are unset). The request path reads it with one `HGETALL`.
//! - `ns:id:<key id>`: a string holding the sha256 hex of that key, to find a record by id.
//! - `ns:ids`: a sorted set of key ids scored by creation time, for listing.
//! - `ns:sa:<account id>`: a hash with a service account's fields (`id`, `name`, `tenant`,
//!   `role`, `created_at`, `expires_at`, `key_id`).
//! - `ns:sa-keys:<account id>`: a set of the ids of every key the account ever had.
//! - `ns:sa-names:<tenant>`: a hash from lower-cased account name to account id; it makes
//!   names unique within a tenant regardless of case.
//! - `ns:sa-ids`: a sorted set of account ids scored by creation time, for listing.
//! - `ns:audit`: a stream of audit entries (`time`, `actor`, `action`, `target`, `tenant`,
//!   `outcome`), trimmed to about [`AUDIT_MAX_LEN`] entries.
//! - `ns:invalidate`: the pub/sub channel; every mutation publishes the changed key's digest
//!   hex in the same Lua script that writes it, so no write is ever left unannounced. A
//!   revocation (revoke, rotate without grace, account removal) publishes `<hex>:revoked`
//!   instead: a revocation is final, so instances can hold the verdict without reading the
//!   record. Anything else on the channel makes instances flush their caches (so an older
//!   instance receiving the revoked form flushes, which is safe).
//!
//! The service-account scripts derive some key names from their arguments (a key's record from
//! its id), as the revoke script does: fine on a standalone Redis, where every key is on the
//! one server.
//!
//! On a Redis Cluster (`store.cluster_nodes`) a script may touch one slot only, so the same
//! data is placed by hash tags: a record is `ns:key:{ab}:<hex>` (`ab`: the digest's first byte,
//! one of 256 buckets spread over every master) and announced on its bucket's shard channel
//! `ns:invalidate:{ab}` (`SPUBLISH`, same slot); the bookkeeping keys are `{ns}:id:…`,
//! `{ns}:ids`, `{ns}:sa:…`, `{ns}:sa-keys:…`, `{ns}:sa-names:…`, `{ns}:sa-ids` and
//! `{ns}:audit`, all in one slot. Writes that span both are ordered steps (`redis/slots.rs`).
//!
//! Every call goes over one multiplexed connection (reconnected on failure) and is bounded by
//! the configured timeout, so a dead Redis yields an error, never a hang.
//!
//! With `store.sentinels` set, the server is the master Redis Sentinel names, looked up again
//! whenever a call on it fails (see `sentinel.rs`); the lookup counts against the same timeout.
//!
//! A `rediss://` URL speaks TLS (rustls with keygate's one crypto provider) on the store's
//! connection and the invalidation subscriber's alike: the server's certificate is checked
//! against `store.tls_ca` (or the system roots), and keygate presents a client certificate
//! when one is set. An ACL user and password in the URL authenticate both connections; error
//! messages name the server by `host:port` only, never the URL, so the password is never
//! logged or shown in `/readyz`.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::cluster::{self, Nodes};
use super::sentinel::{self, manager_config, Conn, Link, Sentinels, Target};
use super::{
    subscriber, AuditEntry, InvalidationSink, KeyRecord, OldKeys, ServiceAccount, Store, StoreError,
};
use crate::key::{KeyDigest, KeyKind};
use crate::tls::{self, TlsFileError};

/// Lua shared by the scripts that write: every script checks everything it reads and every
/// key it writes before its first write, because Lua has no rollback: a script that failed
/// half-way would leave its first writes (and their announcements) in place. A refusal is an
/// error reply coded `KEYGATE_CORRUPT`, read as [`StoreError::Corrupt`].
macro_rules! script {
    ($body:literal) => {
        concat!(
            r#"
local function wrong_type(key, want)
  local t = redis.call('TYPE', key).ok
  if t ~= want and t ~= 'none' then return key .. ' holds a ' .. t .. ', not a ' .. want end
  return nil
end
local function is_digest(v) return #v == 64 and v:match('^%x+$') ~= nil end
local function is_time(v) return v:match('^%d+$') ~= nil end
local function refuse(why) return redis.error_reply('KEYGATE_CORRUPT ' .. why) end
"#,
            $body
        )
    };
}

mod slots;

/// Marks a key revoked by id and announces it, in one atomic step: resolves the id, sets
/// `revoked_at` unless it is already set, publishes the digest on the invalidation channel,
/// and returns the digest hex (nil for an unknown id). An id index that points at no record is
/// refused: revoking never creates a record.
/// KEYS: id key. ARGV: record key prefix, time, channel.
const REVOKE_SCRIPT: &str = script!(
    r#"
local bad = wrong_type(KEYS[1], 'string')
if bad then return refuse(bad) end
local hex = redis.call('GET', KEYS[1])
if not hex then return false end
if not is_digest(hex) then return refuse('the id index is not a digest') end
local rk = ARGV[1] .. hex
if redis.call('TYPE', rk).ok ~= 'hash' then return refuse('the id index points at no key record') end
redis.call('HSETNX', rk, 'revoked_at', ARGV[2])
redis.call('PUBLISH', ARGV[3], hex .. ':revoked')
return hex
"#
);

/// Creates a record and announces it (so no instance keeps an "unknown" verdict for it), in
/// one atomic step; returns 0 if the id is taken.
/// KEYS: record key, id key, ids key. ARGV: hex, created_at, id, channel, field/value pairs.
const INSERT_SCRIPT: &str = script!(
    r#"
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local bad = wrong_type(KEYS[3], 'zset')
if bad then return refuse(bad) end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"#
);

/// Creates a service account and its first key and announces the key, in one atomic step;
/// returns 0 if the tenant has an account of that name, -1 if an id is taken.
/// KEYS: account, names, account ids, account keys, key record, key id, key ids.
/// ARGV: name key, account id, created_at, key id, hex, channel, number of account field/value
/// arguments, the account's field/value pairs, then the key's.
const CREATE_ACCOUNT_SCRIPT: &str = script!(
    r#"
local bad = wrong_type(KEYS[2], 'hash') or wrong_type(KEYS[3], 'zset')
  or wrong_type(KEYS[4], 'set') or wrong_type(KEYS[7], 'zset')
if bad then return refuse(bad) end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[5]) == 1
  or redis.call('EXISTS', KEYS[6]) == 1 then return -1 end
local n = tonumber(ARGV[7])
redis.call('HSET', KEYS[1], unpack(ARGV, 8, 7 + n))
redis.call('HSET', KEYS[5], unpack(ARGV, 8 + n))
redis.call('SET', KEYS[6], ARGV[5])
redis.call('ZADD', KEYS[7], ARGV[3], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('PUBLISH', ARGV[6], ARGV[5])
return 1
"#
);

/// Rotates a service account in one atomic step: every key of the account not yet revoked is
/// revoked now (`ARGV[4] = 'revoke'`) or made to expire at `ARGV[5]` unless it expires sooner (the
/// grace period), the new key is created and becomes the account's current key, and every
/// changed key is announced. Returns 0 for an unknown account, -1 if the new id is taken. A key
/// whose record is missing is skipped (nothing to revoke; no record is created); any other
/// unreadable record refuses the whole rotation before anything is written.
/// KEYS: account, account keys, new key record, new key id, key ids.
/// ARGV: key id prefix, key record prefix, channel, mode, time, new key id, new hex,
/// new created_at, new expires_at ('' = never), the new key's field/value pairs.
const ROTATE_SCRIPT: &str = script!(
    r#"
local bad = wrong_type(KEYS[1], 'hash') or wrong_type(KEYS[2], 'set') or wrong_type(KEYS[5], 'zset')
if bad then return refuse(bad) end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
local live = {}
for _, kid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local ik = ARGV[1] .. kid
  bad = wrong_type(ik, 'string')
  if bad then return refuse(bad) end
  local hex = redis.call('GET', ik)
  if hex then
    if not is_digest(hex) then return refuse('the id index of ' .. kid .. ' is not a digest') end
    local rk = ARGV[2] .. hex
    local t = redis.call('TYPE', rk).ok
    if t ~= 'hash' and t ~= 'none' then return refuse('the record of ' .. kid .. ' is not a hash') end
    if t == 'hash' and redis.call('HEXISTS', rk, 'revoked_at') == 0 then
      local e = redis.call('HGET', rk, 'expires_at')
      if e and not is_time(e) then return refuse('the record of ' .. kid .. ': expires_at is not a time') end
      live[#live + 1] = {rk, hex, e}
    end
  end
end
for _, k in ipairs(live) do
  if ARGV[4] == 'revoke' then
    redis.call('HSET', k[1], 'revoked_at', ARGV[5])
    redis.call('PUBLISH', ARGV[3], k[2] .. ':revoked')
  else
    if (not k[3]) or tonumber(k[3]) > tonumber(ARGV[5]) then
      redis.call('HSET', k[1], 'expires_at', ARGV[5])
    end
    redis.call('PUBLISH', ARGV[3], k[2])
  end
end
redis.call('HSET', KEYS[3], unpack(ARGV, 10))
redis.call('SET', KEYS[4], ARGV[7])
redis.call('ZADD', KEYS[5], ARGV[8], ARGV[6])
redis.call('SADD', KEYS[2], ARGV[6])
redis.call('HSET', KEYS[1], 'key_id', ARGV[6])
if ARGV[9] == '' then
  redis.call('HDEL', KEYS[1], 'expires_at')
else
  redis.call('HSET', KEYS[1], 'expires_at', ARGV[9])
end
redis.call('PUBLISH', ARGV[3], ARGV[7])
return 1
"#
);

/// Removes a service account in one atomic step: revokes every key of it (keeping earlier
/// revocation times), announces each, and deletes the account, its name and its key set.
/// Returns 0 for an unknown account. A key whose record is missing is skipped (no record is
/// created); any other unreadable record refuses the removal before anything is written.
/// KEYS: account, account keys, names, account ids.
/// ARGV: key id prefix, key record prefix, channel, time, name key, account id.
const REMOVE_ACCOUNT_SCRIPT: &str = script!(
    r#"
local bad = wrong_type(KEYS[1], 'hash') or wrong_type(KEYS[2], 'set')
  or wrong_type(KEYS[3], 'hash') or wrong_type(KEYS[4], 'zset')
if bad then return refuse(bad) end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local found = {}
for _, kid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local ik = ARGV[1] .. kid
  bad = wrong_type(ik, 'string')
  if bad then return refuse(bad) end
  local hex = redis.call('GET', ik)
  if hex then
    if not is_digest(hex) then return refuse('the id index of ' .. kid .. ' is not a digest') end
    local rk = ARGV[2] .. hex
    local t = redis.call('TYPE', rk).ok
    if t ~= 'hash' and t ~= 'none' then return refuse('the record of ' .. kid .. ' is not a hash') end
    if t == 'hash' then found[#found + 1] = {rk, hex} end
  end
end
for _, k in ipairs(found) do
  redis.call('HSETNX', k[1], 'revoked_at', ARGV[4])
  redis.call('PUBLISH', ARGV[3], k[2] .. ':revoked')
end
if redis.call('HGET', KEYS[3], ARGV[5]) == ARGV[6] then redis.call('HDEL', KEYS[3], ARGV[5]) end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[4], ARGV[6])
return 1
"#
);

/// Records last-used times: for each (hex, time) pair, sets `last_used_at` on an existing
/// record unless it is already later. Publishes nothing: no verdict depends on it. A record
/// that has a time is read with one `HGET`; only one without (its first note) is checked with
/// `EXISTS`, so a deleted record is never recreated. (Measured on Redis 7.0 against `EXISTS`
/// then `HGET` for every record, and against one `HMGET` of `id` and `last_used_at`, which
/// Lua pays more for than for the two calls.)
/// ARGV: key record prefix, then hex/time pairs.
const TOUCH_SCRIPT: &str = r#"
for i = 2, #ARGV, 2 do
  local k = ARGV[1] .. ARGV[i]
  local cur = redis.call('HGET', k, 'last_used_at')
  if cur then
    if tonumber(cur) < tonumber(ARGV[i + 1]) then
      redis.call('HSET', k, 'last_used_at', ARGV[i + 1])
    end
  elseif redis.call('EXISTS', k) == 1 then
    redis.call('HSET', k, 'last_used_at', ARGV[i + 1])
  end
end
return 1
"#;

/// About how many audit entries `ns:audit` keeps (trimmed with `MAXLEN ~`, so cheaply).
pub const AUDIT_MAX_LEN: usize = 100_000;

/// Settings for [`RedisStore`].
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL.
    pub url: String,
    /// TLS files for a `rediss://` URL.
    pub tls: RedisTls,
    /// Prefix of every key keygate writes.
    pub namespace: String,
    /// Bound on every command, connection set-up included.
    pub timeout: Duration,
    /// Health-check period of the invalidation subscription.
    pub health_check_interval: Duration,
}

/// Settings for a [`RedisStore`] whose master is found through Redis Sentinel.
#[derive(Clone)]
pub struct SentinelSettings {
    /// The store's settings; the URL's scheme (`rediss://` for TLS), ACL user, password and
    /// database apply to the master, its host and port are not used.
    pub redis: RedisSettings,
    /// The sentinels, `host:port` each.
    pub sentinels: Vec<redis::ConnectionAddr>,
    /// The name the sentinels monitor the master under.
    pub master: String,
    /// ACL user on the sentinels.
    pub username: Option<String>,
    /// Password on the sentinels.
    pub password: Option<String>,
    /// TLS to the sentinels too (`store.sentinel_tls`), with the store's TLS files.
    pub tls: bool,
}

impl std::fmt::Debug for SentinelSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelSettings")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Settings for a [`RedisStore`] on a Redis Cluster.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// The store's settings; the URL's scheme (`rediss://` for TLS), ACL user and password
    /// apply to every node, its host and port are not used.
    pub redis: RedisSettings,
    /// Some of the cluster's nodes, `host:port` each; keygate learns the others from them.
    pub nodes: Vec<redis::ConnectionAddr>,
}

/// The TLS files of a `rediss://` connection (`store.tls_ca`, `store.tls_cert`,
/// `store.tls_key`); all unset: the system roots, no client certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// CA bundle (PEM) the server's certificate must chain to, instead of the system roots.
    pub ca: Option<PathBuf>,
    /// Client certificate chain and its private key (PEM files), presented to Redis.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl RedisTls {
    /// Whether any TLS file is set.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }

    /// Reads and checks the files: each must hold what its setting needs (a CA bundle, a
    /// certificate chain, a private key). The error names the setting and the file, never the
    /// file's contents.
    pub fn load(&self) -> Result<redis::TlsCertificates, (&'static str, TlsFileError)> {
        let root_cert = match &self.ca {
            Some(ca) => {
                tls::load_root_store(ca).map_err(|e| ("store.tls_ca", e))?;
                Some(tls::read_pem_file(ca).map_err(|e| ("store.tls_ca", e))?)
            }
            None => None,
        };
        let client_tls = match &self.client {
            Some((cert, key)) => {
                tls::load_certificates(cert).map_err(|e| ("store.tls_cert", e))?;
                tls::load_private_key(key).map_err(|e| ("store.tls_key", e))?;
                Some(redis::ClientTlsConfig {
                    client_cert: tls::read_pem_file(cert).map_err(|e| ("store.tls_cert", e))?,
                    client_key: tls::read_pem_file(key).map_err(|e| ("store.tls_key", e))?,
                })
            }
            None => None,
        };
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

/// The client for `settings`: over TLS for a `rediss://` URL (with its TLS files, if set).
fn client(settings: &RedisSettings) -> Result<redis::Client, StoreError> {
    let invalid = |e: redis::RedisError| StoreError::Unavailable(format!("invalid redis url: {e}"));
    if !settings.url.starts_with("rediss://") {
        if settings.tls.is_set() {
            return Err(StoreError::Unavailable(
                "store.tls_ca, store.tls_cert and store.tls_key need a rediss:// URL".into(),
            ));
        }
        return redis::Client::open(settings.url.as_str()).map_err(invalid);
    }
    // The redis crate builds its rustls configuration with the process's default provider.
    tls::install_default_provider();
    if !settings.tls.is_set() {
        return redis::Client::open(settings.url.as_str()).map_err(invalid);
    }
    let certificates = settings
        .tls
        .load()
        .map_err(|(field, e)| StoreError::Unavailable(format!("{field}: {e}")))?;
    redis::Client::build_with_tls(settings.url.as_str(), certificates).map_err(invalid)
}

/// A [`Store`] on a standalone Redis server, on the master that Redis Sentinel names, or on a
/// Redis Cluster.
pub struct RedisStore {
    /// Where the subscriber connects (the same server as `link`).
    target: Arc<Target>,
    link: Link,
    /// `host:port` (or socket path) of the server, or the sentinels and master name, for error
    /// messages; never the password.
    addr: String,
    ns: String,
    /// Prefix of the bookkeeping keys: the namespace, or on a cluster the namespace as a hash
    /// tag (`{ns}`), so that they share one slot.
    catalog: String,
    /// On a cluster: the scripts of its writes (see `slots.rs`); records are then placed by
    /// bucket.
    sharded: Option<slots::Scripts>,
    timeout: Duration,
    health_check_interval: Duration,
    revoke: Script,
    insert: Script,
    create_account: Script,
    rotate: Script,
    remove_account: Script,
    touch: Script,
}

impl RedisStore {
    /// Creates the store without connecting: keygate starts (unready) while Redis is down and
    /// connects when Redis comes up.
    pub fn new(settings: &RedisSettings) -> Result<Self, StoreError> {
        let client = client(settings)?;
        let addr = client.get_connection_info().addr().to_string();
        let conn = ConnectionManager::new_lazy_with_config(
            client.clone(),
            manager_config(settings.timeout),
        )
        .map_err(|e| StoreError::Unavailable(format!("{addr}: {e}")))?;
        Ok(Self::build(
            Target::Fixed(client),
            Link::Fixed(conn),
            addr,
            settings,
        ))
    }

    /// Creates the store on the master the sentinels name, without connecting: keygate starts
    /// (unready) while no master is known, and follows failovers without a restart.
    pub fn with_sentinels(settings: &SentinelSettings) -> Result<Self, StoreError> {
        let redis = &settings.redis;
        // The master's user, password, database and TLS come from the URL; its host does not.
        let master = client(redis)?;
        let info = master.get_connection_info();
        let certificates = || {
            redis
                .tls
                .is_set()
                .then(|| redis.tls.load())
                .transpose()
                .map_err(|(field, e)| StoreError::Unavailable(format!("{field}: {e}")))
        };
        let master_tls = match info.addr() {
            redis::ConnectionAddr::TcpTls { .. } => Some(certificates()?),
            _ => None,
        };
        let sentinel_tls = if settings.tls {
            tls::install_default_provider();
            Some(certificates()?)
        } else {
            None
        };
        let sentinels = Sentinels {
            addrs: settings.sentinels.clone(),
            master: settings.master.clone(),
            sentinel_username: settings.username.clone(),
            sentinel_password: settings.password.clone(),
            master_info: info.redis_settings().clone(),
            master_tls,
            sentinel_tls,
            ask_timeout: redis.timeout / settings.sentinels.len().max(1) as u32,
        };
        let addr = sentinel::describe(&sentinels);
        Ok(Self::build(
            Target::Sentinel(sentinels.clone()),
            Link::sentinel(sentinels, manager_config(redis.timeout), redis.timeout),
            addr,
            redis,
        ))
    }

    /// Creates the store on a Redis Cluster, without connecting: keygate starts (unready)
    /// while the cluster is down, and follows failovers and slot moves without a restart.
    pub fn on_cluster(settings: &ClusterSettings) -> Result<Self, StoreError> {
        let redis = &settings.redis;
        // The nodes' user, password and TLS come from the URL; its host does not.
        let url = client(redis)?;
        let info = url.get_connection_info();
        let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
        let seeds = settings
            .nodes
            .iter()
            .map(|a| {
                let addr = match (a, tls) {
                    (redis::ConnectionAddr::Tcp(host, port), true) => {
                        redis::ConnectionAddr::TcpTls {
                            host: host.clone(),
                            port: *port,
                            insecure: false,
                            tls_params: None,
                        }
                    }
                    (a, _) => a.clone(),
                };
                info.clone().set_addr(addr)
            })
            .collect::<Vec<_>>();
        let certs = (tls && redis.tls.is_set())
            .then(|| redis.tls.load())
            .transpose()
            .map_err(|(field, e)| StoreError::Unavailable(format!("{field}: {e}")))?;
        let nodes = Nodes {
            seeds,
            certs,
            timeout: redis.timeout,
        };
        let addr = cluster::describe(&nodes.seeds);
        let conn = nodes
            .connection()
            .map_err(|e| StoreError::Unavailable(format!("{addr}: {e}")))?;
        let mut store = Self::build(Target::Cluster(nodes), Link::Cluster(conn), addr, redis);
        store.catalog = format!("{{{}}}", redis.namespace);
        store.sharded = Some(slots::Scripts::new());
        Ok(store)
    }

    fn build(target: Target, link: Link, addr: String, settings: &RedisSettings) -> Self {
        RedisStore {
            target: Arc::new(target),
            link,
            addr,
            ns: settings.namespace.clone(),
            catalog: settings.namespace.clone(),
            sharded: None,
            timeout: settings.timeout,
            health_check_interval: settings.health_check_interval,
            revoke: Script::new(REVOKE_SCRIPT),
            insert: Script::new(INSERT_SCRIPT),
            create_account: Script::new(CREATE_ACCOUNT_SCRIPT),
            rotate: Script::new(ROTATE_SCRIPT),
            remove_account: Script::new(REMOVE_ACCOUNT_SCRIPT),
            touch: Script::new(TOUCH_SCRIPT),
        }
    }

    /// The pub/sub channel that announces changed keys (standalone and Sentinel).
    pub fn channel(&self) -> String {
        format!("{}:invalidate", self.ns)
    }

    /// Every channel the subscriber follows: the one channel, or on a cluster every bucket's
    /// shard channel.
    fn channels(&self) -> Vec<String> {
        if self.sharded.is_none() {
            return vec![self.channel()];
        }
        cluster::buckets()
            .map(|b| format!("{}:invalidate:{{{b}}}", self.ns))
            .collect()
    }

    /// On a cluster: the shard channel of a key's bucket, in the slot of its record.
    fn bucket_channel(&self, digest: &KeyDigest) -> String {
        format!("{}:invalidate:{{{}}}", self.ns, cluster::bucket(digest))
    }

    /// The record's key, `ns:key:<hex>` (on a cluster `ns:key:{ab}:<hex>`), built in one
    /// allocation of the exact size: a lookup that misses the cache builds no other string.
    fn record_key(&self, digest: &KeyDigest) -> String {
        let mut hex = [0u8; 64];
        hex::encode_to_slice(digest.0, &mut hex).expect("64 hex digits for 32 bytes");
        let hex = std::str::from_utf8(&hex).expect("hex is ASCII");
        let bucket = if self.sharded.is_some() { 5 } else { 0 };
        let mut key = String::with_capacity(self.ns.len() + ":key:".len() + bucket + hex.len());
        key.push_str(&self.ns);
        key.push_str(":key:");
        if self.sharded.is_some() {
            // The bucket: the digest's first byte, as `cluster::bucket` names it.
            key.push('{');
            key.push_str(&hex[..2]);
            key.push_str("}:");
        }
        key.push_str(hex);
        key
    }

    fn id_key(&self, id: &str) -> String {
        format!("{}:id:{}", self.catalog, id)
    }

    fn ids_key(&self) -> String {
        format!("{}:ids", self.catalog)
    }

    fn account_key(&self, id: &str) -> String {
        format!("{}:sa:{}", self.catalog, id)
    }

    fn account_keys_key(&self, id: &str) -> String {
        format!("{}:sa-keys:{}", self.catalog, id)
    }

    fn names_key(&self, tenant: &str) -> String {
        format!("{}:sa-names:{}", self.catalog, tenant)
    }

    fn account_ids_key(&self) -> String {
        format!("{}:sa-ids", self.catalog)
    }

    fn audit_key(&self) -> String {
        format!("{}:audit", self.catalog)
    }

    /// Reads one sorted set of ids, oldest first.
    async fn zrange_all(&self, key: String) -> Result<Vec<String>, StoreError> {
        self.idempotent(|mut c| {
            let key = key.clone();
            async move { c.zrange(key, 0, -1).await }
        })
        .await
    }

    /// Runs one Redis call under the store's timeout (finding the master first, in Sentinel
    /// mode, within the same bound).
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        self.outcome(self.link.run(deadline, f).await)
    }

    /// Runs an idempotent call, once more if the connection had dropped: the connection
    /// manager reconnects after the first failure (e.g. after a Redis restart), and in Sentinel
    /// mode the master is looked up again, so the retry spares the caller a needless `503`.
    /// The call and its retry share one deadline, so the whole takes at most `store.timeout`;
    /// a call that timed out is not retried (a slow Redis is not a dropped connection).
    async fn idempotent<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        match self.link.run(deadline, &f).await {
            Ok(Err(e)) if !e.is_timeout() && (e.is_connection_dropped() || e.is_io_error()) => {
                tracing::debug!(error = %e, "redis connection dropped; retrying once");
            }
            first => return self.outcome(first),
        }
        self.outcome(self.link.run(deadline, &f).await)
    }

    fn outcome<T>(
        &self,
        r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.code() == Some("KEYGATE_CORRUPT") => Err(StoreError::Corrupt(
                e.detail().unwrap_or("refused by a script").to_owned(),
            )),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("{}: {e}", self.addr))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "{}: no answer within {:?}",
                self.addr, self.timeout
            ))),
        }
    }

    /// Every field of a hash; `None` when the key does not exist.
    async fn hash(&self, key: String) -> Result<Option<HashMap<String, String>>, StoreError> {
        let fields: HashMap<String, String> = self
            .idempotent(|mut c| {
                let key = key.clone();
                async move { c.hgetall(key).await }
            })
            .await?;
        Ok((!fields.is_empty()).then_some(fields))
    }

    /// A key's record: one `HGETALL`, its reply read straight into the record's fields.
    async fn fetch(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        let key = &self.record_key(digest);
        let fields: RecordFields = self
            .idempotent(
                |mut c| async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await },
            )
            .await?;
        if !fields.found {
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
        if let Some(scripts) = &self.sharded {
            return scripts.insert(self, record).await;
        }
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
        let created: i64 = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
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
        let ids = self.zrange_all(self.ids_key()).await?;
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
        if let Some(scripts) = &self.sharded {
            return scripts.revoke(self, id, at).await;
        }
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

    async fn create_account(
        &self,
        account: &ServiceAccount,
        key: &KeyRecord,
    ) -> Result<(), StoreError> {
        if let Some(scripts) = &self.sharded {
            return scripts.create_account(self, account, key).await;
        }
        let hex = key.digest.to_hex();
        let mut inv = self.create_account.key(self.account_key(&account.id));
        inv.key(self.names_key(&account.tenant))
            .key(self.account_ids_key())
            .key(self.account_keys_key(&account.id))
            .key(self.record_key(&key.digest))
            .key(self.id_key(&key.id))
            .key(self.ids_key())
            .arg(ServiceAccount::name_key(&account.name))
            .arg(&account.id)
            .arg(account.created_at)
            .arg(&key.id)
            .arg(&hex)
            .arg(self.channel());
        let fields = encode_account(account);
        inv.arg(fields.len() * 2);
        for (field, value) in fields {
            inv.arg(field).arg(value);
        }
        for (field, value) in encode(key) {
            inv.arg(field).arg(value);
        }
        match self
            .call(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })
            .await?
        {
            1 => Ok(()),
            0 => Err(StoreError::Conflict(format!(
                "tenant {} already has a service account named {:?}",
                account.tenant, account.name
            ))),
            _ => Err(StoreError::Conflict(format!(
                "service account id {} exists",
                account.id
            ))),
        }
    }

    async fn get_account(&self, id: &str) -> Result<Option<ServiceAccount>, StoreError> {
        match self.hash(self.account_key(id)).await? {
            Some(fields) => decode_account(fields).map(Some),
            None => Ok(None),
        }
    }

    async fn list_accounts(&self, tenant: Option<&str>) -> Result<Vec<ServiceAccount>, StoreError> {
        let ids = self.zrange_all(self.account_ids_key()).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(a) = self.get_account(&id).await? {
                if tenant.is_none_or(|t| t == a.tenant) {
                    out.push(a);
                }
            }
        }
        Ok(out)
    }

    async fn rotate_account(
        &self,
        id: &str,
        new_key: &KeyRecord,
        old: OldKeys,
    ) -> Result<Option<ServiceAccount>, StoreError> {
        if let Some(scripts) = &self.sharded {
            return scripts.rotate_account(self, id, new_key, old).await;
        }
        let (mode, at) = match old {
            OldKeys::RevokeAt(t) => ("revoke", t),
            OldKeys::ExpireAt(t) => ("expire", t),
        };
        let mut inv = self.rotate.key(self.account_key(id));
        inv.key(self.account_keys_key(id))
            .key(self.record_key(&new_key.digest))
            .key(self.id_key(&new_key.id))
            .key(self.ids_key())
            .arg(format!("{}:id:", self.ns))
            .arg(format!("{}:key:", self.ns))
            .arg(self.channel())
            .arg(mode)
            .arg(at)
            .arg(&new_key.id)
            .arg(new_key.digest.to_hex())
            .arg(new_key.created_at)
            .arg(
                new_key
                    .expires_at
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
            );
        for (field, value) in encode(new_key) {
            inv.arg(field).arg(value);
        }
        match self
            .call(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })
            .await?
        {
            0 => Ok(None),
            1 => self.get_account(id).await,
            _ => Err(StoreError::Conflict(format!(
                "key id {} exists",
                new_key.id
            ))),
        }
    }

    async fn remove_account(
        &self,
        id: &str,
        at: u64,
    ) -> Result<Option<ServiceAccount>, StoreError> {
        if let Some(scripts) = &self.sharded {
            return scripts.remove_account(self, id, at).await;
        }
        // Names never change, so the name read here is still the account's in the script.
        let Some(account) = self.get_account(id).await? else {
            return Ok(None);
        };
        let mut inv = self.remove_account.key(self.account_key(id));
        inv.key(self.account_keys_key(id))
            .key(self.names_key(&account.tenant))
            .key(self.account_ids_key())
            .arg(format!("{}:id:", self.ns))
            .arg(format!("{}:key:", self.ns))
            .arg(self.channel())
            .arg(at)
            .arg(ServiceAccount::name_key(&account.name))
            .arg(id);
        let removed: i64 = self
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok((removed == 1).then_some(account))
    }

    async fn account_keys(&self, id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let key = self.account_keys_key(id);
        let ids: Vec<String> = self
            .idempotent(|mut c| {
                let key = key.clone();
                async move { c.smembers(key).await }
            })
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for kid in ids {
            if let Some(r) = self.get(&kid).await? {
                out.push(r);
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    async fn touch(&self, used: &[(KeyDigest, u64)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        if let Some(scripts) = &self.sharded {
            return scripts.touch(self, used).await;
        }
        let prefix = format!("{}:key:", self.ns);
        // Idempotent (only ever moves a time forward), so a dropped connection may retry it.
        self.idempotent(|mut c| {
            let mut inv = self.touch.arg(&prefix);
            let mut hex = [0u8; 64];
            for (d, t) in used {
                // Written from a stack buffer: no String per key.
                hex::encode_to_slice(d.0, &mut hex).expect("64 hex digits for 32 bytes");
                inv.arg(&hex[..]).arg(*t);
            }
            async move { inv.invoke_async::<i64>(&mut c).await }
        })
        .await
        .map(drop)
    }

    async fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.audit_key())
            .arg("MAXLEN")
            .arg("~")
            .arg(AUDIT_MAX_LEN)
            .arg("*")
            .arg("time")
            .arg(e.at)
            .arg("actor")
            .arg(&e.actor)
            .arg("action")
            .arg(&e.action)
            .arg("target")
            .arg(&e.target)
            .arg("tenant")
            .arg(&e.tenant)
            .arg("outcome")
            .arg(&e.outcome);
        self.call(|mut c| async move { cmd.query_async::<String>(&mut c).await })
            .await
            .map(drop)
    }

    async fn list_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let key = self.audit_key();
        let rows: Vec<(String, HashMap<String, String>)> = self
            .idempotent(|mut c| {
                let key = key.clone();
                async move {
                    redis::cmd("XREVRANGE")
                        .arg(key)
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(limit)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (_, mut f) in rows.into_iter().rev() {
            let mut take = |name: &str| f.remove(name).unwrap_or_else(|| "-".into());
            let at = take("time");
            out.push(AuditEntry {
                at: at
                    .parse()
                    .map_err(|_| StoreError::Corrupt("audit entry without a time".into()))?,
                actor: take("actor"),
                action: take("action"),
                target: take("target"),
                tenant: take("tenant"),
                outcome: take("outcome"),
            });
        }
        Ok(out)
    }

    fn start(self: Arc<Self>, sink: Arc<dyn InvalidationSink>) -> Result<(), StoreError> {
        // Down until the first SUBSCRIBE is confirmed.
        sink.link(false);
        if self.link.follows_sentinels() {
            // Moves the store's connection off a master the sentinels no longer name (see
            // `Link::forget_unless_at`); ends with the store.
            let (store, target) = (Arc::downgrade(&self), self.target.clone());
            let (interval, timeout) = (self.health_check_interval, self.timeout);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    let Ok(Ok(master)) = tokio::time::timeout(timeout, target.client()).await
                    else {
                        continue;
                    };
                    let Some(store) = store.upgrade() else { return };
                    store
                        .link
                        .forget_unless_at(master.get_connection_info().addr());
                }
            });
        }
        tokio::spawn(subscriber::run(
            self.target.clone(),
            self.addr.clone(),
            self.channels(),
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
    if let Some(e) = r.last_used_at {
        f.push(("last_used_at", e.to_string()));
    }
    f
}

fn encode_account(a: &ServiceAccount) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("id", a.id.clone()),
        ("name", a.name.clone()),
        ("tenant", a.tenant.clone()),
        ("role", a.role.clone()),
        ("created_at", a.created_at.to_string()),
        ("key_id", a.key_id.clone()),
    ];
    if let Some(e) = a.expires_at {
        f.push(("expires_at", e.to_string()));
    }
    f
}

fn decode_account(mut f: HashMap<String, String>) -> Result<ServiceAccount, StoreError> {
    let mut take = |name: &str| {
        f.remove(name)
            .ok_or_else(|| StoreError::Corrupt(format!("service account lacks field {name}")))
    };
    let time = |name: &str, v: String| {
        v.parse::<u64>()
            .map_err(|_| StoreError::Corrupt(format!("field {name} is not a time")))
    };
    Ok(ServiceAccount {
        id: take("id")?,
        name: take("name")?,
        tenant: take("tenant")?,
        role: take("role")?,
        created_at: time("created_at", take("created_at")?)?,
        key_id: take("key_id")?,
        expires_at: take("expires_at")
            .ok()
            .map(|v| time("expires_at", v))
            .transpose()?,
    })
}

/// A key record's fields as one `HGETALL` answers them (a flat array of names and values, or a
/// RESP3 map), taken off the reply without a map in between: each value keeps the buffer the
/// reply was parsed into. A reply of another shape, or a name or value that is not UTF-8,
/// fails the conversion exactly as a `HashMap<String, String>` would (so the store reports it
/// the same way); fields keygate does not know are skipped; [`decode`] checks the rest.
#[derive(Debug, Default)]
struct RecordFields {
    /// Whether the hash has any field at all: a key that does not exist answers an empty one.
    found: bool,
    id: Option<String>,
    name: Option<String>,
    tenant: Option<String>,
    role: Option<String>,
    subject: Option<String>,
    kind: Option<String>,
    created_at: Option<String>,
    expires_at: Option<String>,
    revoked_at: Option<String>,
    last_used_at: Option<String>,
}

impl redis::FromRedisValue for RecordFields {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        let v = match v {
            redis::Value::Attribute { data, .. } => *data,
            v => v,
        };
        let mut f = RecordFields::default();
        if let redis::Value::Nil = v {
            return Ok(f);
        }
        let pairs = v.into_map_iter().map_err(|_| {
            redis::ParsingError::from("Response type not map compatible".to_owned())
        })?;
        for (name, value) in pairs {
            f.found = true;
            let name: String = redis::from_redis_value(name)?;
            let value: String = redis::from_redis_value(value)?;
            let slot = match name.as_str() {
                "id" => &mut f.id,
                "name" => &mut f.name,
                "tenant" => &mut f.tenant,
                "role" => &mut f.role,
                "subject" => &mut f.subject,
                "kind" => &mut f.kind,
                "created_at" => &mut f.created_at,
                "expires_at" => &mut f.expires_at,
                "revoked_at" => &mut f.revoked_at,
                "last_used_at" => &mut f.last_used_at,
                _ => continue,
            };
            // A repeated name keeps its last value, as a map would.
            *slot = Some(value);
        }
        Ok(f)
    }
}

fn decode(digest: KeyDigest, f: RecordFields) -> Result<KeyRecord, StoreError> {
    let take = |name: &str, v: Option<String>| {
        v.ok_or_else(|| StoreError::Corrupt(format!("record lacks field {name}")))
    };
    let time = |name: &str, v: String| {
        v.parse::<u64>()
            .map_err(|_| StoreError::Corrupt(format!("field {name} is not a time")))
    };
    let id = take("id", f.id)?;
    let name = take("name", f.name)?;
    let tenant = take("tenant", f.tenant)?;
    let role = take("role", f.role)?;
    let subject = take("subject", f.subject)?;
    let kind = take("kind", f.kind)?;
    let kind = KeyKind::from_name(&kind)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown key kind {kind:?}")))?;
    let created_at = time("created_at", take("created_at", f.created_at)?)?;
    let expires_at = f.expires_at.map(|v| time("expires_at", v)).transpose()?;
    let revoked_at = f.revoked_at.map(|v| time("revoked_at", v)).transpose()?;
    let last_used_at = f
        .last_used_at
        .map(|v| time("last_used_at", v))
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
        last_used_at,
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
            last_used_at: None,
        }
    }

    /// `HGETALL`'s RESP2 reply for these field/value pairs.
    fn reply(pairs: &[(&str, &str)]) -> redis::Value {
        redis::Value::Array(
            pairs
                .iter()
                .flat_map(|(k, v)| [*k, *v])
                .map(|s| redis::Value::BulkString(s.as_bytes().to_vec()))
                .collect(),
        )
    }

    fn pairs(r: &KeyRecord) -> Vec<(&'static str, String)> {
        encode(r)
    }

    /// The record a reply decodes to: `Ok(None)` when the hash is empty, `Err` with the
    /// conversion's message or the store error's.
    fn read(v: redis::Value) -> Result<Option<KeyRecord>, String> {
        let fields: RecordFields = redis::from_redis_value(v).map_err(|e| e.to_string())?;
        if !fields.found {
            return Ok(None);
        }
        decode(KeyDigest([7; 32]), fields)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// How the reply was read before: into a `HashMap<String, String>`, then field by field.
    /// The decoder must agree with it on every reply, malformed ones included.
    fn read_through_a_map(v: redis::Value) -> Result<Option<KeyRecord>, String> {
        let mut f: HashMap<String, String> =
            redis::from_redis_value(v).map_err(|e| e.to_string())?;
        if f.is_empty() {
            return Ok(None);
        }
        let corrupt = |why: String| StoreError::Corrupt(why).to_string();
        let mut take = |name: &str| {
            f.remove(name)
                .ok_or_else(|| corrupt(format!("record lacks field {name}")))
        };
        let time = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| corrupt(format!("field {name} is not a time")))
        };
        let (id, name, tenant, role, subject) = (
            take("id")?,
            take("name")?,
            take("tenant")?,
            take("role")?,
            take("subject")?,
        );
        let kind = take("kind")?;
        let kind = KeyKind::from_name(&kind)
            .ok_or_else(|| corrupt(format!("unknown key kind {kind:?}")))?;
        let created_at = time("created_at", take("created_at")?)?;
        let mut opt = |n: &str| take(n).ok().map(|v| time(n, v)).transpose();
        let (expires_at, revoked_at, last_used_at) =
            (opt("expires_at")?, opt("revoked_at")?, opt("last_used_at")?);
        Ok(Some(KeyRecord {
            id,
            digest: KeyDigest([7; 32]),
            name,
            tenant,
            role,
            subject,
            kind,
            created_at,
            expires_at,
            revoked_at,
            last_used_at,
        }))
    }

    #[test]
    fn a_reply_decodes_into_the_record_it_encodes() {
        let mut r = record();
        r.revoked_at = Some(150);
        r.last_used_at = Some(120);
        let fields = pairs(&r);
        let flat: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(read(reply(&flat)), Ok(Some(r.clone())));
        // The same as a RESP3 map, and under an attribute.
        let map = redis::Value::Map(
            flat.iter()
                .map(|(k, v)| {
                    (
                        redis::Value::BulkString(k.as_bytes().to_vec()),
                        redis::Value::SimpleString((*v).to_owned()),
                    )
                })
                .collect(),
        );
        assert_eq!(read(map.clone()), Ok(Some(r.clone())));
        let attributed = redis::Value::Attribute {
            data: Box::new(map),
            attributes: vec![],
        };
        assert_eq!(read(attributed), Ok(Some(r)));
    }

    #[test]
    fn an_empty_reply_is_no_record() {
        assert_eq!(read(reply(&[])), Ok(None));
        assert_eq!(read(redis::Value::Nil), Ok(None));
    }

    #[test]
    fn malformed_replies_fail_as_they_did_through_a_map() {
        let r = record();
        let good = pairs(&r);
        let with = |name: &str, value: &str| -> redis::Value {
            let mut p: Vec<(&str, &str)> = good.iter().map(|(k, v)| (*k, v.as_str())).collect();
            p.retain(|(k, _)| *k != name);
            p.push((name, value));
            reply(&p)
        };
        let without = |name: &str| -> redis::Value {
            let p: Vec<(&str, &str)> = good
                .iter()
                .filter(|(k, _)| *k != name)
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            reply(&p)
        };
        let bytes = |items: Vec<&[u8]>| {
            redis::Value::Array(
                items
                    .into_iter()
                    .map(|b| redis::Value::BulkString(b.to_vec()))
                    .collect(),
            )
        };
        let cases: Vec<(&str, redis::Value, &str)> = vec![
            ("no id", without("id"), "record lacks field id"),
            ("no name", without("name"), "record lacks field name"),
            ("no tenant", without("tenant"), "record lacks field tenant"),
            ("no role", without("role"), "record lacks field role"),
            (
                "no subject",
                without("subject"),
                "record lacks field subject",
            ),
            ("no kind", without("kind"), "record lacks field kind"),
            (
                "no created_at",
                without("created_at"),
                "lacks field created_at",
            ),
            (
                "a kind unknown",
                with("kind", "robot"),
                "unknown key kind \"robot\"",
            ),
            (
                "created_at",
                with("created_at", "x"),
                "field created_at is not a time",
            ),
            (
                "expires_at",
                with("expires_at", "soon"),
                "field expires_at is not a time",
            ),
            (
                "revoked_at",
                with("revoked_at", "-1"),
                "field revoked_at is not a time",
            ),
            (
                "last_used_at",
                with("last_used_at", ""),
                "last_used_at is not a time",
            ),
            (
                "only unknown fields",
                reply(&[("colour", "red")]),
                "lacks field id",
            ),
            (
                "an odd array",
                bytes(vec![b"id", b"key_abc", b"name"]),
                "not map compatible",
            ),
            ("not an array", redis::Value::Int(3), "not map compatible"),
            (
                "a value not UTF-8",
                bytes(vec![b"id", b"\xff\xfe"]),
                "UTF-8",
            ),
            ("a name not UTF-8", bytes(vec![b"\xff", b"x"]), "UTF-8"),
            (
                "a nested array",
                redis::Value::Array(vec![
                    redis::Value::BulkString(b"id".to_vec()),
                    redis::Value::Array(vec![]),
                ]),
                "not string compatible",
            ),
        ];
        for (what, v, want) in cases {
            let got = read(v.clone());
            let err = got.clone().expect_err(what);
            assert!(err.contains(want), "{what}: {err}");
            match (got, read_through_a_map(v)) {
                (Err(new), Err(old)) if new.contains("Incompatible type") => {
                    // Conversion errors: the same kind (the store reports both as a failed
                    // call); the wording names the type that was wanted.
                    assert!(old.contains("Incompatible type"), "{what}: {old}");
                }
                (new, old) => assert_eq!(new, old, "{what}"),
            }
        }
        // Unknown fields beside the known ones are skipped, as the map's reader skipped them.
        let extra = with("colour", "red");
        assert_eq!(read(extra.clone()), Ok(Some(r)));
        assert_eq!(read(extra.clone()), read_through_a_map(extra));
    }

    #[tokio::test]
    async fn the_record_key_is_the_namespace_and_the_digest() {
        let settings = RedisSettings {
            url: "redis://127.0.0.1:1".into(),
            tls: RedisTls::default(),
            namespace: "ns".into(),
            timeout: Duration::from_secs(1),
            health_check_interval: Duration::from_secs(1),
        };
        let mut store = RedisStore::new(&settings).unwrap();
        let digest = KeyDigest([0xab; 32]);
        let hex = digest.to_hex();
        let key = store.record_key(&digest);
        assert_eq!(key, format!("ns:key:{hex}"));
        assert_eq!(
            key.capacity(),
            key.len(),
            "one allocation of the exact size"
        );
        store.sharded = Some(slots::Scripts::new());
        let key = store.record_key(&digest);
        assert_eq!(key, format!("ns:key:{{ab}}:{hex}"));
        assert_eq!(key.capacity(), key.len());
    }

    #[test]
    fn decode_names_the_bad_field() {
        let r = record();
        let mut map: Vec<(&str, String)> = encode(&r);
        map.retain(|(k, _)| *k != "expires_at");
        map.push(("expires_at", "soon".into()));
        let flat: Vec<(&str, &str)> = map.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let err = read(reply(&flat)).unwrap_err();
        assert!(err.contains("expires_at"), "{err}");
    }
}
