//! Listeners, the request path, and shutdown.
//!
//! [`handle`] is the whole request path on one screen: request id, credential, verdict, header
//! rewrite, forward, error mapping, access log. The accept loops around it keep going through
//! accept errors (EMFILE must not kill the process) and run each connection in its own task
//! with hyper's header read timeout and size limits. Shutdown is a sequence: readiness goes
//! false, the listeners close, in-flight requests get up to `shutdown_grace` to finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{IdentitySettings, Settings};
use crate::metrics::Metrics;
use crate::proxy::{self, Forwarded, Upstream, X_REQUEST_ID};
use crate::rejection::Rejection;
use crate::store::{self, now_unix, Store, StoreError};
use crate::verify::Verifier;
use crate::{admin, auth};

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

/// Everything a request needs, built once at startup.
pub struct App {
    /// Cache and store.
    pub verifier: Arc<Verifier>,
    /// The pooled upstream client.
    pub upstream: Upstream,
    /// Identity header names.
    pub identity: IdentitySettings,
    /// Readiness and drain state.
    pub state: State,
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// The tenant whose admin keys manage every tenant through the API.
    pub operator_tenant: String,
}

/// The request path.
pub async fn handle(
    app: &App,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let request_id = proxy::client_request_id(req.headers())
        .cloned()
        .unwrap_or_else(proxy::new_request_id);

    let outcome = async {
        let identity = auth::check(&app.verifier, req.headers(), now_unix()).await?;
        let host = req.headers().get(HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let fwd = Forwarded {
            client_ip: peer.ip(),
            proto: "http",
            host,
            request_id: &request_id,
        };
        proxy::rewrite_request_headers(
            req.headers_mut(),
            &identity,
            &app.identity,
            app.upstream.settings(),
            &fwd,
        );
        let method = req.method().clone();
        let resp = app.upstream.send(req).await?;
        Ok::<_, Rejection>((identity, method, resp))
    }
    .await;

    let mut resp = match outcome {
        Ok((identity, method, resp)) => {
            app.metrics.decision(Ok(()));
            tracing::info!(
                target: "keygate::access",
                request_id = ?request_id,
                method = %method,
                status = resp.status().as_u16(),
                key_id = &*identity.key_id,
                tenant = &*identity.tenant,
                outcome = "allowed",
                latency_us = started.elapsed().as_micros() as u64,
            );
            resp.map(Either::Left)
        }
        Err(rejection) => {
            app.metrics.decision(Err(rejection));
            tracing::info!(
                target: "keygate::access",
                request_id = ?request_id,
                status = rejection.status().as_u16(),
                outcome = rejection.code(),
                latency_us = started.elapsed().as_micros() as u64,
            );
            rejection.into_response().map(Either::Right)
        }
    };
    resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
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
    proxy: TcpListener,
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
        let proxy = bind(settings.listen).await?;
        let admin = bind(settings.admin_listen).await?;
        let metrics = Arc::new(Metrics::new());
        let verifier = Arc::new(
            Verifier::new(store.clone(), &settings.cache, metrics.clone())
                .with_last_used_interval(settings.last_used_interval),
        );
        store.start(verifier.clone())?;
        verifier.start_last_used_flusher();
        let app = Arc::new(App {
            metrics,
            verifier,
            upstream: Upstream::new(settings.upstream.clone()),
            identity: settings.identity.clone(),
            state: State::default(),
            operator_tenant: settings.operator_tenant.clone(),
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
        self.proxy
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
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let Server {
            app,
            proxy,
            admin,
            settings,
        } = self;
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

        let graceful = GracefulShutdown::new();
        let (stop_tx, stop_rx) = watch::channel(false);
        tracing::info!(
            listen = %proxy.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "keygate serving"
        );

        let proxy_app = app.clone();
        let proxy_loop = accept_loop(
            proxy,
            builder.clone(),
            &graceful,
            stop_rx.clone(),
            move |peer| {
                let app = proxy_app.clone();
                service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(handle(&app, req, peer).await) }
                })
            },
        );
        let admin_app = app.clone();
        let admin_loop = accept_loop(admin, builder, &graceful, stop_rx, move |_| {
            let app = admin_app.clone();
            service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(admin::handle(&app, req).await) }
            })
        });
        let signal = async {
            shutdown.await;
            tracing::info!("shutdown requested: draining");
            app.state.draining.store(true, Ordering::SeqCst);
            let _ = stop_tx.send(true);
        };
        tokio::join!(proxy_loop, admin_loop, signal);

        let open = graceful.count();
        match tokio::time::timeout(settings.shutdown_grace, graceful.shutdown()).await {
            Ok(()) => tracing::info!(connections = open, "drained; exiting"),
            Err(_) => tracing::warn!(
                grace = ?settings.shutdown_grace,
                "shutdown grace elapsed with requests still running; exiting"
            ),
        }
    }
}

/// Accepts connections until `stop` turns true; every connection is watched by `graceful`.
async fn accept_loop<S, B>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    mut stop: watch::Receiver<bool>,
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
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, %peer, "connection ended with an error");
            }
        });
    }
}
