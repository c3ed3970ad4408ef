//! Test certificates made at test time (rcgen), and a `redis-server` speaking TLS with them.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::{free_port, temp_dir, RedisServer};

/// A private CA with its files in a temp dir; it signs server and client certificates.
pub struct TestCa {
    pub dir: PathBuf,
    /// The CA certificate, PEM.
    pub cert: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its key, PEM files.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A fresh CA named `name`, its certificate written to `<dir>/<name>-ca.pem`.
    pub fn new(name: &str) -> Self {
        let dir = temp_dir(&format!("pki-{name}"));
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("keygate test CA {name}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        TestCa {
            dir,
            cert: path,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses) usable by a server and a client.
    pub fn leaf(&self, file: &str, names: &[&str]) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or(file));
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let leaf = Leaf {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}-key.pem")),
        };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` with a TLS port as well as its plain one: keygate is pointed at the TLS
/// port, the test's own connections (fixtures, `INFO`) use the plain one.
pub struct TlsRedis {
    pub redis: RedisServer,
    pub tls_port: u16,
}

/// Whether Redis asks clients for a certificate.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    Required,
    None,
}

impl TlsRedis {
    /// Starts Redis with TLS on a free port, its certificate signed by `ca`, trusting `ca` for
    /// client certificates, and with extra `redis-server` arguments (e.g. an ACL `--user`).
    pub fn start(ca: &TestCa, clients: ClientCerts, extra: &[&str]) -> Self {
        let server = ca.leaf("redis-server", &["127.0.0.1", "localhost"]);
        let path = |p: &Path| p.to_str().unwrap().to_owned();
        let mut why = String::new();
        for _ in 0..5 {
            let (port, tls_port) = (free_port(), free_port());
            let mut args: Vec<String> = vec![
                "--tls-port".into(),
                tls_port.to_string(),
                "--tls-cert-file".into(),
                path(&server.cert),
                "--tls-key-file".into(),
                path(&server.key),
                "--tls-ca-cert-file".into(),
                path(&ca.cert),
                "--tls-auth-clients".into(),
                if clients == ClientCerts::Required {
                    "yes"
                } else {
                    "no"
                }
                .into(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut redis = RedisServer {
                port,
                dir: temp_dir("redis-tls"),
                child: None,
            };
            match redis.spawn(&args) {
                Ok(()) => return TlsRedis { redis, tls_port },
                Err(e) => why = format!("ports {port}/{tls_port}: {e}"),
            }
        }
        panic!("redis-server with TLS did not start: {why}");
    }

    /// `rediss://[userinfo@]127.0.0.1:<tls port>`.
    pub fn url(&self, userinfo: &str) -> String {
        format!("rediss://{userinfo}127.0.0.1:{}", self.tls_port)
    }
}
