//! Listeners, the request path, and shutdown.
//!
//! [`handle`] is the whole request path on one screen: request id, path normalisation, route,
//! credential and verdict, policy, header rewrite, forward, error mapping, access log. It runs
//! on the proxy workers: one thread each, with its own single-threaded event loop and upstream
//! pools, all accepting on the same socket. The accept loops keep going through accept errors
//! (EMFILE must not kill the process) and run each connection in its own task with hyper's
//! header read timeout and size limits. Shutdown is a sequence: readiness goes false, the
//! listeners close, in-flight requests get up to `shutdown_grace` to finish.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tracing::Instrument;

use crate::config::{IdentitySettings, IpNet, Settings, UnderscoreHeaders};
use crate::metrics::{Metrics, RouteMetrics};
use crate::proxy::{self, Forwarded, Upstream, X_REQUEST_ID};
use crate::rejection::Rejection;
use crate::route::{self, RouteTable};
use crate::store::{self, now_unix, Store, StoreError};
use crate::verify::Verifier;
use crate::{admin, auth, policy};

/// The body of every proxy response: the upstream's, streamed, or a small synthetic one.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Process-wide state shared by the proxy and admin listeners.
#[derive(Default)]
pub struct State {
    draining: AtomicBool,
}

impl State {
    /// Whether shutdown has begun.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Where a matched route sends its requests, and the route's metric series.
pub struct RouteTarget {
    /// The pooled client (shared by the routes that name the same upstream).
    pub upstream: Arc<Upstream>,
    /// The route's series, resolved at startup.
    pub metrics: RouteMetrics,
}

/// Everything a request needs, built once at startup.
pub struct App {
    /// Cache and store.
    pub verifier: Arc<Verifier>,
    /// The routes, each with its pooled upstream client.
    pub routes: RouteTable<RouteTarget>,
    /// Identity header names.
    pub identity: IdentitySettings,
    /// Readiness and drain state.
    pub state: State,
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// Series of requests refused before a route matched (`invalid_path`, `no_route`).
    pub unrouted: RouteMetrics,
    /// Whether each request gets an access log line.
    pub access_log: bool,
    /// The tenant whose admin keys manage every tenant through the API.
    pub operator_tenant: String,
    /// What happens to request headers whose names contain `_`.
    pub underscores: UnderscoreHeaders,
    /// Peers whose forwarding headers are kept.
    pub trusted_proxies: Box<[IpNet]>,
}

/// The client end of a proxy connection, worked out once per connection.
pub struct Peer {
    /// Its address, as an `X-Forwarded-For` value.
    pub ip: HeaderValue,
    /// Whether it is a trusted proxy (`server.trusted_proxies`).
    pub trusted: bool,
}

impl Peer {
    /// The peer at `ip`, trusted if a trusted network contains it.
    pub fn new(ip: std::net::IpAddr, trusted: &[IpNet]) -> Self {
        Peer {
            ip: proxy::ip_value(ip),
            trusted: trusted.iter().any(|net| net.contains(ip)),
        }
    }
}

/// The `route` label and log field of requests that matched no route.
const UNROUTED: &str = "-";

/// The request path.
pub async fn handle(app: &App, mut req: Request<Incoming>, peer: &Peer) -> Response<ProxyBody> {
    let started = Instant::now();
    let request_id = proxy::client_request_id(req.headers())
        .cloned()
        .unwrap_or_else(proxy::new_request_id);
    let span = tracing::info_span!(
        "request",
        request_id = ?request_id,
        route = tracing::field::Empty,
        key_id = tracing::field::Empty,
        tenant = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let method = req.method().clone();
    // Set as the request goes: the route it matched, and how long the upstream took.
    let mut matched: Option<&RouteTarget> = None;
    let mut upstream_time = None;

    // One pass over the header names, for every header rule of the request.
    let scan = proxy::scan_request_headers(req.headers(), &app.identity.prefix, app.underscores);
    let mut removed = proxy::Removed::default();

    let outcome = async {
        if let Some(refusal) = scan.refusal() {
            return Err(refusal);
        }
        let host = route::request_host(req.version(), req.uri(), req.headers())?;
        let path = route::normalize(req.uri().path())?;
        let route = app
            .routes
            .find(
                host.as_ref().map(HeaderValue::as_bytes),
                &path,
                req.method(),
            )
            .ok_or(Rejection::NoRoute)?;
        span.record("route", &*route.name);
        matched = Some(&route.upstream);
        let mut tenant_header = None;
        let identity = if route.auth {
            let identity = auth::check(&app.verifier, req.headers(), now_unix()).await?;
            span.record("key_id", identity.key_id());
            span.record("tenant", identity.tenant());
            let tenant = route.tenant(&path, req.headers(), scan.underscores());
            policy::authorize(route, &identity, req.method(), tenant)?;
            // The upstream gets the tenant header as it was decided on.
            tenant_header = route
                .tenant_header(req.headers(), scan.underscores())
                .map(|(name, value)| (name, value.clone()));
            Some(identity)
        } else {
            None
        };
        // The upstream sees the path that was matched, so it cannot read another one into it.
        if let Cow::Owned(normal) = path {
            proxy::set_path(req.uri_mut(), &normal)?;
        }
        let fwd = Forwarded {
            client_ip: &peer.ip,
            trusted: peer.trusted,
            proto: "http",
            host,
            request_id: &request_id,
            scan,
            tenant_header,
        };
        let upstream = &route.upstream.upstream;
        removed = proxy::rewrite_request_headers(
            req.headers_mut(),
            identity.as_deref(),
            &app.identity,
            upstream.settings(),
            &fwd,
        );
        let sent = Instant::now();
        let resp = upstream.send(req).await;
        upstream_time = Some(sent.elapsed());
        resp
    }
    .instrument(span.clone())
    .await;

    let series = matched.map_or(&app.unrouted, |t| &t.metrics);
    let decision = outcome.as_ref().map(drop).map_err(|r| *r);
    let mut resp = match outcome {
        Ok(resp) => resp.map(Either::Left),
        Err(rejection) => {
            if upstream_time.is_some() {
                series.upstream_failed(rejection);
            }
            rejection.into_response().map(Either::Right)
        }
    };
    resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);

    let status = resp.status().as_u16();
    let took = started.elapsed();
    app.metrics.decision(decision);
    if removed != proxy::Removed::default() {
        app.metrics.headers_removed(
            removed.identity,
            removed.underscore,
            removed.method_override,
        );
    }
    series.observe(status, took, upstream_time);
    if matched.is_none() {
        span.record("route", UNROUTED);
    }
    span.record("outcome", decision.err().map_or("allowed", Rejection::code));
    if app.access_log {
        let _entered = span.enter();
        tracing::info!(
            target: "keygate::access",
            method = %method,
            status,
            latency_us = took.as_micros() as u64,
            upstream_us = upstream_time.map(|t| t.as_micros() as u64),
        );
    }
    resp
}

/// A failure to start serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The store could not be set up.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A bound, not yet running keygate: both listeners are open, so their addresses are known.
pub struct Server {
    app: Arc<App>,
    /// The proxy listener, once per worker (the same socket).
    proxy: Vec<std::net::TcpListener>,
    admin: TcpListener,
    settings: Settings,
}

impl Server {
    /// Opens the configured store and binds both listeners.
    pub async fn bind(settings: Settings) -> Result<Self, ServerError> {
        let store = store::open(&settings.store, false)?;
        Self::bind_with_store(settings, store).await
    }

    /// Binds both listeners in front of the given store.
    pub async fn bind_with_store(
        settings: Settings,
        store: Arc<dyn Store>,
    ) -> Result<Self, ServerError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })
        };
        let admin = bind(settings.admin_listen).await?;
        // Every proxy worker accepts on the same socket, from its own event loop.
        let proxy = bind(settings.listen).await?;
        let shared = |r: std::io::Result<std::net::TcpListener>| {
            r.map_err(|source| ServerError::Bind {
                addr: settings.listen,
                source,
            })
        };
        let first = shared(proxy.into_std())?;
        let mut proxy = Vec::with_capacity(settings.workers);
        for _ in 1..settings.workers {
            proxy.push(shared(first.try_clone())?);
        }
        proxy.push(first);
        let metrics = Arc::new(Metrics::new());
        let verifier = Arc::new(
            Verifier::new(store.clone(), &settings.cache, metrics.clone())
                .with_last_used_interval(settings.last_used_interval),
        );
        store.start(verifier.clone())?;
        // One pooled client per distinct upstream, shared by the routes that name it.
        let mut clients: HashMap<String, Arc<Upstream>> = HashMap::new();
        let names: Vec<Box<str>> = settings.routes.iter().map(|r| r.name.clone()).collect();
        let mut names = names.into_iter();
        let routes = settings.routes.clone().map_upstreams(|up| {
            let id = format!("{}{}", up.authority, up.base_path);
            let upstream = clients
                .entry(id)
                .or_insert_with(|| {
                    let pool = metrics.pool(up.authority.as_str());
                    Arc::new(Upstream::new(up, settings.workers, pool))
                })
                .clone();
            let name = names.next().expect("one name per route");
            RouteTarget {
                upstream,
                metrics: metrics.route(&name),
            }
        });
        verifier.start_last_used_flusher();
        let app = Arc::new(App {
            unrouted: metrics.route(UNROUTED),
            metrics,
            access_log: settings.log.access,
            verifier,
            routes,
            identity: settings.identity.clone(),
            state: State::default(),
            operator_tenant: settings.operator_tenant.clone(),
            underscores: settings.headers_with_underscores,
            trusted_proxies: settings.trusted_proxies.clone(),
        });
        Ok(Server {
            app,
            proxy,
            admin,
            settings,
        })
    }

    /// The proxy listener's address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy[0]
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The shared application state (for tests and embedding).
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests for up to the
    /// configured grace period.
    ///
    /// The proxy runs on `server.workers` threads, each with its own single-threaded event
    /// loop accepting on the shared listening socket, so a request, its upstream connection and
    /// its response stay on one thread (no hand-off, no cross-thread wake-up). The admin
    /// listener and the background tasks run on the caller's runtime.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let Server {
            app,
            proxy,
            admin,
            settings,
        } = self;
        let builder = http_builder(&settings);
        let (stop_tx, stop_rx) = watch::channel(false);
        tracing::info!(
            listen = %proxy[0].local_addr().map(|a| a.to_string()).unwrap_or_default(),
            admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            workers = proxy.len(),
            "keygate serving"
        );

        let mut workers = Vec::with_capacity(proxy.len());
        for (index, listener) in proxy.into_iter().enumerate() {
            let (done_tx, done_rx) = oneshot::channel::<()>();
            let (app, builder, stop) = (app.clone(), builder.clone(), stop_rx.clone());
            let grace = settings.shutdown_grace;
            let spawned = std::thread::Builder::new()
                .name(format!("keygate-worker-{index}"))
                .spawn(move || {
                    proxy_worker(index, listener, app, builder, stop, grace);
                    let _ = done_tx.send(());
                });
            match spawned {
                Ok(_) => workers.push(done_rx),
                Err(err) => tracing::error!(error = %err, index, "cannot start a proxy worker"),
            }
        }

        let graceful = GracefulShutdown::new();
        let admin_app = app.clone();
        let admin_loop = accept_loop(
            admin,
            builder,
            &graceful,
            stop_rx,
            app.metrics.admin_connections.clone(),
            move |_| {
                let app = admin_app.clone();
                service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(admin::handle(&app, req).await) }
                })
            },
        );
        let signal = async {
            shutdown.await;
            tracing::info!("shutdown requested: draining");
            app.state.draining.store(true, Ordering::SeqCst);
            let _ = stop_tx.send(true);
        };
        tokio::join!(admin_loop, signal);

        // Each worker drains its own connections within the grace period; so does the admin
        // listener. `stop_tx` lives until then, so no worker mistakes a dropped sender for a
        // stop before it was asked to.
        let (drained, _) = tokio::join!(
            drain(graceful, settings.shutdown_grace),
            futures_util::future::join_all(workers)
        );
        if drained {
            tracing::info!("drained; exiting");
        }
        drop(stop_tx);
    }
}

/// The HTTP/1.1 and HTTP/2 server settings shared by both listeners.
fn http_builder(settings: &Settings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

/// One proxy worker: its own single-threaded runtime, accepting on the shared socket until
/// `stop`, then draining its connections for up to `grace`.
fn proxy_worker(
    index: usize,
    listener: std::net::TcpListener,
    app: Arc<App>,
    builder: auto::Builder<TokioExecutor>,
    stop: watch::Receiver<bool>,
    grace: Duration,
) {
    proxy::set_worker(index);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            tracing::error!(error = %err, index, "cannot start a proxy worker's runtime");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(listener))
        {
            Ok(l) => l,
            Err(err) => {
                tracing::error!(error = %err, index, "cannot listen in a proxy worker");
                return;
            }
        };
        let graceful = GracefulShutdown::new();
        let open = app.metrics.proxy_connections.clone();
        accept_loop(listener, builder, &graceful, stop, open, move |peer| {
            let app = app.clone();
            // Worked out once per connection, shared by its requests.
            let peer = Arc::new(Peer::new(peer.ip(), &app.trusted_proxies));
            service_fn(move |req| {
                let (app, peer) = (app.clone(), peer.clone());
                async move { Ok::<_, Infallible>(handle(&app, req, &peer).await) }
            })
        })
        .await;
        drain(graceful, grace).await;
    });
}

/// Lets the watched connections finish for up to `grace`; whether they all did.
async fn drain(graceful: GracefulShutdown, grace: Duration) -> bool {
    let open = graceful.count();
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => true,
        Err(_) => {
            tracing::warn!(
                ?grace,
                connections = open,
                "shutdown grace elapsed with requests still running"
            );
            false
        }
    }
}

/// Accepts connections until `stop` turns true; every connection is watched by `graceful`.
async fn accept_loop<S, B>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    mut stop: watch::Receiver<bool>,
    open: IntGauge,
    make_service: impl Fn(SocketAddr) -> S,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(err) => {
                // Out of file descriptors or a connection reset before accept: keep serving,
                // but do not spin.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(TokioIo::new(stream), make_service(peer))
            .into_owned();
        let conn = graceful.watch(conn);
        let open = open.clone();
        open.inc();
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, %peer, "connection ended with an error");
            }
            open.dec();
        });
    }
}
