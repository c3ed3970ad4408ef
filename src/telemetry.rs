//! Logging set-up: `tracing` to stderr as text or JSON lines, filtered by `RUST_LOG` when set,
//! else by the configured level.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; a second call is a no-op (tests start many servers).
pub fn init(settings: &LogSettings) {
    // rustls warns once per connection about what a client sent (an IP address as SNI, …):
    // lines any client can make keygate write. Unless the configured filter names rustls, only
    // its errors are logged; failed handshakes are counted in
    // keygate_tls_handshake_failures_total instead. RUST_LOG, when set, is taken as it is.
    let configured = if settings.filter.contains("rustls") {
        settings.filter.clone()
    } else {
        format!("{},rustls=error", settings.filter)
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&configured))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(coloured());
    let _ = if settings.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Whether text lines are coloured: when stderr is a terminal.
pub fn coloured() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// Validated logging settings.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// JSON lines instead of text.
    pub json: bool,
    /// `RUST_LOG`-style filter.
    pub filter: String,
    /// One access log line per request.
    pub access: bool,
    /// Access log lines queued for the writer before further lines are dropped.
    pub access_buffer: usize,
}
