//! The embedded file store end to end: keygate serving from a keys file that is edited by hand
//! and by the CLI while it runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use keygate::key::{generate, GeneratedKey, KeyKind};

const WITHIN: Duration = Duration::from_secs(5);

fn keygate_cli(keys_file: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(args)
        .arg("--keys-file")
        .arg(keys_file)
        .env_remove("KEYGATE__STORE__REDIS_URL")
        .output()
        .unwrap()
}

/// `keygate keys create --output json` against the file; returns (id, key).
fn cli_create(keys_file: &Path, tenant: &str) -> (String, String) {
    let out = keygate_cli(
        keys_file,
        &[
            "keys", "create", "--tenant", tenant, "--role", "admin", "--name", "cli key",
            "--output", "json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
    )
}

/// A `[[keys]]` block as an operator would write it.
fn block(id: &str, key: &GeneratedKey, extra: &str) -> String {
    format!(
        "\n[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\nname = \"hand written\"\ntenant = \"acme\"\nrole = \"admin\"\nsubject = \"carol\"\nkind = \"user\"\ncreated_at = \"2026-01-01T00:00:00Z\"\n{extra}",
        key.digest.to_hex()
    )
}

struct FileRig {
    _upstream: Upstream,
    keygate: Keygate,
    keys_file: PathBuf,
    http: Http,
}

async fn file_rig() -> FileRig {
    let dir = temp_dir("keys");
    let keys_file = dir.join("keys.toml");
    std::fs::write(&keys_file, "# keys\n").unwrap();
    let upstream = Upstream::start().await;
    let config = file_test_config(&keys_file, &upstream.url());
    let keygate = Keygate::start(config).await;
    FileRig {
        _upstream: upstream,
        keygate,
        keys_file,
        http: Http::new(),
    }
}

impl FileRig {
    async fn status_becomes(&self, key: &str, want: u16, what: &str) {
        let (http, url, key) = (self.http.clone(), self.keygate.url("/"), key.to_owned());
        eventually(WITHIN, what, || {
            let (http, url, key) = (http.clone(), url.clone(), key.clone());
            async move { http.get_with_key(&url, &key).await.status == want }
        })
        .await;
    }

    fn edit(&self, f: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.keys_file).unwrap();
        std::fs::write(&self.keys_file, f(text)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_created_by_the_cli_are_served_without_restart() {
    let r = file_rig().await;
    let (id, key) = cli_create(&r.keys_file, "acme");
    r.status_becomes(&key, 200, "a CLI-created key is accepted")
        .await;

    let file = std::fs::read_to_string(&r.keys_file).unwrap();
    assert!(file.contains(&id));
    assert!(!file.contains(&key), "the keys file holds a plaintext key");
    assert!(
        file.starts_with("# keys\n"),
        "the operator's comment was lost"
    );

    let out = keygate_cli(&r.keys_file, &["keys", "revoke", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    r.status_becomes(&key, 401, "a CLI-revoked key is refused")
        .await;
    let reply = r.http.get_with_key(&r.keygate.url("/"), &key).await;
    assert_eq!(reply.error_code(), "key_revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_added_revoked_and_removed_by_editing_the_file_take_effect() {
    let r = file_rig().await;
    let key = generate(KeyKind::User);
    let secret = key.secret.expose().to_owned();

    // Unknown first (and so negatively cached), then added by hand.
    let reply = r.http.get_with_key(&r.keygate.url("/"), &secret).await;
    assert_eq!(reply.error_code(), "invalid_key");
    r.edit(|t| t + &block("key_hand", &key, ""));
    r.status_becomes(&secret, 200, "a hand-added key is accepted")
        .await;

    // Revoked by hand.
    r.edit(|t| {
        t.replace(
            "kind = \"user\"\n",
            "kind = \"user\"\nrevoked_at = \"2026-02-01T00:00:00Z\"\n",
        )
    });
    r.status_becomes(&secret, 401, "a hand-revoked key is refused")
        .await;
    let reply = r.http.get_with_key(&r.keygate.url("/"), &secret).await;
    assert_eq!(reply.error_code(), "key_revoked");

    // Un-revoked, then removed.
    r.edit(|t| t.replace("revoked_at = \"2026-02-01T00:00:00Z\"\n", ""));
    r.status_becomes(&secret, 200, "an un-revoked key is accepted")
        .await;
    r.edit(|_| "# no keys left\n".into());
    r.status_becomes(&secret, 401, "a removed key is refused")
        .await;
    let reply = r.http.get_with_key(&r.keygate.url("/"), &secret).await;
    assert_eq!(reply.error_code(), "invalid_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_file_keeps_the_last_good_keys_and_reports_the_line() {
    let r = file_rig().await;
    let good = generate(KeyKind::User);
    let secret = good.secret.expose().to_owned();
    r.edit(|t| t + &block("key_good", &good, ""));
    r.status_becomes(&secret, 200, "the key is accepted").await;

    // Line 15 (the second block's sha256) is broken.
    let other = generate(KeyKind::User);
    let broken = block("key_other", &other, "").replace(&other.digest.to_hex(), "not-hex");
    r.edit(|t| t + &broken);
    let (http, admin) = (r.http.clone(), r.keygate.admin_url("/readyz"));
    eventually(WITHIN, "/readyz reports the reload error", || {
        let (http, admin) = (http.clone(), admin.clone());
        async move { http.get(&admin, &[]).await.text().contains("line 15") }
    })
    .await;
    let ready = r.http.get(&r.keygate.admin_url("/readyz"), &[]).await;
    assert_eq!(
        ready.status, 200,
        "a bad edit must not take the instance out of service"
    );
    assert!(ready.text().contains("sha256"), "{}", ready.text());
    let reply = r.http.get_with_key(&r.keygate.url("/"), &secret).await;
    assert_eq!(reply.status, 200, "the last good keys stopped serving");

    // Fixing the file clears the warning.
    r.edit(|t| t.replace("not-hex", &other.digest.to_hex()));
    r.status_becomes(other.secret.expose(), 200, "the fixed file is loaded")
        .await;
    let ready = r.http.get(&r.keygate.admin_url("/readyz"), &[]).await;
    assert!(!ready.text().contains("line 15"), "{}", ready.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cli_writers_keep_every_key() {
    let r = file_rig().await;
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let file = r.keys_file.clone();
            std::thread::spawn(move || cli_create(&file, &format!("tenant{i}")))
        })
        .collect();
    let created: Vec<(String, String)> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let file = std::fs::read_to_string(&r.keys_file).unwrap();
    for (id, key) in &created {
        assert!(file.contains(id.as_str()), "key {id} was lost");
        r.status_becomes(key, 200, "every concurrently created key works")
            .await;
    }
    let out = keygate_cli(&r.keys_file, &["keys", "list", "--output", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 8);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("kgu_"));
}

#[tokio::test]
async fn serve_refuses_a_missing_keys_file() {
    let missing = temp_dir("missing").join("nope.toml");
    let config = file_test_config(&missing, "http://127.0.0.1:1");
    let settings = config.serve_settings().unwrap();
    let err = keygate::server::Server::bind(settings).await.err().unwrap();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

fn cli_json(keys_file: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = keygate_cli(keys_file, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_accounts_rotate_and_remove_in_the_keys_file() {
    let rig = file_rig().await;
    let f = &rig.keys_file;
    let created = cli_json(
        f,
        &[
            "service-accounts",
            "create",
            "--tenant",
            "acme",
            "--name",
            "Agent",
            "--role",
            "member",
        ],
    );
    let id = created["id"].as_str().unwrap().to_owned();
    let first = created["key"].as_str().unwrap().to_owned();
    rig.status_becomes(&first, 200, "the account's key works")
        .await;

    let dup = keygate_cli(
        f,
        &[
            "service-accounts",
            "create",
            "--tenant",
            "acme",
            "--name",
            "AGENT",
            "--role",
            "member",
        ],
    );
    assert!(!dup.status.success(), "a duplicate name was accepted");

    let rotated = cli_json(f, &["service-accounts", "rotate", &id]);
    let second = rotated["key"].as_str().unwrap().to_owned();
    rig.status_becomes(&first, 401, "the old key is rejected")
        .await;
    rig.status_becomes(&second, 200, "the new key works").await;

    cli_json(f, &["service-accounts", "remove", &id]);
    rig.status_becomes(&second, 401, "a removed account's key is rejected")
        .await;

    let text = std::fs::read_to_string(f).unwrap();
    let audit = std::fs::read_to_string(format!("{}.audit.jsonl", f.display())).unwrap();
    assert_eq!(audit.lines().count(), 4, "{audit}");
    assert!(audit.contains("service_accounts.remove"));
    for secret in [&first, &second] {
        assert!(!text.contains(secret.as_str()) && !audit.contains(secret.as_str()));
    }
}
