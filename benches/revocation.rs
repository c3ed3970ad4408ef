//! Revocation propagation as a user sees it: from the moment a revocation's publish is seen by
//! an outside subscriber to each keygate instance's first `401` for the key.
//!
//! Everything is real, separate and on loopback: a `redis-server` on a free port, a fast
//! upstream (this binary, re-run with `--serve-upstream`), three `keygate serve` processes (the
//! real binary) on one Redis namespace, and in this process: one poller thread per instance
//! hammering it back to back over one keep-alive connection, an outside subscriber (its own
//! Redis connection, SUBSCRIBEd to the invalidation channel), and the revoker. Every key is
//! cached live on every instance first, so only the announcement can turn its 200 into a 401.
//! For each key: the pollers switch to it and each sees a 200; the key is revoked as a user
//! would (the admin API of instance 1, or `REVOKE_VIA=store`: the store's Lua script); time
//! zero is when the outside subscriber receives the publish. A sample is the time from there to
//! the moment a poller has read its first 401 (`key_revoked`) in full; it is negative when an
//! instance was quicker than the outside subscriber. Each poller then sends a short flood of
//! requests with the revoked key (all must be 401), and the instances' store lookups and
//! Redis's `HGETALL` calls over the whole run show what the floods cost Redis.
//!
//! `cargo bench --bench revocation` runs 1,000 revocations and prints p50/p99/max per instance
//! and overall. Settings by environment: `REVOCATIONS` (default 1,000), `FLOOD` (requests per
//! poller after its first 401, default 20), `REVOKE_VIA` (`api` or `store`), `WORKERS` (the
//! instances' `server.workers`), `RUNTIME_THREADS` (the instances' `TOKIO_WORKER_THREADS`: the
//! runtime of the subscriber and the admin listener), `POLLER` (`threads`: a thread each,
//! blocking in its reads, the default; `one`: all on one thread, so one wake-up serves
//! whichever answers), `KEYGATE_WRAP`
//! (a command put before each instance, e.g. `nice -n -5` or `taskset -c 1`), `KEYGATE_BIN`
//! (another keygate binary, to compare builds).
//!
//! Under `cargo test` it runs a short smoke pass (20 revocations, 5 flood requests) and exits
//! non-zero if anything fails: an answer other than 200 before the revocation or 401 after it,
//! no 401 within 5 s, a publish not seen, or any read of a revoked record by an instance.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{create_key, free_port, namespace, redis_store, temp_dir, RedisServer};

const INSTANCES: usize = 3;
/// Longest wait for anything (a 401, a publish, a poller's 200, a process).
const DEADLINE: Duration = Duration::from_secs(5);
/// `current` values that are not a key index.
const IDLE: usize = usize::MAX;
const STOP: usize = usize::MAX - 1;

type Outcome<T> = Result<T, String>;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-upstream") {
        serve_upstream(args[i + 1].parse().expect("an address"));
        return ExitCode::SUCCESS;
    }
    let bench = args.iter().any(|a| a == "--bench");
    let plan = Plan {
        revocations: env_num("REVOCATIONS", if bench { 1000 } else { 20 }),
        flood: env_num("FLOOD", if bench { 20 } else { 5 }),
        via_api: match env_or("REVOKE_VIA", "api").as_str() {
            "api" => true,
            "store" => false,
            other => {
                eprintln!("REVOKE_VIA={other}: expected api or store");
                return ExitCode::FAILURE;
            }
        },
        one_thread: match env_or("POLLER", "threads").as_str() {
            "threads" => false,
            "one" => true,
            other => {
                eprintln!("POLLER={other}: expected threads or one");
                return ExitCode::FAILURE;
            }
        },
    };
    match run(&plan) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("revocation bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Plan {
    revocations: usize,
    flood: usize,
    via_api: bool,
    /// All pollers on one thread (else a thread each).
    one_thread: bool,
}

/// The fast upstream, as its own process, on one thread.
fn serve_upstream(addr: SocketAddr) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        support::serve_fast_upstream(listener).await
    });
}

/// A child process killed on drop.
struct Proc(Child, &'static str);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn check_alive(&mut self) -> Outcome<()> {
        match self.0.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("{} exited: {status}", self.1)),
            Err(e) => Err(format!("{}: {e}", self.1)),
        }
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One keygate instance: the process and its two listeners.
struct Instance {
    proc: Proc,
    proxy: SocketAddr,
    admin: SocketAddr,
}

fn start_instance(
    upstream: SocketAddr,
    redis_url: &str,
    ns: &str,
    log: &std::path::Path,
) -> Outcome<Instance> {
    let (proxy, admin) = (loopback(free_port()), loopback(free_port()));
    let wrap = env_or("KEYGATE_WRAP", "");
    let mut words: Vec<&str> = wrap.split_whitespace().collect();
    let keygate = std::env::var("KEYGATE_BIN").unwrap_or(env!("CARGO_BIN_EXE_keygate").into());
    let keygate = keygate.as_str();
    words.push(keygate);
    let mut cmd = Command::new(words[0]);
    cmd.args(&words[1..])
        .args(["serve", "--listen", &proxy.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--upstream", &format!("http://{upstream}")])
        .args(["--redis-url", redis_url, "--namespace", ns])
        .env("RUST_LOG", "warn")
        .env("KEYGATE__LOG__ACCESS", "false")
        // Long cache lives: only the announcement can end a cached verdict.
        .env("KEYGATE__CACHE__TTL", "1h");
    if let Ok(w) = std::env::var("WORKERS") {
        cmd.env("KEYGATE__SERVER__WORKERS", w);
    }
    if let Ok(t) = std::env::var("RUNTIME_THREADS") {
        cmd.env("TOKIO_WORKER_THREADS", t);
    }
    let stderr = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let child = cmd
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot start {keygate}: {e}"))?;
    let mut instance = Instance {
        proc: Proc(child, "keygate"),
        proxy,
        admin,
    };
    let deadline = Instant::now() + DEADLINE * 4;
    loop {
        instance.proc.check_alive().map_err(|e| {
            format!(
                "{e}; its log: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })?;
        if let Ok(mut c) = Conn::open(admin) {
            if let Ok((200, _, _)) = c.exchange(b"GET /readyz HTTP/1.1\r\nhost: kg\r\n\r\n") {
                return Ok(instance);
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "keygate on {proxy} was not ready within {:?}",
                DEADLINE * 4
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A keep-alive HTTP/1.1 client connection that reads each response whole.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Outcome<Conn> {
        let stream =
            TcpStream::connect_timeout(&addr, DEADLINE).map_err(|e| format!("{addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(DEADLINE))
            .map_err(|e| e.to_string())?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends a request and reads its response: the status, the body, and the moment the last
    /// byte was read.
    fn exchange(&mut self, request: &[u8]) -> Outcome<(u16, Vec<u8>, Instant)> {
        self.stream
            .write_all(request)
            .map_err(|e| format!("write: {e}"))?;
        self.buf.clear();
        loop {
            if let Some((status, body, total)) = parse_response(&self.buf)? {
                if self.buf.len() >= total {
                    return Ok((status, self.buf[body..total].to_vec(), Instant::now()));
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("connection closed".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

/// A poller's connection: one request at a time, each response read whole.
trait Exchange {
    async fn exchange(&mut self, request: &[u8]) -> Outcome<(u16, Vec<u8>, Instant)>;
}

/// The blocking connection, for a poller alone on its thread: its runtime has no other task,
/// so blocking in the read is just a blocking read (one syscall per response).
impl Exchange for Conn {
    async fn exchange(&mut self, request: &[u8]) -> Outcome<(u16, Vec<u8>, Instant)> {
        Conn::exchange(self, request)
    }
}

/// A non-blocking connection, for pollers that share a thread.
struct AsyncConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl AsyncConn {
    async fn open(addr: SocketAddr) -> Outcome<AsyncConn> {
        let stream = tokio::time::timeout(DEADLINE, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| format!("{addr}: no connection within {DEADLINE:?}"))?
            .map_err(|e| format!("{addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(AsyncConn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }
}

impl Exchange for AsyncConn {
    async fn exchange(&mut self, request: &[u8]) -> Outcome<(u16, Vec<u8>, Instant)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream
            .write_all(request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.buf.clear();
        loop {
            if let Some((status, body, total)) = parse_response(&self.buf)? {
                if self.buf.len() >= total {
                    return Ok((status, self.buf[body..total].to_vec(), Instant::now()));
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(DEADLINE, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(format!("no response within {DEADLINE:?}")),
                Ok(Ok(0)) => return Err("connection closed".into()),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(format!("read: {e}")),
            }
        }
    }
}

/// A response's status, where its body starts and where it ends, once its head is complete.
fn parse_response(buf: &[u8]) -> Outcome<Option<(u16, usize, usize)>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|e| e.to_string())?;
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {head:?}"))?;
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .ok_or_else(|| format!("no content-length: {head:?}"))?;
    Ok(Some((status, head_end + 4, head_end + 4 + length)))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What a poller reports.
enum Report {
    /// A poller saw key `k` answered 200 (once per key).
    Live(usize),
    /// Poller `i`'s first 401 for key `k`: when the request was sent, and when its response
    /// was read in full.
    Refused(usize, usize, Instant, Instant),
    /// A poller finished the flood after key `k`'s first 401.
    Flooded(usize),
    Failed(String),
}

/// What every poller shares: the key being polled and the signal that it changed.
#[derive(Clone)]
struct Turn {
    current: Arc<AtomicUsize>,
    changed: tokio::sync::watch::Receiver<()>,
}

/// One poller: hammers instance `i` with the current key, back to back, over one connection.
/// Returns the round trips (microseconds) of its requests answered 200 (the cached path).
async fn poller(
    i: usize,
    addr: SocketAddr,
    blocking: bool,
    requests: Arc<Vec<Vec<u8>>>,
    turn: Turn,
    flood: usize,
    out: Sender<Report>,
) -> Vec<u32> {
    let mut round_trips = Vec::with_capacity(1 << 18);
    let polled = if blocking {
        match Conn::open(addr) {
            Ok(conn) => poll(i, conn, &mut round_trips, &requests, turn, flood, &out).await,
            Err(e) => Err(e),
        }
    } else {
        match AsyncConn::open(addr).await {
            Ok(conn) => poll(i, conn, &mut round_trips, &requests, turn, flood, &out).await,
            Err(e) => Err(e),
        }
    };
    if let Err(e) = polled {
        let _ = out.send(Report::Failed(format!("poller {}: {e}", i + 1)));
    }
    round_trips
}

#[allow(clippy::too_many_arguments)]
async fn poll(
    i: usize,
    mut conn: impl Exchange,
    round_trips: &mut Vec<u32>,
    requests: &[Vec<u8>],
    mut turn: Turn,
    flood: usize,
    out: &Sender<Report>,
) -> Outcome<()> {
    let (mut live, mut done) = (IDLE, IDLE);
    loop {
        turn.changed.borrow_and_update();
        let k = turn.current.load(Ordering::Acquire);
        if k == STOP {
            return Ok(());
        }
        if k == IDLE || k == done {
            // A change after the load above is not missed: it marks the receiver changed.
            if turn.changed.changed().await.is_err() {
                return Ok(());
            }
            continue;
        }
        let sent = Instant::now();
        match conn.exchange(&requests[k]).await? {
            (200, _, at) => {
                round_trips.push((at - sent).as_micros() as u32);
                if live != k {
                    live = k;
                    let _ = out.send(Report::Live(k));
                }
            }
            (401, body, at) if live == k && find(&body, b"key_revoked").is_some() => {
                let _ = out.send(Report::Refused(i, k, sent, at));
                for _ in 0..flood {
                    match conn.exchange(&requests[k]).await? {
                        (401, _, _) => {}
                        (s, body, _) => {
                            return Err(format!(
                                "{s} in the flood after the revocation: {}",
                                String::from_utf8_lossy(&body)
                            ))
                        }
                    }
                }
                done = k;
                let _ = out.send(Report::Flooded(k));
            }
            (s, body, _) => {
                return Err(format!(
                    "unexpected {s} for key {k}: {}",
                    String::from_utf8_lossy(&body)
                ))
            }
        }
    }
}

/// Starts the pollers on single-threaded runtimes: each on a thread of its own, reading
/// with blocking calls, or all on one thread, reading without blocking.
fn start_pollers(
    plan: &Plan,
    instances: &[Instance],
    requests: &Arc<Vec<Vec<u8>>>,
    turn: &Turn,
    out: &Sender<Report>,
) -> Vec<JoinHandle<Vec<u32>>> {
    let tasks: Vec<_> = instances
        .iter()
        .enumerate()
        .map(|(i, kg)| {
            let (requests, turn, out) = (requests.clone(), turn.clone(), out.clone());
            poller(
                i,
                kg.proxy,
                !plan.one_thread,
                requests,
                turn,
                plan.flood,
                out,
            )
        })
        .collect();
    let on_thread = |tasks: Vec<_>| {
        thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("poller runtime");
            runtime
                .block_on(futures_util::future::join_all(tasks))
                .concat()
        })
    };
    if plan.one_thread {
        vec![on_thread(tasks)]
    } else {
        tasks.into_iter().map(|t| on_thread(vec![t])).collect()
    }
}

/// The outside subscriber: reports each message on the channel with the moment it arrived.
fn subscriber(
    redis_url: String,
    channel: String,
    ready: Sender<()>,
    out: Sender<(String, Instant)>,
) {
    let run = || -> redis::RedisResult<()> {
        let client = redis::Client::open(redis_url.as_str())?;
        let mut conn = client.get_connection()?;
        let mut pubsub = conn.as_pubsub();
        pubsub.subscribe(&channel)?;
        let _ = ready.send(());
        loop {
            let msg = pubsub.get_message()?;
            let at = Instant::now();
            if out.send((msg.get_payload::<String>()?, at)).is_err() {
                return Ok(());
            }
        }
    };
    // An error ends the reports; the measurement says so if it still needed one.
    let _ = run();
}

/// An instance's counters (from its `/metrics`) that say how it got its verdicts.
#[derive(Clone, Debug, Default, PartialEq)]
struct Counters {
    store_lookups: f64,
    cache_misses: f64,
    stale_fills: f64,
    unsynced_lookups: f64,
    cache_flushes: f64,
}

impl Counters {
    fn scrape(admin: SocketAddr) -> Outcome<Counters> {
        let mut c = Conn::open(admin)?;
        let (status, body, _) = c.exchange(b"GET /metrics HTTP/1.1\r\nhost: kg\r\n\r\n")?;
        if status != 200 {
            return Err(format!("/metrics answered {status}"));
        }
        let text = String::from_utf8_lossy(&body);
        let sum = |name: &str| -> f64 {
            text.lines()
                .filter(|l| l.split(['{', ' ']).next() == Some(name))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum()
        };
        Ok(Counters {
            store_lookups: sum("keygate_store_lookups_total"),
            cache_misses: sum("keygate_cache_misses_total"),
            stale_fills: sum("keygate_stale_fills_total"),
            unsynced_lookups: sum("keygate_unsynced_lookups_total"),
            cache_flushes: sum("keygate_cache_flushes_total"),
        })
    }

    fn since(&self, before: &Counters) -> Counters {
        Counters {
            store_lookups: self.store_lookups - before.store_lookups,
            cache_misses: self.cache_misses - before.cache_misses,
            stale_fills: self.stale_fills - before.stale_fills,
            unsynced_lookups: self.unsynced_lookups - before.unsynced_lookups,
            cache_flushes: self.cache_flushes - before.cache_flushes,
        }
    }
}

/// What the command monitor reports: a record read or revoked, in the order Redis ran them.
enum Seen {
    /// `HGETALL` of this Redis key.
    Read(String),
    /// `HSETNX` (the revoke script setting `revoked_at`) of this Redis key.
    Revoked(String),
    /// The marker the bench sends last.
    Marker,
}

const MARKER: &str = "keygate-bench-end";

/// Follows Redis's `MONITOR` feed (cheap here: the pollers' requests never reach Redis),
/// reporting record reads and revocations.
fn monitor(addr: SocketAddr, ready: Sender<()>, out: Sender<Seen>) {
    let run = || -> std::io::Result<()> {
        let mut stream = TcpStream::connect(addr)?;
        stream.write_all(b"MONITOR\r\n")?;
        let mut lines = std::io::BufReader::new(stream).lines();
        if lines.next().transpose()?.as_deref() != Some("+OK") {
            return Ok(());
        }
        let _ = ready.send(());
        for line in lines {
            let line = line?;
            // +<time> [<db> <client>] "<COMMAND>" "<key>" ...
            let Some((_, rest)) = line.split_once("] \"") else {
                continue;
            };
            let (command, rest) = rest.split_once('"').unwrap_or((rest, ""));
            let key = || {
                rest.trim_start_matches(" \"")
                    .split('"')
                    .next()
                    .unwrap_or("")
                    .to_owned()
            };
            let seen = match command.to_ascii_uppercase().as_str() {
                "HGETALL" => Seen::Read(key()),
                "HSETNX" => Seen::Revoked(key()),
                "ECHO" if key() == MARKER => Seen::Marker,
                _ => continue,
            };
            if out.send(seen).is_err() {
                return Ok(());
            }
        }
        Ok(())
    };
    let _ = run();
}

/// Reads of each key's record after its revocation (after the script set `revoked_at`).
fn reads_after_revocation(seen: &[Seen], record: &str) -> u64 {
    let mut revoked = false;
    let mut reads = 0;
    for s in seen {
        match s {
            Seen::Revoked(k) if k == record => revoked = true,
            Seen::Read(k) if revoked && k == record => reads += 1,
            _ => {}
        }
    }
    reads
}

/// Everything a measurement needs once the processes run.
struct Bench<'a> {
    plan: &'a Plan,
    admin_key: &'a keygate::key::Secret,
    store: &'a keygate::store::redis::RedisStore,
    runtime: &'a tokio::runtime::Runtime,
    /// The revoker's connection to instance 1's admin listener.
    revoker: Conn,
    /// The bench's own Redis connection.
    redis: redis::Connection,
    /// The command monitor's reports.
    monitored: Receiver<Seen>,
    /// Prefix of record keys (`<namespace>:key:`).
    record_prefix: String,
    current: Arc<AtomicUsize>,
    /// Tells the pollers that `current` changed.
    changed: tokio::sync::watch::Sender<()>,
    pollers: Vec<JoinHandle<Vec<u32>>>,
    reports: Receiver<Report>,
    published: Receiver<(String, Instant)>,
}

/// What the measurement found.
struct Found {
    /// Per instance: microseconds from the outside subscriber's receipt to the first 401.
    samples: Vec<Vec<i64>>,
    /// Microseconds from the outside subscriber's receipt to the sending of each first 401's
    /// request (negative: sent before it).
    sent_after: Vec<i64>,
    /// Reads of the revoked keys' records after their revocation, less the revoker's own.
    flood_reads: u64,
    /// The revoker's own reads of a record after revoking it (measured with no poller running).
    revoker_reads: u64,
}

impl Bench<'_> {
    fn next_report(&self, what: &str) -> Outcome<Report> {
        match self.reports.recv_timeout(DEADLINE) {
            Ok(Report::Failed(e)) => Err(e),
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(format!("no {what} within {DEADLINE:?}")),
            Err(RecvTimeoutError::Disconnected) => Err("the pollers stopped".into()),
        }
    }

    /// Revokes a key as a user would.
    fn revoke(&mut self, key: &keygate::manage::CreatedKey) -> Outcome<()> {
        if self.plan.via_api {
            let request = format!(
                "POST /v1/keys/{}/revoke HTTP/1.1\r\nhost: kg\r\nauthorization: Bearer {}\r\ncontent-length: 0\r\n\r\n",
                key.record.id,
                self.admin_key.expose()
            );
            let (status, body, _) = self.revoker.exchange(request.as_bytes())?;
            if status != 200 {
                return Err(format!(
                    "revoke answered {status}: {}",
                    String::from_utf8_lossy(&body)
                ));
            }
        } else {
            let store = self.store;
            self.runtime
                .block_on(keygate::store::Store::revoke(
                    store,
                    &key.record.id,
                    keygate::store::now_unix(),
                ))
                .map_err(|e| e.to_string())?
                .ok_or("the key to revoke does not exist")?;
        }
        Ok(())
    }

    /// When the outside subscriber received the revocation of `key`.
    fn published(&self, key: &keygate::manage::CreatedKey) -> Outcome<Instant> {
        // The revoked form, or the plain digest of an older keygate (for comparisons).
        let hex = key.record.digest.to_hex();
        loop {
            match self.published.recv_timeout(DEADLINE) {
                Ok((payload, at))
                    if payload.strip_suffix(":revoked").unwrap_or(&payload) == hex =>
                {
                    return Ok(at)
                }
                Ok(_) => continue,
                Err(_) => {
                    return Err(format!(
                        "the outside subscriber saw no revocation of {}",
                        key.record.id
                    ))
                }
            }
        }
    }

    /// Every report of the monitor up to a marker sent now.
    fn monitored(&mut self) -> Outcome<Vec<Seen>> {
        let _: String = redis::cmd("ECHO")
            .arg(MARKER)
            .query(&mut self.redis)
            .map_err(|e| e.to_string())?;
        let mut seen = Vec::new();
        loop {
            match self.monitored.recv_timeout(DEADLINE) {
                Ok(Seen::Marker) => return Ok(seen),
                Ok(s) => seen.push(s),
                Err(_) => return Err("the command monitor stopped".into()),
            }
        }
    }

    fn record_key(&self, key: &keygate::manage::CreatedKey) -> String {
        format!("{}{}", self.record_prefix, key.record.digest.to_hex())
    }

    fn measure(
        &mut self,
        calibration: &keygate::manage::CreatedKey,
        keys: &[keygate::manage::CreatedKey],
    ) -> Outcome<Found> {
        // The revoker's own reads, with nothing else running.
        self.revoke(calibration)?;
        self.published(calibration)?;
        let revoker_reads =
            reads_after_revocation(&self.monitored()?, &self.record_key(calibration));

        let mut sent_after = Vec::with_capacity(keys.len() * INSTANCES);
        let mut samples: Vec<Vec<i64>> = (0..INSTANCES)
            .map(|_| Vec::with_capacity(keys.len()))
            .collect();
        for (k, key) in keys.iter().enumerate() {
            self.current.store(k, Ordering::Release);
            self.changed.send_replace(());
            for _ in 0..INSTANCES {
                match self.next_report("200 for the key before its revocation")? {
                    Report::Live(kk) if kk == k => {}
                    _ => return Err("a poller reported out of turn".into()),
                }
            }
            self.revoke(key)?;
            let zero = self.published(key)?;
            let mut flooded = 0;
            while flooded < INSTANCES {
                match self.next_report("401 after the revocation")? {
                    Report::Refused(i, kk, sent, at) if kk == k => {
                        samples[i].push(micros_between(zero, at));
                        sent_after.push(micros_between(zero, sent));
                    }
                    Report::Flooded(kk) if kk == k => flooded += 1,
                    _ => return Err("a poller reported out of turn".into()),
                }
            }
            self.current.store(IDLE, Ordering::Release);
            self.changed.send_replace(());
        }
        let seen = self.monitored()?;
        let flood_reads = keys
            .iter()
            .map(|k| {
                reads_after_revocation(&seen, &self.record_key(k)).saturating_sub(revoker_reads)
            })
            .sum();
        Ok(Found {
            samples,
            sent_after,
            flood_reads,
            revoker_reads,
        })
    }

    /// Stops the pollers; returns their round trips of 200s, all together.
    fn stop(self) -> Vec<u32> {
        self.current.store(STOP, Ordering::Release);
        self.changed.send_replace(());
        let mut round_trips = Vec::new();
        for p in self.pollers {
            round_trips.extend(p.join().unwrap_or_default());
        }
        round_trips
    }
}

fn run(plan: &Plan) -> Outcome<()> {
    let redis = RedisServer::start();
    let ns = namespace("bench-revoke");
    let dir = temp_dir("bench-revoke");
    let upstream = loopback(free_port());
    let mut upstream_proc = Proc(
        Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .args(["--serve-upstream", &upstream.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?,
        "upstream",
    );

    // Keys: an admin key for the API, one to calibrate with, and one per revocation.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let store = {
        let _in_runtime = runtime.enter();
        redis_store(&redis, &ns)
    };
    let (admin_key, calibration, keys) = runtime.block_on(async {
        let admin = create_key(&*store, "keygate", "admin").await;
        let calibration = create_key(&*store, "bench", "admin").await;
        let mut keys = Vec::with_capacity(plan.revocations);
        for _ in 0..plan.revocations {
            keys.push(create_key(&*store, "bench", "admin").await);
        }
        (admin, calibration, keys)
    });

    let mut instances = Vec::with_capacity(INSTANCES);
    for n in 0..INSTANCES {
        instances.push(start_instance(
            upstream,
            &redis.url(),
            &ns,
            &dir.join(format!("keygate-{n}.log")),
        )?);
    }
    upstream_proc.check_alive()?;

    // Every key cached live on every instance.
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        keys.iter()
            .map(|k| {
                format!(
                    "GET / HTTP/1.1\r\nhost: kg\r\nauthorization: Bearer {}\r\n\r\n",
                    k.secret.expose()
                )
                .into_bytes()
            })
            .collect(),
    );
    for kg in &instances {
        let mut c = Conn::open(kg.proxy)?;
        for (k, request) in requests.iter().enumerate() {
            let (status, body, _) = c.exchange(request)?;
            if status != 200 {
                return Err(format!(
                    "a fresh key {k} got {status}: {}",
                    String::from_utf8_lossy(&body)
                ));
            }
        }
    }
    // The revoker's admin key too (the admin API verifies it like any key).
    let mut revoker = Conn::open(instances[0].admin)?;
    let show = format!(
        "GET /v1/keys/{} HTTP/1.1\r\nhost: kg\r\nauthorization: Bearer {}\r\n\r\n",
        admin_key.record.id,
        admin_key.secret.expose()
    );
    let (status, body, _) = revoker.exchange(show.as_bytes())?;
    if status != 200 {
        return Err(format!(
            "the admin API answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let counters_before: Vec<Counters> = instances
        .iter()
        .map(|kg| Counters::scrape(kg.admin))
        .collect::<Outcome<_>>()?;

    let (sub_ready_tx, sub_ready) = mpsc::channel();
    let (published_tx, published) = mpsc::channel();
    let channel = format!("{ns}:invalidate");
    thread::spawn({
        let url = redis.url();
        move || subscriber(url, channel, sub_ready_tx, published_tx)
    });
    sub_ready
        .recv_timeout(DEADLINE)
        .map_err(|_| "the outside subscriber did not subscribe".to_owned())?;

    let (monitor_ready_tx, monitor_ready) = mpsc::channel();
    let (monitored_tx, monitored) = mpsc::channel();
    thread::spawn({
        let addr = loopback(redis.port);
        move || monitor(addr, monitor_ready_tx, monitored_tx)
    });
    monitor_ready
        .recv_timeout(DEADLINE)
        .map_err(|_| "the command monitor did not start".to_owned())?;

    let current = Arc::new(AtomicUsize::new(IDLE));
    let (changed, changed_rx) = tokio::sync::watch::channel(());
    let (reports_tx, reports) = mpsc::channel();
    let turn = Turn {
        current: current.clone(),
        changed: changed_rx,
    };
    let pollers = start_pollers(plan, &instances, &requests, &turn, &reports_tx);
    let mut bench = Bench {
        plan,
        admin_key: &admin_key.secret,
        store: &store,
        runtime: &runtime,
        revoker,
        redis: redis.conn(),
        monitored,
        record_prefix: format!("{ns}:key:"),
        current,
        changed,
        pollers,
        reports,
        published,
    };
    let outcome = bench.measure(&calibration, &keys);
    let mut round_trips = bench.stop();
    let found = outcome?;

    let mut counters = Vec::new();
    for (kg, before) in instances.iter().zip(&counters_before) {
        counters.push(Counters::scrape(kg.admin)?.since(before));
    }
    for kg in &mut instances {
        kg.proc.check_alive()?;
    }

    println!(
        "revocation propagation over {} revocations, {INSTANCES} keygate processes (revoked via {}, pollers {}{}{}{})",
        plan.revocations,
        if plan.via_api { "the admin API" } else { "the store's Lua script" },
        if plan.one_thread { "all on one thread" } else { "a thread each" },
        std::env::var("WORKERS").map(|w| format!(", workers {w}")).unwrap_or_default(),
        std::env::var("RUNTIME_THREADS").map(|t| format!(", runtime threads {t}")).unwrap_or_default(),
        std::env::var("KEYGATE_WRAP").map(|w| format!(", wrapped in `{w}`")).unwrap_or_default(),
    );
    println!("(time from the outside subscriber's receipt of the publish to each instance's first 401, in milliseconds)");
    println!("{:<10} {:>8} {:>8} {:>8}", "instance", "p50", "p99", "max");
    let mut all = Vec::new();
    for (i, mut s) in found.samples.into_iter().enumerate() {
        print_row(&format!("{}", i + 1), &mut s);
        all.extend(s);
    }
    print_row("all", &mut all);
    let mut sent_after = found.sent_after;
    print_row("(sent)", &mut sent_after);
    let mut round_trips: Vec<i64> = round_trips.drain(..).map(i64::from).collect();
    if !round_trips.is_empty() {
        print_row("(200 rtt)", &mut round_trips);
    }
    println!(
        "(sent: when the request answered with the first 401 was sent, after time zero; 200 rtt: \
         a poller's round trip for a cached, forwarded request during the run, {} requests)",
        round_trips.len()
    );
    println!(
        "record reads (HGETALL) of the revoked keys after their revocation, through the floods \
         ({} requests per poller after its first 401), less the revoker's own read-back ({} per \
         revocation): {}",
        plan.flood, found.revoker_reads, found.flood_reads
    );
    let lookups: f64 = counters.iter().map(|c| c.store_lookups).sum();
    let stale: f64 = counters.iter().map(|c| c.stale_fills).sum();
    println!(
        "store lookups by the instances over the whole run: {lookups} ({stale} stale fills: cached \
         live keys whose invalidation stripe an earlier revocation shared)"
    );
    if found.flood_reads != 0 {
        return Err(format!(
            "the floods cost Redis {} record reads: a revoked verdict was not held ({counters:?})",
            found.flood_reads
        ));
    }
    Ok(())
}

/// Microseconds from `from` to `to`, negative if `to` came first.
fn micros_between(from: Instant, to: Instant) -> i64 {
    if to >= from {
        (to - from).as_micros() as i64
    } else {
        -((from - to).as_micros() as i64)
    }
}

fn print_row(label: &str, samples: &mut [i64]) {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i] as f64 / 1000.0
    };
    println!(
        "{label:<10} {:>8.3} {:>8.3} {:>8.3}",
        at(0.50),
        at(0.99),
        at(1.0)
    );
}
