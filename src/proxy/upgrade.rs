//! Upgraded connections: a WebSocket opened with HTTP/1.1 `Upgrade: websocket`, or with
//! HTTP/2 extended CONNECT (RFC 8441, `:protocol websocket`), is decided like the `GET` it
//! stands for (route, key, policy), then forwarded to the route's upstream on a connection of
//! its own (TCP, or TLS for an `https://` upstream; never the pool's: it becomes the tunnel)
//! as an HTTP/1.1 upgrade, and, once both sides have switched, spliced both ways until one
//! side closes it or keygate does.
//!
//! keygate closes the connection when the key that opened it stops working: revoked (a
//! service account's removal revokes its keys), expired (a timer per connection, at the
//! key's expiry), or no longer vouched for by the store after a change or a whole-cache flush
//! (re-checked there; a store that cannot answer closes it, fail closed). The registry that
//! makes this happen is `verify/live.rs`. An open route (no key) opens connections nothing
//! closes but their ends.

use std::future::pending;

use http::header::HeaderName;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::headers::HeaderScan;
use super::hop::{asks_for_websocket, set_upgrade, strip_hop_by_hop, WEBSOCKET};
use super::upstream::{ConnectError, Upstream};
use crate::auth;
use crate::key::KeyDigest;
use crate::metrics::{UpgradeClose, UpgradeMetrics};
use crate::rejection::Rejection;
use crate::store::now_unix;
use crate::verify::live::Held;
use crate::verify::Verifier;

static SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
static SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");

/// An upgrade a request asks for, and how its client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Upgrade {
    /// HTTP/1.1 `Upgrade: websocket`: the client gets the upstream's `101`.
    Http1,
    /// HTTP/2 extended CONNECT with `:protocol websocket`: the client gets `200` on its
    /// stream, which becomes the tunnel.
    Http2,
}

/// Whether `req` asks for an upgrade keygate passes through. An extended CONNECT becomes
/// the `GET` it stands for (RFC 8441 §5), so that routes and roles decide on that method; one
/// for another protocol is refused (`400`). Costs ordinary requests one bit test and one
/// method comparison.
pub(super) fn requested(
    req: &mut Request<Incoming>,
    scan: &HeaderScan,
) -> Result<Option<Upgrade>, Rejection> {
    if scan.upgrade()
        && req.version() == Version::HTTP_11
        && req.method() == Method::GET
        && asks_for_websocket(req.headers())
    {
        return Ok(Some(Upgrade::Http1));
    }
    if req.method() == Method::CONNECT && req.version() == Version::HTTP_2 {
        let Some(protocol) = req.extensions().get::<hyper::ext::Protocol>() else {
            // A plain CONNECT (a TCP tunnel to an authority) is no upgrade: it goes on as
            // before.
            return Ok(None);
        };
        if !protocol
            .as_str()
            .eq_ignore_ascii_case(WEBSOCKET.to_str().unwrap_or_default())
        {
            return Err(Rejection::InvalidRequest);
        }
        *req.method_mut() = Method::GET;
        return Ok(Some(Upgrade::Http2));
    }
    Ok(None)
}

/// What the server puts in an upgrade request (HTTP/1.1 `Upgrade`, HTTP/2 CONNECT) to keep
/// its client connection busy while it lives: the tunnel keeps it to its end, so no idle
/// deadline cuts an HTTP/2 connection whose tunnel is open, and an upgraded HTTP/1.1
/// connection keeps its place under the listener's cap.
#[derive(Clone)]
pub struct ConnectionHold {
    _busy: std::sync::Arc<dyn Send + Sync>,
}

impl ConnectionHold {
    /// Wraps what keeps the connection busy until it is dropped.
    pub fn new(busy: impl Send + Sync + 'static) -> Self {
        ConnectionHold {
            _busy: std::sync::Arc::new(busy),
        }
    }
}

/// The refusal for a key keygate closed the connection for while it was switching.
fn refusal(reason: UpgradeClose) -> Rejection {
    match reason {
        UpgradeClose::Expired => Rejection::KeyExpired,
        UpgradeClose::Unknown => Rejection::UnknownKey,
        UpgradeClose::StoreUnavailable => Rejection::StoreUnavailable,
        _ => Rejection::KeyRevoked,
    }
}

/// Forwards an upgrade (the head already rewritten for the upstream) and, when the upstream
/// switches, starts the tunnel; answers with the head the client gets (`101` or, over HTTP/2,
/// `200`), or the upstream's own answer when it does not switch, or the refusal.
///
/// `key` is the digest of the key the request was verified with (`None` on an open route).
pub(super) async fn forward(
    verifier: &Verifier,
    metrics: &UpgradeMetrics,
    upstream: &Upstream,
    mut req: Request<Incoming>,
    upgrade: Upgrade,
    key: Option<KeyDigest>,
) -> Result<Response<Incoming>, Rejection> {
    // Registered first, then checked again (a cache hit): a revocation processed before the
    // registration is seen by this check, one processed after it finds the connection in
    // the registry (the invariant is written at `Verifier::revoked`).
    let held = match key {
        Some(digest) => {
            let held = verifier.hold(digest);
            let identity = auth::verify(verifier, digest, now_unix()).await?;
            held.set_expiry(identity.expires_at());
            Some(held)
        }
        None => None,
    };
    let settings = upstream.settings();
    let client = hyper::upgrade::on(&mut req);
    let busy = req.extensions_mut().remove::<ConnectionHold>();
    *req.uri_mut() = upstream
        .target(req.uri().path_and_query())
        .map(Uri::from)
        .map_err(|_| Rejection::UpstreamUnavailable)?;
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    set_upgrade(headers, &WEBSOCKET);
    if upgrade == Upgrade::Http2 && !headers.contains_key(&SEC_WEBSOCKET_KEY) {
        // An HTTP/2 client sends no key (RFC 8441 §5): the HTTP/1.1 upstream needs one.
        headers.insert(SEC_WEBSOCKET_KEY.clone(), websocket_key());
    }

    let exchange = async {
        // A dedicated connection (TCP, or TLS for an `https://` upstream), never pooled.
        let io = upstream.connect_io().await.map_err(|e| {
            let upstream = &settings.authority;
            match e {
                ConnectError::Tls(reason) => {
                    tracing::warn!(%upstream, kind = "upstream_tls", %reason, "upstream TLS failed for an upgrade");
                    Rejection::UpstreamTls
                }
                ConnectError::Tcp(_) => {
                    tracing::warn!(%upstream, error = %e, "cannot connect to the upstream for an upgrade");
                    Rejection::UpstreamUnavailable
                }
            }
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "upgrade handshake with the upstream failed");
                Rejection::UpstreamUnavailable
            })?;
        tokio::spawn(async move {
            if let Err(err) = conn.with_upgrades().await {
                tracing::debug!(error = %err, "upstream upgrade connection ended with an error");
            }
        });
        sender.send_request(req).await.map_err(|e| {
            tracing::warn!(error = %e, "upstream upgrade request failed");
            Rejection::UpstreamUnavailable
        })
    };
    let mut resp = match tokio::time::timeout(settings.timeout, exchange).await {
        Ok(resp) => resp?,
        Err(_) => {
            tracing::warn!(timeout = ?settings.timeout, "upstream did not answer an upgrade in time");
            return Err(Rejection::UpstreamTimeout);
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        if upgrade == Upgrade::Http2 && resp.status().is_success() {
            // A success would tell an HTTP/2 client its stream is a tunnel: it is not.
            tracing::warn!(status = %resp.status(), "the upstream answered a WebSocket upgrade without switching");
            return Err(Rejection::UpstreamUnavailable);
        }
        // The upstream did not switch: its answer is an ordinary one.
        strip_hop_by_hop(resp.headers_mut());
        return Ok(resp);
    }
    let upstream_io = hyper::upgrade::on(&mut resp);
    strip_hop_by_hop(resp.headers_mut());
    match upgrade {
        Upgrade::Http1 => set_upgrade(resp.headers_mut(), &WEBSOCKET),
        Upgrade::Http2 => {
            *resp.status_mut() = StatusCode::OK;
            resp.headers_mut().remove(&SEC_WEBSOCKET_ACCEPT);
        }
    }
    if let Some(reason) = held.as_ref().and_then(Held::closed) {
        // Closed while switching: the client never gets the switch.
        return Err(refusal(reason));
    }
    tokio::spawn(tunnel(client, upstream_io, held, busy, metrics.clone()));
    Ok(resp)
}

/// One upgraded connection's life: both sides switch, then bytes flow both ways until a side
/// closes it or keygate does; counted once by why it ended.
async fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    held: Option<Held>,
    busy: Option<ConnectionHold>,
    metrics: UpgradeMetrics,
) {
    let closed_by_keygate = async {
        match &held {
            Some(held) => held.ended().await,
            None => pending().await,
        }
    };
    let spliced = async {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "an upgrade did not complete");
                return UpgradeClose::Aborted;
            }
        };
        let _live = Live::new(&metrics.live);
        splice(client, upstream).await
    };
    let reason = tokio::select! {
        // Ahead of the bytes, so a revoked key's connection carries nothing more once it is
        // known.
        biased;
        reason = closed_by_keygate => reason,
        reason = spliced => reason,
    };
    // Dropping both ends (as leaving the select did) closes them: the client's connection
    // (HTTP/1.1) or stream (HTTP/2, reset), and the upstream's connection.
    metrics.closed(reason);
    drop(busy);
    tracing::debug!(reason = reason.label(), "upgraded connection ended");
}

/// One in `keygate_upgraded_connections` while it lives.
struct Live(IntGauge);

impl Live {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Live(gauge.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Copies both ways until both directions are done (a side's end of stream is passed on as a
/// half close) or one fails; says which side ended first.
async fn splice(client: Upgraded, upstream: Upgraded) -> UpgradeClose {
    let (mut client_r, mut client_w) = tokio::io::split(TokioIo::new(client));
    let (mut upstream_r, mut upstream_w) = tokio::io::split(TokioIo::new(upstream));
    let mut up = std::pin::pin!(one_way(&mut client_r, &mut upstream_w));
    let mut down = std::pin::pin!(one_way(&mut upstream_r, &mut client_w));
    let (first, ok, rest) = tokio::select! {
        ok = &mut up => (UpgradeClose::Client, ok, down.as_mut()),
        ok = &mut down => (UpgradeClose::Upstream, ok, up.as_mut()),
    };
    if ok {
        // The other direction may still carry bytes (a close frame, the last answer).
        rest.await;
    }
    first
}

/// Copies `from` into `to` until `from` ends (then half-closes `to`); whether it ended
/// cleanly.
async fn one_way<R, W>(from: &mut R, to: &mut W) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match tokio::io::copy(from, to).await {
        Ok(_) => to.shutdown().await.is_ok(),
        Err(_) => false,
    }
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64 (RFC 6455 §4.1).
fn websocket_key() -> HeaderValue {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: [u8; 16] = rand::random();
    let mut out = Vec::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]);
            } else {
                out.push(b'=');
            }
        }
    }
    HeaderValue::from_bytes(&out).expect("base64 is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_websocket_key_is_16_bytes_in_base64() {
        let a = websocket_key();
        let b = websocket_key();
        assert_ne!(a, b);
        let s = a.to_str().unwrap();
        assert_eq!(s.len(), 24);
        assert!(s.ends_with("=="));
        assert!(s[..22]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/'));
    }
}
