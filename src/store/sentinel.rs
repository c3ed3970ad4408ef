//! Where the Redis store's connections go: one fixed server (standalone), or whichever server
//! the Redis Sentinels name master (Sentinel mode).
//!
//! In Sentinel mode the master is asked of the sentinels (`SENTINEL GET-MASTER-ADDR-BY-NAME`),
//! and the server they name is checked with `ROLE` before it is used, so keygate never reads
//! from or writes to a replica it was wrongly pointed at. A
//! master marked down by the sentinels is not used: until a replica has been promoted every
//! lookup fails, and keygate answers `503` (fail closed). Connections to a master are kept
//! until a call on them fails (see [`Link`]), or until a check every `health_check_interval`
//! finds the sentinels naming another master, then the master is looked up afresh; a failover
//! therefore needs no restart. Sentinels themselves kill the clients of a demoted master
//! (`CLIENT KILL TYPE normal` and `pubsub`), so the store's and the subscriber's connections
//! to an old master break and are looked up again too.
//!
//! With `store.sentinel_tls` the sentinels are spoken to over TLS with the store's certificates
//! (`store.tls_ca`, `store.tls_cert`, `store.tls_key`), the handshake bounded by each
//! sentinel's `ask_timeout` like its answer; a sentinel that fails it is skipped like one that
//! is down, and every error names the sentinel (and the master) by `host:port` only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, RedisError, RedisResult};

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
    /// TLS to the sentinels (`store.sentinel_tls`), with the same certificates as the master.
    pub(super) sentinel_tls: Option<Option<redis::TlsCertificates>>,
    /// Bound on asking one sentinel (and checking its master): `store.timeout` shared among
    /// the sentinels, so that an unreachable first sentinel leaves time to ask the others.
    pub(super) ask_timeout: Duration,
}

impl Sentinels {
    /// A client for the current master, checked to be one: the first sentinel (in the
    /// configured order) that names a master which answers `ROLE` as one wins.
    ///
    /// `SENTINEL GET-MASTER-ADDR-BY-NAME` is asked rather than `SENTINEL MASTERS`: during a
    /// switchover the sentinels answer the promoted replica there at once, while `MASTERS` keeps
    /// naming the old master, which still answers `ROLE` as one, until the failover ends.
    async fn master(&self) -> RedisResult<redis::Client> {
        // Every sentinel's failure, each naming its sentinel, so that one refused for its
        // certificate is told apart from one that is down.
        let mut failures = Vec::new();
        let mut kind = std::io::ErrorKind::Other;
        for addr in &self.addrs {
            match tokio::time::timeout(self.ask_timeout, self.ask(addr)).await {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(e)) => {
                    kind = error_kind(&e);
                    failures.push(e.to_string());
                }
                Err(_) => {
                    kind = std::io::ErrorKind::TimedOut;
                    failures.push(format!(
                        "sentinel {addr}: no answer within {:?}",
                        self.ask_timeout
                    ));
                }
            }
        }
        if failures.is_empty() {
            failures.push("no sentinel configured".into());
        }
        Err(std::io::Error::new(kind, failures.join("; ")).into())
    }

    /// Asks one sentinel for the master, and checks the master's role. Errors name the
    /// sentinel (and the master) by `host:port`, never a password.
    async fn ask(&self, sentinel: &ConnectionAddr) -> RedisResult<redis::Client> {
        let at_sentinel = |e: RedisError| context(e, format!("sentinel {sentinel}"));
        let mut info = redis::RedisConnectionInfo::default();
        if let Some(u) = &self.sentinel_username {
            info = info.set_username(u);
        }
        if let Some(p) = &self.sentinel_password {
            info = info.set_password(p);
        }
        let (scheme, addr) = match (&self.sentinel_tls, sentinel) {
            (Some(_), ConnectionAddr::Tcp(host, port)) => (
                "rediss",
                ConnectionAddr::TcpTls {
                    host: host.clone(),
                    port: *port,
                    insecure: false,
                    tls_params: None,
                },
            ),
            (_, addr) => ("redis", addr.clone()),
        };
        let conn_info =
            redis::IntoConnectionInfo::into_connection_info(format!("{scheme}://127.0.0.1:1"))?
                .set_addr(addr)
                .set_redis_settings(info);
        let client = match &self.sentinel_tls {
            Some(Some(certs)) => redis::Client::build_with_tls(conn_info, certs.clone()),
            _ => redis::Client::open(conn_info),
        }
        .map_err(at_sentinel)?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(at_sentinel)?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.master)
            .query_async(&mut conn)
            .await
            .map_err(at_sentinel)?;
        let Some((host, port)) = addr else {
            return Err(std::io::Error::other(format!(
                "sentinel {sentinel} does not know master {}",
                self.master
            ))
            .into());
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let at_master = |e: RedisError| {
            context(
                e,
                format!("master {host}:{port}, named by sentinel {sentinel}"),
            )
        };
        let scheme = if self.master_tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let master_info =
            redis::IntoConnectionInfo::into_connection_info(format!("{scheme}://{host}:{port}"))?
                .set_redis_settings(self.master_info.clone());
        let client = match &self.master_tls {
            Some(Some(certs)) => redis::Client::build_with_tls(master_info, certs.clone()),
            _ => redis::Client::open(master_info),
        }
        .map_err(at_master)?;
        let mut m = client
            .get_multiplexed_async_connection()
            .await
            .map_err(at_master)?;
        let role: Vec<redis::Value> = redis::cmd("ROLE")
            .query_async(&mut m)
            .await
            .map_err(at_master)?;
        match role.first() {
            Some(redis::Value::BulkString(r)) if r == b"master" => Ok(client),
            _ => Err(std::io::Error::other(format!(
                "{host}:{port}, named master by sentinel {sentinel}, is not a master"
            ))
            .into()),
        }
    }
}

/// The kind of IO error that stands for `e` once it is given context: a timeout stays one
/// (a call that timed out is not retried), everything else is a failed connection.
fn error_kind(e: &RedisError) -> std::io::ErrorKind {
    if e.is_timeout() {
        std::io::ErrorKind::TimedOut
    } else if e.is_connection_refusal() {
        std::io::ErrorKind::ConnectionRefused
    } else {
        std::io::ErrorKind::Other
    }
}

/// `e` with `what` (a `host:port`, never a URL) in front of its message.
fn context(e: RedisError, what: String) -> RedisError {
    std::io::Error::new(error_kind(&e), format!("{what}: {e}")).into()
}

/// The server(s) a store talks to.
#[derive(Clone)]
pub(super) enum Target {
    /// One server, by URL.
    Fixed(redis::Client),
    /// The master the sentinels name.
    Sentinel(Sentinels),
    /// A Redis Cluster, through its seed nodes (see `redis/cluster.rs`).
    Cluster(super::cluster::Nodes),
}

impl Target {
    /// A client for the server to use now (in Sentinel mode: asks the sentinels). A cluster
    /// has no one server: its subscriber connects through [`Target::Cluster`] itself.
    pub(super) async fn client(&self) -> RedisResult<redis::Client> {
        match self {
            Target::Fixed(c) => Ok(c.clone()),
            Target::Sentinel(s) => s.master().await,
            Target::Cluster(_) => Err(std::io::Error::other("a cluster has no one server").into()),
        }
    }
}

/// A connection a store call runs on: to one server, or to a cluster (which routes each
/// command to the node serving its key's slot).
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Target {
    /// Returns once the sentinels name a master other than `at` (never for a fixed server or
    /// a cluster), asking every `interval`; a check that fails (no sentinel answers) changes
    /// nothing.
    pub(super) async fn moved(
        &self,
        at: Option<&ConnectionAddr>,
        interval: Duration,
        timeout: Duration,
    ) -> String {
        let (Target::Sentinel(s), Some(at)) = (self, at) else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(interval).await;
            if let Ok(Ok(c)) = tokio::time::timeout(timeout, s.master()).await {
                let now = c.get_connection_info().addr();
                if now != at {
                    return format!("the sentinels name another master ({now})");
                }
            }
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
/// failure on an old connection never forgets a newer one. The `(_, found)` fallback hands a
/// connection of generation 0, which never matches a recorded one, so it can forget nothing.
pub(super) enum Link {
    /// Standalone: the connection manager reconnects to the one server by itself.
    Fixed(ConnectionManager),
    /// Sentinel mode: the connection to the current master, once found.
    Sentinel(Box<Master>),
    /// Cluster mode: the cluster connection follows the slot map (redirections, failovers)
    /// by itself.
    Cluster(redis::cluster_async::ClusterConnection),
}

/// Sentinel mode's connection to the current master.
pub(super) struct Master {
    sentinels: Sentinels,
    config: ConnectionManagerConfig,
    /// Bound on one lookup through the sentinels (`store.timeout`).
    timeout: Duration,
    state: Mutex<State>,
    generation: AtomicU64,
}

/// One lookup of the master, shared by every call that waits for it.
type Finding = Shared<BoxFuture<'static, RedisResult<(ConnectionManager, ConnectionAddr)>>>;

/// Where Sentinel mode stands.
enum State {
    /// No master known: the next call looks it up.
    Idle,
    /// A lookup in flight; calls wait for it instead of asking the sentinels again.
    Finding(Finding),
    /// The latest lookup failed at this time; calls fail at once for [`RETRY_AFTER`], so a busy
    /// fleet without a master does not flood the sentinels with one lookup per request.
    Failed(Instant, RedisError),
    /// The master's connection, with its generation and the master's address.
    Connected(u64, ConnectionManager, ConnectionAddr),
}

/// How long a failed lookup answers for the calls after it.
const RETRY_AFTER: Duration = Duration::from_millis(100);

impl Link {
    pub(super) fn sentinel(
        sentinels: Sentinels,
        config: ConnectionManagerConfig,
        timeout: Duration,
    ) -> Self {
        Link::Sentinel(Box::new(Master {
            sentinels,
            config,
            timeout,
            state: Mutex::new(State::Idle),
            generation: AtomicU64::new(0),
        }))
    }

    /// The connection to use, with its generation.
    async fn get(&self) -> RedisResult<(u64, Conn)> {
        let m = match self {
            Link::Fixed(c) => return Ok((0, Conn::Single(c.clone()))),
            Link::Cluster(c) => return Ok((0, Conn::Cluster(c.clone()))),
            Link::Sentinel(m) => m,
        };
        // At most one lookup at a time (single flight); the lock is never held across the
        // await, the shared future is what the waiters share.
        let finding = {
            let mut state = lock(&m.state);
            match &*state {
                State::Connected(g, c, _) => return Ok((*g, Conn::Single(c.clone()))),
                State::Failed(at, e) if at.elapsed() < RETRY_AFTER => return Err(e.clone()),
                State::Finding(f) => f.clone(),
                State::Idle | State::Failed(..) => {
                    let (sentinels, config, timeout) =
                        (m.sentinels.clone(), m.config.clone(), m.timeout);
                    // Bounded by itself: a lookup left behind by callers that timed out
                    // still ends, so a blackholed sentinel cannot wedge the store.
                    let f = async move {
                        let find = async {
                            let client = sentinels.master().await?;
                            let addr = client.get_connection_info().addr().clone();
                            Ok((
                                ConnectionManager::new_lazy_with_config(client, config)?,
                                addr,
                            ))
                        };
                        match tokio::time::timeout(timeout, find).await {
                            Ok(r) => r,
                            Err(_) => Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "no master found through the sentinels in time",
                            )
                            .into()),
                        }
                    }
                    .boxed()
                    .shared();
                    *state = State::Finding(f.clone());
                    f
                }
            }
        };
        let found = finding.await;
        let mut state = lock(&m.state);
        // The first waiter to wake records the outcome; the others read it.
        match (&*state, found) {
            (State::Finding(_), Ok((conn, addr))) => {
                let gen = m.generation.fetch_add(1, Ordering::Relaxed) + 1;
                *state = State::Connected(gen, conn.clone(), addr);
                Ok((gen, Conn::Single(conn)))
            }
            (State::Finding(_), Err(e)) => {
                *state = State::Failed(Instant::now(), e.clone());
                Err(e)
            }
            (State::Connected(g, c, _), _) => Ok((*g, Conn::Single(c.clone()))),
            (_, found) => found.map(|(c, _)| (0, Conn::Single(c))),
        }
    }

    /// Forgets connection `gen` (Sentinel mode), so that the next call finds the master anew.
    fn forget(&self, gen: u64) {
        if let Link::Sentinel(m) = self {
            let mut state = lock(&m.state);
            if matches!(&*state, State::Connected(g, ..) if *g == gen) {
                *state = State::Idle;
            }
        }
    }

    /// Forgets the connection (Sentinel mode) unless it goes to `master`, the server the
    /// sentinels name now: after a switchover the old master may stay up, and accept writes,
    /// for seconds before the sentinels demote it; writes sent there in the meantime would be
    /// lost, so the store moves as soon as a periodic check sees the change.
    pub(super) fn forget_unless_at(&self, master: &ConnectionAddr) {
        if let Link::Sentinel(m) = self {
            let mut state = lock(&m.state);
            if matches!(&*state, State::Connected(_, _, at) if at != master) {
                *state = State::Idle;
            }
        }
    }

    /// Whether the link follows the sentinels (and so needs the periodic check).
    pub(super) fn follows_sentinels(&self) -> bool {
        matches!(self, Link::Sentinel(_))
    }

    /// Runs `f` on the connection before `deadline`, finding the master first if need be.
    pub(super) async fn run<T, F, Fut>(
        &self,
        deadline: tokio::time::Instant,
        f: F,
    ) -> Result<RedisResult<T>, tokio::time::error::Elapsed>
    where
        F: FnOnce(Conn) -> Fut,
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
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// A "sentinel" on loopback that accepts connections, counts them and hangs up.
    async fn hang_up_sentinel() -> (ConnectionAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(conn);
            }
        });
        (ConnectionAddr::Tcp("127.0.0.1".into(), port), accepted)
    }

    #[tokio::test]
    async fn a_silent_sentinel_leaves_time_to_ask_the_next() {
        // Accepts and holds every connection, never answering: with TLS, the handshake never
        // completes.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_port = silent.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = silent.accept().await {
                held.push(conn);
            }
        });
        crate::tls::install_default_provider();
        for sentinel_tls in [None, Some(None)] {
            let (next, accepted) = hang_up_sentinel().await;
            let tls = sentinel_tls.is_some();
            let sentinels = Sentinels {
                addrs: vec![ConnectionAddr::Tcp("127.0.0.1".into(), silent_port), next],
                master: "m".into(),
                sentinel_username: None,
                sentinel_password: None,
                master_info: Default::default(),
                master_tls: None,
                sentinel_tls,
                ask_timeout: Duration::from_millis(200),
            };
            // Bound: 200 ms for the silent one, then a refusal; without the bound the redis
            // crate's own connection set-up takes about a second per silent sentinel.
            let lookup = tokio::time::timeout(Duration::from_millis(800), sentinels.master()).await;
            let err = lookup
                .unwrap_or_else(|_| panic!("the lookup ends within 800 ms (tls: {tls})"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!(
                    "sentinel 127.0.0.1:{silent_port}: no answer within"
                )),
                "{err}"
            );
            assert!(
                accepted.load(Ordering::SeqCst) >= 1,
                "the second sentinel was not asked (tls: {tls})"
            );
        }
    }

    #[tokio::test]
    async fn without_a_master_concurrent_calls_share_one_lookup_and_then_fail_fast() {
        let (addr, accepted) = hang_up_sentinel().await;
        let sentinels = Sentinels {
            addrs: vec![addr.clone(), addr.clone(), addr],
            master: "m".into(),
            sentinel_username: None,
            sentinel_password: None,
            master_info: Default::default(),
            master_tls: None,
            sentinel_tls: None,
            ask_timeout: Duration::from_millis(500),
        };
        let timeout = Duration::from_secs(2);
        let link = Link::sentinel(sentinels, manager_config(timeout), timeout);
        let calls = (0..20).map(|_| link.get());
        let results = futures_util::future::join_all(calls).await;
        assert!(results.iter().all(Result::is_err));
        let first = accepted.load(Ordering::SeqCst);
        // One lookup asks each of the three sentinels; twenty would have asked sixty times.
        assert!(
            (1..=6).contains(&first),
            "{first} connections to the sentinels"
        );
        // Right after a failed lookup, calls fail without asking again. (The window is 100 ms:
        // on a machine so loaded that the second batch starts later than that, a new lookup is
        // the right behaviour, so the count is only checked when the batch ran inside it.)
        let failed_at = std::time::Instant::now();
        let results = futures_util::future::join_all((0..20).map(|_| link.get())).await;
        assert!(results.iter().all(Result::is_err));
        if failed_at.elapsed() < Duration::from_millis(90) {
            assert_eq!(accepted.load(Ordering::SeqCst), first);
        }
    }

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
