//! Connection limits over real connections: many HTTP/2 streams on one connection, each with its
//! own decision, and `server.max_requests_per_connection` closing a connection gracefully (on
//! HTTP/1.1 its last response says `Connection: close`, on HTTP/2 a GOAWAY) without losing a
//! request.

mod common;

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use common::*;
use keygate::store::Store;

/// An HTTP/2 connection (prior knowledge) to keygate: every request goes over it, or fails.
struct H2 {
    sender: http2::SendRequest<Full<Bytes>>,
    conn: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

impl H2 {
    async fn connect(kg: &Keygate) -> Self {
        let stream = within(
            Duration::from_secs(5),
            "an HTTP/2 connection",
            tokio::net::TcpStream::connect(kg.proxy),
        )
        .await
        .unwrap();
        let (sender, conn) = within(
            Duration::from_secs(5),
            "the HTTP/2 handshake",
            http2::handshake(TokioExecutor::new(), TokioIo::new(stream)),
        )
        .await
        .unwrap();
        H2 {
            sender,
            conn: tokio::spawn(conn),
        }
    }

    /// A GET of `path` with `key` on this connection: its status and error code (empty for a
    /// 200), within [`REQUEST_TIMEOUT`].
    fn get(
        &self,
        path: &str,
        key: &str,
    ) -> impl std::future::Future<Output = Result<(StatusCode, String), String>> + 'static {
        let mut sender = self.sender.clone();
        let req = Request::get(format!("http://keygate.test{path}"))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        async move {
            let exchange = async {
                sender
                    .ready()
                    .await
                    .map_err(|e| format!("connection gone, not sent: {e:?}"))?;
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                let code = match status {
                    StatusCode::OK => String::new(),
                    _ => serde_json::from_slice::<serde_json::Value>(&body)
                        .map(|v| v["error"].as_str().unwrap_or_default().to_owned())
                        .unwrap_or_default(),
                };
                Ok((status, code))
            };
            tokio::time::timeout(REQUEST_TIMEOUT, exchange)
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")))
        }
    }

    /// Waits for keygate to end the connection (GOAWAY, then close) within `limit`.
    async fn ended_within(self, limit: Duration) -> Result<(), String> {
        match tokio::time::timeout(limit, self.conn).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("the connection failed instead of closing: {e}")),
            Ok(Err(e)) => Err(format!("the connection task panicked: {e}")),
            Err(_) => Err(format!("still open after {limit:?}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_streams_with_a_valid_key_on_one_connection_all_succeed() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let mut config = test_config(&redis.url(), &namespace("h2-100"), &upstream.url());
    config.server.workers = 1;
    let kg = Keygate::start(config.clone()).await;
    kg.wait_ready().await;
    let store = redis_store(&redis, &config.store.namespace);
    let key = create_key(&*store, "acme", "admin").await;
    let h2 = H2::connect(&kg).await;

    // Every stream is held at the upstream until all hundred have arrived there, so they are
    // open on the one connection at the same time.
    let mut streams = tokio::spawn(join_all(
        (0..100).map(|_| h2.get("/hold", key.secret.expose())),
    ));
    eventually(
        Duration::from_secs(10),
        "100 streams held at the upstream at once",
        || {
            let n = upstream.requests().len();
            async move { n >= 100 }
        },
    )
    .await;
    // A request the upstream has seen may not be waiting for the release yet: release until
    // every stream has answered.
    let answers = within(Duration::from_secs(10), "every stream's answer", async {
        loop {
            upstream.release();
            tokio::select! {
                answers = &mut streams => break answers.unwrap(),
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    })
    .await;
    for (i, a) in answers.into_iter().enumerate() {
        assert_eq!(a, Ok((StatusCode::OK, String::new())), "stream {i}");
    }
    assert_eq!(upstream.requests().len(), 100);
    kg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_and_a_revoked_key_interleaved_on_one_h2_connection_get_per_stream_decisions() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("h2-mixed");
    let mut config = test_config(&redis.url(), &ns, &upstream.url());
    config.server.workers = 1;
    let kg = Keygate::start(config).await;
    kg.wait_ready().await;
    let store = redis_store(&redis, &ns);
    let valid = create_key(&*store, "acme", "admin").await;
    let revoked = create_key(&*store, "acme", "admin").await;
    let h2 = H2::connect(&kg).await;
    // Both verdicts cached first, so the revocation must reach the cached one.
    assert_eq!(
        h2.get("/", revoked.secret.expose()).await.unwrap().0,
        StatusCode::OK
    );
    store
        .revoke(&revoked.record.id, keygate::store::now_unix())
        .await
        .unwrap();
    let http = Http::new();
    wait_for_status(&http, &kg, revoked.secret.expose(), 401, "the revocation").await;

    let keys: Vec<&str> = (0..50)
        .map(|i| {
            if i % 2 == 0 {
                valid.secret.expose()
            } else {
                revoked.secret.expose()
            }
        })
        .collect();
    let answers = join_all(keys.iter().map(|k| h2.get("/", k))).await;
    for (i, a) in answers.into_iter().enumerate() {
        let want = if i % 2 == 0 {
            (StatusCode::OK, String::new())
        } else {
            (StatusCode::UNAUTHORIZED, "key_revoked".to_owned())
        };
        assert_eq!(a, Ok(want), "stream {i}");
    }
    // Only the valid key's streams reached the upstream (plus the one before the revocation).
    let forwarded = upstream.requests().len();
    assert_eq!(forwarded, 26, "{forwarded} requests forwarded");
    kg.shutdown().await;
}

/// A raw HTTP/1.1 keep-alive connection to keygate.
async fn h1_connect(
    kg: &Keygate,
) -> (
    http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let stream = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    (sender, tokio::spawn(conn))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_requests_per_connection_an_http1_client_gets_connection_close_on_its_last_response(
) {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("h1-max");
    let mut config = test_config(&redis.url(), &ns, &upstream.url());
    config.server.max_requests_per_connection = 5;
    let kg = Keygate::start(config).await;
    kg.wait_ready().await;
    let store = redis_store(&redis, &ns);
    let key = create_key(&*store, "acme", "admin").await;
    let auth = format!("Bearer {}", key.secret.expose());

    let (mut sender, conn) = h1_connect(&kg).await;
    for i in 1..=5 {
        let req = Request::get("/")
            .header("host", "keygate.test")
            .header("authorization", &auth)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = within(REQUEST_TIMEOUT, "a response", async {
            sender.ready().await.unwrap();
            sender.send_request(req).await.unwrap()
        })
        .await;
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
        let close = resp
            .headers()
            .get("connection")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        assert_eq!(
            close,
            i == 5,
            "request {i}: Connection: close only on the last"
        );
        within(REQUEST_TIMEOUT, "the body", resp.into_body().collect())
            .await
            .unwrap();
    }
    // keygate closes the connection after the last response.
    within(
        Duration::from_secs(5),
        "keygate closing the connection",
        conn,
    )
    .await
    .unwrap()
    .unwrap();

    // A pooled client opens new connections as each is used up: no request is lost.
    let http = Http::new();
    let before = upstream.requests().len();
    let url = kg.url("/");
    for round in 0..6 {
        let replies = join_all((0..4).map(|_| http.get_with_key(&url, key.secret.expose()))).await;
        for r in replies {
            assert_eq!(r.status, 200, "round {round}");
        }
    }
    assert_eq!(upstream.requests().len() - before, 24);
    kg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_requests_per_connection_an_h2_client_gets_a_goaway_and_loses_no_request() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("h2-max");
    let mut config = test_config(&redis.url(), &ns, &upstream.url());
    config.server.max_requests_per_connection = 5;
    let kg = Keygate::start(config).await;
    kg.wait_ready().await;
    let store = redis_store(&redis, &ns);
    let key = create_key(&*store, "acme", "admin").await;

    // One at a time: five answered, then the GOAWAY ends the connection.
    let h2 = H2::connect(&kg).await;
    for i in 1..=5 {
        assert_eq!(
            h2.get("/", key.secret.expose()).await,
            Ok((StatusCode::OK, String::new())),
            "request {i}"
        );
    }
    h2.ended_within(Duration::from_secs(5)).await.unwrap();

    // Twelve at once, written in one go before keygate answers any: the budget is spent at
    // the fifth, yet every stream sent before the client saw the GOAWAY is served, and the
    // connection then closes. (Raw frames: an h2 client library sends one stream at a time and
    // may see the GOAWAY between them, refusing the rest itself.)
    let mut s = raw_h2(&kg).await;
    let mut streams = Vec::new();
    for i in 0..12u32 {
        let block = get_block_with_key(key.secret.expose());
        streams.extend(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &block));
    }
    {
        use tokio::io::AsyncWriteExt;
        s.write_all(&streams).await.unwrap();
    }
    let (mut ok, last_stream) = statuses_until_closed(&mut s, Duration::from_secs(5))
        .await
        .unwrap();
    ok.sort_unstable();
    let all: Vec<u32> = (0..12).map(|i| 2 * i + 1).collect();
    assert_eq!(ok, all, "streams answered 200");
    assert_eq!(last_stream, Some(23), "the final GOAWAY's last stream id");

    // A client moving on to a new connection at each GOAWAY: 24 requests, four at a time,
    // each attempt with its own `?seq=`. A request the client raced with the GOAWAY fails
    // before it is sent (refused by the GOAWAY, or canceled as the connection closes: a stream
    // the server never saw, safe to send again) and goes again on the next connection. None
    // is lost: every answered attempt reached the upstream, no failed one did.
    let before = upstream.requests().len();
    let mut h2 = H2::connect(&kg).await;
    let (mut answered, mut failed) = (Vec::new(), Vec::new());
    let mut seq = 0;
    while answered.len() < 24 {
        let batch = (24 - answered.len()).min(4);
        let attempts = join_all((0..batch).map(|_| {
            seq += 1;
            let (n, reply) = (seq, h2.get(&format!("/?seq={seq}"), key.secret.expose()));
            async move { (n, reply.await) }
        }))
        .await;
        for (n, a) in attempts {
            match a {
                Ok(ok) => {
                    assert_eq!(ok, (StatusCode::OK, String::new()));
                    answered.push(n);
                }
                Err(e)
                    if e.contains("GoAway") || e.contains("Canceled") || e.contains("not sent") =>
                {
                    println!("attempt {n} sent again after: {e}");
                    failed.push(n);
                }
                Err(e) => panic!("attempt {n} failed otherwise than unsent: {e}"),
            }
        }
        if !h2.sender.is_ready() {
            h2.ended_within(Duration::from_secs(5)).await.unwrap();
            h2 = H2::connect(&kg).await;
        }
    }
    let reached: std::collections::HashSet<u32> = upstream.requests()[before..]
        .iter()
        .filter_map(|r| r.query.as_deref()?.strip_prefix("seq=")?.parse().ok())
        .collect();
    for n in &answered {
        assert!(
            reached.contains(n),
            "answered attempt {n} never reached the upstream"
        );
    }
    for n in &failed {
        assert!(
            !reached.contains(n),
            "attempt {n} reached the upstream, yet its client saw it fail"
        );
    }
    println!("{} attempts sent again after a GOAWAY", failed.len());
    kg.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Floods, in raw HTTP/2 frames

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// `GET /` on `keygate.test` as an HPACK block: static-table entries and a literal authority,
/// nothing indexed, so blocks can be sent in any number.
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84, 0x01, 12];
    b.extend_from_slice(b"keygate.test");
    b
}

/// An HPACK integer with an `n`-bit prefix under `first`'s high bits.
fn hpack_int(first: u8, n: u32, mut v: usize, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// [`get_block`] with `authorization: Bearer <key>`, a literal never indexed.
fn get_block_with_key(key: &str) -> Vec<u8> {
    let mut b = get_block();
    let value = format!("Bearer {key}");
    b.push(0x10);
    hpack_int(0, 7, "authorization".len(), &mut b);
    b.extend_from_slice(b"authorization");
    hpack_int(0, 7, value.len(), &mut b);
    b.extend_from_slice(value.as_bytes());
    b
}

/// Reads frames until keygate closes the connection, acknowledging its SETTINGS and PINGs:
/// the streams whose response head is `:status 200` (static-table index 8), as answered, and the
/// last stream id of the last GOAWAY.
async fn statuses_until_closed(
    s: &mut tokio::net::TcpStream,
    limit: Duration,
) -> Result<(Vec<u32>, Option<u32>), String> {
    use tokio::io::AsyncWriteExt;
    let read = async {
        let (mut ok, mut last) = (Vec::new(), None);
        while let Some((kind, flags, stream, payload)) = read_frame(s).await? {
            match kind {
                HEADERS if payload.first() == Some(&0x88) => ok.push(stream),
                GOAWAY if payload.len() >= 8 => {
                    last = Some(
                        u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                            & 0x7fff_ffff,
                    );
                }
                SETTINGS if flags & ACK == 0 => {
                    let _ = s.write_all(&frame(SETTINGS, ACK, 0, &[])).await;
                }
                PING if flags & ACK == 0 => {
                    let _ = s.write_all(&frame(PING, ACK, 0, &payload)).await;
                }
                _ => {}
            }
        }
        Ok((ok, last))
    };
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or_else(|_| Err(format!("still open after {limit:?}")))
}

/// A connection that has sent the HTTP/2 preface and an empty SETTINGS frame.
async fn raw_h2(kg: &Keygate) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    s.write_all(&hello).await.unwrap();
    s
}

/// One frame read from keygate: its type, flags, stream id and payload; `None` when the
/// connection ended at a frame boundary.
async fn read_frame(
    s: &mut tokio::net::TcpStream,
) -> Result<Option<(u8, u8, u32, Vec<u8>)>, String> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    if s.read_exact(&mut head).await.is_err() {
        return Ok(None);
    }
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)
        .await
        .map_err(|e| format!("closed mid-frame: {e}"))?;
    Ok(Some((head[3], head[4], stream, payload)))
}

/// Reads frames until a GOAWAY: its error code, or why none came within `limit`.
async fn goaway_within(s: &mut tokio::net::TcpStream, limit: Duration) -> Result<u32, String> {
    let read = async {
        loop {
            match read_frame(s).await? {
                None => return Err("closed without a GOAWAY".to_owned()),
                Some((GOAWAY, _, _, p)) if p.len() >= 8 => {
                    return Ok(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
                }
                Some(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or_else(|_| Err(format!("no GOAWAY within {limit:?}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_gets_a_goaway_and_the_next_client_is_served() {
    use tokio::io::AsyncWriteExt;
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("h2-reset");
    let kg = Keygate::start(test_config(&redis.url(), &ns, &upstream.url())).await;
    kg.wait_ready().await;
    let store = redis_store(&redis, &ns);
    let key = create_key(&*store, "acme", "admin").await;

    // Streams opened and cancelled at once, far past the 20 the default allows.
    let mut s = raw_h2(&kg).await;
    let mut flood = Vec::new();
    for i in 0..1000u32 {
        let id = 2 * i + 1;
        flood.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &get_block()));
        flood.extend(frame(RST_STREAM, 0, id, &0x8u32.to_be_bytes()));
    }
    // keygate may close the connection before the flood is all written.
    let _ = s.write_all(&flood).await;
    assert_eq!(
        goaway_within(&mut s, Duration::from_secs(5)).await,
        Ok(ENHANCE_YOUR_CALM)
    );
    let h2 = H2::connect(&kg).await;
    assert_eq!(
        h2.get("/", key.secret.expose()).await,
        Ok((StatusCode::OK, String::new()))
    );
    kg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_gets_a_goaway_before_the_header_block_ends() {
    use tokio::io::AsyncWriteExt;
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let kg = Keygate::start(test_config(
        &redis.url(),
        &namespace("h2-cont"),
        &upstream.url(),
    ))
    .await;
    kg.wait_ready().await;

    // A header block that never ends: CONTINUATION frames after a HEADERS without
    // END_HEADERS, each carrying another header, together far over server.max_header_bytes.
    let mut s = raw_h2(&kg).await;
    let mut flood = frame(HEADERS, END_STREAM, 1, &get_block());
    let mut header = vec![0x00, 5];
    header.extend_from_slice(b"x-pad");
    header.extend_from_slice(&[0x7f, 0x81, 0x7f]); // a 16,384-byte value (7-bit prefix 127 + 16,257)
    header.extend(std::iter::repeat_n(b'a', 16_384));
    for _ in 0..64 {
        flood.extend(frame(
            CONTINUATION,
            0,
            1,
            &header[..16_384.min(header.len())],
        ));
    }
    let _ = s.write_all(&flood).await;
    let code = goaway_within(&mut s, Duration::from_secs(5)).await;
    assert!(
        matches!(code, Ok(c) if c != 0),
        "the flood did not end in an error GOAWAY: {code:?}"
    );
    // Nothing of it reached the upstream.
    assert_eq!(upstream.requests().len(), 0);
    kg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_never_answers_a_keep_alive_ping_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let mut config = test_config(&redis.url(), &namespace("h2-ping"), &upstream.url());
    config.server.http2_keep_alive_interval = "200ms".into();
    config.server.http2_keep_alive_timeout = "300ms".into();
    let kg = Keygate::start(config).await;
    kg.wait_ready().await;

    // One request (so no head deadline runs), then silence: keygate's PINGs go unanswered.
    let mut s = raw_h2(&kg).await;
    s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &get_block()))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut saw_ping = false;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut head = [0u8; 9];
            if s.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut payload).await.is_err() {
                return;
            }
            saw_ping |= head[3] == 0x6 && head[4] & 0x1 == 0;
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "still open 5s after its PING went unanswered"
    );
    assert!(saw_ping, "keygate sent no PING");
    println!("closed {:?} after the request", started.elapsed());
    kg.shutdown().await;
}
