//! keygate in Redis Sentinel mode against a real deployment on loopback (one master, one
//! replica, three sentinels, passwords on both): the master is SIGKILLed under traffic;
//! keygate fails closed while there is no master, serves again once a sentinel has promoted
//! the replica (no restart), and a revocation issued after the failover reaches every instance;
//! and in a switchover (`SENTINEL FAILOVER`) keygate moves to the new master before the old
//! one, still up, is demoted. The same deployment speaking TLS only (`--port 0`, `--tls-port`,
//! `tls-replication yes`, client certificates required): keygate finds the master through the
//! TLS sentinels, and refuses sentinels whose certificate does not chain to `store.tls_ca`,
//! naming them and failing closed.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis_sentinel::{Sentinels, DATA_PASSWORD, MASTER_NAME, SENTINEL_PASSWORD};
use common::tls_redis::{Leaf, TestCa};
use common::*;
use keygate::config::Config;
use keygate::store::redis::{RedisSettings, RedisTls, SentinelSettings};
use keygate::store::{Store, StoreSettings};

/// Bound on the whole failover as seen by keygate: sentinels call the master down after
/// `DOWN_AFTER_MS`, elect a leader and promote the replica; keygate then finds it.
const FAILOVER: Duration = Duration::from_secs(20);

fn sentinel_config(s: &Sentinels, ns: &str, upstream: &str) -> Config {
    // The URL's host is not used in Sentinel mode; its password is the master's.
    let mut c = test_config(
        &format!("redis://:{DATA_PASSWORD}@unused.invalid:1"),
        ns,
        upstream,
    );
    c.store.sentinels = s.addrs();
    c.store.sentinel_master = Some(MASTER_NAME.into());
    c.store.sentinel_password = Some(SENTINEL_PASSWORD.into());
    c.store.health_check_interval = "200ms".into();
    c.cache.trust_while_unsubscribed = "500ms".into();
    c
}

fn test_store(s: &Sentinels, ns: &str) -> Arc<dyn Store> {
    store_with(s, ns, "redis", RedisTls::default())
}

/// A store on the deployment, over TLS (to the sentinels and the master) when `scheme` is
/// `rediss`.
fn store_with(s: &Sentinels, ns: &str, scheme: &str, tls: RedisTls) -> Arc<dyn Store> {
    let settings = StoreSettings::Sentinel(SentinelSettings {
        redis: RedisSettings {
            url: format!("{scheme}://:{DATA_PASSWORD}@unused.invalid:1"),
            tls,
            namespace: ns.into(),
            timeout: Duration::from_secs(2),
            health_check_interval: Duration::from_secs(1),
        },
        sentinels: s
            .sentinels
            .iter()
            .map(|n| redis::ConnectionAddr::Tcp("127.0.0.1".into(), n.port))
            .collect(),
        master: MASTER_NAME.into(),
        username: None,
        password: Some(SENTINEL_PASSWORD.into()),
        tls: scheme == "rediss",
    });
    keygate::store::open(&settings, false).unwrap()
}

/// What the traffic saw: per instance, (status, error code) of each request.
#[derive(Default)]
struct Seen {
    valid: Vec<(u16, String)>,
    revoked_200: usize,
    unready: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_fails_closed_then_keygate_follows_the_failover_and_revokes_everywhere() {
    let mut s = Sentinels::start();
    let old_master = s.master.port;
    let upstream = Upstream::start().await;
    let ns = namespace("sentinel");
    let store = test_store(&s, &ns);
    let valid = create_key(&*store, "acme", "admin").await;
    let revoked = create_key(&*store, "acme", "admin").await;
    let later = create_key(&*store, "acme", "admin").await;
    store
        .revoke(&revoked.record.id, keygate::store::now_unix())
        .await
        .unwrap();
    // The revocation is on the replica before the master dies: a promoted replica must not
    // bring the key back.
    let acked: i64 = s.master.try_cmd(&["WAIT", "1", "5000"]).unwrap();
    assert_eq!(acked, 1, "the replica did not acknowledge the writes");

    let kgs = [
        Keygate::start(sentinel_config(&s, &ns, &upstream.url())).await,
        Keygate::start(sentinel_config(&s, &ns, &upstream.url())).await,
    ];
    let http = Http::new();
    for kg in &kgs {
        kg.wait_ready().await;
        assert_eq!(status_of(&http, kg, valid.secret.expose()).await.0, 200);
        assert_eq!(status_of(&http, kg, later.secret.expose()).await.0, 200);
        assert_eq!(
            status_of(&http, kg, revoked.secret.expose()).await,
            (401, "key_revoked".into())
        );
    }

    // Traffic on both instances: the valid key, the revoked one, and readiness.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Vec<Mutex<Seen>>> = Arc::new((0..2).map(|_| Mutex::default()).collect());
    let mut traffic = Vec::new();
    for (i, kg) in kgs.iter().enumerate() {
        let (stop, seen, http) = (stop.clone(), seen.clone(), http.clone());
        let (url, ready) = (kg.url("/"), kg.admin_url("/readyz"));
        let (valid, revoked) = (
            valid.secret.expose().to_owned(),
            revoked.secret.expose().to_owned(),
        );
        traffic.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = http.get_with_key(&url, &valid).await;
                let code = if r.status == 200 {
                    String::new()
                } else {
                    r.error_code()
                };
                let bad = http.get_with_key(&url, &revoked).await.status == 200;
                let unready = http.get(&ready, &[]).await.status != 200;
                {
                    let mut seen = seen[i].lock().unwrap();
                    seen.valid.push((r.status.as_u16(), code));
                    seen.revoked_200 += usize::from(bad);
                    seen.unready += usize::from(unready);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let saw = |i: usize, f: &dyn Fn(&Seen) -> bool| f(&seen[i].lock().unwrap());

    eventually(Duration::from_secs(5), "traffic flows", || async {
        (0..2).all(|i| saw(i, &|s| s.valid.iter().any(|(st, _)| *st == 200)))
    })
    .await;

    let killed = Instant::now();
    s.master.kill();
    eventually(
        FAILOVER,
        "both instances fail closed (503 store_unavailable)",
        || async {
            (0..2).all(|i| {
                saw(i, &|s| {
                    s.valid
                        .iter()
                        .any(|(st, code)| *st == 503 && code == "store_unavailable")
                })
            })
        },
    )
    .await;
    let failed_closed = killed.elapsed();
    eventually(FAILOVER, "a sentinel promotes the replica", || async {
        s.master_port().is_some_and(|p| p != old_master)
    })
    .await;
    let promoted = killed.elapsed();
    assert_eq!(s.master_port(), Some(s.replica.port));
    // Served again, without a restart, once keygate has found the new master.
    let marks: Vec<usize> = (0..2)
        .map(|i| seen[i].lock().unwrap().valid.len())
        .collect();
    eventually(
        FAILOVER,
        "both instances serve the valid key again",
        || async {
            (0..2).all(|i| saw(i, &|s| s.valid[marks[i]..].iter().any(|(st, _)| *st == 200)))
        },
    )
    .await;
    let serving = killed.elapsed();
    for kg in &kgs {
        kg.wait_ready().await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        tokio::time::timeout(Duration::from_secs(15), t)
            .await
            .expect("traffic stops")
            .unwrap();
    }
    println!(
        "master SIGKILLed: 503s on both instances within {failed_closed:?}, replica promoted \
         within {promoted:?}, both serving again within {serving:?}"
    );
    for i in 0..2 {
        let seen = seen[i].lock().unwrap();
        assert_eq!(
            seen.revoked_200, 0,
            "instance {i} let a revoked key through"
        );
        assert!(seen.unready > 0, "instance {i} never reported unready");
        let odd: Vec<_> = seen
            .valid
            .iter()
            .filter(|(st, code)| !(*st == 200 || (*st == 503 && code == "store_unavailable")))
            .collect();
        assert!(odd.is_empty(), "instance {i}: unexpected answers {odd:?}");
    }

    // A revocation issued on the new master reaches both instances, whose verdict for the key
    // is cached (a minute by default): only the subscriber, now on the new master, can tell.
    for kg in &kgs {
        assert_eq!(status_of(&http, kg, later.secret.expose()).await.0, 200);
    }
    store
        .revoke(&later.record.id, keygate::store::now_unix())
        .await
        .unwrap();
    for kg in &kgs {
        wait_for_status(
            &http,
            kg,
            later.secret.expose(),
            401,
            "the revocation after the failover",
        )
        .await;
        assert_eq!(
            status_of(&http, kg, later.secret.expose()).await,
            (401, "key_revoked".into())
        );
    }
    for kg in kgs {
        kg.shutdown().await;
    }
}

#[tokio::test]
async fn sentinel_settings_are_checked_and_the_password_is_never_shown() {
    let mut c = test_config("redis://127.0.0.1:1", "ns", "http://127.0.0.1:1");
    c.store.sentinel_master = Some(MASTER_NAME.into());
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.contains("store.sentinel_master"), "{err}");

    c.store.sentinels = vec!["127.0.0.1".into()];
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.contains("store.sentinels"), "{err}");

    c.store.sentinels = vec!["127.0.0.1:26999".into()];
    c.store.sentinel_master = None;
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.contains("store.sentinel_master"), "{err}");

    c.store.sentinel_master = Some(MASTER_NAME.into());
    c.store.sentinel_password = Some(SENTINEL_PASSWORD.into());
    assert!(c.serve_settings().is_ok());
    assert!(!format!("{:?}", c.serve_settings().unwrap()).contains(SENTINEL_PASSWORD));

    // TLS to the sentinels goes with TLS to the master.
    c.store.sentinel_tls = true;
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(
        err.contains("store.sentinel_tls") && err.contains("rediss://"),
        "{err}"
    );
    c.store.redis_url = "rediss://127.0.0.1:1".into();
    assert!(c.serve_settings().is_ok());
    c.store.sentinels.clear();
    c.store.sentinel_master = None;
    c.store.sentinel_password = None;
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.contains("store.sentinel_tls"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_moves_reads_and_writes_to_the_new_master_without_a_restart() {
    let s = Sentinels::start();
    let old_master = s.master.port;
    let upstream = Upstream::start().await;
    let ns = namespace("switchover");
    let store = test_store(&s, &ns);
    let key = create_key(&*store, "acme", "admin").await;
    let kg = Keygate::start(sentinel_config(&s, &ns, &upstream.url())).await;
    kg.wait_ready().await;
    let http = Http::new();
    assert_eq!(status_of(&http, &kg, key.secret.expose()).await.0, 200);

    // A graceful failover: the old master stays up, still a master, until the sentinels
    // demote it (seconds later); what is written on the new master meanwhile never reaches it.
    let ok: String = s.sentinels[0]
        .try_cmd(&["SENTINEL", "FAILOVER", MASTER_NAME])
        .unwrap();
    assert_eq!(ok, "OK");
    let t0 = Instant::now();
    eventually(
        FAILOVER,
        "the sentinels name the replica master",
        || async { s.master_port() == Some(s.replica.port) },
    )
    .await;
    assert_ne!(s.master_port(), Some(old_master));
    let promoted = t0.elapsed();
    // Written through a store opened now (as by `keygate keys …`): on the new master.
    let now_store = test_store(&s, &ns);
    let fresh = create_key(&*now_store, "acme", "admin").await;
    now_store
        .revoke(&key.record.id, keygate::store::now_unix())
        .await
        .unwrap();
    let on_new: i64 = s
        .replica
        .try_cmd(&["EXISTS", &format!("{ns}:id:{}", fresh.record.id)])
        .unwrap();
    assert_eq!(on_new, 1, "the new key is not on the new master");
    // keygate reads the new master and hears its announcements well before the old master
    // is demoted: its store and its subscriber both move when the sentinels name another.
    wait_for_status(&http, &kg, key.secret.expose(), 401, "the revocation").await;
    wait_for_status(&http, &kg, fresh.secret.expose(), 200, "the new key").await;
    let demoted = s
        .master
        .try_cmd::<Vec<redis::Value>>(&["ROLE"])
        .is_ok_and(|r| matches!(r.first(), Some(redis::Value::BulkString(b)) if b == b"slave"));
    println!(
        "switchover: promoted within {promoted:?}; keygate on the new master within {:?}; \
         old master demoted yet: {demoted}",
        t0.elapsed()
    );
    kg.shutdown().await;
}

/// keygate's config for the TLS deployment: TLS to the sentinels and to the master, trusting
/// `ca`, presenting `client`.
fn tls_sentinel_config(
    s: &Sentinels,
    ns: &str,
    upstream: &str,
    ca: &TestCa,
    client: &Leaf,
) -> Config {
    let mut c = sentinel_config(s, ns, upstream);
    c.store.redis_url = format!("rediss://:{DATA_PASSWORD}@unused.invalid:1");
    c.store.sentinel_tls = true;
    c.store.tls_ca = Some(ca.cert.to_str().unwrap().into());
    c.store.tls_cert = Some(client.cert.to_str().unwrap().into());
    c.store.tls_key = Some(client.key.to_str().unwrap().into());
    // Each sentinel's share of the timeout covers two TLS handshakes (the sentinel's and the
    // master's), slow in a debug build on a loaded test machine.
    c.store.timeout = "3s".into();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygate_finds_the_master_through_tls_sentinels_and_serves() {
    let ca = TestCa::new("sentinel-tls");
    // No plaintext port on any node: keygate can only speak TLS to the sentinels.
    let s = Sentinels::start_tls(&ca);
    let client = ca.leaf("keygate-client", &["keygate"]);
    let upstream = Upstream::start().await;
    let ns = namespace("sentinel-tls");
    let tls = RedisTls {
        ca: Some(ca.cert.clone()),
        client: Some((client.cert.clone(), client.key.clone())),
    };
    let store = store_with(&s, &ns, "rediss", tls);
    let key = create_key(&*store, "acme", "admin").await;
    let kg = Keygate::start(tls_sentinel_config(&s, &ns, &upstream.url(), &ca, &client)).await;
    kg.wait_ready().await;
    let http = Http::new();
    assert_eq!(
        status_of(&http, &kg, key.secret.expose()).await,
        (200, String::new())
    );
    // The subscriber found the master through the TLS sentinels too: a revocation reaches the
    // verdict cached for a minute.
    store
        .revoke(&key.record.id, keygate::store::now_unix())
        .await
        .unwrap();
    wait_for_status(&http, &kg, key.secret.expose(), 401, "the revocation").await;
    assert_eq!(kg.app.metrics.subscription_up.get(), 1);
    kg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_whose_certificate_does_not_chain_to_the_ca_are_refused_by_name() {
    let ca = TestCa::new("sentinel-tls");
    let other = TestCa::new("other");
    let s = Sentinels::start_tls(&ca);
    // A client certificate the sentinels accept, but a CA that did not sign theirs.
    let client = ca.leaf("keygate-client", &["keygate"]);
    let upstream = Upstream::start().await;
    let ns = namespace("sentinel-wrong-ca");
    let kg = Keygate::start(tls_sentinel_config(
        &s,
        &ns,
        &upstream.url(),
        &other,
        &client,
    ))
    .await;
    let http = Http::new();
    let ready_url = kg.admin_url("/readyz");
    let body = Arc::new(Mutex::new(String::new()));
    let named: Vec<String> = s
        .addrs()
        .iter()
        .map(|a| format!("sentinel {a}: "))
        .collect();
    eventually(
        Duration::from_secs(10),
        "/readyz names each sentinel and its certificate",
        || {
            let (http, url, body, named) =
                (http.clone(), ready_url.clone(), body.clone(), named.clone());
            async move {
                let r = http.get(&url, &[]).await;
                let text = r.text();
                let ok = r.status == 503
                    && named.iter().all(|n| text.contains(n))
                    && text.contains("invalid peer certificate");
                *body.lock().unwrap() = text;
                ok
            }
        },
    )
    .await;
    let body = body.lock().unwrap().clone();
    println!("/readyz: {body}");
    for secret in [SENTINEL_PASSWORD, DATA_PASSWORD] {
        assert!(!body.contains(secret), "a password was shown: {body}");
    }
    // Fail closed: a key keygate cannot look up is refused, and keygate stays unready.
    let key = keygate::key::generate(keygate::key::KeyKind::User);
    assert_eq!(
        status_of(&http, &kg, key.secret.expose()).await,
        (503, "store_unavailable".into())
    );
    assert_eq!(http.get(&ready_url, &[]).await.status, 503);
    assert_eq!(kg.app.metrics.subscription_up.get(), 0);
    kg.shutdown().await;
}
