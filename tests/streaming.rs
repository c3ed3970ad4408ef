//! Bodies stream through keygate in both directions without being buffered: the upstream sees
//! the first chunk of an upload while the client still holds the rest back, and the client
//! gets the first chunk of a download while the upstream still holds the rest back. A proxy
//! that collected either body before passing it on could do neither, so these tests fail on
//! it (by deadline) whatever the machine's memory.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};

/// One chunk of a streamed body.
const CHUNK: usize = 64 * 1024;
/// Chunks sent after the first one.
const REST: usize = 64;
/// How long one side may take to see a chunk the other side has sent.
const SEEN_WITHIN: Duration = Duration::from_secs(5);

type Body = BoxBody<Bytes, Infallible>;

/// A body fed chunk by chunk from the test: it ends when the sender is dropped.
fn channel_body() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    (tx, StreamBody::new(frames).boxed())
}

/// An upstream whose bodies move only when the test lets them.
/// `/upload` reports each chunk's size as it arrives, then answers the total;
/// `/download` sends one chunk at once and the other `REST` only after [`Gated::release`].
struct Gated {
    addr: SocketAddr,
    uploaded: mpsc::UnboundedReceiver<usize>,
    release: Arc<Notify>,
}

impl Gated {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (report, uploaded) = mpsc::unbounded_channel();
        let release = Arc::new(Notify::new());
        let gate = release.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (report, gate) = (report.clone(), gate.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (report, gate) = (report.clone(), gate.clone());
                        async move { Ok::<_, Infallible>(answer(req, report, gate).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Gated {
            addr,
            uploaded,
            release,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets the held part of a download go.
    fn release(&self) {
        self.release.notify_one();
    }
}

async fn answer(
    req: Request<Incoming>,
    report: mpsc::UnboundedSender<usize>,
    gate: Arc<Notify>,
) -> Response<Body> {
    match req.uri().path() {
        "/upload" => {
            let mut body = req.into_body();
            let mut total = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    total += data.len();
                    let _ = report.send(data.len());
                }
            }
            Response::new(Full::new(Bytes::from(total.to_string())).boxed())
        }
        "/download" => {
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from(vec![1u8; CHUNK])).await;
                gate.notified().await;
                for _ in 0..REST {
                    if tx.send(Bytes::from(vec![2u8; CHUNK])).await.is_err() {
                        return;
                    }
                }
            });
            Response::new(body)
        }
        _ => Response::new(Full::new(Bytes::from_static(b"ok")).boxed()),
    }
}

struct Rig {
    _redis: RedisServer,
    upstream: Gated,
    keygate: Keygate,
    auth: String,
}

async fn rig() -> Rig {
    let redis = RedisServer::start();
    let upstream = Gated::start().await;
    let ns = namespace("stream");
    let store = redis_store(&redis, &ns);
    let keygate = Keygate::start(test_config(&redis.url(), &ns, &upstream.url())).await;
    keygate.wait_ready().await;
    let key = create_key(&*store, "acme", "admin").await;
    Rig {
        _redis: redis,
        upstream,
        keygate,
        auth: format!("Bearer {}", key.secret.expose()),
    }
}

#[tokio::test]
async fn the_upstream_sees_an_uploads_first_chunk_while_the_client_holds_the_rest() {
    let mut r = rig().await;
    let (tx, body) = channel_body();
    let http = Http::new();
    let url = r.keygate.url("/upload");
    let auth = r.auth.clone();
    let response = tokio::spawn(async move {
        let resp = http
            .send("POST", &url, &[("authorization", &auth)], body)
            .await;
        let status = resp.status();
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&text).into_owned())
    });

    tx.send(Bytes::from(vec![7u8; CHUNK])).await.unwrap();
    // Nothing more is sent until the upstream has seen the first chunk.
    let mut seen = 0;
    while seen < CHUNK {
        seen += within(
            SEEN_WITHIN,
            "the upstream sees the first chunk of the upload",
            r.upstream.uploaded.recv(),
        )
        .await
        .expect("the upstream is running");
    }
    for _ in 0..REST {
        tx.send(Bytes::from(vec![8u8; CHUNK])).await.unwrap();
    }
    drop(tx);

    let (status, text) = within(SEEN_WITHIN, "the upload's answer", response)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(text, ((REST + 1) * CHUNK).to_string());
}

#[tokio::test]
async fn the_client_gets_a_downloads_first_chunk_while_the_upstream_holds_the_rest() {
    let r = rig().await;
    let resp = within(
        SEEN_WITHIN,
        "the download's response head",
        Http::new().send(
            "GET",
            &r.keygate.url("/download"),
            &[("authorization", &r.auth)],
            Full::new(Bytes::new()).boxed(),
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();

    // The upstream holds the rest back until the client has the whole first chunk.
    let mut received = 0usize;
    while received < CHUNK {
        let frame = within(
            SEEN_WITHIN,
            "the client gets the first chunk of the download",
            body.frame(),
        )
        .await
        .expect("the body goes on")
        .unwrap();
        let data = frame.into_data().unwrap();
        assert!(data.iter().all(|&b| b == 1), "only the first chunk so far");
        received += data.len();
    }
    assert_eq!(received, CHUNK);

    r.upstream.release();
    while let Some(frame) = within(SEEN_WITHIN, "the rest of the download", body.frame()).await {
        received += frame.unwrap().into_data().map_or(0, |d| d.len());
    }
    assert_eq!(received, (REST + 1) * CHUNK);
}
