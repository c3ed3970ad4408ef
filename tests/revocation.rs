//! Immediate revocation through Redis pub/sub: every instance, no stale window, and no
//! silent loss when the subscription breaks.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::*;
use keygate::config::Config;
use keygate::key::{generate, KeyDigest, KeyKind};
use keygate::manage;
use keygate::store::redis::RedisStore;
use keygate::store::{now_unix, InvalidationSink, KeyRecord, Store, StoreError};
use tokio::sync::oneshot;

fn config(redis_url: &str, ns: &str, upstream: &str) -> Config {
    let mut c = test_config(redis_url, ns, upstream);
    c.store.health_check_interval = "200ms".into();
    c.cache.trust_while_unsubscribed = "1s".into();
    // Long cache lives, so that only invalidations can explain a changed verdict.
    c.cache.ttl = "1h".into();
    c.cache.negative_ttl = "1h".into();
    c
}

/// What an instance's `/metrics` says about how it followed the invalidation feed.
#[derive(Debug, PartialEq)]
struct Feed {
    invalidations: f64,
    flushes: f64,
    unsynced: f64,
}

async fn feed(kg: &Keygate) -> Feed {
    let m = kg.scrape().await;
    Feed {
        invalidations: m.get("keygate_invalidations_received_total"),
        flushes: m.get("keygate_cache_flushes_total"),
        unsynced: m.get("keygate_unsynced_lookups_total"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_key_is_rejected_on_every_instance() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("revoke");
    let store = redis_store(&redis, &ns);
    let a = Keygate::start(config(&redis.url(), &ns, &upstream.url())).await;
    let b = Keygate::start(config(&redis.url(), &ns, &upstream.url())).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let http = Http::new();
    let (seen_a, seen_b) = (a.invalidations(), b.invalidations());
    let key = create_key(&*store, "acme", "admin").await;
    wait_invalidations(&a, seen_a + 1).await;
    wait_invalidations(&b, seen_b + 1).await;
    let secret = key.secret.expose();
    let mut before = Vec::new();
    for kg in [&a, &b] {
        assert_eq!(status_of(&http, kg, secret).await.0, 200);
        before.push(feed(kg).await);
    }

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "keys",
            "revoke",
            &key.record.id,
            "--redis-url",
            &redis.url(),
        ])
        .args(["--namespace", &ns])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (kg, before) in [&a, &b].into_iter().zip(before) {
        wait_for_status(
            &http,
            kg,
            secret,
            401,
            "the instance rejects the revoked key",
        )
        .await;
        for _ in 0..50 {
            assert_eq!(
                status_of(&http, kg, secret).await,
                (401, "key_revoked".into()),
                "a revoked key was accepted again"
            );
        }
        // The 401 came from the announcement itself: one invalidation applied, and neither a
        // flush (a flapping subscription) nor distrust (a dead one) played a part.
        let after = feed(kg).await;
        assert_eq!(
            after,
            Feed {
                invalidations: before.invalidations + 1.0,
                ..before
            },
            "the revocation did not arrive as one invalidation"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_with_a_just_revoked_key_costs_redis_nothing() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("flood");
    let store = redis_store(&redis, &ns);
    let a = Keygate::start(config(&redis.url(), &ns, &upstream.url())).await;
    let b = Keygate::start(config(&redis.url(), &ns, &upstream.url())).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let http = Http::new();
    // Cached live on `a`; never seen by `b`.
    let key = cached_key(&store, &http, &a).await;
    let secret = key.secret.expose();

    let (seen_a, seen_b) = (a.invalidations(), b.invalidations());
    store.revoke(&key.record.id, now_unix()).await.unwrap();
    wait_invalidations(&a, seen_a + 1).await;
    wait_invalidations(&b, seen_b + 1).await;
    redis.reset_stats();
    for kg in [&a, &b] {
        for _ in 0..100 {
            assert_eq!(
                status_of(&http, kg, secret).await,
                (401, "key_revoked".into())
            );
        }
    }
    // The announcement said "revoked": no instance had to read the record to learn it.
    let calls = redis.command_calls();
    assert_eq!(calls.get("hgetall"), None, "record reads: {calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_announcement_flushes_the_cache() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("unreadable");
    let kg = Keygate::start(config(&redis.url(), &ns, &upstream.url())).await;
    kg.wait_ready().await;
    let channel = format!("{ns}:invalidate");
    let hex = generate(KeyKind::User).digest.to_hex();
    for (i, payload) in ["garbage".to_owned(), format!("{hex}:renamed")]
        .into_iter()
        .enumerate()
    {
        let flushes = kg.app.metrics.cache_flushes.get();
        let _: i64 = redis.cmd(&["PUBLISH", &channel, &payload]);
        eventually(PROPAGATION, "the cache is flushed", || async {
            kg.app.metrics.cache_flushes.get() > flushes
        })
        .await;
        assert_eq!(kg.invalidations(), 0, "payload {i} was read as a digest");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_is_announced_so_no_unknown_verdict_outlives_it() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("create");
    let store = redis_store(&redis, &ns);
    let kg = Keygate::start(config(&redis.url(), &ns, &upstream.url())).await;
    kg.wait_ready().await;
    let http = Http::new();

    // The key is presented before it exists, so "unknown" is cached (for an hour).
    let key = generate(KeyKind::User);
    let secret = key.secret.expose();
    assert_eq!(
        status_of(&http, &kg, secret).await,
        (401, "invalid_key".into())
    );
    store
        .insert(&KeyRecord {
            id: "key_late".into(),
            digest: key.digest,
            name: "late".into(),
            tenant: "acme".into(),
            role: "admin".into(),
            subject: "dora".into(),
            kind: KeyKind::User,
            created_at: now_unix(),
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
        })
        .await
        .unwrap();
    wait_for_status(&http, &kg, secret, 200, "the new key is accepted").await;
}

/// A store whose next lookup, once armed, reads Redis, reports that the read is done, and
/// returns only when the test releases it.
struct GatedStore {
    inner: Arc<RedisStore>,
    gate: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
}

#[async_trait]
impl Store for GatedStore {
    async fn lookup(&self, d: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        let record = self.inner.lookup(d).await;
        let gate = self.gate.lock().unwrap().take();
        if let Some((read_done, release)) = gate {
            let _ = read_done.send(());
            let _ = release.await;
        }
        record
    }
    async fn insert(&self, r: &KeyRecord) -> Result<(), StoreError> {
        self.inner.insert(r).await
    }
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.get(id).await
    }
    async fn list(&self, t: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.list(t).await
    }
    async fn revoke(&self, id: &str, at: u64) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.revoke(id, at).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    fn start(self: Arc<Self>, sink: Arc<dyn InvalidationSink>) -> Result<(), StoreError> {
        self.inner.clone().start(sink)
    }
}

async fn wait_invalidations(kg: &Keygate, at_least: u64) {
    eventually(PROPAGATION, "the invalidation is processed", || async {
        kg.invalidations() >= at_least
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_racing_a_revocation_is_never_cached() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("race");
    let store = redis_store(&redis, &ns);
    let gated = Arc::new(GatedStore {
        inner: redis_store(&redis, &ns),
        gate: Mutex::new(None),
    });
    let kg = Arc::new(
        Keygate::start_with_store(config(&redis.url(), &ns, &upstream.url()), gated.clone()).await,
    );
    kg.wait_ready().await;
    let http = Http::new();

    for round in 0..50 {
        // A fresh key, whose creation message is processed before the race starts.
        let seen = kg.invalidations();
        let key = create_key(&*store, "acme", "admin").await;
        wait_invalidations(&kg, seen + 1).await;
        let secret = key.secret.expose().to_owned();

        let (read_done_tx, read_done) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        *gated.gate.lock().unwrap() = Some((read_done_tx, release_rx));
        let first = tokio::spawn({
            let (http, kg, secret) = (http.clone(), kg.clone(), secret.clone());
            async move { status_of(&http, &kg, &secret).await }
        });
        // The fill has read the live record; now revoke and let the instance process it.
        read_done.await.unwrap();
        let seen = kg.invalidations();
        store.revoke(&key.record.id, now_unix()).await.unwrap();
        wait_invalidations(&kg, seen + 1).await;
        release.send(()).unwrap();

        // The request that raced may go either way; every later one must be refused.
        let (status, _) = first.await.unwrap();
        assert!(status == 200 || status == 401, "round {round}: {status}");
        assert_eq!(
            status_of(&http, &kg, &secret).await,
            (401, "key_revoked".into()),
            "round {round}: the stale fill was cached"
        );
    }
}

async fn ready_status(http: &Http, kg: &Keygate) -> (u16, String) {
    let r = http.get(&kg.admin_url("/readyz"), &[]).await;
    (r.status.as_u16(), r.text())
}

/// A new key, cached live on `kg` after its creation message was processed (so that only a
/// later invalidation, flush or distrust can end the cached verdict).
async fn cached_key(store: &RedisStore, http: &Http, kg: &Keygate) -> manage::CreatedKey {
    let seen = kg.invalidations();
    let key = create_key(store, "acme", "admin").await;
    wait_invalidations(kg, seen + 1).await;
    assert_eq!(status_of(http, kg, key.secret.expose()).await.0, 200);
    key
}

/// `cache.trust_while_unsubscribed` in [`config`].
const BOUND: Duration = Duration::from_secs(1);
/// Slack for the test's own clock reading around the moment the link broke.
const EPSILON: Duration = Duration::from_millis(100);

/// Requests `key` back to back until `run_for` after `t0`: when each request started (after
/// `t0`) and its status.
async fn statuses_until(
    http: &Http,
    kg: &Keygate,
    key: &str,
    t0: Instant,
    run_for: Duration,
) -> Vec<(Duration, u16)> {
    let mut seen = Vec::new();
    while t0.elapsed() < run_for {
        let started = t0.elapsed();
        seen.push((started, status_of(http, kg, key).await.0));
    }
    seen
}

/// No request that started more than [`BOUND`] + [`EPSILON`] after `t0` (when the link was
/// last known good, at the latest) was answered 200; some did start then, and the last answer
/// is `last`.
fn assert_bound_held(seen: &[(Duration, u16)], last: u16) {
    let late: Vec<_> = seen
        .iter()
        .filter(|(at, _)| *at > BOUND + EPSILON)
        .collect();
    assert!(!late.is_empty(), "no request after the bound: {seen:?}");
    for (at, status) in &late {
        assert_ne!(
            *status, 200,
            "a cached verdict was served {at:?} after the link was last known good (bound {BOUND:?})"
        );
    }
    assert_eq!(seen.last().unwrap().1, last, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_missed_while_unsubscribed_is_enforced_within_the_bound() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("killed");
    let store = redis_store(&redis, &ns);
    let kg = Keygate::start(config(&redis.url(), &ns, &upstream.url())).await;
    kg.wait_ready().await;
    let http = Http::new();
    let key = cached_key(&store, &http, &kg).await;
    let secret = key.secret.expose();

    // Connections that exist keep working; new ones (the subscriber's reconnects) are refused.
    let mut admin = redis.conn();
    let mut run = |args: &[&str]| -> redis::Value {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut admin).unwrap()
    };
    run(&["CONFIG", "SET", "requirepass", "test-only-password"]);
    let killed = run(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    // The subscription was last known good before the kill, so before now.
    let t0 = Instant::now();
    assert!(
        matches!(killed, redis::Value::Int(n) if n >= 1),
        "no subscriber to kill"
    );

    // Published while the subscriber is away: the message is lost. The cached "live" verdict
    // may be served until the bound, never after it.
    store.revoke(&key.record.id, now_unix()).await.unwrap();
    let seen = statuses_until(&http, &kg, secret, t0, BOUND + Duration::from_millis(600)).await;
    assert_bound_held(&seen, 401);
    assert_eq!(
        status_of(&http, &kg, secret).await,
        (401, "key_revoked".into())
    );
    assert!(kg.app.metrics.unsynced_lookups.get() > 0);
    let (status, body) = ready_status(&http, &kg).await;
    assert!(status == 503 && body.contains("subscription"), "{body}");

    run(&["CONFIG", "SET", "requirepass", ""]);
    eventually(
        Duration::from_secs(10),
        "the subscriber comes back",
        || async { ready_status(&http, &kg).await.0 == 200 },
    )
    .await;
    assert!(
        kg.app.metrics.cache_flushes.get() >= 2,
        "no flush on resubscribe"
    );
    for _ in 0..20 {
        assert_eq!(
            status_of(&http, &kg, secret).await,
            (401, "key_revoked".into())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_subscription_is_distrusted_within_the_bound() {
    let redis = RedisServer::start();
    let relay = Relay::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let upstream = Upstream::start().await;
    let ns = namespace("halfopen");
    let store = redis_store(&redis, &ns);
    // A dead link is noticed only two health-check intervals after it last answered; the
    // bound must hold anyway, counted from that last answer.
    let mut c = config(&relay.url(), &ns, &upstream.url());
    c.store.health_check_interval = "400ms".into();
    let kg = Keygate::start(c).await;
    kg.wait_ready().await;
    let http = Http::new();
    let key = cached_key(&store, &http, &kg).await;
    let secret = key.secret.expose();

    relay.pause();
    // No byte moves through the relay from here on: the link was last known good before now.
    let t0 = Instant::now();
    // The revocation reaches Redis (directly) but not the instance (through the dead link).
    store.revoke(&key.record.id, now_unix()).await.unwrap();
    // Past the bound every request goes to Redis, which cannot answer through the dead
    // link: the instance fails closed instead of serving its cache.
    let seen = statuses_until(&http, &kg, secret, t0, BOUND + Duration::from_millis(600)).await;
    assert_bound_held(&seen, 503);
    assert!(
        kg.app.verifier.unsubscribed_for().is_some(),
        "the dead link was not noticed"
    );
    assert_eq!(ready_status(&http, &kg).await.0, 503);

    relay.resume();
    eventually(Duration::from_secs(10), "the instance recovers", || async {
        ready_status(&http, &kg).await.0 == 200
    })
    .await;
    // The resubscribe flushed the cache: the revocation it missed is enforced.
    assert_eq!(
        status_of(&http, &kg, secret).await,
        (401, "key_revoked".into())
    );
}

/// Arguments for a restarted `redis-server` whose default user may not SUBSCRIBE: the
/// instances' store connections work, their subscriptions cannot come back.
const NO_SUBSCRIBE: &[&str] = &[
    "--user",
    "default",
    "on",
    "nopass",
    "~*",
    "&*",
    "+@all",
    "-subscribe",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_under_load_never_lets_a_revoked_key_through() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("restart");
    let store = redis_store(&redis, &ns);
    let a = Arc::new(Keygate::start(config(&redis.url(), &ns, &upstream.url())).await);
    let b = Arc::new(Keygate::start(config(&redis.url(), &ns, &upstream.url())).await);
    a.wait_ready().await;
    b.wait_ready().await;
    let http = Http::new();
    let (seen_a, seen_b) = (a.invalidations(), b.invalidations());
    let revoked = create_key(&*store, "acme", "admin").await;
    let live = create_key(&*store, "acme", "admin").await;
    wait_invalidations(&a, seen_a + 2).await;
    wait_invalidations(&b, seen_b + 2).await;
    // Both keys cached live on both instances.
    for kg in [&a, &b] {
        assert_eq!(status_of(&http, kg, revoked.secret.expose()).await.0, 200);
        assert_eq!(status_of(&http, kg, live.secret.expose()).await.0, 200);
    }

    // Load: both keys on both instances, until told to stop. A 200 for `revoked` to a request
    // that started after `forbidden_after` (microseconds on `clock`) is a leak.
    let clock = Instant::now();
    let forbidden_after = Arc::new(AtomicU64::new(u64::MAX));
    let stop = Arc::new(AtomicBool::new(false));
    let leaked = Arc::new(Mutex::new(Vec::new()));
    let sent = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for kg in [a.clone(), b.clone()] {
        for secret in [
            revoked.secret.expose().to_owned(),
            live.secret.expose().to_owned(),
        ] {
            let (kg, http, stop, leaked, sent, forbidden_after) = (
                kg.clone(),
                http.clone(),
                stop.clone(),
                leaked.clone(),
                sent.clone(),
                forbidden_after.clone(),
            );
            let is_revoked = secret == revoked.secret.expose();
            load.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let started = clock.elapsed().as_micros() as u64;
                    let (status, _) = status_of(&http, &kg, &secret).await;
                    sent.fetch_add(1, Ordering::SeqCst);
                    if is_revoked
                        && status == 200
                        && started > forbidden_after.load(Ordering::SeqCst)
                    {
                        leaked.lock().unwrap().push(Duration::from_micros(started));
                    }
                }
            }));
        }
    }

    // Redis goes away and comes back refusing SUBSCRIBE: both subscribers stay down while
    // the key is revoked, so its message is lost.
    redis.stop();
    let down = clock.elapsed();
    redis.restart_with(NO_SUBSCRIBE);
    store.revoke(&revoked.record.id, now_unix()).await.unwrap();
    // From now on a cached "live" may be served only within the trust bound of the moment
    // the links were last known good (before Redis went away).
    let revoked_at = clock.elapsed();
    forbidden_after.store(
        revoked_at.max(down + BOUND + EPSILON).as_micros() as u64,
        Ordering::SeqCst,
    );
    for kg in [&a, &b] {
        wait_for_status(
            &http,
            kg,
            revoked.secret.expose(),
            401,
            "refused while down",
        )
        .await;
        assert!(
            kg.app.verifier.unsubscribed_for().is_some(),
            "the subscription came back too early for this test"
        );
    }

    // The subscribers come back; each must flush what it cached before.
    let _: () = redis.cmd(&["ACL", "SETUSER", "default", "+subscribe"]);
    for kg in [&a, &b] {
        kg.wait_ready().await;
        wait_for_status(&http, kg, live.secret.expose(), 200, "service resumes").await;
    }
    // Load on the cached path again for a while.
    let resumed = sent.load(Ordering::SeqCst);
    eventually(PROPAGATION, "more load after the resubscribe", || async {
        sent.load(Ordering::SeqCst) > resumed + 200
    })
    .await;
    // Revocation keeps working after the restart, on both instances.
    store.revoke(&live.record.id, now_unix()).await.unwrap();
    for kg in [&a, &b] {
        wait_for_status(
            &http,
            kg,
            live.secret.expose(),
            401,
            "revoked after restart",
        )
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }
    assert!(sent.load(Ordering::SeqCst) > 100, "the load did not run");
    let leaked = leaked.lock().unwrap();
    assert!(
        leaked.is_empty(),
        "a revoked key was accepted {} times, first {:?} after the start (down at {down:?}, \
         revoked at {revoked_at:?})",
        leaked.len(),
        leaked.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_across_a_resubscribe_is_discarded() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("epoch");
    let store = redis_store(&redis, &ns);
    let gated = Arc::new(GatedStore {
        inner: redis_store(&redis, &ns),
        gate: Mutex::new(None),
    });
    let kg = Arc::new(
        Keygate::start_with_store(config(&redis.url(), &ns, &upstream.url()), gated.clone()).await,
    );
    kg.wait_ready().await;
    let http = Http::new();
    let seen = kg.invalidations();
    let key = create_key(&*store, "acme", "admin").await;
    wait_invalidations(&kg, seen + 1).await;
    let secret = key.secret.expose().to_owned();

    // A fill reads the live record and is held there.
    let (read_done_tx, read_done) = oneshot::channel();
    let (release, release_rx) = oneshot::channel();
    *gated.gate.lock().unwrap() = Some((read_done_tx, release_rx));
    let first = tokio::spawn({
        let (http, kg, secret) = (http.clone(), kg.clone(), secret.clone());
        async move { status_of(&http, &kg, &secret).await }
    });
    read_done.await.unwrap();

    // The subscription drops and cannot come back while the key is revoked: the message is
    // lost, so only the resubscribe's flush can tell that the held fill is stale.
    let _: () = redis.cmd(&["ACL", "SETUSER", "default", "-subscribe"]);
    let killed: i64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(killed >= 1, "no subscriber to kill");
    eventually(PROPAGATION, "the subscription is down", || async {
        kg.app.verifier.unsubscribed_for().is_some()
    })
    .await;
    let flushes = kg.app.metrics.cache_flushes.get();
    store.revoke(&key.record.id, now_unix()).await.unwrap();
    let _: () = redis.cmd(&["ACL", "SETUSER", "default", "+subscribe"]);
    eventually(
        Duration::from_secs(10),
        "resubscribed and flushed",
        || async {
            kg.app.metrics.cache_flushes.get() > flushes
                && kg.app.verifier.unsubscribed_for().is_none()
        },
    )
    .await;
    assert_eq!(kg.invalidations(), seen + 1, "the revocation was not lost");

    // The held fill completes now, after the flush, carrying what it read before it.
    release.send(()).unwrap();
    let (status, _) = first.await.unwrap();
    assert!(status == 200 || status == 401, "{status}");
    for _ in 0..20 {
        assert_eq!(
            status_of(&http, &kg, &secret).await,
            (401, "key_revoked".into()),
            "the fill that straddled the resubscribe was used"
        );
    }
}

#[test]
fn a_trust_bound_within_one_health_check_is_refused() {
    let mut c = config("redis://127.0.0.1:6390", "n", "http://127.0.0.1:1");
    c.store.health_check_interval = "1s".into();
    c.cache.trust_while_unsubscribed = "1s".into();
    let Err(err) = c.serve_settings() else {
        panic!("a bound within one health check was accepted")
    };
    let err = err.to_string();
    assert!(
        err.contains("cache.trust_while_unsubscribed")
            && err.contains("store.health_check_interval"),
        "{err}"
    );
    c.cache.trust_while_unsubscribed = "1500ms".into();
    assert!(c.serve_settings().is_ok());
}
