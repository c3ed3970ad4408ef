//! Observability: every counter moves by exactly what happened, no secret reaches a log line
//! or a metric even at the most verbose level, and the shipped dashboard and alert rules use
//! only metrics keygate exports.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use keygate::key::{generate, KeyKind};
use keygate::store::{now_unix, Store};

/// The difference between two scrapes, series by series.
fn moved(before: &Scrape, after: &Scrape, series: &str) -> f64 {
    after.get(series) - before.get(series)
}

fn decisions(outcome: &str) -> String {
    format!("keygate_auth_decisions_total{{outcome=\"{outcome}\"}}")
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

/// `keygate serve` as a child process with every log line going to a file.
struct ServeProcess {
    child: Child,
    log: std::path::PathBuf,
    proxy: String,
    admin: String,
}

impl ServeProcess {
    fn spawn(args: &[&str], dir: &std::path::Path) -> Self {
        let log = dir.join("keygate.log");
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
            .stdout(Stdio::null())
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
            proxy,
            admin,
        }
    }

    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(self.child.wait().unwrap().success());
        let mut text = String::new();
        std::fs::File::open(&self.log)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text
    }
}

/// Runs a key-management command at the most verbose log level; returns (stdout, stderr).
fn cli(args: &[&str], redis_url: &str, ns: &str) -> (String, String) {
    let out = keygate_command(redis_url, ns, args)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "keygate {args:?}: {stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
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

    let mut secrets: Vec<String> = vec![PASSWORD.into()];
    let mut cli_logs = String::new();
    // Runs a management command; returns its JSON output's `key` and `id`.
    let mut manage = |args: &[&str]| {
        let (out, err) = cli(args, &url, &ns);
        cli_logs.push_str(&err);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        (
            v["key"].as_str().unwrap().to_owned(),
            v["id"].as_str().unwrap().to_owned(),
        )
    };
    let user_key = [
        "keys", "create", "--tenant", "acme", "--role", "admin", "--name", "k",
    ];
    let (used, _) = manage(&user_key);
    let (revoked, revoked_id) = manage(&user_key);
    let (never_used, _) = manage(&user_key);
    // A service account, rotated: both its first and its second key are secrets.
    let (first, account) = manage(&[
        "service-accounts",
        "create",
        "--tenant",
        "acme",
        "--name",
        "ci",
        "--role",
        "member",
    ]);
    let (rotated, _) = manage(&["service-accounts", "rotate", &account]);
    secrets.extend([
        used.clone(),
        revoked.clone(),
        never_used,
        first.clone(),
        rotated.clone(),
    ]);

    let proxy = format!("http://{}", kg.proxy);
    for client in [Http::new(), Http::http2()] {
        for key in [&used, &revoked, &rotated] {
            let auth = format!("Bearer {key}");
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
        assert_eq!(
            client
                .get_with_key(&format!("{proxy}/"), &damaged)
                .await
                .status,
            401
        );
        let basic = format!("Basic {used}");
        let reply = client
            .get(&format!("{proxy}/"), &[("authorization", &basic)])
            .await;
        assert_eq!(reply.status, 401);
    }
    let (_, err) = cli(&["keys", "revoke", &revoked_id], &url, &ns);
    cli_logs.push_str(&err);
    let http = Http::new();
    let rejected = || async {
        http.get_with_key(&format!("{proxy}/"), &revoked)
            .await
            .status
            == 401
    };
    eventually(
        Duration::from_secs(5),
        "the revoked key is refused",
        rejected,
    )
    .await;
    // The service account's first key stopped working at its rotation.
    let reply = http.get_with_key(&format!("{proxy}/"), &first).await;
    assert_eq!(reply.error_code(), "key_revoked");

    let metrics = http
        .get(&format!("http://{}/metrics", kg.admin), &[])
        .await
        .text();
    let logs = kg.stop();
    // The capture is real: trace-level lines, the effective configuration and access lines.
    assert!(logs.contains("TRACE"), "no trace output captured");
    assert!(logs.contains("effective configuration"), "{logs}");
    assert!(logs.contains("keygate::access"));
    assert!(metrics.contains("keygate_auth_decisions_total"));
    for secret in &secrets {
        for (what, text) in [
            ("keygate's log", &logs),
            ("the CLI's log", &cli_logs),
            ("/metrics", &metrics),
        ] {
            assert!(
                !text.contains(secret.as_str()),
                "a secret appears in {what}"
            );
        }
        // Not even most of one (a log line that cut the key short).
        let head = &secret[..secret.len() * 2 / 3];
        assert!(
            !logs.contains(head),
            "part of a secret appears in keygate's log"
        );
    }
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
            assert!(
                exported.contains(&name),
                "{name} (in {expr}) is not exported"
            );
        }
    }
}
