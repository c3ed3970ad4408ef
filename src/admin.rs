//! The admin listener: liveness and readiness probes, metrics, and the management API under
//! `/v1/` ([`crate::api`]). Kept apart from the proxy listener so probes and operators never compete with traffic
//! and the management surface is never exposed where clients connect.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::server::App;

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Routes an admin request.
pub async fn handle(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path().starts_with("/v1/") {
        return crate::api::handle(app, req).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method_not_allowed","message":"use GET"}"#.into(),
        );
    }
    match req.uri().path() {
        "/healthz" => json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
        "/readyz" => readiness(app).await,
        "/metrics" => {
            let mut resp = Response::new(Full::new(Bytes::from(app.metrics.render())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }
        _ => json(
            StatusCode::NOT_FOUND,
            r#"{"error":"not_found","message":"no such admin endpoint"}"#.into(),
        ),
    }
}

/// Ready when not draining and the store answers; the body says why not.
async fn readiness(app: &App) -> Response<Full<Bytes>> {
    let mut reasons: Vec<String> = Vec::new();
    if app.state.draining() {
        reasons.push("draining: shutting down".into());
    }
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
    let warnings = store.warnings();
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
