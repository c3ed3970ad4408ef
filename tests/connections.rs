//! Connections under attack: connections that never send a request, idle keep-alive
//! connections, a flood past the connection cap and past the process's descriptor limit.
//! Real Redis, a real upstream, keygate in-process on port 0 or as a child process with its
//! own descriptor limit, and real sockets.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Slack on every bound: the time a loaded machine may add before keygate acts on a deadline.
const SLACK: Duration = Duration::from_secs(3);

/// The first bytes of an HTTP/2 connection preface, and no more.
const PARTIAL_PREFACE: &[u8] = b"PRI * HTT";

struct Rig {
    _redis: RedisServer,
    _upstream: Upstream,
    keygate: Keygate,
    auth: String,
}

async fn rig(tweak: impl FnOnce(&mut keygate::config::Config)) -> Rig {
    rig_in_front_of(None, tweak).await
}

async fn rig_in_front_of(
    upstream_url: Option<String>,
    tweak: impl FnOnce(&mut keygate::config::Config),
) -> Rig {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("conn");
    let store = redis_store(&redis, &ns);
    let url = upstream_url.unwrap_or_else(|| upstream.url());
    let mut config = test_config(&redis.url(), &ns, &url);
    tweak(&mut config);
    let keygate = Keygate::start(config).await;
    keygate.wait_ready().await;
    let key = create_key(&*store, "acme", "admin").await;
    Rig {
        _redis: redis,
        _upstream: upstream,
        keygate,
        auth: format!("Bearer {}", key.secret.expose()),
    }
}

/// Opens a connection, sends `bytes`, and returns it with the moment just before the connect
/// (keygate's deadlines run from its accept, which comes after).
async fn open(addr: SocketAddr, bytes: &[u8]) -> (TcpStream, Instant) {
    let before = Instant::now();
    let mut s = within(Duration::from_secs(5), "connect", TcpStream::connect(addr))
        .await
        .unwrap();
    if !bytes.is_empty() {
        s.write_all(bytes).await.unwrap();
    }
    (s, before)
}

/// Waits for keygate to close `s`; how long after `since` it did. Fails past `limit`.
async fn wait_closed(s: &mut TcpStream, since: Instant, limit: Duration, what: &str) -> Duration {
    closed_within(s, limit)
        .await
        .unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
    since.elapsed()
}

async fn scrape(admin: SocketAddr) -> Scrape {
    let url = format!("http://{admin}/metrics");
    let reply = within(
        Duration::from_secs(5),
        "/metrics",
        Http::new().get(&url, &[]),
    )
    .await;
    Scrape::parse(&reply.text())
}

async fn readyz(admin: SocketAddr) -> (u16, serde_json::Value) {
    let url = format!("http://{admin}/readyz");
    // A new client, so a new connection: the way a kubelet probes.
    let reply = within(
        Duration::from_secs(2),
        "/readyz answers",
        Http::new().get(&url, &[]),
    )
    .await;
    (reply.status.as_u16(), reply.json())
}

#[tokio::test]
async fn connections_that_never_complete_a_request_head_are_closed_at_the_header_read_timeout() {
    let timeout = Duration::from_millis(500);
    let r = rig(|c| {
        c.server.header_read_timeout = "500ms".into();
        c.server.idle_timeout = "60s".into();
    })
    .await;
    let partial_h1 = b"GET / HTTP/1.1\r\nhost: a".as_slice();
    let mut open_ones = Vec::new();
    for (what, bytes) in [
        ("silent", b"".as_slice()),
        ("partial HTTP/2 preface", PARTIAL_PREFACE),
        (
            "whole HTTP/2 preface, no request",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(),
        ),
        ("partial HTTP/1.1 head", partial_h1),
    ] {
        open_ones.push((what, open(r.keygate.proxy, bytes).await));
    }
    for (what, (mut s, since)) in open_ones {
        let took = wait_closed(&mut s, since, timeout + SLACK, what).await;
        assert!(
            took >= timeout,
            "{what}: closed after {took:?}, before {timeout:?}"
        );
    }
    let m = r.keygate.scrape().await;
    assert_eq!(
        m.get("keygate_connections_timed_out_total{kind=\"head\",listener=\"proxy\"}"),
        4.0,
        "{}",
        m.text
    );
}

#[tokio::test]
async fn an_idle_connection_is_closed_at_the_idle_timeout_on_both_protocols() {
    let (head, idle) = (Duration::from_millis(300), Duration::from_secs(1));
    let r = rig(|c| {
        c.server.header_read_timeout = "300ms".into();
        c.server.idle_timeout = "1s".into();
    })
    .await;
    let auth = [("authorization", r.auth.as_str())];

    // HTTP/1.1: idle longer than the head timeout is fine (no request is being read); the idle
    // timeout closes it.
    let mut h1 = KeptAlive::connect(r.keygate.proxy).await;
    assert_eq!(h1.get("/a", &auth, SLACK).await.unwrap().0, 200);
    // The scenario is time passing with nothing sent.
    tokio::time::sleep(head * 2).await;
    let (status, _) = h1
        .get("/b", &auth, SLACK)
        .await
        .expect("still open after 2 × header_read_timeout");
    assert_eq!(status, 200);
    let since = Instant::now();
    within(
        idle + SLACK,
        "keygate closes the idle HTTP/1.1 connection",
        h1.closed(),
    )
    .await;
    assert!(
        since.elapsed() >= idle - Duration::from_millis(50),
        "closed after {:?}",
        since.elapsed()
    );

    // HTTP/2: an idle connection gets a GOAWAY and is closed.
    let stream = TcpStream::connect(r.keygate.proxy).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(r.keygate.url("/h2"))
        .header("authorization", &r.auth)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = within(SLACK, "an HTTP/2 answer", h2.send_request(req))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let since = Instant::now();
    within(
        idle + SLACK,
        "keygate closes the idle HTTP/2 connection",
        conn,
    )
    .await
    .unwrap()
    .expect("a clean close (GOAWAY)");
    assert!(
        since.elapsed() >= idle - Duration::from_millis(50),
        "closed after {:?}",
        since.elapsed()
    );

    let m = r.keygate.scrape().await;
    assert_eq!(
        m.get("keygate_connections_timed_out_total{kind=\"idle\",listener=\"proxy\"}"),
        2.0
    );
}

#[tokio::test]
async fn a_later_request_head_must_be_complete_within_the_header_read_timeout_of_its_first_byte() {
    let head = Duration::from_millis(500);
    let r = rig(|c| {
        c.server.header_read_timeout = "500ms".into();
        c.server.idle_timeout = "60s".into();
    })
    .await;
    let request = format!(
        "GET /first HTTP/1.1\r\nhost: a\r\nauthorization: {}\r\n\r\n",
        r.auth
    );
    let (mut s, _) = open(r.keygate.proxy, request.as_bytes()).await;
    let mut buf = vec![0u8; 4096];
    let n = within(
        SLACK,
        "the first answer",
        tokio::io::AsyncReadExt::read(&mut s, &mut buf),
    )
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200 "));
    // The next head starts and stalls: the idle timeout (60 s) no longer applies, the head's does.
    let since = Instant::now();
    s.write_all(b"GET /second HTTP/1.1\r\n").await.unwrap();
    let took = wait_closed(&mut s, since, head + SLACK, "a stalled second head").await;
    assert!(
        took >= head - Duration::from_millis(50),
        "closed after {took:?}"
    );
}

/// An upstream that answers at once and then streams its body slowly: a chunk every 200 ms
/// for `chunks` chunks.
async fn slow_body_upstream(chunks: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    let frames = futures_util::stream::unfold(0, move |i| async move {
                        if i == chunks {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Some((
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"chunk\n"))),
                            i + 1,
                        ))
                    });
                    Ok::<_, Infallible>(http::Response::new(StreamBody::new(frames)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_response_that_streams_longer_than_the_idle_timeout_is_not_cut() {
    let upstream = slow_body_upstream(8).await;
    let r = rig_in_front_of(Some(upstream), |c| {
        c.server.header_read_timeout = "300ms".into();
        c.server.idle_timeout = "500ms".into();
    })
    .await;
    let mut client = KeptAlive::connect(r.keygate.proxy).await;
    // 8 chunks, 200 ms apart: 1.6 s, more than three idle timeouts.
    let (status, body) = client
        .get(
            "/slow",
            &[("authorization", &r.auth)],
            Duration::from_secs(10),
        )
        .await
        .expect("the whole body");
    assert_eq!(status, 200);
    assert_eq!(body.len(), 8 * 6);
    let m = r.keygate.scrape().await;
    assert_eq!(
        m.get("keygate_connections_timed_out_total{kind=\"idle\",listener=\"proxy\"}"),
        0.0
    );
}

#[tokio::test]
async fn past_the_cap_connections_are_refused_while_admitted_clients_and_probes_are_served() {
    let r = rig(|c| {
        c.server.max_connections = 4;
        c.server.admin_max_connections = 2;
        c.server.header_read_timeout = "1s".into();
    })
    .await;
    let auth = [("authorization", r.auth.as_str())];
    let mut client = KeptAlive::connect(r.keygate.proxy).await;
    assert_eq!(client.get("/", &auth, SLACK).await.unwrap().0, 200);

    // Three silent connections fill the cap; a fifth is closed at once, unanswered.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(open(r.keygate.proxy, b"").await);
    }
    // Workers accept in any order: wait until all four are admitted, so the next is the fifth.
    eventually(SLACK, "four proxy connections admitted", || async {
        r.keygate
            .scrape()
            .await
            .get("keygate_open_connections{listener=\"proxy\"}")
            == 4.0
    })
    .await;
    let (mut refused, since) = open(r.keygate.proxy, b"").await;
    let took = wait_closed(&mut refused, since, SLACK, "the connection over the cap").await;
    assert!(
        took < Duration::from_secs(1),
        "refused at once, not timed out: {took:?}"
    );
    assert_eq!(
        client.get("/", &auth, SLACK).await.unwrap().0,
        200,
        "admitted clients are served"
    );

    // The admin listener has its own cap: probes answer, and say why the instance is not ready.
    let (status, body) = readyz(r.keygate.admin).await;
    assert_eq!(status, 503, "{body}");
    let reasons = body["reasons"].to_string();
    assert!(reasons.contains("refused"), "{reasons}");
    assert!(reasons.contains("server.max_connections"), "{reasons}");

    // The silent ones are closed at their deadline, and readiness comes back by itself.
    for (mut s, since) in silent {
        wait_closed(&mut s, since, Duration::from_secs(1) + SLACK, "silent").await;
    }
    eventually(Duration::from_secs(15), "ready again", || async {
        readyz(r.keygate.admin).await.0 == 200
    })
    .await;

    // Past the admin cap too: refused and counted under its own listener.
    let admin_silent = [
        open(r.keygate.admin, b"").await,
        open(r.keygate.admin, b"").await,
    ];
    let (mut over, since) = open(r.keygate.admin, b"").await;
    wait_closed(&mut over, since, SLACK, "the admin connection over its cap").await;
    drop(admin_silent);
    let m = scrape(r.keygate.admin).await;
    assert_eq!(
        m.get("keygate_connections_refused_total{listener=\"proxy\"}"),
        1.0
    );
    assert!(m.get("keygate_connections_refused_total{listener=\"admin\"}") >= 1.0);
    assert_eq!(
        m.get("keygate_connections_timed_out_total{kind=\"head\",listener=\"proxy\"}"),
        3.0
    );
}

/// Starts the keygate binary with a descriptor limit of 1,024 in front of a real upstream and
/// Redis; returns it with a key's `Authorization` value.
async fn limited_keygate(
    redis: &RedisServer,
    upstream: &Upstream,
    env: &[(&str, &str)],
) -> (KeygateProcess, String) {
    let ns = namespace("limited");
    let store = redis_store(redis, &ns);
    let key = create_key(&*store, "acme", "admin").await;
    let (redis_url, upstream_url) = (redis.url(), upstream.url());
    let args = [
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
    ];
    let kg = KeygateProcess::start(&args, env, 1024);
    eventually(Duration::from_secs(15), "the binary is ready", || async {
        readyz(kg.admin).await.0 == 200
    })
    .await;
    (kg, format!("Bearer {}", key.secret.expose()))
}

/// A client on one keep-alive connection, sending a request every few milliseconds until
/// stopped: how many were served, and the first failure.
fn keep_serving(
    mut client: KeptAlive,
    auth: String,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let (status, _) = client
                .get("/", &[("authorization", &auth)], Duration::from_secs(2))
                .await?;
            if status != 200 {
                return Err(format!("answered {status}"));
            }
            served.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    })
}

/// Opens `n` connections that send nothing or a partial HTTP/2 preface (alternately) and waits
/// for keygate to close each: refused at once or timed out. Fails if one stays open past
/// `limit` after its connect.
async fn flood(addr: SocketAddr, n: usize, limit: Duration) {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(async move {
                let bytes = if i % 2 == 0 {
                    b"".as_slice()
                } else {
                    PARTIAL_PREFACE
                };
                let before = Instant::now();
                let mut s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
                    .await
                    .map_err(|_| format!("connection {i}: no connect within 10s"))?
                    .map_err(|e| format!("connection {i}: {e}"))?;
                let _ = s.write_all(bytes).await;
                closed_within(&mut s, limit)
                    .await
                    .map(|_| before.elapsed())
                    .ok_or_else(|| format!("connection {i}: still open after {limit:?}"))
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_do_not_starve_a_keep_alive_client_under_1024_descriptors() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let head = Duration::from_secs(2);
    let (kg, auth) = limited_keygate(
        &redis,
        &upstream,
        &[("KEYGATE__SERVER__HEADER_READ_TIMEOUT", "2s")],
    )
    .await;

    let mut client = KeptAlive::connect(kg.proxy).await;
    let first = client
        .get("/", &[("authorization", &auth)], SLACK)
        .await
        .unwrap();
    assert_eq!(first.0, 200);
    let (stop, served) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let serving = keep_serving(client, auth, stop.clone(), served.clone());

    // 2,000 connections, half silent, half a partial HTTP/2 preface. keygate's deadline runs
    // from its accept; a connection the kernel could not queue at once waits in TCP's
    // retransmission backoff first, hence the wide bound (the exact one is tested above).
    let flooding = tokio::spawn(flood(kg.proxy, 2000, head + SLACK * 5));
    // While it lasts, a probe on a new connection answers, and says the instance is refusing
    // connections.
    eventually(
        Duration::from_secs(10),
        "/readyz reports the refusals",
        || async {
            let (status, body) = readyz(kg.admin).await;
            status == 503 && body["reasons"].to_string().contains("refused")
        },
    )
    .await;
    within(
        Duration::from_secs(60),
        "every flood connection is closed",
        flooding,
    )
    .await
    .unwrap();
    // Refusals stop with the flood, and readiness comes back.
    eventually(
        Duration::from_secs(15),
        "/readyz is ready again",
        || async { readyz(kg.admin).await.0 == 200 },
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    within(SLACK, "the client stops", serving)
        .await
        .unwrap()
        .expect("the keep-alive client was served throughout");
    assert!(
        served.load(Ordering::Relaxed) > 100,
        "served {}",
        served.load(Ordering::Relaxed)
    );

    let m = scrape(kg.admin).await;
    let refused = m.get("keygate_connections_refused_total{listener=\"proxy\"}");
    let timed_out = m.get("keygate_connections_timed_out_total{kind=\"head\",listener=\"proxy\"}");
    assert_eq!(
        refused + timed_out,
        2000.0,
        "every flood connection accounted for:\n{}",
        m.text
    );
    assert!(
        refused > 0.0 && timed_out > 0.0,
        "refused {refused}, timed out {timed_out}"
    );
    assert_eq!(
        m.get("keygate_accept_errors_total{listener=\"proxy\"}"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_failures_from_descriptor_exhaustion_make_the_instance_unready() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    // A cap above what 1,024 descriptors allow: the flood exhausts them.
    let (kg, auth) = limited_keygate(
        &redis,
        &upstream,
        &[
            ("KEYGATE__SERVER__HEADER_READ_TIMEOUT", "2s"),
            ("KEYGATE__SERVER__MAX_CONNECTIONS", "3000"),
        ],
    )
    .await;
    // Probe and client connections opened (and used, so only the idle timeout applies to
    // them) before the descriptors run out.
    let mut probe = KeptAlive::connect(kg.admin).await;
    assert_eq!(probe.get("/healthz", &[], SLACK).await.unwrap().0, 200);
    let mut client = KeptAlive::connect(kg.proxy).await;
    assert_eq!(
        client
            .get("/", &[("authorization", &auth)], SLACK)
            .await
            .unwrap()
            .0,
        200
    );

    // Held open, not waited on: once the descriptors run out, connections wait in the
    // kernel's accept queue with TCP's backoff, which no deadline of keygate's can shorten.
    let held = hold_open(kg.proxy, 1500).await;
    let mut unready = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let (status, body) = probe
            .get("/readyz", &[], Duration::from_secs(2))
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&body).into_owned();
        if status == 503 && body.contains("accept") {
            unready = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = unready.expect("/readyz reports failing accepts");
    assert!(body.contains("Too many open files"), "{body}");
    // The established client is still served.
    assert_eq!(
        client
            .get("/", &[("authorization", &auth)], SLACK)
            .await
            .unwrap()
            .0,
        200
    );
    let (_, metrics) = probe.get("/metrics", &[], SLACK).await.unwrap();
    let m = Scrape::parse(&String::from_utf8_lossy(&metrics));
    assert!(
        m.get("keygate_accept_errors_total{listener=\"proxy\"}") > 0.0,
        "{}",
        m.text
    );

    // Once the descriptors are back, so is readiness.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = probe
            .get("/readyz", &[], Duration::from_secs(2))
            .await
            .unwrap();
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still unready: {}",
            String::from_utf8_lossy(&body)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens `n` connections at once (each given 5 s to connect) and keeps those that connected.
async fn hold_open(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
            })
        })
        .collect();
    let mut held = Vec::new();
    for t in tasks {
        if let Ok(Ok(Ok(s))) = t.await {
            held.push(s);
        }
    }
    held
}
