//! The upstream side's transports: HTTP/2 to upstreams (h2c prior knowledge over cleartext, h2
//! by ALPN over TLS) carrying many client connections over few upstream connections;
//! `https://` upstreams verified against a CA bundle, with SNI and an optional client
//! certificate; and an HTTP/1.0 upstream's answer reaching an HTTP/1.1 client as HTTP/1.1.
//!
//! Certificates are made at test time (rcgen): a private CA, the upstream's certificate for
//! `localhost`, one for another host, and a client certificate for keygate.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::tls_server::server_tls;
use common::*;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

type Body = BoxBody<Bytes, Infallible>;

// ---------------------------------------------------------------------------------------------
// Certificates

/// PEM files of a private CA and what it issued, in a temp dir.
struct Certs {
    ca: PathBuf,
    /// For `localhost` and `127.0.0.1`.
    server: (PathBuf, PathBuf),
    /// For `wrong.example` only.
    wrong_host: (PathBuf, PathBuf),
    /// keygate's client certificate.
    client: (PathBuf, PathBuf),
}

impl Certs {
    fn new() -> Self {
        let dir = temp_dir("upstream-tls");
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name
            .push(DnType::CommonName, "keygate test CA");
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let issue = |name: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut params =
                CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .unwrap();
            params.extended_key_usages = vec![usage];
            params.distinguished_name.push(DnType::CommonName, sans[0]);
            let cert = params.signed_by(&key, &ca).unwrap();
            (
                write(&format!("{name}.crt"), &cert.pem()),
                write(&format!("{name}.key"), &key.serialize_pem()),
            )
        };
        let server = issue(
            "server",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let wrong_host = issue(
            "wrong",
            &["wrong.example"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = issue(
            "client",
            &["keygate-client"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let ca = write("ca.crt", &ca.pem());
        Certs {
            ca,
            server,
            wrong_host,
            client,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// An upstream speaking HTTP/1.1 or HTTP/2, in cleartext or over TLS

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    Http1,
    H2,
}

/// A real hyper upstream that counts the connections requests arrive on. Paths: `/upload` answers the
/// number of body bytes it read; `/download?bytes=N` streams N bytes; `/hold` waits until
/// [`TestUpstream::release`], `/hold-body` sends its head at once and its body only then;
/// anything else answers the request's HTTP version.
struct TestUpstream {
    addr: SocketAddr,
    /// Connections on which a request arrived (readiness probes only connect).
    accepted: Arc<AtomicUsize>,
    held: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
    /// The SNI names of the TLS handshakes it completed.
    sni: Arc<Mutex<Vec<Option<String>>>>,
}

impl TestUpstream {
    async fn start(proto: Proto, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(AtomicUsize::new(0));
        let sni = Arc::new(Mutex::new(Vec::new()));
        let (release, released) = watch::channel(false);
        let (a, h, s) = (accepted.clone(), held.clone(), sni.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (h, s, tls, released) = (h.clone(), s.clone(), tls.clone(), released.clone());
                let (a, first) = (a.clone(), Arc::new(std::sync::Once::new()));
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        first.call_once(|| {
                            a.fetch_add(1, Ordering::SeqCst);
                        });
                        let (h, released) = (h.clone(), released.clone());
                        async move { Ok::<_, Infallible>(answer(req, h, released).await) }
                    });
                    match tls {
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let name = stream.get_ref().1.server_name().map(str::to_owned);
                            s.lock().unwrap().push(name);
                            serve(proto, TokioIo::new(stream), svc).await;
                        }
                        None => serve(proto, TokioIo::new(tcp), svc).await,
                    }
                });
            }
        });
        TestUpstream {
            addr,
            accepted,
            held,
            release,
            sni,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn release(&self) {
        let _ = self.release.send(true);
    }
}

async fn serve<I, S>(proto: Proto, io: I, svc: S)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Body> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _ = match proto {
        Proto::Http1 => {
            hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
        }
        Proto::H2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_streams(250)
                .serve_connection(io, svc)
                .await
        }
    };
}

async fn answer(
    req: Request<Incoming>,
    held: Arc<AtomicUsize>,
    mut released: watch::Receiver<bool>,
) -> Response<Body> {
    let text = |s: String| Response::new(Full::new(Bytes::from(s)).boxed());
    match req.uri().path() {
        "/upload" => {
            let mut body = req.into_body();
            let mut n = 0usize;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    n += data.len();
                }
            }
            text(n.to_string())
        }
        "/download" => {
            let n = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Response::new(zeros(n))
        }
        "/hold-body" => {
            // The head at once, the body only once released.
            let body = futures_util::stream::once(async move {
                let _ = released.wait_for(|r| *r).await;
                Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(b"released")))
            });
            Response::new(http_body_util::StreamBody::new(body).boxed())
        }
        "/hold" => {
            held.fetch_add(1, Ordering::SeqCst);
            let _ = released.wait_for(|r| *r).await;
            text("released".into())
        }
        _ => text(format!("{:?}", req.version())),
    }
}

// ---------------------------------------------------------------------------------------------
// keygate in front of it

struct Rig {
    _redis: RedisServer,
    kg: Keygate,
    auth: String,
}

async fn keygate_for(url: &str, configure: impl FnOnce(&mut keygate::config::Config)) -> Rig {
    let redis = RedisServer::start();
    let ns = namespace("upstream-transport");
    let store = redis_store(&redis, &ns);
    let key = create_key(&*store, "acme", "admin").await;
    let mut config = test_config(&redis.url(), &ns, url);
    configure(&mut config);
    let kg = Keygate::start(config).await;
    kg.wait_ready().await;
    Rig {
        _redis: redis,
        kg,
        auth: format!("Bearer {}", key.secret.expose()),
    }
}

impl Rig {
    async fn get(&self, http: &Http, path: &str) -> Reply {
        http.get(&self.kg.url(path), &[("authorization", &self.auth)])
            .await
    }
}

/// `clients` clients, each on its own connection to keygate, each sending `each` requests one
/// after another, all at once: every answer must be a 200 with body `want`.
async fn many_clients(rig: &Rig, clients: usize, each: usize, want: &str) {
    let runs = (0..clients).map(|_| async move {
        let http = Http::new();
        for _ in 0..each {
            let reply = rig.get(&http, "/").await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            assert_eq!(reply.text(), want);
        }
    });
    futures_util::future::join_all(runs).await;
}

const WORKERS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upstream_serves_many_clients_over_one_connection_per_worker() {
    let upstream = TestUpstream::start(Proto::H2, None).await;
    let rig = keygate_for(&format!("http://{}", upstream.addr), |c| {
        c.upstream.protocol = "h2".into();
        c.server.workers = WORKERS;
    })
    .await;
    many_clients(&rig, 50, 4, "HTTP/2.0").await;
    let accepted = upstream.accepted();
    assert!(
        (1..=WORKERS).contains(&accepted),
        "200 requests from 50 client connections took {accepted} upstream connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upstream_over_tls_is_chosen_by_alpn_and_multiplexed() {
    let certs = Certs::new();
    let tls = server_tls(&certs.server, &[b"h2"], None);
    let upstream = TestUpstream::start(Proto::H2, Some(tls)).await;
    let rig = keygate_for(
        &format!("https://localhost:{}", upstream.addr.port()),
        |c| {
            c.upstream.protocol = "h2".into();
            c.upstream.tls_ca = Some(certs.ca.display().to_string());
            c.server.workers = WORKERS;
        },
    )
    .await;
    many_clients(&rig, 50, 4, "HTTP/2.0").await;
    let accepted = upstream.accepted();
    assert!(
        (1..=WORKERS).contains(&accepted),
        "200 requests from 50 client connections took {accepted} upstream connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways_over_h2_upstreams() {
    let certs = Certs::new();
    let cleartext = TestUpstream::start(Proto::H2, None).await;
    let tls = server_tls(&certs.server, &[b"h2"], None);
    let over_tls = TestUpstream::start(Proto::H2, Some(tls)).await;
    for url in [
        format!("http://{}", cleartext.addr),
        format!("https://localhost:{}", over_tls.addr.port()),
    ] {
        let rig = keygate_for(&url, |c| {
            c.upstream.protocol = "h2".into();
            c.upstream.tls_ca = Some(certs.ca.display().to_string());
        })
        .await;
        let len: u64 = 8 << 20;
        for http in [Http::new(), Http::http2()] {
            let resp = http
                .send(
                    "POST",
                    &rig.kg.url("/upload"),
                    &[("authorization", &rig.auth)],
                    zeros(len),
                )
                .await;
            assert_eq!(resp.status(), 200, "{url}");
            let body = within(REQUEST_TIMEOUT, "the upload's answer", resp.collect()).await;
            assert_eq!(body.unwrap().to_bytes(), len.to_string(), "{url}");

            let reply = rig.get(&http, &format!("/download?bytes={len}")).await;
            assert_eq!(reply.status, 200, "{url}");
            assert_eq!(reply.body.len() as u64, len, "{url}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_h2_connection_makes_keygate_open_another() {
    let upstream = TestUpstream::start(Proto::H2, None).await;
    let rig = keygate_for(&format!("http://{}", upstream.addr), |c| {
        c.upstream.protocol = "h2".into();
        c.upstream.h2_max_streams = 2;
        c.server.workers = 1;
    })
    .await;
    let rig = &rig;
    let requests = futures_util::future::join_all(
        (0..5).map(|_| async move { rig.get(&Http::new(), "/hold").await }),
    );
    let checks = async {
        eventually(
            Duration::from_secs(5),
            "5 requests held upstream",
            || async { upstream.held.load(Ordering::SeqCst) == 5 },
        )
        .await;
        // Two streams per connection: five held requests need three connections.
        assert_eq!(upstream.accepted(), 3);
        upstream.release();
    };
    let (replies, ()) = tokio::join!(requests, checks);
    for reply in replies {
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    // Once they are answered, the connections serve new requests again.
    many_clients(rig, 4, 2, "HTTP/2.0").await;
    assert_eq!(upstream.accepted(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_counts_until_its_response_body_ends() {
    let upstream = TestUpstream::start(Proto::H2, None).await;
    let rig = keygate_for(&format!("http://{}", upstream.addr), |c| {
        c.upstream.protocol = "h2".into();
        c.upstream.h2_max_streams = 1;
        c.server.workers = 1;
    })
    .await;
    let http = Http::new();
    // The response head is in, its body still streaming: the connection's one stream is
    // taken, so the next request needs another connection.
    let streaming = http
        .send(
            "GET",
            &rig.kg.url("/hold-body"),
            &[("authorization", &rig.auth)],
            http_body_util::Empty::new().boxed(),
        )
        .await;
    assert_eq!(streaming.status(), 200);
    assert_eq!(rig.get(&Http::new(), "/").await.text(), "HTTP/2.0");
    assert_eq!(upstream.accepted(), 2);
    upstream.release();
    let body = within(REQUEST_TIMEOUT, "the held body", streaming.collect()).await;
    assert_eq!(body.unwrap().to_bytes(), "released");
    // The body ended: its stream is free again, and the first connection takes the next one.
    for _ in 0..3 {
        assert_eq!(rig.get(&Http::new(), "/").await.text(), "HTTP/2.0");
    }
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_with_a_private_ca_is_verified_and_sent_sni() {
    let certs = Certs::new();
    let tls = server_tls(&certs.server, &[b"http/1.1"], None);
    let upstream = TestUpstream::start(Proto::Http1, Some(tls)).await;
    let rig = keygate_for(
        &format!("https://localhost:{}", upstream.addr.port()),
        |c| c.upstream.tls_ca = Some(certs.ca.display().to_string()),
    )
    .await;
    many_clients(&rig, 4, 3, "HTTP/1.1").await;
    let sni = upstream.sni.lock().unwrap().clone();
    assert!(!sni.is_empty());
    assert!(
        sni.iter().all(|s| s.as_deref() == Some("localhost")),
        "{sni:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_host_certificate_is_a_502_counted_as_upstream_tls() {
    let certs = Certs::new();
    let tls = server_tls(&certs.wrong_host, &[b"http/1.1"], None);
    let upstream = TestUpstream::start(Proto::Http1, Some(tls)).await;
    let rig = keygate_for(
        &format!("https://localhost:{}", upstream.addr.port()),
        |c| c.upstream.tls_ca = Some(certs.ca.display().to_string()),
    )
    .await;
    let series = "keygate_upstream_errors_total{kind=\"upstream_tls\",route=\"default\"}";
    assert_eq!(rig.kg.scrape().await.get(series), 0.0);
    let reply = rig.get(&Http::new(), "/").await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.error_code(), "upstream_unavailable");
    let scrape = rig.kg.scrape().await;
    assert_eq!(scrape.get(series), 1.0, "{}", scrape.text);
    let unavailable = "keygate_upstream_errors_total{kind=\"unavailable\",route=\"default\"}";
    assert_eq!(scrape.get(unavailable), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_requiring_a_client_certificate_accepts_keygate_s() {
    let certs = Certs::new();
    let tls = server_tls(&certs.server, &[b"http/1.1"], Some(&certs.ca));
    let upstream = TestUpstream::start(Proto::Http1, Some(tls)).await;
    let url = format!("https://localhost:{}", upstream.addr.port());
    let with_cert = keygate_for(&url, |c| {
        c.upstream.tls_ca = Some(certs.ca.display().to_string());
        c.upstream.tls_client_cert = Some(certs.client.0.display().to_string());
        c.upstream.tls_client_key = Some(certs.client.1.display().to_string());
    })
    .await;
    let reply = with_cert.get(&Http::new(), "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    let without = keygate_for(&url, |c| {
        c.upstream.tls_ca = Some(certs.ca.display().to_string());
    })
    .await;
    let reply = without.get(&Http::new(), "/").await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.error_code(), "upstream_unavailable");
    let series = "keygate_upstream_errors_total{kind=\"upstream_tls\",route=\"default\"}";
    let scrape = without.kg.scrape().await;
    assert_eq!(scrape.get(series), 1.0, "{}", scrape.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_overrides_the_upstream_protocol_and_tls_settings() {
    let certs = Certs::new();
    let plain = TestUpstream::start(Proto::Http1, None).await;
    let tls = server_tls(&certs.server, &[b"h2"], None);
    let secure = TestUpstream::start(Proto::H2, Some(tls)).await;
    let rig = keygate_for(&format!("http://{}", plain.addr), |c| {
        c.routes.push(keygate::config::RouteConfig {
            path_prefix: "/secure".into(),
            upstream: Some(format!("https://localhost:{}", secure.addr.port())),
            upstream_protocol: Some("h2".into()),
            upstream_tls_ca: Some(certs.ca.display().to_string()),
            ..Default::default()
        });
    })
    .await;
    let http = Http::new();
    assert_eq!(rig.get(&http, "/").await.text(), "HTTP/1.1");
    assert_eq!(rig.get(&http, "/secure").await.text(), "HTTP/2.0");
}

/// An upstream that answers every request with `answer` in HTTP/1.0 and closes.
async fn http10_upstream(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_upstream_answer_reaches_an_http11_client_as_http11() {
    for answer in [
        &b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from 1.0"[..],
        b"HTTP/1.0 200 OK\r\nContent-Length: 14\r\nConnection: keep-alive\r\n\r\nhello from 1.0",
    ] {
        let addr = http10_upstream(answer).await;
        let rig = keygate_for(&format!("http://{addr}"), |_| {}).await;
        let request = |connection: &str| {
            format!(
                "GET / HTTP/1.1\r\nHost: keygate.test\r\nAuthorization: {}\r\nConnection: {connection}\r\n\r\n",
                rig.auth
            )
        };
        // Two requests on one connection: the first answer must leave it usable; keygate
        // closes it after the second.
        let twice = format!("{}{}", request("keep-alive"), request("close"));
        let got = raw_exchange(
            rig.kg.proxy,
            twice.as_bytes(),
            false,
            Duration::from_secs(5),
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert_eq!(got.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{got}");
        assert_eq!(got.matches("hello from 1.0").count(), 2, "{got}");
        assert!(!got.contains("HTTP/1.0"), "{got}");
    }
}
