//! The request path: what happens to one request on the proxy listener, from its head to its
//! access log line. [`handle`] runs it as named phases over one per-request context, in the
//! order a request lives them; each phase is a short method of that context, below `handle`:
//!
//! 1. `route`: the head must be readable (header names, `Host`, path) and one route must take
//!    the request. First, because every later phase depends on the route: whether a key is
//!    needed, which roles and tenant it admits, where it forwards; and a request no route
//!    serves costs no key lookup.
//! 2. `credential`: the bearer token, checked for shape (prefix, length, alphabet, checksum)
//!    and hashed. Before `verify`, so that junk never reaches the cache or the store; the
//!    plaintext key goes no further.
//! 3. `verify`: the key must be live; unknown, expired and revoked keys are refused here.
//!    Before `authorize`, because a dead key's role and tenant mean nothing.
//! 4. `authorize`: the route's policy on the live key: its role, the method, the tenant the
//!    request names. So it decides on a verified identity.
//! 5. `limit`: the rate limits of the key's role and of the route (`limit/`). Last of the
//!    decisions, so that only a request keygate would otherwise let through uses up a limit:
//!    a key cannot drain its tenant's shared limit with requests it may not make.
//! 6. `rewrite`: the head the upstream gets: the normalised path, header hygiene, identity and
//!    forwarding headers ([`headers`], `hop.rs`, [`forwarded`]). After every decision, so the
//!    upstream sees what was decided on and nothing the client sent can replace it.
//! 7. `forward`: one exchange with the route's upstream on this worker's pool (`upstream.rs`),
//!    whose failures become `502`/`504`. Timed alone, for the upstream's share of the latency.
//!    An upgrade (a WebSocket over HTTP/1.1 `Upgrade` or HTTP/2 extended CONNECT, recognised
//!    before `route` and decided as the `GET` it stands for) is forwarded on a connection of
//!    its own and spliced once both sides switch (`upgrade.rs`).
//! 8. `log`: the outcome becomes the response (a refusal through
//!    [`Rejection::into_response`], the one place refusals are mapped), with its request id
//!    (`request_id.rs`); then the metrics, the span's outcome and the access log line. It runs
//!    for every request, whichever phase ended it, so each is decided and counted once.
//!
//! A phase that refuses ends the request: no phase after it runs but `log`, so the refusal is
//! the one of the first phase that found a fault (`tests/phases.rs` holds the order). An open
//! route (`auth = false`) skips `credential`, `verify`, `authorize` and `limit`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use prometheus::IntCounter;
use tracing::{Instrument, Span};

use crate::identity::Identity;
use crate::key::KeyDigest;
use crate::metrics::{Metrics, Mode, RouteMetrics};
use crate::rejection::Rejection;
use crate::route::{self, Grant, Route, RouteTable};
use crate::store::now_unix;
use crate::verify::Verifier;
use crate::{auth, limit, policy};

use access_log::AccessLog;

pub mod access_log;
pub mod ext_authz;
pub mod forwarded;
pub mod headers;
mod hop;
pub mod original;
mod request_id;
mod upgrade;
pub(crate) mod upstream;

pub use forwarded::{IpNet, Peer};
pub use headers::{IdentitySettings, UnderscoreHeaders};
pub use original::Caller;
pub use upgrade::ConnectionHold;
pub use upstream::{Upstream, UpstreamSettings};

pub use upstream::{ConnectError, ResponseBody, UpstreamIo};

use headers::{Forwarded, HeaderScan, Removed};
use request_id::X_REQUEST_ID;

/// The header with which Envoy's HTTP `ext_authz` filter is told which request headers to
/// remove before forwarding.
static X_ENVOY_AUTH_HEADERS_TO_REMOVE: http::HeaderName =
    http::HeaderName::from_static("x-envoy-auth-headers-to-remove");

/// The request path: the phases, in order (see the module docs for why each sits where it
/// does). A phase's refusal skips the rest, up to `log`.
pub async fn handle(app: &App, mut req: Request<Incoming>, peer: &Peer) -> Response<ProxyBody> {
    let mut cx = Context::new(app, peer, &req, Mode::Proxy);
    let span = cx.span.clone();
    let outcome = async {
        let upgrade = upgrade::requested(&mut req, &cx.scan)?;
        let (route, host) = cx.route(&mut req)?;
        let key = if route.auth {
            let digest = cx.credential(&req)?;
            let identity = cx.verify(digest).await?;
            let grant = cx.authorize(route, &identity, &req)?;
            cx.limit(route, grant, &identity)?;
            Some((digest, identity))
        } else {
            None
        };
        cx.rewrite(&mut req, route, host, key.as_ref().map(|(_, id)| id));
        let resp = match upgrade {
            None => cx.forward(route, req).await?,
            Some(upgrade) => {
                let digest = key.map(|(digest, _)| digest);
                let resp = cx.forward_upgrade(route, req, upgrade, digest).await?;
                resp.map(upstream::ResponseBody::from)
            }
        };
        Ok(resp.map(Either::Left))
    }
    .instrument(span)
    .await;
    cx.log(outcome)
}

/// The decision endpoint (`server.authz_listen`): a check request, answered in its caller's
/// protocol: gRPC for `grpc` (`ext_authz/`), plain HTTP for the others ([`decide`]).
pub async fn authz(
    app: &App,
    req: Request<Incoming>,
    peer: &Peer,
    caller: Caller,
) -> Response<AuthzBody> {
    match caller {
        Caller::Grpc => ext_authz::check(app, req, peer).await.map(Either::Right),
        _ => decide(app, req, peer, caller).await.map(Either::Left),
    }
}

/// The body of every decision endpoint response: an HTTP decision's, or a gRPC answer's.
pub type AuthzBody = Either<ProxyBody, ext_authz::GrpcBody>;

/// The decision endpoint over HTTP: the check request names the original request by its
/// `caller`'s convention (`original.rs`), and [`decide_original`] decides on that.
/// The check request's body, if any, is never read.
pub async fn decide(
    app: &App,
    req: Request<Incoming>,
    peer: &Peer,
    caller: Caller,
) -> Response<ProxyBody> {
    let (mut parts, _) = req.into_parts();
    let named = original::original(caller, &mut parts);
    decide_original(app, Request::from_parts(parts, ()), named, peer, caller)
        .await
        .0
}

/// The decision on an original request, whichever caller named it (`named`: whether it could
/// be read): the phases up to `authorize`, then `answer` instead of `rewrite` and `forward`:
/// `200` with the identity headers for the gateway to set upstream, or the refusal for the
/// gateway to pass back to its client. `log` is the proxy's, with `mode="authz"`. Returns the
/// answer and the decision it carries.
async fn decide_original(
    app: &App,
    mut req: Request<()>,
    named: Result<(), Rejection>,
    peer: &Peer,
    caller: Caller,
) -> (Response<ProxyBody>, Result<(), Rejection>) {
    let mut cx = Context::new(app, peer, &req, Mode::Authz);
    let span = cx.span.clone();
    let outcome = async {
        named?;
        let (route, _) = cx.route(&mut req)?;
        let identity = if route.auth {
            let digest = cx.credential(&req)?;
            let identity = cx.verify(digest).await?;
            let grant = cx.authorize(route, &identity, &req)?;
            cx.limit(route, grant, &identity)?;
            Some(identity)
        } else {
            None
        };
        Ok(cx.answer(&req, caller, identity.as_ref()))
    }
    .instrument(span)
    .await;
    let decision = outcome.as_ref().map(drop).map_err(|r| *r);
    (cx.log(outcome), decision)
}

/// One request's context: what it is known by (request id, span, the scan of its header
/// names), and what the phases found that `log` reports (the route, the upstream's time, the
/// headers removed).
struct Context<'a> {
    app: &'a App,
    peer: &'a Peer,
    /// Which listener decides: the proxy or the decision endpoint.
    mode: Mode,
    started: Instant,
    /// The client's request id if it is sane, else a fresh one.
    request_id: HeaderValue,
    span: Span,
    method: Method,
    /// One pass over the header names, for every header rule of the request.
    scan: HeaderScan,
    /// The matched route's target, once `route` found one.
    target: Option<&'a RouteTarget>,
    /// How long the upstream took, once `forward` ran.
    upstream_time: Option<Duration>,
    /// The live key's identity, once `verify` found it (for the access log line).
    identity: Option<Identity>,
    /// The client headers `rewrite` removed.
    removed: Removed,
    /// The rate limits `limit` checked, for the response's headers.
    limits: limit::Report,
}

impl<'a> Context<'a> {
    fn new<B>(app: &'a App, peer: &'a Peer, req: &Request<B>, mode: Mode) -> Self {
        let request_id = request_id::client_request_id(req.headers())
            .cloned()
            .unwrap_or_else(request_id::new_request_id);
        let span = tracing::info_span!(
            "request",
            request_id = ?request_id,
        );
        Context {
            app,
            peer,
            mode,
            started: Instant::now(),
            request_id,
            span,
            method: req.method().clone(),
            scan: headers::scan_request_headers(
                req.headers(),
                &app.identity.prefix,
                app.underscores,
            ),
            target: None,
            upstream_time: None,
            identity: None,
            removed: Removed::default(),
            limits: limit::Report::default(),
        }
    }

    /// **route**: refuses unreadable heads (header names under `reject`, `Host`, the path) and
    /// requests no route takes; gives the route and the host the request is for.
    ///
    /// From here on the request carries the path its route matched (normalised, the query as
    /// sent): `authorize` reads the tenant from it and the upstream gets it, so no phase can
    /// read another path into the request.
    fn route<B>(
        &mut self,
        req: &mut Request<B>,
    ) -> Result<(&'a Route<RouteTarget>, Option<HeaderValue>), Rejection> {
        if let Some(refusal) = self.scan.refusal() {
            return Err(refusal);
        }
        let host = route::request_host(req.version(), req.uri(), req.headers())?;
        let path = route::normalize(req.uri().path())?;
        let host_bytes = host.as_ref().map(HeaderValue::as_bytes);
        let route = self
            .app
            .routes
            .find(host_bytes, &path, req.method())
            .ok_or(Rejection::NoRoute)?;
        self.target = Some(&route.upstream);
        if let Cow::Owned(normal) = path {
            headers::set_path(req.uri_mut(), &normal)?;
        }
        Ok((route, host))
    }

    /// **credential**: the digest of the request's one bearer key, or the refusal of a missing,
    /// repeated or malformed credential. Touches neither the cache nor the store.
    fn credential<B>(&self, req: &Request<B>) -> Result<KeyDigest, Rejection> {
        Ok(auth::bearer_token(req.headers())?.digest())
    }

    /// **verify**: the live key's identity. This is where a revoked key is refused, as are
    /// unknown and expired keys (from the cache, else the store); a store that cannot answer
    /// fails closed.
    async fn verify(&mut self, digest: KeyDigest) -> Result<Identity, Rejection> {
        let identity = auth::verify(&self.app.verifier, digest, now_unix()).await?;
        if self.app.access_log.is_some() {
            self.identity = Some(identity.clone());
        }
        Ok(identity)
    }

    /// **authorize**: refuses (`403 insufficient_scope`) a key whose role the route does not
    /// admit for this method, or that names another tenant than the key's.
    fn authorize<'r, B>(
        &self,
        route: &'r Route<RouteTarget>,
        identity: &Identity,
        req: &Request<B>,
    ) -> Result<&'r Grant, Rejection> {
        let tenant = route.tenant(req.uri().path(), req.headers(), self.scan.underscores());
        policy::authorize(route, identity, req.method(), tenant)
    }

    /// **limit**: refuses (`429 rate_limited`) a request that the key's role's rate limit or
    /// the route's admits no more of now (`limit/`); `log` sets the limits' headers on the
    /// response either way.
    fn limit(
        &mut self,
        route: &Route<RouteTarget>,
        grant: &Grant,
        identity: &Identity,
    ) -> Result<(), Rejection> {
        let report = self.app.limiter.check(
            &route.name,
            grant.rate_limit.as_ref(),
            route.rate_limit.as_ref(),
            identity,
        );
        if report.is_empty() {
            return Ok(());
        }
        self.app.metrics.rate_limits(&report);
        self.limits = report;
        if report.allowed() {
            Ok(())
        } else {
            Err(Rejection::RateLimited)
        }
    }

    /// **rewrite**: the head the upstream gets (see [`headers`] for the rules and their order).
    /// `identity` is `None` on an open route.
    fn rewrite(
        &mut self,
        req: &mut Request<Incoming>,
        route: &'a Route<RouteTarget>,
        host: Option<HeaderValue>,
        identity: Option<&Identity>,
    ) {
        // The upstream gets the tenant header as it was decided on (the headers are still the
        // client's, as `authorize` read them).
        let tenant_header = identity
            .and_then(|_| route.tenant_header(req.headers(), self.scan.underscores()))
            .map(|(name, value)| (name, value.clone()));
        let fwd = Forwarded {
            client_ip: &self.peer.ip,
            trusted: self.peer.trusted,
            proto: self.peer.proto,
            client_cert: self.peer.client_cert.as_ref(),
            host,
            request_id: &self.request_id,
            scan: self.scan,
            tenant_header,
        };
        self.removed = headers::rewrite_request_headers(
            req.headers_mut(),
            identity,
            &self.app.identity,
            route.upstream.upstream.settings(),
            &fwd,
        );
    }

    /// **forward**: the upstream's response head (its body streams on), or the refusal that
    /// maps its failure (`502`, `504`, or `400 invalid_body` for the client's own body).
    async fn forward(
        &mut self,
        route: &Route<RouteTarget>,
        req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Rejection> {
        let sent = Instant::now();
        let resp = route.upstream.upstream.send(req).await;
        self.upstream_time = Some(sent.elapsed());
        resp
    }

    /// **forward**, for an upgrade (a WebSocket): on a connection of its own to the route's
    /// upstream; once both sides switch, the tunnel runs on its own task, closed when `key`
    /// stops working (`upgrade.rs`). Timed to the upstream's answer, like `forward`.
    async fn forward_upgrade(
        &mut self,
        route: &Route<RouteTarget>,
        req: Request<Incoming>,
        upgrade: upgrade::Upgrade,
        key: Option<KeyDigest>,
    ) -> Result<Response<Incoming>, Rejection> {
        let sent = Instant::now();
        let app = self.app;
        let upstream = &route.upstream.upstream;
        // Boxed: its state is large, and inline it would make every request's future (moved
        // on each poll setup) that much larger.
        let resp = Box::pin(upgrade::forward(
            &app.verifier,
            &app.metrics.upgrades,
            upstream,
            req,
            upgrade,
            key,
        ))
        .await;
        self.upstream_time = Some(sent.elapsed());
        resp
    }

    /// **answer** (the decision endpoint's last phase): `200` with the identity headers, which
    /// the gateway sets on the request it forwards (replacing any the client sent). For a
    /// caller that forwards the request itself (Envoy), `x-envoy-auth-headers-to-remove` also
    /// names `Authorization` and every client header in the identity namespace, so the
    /// upstream sees neither the key nor a spoofed identity.
    fn answer(
        &self,
        req: &Request<()>,
        caller: Caller,
        identity: Option<&Identity>,
    ) -> Response<ProxyBody> {
        let mut resp = Response::new(Either::Right(Full::default()));
        let headers = resp.headers_mut();
        if let Some(identity) = identity {
            headers::insert_identity(headers, identity, &self.app.identity);
        }
        if caller.sends_request() {
            if let Some(names) = headers::to_remove(req.headers(), &self.app.identity) {
                headers.insert(X_ENVOY_AUTH_HEADERS_TO_REMOVE.clone(), names);
            }
        }
        resp
    }

    /// **log**: the response for the outcome, with the request id; the decision, header and
    /// route metrics; the span's route and outcome; and the access log line.
    fn log(self, outcome: Result<Response<ProxyBody>, Rejection>) -> Response<ProxyBody> {
        let app = self.app;
        let series = self.target.map_or(&app.unrouted, |t| &t.metrics);
        let decision = outcome.as_ref().map(drop).map_err(|r| *r);
        let mut resp = match outcome {
            Ok(resp) => resp,
            Err(rejection) => {
                if self.upstream_time.is_some() {
                    series.upstream_failed(rejection);
                }
                rejection.into_response().map(Either::Right)
            }
        };
        let logged = (app.access_log.as_ref()).map(|log| (log, self.request_id.clone()));
        resp.headers_mut()
            .insert(X_REQUEST_ID.clone(), self.request_id);
        if !self.limits.is_empty()
            && (decision.is_err() || app.limiter.settings().headers_when_admitted)
        {
            self.limits.write_headers(resp.headers_mut());
        }

        let status = resp.status().as_u16();
        let took = self.started.elapsed();
        app.metrics.decision(self.mode, decision);
        let removed = self.removed;
        if removed != Removed::default() {
            app.metrics.headers_removed(
                removed.identity,
                removed.underscore,
                removed.method_override,
            );
        }
        series.observe(status, took, self.upstream_time);
        let outcome = decision.err().map_or("allowed", Rejection::code);
        if let Some((log, request_id)) = logged {
            // Queued for the access log's writer thread, which formats and writes it.
            log.push(access_log::Line {
                at: SystemTime::now(),
                request_id,
                route: self
                    .target
                    .map_or(access_log::RouteName::UNROUTED, |t| t.log_name),
                identity: self.identity,
                outcome,
                method: self.method,
                status,
                latency_us: took.as_micros() as u64,
                upstream_us: self.upstream_time.map(|t| t.as_micros() as u64),
            });
        }
        resp
    }
}

/// The body of every proxy response: the upstream's, streamed, or a small synthetic one.
pub type ProxyBody = Either<ResponseBody, Full<Bytes>>;

/// Where a matched route sends its requests, and the route's metric series.
pub struct RouteTarget {
    /// The pooled client (shared by the routes that name the same upstream).
    pub upstream: Arc<Upstream>,
    /// The route's series, resolved at startup.
    pub metrics: RouteMetrics,
    /// The route's name in access log lines.
    pub log_name: access_log::RouteName,
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
    /// The access log, when each request gets a line.
    pub access_log: Option<AccessLog>,
    /// What happens to request headers whose names contain `_`.
    pub underscores: UnderscoreHeaders,
    /// Peers whose forwarding headers are kept.
    pub trusted_proxies: Box<[IpNet]>,
    /// The rate limits' buckets.
    pub limiter: limit::Limiter,
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
