//! The writes of the Redis store on a Redis Cluster, where a script may touch one slot only.
//!
//! A key's record and its bucket's shard channel share a slot, so the write of a record and
//! its announcement stay one atomic step, as on a standalone Redis. The bookkeeping (id index,
//! listings, service accounts) shares another slot (`{ns}`), so each bookkeeping change is one
//! atomic step too. What spans both is done in an order that keeps these invariants:
//! - A record is never written before its id index (and its listing) exists, so every live
//!   key can be found and revoked by id. An id index without a record (a write that failed
//!   half-way) reads as "no such key".
//! - A revocation is always the record's own script: the record is marked revoked and the
//!   revocation announced in one step, on the slot every lookup of that key reads.
//! - Rotating writes the new key's record before the account names it current, and revokes
//!   (or expires) every other key the account's bookkeeping lists *after* that step; the step
//!   that names the new key current returns that list atomically, so two rotations running at
//!   once leave exactly one current key, whichever named its key last.
//! - Removing an account revokes every key it lists, then removes it (getting the list again
//!   atomically), then revokes any key that joined in between: a failure half-way leaves the
//!   account in place with some keys revoked, and repeating the removal finishes it.
//!
//! A failure half-way through a multi-step write is reported as the write's failure; nothing
//! is rolled back (a rollback could fail too), and what is left never makes a key live that
//! should not be: at worst an id index without a record, or a fresh key record that no one was
//! given.

use std::collections::{HashMap, HashSet};

use redis::Script;

use super::{encode, encode_account, RedisStore};
use crate::key::KeyDigest;
use crate::store::{KeyRecord, OldKeys, ServiceAccount, Store, StoreError};

/// Creates a record and announces it; returns 0 if it exists.
/// KEYS: record. ARGV: channel, hex, field/value pairs.
const CREATE_RECORD: &str = script!(
    r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SPUBLISH', ARGV[1], ARGV[2])
return 1
"#
);

/// Marks a record revoked (keeping an earlier revocation time) and announces it; returns 0 if
/// there is no record (revoking never creates one).
/// KEYS: record. ARGV: channel, hex, time.
const REVOKE_RECORD: &str = script!(
    r#"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return 0 end
if t ~= 'hash' then return refuse(KEYS[1] .. ' holds a ' .. t .. ', not a hash') end
redis.call('HSETNX', KEYS[1], 'revoked_at', ARGV[3])
redis.call('SPUBLISH', ARGV[1], ARGV[2] .. ':revoked')
return 1
"#
);

/// The grace period of a rotation: makes a record that is not revoked expire at the given time
/// unless it expires sooner, and announces it; returns 0 if there is no record.
/// KEYS: record. ARGV: channel, hex, time.
const EXPIRE_RECORD: &str = script!(
    r#"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return 0 end
if t ~= 'hash' then return refuse(KEYS[1] .. ' holds a ' .. t .. ', not a hash') end
if redis.call('HEXISTS', KEYS[1], 'revoked_at') == 1 then return 1 end
local e = redis.call('HGET', KEYS[1], 'expires_at')
if e and not is_time(e) then return refuse(KEYS[1] .. ': expires_at is not a time') end
if (not e) or tonumber(e) > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'expires_at', ARGV[3])
end
redis.call('SPUBLISH', ARGV[1], ARGV[2])
return 1
"#
);

/// Records last-used times of records in one bucket: for each record, sets `last_used_at`
/// unless it is already later; records that do not exist are skipped, never recreated (one
/// `HGET` for a record that has a time, `EXISTS` only for one without: as `TOUCH_SCRIPT`).
/// KEYS: records. ARGV: their times, in the same order.
const TOUCH_RECORDS: &str = r#"
for i, k in ipairs(KEYS) do
  local cur = redis.call('HGET', k, 'last_used_at')
  if cur then
    if tonumber(cur) < tonumber(ARGV[i]) then
      redis.call('HSET', k, 'last_used_at', ARGV[i])
    end
  elseif redis.call('EXISTS', k) == 1 then
    redis.call('HSET', k, 'last_used_at', ARGV[i])
  end
end
return 1
"#;

/// Claims a key id: writes its id index and lists it; returns 0 if the id is taken.
/// KEYS: id, ids. ARGV: hex, created_at, id.
const CLAIM_ID: &str = script!(
    r#"
local bad = wrong_type(KEYS[1], 'string') or wrong_type(KEYS[2], 'zset')
if bad then return refuse(bad) end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"#
);

/// Creates a service account's bookkeeping with its first key's id index; returns 0 if the
/// tenant has an account of that name, -1 if an id is taken.
/// KEYS: account, names, account ids, account keys, key id, key ids.
/// ARGV: name key, account id, created_at, key id, hex, the account's field/value pairs.
const CREATE_ACCOUNT: &str = script!(
    r#"
local bad = wrong_type(KEYS[2], 'hash') or wrong_type(KEYS[3], 'zset')
  or wrong_type(KEYS[4], 'set') or wrong_type(KEYS[6], 'zset')
if bad then return refuse(bad) end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[5]) == 1 then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('SET', KEYS[5], ARGV[5])
redis.call('ZADD', KEYS[6], ARGV[3], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[4])
return 1
"#
);

/// Names a new key the account's current one (id index, listing, account keys, `key_id`,
/// `expires_at`) and returns `{1, hex…}`: the digests of every other key of the account;
/// `{0}` for an unknown account, `{-1}` if the new id is taken.
/// KEYS: account, account keys, new key id, key ids.
/// ARGV: key id prefix, new key id, new hex, new created_at, new expires_at ('' = never).
const NAME_CURRENT: &str = script!(
    r#"
local bad = wrong_type(KEYS[1], 'hash') or wrong_type(KEYS[2], 'set') or wrong_type(KEYS[4], 'zset')
if bad then return refuse(bad) end
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {-1} end
local others = {1}
for _, kid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local ik = ARGV[1] .. kid
  bad = wrong_type(ik, 'string')
  if bad then return refuse(bad) end
  local hex = redis.call('GET', ik)
  if hex then
    if not is_digest(hex) then return refuse('the id index of ' .. kid .. ' is not a digest') end
    others[#others + 1] = hex
  end
end
redis.call('SET', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'key_id', ARGV[2])
if ARGV[5] == '' then
  redis.call('HDEL', KEYS[1], 'expires_at')
else
  redis.call('HSET', KEYS[1], 'expires_at', ARGV[5])
end
return others
"#
);

/// Deletes a service account's bookkeeping (account, name, key set, listing) and returns
/// `{1, hex…}`: the digests of every key it had; `{0}` for an unknown account.
/// KEYS: account, account keys, names, account ids. ARGV: key id prefix, name key, account id.
const REMOVE_ACCOUNT: &str = script!(
    r#"
local bad = wrong_type(KEYS[1], 'hash') or wrong_type(KEYS[2], 'set')
  or wrong_type(KEYS[3], 'hash') or wrong_type(KEYS[4], 'zset')
if bad then return refuse(bad) end
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local keys = {1}
for _, kid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local ik = ARGV[1] .. kid
  bad = wrong_type(ik, 'string')
  if bad then return refuse(bad) end
  local hex = redis.call('GET', ik)
  if hex then
    if not is_digest(hex) then return refuse('the id index of ' .. kid .. ' is not a digest') end
    keys[#keys + 1] = hex
  end
end
if redis.call('HGET', KEYS[3], ARGV[2]) == ARGV[3] then redis.call('HDEL', KEYS[3], ARGV[2]) end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[4], ARGV[3])
return keys
"#
);

/// The cluster's scripts.
pub(super) struct Scripts {
    create_record: Script,
    revoke_record: Script,
    expire_record: Script,
    touch_records: Script,
    claim_id: Script,
    create_account: Script,
    name_current: Script,
    remove_account: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Scripts {
            create_record: Script::new(CREATE_RECORD),
            revoke_record: Script::new(REVOKE_RECORD),
            expire_record: Script::new(EXPIRE_RECORD),
            touch_records: Script::new(TOUCH_RECORDS),
            claim_id: Script::new(CLAIM_ID),
            create_account: Script::new(CREATE_ACCOUNT),
            name_current: Script::new(NAME_CURRENT),
            remove_account: Script::new(REMOVE_ACCOUNT),
        }
    }

    /// Writes a key's record and announces it; `Ok(false)` if the record exists.
    async fn create_record(&self, s: &RedisStore, r: &KeyRecord) -> Result<bool, StoreError> {
        let mut inv = self.create_record.key(s.record_key(&r.digest));
        inv.arg(s.bucket_channel(&r.digest)).arg(r.digest.to_hex());
        for (field, value) in encode(r) {
            inv.arg(field).arg(value);
        }
        let created: i64 = s
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(created == 1)
    }

    /// Revokes (or, with `expire`, expires) one key by digest; `Ok(false)` if it has no record.
    /// Idempotent: a repeated revocation keeps the first time, a repeated announcement is
    /// harmless.
    async fn end_record(
        &self,
        s: &RedisStore,
        digest: &KeyDigest,
        at: u64,
        expire: bool,
    ) -> Result<bool, StoreError> {
        let script = if expire {
            &self.expire_record
        } else {
            &self.revoke_record
        };
        let (key, channel, hex) = (
            s.record_key(digest),
            s.bucket_channel(digest),
            digest.to_hex(),
        );
        let done: i64 = s
            .idempotent(|mut c| {
                let mut inv = script.key(&key);
                inv.arg(&channel).arg(&hex).arg(at);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(done == 1)
    }

    /// Ends every key in `hexes` (see [`Scripts::end_record`]), stopping at the first failure.
    async fn end_all(
        &self,
        s: &RedisStore,
        hexes: &[String],
        at: u64,
        expire: bool,
    ) -> Result<(), StoreError> {
        for hex in hexes {
            let digest = KeyDigest::from_hex(hex)
                .ok_or_else(|| StoreError::Corrupt("an id index is not a digest".into()))?;
            self.end_record(s, &digest, at, expire).await?;
        }
        Ok(())
    }

    pub(super) async fn insert(&self, s: &RedisStore, r: &KeyRecord) -> Result<(), StoreError> {
        let mut inv = self.claim_id.key(s.id_key(&r.id));
        inv.key(s.ids_key())
            .arg(r.digest.to_hex())
            .arg(r.created_at)
            .arg(&r.id);
        let claimed: i64 = s
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        if claimed == 0 {
            return Err(StoreError::Conflict(format!("key id {} exists", r.id)));
        }
        if !self.create_record(s, r).await? {
            // Another key has this digest (never, for keys keygate makes): the claimed id
            // would name that key's record, so it is taken back.
            let (id_key, ids_key, id) = (s.id_key(&r.id), s.ids_key(), r.id.clone());
            s.call(|mut c| async move {
                redis::pipe()
                    .del(id_key)
                    .zrem(ids_key, id)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await?;
            return Err(StoreError::Conflict(format!("key {} exists", r.id)));
        }
        Ok(())
    }

    pub(super) async fn revoke(
        &self,
        s: &RedisStore,
        id: &str,
        at: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let Some(digest) = self.digest_of(s, id).await? else {
            return Ok(None);
        };
        if !self.end_record(s, &digest, at, false).await? {
            // An id index left by a write that failed half-way: there is no key.
            return Ok(None);
        }
        s.fetch(&digest).await
    }

    /// The digest an id names, from the id index.
    async fn digest_of(&self, s: &RedisStore, id: &str) -> Result<Option<KeyDigest>, StoreError> {
        let key = s.id_key(id);
        let hex: Option<String> = s
            .idempotent(|mut c| {
                let key = key.clone();
                async move { redis::AsyncCommands::get(&mut c, key).await }
            })
            .await?;
        hex.map(|h| {
            KeyDigest::from_hex(&h)
                .ok_or_else(|| StoreError::Corrupt(format!("id index of {id} is not a digest")))
        })
        .transpose()
    }

    pub(super) async fn create_account(
        &self,
        s: &RedisStore,
        account: &ServiceAccount,
        key: &KeyRecord,
    ) -> Result<(), StoreError> {
        let mut inv = self.create_account.key(s.account_key(&account.id));
        inv.key(s.names_key(&account.tenant))
            .key(s.account_ids_key())
            .key(s.account_keys_key(&account.id))
            .key(s.id_key(&key.id))
            .key(s.ids_key())
            .arg(ServiceAccount::name_key(&account.name))
            .arg(&account.id)
            .arg(account.created_at)
            .arg(&key.id)
            .arg(key.digest.to_hex());
        for (field, value) in encode_account(account) {
            inv.arg(field).arg(value);
        }
        match s
            .call(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })
            .await?
        {
            1 => {}
            0 => {
                return Err(StoreError::Conflict(format!(
                    "tenant {} already has a service account named {:?}",
                    account.tenant, account.name
                )))
            }
            _ => {
                return Err(StoreError::Conflict(format!(
                    "service account id {} exists",
                    account.id
                )))
            }
        }
        if !self.create_record(s, key).await? {
            return Err(StoreError::Conflict(format!("key {} exists", key.id)));
        }
        Ok(())
    }

    pub(super) async fn rotate_account(
        &self,
        s: &RedisStore,
        id: &str,
        new_key: &KeyRecord,
        old: OldKeys,
    ) -> Result<Option<ServiceAccount>, StoreError> {
        if s.get_account(id).await?.is_none() {
            return Ok(None);
        }
        if !self.create_record(s, new_key).await? {
            return Err(StoreError::Conflict(format!("key {} exists", new_key.id)));
        }
        let mut inv = self.name_current.key(s.account_key(id));
        inv.key(s.account_keys_key(id))
            .key(s.id_key(&new_key.id))
            .key(s.ids_key())
            .arg(format!("{}:id:", s.catalog))
            .arg(&new_key.id)
            .arg(new_key.digest.to_hex())
            .arg(new_key.created_at)
            .arg(
                new_key
                    .expires_at
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
            );
        let named: Vec<redis::Value> = s
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        let (code, others) = status_and_digests(named)?;
        if code != 1 {
            // The account went away, or the id was taken, after the record was written: the
            // record no one was given is revoked again.
            self.end_record(s, &new_key.digest, new_key.created_at, false)
                .await?;
            return match code {
                0 => Ok(None),
                _ => Err(StoreError::Conflict(format!(
                    "key id {} exists",
                    new_key.id
                ))),
            };
        }
        let (at, expire) = match old {
            OldKeys::RevokeAt(t) => (t, false),
            OldKeys::ExpireAt(t) => (t, true),
        };
        self.end_all(s, &others, at, expire).await?;
        s.get_account(id).await
    }

    pub(super) async fn remove_account(
        &self,
        s: &RedisStore,
        id: &str,
        at: u64,
    ) -> Result<Option<ServiceAccount>, StoreError> {
        let Some(account) = s.get_account(id).await? else {
            return Ok(None);
        };
        // First every key it has now, while the account still lists them.
        let first: Vec<String> = {
            let key = s.account_keys_key(id);
            let ids: Vec<String> = s
                .idempotent(|mut c| {
                    let key = key.clone();
                    async move { redis::AsyncCommands::smembers(&mut c, key).await }
                })
                .await?;
            let mut hexes = Vec::with_capacity(ids.len());
            for kid in ids {
                if let Some(d) = self.digest_of(s, &kid).await? {
                    hexes.push(d.to_hex());
                }
            }
            hexes
        };
        self.end_all(s, &first, at, false).await?;
        let mut inv = self.remove_account.key(s.account_key(id));
        inv.key(s.account_keys_key(id))
            .key(s.names_key(&account.tenant))
            .key(s.account_ids_key())
            .arg(format!("{}:id:", s.catalog))
            .arg(ServiceAccount::name_key(&account.name))
            .arg(id);
        let removed: Vec<redis::Value> = s
            .call(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        let (code, all) = status_and_digests(removed)?;
        if code != 1 {
            return Ok(None);
        }
        // Then any key a rotation added in between.
        let done: HashSet<&String> = first.iter().collect();
        let late: Vec<String> = all.iter().filter(|h| !done.contains(h)).cloned().collect();
        self.end_all(s, &late, at, false).await?;
        Ok(Some(account))
    }

    pub(super) async fn touch(
        &self,
        s: &RedisStore,
        used: &[(KeyDigest, u64)],
    ) -> Result<(), StoreError> {
        let mut by_bucket: HashMap<String, Vec<&(KeyDigest, u64)>> = HashMap::new();
        for u in used {
            by_bucket
                .entry(crate::store::cluster::bucket(&u.0))
                .or_default()
                .push(u);
        }
        for batch in by_bucket.values() {
            // Idempotent (only ever moves a time forward), so a dropped connection may retry.
            s.idempotent(|mut c| {
                let mut inv = self.touch_records.prepare_invoke();
                for (d, _) in batch {
                    inv.key(s.record_key(d));
                }
                for (_, t) in batch {
                    inv.arg(*t);
                }
                async move { inv.invoke_async::<i64>(&mut c).await }
            })
            .await?;
        }
        Ok(())
    }
}

/// Reads a `{code, hex…}` reply.
fn status_and_digests(reply: Vec<redis::Value>) -> Result<(i64, Vec<String>), StoreError> {
    let mut it = reply.into_iter();
    let code = match it.next() {
        Some(redis::Value::Int(c)) => c,
        _ => {
            return Err(StoreError::Corrupt(
                "a script answered without a status".into(),
            ))
        }
    };
    let hexes = it
        .map(|v| match v {
            redis::Value::BulkString(b) => String::from_utf8(b)
                .map_err(|_| StoreError::Corrupt("a script answered a non-digest".into())),
            _ => Err(StoreError::Corrupt("a script answered a non-digest".into())),
        })
        .collect::<Result<_, _>>()?;
    Ok((code, hexes))
}
