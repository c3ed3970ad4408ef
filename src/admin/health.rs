//! What readiness knows beyond the store and the upstreams: whether shutdown has begun,
//! whether the listeners could take new connections lately, and standing warnings (a TLS
//! certificate that failed to reload). The server reports into it; the `/readyz` probe reads
//! it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a refused connection or a failed accept keeps `/readyz` unready.
const CONNECTION_TROUBLE_WINDOW: Duration = Duration::from_secs(5);

/// The listeners' state, as `/readyz` reports it.
pub(crate) struct Health {
    draining: AtomicBool,
    started: Instant,
    /// When the proxy listener last refused a connection at its cap: milliseconds after
    /// `started`, plus one (0: never).
    refused_at: AtomicU64,
    /// Connections open, and the cap, at the last refusal.
    refused_open: AtomicUsize,
    refused_max: AtomicUsize,
    /// The last failed accept on either listener, and when.
    accept_failure: Mutex<Option<(Instant, String)>>,
    /// Standing warnings by source (e.g. `tls proxy`), until their source clears them.
    warnings: Mutex<BTreeMap<&'static str, String>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            draining: AtomicBool::new(false),
            started: Instant::now(),
            refused_at: AtomicU64::new(0),
            refused_open: AtomicUsize::new(0),
            refused_max: AtomicUsize::new(0),
            accept_failure: Mutex::new(None),
            warnings: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Health {
    /// Whether shutdown has begun.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Shutdown has begun: readiness goes false for good.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// The proxy listener refused a connection at its cap (`open` of `max` were open). Cheap:
    /// it runs once per refused connection, which a flood makes many.
    pub fn refused(&self, open: usize, max: usize) {
        let ms = self.started.elapsed().as_millis() as u64 + 1;
        self.refused_open.store(open, Ordering::Relaxed);
        self.refused_max.store(max, Ordering::Relaxed);
        self.refused_at.store(ms, Ordering::Relaxed);
    }

    /// Accepting a connection failed (out of descriptors, most likely).
    pub fn accept_failed(&self, err: &std::io::Error) {
        let mut last = self
            .accept_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *last = Some((Instant::now(), err.to_string()));
    }

    /// Sets (`Some`) or clears (`None`) the standing warning of `source`, shown under
    /// `/readyz` `warnings` until cleared. A warning does not make the instance unready.
    pub fn warn(&self, source: &'static str, warning: Option<String>) {
        let mut warnings = self.warnings.lock().unwrap_or_else(PoisonError::into_inner);
        match warning {
            Some(w) => warnings.insert(source, w),
            None => warnings.remove(source),
        };
    }

    /// The standing warnings, in the order of their sources' names.
    pub fn warnings(&self) -> Vec<String> {
        let warnings = self.warnings.lock().unwrap_or_else(PoisonError::into_inner);
        warnings.values().cloned().collect()
    }

    /// Why the listeners cannot take new connections now, for `/readyz`: connections refused
    /// at the cap, or accepts failing, within the last [`CONNECTION_TROUBLE_WINDOW`].
    pub fn connection_trouble(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        let refused = self.refused_at.load(Ordering::Relaxed);
        if refused > 0 {
            let ago = self
                .started
                .elapsed()
                .saturating_sub(Duration::from_millis(refused - 1));
            if ago < CONNECTION_TROUBLE_WINDOW {
                reasons.push(format!(
                    "connections: the proxy listener refused a connection {:.1}s ago ({} open, server.max_connections = {})",
                    ago.as_secs_f64(),
                    self.refused_open.load(Ordering::Relaxed),
                    self.refused_max.load(Ordering::Relaxed),
                ));
            }
        }
        let last = self
            .accept_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((at, err)) = &*last {
            let ago = at.elapsed();
            if ago < CONNECTION_TROUBLE_WINDOW {
                reasons.push(format!(
                    "accept: accepting a connection failed {:.1}s ago: {err}",
                    ago.as_secs_f64()
                ));
            }
        }
        reasons
    }
}
