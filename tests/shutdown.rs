//! Graceful shutdown of the real binary: SIGTERM lets in-flight requests finish, then the
//! process exits 0.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_slow_request_finish_then_exits_zero() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("shutdown");
    let store = redis_store(&redis, &ns);
    let key = create_key(&*store, "acme", "admin").await;

    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--upstream", &upstream.url()])
        .args(["--redis-url", &redis.url(), "--namespace", &ns])
        .env("RUST_LOG", "info")
        .env_remove("KEYGATE__SERVER__LISTEN")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The startup log line names the bound addresses.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let proxy = loop {
        let line = lines
            .next()
            .expect("keygate exited before serving")
            .unwrap();
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});

    let http = Http::new();
    let url = format!("http://{proxy}/hold");
    let secret = key.secret.expose().to_owned();
    let in_flight = tokio::spawn({
        let http = http.clone();
        async move { http.get_with_key(&url, &secret).await }
    });
    upstream.held_request_arrived().await;

    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());

    // Shutdown has begun once the listener stops accepting.
    eventually(Duration::from_secs(10), "the proxy listener closes", || {
        let proxy = proxy.clone();
        async move { tokio::net::TcpStream::connect(&proxy).await.is_err() }
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited with a request in flight"
    );

    upstream.release();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "held and released");

    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}
