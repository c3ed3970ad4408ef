//! keygate against a real `redis-server` speaking TLS (`--tls-port`, certificates made at test
//! time): lookups and revocation over the TLS store and subscriber, with an ACL user and a
//! client certificate; a CA that did not sign Redis's certificate fails closed, naming the
//! address and never the password.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tls_redis::{ClientCerts, TestCa, TlsRedis};
use common::*;
use keygate::config::Config;
use keygate::store::redis::{RedisSettings, RedisStore, RedisTls};
use keygate::store::Store;

const PASSWORD: &str = "s3cret-acl-pw";

/// An ACL user for keygate, with the default user left open for the test's own connections.
fn acl_user() -> [&'static str; 7] {
    [
        "--user",
        "keygate",
        "on",
        ">s3cret-acl-pw",
        "~*",
        "&*",
        "+@all",
    ]
}

fn tls_config(
    url: &str,
    ns: &str,
    upstream: &str,
    ca: &TestCa,
    client: Option<&common::tls_redis::Leaf>,
) -> Config {
    let mut c = test_config(url, ns, upstream);
    c.store.tls_ca = Some(ca.cert.to_str().unwrap().into());
    if let Some(leaf) = client {
        c.store.tls_cert = Some(leaf.cert.to_str().unwrap().into());
        c.store.tls_key = Some(leaf.key.to_str().unwrap().into());
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_and_revocation_reach_keygate_over_tls_with_an_acl_user_and_a_client_certificate() {
    let ca = TestCa::new("redis");
    let tls = TlsRedis::start(&ca, ClientCerts::Required, &acl_user());
    let client = ca.leaf("keygate-client", &["keygate"]);
    let upstream = Upstream::start().await;
    let ns = namespace("tls");
    let url = tls.url(&format!("keygate:{PASSWORD}@"));

    // The test's own store speaks TLS too, with the same settings as keygate.
    let store = RedisStore::new(&RedisSettings {
        url: url.clone(),
        tls: RedisTls {
            ca: Some(ca.cert.clone()),
            client: Some((client.cert.clone(), client.key.clone())),
        },
        namespace: ns.clone(),
        timeout: Duration::from_secs(2),
        health_check_interval: Duration::from_secs(1),
    })
    .unwrap();
    let key = create_key(&store, "acme", "admin").await;

    let kg = Keygate::start(tls_config(&url, &ns, &upstream.url(), &ca, Some(&client))).await;
    kg.wait_ready().await;
    let http = Http::new();
    // Looked up over TLS, then cached.
    assert_eq!(
        status_of(&http, &kg, key.secret.expose()).await,
        (200, String::new())
    );
    assert_eq!(
        status_of(&http, &kg, key.secret.expose()).await,
        (200, String::new())
    );

    // Revoked through the plain port: only the TLS subscriber can tell keygate, the verdict
    // being cached for a minute.
    let before = kg.invalidations();
    let revoked_at = Instant::now();
    let revoker = redis_store(&tls.redis, &ns);
    revoker
        .revoke(&key.record.id, keygate::store::now_unix())
        .await
        .unwrap();
    wait_for_status(
        &http,
        &kg,
        key.secret.expose(),
        401,
        "the revocation over the TLS subscriber",
    )
    .await;
    println!(
        "revocation applied over the TLS subscriber within {:?}",
        revoked_at.elapsed()
    );
    assert!(kg.invalidations() > before, "no invalidation arrived");
    assert_eq!(
        status_of(&http, &kg, key.secret.expose()).await,
        (401, "key_revoked".into())
    );
    // keygate's connections are authenticated as the ACL user.
    let clients: String = tls.redis.cmd(&["CLIENT", "LIST"]);
    assert!(
        clients
            .lines()
            .filter(|l| l.contains("user=keygate"))
            .count()
            >= 2,
        "the store and the subscriber are not both connected as the ACL user:\n{clients}"
    );
    kg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_certificate_from_another_ca_fails_closed_naming_the_address() {
    let ca = TestCa::new("redis");
    let other = TestCa::new("other");
    let tls = TlsRedis::start(&ca, ClientCerts::None, &acl_user());
    let upstream = Upstream::start().await;
    let ns = namespace("wrong-ca");
    let url = tls.url(&format!("keygate:{PASSWORD}@"));
    let kg = Keygate::start(tls_config(&url, &ns, &upstream.url(), &other, None)).await;

    let addr = format!("127.0.0.1:{}", tls.tls_port);
    let http = Http::new();
    let ready_url = kg.admin_url("/readyz");
    let body = Arc::new(Mutex::new(String::new()));
    eventually(
        Duration::from_secs(10),
        "/readyz names the TLS failure",
        || {
            let (http, url, addr, body) =
                (http.clone(), ready_url.clone(), addr.clone(), body.clone());
            async move {
                let r = http.get(&url, &[]).await;
                let text = r.text();
                // The store's connection retries with a backoff, so a check may also find it
                // waiting ("no answer within"): the failure itself is named on the next.
                let named = r.status == 503
                    && text.contains("store: ")
                    && text.contains(&addr)
                    && text.to_lowercase().contains("certificate");
                *body.lock().unwrap() = text;
                named
            }
        },
    )
    .await;
    let body = body.lock().unwrap().clone();
    println!("/readyz: {body}");
    assert!(!body.contains(PASSWORD), "the password was shown: {body}");
    // Fail closed: a key keygate cannot look up is refused with 503, never let through.
    let key = keygate::key::generate(keygate::key::KeyKind::User);
    let (status, code) = status_of(&http, &kg, key.secret.expose()).await;
    assert_eq!((status, code.as_str()), (503, "store_unavailable"));
    assert_eq!(kg.app.metrics.subscription_up.get(), 0);
    kg.shutdown().await;
}

#[test]
fn the_binary_logs_the_tls_failure_with_the_address_and_never_the_password() {
    let ca = TestCa::new("redis");
    let other = TestCa::new("other");
    let tls = TlsRedis::start(&ca, ClientCerts::None, &acl_user());
    let url = tls.url(&format!("keygate:{PASSWORD}@"));
    let addr = format!("127.0.0.1:{}", tls.tls_port);
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--upstream", "http://127.0.0.1:9", "--redis-url", &url])
        .env("KEYGATE__STORE__TLS_CA", &other.cert)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    let mut found = None;
    while found.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.contains("cannot subscribe") && line.contains(&addr) {
                    found = Some(line.clone());
                }
                lines.push(line);
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let all = lines.join("\n");
    let line = found.unwrap_or_else(|| panic!("no subscriber error naming {addr}:\n{all}"));
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    assert!(!all.contains(PASSWORD), "the password was logged:\n{all}");
}

#[test]
fn key_management_commands_speak_tls_to_redis() {
    let ca = TestCa::new("redis");
    let tls = TlsRedis::start(&ca, ClientCerts::Required, &[]);
    let client = ca.leaf("cli-client", &["keygate"]);
    let ns = namespace("tls-cli");
    let run = |args: &[&str]| {
        let mut cmd = keygate_command(&tls.url(""), &ns, args);
        cmd.env("KEYGATE__STORE__TLS_CA", &ca.cert)
            .env("KEYGATE__STORE__TLS_CERT", &client.cert)
            .env("KEYGATE__STORE__TLS_KEY", &client.key);
        output_within(&mut cmd, Duration::from_secs(30))
    };
    let out = run(&[
        "keys", "create", "--tenant", "acme", "--role", "admin", "--name", "n",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = created["id"].as_str().unwrap();
    let out = run(&["keys", "show", id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What the CLI wrote over TLS is in Redis.
    let n: u64 = tls.redis.cmd(&["EXISTS", &format!("{ns}:id:{id}")]);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_acl_password_over_tls_fails_closed_and_is_never_shown() {
    let ca = TestCa::new("redis");
    let tls = TlsRedis::start(&ca, ClientCerts::None, &acl_user());
    let upstream = Upstream::start().await;
    let wrong = "not-the-acl-password";
    let url = tls.url(&format!("keygate:{wrong}@"));
    let kg = Keygate::start(tls_config(
        &url,
        &namespace("wrongpass"),
        &upstream.url(),
        &ca,
        None,
    ))
    .await;

    let addr = format!("127.0.0.1:{}", tls.tls_port);
    let http = Http::new();
    let ready_url = kg.admin_url("/readyz");
    let body = Arc::new(Mutex::new(String::new()));
    eventually(
        Duration::from_secs(10),
        "/readyz names the refused login",
        || {
            let (http, url, addr, body) =
                (http.clone(), ready_url.clone(), addr.clone(), body.clone());
            async move {
                let r = http.get(&url, &[]).await;
                let text = r.text();
                let named = r.status == 503
                    && text.contains(&addr)
                    && text.contains("authentication failed");
                *body.lock().unwrap() = text;
                named
            }
        },
    )
    .await;
    let body = body.lock().unwrap().clone();
    println!("/readyz: {body}");
    assert!(!body.contains(wrong), "the password was shown: {body}");
    let key = keygate::key::generate(keygate::key::KeyKind::User);
    let (status, code) = status_of(&http, &kg, key.secret.expose()).await;
    assert_eq!((status, code.as_str()), (503, "store_unavailable"));
    kg.shutdown().await;
}
