//! Service accounts end to end: the real binary manages them in a real Redis while keygate
//! serves, and every change reaches the running proxy at once.

mod common;

use std::time::Duration;

use common::*;
use keygate::config::Config;
use keygate::manage::{self, RotateExpiry};
use keygate::store::now_unix;

fn config(redis_url: &str, ns: &str, upstream: &str) -> Config {
    let mut c = test_config(redis_url, ns, upstream);
    // Long cache lives, so that only invalidations can explain a changed verdict.
    c.cache.ttl = "1h".into();
    c.cache.negative_ttl = "1h".into();
    c
}

struct Env {
    redis: RedisServer,
    _upstream: Upstream,
    ns: String,
    kg: Keygate,
    http: Http,
}

impl Env {
    async fn start(tag: &str) -> Self {
        let redis = RedisServer::start();
        let upstream = Upstream::start().await;
        let ns = namespace(tag);
        let kg = Keygate::start(config(&redis.url(), &ns, &upstream.url())).await;
        kg.wait_ready().await;
        Env {
            redis,
            _upstream: upstream,
            ns,
            kg,
            http: Http::new(),
        }
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        keygate_json(&self.redis.url(), &self.ns, args)
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = keygate_cli(&self.redis.url(), &self.ns, args);
        assert!(!out.status.success(), "keygate {args:?} should have failed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn create(&self, tenant: &str, name: &str, role: &str) -> serde_json::Value {
        self.json(&[
            "service-accounts",
            "create",
            "--tenant",
            tenant,
            "--name",
            name,
            "--role",
            role,
        ])
    }
}

fn s(v: &serde_json::Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} missing in {v}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_key_works_and_names_are_unique_per_tenant() {
    let env = Env::start("sa-create").await;
    let created = env.create("acme", "CI Deployer", "member");
    let key = s(&created, "key");
    assert!(key.starts_with("kgs_"), "service account keys use kgs_");
    assert_eq!(created["key_shown_once"], true);
    assert_eq!(s(&created, "key_id"), s(&created, "key_id"));

    assert_eq!(status_of(&env.http, &env.kg, &key).await.0, 200);
    let seen = env._upstream.requests();
    let h = &seen.last().unwrap().headers;
    assert_eq!(h["x-keygate-subject-kind"], "service_account");
    assert_eq!(h["x-keygate-subject"], s(&created, "id").as_str());
    assert_eq!(h["x-keygate-key-id"], s(&created, "key_id").as_str());
    assert_eq!(h["x-keygate-role"], "member");

    let err = env.fails(&[
        "service-accounts",
        "create",
        "--tenant",
        "acme",
        "--name",
        "ci deployer",
        "--role",
        "readonly",
    ]);
    assert!(err.contains("already has a service account"), "{err}");
    // The same name in another tenant is another account.
    env.create("globex", "CI Deployer", "member");

    for admin in ["admin", "ADMIN"] {
        let err = env.fails(&[
            "service-accounts",
            "create",
            "--tenant",
            "acme",
            "--name",
            "root",
            "--role",
            admin,
        ]);
        assert!(err.contains("organization admin role"), "{err}");
    }
    let listed = env.json(&["service-accounts", "list", "--tenant", "acme"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    // Refusals are in the audit trail too, with the reason as the outcome.
    let audit = env.json(&["audit"]);
    let outcomes: Vec<(&str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("service_accounts.create", "success"),
            ("service_accounts.create", "conflict"),
            ("service_accounts.create", "success"),
            ("service_accounts.create", "invalid_request"),
            ("service_accounts.create", "invalid_request"),
        ]
    );
    assert!(audit[0]["time"].is_string() && audit[0]["actor"] == "cli");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_rejects_the_old_key_at_once_on_a_running_proxy() {
    let env = Env::start("sa-rotate").await;
    let created = env.create("acme", "worker", "member");
    let (id, old) = (s(&created, "id"), s(&created, "key"));
    assert_eq!(status_of(&env.http, &env.kg, &old).await.0, 200);

    let rotated = env.json(&["service-accounts", "rotate", &id, "--expires-in", "30d"]);
    let new = s(&rotated, "key");
    assert_ne!(new, old);
    assert_ne!(s(&rotated, "key_id"), s(&created, "key_id"));
    assert!(rotated["expires_at"].is_string(), "{rotated}");

    wait_for_status(&env.http, &env.kg, &old, 401, "the old key is rejected").await;
    assert_eq!(
        status_of(&env.http, &env.kg, &old).await,
        (401, "key_revoked".into())
    );
    assert_eq!(status_of(&env.http, &env.kg, &new).await.0, 200);

    let shown = env.json(&["service-accounts", "show", &id]);
    assert_eq!(s(&shown, "key_id"), s(&rotated, "key_id"));
    assert_eq!(shown["keys"].as_array().unwrap().len(), 2, "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_with_grace_keeps_both_keys_until_the_grace_ends() {
    let env = Env::start("sa-grace").await;
    let store = redis_store(&env.redis, &env.ns);
    let created = env.create("acme", "agent", "member");
    let old = s(&created, "key");
    assert_eq!(status_of(&env.http, &env.kg, &old).await.0, 200);

    let rotated = manage::rotate_service_account(
        &*store,
        &s(&created, "id"),
        RotateExpiry::SameLifetime,
        Some(Duration::from_secs(2)),
        now_unix(),
        "test",
    )
    .await
    .unwrap();
    let new = rotated.key.secret.expose().to_owned();
    // Within the grace period both keys work.
    assert_eq!(status_of(&env.http, &env.kg, &old).await.0, 200);
    assert_eq!(status_of(&env.http, &env.kg, &new).await.0, 200);

    let (http, url) = (env.http.clone(), env.kg.url("/"));
    eventually(Duration::from_secs(6), "the grace period ends", || {
        let (http, url, old) = (http.clone(), url.clone(), old.clone());
        async move { http.get_with_key(&url, &old).await.status == 401 }
    })
    .await;
    assert_eq!(
        status_of(&env.http, &env.kg, &old).await,
        (401, "key_expired".into())
    );
    assert_eq!(status_of(&env.http, &env.kg, &new).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_rejects_every_key_of_the_account() {
    let env = Env::start("sa-remove").await;
    let created = env.create("acme", "batch", "member");
    let id = s(&created, "id");
    let first = s(&created, "key");
    // A rotation with a long grace leaves two working keys.
    let rotated = env.json(&["service-accounts", "rotate", &id, "--grace", "1h"]);
    let second = s(&rotated, "key");
    for k in [&first, &second] {
        assert_eq!(status_of(&env.http, &env.kg, k).await.0, 200);
    }

    let removed = env.json(&["service-accounts", "remove", &id]);
    assert_eq!(s(&removed, "id"), id);
    for k in [&first, &second] {
        wait_for_status(
            &env.http,
            &env.kg,
            k,
            401,
            "a removed account's key is rejected",
        )
        .await;
        assert_eq!(
            status_of(&env.http, &env.kg, k).await,
            (401, "key_revoked".into())
        );
    }
    let err = env.fails(&["service-accounts", "show", &id]);
    assert!(err.contains("no service account"), "{err}");
    // The name is free again.
    env.create("acme", "batch", "member");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_audit_and_redis_never_hold_a_key() {
    let env = Env::start("sa-secret").await;
    let mut secrets = Vec::new();
    let a = env.create("acme", "one", "member");
    secrets.push(s(&a, "key"));
    let r = env.json(&["service-accounts", "rotate", &s(&a, "id"), "--grace", "1m"]);
    secrets.push(s(&r, "key"));
    let b = env.create("acme", "two", "readonly");
    secrets.push(s(&b, "key"));
    env.json(&["service-accounts", "remove", &s(&b, "id")]);
    let k = env.json(&[
        "keys", "create", "--tenant", "acme", "--role", "admin", "--name", "x",
    ]);
    secrets.push(s(&k, "key"));
    env.json(&["keys", "revoke", &s(&k, "id")]);

    let mut seen = String::new();
    for args in [
        &["service-accounts", "list"][..],
        &["service-accounts", "show", &s(&a, "id")],
        &["keys", "list"],
        &["keys", "show", &s(&k, "id")],
        &["audit"],
    ] {
        seen.push_str(&env.json(args).to_string());
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(args)
            .args(["--redis-url", &env.redis.url(), "--namespace", &env.ns])
            .output()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    let audit = env.json(&["audit"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "service_accounts.create",
            "service_accounts.rotate",
            "service_accounts.create",
            "service_accounts.remove",
            "keys.create",
            "keys.revoke"
        ]
    );
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["actor"] == "cli" && e["outcome"] == "success" && e["tenant"] == "acme"));
    seen.push_str(&dump_redis(&env.redis, &env.ns));
    assert!(seen.contains("service_accounts.rotate"), "the dump is read");
    for secret in &secrets {
        assert!(!seen.contains(secret.as_str()), "a key leaked");
        assert!(!seen.contains(&secret[4..]), "a key's body leaked");
    }
}
