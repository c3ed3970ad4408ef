//! The verifier: from a key digest to a verdict, through the in-process cache.
//!
//! Verdicts are cached in moka, keyed by [`KeyDigest`]. Concurrent misses for one digest share
//! a single store lookup (`try_get_with`); a store error reaches every waiter and is never
//! cached. A known key's entry lives at most the configured TTL and never past the key's expiry;
//! an unknown key is remembered as unknown for the (short) negative TTL, so a flood of made-up
//! keys reaches the store once per key per negative TTL.
//!
//! Beside the cache, the registry of live upgraded connections ([`live`]): what invalidates a
//! key's verdicts reaches the connections it opened too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::Expiry;

use crate::identity::Identity;
use crate::key::KeyDigest;
use crate::metrics::Metrics;
use crate::store::{now_unix, InvalidationSink, Store, StoreError};

mod last_noted;
pub mod live;

use last_noted::LastNoted;
use live::{Held, Live};

/// Validated cache settings.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Most verdicts kept.
    pub capacity: u64,
    /// Longest life of a known key's verdict.
    pub ttl: Duration,
    /// Life of an unknown key's verdict.
    pub negative_ttl: Duration,
    /// Trust in cached verdicts after the invalidation subscription is lost.
    pub trust_while_unsubscribed: Duration,
}

/// What the cache knows of a digest: 32 bytes (the refusal sits beside the niche of the
/// identity's buffer), so that an entry is 40.
#[derive(Clone, Debug)]
enum Verdict {
    /// A key that is not revoked (it may have expired since).
    Known(Identity),
    /// A key refused whatever the time.
    Refused(Refusal),
}

/// Why a verdict refuses a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// A revoked key. Final: no operation un-revokes a key.
    Revoked,
    /// No such key.
    Unknown,
}

/// A cached verdict with the invalidation generations read before its store lookup began.
#[derive(Clone, Debug)]
struct Entry {
    verdict: Verdict,
    stamp: Stamp,
}

impl Entry {
    /// Whether the verdict may be used when the generations are `now`: if no invalidation of
    /// its stripe, and no flush, came after its store read began; a revoked verdict always
    /// (it is final, so it cannot be stale).
    fn usable(&self, now: Stamp) -> bool {
        matches!(self.verdict, Verdict::Refused(Refusal::Revoked)) || self.stamp == now
    }
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

impl Expiry<KeyDigest, Entry> for VerdictExpiry {
    fn expire_after_create(&self, _: &KeyDigest, e: &Entry, _: Instant) -> Option<Duration> {
        Some(match &e.verdict {
            Verdict::Refused(Refusal::Unknown) => self.negative_ttl,
            Verdict::Refused(Refusal::Revoked) => self.ttl,
            Verdict::Known(id) => match id.expires_at() {
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

/// Invalidation generations: one counter per stripe of the digest space, and an epoch for
/// whole-cache flushes. 16,384 stripes cost 128 KiB and make a revocation re-check about one
/// cached key in 16,384.
struct Generations {
    stripes: Box<[AtomicU64]>,
    epoch: AtomicU64,
}

/// The generations a cache fill saw before reading the store, their low 32 bits (an entry is
/// 8 bytes smaller than with the whole counters).
///
/// Wrap-around is harmless: a stale entry would pass `Entry::usable` only if its stripe (or
/// the epoch) had moved on by exactly a multiple of 2^32 since its fill, that is after
/// 4,294,967,296 invalidations of the keys of one stripe (one digest in 16,384), or as many
/// whole-cache flushes, all within the entry's life (at most `cache.ttl`), with no request
/// reading the entry in between (the first request after the first of them discards it). At
/// a million invalidations per second, all of them in that one stripe, that takes 71 minutes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    stripe: u32,
    epoch: u32,
}

const STRIPES: usize = 16_384;

impl Generations {
    fn new() -> Self {
        Generations {
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            epoch: AtomicU64::new(0),
        }
    }

    fn slot(&self, d: &KeyDigest) -> &AtomicU64 {
        // Digests are uniformly random, so their first bytes spread keys evenly.
        &self.stripes[u16::from_le_bytes([d.0[0], d.0[1]]) as usize % STRIPES]
    }

    fn stamp(&self, d: &KeyDigest) -> Stamp {
        Stamp {
            stripe: self.slot(d).load(Ordering::SeqCst) as u32,
            epoch: self.epoch.load(Ordering::SeqCst) as u32,
        }
    }
}

/// Whether cached verdicts can be trusted.
///
/// Invariant (trust bound): with a store that reports when its invalidation feed was last
/// known good ([`InvalidationSink::synced`]), a cached verdict is used only while less than
/// `cache.trust_while_unsubscribed` has passed since that moment, whether or not the feed is
/// (yet) known to be down: a half-open link is noticed only later, and the bound must not wait
/// for that. The check reads the clock on every request for this reason. Other stores (none
/// reports a feed) keep the looser rule: trusted while up, and for the bound after going down.
/// Tested by `a_half_open_subscription_is_distrusted_within_the_bound` in tests/revocation.rs.
struct Link {
    base: Instant,
    /// Milliseconds after `base` when the link went down; `UP` while it is up.
    down_since_ms: AtomicU64,
    /// Microseconds after `base` when the feed was last known good; `NEVER` until reported.
    synced_us: AtomicU64,
    trust_for: Duration,
}

const UP: u64 = u64::MAX;
const NEVER: u64 = u64::MAX;

impl Link {
    fn down_for(&self) -> Option<Duration> {
        let since = self.down_since_ms.load(Ordering::SeqCst);
        (since != UP).then(|| {
            Duration::from_millis((self.base.elapsed().as_millis() as u64).saturating_sub(since))
        })
    }

    fn trusted(&self) -> bool {
        self.trusted_at(Instant::now())
    }

    fn trusted_at(&self, now: Instant) -> bool {
        let synced = self.synced_us.load(Ordering::SeqCst);
        if synced != NEVER {
            let now = now.saturating_duration_since(self.base).as_micros() as u64;
            return Duration::from_micros(now.saturating_sub(synced)) < self.trust_for;
        }
        self.down_for().is_none_or(|d| d <= self.trust_for)
    }

    fn synced(&self, at: Instant) {
        // Reports come from the store's feed, started after the verifier: never before `base`.
        let at = at.saturating_duration_since(self.base).as_micros() as u64;
        // Never moves back (NEVER is the largest value, so the first report replaces it).
        let mut cur = self.synced_us.load(Ordering::SeqCst);
        while cur == NEVER || cur < at {
            match self
                .synced_us
                .compare_exchange_weak(cur, at, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return,
                Err(seen) => cur = seen,
            }
        }
    }
}

/// Default of `store.last_used_interval`.
pub const DEFAULT_LAST_USED_INTERVAL: Duration = Duration::from_secs(5);

/// Most last-used notes waiting for the flusher; beyond it notes are dropped (and counted),
/// never waited for.
const LAST_USED_QUEUE: usize = 16_384;

/// Last-used bookkeeping: the request path queues `(digest, time)` at most once per key per
/// interval with a non-blocking `try_send`; a background task drains the queue every interval
/// and writes one batch to the store. No request ever waits for it.
struct Usage {
    tx: tokio::sync::mpsc::Sender<(KeyDigest, u64)>,
    rx: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<(KeyDigest, u64)>>>,
    interval: Duration,
    /// When each key last queued a note.
    noted: LastNoted,
}

/// Cache plus store: answers "is this key good, and whose is it?".
pub struct Verifier {
    cache: Cache<KeyDigest, Entry>,
    store: Arc<dyn Store>,
    generations: Generations,
    link: Link,
    metrics: Arc<Metrics>,
    usage: Usage,
    /// The live upgraded connections, by key.
    live: Arc<Live>,
}

impl Verifier {
    /// Builds a verifier with an empty cache.
    pub fn new(store: Arc<dyn Store>, settings: &CacheSettings, metrics: Arc<Metrics>) -> Self {
        let (by_size, by_expiry) = (
            metrics.cache_evictions_size.clone(),
            metrics.cache_evictions_expired.clone(),
        );
        let cache = Cache::builder()
            .max_capacity(settings.capacity)
            .expire_after(VerdictExpiry {
                ttl: settings.ttl,
                negative_ttl: settings.negative_ttl,
            })
            .eviction_listener(move |_, _, cause| match cause {
                RemovalCause::Size => by_size.inc(),
                RemovalCause::Expired => by_expiry.inc(),
                RemovalCause::Explicit | RemovalCause::Replaced => {}
            })
            .build();
        metrics.subscription_up.set(1);
        let (tx, rx) = tokio::sync::mpsc::channel(LAST_USED_QUEUE);
        Verifier {
            usage: Usage {
                tx,
                rx: std::sync::Mutex::new(Some(rx)),
                interval: DEFAULT_LAST_USED_INTERVAL,
                noted: LastNoted::new(),
            },
            cache,
            store,
            generations: Generations::new(),
            link: Link {
                base: Instant::now(),
                down_since_ms: AtomicU64::new(UP),
                synced_us: AtomicU64::new(NEVER),
                trust_for: settings.trust_while_unsubscribed,
            },
            metrics,
            live: Arc::default(),
        }
    }

    /// Registers a live upgraded connection opened with the key `digest`: from now on a
    /// revocation, a change or a flush after which the store no longer vouches for the key
    /// closes it (see [`Held::ended`]); it leaves the registry when the [`Held`] drops.
    /// Register *before* the key's last check, so that an invalidation is either seen by that
    /// check or finds the connection here.
    pub fn hold(&self, digest: KeyDigest) -> Held {
        self.live.hold(digest)
    }

    /// Sets how often a key's last use is recorded (at least 1 s).
    pub fn with_last_used_interval(mut self, interval: Duration) -> Self {
        self.usage.interval = interval.max(Duration::from_secs(1));
        self
    }

    /// Starts the task that writes queued last-used times to the store, one batch per
    /// interval. It ends when the verifier is dropped. Call once; later calls do nothing.
    pub fn start_last_used_flusher(&self) {
        let Some(mut rx) = self.usage.rx.lock().expect("usage lock").take() else {
            return;
        };
        let (store, metrics, interval) = (
            self.store.clone(),
            self.metrics.clone(),
            self.usage.interval,
        );
        tokio::spawn(async move {
            let mut open = true;
            while open {
                tokio::time::sleep(interval).await;
                let mut batch: HashMap<KeyDigest, u64> = HashMap::new();
                loop {
                    match rx.try_recv() {
                        Ok((d, t)) => {
                            let slot = batch.entry(d).or_insert(t);
                            *slot = (*slot).max(t);
                        }
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                let batch: Vec<(KeyDigest, u64)> = batch.into_iter().collect();
                if let Err(e) = store.touch(&batch).await {
                    // Bookkeeping only: these times are lost, later uses are recorded again.
                    metrics.last_used_errors.inc();
                    tracing::warn!(error = %e, keys = batch.len(), "cannot record last-used times");
                }
            }
        });
    }

    /// Starts the task that keeps live upgraded connections to the trust bound while the
    /// invalidation feed cannot vouch for the cache: every half bound, if cached verdicts are
    /// not trusted now (`cache.trust_while_unsubscribed` passed since the feed was last known
    /// good), every live connection is checked against the store (fail closed). A revocation
    /// missed while the feed is down so closes its key's connections within the bound and
    /// half of it again; the resubscribe's flush checks them all once more. It ends when the
    /// verifier is dropped. Call once.
    pub fn start_live_sweeper(self: &Arc<Self>) {
        let verifier = Arc::downgrade(self);
        let every = (self.link.trust_for / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(v) = verifier.upgrade() else { return };
                if v.link.trusted() {
                    continue;
                }
                let digests = v.live.digests();
                if !digests.is_empty() {
                    v.live.recheck_now(&v.store, &v.metrics, digests).await;
                }
            }
        });
    }

    /// Queues a last-used note for a verified key, at most once per key per interval (see
    /// [`LastNoted`] for what keys sharing its table change). Never waits: a full queue drops
    /// the note.
    fn note_use(&self, digest: KeyDigest, now: u64) {
        // One winner per interval among concurrent requests with this key.
        if self
            .usage
            .noted
            .claim(&digest, now, self.usage.interval.as_secs())
            && self.usage.tx.try_send((digest, now)).is_err()
        {
            self.metrics.last_used_dropped.inc();
        }
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// How long the invalidation subscription has been down, if it is.
    pub fn unsubscribed_for(&self) -> Option<Duration> {
        self.link.down_for()
    }

    /// Verifies a key by digest at time `now` (Unix seconds).
    pub async fn verify(&self, digest: KeyDigest, now: u64) -> Result<Identity, VerifyError> {
        let verdict = if self.link.trusted() {
            self.cached(digest).await?
        } else if let Some(Entry {
            verdict: Verdict::Refused(Refusal::Revoked),
            ..
        }) = self.cache.get(&digest).await
        {
            // Final, so still true however many invalidations were missed.
            Verdict::Refused(Refusal::Revoked)
        } else {
            // Invalidations may have been missed: every request asks the store.
            self.metrics.unsynced_lookups.inc();
            self.lookup(digest).await.map_err(store_error)?.verdict
        };
        match verdict {
            Verdict::Refused(Refusal::Unknown) => Err(VerifyError::Unknown),
            Verdict::Refused(Refusal::Revoked) => Err(VerifyError::Revoked),
            Verdict::Known(id) if id.expires_at().is_some_and(|e| now >= e) => {
                Err(VerifyError::Expired)
            }
            Verdict::Known(id) => {
                self.note_use(digest, now);
                Ok(id)
            }
        }
    }

    /// The verdict through the cache; concurrent misses share one store lookup.
    async fn cached(&self, digest: KeyDigest) -> Result<Verdict, VerifyError> {
        for _ in 0..3 {
            let (entry, hit) = match self.cache.get(&digest).await {
                Some(entry) => (entry, true),
                None => {
                    self.metrics.cache_misses.inc();
                    let entry = self
                        .cache
                        .try_get_with(digest, self.lookup(digest))
                        .await
                        .map_err(VerifyError::Store)?;
                    (entry, false)
                }
            };
            // Invariant (no stale window): a cached verdict is used only if no invalidation of
            // its stripe, and no flush, was processed after its store read began. Invalidation
            // bumps the generation before evicting (a revocation caches "revoked" before and
            // after the bump), and a fill stamps the generations before reading, so a fill that
            // read a record before a revocation carries an old stamp however late moka inserts
            // it (even over the "revoked" entry), and is discarded here. Only a revoked verdict
            // skips the check: it is final. Tested by `a_lookup_racing_a_revocation_is_never_cached` (fill vs.
            // revocation) and `a_fill_across_a_resubscribe_is_discarded` (fill vs. flush) in
            // tests/revocation.rs.
            let now = self.generations.stamp(&digest);
            if entry.usable(now) {
                if hit {
                    self.metrics.cache_hits.inc();
                    if matches!(entry.verdict, Verdict::Refused(Refusal::Unknown)) {
                        self.metrics.cache_negative_hits.inc();
                    }
                }
                return Ok(entry.verdict);
            }
            self.metrics.stale_fills.inc();
            // Remove the stale entry, but not one that replaced it meanwhile (say the
            // "revoked" of the very invalidation that made this one stale).
            self.cache
                .entry(digest)
                .and_compute_with(|cached| {
                    let keep = cached.is_none_or(|e| e.value().usable(now));
                    std::future::ready(if keep { Op::Nop } else { Op::Remove })
                })
                .await;
        }
        // Invalidations keep racing this key's fills: answer from the store directly.
        Ok(self.lookup(digest).await.map_err(store_error)?.verdict)
    }

    async fn lookup(&self, digest: KeyDigest) -> Result<Entry, StoreError> {
        let stamp = self.generations.stamp(&digest);
        let started = Instant::now();
        let found = self.store.lookup(&digest).await;
        self.metrics.store_lookup(started.elapsed(), found.is_ok());
        let verdict = match found? {
            None => Verdict::Refused(Refusal::Unknown),
            Some(record) if record.revoked_at.is_some() => Verdict::Refused(Refusal::Revoked),
            Some(record) => Verdict::Known(Identity::from_record(&record)?),
        };
        Ok(Entry { verdict, stamp })
    }

    /// Number of cached verdicts, after applying the cache's pending bookkeeping (for metrics;
    /// costs a little work, so not for the request path).
    pub async fn cached_entries(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }
}

fn store_error(e: StoreError) -> VerifyError {
    VerifyError::Store(Arc::new(e))
}

#[async_trait::async_trait]
impl InvalidationSink for Verifier {
    async fn invalidate(&self, digest: &KeyDigest) {
        // Bump first: from here on, any entry filled from an older read is refused.
        self.generations.slot(digest).fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate(digest).await;
        self.metrics.invalidations.inc();
        // The record changed (an expiry moved, a key deleted): the key's live connections are
        // checked against the store, after the cache was told (see `live`).
        if self.live.holds(digest) {
            let (store, metrics) = (self.store.clone(), self.metrics.clone());
            self.live.recheck(store, metrics, vec![*digest]);
        }
    }

    async fn revoked(&self, digest: &KeyDigest) {
        // Final, so cached at once (a revoked verdict is used whatever its stamp): no request
        // has to read the record to learn it, and a flood of requests with the key costs the
        // store nothing. Cached *before* the bump, so that no request finds the stripe bumped
        // over the old entry (which it would discard and refill from the store).
        let revoked = || Entry {
            verdict: Verdict::Refused(Refusal::Revoked),
            stamp: self.generations.stamp(digest),
        };
        self.cache.insert(*digest, revoked()).await;
        // Then, as for any invalidation: a fill that read the record before the revocation
        // carries an older stamp and is refused from here on, even if moka inserts it over
        // the entry above; cache "revoked" again in case one landed in between.
        self.generations.slot(digest).fetch_add(1, Ordering::SeqCst);
        self.cache.insert(*digest, revoked()).await;
        self.metrics.invalidations.inc();
        // Invariant (no upgraded connection outlives its key's revocation by more than the
        // propagation bound): the connections the key opened are closed here, as the
        // revocation is applied, after the cache holds "revoked". A connection registers
        // before its key's last check (`Verifier::hold`), so it is either found here or its
        // check reads the "revoked" cached above. Tested by
        // `a_websocket_echoes_through_keygate_and_closes_when_its_key_is_revoked` in
        // tests/upgrades.rs.
        self.live
            .close(digest, crate::metrics::UpgradeClose::Revoked);
    }

    fn invalidate_all(&self) {
        self.generations.epoch.fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate_all();
        self.metrics.cache_flushes.inc();
        // Any record may have changed (messages were missed): every live connection is checked
        // against the store again. Tested by
        // `a_whole_cache_flush_closes_the_websockets_of_keys_found_dead` in tests/upgrades.rs.
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        self.live.recheck(store, metrics, self.live.digests());
    }

    fn link(&self, up: bool) {
        if up {
            self.link.down_since_ms.store(UP, Ordering::SeqCst);
        } else {
            let now = self.link.base.elapsed().as_millis() as u64;
            // Keep the earliest time: repeated failed reconnects do not extend the trust.
            let _ = self.link.down_since_ms.compare_exchange(
                UP,
                now,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
        self.metrics.subscription_up.set(up as i64);
    }

    fn synced(&self, at: Instant) {
        self.link.synced(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{generate, KeyKind};
    use crate::store::KeyRecord;
    use async_trait::async_trait;
    use std::sync::atomic::AtomicUsize;
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
            expires_at,
            ..KeyRecord::example(digest)
        }
    }

    fn settings() -> CacheSettings {
        CacheSettings {
            capacity: 100,
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(60),
            trust_while_unsubscribed: Duration::from_secs(3),
        }
    }

    #[tokio::test]
    async fn known_key_is_looked_up_once_then_cached() {
        let store = Arc::new(FakeStore::default());
        let k = generate(KeyKind::User);
        store.insert(&record(k.digest, None)).await.unwrap();
        let v = Verifier::new(store.clone(), &settings(), Arc::new(Metrics::default()));
        for _ in 0..3 {
            let id = v.verify(k.digest, 10).await.unwrap();
            assert_eq!(id.tenant(), "acme");
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn use_is_noted_at_most_once_per_key_per_interval() {
        let store = Arc::new(FakeStore::default());
        let (a, b) = (generate(KeyKind::User), generate(KeyKind::User));
        store.insert(&record(a.digest, None)).await.unwrap();
        store.insert(&record(b.digest, None)).await.unwrap();
        let v = Verifier::new(store.clone(), &settings(), Arc::new(Metrics::new()))
            .with_last_used_interval(Duration::from_secs(10));
        for now in [100, 101, 109] {
            v.verify(a.digest, now).await.unwrap();
        }
        v.verify(b.digest, 105).await.unwrap();
        v.verify(a.digest, 110).await.unwrap();
        let mut rx = v.usage.rx.lock().unwrap().take().unwrap();
        let mut notes = Vec::new();
        while let Ok(n) = rx.try_recv() {
            notes.push(n);
        }
        assert_eq!(
            notes,
            vec![(a.digest, 100), (b.digest, 105), (a.digest, 110)]
        );
    }

    #[tokio::test]
    async fn unknown_key_is_cached_negatively() {
        let store = Arc::new(FakeStore::default());
        let v = Verifier::new(store.clone(), &settings(), Arc::new(Metrics::default()));
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
        let v = Verifier::new(store.clone(), &settings(), Arc::new(Metrics::default()));
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
        let v = Verifier::new(store.clone(), &settings(), Arc::new(Metrics::default()));
        assert!(matches!(
            v.verify(k.digest, 1).await,
            Err(VerifyError::Store(_))
        ));
        store.down.store(false, Ordering::SeqCst);
        assert!(v.verify(k.digest, 1).await.is_ok());
    }

    fn entry(verdict: Verdict) -> Entry {
        Entry {
            verdict,
            stamp: Stamp {
                stripe: 0,
                epoch: 0,
            },
        }
    }

    #[tokio::test]
    async fn an_invalidation_during_a_fill_discards_the_filled_verdict() {
        let store = Arc::new(FakeStore::default());
        let k = generate(KeyKind::User);
        store.insert(&record(k.digest, None)).await.unwrap();
        let v = Arc::new(Verifier::new(
            store.clone(),
            &settings(),
            Arc::new(Metrics::default()),
        ));
        // A fill stamped before an invalidation must not be used after it.
        let stale = v.lookup(k.digest).await.unwrap();
        v.invalidate(&k.digest).await;
        v.cache.insert(k.digest, stale).await;
        store.records.lock().unwrap()[0].revoked_at = Some(5);
        assert!(matches!(
            v.verify(k.digest, 10).await,
            Err(VerifyError::Revoked)
        ));
        assert_eq!(v.metrics.stale_fills.get(), 1);
    }

    #[tokio::test]
    async fn a_revocation_announced_as_such_needs_no_store_lookup() {
        let store = Arc::new(FakeStore::default());
        let k = generate(KeyKind::User);
        store.insert(&record(k.digest, None)).await.unwrap();
        let v = Verifier::new(store.clone(), &settings(), Arc::new(Metrics::default()));
        v.verify(k.digest, 10).await.unwrap();
        // A fill that read the live record just before the revocation.
        let stale = v.lookup(k.digest).await.unwrap();
        store.records.lock().unwrap()[0].revoked_at = Some(5);
        v.revoked(&k.digest).await;
        let lookups = store.lookups.load(Ordering::SeqCst);
        for _ in 0..3 {
            assert!(matches!(
                v.verify(k.digest, 10).await,
                Err(VerifyError::Revoked)
            ));
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), lookups);
        // Final: a later invalidation of the same stripe does not make it stale.
        v.generations.slot(&k.digest).fetch_add(1, Ordering::SeqCst);
        assert!(matches!(
            v.verify(k.digest, 10).await,
            Err(VerifyError::Revoked)
        ));
        assert_eq!(store.lookups.load(Ordering::SeqCst), lookups);
        // The stale fill lands over it late: it is refused, never served.
        v.cache.insert(k.digest, stale).await;
        assert!(matches!(
            v.verify(k.digest, 10).await,
            Err(VerifyError::Revoked)
        ));
        assert_eq!(v.metrics.stale_fills.get(), 1);
    }

    #[tokio::test]
    async fn cache_is_bypassed_when_the_link_is_down_past_the_bound() {
        let store = Arc::new(FakeStore::default());
        let k = generate(KeyKind::User);
        store.insert(&record(k.digest, None)).await.unwrap();
        let mut s = settings();
        s.trust_while_unsubscribed = Duration::ZERO;
        let v = Verifier::new(store.clone(), &s, Arc::new(Metrics::default()));
        v.verify(k.digest, 10).await.unwrap();
        v.verify(k.digest, 10).await.unwrap();
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
        v.link(false);
        std::thread::sleep(Duration::from_millis(2));
        v.verify(k.digest, 10).await.unwrap();
        assert_eq!(
            store.lookups.load(Ordering::SeqCst),
            2,
            "the cache was trusted"
        );
        assert!(v.unsubscribed_for().is_some());
        v.link(true);
        v.verify(k.digest, 10).await.unwrap();
        assert_eq!(store.lookups.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_trust_bound_counts_from_when_the_feed_was_last_known_good() {
        let base = Instant::now();
        let link = Link {
            base,
            down_since_ms: AtomicU64::new(UP),
            synced_us: AtomicU64::new(NEVER),
            trust_for: Duration::from_secs(3),
        };
        let at = |ms: u64| base + Duration::from_millis(ms);
        link.synced(at(1_000));
        // Up all along (no failure noticed): trusted for the bound after the report, no longer.
        assert!(link.trusted_at(at(3_999)));
        assert!(!link.trusted_at(at(4_001)));
        // A later report extends it; an older one (reordered) does not shorten it.
        link.synced(at(2_000));
        link.synced(at(1_500));
        assert!(link.trusted_at(at(4_999)));
        assert!(!link.trusted_at(at(5_001)));
    }

    #[tokio::test]
    async fn a_feed_that_stops_vouching_ends_the_trust_while_still_up() {
        let store = Arc::new(FakeStore::default());
        let k = generate(KeyKind::User);
        store.insert(&record(k.digest, None)).await.unwrap();
        let v = Verifier::new(store.clone(), &settings(), Arc::new(Metrics::default()));
        v.link(true);
        v.synced(Instant::now());
        v.verify(k.digest, 10).await.unwrap();
        v.verify(k.digest, 10).await.unwrap();
        assert_eq!(
            store.lookups.load(Ordering::SeqCst),
            1,
            "the cache was not used"
        );
        // Four seconds on, with no newer report, the 3 s bound has passed: the store is asked.
        assert!(!v.link.trusted_at(Instant::now() + Duration::from_secs(4)));
        assert!(v.unsubscribed_for().is_none(), "no failure was noticed");
    }

    #[test]
    fn a_cached_entry_is_forty_bytes() {
        // A cached verdict is this moka value and the identity's one buffer.
        assert_eq!(std::mem::size_of::<Verdict>(), 32);
        assert_eq!(std::mem::size_of::<Entry>(), 40);
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
            .expire_after_create(&k.digest, &entry(Verdict::Known(id)), Instant::now())
            .unwrap();
        assert!(life <= Duration::from_secs(10), "{life:?}");
        let life = exp
            .expire_after_create(
                &k.digest,
                &entry(Verdict::Refused(Refusal::Unknown)),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(life, Duration::from_secs(5));
    }
}
