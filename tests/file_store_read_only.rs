//! The embedded file store serving a keys file it cannot write, as the sidecar does from a
//! Kubernetes Secret (a read-only mount): keys verify, updates of the Secret are reloaded,
//! last-used times are kept in memory (no failing writes), `/readyz` and a gauge say so, and
//! key management fails with an error naming the file.
//!
//! The Secret is a directory laid out as the kubelet writes one (`keys.toml -> ..data/keys.toml`,
//! `..data -> ..<version>`, an update swapping `..data`), seen by keygate through a read-only
//! bind mount of it when the test runs as root (root ignores permission bits, not a read-only
//! mount: writes there fail with EROFS, as in a pod), else with its write permissions removed
//! (EACCES).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use keygate::key::{generate, GeneratedKey, KeyKind};
use keygate::store::file::FileStore;
use keygate::store::Store;

/// Deadline of every request and every CLI run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A Secret's directory, and the read-only view of it keygate is given.
struct Secret {
    /// Where the kubelet (here: the test) writes.
    source: PathBuf,
    /// What keygate reads: a read-only bind mount of `source` (as root), or `source` itself
    /// without write permissions.
    view: PathBuf,
    mounted: bool,
    version: u32,
}

impl Secret {
    /// A Secret holding `keys.toml` with `text`, and its read-only view.
    fn new(text: &str) -> Self {
        let base = temp_dir("secret");
        let source = base.join("source");
        std::fs::create_dir_all(&source).unwrap();
        let mut secret = Secret {
            view: source.clone(),
            source,
            mounted: false,
            version: 0,
        };
        secret.write_version(text);
        std::os::unix::fs::symlink("..data/keys.toml", secret.source.join("keys.toml")).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let view = base.join("view");
            std::fs::create_dir_all(&view).unwrap();
            let mount = |args: &[&str]| {
                let out = Command::new("mount").args(args).output().unwrap();
                assert!(
                    out.status.success(),
                    "mount {args:?}: {} (a read-only bind mount needs CAP_SYS_ADMIN; as \
                     another user than root the test removes write permissions instead)",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            mount(&[
                "--bind",
                secret.source.to_str().unwrap(),
                view.to_str().unwrap(),
            ]);
            secret.view = view;
            secret.mounted = true;
            mount(&["-o", "remount,bind,ro", secret.view.to_str().unwrap()]);
        } else {
            secret.lock(true);
        }
        // The view really is read-only for this process, root or not.
        let probe = std::fs::write(secret.view.join("probe"), "x").unwrap_err();
        assert!(
            matches!(probe.raw_os_error(), Some(libc::EROFS | libc::EACCES)),
            "the view is writable: {probe}"
        );
        secret
    }

    /// The keys file as keygate is told of it.
    fn keys_file(&self) -> PathBuf {
        self.view.join("keys.toml")
    }

    /// Without a mount, the source is the view: its write permission is removed (`true`) or
    /// given back.
    fn lock(&self, locked: bool) {
        if self.mounted {
            return;
        }
        let mode = if locked { 0o555 } else { 0o755 };
        std::fs::set_permissions(&self.source, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn write_version(&mut self, text: &str) -> PathBuf {
        self.version += 1;
        let dir = self.source.join(format!("..v{}", self.version));
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("keys.toml");
        std::fs::write(&file, text).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).unwrap();
        let tmp = self.source.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..v{}", self.version), &tmp).unwrap();
        std::fs::rename(&tmp, self.source.join("..data")).unwrap();
        dir
    }

    /// Updates the Secret as the kubelet does: a new version directory, then `..data`
    /// swapped to it by a rename.
    fn update(&mut self, text: &str) {
        self.lock(false);
        let old = self.source.join(format!("..v{}", self.version));
        self.write_version(text);
        let _ = std::fs::remove_dir_all(old);
        self.lock(true);
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.view).status();
        }
        self.lock(false);
        let _ = std::fs::remove_dir_all(self.source.parent().unwrap());
    }
}

/// A keys file's text holding `keys` (made by the file store itself in a scratch directory,
/// as an operator makes it with `keygate keys create` before putting it in the Secret).
async fn keys_text(keys: &[(&GeneratedKey, &str, bool)]) -> String {
    let dir = temp_dir("secret-scratch");
    let path = dir.join("keys.toml");
    let store = FileStore::open(&path, true).unwrap();
    for (key, id, revoked) in keys {
        let mut record = keygate::store::KeyRecord {
            id: (*id).into(),
            digest: key.digest,
            name: "app client".into(),
            tenant: "acme".into(),
            role: "admin".into(),
            subject: "app".into(),
            kind: KeyKind::User,
            created_at: 1_767_225_600,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
        };
        if *revoked {
            record.revoked_at = Some(1_767_225_601);
        }
        store.insert(&record).await.unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    text
}

async fn get(http: &Http, kg: &Keygate, key: &str) -> Reply {
    tokio::time::timeout(REQUEST_TIMEOUT, http.get_with_key(&kg.url("/"), key))
        .await
        .expect("keygate answers within the request timeout")
}

/// Runs the real `keygate` binary against the keys file, within a deadline.
fn keygate_cli(keys_file: &Path, args: &[&str]) -> std::process::Output {
    output_within(
        Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(args)
            .arg("--keys-file")
            .arg(keys_file)
            .env_remove("KEYGATE__STORE__REDIS_URL"),
        REQUEST_TIMEOUT,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_keys_file_is_served_and_reloaded_with_last_used_times_in_memory() {
    let (first, second) = (generate(KeyKind::User), generate(KeyKind::User));
    let mut secret = Secret::new(&keys_text(&[(&first, "key_first", false)]).await);
    let upstream = Upstream::start().await;
    let mut config = file_test_config(&secret.keys_file(), &upstream.url());
    // Hourly verdicts: only the reload can change one.
    config.cache.ttl = "1h".into();
    config.cache.negative_ttl = "1h".into();
    config.store.last_used_interval = "1s".into();
    let kg = Keygate::start(config).await;
    kg.wait_ready().await;
    let http = Http::new();
    assert_eq!(get(&http, &kg, first.secret.expose()).await.status, 200);
    assert_eq!(
        get(&http, &kg, second.secret.expose()).await.error_code(),
        "invalid_key"
    );

    // The last use is recorded in this instance's memory, shown as the API shows it, and no
    // write is attempted, so none fails. Waiting for a second, later batch makes sure the
    // flusher has finished with the first one (it counts a failure before its next batch).
    let store = kg.app.verifier.store();
    let last_used = |store: std::sync::Arc<dyn Store>| async move {
        store.get("key_first").await.unwrap().unwrap().last_used_at
    };
    eventually(Duration::from_secs(10), "the last use is recorded", || {
        let store = store.clone();
        async move { last_used(store).await.is_some() }
    })
    .await;
    let first_use = last_used(store.clone()).await.unwrap();
    eventually(Duration::from_secs(10), "a later use is recorded", || {
        let (store, http) = (store.clone(), http.clone());
        let (url, key) = (kg.url("/"), first.secret.expose().to_owned());
        async move {
            assert_eq!(http.get_with_key(&url, &key).await.status, 200);
            last_used(store).await.unwrap() > first_use
        }
    })
    .await;
    let scrape = kg.scrape().await;
    assert_eq!(scrape.get("keygate_last_used_flush_errors_total"), 0.0);
    assert_eq!(scrape.get("keygate_file_store_read_only"), 1.0);
    assert!(!secret.source.join("keys.toml.last-used.json").exists());

    let ready = http.get(&kg.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let warnings = ready.json()["warnings"].to_string();
    assert!(
        warnings.contains("last-used times are not persisted")
            && warnings.contains(&format!(
                "keys file {} is read-only",
                secret.keys_file().display()
            )),
        "{warnings}"
    );

    // The Secret is updated (the first key revoked, a second added): reloaded as usual.
    secret.update(&keys_text(&[(&first, "key_first", true), (&second, "key_second", false)]).await);
    wait_for_status(&http, &kg, second.secret.expose(), 200, "the added key").await;
    wait_for_status(&http, &kg, first.secret.expose(), 401, "the revoked key").await;
    assert_eq!(
        get(&http, &kg, first.secret.expose()).await.error_code(),
        "key_revoked"
    );
    let scrape = kg.scrape().await;
    assert_eq!(scrape.get("keygate_last_used_flush_errors_total"), 0.0);
    assert_eq!(scrape.get("keygate_file_store_read_only"), 1.0);
    kg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_management_on_a_read_only_keys_file_fails_naming_the_file() {
    let admin = generate(KeyKind::User);
    let secret = Secret::new(&keys_text(&[(&admin, "key_admin", false)]).await);
    let file = secret.keys_file();
    let refused = format!("keys file {} is read-only", file.display());

    // The CLI: reads work, writes fail with the reason, never a panic.
    let list = keygate_cli(&file, &["keys", "list", "--output", "json"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    for args in [
        &[
            "keys", "create", "--tenant", "acme", "--role", "admin", "--name", "n",
        ][..],
        &["keys", "revoke", "key_admin"][..],
        &[
            "service-accounts",
            "create",
            "--tenant",
            "acme",
            "--role",
            "member",
            "--name",
            "ci",
        ][..],
    ] {
        let out = keygate_cli(&file, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "keygate {args:?} succeeded");
        assert!(stderr.contains(&refused), "keygate {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "keygate {args:?}: {stderr}");
    }

    // The admin API of an instance serving the file: the same reason.
    let upstream = Upstream::start().await;
    let kg = Keygate::start(file_test_config(&file, &upstream.url())).await;
    kg.wait_ready().await;
    let http = Http::new();
    let auth = format!("Bearer {}", admin.secret.expose());
    let created = http
        .request_body(
            "POST",
            &kg.admin_url("/v1/keys"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            r#"{"tenant":"acme","role":"member","name":"from the api"}"#,
        )
        .await;
    assert!(created.status.is_server_error(), "{}", created.text());
    assert!(created.json()["message"]
        .as_str()
        .unwrap()
        .contains(&refused));
    let revoked = http
        .request_body(
            "POST",
            &kg.admin_url("/v1/keys/key_admin/revoke"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            "{}",
        )
        .await;
    assert!(revoked.status.is_server_error(), "{}", revoked.text());
    assert!(revoked.json()["message"]
        .as_str()
        .unwrap()
        .contains(&refused));
    // Nothing was written, and the key still works.
    assert_eq!(get(&http, &kg, admin.secret.expose()).await.status, 200);
    kg.shutdown().await;
}
