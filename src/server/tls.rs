//! TLS termination on a listener: the certificates it serves (chosen by SNI), optional client
//! certificates (mTLS), the handshake, and reloading the certificates while serving.
//!
//! - **Versions and ALPN**: TLS 1.2 and 1.3 only (rustls with `ring`); ALPN offers `h2` and
//!   `http/1.1`, and the connection then speaks what the client sends (hyper-util's detection).
//! - **SNI**: each certificate is chosen for its `hosts` (exact names, or `*.example.com` for
//!   one label), by default the DNS names the certificate itself lists. An exact name beats a
//!   wildcard; a client that sends no name, or one no certificate is for, gets the first
//!   certificate (the flag's, or the first in the file).
//! - **Client certificates**: with a CA bundle, a client certificate is verified against it,
//!   `required` (a handshake without one fails) or `optional` (a client may send none; one it
//!   sends must verify). The verified certificate's subject reaches the request path
//!   ([`client_subject`]).
//! - **Reload**: the certificate, key and CA files are watched (their directories, so that a
//!   rename onto a file and Kubernetes' `..data` swap are seen) and reloaded on change and on
//!   SIGHUP. A reload builds a whole new configuration and swaps it in only if every file
//!   loads; otherwise the old one keeps serving, the reason (file and what is wrong, never a
//!   key's contents) is logged and shown under `/readyz` `warnings` until a reload succeeds.
//!   Open connections keep the configuration they were accepted with; new ones get the new.
//! - **Expiry**: every served certificate's `notAfter` is exported at each load
//!   (`keygate_tls_certificate_expiry_seconds`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use http::HeaderValue;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::admin::Health;
use crate::metrics::{ListenerMetrics, Metrics, TlsFailures};
use crate::tls::{self as pem, TlsFileError};

/// One listener's TLS settings, validated (the files are read when the listener starts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The certificates served, the default (for clients without SNI or with an unknown
    /// name) first.
    pub certificates: Vec<CertificateFiles>,
    /// A CA bundle client certificates are verified against; `None`: none are asked for.
    pub client_ca: Option<PathBuf>,
    /// Whether a client must present a certificate (with `client_ca`).
    pub client_auth: ClientAuth,
}

/// One certificate and its key, and the names it is chosen for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Host names (exact, or `*.` and one label) this certificate is chosen for by SNI;
    /// empty: the DNS names in the certificate.
    pub hosts: Vec<String>,
    /// The settings it came from (`server.tls_cert`, `server.tls_certificates[1]`), for errors.
    pub setting: String,
}

/// Whether a listener with a client CA requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A handshake without a verified client certificate fails.
    Required,
    /// A client may present none; one it presents must verify.
    Optional,
}

impl ClientAuth {
    /// Parses `required` or `optional`.
    pub fn parse(v: &str) -> Option<Self> {
        match v {
            "required" => Some(ClientAuth::Required),
            "optional" => Some(ClientAuth::Optional),
            _ => None,
        }
    }
}

/// A loaded configuration that could not be built: the setting at fault and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct TlsError {
    /// The setting whose file is at fault (`server.tls_cert`, …).
    pub setting: String,
    /// What is wrong (naming the file).
    pub problem: String,
}

impl TlsError {
    fn file(setting: &str, e: TlsFileError) -> Self {
        TlsError {
            setting: setting.to_owned(),
            problem: e.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates chosen by SNI

/// A host pattern: an exact name, or `*.` and the rest (one label matched).
#[derive(Debug)]
enum HostPattern {
    Exact(String),
    Wildcard(String),
}

impl HostPattern {
    fn new(host: &str) -> Self {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match host.strip_prefix("*.") {
            Some(rest) => HostPattern::Wildcard(rest.to_owned()),
            None => HostPattern::Exact(host),
        }
    }
}

/// The certificates of a listener, chosen by SNI.
#[derive(Debug)]
struct Certificates {
    default: Arc<CertifiedKey>,
    by_host: Vec<(HostPattern, Arc<CertifiedKey>)>,
}

impl Certificates {
    fn choose(&self, name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = name else {
            return &self.default;
        };
        let name = name.trim_end_matches('.');
        let exact = self.by_host.iter().find(|(p, _)| match p {
            HostPattern::Exact(h) => h.eq_ignore_ascii_case(name),
            HostPattern::Wildcard(_) => false,
        });
        let wildcard = || {
            let (_, parent) = name.split_once('.')?;
            self.by_host.iter().find(|(p, _)| match p {
                HostPattern::Wildcard(rest) => rest.eq_ignore_ascii_case(parent),
                HostPattern::Exact(_) => false,
            })
        };
        exact
            .or_else(wildcard)
            .map_or(&self.default, |(_, key)| key)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.choose(hello.server_name()).clone())
    }
}

/// What a leaf certificate says that keygate uses: its DNS names, its subject, its expiry.
struct Leaf {
    dns_names: Vec<String>,
    subject: String,
    not_after: i64,
}

fn leaf_facts(der: &[u8]) -> Option<Leaf> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let dns_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Some(Leaf {
        dns_names,
        subject: cert.subject().to_string(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// A loaded certificate: what it is called in the metrics, and when it expires.
struct Loaded {
    name: String,
    not_after: i64,
}

/// Builds the listener's rustls configuration from its files.
fn build(
    listener: &'static str,
    settings: &TlsSettings,
) -> Result<(ServerConfig, Vec<Loaded>), TlsError> {
    let (cert_setting, ca_setting) = match listener {
        "admin" => ("server.admin_tls_cert", "server.admin_tls_client_ca"),
        _ => ("server.tls_cert", "server.tls_client_ca"),
    };
    let provider = pem::provider();
    let mut loaded = Vec::with_capacity(settings.certificates.len());
    let mut keys = Vec::with_capacity(settings.certificates.len());
    for files in &settings.certificates {
        let chain =
            pem::load_certificates(&files.cert).map_err(|e| TlsError::file(&files.setting, e))?;
        let key =
            pem::load_private_key(&files.key).map_err(|e| TlsError::file(&files.setting, e))?;
        let leaf = leaf_facts(&chain[0]).ok_or_else(|| TlsError {
            setting: files.setting.clone(),
            problem: format!(
                "{}: the first certificate is not a valid X.509 certificate",
                files.cert.display()
            ),
        })?;
        let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| TlsError {
            setting: files.setting.clone(),
            problem: format!(
                "{} with {}: {}",
                files.cert.display(),
                files.key.display(),
                key_problem(&e)
            ),
        })?;
        let hosts = if files.hosts.is_empty() {
            leaf.dns_names.clone()
        } else {
            files.hosts.clone()
        };
        let name = hosts
            .first()
            .cloned()
            .unwrap_or_else(|| leaf.subject.clone());
        loaded.push(Loaded {
            name,
            not_after: leaf.not_after,
        });
        keys.push((hosts, Arc::new(certified)));
    }
    let default = keys
        .first()
        .map(|(_, k)| k.clone())
        .ok_or_else(|| TlsError {
            setting: cert_setting.into(),
            problem: "no certificate configured".into(),
        })?;
    let by_host = keys
        .into_iter()
        .flat_map(|(hosts, key)| {
            hosts
                .into_iter()
                .map(move |h| (HostPattern::new(&h), key.clone()))
        })
        .collect();
    let resolver = Arc::new(Certificates { default, by_host });

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError {
            setting: cert_setting.into(),
            problem: e.to_string(),
        })?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let setting = ca_setting;
            let roots = pem::load_root_store(ca).map_err(|e| TlsError::file(setting, e))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match settings.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            }
            .build()
            .map_err(|e| TlsError {
                setting: setting.into(),
                problem: format!("{}: {e}", ca.display()),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((config, loaded))
}

/// Why a key does not fit its certificate, in words that quote neither.
fn key_problem(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InconsistentKeys(_) => {
            "the private key does not belong to the certificate".into()
        }
        rustls::Error::General(_) => {
            "the private key is not a supported key (RSA, ECDSA P-256/P-384, Ed25519)".into()
        }
        other => format!("unusable certificate or key ({other})"),
    }
}

// ---------------------------------------------------------------------------------------------
// A listener's TLS, reloadable

/// A listener's TLS: the configuration new connections get, swapped by reloads.
pub struct ListenerTls {
    listener: &'static str,
    settings: TlsSettings,
    /// Read once per handshake (an `Arc` clone under a lock never held across an await).
    current: RwLock<Arc<ServerConfig>>,
    metrics: Arc<Metrics>,
    series: ListenerMetrics,
}

impl ListenerTls {
    /// Loads the listener's certificates (at start: an error stops keygate).
    pub fn load(
        listener: &'static str,
        settings: TlsSettings,
        metrics: Arc<Metrics>,
        series: ListenerMetrics,
    ) -> Result<Arc<Self>, TlsError> {
        pem::install_default_provider();
        let (config, loaded) = build(listener, &settings)?;
        let tls = ListenerTls {
            listener,
            settings,
            current: RwLock::new(Arc::new(config)),
            metrics,
            series,
        };
        tls.export_expiry(&loaded);
        Ok(Arc::new(tls))
    }

    /// The acceptor for a connection accepted now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }

    /// The listener's handshake failure counters.
    pub fn failures(&self) -> &TlsFailures {
        &self.series.tls_failures
    }

    fn export_expiry(&self, loaded: &[Loaded]) {
        let gauge = &self.metrics.tls_certificate_expiry;
        // Drop the series of certificates no longer served by this listener.
        for family in prometheus::core::Collector::collect(gauge) {
            for m in family.get_metric() {
                let labels = m.get_label();
                let of = |n: &str| labels.iter().find(|l| l.name() == n).map(|l| l.value());
                if of("listener") == Some(self.listener) {
                    if let Some(name) = of("name") {
                        let _ = gauge.remove_label_values(&[self.listener, name]);
                    }
                }
            }
        }
        for l in loaded {
            gauge
                .with_label_values(&[self.listener, l.name.as_str()])
                .set(l.not_after);
        }
    }

    /// Loads the files again; swaps the new configuration in only if all of them load.
    fn reload(&self, health: &Health) {
        match build(self.listener, &self.settings) {
            Ok((config, loaded)) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
                self.export_expiry(&loaded);
                self.series.tls_reloaded.inc();
                health.warn(self.warning_source(), None);
                tracing::info!(listener = self.listener, "TLS certificates reloaded");
            }
            Err(e) => {
                self.series.tls_reload_failed.inc();
                tracing::error!(
                    listener = self.listener,
                    error = %e,
                    "TLS certificate reload failed; still serving the previous certificates"
                );
                health.warn(
                    self.warning_source(),
                    Some(format!(
                        "tls ({} listener): reload failed, serving the previous certificates: {e}",
                        self.listener
                    )),
                );
            }
        }
    }

    fn warning_source(&self) -> &'static str {
        match self.listener {
            "admin" => "tls admin",
            _ => "tls proxy",
        }
    }

    /// Every file the configuration is read from.
    fn files(&self) -> Vec<PathBuf> {
        let s = &self.settings;
        s.certificates
            .iter()
            .flat_map(|c| [c.cert.clone(), c.key.clone()])
            .chain(s.client_ca.clone())
            .collect()
    }

    /// Reloads on every change of its files and on SIGHUP, until `stop` turns true (the
    /// listeners close). Needs a tokio runtime.
    pub(crate) fn watch(
        self: Arc<Self>,
        health: Arc<Health>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let files = self.files();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = match watch_files(&files, tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(listener = self.listener, error = %e, "cannot watch the TLS files; reloads only on SIGHUP");
                None
            }
        };
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        tokio::spawn(async move {
            // Dropping the watcher would stop the events.
            let _watcher = watcher;
            loop {
                let hup = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    // `Ok` or `Err`: the server stopped, or is gone.
                    _ = async { stop.wait_for(|s| *s).await.is_ok() } => return,
                    event = rx.recv() => {
                        if event.is_none() {
                            return;
                        }
                        // Writers (and Kubernetes) change a certificate and its key in a few
                        // steps: reload once they are quiet.
                        settle(&mut rx).await;
                    }
                    _ = hup => tracing::info!(listener = self.listener, "SIGHUP: reloading the TLS certificates"),
                }
                // Invariant: the reload reads the files after the event that woke it, so it
                // sees that change; an event during the reload leaves a permit in the
                // channel, which gets a reload of its own.
                let (tls, health) = (self.clone(), health.clone());
                if tokio::task::spawn_blocking(move || tls.reload(&health))
                    .await
                    .is_err()
                {
                    tracing::error!("TLS reload task failed");
                }
            }
        });
    }
}

/// Quiet time after the last file event before reloading.
const QUIET: Duration = Duration::from_millis(100);
/// Longest wait from the first event of a burst.
const MAX_DEBOUNCE: Duration = Duration::from_millis(500);

async fn settle(rx: &mut tokio::sync::mpsc::Receiver<()>) {
    let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return;
        }
        match tokio::time::timeout(QUIET.min(left), rx.recv()).await {
            Ok(Some(())) => continue,
            _ => return,
        }
    }
}

/// The name Kubernetes gives the symlink it swaps to update a mounted Secret.
const K8S_DATA: &str = "..data";

/// Watches the directories of `files` and sends on `tx` for events about one of them (or
/// Kubernetes' `..data` swap in their directory, or lost events).
fn watch_files(
    files: &[PathBuf],
    tx: tokio::sync::mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(ToOwned::to_owned))
        .collect();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let relevant = match ev {
            // A watcher error may hide a change: reload to be sure.
            Err(_) => true,
            Ok(ev) if ev.need_rescan() => true,
            Ok(ev) => {
                !matches!(ev.kind, EventKind::Access(_))
                    && ev.paths.iter().any(|p| {
                        p.file_name()
                            .is_some_and(|n| n == K8S_DATA || names.iter().any(|f| f == n))
                    })
            }
        };
        if relevant {
            // Full: a reload is already due.
            let _ = tx.try_send(());
        }
    })?;
    let mut dirs: Vec<&Path> = files
        .iter()
        .map(|f| {
            f.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}

// ---------------------------------------------------------------------------------------------
// Handshakes

/// Counts a failed handshake under its reason; the reason, for the debug log.
pub fn count_failure(failures: &TlsFailures, err: &io::Error) -> &'static str {
    use rustls::{Error, PeerIncompatible};
    let reason = match err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        // A TLS 1.0 or 1.1 ClientHello carries no `signature_algorithms` (it came with 1.2),
        // and rustls stops there, before it looks at the version: that is the old client's
        // failure.
        Some(Error::PeerIncompatible(
            PeerIncompatible::SignatureAlgorithmsExtensionRequired
            | PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::ServerDoesNotSupportTls12Or13,
        )) => "protocol_version",
        Some(Error::NoCertificatesPresented) => "no_certificate",
        Some(Error::InvalidCertificate(_)) => "bad_certificate",
        _ => "other",
    };
    match reason {
        "protocol_version" => failures.protocol_version.inc(),
        "no_certificate" => failures.no_certificate.inc(),
        "bad_certificate" => failures.bad_certificate.inc(),
        _ => failures.other.inc(),
    }
    reason
}

/// The verified client certificate's subject as a header value: its distinguished name
/// (RFC 4514 style, `CN=client, O=Acme`), or when that is empty its first subject
/// alternative name (`DNS:…`, `URI:…`, `email:…`). Bytes outside visible ASCII are written
/// as `\XX`. `None` when the client sent no certificate.
pub fn client_subject(conn: &rustls::ServerConnection) -> Option<HeaderValue> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let der = conn.peer_certificates()?.first()?;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut text = cert.subject().to_string();
    if cert.subject().iter().next().is_none() {
        text = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .find_map(|n| match n {
                    GeneralName::DNSName(d) => Some(format!("DNS:{d}")),
                    GeneralName::URI(u) => Some(format!("URI:{u}")),
                    GeneralName::RFC822Name(e) => Some(format!("email:{e}")),
                    _ => None,
                })
                .unwrap_or_default(),
            _ => String::new(),
        };
    }
    header_text(&text)
}

/// `text` as a header value: visible ASCII and spaces kept, any other byte as `\XX`;
/// `None` if empty or longer than 1 KiB.
fn header_text(text: &str) -> Option<HeaderValue> {
    use std::fmt::Write;
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b == b' ' || b.is_ascii_graphic() {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\{b:02X}");
        }
    }
    if out.is_empty() || out.len() > 1024 {
        return None;
    }
    HeaderValue::try_from(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_subjects_become_visible_ascii() {
        assert_eq!(
            header_text("CN=client, O=Acme").unwrap(),
            "CN=client, O=Acme"
        );
        assert_eq!(header_text("CN=Zoë\n").unwrap(), "CN=Zo\\C3\\AB\\0A");
        assert!(header_text("").is_none());
        assert!(header_text(&"a".repeat(1025)).is_none());
    }

    #[test]
    fn host_patterns_match_one_label() {
        let w = HostPattern::new("*.Example.com.");
        assert!(matches!(&w, HostPattern::Wildcard(r) if r == "example.com"));
        assert!(
            matches!(HostPattern::new("API.example.com"), HostPattern::Exact(h) if h == "api.example.com")
        );
    }
}
