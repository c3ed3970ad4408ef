//! Authorization and routing end to end: real Redis, real upstreams, keygate on port 0 with a
//! route table, and a real HTTP client. Each test checks what the client got and what each
//! upstream saw.

mod common;

use common::*;
use keygate::config::{Config, RouteConfig};

struct Rig {
    _redis: RedisServer,
    store: std::sync::Arc<keygate::store::redis::RedisStore>,
    keygate: Keygate,
    http: Http,
}

/// keygate in front of `default_upstream` (the catch-all), with `routes` before it.
async fn rig(default_upstream: Option<&Upstream>, routes: Vec<RouteConfig>) -> Rig {
    let redis = RedisServer::start();
    let ns = namespace("policy");
    let store = redis_store(&redis, &ns);
    let mut config: Config = test_config(&redis.url(), &ns, "http://unused");
    config.upstream.url = default_upstream.map(Upstream::url);
    config.routes = routes;
    let keygate = Keygate::start(config).await;
    keygate.wait_ready().await;
    Rig {
        _redis: redis,
        store,
        keygate,
        http: Http::new(),
    }
}

fn route(prefix: &str) -> RouteConfig {
    RouteConfig {
        path_prefix: prefix.into(),
        ..Default::default()
    }
}

async fn send(
    r: &Rig,
    method: &str,
    path: &str,
    key: Option<&str>,
    extra: &[(&str, &str)],
) -> Reply {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    r.http.request(method, &r.keygate.url(path), &headers).await
}

fn assert_insufficient_scope(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 403, "{what}: {}", reply.text());
    assert_eq!(reply.error_code(), "insufficient_scope", "{what}");
    let challenge = reply.headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.starts_with("Bearer ") && challenge.contains("error=\"insufficient_scope\""),
        "{what}: {challenge}"
    );
}

#[tokio::test]
async fn no_spelling_of_an_admin_path_reaches_it_without_the_admin_role() {
    let upstream = Upstream::start().await;
    let admin_route = RouteConfig {
        roles: Some(vec!["admin".into()]),
        ..route("/admin")
    };
    let r = rig(Some(&upstream), vec![admin_route]).await;
    let member = create_key(&*r.store, "acme", "member").await;
    let admin = create_key(&*r.store, "acme", "admin").await;
    let (member, admin) = (member.secret.expose(), admin.secret.expose());

    // (path, status for a member key, path the upstream saw when forwarded)
    let cases: &[(&str, u16, Option<&str>)] = &[
        ("/admin", 403, None),
        // Paths are case-sensitive (RFC 3986): /ADMIN is another resource, on the catch-all.
        ("/ADMIN", 200, Some("/ADMIN")),
        ("//admin", 403, None),
        ("/x/../admin", 403, None),
        ("/%61dmin", 403, None),
        ("/admin%2f", 400, None),
        ("/admin%2Fusers", 400, None),
        ("/admin/.", 403, None),
        ("/admin;x", 403, None),
        ("/admin/users", 403, None),
        ("/x/..;/admin", 400, None),
        ("/%2e%2e/admin", 400, None),
        ("/x/%2e%2e/admin", 403, None),
        ("/a%5cadmin", 400, None),
        ("/adminx", 200, Some("/adminx")),
        ("/x//y/./z/", 200, Some("/x/y/z/")),
    ];
    for &(path, status, saw) in cases {
        let before = upstream.requests().len();
        let reply = send(&r, "GET", path, Some(member), &[]).await;
        assert_eq!(reply.status, status, "member GET {path}: {}", reply.text());
        match status {
            403 => assert_insufficient_scope(&reply, path),
            400 => assert_eq!(reply.error_code(), "invalid_path", "{path}"),
            _ => {}
        }
        let seen = upstream.requests();
        match saw {
            Some(p) => {
                assert_eq!(seen.len(), before + 1, "{path} forwarded once");
                assert_eq!(seen[before].path, p, "{path}");
            }
            None => assert_eq!(seen.len(), before, "{path} must not be forwarded"),
        }
    }

    // The admin key reaches the admin route by every valid spelling, and the upstream sees
    // the path keygate matched, with the query as the client sent it.
    let admin_cases: &[(&str, &str)] = &[
        ("/admin", "/admin"),
        ("//admin", "/admin"),
        ("/x/../admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("/admin/.", "/admin/"),
        ("/admin;x", "/admin;x"),
    ];
    for &(path, saw) in admin_cases {
        let before = upstream.requests().len();
        let reply = send(&r, "GET", path, Some(admin), &[]).await;
        assert_eq!(reply.status, 200, "admin GET {path}: {}", reply.text());
        assert_eq!(upstream.requests()[before].path, saw, "{path}");
    }
    let reply = send(&r, "GET", "/x/../%61dmin?q=%2e%2e/&b", Some(admin), &[]).await;
    assert_eq!(reply.status, 200);
    let last = upstream.requests().pop().unwrap();
    assert_eq!(last.path, "/admin");
    assert_eq!(last.query.as_deref(), Some("q=%2e%2e/&b"));

    // Refusals are counted under their own outcomes.
    let metrics = r
        .http
        .get(&r.keygate.admin_url("/metrics"), &[])
        .await
        .text();
    for outcome in ["invalid_path", "insufficient_scope"] {
        assert!(
            metrics.contains(&format!(
                "keygate_auth_decisions_total{{mode=\"proxy\",outcome=\"{outcome}\"}}"
            )),
            "{outcome} missing from metrics"
        );
    }
}

#[tokio::test]
async fn a_case_insensitive_route_catches_every_case() {
    let upstream = Upstream::start().await;
    let admin_route = RouteConfig {
        roles: Some(vec!["admin".into()]),
        ignore_case: true,
        ..route("/admin")
    };
    let r = rig(Some(&upstream), vec![admin_route]).await;
    let member = create_key(&*r.store, "acme", "member").await;
    for path in ["/admin", "/ADMIN", "/Admin/x", "/%41dmin"] {
        let reply = send(&r, "GET", path, Some(member.secret.expose()), &[]).await;
        assert_insufficient_scope(&reply, path);
    }
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn readonly_keys_may_only_read_and_unknown_roles_nothing() {
    let upstream = Upstream::start().await;
    let r = rig(Some(&upstream), Vec::new()).await;
    let readonly = create_key(&*r.store, "acme", "readonly").await;
    let member = create_key(&*r.store, "acme", "member").await;
    let unknown = create_key(&*r.store, "acme", "superuser").await;
    for method in ["GET", "HEAD", "OPTIONS"] {
        let reply = send(&r, method, "/things", Some(readonly.secret.expose()), &[]).await;
        assert_eq!(reply.status, 200, "readonly {method}");
    }
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let reply = send(&r, method, "/things", Some(readonly.secret.expose()), &[]).await;
        assert_insufficient_scope(&reply, &format!("readonly {method}"));
        let reply = send(&r, method, "/things", Some(member.secret.expose()), &[]).await;
        assert_eq!(reply.status, 200, "member {method}");
    }
    for method in ["GET", "POST"] {
        let reply = send(&r, method, "/things", Some(unknown.secret.expose()), &[]).await;
        assert_insufficient_scope(&reply, &format!("unknown role {method}"));
    }
    assert_eq!(upstream.requests().len(), 3 + 4);
}

#[tokio::test]
async fn tenant_binding_admits_the_own_tenant_and_refuses_others() {
    let upstream = Upstream::start().await;
    let by_path = RouteConfig {
        tenant_from: Some("/tenants/{tenant}".into()),
        ..route("/tenants")
    };
    let by_header = RouteConfig {
        tenant_from: Some("header:x-tenant".into()),
        ..route("/reports")
    };
    let r = rig(Some(&upstream), vec![by_path, by_header]).await;
    let key = create_key(&*r.store, "acme", "member").await;
    let key = Some(key.secret.expose());

    // By path.
    let reply = send(&r, "GET", "/tenants/acme/orders", key, &[]).await;
    assert_eq!(reply.status, 200);
    let reply = send(&r, "GET", "/tenants/%61cme/orders", key, &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(upstream.requests()[1].path, "/tenants/acme/orders");
    for path in [
        "/tenants/globex/orders",
        "/tenants/acme/../globex/orders",
        "/tenants//globex",
        "/tenants/ACME/orders",
        "/tenants",
        "/tenants/",
    ] {
        let reply = send(&r, "GET", path, key, &[]).await;
        assert_insufficient_scope(&reply, path);
    }
    assert_eq!(upstream.requests().len(), 2);

    // By header.
    let reply = send(&r, "GET", "/reports/q1", key, &[("x-tenant", "acme")]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(upstream.requests().len(), 3);
    let refused: &[&[(&str, &str)]] = &[
        &[("x-tenant", "globex")],
        &[],
        &[("x-tenant", "acme"), ("x-tenant", "globex")],
    ];
    for headers in refused {
        let reply = send(&r, "GET", "/reports/q1", key, headers).await;
        assert_insufficient_scope(&reply, &format!("{headers:?}"));
    }
    assert_eq!(upstream.requests().len(), 3);
}

#[tokio::test]
async fn open_routes_pass_without_a_key_and_carry_no_identity() {
    let upstream = Upstream::start().await;
    let health = RouteConfig {
        auth: false,
        methods: Some(vec!["GET".into()]),
        ..route("/healthz")
    };
    let r = rig(Some(&upstream), vec![health]).await;

    let reply = send(
        &r,
        "GET",
        "/healthz",
        None,
        &[("x-keygate-tenant", "spoofed")],
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = upstream.requests();
    assert_eq!(seen[0].path, "/healthz");
    assert!(seen[0]
        .headers
        .keys()
        .all(|k| !k.as_str().starts_with("x-keygate-")));

    // The open route matches GET only; other methods and other paths need a key.
    let reply = send(&r, "POST", "/healthz", None, &[]).await;
    assert_eq!(reply.status, 401);
    for path in ["/healthz/../private", "/private", "/healthzx"] {
        let reply = send(&r, "GET", path, None, &[]).await;
        assert_eq!(reply.status, 401, "{path}");
        assert_eq!(reply.error_code(), "missing_credentials");
    }
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn requests_are_routed_to_two_upstreams_by_host_and_by_prefix() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let routes = vec![
        RouteConfig {
            host: Some("b.example".into()),
            upstream: Some(b.url()),
            ..route("/")
        },
        RouteConfig {
            upstream: Some(b.url()),
            ..route("/b-api")
        },
        RouteConfig {
            host: Some("a.example".into()),
            upstream: Some(a.url()),
            ..route("/")
        },
    ];
    let r = rig(None, routes).await;
    let key = create_key(&*r.store, "acme", "member").await;
    let key = Some(key.secret.expose());

    let cases = [
        ("a.example", "/a1", true),
        ("B.Example:8080", "/b1", false),
        ("other.example", "/b-api/x", false),
        ("a.example", "/b-api/a2", true), // the host-specific route wins
        ("b.example", "/b-api/b2", false),
        ("a.example.", "/a3", true),
    ];
    for (host, path, to_a) in cases {
        let reply = send(&r, "GET", path, key, &[("host", host)]).await;
        assert_eq!(reply.status, 200, "{host}{path}: {}", reply.text());
        let (hit, missed) = if to_a { (&a, &b) } else { (&b, &a) };
        assert_eq!(hit.requests().last().unwrap().path, path, "{host}{path}");
        assert!(
            missed.requests().iter().all(|s| s.path != path),
            "{host}{path} also reached the other upstream"
        );
    }
    let a_paths: Vec<String> = a.requests().into_iter().map(|s| s.path).collect();
    let b_paths: Vec<String> = b.requests().into_iter().map(|s| s.path).collect();
    assert_eq!(a_paths, ["/a1", "/b-api/a2", "/a3"]);
    assert_eq!(b_paths, ["/b1", "/b-api/x", "/b-api/b2"]);

    // No catch-all: anything else is 404 no_route, before any key is looked at.
    let reply = send(&r, "GET", "/elsewhere", None, &[("host", "c.example")]).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.error_code(), "no_route");
    let metrics = r
        .http
        .get(&r.keygate.admin_url("/metrics"), &[])
        .await
        .text();
    assert!(
        metrics.contains("keygate_auth_decisions_total{mode=\"proxy\",outcome=\"no_route\"} 1"),
        "{metrics}"
    );
    assert_eq!(a.requests().len() + b.requests().len(), 6);
}

#[tokio::test]
async fn http2_requests_are_routed_by_their_authority() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let by_host = RouteConfig {
        host: Some("127.0.0.1".into()),
        upstream: Some(b.url()),
        ..route("/")
    };
    let r = rig(Some(&a), vec![by_host]).await;
    let key = create_key(&*r.store, "acme", "member").await;
    // HTTP/2 has no Host header: the :authority (here 127.0.0.1:<port>) names the host.
    let reply = Http::http2()
        .get_with_key(&r.keygate.url("/x/../h2"), key.secret.expose())
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(b.requests()[0].path, "/h2");
    assert!(a.requests().is_empty());
}
