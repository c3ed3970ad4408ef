//! Last use of a key: recorded in the store in batches, off the request path, at most once
//! per key per interval.

mod common;

use std::time::Duration;

use common::*;
use keygate::store::Store;

async fn last_used(store: &dyn Store, id: &str) -> Option<u64> {
    store.get(id).await.unwrap().unwrap().last_used_at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_use_is_recorded_in_redis() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("last-used");
    let store = redis_store(&redis, &ns);
    let mut config = test_config(&redis.url(), &ns, &upstream.url());
    config.store.last_used_interval = "1s".into();
    let kg = Keygate::start(config).await;
    kg.wait_ready().await;
    let http = Http::new();
    let used = create_key(&*store, "acme", "admin").await;
    let idle = create_key(&*store, "acme", "admin").await;
    for _ in 0..20 {
        let r = http.get_with_key(&kg.url("/"), used.secret.expose()).await;
        assert_eq!(r.status, 200);
    }
    let id = used.record.id.clone();
    eventually(Duration::from_secs(5), "the last use is recorded", || {
        let (store, id) = (store.clone(), id.clone());
        async move { last_used(&*store, &id).await.is_some() }
    })
    .await;
    assert_eq!(last_used(&*store, &idle.record.id).await, None);
    let shown = keygate_json(&redis.url(), &ns, &["keys", "show", &id]);
    assert!(shown["last_used_at"].is_string(), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_use_is_recorded_beside_the_keys_file_without_rewriting_it() {
    let dir = temp_dir("last-used");
    let keys_file = dir.join("keys.toml");
    std::fs::write(&keys_file, "# keys\n").unwrap();
    let upstream = Upstream::start().await;
    let mut config = file_test_config(&keys_file, &upstream.url());
    config.store.last_used_interval = "1s".into();
    let writer = keygate::store::file::FileStore::open(&keys_file, true).unwrap();
    let key = create_key(&writer, "acme", "admin").await;
    let before = std::fs::read_to_string(&keys_file).unwrap();
    let kg = Keygate::start(config).await;
    let http = Http::new();
    let r = http.get_with_key(&kg.url("/"), key.secret.expose()).await;
    assert_eq!(r.status, 200);
    let sidecar = dir.join("keys.toml.last-used.json");
    eventually(Duration::from_secs(5), "the last use is recorded", || {
        let sidecar = sidecar.clone();
        async move { sidecar.exists() }
    })
    .await;
    assert_eq!(std::fs::read_to_string(&keys_file).unwrap(), before);
    let reader = keygate::store::file::FileStore::open(&keys_file, false).unwrap();
    assert!(last_used(&reader, &key.record.id).await.is_some());
}
