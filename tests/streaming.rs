//! Bodies stream through keygate in both directions without being buffered. This file holds a
//! single test so that no other test's allocations disturb the memory measurement.

mod common;

use common::*;
use http_body_util::BodyExt;

const BIG: u64 = 64 * 1024 * 1024;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_with_flat_memory() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace("stream");
    let store = redis_store(&redis, &ns);
    let keygate = Keygate::start(test_config(&redis.url(), &ns, &upstream.url())).await;
    let key = create_key(&*store, "acme", "admin").await;
    let auth = format!("Bearer {}", key.secret.expose());
    let http = Http::new();

    // Warm up every part (connections, pools, cache) before the baseline.
    let warm = http
        .get(&keygate.url("/"), &[("authorization", &auth)])
        .await;
    assert_eq!(warm.status, 200);
    let before = rss_bytes();

    // Upload: the upstream counts the bytes as they arrive.
    let resp = http
        .send(
            "POST",
            &keygate.url("/upload"),
            &[("authorization", &auth)],
            zeros(BIG),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let counted = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&counted), BIG.to_string());
    let after_upload = rss_bytes();

    // Download: the client counts the bytes without keeping them.
    let resp = http
        .send(
            "GET",
            &keygate.url(&format!("/download?bytes={BIG}")),
            &[("authorization", &auth)],
            http_body_util::Full::new(bytes::Bytes::new()).boxed(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
        }
    }
    assert_eq!(received, BIG);
    let after_download = rss_bytes();

    // Buffering either body would add 64 MiB; streaming adds a few buffers at most.
    let limit = 16 * 1024 * 1024;
    let grew_up = after_upload.saturating_sub(before);
    let grew_down = after_download.saturating_sub(before);
    assert!(grew_up < limit, "upload grew RSS by {grew_up} bytes");
    assert!(grew_down < limit, "download grew RSS by {grew_down} bytes");
}
