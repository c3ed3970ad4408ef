//! Revocation propagation: the time from a revocation's publish to the first rejection of the
//! key on each of three keygate instances sharing one Redis.
//!
//! Everything is real and on loopback: a `redis-server` on a free port, an upstream HTTP server,
//! three keygate instances in-process (each with its own cache and its own subscription), and an
//! HTTP client. Every key is cached on every instance first, so only the invalidation message can
//! turn its 200 into a 401. For each key, one task per instance polls it back to back while the
//! revocation (the Lua script that writes the record and publishes) is issued; the clock starts
//! just before that call.
//!
//! `cargo bench --bench revocation` runs 1,000 revocations (`REVOCATIONS=N` to change it) and
//! prints p50/p99/max per instance. Under `cargo test` it runs a short smoke pass.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use keygate::store::{now_unix, Store};

const INSTANCES: usize = 3;
/// A key not rejected this long after its revocation counts as a failure.
const GIVE_UP: Duration = Duration::from_secs(5);

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let revocations: usize = std::env::var("REVOCATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 1000 } else { 20 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(revocations));
}

async fn run(revocations: usize) {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("bench-revoke");
    let store = redis_store(&redis, &ns);
    let mut instances = Vec::new();
    for _ in 0..INSTANCES {
        let mut config = test_config(&redis.url(), &ns, &upstream.url());
        // Long cache lives: only the invalidation can end a cached verdict.
        config.cache.ttl = "1h".into();
        let kg = Keygate::start(config).await;
        kg.wait_ready().await;
        instances.push(kg);
    }
    let http = Http::new();

    let mut keys = Vec::with_capacity(revocations);
    for _ in 0..revocations {
        let key = create_key(&*store, "bench", "admin").await;
        for kg in &instances {
            let status = http
                .get_with_key(&kg.url("/"), key.secret.expose())
                .await
                .status;
            assert_eq!(status, 200, "a fresh key must be accepted");
        }
        keys.push(key);
    }

    // samples[i]: microseconds from the revoke call to instance i's first 401.
    let mut samples: Vec<Vec<u64>> = (0..INSTANCES)
        .map(|_| Vec::with_capacity(revocations))
        .collect();
    for key in &keys {
        let started = Instant::now();
        let pollers = instances.iter().map(|kg| {
            let (http, url, secret) = (http.clone(), kg.url("/"), key.secret.expose().to_owned());
            tokio::spawn(async move {
                loop {
                    let status = http.get_with_key(&url, &secret).await.status;
                    let waited = started.elapsed();
                    if status == 401 {
                        return waited;
                    }
                    assert_eq!(status, 200, "unexpected answer while polling");
                    assert!(
                        waited < GIVE_UP,
                        "a revoked key was still accepted after {waited:?}"
                    );
                }
            })
        });
        let pollers: Vec<_> = pollers.collect();
        let revoked = store.revoke(&key.record.id, now_unix()).await.unwrap();
        assert!(revoked.is_some(), "the key exists");
        for (i, poller) in pollers.into_iter().enumerate() {
            samples[i].push(poller.await.unwrap().as_micros() as u64);
        }
    }

    println!("revocation propagation over {revocations} revocations, {INSTANCES} instances");
    println!("(time from the revoke call to the instance's first 401, in milliseconds)");
    println!("{:<10} {:>8} {:>8} {:>8}", "instance", "p50", "p99", "max");
    let mut all = Vec::new();
    for (i, s) in samples.iter_mut().enumerate() {
        print_row(&format!("{}", i + 1), s);
        all.extend_from_slice(s);
    }
    print_row("all", &mut all);
    for kg in instances {
        kg.shutdown().await;
    }
}

fn print_row(label: &str, samples: &mut [u64]) {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i] as f64 / 1000.0
    };
    println!(
        "{label:<10} {:>8.3} {:>8.3} {:>8.3}",
        at(0.50),
        at(0.99),
        at(1.0)
    );
}
