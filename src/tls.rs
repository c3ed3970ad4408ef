//! TLS building blocks for every part of keygate that speaks TLS (the listeners, and whatever
//! else needs certificates): the one crypto provider of the process (rustls with `ring`), and
//! loading PEM files (a certificate chain, a private key, a CA bundle), each error naming the
//! file and what is wrong with it. Small independent functions, no state of their own.
//!
//! Promise: no error ever quotes a file's contents, so a broken private key is never echoed
//! into a log; files are read with a size bound, so a wrong path (a device, a huge file)
//! cannot exhaust memory.

use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Largest PEM file read: far above any real chain or CA bundle (Mozilla's is about 220 KiB).
pub const MAX_PEM_BYTES: u64 = 4 << 20;

/// A PEM file that could not be used, naming the file and what is wrong (never its contents).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {what}", path.display())]
pub struct TlsFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub what: String,
}

impl TlsFileError {
    fn new(path: &Path, what: impl Into<String>) -> Self {
        TlsFileError {
            path: path.to_owned(),
            what: what.into(),
        }
    }
}

/// Installs rustls's `ring` provider as the process's default, once; a provider already
/// installed (by an earlier call, or by whoever embeds keygate) is kept.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The crypto provider keygate builds its TLS configurations with (`ring`).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a file of at most [`MAX_PEM_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| TlsFileError::new(path, format!("cannot open: {e}")))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| TlsFileError::new(path, format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsFileError::new(
            path,
            format!("larger than {} MiB: not a PEM file", MAX_PEM_BYTES >> 20),
        ));
    }
    Ok(bytes)
}

/// What is wrong with a PEM file, in words that never quote its contents.
fn pem_problem(e: &pem::Error) -> &'static str {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line",
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64",
        pem::Error::SectionTooLarge => "a PEM section is too large",
        _ => "not valid PEM",
    }
}

/// The certificate chain in a PEM file, leaf first (every `CERTIFICATE` section, in order).
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let bytes = read_bounded(path)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFileError::new(path, pem_problem(&e)))?;
    if chain.is_empty() {
        return Err(TlsFileError::new(
            path,
            "no certificate in it (expected a PEM \"BEGIN CERTIFICATE\" section)",
        ));
    }
    Ok(chain)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC: the first key section).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let bytes = read_bounded(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        let what = match e {
            pem::Error::NoItemsFound => {
                "no private key in it (expected a PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\" section)"
            }
            other => pem_problem(&other),
        };
        TlsFileError::new(path, what)
    })
}

/// A CA bundle as a root store: every certificate of the PEM file must be a usable CA
/// certificate, and there must be at least one.
pub fn load_root_store(path: &Path) -> Result<RootCertStore, TlsFileError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in load_certificates(path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            TlsFileError::new(
                path,
                format!("certificate {} is not a usable CA certificate: {e}", i + 1),
            )
        })?;
    }
    Ok(roots)
}

/// A PEM file's bytes, read with the same size bound, for a library that parses PEM itself
/// (check the contents with the loaders above first, for their clearer errors).
pub fn read_pem_file(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    read_bounded(path)
}

/// The platform's trust store (on Linux the files `SSL_CERT_FILE` / `SSL_CERT_DIR` name, else
/// the distribution's bundle), loaded once per process and shared; an error when it holds no
/// usable CA certificate. It reads files: call it at startup, not on the request path.
pub fn system_roots() -> Result<std::sync::Arc<RootCertStore>, String> {
    static ROOTS: std::sync::OnceLock<Result<std::sync::Arc<RootCertStore>, String>> =
        std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _unusable) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_owned(), |e| e.to_string());
                return Err(format!(
                    "the system trust store has no usable CA certificate ({why})"
                ));
            }
            Ok(std::sync::Arc::new(roots))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, contents: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("keygate-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn errors_name_the_file_and_never_quote_it() {
        let secret =
            b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXNlY3JldA=!!\n-----END PRIVATE KEY-----\n";
        let path = temp("broken.key", secret);
        let err = load_private_key(&path).unwrap_err().to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(!err.contains("c2VjcmV0"), "{err}");

        let path = temp("empty.pem", b"nothing here\n");
        let err = load_certificates(&path).unwrap_err().to_string();
        assert!(err.contains("no certificate"), "{err}");
        let err = load_private_key(&path).unwrap_err().to_string();
        assert!(err.contains("no private key"), "{err}");

        let missing = Path::new("/nonexistent/keygate/tls.crt");
        let err = load_certificates(missing).unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/keygate/tls.crt: cannot open"),
            "{err}"
        );
    }
}
