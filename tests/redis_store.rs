//! The Redis store against a real `redis-server`: its time bound, its error messages, and
//! scripts that write nothing when they refuse.

mod common;

use std::time::{Duration, Instant};

use common::*;
use keygate::key::{generate, generate_id, KeyKind};
use keygate::manage;
use keygate::policy::Roles;
use keygate::store::redis::RedisStore;
use keygate::store::{now_unix, KeyRecord, OldKeys, ServiceAccount, Store, StoreError};

#[test]
fn a_redis_that_loses_its_port_race_is_not_taken_for_another_tests() {
    let first = RedisServer::start();
    // A second server on the same port cannot bind; the first one answers its PING.
    match RedisServer::start_on(first.port) {
        Ok(second) => panic!(
            "a server on the taken port {} was taken for the running one",
            second.port
        ),
        Err(why) => assert!(
            why.contains("another server") || why.contains("exited"),
            "{why}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_gets_503_within_the_store_timeout() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("paused");
    let store = redis_store(&redis, &ns);
    let mut config = test_config(&redis.url(), &ns, &upstream.url());
    config.store.timeout = "1s".into();
    let kg = Keygate::start(config).await;
    kg.wait_ready().await;
    let http = Http::new();
    let key = create_key(&*store, "acme", "admin").await;

    // Every client waits, keygate's connection included; the pause outlasts the bound.
    let _: () = redis.cmd(&["CLIENT", "PAUSE", "3000", "ALL"]);
    let started = Instant::now();
    let (status, code) = status_of(&http, &kg, key.secret.expose()).await;
    let took = started.elapsed();
    assert_eq!((status, code.as_str()), (503, "store_unavailable"));
    // The bound includes any retry; ε covers the request's own way through keygate.
    let bound = Duration::from_secs(1) + Duration::from_millis(250);
    assert!(
        took <= bound,
        "503 after {took:?}, more than store.timeout (1s) + ε"
    );
    assert!(
        took >= Duration::from_millis(900),
        "503 after {took:?}: not the timeout"
    );
}

#[test]
fn store_errors_name_the_redis_address_but_never_its_password() {
    let port = free_port();
    let url = format!("redis://:hunter2-secret@127.0.0.1:{port}");
    let out = keygate_cli(&url, "addr", &["keys", "list"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("store unavailable: 127.0.0.1:{port}: ")),
        "{stderr}"
    );
    assert!(stderr.to_lowercase().contains("refused"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the password was printed: {stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Scripts validate before they write: a refused script leaves Redis as it was and announces
// nothing.

/// A fresh service account key record for `account`, not yet stored.
fn account_key(account: &ServiceAccount) -> KeyRecord {
    KeyRecord {
        id: generate_id("key"),
        digest: generate(KeyKind::ServiceAccount).digest,
        name: account.name.clone(),
        tenant: account.tenant.clone(),
        role: account.role.clone(),
        subject: account.id.clone(),
        kind: KeyKind::ServiceAccount,
        created_at: now_unix(),
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
    }
}

/// A service account whose keys were rotated with a grace period `rotations` times, so that
/// every one of its keys still works.
async fn account_with_live_keys(store: &RedisStore, rotations: usize) -> ServiceAccount {
    let created = manage::create_service_account(
        store,
        &Roles::default(),
        manage::NewServiceAccount {
            tenant: "acme".into(),
            name: "ci".into(),
            role: "member".into(),
            expires_at: None,
        },
        now_unix(),
        "test",
    )
    .await
    .unwrap();
    for _ in 0..rotations {
        manage::rotate_service_account(
            store,
            &created.account.id,
            manage::RotateExpiry::Never,
            Some(Duration::from_secs(3600)),
            now_unix(),
            "test",
        )
        .await
        .unwrap();
    }
    store
        .get_account(&created.account.id)
        .await
        .unwrap()
        .unwrap()
}

/// The record key of a key id, from the id index.
fn record_key_of(redis: &RedisServer, ns: &str, key_id: &str) -> String {
    let hex: String = redis.cmd(&["GET", &format!("{ns}:id:{key_id}")]);
    format!("{ns}:key:{hex}")
}

/// Follows the invalidation channel on a connection of the test's own.
struct Listener(redis::Connection, String);

impl Listener {
    fn start(redis: &RedisServer, ns: &str) -> Self {
        let mut conn = redis.conn();
        let channel = format!("{ns}:invalidate");
        let _: () = redis::cmd("SUBSCRIBE")
            .arg(&channel)
            .query(&mut conn)
            .unwrap();
        Listener(conn, channel)
    }

    /// Publishes a marker and returns every message received before it.
    fn messages_until_marker(&mut self, redis: &RedisServer) -> Vec<String> {
        let _: i64 = redis.cmd(&["PUBLISH", &self.1, "marker"]);
        let mut seen = Vec::new();
        loop {
            let msg = self.0.recv_response().expect("a message within 10s");
            let payload: String = match msg {
                redis::Value::Array(parts) | redis::Value::Push { data: parts, .. } => {
                    redis::from_redis_value(parts.last().unwrap().clone()).unwrap()
                }
                other => panic!("unexpected {other:?}"),
            };
            if payload == "marker" {
                return seen;
            }
            seen.push(payload);
        }
    }
}

#[tokio::test]
async fn a_rotation_that_meets_a_corrupt_record_changes_nothing() {
    let redis = RedisServer::start();
    let ns = namespace("rotate-corrupt");
    let store = redis_store(&redis, &ns);
    // Four live keys; the last one the script visits (a set's order is Redis's own, the same
    // for the script as for this SMEMBERS) gets a corrupt expiry.
    let account = account_with_live_keys(&store, 3).await;
    let ids: Vec<String> = redis.cmd(&["SMEMBERS", &format!("{ns}:sa-keys:{}", account.id)]);
    assert_eq!(ids.len(), 4);
    let corrupt = record_key_of(&redis, &ns, ids.last().unwrap());
    let _: i64 = redis.cmd(&["HSET", &corrupt, "expires_at", "soon"]);
    let before = dump_redis(&redis, &ns);
    let mut listener = Listener::start(&redis, &ns);

    let err = store
        .rotate_account(
            &account.id,
            &account_key(&account),
            OldKeys::ExpireAt(now_unix() + 60),
        )
        .await
        .expect_err("a rotation over a corrupt record must be refused");
    assert_eq!(
        dump_redis(&redis, &ns),
        before,
        "the refused rotation wrote"
    );
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("expires_at"), "{err}");
    assert_eq!(
        listener.messages_until_marker(&redis),
        Vec::<String>::new(),
        "the refused rotation announced changes"
    );

    // The same without a grace period, over a record that is not even a hash.
    let _: () = redis.cmd(&["DEL", &corrupt]);
    let _: () = redis.cmd(&["SET", &corrupt, "junk"]);
    let before = dump_redis(&redis, &ns);
    let err = store
        .rotate_account(
            &account.id,
            &account_key(&account),
            OldKeys::RevokeAt(now_unix()),
        )
        .await
        .expect_err("a rotation over a corrupt record must be refused");
    assert_eq!(
        dump_redis(&redis, &ns),
        before,
        "the refused rotation wrote"
    );
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert_eq!(listener.messages_until_marker(&redis), Vec::<String>::new());
}

#[tokio::test]
async fn revoking_never_creates_a_record() {
    let redis = RedisServer::start();
    let ns = namespace("revoke-stub");
    let store = redis_store(&redis, &ns);

    // An id index pointing at a record that is gone.
    let key = create_key(&*store, "acme", "admin").await;
    let record = record_key_of(&redis, &ns, &key.record.id);
    let _: () = redis.cmd(&["DEL", &record]);
    let before = dump_redis(&redis, &ns);
    let outcome = store.revoke(&key.record.id, now_unix()).await;
    let exists: i64 = redis.cmd(&["EXISTS", &record]);
    assert_eq!(exists, 0, "revoking created a stub record");
    assert_eq!(dump_redis(&redis, &ns), before);
    assert!(
        matches!(outcome, Err(StoreError::Corrupt(_))),
        "{outcome:?}"
    );

    // Removing an account one of whose keys lost its record.
    let account = account_with_live_keys(&store, 1).await;
    let gone = record_key_of(&redis, &ns, &account.key_id);
    let _: () = redis.cmd(&["DEL", &gone]);
    let removed = store.remove_account(&account.id, now_unix()).await.unwrap();
    assert!(removed.is_some());
    let exists: i64 = redis.cmd(&["EXISTS", &gone]);
    assert_eq!(exists, 0, "removing the account created a stub record");
}

#[tokio::test]
async fn a_create_that_cannot_complete_writes_nothing() {
    let redis = RedisServer::start();
    let ns = namespace("create-typed");
    let store = redis_store(&redis, &ns);
    // The listing indexes hold the wrong type: the scripts would fail at their last writes.
    let _: () = redis.cmd(&["SET", &format!("{ns}:ids"), "junk"]);
    let _: () = redis.cmd(&["SET", &format!("{ns}:sa-ids"), "junk"]);
    let before = dump_redis(&redis, &ns);
    let mut listener = Listener::start(&redis, &ns);

    let key = generate(KeyKind::User);
    let record = KeyRecord {
        id: generate_id("key"),
        digest: key.digest,
        name: "n".into(),
        tenant: "acme".into(),
        role: "admin".into(),
        subject: "alice".into(),
        kind: KeyKind::User,
        created_at: now_unix(),
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
    };
    let err = store.insert(&record).await.expect_err("refused");
    assert_eq!(dump_redis(&redis, &ns), before, "the refused insert wrote");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");

    let account = ServiceAccount {
        id: generate_id("sa"),
        name: "ci".into(),
        tenant: "acme".into(),
        role: "member".into(),
        created_at: now_unix(),
        expires_at: None,
        key_id: String::new(),
    };
    let mut key = account_key(&account);
    key.subject = account.id.clone();
    let account = ServiceAccount {
        key_id: key.id.clone(),
        ..account
    };
    let err = store
        .create_account(&account, &key)
        .await
        .expect_err("refused");
    assert_eq!(dump_redis(&redis, &ns), before, "the refused create wrote");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert_eq!(listener.messages_until_marker(&redis), Vec::<String>::new());
}

#[tokio::test]
async fn a_last_used_note_never_recreates_a_deleted_record() {
    let redis = RedisServer::start();
    let ns = namespace("touch-deleted");
    let store = redis_store(&redis, &ns);
    let (live, gone) = (
        create_key(&*store, "acme", "admin").await,
        create_key(&*store, "acme", "admin").await,
    );
    let gone_record = record_key_of(&redis, &ns, &gone.record.id);
    let _: () = redis.cmd(&["DEL", &gone_record]);

    // One batch with both keys: the live record takes the time, the deleted one stays gone.
    store
        .touch(&[(gone.record.digest, 1_000), (live.record.digest, 1_000)])
        .await
        .unwrap();
    let exists: i64 = redis.cmd(&["EXISTS", &gone_record]);
    assert_eq!(exists, 0, "a last-used note recreated a deleted record");
    let last_used = |store: std::sync::Arc<RedisStore>, id: String| async move {
        store.get(&id).await.unwrap().unwrap().last_used_at
    };
    assert_eq!(
        last_used(store.clone(), live.record.id.clone()).await,
        Some(1_000)
    );

    // A time only moves forward; a later one is taken.
    store.touch(&[(live.record.digest, 900)]).await.unwrap();
    assert_eq!(
        last_used(store.clone(), live.record.id.clone()).await,
        Some(1_000)
    );
    store.touch(&[(live.record.digest, 1_100)]).await.unwrap();
    assert_eq!(
        last_used(store.clone(), live.record.id.clone()).await,
        Some(1_100)
    );
    let exists: i64 = redis.cmd(&["EXISTS", &gone_record]);
    assert_eq!(exists, 0);

    // A record key holding something other than a hash is an error, and is left as it was.
    let _: () = redis.cmd(&["SET", &gone_record, "junk"]);
    let before = dump_redis(&redis, &ns);
    store
        .touch(&[(gone.record.digest, 1_200)])
        .await
        .expect_err("a note on a record that is not a hash must fail");
    assert_eq!(dump_redis(&redis, &ns), before);
}
