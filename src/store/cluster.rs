//! Redis Cluster connections: the seed nodes keygate learns the cluster from, the store's
//! cluster connection, and the sharded invalidation feed.
//!
//! Placement (see `redis.rs` for the whole data model): a key's record lives in one of
//! [`BUCKETS`] hash-tag buckets chosen by its digest's first byte (`{ab}`), so records spread
//! over every master and the request path reads one slot; each bucket has its own shard
//! channel `<ns>:invalidate:{ab}` in the same slot, so the script that writes a record also
//! announces it there (`SPUBLISH`) in one atomic step. The bookkeeping (id index, listings,
//! service accounts, audit) lives in one slot, tagged `{<ns>}`.
//!
//! The feed subscribes (`SSUBSCRIBE`, Redis 7) to every bucket's channel on the master serving
//! it, over one RESP3 cluster connection. Invariants:
//! - A subscription is used only while none of its node connections has dropped: the cluster
//!   connection reports a dropped node connection (and re-subscribes on its own), and a
//!   channel whose slot moved is unsubscribed by Redis (`sunsubscribe`); either is a gap in
//!   which messages may have been lost, so the subscriber drops the whole subscription and
//!   subscribes afresh, flushing the cache once every channel is confirmed again.
//! - A health check PINGs every master on the connections that carry the subscriptions; Redis
//!   answers each connection in order, so once every master has answered, every message
//!   published before the PING was sent has been delivered.

use std::time::Duration;

use futures_util::future::try_join_all;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{PushInfo, RedisResult};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::key::KeyDigest;

/// How many hash-tag buckets records (and shard channels) are spread over: enough to spread
/// over every master of any cluster keygate is likely to meet, few enough that subscribing to
/// every channel is cheap.
pub(super) const BUCKETS: usize = 256;

/// The bucket of a key: its digest's first byte in hex.
pub(super) fn bucket(digest: &KeyDigest) -> String {
    format!("{:02x}", digest.0[0])
}

/// Every bucket, in order.
pub(super) fn buckets() -> impl Iterator<Item = String> {
    (0..BUCKETS).map(|b| format!("{b:02x}"))
}

/// How to reach the cluster: its seed nodes, each with the user, password and TLS mode of
/// `store.redis_url`, the TLS files, and the bound on every call.
#[derive(Clone)]
pub(super) struct Nodes {
    pub(super) seeds: Vec<redis::ConnectionInfo>,
    pub(super) certs: Option<redis::TlsCertificates>,
    pub(super) timeout: Duration,
}

impl Nodes {
    fn builder(&self) -> ClusterClientBuilder {
        let mut b = ClusterClientBuilder::new(self.seeds.clone())
            .connection_timeout(self.timeout)
            .response_timeout(self.timeout)
            .overall_response_timeout(Some(self.timeout))
            // A MOVED or ASK redirection, or a failover, is retried within the call's bound.
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(200);
        if let Some(certs) = &self.certs {
            b = b.certs(certs.clone());
        }
        b
    }

    /// The store's connection: made at once, connecting on first use, so keygate starts
    /// (unready) while the cluster is down.
    pub(super) fn connection(&self) -> RedisResult<ClusterConnection> {
        let config = redis::cluster::ClusterConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout);
        Ok(self
            .builder()
            .build()?
            .get_pending_async_connection_with_config(config))
    }

    /// Subscribes to every channel in `channels` on the master serving its slot; returns the
    /// connection and its pushes (messages, and notices of dropped node connections).
    pub(super) async fn subscribe(
        &self,
        channels: &[String],
    ) -> RedisResult<(ClusterConnection, UnboundedReceiver<PushInfo>)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = self
            .builder()
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .build()?;
        let conn = client.get_async_connection().await?;
        // One SSUBSCRIBE per channel: channels of different slots cannot share one.
        try_join_all(channels.iter().map(|c| {
            let mut conn = conn.clone();
            async move { conn.ssubscribe(c).await }
        }))
        .await?;
        Ok((conn, rx))
    }
}

/// A PING to every master, answered once all have answered.
pub(super) async fn ping_masters(mut conn: ClusterConnection) -> RedisResult<redis::Value> {
    conn.route_command(
        redis::cmd("PING"),
        RoutingInfo::MultiNode((
            MultipleNodeRoutingInfo::AllMasters,
            Some(ResponsePolicy::AllSucceeded),
        )),
    )
    .await
}

/// Names the cluster for error messages: `cluster via h:p, h:p` (never a password).
pub(super) fn describe(seeds: &[redis::ConnectionInfo]) -> String {
    let addrs: Vec<String> = seeds.iter().map(|s| s.addr().to_string()).collect();
    format!("cluster via {}", addrs.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_the_digests_first_byte() {
        assert_eq!(bucket(&KeyDigest([0xab; 32])), "ab");
        assert_eq!(bucket(&KeyDigest([0x00; 32])), "00");
        let all: Vec<String> = buckets().collect();
        assert_eq!(all.len(), BUCKETS);
        assert_eq!(all[0], "00");
        assert_eq!(all[255], "ff");
    }
}
