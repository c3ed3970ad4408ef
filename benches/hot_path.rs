//! Micro-benchmarks of the cached request path's pieces: token parse and checksum, hashing,
//! a cached verdict lookup, and the header rewrite. Run with `cargo bench --bench hot_path`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};

use keygate::auth::bearer_token;
use keygate::config::{CacheSettings, Config, IdentitySettings};
use keygate::key::{generate, KeyDigest, KeyKind, Token};
use keygate::metrics::Metrics;
use keygate::proxy::{rewrite_request_headers, Forwarded};
use keygate::store::{KeyRecord, Store, StoreError};
use keygate::verify::{Identity, Verifier};

/// A one-record store; only the first lookup reaches it, the rest are cache hits.
struct OneKey(KeyRecord);

#[async_trait]
impl Store for OneKey {
    async fn lookup(&self, d: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        Ok((self.0.digest == *d).then(|| self.0.clone()))
    }
    async fn insert(&self, _: &KeyRecord) -> Result<(), StoreError> {
        Ok(())
    }
    async fn get(&self, _: &str) -> Result<Option<KeyRecord>, StoreError> {
        Ok(None)
    }
    async fn list(&self, _: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        Ok(Vec::new())
    }
    async fn revoke(&self, _: &str, _: u64) -> Result<Option<KeyRecord>, StoreError> {
        Ok(None)
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn record(digest: KeyDigest) -> KeyRecord {
    KeyRecord {
        id: "key_0123456789abcdef".into(),
        digest,
        name: "bench".into(),
        tenant: "acme".into(),
        role: "admin".into(),
        subject: "alice".into(),
        kind: KeyKind::User,
        created_at: 1,
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
    }
}

fn hot_path(c: &mut Criterion) {
    let key = generate(KeyKind::User);
    let plain = key.secret.expose().to_owned();

    c.bench_function("token_parse", |b| {
        b.iter(|| Token::parse(black_box(plain.as_bytes())).unwrap())
    });
    c.bench_function("token_parse_and_digest", |b| {
        b.iter(|| Token::parse(black_box(plain.as_bytes())).unwrap().digest())
    });

    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {plain}")).unwrap(),
    );
    c.bench_function("bearer_token_from_headers", |b| {
        b.iter(|| bearer_token(black_box(&headers)).unwrap().digest())
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let verifier = Verifier::new(
        Arc::new(OneKey(record(key.digest))),
        &CacheSettings {
            capacity: 10_000,
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(5),
            trust_while_unsubscribed: Duration::from_secs(3),
        },
        Arc::new(Metrics::new()),
    );
    rt.block_on(verifier.verify(key.digest, 10)).unwrap();
    c.bench_function("cached_verify", |b| {
        b.iter(|| {
            rt.block_on(verifier.verify(black_box(key.digest), 10))
                .unwrap()
        })
    });

    let identity = Identity::from_record(&record(key.digest)).unwrap();
    let ids = IdentitySettings::default();
    let mut config = Config::default();
    config.upstream.url = Some("http://127.0.0.1:3000".into());
    let upstream = config.serve_settings().unwrap().upstream;
    let request_id = HeaderValue::from_static("0123456789abcdef");
    let mut client_headers = HeaderMap::new();
    for (k, v) in [
        ("host", "api.example.com"),
        ("user-agent", "bench/1.0"),
        ("accept", "*/*"),
        ("authorization", "Bearer x"),
        ("x-keygate-tenant", "spoofed"),
    ] {
        client_headers.insert(k, HeaderValue::from_static(v));
    }
    c.bench_function("rewrite_request_headers", |b| {
        b.iter_batched_ref(
            || client_headers.clone(),
            |h| {
                rewrite_request_headers(
                    h,
                    &identity,
                    &ids,
                    &upstream,
                    &Forwarded {
                        client_ip: [127, 0, 0, 1].into(),
                        proto: "http",
                        host: Some(HeaderValue::from_static("api.example.com")),
                        request_id: &request_id,
                    },
                )
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
