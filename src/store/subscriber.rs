//! The invalidation subscriber: one per instance, on its own Redis connection, following
//! `<namespace>:invalidate` and evicting every announced digest from the cache.
//!
//! Invariants kept here:
//! - Messages published while the subscription is down are lost, so every (re)subscribe
//!   flushes the whole cache *after* SUBSCRIBE is confirmed: anything cached before then may
//!   have missed a message, anything read after it will be followed by any later message.
//! - A silently dead link (half-open TCP, a middlebox dropping idle connections) is noticed by
//!   a PING on the subscribed connection every `health_check_interval`; no answer within the
//!   same interval counts as a disconnect.
//! - While down, the sink is told so; it stops trusting cached verdicts after a short bound.
//! - Reconnects back off exponentially with jitter, so a fleet does not stampede Redis.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};

use super::InvalidationSink;
use crate::key::KeyDigest;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Follows the invalidation channel forever.
pub(super) async fn run(
    client: redis::Client,
    addr: String,
    channel: String,
    connect_timeout: Duration,
    health_check_interval: Duration,
    sink: Arc<dyn InvalidationSink>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        match subscribe(&client, &channel, connect_timeout).await {
            Ok((mut conn, mut messages)) => {
                sink.invalidate_all();
                sink.link(true);
                backoff = BACKOFF_MIN;
                tracing::info!(%channel, "invalidation subscription up; cache flushed");
                let reason = follow(&mut conn, &mut messages, health_check_interval, &*sink).await;
                sink.link(false);
                tracing::warn!(%reason, %addr, "invalidation subscription lost; reconnecting");
            }
            Err(err) => {
                sink.link(false);
                tracing::warn!(error = %err, %addr, "cannot subscribe to invalidations; retrying");
            }
        }
        // Full jitter over the upper half of the current backoff.
        let jittered = rand::random_range(backoff / 2..=backoff);
        tokio::time::sleep(jittered).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn subscribe(
    client: &redis::Client,
    channel: &str,
    timeout: Duration,
) -> Result<(PubSubSink, PubSubStream), String> {
    let attempt = async {
        let (mut conn, messages) = client.get_async_pubsub().await?.split();
        conn.subscribe(channel).await?;
        Ok::<_, redis::RedisError>((conn, messages))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Applies messages until the link fails; returns why it failed.
async fn follow(
    conn: &mut PubSubSink,
    messages: &mut PubSubStream,
    interval: Duration,
    sink: &dyn InvalidationSink,
) -> String {
    let mut health = tokio::time::interval(interval);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.tick().await;
    loop {
        tokio::select! {
            msg = messages.next() => {
                let Some(msg) = msg else { return "connection closed".into() };
                let payload = msg.get_payload_bytes();
                match std::str::from_utf8(payload).ok().and_then(KeyDigest::from_hex) {
                    Some(digest) => sink.invalidate(&digest).await,
                    None => {
                        // Not a digest: be safe and forget everything.
                        tracing::warn!(len = payload.len(), "unreadable invalidation message; flushing the cache");
                        sink.invalidate_all();
                    }
                }
            }
            _ = health.tick() => {
                match tokio::time::timeout(interval, conn.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("health check failed: {e}"),
                    Err(_) => return format!("no answer to a health check within {interval:?}"),
                }
            }
        }
    }
}
