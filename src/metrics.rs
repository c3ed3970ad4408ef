//! Prometheus metrics: one registry per process (no hidden globals), with every labelled
//! series resolved to a handle at startup so the request path never looks a metric up by name.
//! Label values are bounded sets (outcomes, route names from the config, status classes, a few
//! fixed kinds), never keys, key ids or tenants.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::rejection::Rejection;

/// Every `outcome` label value of `keygate_auth_decisions_total`.
pub const OUTCOMES: [&str; 17] = [
    "allowed",
    "missing_credentials",
    "invalid_request",
    "invalid_key",
    "key_expired",
    "key_revoked",
    "insufficient_scope",
    "store_unavailable",
    "upstream_unavailable",
    "upstream_timeout",
    "invalid_path",
    "no_route",
    "invalid_body",
    "invalid_header",
    "invalid_host",
    "invalid_original_request",
    "rate_limited",
];

/// The `status_class` label values, indexed by the status code's first digit minus one.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// keygate's own time per request: from the request head to the response head, less the wait
/// for the upstream. Sub-millisecond on the cached path, so the buckets start at 25 µs.
const PROCESSING_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0,
];

/// Upstream time to response head, and store lookups.
const IO_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// The series of one route.
#[derive(Clone)]
pub struct RouteMetrics {
    processing: [Histogram; 5],
    upstream: [Histogram; 5],
    upstream_unavailable: IntCounter,
    upstream_timeout: IntCounter,
    upstream_tls: IntCounter,
}

impl RouteMetrics {
    /// Records one answered request: its status, keygate's own time, and the upstream's time
    /// to response head when the request was forwarded.
    pub fn observe(&self, status: u16, total: Duration, upstream: Option<Duration>) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        let upstream_time = upstream.unwrap_or_default();
        self.processing[class].observe(total.saturating_sub(upstream_time).as_secs_f64());
        if upstream.is_some() {
            self.upstream[class].observe(upstream_time.as_secs_f64());
        }
    }

    /// Counts a failed upstream call.
    pub fn upstream_failed(&self, rejection: Rejection) {
        match rejection {
            Rejection::UpstreamTimeout => self.upstream_timeout.inc(),
            Rejection::UpstreamUnavailable => self.upstream_unavailable.inc(),
            Rejection::UpstreamTls => self.upstream_tls.inc(),
            _ => {}
        }
    }
}

/// One upstream's connection-pool series.
#[derive(Clone)]
pub struct PoolMetrics {
    /// Connections opened.
    pub opened: IntCounter,
    /// Requests resent because their pooled connection closed under them.
    pub retried: IntCounter,
}

/// One listener's connection series.
#[derive(Clone)]
pub struct ListenerMetrics {
    /// Open connections.
    pub open: IntGauge,
    /// Connections refused at the listener's cap.
    pub refused: IntCounter,
    /// Failed accepts (e.g. out of file descriptors).
    pub accept_errors: IntCounter,
    /// Connections closed for sending no complete request head in time.
    pub timed_out_head: IntCounter,
    /// Connections closed for being idle too long.
    pub timed_out_idle: IntCounter,
    /// Failed TLS handshakes, by reason.
    pub tls_failures: TlsFailures,
    /// Certificate reloads that took effect.
    pub tls_reloaded: IntCounter,
    /// Certificate reloads refused (the old certificates kept serving).
    pub tls_reload_failed: IntCounter,
}

/// One listener's failed TLS handshakes, by reason (`keygate_tls_handshake_failures_total`).
#[derive(Clone)]
pub struct TlsFailures {
    /// The client offered no protocol version keygate speaks (TLS 1.2 and 1.3 only).
    pub protocol_version: IntCounter,
    /// Client certificates are required and the client sent none.
    pub no_certificate: IntCounter,
    /// The client's certificate did not verify (unknown issuer, expired, wrong use, …).
    pub bad_certificate: IntCounter,
    /// Anything else: not TLS at all, no common cipher suite, an alert from the client, a
    /// reset mid-handshake.
    pub other: IntCounter,
}

/// The `reason` label values of `keygate_tls_handshake_failures_total`.
pub const TLS_FAILURE_REASONS: [&str; 4] = [
    "protocol_version",
    "no_certificate",
    "bad_certificate",
    "other",
];

/// Which listener decided a request: the proxy, which forwards it, or the decision endpoint,
/// which answers a gateway (the `mode` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The proxy listener.
    Proxy = 0,
    /// The decision endpoint (`server.authz_listen`).
    Authz = 1,
}

impl Mode {
    /// The `mode` label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Proxy => "proxy",
            Mode::Authz => "authz",
        }
    }
}

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    /// By [`Mode`], then by the index of the outcome in [`OUTCOMES`].
    decisions: [Vec<IntCounter>; 2],
    /// `keygate_rate_limit_checks_total`, by source (role, route), scope (key, tenant) and
    /// outcome (allowed, limited), in that index order.
    rate_limit_checks: [IntCounter; 8],
    processing: HistogramVec,
    upstream: HistogramVec,
    upstream_errors: IntCounterVec,
    upstream_connections: IntCounterVec,
    upstream_retries: IntCounterVec,
    /// Verdicts answered from the cache.
    pub cache_hits: IntCounter,
    /// Cache hits whose verdict was "no such key".
    pub cache_negative_hits: IntCounter,
    /// Verdicts not in the cache (a store lookup, or a wait for a concurrent one).
    pub cache_misses: IntCounter,
    /// Cached verdicts, set at each scrape.
    pub cache_entries: IntGauge,
    /// Verdicts evicted for lack of room.
    pub cache_evictions_size: IntCounter,
    /// Verdicts that reached the end of their life.
    pub cache_evictions_expired: IntCounter,
    /// Store lookups by digest.
    pub store_lookups: IntCounter,
    /// Store lookups that failed.
    pub store_errors: IntCounter,
    /// Store lookup latency.
    pub store_latency: Histogram,
    /// 1 while the invalidation subscription is up.
    pub subscription_up: IntGauge,
    /// Invalidation messages received.
    pub invalidations: IntCounter,
    /// Whole-cache flushes (on every (re)subscribe).
    pub cache_flushes: IntCounter,
    /// Requests checked against the store because the subscription was down too long.
    pub unsynced_lookups: IntCounter,
    /// Cached verdicts discarded because an invalidation raced their fill.
    pub stale_fills: IntCounter,
    /// The proxy listener's connections.
    pub proxy_listener: ListenerMetrics,
    /// The decision endpoint's connections (`server.authz_listen`).
    pub authz_listener: ListenerMetrics,
    /// The admin listener's connections.
    pub admin_listener: ListenerMetrics,
    /// Requests the client gave up on before keygate answered (closed the connection, reset
    /// the stream).
    pub requests_abandoned: IntCounter,
    /// Client headers in the identity namespace (in any spelling) removed before forwarding.
    pub removed_identity: IntCounter,
    /// Other client headers with `_` in their names removed before forwarding.
    pub removed_underscore: IntCounter,
    /// Method-override headers removed before forwarding.
    pub removed_method_override: IntCounter,
    /// Last-used notes dropped because the flusher's queue was full.
    pub last_used_dropped: IntCounter,
    /// Batches of last-used times the store failed to record.
    pub last_used_errors: IntCounter,
    /// 1 while the keys file is read-only (last-used times in memory only), set at each scrape.
    pub file_store_read_only: IntGauge,
    /// Access log lines dropped because the writer's queue was full.
    pub access_log_dropped: IntCounter,
    /// Unix time of each served certificate's `notAfter`, by listener and name (set at every
    /// load of the listener's certificates).
    pub tls_certificate_expiry: IntGaugeVec,
    /// Upgraded connections (WebSocket and the like).
    pub upgrades: UpgradeMetrics,
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

fn histogram_vec(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric")
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let decisions_vec = IntCounterVec::new(
            Opts::new(
                "keygate_auth_decisions_total",
                "Requests decided, by mode (proxy: forwarded by keygate; authz: answered for a gateway by the decision endpoint) and outcome (allowed or the error code).",
            ),
            &["mode", "outcome"],
        )
        .expect("valid metric");
        let processing = histogram_vec(
            "keygate_processing_duration_seconds",
            "keygate's own time per request (authentication, policy, rewriting; the upstream's time excluded), by route and response status class.",
            PROCESSING_BUCKETS,
            &["route", "status_class"],
        );
        let upstream = histogram_vec(
            "keygate_upstream_duration_seconds",
            "Time from forwarding a request to the upstream's response head, by route and status class.",
            IO_BUCKETS,
            &["route", "status_class"],
        );
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "keygate_upstream_errors_total",
                "Upstream calls that failed, by route and kind (unavailable: refused or reset, answered 502; timeout: answered 504; upstream_tls: the TLS handshake with an https:// upstream failed, answered 502).",
            ),
            &["route", "kind"],
        )
        .expect("valid metric");
        let upstream_connections = IntCounterVec::new(
            Opts::new(
                "keygate_upstream_connections_opened_total",
                "Connections opened to an upstream, by upstream (a steady rise under steady load means connections are not being reused).",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let upstream_retries = IntCounterVec::new(
            Opts::new(
                "keygate_upstream_retries_total",
                "Requests resent on another connection because the pooled one they were given closed under them (before they were written, or, for idempotent requests without a body, before the answer), by upstream.",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let evictions = IntCounterVec::new(
            Opts::new(
                "keygate_cache_evictions_total",
                "Cached verdicts evicted, by cause (size: no room; expired: end of life).",
            ),
            &["cause"],
        )
        .expect("valid metric");
        let store_latency = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_store_lookup_duration_seconds",
                "Latency of key lookups in the store (errors included).",
            )
            .buckets(IO_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let connections = IntGaugeVec::new(
            Opts::new(
                "keygate_open_connections",
                "Open client connections, by listener.",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let refused = IntCounterVec::new(
            Opts::new(
                "keygate_connections_refused_total",
                "Connections closed at once because the listener had server.max_connections (proxy) or server.admin_max_connections (admin) open, by listener.",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let accept_errors = IntCounterVec::new(
            Opts::new(
                "keygate_accept_errors_total",
                "Failed accepts, by listener (e.g. out of file descriptors: EMFILE, ENFILE).",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let timed_out = IntCounterVec::new(
            Opts::new(
                "keygate_connections_timed_out_total",
                "Connections keygate closed, by listener and kind (head: no complete request head within server.header_read_timeout; idle: no request for server.idle_timeout).",
            ),
            &["listener", "kind"],
        )
        .expect("valid metric");
        let tls_failures = IntCounterVec::new(
            Opts::new(
                "keygate_tls_handshake_failures_total",
                "Failed TLS handshakes, by listener and reason (protocol_version: no TLS 1.2 or 1.3 offered; no_certificate: a required client certificate missing; bad_certificate: the client's certificate did not verify; other). Handshakes cut by server.header_read_timeout count under keygate_connections_timed_out_total{kind=\"head\"}.",
            ),
            &["listener", "reason"],
        )
        .expect("valid metric");
        let tls_reloads = IntCounterVec::new(
            Opts::new(
                "keygate_tls_certificate_reloads_total",
                "Loads of a listener's certificates after a file change or SIGHUP, by listener and result (ok: now served; error: refused, the previous certificates still served, the reason in the log and /readyz).",
            ),
            &["listener", "result"],
        )
        .expect("valid metric");
        let tls_certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "keygate_tls_certificate_expiry_seconds",
                "Unix time of the notAfter of each certificate a listener serves, by listener and name (the first host name the certificate is chosen for, or its subject).",
            ),
            &["listener", "name"],
        )
        .expect("valid metric");
        let listener = |name: &str| {
            let reason = |r: &str| tls_failures.with_label_values(&[name, r]);
            ListenerMetrics {
                open: connections.with_label_values(&[name]),
                refused: refused.with_label_values(&[name]),
                accept_errors: accept_errors.with_label_values(&[name]),
                timed_out_head: timed_out.with_label_values(&[name, "head"]),
                timed_out_idle: timed_out.with_label_values(&[name, "idle"]),
                tls_failures: TlsFailures {
                    protocol_version: reason(TLS_FAILURE_REASONS[0]),
                    no_certificate: reason(TLS_FAILURE_REASONS[1]),
                    bad_certificate: reason(TLS_FAILURE_REASONS[2]),
                    other: reason(TLS_FAILURE_REASONS[3]),
                },
                tls_reloaded: tls_reloads.with_label_values(&[name, "ok"]),
                tls_reload_failed: tls_reloads.with_label_values(&[name, "error"]),
            }
        };
        let removed = IntCounterVec::new(
            Opts::new(
                "keygate_request_headers_removed_total",
                "Client request headers removed before forwarding, by kind (identity: in keygate's identity namespace, in any spelling; underscore: other names with '_', per server.headers_with_underscores; method_override: X-HTTP-Method-Override and its kin).",
            ),
            &["kind"],
        )
        .expect("valid metric");

        let rate_limit_vec = IntCounterVec::new(
            Opts::new(
                "keygate_rate_limit_checks_total",
                "Rate limit checks of requests, by where the limit comes from (role or route), its scope (key or tenant) and outcome (allowed or limited).",
            ),
            &["source", "scope", "outcome"],
        )
        .expect("valid metric");
        let rate_limit_checks = std::array::from_fn(|i| {
            rate_limit_vec.with_label_values(&[
                ["role", "route"][i / 4],
                ["key", "tenant"][(i / 2) % 2],
                ["allowed", "limited"][i % 2],
            ])
        });
        let m = Metrics {
            rate_limit_checks,
            decisions: [Mode::Proxy, Mode::Authz].map(|mode| {
                OUTCOMES
                    .iter()
                    .map(|o| decisions_vec.with_label_values(&[mode.as_str(), o]))
                    .collect()
            }),
            processing: processing.clone(),
            upstream: upstream.clone(),
            upstream_errors: upstream_errors.clone(),
            upstream_connections: upstream_connections.clone(),
            upstream_retries: upstream_retries.clone(),
            cache_hits: counter(
                "keygate_cache_hits_total",
                "Verdicts answered from the in-process cache.",
            ),
            cache_negative_hits: counter(
                "keygate_cache_negative_hits_total",
                "Cache hits whose verdict was an unknown key (part of keygate_cache_hits_total).",
            ),
            cache_misses: counter(
                "keygate_cache_misses_total",
                "Verdicts not in the cache: a store lookup, or a wait for a concurrent lookup of the same key.",
            ),
            cache_entries: gauge(
                "keygate_cache_entries",
                "Verdicts in the cache (approximate).",
            ),
            cache_evictions_size: evictions.with_label_values(&["size"]),
            cache_evictions_expired: evictions.with_label_values(&["expired"]),
            store_lookups: counter(
                "keygate_store_lookups_total",
                "Key lookups sent to the store.",
            ),
            store_errors: counter(
                "keygate_store_errors_total",
                "Key lookups the store failed to answer (unreachable, timed out, corrupt record).",
            ),
            store_latency,
            subscription_up: gauge(
                "keygate_subscription_up",
                "1 while the invalidation subscription is connected, else 0.",
            ),
            invalidations: counter(
                "keygate_invalidations_received_total",
                "Key invalidations received from the store.",
            ),
            cache_flushes: counter(
                "keygate_cache_flushes_total",
                "Whole-cache flushes, e.g. on every (re)subscribe.",
            ),
            unsynced_lookups: counter(
                "keygate_unsynced_lookups_total",
                "Requests verified against the store, bypassing the cache, because the invalidation subscription was down for too long.",
            ),
            stale_fills: counter(
                "keygate_stale_fills_total",
                "Cached verdicts discarded because an invalidation arrived while they were being filled.",
            ),
            proxy_listener: listener("proxy"),
            authz_listener: listener("authz"),
            admin_listener: listener("admin"),
            requests_abandoned: counter(
                "keygate_requests_abandoned_total",
                "Requests the client gave up on before keygate answered: it closed the connection or reset the HTTP/2 stream while keygate waited for the store or the upstream.",
            ),
            removed_identity: removed.with_label_values(&["identity"]),
            removed_underscore: removed.with_label_values(&["underscore"]),
            removed_method_override: removed.with_label_values(&["method_override"]),
            last_used_dropped: counter(
                "keygate_last_used_dropped_total",
                "Last-used notes dropped because the flusher's queue was full.",
            ),
            last_used_errors: counter(
                "keygate_last_used_flush_errors_total",
                "Batches of last-used times the store failed to record.",
            ),
            file_store_read_only: gauge(
                "keygate_file_store_read_only",
                "1 while the keys file cannot be written (e.g. a read-only Secret mount): last-used times are kept in memory only and key-management writes fail; else 0.",
            ),
            access_log_dropped: counter(
                "keygate_access_log_dropped_total",
                "Access log lines dropped because the queue to the log writer was full (stderr slower than the requests).",
            ),
            tls_certificate_expiry: tls_certificate_expiry.clone(),
            upgrades: UpgradeMetrics::new(),
            registry,
        };
        let r = &m.registry;
        let register = |c: Box<dyn prometheus::core::Collector>| {
            r.register(c).expect("unique metric");
        };
        register(Box::new(decisions_vec));
        register(Box::new(rate_limit_vec));
        register(Box::new(processing));
        register(Box::new(upstream));
        register(Box::new(upstream_errors));
        register(Box::new(upstream_connections));
        register(Box::new(upstream_retries));
        register(Box::new(evictions));
        register(Box::new(connections));
        register(Box::new(refused));
        register(Box::new(accept_errors));
        register(Box::new(timed_out));
        register(Box::new(removed));
        register(Box::new(tls_failures));
        register(Box::new(tls_reloads));
        register(Box::new(tls_certificate_expiry));
        register(Box::new(m.store_latency.clone()));
        for c in [
            &m.cache_hits,
            &m.cache_negative_hits,
            &m.cache_misses,
            &m.store_lookups,
            &m.store_errors,
            &m.invalidations,
            &m.cache_flushes,
            &m.unsynced_lookups,
            &m.stale_fills,
            &m.last_used_dropped,
            &m.last_used_errors,
            &m.access_log_dropped,
            &m.requests_abandoned,
        ] {
            register(Box::new(c.clone()));
        }
        for g in [
            &m.cache_entries,
            &m.subscription_up,
            &m.file_store_read_only,
        ] {
            register(Box::new(g.clone()));
        }
        m.upgrades.register(r);
        m
    }

    /// Counts one request's rate limit checks, by source, scope and outcome.
    pub fn rate_limits(&self, report: &crate::limit::Report) {
        for c in report.checks.iter().flatten() {
            let i = (c.source as usize) * 4
                + (c.limit.scope as usize) * 2
                + usize::from(!c.state.allowed);
            self.rate_limit_checks[i].inc();
        }
    }

    /// Counts one decision.
    pub fn decision(&self, mode: Mode, outcome: Result<(), Rejection>) {
        let label = match outcome {
            Ok(()) => "allowed",
            Err(r) => r.code(),
        };
        // OUTCOMES is small; a linear scan of static strings beats hashing.
        if let Some(i) = OUTCOMES.iter().position(|o| *o == label) {
            self.decisions[mode as usize][i].inc();
        }
    }

    /// Counts client headers removed before forwarding, by kind.
    pub fn headers_removed(&self, identity: u32, underscore: u32, method_override: u32) {
        for (counter, n) in [
            (&self.removed_identity, identity),
            (&self.removed_underscore, underscore),
            (&self.removed_method_override, method_override),
        ] {
            if n > 0 {
                counter.inc_by(n.into());
            }
        }
    }

    /// Resolves a route's series (at startup: the request path keeps the handles).
    pub fn route(&self, name: &str) -> RouteMetrics {
        let per_class =
            |vec: &HistogramVec| STATUS_CLASSES.map(|class| vec.with_label_values(&[name, class]));
        RouteMetrics {
            processing: per_class(&self.processing),
            upstream: per_class(&self.upstream),
            upstream_unavailable: self
                .upstream_errors
                .with_label_values(&[name, "unavailable"]),
            upstream_timeout: self.upstream_errors.with_label_values(&[name, "timeout"]),
            upstream_tls: self
                .upstream_errors
                .with_label_values(&[name, "upstream_tls"]),
        }
    }

    /// Resolves an upstream's connection-pool series (at startup), labelled with its
    /// authority.
    pub fn pool(&self, upstream: &str) -> PoolMetrics {
        PoolMetrics {
            opened: self.upstream_connections.with_label_values(&[upstream]),
            retried: self.upstream_retries.with_label_values(&[upstream]),
        }
    }

    /// Records one store lookup.
    pub fn store_lookup(&self, took: Duration, ok: bool) {
        self.store_lookups.inc();
        self.store_latency.observe(took.as_secs_f64());
        if !ok {
            self.store_errors.inc();
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Why an upgraded connection ended: the `reason` label values of
/// `keygate_upgraded_connections_closed_total`, in the order of [`UpgradeClose::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeClose {
    /// keygate closed it: its key was revoked (service-account removal revokes its keys).
    Revoked,
    /// keygate closed it: its key reached its expiry.
    Expired,
    /// keygate closed it: a re-check found its key gone from the store.
    Unknown,
    /// keygate closed it: a re-check could not reach the store (fail closed).
    StoreUnavailable,
    /// The client closed it (or its side failed) first.
    Client,
    /// The upstream closed it (or its side failed) first.
    Upstream,
    /// The upgrade never completed on one side (the client or the upstream went away while
    /// switching).
    Aborted,
}

impl UpgradeClose {
    /// Every reason, in label order.
    pub const ALL: [UpgradeClose; 7] = [
        UpgradeClose::Revoked,
        UpgradeClose::Expired,
        UpgradeClose::Unknown,
        UpgradeClose::StoreUnavailable,
        UpgradeClose::Client,
        UpgradeClose::Upstream,
        UpgradeClose::Aborted,
    ];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            UpgradeClose::Revoked => "revoked",
            UpgradeClose::Expired => "expired",
            UpgradeClose::Unknown => "unknown",
            UpgradeClose::StoreUnavailable => "store_unavailable",
            UpgradeClose::Client => "client",
            UpgradeClose::Upstream => "upstream",
            UpgradeClose::Aborted => "aborted",
        }
    }
}

/// The series of upgraded connections, resolved at startup.
#[derive(Clone)]
pub struct UpgradeMetrics {
    /// Upgraded connections spliced now.
    pub live: IntGauge,
    closed_vec: IntCounterVec,
    closed: [IntCounter; UpgradeClose::ALL.len()],
}

impl UpgradeMetrics {
    fn new() -> Self {
        let closed_vec = IntCounterVec::new(
            Opts::new(
                "keygate_upgraded_connections_closed_total",
                "Upgraded connections (WebSocket over HTTP/1.1 Upgrade or HTTP/2 extended CONNECT) that ended, by reason: revoked, expired, unknown (closed by keygate because the key that opened them stopped working), store_unavailable (a re-check could not reach the store), client or upstream (that side closed first), aborted (the switch never completed).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        UpgradeMetrics {
            live: gauge(
                "keygate_upgraded_connections",
                "Upgraded connections (WebSocket and the like) spliced to an upstream now.",
            ),
            closed: UpgradeClose::ALL.map(|r| closed_vec.with_label_values(&[r.label()])),
            closed_vec,
        }
    }

    fn register(&self, r: &Registry) {
        r.register(Box::new(self.live.clone()))
            .expect("unique metric");
        r.register(Box::new(self.closed_vec.clone()))
            .expect("unique metric");
    }

    /// Counts one upgraded connection that ended.
    pub fn closed(&self, reason: UpgradeClose) {
        self.closed[reason as usize].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rejection_code_is_an_outcome() {
        let m = Metrics::default();
        m.decision(Mode::Proxy, Ok(()));
        m.decision(Mode::Proxy, Err(Rejection::KeyRevoked));
        m.decision(Mode::Authz, Err(Rejection::KeyRevoked));
        let text = m.render();
        assert!(
            text.contains("keygate_auth_decisions_total{mode=\"proxy\",outcome=\"allowed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("keygate_auth_decisions_total{mode=\"proxy\",outcome=\"key_revoked\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("keygate_auth_decisions_total{mode=\"authz\",outcome=\"key_revoked\"} 1"),
            "{text}"
        );
        assert!(text.contains("keygate_subscription_up 0"), "{text}");
    }

    #[test]
    fn route_series_split_own_time_from_upstream_time() {
        let m = Metrics::new();
        let (api, web) = (m.route("api"), m.route("web"));
        web.observe(
            204,
            Duration::from_millis(30),
            Some(Duration::from_millis(29)),
        );
        api.observe(401, Duration::from_micros(40), None);
        api.upstream_failed(Rejection::UpstreamTimeout);
        let text = m.render();
        for want in [
            "keygate_processing_duration_seconds_count{route=\"web\",status_class=\"2xx\"} 1",
            "keygate_upstream_duration_seconds_count{route=\"web\",status_class=\"2xx\"} 1",
            "keygate_processing_duration_seconds_count{route=\"api\",status_class=\"4xx\"} 1",
            "keygate_upstream_duration_seconds_count{route=\"api\",status_class=\"4xx\"} 0",
            "keygate_upstream_errors_total{kind=\"timeout\",route=\"api\"} 1",
            // 1 ms of own time lands in the 1 ms bucket, not the 25 ms one.
            "keygate_processing_duration_seconds_bucket{route=\"web\",status_class=\"2xx\",le=\"0.001\"} 1",
        ] {
            assert!(text.contains(want), "missing {want}\n{text}");
        }
    }
}
