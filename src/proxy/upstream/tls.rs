//! TLS to an `https://` upstream: the client configuration built once at startup from the
//! route's settings (trust anchors: a CA bundle or the system's store; an optional client
//! certificate), and the upstream's host as the name its certificate must carry and the SNI
//! sent.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use super::Protocol;

/// TLS client settings for one upstream.
#[derive(Clone)]
pub struct UpstreamTls {
    /// Offers the route's protocol by ALPN (`h2` or `http/1.1`).
    main: TlsConnector,
    /// Offers `http/1.1` alone: for HTTP/1.1 on an `h2` route's dedicated connections.
    http1: TlsConnector,
    server_name: ServerName<'static>,
    /// The files the settings came from, to tell upstreams with different TLS apart.
    files: String,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// A client certificate chain and its private key.
pub type ClientCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

impl UpstreamTls {
    /// Settings for an upstream on `host` speaking `protocol`, trusting `roots`, presenting
    /// `client` when asked for a certificate. `files` names where they came from (never their
    /// contents). Errors say what is wrong in words (a host that is no DNS name or IP
    /// address, a key that does not match its certificate).
    pub fn new(
        host: &str,
        protocol: Protocol,
        roots: Arc<RootCertStore>,
        client: Option<ClientCert>,
        files: String,
    ) -> Result<Self, String> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| format!("{host:?} is not a DNS name or IP address TLS can verify"))?;
        let builder = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match client {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the client certificate cannot be used: {e}"))?,
            None => builder.with_no_client_auth(),
        };
        let mut http1 = config.clone();
        http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let http1 = TlsConnector::from(Arc::new(http1));
        let main = match protocol {
            Protocol::Http1 => http1.clone(),
            Protocol::H2 => {
                config.alpn_protocols = vec![b"h2".to_vec()];
                TlsConnector::from(Arc::new(config))
            }
        };
        Ok(UpstreamTls {
            main,
            http1,
            server_name,
            files,
        })
    }

    /// The connector offering `protocol`.
    pub(super) fn connector(&self, protocol: Protocol) -> &TlsConnector {
        match protocol {
            Protocol::H2 => &self.main,
            Protocol::Http1 => &self.http1,
        }
    }

    /// The name the upstream's certificate must carry, sent as SNI (for DNS names).
    pub(super) fn server_name(&self) -> ServerName<'static> {
        self.server_name.clone()
    }

    /// The files these settings came from.
    pub(super) fn files(&self) -> &str {
        &self.files
    }
}
