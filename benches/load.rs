//! The load harness: keygate against a plain nginx reverse proxy and against the upstream
//! alone, all on loopback on one machine, driven by `wrk` with the same connections and
//! duration, runs interleaved (A B C D A B C D …) and repeated.
//!
//! `cargo bench --bench load` (needs `wrk` and `nginx`: `apt-get install -y wrk nginx`; the
//! harness says so when they are missing). Settings by environment: `LOAD_SECONDS` (per run,
//! default 10), `LOAD_ROUNDS` (default 3), `LOAD_CONNECTIONS` (default 64), `LOAD_MISS_KEYS`
//! (keys of the miss-path population, default 50,000, with a 1,000-entry cache),
//! `LOAD_ONLY=memory` (only the 1,000,000-verdict memory figure), `LOAD_ONLY=table` (only the
//! table, without the floods and the memory figure), `LOAD_ONLY=hold` (start everything, print
//! the addresses and process ids, and wait: for profilers).
//!
//! It starts: a fast upstream (this same binary, re-run with `--serve-upstream`), a
//! `redis-server`, keygate with one cached key, keygate in front of a key population far larger
//! than its cache (every request a miss answered by Redis), nginx (`proxy_pass`, keepalive, as
//! many workers as keygate has threads), the same two (cached key) over TLS with one rcgen
//! certificate (nginx with `ssl_protocols TLSv1.2 TLSv1.3`, wrk on `https://`), the upstream
//! alone, and the h2 row: keygate with the cached key in front of the same upstream served
//! over h2c (`--serve-h2-upstream`, `upstream.protocol = "h2"`). It prints one table of
//! requests/s and p50/p99/p99.9 latency, the ratios, an invalid-key flood with Redis's command
//! counts, and the resident memory of 1,000,000 cached verdicts.
//!
//! Under `cargo test` (no `--bench`) it only checks that it was built.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
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

fn start_keygate(
    upstream: SocketAddr,
    redis_url: &str,
    ns: &str,
    env: &[(&str, &str)],
) -> (Proc, SocketAddr) {
    let addr = loopback(free_port());
    let admin = loopback(free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["serve", "--listen", &addr.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--upstream", &format!("http://{upstream}")])
        .args(["--redis-url", redis_url, "--namespace", ns])
        // Like the nginx under test: no access log, warnings only.
        .env("RUST_LOG", "warn")
        .env("KEYGATE__LOG__ACCESS", "false")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .spawn()
        .expect("keygate binary");
    (Proc(child), addr)
}

/// nginx as a plain reverse proxy: cleartext on the first address, TLS with `cert` and `key`
/// (TLS 1.2 and 1.3, as keygate) on the second, the same `proxy_pass` behind both.
fn start_nginx(
    dir: &Path,
    upstream: SocketAddr,
    cert: &Path,
    key: &Path,
) -> (Proc, SocketAddr, SocketAddr) {
    let addr = loopback(free_port());
    let tls_addr = loopback(free_port());
    let location = "location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }";
    let conf = format!(
        "worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream app {{ server {upstream}; keepalive 256; }}
  server {{
    listen {addr} reuseport;
    {location}
  }}
  server {{
    listen {tls_addr} ssl reuseport;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    {location}
  }}
}}
",
        workers = workers(),
        dir = dir.display(),
        cert = cert.display(),
        key = key.display(),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .args(["-g", "daemon off;"])
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx");
    (Proc(child), addr, tls_addr)
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
    /// CPU time per 1,000 requests of the target's processes, and of the upstream, in ms.
    cpu_ms: f64,
    upstream_cpu_ms: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    errors: u64,
    non_2xx: u64,
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
        upstream_cpu_ms: 0.0,
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

async fn run() {
    if load_only("memory") {
        return cached_million().await;
    }
    let seconds = env_num("LOAD_SECONDS", 10);
    let rounds = env_num("LOAD_ROUNDS", 3) as usize;
    let conns = env_num("LOAD_CONNECTIONS", 64);
    let miss_keys = env_num("LOAD_MISS_KEYS", 50_000) as usize;
    let dir = temp_dir("load");
    let (fixed, random) = (dir.join("fixed.lua"), dir.join("random.lua"));
    std::fs::write(&fixed, format!("{WRK_STATIC}{WRK_DONE}")).unwrap();
    std::fs::write(&random, format!("{WRK_RANDOM}{WRK_DONE}")).unwrap();

    let upstream = loopback(free_port());
    let _upstream = Proc(
        Command::new(std::env::current_exe().unwrap())
            .args(["--serve-upstream", &upstream.to_string()])
            .spawn()
            .unwrap(),
    );
    let redis = RedisServer::start();
    let ns = namespace("load");
    let store = redis_store(&redis, &ns);

    println!("creating {miss_keys} keys for the miss path…");
    let keys = create_keys(store.clone(), miss_keys + 1).await;
    let cached_file = dir.join("cached.keys");
    write_lines(&cached_file, [keys[0].clone()]);
    let miss_file = dir.join("miss.keys");
    write_lines(&miss_file, keys[1..].iter().cloned());

    let (_kg, keygate) = start_keygate(upstream, &redis.url(), &ns, &[]);
    // One certificate (ECDSA P-256, made here) for keygate's and nginx's TLS listeners.
    let pki = common::tls_server::Pki::new("load");
    let cert = pki.server("load", &["localhost", "127.0.0.1"]);
    let (cert_path, key_path) = (
        cert.cert.display().to_string(),
        cert.key.display().to_string(),
    );
    let (_kg_tls, keygate_tls) = start_keygate(
        upstream,
        &redis.url(),
        &ns,
        &[
            ("KEYGATE__SERVER__TLS_CERT", cert_path.as_str()),
            ("KEYGATE__SERVER__TLS_KEY", key_path.as_str()),
        ],
    );
    let (_kg_miss, keygate_miss) = start_keygate(
        upstream,
        &redis.url(),
        &ns,
        &[("KEYGATE__CACHE__CAPACITY", "1000")],
    );
    let (_nginx, nginx, nginx_tls) = start_nginx(&dir, upstream, &cert.cert, &cert.key);
    let h2 = h2_row::start(&redis.url(), &ns).await;
    for (addr, what) in [
        (keygate_tls, "keygate (TLS)"),
        (nginx_tls, "nginx (TLS)"),
        (upstream, "the upstream"),
        (keygate, "keygate"),
        (keygate_miss, "keygate (miss path)"),
        (nginx, "nginx"),
    ] {
        wait_for_port(addr, what).await;
    }

    // (name, URL, wrk script, keys file, process): the same request to all but the miss path.
    type Target<'a> = (&'a str, String, &'a Path, &'a Path, u32);
    let upstream_pid = _upstream.0.id();
    let http = |addr: SocketAddr| format!("http://{addr}/");
    // By name, so that wrk sends SNI as a client would (not the IP address).
    let https = |addr: SocketAddr| format!("https://localhost:{}/", addr.port());
    let targets: [Target; 7] = [
        (
            "upstream alone",
            http(upstream),
            &fixed,
            &cached_file,
            upstream_pid,
        ),
        (
            "nginx proxy_pass",
            http(nginx),
            &fixed,
            &cached_file,
            _nginx.0.id(),
        ),
        (
            "keygate, cached key",
            http(keygate),
            &fixed,
            &cached_file,
            _kg.0.id(),
        ),
        (
            "keygate, miss path",
            http(keygate_miss),
            &random,
            &miss_file,
            _kg_miss.0.id(),
        ),
        (
            "nginx proxy_pass, TLS",
            https(nginx_tls),
            &fixed,
            &cached_file,
            _nginx.0.id(),
        ),
        (
            "keygate TLS, cached key",
            https(keygate_tls),
            &fixed,
            &cached_file,
            _kg_tls.0.id(),
        ),
        (
            h2_row::NAME,
            http(h2.keygate),
            &fixed,
            &cached_file,
            h2.keygate_pid(),
        ),
    ];
    if load_only("hold") {
        // For profilers: the setup stays up until the harness is stopped.
        for (name, url, _, keys, pid) in &targets {
            println!("{name}: {url} (pid {pid}, keys {})", keys.display());
        }
        std::future::pending::<()>().await;
    }
    // Warm-up: connections, pools and the cached key.
    for (_, url, script, keys, _) in &targets {
        wrk(script, url, keys, 2, conns);
    }
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        for (i, (name, url, script, keys, pid)) in targets.iter().enumerate() {
            let upstream_pid = h2.upstream_pid_for(name).unwrap_or(upstream_pid);
            let (cpu, upstream_cpu) = (cpu_ticks(*pid), cpu_ticks(upstream_pid));
            let mut r = wrk(script, url, keys, seconds, conns);
            // Clock ticks of 10 ms, per 1,000 requests.
            let per_1k = |ticks: u64| ticks as f64 * 10.0 * 1000.0 / r.requests.max(1.0);
            r.cpu_ms = per_1k(cpu_ticks(*pid) - cpu);
            r.upstream_cpu_ms = per_1k(cpu_ticks(upstream_pid) - upstream_cpu);
            println!(
                "round {}: {name:<24} {:>9.0} req/s  p99 {:>6.0} µs  cpu {:>5.2} ms/1k req (upstream {:>5.2})  errors {} non-2xx {}",
                round + 1,
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

    println!();
    println!(
        "{} connections, {} wrk threads, {}s per run, {} interleaved rounds; medians:",
        conns,
        workers(),
        seconds,
        rounds
    );
    println!(
        "| target | req/s | p50 | p99 | p99.9 | CPU per 1k requests | upstream CPU per 1k | non-2xx or errors |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (i, (name, _, _, _, _)) in targets.iter().enumerate() {
        let runs = &results[i];
        println!(
            "| {name} | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs | {:.2} ms | {:.2} ms | {} |",
            median(runs, |r| r.rps),
            median(runs, |r| r.p50_us),
            median(runs, |r| r.p99_us),
            median(runs, |r| r.p999_us),
            median(runs, |r| r.cpu_ms),
            median(runs, |r| r.upstream_cpu_ms),
            runs.iter().map(|r| r.errors + r.non_2xx).sum::<u64>()
        );
    }
    let rps = |i: usize| median(&results[i], |r| r.rps);
    let p99 = |i: usize| median(&results[i], |r| r.p99_us);
    println!();
    let cpu = |i: usize| median(&results[i], |r| r.cpu_ms);
    println!("| ratio | value | target |\n| --- | --- | --- |");
    for (ratio, value, target) in [
        (
            "keygate cached / nginx, throughput",
            rps(2) / rps(1),
            "≥ 1.0",
        ),
        ("keygate cached / nginx, p99", p99(2) / p99(1), "≤ 1.1"),
        (
            "keygate cached / nginx, proxy CPU per request",
            cpu(2) / cpu(1),
            "",
        ),
        (
            "keygate cached / upstream alone, throughput",
            rps(2) / rps(0),
            "",
        ),
        (
            "keygate miss path / cached, throughput",
            rps(3) / rps(2),
            "≥ 0.5",
        ),
        (
            "keygate TLS / nginx TLS, throughput",
            rps(5) / rps(4),
            "≥ 1.0",
        ),
        ("keygate TLS / nginx TLS, p99", p99(5) / p99(4), "≤ 1.1"),
        (
            "keygate TLS / nginx TLS, proxy CPU per request",
            cpu(5) / cpu(4),
            "",
        ),
        (
            "keygate TLS / keygate cleartext, throughput",
            rps(5) / rps(2),
            "",
        ),
        (
            "keygate cached, h2c upstream / nginx (HTTP/1.1 keepalive upstream), throughput",
            rps(6) / rps(1),
            "",
        ),
        (
            "keygate cached, h2c upstream / keygate cached, HTTP/1.1 upstream, throughput",
            rps(6) / rps(2),
            "",
        ),
    ] {
        println!("| {ratio} | {value:.2} | {target} |");
    }

    if load_only("table") {
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

        /// The h2c upstream's process, for the row named `name` if it is this one.
        pub fn upstream_pid_for(&self, name: &str) -> Option<u32> {
            (name == NAME).then(|| self.upstream.0.id())
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
            &[("KEYGATE__UPSTREAM__PROTOCOL", "h2")],
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
                            b"ok",
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
        &[("KEYGATE__CACHE__NEGATIVE_TTL", "1h")],
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
        "1,000,000 cached verdicts: {entries} entries, resident memory grew by {} MiB (process peak {} MiB; target ≤ 256 MiB)",
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
