//! The decision endpoint as Envoy's gRPC `ext_authz` filter and Istio's `envoyExtAuthzGrpc`
//! provider call it (`server.authz_caller = "grpc"`), driven by a real gRPC client built from
//! Envoy's own v3 protos: `tests/ext_authz_client.py` (grpcio and xds-protos, which
//! `scripts/test.sh` installs). Without them the client tests are skipped with a message,
//! except under `CI=true`, where they fail: CI must run them.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use keygate::config::Config;
use keygate::key::{generate, KeyKind};
use keygate::manage;
use keygate::store::now_unix;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// The longest the client may take for all its cases.
const CLIENT_DEADLINE: Duration = Duration::from_secs(120);

const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";

fn config(redis: &RedisServer, ns: &str, upstream: &str, caller: &str) -> Config {
    let mut c = test_config(&redis.url(), ns, upstream);
    c.server.authz_listen = Some("127.0.0.1:0".into());
    c.server.authz_caller = caller.into();
    c
}

/// Whether the client's modules import, else why the test cannot run (a skip, or under
/// `CI=true` a failure).
async fn client_available() -> bool {
    let out = tokio::process::Command::new("python3")
        .args([
            "-c",
            "import grpc, yaml, envoy.service.auth.v3.external_auth_pb2_grpc",
        ])
        .output()
        .await;
    if matches!(&out, Ok(o) if o.status.success()) {
        return true;
    }
    let msg = "the gRPC client needs python3 with grpcio, xds-protos and PyYAML \
               (`pip install grpcio xds-protos pyyaml`; scripts/test.sh does)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}: {out:?}");
    }
    eprintln!("skipping the gRPC ext_authz client test: {msg}");
    false
}

/// Runs the client's `cases` against keygate's decision endpoint: one result per case, by name.
async fn run_client(kg: &Keygate, cases: Value) -> std::collections::HashMap<String, Value> {
    let addr = kg.authz.expect("server.authz_listen is set").to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ext_authz_client.py");
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let input = json!({ "addr": addr, "cases": cases }).to_string();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(CLIENT_DEADLINE, child.wait_with_output())
        .await
        .expect("the gRPC client finished in time")
        .unwrap();
    assert!(
        out.status.success(),
        "the gRPC client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    results
        .into_iter()
        .map(|r| (r["name"].as_str().unwrap().to_owned(), r))
        .collect()
}

/// The value of header `name` in a list of `{key, value, append_action}`.
fn header<'a>(headers: &'a Value, name: &str) -> Option<&'a str> {
    headers
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["key"] == name)
        .map(|h| h["value"].as_str().unwrap())
}

fn check(name: &str, method: &str, path: &str, headers: Value) -> Value {
    json!({
        "name": name, "kind": "check", "method": method, "path": path,
        "host": "api.example", "headers": headers,
    })
}

/// gRPC status codes (`google.rpc.Code`).
const OK: i64 = 0;
const INVALID_ARGUMENT: i64 = 3;
const PERMISSION_DENIED: i64 = 7;
const RESOURCE_EXHAUSTED: i64 = 8;
const UNIMPLEMENTED: i64 = 12;
const INTERNAL: i64 = 13;
const UNAUTHENTICATED: i64 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_grpc_ext_authz_checks_the_request_the_check_request_describes() {
    if !client_available().await {
        return;
    }
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("authz-grpc");
    let kg = Keygate::start(config(&redis, &ns, &upstream.url(), "grpc")).await;
    kg.wait_ready().await;
    let store = redis_store(&redis, &ns);
    let admin = create_key(&*store, "acme", "admin").await;
    let readonly = create_key(&*store, "acme", "readonly").await;
    let revoked = create_key(&*store, "acme", "admin").await;
    manage::revoke_key(&*store, &revoked.record.id, now_unix(), "test")
        .await
        .unwrap();
    let bearer = |k: &manage::CreatedKey| format!("Bearer {}", k.secret.expose());
    // Well formed, never stored.
    let unknown = format!("Bearer {}", generate(KeyKind::User).secret.expose());
    let admin_secret = admin.secret.expose().to_owned();

    let cases = json!([
        check("allowed", "POST", "/v1/things?x=1", json!({
            ":authority": "api.example", ":path": "/v1/things?x=1", ":method": "POST",
            "authorization": bearer(&admin),
            "x-keygate-tenant": "evil",
            "x-request-id": "check-1",
        })),
        {
            "name": "allowed_raw", "kind": "check", "method": "GET", "path": "/v1/things",
            "host": "api.example", "raw": true,
            "headers": { "authorization": bearer(&readonly) },
        },
        check("readonly_post", "POST", "/v1/things", json!({
            "authorization": bearer(&readonly), "x-request-id": "check-2",
        })),
        check("revoked", "GET", "/v1/things", json!({ "authorization": bearer(&revoked) })),
        check("unknown", "GET", "/v1/things", json!({
            "authorization": unknown,
        })),
        check("missing", "GET", "/v1/things", json!({})),
        check("spoofed_original", "GET", "/admin", json!({
            "authorization": bearer(&admin), "x-original-uri": "/public",
        })),
        { "name": "no_http", "kind": "empty" },
        { "name": "garbage", "kind": "bytes", "hex": "ffffffffffff" },
        { "name": "oversize", "kind": "size", "n": 2 * 1024 * 1024 },
        {
            "name": "gzip", "kind": "check", "gzip": true, "method": "GET",
            "path": "/v1/things", "host": "api.example",
            // Compressible, so that the client does compress it.
            "headers": { "authorization": bearer(&admin), "x-pad": "a".repeat(10_000) },
        },
        {
            "name": "other_method", "kind": "method",
            "path": "/envoy.service.auth.v3.Authorization/Other",
        },
        {
            "name": "other_service", "kind": "method",
            "path": "/grpc.health.v1.Health/Check",
        },
    ]);
    let r = run_client(&kg, cases).await;

    // Allowed: the identity headers to set (replacing any), the key and the spoofed identity
    // header to remove.
    let ok = &r["allowed"];
    assert_eq!(ok["code"], OK, "{ok}");
    let resp = &ok["response"];
    assert_eq!(resp["status"]["code"], OK, "{resp}");
    assert_eq!(resp["which"], "ok_response");
    let set = &resp["ok"]["headers"];
    assert_eq!(header(set, "x-keygate-tenant"), Some("acme"));
    assert_eq!(header(set, "x-keygate-role"), Some("admin"));
    assert_eq!(header(set, "x-keygate-subject"), Some("alice"));
    assert_eq!(header(set, "x-keygate-subject-kind"), Some("user"));
    assert_eq!(
        header(set, "x-keygate-key-id"),
        Some(admin.record.id.as_str())
    );
    for h in set.as_array().unwrap() {
        assert_eq!(h["append_action"], "OVERWRITE_IF_EXISTS_OR_ADD", "{h}");
        assert!(h["key"].as_str().unwrap().starts_with("x-keygate-"), "{h}");
    }
    let mut remove: Vec<&str> = resp["ok"]["headers_to_remove"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    remove.sort();
    assert_eq!(remove, ["authorization", "x-keygate-tenant"]);
    assert!(
        !ok.to_string().contains(&admin_secret),
        "the secret is echoed"
    );
    let raw = &r["allowed_raw"]["response"];
    assert_eq!(raw["status"]["code"], OK, "{raw}");
    assert_eq!(
        header(&raw["ok"]["headers"], "x-keygate-role"),
        Some("readonly")
    );

    // Refused: a successful call whose CheckResponse refuses, with the response Envoy gives
    // its client.
    let denied = |name: &str, code: i64, http: i64, error: &str| {
        let result = &r[name];
        assert_eq!(result["code"], OK, "{name}: {result}");
        let resp = &result["response"];
        assert_eq!(resp["status"]["code"], code, "{name}: {resp}");
        assert_eq!(resp["status"]["message"], error, "{name}: {resp}");
        assert_eq!(resp["which"], "denied_response", "{name}: {resp}");
        let d = &resp["denied"];
        assert_eq!(d["status"], http, "{name}: {d}");
        let body: Value = serde_json::from_str(d["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["error"], error, "{name}: {d}");
        assert_eq!(
            header(&d["headers"], "content-type"),
            Some("application/json")
        );
        assert!(
            header(&d["headers"], "x-request-id").is_some(),
            "{name}: {d}"
        );
        d.clone()
    };
    let scope = denied(
        "readonly_post",
        PERMISSION_DENIED,
        403,
        "insufficient_scope",
    );
    assert!(header(&scope["headers"], "www-authenticate")
        .unwrap()
        .contains("insufficient_scope"));
    assert_eq!(header(&scope["headers"], "x-request-id"), Some("check-2"));
    let gone = denied("revoked", UNAUTHENTICATED, 401, "key_revoked");
    assert!(header(&gone["headers"], "www-authenticate")
        .unwrap()
        .starts_with("Bearer realm=\"keygate\""));
    denied("unknown", UNAUTHENTICATED, 401, "invalid_key");
    let missing = denied("missing", UNAUTHENTICATED, 401, "missing_credentials");
    assert_eq!(
        header(&missing["headers"], "www-authenticate"),
        Some("Bearer realm=\"keygate\"")
    );
    denied(
        "spoofed_original",
        INVALID_ARGUMENT,
        400,
        "invalid_original_request",
    );

    // Calls that cannot be decided on fail as calls.
    let failed = |name: &str, code: i64| {
        let result = &r[name];
        assert_eq!(result["code"], code, "{name}: {result}");
        assert!(result["response"].is_null(), "{name}: {result}");
    };
    failed("no_http", INVALID_ARGUMENT);
    failed("garbage", INVALID_ARGUMENT);
    failed("oversize", RESOURCE_EXHAUSTED);
    failed("gzip", UNIMPLEMENTED);
    failed("other_method", UNIMPLEMENTED);
    failed("other_service", UNIMPLEMENTED);

    // keygate still answers after all of them.
    let again = run_client(
        &kg,
        json!([check(
            "again",
            "GET",
            "/v1/things",
            json!({ "authorization": bearer(&admin) })
        )]),
    )
    .await;
    assert_eq!(again["again"]["response"]["status"]["code"], OK);

    // Decisions count with mode="authz"; the calls that were not decided on do not count.
    assert!(
        upstream.requests().is_empty(),
        "the decision endpoint never forwards"
    );
    let m = kg.scrape().await;
    let authz = |o: &str| m.decisions("authz", o);
    assert_eq!(authz("allowed"), 3.0);
    assert_eq!(authz("insufficient_scope"), 1.0);
    assert_eq!(authz("key_revoked"), 1.0);
    assert_eq!(authz("invalid_key"), 1.0);
    assert_eq!(authz("missing_credentials"), 1.0);
    assert_eq!(authz("invalid_original_request"), 1.0);
    assert_eq!(m.decisions("proxy", "allowed"), 0.0);
    kg.shutdown().await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_api_is_served_to_the_grpc_caller_only() {
    if !client_available().await {
        return;
    }
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("authz-grpc-http");
    let kg = Keygate::start(config(&redis, &ns, &upstream.url(), "request")).await;
    kg.wait_ready().await;
    let store = redis_store(&redis, &ns);
    let admin = create_key(&*store, "acme", "admin").await;
    let auth = format!("Bearer {}", admin.secret.expose());
    // A client of Envoy's HTTP filter sending a CheckRequest that names an admin's request:
    // the endpoint decides on the check request itself, never reads the message, and answers
    // no CheckResponse, with or without a key of its own on the call.
    let smuggled = check(
        "smuggled",
        "GET",
        "/v1/things",
        json!({ "authorization": auth }),
    );
    let mut with_key = smuggled.clone();
    with_key["name"] = json!("smuggled_with_key");
    with_key["metadata"] = json!([["authorization", auth]]);
    let r = run_client(&kg, json!([smuggled, with_key])).await;
    for name in ["smuggled", "smuggled_with_key"] {
        let result = &r[name];
        assert_ne!(result["code"], OK, "{name}: {result}");
        assert!(result["response"].is_null(), "{name}: {result}");
    }
    kg.shutdown().await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_caller_refuses_what_is_not_a_grpc_call() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("authz-grpc-raw");
    let kg = Keygate::start(config(&redis, &ns, &upstream.url(), "grpc")).await;
    kg.wait_ready().await;

    // Not gRPC: plain HTTP checks, over HTTP/1.1 or HTTP/2, get 415.
    let h1 = Http::new()
        .request(
            "POST",
            &kg.authz_url(CHECK),
            &[("content-type", "application/grpc")],
        )
        .await;
    assert_eq!(h1.status, 415, "{}", h1.text());
    assert_eq!(h1.error_code(), "unsupported_media_type");
    let h2 = Http::http2();
    let plain = h2.get(&kg.authz_url("/v1/things"), &[]).await;
    assert_eq!(plain.status, 415);

    // A compressed flag with no grpc-encoding named is a protocol error (trailers-only).
    let grpc = [("content-type", "application/grpc")];
    let compressed = h2
        .request_body(
            "POST",
            &kg.authz_url(CHECK),
            &grpc,
            vec![1u8, 0, 0, 0, 1, 0],
        )
        .await;
    assert_eq!(compressed.status, 200);
    assert_eq!(
        compressed.headers["grpc-status"],
        INTERNAL.to_string().as_str()
    );
    // A message cut short, or none.
    let cut = h2
        .request_body(
            "POST",
            &kg.authz_url(CHECK),
            &grpc,
            vec![0u8, 0, 0, 0, 9, 0],
        )
        .await;
    assert_eq!(
        cut.headers["grpc-status"],
        INVALID_ARGUMENT.to_string().as_str()
    );
    let none = h2
        .request_body("POST", &kg.authz_url(CHECK), &grpc, Vec::new())
        .await;
    assert_eq!(
        none.headers["grpc-status"],
        INVALID_ARGUMENT.to_string().as_str()
    );

    // None of these was a decision.
    let m = kg.scrape().await;
    assert_eq!(m.decisions("authz", "missing_credentials"), 0.0);
    kg.shutdown().await;
    drop(redis);
}

#[tokio::test]
async fn the_envoy_configs_are_envoy_v3_bootstraps() {
    if !client_available().await {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = tokio::process::Command::new("python3")
        .arg(format!("{root}/tests/envoy_config_check.py"))
        .arg(format!("{root}/deploy/authz/envoy-grpc.yaml"))
        .arg(format!("{root}/deploy/authz/envoy-http.yaml"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Both files are read, and both name keygate's decision endpoint.
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.lines().count(), 2, "{said}");
    for file in ["envoy-grpc.yaml", "envoy-http.yaml"] {
        let text = std::fs::read_to_string(format!("{root}/deploy/authz/{file}")).unwrap();
        assert!(text.contains("port_value: 9191"), "{file}");
    }
}
