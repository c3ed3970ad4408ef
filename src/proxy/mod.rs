//! The request path: what happens to one request on the proxy listener, from its head to its
//! access log line. [`handle`] runs it; the files beside this one each keep one concern of it:
//! header hygiene ([`headers`], [`hop`]), forwarding headers and trusted proxies ([`forwarded`]), the upstream connection pools and their replay rule
//! ([`upstream`]), request ids ([`request_id`]).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use prometheus::IntCounter;
use tracing::Instrument;

use crate::metrics::{Metrics, RouteMetrics};
use crate::rejection::Rejection;
use crate::route::{self, RouteTable};
use crate::store::now_unix;
use crate::verify::Verifier;
use crate::{auth, policy};

pub mod forwarded;
pub mod headers;
pub mod hop;
pub mod request_id;
pub mod upstream;

pub use forwarded::{IpNet, Peer};
pub use headers::{IdentitySettings, UnderscoreHeaders};
pub use request_id::X_REQUEST_ID;
pub use upstream::{Upstream, UpstreamSettings};

use headers::Forwarded;

/// The body of every proxy response: the upstream's, streamed, or a small synthetic one.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

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
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// Series of requests refused before a route matched (`invalid_path`, `no_route`).
    pub unrouted: RouteMetrics,
    /// Whether each request gets an access log line.
    pub access_log: bool,
    /// What happens to request headers whose names contain `_`.
    pub underscores: UnderscoreHeaders,
    /// Peers whose forwarding headers are kept.
    pub trusted_proxies: Box<[IpNet]>,
}

/// The `route` label and log field of requests that matched no route.
pub const UNROUTED: &str = "-";

/// A request hyper handed over, counted as abandoned unless it is answered: hyper drops a
/// request's handling when the client closes the connection or resets the stream first (even
/// before [`handle`] has run at all, for a stream reset as soon as it was opened).
pub struct Unanswered(Option<IntCounter>);

impl Unanswered {
    /// A request handed over now, counted in `abandoned` unless answered.
    pub fn new(abandoned: IntCounter) -> Self {
        Unanswered(Some(abandoned))
    }

    /// The request was answered: nothing to count.
    pub fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(abandoned) = &self.0 {
            abandoned.inc();
        }
    }
}

/// The request path.
pub async fn handle(app: &App, mut req: Request<Incoming>, peer: &Peer) -> Response<ProxyBody> {
    let started = Instant::now();
    let request_id = request_id::client_request_id(req.headers())
        .cloned()
        .unwrap_or_else(request_id::new_request_id);
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
    let scan = headers::scan_request_headers(req.headers(), &app.identity.prefix, app.underscores);
    let mut removed = headers::Removed::default();

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
            headers::set_path(req.uri_mut(), &normal)?;
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
        removed = headers::rewrite_request_headers(
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
    if removed != headers::Removed::default() {
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
