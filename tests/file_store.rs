//! The embedded file store end to end: keygate serving from a keys file that is edited by hand,
//! by the CLI (a separate process) and through the admin API of a running instance, while other
//! files in the directory change.
//!
//! Cached verdicts live an hour here (`cache.ttl` and `cache.negative_ttl`), so a change can
//! only take effect through the store's invalidation, never by a cache entry expiring.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use keygate::key::{generate, GeneratedKey, KeyKind};
use keygate::store::{now_unix, KeyRecord};

/// The file store's longest reload debounce (`MAX_DEBOUNCE` in `src/store/file.rs`).
const DEBOUNCE_CAP: Duration = Duration::from_millis(250);
/// How long a change of the keys file may take to reach every served verdict: the debounce
/// cap plus a margin for a loaded machine. `cargo bench --bench file_revocation` measures
/// the real figure.
const APPLIED: Duration = DEBOUNCE_CAP.saturating_add(Duration::from_millis(1250));
/// Deadline of every request and every CLI run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the real `keygate` binary against the keys file, within a deadline.
async fn keygate_cli(keys_file: &Path, args: &[&str]) -> std::process::Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(args)
        .arg("--keys-file")
        .arg(keys_file)
        .env_remove("KEYGATE__STORE__REDIS_URL")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(REQUEST_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("keygate {args:?} did not finish"))
        .unwrap()
}

/// Runs the CLI with `--output json`, expects success, returns its answer.
async fn cli_json(keys_file: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = keygate_cli(keys_file, &all).await;
    assert!(
        out.status.success(),
        "keygate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `keygate keys create` against the file; returns (id, key).
async fn cli_create(keys_file: &Path, tenant: &str) -> (String, String) {
    let v = cli_json(
        keys_file,
        &[
            "keys", "create", "--tenant", tenant, "--role", "admin", "--name", "cli key",
        ],
    )
    .await;
    (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
    )
}

/// `keygate keys revoke ID` against the file.
async fn cli_revoke(keys_file: &Path, id: &str) {
    cli_json(keys_file, &["keys", "revoke", id]).await;
}

/// A `[[keys]]` block as an operator would write it.
fn block(id: &str, key: &GeneratedKey, extra: &str) -> String {
    format!(
        "\n[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\nname = \"hand written\"\ntenant = \"acme\"\nrole = \"admin\"\nsubject = \"carol\"\nkind = \"user\"\ncreated_at = \"2026-01-01T00:00:00Z\"\n{extra}",
        key.digest.to_hex()
    )
}

/// The text of a keys file with the key `id` revoked by hand.
fn revoked_by_hand(text: &str, id: &str) -> String {
    let line = format!("id = \"{id}\"\n");
    assert!(text.contains(&line), "no key {id} in the file");
    text.replace(
        &line,
        &format!("{line}revoked_at = \"2026-02-01T00:00:00Z\"\n"),
    )
}

/// A config whose cached verdicts outlive every test: only invalidation ends them.
fn file_config(keys_file: &Path, upstream: &str) -> keygate::config::Config {
    let mut c = file_test_config(keys_file, upstream);
    c.cache.ttl = "1h".into();
    c.cache.negative_ttl = "1h".into();
    c
}

struct FileRig {
    _upstream: Upstream,
    /// Instances serving the same keys file.
    kgs: Vec<Keygate>,
    dir: PathBuf,
    keys_file: PathBuf,
    http: Http,
}

async fn file_rig() -> FileRig {
    file_rig_of(1).await
}

/// `instances` keygate instances serving one keys file.
async fn file_rig_of(instances: usize) -> FileRig {
    let dir = temp_dir("keys");
    let keys_file = dir.join("keys.toml");
    std::fs::write(&keys_file, "# keys\n").unwrap();
    let upstream = Upstream::start().await;
    let mut kgs = Vec::new();
    for _ in 0..instances {
        kgs.push(Keygate::start(file_config(&keys_file, &upstream.url())).await);
    }
    FileRig {
        _upstream: upstream,
        kgs,
        dir,
        keys_file,
        http: Http::new(),
    }
}

/// A GET of `/` with `key` on `kg`, within [`REQUEST_TIMEOUT`].
async fn get(http: &Http, kg: &Keygate, key: &str) -> Reply {
    tokio::time::timeout(REQUEST_TIMEOUT, http.get_with_key(&kg.url("/"), key))
        .await
        .expect("keygate answers within the request timeout")
}

impl FileRig {
    fn kg(&self) -> &Keygate {
        &self.kgs[0]
    }

    /// Waits until every instance answers `key` with `want`, within `within`.
    async fn status_within(&self, within: Duration, key: &str, want: u16, what: &str) {
        eventually(within, what, || async {
            self.statuses(key).await.iter().all(|s| *s == want)
        })
        .await;
    }

    async fn status_becomes(&self, key: &str, want: u16, what: &str) {
        self.status_within(APPLIED, key, want, what).await
    }

    /// What every instance answers for `key` now.
    async fn statuses(&self, key: &str) -> Vec<u16> {
        let mut all = Vec::new();
        for kg in &self.kgs {
            all.push(get(&self.http, kg, key).await.status.as_u16());
        }
        all
    }

    fn edit(&self, f: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.keys_file).unwrap();
        std::fs::write(&self.keys_file, f(text)).unwrap();
    }

    /// A call to the admin API of instance `i`, within [`REQUEST_TIMEOUT`].
    async fn api(&self, i: usize, method: &str, path: &str, key: &str, body: &str) -> Reply {
        let auth = format!("Bearer {key}");
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        let url = self.kgs[i].admin_url(path);
        let call = self
            .http
            .request_body(method, &url, &headers, body.as_bytes().to_vec());
        tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .expect("the admin API answers within the request timeout")
    }
}

/// Appends a line to a file every `every` from its own thread until dropped, as a process
/// logging beside the keys file does. Each append holds `gate`, so a test can edit the file
/// between two appends.
struct Appender {
    stop: Arc<AtomicBool>,
    lines: Arc<AtomicU64>,
    gate: Arc<Mutex<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Appender {
    fn start(path: PathBuf, line: &'static str, every: Duration) -> Self {
        let (stop, lines) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let gate = Arc::new(Mutex::new(()));
        let (s, n, g) = (stop.clone(), lines.clone(), gate.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                {
                    let _held = g.lock().unwrap();
                    let mut f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .unwrap();
                    f.write_all(line.as_bytes()).unwrap();
                }
                n.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(every);
            }
        });
        Appender {
            stop,
            lines,
            gate,
            thread: Some(thread),
        }
    }

    fn lines(&self) -> u64 {
        self.lines.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` more lines were appended, within a deadline.
    async fn wait_for_lines(&self, n: u64) {
        let target = self.lines() + n;
        eventually(
            Duration::from_secs(5),
            "the appender is writing",
            || async { self.lines() >= target },
        )
        .await;
    }
}

/// Counts the times any process opens a file, from inotify.
struct OpensOf {
    count: Arc<AtomicU64>,
    _watcher: notify::RecommendedWatcher,
}

impl OpensOf {
    fn watch(file: &Path) -> Self {
        use notify::event::{AccessKind, EventKind};
        use notify::Watcher;
        let count = Arc::new(AtomicU64::new(0));
        let (n, name) = (count.clone(), file.file_name().unwrap().to_owned());
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                if matches!(ev.kind, EventKind::Access(AccessKind::Open(_)))
                    && ev.paths.iter().any(|p| p.file_name() == Some(&name))
                {
                    n.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .unwrap();
        watcher
            .watch(file.parent().unwrap(), notify::RecursiveMode::NonRecursive)
            .unwrap();
        OpensOf {
            count,
            _watcher: watcher,
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_created_by_the_cli_are_served_without_restart() {
    let r = file_rig().await;
    let (id, key) = cli_create(&r.keys_file, "acme").await;
    r.status_becomes(&key, 200, "a CLI-created key is accepted")
        .await;

    let file = std::fs::read_to_string(&r.keys_file).unwrap();
    assert!(file.contains(&id));
    assert!(!file.contains(&key), "the keys file holds a plaintext key");
    assert!(
        file.starts_with("# keys\n"),
        "the operator's comment was lost"
    );

    cli_revoke(&r.keys_file, &id).await;
    r.status_becomes(&key, 401, "a CLI-revoked key is refused")
        .await;
    let reply = get(&r.http, r.kg(), &key).await;
    assert_eq!(reply.error_code(), "key_revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_added_revoked_and_removed_by_editing_the_file_take_effect() {
    let r = file_rig().await;
    let key = generate(KeyKind::User);
    let secret = key.secret.expose().to_owned();

    // Unknown first (and so cached as unknown for an hour), then added by hand.
    let reply = get(&r.http, r.kg(), &secret).await;
    assert_eq!(reply.error_code(), "invalid_key");
    r.edit(|t| t + &block("key_hand", &key, ""));
    r.status_becomes(&secret, 200, "a hand-added key is accepted")
        .await;

    // Revoked by hand.
    r.edit(|t| revoked_by_hand(&t, "key_hand"));
    r.status_becomes(&secret, 401, "a hand-revoked key is refused")
        .await;
    let reply = get(&r.http, r.kg(), &secret).await;
    assert_eq!(reply.error_code(), "key_revoked");

    // Un-revoked, then removed.
    r.edit(|t| t.replace("revoked_at = \"2026-02-01T00:00:00Z\"\n", ""));
    r.status_becomes(&secret, 200, "an un-revoked key is accepted")
        .await;
    r.edit(|_| "# no keys left\n".into());
    r.status_becomes(&secret, 401, "a removed key is refused")
        .await;
    let reply = get(&r.http, r.kg(), &secret).await;
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
    let readyz = |r: &FileRig| {
        let (http, url) = (r.http.clone(), r.kg().admin_url("/readyz"));
        async move {
            tokio::time::timeout(REQUEST_TIMEOUT, http.get(&url, &[]))
                .await
                .expect("/readyz answers")
        }
    };
    eventually(APPLIED, "/readyz reports the reload error", || async {
        readyz(&r).await.text().contains("line 15")
    })
    .await;
    let ready = readyz(&r).await;
    assert_eq!(
        ready.status, 200,
        "a bad edit must not take the instance out of service"
    );
    assert!(ready.text().contains("sha256"), "{}", ready.text());
    let reply = get(&r.http, r.kg(), &secret).await;
    assert_eq!(reply.status, 200, "the last good keys stopped serving");
    // Asked while the file was broken: cached as unknown, for an hour.
    assert_eq!(
        get(&r.http, r.kg(), other.secret.expose()).await.status,
        401
    );

    // Fixing the file clears the warning.
    r.edit(|t| t.replace("not-hex", &other.digest.to_hex()));
    r.status_becomes(other.secret.expose(), 200, "the fixed file is loaded")
        .await;
    let ready = readyz(&r).await;
    assert!(!ready.text().contains("line 15"), "{}", ready.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cli_writers_keep_every_key() {
    let r = file_rig().await;
    let writers = (0..8).map(|i| {
        let file = r.keys_file.clone();
        async move { cli_create(&file, &format!("tenant{i}")).await }
    });
    let created: Vec<(String, String)> = futures_util::future::join_all(writers).await;
    let file = std::fs::read_to_string(&r.keys_file).unwrap();
    for (id, key) in &created {
        assert!(file.contains(id.as_str()), "key {id} was lost");
        r.status_becomes(key, 200, "every concurrently created key works")
            .await;
    }
    let out = keygate_cli(&r.keys_file, &["keys", "list", "--output", "json"]).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_accounts_rotate_and_remove_in_the_keys_file() {
    let rig = file_rig().await;
    let f = &rig.keys_file;
    let create = [
        "service-accounts",
        "create",
        "--tenant",
        "acme",
        "--name",
        "Agent",
        "--role",
        "member",
    ];
    let created = cli_json(f, &create).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let first = created["key"].as_str().unwrap().to_owned();
    rig.status_becomes(&first, 200, "the account's key works")
        .await;

    let mut dup = create;
    dup[5] = "AGENT";
    let dup = keygate_cli(f, &dup).await;
    assert!(!dup.status.success(), "a duplicate name was accepted");

    let rotated = cli_json(f, &["service-accounts", "rotate", &id]).await;
    let second = rotated["key"].as_str().unwrap().to_owned();
    rig.status_becomes(&first, 401, "the old key is rejected")
        .await;
    rig.status_becomes(&second, 200, "the new key works").await;

    cli_json(f, &["service-accounts", "remove", &id]).await;
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

// ---------------------------------------------------------------------------------------------
// A running instance's own writes and other processes' writes

/// A key record for `Store::insert` on a served store.
fn record_of(key: &GeneratedKey, id: &str) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        digest: key.digest,
        name: "inserted in process".into(),
        tenant: "acme".into(),
        role: "admin".into(),
        subject: "dave".into(),
        kind: KeyKind::User,
        created_at: now_unix(),
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_revocation_holds_when_the_instance_writes_through_its_api_at_once() {
    let r = file_rig().await;
    let (_, admin) = cli_create(&r.keys_file, "acme").await;
    let (id, key) = cli_create(&r.keys_file, "acme").await;
    r.status_becomes(&admin, 200, "the admin key is served")
        .await;
    r.status_becomes(&key, 200, "the key is cached as live")
        .await;

    cli_revoke(&r.keys_file, &id).await;
    // At once, before the instance may have reloaded: a write of its own.
    let made = r
        .api(
            0,
            "POST",
            "/v1/keys",
            &admin,
            r#"{"role": "member", "name": "made at once"}"#,
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.text());

    r.status_becomes(&key, 401, "the CLI-revoked key is refused")
        .await;
    assert_eq!(get(&r.http, r.kg(), &key).await.error_code(), "key_revoked");
    let new = made.json()["key"].as_str().unwrap().to_owned();
    assert_eq!(get(&r.http, r.kg(), &new).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_revocation_holds_on_two_instances_when_one_writes_at_once() {
    let r = file_rig_of(2).await;
    let (id, key) = cli_create(&r.keys_file, "acme").await;
    r.status_becomes(&key, 200, "the key is cached as live on both")
        .await;

    cli_revoke(&r.keys_file, &id).await;
    // At once, on the first instance: a write of its own through the store it serves.
    let inserted = generate(KeyKind::User);
    let store = r.kgs[0].app.verifier.store().clone();
    store
        .insert(&record_of(&inserted, "key_inserted"))
        .await
        .unwrap();

    r.status_becomes(&key, 401, "the CLI-revoked key is refused on both")
        .await;
    r.status_becomes(
        inserted.secret.expose(),
        200,
        "the inserted key works on both",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_revocation_holds_when_the_instance_writes_before_reloading() {
    let r = file_rig_of(2).await;
    let (id, key) = cli_create(&r.keys_file, "acme").await;
    r.status_becomes(&key, 200, "the key is cached as live on both")
        .await;

    // An in-place edit is reloaded after a short debounce; the instance's own write lands in
    // that window and adopts the revoked record with it.
    r.edit(|t| revoked_by_hand(&t, &id));
    let inserted = generate(KeyKind::User);
    let store = r.kgs[0].app.verifier.store().clone();
    store
        .insert(&record_of(&inserted, "key_inserted"))
        .await
        .unwrap();

    r.status_becomes(&key, 401, "the hand-revoked key is refused on both")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_from_the_cli_the_api_and_by_hand_mix_with_other_files_changing() {
    let r = file_rig().await;
    let log = Appender::start(
        r.dir.join("keygate.log"),
        "a log line\n",
        Duration::from_millis(2),
    );
    log.wait_for_lines(3).await;

    let (_, admin) = cli_create(&r.keys_file, "acme").await;
    r.status_becomes(&admin, 200, "a CLI-created key is accepted")
        .await;
    let (cli_id, cli_key) = cli_create(&r.keys_file, "acme").await;
    let made = r
        .api(
            0,
            "POST",
            "/v1/keys",
            &admin,
            r#"{"role": "member", "name": "api"}"#,
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.text());
    let (api_id, api_key) = (
        made.json()["id"].as_str().unwrap().to_owned(),
        made.json()["key"].as_str().unwrap().to_owned(),
    );
    let hand = generate(KeyKind::User);
    let hand_key = hand.secret.expose().to_owned();
    assert_eq!(get(&r.http, r.kg(), &hand_key).await.status, 401);
    r.edit(|t| t + &block("key_hand", &hand, ""));
    for k in [&cli_key, &api_key, &hand_key] {
        r.status_becomes(k, 200, "every new key is accepted").await;
    }

    // Revoke each through another path, back to back: by hand, by the CLI, through the API.
    r.edit(|t| revoked_by_hand(&t, "key_hand"));
    cli_revoke(&r.keys_file, &api_id).await;
    let revoked = r
        .api(
            0,
            "POST",
            &format!("/v1/keys/{cli_id}/revoke"),
            &admin,
            "{}",
        )
        .await;
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    for k in [&cli_key, &api_key, &hand_key] {
        r.status_becomes(k, 401, "every revoked key is refused")
            .await;
    }
    assert_eq!(
        r.statuses(&admin).await,
        [200],
        "an untouched key still works"
    );
    assert!(log.lines() > 3, "the log kept being written");
}

// ---------------------------------------------------------------------------------------------
// Reload timing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_written_beside_the_keys_file_does_not_delay_revocations() {
    let r = file_rig().await;
    let (cli_id, cli_key) = cli_create(&r.keys_file, "acme").await;
    let (hand_id, hand_key) = cli_create(&r.keys_file, "acme").await;
    r.status_becomes(&cli_key, 200, "the key is cached as live")
        .await;
    r.status_becomes(&hand_key, 200, "the key is cached as live")
        .await;

    let log = Appender::start(
        r.dir.join("keygate.log"),
        "a log line\n",
        Duration::from_millis(2),
    );
    log.wait_for_lines(3).await;

    // The log alone never makes keygate read the keys file again: over more than the debounce
    // cap of log lines, nothing opens it.
    let opens = OpensOf::watch(&r.keys_file);
    let window = Instant::now();
    while window.elapsed() < 2 * DEBOUNCE_CAP {
        log.wait_for_lines(10).await;
    }
    assert_eq!(
        opens.count(),
        0,
        "the log made keygate reload the keys file"
    );

    cli_revoke(&r.keys_file, &cli_id).await;
    r.status_within(
        APPLIED,
        &cli_key,
        401,
        "a CLI revocation applies within the bound",
    )
    .await;

    // An in-place edit goes through the debounce, which the log must not restart.
    r.edit(|t| revoked_by_hand(&t, &hand_id));
    r.status_within(
        APPLIED,
        &hand_key,
        401,
        "a hand revocation applies within the bound",
    )
    .await;
    let before = log.lines();
    log.wait_for_lines(3).await;
    assert!(log.lines() > before, "the log kept being written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_file_written_continuously_is_reloaded_within_the_debounce_cap() {
    let r = file_rig().await;
    let (id, key) = cli_create(&r.keys_file, "acme").await;
    r.status_becomes(&key, 200, "the key is cached as live")
        .await;

    // Comments appended to the keys file itself every few milliseconds: each is an event the
    // debounce sees, and the file stays valid throughout.
    let ticks = Appender::start(r.keys_file.clone(), "# tick\n", Duration::from_millis(3));
    ticks.wait_for_lines(3).await;
    {
        let _between_appends = ticks.gate.lock().unwrap();
        r.edit(|t| revoked_by_hand(&t, &id));
    }
    r.status_within(
        APPLIED,
        &key,
        401,
        "a revocation applies within the debounce cap, however busy the file",
    )
    .await;
    let before = ticks.lines();
    ticks.wait_for_lines(3).await;
    assert!(ticks.lines() > before, "the file kept being written");
}
