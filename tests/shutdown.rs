//! Graceful shutdown of the real binary: SIGTERM lets in-flight requests finish, then the
//! process exits 0.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The child process, killed if the test fails before it has exited.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_slow_request_finish_then_exits_zero() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("shutdown");
    let store = redis_store(&redis, &ns);
    let key = create_key(&*store, "acme", "admin").await;

    let mut child = Guard(
        Command::new(env!("CARGO_BIN_EXE_keygate"))
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
            .unwrap(),
    );

    // The startup log line names the bound addresses. stderr is read on a thread of its own
    // (and kept drained, so the child never blocks on a full pipe); the test waits for the
    // line with a deadline.
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let proxy = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = line_rx
            .recv_timeout(left)
            .expect("keygate logged no listen address within 10s (or exited)");
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };

    let http = Http::new();
    let url = format!("http://{proxy}/hold");
    let secret = key.secret.expose().to_owned();
    let in_flight = tokio::spawn({
        let http = http.clone();
        async move { http.get_with_key(&url, &secret).await }
    });
    upstream.held_request_arrived().await;

    let pid = child.0.id().to_string();
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
        child.0.try_wait().unwrap().is_none(),
        "exited with a request in flight"
    );

    upstream.release();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "held and released");

    let mut status = None;
    eventually(Duration::from_secs(10), "keygate exits", || {
        status = child.0.try_wait().unwrap();
        std::future::ready(status.is_some())
    })
    .await;
    let status = status.unwrap();
    assert!(status.success(), "exit status {status:?}");
}
