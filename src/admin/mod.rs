//! The admin listener: liveness and readiness probes, metrics, and the management API under
//! `/v1/` (`api/`: the operation table and dispatch in `mod.rs`, caller authentication in
//! `caller.rs`, one file per resource, the OpenAPI document). Kept apart from the proxy
//! listener so probes and operators never compete with traffic and the management surface is
//! never exposed where clients connect. Its errors are written by the proxy's own helper
//! ([`crate::rejection::error_body`]), so every error of either listener has one shape.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use futures_util::future::join_all;

use std::sync::Arc;

use crate::policy::Roles;
use crate::proxy::{App, Upstream};
use crate::rejection;

mod api;
mod health;

pub(crate) use health::Health;

/// Everything the admin listener needs, built once at startup.
pub(crate) struct Admin {
    /// The request path's state: the verifier, the routes and the metrics.
    pub app: Arc<App>,
    /// Drain and listener state, for `/readyz`.
    pub health: Arc<Health>,
    /// The tenant whose admin keys manage every tenant through the API.
    pub operator_tenant: String,
    /// The roles a key may be given through the API.
    pub roles: Roles,
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Routes an admin request.
pub(crate) async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path().starts_with("/v1/") {
        return api::handle(admin, req).await;
    }
    let app = &*admin.app;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return rejection::method_not_allowed(&[Method::GET.as_str(), Method::HEAD.as_str()]);
    }
    match req.uri().path() {
        "/healthz" => json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
        "/readyz" => readiness(admin).await,
        "/metrics" => {
            app.metrics
                .cache_entries
                .set(app.verifier.cached_entries().await as i64);
            app.metrics
                .file_store_read_only
                .set(i64::from(app.verifier.store().read_only()));
            let mut resp = Response::new(Full::new(Bytes::from(app.metrics.render())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }
        _ => {
            rejection::error_response(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint")
        }
    }
}

/// Ready when not draining, the listeners have neither refused a connection at the cap nor
/// failed an accept in the last few seconds, the store answers, the invalidation subscription
/// is up and the upstream accepts connections (unless `upstream.readiness_check` is off); the
/// body says why not. Liveness (`/healthz`) depends on none of these: only on the process answering.
async fn readiness(admin: &Admin) -> Response<Full<Bytes>> {
    let app = &*admin.app;
    let mut reasons: Vec<String> = Vec::new();
    if admin.health.draining() {
        reasons.push("draining: shutting down".into());
    }
    reasons.extend(admin.health.connection_trouble());
    if let Some(down) = app.verifier.unsubscribed_for() {
        reasons.push(format!(
            "subscription: invalidation subscription down for {:.1}s",
            down.as_secs_f64()
        ));
    }
    let store = app.verifier.store();
    if let Err(err) = store.ping().await {
        reasons.push(format!("store: {err}"));
    }
    let mut warnings = store.warnings();
    warnings.extend(admin.health.warnings());
    // Each distinct upstream once, named by the first route that uses it.
    let mut upstreams: Vec<(&str, &Upstream)> = Vec::new();
    for route in app.routes.iter() {
        let up = &*route.upstream.upstream;
        if !upstreams.iter().any(|(_, u)| std::ptr::eq(*u, up)) {
            upstreams.push((&route.name, up));
        }
    }
    let probes = upstreams.iter().map(|(_, up)| up.probe());
    for ((name, up), result) in upstreams.iter().zip(join_all(probes).await) {
        if let Err(err) = result {
            let reason = format!("upstream {name}: {err}");
            if up.settings().readiness_check {
                reasons.push(reason);
            } else {
                warnings.push(reason);
            }
        }
    }
    let (status, body) = if reasons.is_empty() {
        (
            StatusCode::OK,
            serde_json::json!({ "status": "ready", "warnings": warnings }),
        )
    } else {
        let body =
            serde_json::json!({ "status": "unready", "reasons": reasons, "warnings": warnings });
        (StatusCode::SERVICE_UNAVAILABLE, body)
    };
    json(status, body.to_string())
}
