//! The request path's phases in their order (route → credential → verify → authorize →
//! rewrite → forward → log), seen from outside: a request that several phases would refuse
//! gets the refusal of the first of them, nothing refused reaches the upstream, and every
//! request, whichever phase ended it, is decided and counted once. Real Redis, a real
//! upstream, keygate on port 0 and a real HTTP client.

mod common;

use std::collections::HashMap;

use common::*;
use keygate::config::RouteConfig;
use keygate::key::{generate, KeyKind};
use keygate::store::{now_unix, Store};

const DECISIONS: &str = "keygate_auth_decisions_total{mode=\"proxy\",outcome=\"";

/// How far each outcome's decision counter moved between two scrapes (outcomes that did not
/// move are left out).
fn decided(before: &Scrape, after: &Scrape) -> HashMap<String, f64> {
    after
        .samples
        .iter()
        .filter_map(|(series, value)| {
            let outcome = series.strip_prefix(DECISIONS)?.strip_suffix("\"}")?;
            let moved = value - before.get(series);
            (moved != 0.0).then(|| (outcome.to_owned(), moved))
        })
        .collect()
}

/// A request and the refusal it must get.
struct Case {
    what: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    status: u16,
    code: &'static str,
}

#[tokio::test]
async fn a_request_gets_the_refusal_of_the_first_phase_that_refuses_it() {
    let redis = RedisServer::start();
    let ns = namespace("phases");
    let store = redis_store(&redis, &ns);
    let upstream = Upstream::start().await;
    let mut config = test_config(&redis.url(), &ns, &upstream.url());
    // No catch-all route: a path outside the routes is `no_route`.
    config.upstream.url = None;
    config.server.headers_with_underscores = "reject".into();
    let to_upstream = |prefix: &str| RouteConfig {
        path_prefix: prefix.into(),
        upstream: Some(upstream.url()),
        ..Default::default()
    };
    config.routes = vec![
        to_upstream("/api"),
        RouteConfig {
            roles: Some(vec!["admin".into()]),
            ..to_upstream("/api/admin")
        },
        RouteConfig {
            tenant_from: Some("/tenants/{tenant}".into()),
            ..to_upstream("/tenants")
        },
    ];
    let keygate = Keygate::start(config).await;
    keygate.wait_ready().await;
    let http = Http::new();

    let bearer = |key: &str| format!("Bearer {key}");
    let member = bearer(create_key(&*store, "acme", "member").await.secret.expose());
    let revoked_key = create_key(&*store, "acme", "member").await;
    store
        .revoke(&revoked_key.record.id, now_unix())
        .await
        .unwrap();
    let revoked = bearer(revoked_key.secret.expose());
    // An admin key of `acme`, past its expiry.
    let expired = bearer(insert_expired_key(&*store).await.secret.expose());
    let unknown = bearer(generate(KeyKind::User).secret.expose());
    let auth = |value: &str| ("authorization", value.to_owned());

    // Each request would be refused by the phase its case names and by later ones too.
    let cases = [
        Case {
            what: "route: header names before the host",
            path: "/elsewhere",
            headers: vec![("x_custom", "1".into()), ("host", "bad host".into())],
            status: 400,
            code: "invalid_header",
        },
        Case {
            what: "route: the host before the path",
            path: "/api/%2f",
            headers: vec![("host", "bad host".into())],
            status: 400,
            code: "invalid_host",
        },
        Case {
            what: "route: the path before the credential",
            path: "/api/%2f",
            headers: vec![auth(&revoked)],
            status: 400,
            code: "invalid_path",
        },
        Case {
            what: "route: no route before the credential",
            path: "/elsewhere",
            headers: vec![],
            status: 404,
            code: "no_route",
        },
        Case {
            what: "credential: one Authorization header before verify",
            path: "/api/admin",
            headers: vec![auth(&member), auth(&member)],
            status: 400,
            code: "invalid_request",
        },
        Case {
            what: "credential: a malformed key before verify",
            path: "/api/admin",
            headers: vec![auth("Bearer kgu_not-a-key")],
            status: 401,
            code: "invalid_key",
        },
        Case {
            what: "verify: an unknown key before authorize",
            path: "/api/admin",
            headers: vec![auth(&unknown)],
            status: 401,
            code: "invalid_key",
        },
        Case {
            what: "verify: a revoked key before authorize",
            path: "/api/admin",
            headers: vec![auth(&revoked)],
            status: 401,
            code: "key_revoked",
        },
        Case {
            what: "verify: an expired key before authorize",
            path: "/tenants/globex",
            headers: vec![auth(&expired)],
            status: 401,
            code: "key_expired",
        },
        Case {
            what: "authorize: the role before forward",
            path: "/api/admin",
            headers: vec![auth(&member)],
            status: 403,
            code: "insufficient_scope",
        },
        Case {
            what: "authorize: the tenant before forward",
            path: "/tenants/globex",
            headers: vec![auth(&member)],
            status: 403,
            code: "insufficient_scope",
        },
    ];

    let before = keygate.scrape().await;
    let mut want: HashMap<String, f64> = HashMap::new();
    for case in &cases {
        let headers: Vec<(&str, &str)> = case.headers.iter().map(|(k, v)| (*k, &**v)).collect();
        let reply = http.get(&keygate.url(case.path), &headers).await;
        assert_eq!(
            (reply.status.as_u16(), reply.error_code()),
            (case.status, case.code.to_owned()),
            "{}: {}",
            case.what,
            reply.text()
        );
        *want.entry(case.code.to_owned()).or_default() += 1.0;
    }
    assert!(
        upstream.requests().is_empty(),
        "a refused request reached the upstream"
    );

    // A request that passes every phase reaches the upstream once.
    let reply = http
        .get(
            &keygate.url("/tenants/acme/x"),
            &[("authorization", &member)],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(upstream.requests().len(), 1);
    *want.entry("allowed".into()).or_default() += 1.0;

    // log: every request, whichever phase ended it, was decided once, under its outcome.
    let after = keygate.scrape().await;
    assert_eq!(decided(&before, &after), want);
}
