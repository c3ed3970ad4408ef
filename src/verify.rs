//! The verifier: from a key digest to a verdict, through the in-process cache.
//!
//! Verdicts are cached in moka, keyed by [`KeyDigest`]. Concurrent misses for one digest share
//! a single store lookup (`try_get_with`); a store error reaches every waiter and is never
//! cached. A known key's entry lives at most the configured TTL and never past the key's expiry;
//! an unknown key is remembered as unknown for the (short) negative TTL, so a flood of made-up
//! keys reaches the store once per key per negative TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use moka::future::Cache;
use moka::Expiry;

use crate::config::CacheSettings;
use crate::key::{KeyDigest, KeyKind};
use crate::store::{now_unix, InvalidationSink, KeyRecord, Store, StoreError};

/// A known key, as the request path needs it: identity header values are built once, when the
/// entry is filled, so a cached request copies no strings.
#[derive(Debug)]
pub struct Identity {
    /// Public key id, for logs.
    pub key_id: Box<str>,
    /// The key's tenant.
    pub tenant: Box<str>,
    /// The key's role.
    pub role: Box<str>,
    /// User or service account.
    pub kind: KeyKind,
    /// Expiry, Unix seconds.
    pub expires_at: Option<u64>,
    /// Whether the key was revoked.
    pub revoked: bool,
    /// Prebuilt header values.
    pub headers: IdentityValues,
}

/// Identity header values for the upstream.
#[derive(Debug)]
pub struct IdentityValues {
    /// Key id.
    pub key_id: HeaderValue,
    /// Tenant.
    pub tenant: HeaderValue,
    /// Role.
    pub role: HeaderValue,
    /// Subject.
    pub subject: HeaderValue,
    /// `user` or `service_account`.
    pub subject_kind: HeaderValue,
}

impl Identity {
    /// Builds the request-path view of a record.
    pub fn from_record(r: &KeyRecord) -> Result<Self, StoreError> {
        let value = |field: &str, v: &str| {
            HeaderValue::from_str(v).map_err(|_| {
                StoreError::Corrupt(format!("key {}: {field} is not a header value", r.id))
            })
        };
        Ok(Identity {
            headers: IdentityValues {
                key_id: value("id", &r.id)?,
                tenant: value("tenant", &r.tenant)?,
                role: value("role", &r.role)?,
                subject: value("subject", &r.subject)?,
                subject_kind: HeaderValue::from_static(r.kind.as_str()),
            },
            key_id: r.id.as_str().into(),
            tenant: r.tenant.as_str().into(),
            role: r.role.as_str().into(),
            kind: r.kind,
            expires_at: r.expires_at,
            revoked: r.revoked_at.is_some(),
        })
    }
}

/// What the cache holds for a digest.
#[derive(Clone, Debug)]
enum Verdict {
    Known(Arc<Identity>),
    Unknown,
}

/// Why a key was refused.
#[derive(Debug, Clone)]
pub enum VerifyError {
    /// No such key.
    Unknown,
    /// The key is past its expiry.
    Expired,
    /// The key was revoked.
    Revoked,
    /// The store could not answer.
    Store(Arc<StoreError>),
}

/// Sets each entry's life from its verdict.
struct VerdictExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl Expiry<KeyDigest, Verdict> for VerdictExpiry {
    fn expire_after_create(&self, _: &KeyDigest, v: &Verdict, _: Instant) -> Option<Duration> {
        Some(match v {
            Verdict::Unknown => self.negative_ttl,
            Verdict::Known(id) => match id.expires_at {
                // Until the expiry the verdict is "valid"; after it, "expired" stays true.
                Some(exp) => {
                    let left = exp.saturating_sub(now_unix());
                    if left == 0 {
                        self.ttl
                    } else {
                        self.ttl.min(Duration::from_secs(left))
                    }
                }
                None => self.ttl,
            },
        })
    }
}

/// Cache plus store: answers "is this key good, and whose is it?".
pub struct Verifier {
    cache: Cache<KeyDigest, Verdict>,
    store: Arc<dyn Store>,
}

impl Verifier {
    /// Builds a verifier with an empty cache.
    pub fn new(store: Arc<dyn Store>, settings: &CacheSettings) -> Self {
        let cache = Cache::builder()
            .max_capacity(settings.capacity)
            .expire_after(VerdictExpiry {
                ttl: settings.ttl,
                negative_ttl: settings.negative_ttl,
            })
            .build();
        Verifier { cache, store }
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Verifies a key by digest at time `now` (Unix seconds).
    pub async fn verify(&self, digest: KeyDigest, now: u64) -> Result<Arc<Identity>, VerifyError> {
        let verdict = self
            .cache
            .try_get_with(digest, self.fill(digest))
            .await
            .map_err(VerifyError::Store)?;
        match verdict {
            Verdict::Unknown => Err(VerifyError::Unknown),
            Verdict::Known(id) if id.revoked => Err(VerifyError::Revoked),
            Verdict::Known(id) if id.expires_at.is_some_and(|e| now >= e) => {
                Err(VerifyError::Expired)
            }
            Verdict::Known(id) => Ok(id),
        }
    }

    async fn fill(&self, digest: KeyDigest) -> Result<Verdict, StoreError> {
        match self.store.lookup(&digest).await? {
            None => Ok(Verdict::Unknown),
            Some(record) => Ok(Verdict::Known(Arc::new(Identity::from_record(&record)?))),
        }
    }

    /// Number of cached verdicts (approximate, for metrics).
    pub fn cached_entries(&self) -> u64 {
        self.cache.entry_count()
    }
}

#[async_trait::async_trait]
impl InvalidationSink for Verifier {
    async fn invalidate(&self, digest: &KeyDigest) {
        self.cache.invalidate(digest).await;
    }

    fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{generate, KeyKind};
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// An in-memory store that counts lookups and can be made to fail.
    #[derive(Default)]
    struct FakeStore {
        records: Mutex<Vec<KeyRecord>>,
        lookups: AtomicUsize,
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl Store for FakeStore {
        async fn lookup(&self, d: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            Ok(self
                .records
                .lock()
                .unwrap()
                .iter()
                .find(|r| r.digest == *d)
                .cloned())
        }
        async fn insert(&self, r: &KeyRecord) -> Result<(), StoreError> {
            self.records.lock().unwrap().push(r.clone());
            Ok(())
        }
        async fn get(&self, _: &str) -> Result<Option<KeyRecord>, StoreError> {
            unreachable!()
        }
        async fn list(&self, _: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
            unreachable!()
        }
        async fn revoke(&self, _: &str, _: u64) -> Result<Option<KeyRecord>, StoreError> {
            unreachable!()
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn record(digest: KeyDigest, expires_at: Option<u64>) -> KeyRecord {
        KeyRecord {
            id: "key_1".into(),
            digest,
            name: "n".into(),
            tenant: "acme".into(),
            role: "admin".into(),
            subject: "alice".into(),
            kind: KeyKind::User,
            created_at: 1,
            expires_at,
            revoked_at: None,
        }
    }

    fn settings() -> CacheSettings {
        CacheSettings {
            capacity: 100,
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn known_key_is_looked_up_once_then_cached() {
        let store = Arc::new(FakeStore::default());
        let k = generate(KeyKind::User);
        store.insert(&record(k.digest, None)).await.unwrap();
        let v = Verifier::new(store.clone(), &settings());
        for _ in 0..3 {
            let id = v.verify(k.digest, 10).await.unwrap();
            assert_eq!(&*id.tenant, "acme");
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn unknown_key_is_cached_negatively() {
        let store = Arc::new(FakeStore::default());
        let v = Verifier::new(store.clone(), &settings());
        let d = generate(KeyKind::User).digest;
        for _ in 0..3 {
            assert!(matches!(v.verify(d, 10).await, Err(VerifyError::Unknown)));
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn expiry_is_checked_on_every_request() {
        let store = Arc::new(FakeStore::default());
        let k = generate(KeyKind::User);
        store.insert(&record(k.digest, Some(100))).await.unwrap();
        let v = Verifier::new(store.clone(), &settings());
        assert!(v.verify(k.digest, 99).await.is_ok());
        assert!(matches!(
            v.verify(k.digest, 100).await,
            Err(VerifyError::Expired)
        ));
    }

    #[tokio::test]
    async fn store_errors_are_not_cached() {
        let store = Arc::new(FakeStore::default());
        let k = generate(KeyKind::User);
        store.insert(&record(k.digest, None)).await.unwrap();
        store.down.store(true, Ordering::SeqCst);
        let v = Verifier::new(store.clone(), &settings());
        assert!(matches!(
            v.verify(k.digest, 1).await,
            Err(VerifyError::Store(_))
        ));
        store.down.store(false, Ordering::SeqCst);
        assert!(v.verify(k.digest, 1).await.is_ok());
    }

    #[test]
    fn known_entries_never_outlive_the_key() {
        let exp = VerdictExpiry {
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(5),
        };
        let k = generate(KeyKind::User);
        let id = Identity::from_record(&record(k.digest, Some(now_unix() + 10))).unwrap();
        let life = exp
            .expire_after_create(&k.digest, &Verdict::Known(Arc::new(id)), Instant::now())
            .unwrap();
        assert!(life <= Duration::from_secs(10), "{life:?}");
        let life = exp
            .expire_after_create(&k.digest, &Verdict::Unknown, Instant::now())
            .unwrap();
        assert_eq!(life, Duration::from_secs(5));
    }
}
