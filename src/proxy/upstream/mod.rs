//! The upstream side of the request path: the connections to each upstream, per proxy worker,
//! in the protocol its route asks for, and the mapping of upstream failures to refusals.
//!
//! - This file: the settings, [`Upstream`] (one per distinct upstream, shared by the routes
//!   that name it) and its one entry point, [`Upstream::send`]; the rule for sending a request
//!   again ([`Replay`]); the response body that keeps an HTTP/2 stream counted.
//! - `connect.rs`: dialling: TCP, then TLS for `https://` (SNI, ALPN), the stream both
//!   protocols run over, and [`Upstream::connect_io`] for dedicated connections (upgrades).
//! - `http1.rs`: the HTTP/1.1 pool (one exchange per connection at a time).
//! - `http2.rs`: the HTTP/2 pool (many streams per connection, a new connection only when the
//!   others are saturated or closing).
//! - `tls.rs`: the TLS client settings built from the configured files.
//!
//! Invariant: a worker only uses its own connections. A connection's task runs on the event
//! loop of the worker that opened it, so a request never hands its bytes to another thread.
//! Requests from other threads (the admin runtime, tests) share one extra set of pools.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::hop::strip_hop_by_hop;
use crate::metrics::PoolMetrics;
use crate::rejection::Rejection;

mod connect;
mod http1;
mod http2;
mod tls;

pub use connect::{ConnectError, UpstreamIo};
pub use tls::UpstreamTls;

/// How keygate speaks to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1: one exchange per connection at a time, a pool of connections.
    Http1,
    /// HTTP/2: many exchanges multiplexed on each connection; by ALPN over TLS, with prior
    /// knowledge (h2c) over cleartext.
    H2,
}

impl Protocol {
    /// Parses `http1` or `h2`.
    pub fn parse(name: &str) -> Option<Protocol> {
        match name {
            "http1" => Some(Protocol::Http1),
            "h2" => Some(Protocol::H2),
            _ => None,
        }
    }

    /// The setting's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2 => "h2",
        }
    }
}

/// Validated upstream settings.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// `host:port` of the upstream.
    pub authority: http::uri::Authority,
    /// The upstream's authority as a `Host` header value.
    pub host_header: HeaderValue,
    /// Path prefix prepended to every request path (empty for none).
    pub base_path: String,
    /// TCP connect timeout (and, for `https://`, TLS handshake timeout).
    pub connect_timeout: Duration,
    /// Time to response headers.
    pub timeout: Duration,
    /// How long a pooled connection may sit idle and still be reused.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per upstream and proxy worker (HTTP/1.1).
    pub pool_max_idle: usize,
    /// Forward the client's `Host`.
    pub preserve_host: bool,
    /// `/readyz` requires the upstream to accept a connection.
    pub readiness_check: bool,
    /// HTTP/1.1 or HTTP/2.
    pub protocol: Protocol,
    /// Most streams in flight on one HTTP/2 connection before another is opened.
    pub h2_max_streams: usize,
    /// TLS client settings, for `https://` upstreams (`None` for `http://`).
    pub tls: Option<UpstreamTls>,
}

impl UpstreamSettings {
    /// What makes two routes' upstreams the same connections: where they dial and how they
    /// speak (routes naming the same upstream share one [`Upstream`]).
    pub fn pool_key(&self) -> String {
        let tls = self.tls.as_ref().map_or("", UpstreamTls::files);
        format!(
            "{}://{}{} {} {tls}",
            self.scheme,
            self.authority,
            self.base_path,
            self.protocol.name()
        )
    }
}

thread_local! {
    /// The proxy worker this thread runs; `OFF_WORKER` on any other thread.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(OFF_WORKER) };
}

const OFF_WORKER: usize = usize::MAX;

/// Marks the calling thread as proxy worker `index`, so it uses that worker's upstream pools.
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("cannot build the request target: {0}")]
    Target(#[from] http::Error),
}

/// Whether an exchange failed because of the client's request body (cut short, a bad chunk
/// size, a reset stream) rather than the upstream. hyper's client reports a failure of the
/// body it was given to send as a user error caused by that body's own error, which here is
/// the error hyper's server met reading the client.
fn client_body_failed(err: &hyper::Error) -> bool {
    use std::error::Error as _;
    err.is_user() && err.source().is_some_and(|s| s.is::<hyper::Error>())
}

/// A request body sent upstream: the client's, or none when a request is sent again.
type UpstreamBody = Either<Incoming, Empty<Bytes>>;

/// What it takes to send a request again: its head. Only for a request that is idempotent
/// (RFC 9110 §9.2.2: `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`, `DELETE`) and has no body, so
/// that sending it twice is what the client asked for once.
struct Replay {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    fn of(req: &Request<UpstreamBody>) -> Option<Self> {
        use http::Method;
        let idempotent = matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        (idempotent && req.body().is_end_stream()).then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    fn request(self) -> Request<UpstreamBody> {
        let mut req = Request::new(Either::Right(Empty::new()));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// The body of an upstream's response, streamed as it arrives. On HTTP/2 it holds its
/// stream's place in the connection's count until it ends or is dropped, so a connection
/// streaming long responses counts as busy.
pub struct ResponseBody {
    body: Incoming,
    stream: Option<http2::Stream>,
}

impl From<Incoming> for ResponseBody {
    /// A body that holds no HTTP/2 stream (an upgrade's answer on its dedicated connection).
    fn from(body: Incoming) -> Self {
        ResponseBody { body, stream: None }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        // Invariant: the stream is given back no later than the poll that yields the body's
        // last frame, so before the client can have read the end of the response.
        if self.stream.is_some() && frame.is_ready() && self.body.is_end_stream() {
            self.stream = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connections to one upstream: a pool per proxy worker (see the module docs), of the
/// route's protocol.
pub struct Upstream {
    pools: Box<[Pools]>,
    connector: connect::Connector,
    metrics: PoolMetrics,
    settings: UpstreamSettings,
}

/// One worker's connections to the upstream.
#[derive(Default)]
struct Pools {
    http1: Arc<http1::Pool>,
    http2: Arc<http2::Pool>,
}

impl Upstream {
    /// Builds a connection pool for each of `workers` workers (no connection is made until the
    /// first request).
    pub fn new(settings: UpstreamSettings, workers: usize, metrics: PoolMetrics) -> Self {
        Upstream {
            pools: (0..=workers.max(1)).map(|_| Pools::default()).collect(),
            connector: connect::Connector::new(&settings),
            metrics,
            settings,
        }
    }

    /// The upstream's settings.
    pub fn settings(&self) -> &UpstreamSettings {
        &self.settings
    }

    /// The calling worker's pools.
    fn pools(&self) -> &Pools {
        let last = self.pools.len() - 1;
        &self.pools[WORKER.with(|w| w.get()).min(last)]
    }

    /// The request target in origin form (`/base/path?query`), as HTTP/1.1 sends it.
    pub(super) fn target(&self, pq: Option<&PathAndQuery>) -> Result<PathAndQuery, http::Error> {
        match (self.settings.base_path.is_empty(), pq) {
            // Reuse the parsed path and query (a reference count, no copy, no re-parse).
            (true, Some(pq)) => Ok(pq.clone()),
            (true, None) => Ok(PathAndQuery::from_static("/")),
            (false, pq) => {
                let pq = pq.map(PathAndQuery::as_str).unwrap_or("/");
                Ok(PathAndQuery::try_from(format!(
                    "{}{pq}",
                    self.settings.base_path
                ))?)
            }
        }
    }

    /// Checks that the upstream accepts a TCP connection (for readiness), within the connect
    /// timeout. The TLS handshake is not part of it: a certificate the upstream's TLS refuses
    /// is a configuration fault each request reports (`502`, kind `upstream_tls`), not a
    /// reason to take the instance out of its load balancer.
    pub async fn probe(&self) -> Result<(), String> {
        let authority = &self.settings.authority;
        let port = authority
            .port_u16()
            .unwrap_or(if self.settings.tls.is_some() { 443 } else { 80 });
        let connect = tokio::net::TcpStream::connect((authority.host(), port));
        match tokio::time::timeout(self.settings.connect_timeout, connect).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("{authority}: {e}")),
            Err(_) => Err(format!(
                "{authority}: no connection within {:?}",
                self.settings.connect_timeout
            )),
        }
    }

    /// Sends a rewritten request upstream; answers with the upstream's response head (the body
    /// streams on) or the refusal that maps the failure.
    ///
    /// The response is HTTP/1.1 whatever the upstream spoke (HTTP/1.0, HTTP/2): the version is
    /// the hop's, not the message's, and hyper's server would otherwise write an HTTP/1.0
    /// upstream's status line (and framing) to an HTTP/1.1 client.
    pub async fn send(
        &self,
        mut req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Rejection> {
        let exchange = async {
            let target = self.target(req.uri().path_and_query())?;
            match self.settings.protocol {
                Protocol::Http1 => {
                    *req.uri_mut() = Uri::from(target);
                    *req.version_mut() = Version::HTTP_11;
                    let resp = self.exchange_http1(req).await?;
                    Ok(resp.map(|body| ResponseBody { body, stream: None }))
                }
                Protocol::H2 => {
                    self.h2_request(&mut req, target)?;
                    let (resp, stream) = self.exchange_http2(req).await?;
                    Ok(resp.map(|body| ResponseBody {
                        body,
                        stream: Some(stream),
                    }))
                }
            }
        };
        let outcome: Result<Result<Response<ResponseBody>, SendError>, _> =
            tokio::time::timeout(self.settings.timeout, exchange).await;
        match outcome {
            Ok(Ok(mut resp)) => {
                strip_hop_by_hop(resp.headers_mut());
                *resp.version_mut() = Version::HTTP_11;
                Ok(resp)
            }
            Ok(Err(err)) => Err(self.failure(err)),
            Err(_) => {
                tracing::warn!(
                    upstream = %self.settings.authority,
                    timeout = ?self.settings.timeout,
                    "upstream did not answer in time"
                );
                Err(Rejection::UpstreamTimeout)
            }
        }
    }

    /// The refusal for a failed exchange, logged with the upstream's authority.
    fn failure(&self, err: SendError) -> Rejection {
        let upstream = &self.settings.authority;
        let tls = match &err {
            SendError::Http(e) if client_body_failed(e) => {
                tracing::debug!(error = %e, "the client's request body failed");
                return Rejection::InvalidBody;
            }
            SendError::Connect(ConnectError::Tls(reason)) => Some(reason.clone()),
            // With TLS 1.3 an upstream judges keygate's client certificate after keygate's
            // side of the handshake is done: its refusal (an alert) ends the first exchange.
            SendError::Http(e) => connect::tls_cause(e),
            _ => None,
        };
        match tls {
            Some(reason) => {
                tracing::warn!(%upstream, kind = "upstream_tls", %reason, "upstream TLS failed");
                Rejection::UpstreamTls
            }
            None => {
                let connect = matches!(err, SendError::Connect(_));
                tracing::warn!(%upstream, error = %err, connect, "upstream request failed");
                Rejection::UpstreamUnavailable
            }
        }
    }

    /// Makes an HTTP/1.1-shaped request an HTTP/2 one: the target in absolute form (HTTP/2
    /// sends `:scheme` and `:authority`), the authority from the `Host` the rewrite chose (the
    /// upstream's, or the client's under `preserve_host`), and no `Host` header beside it.
    fn h2_request(
        &self,
        req: &mut Request<Incoming>,
        target: PathAndQuery,
    ) -> Result<(), http::Error> {
        let authority = match req.headers_mut().remove(http::header::HOST) {
            Some(host) if host != self.settings.host_header => {
                http::uri::Authority::try_from(host.as_bytes())?
            }
            _ => self.settings.authority.clone(),
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.settings.scheme.clone());
        parts.authority = Some(authority);
        parts.path_and_query = Some(target);
        *req.uri_mut() = Uri::from_parts(parts)?;
        *req.version_mut() = Version::HTTP_2;
        Ok(())
    }
}
