//! Forwarding: rewrite an authenticated request for the upstream and send it over the shared
//! worker's connection pool, streaming bodies both ways.
//!
//! Header rules, in this order (the order is what makes them safe):
//! 1. one pass over the names ([`scan_request_headers`]) finds what the rules below have to
//!    do, so a request that needs none of them costs that pass and nothing else;
//! 2. hop-by-hop headers go, with every header the client named in `Connection`;
//! 3. `Authorization` goes (unless configured to be forwarded);
//! 4. every client header with the identity prefix goes, and so do names with `_` (unless
//!    allowed), read as upstreams that map names to CGI variables read them: `x_keygate_tenant`
//!    is `HTTP_X_KEYGATE_TENANT`, the same as `x-keygate-tenant`;
//! 5. keygate's identity headers, the tenant header the decision was made on,
//!    `X-Forwarded-*`, `Host` and the request id are set.
//!
//! Because step 5 comes last, no client header (not even `Connection: x-keygate-tenant` or
//! `Connection: x-tenant`) can remove or replace a header keygate adds or decided on.

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

use crate::config::{IdentitySettings, UnderscoreHeaders, UpstreamSettings};
use crate::metrics::PoolMetrics;
use crate::rejection::Rejection;
use crate::route::{same_header_name, starts_with_header_name};
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

/// What one pass over a request's header names found: which hop-by-hop headers are present
/// and which of the other rules have work to do. A few bits, nothing allocated.
#[derive(Debug, Clone, Copy)]
pub struct HeaderScan {
    /// Bit `i`: `hop_by_hop()[i]` is present.
    hop: u16,
    found: u8,
    underscores: UnderscoreHeaders,
}

/// A client header in the identity namespace (in any spelling).
const IDENTITY: u8 = 1 << 0;
/// A name with `_`.
const UNDERSCORE: u8 = 1 << 1;
/// A method-override header.
const OVERRIDE: u8 = 1 << 2;
/// `Forwarded` or `X-Real-IP`: a client address a peer asserts.
const CLIENT_ADDRESS: u8 = 1 << 3;

static X_HTTP_METHOD_OVERRIDE: HeaderName = HeaderName::from_static("x-http-method-override");
static X_HTTP_METHOD: HeaderName = HeaderName::from_static("x-http-method");
static X_METHOD_OVERRIDE: HeaderName = HeaderName::from_static("x-method-override");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Headers with which a client asks upstreams that honour them to take a request as another
/// method: a read-only key's `GET` would become a `DELETE` that keygate never authorised.
/// They are always removed.
fn method_overrides() -> [&'static HeaderName; 3] {
    [&X_HTTP_METHOD_OVERRIDE, &X_HTTP_METHOD, &X_METHOD_OVERRIDE]
}

/// Headers in which a peer asserts a client address, besides `X-Forwarded-For`: kept from a
/// trusted proxy, removed otherwise.
fn client_addresses() -> [&'static HeaderName; 2] {
    [&header::FORWARDED, &X_REAL_IP]
}

impl HeaderScan {
    /// Whether some header name contains `_`.
    pub fn underscores(&self) -> bool {
        self.found & UNDERSCORE != 0
    }

    /// The refusal the request gets for its header names, if any.
    pub fn refusal(&self) -> Option<Rejection> {
        (self.underscores() && self.underscores == UnderscoreHeaders::Reject)
            .then_some(Rejection::InvalidHeader)
    }
}

/// One pass over the request's header names, under identity prefix `prefix` and the policy
/// for names with `_`.
pub fn scan_request_headers(
    headers: &HeaderMap,
    prefix: &str,
    underscores: UnderscoreHeaders,
) -> HeaderScan {
    let hop = hop_by_hop();
    let mut scan = HeaderScan {
        hop: 0,
        found: 0,
        underscores,
    };
    for name in headers.keys() {
        if let Some(i) = hop.iter().position(|h| *h == name) {
            scan.hop |= 1 << i;
            continue;
        }
        let s = name.as_str();
        if s.as_bytes().contains(&b'_') {
            scan.found |= UNDERSCORE;
        }
        if starts_with_header_name(s, prefix) {
            scan.found |= IDENTITY;
        } else if method_overrides().contains(&name) {
            scan.found |= OVERRIDE;
        } else if client_addresses().contains(&name) {
            scan.found |= CLIENT_ADDRESS;
        }
    }
    scan
}

/// Removes hop-by-hop headers, including every header named in `Connection` (for a response:
/// the request side goes through [`rewrite_request_headers`]).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the few names present finds which hop-by-hop headers to remove: cheaper
    // than nine removals by hash, and most responses carry none but `Connection`.
    let hop = hop_by_hop();
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop.iter().position(|h| *h == name) {
            present |= 1 << i;
        }
    }
    remove_hop_by_hop(headers, present);
}

/// Removes the hop-by-hop headers whose bits are set in `present`.
fn remove_hop_by_hop(headers: &mut HeaderMap, present: u16) {
    if present == 0 {
        return;
    }
    let hop = hop_by_hop();
    // `hop[0]` is `Connection`. The names it lists are removed by reference: a token that
    // names no header present (`keep-alive`, `close`) costs a lookup, never an allocation.
    if present & 1 != 0 {
        let mut values = headers.get_all(CONNECTION).iter();
        let first = values.next().cloned();
        // Empty, so not allocated, unless `Connection` appears more than once.
        let more: Vec<HeaderValue> = values.cloned().collect();
        for value in first.iter().chain(&more) {
            for token in value.as_bytes().split(|&b| b == b',') {
                match std::str::from_utf8(trim(token)) {
                    // The credential the decision was made on stays (when it is forwarded);
                    // every other header keygate decides on is set again after this.
                    Ok(name) if name.eq_ignore_ascii_case(AUTHORIZATION.as_str()) => {}
                    Ok(name) => {
                        headers.remove(name);
                    }
                    Err(_) => {}
                }
            }
        }
    }
    for (i, name) in hop.into_iter().enumerate() {
        if present & (1 << i) != 0 {
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

/// Names that, spelt with `_`, would read to a CGI-style upstream like a header keygate sets,
/// strips or decides on; they are never forwarded, whatever `server.headers_with_underscores`
/// says.
const MANAGED: [&str; 13] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "x-real-ip",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "transfer-encoding",
];

/// Client headers removed by a rewrite, by kind (for `keygate_request_headers_removed_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    /// Names in the identity namespace, in any spelling.
    pub identity: u32,
    /// Other names with `_`.
    pub underscore: u32,
    /// Method-override headers.
    pub method_override: u32,
}

/// Removes what the scan flagged: identity headers in any spelling, method overrides, client
/// addresses asserted by an untrusted peer, and names with `_` (all of them, or under `allow`
/// those that read like a managed header). Allocates only when something is to go.
fn remove_flagged(
    headers: &mut HeaderMap,
    scan: &HeaderScan,
    prefix: &str,
    trusted: bool,
) -> Removed {
    let mut removed = Removed::default();
    let mut wanted = IDENTITY | UNDERSCORE | OVERRIDE;
    if !trusted {
        wanted |= CLIENT_ADDRESS;
    }
    if scan.found & wanted == 0 {
        return removed;
    }
    let allow = scan.underscores == UnderscoreHeaders::Allow;
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            let s = n.as_str();
            if starts_with_header_name(s, prefix) {
                removed.identity += 1;
                true
            } else if method_overrides().contains(n) {
                removed.method_override += 1;
                true
            } else if !trusted && client_addresses().contains(n) {
                true
            } else if s.contains('_') && (!allow || MANAGED.iter().any(|m| same_header_name(s, m)))
            {
                removed.underscore += 1;
                true
            } else {
                false
            }
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
    removed
}

/// Per-request facts the rewrite needs besides the headers.
pub struct Forwarded<'a> {
    /// The client's address, as a header value (made once per connection by [`ip_value`]).
    pub client_ip: &'a HeaderValue,
    /// Whether the client is a trusted proxy (`server.trusted_proxies`), whose
    /// `X-Forwarded-*`, `Forwarded` and `X-Real-IP` are kept.
    pub trusted: bool,
    /// `http` or `https`, as the client spoke to keygate.
    pub proto: &'static str,
    /// The host the client asked for (`Host`, or the URI authority under HTTP/2).
    pub host: Option<HeaderValue>,
    /// The request id.
    pub request_id: &'a HeaderValue,
    /// What [`scan_request_headers`] found in the request's names.
    pub scan: HeaderScan,
    /// The tenant header the route's decision was made on, with its value: it reaches the
    /// upstream in the configured spelling and as decided, whatever the client did.
    pub tenant_header: Option<(&'a HeaderName, HeaderValue)>,
}

/// Rewrites a request head for the upstream (see the module docs for the order). `identity` is
/// `None` on an open route: client identity headers are still removed, none are added.
/// Returns what it removed, for the metrics.
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    identity: Option<&Identity>,
    ids: &IdentitySettings,
    upstream: &UpstreamSettings,
    fwd: &Forwarded<'_>,
) -> Removed {
    remove_hop_by_hop(headers, fwd.scan.hop);
    if !ids.forward_authorization {
        headers.remove(AUTHORIZATION);
    }
    let removed = remove_flagged(headers, &fwd.scan, &ids.prefix, fwd.trusted);

    if let Some((name, value)) = &fwd.tenant_header {
        if fwd.scan.underscores() {
            let spellings: Vec<HeaderName> = headers
                .keys()
                .filter(|n| same_header_name(n.as_str(), name.as_str()))
                .cloned()
                .collect();
            for n in spellings {
                headers.remove(n);
            }
        }
        headers.insert((*name).clone(), value.clone());
    }

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

    // A trusted proxy's view of the client is kept and the proxy appended as the last hop;
    // anyone else's claims are replaced by what keygate saw.
    if fwd.trusted {
        append_forwarded_for(headers, fwd.client_ip);
    } else {
        headers.insert(X_FORWARDED_FOR.clone(), fwd.client_ip.clone());
    }
    if !(fwd.trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(fwd.proto),
        );
    }
    if !(fwd.trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match &fwd.host {
            Some(h) => headers.insert(X_FORWARDED_HOST.clone(), h.clone()),
            None => headers.remove(&X_FORWARDED_HOST),
        };
    }
    if !upstream.preserve_host || fwd.host.is_none() {
        headers.insert(HOST, upstream.host_header.clone());
    } else if let Some(h) = &fwd.host {
        headers.insert(HOST, h.clone());
    }
    headers.insert(X_REQUEST_ID.clone(), fwd.request_id.clone());
    removed
}

/// A client address as an `X-Forwarded-For` value.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::try_from(ip.to_string()).expect("an IP address is a valid header value")
}

/// Appends the client address to `X-Forwarded-For` (from a trusted proxy), folding earlier
/// values into one header.
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
        rewrite_with(&mut h, UnderscoreHeaders::Drop, false);
        h
    }

    fn rewrite_with(h: &mut HeaderMap, underscores: UnderscoreHeaders, trusted: bool) -> Removed {
        let ids = IdentitySettings::default();
        let rid = HeaderValue::from_static("rid-1");
        let scan = scan_request_headers(h, &ids.prefix, underscores);
        rewrite_request_headers(
            h,
            Some(&identity()),
            &ids,
            &upstream(),
            &Forwarded {
                client_ip: &ip_value("192.0.2.7".parse().unwrap()),
                trusted,
                proto: "http",
                host: Some(HeaderValue::from_static("api.example")),
                request_id: &rid,
                scan,
                tenant_header: None,
            },
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn identity_headers_in_any_spelling_are_removed_under_every_policy() {
        for policy in [UnderscoreHeaders::Drop, UnderscoreHeaders::Allow] {
            let mut h = headers(&[
                ("x_keygate_tenant", "evil"),
                ("x-keygate_role", "admin"),
                ("x_keygate-subject", "root"),
                ("x_forwarded_for", "10.9.9.9"),
                ("x_custom", "1"),
                ("x-custom", "2"),
            ]);
            let removed = rewrite_with(&mut h, policy, false);
            let cgi: Vec<String> = h.keys().map(|k| k.as_str().replace('_', "-")).collect();
            assert_eq!(h["x-keygate-tenant"], "acme", "{policy:?}");
            assert_eq!(
                cgi.iter().filter(|k| k.starts_with("x-keygate-")).count(),
                5,
                "{policy:?}: {cgi:?}"
            );
            assert_eq!(
                cgi.iter().filter(|k| *k == "x-forwarded-for").count(),
                1,
                "{policy:?}: {cgi:?}"
            );
            assert_eq!(h["x-custom"], "2");
            assert_eq!(removed.identity, 3, "{policy:?}");
            let custom_kept = h.contains_key("x_custom");
            assert_eq!(custom_kept, policy == UnderscoreHeaders::Allow);
            assert_eq!(removed.underscore, if custom_kept { 1 } else { 2 });
        }
    }

    #[test]
    fn a_scan_without_matches_asks_for_nothing() {
        let h = headers(&[("user-agent", "x"), ("accept", "*/*"), ("host", "a")]);
        let scan = scan_request_headers(&h, "x-keygate-", UnderscoreHeaders::Reject);
        assert_eq!((scan.hop, scan.found), (0, 0));
        assert!(scan.refusal().is_none());
        let h = headers(&[("a_b", "1")]);
        let scan = scan_request_headers(&h, "x-keygate-", UnderscoreHeaders::Reject);
        assert_eq!(scan.refusal(), Some(Rejection::InvalidHeader));
    }

    #[test]
    fn the_tenant_header_is_set_as_decided_after_connection_tokens() {
        let mut h = headers(&[
            ("x-tenant", "acme"),
            ("x_tenant", "acme"),
            ("connection", "x-tenant, authorization"),
            ("authorization", "Bearer k"),
        ]);
        let ids = IdentitySettings {
            forward_authorization: true,
            ..IdentitySettings::default()
        };
        let rid = HeaderValue::from_static("rid-1");
        let name = HeaderName::from_static("x-tenant");
        let scan = scan_request_headers(&h, &ids.prefix, UnderscoreHeaders::Allow);
        rewrite_request_headers(
            &mut h,
            Some(&identity()),
            &ids,
            &upstream(),
            &Forwarded {
                client_ip: &ip_value("192.0.2.7".parse().unwrap()),
                trusted: false,
                proto: "http",
                host: None,
                request_id: &rid,
                scan,
                tenant_header: Some((&name, HeaderValue::from_static("acme"))),
            },
        );
        assert_eq!(h.get_all("x-tenant").iter().count(), 1);
        assert!(!h.contains_key("x_tenant"));
        assert_eq!(
            h["authorization"], "Bearer k",
            "Connection cannot remove it"
        );
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
        let claims = [
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-for", "198.51.100.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "claimed.example"),
            ("forwarded", "for=198.51.100.1"),
            ("x-real-ip", "198.51.100.1"),
            ("x-http-method-override", "DELETE"),
        ];
        let mut trusted = headers(&claims);
        let removed = rewrite_with(&mut trusted, UnderscoreHeaders::Drop, true);
        assert_eq!(removed.method_override, 1);
        assert_eq!(
            trusted["x-forwarded-for"],
            "198.51.100.1, 198.51.100.2, 192.0.2.7"
        );
        assert_eq!(trusted["x-forwarded-proto"], "https");
        assert_eq!(trusted["x-forwarded-host"], "claimed.example");
        assert_eq!(trusted["forwarded"], "for=198.51.100.1");
        assert!(!trusted.contains_key("x-http-method-override"));

        let h = rewrite(&claims);
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert!(!h.contains_key("forwarded") && !h.contains_key("x-real-ip"));
        assert!(!h.contains_key("x-http-method-override"));
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
        let scan = scan_request_headers(&h, "x-keygate-", UnderscoreHeaders::Drop);
        rewrite_request_headers(
            &mut h,
            None,
            &IdentitySettings::default(),
            &upstream(),
            &Forwarded {
                client_ip: &ip_value("192.0.2.7".parse().unwrap()),
                trusted: false,
                proto: "http",
                host: None,
                request_id: &rid,
                scan,
                tenant_header: None,
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
