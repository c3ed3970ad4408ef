//! Listeners, workers and shutdown.
//!
//! The request path ([`crate::proxy::handle`]) runs on the proxy workers: one thread each,
//! with its own single-threaded event loop and upstream pools, all accepting on the same
//! socket. The accept loops keep going through accept errors
//! (EMFILE must not kill the process; `/readyz` says so for a few seconds), refuse connections
//! past the listener's cap at once, and run each admitted connection in its own task under
//! its deadlines (`server/connection.rs`: a first request head within `header_read_timeout` of
//! accept, no idling past `idle_timeout`) and hyper's size limits. Shutdown is a sequence:
//! readiness goes false, the listeners close, in-flight requests get up to `shutdown_grace`
//! to finish.
//!
//! A listener with TLS (`server/tls.rs`) runs each admitted connection's handshake in the
//! connection's task, under the same first-head deadline: from accept, the handshake and the
//! first request head together get `header_read_timeout`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};

use crate::admin::{self, Admin, Health};
use crate::metrics::{ListenerMetrics, Metrics};
use crate::policy::Roles;
use crate::proxy::access_log::{self, AccessLog};
use crate::proxy::{
    self, App, Caller, IdentitySettings, IpNet, Peer, RouteTarget, Unanswered, UnderscoreHeaders,
    Upstream, UpstreamSettings,
};
use crate::route::RouteTable;
use crate::store::{self, Store, StoreError, StoreSettings};
use crate::telemetry::LogSettings;
use crate::verify::{CacheSettings, Verifier};

mod connection;
pub mod tls;

pub use connection::Http2Limits;
use connection::{Activity, Cap, Deadlines, Drain, Expirations, Watched};
use tls::{ListenerTls, TlsError, TlsSettings};

/// Validated runtime settings of `keygate serve`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Proxy listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// The decision endpoint for other gateways (`None`: off).
    pub authz: Option<AuthzSettings>,
    /// Drain deadline on shutdown.
    pub shutdown_grace: Duration,
    /// Time to a complete request head (from accept for the first request).
    pub header_read_timeout: Duration,
    /// Idle connections are closed after this long.
    pub idle_timeout: Duration,
    /// Most open proxy connections; 0: derived from the descriptor limit at start.
    pub max_connections: usize,
    /// Most open admin connections.
    pub admin_max_connections: usize,
    /// Largest request head in bytes (HTTP/2: the header list, CONTINUATION frames included).
    pub max_header_bytes: usize,
    /// Requests per client connection before it is closed gracefully; 0: no limit.
    pub max_requests_per_connection: u32,
    /// HTTP/2 server limits.
    pub http2: Http2Limits,
    /// Proxy worker threads (resolved: at least 1).
    pub workers: usize,
    /// What happens to request headers whose names contain `_`.
    pub headers_with_underscores: UnderscoreHeaders,
    /// Peers whose `X-Forwarded-*` headers are kept (and appended to).
    pub trusted_proxies: Box<[IpNet]>,
    /// The default upstream (`upstream.url`), if set.
    pub upstream: Option<UpstreamSettings>,
    /// The rate limiter's settings.
    pub limits: crate::limit::LimitSettings,
    /// The route table (the default upstream is its last, catch-all route).
    pub routes: RouteTable<UpstreamSettings>,
    /// The roles a key may be given (for the admin API's checks and document).
    pub roles: Roles,
    /// The store.
    pub store: StoreSettings,
    /// The verdict cache.
    pub cache: CacheSettings,
    /// Identity headers.
    pub identity: IdentitySettings,
    /// Logging.
    pub log: LogSettings,
    /// The tenant whose admin keys manage every tenant through the API.
    pub operator_tenant: String,
    /// How often a key's last use is recorded.
    pub last_used_interval: Duration,
    /// TLS on the proxy listener (`None`: cleartext, HTTP/1.1 and h2c).
    pub tls: Option<TlsSettings>,
    /// TLS on the admin listener (`None`: cleartext).
    pub admin_tls: Option<TlsSettings>,
}

/// The decision endpoint (`server.authz_listen`, `server.authz_caller`).
#[derive(Debug, Clone, Copy)]
pub struct AuthzSettings {
    /// Its address.
    pub listen: SocketAddr,
    /// How its caller names the request it asks about.
    pub caller: Caller,
}

/// A failure to start serving. Each message names the setting at fault; the OS error is
/// its cause, printed once after it.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} (the {} address: setting {}, flag {})", listener.what(), listener.setting(), listener.flag())]
    Bind {
        /// Which listener.
        listener: Listener,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The store could not be set up.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A listener's certificates could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The access log's writer thread could not be started.
    #[error("cannot start the access log writer: {0}")]
    AccessLog(#[source] std::io::Error),
}

/// keygate's listeners, for errors that name their setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `server.listen`, the proxy.
    Proxy,
    /// `server.admin_listen`, probes, metrics and the admin API.
    Admin,
    /// `server.authz_listen`, the decision endpoint for other gateways.
    Authz,
}

impl Listener {
    /// What it serves.
    pub fn what(self) -> &'static str {
        match self {
            Listener::Proxy => "proxy",
            Listener::Admin => "admin",
            Listener::Authz => "authorizer",
        }
    }

    /// Its setting.
    pub fn setting(self) -> &'static str {
        match self {
            Listener::Proxy => "server.listen",
            Listener::Admin => "server.admin_listen",
            Listener::Authz => "server.authz_listen",
        }
    }

    /// The flag of `keygate serve` that sets it.
    pub fn flag(self) -> &'static str {
        match self {
            Listener::Proxy => "--listen",
            Listener::Admin => "--admin-listen",
            Listener::Authz => "--authz-listen",
        }
    }
}

/// A bound, not yet running keygate: both listeners are open, so their addresses are known.
pub struct Server {
    app: Arc<App>,
    admin_app: Arc<Admin>,
    health: Arc<Health>,
    proxy_cap: Arc<Cap>,
    admin_cap: Arc<Cap>,
    proxy_tls: Option<Arc<ListenerTls>>,
    admin_tls: Option<Arc<ListenerTls>>,
    /// The proxy listener, a socket per worker (see [`proxy_listeners`]).
    proxy: Vec<std::net::TcpListener>,
    /// The decision endpoint, a socket per worker like the proxy's, with its caller.
    authz: Option<(Vec<std::net::TcpListener>, Caller)>,
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
        let bind = |listener: Listener, addr: SocketAddr| {
            listen(addr).map_err(|source| ServerError::Bind {
                listener,
                addr,
                source,
            })
        };
        let admin = bind(Listener::Admin, settings.admin_listen)?;
        let proxy = proxy_listeners(settings.listen, settings.workers).map_err(|source| {
            ServerError::Bind {
                listener: Listener::Proxy,
                addr: settings.listen,
                source,
            }
        })?;
        let authz = match settings.authz {
            Some(a) => Some((
                proxy_listeners(a.listen, settings.workers).map_err(|source| {
                    ServerError::Bind {
                        listener: Listener::Authz,
                        addr: a.listen,
                        source,
                    }
                })?,
                a.caller,
            )),
            None => None,
        };
        let (proxy_cap, admin_cap) = connection_caps(&settings);
        let metrics = Arc::new(Metrics::new());
        let load_tls = |listener, settings: &Option<TlsSettings>, series: &ListenerMetrics| {
            settings
                .clone()
                .map(|s| ListenerTls::load(listener, s, metrics.clone(), series.clone()))
                .transpose()
        };
        let proxy_tls = load_tls("proxy", &settings.tls, &metrics.proxy_listener)?;
        let admin_tls = load_tls("admin", &settings.admin_tls, &metrics.admin_listener)?;
        let verifier = Arc::new(
            Verifier::new(store.clone(), &settings.cache, metrics.clone())
                .with_last_used_interval(settings.last_used_interval),
        );
        store.start(verifier.clone())?;
        let names: Vec<Box<str>> = settings.routes.iter().map(|r| r.name.clone()).collect();
        let dropped = metrics.access_log_dropped.clone();
        let access_log = AccessLog::configured(&settings.log, names.iter().map(|n| &**n), dropped)
            .map_err(ServerError::AccessLog)?;
        // One pooled client per distinct upstream, shared by the routes that name it.
        let mut clients: HashMap<String, Arc<Upstream>> = HashMap::new();
        let mut names = names.into_iter();
        let routes = settings.routes.clone().map_upstreams(|up| {
            let id = up.pool_key();
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
                log_name: access_log
                    .as_ref()
                    .map_or(access_log::RouteName::UNROUTED, |log| log.route(&name)),
            }
        });
        verifier.start_last_used_flusher();
        verifier.start_live_sweeper();
        let app = Arc::new(App {
            unrouted: metrics.route(proxy::UNROUTED),
            metrics,
            access_log,
            verifier,
            routes,
            identity: settings.identity.clone(),
            underscores: settings.headers_with_underscores,
            trusted_proxies: settings.trusted_proxies.clone(),
            limiter: crate::limit::Limiter::new(settings.limits.clone()),
        });
        let health = Arc::new(Health::default());
        let admin_app = Arc::new(Admin {
            app: app.clone(),
            health: health.clone(),
            operator_tenant: settings.operator_tenant.clone(),
            roles: settings.roles.clone(),
        });
        Ok(Server {
            app,
            admin_app,
            health,
            proxy_cap,
            admin_cap,
            proxy_tls,
            admin_tls,
            proxy,
            authz,
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

    /// The decision endpoint's address, when it is on.
    pub fn authz_addr(&self) -> Option<SocketAddr> {
        let (listeners, _) = self.authz.as_ref()?;
        listeners[0].local_addr().ok()
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
            admin_app,
            health,
            proxy_cap,
            admin_cap,
            proxy_tls,
            admin_tls,
            proxy,
            authz,
            admin,
            settings,
        } = self;
        let builder = http_builder(&settings);
        let (stop_tx, stop_rx) = watch::channel(false);
        for tls in proxy_tls.iter().chain(&admin_tls) {
            tls.clone().watch(health.clone(), stop_rx.clone());
        }
        tracing::info!(
            listen = %proxy[0].local_addr().map(|a| a.to_string()).unwrap_or_default(),
            admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            authz = %authz
                .as_ref()
                .and_then(|(l, _)| l[0].local_addr().ok())
                .map_or_else(|| "off".to_owned(), |a| a.to_string()),
            workers = proxy.len(),
            "keygate serving"
        );

        let mut workers = Vec::with_capacity(proxy.len());
        let (mut authz, caller) = match authz {
            Some((listeners, caller)) => (listeners.into_iter().map(Some).collect(), caller),
            None => (Vec::new(), Caller::Request),
        };
        for (index, listener) in proxy.into_iter().enumerate() {
            let authz = authz.get_mut(index).and_then(Option::take).map(|listener| {
                let rules = ListenerRules::new(
                    &proxy_cap,
                    &app.metrics.authz_listener,
                    &settings,
                    &health,
                    None,
                    true,
                );
                (listener, caller, rules)
            });
            let (done_tx, done_rx) = oneshot::channel::<()>();
            let (app, builder, stop) = (app.clone(), builder.clone(), stop_rx.clone());
            let grace = settings.shutdown_grace;
            let rules = ListenerRules::new(
                &proxy_cap,
                &app.metrics.proxy_listener,
                &settings,
                &health,
                proxy_tls.clone(),
                true,
            );
            let spawned = std::thread::Builder::new()
                .name(format!("keygate-worker-{index}"))
                .spawn(move || {
                    proxy_worker(index, listener, authz, app, builder, rules, stop, grace);
                    let _ = done_tx.send(());
                });
            match spawned {
                Ok(_) => workers.push(done_rx),
                Err(err) => tracing::error!(error = %err, index, "cannot start a proxy worker"),
            }
        }

        let drain = Drain::default();
        let admin_rules = ListenerRules::new(
            &admin_cap,
            &app.metrics.admin_listener,
            &settings,
            &health,
            admin_tls,
            false,
        );
        let admin_loop = accept_loop(
            admin,
            builder,
            &drain,
            stop_rx,
            admin_rules,
            move |_, activity: Arc<Activity>, _: Transport| {
                let app = admin_app.clone();
                service_fn(move |req: Request<Incoming>| {
                    let app = app.clone();
                    let in_flight = activity.begin(req.version());
                    async move {
                        let resp = admin::handle(&app, req).await;
                        Ok::<_, Infallible>(connection::respond(resp, in_flight))
                    }
                })
            },
        );
        let signal = async {
            shutdown.await;
            tracing::info!("shutdown requested: draining");
            health.start_draining();
            let _ = stop_tx.send(true);
        };
        tokio::join!(admin_loop, signal);

        // Each worker drains its own connections within the grace period; so does the admin
        // listener. `stop_tx` lives until then, so no worker mistakes a dropped sender for a
        // stop before it was asked to.
        let (drained, _) = tokio::join!(
            drain_within(drain, settings.shutdown_grace),
            futures_util::future::join_all(workers)
        );
        // Every request has ended (or was given up at the grace period): its line is queued,
        // and is written before keygate exits.
        if let Some(log) = &app.access_log {
            log.flush(ACCESS_LOG_FLUSH).await;
        }
        if drained {
            tracing::info!("drained; exiting");
        }
        drop(stop_tx);
    }
}

/// The longest keygate waits at exit for the access log's last lines (stderr may be stuck).
const ACCESS_LOG_FLUSH: Duration = Duration::from_secs(5);

/// Completed handshakes the kernel may hold for a listener before keygate accepts them (it
/// caps this at `net.core.somaxconn`). Deep, as Go's is, so a burst of connections waits
/// there to be admitted or refused at once instead of in TCP's retransmission backoff.
const LISTEN_BACKLOG: u32 = 4096;

/// A socket for `addr` with `SO_REUSEADDR` (as `TcpListener::bind` sets it), bound.
fn bound(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    socket.bind(addr)?;
    Ok(socket)
}

/// A listening socket on `addr`.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    bound(addr, false)?.listen(LISTEN_BACKLOG)
}

/// The proxy listener: a socket per worker, each accepted on by its worker's event loop only.
///
/// On Linux the sockets form one `SO_REUSEPORT` group, and the kernel spreads new connections
/// over them by their addresses. One socket shared by every worker's event loop (the fallback
/// elsewhere) hands a burst of new connections to whichever worker wakes first: with 64
/// connections opened at once, one of two workers used three quarters of the CPU.
///
/// A group alone would let a second process of the same user join it unnoticed and take half
/// the connections. So a fixed port is first bound without `SO_REUSEPORT`: a port something
/// already listens on is refused as it would be without the group. (Another process binding
/// the port in the instant between that check and the group's first bind is not caught.)
fn proxy_listeners(
    addr: SocketAddr,
    workers: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let workers = workers.max(1);
    if cfg!(target_os = "linux") && workers > 1 {
        if addr.port() != 0 {
            drop(bound(addr, false)?);
        }
        let first = bound(addr, true)?.listen(LISTEN_BACKLOG)?;
        let addr = first.local_addr()?;
        let mut all = vec![first.into_std()?];
        for _ in 1..workers {
            all.push(bound(addr, true)?.listen(LISTEN_BACKLOG)?.into_std()?);
        }
        return Ok(all);
    }
    let first = listen(addr)?.into_std()?;
    let mut all = Vec::with_capacity(workers);
    for _ in 1..workers {
        all.push(first.try_clone()?);
    }
    all.push(first);
    Ok(all)
}

/// Descriptors kept for everything but client and upstream connections: the listeners, the
/// runtimes' own, the store's connections, the keys file and its watcher, logs.
const RESERVED_DESCRIPTORS: usize = 64;

/// Descriptors kept per proxy worker (its event loop's own).
const DESCRIPTORS_PER_WORKER: usize = 4;

/// The caps of the proxy and admin listeners. The process's soft descriptor limit is raised
/// to its hard limit first (as nginx and Go do), and an unset `server.max_connections` is
/// derived from it: each proxied connection may hold an upstream connection too, so half of
/// what is left once the admin listener's cap and the reserve are set aside.
fn connection_caps(settings: &Settings) -> (Arc<Cap>, Arc<Cap>) {
    let limit = raise_descriptor_limit();
    let admin = settings.admin_max_connections;
    let fits = limit.map(|l| connections_that_fit(l, settings.workers, admin));
    let proxy = match (settings.max_connections, fits) {
        (0, Some(fits)) => fits.max(1),
        (0, None) => 1 << 20,
        (n, Some(fits)) if n > fits => {
            tracing::warn!(
                max_connections = n,
                descriptor_limit = limit,
                fits,
                "server.max_connections is more than the descriptor limit allows: accepts and upstream connections may fail with \"Too many open files\"; raise the limit (ulimit -n) or lower the setting"
            );
            n
        }
        (n, _) => n,
    };
    tracing::info!(
        max_connections = proxy,
        admin_max_connections = admin,
        descriptor_limit = limit,
        "connection caps"
    );
    (Cap::new(proxy), Cap::new(admin))
}

/// The proxy connections `limit` descriptors allow: half of what is left once the admin
/// listener's cap and the reserve are set aside (a proxied connection may hold an upstream
/// connection too).
fn connections_that_fit(limit: usize, workers: usize, admin: usize) -> usize {
    let reserve = RESERVED_DESCRIPTORS + DESCRIPTORS_PER_WORKER * workers + admin;
    limit.saturating_sub(reserve) / 2
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; the soft limit after that (`None`:
/// unlimited, or unknown).
fn raise_descriptor_limit() -> Option<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    if limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    usize::try_from(limit.rlim_cur).ok()
}

/// The HTTP/1.1 and HTTP/2 server settings shared by both listeners.
fn http_builder(settings: &Settings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Head and idle deadlines are kept per connection by `connection::serve`, on both
    // protocols; hyper's own HTTP/1.1 header timer would also cut idle keep-alive connections
    // at the head deadline.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(settings.max_header_bytes);
    // HTTP/2 floods are contained here: the header list bound also bounds the CONTINUATION
    // frames of one header block (h2 refuses a block past it before decoding it), and
    // clients that reset streams faster than they are served (rapid reset) or make keygate
    // reset them get a GOAWAY past their bounds.
    let h2 = &settings.http2;
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes as u32)
        .max_concurrent_streams(h2.max_concurrent_streams)
        // Extended CONNECT (RFC 8441): WebSockets over HTTP/2, passed through by the proxy.
        .enable_connect_protocol()
        .keep_alive_interval(h2.keep_alive_interval)
        .keep_alive_timeout(h2.keep_alive_timeout)
        .max_pending_accept_reset_streams(h2.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(h2.max_local_error_reset_streams);
    builder
}

/// One listener's connection rules: its cap, the deadlines, its series, its TLS, and where
/// accept failures and refusals are reported for readiness.
#[derive(Clone)]
struct ListenerRules {
    cap: Arc<Cap>,
    /// `None`: cleartext.
    tls: Option<Arc<ListenerTls>>,
    deadlines: Deadlines,
    metrics: ListenerMetrics,
    expired: Expirations,
    health: Arc<Health>,
    /// Whether refusals make the instance unready (the proxy listener's do).
    proxy: bool,
}

impl ListenerRules {
    fn new(
        cap: &Arc<Cap>,
        metrics: &ListenerMetrics,
        settings: &Settings,
        health: &Arc<Health>,
        tls: Option<Arc<ListenerTls>>,
        proxy: bool,
    ) -> Self {
        ListenerRules {
            cap: cap.clone(),
            tls,
            health: health.clone(),
            deadlines: Deadlines {
                head: settings.header_read_timeout,
                idle: settings.idle_timeout,
                max_requests: settings.max_requests_per_connection,
            },
            expired: Expirations {
                head: metrics.timed_out_head.clone(),
                idle: metrics.timed_out_idle.clone(),
            },
            metrics: metrics.clone(),
            proxy,
        }
    }
}

/// A worker's socket of the decision endpoint, with its caller and its connection rules.
type AuthzListener = (std::net::TcpListener, Caller, ListenerRules);

/// One proxy worker: its own single-threaded runtime, accepting on its proxy socket (and its
/// decision endpoint socket, when that is on) until `stop`, then draining its connections for
/// up to `grace`.
#[allow(clippy::too_many_arguments)]
fn proxy_worker(
    index: usize,
    listener: std::net::TcpListener,
    authz: Option<AuthzListener>,
    app: Arc<App>,
    builder: auto::Builder<TokioExecutor>,
    rules: ListenerRules,
    stop: watch::Receiver<bool>,
    grace: Duration,
) {
    proxy::upstream::set_worker(index);
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
        let drain = Drain::default();
        let service_app = app.clone();
        let make_service =
            move |peer: SocketAddr, activity: Arc<Activity>, transport: Transport| {
                let app = service_app.clone();
                // Worked out once per connection, shared by its requests.
                let mut peer = Peer::new(peer.ip(), &app.trusted_proxies);
                if transport.tls {
                    peer = peer.over_tls(transport.client_cert);
                }
                let peer = Arc::new(peer);
                service_fn(move |mut req: Request<Incoming>| {
                    let (app, peer) = (app.clone(), peer.clone());
                    let in_flight = activity.begin(req.version());
                    if req
                        .extensions()
                        .get::<hyper::upgrade::OnUpgrade>()
                        .is_some()
                    {
                        // A tunnel outlives its response: while the proxy keeps this, an
                        // HTTP/2 connection stays busy (no idle deadline) and an HTTP/1.1 one
                        // stays under the cap and in the drain (hyper sets `OnUpgrade` only on
                        // upgrade and CONNECT requests).
                        let busy = activity.tunnel(req.version());
                        req.extensions_mut()
                            .insert(proxy::ConnectionHold::new(busy));
                    }
                    let unanswered = Unanswered::new(app.metrics.requests_abandoned.clone());
                    async move {
                        let resp = proxy::handle(&app, req, &peer).await;
                        unanswered.answered();
                        Ok::<_, Infallible>(connection::respond(resp, in_flight))
                    }
                })
            };
        let authz = authz.and_then(|(listener, caller, rules)| {
            let listener = listener
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(listener))
                .inspect_err(|err| {
                    tracing::error!(error = %err, index, "cannot listen for decisions in a proxy worker")
                })
                .ok()?;
            let app = app.clone();
            let make_service = move |peer: SocketAddr, activity: Arc<Activity>, _: Transport| {
                let app = app.clone();
                let peer = Arc::new(Peer::new(peer.ip(), &app.trusted_proxies));
                service_fn(move |req: Request<Incoming>| {
                    let (app, peer) = (app.clone(), peer.clone());
                    let in_flight = activity.begin(req.version());
                    let unanswered = Unanswered::new(app.metrics.requests_abandoned.clone());
                    async move {
                        let resp = proxy::authz(&app, req, &peer, caller).await;
                        unanswered.answered();
                        Ok::<_, Infallible>(connection::respond(resp, in_flight))
                    }
                })
            };
            Some((listener, rules, make_service))
        });
        let proxy_loop = accept_loop(listener, builder.clone(), &drain, stop.clone(), rules, make_service);
        match authz {
            Some((listener, authz_rules, authz_service)) => {
                let authz_loop =
                    accept_loop(listener, builder, &drain, stop, authz_rules, authz_service);
                tokio::join!(proxy_loop, authz_loop);
            }
            None => proxy_loop.await,
        }
        drain_within(drain, grace).await;
    });
}

/// Lets the listener's connections finish for up to `grace`; whether they all did.
async fn drain_within(drain: Drain, grace: Duration) -> bool {
    let open = drain.count();
    match tokio::time::timeout(grace, drain.shutdown()).await {
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

/// What a connection's transport tells its requests.
pub struct Transport {
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The verified client certificate's subject, if the client presented one.
    pub client_cert: Option<HeaderValue>,
}

/// Accepts connections until `stop` turns true. Each admitted connection runs in its own task
/// under `rules` and is watched by `drain`; one over the cap is closed at once, unread.
async fn accept_loop<S, B, M>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    drain: &Drain,
    mut stop: watch::Receiver<bool>,
    rules: ListenerRules,
    make_service: M,
) where
    M: Fn(SocketAddr, Arc<Activity>, Transport) -> S + Clone + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Shared with every connection's task (a TLS one builds its connection after the handshake).
    let builder = Arc::new(builder);
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(err) => {
                // Out of file descriptors or a connection reset before accept: keep serving,
                // say so in /readyz, and do not spin.
                rules.metrics.accept_errors.inc();
                rules.health.accept_failed(&err);
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(admitted) = rules.cap.admit() else {
            // At the cap: closing at once keeps the backlog moving and tells the client now,
            // while the connections already admitted keep being served.
            rules.metrics.refused.inc();
            if rules.proxy {
                rules.health.refused(rules.cap.open(), rules.cap.max());
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let (mut watcher, rules) = (drain.watcher(), rules.clone());
        rules.metrics.open.inc();
        let (builder, make_service) = (builder.clone(), make_service.clone());
        tokio::spawn(async move {
            if rules.tls.is_some() {
                serve_tls(
                    stream,
                    peer,
                    activity,
                    &builder,
                    make_service,
                    &mut watcher,
                    &rules,
                )
                .await;
            } else {
                let transport = Transport {
                    tls: false,
                    client_cert: None,
                };
                serve_http(
                    stream,
                    peer,
                    activity,
                    &builder,
                    make_service,
                    transport,
                    &mut watcher,
                    &rules,
                )
                .await;
            }
            drop(watcher);
            rules.metrics.open.dec();
            drop(admitted);
        });
    }
}

/// HTTP over an accepted stream (TCP, or TLS after its handshake) under the connection's
/// deadlines, until the connection ends; an upgraded HTTP/1.1 connection lives on as a tunnel,
/// so this returns only when the tunnel has ended too, keeping the connection under the cap
/// and in the drain for its whole life.
#[allow(clippy::too_many_arguments)]
async fn serve_http<I, S, B, M>(
    stream: I,
    peer: SocketAddr,
    activity: Arc<Activity>,
    builder: &auto::Builder<TokioExecutor>,
    make_service: M,
    transport: Transport,
    watcher: &mut watch::Receiver<()>,
    rules: &ListenerRules,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    M: Fn(SocketAddr, Arc<Activity>, Transport) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = TokioIo::new(Watched::new(stream, activity.clone()));
    let conn =
        builder.serve_connection_with_upgrades(io, make_service(peer, activity.clone(), transport));
    let ended = connection::serve(
        conn,
        |c| c.graceful_shutdown(),
        activity.clone(),
        rules.deadlines,
        watcher,
        &rules.expired,
    )
    .await;
    if let Err(err) = ended {
        tracing::debug!(error = %err, %peer, "connection ended with an error");
    }
    activity.settled().await;
}

/// One TLS connection: the handshake, then HTTP over it, all under the connection's deadlines.
///
/// Invariant: the handshake runs under the first-head deadline counted from accept (the same
/// instant [`connection::serve`] counts from), so a client that trickles its handshake, or
/// completes it and then sends nothing, is closed `header_read_timeout` after accept, and the
/// handshake never extends the deadline. A failed handshake is counted by reason and logged at
/// debug level with the peer and the reason only.
async fn serve_tls<S, B, M>(
    stream: TcpStream,
    peer: SocketAddr,
    activity: Arc<Activity>,
    builder: &auto::Builder<TokioExecutor>,
    make_service: M,
    watcher: &mut watch::Receiver<()>,
    rules: &ListenerRules,
) where
    M: Fn(SocketAddr, Arc<Activity>, Transport) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some(tls) = &rules.tls else { return };
    let deadline = activity.first_head_due(rules.deadlines);
    let handshake = tokio::time::timeout_at(deadline, tls.acceptor().accept(stream));
    let stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                let reason = tls::count_failure(tls.failures(), &err);
                tracing::debug!(%peer, reason, "TLS handshake failed");
                return;
            }
            Err(_) => {
                rules.expired.head.inc();
                return;
            }
        },
        // Shutdown: a connection still in its handshake has no request to finish.
        _ = watcher.changed() => return,
    };
    let transport = Transport {
        tls: true,
        client_cert: tls::client_subject(stream.get_ref().1),
    };
    serve_http(
        stream,
        peer,
        activity,
        builder,
        make_service,
        transport,
        watcher,
        rules,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_room_for_upstream_connections_and_the_rest() {
        // The figure config/keygate.toml and the README give.
        assert_eq!(connections_that_fit(1024, 2, 64), 444);
        assert_eq!(connections_that_fit(65536, 8, 64), 32_688);
        assert_eq!(connections_that_fit(100, 2, 64), 0);
        assert!(raise_descriptor_limit().is_some_and(|l| l > 0));
    }
}
