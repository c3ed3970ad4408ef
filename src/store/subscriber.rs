//! The invalidation subscriber: one per instance, on its own Redis connection, following
//! `<namespace>:invalidate` (on a cluster: every bucket's shard channel, see `cluster.rs`):
//! every announced digest is evicted from the cache, or, when announced as revoked
//! (`<hex>:revoked`), held as revoked at once.
//!
//! Invariants kept here:
//! - Messages published while the subscription is down are lost, so every (re)subscribe
//!   flushes the whole cache *after* SUBSCRIBE is confirmed: anything cached before then may
//!   have missed a message, anything read after it will be followed by any later message.
//! - The sink is told when the feed was last known good ([`InvalidationSink::synced`]): the
//!   moment the confirmed SUBSCRIBE, or the latest answered PING, was sent. Redis answers on
//!   one connection in order, so an answer proves that every message published before its
//!   command was sent has been delivered; they are applied before the sink is told. The sink
//!   trusts cached verdicts only for a bound after that moment, so a silently dead link cannot
//!   stretch the trust however late it is noticed.
//! - A silently dead link (half-open TCP, a frozen Redis, a middlebox dropping idle
//!   connections) is noticed by a PING on the subscribed connection every
//!   `health_check_interval`; a PING still unanswered at the next one counts as a disconnect.
//! - Reconnects back off exponentially with jitter, so a fleet does not stampede Redis.
//! - In Sentinel mode every (re)subscribe first asks the sentinels for the master, so after a
//!   failover the subscription moves to the new master, and the flush above covers whatever
//!   was published while it moved (on the old master after the link broke, or on the new one
//!   before SUBSCRIBE was confirmed there). The sentinels are asked again every
//!   `health_check_interval` while subscribed: after a switchover the old master stays up
//!   (and answers PINGs) until the sentinels demote it, but hears nothing published on the
//!   new one, so the subscription moves as soon as the sentinels name another master.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind};
use tokio::sync::mpsc::UnboundedReceiver;

use super::sentinel::Target;
use super::{cluster, InvalidationSink};
use crate::key::KeyDigest;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// The longest wait between attempts. Short, because while the subscription is down past
/// `cache.trust_while_unsubscribed` keygate fails closed: once the store is back (a failover
/// done, a restart), an instance's next attempt is at most this far away. One connection
/// attempt a second per instance is nothing to a Redis that is up, and little to one that is
/// down.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Follows the invalidation channels forever: the one channel of a standalone or Sentinel
/// store, or every bucket's shard channel on a cluster.
pub(super) async fn run(
    target: Arc<Target>,
    addr: String,
    channels: Vec<String>,
    connect_timeout: Duration,
    health_check_interval: Duration,
    sink: Arc<dyn InvalidationSink>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let attempted = Instant::now();
        match subscribe(&target, &channels, connect_timeout).await {
            Ok((mut feed, at)) => {
                // Flush, then report the feed good as of the attempt: nothing cached from
                // before the flush is trusted on the strength of this subscription.
                sink.invalidate_all();
                sink.link(true);
                sink.synced(attempted);
                backoff = BACKOFF_MIN;
                tracing::info!(
                    channels = channels.len(),
                    %addr,
                    "invalidation subscription up; cache flushed"
                );
                let reason = tokio::select! {
                    r = follow(&mut feed, health_check_interval, &*sink) => r,
                    r = target.moved(at.as_ref(), health_check_interval, connect_timeout) => r,
                };
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

/// A confirmed subscription: where its messages come from and how to check it.
enum Feed {
    /// One connection subscribed to the channel (standalone, Sentinel).
    Single {
        sink: PubSubSink,
        messages: PubSubStream,
    },
    /// A cluster connection subscribed to every shard channel, and its pushes.
    Sharded {
        conn: ClusterConnection,
        pushes: UnboundedReceiver<PushInfo>,
    },
}

/// What the feed delivered.
enum Incoming {
    Message(Payload),
    /// The link broke (or, on a cluster, may have missed messages).
    Lost(String),
}

/// One message, not yet read.
enum Payload {
    Msg(redis::Msg),
    Push(PushInfo),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Msg(m) => m.get_payload_bytes(),
            // `smessage`: [channel, payload].
            Payload::Push(p) => match p.data.get(1) {
                Some(redis::Value::BulkString(b)) => b,
                _ => &[],
            },
        }
    }
}

impl Feed {
    async fn next(&mut self) -> Incoming {
        match self {
            Feed::Single { messages, .. } => match messages.next().await {
                Some(m) => Incoming::Message(Payload::Msg(m)),
                None => Incoming::Lost("connection closed".into()),
            },
            Feed::Sharded { pushes, .. } => loop {
                let push = pushes.recv().await;
                if let Some(incoming) = sharded(push) {
                    return incoming;
                }
            },
        }
    }

    /// What has already arrived, without waiting.
    fn next_now(&mut self) -> Option<Incoming> {
        match self {
            Feed::Single { messages, .. } => match messages.next().now_or_never()? {
                Some(m) => Some(Incoming::Message(Payload::Msg(m))),
                None => Some(Incoming::Lost("connection closed".into())),
            },
            Feed::Sharded { pushes, .. } => loop {
                let push = match pushes.try_recv() {
                    Ok(p) => Some(p),
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return None,
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => None,
                };
                if let Some(incoming) = sharded(push) {
                    return Some(incoming);
                }
            },
        }
    }

    /// A health check: answered once every server carrying the subscription has answered.
    fn ping(&self) -> Pong {
        match self {
            Feed::Single { sink, .. } => {
                let mut sink = sink.clone();
                Box::pin(async move { sink.ping::<redis::Value>().await.map(drop) })
            }
            Feed::Sharded { conn, .. } => {
                let conn = conn.clone();
                Box::pin(async move { cluster::ping_masters(conn).await.map(drop) })
            }
        }
    }
}

/// Reads one push of a cluster subscription; `None` for pushes that change nothing (the
/// confirmations of keygate's own `SSUBSCRIBE`s).
fn sharded(push: Option<PushInfo>) -> Option<Incoming> {
    let Some(push) = push else {
        return Some(Incoming::Lost("cluster connection closed".into()));
    };
    match push.kind {
        PushKind::SMessage => Some(Incoming::Message(Payload::Push(push))),
        PushKind::Disconnection => Some(Incoming::Lost(
            "a connection to a cluster node dropped".into(),
        )),
        PushKind::SUnsubscribe => Some(Incoming::Lost(
            "a shard channel was unsubscribed (its slot moved, or its master was demoted)".into(),
        )),
        _ => None,
    }
}

async fn subscribe(
    target: &Target,
    channels: &[String],
    timeout: Duration,
) -> Result<(Feed, Option<redis::ConnectionAddr>), String> {
    let attempt = async {
        if let Target::Cluster(nodes) = target {
            let (conn, pushes) = nodes.subscribe(channels).await?;
            return Ok((Feed::Sharded { conn, pushes }, None));
        }
        let client = target.client().await?;
        let at = client.get_connection_info().addr().clone();
        let (mut sink, messages) = client.get_async_pubsub().await?.split();
        for channel in channels {
            sink.subscribe(channel).await?;
        }
        Ok::<_, redis::RedisError>((Feed::Single { sink, messages }, Some(at)))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

type Pong = Pin<Box<dyn Future<Output = redis::RedisResult<()>> + Send>>;

/// Applies messages until the link fails; returns why it failed.
async fn follow(feed: &mut Feed, interval: Duration, sink: &dyn InvalidationSink) -> String {
    let mut health = tokio::time::interval(interval);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.tick().await;
    // The PING in flight and when it was sent. It runs beside the messages, so a health check
    // never delays an invalidation.
    let mut ping: Option<(Instant, Pong)> = None;
    loop {
        tokio::select! {
            biased;
            incoming = feed.next() => match incoming {
                Incoming::Message(p) => apply(p.bytes(), sink).await,
                Incoming::Lost(why) => return why,
            },
            pong = async { ping.as_mut().expect("guarded by the condition").1.as_mut().await },
                if ping.is_some() =>
            {
                let (sent, _) = ping.take().expect("guarded by the condition");
                if let Err(e) = pong {
                    return format!("health check failed: {e}");
                }
                // Every message that arrived before the answer is queued by now: apply them
                // all before vouching for the feed as of `sent`.
                while let Some(incoming) = feed.next_now() {
                    match incoming {
                        Incoming::Message(p) => apply(p.bytes(), sink).await,
                        Incoming::Lost(why) => return why,
                    }
                }
                sink.synced(sent);
            }
            _ = health.tick() => {
                if ping.is_some() {
                    return format!("no answer to a health check within {interval:?}");
                }
                ping = Some((Instant::now(), feed.ping()));
            }
        }
    }
}

/// What a message on the channel announces.
#[derive(Debug, PartialEq, Eq)]
enum Announcement {
    /// `<hex>`: the key's record changed (created, edited, expiry moved).
    Changed(KeyDigest),
    /// `<hex>:revoked`: the key was revoked, for good.
    Revoked(KeyDigest),
}

fn parse(payload: &[u8]) -> Option<Announcement> {
    let text = std::str::from_utf8(payload).ok()?;
    match text.split_once(':') {
        None => KeyDigest::from_hex(text).map(Announcement::Changed),
        Some((hex, "revoked")) => KeyDigest::from_hex(hex).map(Announcement::Revoked),
        Some(_) => None,
    }
}

/// Applies one message: a changed key's verdicts are evicted, a revoked key's replaced by
/// "revoked"; anything unreadable flushes the whole cache.
async fn apply(payload: &[u8], sink: &dyn InvalidationSink) {
    match parse(payload) {
        Some(Announcement::Changed(digest)) => sink.invalidate(&digest).await,
        Some(Announcement::Revoked(digest)) => sink.revoked(&digest).await,
        None => {
            // Not an announcement this version knows: be safe and forget everything.
            tracing::warn!(
                len = payload.len(),
                "unreadable invalidation message; flushing the cache"
            );
            sink.invalidate_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_are_read_strictly() {
        let d = KeyDigest([0xab; 32]);
        let hex = d.to_hex();
        assert_eq!(parse(hex.as_bytes()), Some(Announcement::Changed(d)));
        assert_eq!(
            parse(format!("{hex}:revoked").as_bytes()),
            Some(Announcement::Revoked(d))
        );
        for bad in [
            format!("{hex}:"),
            format!("{hex}:revoked:x"),
            format!("{hex}:REVOKED"),
            ":revoked".to_owned(),
            hex[1..].to_owned(),
            "garbage".to_owned(),
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(parse(b"\xff\xfe"), None);
    }
}
