//! The Redis store against a real `redis-server`: its time bound, its error messages, and
//! scripts that write nothing when they refuse.

mod common;

use std::time::{Duration, Instant};

use common::*;

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
