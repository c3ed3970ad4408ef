//! Where the Redis store's connections go: one fixed server (standalone), or whichever server
//! the Redis Sentinels name master (Sentinel mode).
//!
//! In Sentinel mode the master is asked of the sentinels (`SENTINEL MASTERS`, through the
//! `redis` crate's sentinel client), and the server they name is checked with `ROLE` before it
//! is used, so keygate never reads from or writes to a replica it was wrongly pointed at. A
//! master marked down by the sentinels is not used: until a replica has been promoted every
//! lookup fails, and keygate answers `503` (fail closed). Connections to a master are kept
//! until a call on them fails (see [`Link`]), then the master is looked up afresh; a failover
//! therefore needs no restart. Sentinels themselves kill the clients of a demoted master
//! (`CLIENT KILL TYPE normal` and `pubsub`), so the store's and the subscriber's connections
//! to an old master break and are looked up again too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, RedisResult};

/// How to find the master through the sentinels, and how to talk to it.
#[derive(Clone)]
pub(super) struct Sentinels {
    pub(super) addrs: Vec<ConnectionAddr>,
    pub(super) master: String,
    pub(super) sentinel_username: Option<String>,
    pub(super) sentinel_password: Option<String>,
    /// The master's ACL user, password and database (from `store.redis_url`).
    pub(super) master_info: redis::RedisConnectionInfo,
    /// TLS to the master (a `rediss://` `store.redis_url`), with its certificates if set.
    pub(super) master_tls: Option<Option<redis::TlsCertificates>>,
}

impl Sentinels {
    /// A client for the current master, checked to be one.
    async fn master(&self) -> RedisResult<redis::Client> {
        let mut b = SentinelClientBuilder::new(
            self.addrs.iter().cloned(),
            &self.master,
            SentinelServerType::Master,
        )?
        .set_client_to_redis_db(self.master_info.db());
        if let Some(u) = self.master_info.username() {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = self.master_info.password() {
            b = b.set_client_to_redis_password(p);
        }
        if let Some(certs) = &self.master_tls {
            b = b.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
            if let Some(certs) = certs {
                b = b.set_client_to_redis_certificates(certs.clone());
            }
        }
        if let Some(u) = &self.sentinel_username {
            b = b.set_client_to_sentinel_username(u);
        }
        if let Some(p) = &self.sentinel_password {
            b = b.set_client_to_sentinel_password(p);
        }
        b.build()?.async_get_client().await
    }
}

/// The server(s) a store talks to.
#[derive(Clone)]
pub(super) enum Target {
    /// One server, by URL.
    Fixed(redis::Client),
    /// The master the sentinels name.
    Sentinel(Sentinels),
}

impl Target {
    /// A client for the server to use now (in Sentinel mode: asks the sentinels).
    pub(super) async fn client(&self) -> RedisResult<redis::Client> {
        match self {
            Target::Fixed(c) => Ok(c.clone()),
            Target::Sentinel(s) => s.master().await,
        }
    }
}

/// The store's multiplexed connection.
///
/// Invariant (Sentinel mode): a connection is used only while every call on it succeeds. A
/// call that fails for the connection's sake (dropped, IO error, no answer in time, or
/// `READONLY`: the server was demoted) forgets it, and the next call asks the sentinels for the
/// master again; so after a failover keygate writes to and reads from the new master only, and
/// while there is none every call fails (fail closed). A generation number makes sure a late
/// failure on an old connection never forgets a newer one.
pub(super) enum Link {
    /// Standalone: the connection manager reconnects to the one server by itself.
    Fixed(ConnectionManager),
    /// Sentinel mode: the connection to the current master, once found.
    Sentinel(Box<Master>),
}

/// Sentinel mode's connection to the current master.
pub(super) struct Master {
    sentinels: Sentinels,
    config: ConnectionManagerConfig,
    current: Mutex<Option<(u64, ConnectionManager)>>,
    generation: AtomicU64,
}

impl Link {
    pub(super) fn sentinel(sentinels: Sentinels, config: ConnectionManagerConfig) -> Self {
        Link::Sentinel(Box::new(Master {
            sentinels,
            config,
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
        }))
    }

    /// The connection to use, with its generation.
    async fn get(&self) -> RedisResult<(u64, ConnectionManager)> {
        match self {
            Link::Fixed(c) => Ok((0, c.clone())),
            Link::Sentinel(m) => {
                let Master {
                    sentinels,
                    config,
                    current,
                    generation,
                } = &**m;
                if let Some(c) = lock(current).as_ref() {
                    return Ok(c.clone());
                }
                // Concurrent calls may each find the master; the last one found is kept, and
                // each is a checked master, so any of them is right to use.
                let client = sentinels.master().await?;
                let conn = ConnectionManager::new_lazy_with_config(client, config.clone())?;
                let gen = generation.fetch_add(1, Ordering::Relaxed) + 1;
                *lock(current) = Some((gen, conn.clone()));
                Ok((gen, conn))
            }
        }
    }

    /// Forgets connection `gen` (Sentinel mode), so that the next call finds the master anew.
    fn forget(&self, gen: u64) {
        if let Link::Sentinel(m) = self {
            let mut cur = lock(&m.current);
            if cur.as_ref().is_some_and(|(g, _)| *g == gen) {
                *cur = None;
            }
        }
    }

    /// Runs `f` on the connection before `deadline`, finding the master first if need be.
    pub(super) async fn run<T, F, Fut>(
        &self,
        deadline: tokio::time::Instant,
        f: F,
    ) -> Result<RedisResult<T>, tokio::time::error::Elapsed>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>>,
    {
        let (gen, conn) = match tokio::time::timeout_at(deadline, self.get()).await? {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        let r = tokio::time::timeout_at(deadline, f(conn)).await;
        match &r {
            Ok(Err(e)) if connection_failed(e) => self.forget(gen),
            Err(_) => self.forget(gen),
            _ => {}
        }
        r
    }
}

/// Whether an error says the connection, or the server's role, is no good any more.
fn connection_failed(e: &redis::RedisError) -> bool {
    e.is_connection_dropped()
        || e.is_io_error()
        || e.is_timeout()
        || e.is_connection_refusal()
        || e.code() == Some("READONLY")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Never held across an await, and nothing in it can be left half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Parses one `store.sentinels` entry, `host:port`.
pub(crate) fn parse_addr(entry: &str) -> Result<ConnectionAddr, String> {
    let (host, port) = entry
        .rsplit_once(':')
        .ok_or_else(|| format!("{entry:?} is not host:port"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.len() > 253 || host.contains(['/', '@', ' ']) {
        return Err(format!("{entry:?} is not host:port"));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{entry:?}: the port is not 1 to 65535"))?;
    Ok(ConnectionAddr::Tcp(host.to_owned(), port))
}

/// Names the sentinels for error messages: `master NAME via sentinels h:p, h:p`.
pub(super) fn describe(s: &Sentinels) -> String {
    let addrs: Vec<String> = s.addrs.iter().map(|a| a.to_string()).collect();
    format!("master {} via sentinels {}", s.master, addrs.join(", "))
}

/// The connection manager settings shared by both modes.
pub(super) fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_addresses_are_host_and_port() {
        assert_eq!(
            parse_addr("10.0.0.1:26379").unwrap(),
            ConnectionAddr::Tcp("10.0.0.1".into(), 26379)
        );
        assert_eq!(
            parse_addr("[::1]:26379").unwrap(),
            ConnectionAddr::Tcp("::1".into(), 26379)
        );
        for bad in [
            "",
            "host",
            ":1",
            "host:0",
            "host:x",
            "host:70000",
            "redis://u:p@h:1",
        ] {
            assert!(parse_addr(bad).is_err(), "{bad}");
        }
    }
}
