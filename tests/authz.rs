//! The decision endpoint (`server.authz_listen`) as each gateway calls it: the check request
//! names the original request by the caller's convention, and keygate answers `200` with
//! identity headers or the refusal the gateway passes back.

mod common;

use common::*;
use keygate::config::Config;

fn config(redis: &RedisServer, ns: &str, upstream: &str, caller: &str) -> Config {
    let mut c = test_config(&redis.url(), ns, upstream);
    c.server.authz_listen = Some("127.0.0.1:0".into());
    c.server.authz_caller = caller.into();
    c
}

/// keygate with its decision endpoint for `caller`, on Redis, and an admin and a readonly key.
async fn start(caller: &str) -> (RedisServer, Upstream, Keygate, String, String) {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("authz");
    let kg = Keygate::start(config(&redis, &ns, &upstream.url(), caller)).await;
    kg.wait_ready().await;
    let store = redis_store(&redis, &ns);
    let admin = create_key(&*store, "acme", "admin").await;
    let readonly = create_key(&*store, "acme", "readonly").await;
    let (admin, readonly) = (
        admin.secret.expose().to_owned(),
        readonly.secret.expose().to_owned(),
    );
    (redis, upstream, kg, admin, readonly)
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_http_ext_authz_decides_on_the_check_request_itself() {
    let (redis, upstream, kg, admin, readonly) = start("request").await;
    let http = Http::new();
    let auth = bearer(&admin);
    let ok = http
        .request(
            "POST",
            &kg.authz_url("/v1/things?x=1"),
            &[
                ("authorization", &auth),
                ("x-keygate-tenant", "evil"),
                ("x_keygate_role", "admin"),
            ],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.headers["x-keygate-tenant"], "acme");
    assert_eq!(ok.headers["x-keygate-role"], "admin");
    assert_eq!(ok.headers["x-keygate-subject"], "alice");
    assert_eq!(ok.headers["x-keygate-subject-kind"], "user");
    assert!(ok.headers.contains_key("x-keygate-key-id"));
    assert!(ok.headers.contains_key("x-request-id"));
    // The key and every spoofed identity header, in any spelling, go before forwarding.
    let remove = ok.headers["x-envoy-auth-headers-to-remove"]
        .to_str()
        .unwrap();
    let mut remove: Vec<&str> = remove.split(", ").collect();
    remove.sort();
    assert_eq!(
        remove,
        ["authorization", "x-keygate-tenant", "x_keygate_role"]
    );
    assert!(ok.text().is_empty(), "an allowed check has no body");
    // The secret is nowhere in the answer.
    for (_, v) in &ok.headers {
        assert!(!v.to_str().unwrap_or("").contains(&admin));
    }

    let denied = http
        .request(
            "POST",
            &kg.authz_url("/v1/things"),
            &[("authorization", &bearer(&readonly))],
        )
        .await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.error_code(), "insufficient_scope");
    assert!(denied.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("insufficient_scope"));

    let missing = http.get(&kg.authz_url("/v1/things"), &[]).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.error_code(), "missing_credentials");
    assert_eq!(
        missing.headers["www-authenticate"],
        "Bearer realm=\"keygate\""
    );

    // A client of Envoy naming another request through another gateway's headers is refused.
    let spoof = http
        .get(
            &kg.authz_url("/admin"),
            &[("authorization", &auth), ("x-original-uri", "/public")],
        )
        .await;
    assert_eq!(spoof.status, 400);
    assert_eq!(spoof.error_code(), "invalid_original_request");

    // Nothing reached the upstream: the decision endpoint never forwards.
    assert!(upstream.requests().is_empty());
    let m = kg.scrape().await;
    let authz = |o: &str| m.decisions("authz", o);
    assert_eq!(authz("allowed"), 1.0);
    assert_eq!(authz("insufficient_scope"), 1.0);
    assert_eq!(authz("missing_credentials"), 1.0);
    assert_eq!(authz("invalid_original_request"), 1.0);
    assert_eq!(m.decisions("proxy", "allowed"), 0.0);
    kg.shutdown().await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_endpoint_speaks_h2c_on_the_same_port() {
    let (redis, _upstream, kg, admin, _) = start("request").await;
    let ok = Http::http2()
        .get(
            &kg.authz_url("/v1/things"),
            &[("authorization", &bearer(&admin))],
        )
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.headers["x-keygate-tenant"], "acme");
    kg.shutdown().await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_names_the_original_in_x_original_headers() {
    let (redis, _upstream, kg, admin, readonly) = start("nginx").await;
    let http = Http::new();
    let ask = |key: &str, method: &'static str, uri: &'static str| {
        let (http, url, auth) = (http.clone(), kg.authz_url("/_keygate"), bearer(key));
        async move {
            http.get(
                &url,
                &[
                    ("authorization", &auth),
                    ("x-original-method", method),
                    ("x-original-uri", uri),
                ],
            )
            .await
        }
    };
    // The check request is a GET to the auth location; the decision is on the original.
    assert_eq!(ask(&readonly, "GET", "/v1/things").await.status, 200);
    let post = ask(&readonly, "POST", "/v1/things").await;
    assert_eq!(post.status, 403);
    assert_eq!(post.error_code(), "insufficient_scope");
    let ok = ask(&admin, "DELETE", "/v1/things/1?force=1").await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.headers["x-keygate-role"], "admin");
    assert!(
        !ok.headers.contains_key("x-envoy-auth-headers-to-remove"),
        "only Envoy is told what to remove"
    );
    // The original path is normalised as the proxy's is: an ambiguous one is refused.
    let bad = ask(&admin, "GET", "/v1/%2e%2e/%2e%2e/etc").await;
    assert_eq!(bad.status, 400, "{}", bad.text());

    let missing = http
        .get(
            &kg.authz_url("/_keygate"),
            &[("authorization", &bearer(&admin))],
        )
        .await;
    assert_eq!(missing.status, 400);
    assert_eq!(missing.error_code(), "invalid_original_request");
    let spoof = http
        .get(
            &kg.authz_url("/_keygate"),
            &[
                ("authorization", &bearer(&readonly)),
                ("x-original-method", "POST"),
                ("x-original-uri", "/v1/things"),
                ("x-forwarded-method", "GET"),
            ],
        )
        .await;
    assert_eq!(spoof.error_code(), "invalid_original_request");
    kg.shutdown().await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_names_the_original_in_x_forwarded_headers_and_revocation_holds_at_once() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("authz-fwd");
    let kg = Keygate::start(config(&redis, &ns, &upstream.url(), "forward_auth")).await;
    kg.wait_ready().await;
    let store = redis_store(&redis, &ns);
    let key = create_key(&*store, "acme", "readonly").await;
    let http = Http::new();
    let ask = |method: &'static str| {
        let (http, url, auth) = (http.clone(), kg.authz_url("/"), bearer(key.secret.expose()));
        async move {
            http.get(
                &url,
                &[
                    ("authorization", &auth),
                    ("x-forwarded-method", method),
                    ("x-forwarded-uri", "/v1/things"),
                    ("x-forwarded-host", "api.example"),
                    ("x-forwarded-proto", "https"),
                ],
            )
            .await
        }
    };
    assert_eq!(ask("GET").await.status, 200);
    assert_eq!(ask("POST").await.status, 403);

    kg.revoke_and_wait(&*store, &key.record.id).await;
    let revoked = ask("GET").await;
    assert_eq!(revoked.status, 401);
    assert_eq!(revoked.error_code(), "key_revoked");
    kg.shutdown().await;
    drop(redis);
}

#[tokio::test]
async fn an_unknown_caller_is_a_config_error_naming_the_choices() {
    let mut c = Config::default();
    c.upstream.url = Some("http://127.0.0.1:1".into());
    c.server.authz_listen = Some("127.0.0.1:0".into());
    c.server.authz_caller = "haproxy".into();
    let err = c.serve_settings().unwrap_err().to_string();
    assert!(err.contains("server.authz_caller"), "{err}");
    assert!(err.contains("forward_auth"), "{err}");
}
