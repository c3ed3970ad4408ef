//! Micro-benchmarks of the cached request path's pieces (token parse and checksum, hashing, a
//! cached verdict lookup, path normalisation, route lookup and policy, the header rewrite) and
//! of a whole request through an in-process keygate to an in-process upstream. Run with
//! `cargo bench --bench hot_path`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use keygate::auth::bearer_token;
use keygate::config::Config;
use keygate::identity::Identity;
use keygate::key::{generate, KeyDigest, KeyKind, Token};
use keygate::metrics::Metrics;
use keygate::policy::authorize;
use keygate::proxy::forwarded::ip_value;
use keygate::proxy::headers::{
    rewrite_request_headers, scan_request_headers, Forwarded, IdentitySettings, UnderscoreHeaders,
};
use keygate::route::normalize;
use keygate::server::Server;
use keygate::store::{KeyRecord, Store};
use keygate::verify::{CacheSettings, Verifier};

mod support;

/// A one-record store; only the first lookup reaches it, the rest are cache hits.
fn one_key(record: KeyRecord) -> Arc<dyn Store> {
    Arc::new(support::FnStore(move |d: &KeyDigest| {
        (record.digest == *d).then(|| record.clone())
    }))
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
        one_key(record(key.digest)),
        &CacheSettings {
            capacity: 10_000,
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(5),
            trust_while_unsubscribed: Duration::from_secs(3),
        },
        Arc::new(Metrics::default()),
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
    let upstream = config.serve_settings().unwrap().upstream.unwrap();
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
    let client_ip = ip_value([127, 0, 0, 1].into());
    c.bench_function("rewrite_request_headers", |b| {
        b.iter_batched_ref(
            || client_headers.clone(),
            |h| {
                let scan = scan_request_headers(h, &ids.prefix, UnderscoreHeaders::Drop);
                rewrite_request_headers(
                    h,
                    Some(&identity),
                    &ids,
                    &upstream,
                    &Forwarded {
                        client_ip: &client_ip,
                        trusted: false,
                        proto: "http",
                        host: Some(HeaderValue::from_static("api.example.com")),
                        request_id: &request_id,
                        scan,
                        tenant_header: None,
                        client_cert: None,
                    },
                )
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

/// Path normalisation, route lookup and the policy decision on a small edge-gateway table.
fn routing(c: &mut Criterion) {
    let config: Config = toml::from_str(
        r#"
        [upstream]
        url = "http://127.0.0.1:3000"
        [[routes]]
        path_prefix = "/healthz"
        auth = false
        [[routes]]
        path_prefix = "/admin"
        roles = ["admin"]
        [[routes]]
        path_prefix = "/tenants"
        tenant_from = "/tenants/{tenant}"
        [[routes]]
        host = "reports.example.com"
        tenant_from = "header:x-tenant"
        "#,
    )
    .unwrap();
    let routes = config.serve_settings().unwrap().routes;
    let identity = Identity::from_record(&record(KeyDigest([0; 32]))).unwrap();
    let headers = HeaderMap::new();
    let host = Some(&b"api.example.com"[..]);

    c.bench_function("normalize_normal_path", |b| {
        b.iter(|| normalize(black_box("/tenants/acme/orders/42")).unwrap())
    });
    c.bench_function("normalize_path_needing_work", |b| {
        b.iter(|| normalize(black_box("/tenants//%61cme/./orders/x/../42")).unwrap())
    });
    c.bench_function("route_find_and_authorize", |b| {
        b.iter(|| {
            let path = normalize(black_box("/tenants/acme/orders/42")).unwrap();
            let route = routes.find(host, &path, &http::Method::GET).unwrap();
            let tenant = route.tenant(&path, &headers, false);
            authorize(route, &identity, &http::Method::GET, tenant).unwrap()
        })
    });
}

/// One whole request, one at a time, over a kept-alive connection: client → keygate (cached
/// key) → upstream → back, all in-process on loopback.
fn whole_request(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let key = generate(KeyKind::User);
    let (proxy, client) = rt.block_on(async {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(support::serve_fast_upstream(upstream));
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".into();
        config.server.admin_listen = "127.0.0.1:0".into();
        config.upstream.url = Some(format!("http://{upstream_addr}"));
        config.log.access = false;
        let server = Server::bind_with_store(
            config.serve_settings().unwrap(),
            one_key(record(key.digest)),
        )
        .await
        .unwrap();
        let proxy = server.proxy_addr();
        tokio::spawn(server.run(std::future::pending()));
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        (proxy, client)
    });
    let uri: http::Uri = format!("http://{proxy}/things?page=2").parse().unwrap();
    let auth = HeaderValue::from_str(&format!("Bearer {}", key.secret.expose())).unwrap();
    let send = || async {
        let req = http::Request::get(uri.clone())
            .header(http::header::AUTHORIZATION, auth.clone())
            .body(Empty::new())
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap()
    };
    rt.block_on(send());
    c.bench_function("whole_request_cached_key", |b| {
        b.iter(|| rt.block_on(send()))
    });
}

criterion_group!(benches, hot_path, routing, whole_request);
criterion_main!(benches);
