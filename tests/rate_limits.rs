//! Rate limits on the request path, over loopback: a role's limit per key and per tenant, a
//! route's limit, the `429` and its headers, the metrics, and the decision endpoint. Limits
//! here are per minute, so no bucket refills while a test runs: every count is exact, and
//! recovery is read from what the limiter reports (`Retry-After`, `RateLimit`), not slept on.

mod common;

use std::path::Path;

use common::*;
use keygate::config::{Config, RoleConfig, RouteConfig};
use keygate::store::file::FileStore;
use keygate::store::Store;

/// A file-store config with the roles `metered` (`5/min` per key), `shared` (`tenant:6/min`)
/// and `open-ended` (no limit), and routes `/a`, `/b` and `/slow` (`2/min` per key).
fn config(keys_file: &Path, upstream: &str) -> Config {
    let mut c = file_test_config(keys_file, upstream);
    for (name, limit) in [
        ("metered", Some("5/min")),
        ("shared", Some("tenant:6/min")),
        ("open-ended", None),
    ] {
        c.roles.insert(
            name.into(),
            RoleConfig {
                methods: None,
                permissions: Some("all".into()),
                rate_limit: limit.map(Into::into),
            },
        );
    }
    for (prefix, limit) in [("/a", None), ("/b", None), ("/slow", Some("2/min"))] {
        c.routes.push(RouteConfig {
            name: Some(prefix[1..].into()),
            path_prefix: prefix.into(),
            rate_limit: limit.map(Into::into),
            ..RouteConfig::default()
        });
    }
    c
}

struct Rig {
    upstream: Upstream,
    kg: Keygate,
    store: FileStore,
    http: Http,
}

async fn rig(tweak: impl FnOnce(&mut Config)) -> Rig {
    let dir = temp_dir("rate-limits");
    let keys_file = dir.join("keys.toml");
    std::fs::write(&keys_file, "").unwrap();
    let store = FileStore::open(&keys_file, false).unwrap();
    let upstream = Upstream::start().await;
    let mut c = config(&keys_file, &upstream.url());
    tweak(&mut c);
    let kg = Keygate::start(c).await;
    kg.wait_ready().await;
    Rig {
        upstream,
        kg,
        store,
        http: Http::new(),
    }
}

impl Rig {
    async fn key(&self, tenant: &str, role: &str) -> String {
        let created = create_key(&self.store as &dyn Store, tenant, role).await;
        let key = created.secret.expose().to_owned();
        // The running server sees a key once its reload has adopted it.
        wait_for_status(&self.http, &self.kg, &key, 200, "the new key works").await;
        key
    }
}

fn header(reply: &Reply, name: &str) -> String {
    reply
        .headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_gets_exactly_its_burst_then_429s_that_say_when_to_retry() {
    let rig = rig(|_| {}).await;
    let key = rig.key("acme", "metered").await;
    // `key` already made one request (the readiness probe of `Rig::key`).
    let seen_before = rig.upstream.requests().len();
    let mut remaining = Vec::new();
    for _ in 0..4 {
        let ok = rig.http.get_with_key(&rig.kg.url("/a/x"), &key).await;
        assert_eq!(ok.status, 200, "{}", ok.text());
        assert_eq!(header(&ok, "ratelimit-policy"), "\"key\";q=5;w=60");
        remaining.push(header(&ok, "ratelimit"));
        assert!(ok.headers.get("retry-after").is_none());
    }
    assert_eq!(
        remaining,
        [
            "\"key\";r=3;t=24",
            "\"key\";r=2;t=36",
            "\"key\";r=1;t=48",
            "\"key\";r=0;t=60"
        ]
    );
    for _ in 0..5 {
        let refused = rig.http.get_with_key(&rig.kg.url("/b/y"), &key).await;
        assert_eq!(refused.status, 429);
        assert_eq!(refused.error_code(), "rate_limited");
        // One request per 60 s / 5 = 12 s: the limiter's own account of when it refills.
        assert_eq!(header(&refused, "retry-after"), "12");
        assert_eq!(header(&refused, "ratelimit"), "\"key\";r=0;t=12");
        assert_eq!(header(&refused, "ratelimit-policy"), "\"key\";q=5;w=60");
        assert!(refused.headers.get("x-request-id").is_some());
        assert!(refused.headers.get("www-authenticate").is_none());
    }
    assert_eq!(
        rig.upstream.requests().len() - seen_before,
        4,
        "no refused request reached the upstream"
    );
    // Another key of the same role and tenant has its own bucket.
    let other = rig.key("acme", "metered").await;
    let ok = rig.http.get_with_key(&rig.kg.url("/a/x"), &other).await;
    assert_eq!(ok.status, 200);
    assert_eq!(header(&ok, "ratelimit"), "\"key\";r=3;t=24");

    let m = rig.kg.scrape().await;
    let series = |outcome: &str| {
        m.get(&format!(
            "keygate_rate_limit_checks_total{{outcome=\"{outcome}\",scope=\"key\",source=\"role\"}}"
        ))
    };
    assert_eq!(series("allowed"), 7.0);
    assert_eq!(series("limited"), 5.0);
    assert_eq!(
        m.get("keygate_auth_decisions_total{mode=\"proxy\",outcome=\"rate_limited\"}"),
        5.0
    );
    // No key, key id or tenant in any series of the limiter.
    for series in m.samples.keys() {
        if series.starts_with("keygate_rate_limit_checks_total") {
            assert!(
                !series.contains("acme") && !series.contains("key_"),
                "{series}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_limit_is_shared_by_all_its_keys_on_every_route() {
    let rig = rig(|_| {}).await;
    let (k1, k2) = (
        rig.key("acme", "shared").await,
        rig.key("acme", "shared").await,
    );
    let outsider = rig.key("globex", "shared").await;
    // Two requests spent by the readiness probes; four left for acme's keys together.
    let mut admitted = 0;
    for (key, path) in [(&k1, "/a"), (&k2, "/b"), (&k1, "/b"), (&k2, "/a")].repeat(3) {
        let reply = rig.http.get_with_key(&rig.kg.url(path), key).await;
        match reply.status.as_u16() {
            200 => admitted += 1,
            429 => assert_eq!(header(&reply, "ratelimit-policy"), "\"tenant\";q=6;w=60"),
            s => panic!("unexpected {s}: {}", reply.text()),
        }
    }
    assert_eq!(admitted, 4);
    // globex has a bucket of its own: five left after its probe.
    let mut globex = 0;
    for _ in 0..8 {
        if rig
            .http
            .get_with_key(&rig.kg.url("/a"), &outsider)
            .await
            .status
            == 200
        {
            globex += 1;
        }
    }
    assert_eq!(globex, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_limit_holds_on_its_route_only_and_adds_to_the_roles() {
    let rig = rig(|_| {}).await;
    let unlimited = rig.key("acme", "open-ended").await;
    let statuses = |key: String, path: &'static str, n: usize| {
        let rig = &rig;
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(rig.http.get_with_key(&rig.kg.url(path), &key).await);
            }
            out
        }
    };
    let slow = statuses(unlimited.clone(), "/slow/x", 4).await;
    let codes: Vec<u16> = slow.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(codes, [200, 200, 429, 429]);
    assert_eq!(
        header(&slow[0], "ratelimit-policy"),
        "\"route-key\";q=2;w=60"
    );
    assert_eq!(header(&slow[2], "retry-after"), "30");
    // Other routes are not limited for this role: no header at all.
    let other = statuses(unlimited, "/a", 10).await;
    assert!(other.iter().all(|r| r.status == 200));
    assert!(other[0].headers.get("ratelimit").is_none());

    // A metered key on /slow is checked against both, and each refusal names the one spent.
    let metered = rig.key("acme", "metered").await;
    let both = statuses(metered, "/slow", 3).await;
    let codes: Vec<u16> = both.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(codes, [200, 200, 429]);
    assert_eq!(
        header(&both[0], "ratelimit-policy"),
        "\"key\";q=5;w=60, \"route-key\";q=2;w=60"
    );
    // The route's refusal did not spend the role's bucket: 5 - 1 (probe) - 2 = 2 left.
    assert_eq!(
        header(&both[2], "ratelimit"),
        "\"key\";r=2;t=36, \"route-key\";r=0;t=30"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_on_admitted_responses_can_be_turned_off() {
    let rig = rig(|c| c.limits.headers_when_admitted = false).await;
    let key = rig.key("acme", "metered").await;
    for _ in 0..4 {
        let ok = rig.http.get_with_key(&rig.kg.url("/a"), &key).await;
        assert_eq!(ok.status, 200);
        assert!(ok.headers.get("ratelimit").is_none());
        assert!(ok.headers.get("ratelimit-policy").is_none());
    }
    let refused = rig.http.get_with_key(&rig.kg.url("/a"), &key).await;
    assert_eq!(refused.status, 429);
    assert_eq!(header(&refused, "ratelimit"), "\"key\";r=0;t=12");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_endpoint_passes_the_429_to_its_gateway() {
    let rig = rig(|c| {
        c.server.authz_listen = Some("127.0.0.1:0".into());
        c.server.authz_caller = "forward_auth".into();
    })
    .await;
    let key = rig.key("acme", "metered").await;
    let auth = format!("Bearer {key}");
    let url = rig.kg.authz_url("/");
    let headers = [
        ("authorization", auth.as_str()),
        ("x-forwarded-method", "GET"),
        ("x-forwarded-uri", "/a/thing"),
        ("x-forwarded-host", "app.example"),
    ];
    let check = || rig.http.request("GET", &url, &headers);
    for left in ["3", "2", "1", "0"] {
        let ok = check().await;
        assert_eq!(ok.status, 200, "{}", ok.text());
        assert!(header(&ok, "ratelimit").contains(&format!("r={left};")));
    }
    let refused = check().await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.error_code(), "rate_limited");
    assert_eq!(header(&refused, "retry-after"), "12");
    let m = rig.kg.scrape().await;
    assert_eq!(
        m.get("keygate_auth_decisions_total{mode=\"authz\",outcome=\"rate_limited\"}"),
        1.0
    );
}

#[test]
fn a_bad_limit_is_a_config_error_naming_its_field() {
    let dir = temp_dir("rate-limit-config");
    let mut c = config(&dir.join("keys.toml"), "http://127.0.0.1:1");
    c.roles.get_mut("metered").unwrap().rate_limit = Some("5/day".into());
    c.routes[2].rate_limit = Some("0/s".into());
    let Err(err) = c.serve_settings() else {
        panic!("refused")
    };
    let err = err.to_string();
    assert!(err.contains("roles.metered.rate_limit"), "{err}");
    assert!(err.contains("s, min or h"), "{err}");
    let mut c = config(&dir.join("keys.toml"), "http://127.0.0.1:1");
    c.routes[2].rate_limit = Some("0/s".into());
    let Err(err) = c.serve_settings() else {
        panic!("refused")
    };
    let err = err.to_string();
    assert!(err.contains("routes[2].rate_limit"), "{err}");
    let mut c = config(&dir.join("keys.toml"), "http://127.0.0.1:1");
    c.routes[0].auth = false;
    c.routes[0].rate_limit = Some("1/s".into());
    let Err(err) = c.serve_settings() else {
        panic!("refused")
    };
    let err = err.to_string();
    assert!(err.contains("no key to limit"), "{err}");
}
