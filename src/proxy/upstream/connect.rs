//! Dialling an upstream: a TCP connection (DNS off the event loop, a connect timeout, no
//! Nagle), then for `https://` a TLS handshake with the upstream's host as SNI and the
//! protocol offered by ALPN, within the same timeout. What comes out is an [`UpstreamIo`],
//! the byte stream both HTTP versions run over, and that upgraded requests splice.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::PathAndQuery;
use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{Protocol, Upstream, UpstreamSettings, UpstreamTls};

/// Why no connection to the upstream could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No TCP connection (refused, unreachable, DNS, timeout).
    #[error("cannot connect: {0}")]
    Tcp(String),
    /// The TLS handshake failed: the upstream's certificate did not verify, it refused
    /// keygate's, or it would not speak the protocol offered. The reason names no key material.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
}

/// A connection to an upstream: TCP, or TLS over TCP.
pub enum UpstreamIo {
    /// `http://`.
    Tcp(TcpStream),
    /// `https://` (boxed: a TLS session is large and the cleartext case should not pay for it).
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Tcp(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// Dials one upstream.
pub(super) struct Connector {
    tcp: HttpConnector,
    /// What the TCP connector dials: the upstream's scheme and authority.
    dial: Uri,
    tls: Option<UpstreamTls>,
    timeout: Duration,
}

impl Connector {
    pub(super) fn new(settings: &UpstreamSettings) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(settings.connect_timeout));
        tcp.set_nodelay(true);
        tcp.set_keepalive(Some(Duration::from_secs(60)));
        // `https://` is dialled as TCP here; TLS is layered on below.
        tcp.enforce_http(false);
        let mut dial = http::uri::Parts::default();
        dial.scheme = Some(settings.scheme.clone());
        dial.authority = Some(settings.authority.clone());
        dial.path_and_query = Some(PathAndQuery::from_static("/"));
        Connector {
            tcp,
            dial: Uri::from_parts(dial).expect("a scheme and an authority make a URI"),
            tls: settings.tls.clone(),
            timeout: settings.connect_timeout,
        }
    }

    /// A new connection ready for `protocol`: over TLS, ALPN agreed on it.
    pub(super) async fn connect(&self, protocol: Protocol) -> Result<UpstreamIo, ConnectError> {
        let tcp = tower_service::Service::call(&mut self.tcp.clone(), self.dial.clone())
            .await
            .map_err(|e| ConnectError::Tcp(e.to_string()))?
            .into_inner();
        let Some(tls) = &self.tls else {
            return Ok(UpstreamIo::Tcp(tcp));
        };
        let handshake = tls.connector(protocol).connect(tls.server_name(), tcp);
        let stream = match tokio::time::timeout(self.timeout, handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(ConnectError::Tls(handshake_failure(&e))),
            Err(_) => {
                return Err(ConnectError::Tls(format!(
                    "no TLS handshake within {:?}",
                    self.timeout
                )))
            }
        };
        // HTTP/2 over TLS is what ALPN agreed on, never assumed (RFC 9113 §3.2).
        if protocol == Protocol::H2 && stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ConnectError::Tls(
                "the upstream did not agree to HTTP/2 by ALPN (h2); set its protocol to http1"
                    .into(),
            ));
        }
        Ok(UpstreamIo::Tls(Box::new(stream)))
    }
}

/// Why a handshake failed, in words: rustls's reason (a certificate for another name, an
/// unknown issuer, an expired certificate, a refused client certificate), else the IO error.
fn handshake_failure(e: &io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => tls.to_string(),
        None => e.to_string(),
    }
}

/// The TLS error under an exchange's failure, if TLS is what failed (an alert from the
/// upstream, a record that does not decrypt), in words.
pub(super) fn tls_cause(err: &hyper::Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(tls) = e
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls.to_string());
        }
        cause = e.source();
    }
    None
}

impl Upstream {
    /// A new connection to this upstream, outside the pools, for a request that leaves HTTP
    /// behind (an upgrade: WebSocket, CONNECT): TCP, or TLS for `https://` (verified, with SNI
    /// and the client certificate, offering HTTP/1.1 by ALPN), within the connect timeout. The
    /// caller owns the stream: it is counted in the opened connections but never pooled.
    pub async fn connect_io(&self) -> Result<UpstreamIo, ConnectError> {
        let io = self.connector.connect(Protocol::Http1).await?;
        self.metrics.opened.inc();
        Ok(io)
    }
}
