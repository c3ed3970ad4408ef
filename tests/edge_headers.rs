//! Header tricks at the edge, end to end over HTTP/1.1 and HTTP/2: real Redis, a real upstream,
//! keygate on port 0. Each test checks what the client got and what the upstream saw.

mod common;

use std::time::Duration;

use common::*;
use keygate::config::{Config, RouteConfig};

/// Every request in these tests gets its answer within this.
const ANSWER: Duration = Duration::from_secs(10);

struct Rig {
    _redis: RedisServer,
    upstream: Upstream,
    store: std::sync::Arc<keygate::store::redis::RedisStore>,
    keygate: Keygate,
}

async fn rig(tweak: impl FnOnce(&mut Config)) -> Rig {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("edge");
    let store = redis_store(&redis, &ns);
    let mut config = test_config(&redis.url(), &ns, &upstream.url());
    tweak(&mut config);
    let keygate = Keygate::start(config).await;
    keygate.wait_ready().await;
    Rig {
        _redis: redis,
        upstream,
        store,
        keygate,
    }
}

/// The two protocols a client may speak to keygate.
fn clients() -> [(&'static str, Http); 2] {
    [("HTTP/1.1", Http::new()), ("HTTP/2", Http::http2())]
}

/// A request with `key` and `headers`, answered within [`ANSWER`].
async fn send(http: &Http, url: &str, key: &str, headers: &[(&str, &str)]) -> Reply {
    let auth = format!("Bearer {key}");
    let mut all = vec![("authorization", auth.as_str())];
    all.extend_from_slice(headers);
    within(ANSWER, url, http.get(url, &all)).await
}

/// The spellings of identity headers that CGI-style upstreams (Python WSGI, PHP, Rack) read as
/// the real ones: `x_keygate_tenant` and `x-keygate-tenant` are both `HTTP_X_KEYGATE_TENANT`.
const SPOOFS: [(&str, &str); 4] = [
    ("x_keygate_tenant", "evil"),
    ("X_Keygate_Role", "admin"),
    ("x-keygate_tenant", "evil"),
    ("x_keygate-subject", "root"),
];

/// Whether a header name, read the CGI way (`_` as `-`), is in the identity namespace.
fn cgi_identity(name: &str) -> bool {
    name.replace('_', "-").starts_with("x-keygate-")
}

#[tokio::test]
async fn underscore_spellings_of_identity_headers_never_reach_the_upstream() {
    for policy in ["drop", "allow"] {
        let r = rig(|c| c.server.headers_with_underscores = policy.into()).await;
        let key = create_key(&*r.store, "acme", "readonly").await;
        for (proto, http) in clients() {
            let mut headers = SPOOFS.to_vec();
            headers.push(("x_custom", "1"));
            let reply = send(&http, &r.keygate.url("/"), key.secret.expose(), &headers).await;
            assert_eq!(reply.status, 200, "{policy} {proto}: {}", reply.text());
            let seen = r.upstream.requests().pop().unwrap();
            let identity: Vec<(String, String)> = seen
                .headers
                .iter()
                .filter(|(n, _)| cgi_identity(n.as_str()))
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
                .collect();
            assert_eq!(
                identity.len(),
                5,
                "{policy} {proto}: only keygate's own identity headers: {identity:?}"
            );
            assert_eq!(seen.headers["x-keygate-tenant"], "acme", "{policy} {proto}");
            assert_eq!(
                seen.headers["x-keygate-role"], "readonly",
                "{policy} {proto}"
            );
            assert_eq!(
                seen.headers["x-keygate-subject"], "alice",
                "{policy} {proto}"
            );
            // Other names with underscores: dropped by default, passed when allowed.
            let custom = seen.headers.get("x_custom").is_some();
            assert_eq!(custom, policy == "allow", "{policy} {proto}: x_custom");
        }
        let m = r.keygate.scrape().await;
        let removed = m.get("keygate_request_headers_removed_total{kind=\"underscore\"}")
            + m.get("keygate_request_headers_removed_total{kind=\"identity\"}");
        assert!(removed >= 8.0, "{policy}: removals counted: {}", m.text);
    }
}

#[tokio::test]
async fn an_identity_spoof_in_raw_http1_mixed_case_is_removed() {
    let r = rig(|c| c.server.headers_with_underscores = "allow".into()).await;
    let key = create_key(&*r.store, "acme", "readonly").await;
    let request = format!(
        "GET /raw HTTP/1.1\r\nHost: api.example\r\nAuthorization: Bearer {}\r\nX_KEYGATE_TENANT: evil\r\nX-Keygate_Role: admin\r\nConnection: close\r\n\r\n",
        key.secret.expose()
    );
    let answer = raw_exchange(r.keygate.proxy, request.as_bytes(), false, ANSWER).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let seen = r.upstream.requests().pop().unwrap();
    assert_eq!(seen.headers["x-keygate-tenant"], "acme");
    assert_eq!(seen.headers["x-keygate-role"], "readonly");
    assert_eq!(
        seen.headers
            .keys()
            .filter(|n| cgi_identity(n.as_str()))
            .count(),
        5
    );
}

#[tokio::test]
async fn headers_with_underscores_can_be_refused() {
    let r = rig(|c| c.server.headers_with_underscores = "reject".into()).await;
    let key = create_key(&*r.store, "acme", "admin").await;
    for (proto, http) in clients() {
        for header in [("x_custom", "1"), ("x_keygate_tenant", "evil")] {
            let reply = send(&http, &r.keygate.url("/"), key.secret.expose(), &[header]).await;
            assert_eq!(reply.status, 400, "{proto} {header:?}");
            assert_eq!(reply.error_code(), "invalid_header", "{proto} {header:?}");
        }
        let reply = send(
            &http,
            &r.keygate.url("/"),
            key.secret.expose(),
            &[("x-custom", "1")],
        )
        .await;
        assert_eq!(reply.status, 200, "{proto}");
    }
    assert_eq!(r.upstream.requests().len(), 2);
}

#[tokio::test]
async fn a_tenant_header_is_decided_on_every_spelling_and_reaches_the_upstream_as_decided() {
    let by_header = RouteConfig {
        path_prefix: "/reports".into(),
        tenant_from: Some("header:x-tenant".into()),
        ..Default::default()
    };
    for policy in ["drop", "allow"] {
        let r = rig(|c| {
            c.server.headers_with_underscores = policy.into();
            c.routes = vec![by_header.clone()];
        })
        .await;
        let key = create_key(&*r.store, "acme", "member").await;
        let url = r.keygate.url("/reports/q1");
        for (proto, http) in clients() {
            let what = |case: &str| format!("{policy} {proto}: {case}");
            // Two tenants in two spellings are ambiguous, whichever one keygate reads.
            for pair in [
                [("x-tenant", "acme"), ("x_tenant", "globex")],
                [("x_tenant", "acme"), ("x-tenant", "globex")],
            ] {
                let reply = send(&http, &url, key.secret.expose(), &pair).await;
                assert_eq!(reply.status, 403, "{}", what(&format!("{pair:?}")));
                assert_eq!(reply.error_code(), "insufficient_scope");
            }
            let before = r.upstream.requests().len();
            let reply = send(&http, &url, key.secret.expose(), &[("x_tenant", "globex")]).await;
            assert_eq!(reply.status, 403, "{}", what("x_tenant: globex alone"));
            assert_eq!(r.upstream.requests().len(), before);

            // The upstream gets the header the decision was made on, in its configured spelling,
            // even when the client spelt it with an underscore or named it in Connection (an
            // HTTP/1.1 header only: HTTP/2 has no Connection, and hyper's client applies it).
            let mut cases = vec![vec![("x_tenant", "acme")]];
            if proto == "HTTP/1.1" {
                cases.push(vec![("x-tenant", "acme"), ("connection", "x-tenant")]);
                cases.push(vec![
                    ("x_tenant", "acme"),
                    ("connection", "x-tenant, x_tenant"),
                ]);
            }
            for headers in cases {
                let reply = send(&http, &url, key.secret.expose(), &headers).await;
                assert_eq!(reply.status, 200, "{}", what(&format!("{headers:?}")));
                let seen = r.upstream.requests().pop().unwrap();
                let tenants: Vec<_> = seen
                    .headers
                    .iter()
                    .filter(|(n, _)| n.as_str().replace('_', "-") == "x-tenant")
                    .map(|(n, v)| (n.to_string(), v.clone()))
                    .collect();
                assert_eq!(
                    tenants.len(),
                    1,
                    "{}: {tenants:?}",
                    what(&format!("{headers:?}"))
                );
                assert_eq!(tenants[0].0, "x-tenant");
                assert_eq!(tenants[0].1, "acme");
            }
        }
    }
}

/// A raw HTTP/1.x request head to keygate, with a valid key; the answer's status line.
async fn raw(r: &Rig, key: &str, request_line: &str, headers: &[&str]) -> String {
    let mut head =
        format!("{request_line}\r\nauthorization: Bearer {key}\r\nconnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let answer = raw_exchange(r.keygate.proxy, head.as_bytes(), false, ANSWER).await;
    answer.lines().next().unwrap_or("(closed)").to_owned() + "\n" + &answer
}

#[tokio::test]
async fn a_repeated_missing_or_invalid_host_is_refused() {
    let r = rig(|_| {}).await;
    let key = create_key(&*r.store, "acme", "admin").await;
    let key = key.secret.expose();
    let refused: &[(&str, &[&str])] = &[
        ("GET /two HTTP/1.1", &["host: a.example", "host: b.example"]),
        ("GET /none HTTP/1.1", &[]),
        ("GET /userinfo HTTP/1.1", &["host: evil.example@a.example"]),
        ("GET /list HTTP/1.1", &["host: a.example,b.example"]),
        ("GET /space HTTP/1.1", &["host: a.example b"]),
        ("GET /slash HTTP/1.1", &["host: a.example/x"]),
        ("GET /port HTTP/1.1", &["host: a.example:80x"]),
        ("GET /bigport HTTP/1.1", &["host: a.example:655350"]),
        ("GET /empty HTTP/1.1", &["host: "]),
        ("GET /v6 HTTP/1.1", &["host: [::1"]),
    ];
    for (line, headers) in refused {
        let answer = raw(&r, key, line, headers).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 "),
            "{line} {headers:?}: {answer}"
        );
        assert!(
            answer.contains("\"error\":\"invalid_host\""),
            "{line} {headers:?}: {answer}"
        );
    }
    assert!(
        r.upstream.requests().is_empty(),
        "nothing refused reached the upstream"
    );

    let accepted: &[(&str, &[&str])] = &[
        ("GET /one HTTP/1.1", &["host: A.Example:8080"]),
        ("GET /v6 HTTP/1.1", &["host: [::1]:8080"]),
        ("GET /ip HTTP/1.1", &["host: 192.0.2.1"]),
        // HTTP/1.0 needs no Host.
        ("GET /old HTTP/1.0", &[]),
    ];
    for (line, headers) in accepted {
        let answer = raw(&r, key, line, headers).await;
        assert!(answer.contains(" 200 "), "{line} {headers:?}: {answer}");
    }
    let m = r.keygate.scrape().await;
    assert_eq!(
        m.get("keygate_auth_decisions_total{mode=\"proxy\",outcome=\"invalid_host\"}"),
        refused.len() as f64
    );
}

#[tokio::test]
async fn an_absolute_form_target_is_routed_by_its_authority_not_by_host() {
    let b = Upstream::start().await;
    let b_url = b.url();
    let r = rig(move |c| {
        c.routes = vec![RouteConfig {
            host: Some("b.example".into()),
            upstream: Some(b_url),
            ..Default::default()
        }];
    })
    .await;
    let key = create_key(&*r.store, "acme", "admin").await;
    let key = key.secret.expose();
    let answer = raw(
        &r,
        key,
        "GET http://b.example/abs HTTP/1.1",
        &["host: a.example"],
    )
    .await;
    assert!(answer.contains(" 200 "), "{answer}");
    assert_eq!(b.requests().len(), 1, "the authority's route");
    assert!(r.upstream.requests().is_empty(), "not the Host's route");
    let seen = &b.requests()[0];
    assert_eq!(seen.path, "/abs");
    assert_eq!(seen.headers["x-forwarded-host"], "b.example");
    assert_eq!(seen.headers.get_all("host").iter().count(), 1);

    // The other way round: Host names b.example, the target a.example.
    let answer = raw(
        &r,
        key,
        "GET http://a.example/abs2 HTTP/1.1",
        &["host: b.example"],
    )
    .await;
    assert!(answer.contains(" 200 "), "{answer}");
    assert_eq!(r.upstream.requests()[0].path, "/abs2");
    assert_eq!(b.requests().len(), 1);

    // An authority with user information is not a host.
    let answer = raw(
        &r,
        key,
        "GET http://u@b.example/x HTTP/1.1",
        &["host: b.example"],
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
}

#[tokio::test]
async fn an_http2_host_header_that_differs_from_the_authority_is_refused() {
    let r = rig(|_| {}).await;
    let key = create_key(&*r.store, "acme", "admin").await;
    let http = Http::http2();
    let url = r.keygate.url("/h2");
    let reply = send(
        &http,
        &url,
        key.secret.expose(),
        &[("host", "other.example")],
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(reply.error_code(), "invalid_host");
    let same = r.keygate.proxy.to_string();
    let reply = send(&http, &url, key.secret.expose(), &[("host", &same)]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(r.upstream.requests().len(), 1);
}

#[tokio::test]
async fn client_forwarding_headers_are_replaced_unless_the_peer_is_a_trusted_proxy() {
    let client_claims = [
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "claimed.example"),
        ("forwarded", "for=203.0.113.9"),
        ("x-real-ip", "203.0.113.9"),
    ];
    // Trust none (the default): the upstream sees keygate's view only.
    let r = rig(|_| {}).await;
    let key = create_key(&*r.store, "acme", "admin").await;
    for (proto, http) in clients() {
        let reply = send(
            &http,
            &r.keygate.url("/"),
            key.secret.expose(),
            &client_claims,
        )
        .await;
        assert_eq!(reply.status, 200, "{proto}");
        let h = r.upstream.requests().pop().unwrap().headers;
        assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{proto}");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1, "{proto}");
        assert_eq!(h["x-forwarded-proto"], "http", "{proto}");
        assert_eq!(
            h["x-forwarded-host"],
            r.keygate.proxy.to_string().as_str(),
            "{proto}"
        );
        assert!(h.get("forwarded").is_none(), "{proto}");
        assert!(h.get("x-real-ip").is_none(), "{proto}");
    }
    drop(r);

    // A trusted proxy's hops are kept, and the peer is appended.
    let r = rig(|c| c.server.trusted_proxies = vec!["10.0.0.0/8".into(), "127.0.0.1".into()]).await;
    let key = create_key(&*r.store, "acme", "admin").await;
    for (proto, http) in clients() {
        let reply = send(
            &http,
            &r.keygate.url("/"),
            key.secret.expose(),
            &client_claims,
        )
        .await;
        assert_eq!(reply.status, 200, "{proto}");
        let h = r.upstream.requests().pop().unwrap().headers;
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1", "{proto}");
        assert_eq!(h["x-forwarded-proto"], "https", "{proto}");
        assert_eq!(h["x-forwarded-host"], "claimed.example", "{proto}");
        assert_eq!(h["forwarded"], "for=203.0.113.9", "{proto}");
        assert_eq!(h["x-real-ip"], "203.0.113.9", "{proto}");
    }
}

#[tokio::test]
async fn method_override_headers_never_reach_the_upstream() {
    for policy in ["drop", "allow"] {
        let r = rig(|c| c.server.headers_with_underscores = policy.into()).await;
        let key = create_key(&*r.store, "acme", "readonly").await;
        for (proto, http) in clients() {
            let overrides = [
                ("x-http-method-override", "DELETE"),
                ("X-HTTP-Method", "PUT"),
                ("x-method-override", "PATCH"),
                ("x_http_method_override", "DELETE"),
            ];
            let reply = send(&http, &r.keygate.url("/"), key.secret.expose(), &overrides).await;
            assert_eq!(
                reply.status, 200,
                "{policy} {proto}: a readonly key may GET"
            );
            let seen = r.upstream.requests().pop().unwrap();
            assert_eq!(seen.method, "GET");
            for (name, _) in seen.headers.iter() {
                let cgi = name.as_str().replace('_', "-");
                assert!(
                    !cgi.contains("method"),
                    "{policy} {proto}: {name} reached the upstream"
                );
            }
        }
        let m = r.keygate.scrape().await;
        assert!(m.get("keygate_request_headers_removed_total{kind=\"method_override\"}") >= 6.0);
    }
}
