//! TLS on keygate's listeners, from the client's side: a private CA made with rcgen at test
//! time that issues server and client certificates into a temp dir, a real rustls client
//! (any version set, ALPN, SNI, client certificate), and HTTP/1.1 or HTTP/2 over it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A private CA and the files it issued, in its own temp dir.
pub struct Pki {
    pub dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (a client's roots, or keygate's client CA bundle).
    pub ca_pem: PathBuf,
}

/// A certificate and key written to files.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The leaf, to compare with what a server presented.
    pub der: CertificateDer<'static>,
    /// Its `notAfter`, as Unix time.
    pub not_after: i64,
}

impl Pki {
    pub fn new(tag: &str) -> Self {
        let dir = super::temp_dir(tag);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn(&format!("keygate test CA {tag}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_pem = dir.join(format!("{tag}-ca.crt"));
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        Pki { dir, ca, ca_pem }
    }

    /// A server certificate for `names` (DNS names or IP addresses), written as
    /// `<stem>.crt` and `<stem>.key` in the CA's dir.
    pub fn server(&self, stem: &str, names: &[&str]) -> Issued {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = dn(names.first().copied().unwrap_or(stem));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_after = rcgen::date_time_ymd(2031, 1, 1);
        self.issue(stem, params, 1_924_992_000)
    }

    /// A client certificate with subject `CN=<cn>, O=keygate tests`.
    pub fn client(&self, stem: &str, cn: &str) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, cn);
        name.push(DnType::OrganizationName, "keygate tests");
        params.distinguished_name = name;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_after = rcgen::date_time_ymd(2031, 1, 1);
        self.issue(stem, params, 1_924_992_000)
    }

    fn issue(&self, stem: &str, params: CertificateParams, not_after: i64) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{stem}.crt")),
            self.dir.join(format!("{stem}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Issued {
            cert: cert_path,
            key: key_path,
            der: cert.der().clone(),
            not_after,
        }
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, cn);
    name
}

/// Writes `contents` to `path` the way deployment tools do: a temp file renamed onto it.
pub fn replace_file(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// How a test client speaks TLS.
pub struct ClientTls {
    pub roots: Option<PathBuf>,
    pub versions: &'static [&'static SupportedProtocolVersion],
    pub alpn: Vec<Vec<u8>>,
    /// A client certificate to present.
    pub identity: Option<Issued>,
}

impl ClientTls {
    /// TLS 1.2 or 1.3, ALPN `http/1.1`, trusting `roots`' CA.
    pub fn trusting(roots: &Path) -> Self {
        ClientTls {
            roots: Some(roots.to_owned()),
            versions: rustls::ALL_VERSIONS,
            alpn: vec![b"http/1.1".to_vec()],
            identity: None,
        }
    }

    /// Trusting any server certificate (to look at which one a server chose).
    pub fn trusting_anything() -> Self {
        ClientTls {
            roots: None,
            ..ClientTls::trusting(Path::new(""))
        }
    }

    pub fn versions(self, versions: &'static [&'static SupportedProtocolVersion]) -> Self {
        ClientTls { versions, ..self }
    }

    pub fn alpn(self, protocols: &[&[u8]]) -> Self {
        ClientTls {
            alpn: protocols.iter().map(|p| p.to_vec()).collect(),
            ..self
        }
    }

    pub fn identity(self, identity: &Issued) -> Self {
        ClientTls {
            identity: Some(identity.clone()),
            ..self
        }
    }

    pub fn config(&self) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(self.versions)
            .unwrap();
        let builder = match &self.roots {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in keygate::tls::load_certificates(path).unwrap() {
                    roots.add(cert).unwrap();
                }
                builder.with_root_certificates(roots)
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServer(provider))),
        };
        let mut config = match &self.identity {
            Some(id) => builder
                .with_client_auth_cert(
                    keygate::tls::load_certificates(&id.cert).unwrap(),
                    keygate::tls::load_private_key(&id.key).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        Arc::new(config)
    }

    /// Connects and handshakes with `addr`, sending `sni` (`None`: no SNI) within 5 s.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        sni: Option<&str>,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = match sni {
            Some(host) => ServerName::try_from(host.to_owned()).unwrap(),
            // rustls sends no SNI for an IP address.
            None => ServerName::IpAddress(addr.ip().into()),
        };
        let connector = TlsConnector::from(self.config());
        let handshake = async {
            let tcp = TcpStream::connect(addr).await?;
            connector.connect(name, tcp).await
        };
        tokio::time::timeout(Duration::from_secs(5), handshake)
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("no TLS handshake within 5s")))
    }
}

/// Accepts any server certificate, checking only that the handshake is signed by it.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The leaf certificate the server presented on `stream`.
pub fn served_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// What a TLS server answered.
#[derive(Debug)]
pub struct TlsReply {
    pub status: StatusCode,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One HTTP connection over TLS (HTTP/2 if ALPN chose `h2`, else HTTP/1.1, kept alive):
/// every request goes over it, or fails.
pub struct TlsConn {
    sender: Sender,
    pub alpn: Option<Vec<u8>>,
    pub version: rustls::ProtocolVersion,
    pub leaf: CertificateDer<'static>,
}

impl TlsConn {
    /// HTTP over a handshaken stream.
    pub async fn over(stream: TlsStream<TcpStream>) -> Result<Self, String> {
        let conn = stream.get_ref().1;
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let version = conn.protocol_version().unwrap();
        let leaf = served_leaf(&stream);
        let io = TokioIo::new(stream);
        let sender = if alpn.as_deref() == Some(b"h2") {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Sender::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Sender::H1(sender)
        };
        Ok(TlsConn {
            sender,
            alpn,
            version,
            leaf,
        })
    }

    /// Connects, handshakes and sets up HTTP, or says why not.
    pub async fn open(
        tls: &ClientTls,
        addr: SocketAddr,
        sni: Option<&str>,
    ) -> Result<Self, String> {
        let stream = tls.connect(addr, sni).await.map_err(|e| e.to_string())?;
        Self::over(stream).await
    }

    /// A GET of `path` on this connection within 10 s: the response, or why not.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<TlsReply, String> {
        let h2 = matches!(self.sender, Sender::H2(_));
        let mut req = Request::get(if h2 {
            format!("https://keygate.test{path}")
        } else {
            path.to_owned()
        });
        if !h2 {
            req = req.header("host", "keygate.test");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        let exchange = async {
            let resp = match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await.map_err(|e| e.to_string())?;
                    s.send_request(req).await
                }
                Sender::H2(s) => {
                    s.ready().await.map_err(|e| e.to_string())?;
                    s.send_request(req).await
                }
            }
            .map_err(|e| e.to_string())?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok(TlsReply {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .unwrap_or_else(|_| Err("no answer within 10s".into()))
    }
}

/// One GET over a fresh TLS connection.
pub async fn tls_get(
    tls: &ClientTls,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<TlsReply, String> {
    TlsConn::open(tls, addr, Some("localhost"))
        .await?
        .get(path, headers)
        .await
}

/// The first flight of a TLS client (its ClientHello), as bytes to send by hand.
pub fn client_hello() -> Vec<u8> {
    let config = ClientTls::trusting_anything().config();
    let mut conn =
        rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// A private key's PEM body, to check it is never echoed.
pub fn key_material(issued: &Issued) -> String {
    let pem = std::fs::read_to_string(&issued.key).unwrap();
    pem.lines()
        .find(|l| !l.starts_with("-----"))
        .unwrap()
        .to_owned()
}

/// A TLS acceptor for a test server (an upstream) with this certificate and key, offering
/// `alpn`, asking for client certificates from `client_ca` when set.
pub fn server_tls(
    (cert, key): &(PathBuf, PathBuf),
    alpn: &[&[u8]],
    client_ca: Option<&PathBuf>,
) -> tokio_rustls::TlsAcceptor {
    let provider = keygate::tls::provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let roots = Arc::new(keygate::tls::load_root_store(ca).unwrap());
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(
            keygate::tls::load_certificates(cert).unwrap(),
            keygate::tls::load_private_key(key).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}
