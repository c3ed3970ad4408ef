//! Upgraded connections through keygate: a WebSocket opened with a valid key (HTTP/1.1
//! `Upgrade`, or HTTP/2 extended CONNECT) is spliced to a real upstream WebSocket server, and
//! closed when its key is revoked, expires, or is found dead by a whole-cache flush; a bad key
//! is refused before any switch. Real Redis, a real upstream (hyper's upgrade with
//! tungstenite's frames), keygate on port 0, real WebSocket clients.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use common::*;
use keygate::key::{generate, generate_id, KeyKind};
use keygate::manage::{self, NewServiceAccount};
use keygate::policy::Roles;
use keygate::store::{now_unix, KeyRecord, Store};

/// How long a revoked, expired or flushed key's WebSocket may stay open before the test fails:
/// far above the propagation bound (milliseconds on loopback), so only a connection that is
/// never closed fails it. The time it took is printed.
const CLOSE_DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// A real WebSocket upstream: hyper answers the upgrade, tungstenite speaks the frames and echoes
// every text and binary message.

struct WsUpstream {
    addr: std::net::SocketAddr,
    /// Request heads it received, upgrade or not.
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    /// WebSockets it opened.
    opened: Arc<AtomicUsize>,
    /// WebSockets that ended (the peer closed or the connection dropped).
    ended: Arc<AtomicUsize>,
}

impl WsUpstream {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    /// The same server, over TLS with `tls` when set (an `https://` upstream).
    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let opened = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (s, o, e) = (seen.clone(), opened.clone(), ended.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, o, e) = (s.clone(), o.clone(), e.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (s, o, e) = (s.clone(), o.clone(), e.clone());
                        async move { Ok::<_, std::convert::Infallible>(ws_answer(req, s, o, e)) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        None => {
                            http.serve_connection(TokioIo::new(stream), svc)
                                .with_upgrades()
                                .await
                        }
                        Some(tls) => {
                            let Ok(stream) = tls.accept(stream).await else {
                                return;
                            };
                            http.serve_connection(TokioIo::new(stream), svc)
                                .with_upgrades()
                                .await
                        }
                    };
                });
            }
        });
        WsUpstream {
            addr,
            seen,
            opened,
            ended,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn ws_answer(
    mut req: Request<Incoming>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    opened: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
) -> Response<Empty<Bytes>> {
    seen.lock().unwrap().push(req.headers().clone());
    let wants_ws = req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        // Not a WebSocket handshake: a plain answer.
        return Response::new(Empty::new());
    };
    match req.uri().path() {
        "/refuse" => {
            let mut resp = Response::new(Empty::new());
            *resp.status_mut() = StatusCode::FORBIDDEN;
            return resp;
        }
        // Answers the upgrade as a plain request.
        "/no-switch" => return Response::new(Empty::new()),
        _ => {}
    }
    if !wants_ws {
        let mut resp = Response::new(Empty::new());
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        return resp;
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        opened.fetch_add(1, Ordering::SeqCst);
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
        ended.fetch_add(1, Ordering::SeqCst);
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(Empty::new())
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Clients

type Ws<S> = WebSocketStream<S>;

/// Opens a WebSocket to `path` through keygate over HTTP/1.1 `Upgrade`, with `key` as the
/// bearer credential; the refusal's status if keygate (or the upstream) does not switch.
async fn ws_h1(keygate: &Keygate, path: &str, key: Option<&str>) -> Result<Ws<TcpStream>, u16> {
    let mut req = format!("ws://{}{path}", keygate.proxy)
        .into_client_request()
        .unwrap();
    if let Some(key) = key {
        req.headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    let tcp = TcpStream::connect(keygate.proxy).await.unwrap();
    match within(
        REQUEST_TIMEOUT,
        "the WebSocket handshake",
        tokio_tungstenite::client_async(req, tcp),
    )
    .await
    {
        Ok((ws, resp)) => {
            assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("WebSocket handshake failed: {e}"),
    }
}

/// One HTTP/2 connection to keygate (prior knowledge), for extended CONNECT.
struct H2 {
    sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    proxy: std::net::SocketAddr,
}

impl H2 {
    async fn connect(keygate: &Keygate) -> Self {
        let tcp = TcpStream::connect(keygate.proxy).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        H2 {
            sender,
            proxy: keygate.proxy,
        }
    }

    /// A plain GET on the connection (it also makes sure keygate's SETTINGS have arrived
    /// before an extended CONNECT is tried).
    async fn get(&mut self, path: &str, key: &str) -> StatusCode {
        let req = Request::get(format!("http://{}{path}", self.proxy))
            .header("authorization", format!("Bearer {key}"))
            .body(Empty::new())
            .unwrap();
        let resp = within(REQUEST_TIMEOUT, "an h2 GET", self.sender.send_request(req))
            .await
            .unwrap();
        resp.status()
    }

    /// Opens a WebSocket over an extended CONNECT stream (RFC 8441); the refusal's status if
    /// keygate does not answer 200.
    async fn websocket(
        &mut self,
        path: &str,
        key: Option<&str>,
    ) -> Result<Ws<TokioIo<hyper::upgrade::Upgraded>>, u16> {
        let mut req = Request::connect(format!("http://{}{path}", self.proxy))
            .header("sec-websocket-version", "13")
            .extension(hyper::ext::Protocol::from_static("websocket"));
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let req = req.body(Empty::new()).unwrap();
        let resp = within(
            REQUEST_TIMEOUT,
            "an extended CONNECT",
            self.sender.send_request(req),
        )
        .await
        .unwrap();
        if resp.status() != StatusCode::OK {
            return Err(resp.status().as_u16());
        }
        let upgraded = within(
            REQUEST_TIMEOUT,
            "the stream upgrade",
            hyper::upgrade::on(resp),
        )
        .await
        .unwrap();
        Ok(WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await)
    }
}

/// Sends `text` and expects it back.
async fn echo<S>(ws: &mut Ws<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    within(
        REQUEST_TIMEOUT,
        "sending a message",
        ws.send(Message::text(text)),
    )
    .await
    .unwrap();
    let back = within(REQUEST_TIMEOUT, "the echo", ws.next())
        .await
        .expect("the socket closed before the echo")
        .expect("the echo");
    assert_eq!(back, Message::text(text));
}

/// How long until the socket ends (closed, reset, or a close frame), failing the test past
/// [`CLOSE_DEADLINE`].
async fn closes<S>(ws: &mut Ws<S>, what: &str) -> Duration
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let started = Instant::now();
    within(CLOSE_DEADLINE, what, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    started.elapsed()
}

// ---------------------------------------------------------------------------------------------
// Setup

struct Setup {
    _redis: RedisServer,
    redis_url: String,
    ns: String,
    store: Arc<keygate::store::redis::RedisStore>,
    upstream: WsUpstream,
    keygate: Keygate,
}

async fn setup(tag: &str) -> Setup {
    setup_with(tag, |_| {}).await
}

async fn setup_with(tag: &str, tune: impl FnOnce(&mut keygate::config::Config)) -> Setup {
    let redis = RedisServer::start();
    let ns = namespace(tag);
    let store = redis_store(&redis, &ns);
    let upstream = WsUpstream::start().await;
    let mut config = test_config(&redis.url(), &ns, &upstream.url());
    tune(&mut config);
    let keygate = Keygate::start(config).await;
    keygate.wait_ready().await;
    Setup {
        redis_url: redis.url(),
        _redis: redis,
        ns,
        store,
        upstream,
        keygate,
    }
}

const LIVE: &str = "keygate_upgraded_connections";

fn closed_by(reason: &str) -> String {
    format!("keygate_upgraded_connections_closed_total{{reason=\"{reason}\"}}")
}

/// Waits until the gauge of live upgraded connections reads `n`.
async fn live_upgrades_reach(keygate: &Keygate, n: f64) {
    eventually(
        Duration::from_secs(10),
        &format!("{LIVE} == {n}"),
        || async { keygate.scrape().await.get(LIVE) == n },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 Upgrade

#[tokio::test]
async fn a_websocket_echoes_through_keygate_and_closes_when_its_key_is_revoked() {
    let s = setup("ws-revoke").await;
    let key = create_key(&*s.store, "acme", "member").await;
    let mut ws = ws_h1(&s.keygate, "/chat", Some(key.secret.expose()))
        .await
        .expect("a valid key opens the WebSocket");
    echo(&mut ws, "hello").await;
    echo(&mut ws, "again").await;

    // The upstream got the identity, not the key, and the upgrade headers it needs.
    let seen = s.upstream.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let head = &seen[0];
    assert_eq!(head["x-keygate-key-id"], key.record.id.as_str());
    assert_eq!(head["x-keygate-tenant"], "acme");
    assert!(head.get("authorization").is_none(), "the key was forwarded");
    assert!(head["upgrade"]
        .as_bytes()
        .eq_ignore_ascii_case(b"websocket"));
    live_upgrades_reach(&s.keygate, 1.0).await;

    let started = Instant::now();
    s.store.revoke(&key.record.id, now_unix()).await.unwrap();
    let returned = started.elapsed();
    closes(&mut ws, "the revoked key's WebSocket to close").await;
    println!(
        "revoked key's WebSocket closed {:?} after the revocation began (the revoke call took {returned:?})",
        started.elapsed()
    );
    live_upgrades_reach(&s.keygate, 0.0).await;
    let m = s.keygate.scrape().await;
    assert_eq!(m.get(&closed_by("revoked")), 1.0);
    eventually(
        Duration::from_secs(10),
        "the upstream side ends too",
        || async { s.upstream.ended.load(Ordering::SeqCst) == 1 },
    )
    .await;

    // And the key opens nothing any more.
    assert_eq!(
        ws_h1(&s.keygate, "/chat", Some(key.secret.expose()))
            .await
            .err(),
        Some(401)
    );
}

#[tokio::test]
async fn an_upgrade_with_a_bad_key_is_refused_before_any_switch() {
    let s = setup("ws-bad-key").await;
    let revoked = create_key(&*s.store, "acme", "member").await;
    s.store
        .revoke(&revoked.record.id, now_unix())
        .await
        .unwrap();
    let unknown = generate(KeyKind::User);
    for (what, key) in [
        ("no key", None),
        ("junk", Some("not-a-key")),
        ("an unknown key", Some(unknown.secret.expose())),
        ("a revoked key", Some(revoked.secret.expose())),
    ] {
        assert_eq!(
            ws_h1(&s.keygate, "/chat", key).await.err(),
            Some(401),
            "{what}"
        );
    }
    let mut h2 = H2::connect(&s.keygate).await;
    assert_eq!(h2.websocket("/chat", None).await.err(), Some(401));
    assert_eq!(
        h2.websocket("/chat", Some(unknown.secret.expose()))
            .await
            .err(),
        Some(401)
    );
    assert!(
        s.upstream.seen.lock().unwrap().is_empty(),
        "a refused upgrade reached the upstream"
    );
    assert_eq!(s.upstream.opened.load(Ordering::SeqCst), 0);
    assert_eq!(s.keygate.scrape().await.get(LIVE), 0.0);
}

#[tokio::test]
async fn a_websocket_closes_when_its_key_expires() {
    let s = setup("ws-expiry").await;
    let key = generate(KeyKind::User);
    let expires_at = now_unix() + 2;
    s.store
        .insert(&KeyRecord {
            id: generate_id("key_"),
            digest: key.digest,
            name: "short-lived".into(),
            tenant: "acme".into(),
            role: "member".into(),
            subject: "alice".into(),
            kind: KeyKind::User,
            created_at: now_unix(),
            expires_at: Some(expires_at),
            revoked_at: None,
            last_used_at: None,
        })
        .await
        .unwrap();
    let mut ws = ws_h1(&s.keygate, "/chat", Some(key.secret.expose()))
        .await
        .expect("the key is live for two more seconds");
    echo(&mut ws, "before expiry").await;
    let took = closes(&mut ws, "the expired key's WebSocket to close").await;
    let late = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH + Duration::from_secs(expires_at))
        .map(|d| format!("{d:?} after"))
        .unwrap_or_else(|e| format!("{:?} before", e.duration()));
    println!("expired key's WebSocket closed after {took:?}, {late} the expiry");
    assert!(now_unix() >= expires_at, "closed before the key expired");
    live_upgrades_reach(&s.keygate, 0.0).await;
    assert_eq!(s.keygate.scrape().await.get(&closed_by("expired")), 1.0);
}

#[tokio::test]
async fn a_whole_cache_flush_closes_the_websockets_of_keys_found_dead() {
    let s = setup("ws-flush").await;
    let doomed = create_key(&*s.store, "acme", "member").await;
    let kept = create_key(&*s.store, "acme", "member").await;
    let mut doomed_ws = ws_h1(&s.keygate, "/chat", Some(doomed.secret.expose()))
        .await
        .unwrap();
    let mut kept_ws = ws_h1(&s.keygate, "/chat", Some(kept.secret.expose()))
        .await
        .unwrap();
    echo(&mut doomed_ws, "a").await;
    echo(&mut kept_ws, "b").await;
    live_upgrades_reach(&s.keygate, 2.0).await;

    // Revoked behind keygate's back (no announcement), as if the message had been missed...
    let redis = redis::Client::open(s.redis_url.as_str()).unwrap();
    let mut conn = redis
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    let record = format!("{}:key:{}", s.ns, doomed.record.digest.to_hex());
    let _: () = redis::cmd("HSET")
        .arg(&record)
        .arg("revoked_at")
        .arg(now_unix().to_string())
        .query(&mut conn)
        .unwrap();
    // ...then a message this version cannot read: keygate flushes its whole cache, and every
    // live connection is checked against the store again.
    let flushes = s.keygate.app.metrics.cache_flushes.get();
    let _: () = redis::cmd("PUBLISH")
        .arg(format!("{}:invalidate", s.ns))
        .arg("not an announcement")
        .query(&mut conn)
        .unwrap();
    let took = closes(&mut doomed_ws, "the flushed dead key's WebSocket to close").await;
    println!("a dead key's WebSocket closed {took:?} after the flush was announced");
    assert!(s.keygate.app.metrics.cache_flushes.get() > flushes);
    echo(&mut kept_ws, "still here").await;
    live_upgrades_reach(&s.keygate, 1.0).await;
    assert_eq!(s.keygate.scrape().await.get(&closed_by("revoked")), 1.0);
}

#[tokio::test]
async fn removing_a_service_account_closes_the_websockets_of_its_keys() {
    let s = setup("ws-sa-remove").await;
    let created = manage::create_service_account(
        &*s.store,
        &Roles::new(["member".to_owned()]),
        NewServiceAccount {
            tenant: "acme".into(),
            name: "ci".into(),
            role: "member".into(),
            expires_at: None,
        },
        now_unix(),
        "test",
    )
    .await
    .unwrap();
    let mut ws = ws_h1(&s.keygate, "/chat", Some(created.key.secret.expose()))
        .await
        .expect("the service account's key opens a WebSocket");
    echo(&mut ws, "from ci").await;
    let started = Instant::now();
    manage::remove_service_account(&*s.store, &created.account.id, now_unix(), "test")
        .await
        .unwrap();
    closes(&mut ws, "the removed account's WebSocket to close").await;
    println!(
        "a removed service account's WebSocket closed {:?} after the removal began",
        started.elapsed()
    );
    live_upgrades_reach(&s.keygate, 0.0).await;
    assert_eq!(s.keygate.scrape().await.get(&closed_by("revoked")), 1.0);
}

#[tokio::test]
async fn an_open_websocket_is_not_cut_at_the_idle_timeout() {
    // Idle here means no request in flight; a tunnel is one for as long as it lives, on an
    // HTTP/2 connection (which keeps its other streams) as on an HTTP/1.1 one.
    let s = setup_with("ws-idle", |c| {
        c.server.idle_timeout = "1s".into();
        c.server.header_read_timeout = "1s".into();
    })
    .await;
    let key = create_key(&*s.store, "acme", "member").await;
    let mut h1 = ws_h1(&s.keygate, "/chat", Some(key.secret.expose()))
        .await
        .unwrap();
    let mut h2 = H2::connect(&s.keygate).await;
    assert_eq!(h2.get("/plain", key.secret.expose()).await, StatusCode::OK);
    let mut over_h2 = h2
        .websocket("/chat", Some(key.secret.expose()))
        .await
        .unwrap();
    // Quiet for well past the idle timeout (and its 1 s close grace): what is asserted is that
    // nothing closes in that time.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let m = s.keygate.scrape().await;
    assert_eq!(
        m.get("keygate_connections_timed_out_total{kind=\"idle\",listener=\"proxy\"}"),
        0.0
    );
    echo(&mut h1, "still open").await;
    echo(&mut over_h2, "still open too").await;
    assert_eq!(s.keygate.scrape().await.get(LIVE), 2.0);
}

#[tokio::test]
async fn an_upstream_that_does_not_switch_answers_as_usual() {
    let s = setup("ws-refused").await;
    let key = create_key(&*s.store, "acme", "member").await;
    assert_eq!(
        ws_h1(&s.keygate, "/refuse", Some(key.secret.expose()))
            .await
            .err(),
        Some(403)
    );
    let mut h2 = H2::connect(&s.keygate).await;
    assert_eq!(h2.get("/plain", key.secret.expose()).await, StatusCode::OK);
    assert_eq!(
        h2.websocket("/refuse", Some(key.secret.expose()))
            .await
            .err(),
        Some(403)
    );
    // A 200 without a switch is passed to an HTTP/1.1 client as it is; to an HTTP/2 client
    // it would say "your stream is a tunnel", so it gets a 502.
    assert_eq!(
        ws_h1(&s.keygate, "/no-switch", Some(key.secret.expose()))
            .await
            .err(),
        Some(200)
    );
    assert_eq!(
        h2.websocket("/no-switch", Some(key.secret.expose()))
            .await
            .err(),
        Some(502)
    );
    assert_eq!(s.upstream.opened.load(Ordering::SeqCst), 0);
    assert_eq!(s.keygate.scrape().await.get(LIVE), 0.0);
}

#[tokio::test]
async fn an_h2c_upgrade_is_never_passed_through() {
    // Switching to HTTP/2 over the upstream connection would let the client send requests
    // keygate never sees: the upgrade headers go, the request is an ordinary one.
    let s = setup("ws-h2c").await;
    let key = create_key(&*s.store, "acme", "member").await;
    let request = format!(
        "GET /plain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Connection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
        key.secret.expose()
    );
    let answer = raw_exchange(s.keygate.proxy, request.as_bytes(), false, REQUEST_TIMEOUT).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = s.upstream.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    for gone in ["upgrade", "http2-settings", "connection"] {
        assert!(!seen[0].contains_key(gone), "{gone} reached the upstream");
    }
}

#[tokio::test]
async fn an_open_websocket_counts_under_the_connection_cap() {
    let s = setup_with("ws-cap", |c| c.server.max_connections = 2).await;
    let key = create_key(&*s.store, "acme", "member").await;
    let open = "keygate_open_connections{listener=\"proxy\"}";
    let mut first = ws_h1(&s.keygate, "/chat", Some(key.secret.expose()))
        .await
        .unwrap();
    let mut second = ws_h1(&s.keygate, "/chat", Some(key.secret.expose()))
        .await
        .unwrap();
    echo(&mut first, "1").await;
    echo(&mut second, "2").await;
    assert_eq!(s.keygate.scrape().await.get(open), 2.0);
    // At the cap: a third connection is closed at once, unread.
    let mut third = TcpStream::connect(s.keygate.proxy).await.unwrap();
    assert!(
        closed_within(&mut third, REQUEST_TIMEOUT).await.is_some(),
        "a connection past the cap was admitted"
    );
    echo(&mut first, "still served").await;
    // Once one WebSocket ends, its place is free again.
    drop(second);
    eventually(
        Duration::from_secs(10),
        "the ended WebSocket's place is free",
        || async { s.keygate.scrape().await.get(open) == 1.0 },
    )
    .await;
    let mut again = ws_h1(&s.keygate, "/chat", Some(key.secret.expose()))
        .await
        .unwrap();
    echo(&mut again, "3").await;
}

#[tokio::test]
async fn shutdown_closes_open_websockets_after_the_grace() {
    let s = setup_with("ws-shutdown", |c| c.server.shutdown_grace = "1s".into()).await;
    let key = create_key(&*s.store, "acme", "member").await;
    let mut h1 = ws_h1(&s.keygate, "/chat", Some(key.secret.expose()))
        .await
        .unwrap();
    let mut h2 = H2::connect(&s.keygate).await;
    assert_eq!(h2.get("/plain", key.secret.expose()).await, StatusCode::OK);
    let mut over_h2 = h2
        .websocket("/chat", Some(key.secret.expose()))
        .await
        .unwrap();
    echo(&mut h1, "before").await;
    echo(&mut over_h2, "before").await;
    let Setup { keygate, .. } = s;
    let started = Instant::now();
    keygate.shutdown().await;
    println!(
        "shutdown with two open WebSockets took {:?}",
        started.elapsed()
    );
    closes(&mut h1, "the HTTP/1.1 WebSocket to close at shutdown").await;
    closes(&mut over_h2, "the HTTP/2 WebSocket to close at shutdown").await;
}

#[tokio::test]
async fn a_websocket_is_not_trusted_past_the_bound_while_the_feed_is_down() {
    // keygate reaches Redis through a relay the test pauses: a silently dead link. The key is
    // revoked meanwhile and keygate misses the announcement; past the trust bound it stops
    // trusting what it knew and checks the live connection against the store, which does not
    // answer either: fail closed.
    let redis = RedisServer::start();
    let ns = namespace("ws-unsynced");
    let store = redis_store(&redis, &ns);
    let upstream = WsUpstream::start().await;
    let relay = Relay::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let mut config = test_config(&relay.url(), &ns, &upstream.url());
    config.store.health_check_interval = "200ms".into();
    config.cache.trust_while_unsubscribed = "1s".into();
    let keygate = Keygate::start(config).await;
    keygate.wait_ready().await;
    let seen = keygate.invalidations();
    let key = create_key(&*store, "acme", "member").await;
    // The key's creation is announced too: applied before the pause, it cannot trigger a
    // re-check that the pause would fail.
    eventually(
        Duration::from_secs(10),
        "the creation is applied",
        || async { keygate.invalidations() > seen },
    )
    .await;
    let mut ws = ws_h1(&keygate, "/chat", Some(key.secret.expose()))
        .await
        .unwrap();
    echo(&mut ws, "before").await;

    relay.pause();
    let paused = Instant::now();
    store.revoke(&key.record.id, now_unix()).await.unwrap();
    closes(&mut ws, "the WebSocket to close past the trust bound").await;
    println!(
        "with the feed silently down, the WebSocket closed {:?} after the pause (trust bound 1 s)",
        paused.elapsed()
    );
    let m = keygate.scrape().await;
    assert_eq!(
        m.get(&closed_by("store_unavailable")) + m.get(&closed_by("revoked")),
        1.0
    );
    relay.resume();
}

#[tokio::test]
async fn a_revocation_in_the_keys_file_closes_the_websocket() {
    // The embedded file store announces no revocation as such: its reload reports the changed
    // key, and the live connection is checked against the store again.
    let dir = temp_dir("ws-file");
    let keys_file = dir.join("keys.toml");
    let store = keygate::store::file::FileStore::open(&keys_file, true).unwrap();
    let key = create_key(&store, "acme", "member").await;
    let upstream = WsUpstream::start().await;
    let keygate = Keygate::start(file_test_config(&keys_file, &upstream.url())).await;
    keygate.wait_ready().await;
    let mut ws = ws_h1(&keygate, "/chat", Some(key.secret.expose()))
        .await
        .unwrap();
    echo(&mut ws, "from the file").await;
    let started = Instant::now();
    store.revoke(&key.record.id, now_unix()).await.unwrap();
    closes(
        &mut ws,
        "the WebSocket of a key revoked in the file to close",
    )
    .await;
    println!(
        "a key revoked in the keys file: its WebSocket closed {:?} after the revocation began",
        started.elapsed()
    );
    assert_eq!(keygate.scrape().await.get(&closed_by("revoked")), 1.0);
}

#[tokio::test]
async fn a_client_closing_its_websocket_is_counted_as_such() {
    let s = setup("ws-client-close").await;
    let key = create_key(&*s.store, "acme", "member").await;
    let mut ws = ws_h1(&s.keygate, "/chat", Some(key.secret.expose()))
        .await
        .unwrap();
    echo(&mut ws, "bye").await;
    live_upgrades_reach(&s.keygate, 1.0).await;
    drop(ws);
    live_upgrades_reach(&s.keygate, 0.0).await;
    assert_eq!(s.keygate.scrape().await.get(&closed_by("client")), 1.0);
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 extended CONNECT (RFC 8441)

#[tokio::test]
async fn an_h2_websocket_echoes_through_keygate_and_closes_when_its_key_is_revoked() {
    let s = setup("h2-ws-revoke").await;
    let key = create_key(&*s.store, "acme", "member").await;
    let mut h2 = H2::connect(&s.keygate).await;
    // A plain request first: keygate's SETTINGS (which enable extended CONNECT) are in.
    assert_eq!(h2.get("/plain", key.secret.expose()).await, StatusCode::OK);
    let mut ws = h2
        .websocket("/chat", Some(key.secret.expose()))
        .await
        .expect("a valid key opens the WebSocket over HTTP/2");
    echo(&mut ws, "hello over h2").await;
    // The upstream (HTTP/1.1) got a WebSocket handshake it could answer.
    let seen = s.upstream.seen.lock().unwrap().clone();
    let head = seen.last().unwrap();
    assert_eq!(head["x-keygate-key-id"], key.record.id.as_str());
    assert!(head.get("authorization").is_none());
    live_upgrades_reach(&s.keygate, 1.0).await;
    // The connection keeps serving other streams beside the tunnel.
    assert_eq!(h2.get("/plain", key.secret.expose()).await, StatusCode::OK);

    let started = Instant::now();
    s.store.revoke(&key.record.id, now_unix()).await.unwrap();
    closes(&mut ws, "the revoked key's h2 WebSocket to close").await;
    println!(
        "revoked key's h2 WebSocket closed {:?} after the revocation began",
        started.elapsed()
    );
    live_upgrades_reach(&s.keygate, 0.0).await;
    assert_eq!(s.keygate.scrape().await.get(&closed_by("revoked")), 1.0);
    assert_eq!(
        h2.get("/plain", key.secret.expose()).await,
        StatusCode::UNAUTHORIZED
    );
}

// ---------------------------------------------------------------------------------------------
// An https:// upstream: the upgrade's own connection is TLS, verified like every other

#[tokio::test]
async fn a_websocket_reaches_an_https_upstream_over_verified_tls() {
    let pki = common::tls_server::Pki::new("ws-https");
    let cert = pki.server("upstream", &["localhost"]);
    let tls = common::tls_server::server_tls(&(cert.cert, cert.key), &[b"http/1.1"], None);
    let upstream = WsUpstream::start_with(Some(tls)).await;
    let redis = RedisServer::start();
    let ns = namespace("ws-https");
    let store = redis_store(&redis, &ns);
    let url = format!("https://localhost:{}", upstream.addr.port());

    // Trusting the upstream's CA: the WebSocket opens and echoes.
    let mut config = test_config(&redis.url(), &ns, &url);
    config.upstream.tls_ca = Some(pki.ca_pem.display().to_string());
    let keygate = Keygate::start(config).await;
    keygate.wait_ready().await;
    let key = create_key(&*store, "acme", "member").await;
    let mut ws = ws_h1(&keygate, "/chat", Some(key.secret.expose()))
        .await
        .expect("a valid key opens the WebSocket to the https:// upstream");
    echo(&mut ws, "over tls").await;
    assert_eq!(upstream.opened.load(Ordering::SeqCst), 1);

    // Trusting another CA: the upstream's certificate does not verify, so no switch: a 502
    // counted as an upstream TLS failure, and the upstream never sees the request.
    let other = common::tls_server::Pki::new("ws-https-other");
    let mut config = test_config(&redis.url(), &ns, &url);
    config.upstream.tls_ca = Some(other.ca_pem.display().to_string());
    let keygate = Keygate::start(config).await;
    keygate.wait_ready().await;
    let status = ws_h1(&keygate, "/chat", Some(key.secret.expose()))
        .await
        .map(|_| ())
        .expect_err("an unverified upstream must not be switched to");
    assert_eq!(status, 502);
    let series = "keygate_upstream_errors_total{kind=\"upstream_tls\",route=\"default\"}";
    assert_eq!(keygate.scrape().await.get(series), 1.0);
    assert_eq!(
        upstream.seen.lock().unwrap().len(),
        1,
        "only the first keygate's request"
    );
}
