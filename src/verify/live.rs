//! The live upgraded connections (WebSockets and the like), by the digest of the key that
//! opened each: whatever ends a key's verdicts (a revocation, an expiry, a change or a flush
//! after which the store no longer vouches for it) also ends the connections it opened.
//!
//! The verifier tells the registry from the same place it applies invalidations and flushes to
//! the cache (its [`InvalidationSink`](crate::store::InvalidationSink) methods), after the
//! cache; a connection is registered *before* its key's last check (see
//! `proxy/upgrade.rs`). So for each connection, either that check already sees the
//! invalidation, or the registry already holds the connection when it is told.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio::sync::Notify;

use crate::key::KeyDigest;
use crate::metrics::{Metrics, UpgradeClose};
use crate::store::{now_unix, KeyRecord, Store, StoreError};

/// `expires_at` of a key that never expires.
const NEVER: u64 = u64::MAX;
/// `closed` of a connection still open.
const OPEN: u8 = u8::MAX;

/// Store lookups a re-check of every live connection keeps in flight at once.
const RECHECK_CONCURRENCY: usize = 16;

/// One live connection's state, shared by its holder and the registry.
struct Ticket {
    /// The key's expiry (Unix seconds), as last read; `NEVER` if none.
    expires_at: AtomicU64,
    /// Why keygate closed it (an index into [`UpgradeClose::ALL`]), or `OPEN`.
    closed: AtomicU8,
    /// Woken when `closed` or `expires_at` changes. `notify_one` keeps a permit when nobody
    /// waits, so a change made between two waits is never missed.
    wake: Notify,
}

impl Ticket {
    fn close(&self, reason: UpgradeClose) {
        // The first reason stays.
        let _ =
            self.closed
                .compare_exchange(OPEN, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn closed(&self) -> Option<UpgradeClose> {
        UpgradeClose::ALL
            .get(self.closed.load(Ordering::SeqCst) as usize)
            .copied()
    }

    fn set_expiry(&self, expires_at: Option<u64>) {
        self.expires_at
            .store(expires_at.unwrap_or(NEVER), Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// The registry of live upgraded connections.
#[derive(Default)]
pub struct Live {
    // Never held across an await; taken only when an upgraded connection opens or ends and
    // when an invalidation arrives, never by an ordinary request.
    conns: Mutex<HashMap<KeyDigest, Vec<Arc<Ticket>>>>,
}

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KeyDigest, Vec<Arc<Ticket>>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a connection opened with the key `digest`; it is live until the [`Held`]
    /// drops. Its expiry is unknown (never) until [`Held::set_expiry`].
    pub fn hold(self: &Arc<Self>, digest: KeyDigest) -> Held {
        let ticket = Arc::new(Ticket {
            expires_at: AtomicU64::new(NEVER),
            closed: AtomicU8::new(OPEN),
            wake: Notify::new(),
        });
        self.lock().entry(digest).or_default().push(ticket.clone());
        Held {
            live: self.clone(),
            digest,
            ticket,
        }
    }

    /// Closes every connection opened with `digest`, for `reason`.
    pub fn close(&self, digest: &KeyDigest, reason: UpgradeClose) {
        if let Some(tickets) = self.lock().get(digest) {
            for t in tickets {
                t.close(reason);
            }
        }
    }

    /// Whether some live connection was opened with `digest`.
    pub fn holds(&self, digest: &KeyDigest) -> bool {
        self.lock().contains_key(digest)
    }

    /// The keys with live connections now.
    pub fn digests(&self) -> Vec<KeyDigest> {
        self.lock().keys().copied().collect()
    }

    /// Applies what the store now says of `digest` to its connections: closes them unless the
    /// key is still live at `now`, else moves their expiry to the record's.
    fn apply(&self, digest: &KeyDigest, found: Result<Option<KeyRecord>, StoreError>, now: u64) {
        let verdict = match found {
            Ok(Some(r)) if r.revoked_at.is_some() => Err(UpgradeClose::Revoked),
            Ok(Some(r)) if r.is_expired(now) => Err(UpgradeClose::Expired),
            Ok(Some(r)) => Ok(r.expires_at),
            Ok(None) => Err(UpgradeClose::Unknown),
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-check an upgraded connection's key: closing it");
                Err(UpgradeClose::StoreUnavailable)
            }
        };
        if let Some(tickets) = self.lock().get(digest) {
            for t in tickets {
                match verdict {
                    Ok(expires_at) => t.set_expiry(expires_at),
                    Err(reason) => t.close(reason),
                }
            }
        }
    }

    /// Checks the connections of `digests` against the store (fail closed: a lookup that
    /// fails closes them), in a task of its own so that the caller, the invalidation feed,
    /// never waits for it. Lookups bypass the cache: the store's word is what counts.
    pub fn recheck(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        digests: Vec<KeyDigest>,
    ) {
        if digests.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime, so no connection task to close either.
            return;
        };
        let live = self.clone();
        runtime.spawn(async move { live.recheck_now(&store, &metrics, digests).await });
    }

    /// Checks the connections of `digests` against the store, as [`Live::recheck`] does, and
    /// resolves when done.
    pub async fn recheck_now(
        &self,
        store: &Arc<dyn Store>,
        metrics: &Arc<Metrics>,
        digests: Vec<KeyDigest>,
    ) {
        futures_util::stream::iter(digests)
            .map(|d| async move {
                let started = std::time::Instant::now();
                let found = store.lookup(&d).await;
                metrics.store_lookup(started.elapsed(), found.is_ok());
                (d, found)
            })
            .buffer_unordered(RECHECK_CONCURRENCY)
            .for_each(|(d, found)| {
                self.apply(&d, found, now_unix());
                std::future::ready(())
            })
            .await;
    }

    fn release(&self, digest: &KeyDigest, ticket: &Arc<Ticket>) {
        let mut conns = self.lock();
        if let Some(tickets) = conns.get_mut(digest) {
            tickets.retain(|t| !Arc::ptr_eq(t, ticket));
            if tickets.is_empty() {
                conns.remove(digest);
            }
        }
    }
}

/// A live connection's place in the registry; it leaves the registry on drop.
pub struct Held {
    live: Arc<Live>,
    digest: KeyDigest,
    ticket: Arc<Ticket>,
}

impl Held {
    /// Sets the key's expiry (Unix seconds; `None`: never), from its latest verdict.
    pub fn set_expiry(&self, expires_at: Option<u64>) {
        self.ticket.set_expiry(expires_at);
    }

    /// Why keygate closed the connection, if it did.
    pub fn closed(&self) -> Option<UpgradeClose> {
        self.ticket.closed()
    }

    /// Resolves when keygate closes the connection: its key was revoked or found dead by a
    /// re-check, or its expiry came (the expiry as last set, so a later one moves the timer).
    pub async fn ended(&self) -> UpgradeClose {
        loop {
            if let Some(reason) = self.ticket.closed() {
                return reason;
            }
            let expires_at = self.ticket.expires_at.load(Ordering::SeqCst);
            let woken = self.ticket.wake.notified();
            if expires_at == NEVER {
                woken.await;
                continue;
            }
            let left = (UNIX_EPOCH + Duration::from_secs(expires_at))
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            if left.is_zero() {
                self.ticket.close(UpgradeClose::Expired);
                continue;
            }
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep(left) => {}
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.live.release(&self.digest, &self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: u8) -> KeyDigest {
        KeyDigest([b; 32])
    }

    #[tokio::test]
    async fn a_close_reaches_every_connection_of_the_key_and_no_other() {
        let live = Arc::new(Live::default());
        let (a1, a2, b) = (
            live.hold(digest(1)),
            live.hold(digest(1)),
            live.hold(digest(2)),
        );
        live.close(&digest(1), UpgradeClose::Revoked);
        assert_eq!(a1.ended().await, UpgradeClose::Revoked);
        assert_eq!(a2.closed(), Some(UpgradeClose::Revoked));
        assert_eq!(b.closed(), None);
        // The first reason stays.
        live.close(&digest(1), UpgradeClose::Unknown);
        assert_eq!(a1.closed(), Some(UpgradeClose::Revoked));
        drop((a1, a2));
        assert!(!live.holds(&digest(1)));
        assert_eq!(live.digests(), vec![digest(2)]);
    }

    #[tokio::test]
    async fn a_past_expiry_ends_at_once_and_a_moved_one_moves_the_timer() {
        let live = Arc::new(Live::default());
        let held = live.hold(digest(1));
        held.set_expiry(Some(now_unix() + 3600));
        let ended = tokio::time::timeout(Duration::from_millis(50), held.ended()).await;
        assert!(ended.is_err(), "ended an hour early");
        let mut record = KeyRecord::example(digest(1));
        record.expires_at = Some(now_unix() - 1);
        live.apply(&digest(1), Ok(Some(record)), now_unix());
        assert_eq!(held.ended().await, UpgradeClose::Expired);
    }

    #[tokio::test]
    async fn a_recheck_that_cannot_reach_the_store_fails_closed() {
        let live = Arc::new(Live::default());
        let (gone, failed, fine) = (
            live.hold(digest(1)),
            live.hold(digest(2)),
            live.hold(digest(3)),
        );
        live.apply(&digest(1), Ok(None), 10);
        live.apply(&digest(2), Err(StoreError::Unavailable("down".into())), 10);
        live.apply(&digest(3), Ok(Some(KeyRecord::example(digest(3)))), 10);
        assert_eq!(gone.closed(), Some(UpgradeClose::Unknown));
        assert_eq!(failed.closed(), Some(UpgradeClose::StoreUnavailable));
        assert_eq!(fine.closed(), None);
    }
}
