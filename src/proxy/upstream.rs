//! The upstream side of the request path: one connection pool per proxy worker and upstream,
//! the rule for sending a request again when a pooled connection closes under it, and the
//! mapping of upstream failures to refusals.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;

use super::hop::strip_hop_by_hop;
use crate::metrics::PoolMetrics;
use crate::rejection::Rejection;

/// Validated upstream settings.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// `http`.
    pub scheme: http::uri::Scheme,
    /// `host:port` of the upstream.
    pub authority: http::uri::Authority,
    /// The upstream's authority as a `Host` header value.
    pub host_header: HeaderValue,
    /// Path prefix prepended to every request path (empty for none).
    pub base_path: String,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time to response headers.
    pub timeout: Duration,
    /// How long a pooled connection may sit idle and still be reused.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per upstream and proxy worker.
    pub pool_max_idle: usize,
    /// Forward the client's `Host`.
    pub preserve_host: bool,
    /// `/readyz` requires the upstream to accept a connection.
    pub readiness_check: bool,
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

/// An HTTP/1.1 connection to the upstream, with when it last answered.
struct Pooled {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// One worker's connections to one upstream.
///
/// A connection is checked back in as soon as its response head arrives, while the body may
/// still be streaming; checkout takes the most recently used connection that is ready for a
/// new request (hyper's `is_ready`: the previous exchange is over) and leaves busy ones where
/// they are. Closed connections, and ones idle past the idle timeout, are dropped at checkout
/// and by a sweeper task, so an idle pool lets its connections go without any traffic.
#[derive(Default)]
struct Pool {
    // Invariant: only the owning worker's thread (and its sweeper, on the same thread) takes
    // this lock, never across an await, so it is never contended. The extra pool for threads
    // off the workers is the exception (see `Upstream::pool`); it serves no proxy traffic.
    conns: Mutex<Vec<Pooled>>,
    /// Whether the sweeper runs (it starts with the pool's first connection).
    sweeping: AtomicBool,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pooled>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops closed connections and ready ones idle past `idle_timeout` (dropping the sender
    /// closes an idle connection).
    fn drop_stale(conns: &mut Vec<Pooled>, idle_timeout: Duration) {
        let now = Instant::now();
        let stale = |c: &Pooled| c.sender.is_ready() && now - c.since > idle_timeout;
        conns.retain(|c| !(c.sender.is_closed() || stale(c)));
    }

    /// The most recently used ready connection. Closed and stale ones met on the way are
    /// dropped; the rest wait for the sweeper, so a checkout does not scan the whole pool.
    fn checkout(&self, idle_timeout: Duration) -> Option<SendRequest<UpstreamBody>> {
        let mut conns = self.lock();
        let now = Instant::now();
        while let Some(i) = conns
            .iter()
            .rposition(|c| c.sender.is_ready() || c.sender.is_closed())
        {
            let c = conns.swap_remove(i);
            if c.sender.is_ready() && now - c.since <= idle_timeout {
                return Some(c.sender);
            }
        }
        None
    }

    /// Takes a connection back as its response head arrives. `max_idle` bounds the idle
    /// connections kept, not the busy ones: a connection still streaming a response (a
    /// download, server-sent events) stays, so long responses never crowd out the idle
    /// connections that short requests reuse. With `max_idle` 0 nothing is kept.
    fn checkin(&self, sender: SendRequest<UpstreamBody>, max_idle: usize) {
        if max_idle == 0 {
            // Dropped: the connection closes once its exchange is over.
            return;
        }
        let mut conns = self.lock();
        conns.push(Pooled {
            sender,
            since: Instant::now(),
        });
        // Over the bound (rare, so the scan is too): close idle connections, oldest first.
        if conns.len() > max_idle {
            let idle = conns.iter().filter(|c| c.sender.is_ready()).count();
            let mut excess = idle.saturating_sub(max_idle);
            conns.retain(|c| {
                let close = excess > 0 && c.sender.is_ready();
                excess -= usize::from(close);
                !close
            });
        }
    }

    /// Starts the sweeper on the calling worker's event loop, once. It ends when the pool
    /// is dropped.
    fn start_sweeper(self: &Arc<Self>, idle_timeout: Duration) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        let every = (idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                Self::drop_stale(&mut pool.lock(), idle_timeout);
            }
        });
    }
}

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("cannot connect: {0}")]
    Connect(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Http(#[from] hyper::Error),
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
            headers: req.headers().clone(),
        })
    }

    fn request(self) -> Request<UpstreamBody> {
        let mut req = Request::new(Either::Right(Empty::new()));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers;
        req
    }
}

/// The connections to one upstream: a pool per proxy worker, shared by every request.
///
/// Invariant: a worker only uses its own pool. A pooled connection's task runs on the event
/// loop of the worker that opened it, so a request never hands its bytes to another thread.
/// Requests from other threads (the admin runtime, tests) share one extra pool.
pub struct Upstream {
    pools: Box<[Arc<Pool>]>,
    connector: HttpConnector,
    /// What the connector dials: the upstream's scheme and authority.
    dial: Uri,
    metrics: PoolMetrics,
    settings: UpstreamSettings,
}

impl Upstream {
    /// Builds a connection pool for each of `workers` workers (no connection is made until the
    /// first request).
    pub fn new(settings: UpstreamSettings, workers: usize, metrics: PoolMetrics) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let mut dial = http::uri::Parts::default();
        dial.scheme = Some(settings.scheme.clone());
        dial.authority = Some(settings.authority.clone());
        dial.path_and_query = Some(PathAndQuery::from_static("/"));
        Upstream {
            pools: (0..=workers.max(1)).map(|_| Arc::default()).collect(),
            connector,
            dial: Uri::from_parts(dial).expect("a scheme and an authority make a URI"),
            metrics,
            settings,
        }
    }

    /// The upstream's settings.
    pub fn settings(&self) -> &UpstreamSettings {
        &self.settings
    }

    /// The calling worker's pool.
    fn pool(&self) -> &Arc<Pool> {
        let last = self.pools.len() - 1;
        &self.pools[WORKER.with(|w| w.get()).min(last)]
    }

    /// The request target in origin form (`/base/path?query`), as HTTP/1.1 sends it.
    pub(super) fn target(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        match (self.settings.base_path.is_empty(), pq) {
            // Reuse the parsed path and query (a reference count, no copy, no re-parse).
            (true, Some(pq)) => Ok(Uri::from(pq.clone())),
            (true, None) => Ok(Uri::from_static("/")),
            (false, pq) => {
                let pq = pq.map(PathAndQuery::as_str).unwrap_or("/");
                Ok(Uri::try_from(format!("{}{pq}", self.settings.base_path))?)
            }
        }
    }

    /// Checks that the upstream accepts a TCP connection (for readiness), within the connect
    /// timeout.
    pub async fn probe(&self) -> Result<(), String> {
        let authority = &self.settings.authority;
        let port = authority.port_u16().unwrap_or(80);
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

    /// Opens a new connection for `pool`; its task runs on the calling worker's event loop.
    async fn connect(&self, pool: &Arc<Pool>) -> Result<SendRequest<UpstreamBody>, SendError> {
        let io = tower_service::Service::call(&mut self.connector.clone(), self.dial.clone())
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, "upstream connection ended with an error");
            }
        });
        pool.start_sweeper(self.settings.pool_idle_timeout);
        self.metrics.opened.inc();
        Ok(sender)
    }

    /// One exchange: on a pooled connection if one is ready, else on a new one.
    ///
    /// A pooled connection can fail under a request because the upstream closed it (ending an
    /// idle keep-alive connection) as the request went out. Such a request is sent again on
    /// another connection when that is safe: always if it was never written, and after it was
    /// written only if it is [replayable](Replay). Each retry consumes a pooled connection and
    /// a new connection is never retried, so this ends.
    async fn exchange(&self, req: Request<Incoming>) -> Result<Response<Incoming>, SendError> {
        let pool = self.pool();
        let mut req = req.map(Either::Left);
        loop {
            let (mut sender, reused) = match pool.checkout(self.settings.pool_idle_timeout) {
                Some(sender) => (sender, true),
                None => (self.connect(pool).await?, false),
            };
            // Copied only where it may be needed: a fresh connection is not retried.
            let replay = if reused { Replay::of(&req) } else { None };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    pool.checkin(sender, self.settings.pool_max_idle);
                    return Ok(resp);
                }
                Err(mut err) => {
                    req = match (err.take_message(), replay) {
                        (Some(unsent), _) if reused => unsent,
                        (None, Some(replay)) => replay.request(),
                        _ => return Err(err.into_error().into()),
                    };
                    self.metrics.retried.inc();
                }
            }
        }
    }

    /// Sends a rewritten request upstream; answers with the upstream's response head (the body
    /// streams on) or the refusal that maps the failure.
    pub async fn send(&self, mut req: Request<Incoming>) -> Result<Response<Incoming>, Rejection> {
        *req.uri_mut() = self
            .target(req.uri().path_and_query())
            .map_err(|_| Rejection::UpstreamUnavailable)?;
        *req.version_mut() = Version::HTTP_11;
        match tokio::time::timeout(self.settings.timeout, self.exchange(req)).await {
            Ok(Ok(mut resp)) => {
                strip_hop_by_hop(resp.headers_mut());
                Ok(resp)
            }
            Ok(Err(SendError::Http(err))) if client_body_failed(&err) => {
                tracing::debug!(error = %err, "the client's request body failed");
                Err(Rejection::InvalidBody)
            }
            Ok(Err(err)) => {
                let connect = matches!(err, SendError::Connect(_));
                tracing::warn!(error = %err, connect, "upstream request failed");
                Err(Rejection::UpstreamUnavailable)
            }
            Err(_) => {
                tracing::warn!(timeout = ?self.settings.timeout, "upstream did not answer in time");
                Err(Rejection::UpstreamTimeout)
            }
        }
    }
}
