//! The authenticating reverse proxy end to end: real Redis, real upstream, keygate on port 0.

mod common;

use std::time::Duration;

use common::*;
use keygate::key::{generate, KeyKind};

struct Rig {
    redis: RedisServer,
    upstream: Upstream,
    store: std::sync::Arc<keygate::store::redis::RedisStore>,
    keygate: Keygate,
    http: Http,
    ns: String,
}

async fn rig() -> Rig {
    rig_with(|_| {}).await
}

async fn rig_with(tweak: impl FnOnce(&mut keygate::config::Config)) -> Rig {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("proxy");
    let store = redis_store(&redis, &ns);
    let mut config = test_config(&redis.url(), &ns, &upstream.url());
    tweak(&mut config);
    let keygate = Keygate::start(config).await;
    // Ready means subscribed: the first subscription flushes the cache, which would otherwise
    // race a test's first request.
    keygate.wait_ready().await;
    Rig {
        redis,
        upstream,
        store,
        keygate,
        http: Http::new(),
        ns,
    }
}

#[tokio::test]
async fn valid_key_reaches_upstream_with_identity_and_without_authorization() {
    let r = rig().await;
    let key = create_key(&*r.store, "acme", "admin").await;
    let reply = r
        .http
        .get_with_key(&r.keygate.url("/things?x=1"), key.secret.expose())
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "ok");
    assert!(reply.headers.contains_key("x-request-id"));

    let seen = r.upstream.requests();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(seen[0].path, "/things");
    assert!(h.get("authorization").is_none(), "Authorization forwarded");
    assert_eq!(h["x-keygate-key-id"], key.record.id.as_str());
    assert_eq!(h["x-keygate-tenant"], "acme");
    assert_eq!(h["x-keygate-role"], "admin");
    assert_eq!(h["x-keygate-subject"], "alice");
    assert_eq!(h["x-keygate-subject-kind"], "user");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], r.keygate.proxy.to_string().as_str());
    assert_eq!(h["x-request-id"], reply.headers["x-request-id"]);
}

#[tokio::test]
async fn client_request_id_is_kept_end_to_end() {
    let r = rig().await;
    let key = create_key(&*r.store, "acme", "admin").await;
    let auth = format!("Bearer {}", key.secret.expose());
    let reply = r
        .http
        .get(
            &r.keygate.url("/"),
            &[("authorization", &auth), ("x-request-id", "trace-42")],
        )
        .await;
    assert_eq!(reply.headers["x-request-id"], "trace-42");
    assert_eq!(r.upstream.requests()[0].headers["x-request-id"], "trace-42");
    // Rejections carry the id too.
    let reply = r
        .http
        .get(&r.keygate.url("/"), &[("x-request-id", "trace-43")])
        .await;
    assert_eq!(reply.headers["x-request-id"], "trace-43");
}

#[tokio::test]
async fn spoofed_identity_headers_never_reach_the_upstream() {
    let r = rig().await;
    let key = create_key(&*r.store, "acme", "readonly").await;
    let auth = format!("Bearer {}", key.secret.expose());
    let reply = r
        .http
        .get(
            &r.keygate.url("/"),
            &[
                ("authorization", &auth),
                ("x-keygate-tenant", "other-tenant"),
                ("X-Keygate-Role", "admin"),
                ("x-keygate-impersonate", "root"),
                ("connection", "x-keygate-tenant, x-keygate-role"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let h = &r.upstream.requests()[0].headers;
    assert_eq!(h.get_all("x-keygate-tenant").iter().count(), 1);
    assert_eq!(h["x-keygate-tenant"], "acme");
    assert_eq!(h["x-keygate-role"], "readonly");
    assert!(h.get("x-keygate-impersonate").is_none());
    assert!(h.get("connection").is_none());
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let r = rig().await;
    let key = create_key(&*r.store, "acme", "admin").await;
    let auth = format!("Bearer {}", key.secret.expose());
    r.http
        .get(
            &r.keygate.url("/"),
            &[
                ("authorization", &auth),
                ("connection", "x-private"),
                ("x-private", "secret"),
                ("keep-alive", "timeout=5"),
                ("proxy-authorization", "Basic abc"),
                ("x-kept", "yes"),
            ],
        )
        .await;
    let h = &r.upstream.requests()[0].headers;
    for gone in ["x-private", "keep-alive", "proxy-authorization"] {
        assert!(h.get(gone).is_none(), "{gone} was forwarded");
    }
    assert_eq!(h["x-kept"], "yes");
}

async fn assert_unauthorized(reply: &Reply, code: &str, challenge_error: Option<&str>) {
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.error_code(), code);
    assert!(reply.json()["message"].as_str().is_some());
    let challenge = reply.headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.starts_with("Bearer realm=\"keygate\""),
        "{challenge}"
    );
    match challenge_error {
        Some(e) => assert!(challenge.contains(&format!("error=\"{e}\"")), "{challenge}"),
        None => assert!(!challenge.contains("error="), "{challenge}"),
    }
    assert_eq!(reply.headers["content-type"], "application/json");
}

#[tokio::test]
async fn every_bad_credential_gets_401_with_its_code_and_challenge() {
    let r = rig().await;
    let url = r.keygate.url("/");

    let missing = r.http.get(&url, &[]).await;
    assert_unauthorized(&missing, "missing_credentials", None).await;

    let malformed = r.http.get_with_key(&url, "kgu_not-a-real-key").await;
    assert_unauthorized(&malformed, "invalid_key", Some("invalid_token")).await;

    let unknown = generate(KeyKind::User);
    let reply = r.http.get_with_key(&url, unknown.secret.expose()).await;
    assert_unauthorized(&reply, "invalid_key", Some("invalid_token")).await;

    let expired = insert_expired_key(&*r.store).await;
    let reply = r.http.get_with_key(&url, expired.secret.expose()).await;
    assert_unauthorized(&reply, "key_expired", Some("invalid_token")).await;

    let revoked = create_key(&*r.store, "acme", "admin").await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["keys", "revoke", &revoked.record.id])
        .args(["--redis-url", &r.redis.url()])
        .args(["--namespace", &r.ns])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = r.http.get_with_key(&url, revoked.secret.expose()).await;
    assert_unauthorized(&reply, "key_revoked", Some("invalid_token")).await;

    assert!(
        r.upstream.requests().is_empty(),
        "a bad key reached the upstream"
    );
}

#[tokio::test]
async fn two_authorization_headers_are_refused() {
    let r = rig().await;
    let key = create_key(&*r.store, "acme", "admin").await;
    let auth = format!("Bearer {}", key.secret.expose());
    let reply = r
        .http
        .get(
            &r.keygate.url("/"),
            &[("authorization", &auth), ("authorization", &auth)],
        )
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.error_code(), "invalid_request");
    assert!(r.upstream.requests().is_empty());
}

#[tokio::test]
async fn malformed_tokens_cause_zero_redis_commands() {
    let r = rig().await;
    // Warm the connection so that connection set-up commands are not counted.
    let key = create_key(&*r.store, "acme", "admin").await;
    assert_eq!(
        r.http
            .get_with_key(&r.keygate.url("/"), key.secret.expose())
            .await
            .status,
        200
    );
    r.redis.reset_stats();

    let good = generate(KeyKind::User);
    let g = good.secret.expose();
    let mut bad: Vec<String> = vec![
        String::new(),
        "x".into(),
        "kgu_".into(),
        g[..g.len() - 1].to_owned(),
        format!("{g}0"),
        g.replacen("kgu_", "kgs_", 1),
        g.replacen("kgu_", "abc_", 1),
        format!("{}-{}", &g[..20], &g[21..]),
        "A".repeat(4000),
    ];
    // Flip the last checksum character.
    let mut flipped = g.to_owned().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
    bad.push(String::from_utf8(flipped).unwrap());

    for token in &bad {
        let reply = r.http.get_with_key(&r.keygate.url("/"), token).await;
        assert_eq!(reply.status, 401, "token {token:?}");
    }
    let calls = r.redis.command_calls();
    let keygate_calls: u64 = calls
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "config|resetstat"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        keygate_calls, 0,
        "malformed tokens reached Redis: {calls:?}"
    );
}

#[tokio::test]
async fn concurrent_misses_for_one_key_make_one_redis_lookup() {
    let r = rig().await;
    let key = create_key(&*r.store, "acme", "admin").await;
    r.redis.reset_stats();
    let http = Http::http2();
    let url = r.keygate.url("/");
    let auth = format!("Bearer {}", key.secret.expose());
    let requests = (0..1000).map(|_| {
        let (http, url, auth) = (http.clone(), url.clone(), auth.clone());
        tokio::spawn(async move { http.get(&url, &[("authorization", &auth)]).await.status })
    });
    for status in futures_util::future::join_all(requests).await {
        assert_eq!(status.unwrap(), 200);
    }
    let calls = r.redis.command_calls();
    assert_eq!(calls.get("hgetall"), Some(&1), "{calls:?}");
    assert_eq!(r.upstream.requests().len(), 1000);
}

#[tokio::test]
async fn unknown_keys_are_cached_negatively() {
    let r = rig().await;
    r.redis.reset_stats();
    let unknown = generate(KeyKind::User);
    for _ in 0..20 {
        let reply = r
            .http
            .get_with_key(&r.keygate.url("/"), unknown.secret.expose())
            .await;
        assert_eq!(reply.status, 401);
    }
    assert_eq!(r.redis.command_calls().get("hgetall"), Some(&1));
}

#[tokio::test]
async fn redis_down_fails_closed_and_service_resumes_without_restart() {
    let mut r = rig().await;
    let key = create_key(&*r.store, "acme", "admin").await;
    r.redis.stop();

    let reply = r
        .http
        .get_with_key(&r.keygate.url("/"), key.secret.expose())
        .await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.error_code(), "store_unavailable");
    assert_eq!(reply.headers["retry-after"], "1");
    let ready = r.http.get(&r.keygate.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 503);
    assert!(ready.text().contains("store"), "{}", ready.text());

    r.redis.restart();
    let url = r.keygate.url("/");
    let (http, secret) = (r.http.clone(), key.secret.expose().to_owned());
    eventually(
        Duration::from_secs(10),
        "keygate reconnects to Redis",
        || {
            let (http, url, secret) = (http.clone(), url.clone(), secret.clone());
            async move { http.get_with_key(&url, &secret).await.status == 200 }
        },
    )
    .await;
    // The subscription comes back too (after its backoff), and with it readiness.
    r.keygate.wait_ready().await;
}

#[tokio::test]
async fn upstream_down_is_502() {
    let redis = RedisServer::start();
    let ns = namespace("down");
    let store = redis_store(&redis, &ns);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let keygate = Keygate::start(test_config(&redis.url(), &ns, &dead)).await;
    let key = create_key(&*store, "acme", "admin").await;
    let reply = Http::new()
        .get_with_key(&keygate.url("/"), key.secret.expose())
        .await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.error_code(), "upstream_unavailable");
}

#[tokio::test]
async fn upstream_slower_than_the_timeout_is_504() {
    let r = rig_with(|c| c.upstream.timeout = "200ms".into()).await;
    let key = create_key(&*r.store, "acme", "admin").await;
    let reply = r
        .http
        .get_with_key(&r.keygate.url("/slow?ms=3000"), key.secret.expose())
        .await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.error_code(), "upstream_timeout");
}

#[tokio::test]
async fn http2_clients_are_served() {
    let r = rig().await;
    let key = create_key(&*r.store, "acme", "admin").await;
    let reply = Http::http2()
        .get_with_key(&r.keygate.url("/h2"), key.secret.expose())
        .await;
    assert_eq!(reply.status, 200);
    let seen = &r.upstream.requests()[0];
    assert_eq!(seen.path, "/h2");
    assert_eq!(seen.headers["x-keygate-tenant"], "acme");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        r.keygate.proxy.to_string().as_str()
    );
}

#[tokio::test]
async fn admin_probes_answer() {
    let r = rig().await;
    let health = r.http.get(&r.keygate.admin_url("/healthz"), &[]).await;
    assert_eq!(health.status, 200);
    let ready = r.http.get(&r.keygate.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let missing = r.http.get(&r.keygate.admin_url("/nope"), &[]).await;
    assert_eq!(missing.status, 404);
}

/// What [`counting_upstream`] saw: connections opened, and a count of connections keygate
/// closed.
struct Counts {
    opened: std::sync::atomic::AtomicUsize,
    closed_by_keygate: tokio::sync::watch::Sender<usize>,
}

/// When [`counting_upstream`] closes a connection, without saying so (no `Connection: close`).
#[derive(Clone, Copy, PartialEq)]
enum Closes {
    /// Never: keep-alive.
    Never,
    /// Right after its first answer, as an upstream ending idle keep-alive connections does.
    AfterAnswer,
    /// On its second request, read but not answered: the request is lost in the close.
    OnSecondRequest,
}

/// A bare HTTP/1.1 upstream that counts its connections and answers `200 ok` to each request
/// head, closing connections as `closes` says.
async fn counting_upstream(closes: Closes) -> (String, std::sync::Arc<Counts>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let counts = std::sync::Arc::new(Counts {
        opened: Default::default(),
        closed_by_keygate: tokio::sync::watch::Sender::new(0),
    });
    let counted = counts.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.opened.fetch_add(1, Ordering::SeqCst);
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut answered = 0;
                loop {
                    // Bodiless requests: each ends with an empty line.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if closes == Closes::OnSecondRequest && answered == 1 {
                            return;
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        answered += 1;
                        if stream.write_all(answer).await.is_err() || closes == Closes::AfterAnswer
                        {
                            return;
                        }
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => {
                            counted.closed_by_keygate.send_modify(|n| *n += 1);
                            return;
                        }
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (url, counts)
}

/// Keygate with Redis in front of `upstream`, and a key it accepts (the Redis server must be
/// kept alive).
async fn in_front_of(
    upstream: &str,
    tweak: impl FnOnce(&mut keygate::config::Config),
) -> (RedisServer, Keygate, String) {
    let redis = RedisServer::start();
    let ns = namespace("pool");
    let store = redis_store(&redis, &ns);
    let mut config = test_config(&redis.url(), &ns, upstream);
    tweak(&mut config);
    let keygate = Keygate::start(config).await;
    let key = create_key(&*store, "acme", "member").await;
    (redis, keygate, key.secret.expose().to_string())
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let (url, counts) = counting_upstream(Closes::Never).await;
    let (_redis, keygate, key) = in_front_of(&url, |_| {}).await;
    let http = Http::new();
    for _ in 0..20 {
        let reply = http.get_with_key(&keygate.url("/"), &key).await;
        assert_eq!(reply.status, 200);
    }
    // One client connection is served by one worker, whose pool keeps one upstream connection.
    assert_eq!(counts.opened.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(opened_metric(&keygate, &url).await, 1.0);
}

/// A pool metric (`keygate_upstream_…_total`) of the upstream at `url`.
async fn pool_metric(keygate: &Keygate, metric: &str, url: &str) -> f64 {
    let authority = url.trim_start_matches("http://");
    let series = format!("keygate_upstream_{metric}_total{{upstream=\"{authority}\"}}");
    keygate.scrape().await.get(&series)
}

async fn opened_metric(keygate: &Keygate, url: &str) -> f64 {
    pool_metric(keygate, "connections_opened", url).await
}

#[tokio::test]
async fn an_upstream_closing_pooled_connections_costs_no_request() {
    let (url, counts) = counting_upstream(Closes::AfterAnswer).await;
    let (_redis, keygate, key) = in_front_of(&url, |_| {}).await;
    let http = Http::new();
    for i in 0..200 {
        let reply = http.get_with_key(&keygate.url("/"), &key).await;
        assert_eq!(reply.status, 200, "request {i}: {:?}", reply.body);
    }
    assert_eq!(counts.opened.load(std::sync::atomic::Ordering::SeqCst), 200);
    assert_eq!(opened_metric(&keygate, &url).await, 200.0);
}

#[tokio::test]
async fn idle_upstream_connections_are_closed_without_traffic() {
    let (url, counts) = counting_upstream(Closes::Never).await;
    let (_redis, keygate, key) =
        in_front_of(&url, |c| c.upstream.pool_idle_timeout = "300ms".into()).await;
    let reply = Http::new().get_with_key(&keygate.url("/"), &key).await;
    assert_eq!(reply.status, 200);
    // No request follows: only the pool's sweeper can close the connection.
    let mut closed = counts.closed_by_keygate.subscribe();
    tokio::time::timeout(Duration::from_secs(10), closed.wait_for(|n| *n == 1))
        .await
        .expect("keygate closed its idle upstream connection")
        .unwrap();
    assert_eq!(counts.opened.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn long_responses_do_not_crowd_idle_connections_out_of_the_pool() {
    let upstream = Upstream::start().await;
    let (_redis, keygate, key) = in_front_of(&upstream.url(), |c| {
        c.server.workers = 1;
        c.upstream.pool_max_idle = 1;
    })
    .await;
    let http = Http::new();
    let auth = format!("Bearer {key}");
    let headers = [("authorization", auth.as_str())];
    // Two downloads whose bodies are not read: their connections stay busy, streaming.
    let mut downloads = Vec::new();
    for _ in 0..2 {
        let url = keygate.url("/download?bytes=67108864");
        let empty = http_body_util::Full::new(bytes::Bytes::new());
        let resp = http
            .send("GET", &url, &headers, http_body_util::BodyExt::boxed(empty))
            .await;
        assert_eq!(resp.status(), 200);
        downloads.push(resp);
    }
    // Short requests meanwhile share one idle connection: the busy ones do not count
    // against `pool_max_idle`.
    for _ in 0..5 {
        let reply = http.get_with_key(&keygate.url("/"), &key).await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(opened_metric(&keygate, &upstream.url()).await, 3.0);
    drop(downloads);
}

#[tokio::test]
async fn a_replayable_request_lost_in_a_closing_connection_is_sent_again() {
    let (url, counts) = counting_upstream(Closes::OnSecondRequest).await;
    let (_redis, keygate, key) = in_front_of(&url, |c| c.server.workers = 1).await;
    let http = Http::new();
    let auth = format!("Bearer {key}");
    let headers = [("authorization", auth.as_str())];
    // The first GET opens a connection; the second reaches it, is read, and the connection
    // closes without an answer: a GET without a body is sent again on a new connection.
    for i in 0..2 {
        let reply = http.request("GET", &keygate.url("/"), &headers).await;
        assert_eq!(reply.status, 200, "GET {i}: {:?}", reply.body);
    }
    // A POST may have had effects upstream: it is not sent twice.
    let reply = http.request("POST", &keygate.url("/"), &headers).await;
    assert_eq!(reply.status, 502);
    assert_eq!(counts.opened.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(pool_metric(&keygate, "retries", &url).await, 1.0);
}

/// A request body the client cuts short is the client's failure: never a 502, never counted
/// against the upstream (whose error alert it would otherwise trip).
#[tokio::test]
async fn an_upload_cut_short_by_the_client_is_a_client_error() {
    let r = rig().await;
    let key = create_key(&*r.store, "acme", "admin").await;
    let head = |framing: &str| {
        format!(
            "POST /upload HTTP/1.1\r\nhost: api.example\r\nauthorization: Bearer {}\r\n{framing}\r\n\r\n",
            key.secret.expose()
        )
    };
    // A Content-Length never reached: the client stops sending and closes its side.
    let short = format!("{}0123456789", head("content-length: 100000"));
    // A chunk size that is not hexadecimal.
    let bad_chunk = format!(
        "{}5\r\nhello\r\nZZ\r\nmore\r\n",
        head("transfer-encoding: chunked")
    );
    for (what, bytes, close_write) in [("short", short, true), ("bad chunk", bad_chunk, false)] {
        let answer = raw_exchange(
            r.keygate.proxy,
            bytes.as_bytes(),
            close_write,
            Duration::from_secs(5),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 400 "),
            "{what}: answered {answer:?}"
        );
        assert!(
            answer.contains("\"error\":\"invalid_body\""),
            "{what}: {answer}"
        );
    }
    let m = r.keygate.scrape().await;
    let outcome = |o: &str| {
        m.get(&format!(
            "keygate_auth_decisions_total{{mode=\"proxy\",outcome=\"{o}\"}}"
        ))
    };
    assert_eq!(outcome("invalid_body"), 2.0, "{}", m.text);
    assert_eq!(outcome("upstream_unavailable"), 0.0);
    for kind in ["unavailable", "timeout"] {
        let series = format!("keygate_upstream_errors_total{{kind=\"{kind}\",route=\"default\"}}");
        assert_eq!(m.get(&series), 0.0, "{series}");
    }
}

/// Over HTTP/2: a client that resets its stream mid-upload is the client's failure too.
#[tokio::test]
async fn an_http2_upload_reset_by_the_client_is_a_client_error() {
    use bytes::Bytes;
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    let r = rig().await;
    let key = create_key(&*r.store, "acme", "admin").await;
    let stream = tokio::net::TcpStream::connect(r.keygate.proxy)
        .await
        .unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // A first chunk; once the upstream has the request, the body fails and hyper's client
    // resets the stream.
    let (fail, failed) = tokio::sync::oneshot::channel::<()>();
    let first = futures_util::stream::once(async { Ok(Frame::data(Bytes::from_static(b"first"))) });
    let then_fail = futures_util::stream::once(async move {
        let _ = failed.await;
        Err(std::io::Error::other("client gave up"))
    });
    let frames = Box::pin(futures_util::StreamExt::chain(first, then_fail));
    let req = http::Request::post(r.keygate.url("/upload"))
        .header("authorization", format!("Bearer {}", key.secret.expose()))
        .body(StreamBody::new(frames))
        .unwrap();
    let sent = tokio::spawn(async move { h2.send_request(req).await });
    let upstream = &r.upstream;
    eventually(
        Duration::from_secs(5),
        "the upload reaches the upstream",
        || async move { !upstream.requests().is_empty() },
    )
    .await;
    fail.send(()).unwrap();
    let answer = within(Duration::from_secs(5), "the stream ends", sent)
        .await
        .unwrap();
    assert!(
        answer.is_err(),
        "the client reset its own stream: {answer:?}"
    );
    // Whichever comes first decides how it is counted, the client's either way: keygate's
    // exchange fails on the body (400 invalid_body, which the reset stream never receives), or
    // hyper sees the reset and drops the request (abandoned).
    let keygate = &r.keygate;
    let client_side = |m: &Scrape| {
        m.get("keygate_auth_decisions_total{mode=\"proxy\",outcome=\"invalid_body\"}")
            + m.get("keygate_requests_abandoned_total")
    };
    eventually(
        Duration::from_secs(5),
        "the refusal is counted",
        || async move { client_side(&keygate.scrape().await) == 1.0 },
    )
    .await;
    let m = r.keygate.scrape().await;
    assert_eq!(
        m.get("keygate_auth_decisions_total{mode=\"proxy\",outcome=\"upstream_unavailable\"}"),
        0.0
    );
    let unavailable = "keygate_upstream_errors_total{kind=\"unavailable\",route=\"default\"}";
    assert_eq!(m.get(unavailable), 0.0);
}
