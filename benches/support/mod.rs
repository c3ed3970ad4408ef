//! Pieces shared by the benchmarks.
#![allow(dead_code)]

use std::convert::Infallible;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;
use keygate::key::KeyDigest;
use keygate::store::{KeyRecord, Store, StoreError};
use tokio::net::TcpListener;

/// What the fast upstreams answer: the body a proxy in front of them must pass on.
pub const UPSTREAM_BODY: &str = "ok";

/// The fast upstream: answers every request `200 ok` over HTTP/1.1 keep-alive, forever.
pub async fn serve_fast_upstream(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|_req| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                    UPSTREAM_BODY.as_bytes(),
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A read-only store whose records come from a function, so a benchmark's cache fills without
/// a real store (and without the store holding the records).
pub struct FnStore<F>(pub F);

#[async_trait]
impl<F> Store for FnStore<F>
where
    F: Fn(&KeyDigest) -> Option<KeyRecord> + Send + Sync + 'static,
{
    async fn lookup(&self, d: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        Ok((self.0)(d))
    }
    async fn insert(&self, _: &KeyRecord) -> Result<(), StoreError> {
        Ok(())
    }
    async fn get(&self, _: &str) -> Result<Option<KeyRecord>, StoreError> {
        Ok(None)
    }
    async fn list(&self, _: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        Ok(Vec::new())
    }
    async fn revoke(&self, _: &str, _: u64) -> Result<Option<KeyRecord>, StoreError> {
        Ok(None)
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
