//! The built-in echo upstream of `keygate demo`: answers every request with a small JSON
//! document of what it received (method, path and keygate's identity headers), so a first run
//! shows what an upstream behind keygate sees.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::proxy::IdentitySettings;

/// Starts the echo upstream on `127.0.0.1:0` and returns its address.
pub async fn start_echo(identity: IdentitySettings) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let identity = identity.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let body = echo(&identity, &req);
                    async move { Ok::<_, Infallible>(body) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn echo(ids: &IdentitySettings, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let h = req.headers();
    let get = |name: &http::HeaderName| h.get(name).and_then(|v| v.to_str().ok());
    let body = serde_json::json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "identity": {
            "key_id": get(&ids.key_id),
            "tenant": get(&ids.tenant),
            "role": get(&ids.role),
            "subject": get(&ids.subject),
            "subject_kind": get(&ids.subject_kind),
        },
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
