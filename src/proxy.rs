//! Forwarding: rewrite an authenticated request for the upstream and send it over the shared
//! worker's connection pool, streaming bodies both ways.
//!
//! Header rules, in this order (the order is what makes them safe):
//! 1. hop-by-hop headers go, with every header the client named in `Connection`;
//! 2. `Authorization` goes (unless configured to be forwarded);
//! 3. every client header with the identity prefix goes;
//! 4. keygate's identity headers, `X-Forwarded-*`, `Host` and the request id are set.
//!
//! Because step 4 comes last, no client header (not even `Connection: x-keygate-tenant`) can
//! remove or replace an identity header keygate adds.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, AUTHORIZATION, CONNECTION, HOST};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::config::{IdentitySettings, UpstreamSettings};
use crate::metrics::PoolMetrics;
use crate::rejection::Rejection;
use crate::verify::{Identity, Part};

/// `x-request-id`: kept from the client when sane, else generated; sent upstream and back.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
fn hop_by_hop() -> [&'static HeaderName; 9] {
    [
        &CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
}

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the few names present finds which hop-by-hop headers to remove: cheaper
    // than nine removals by hash, and most requests carry none.
    let hop = hop_by_hop();
    let mut present = [false; 9];
    for name in headers.keys() {
        if let Some(i) = hop.iter().position(|h| *h == name) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    // `hop[0]` is `Connection`. The names it lists are removed by reference: a token that
    // names no header present (`keep-alive`, `close`) costs a lookup, never an allocation.
    if present[0] {
        let mut values = headers.get_all(CONNECTION).iter();
        let first = values.next().cloned();
        // Empty, so not allocated, unless `Connection` appears more than once.
        let more: Vec<HeaderValue> = values.cloned().collect();
        for value in first.iter().chain(&more) {
            for token in value.as_bytes().split(|&b| b == b',') {
                if let Ok(name) = std::str::from_utf8(trim(token)) {
                    headers.remove(name);
                }
            }
        }
    }
    for (name, present) in hop.into_iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// Removes every header whose name starts with the identity prefix.
fn strip_identity(headers: &mut HeaderMap, prefix: &str) {
    let spoofed = |n: &HeaderName| n.as_str().starts_with(prefix);
    if headers.keys().any(spoofed) {
        let names: Vec<HeaderName> = headers.keys().filter(|n| spoofed(n)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
}

/// Per-request facts the rewrite needs besides the headers.
pub struct Forwarded<'a> {
    /// The client's address, as a header value (made once per connection by [`ip_value`]).
    pub client_ip: &'a HeaderValue,
    /// `http` or `https`, as the client spoke to keygate.
    pub proto: &'static str,
    /// The host the client asked for (`Host`, or the URI authority under HTTP/2).
    pub host: Option<HeaderValue>,
    /// The request id.
    pub request_id: &'a HeaderValue,
}

/// Rewrites a request head for the upstream (see the module docs for the order). `identity` is
/// `None` on an open route: client identity headers are still removed, none are added.
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    identity: Option<&Identity>,
    ids: &IdentitySettings,
    upstream: &UpstreamSettings,
    fwd: &Forwarded<'_>,
) {
    strip_hop_by_hop(headers);
    if !ids.forward_authorization {
        headers.remove(AUTHORIZATION);
    }
    strip_identity(headers, &ids.prefix);

    if let Some(identity) = identity {
        headers.insert(ids.key_id.clone(), identity.header(Part::KeyId));
        headers.insert(ids.tenant.clone(), identity.header(Part::Tenant));
        headers.insert(ids.role.clone(), identity.header(Part::Role));
        headers.insert(ids.subject.clone(), identity.header(Part::Subject));
        headers.insert(
            ids.subject_kind.clone(),
            HeaderValue::from_static(identity.kind.as_str()),
        );
    }

    append_forwarded_for(headers, fwd.client_ip);
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(fwd.proto),
    );
    match &fwd.host {
        Some(h) => headers.insert(X_FORWARDED_HOST.clone(), h.clone()),
        None => headers.remove(&X_FORWARDED_HOST),
    };
    if !upstream.preserve_host || fwd.host.is_none() {
        headers.insert(HOST, upstream.host_header.clone());
    } else if let Some(h) = &fwd.host {
        headers.insert(HOST, h.clone());
    }
    headers.insert(X_REQUEST_ID.clone(), fwd.request_id.clone());
}

/// A client address as an `X-Forwarded-For` value.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::try_from(ip.to_string()).expect("an IP address is a valid header value")
}

/// Appends the client address to `X-Forwarded-For`, folding earlier values into one header.
fn append_forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue) {
    if !headers.contains_key(&X_FORWARDED_FOR) {
        // The common case, without formatting or allocating.
        headers.insert(X_FORWARDED_FOR.clone(), ip.clone());
        return;
    }
    let mut value = String::new();
    for prior in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(s) = prior.to_str() {
            value.push_str(s);
            value.push_str(", ");
        }
    }
    value.push_str(ip.to_str().unwrap_or_default());
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
}

/// Replaces a request's path with its normalised form, keeping the query as the client sent it.
pub fn set_path(uri: &mut Uri, path: &str) -> Result<(), Rejection> {
    let pq = match uri.query() {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
        None => PathAndQuery::try_from(path),
    }
    .map_err(|_| Rejection::InvalidPath)?;
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(pq);
    *uri = Uri::from_parts(parts).map_err(|_| Rejection::InvalidPath)?;
    Ok(())
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
    fn target(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
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

/// A request id from the client, if it is sane (1–128 visible ASCII characters).
pub fn client_request_id(headers: &HeaderMap) -> Option<&HeaderValue> {
    headers.get(&X_REQUEST_ID).filter(|v| {
        (1..=128).contains(&v.len()) && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    })
}

/// Length of a generated request id.
const REQUEST_ID_LEN: usize = 16;

/// Request ids carved per block: one allocation serves this many requests.
const REQUEST_IDS_PER_BLOCK: usize = 256;

thread_local! {
    /// The block this thread carves request ids from. An id keeps its block alive until the
    /// id is dropped (the end of its request), so a block is at most 4 KiB held by live ids.
    static REQUEST_IDS: std::cell::RefCell<bytes::BytesMut> =
        std::cell::RefCell::new(bytes::BytesMut::new());
}

/// A fresh request id: 16 random hex characters. Ids are carved from a per-thread block, so
/// making one, and cloning it into the upstream request, allocates nothing on most requests.
pub fn new_request_id() -> HeaderValue {
    let n: u64 = rand::random();
    let mut hex = [0u8; REQUEST_ID_LEN];
    hex::encode_to_slice(n.to_be_bytes(), &mut hex).expect("16 hex digits");
    let id = REQUEST_IDS.with(|block| {
        let mut block = block.borrow_mut();
        if block.capacity() < REQUEST_ID_LEN {
            // A new block: the old one is freed when its last id is.
            block.reserve(REQUEST_ID_LEN * REQUEST_IDS_PER_BLOCK);
        }
        block.extend_from_slice(&hex);
        block.split_to(REQUEST_ID_LEN).freeze()
    });
    HeaderValue::from_maybe_shared(id).expect("hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, UpstreamConfig};
    use crate::store::KeyRecord;

    fn identity() -> Identity {
        Identity::from_record(&KeyRecord::example(crate::key::KeyDigest([0; 32]))).unwrap()
    }

    fn upstream() -> UpstreamSettings {
        Config {
            upstream: UpstreamConfig {
                url: Some("http://10.0.0.1:3000".into()),
                ..Default::default()
            },
            ..Default::default()
        }
        .serve_settings()
        .unwrap()
        .upstream
        .unwrap()
    }

    fn rewrite(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let rid = HeaderValue::from_static("rid-1");
        rewrite_request_headers(
            &mut h,
            Some(&identity()),
            &IdentitySettings::default(),
            &upstream(),
            &Forwarded {
                client_ip: &ip_value("192.0.2.7".parse().unwrap()),
                proto: "http",
                host: Some(HeaderValue::from_static("api.example")),
                request_id: &rid,
            },
        );
        h
    }

    #[test]
    fn identity_headers_replace_spoofed_ones() {
        let h = rewrite(&[
            ("x-keygate-tenant", "evil"),
            ("X-Keygate-Admin", "yes"),
            ("authorization", "Bearer x"),
        ]);
        assert_eq!(h["x-keygate-tenant"], "acme");
        assert_eq!(h.get_all("x-keygate-tenant").iter().count(), 1);
        assert!(h.get("x-keygate-admin").is_none());
        assert!(h.get(AUTHORIZATION).is_none());
        assert_eq!(h["x-keygate-subject-kind"], "user");
    }

    #[test]
    fn connection_cannot_remove_identity_headers() {
        let h = rewrite(&[
            ("connection", "x-keygate-tenant, x-custom"),
            ("x-custom", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
        ]);
        assert_eq!(h["x-keygate-tenant"], "acme");
        for gone in ["connection", "x-custom", "keep-alive", "te"] {
            assert!(h.get(gone).is_none(), "{gone} forwarded");
        }
    }

    #[test]
    fn connection_tokens_match_any_case_and_junk_is_ignored() {
        let h = rewrite(&[
            ("connection", "X-Custom, , keep-alive,not a name"),
            ("connection", "X-Other"),
            ("x-custom", "1"),
            ("x-other", "2"),
            ("x-kept", "3"),
        ]);
        for gone in ["connection", "x-custom", "x-other"] {
            assert!(h.get(gone).is_none(), "{gone} forwarded");
        }
        assert_eq!(h["x-kept"], "3");
    }

    #[test]
    fn forwarded_headers_are_set() {
        let h = rewrite(&[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-proto", "https"),
        ]);
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example");
        assert_eq!(h[HOST], "10.0.0.1:3000");
        assert_eq!(h[&X_REQUEST_ID], "rid-1");
    }

    #[test]
    fn open_routes_get_no_identity_but_lose_spoofed_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-keygate-tenant", HeaderValue::from_static("evil"));
        let rid = HeaderValue::from_static("rid-1");
        rewrite_request_headers(
            &mut h,
            None,
            &IdentitySettings::default(),
            &upstream(),
            &Forwarded {
                client_ip: &ip_value("192.0.2.7".parse().unwrap()),
                proto: "http",
                host: None,
                request_id: &rid,
            },
        );
        assert!(h.keys().all(|k| !k.as_str().starts_with("x-keygate-")));
    }

    #[test]
    fn set_path_keeps_the_query() {
        let mut uri: Uri = "/x/../a%2e?q=%2e%2e&b".parse().unwrap();
        set_path(&mut uri, "/a.").unwrap();
        assert_eq!(uri, "/a.?q=%2e%2e&b");
        let mut uri: Uri = "http://h:1//b".parse().unwrap();
        set_path(&mut uri, "/b").unwrap();
        assert_eq!(uri, "http://h:1/b");
    }

    #[test]
    fn request_ids_are_validated_or_generated() {
        let mut h = HeaderMap::new();
        assert!(client_request_id(&h).is_none());
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(client_request_id(&h).unwrap(), "abc-123");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert!(client_request_id(&h).is_none());
        let a = new_request_id();
        assert_eq!(a.len(), 16);
        assert_ne!(a, new_request_id());
        // Across blocks, ids stay intact while later ones are carved.
        let ids: Vec<HeaderValue> = (0..3 * REQUEST_IDS_PER_BLOCK)
            .map(|_| new_request_id())
            .collect();
        for id in &ids {
            assert_eq!(id.len(), 16);
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit));
        }
        let distinct: std::collections::HashSet<&HeaderValue> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }
}
