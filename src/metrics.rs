//! Prometheus metrics: one registry per process (no hidden globals), with every labelled
//! series resolved to a handle at startup so the request path never looks a metric up by name.
//! Label values are bounded sets (outcomes), never keys, key ids or tenants.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::rejection::Rejection;

/// Every `outcome` label value of `keygate_auth_decisions_total`.
pub const OUTCOMES: [&str; 10] = [
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
];

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    decisions: Vec<IntCounter>,
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
    /// Last-used notes dropped because the flusher's queue was full.
    pub last_used_dropped: IntCounter,
    /// Batches of last-used times the store failed to record.
    pub last_used_errors: IntCounter,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let decisions_vec = IntCounterVec::new(
            Opts::new(
                "keygate_auth_decisions_total",
                "Requests decided, by outcome (allowed or the error code).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let decisions = OUTCOMES
            .iter()
            .map(|o| decisions_vec.with_label_values(&[o]))
            .collect();
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let m = Metrics {
            decisions,
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
            last_used_dropped: counter(
                "keygate_last_used_dropped_total",
                "Last-used notes dropped because the flusher's queue was full.",
            ),
            last_used_errors: counter(
                "keygate_last_used_flush_errors_total",
                "Batches of last-used times the store failed to record.",
            ),
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(decisions_vec)).expect("unique metric");
        r.register(Box::new(m.subscription_up.clone()))
            .expect("unique metric");
        r.register(Box::new(m.invalidations.clone()))
            .expect("unique metric");
        r.register(Box::new(m.cache_flushes.clone()))
            .expect("unique metric");
        r.register(Box::new(m.unsynced_lookups.clone()))
            .expect("unique metric");
        r.register(Box::new(m.stale_fills.clone()))
            .expect("unique metric");
        r.register(Box::new(m.last_used_dropped.clone()))
            .expect("unique metric");
        r.register(Box::new(m.last_used_errors.clone()))
            .expect("unique metric");
        m
    }

    /// Counts one decision.
    pub fn decision(&self, outcome: Result<(), Rejection>) {
        let label = match outcome {
            Ok(()) => "allowed",
            Err(r) => r.code(),
        };
        // OUTCOMES is small; a linear scan of static strings beats hashing.
        if let Some(i) = OUTCOMES.iter().position(|o| *o == label) {
            self.decisions[i].inc();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rejection_code_is_an_outcome() {
        let m = Metrics::new();
        m.decision(Ok(()));
        m.decision(Err(Rejection::KeyRevoked));
        let text = m.render();
        assert!(
            text.contains("keygate_auth_decisions_total{outcome=\"allowed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("keygate_auth_decisions_total{outcome=\"key_revoked\"} 1"),
            "{text}"
        );
        assert!(text.contains("keygate_subscription_up 0"), "{text}");
    }
}
