//! keygate in Redis Cluster mode against a real cluster on loopback: three masters (with
//! passwords); keys spread over every master are created, verified, rotated and revoked through
//! two keygate instances that learned the cluster from different nodes, and every change reaches
//! both at once through the shard channels; and with a replica per master, a master SIGKILLed
//! under traffic: keygate fails closed for the keys it served, serves again once its replica
//! has taken over (no restart), and a revocation issued after the failover is enforced.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::redis_cluster::{Cluster, PASSWORD};
use common::*;
use keygate::config::Config;
use keygate::key::KeyDigest;
use keygate::store::redis::{ClusterSettings, RedisSettings};
use keygate::store::{Store, StoreSettings};
use serde_json::{json, Value};

fn cluster_config(c: &Cluster, seeds: &[usize], ns: &str, upstream: &str) -> Config {
    // The URL's host is not used in Cluster mode; its password is every node's.
    let mut cfg = test_config(
        &format!("redis://:{PASSWORD}@unused.invalid:1"),
        ns,
        upstream,
    );
    cfg.store.cluster_nodes = c.addrs(seeds);
    cfg.store.timeout = "1s".into();
    cfg.store.health_check_interval = "200ms".into();
    cfg.cache.trust_while_unsubscribed = "500ms".into();
    // Long cache lives, so that only invalidations can explain a changed verdict.
    cfg.cache.ttl = "1h".into();
    cfg.cache.negative_ttl = "1h".into();
    cfg
}

fn cluster_store(c: &Cluster, ns: &str) -> std::sync::Arc<dyn Store> {
    let settings = StoreSettings::Cluster(ClusterSettings {
        redis: RedisSettings {
            url: format!("redis://:{PASSWORD}@unused.invalid:1"),
            tls: Default::default(),
            namespace: ns.into(),
            timeout: Duration::from_secs(2),
            health_check_interval: Duration::from_secs(1),
        },
        nodes: (0..c.masters)
            .map(|i| redis::ConnectionAddr::Tcp("127.0.0.1".into(), c.nodes[i].port))
            .collect(),
    });
    keygate::store::open(&settings, false).unwrap()
}

/// An admin API call with `key`; the reply's JSON.
async fn api(http: &Http, kg: &Keygate, method: &str, path: &str, key: &str, body: Value) -> Value {
    let auth = format!("Bearer {key}");
    let reply = http
        .request_body(
            method,
            &kg.admin_url(path),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            if body.is_null() {
                Vec::new()
            } else {
                body.to_string().into_bytes()
            },
        )
        .await;
    assert!(
        reply.status.is_success(),
        "{method} {path}: {} {}",
        reply.status,
        reply.text()
    );
    reply.json()
}

fn str_of(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {v}"))
        .to_owned()
}

/// The record key the cluster layout gives a plaintext key (to find which master holds it).
fn record_key(ns: &str, key: &str) -> String {
    let digest = KeyDigest::of(key.as_bytes());
    let hex = digest.to_hex();
    format!("{ns}:key:{{{}}}:{hex}", &hex[..2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spread_over_every_master_and_changes_reach_instances_seeded_by_different_nodes() {
    let cluster = Cluster::start(3, 0);
    let upstream = Upstream::start().await;
    let ns = namespace("cluster");
    let cfg_a = cluster_config(&cluster, &[0], &ns, &upstream.url());
    let cfg_b = cluster_config(&cluster, &[2, 1], &ns, &upstream.url());
    let store = cluster_store(&cluster, &ns);
    let operator = create_key(&*store, "keygate", "admin").await;
    let operator = operator.secret.expose().to_owned();
    let a = Keygate::start(cfg_a).await;
    let b = Keygate::start(cfg_b).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let http = Http::new();

    // Created through A, verified through both.
    let mut keys = Vec::new();
    for i in 0..24 {
        let created = api(
            &http,
            &a,
            "POST",
            "/v1/keys",
            &operator,
            json!({"tenant": "acme", "role": "member", "name": format!("k{i}")}),
        )
        .await;
        keys.push((str_of(&created, "id"), str_of(&created, "key")));
    }
    let holders: HashSet<usize> = keys
        .iter()
        .map(|(_, k)| cluster.master_of(&record_key(&ns, k)))
        .collect();
    assert_eq!(
        holders.len(),
        3,
        "24 keys should land on all three masters, landed on {holders:?}"
    );
    for (_, k) in &keys {
        for kg in [&a, &b] {
            assert_eq!(status_of(&http, kg, k).await, (200, String::new()));
        }
    }
    let listed = api(
        &http,
        &b,
        "GET",
        "/v1/keys?tenant=acme",
        &operator,
        json!(null),
    )
    .await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 24, "{listed}");

    // Revoked half through A, half through B: every revocation reaches both instances, whose
    // caches hold the key as valid for an hour.
    for (i, (id, _)) in keys.iter().enumerate() {
        let via = if i % 2 == 0 { &a } else { &b };
        api(
            &http,
            via,
            "POST",
            &format!("/v1/keys/{id}/revoke"),
            &operator,
            json!({}),
        )
        .await;
    }
    for (_, k) in &keys {
        for kg in [&a, &b] {
            wait_for_status(&http, kg, k, 401, "a revoked key is refused on both").await;
        }
    }

    // A service account rotated through B: the old key stops on both, the new one works.
    let sa = api(
        &http,
        &b,
        "POST",
        "/v1/service-accounts",
        &operator,
        json!({"tenant": "acme", "name": "Deployer", "role": "member"}),
    )
    .await;
    let (sa_id, first) = (str_of(&sa, "id"), str_of(&sa, "key"));
    for kg in [&a, &b] {
        assert_eq!(status_of(&http, kg, &first).await.0, 200);
    }
    let mut current = first;
    for _ in 0..3 {
        let rotated = api(
            &http,
            &a,
            "POST",
            &format!("/v1/service-accounts/{sa_id}/rotate"),
            &operator,
            json!({}),
        )
        .await;
        let next = str_of(&rotated, "key");
        for kg in [&a, &b] {
            wait_for_status(&http, kg, &current, 401, "the rotated-out key stops").await;
            assert_eq!(status_of(&http, kg, &next).await.0, 200);
        }
        current = next;
    }
    let keys_of = api(
        &http,
        &a,
        "GET",
        &format!("/v1/service-accounts/{sa_id}"),
        &operator,
        json!(null),
    )
    .await;
    assert_eq!(keys_of["id"], sa_id.as_str());

    // Removing the account revokes its current key on both.
    api(
        &http,
        &b,
        "DELETE",
        &format!("/v1/service-accounts/{sa_id}"),
        &operator,
        json!(null),
    )
    .await;
    for kg in [&a, &b] {
        wait_for_status(&http, kg, &current, 401, "a removed account's key stops").await;
    }

    // Last-used notes (one script per bucket): a record takes the time, and a note for a key
    // whose record was deleted does not recreate it. The time is ahead of the clock, so no
    // note of the instances (which only move a time forward) can replace it.
    let ((_, live), (_, gone)) = (&keys[0], &keys[1]);
    let (live_key, gone_key) = (record_key(&ns, live), record_key(&ns, gone));
    let (live_at, gone_at) = (cluster.master_of(&live_key), cluster.master_of(&gone_key));
    let _: i64 = cluster.nodes[gone_at].cmd(&["DEL", &gone_key]);
    let at = keygate::store::now_unix() + 1_000_000;
    store
        .touch(&[
            (KeyDigest::of(gone.as_bytes()), at),
            (KeyDigest::of(live.as_bytes()), at),
        ])
        .await
        .unwrap();
    let exists: i64 = cluster.nodes[gone_at].cmd(&["EXISTS", &gone_key]);
    assert_eq!(exists, 0, "a last-used note recreated a deleted record");
    let noted: String = cluster.nodes[live_at].cmd(&["HGET", &live_key, "last_used_at"]);
    assert_eq!(noted, at.to_string());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_fails_closed_then_its_replica_serves_and_revocations_still_arrive() {
    let mut cluster = Cluster::start(3, 1);
    let upstream = Upstream::start().await;
    let ns = namespace("cluster-failover");
    let store = cluster_store(&cluster, &ns);
    // Keys until some live on master 0 and some elsewhere.
    let (mut on_victim, mut elsewhere) = (Vec::new(), Vec::new());
    while on_victim.len() < 3 || elsewhere.len() < 3 {
        let k = create_key(&*store, "acme", "member").await;
        let (id, key) = (k.record.id.clone(), k.secret.expose().to_owned());
        if cluster.master_of(&record_key(&ns, &key)) == 0 {
            on_victim.push((id, key));
        } else {
            elsewhere.push((id, key));
        }
    }
    let kg = Keygate::start(cluster_config(&cluster, &[1, 2], &ns, &upstream.url())).await;
    kg.wait_ready().await;
    let http = Http::new();
    for (_, k) in on_victim.iter().chain(&elsewhere) {
        assert_eq!(status_of(&http, &kg, k).await.0, 200);
    }

    cluster.nodes[0].kill();
    let killed = std::time::Instant::now();
    // Fail closed: once the dead master's cached verdicts are no longer trusted, its keys get
    // 503, never a verdict the cluster cannot confirm.
    let victim = on_victim[0].1.clone();
    eventually(
        Duration::from_secs(10),
        "a key on the killed master gets 503",
        || {
            let (http, url, key) = (http.clone(), kg.url("/"), victim.clone());
            async move { http.get_with_key(&url, &key).await.status == 503 }
        },
    )
    .await;
    let failed_closed = killed.elapsed();
    // Keys on the other masters keep working.
    assert_eq!(status_of(&http, &kg, &elsewhere[0].1).await.0, 200);

    // The replica takes over; keygate serves its keys again without a restart.
    eventually(
        Duration::from_secs(30),
        "the replica of master 0 is promoted",
        || {
            let promoted = cluster.nodes[cluster.masters..]
                .iter()
                .any(|n| n.is_master());
            async move { promoted }
        },
    )
    .await;
    let promoted = killed.elapsed();
    cluster.wait_ok(Duration::from_secs(30));
    // A bound for liveness only (how soon is measured, not asserted: see the README): the
    // subscription's next attempt, at most a second away, and the slot map's refresh.
    for (_, k) in &on_victim {
        wait_for_status_within(
            Duration::from_secs(10),
            &http,
            &kg,
            k,
            200,
            "a key of the failed-over master serves again",
        )
        .await;
    }
    let serving = killed.elapsed();
    kg.wait_ready().await;
    eprintln!(
        "master SIGKILLed: 503 at {failed_closed:?}, replica promoted by {promoted:?}, \
         its keys served again at {serving:?}, ready at {:?}",
        killed.elapsed()
    );

    // Cached again (the cache lives an hour): a revocation after the failover, of a key on the
    // promoted replica and of one elsewhere, is enforced through the new subscription.
    for (_, k) in [&on_victim[1], &elsewhere[1]] {
        assert_eq!(status_of(&http, &kg, k).await.0, 200);
    }
    for (id, _) in [&on_victim[1], &elsewhere[1]] {
        store.revoke(id, keygate::store::now_unix()).await.unwrap();
    }
    for (_, k) in [&on_victim[1], &elsewhere[1]] {
        wait_for_status(
            &http,
            &kg,
            k,
            401,
            "a revocation after the failover arrives",
        )
        .await;
    }
    kg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_to_another_master_keeps_its_revocations_arriving() {
    let cluster = Cluster::start(3, 0);
    let upstream = Upstream::start().await;
    let ns = namespace("cluster-reshard");
    let store = cluster_store(&cluster, &ns);
    let (id, key) = loop {
        let k = create_key(&*store, "acme", "member").await;
        let key = k.secret.expose().to_owned();
        if cluster.master_of(&record_key(&ns, &key)) == 0 {
            break (k.record.id.clone(), key);
        }
    };
    let kg = Keygate::start(cluster_config(&cluster, &[1], &ns, &upstream.url())).await;
    kg.wait_ready().await;
    let http = Http::new();
    assert_eq!(status_of(&http, &kg, &key).await.0, 200);
    let subscribed = kg.scrape().await.get("keygate_cache_flushes_total");

    // The bucket's slot, its record and its shard channel move to master 1. The subscription
    // on master 0 for that channel ends; keygate must subscribe again where the slot is now.
    let record = record_key(&ns, &key);
    cluster.move_slot_of(&record, 0, 1);
    assert_eq!(cluster.master_of(&record), 1);
    eventually(
        Duration::from_secs(10),
        "keygate subscribes again after the slot moved",
        || {
            let kg = &kg;
            async move { kg.scrape().await.get("keygate_cache_flushes_total") > subscribed }
        },
    )
    .await;
    kg.wait_ready().await;
    assert_eq!(status_of(&http, &kg, &key).await.0, 200);

    // Revoked on the slot's new master: the cached verdict ends at once.
    store.revoke(&id, keygate::store::now_unix()).await.unwrap();
    wait_for_status(
        &http,
        &kg,
        &key,
        401,
        "a revocation on the slot's new master arrives",
    )
    .await;
    kg.shutdown().await;
}

#[tokio::test]
async fn without_a_reachable_node_keygate_starts_unready_and_fails_closed() {
    let upstream = Upstream::start().await;
    let ns = namespace("cluster-down");
    let mut cfg = test_config(
        &format!("redis://:{PASSWORD}@unused.invalid:1"),
        &ns,
        &upstream.url(),
    );
    cfg.store.cluster_nodes = vec![format!("127.0.0.1:{}", free_port())];
    let kg = Keygate::start(cfg).await;
    let http = Http::new();
    let ready = http.get(&kg.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(
        !ready.text().contains(PASSWORD),
        "the password is never shown: {}",
        ready.text()
    );
    let key = keygate::key::generate(keygate::key::KeyKind::User);
    let (status, code) = status_of(&http, &kg, key.secret.expose()).await;
    assert_eq!((status, code.as_str()), (503, "store_unavailable"));
    kg.shutdown().await;
}
