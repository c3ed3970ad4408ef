//! A valid client's latency during a connection flood: does a keep-alive client keep its usual
//! latency while 2,000 connections that never send a request (half silent, half a partial
//! HTTP/2 preface) press on a keygate whose file descriptor limit is 1,024?
//!
//! `cargo bench --bench flood` starts a real Redis, a fast upstream, and the release `keygate`
//! binary as a child with `RLIMIT_NOFILE` 1,024 (its default cap: 444 proxy connections on 2
//! workers) and `server.header_read_timeout` 2 s. One client sends GETs back to back over one
//! keep-alive connection for `FLOOD_SECONDS` (default 4) per phase, in three phases repeated
//! `FLOOD_ROUNDS` times (default 3), interleaved:
//! - `quiet`: no flood;
//! - `2,000 held`: 2,000 flood connections kept up from a thread of their own; each one keygate
//!   closes (refused at the cap, or timed out after 2 s) is opened again 1 s later;
//! - `reconnect storm`: the same 2,000, each opened again at once, as fast as the machine
//!   allows (a connection-rate attack on top of the idle one).
//!
//! Under `cargo test` (no `--bench`) it only checks that it was built.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{create_key, namespace, redis_store, KeptAlive, KeygateProcess, RedisServer, Scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("flood bench: run it with `cargo bench --bench flood`");
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

/// Latencies of back-to-back GETs on `client` for `length`.
async fn measure(client: &mut KeptAlive, auth: &str, length: Duration) -> Vec<Duration> {
    let mut took = Vec::new();
    let end = Instant::now() + length;
    while Instant::now() < end {
        let started = Instant::now();
        let (status, _) = client
            .get("/", &[("authorization", auth)], Duration::from_secs(5))
            .await
            .expect("the keep-alive client is served");
        assert_eq!(status, 200);
        took.push(started.elapsed());
    }
    took.sort();
    took
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{} µs", d.as_micros())
}

async fn metrics(admin: SocketAddr) -> Scrape {
    let mut probe = KeptAlive::connect(admin).await;
    let (_, body) = probe
        .get("/metrics", &[], Duration::from_secs(5))
        .await
        .unwrap();
    Scrape::parse(&String::from_utf8_lossy(&body))
}

/// The phases, in the order each round runs them: a name and the flood's reconnect delay.
const PHASES: [(&str, Option<Duration>); 3] = [
    ("quiet", None),
    ("2,000 held", Some(Duration::from_secs(1))),
    ("reconnect storm", Some(Duration::ZERO)),
];

async fn run() {
    let length = Duration::from_secs(env_num("FLOOD_SECONDS", 4));
    let rounds = env_num("FLOOD_ROUNDS", 3);
    let redis = RedisServer::start();
    let ns = namespace("flood");
    let store = redis_store(&redis, &ns);
    let key = create_key(&*store, "acme", "admin").await;
    let auth = format!("Bearer {}", key.secret.expose());
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}", upstream.local_addr().unwrap());
    tokio::spawn(support::serve_fast_upstream(upstream));
    let redis_url = redis.url();
    let kg = KeygateProcess::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream_url,
            "--redis-url",
            &redis_url,
            "--namespace",
            &ns,
        ],
        &[("KEYGATE__SERVER__HEADER_READ_TIMEOUT", "2s")],
        1024,
    );
    let mut client = KeptAlive::connect(kg.proxy).await;
    // Warm up: the connection, the upstream pool, the cache.
    measure(&mut client, &auth, Duration::from_millis(500)).await;

    let mut latencies: Vec<Vec<Duration>> = vec![Vec::new(); PHASES.len()];
    let mut opened = vec![0u64; PHASES.len()];
    for _ in 0..rounds {
        for (i, (_, reconnect)) in PHASES.iter().enumerate() {
            let flood = reconnect.map(|delay| {
                let flood = Flood::start(kg.proxy, 2000, delay);
                (flood, Instant::now() + Duration::from_secs(30))
            });
            if let Some((_, deadline)) = &flood {
                // Measured once the cap is full and keygate refuses connections.
                loop {
                    let m = metrics(kg.admin).await;
                    if m.get("keygate_open_connections{listener=\"proxy\"}") >= 400.0 {
                        break;
                    }
                    assert!(Instant::now() < *deadline, "the flood did not fill the cap");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            latencies[i].extend(measure(&mut client, &auth, length).await);
            if let Some((flood, _)) = flood {
                opened[i] += flood.stop();
            }
        }
    }

    println!(
        "| phase | requests | p50 | p99 | p99.9 | max | flood connections opened per second |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let measured = length.as_secs_f64() * rounds as f64;
    for (i, (name, _)) in PHASES.iter().enumerate() {
        let l = &mut latencies[i];
        l.sort();
        println!(
            "| {name} | {} | {} | {} | {} | {} | {:.0} |",
            l.len(),
            us(quantile(l, 0.5)),
            us(quantile(l, 0.99)),
            us(quantile(l, 0.999)),
            us(*l.last().unwrap()),
            opened[i] as f64 / measured,
        );
    }
    let m = metrics(kg.admin).await;
    println!(
        "keygate refused {} connections and timed out {} (no request head in 2 s); accept errors: {}",
        m.get("keygate_connections_refused_total{listener=\"proxy\"}"),
        m.get("keygate_connections_timed_out_total{kind=\"head\",listener=\"proxy\"}"),
        m.get("keygate_accept_errors_total{listener=\"proxy\"}"),
    );
    drop((kg, redis));
}

/// `n` connections pressed on `addr` from a thread of their own: half send nothing, half a
/// partial HTTP/2 preface, and each one keygate closes is opened again after `reconnect`.
struct Flood {
    stop: tokio::sync::watch::Sender<bool>,
    opened: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Flood {
    fn start(addr: SocketAddr, n: usize, reconnect: Duration) -> Self {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let opened = Arc::new(AtomicU64::new(0));
        let counted = opened.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let tasks: Vec<_> = (0..n)
                    .map(|i| {
                        let (mut stopped, counted) = (stopped.clone(), counted.clone());
                        tokio::spawn(async move {
                            let bytes: &[u8] = if i % 2 == 0 { b"" } else { b"PRI * HTT" };
                            while !*stopped.borrow() {
                                let connect = TcpStream::connect(addr);
                                let Ok(Ok(mut s)) =
                                    tokio::time::timeout(Duration::from_secs(5), connect).await
                                else {
                                    continue;
                                };
                                counted.fetch_add(1, Ordering::Relaxed);
                                let _ = s.write_all(bytes).await;
                                let mut buf = [0u8; 64];
                                tokio::select! {
                                    _ = s.read(&mut buf) => {}
                                    _ = stopped.changed() => return,
                                }
                                drop(s);
                                if !reconnect.is_zero() {
                                    tokio::select! {
                                        _ = tokio::time::sleep(reconnect) => {}
                                        _ = stopped.changed() => return,
                                    }
                                }
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        Flood {
            stop,
            opened,
            thread,
        }
    }

    /// Stops the flood; how many connections it opened.
    fn stop(self) -> u64 {
        let _ = self.stop.send(true);
        let _ = self.thread.join();
        self.opened.load(Ordering::Relaxed)
    }
}
