//! Observability: every counter moves by exactly what happened, no secret reaches a log line
//! or a metric even at the most verbose level, and the shipped dashboard and alert rules use
//! only metrics keygate exports.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::process::{Child, Command};
use std::time::Duration;

use common::*;
use keygate::key::{generate, KeyKind};
use keygate::store::{now_unix, Store};
use serde_json::json;

/// The difference between two scrapes, series by series.
fn moved(before: &Scrape, after: &Scrape, series: &str) -> f64 {
    after.get(series) - before.get(series)
}

fn decisions(outcome: &str) -> String {
    format!("keygate_auth_decisions_total{{mode=\"proxy\",outcome=\"{outcome}\"}}")
}

fn processing_count(class: &str) -> String {
    format!(
        "keygate_processing_duration_seconds_count{{route=\"default\",status_class=\"{class}\"}}"
    )
}

fn upstream_count(class: &str) -> String {
    format!("keygate_upstream_duration_seconds_count{{route=\"default\",status_class=\"{class}\"}}")
}

fn upstream_errors(kind: &str) -> String {
    format!("keygate_upstream_errors_total{{kind=\"{kind}\",route=\"default\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_counter_moves_by_exactly_what_happened() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("metrics");
    let store = redis_store(&redis, &ns);
    let mut config = test_config(&redis.url(), &ns, &upstream.url());
    config.upstream.timeout = "300ms".into();
    let kg = Keygate::start(config).await;
    kg.wait_ready().await;
    let http = Http::new();
    let url = kg.url("/");

    let good = create_key(&*store, "acme", "admin").await;
    let revoked = create_key(&*store, "acme", "admin").await;
    store
        .revoke(&revoked.record.id, now_unix())
        .await
        .unwrap()
        .unwrap();
    let expired = insert_expired_key(&*store).await;
    let unknown = generate(KeyKind::User);
    let reader = create_key(&*store, "acme", "readonly").await;
    // Four creations and a revocation announced and applied: the revoked key is held as
    // revoked without a store lookup.
    eventually(PROPAGATION, "the announcements are applied", || async {
        kg.invalidations() >= 5
    })
    .await;
    let before = kg.scrape().await;

    // 3 allowed (1 miss, 2 hits).
    for _ in 0..3 {
        assert_eq!(
            http.get_with_key(&url, good.secret.expose()).await.status,
            200
        );
    }
    // Refusals that never touch the cache.
    assert_eq!(http.get(&url, &[]).await.status, 401);
    let auth = format!("Bearer {}", good.secret.expose());
    let two = http
        .get(&url, &[("authorization", &auth), ("authorization", &auth)])
        .await;
    assert_eq!(two.status, 400);
    assert_eq!(http.get_with_key(&url, "kgu_not-a-key").await.status, 401);
    // Refusals after one store lookup each: unknown (twice: the second is a negative hit),
    // expired; revoked is a cache hit (its announcement cached the verdict).
    for _ in 0..2 {
        let reply = http.get_with_key(&url, unknown.secret.expose()).await;
        assert_eq!(reply.error_code(), "invalid_key");
    }
    let reply = http.get_with_key(&url, expired.secret.expose()).await;
    assert_eq!(reply.error_code(), "key_expired");
    let reply = http.get_with_key(&url, revoked.secret.expose()).await;
    assert_eq!(reply.error_code(), "key_revoked");
    // The upstream is too slow: 504 (a cache hit).
    let slow = http
        .get_with_key(&kg.url("/slow?ms=2000"), good.secret.expose())
        .await;
    assert_eq!(slow.error_code(), "upstream_timeout");
    // A read-only key may not POST (one lookup); a path with an encoded slash matches no route
    // and never reaches the cache.
    let auth_reader = format!("Bearer {}", reader.secret.expose());
    let post = http
        .request("POST", &url, &[("authorization", &auth_reader)])
        .await;
    assert_eq!(post.error_code(), "insufficient_scope");
    let bad_path = http
        .get_with_key(&kg.url("/a%2fb"), good.secret.expose())
        .await;
    assert_eq!(bad_path.error_code(), "invalid_path");

    let after = kg.scrape().await;
    let want = [
        (decisions("allowed"), 3.0),
        (decisions("missing_credentials"), 1.0),
        (decisions("invalid_request"), 1.0),
        (decisions("invalid_key"), 3.0),
        (decisions("key_expired"), 1.0),
        (decisions("key_revoked"), 1.0),
        (decisions("upstream_timeout"), 1.0),
        (decisions("insufficient_scope"), 1.0),
        (decisions("invalid_path"), 1.0),
        (decisions("no_route"), 0.0),
        (decisions("store_unavailable"), 0.0),
        (decisions("upstream_unavailable"), 0.0),
        ("keygate_cache_misses_total".into(), 4.0),
        ("keygate_cache_hits_total".into(), 5.0),
        ("keygate_cache_negative_hits_total".into(), 1.0),
        ("keygate_store_lookups_total".into(), 4.0),
        ("keygate_store_errors_total".into(), 0.0),
        ("keygate_store_lookup_duration_seconds_count".into(), 4.0),
        (processing_count("2xx"), 3.0),
        (processing_count("4xx"), 8.0),
        (
            "keygate_processing_duration_seconds_count{route=\"-\",status_class=\"4xx\"}".into(),
            1.0,
        ),
        (processing_count("5xx"), 1.0),
        (upstream_count("2xx"), 3.0),
        (upstream_count("5xx"), 1.0),
        (upstream_errors("timeout"), 1.0),
        (upstream_errors("unavailable"), 0.0),
    ];
    for (series, n) in &want {
        assert_eq!(moved(&before, &after, series), *n, "{series}");
    }
    assert_eq!(after.get("keygate_subscription_up"), 1.0);
    assert!(after.get("keygate_cache_entries") >= 1.0);
    assert!(after.get("keygate_open_connections{listener=\"admin\"}") >= 1.0);
    assert!(after.get("keygate_open_connections{listener=\"proxy\"}") >= 1.0);

    // Redis stops: an uncached key is refused with 503 and the store error is counted.
    redis.stop();
    let other = generate(KeyKind::User);
    let reply = http.get_with_key(&url, other.secret.expose()).await;
    assert_eq!(reply.error_code(), "store_unavailable");
    let down = kg.scrape().await;
    assert_eq!(moved(&after, &down, &decisions("store_unavailable")), 1.0);
    assert_eq!(moved(&after, &down, "keygate_store_errors_total"), 1.0);
    assert_eq!(moved(&after, &down, "keygate_store_lookups_total"), 1.0);
    assert_eq!(moved(&after, &down, &processing_count("5xx")), 1.0);
    assert_eq!(moved(&after, &down, &upstream_count("5xx")), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_counted_and_makes_keygate_unready() {
    let redis = RedisServer::start();
    let ns = namespace("metrics-down");
    let store = redis_store(&redis, &ns);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let kg = Keygate::start(test_config(&redis.url(), &ns, &dead)).await;
    let http = Http::new();
    let key = create_key(&*store, "acme", "admin").await;
    let before = kg.scrape().await;
    let reply = http.get_with_key(&kg.url("/"), key.secret.expose()).await;
    assert_eq!(reply.error_code(), "upstream_unavailable");
    let after = kg.scrape().await;
    assert_eq!(
        moved(&before, &after, &decisions("upstream_unavailable")),
        1.0
    );
    assert_eq!(moved(&before, &after, &upstream_errors("unavailable")), 1.0);
    assert_eq!(moved(&before, &after, &processing_count("5xx")), 1.0);

    let ready = http.get(&kg.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 503);
    let reasons = ready.json()["reasons"].to_string();
    assert!(reasons.contains("upstream default"), "{reasons}");
    // Liveness does not depend on the upstream.
    assert_eq!(http.get(&kg.admin_url("/healthz"), &[]).await.status, 200);
}

/// `keygate serve` as a child process with its stderr (every log line) and its stdout each
/// going to a file.
struct ServeProcess {
    child: Child,
    log: std::path::PathBuf,
    out: std::path::PathBuf,
    proxy: String,
    admin: String,
}

impl ServeProcess {
    fn spawn(args: &[&str], dir: &std::path::Path) -> Self {
        let log = dir.join("keygate.log");
        let out = dir.join("keygate.stdout");
        let child = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .env("RUST_LOG", "trace")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let (proxy, admin) = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let field = |name: &str| {
                text.split(&format!("{name}="))
                    .nth(1)
                    .map(|rest| rest.split_whitespace().next().unwrap().to_owned())
            };
            if let (Some(p), Some(a)) = (field("listen"), field("admin")) {
                break (p, a);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "keygate did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        ServeProcess {
            child,
            log,
            out,
            proxy,
            admin,
        }
    }

    /// Stops keygate (SIGTERM, then waits up to 20 s); returns (stdout, stderr).
    fn stop(mut self) -> (String, String) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("keygate did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success());
        let read = |path: &std::path::Path| {
            let mut text = String::new();
            std::fs::File::open(path)
                .unwrap()
                .read_to_string(&mut text)
                .unwrap();
            text
        };
        (read(&self.out), read(&self.log))
    }
}

/// Every stream the test saw, each under a label: the one place a key may appear is the stream
/// that showed it once (the stdout of the command, or the API answer, that created it).
#[derive(Default)]
struct Streams {
    texts: Vec<(String, String)>,
    /// Each secret, with the label of the only stream allowed to hold it (none for the Redis
    /// password).
    secrets: Vec<(String, Option<String>)>,
}

impl Streams {
    fn add(&mut self, label: impl Into<String>, text: impl Into<String>) -> String {
        let label = label.into();
        self.texts.push((label.clone(), text.into()));
        label
    }

    /// Runs a management command at the most verbose log level, keeping its stdout and stderr;
    /// returns its JSON output.
    fn cli(&mut self, args: &[&str], redis_url: &str, ns: &str) -> serde_json::Value {
        let out = output_within(
            keygate_command(redis_url, ns, args).env("RUST_LOG", "trace"),
            Duration::from_secs(30),
        );
        let n = self.texts.len();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "keygate {args:?}: {stderr}");
        let label = self.add(
            format!("stdout of #{n} keygate {}", args[..2].join(" ")),
            stdout.clone(),
        );
        self.add(
            format!("stderr of #{n} keygate {}", args[..2].join(" ")),
            stderr,
        );
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        if let Some(key) = v.get("key").and_then(|k| k.as_str()) {
            self.secrets.push((key.to_owned(), Some(label)));
        }
        v
    }

    /// Calls the admin API, keeping the answer (head and body).
    async fn api(
        &mut self,
        http: &Http,
        admin: &str,
        key: &str,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let auth = format!("Bearer {key}");
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let reply = http
            .request_body(
                method,
                &format!("http://{admin}{path}"),
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await;
        assert!(
            reply.status.is_success(),
            "{method} {path}: {}",
            reply.text()
        );
        let n = self.texts.len();
        let label = self.add(
            format!("API answer #{n} to {method} {path}"),
            format!("{:?}\n{}", reply.headers, reply.text()),
        );
        let v = reply.json();
        if let Some(key) = v.get("key").and_then(|k| k.as_str()) {
            self.secrets.push((key.to_owned(), Some(label)));
        }
        v
    }

    /// No secret in any stream but the one that showed it; not even most of one.
    fn assert_no_secret_leaked(&self) {
        for (secret, shown_in) in &self.secrets {
            let head = &secret[..secret.len() * 2 / 3];
            let mut shown = 0;
            for (label, text) in &self.texts {
                if Some(label) == shown_in.as_ref() {
                    shown += text.matches(secret.as_str()).count();
                    continue;
                }
                assert!(
                    !text.contains(head),
                    "a secret (or most of one) appears in {label}"
                );
            }
            if shown_in.is_some() {
                assert_eq!(shown, 1, "a key is shown exactly once where it was created");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_or_metrics_even_at_trace_level() {
    const PASSWORD: &str = "redis-secret-pw-9f3k";
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let _: () = redis.cmd(&["CONFIG", "SET", "requirepass", PASSWORD]);
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port);
    let ns = namespace("secrets");
    let dir = temp_dir("secrets");
    let kg = ServeProcess::spawn(
        &[
            "--upstream",
            &upstream.url(),
            "--redis-url",
            &url,
            "--namespace",
            &ns,
        ],
        &dir,
    );
    let mut seen = Streams::default();
    seen.secrets.push((PASSWORD.into(), None));
    let http = Http::new();

    // Keys made by the CLI: user keys, and a service account that is rotated.
    let user_key = [
        "keys", "create", "--tenant", "acme", "--role", "admin", "--name", "k",
    ];
    let used = seen.cli(&user_key, &url, &ns);
    let revoked = seen.cli(&user_key, &url, &ns);
    seen.cli(&user_key, &url, &ns);
    let account = seen.cli(
        &[
            "service-accounts",
            "create",
            "--tenant",
            "acme",
            "--name",
            "ci",
            "--role",
            "member",
        ],
        &url,
        &ns,
    );
    let account_id = account["id"].as_str().unwrap();
    let rotated = seen.cli(&["service-accounts", "rotate", account_id], &url, &ns);

    // Keys made through the admin API, by an operator admin key the CLI made.
    let operator = seen.cli(
        &[
            "keys", "create", "--tenant", "keygate", "--role", "admin", "--name", "op",
        ],
        &url,
        &ns,
    );
    let op = operator["key"].as_str().unwrap().to_owned();
    let admin = kg.admin.clone();
    let api_key = seen
        .api(
            &http,
            &admin,
            &op,
            "POST",
            "/v1/keys",
            json!({"tenant": "acme", "role": "member", "name": "api"}),
        )
        .await;
    let api_account = seen
        .api(
            &http,
            &admin,
            &op,
            "POST",
            "/v1/service-accounts",
            json!({"tenant": "acme", "name": "worker", "role": "member"}),
        )
        .await;
    let api_account_id = api_account["id"].as_str().unwrap().to_owned();
    let api_rotated = seen
        .api(
            &http,
            &admin,
            &op,
            "POST",
            &format!("/v1/service-accounts/{api_account_id}/rotate"),
            json!({}),
        )
        .await;
    // Reads of every kind, whose answers hold no key.
    for path in [
        "/v1/keys".to_owned(),
        format!("/v1/keys/{}", api_key["id"].as_str().unwrap()),
        "/v1/service-accounts".into(),
        format!("/v1/service-accounts/{api_account_id}"),
        "/v1/audit".into(),
    ] {
        seen.api(&http, &admin, &op, "GET", &path, json!(null))
            .await;
    }

    let key = |v: &serde_json::Value| v["key"].as_str().unwrap().to_owned();
    let revoked_id = revoked["id"].as_str().unwrap().to_owned();
    let (used, revoked, rotated) = (key(&used), key(&revoked), key(&rotated));
    let proxy = format!("http://{}", kg.proxy);
    for client in [Http::new(), Http::http2()] {
        for k in [
            &used,
            &revoked,
            &rotated,
            &key(&api_key),
            &key(&api_rotated),
        ] {
            let auth = format!("Bearer {k}");
            let reply = client
                .get(
                    &format!("{proxy}/things"),
                    &[
                        ("authorization", &auth),
                        ("x-keygate-tenant", "spoofed"),
                        ("connection", "x-keygate-role"),
                    ],
                )
                .await;
            assert_eq!(reply.status, 200);
        }
        // A damaged copy of a key, and a key in the wrong scheme.
        let mut damaged = used.clone();
        damaged.pop();
        let reply = client.get_with_key(&format!("{proxy}/"), &damaged).await;
        assert_eq!(reply.status, 401);
        let basic = format!("Basic {used}");
        let reply = client
            .get(&format!("{proxy}/"), &[("authorization", &basic)])
            .await;
        assert_eq!(reply.status, 401);
    }
    // Revocations by the CLI and through the API.
    seen.cli(&["keys", "revoke", &revoked_id], &url, &ns);
    let api_key_id = api_key["id"].as_str().unwrap().to_owned();
    seen.api(
        &http,
        &admin,
        &op,
        "POST",
        &format!("/v1/keys/{api_key_id}/revoke"),
        json!({}),
    )
    .await;
    for k in [&revoked, &key(&api_key)] {
        let (http, url, k) = (http.clone(), format!("{proxy}/"), k.clone());
        eventually(Duration::from_secs(5), "the revoked key is refused", || {
            let (http, url, k) = (http.clone(), url.clone(), k.clone());
            async move { http.get_with_key(&url, &k).await.status == 401 }
        })
        .await;
    }
    // The service accounts' first keys stopped working at their rotation.
    for first in [key(&account), key(&api_account)] {
        let reply = http.get_with_key(&format!("{proxy}/"), &first).await;
        assert_eq!(reply.error_code(), "key_revoked");
    }

    let metrics = http
        .get(&format!("http://{}/metrics", kg.admin), &[])
        .await
        .text();
    let upstream_saw: String = upstream
        .requests()
        .iter()
        .map(|r| format!("{} {} {:?}\n", r.method, r.path, r.headers))
        .collect();
    let (serve_out, logs) = kg.stop();
    // The capture is real: trace-level lines, the effective configuration and access lines.
    assert!(logs.contains("TRACE"), "no trace output captured");
    assert!(logs.contains("effective configuration"), "{logs}");
    assert!(logs.contains("keygate::access"));
    assert!(metrics.contains("keygate_auth_decisions_total"));
    assert!(upstream_saw.contains("/things"));
    seen.add("keygate's stderr (its log)", logs);
    seen.add("keygate's stdout", serve_out);
    seen.add("/metrics", metrics);
    seen.add("the headers the upstream received", upstream_saw);
    assert!(seen.secrets.len() >= 9, "every key is watched");
    seen.assert_no_secret_leaked();
}

/// Every `keygate_…` metric name used in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("keygate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Series that exist only when a listener serves TLS; tests/tls.rs checks the alert rules'
/// use of them against a keygate with TLS.
const EXPORTED_WITH_TLS_ONLY: &[&str] = &["keygate_tls_certificate_expiry_seconds"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("dash");
    let kg = Keygate::start(test_config(&redis.url(), &ns, &upstream.url())).await;
    let exported: HashSet<String> = kg.scrape().await.names();

    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana/keygate-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    let rules =
        std::fs::read_to_string(format!("{root}/deploy/prometheus/keygate-alerts.yml")).unwrap();
    let mut alerts = 0;
    for line in rules.lines() {
        if let Some(expr) = line.trim().strip_prefix("expr:") {
            exprs.push(expr.trim().to_owned());
            alerts += 1;
        }
    }
    assert!(alerts >= 4, "the alert rules have {alerts} expressions");
    assert!(exprs.len() > alerts + 8);
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no keygate metric in {expr}");
        for name in names {
            if EXPORTED_WITH_TLS_ONLY.contains(&name.as_str()) {
                continue;
            }
            assert!(
                exported.contains(&name),
                "{name} (in {expr}) is not exported"
            );
        }
    }
}
