//! Rate limits: how fast a key, or all the keys of a tenant, may call. The request path's
//! `limit` phase (after `authorize`, in `proxy/mod.rs`) asks the [`Limiter`] for the limits
//! that apply to a verified key on its route:
//!
//! - its role's limit (`[roles.<name>] rate_limit`, resolved into each route's grants), and
//! - the route's own (`[[routes]] rate_limit`), counted per route.
//!
//! Each is a GCRA bucket (`gcra.rs`) of the limit's scope: the key's own, or its tenant's
//! (shared by all of the tenant's keys, on every route that applies the same limit source).
//! A request is admitted only if every bucket admits it; a bucket that admitted it is refunded
//! when another refuses, so a refused request costs no bucket anything.
//!
//! This is the `local` mode: each instance enforces the limits itself, in memory, with no
//! round trip on the request path; N instances behind a balancer admit up to N times a limit.
//!
//! Invariant kept here: a bucket is one atomic TAT, updated only by compare-and-swap from the
//! value it was checked against, so concurrent requests on any worker never admit more than
//! the arithmetic allows (`concurrent_requests_never_exceed_the_burst` below).

pub mod gcra;
pub mod spec;

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::identity::Identity;
use gcra::{Gcra, State};
pub use spec::{RateLimit, Scope};

/// `RateLimit-Policy`: the limits that apply (IETF draft-ietf-httpapi-ratelimit-headers).
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`: what is left of them.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The limiter's time, in nanoseconds from an arbitrary start; controllable in tests.
pub trait Clock: Send + Sync + 'static {
    /// Nanoseconds since the clock's start.
    fn now(&self) -> u64;
}

/// The monotonic clock of the process.
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock(Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> u64 {
        // From 1 s, so that no real time is the fresh bucket's 0.
        self.0.elapsed().as_nanos() as u64 + 1_000_000_000
    }
}

/// Where a limit comes from, in metric labels and policy names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The key's role.
    Role,
    /// The route.
    Route,
}

impl Source {
    /// Its metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Source::Role => "role",
            Source::Route => "route",
        }
    }
}

/// One limit's check of one request.
#[derive(Clone, Copy, Debug)]
pub struct Checked {
    /// Where the limit comes from.
    pub source: Source,
    /// The limit.
    pub limit: RateLimit,
    /// Its bucket's state after the request.
    pub state: State,
}

/// The limits a request was checked against, for the headers and the metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct Report {
    /// At most one per source: the role's, then the route's.
    pub checks: [Option<Checked>; 2],
}

impl Report {
    /// Whether every limit admitted the request.
    pub fn allowed(&self) -> bool {
        self.checks.iter().flatten().all(|c| c.state.allowed)
    }

    /// Whether any limit applied.
    pub fn is_empty(&self) -> bool {
        self.checks.iter().all(Option::is_none)
    }

    /// Seconds until a refused request may be retried (at least 1): the longest wait of the
    /// limits that refused it.
    pub fn retry_after_secs(&self) -> u64 {
        let ns = self
            .checks
            .iter()
            .flatten()
            .filter(|c| !c.state.allowed)
            .map(|c| c.state.retry_after)
            .max()
            .unwrap_or(0);
        ns.div_ceil(1_000_000_000).max(1)
    }

    /// Sets `RateLimit-Policy` and `RateLimit` (and, when refused, `Retry-After`) on a
    /// response's headers: one list item per limit, named by its source and scope
    /// (`"key"`, `"tenant"`, `"route-key"`, `"route-tenant"`): `q` the count, `w` the window
    /// in seconds; `r` what remains now, `t` the seconds until the bucket is full again (for
    /// a refused request: until the next one is admitted).
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        if self.is_empty() {
            return;
        }
        let mut policy = String::with_capacity(48);
        let mut now = String::with_capacity(48);
        for c in self.checks.iter().flatten() {
            use std::fmt::Write;
            let sep = if policy.is_empty() { "" } else { ", " };
            let name = policy_name(c.source, c.limit.scope);
            let t = if c.state.allowed {
                c.state.reset
            } else {
                c.state.retry_after
            };
            let _ = write!(
                policy,
                "{sep}\"{name}\";q={};w={}",
                c.limit.count, c.limit.period_secs
            );
            let _ = write!(
                now,
                "{sep}\"{name}\";r={};t={}",
                c.state.remaining,
                t.div_ceil(1_000_000_000)
            );
        }
        // Names, digits and punctuation only: always valid header values.
        if let (Ok(policy), Ok(now)) = (HeaderValue::try_from(policy), HeaderValue::try_from(now)) {
            headers.insert(RATELIMIT_POLICY.clone(), policy);
            headers.insert(RATELIMIT.clone(), now);
        }
        if !self.allowed() {
            headers.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(self.retry_after_secs()),
            );
        }
    }
}

/// A limit's name in the headers.
const fn policy_name(source: Source, scope: Scope) -> &'static str {
    match (source, scope) {
        (Source::Role, Scope::Key) => "key",
        (Source::Role, Scope::Tenant) => "tenant",
        (Source::Route, Scope::Key) => "route-key",
        (Source::Route, Scope::Tenant) => "route-tenant",
    }
}

/// The limiter's settings (`[limits]`).
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// Send `RateLimit-Policy`/`RateLimit` on admitted responses too, not only on `429`s.
    pub headers_when_admitted: bool,
    /// Most buckets kept; the least recently used beyond are dropped (and start full again).
    pub max_buckets: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            headers_when_admitted: true,
            max_buckets: 1_000_000,
        }
    }
}

/// The buckets of every limit, in memory.
pub struct Limiter {
    /// Each bucket's TAT, by the 128-bit hash of what it counts (source, route, scope, id):
    /// no allocation to find one. An idle bucket is full again after its period (at most an
    /// hour), so one idle that long is dropped.
    buckets: moka::sync::Cache<u128, Arc<AtomicU64>>,
    /// Two independently keyed hashers, for a 128-bit bucket id.
    hashers: (
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    ),
    clock: Arc<dyn Clock>,
    settings: LimitSettings,
}

impl Limiter {
    /// A limiter on the process's monotonic clock.
    pub fn new(settings: LimitSettings) -> Self {
        Self::with_clock(settings, Arc::new(MonotonicClock::default()))
    }

    /// A limiter on `clock`.
    pub fn with_clock(settings: LimitSettings, clock: Arc<dyn Clock>) -> Self {
        Limiter {
            buckets: moka::sync::Cache::builder()
                .max_capacity(settings.max_buckets)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            hashers: Default::default(),
            clock,
            settings,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &LimitSettings {
        &self.settings
    }

    /// Checks a request of `identity` on `route` (its name) against its role's limit and the
    /// route's, charging every bucket if all admit it and none if any refuses.
    pub fn check(
        &self,
        route: &str,
        role_limit: Option<&RateLimit>,
        route_limit: Option<&RateLimit>,
        identity: &Identity,
    ) -> Report {
        let mut report = Report::default();
        if role_limit.is_none() && route_limit.is_none() {
            return report;
        }
        let now = self.clock.now();
        let mut charged: [Option<(Arc<AtomicU64>, u64)>; 2] = [None, None];
        for (i, (source, limit)) in [(Source::Role, role_limit), (Source::Route, route_limit)]
            .into_iter()
            .enumerate()
        {
            let Some(limit) = limit else { continue };
            let id = self.bucket_id(source, route, limit.scope, identity);
            let bucket = self.buckets.get_with(id, || Arc::new(AtomicU64::new(0)));
            let gcra = Gcra::new(limit);
            let state = take(&bucket, &gcra, now);
            report.checks[i] = Some(Checked {
                source,
                limit: *limit,
                state,
            });
            if state.allowed {
                charged[i] = Some((bucket, gcra.interval()));
            } else {
                break;
            }
        }
        if !report.allowed() {
            for (i, charged) in charged.into_iter().enumerate() {
                let Some((bucket, interval)) = charged else {
                    continue;
                };
                // Refund: the request was not admitted after all.
                let _ = bucket.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                    Some(t.saturating_sub(interval))
                });
                if let Some(c) = &mut report.checks[i] {
                    c.state.remaining += 1;
                    c.state.reset = c.state.reset.saturating_sub(interval);
                }
            }
        }
        report
    }

    /// What a bucket counts, as 128 bits: the source, the route (for a route's limit), the
    /// scope and the key id or tenant.
    fn bucket_id(&self, source: Source, route: &str, scope: Scope, identity: &Identity) -> u128 {
        let hash = |h: &std::collections::hash_map::RandomState| {
            let mut h = h.build_hasher();
            (source as u8).hash(&mut h);
            if source == Source::Route {
                route.hash(&mut h);
            }
            match scope {
                Scope::Key => (0u8, identity.key_id()).hash(&mut h),
                Scope::Tenant => (1u8, identity.tenant()).hash(&mut h),
            }
            h.finish()
        };
        (u128::from(hash(&self.hashers.0)) << 64) | u128::from(hash(&self.hashers.1))
    }
}

/// One request against one bucket: a compare-and-swap loop from the TAT it checked.
fn take(bucket: &AtomicU64, gcra: &Gcra, now: u64) -> State {
    let mut tat = bucket.load(Ordering::Acquire);
    loop {
        let (next, state) = gcra.check(tat, now);
        let Some(next) = next else { return state };
        match bucket.compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return state,
            Err(current) => tat = current,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyDigest;
    use crate::store::KeyRecord;

    /// A clock the test moves.
    #[derive(Default)]
    struct ManualClock(AtomicU64);

    impl Clock for ManualClock {
        fn now(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl ManualClock {
        fn advance(&self, ns: u64) {
            self.0.fetch_add(ns, Ordering::SeqCst);
        }
    }

    fn identity(id: &str, tenant: &str) -> Identity {
        let mut r = KeyRecord::example(KeyDigest([7; 32]));
        r.id = id.into();
        r.tenant = tenant.into();
        Identity::from_record(&r).unwrap()
    }

    fn limiter() -> (Limiter, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        clock.advance(1_000_000_000);
        (
            Limiter::with_clock(LimitSettings::default(), clock.clone()),
            clock,
        )
    }

    fn lim(s: &str) -> RateLimit {
        s.parse().unwrap()
    }

    fn admitted(
        l: &Limiter,
        n: u32,
        role: Option<&RateLimit>,
        route: Option<&RateLimit>,
        who: &Identity,
        route_name: &str,
    ) -> u32 {
        (0..n)
            .filter(|_| l.check(route_name, role, route, who).allowed())
            .count() as u32
    }

    #[test]
    fn a_key_gets_its_burst_then_refusals_until_the_clock_refills_it() {
        let (l, clock) = limiter();
        let limit = lim("5/s");
        let key = identity("key_a", "acme");
        assert_eq!(admitted(&l, 20, Some(&limit), None, &key, "r"), 5);
        let refused = l.check("r", Some(&limit), None, &key);
        assert!(!refused.allowed());
        assert_eq!(refused.retry_after_secs(), 1);
        clock.advance(200_000_000 - 1);
        assert!(!l.check("r", Some(&limit), None, &key).allowed());
        clock.advance(1);
        assert!(l.check("r", Some(&limit), None, &key).allowed());
        assert!(!l.check("r", Some(&limit), None, &key).allowed());
        clock.advance(10_000_000_000);
        assert_eq!(admitted(&l, 20, Some(&limit), None, &key, "r"), 5);
    }

    #[test]
    fn keys_have_their_own_buckets_and_a_tenant_limit_is_shared() {
        let (l, _) = limiter();
        let per_key = lim("3/s");
        let (a, b, other) = (
            identity("key_a", "acme"),
            identity("key_b", "acme"),
            identity("key_c", "globex"),
        );
        assert_eq!(admitted(&l, 10, Some(&per_key), None, &a, "r"), 3);
        assert_eq!(admitted(&l, 10, Some(&per_key), None, &b, "r"), 3);
        let shared = lim("tenant:4/s");
        assert_eq!(admitted(&l, 3, Some(&shared), None, &a, "r1"), 3);
        // The role's tenant limit is one bucket on every route.
        assert_eq!(admitted(&l, 10, Some(&shared), None, &b, "r2"), 1);
        assert_eq!(admitted(&l, 10, Some(&shared), None, &other, "r1"), 4);
    }

    #[test]
    fn a_route_limit_is_counted_per_route_and_a_refusal_charges_nothing() {
        let (l, _) = limiter();
        let role = lim("10/s");
        let route = lim("2/s");
        let key = identity("key_a", "acme");
        assert_eq!(admitted(&l, 5, Some(&role), Some(&route), &key, "one"), 2);
        // The three refused by the route did not use the role's bucket.
        assert_eq!(admitted(&l, 5, Some(&role), Some(&route), &key, "two"), 2);
        assert_eq!(admitted(&l, 10, Some(&role), None, &key, "three"), 6);
        // The role's bucket is empty now: its refusal ends the check.
        let report = l.check("one", Some(&role), Some(&route), &key);
        assert!(!report.checks[0].unwrap().state.allowed);
        assert!(report.checks[1].is_none());
    }

    #[test]
    fn headers_name_each_limit_and_a_refusal_says_when_to_retry() {
        let (l, _) = limiter();
        let role = lim("tenant:100/min");
        let route = lim("2/s");
        let key = identity("key_a", "acme");
        let mut h = HeaderMap::new();
        l.check("r", Some(&role), Some(&route), &key)
            .write_headers(&mut h);
        assert_eq!(
            h[&RATELIMIT_POLICY],
            "\"tenant\";q=100;w=60, \"route-key\";q=2;w=1"
        );
        assert_eq!(h[&RATELIMIT], "\"tenant\";r=99;t=1, \"route-key\";r=1;t=1");
        assert!(!h.contains_key(http::header::RETRY_AFTER));
        l.check("r", Some(&role), Some(&route), &key);
        let mut h = HeaderMap::new();
        let refused = l.check("r", Some(&role), Some(&route), &key);
        refused.write_headers(&mut h);
        assert_eq!(h[&RATELIMIT], "\"tenant\";r=98;t=2, \"route-key\";r=0;t=1");
        assert_eq!(h[http::header::RETRY_AFTER], "1");
        let mut none = HeaderMap::new();
        l.check("r", None, None, &key).write_headers(&mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn concurrent_requests_never_exceed_the_burst() {
        let (l, _) = limiter();
        let l = Arc::new(l);
        let limit = lim("1000/h");
        let key = identity("key_a", "acme");
        let total: u32 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| admitted(&l, 600, Some(&limit), None, &key, "r")))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(total, 1000);
    }
}
