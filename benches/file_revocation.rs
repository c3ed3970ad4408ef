//! File-store revocation as a user sees it: `keygate serve --keys-file` running as its own
//! process, the real `keygate keys revoke` CLI as another, and a client polling over loopback.
//!
//! The keys file starts with N keys, and keygate caches every one of them as live (cache lives
//! of an hour: only the reload can end a verdict). Then, one key at a time: a poller opens a
//! keep-alive connection and requests `/` with the key back to back; once it has had a first
//! `200`, the `keygate keys revoke ID` process runs; the poller stops at its first `401`. For
//! each revocation it reports
//! (a) the time from the CLI process's exit (its `waitpid` returning) to the first `401` (the
//!     end of that response), negative when keygate applied the revocation before the command
//!     returned, and
//! (b) how many requests sent after the CLI process exited still got `200`.
//!
//! `cargo bench --bench file_revocation` runs 500 revocations (`REVOCATIONS=N` to change it)
//! against `target/release/keygate`; under `cargo test` it runs a short smoke pass against the
//! debug binary, and exits non-zero on any failure.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use keygate::manage::{self, NewKey};
use keygate::policy::Roles;
use keygate::store::file::FileStore;
use keygate::store::now_unix;

/// A key still accepted this long after the CLI exited counts as a failure.
const GIVE_UP: Duration = Duration::from_secs(5);
/// Deadline of every request and every CLI run.
const DEADLINE: Duration = Duration::from_secs(10);
/// The binary under test: the release build under `cargo bench`, the debug build under
/// `cargo test`.
const KEYGATE: &str = env!("CARGO_BIN_EXE_keygate");

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let revocations: usize = std::env::var("REVOCATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 500 } else { 10 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = runtime.block_on(run(revocations.max(1))) {
        eprintln!("file_revocation: {e}");
        std::process::exit(1);
    }
}

/// One revocation's figures.
struct Sample {
    /// Microseconds from the CLI's exit to the first 401; negative: before the exit.
    exit_to_401_us: i64,
    /// Requests sent after the CLI's exit that got 200.
    late_200s: u64,
    /// Microseconds the CLI process ran.
    cli_us: u64,
}

async fn run(revocations: usize) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("keygate-bench-file-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let keys_file = dir.join("keys.toml");

    // The keys, written through the file store as `keygate keys create` would.
    let store = FileStore::open(&keys_file, true).map_err(|e| e.to_string())?;
    let mut keys = Vec::with_capacity(revocations);
    for i in 0..revocations {
        let new = NewKey {
            tenant: "bench".into(),
            role: "admin".into(),
            name: format!("bench key {i}"),
            subject: None,
            expires_at: None,
        };
        let created = manage::create_key(&store, &Roles::default(), new, now_unix(), "bench")
            .await
            .map_err(|e| e.to_string())?;
        keys.push((created.record.id, created.secret.expose().to_owned()));
    }
    drop(store);
    let reload_us = reload_cost(&keys_file)?;

    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let upstream_addr = upstream.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(support::serve_fast_upstream(upstream));

    let (kg, addr, admin) = start_keygate(&keys_file, upstream_addr)?;
    wait_ready(admin).await?;
    for (id, secret) in &keys {
        let status = get(&mut connect(addr).await?, secret).await?;
        if status != 200 {
            return Err(format!("fresh key {id} answered {status}"));
        }
    }

    let mut samples = Vec::with_capacity(revocations);
    for (id, secret) in &keys {
        samples.push(revoke_while_polling(addr, &keys_file, id, secret).await?);
    }
    drop(kg);
    report(KEYGATE, revocations, &mut samples);
    println!(
        "reading and parsing the {revocations}-key file (what each reload does), in this process: {:.3} ms median",
        reload_us as f64 / 1000.0
    );
    Ok(())
}

/// Median microseconds of a fresh load of the keys file: the read and parse of a reload.
fn reload_cost(keys_file: &Path) -> Result<u64, String> {
    let mut runs: Vec<u64> = (0..21)
        .map(|_| {
            let started = Instant::now();
            FileStore::open(keys_file, false).map(|_| started.elapsed().as_micros() as u64)
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    runs.sort_unstable();
    Ok(runs[runs.len() / 2])
}

/// Revokes `id` with the CLI while a poller requests its key back to back.
async fn revoke_while_polling(
    addr: SocketAddr,
    keys_file: &Path,
    id: &str,
    secret: &str,
) -> Result<Sample, String> {
    let mut conn = connect(addr).await?;
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let key = secret.to_owned();
    // Each request: (sent, answered, status), up to and including the first 401.
    let poller = tokio::spawn(async move {
        let mut seen: Vec<(Instant, Instant, u16)> = Vec::with_capacity(1024);
        let mut first = Some(first_tx);
        let started = Instant::now();
        loop {
            let sent = Instant::now();
            let status = get(&mut conn, &key).await?;
            seen.push((sent, Instant::now(), status));
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
            match status {
                401 => return Ok(seen),
                200 if started.elapsed() < GIVE_UP + DEADLINE => {}
                200 => return Err("a revoked key was still accepted after the deadline".into()),
                other => return Err(format!("unexpected status {other} while polling")),
            }
        }
    });
    first_rx
        .await
        .map_err(|_| "the poller stopped before its first answer".to_owned())?;

    let (file, cli_id) = (keys_file.to_owned(), id.to_owned());
    let cli = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = Command::new(KEYGATE)
            .args(["keys", "revoke", &cli_id, "--keys-file"])
            .arg(&file)
            .env_remove("KEYGATE__STORE__REDIS_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        let exited = Instant::now();
        match out {
            Ok(o) if o.status.success() => Ok((started, exited)),
            Ok(o) => Err(format!(
                "keygate keys revoke failed: {}",
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => Err(format!("cannot run {KEYGATE}: {e}")),
        }
    });
    let (started, exited) = cli.await.map_err(|e| e.to_string())??;
    let seen = tokio::time::timeout(GIVE_UP, poller)
        .await
        .map_err(|_| format!("key {id} still accepted {GIVE_UP:?} after its revocation"))?
        .map_err(|e| e.to_string())??;

    let (_, answered, _) = *seen.last().expect("at least the 401");
    let exit_to_401_us = if answered >= exited {
        (answered - exited).as_micros() as i64
    } else {
        -((exited - answered).as_micros() as i64)
    };
    let late_200s = seen
        .iter()
        .filter(|(sent, _, status)| *sent > exited && *status == 200)
        .count() as u64;
    Ok(Sample {
        exit_to_401_us,
        late_200s,
        cli_us: (exited - started).as_micros() as u64,
    })
}

fn report(binary: &str, revocations: usize, samples: &mut [Sample]) {
    println!("file-store revocation over {revocations} CLI revocations ({binary})");
    let mut exit_to_401: Vec<i64> = samples.iter().map(|s| s.exit_to_401_us).collect();
    let mut late: Vec<i64> = samples.iter().map(|s| s.late_200s as i64).collect();
    let mut cli: Vec<i64> = samples.iter().map(|s| s.cli_us as i64).collect();
    let before = exit_to_401.iter().filter(|us| **us <= 0).count();
    println!("{:<52} {:>8} {:>8} {:>8}", "", "p50", "p99", "max");
    let ms = |us: i64| format!("{:.3}", us as f64 / 1000.0);
    let row = |label: &str, v: &mut Vec<i64>, f: &dyn Fn(i64) -> String| {
        v.sort_unstable();
        println!(
            "{label:<52} {:>8} {:>8} {:>8}",
            f(quantile(v, 0.50)),
            f(quantile(v, 0.99)),
            f(quantile(v, 1.0))
        );
    };
    row(
        "(a) CLI exit -> first 401, ms (negative: before)",
        &mut exit_to_401,
        &ms,
    );
    row(
        "(b) requests sent after the CLI exit that got 200",
        &mut late,
        &|n| n.to_string(),
    );
    row("keygate keys revoke run time, ms", &mut cli, &ms);
    println!(
        "applied before the CLI exited: {before} of {revocations}; requests sent after the exit that got 200: {} in all",
        late.iter().sum::<i64>()
    );
}

fn quantile(sorted: &[i64], q: f64) -> i64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// `keygate serve` as a child process, stopped (SIGTERM, then waited for) on drop.
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

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_addr() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())
}

fn start_keygate(
    keys_file: &Path,
    upstream: SocketAddr,
) -> Result<(Proc, SocketAddr, SocketAddr), String> {
    let (addr, admin) = (free_addr()?, free_addr()?);
    let child = Command::new(KEYGATE)
        .args(["serve", "--listen", &addr.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--upstream", &format!("http://{upstream}")])
        .arg("--keys-file")
        .arg(keys_file)
        .env_remove("KEYGATE__STORE__REDIS_URL")
        // Cached verdicts outlive the run: only the reload can end one.
        .env("KEYGATE__CACHE__TTL", "1h")
        .env("KEYGATE__CACHE__NEGATIVE_TTL", "1h")
        .env("KEYGATE__LOG__ACCESS", "false")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {KEYGATE}: {e}"))?;
    Ok((Proc(child), addr, admin))
}

async fn wait_ready(admin: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut conn) = connect(admin).await {
            if let Ok(200) = request(&mut conn, "/readyz", None).await {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("keygate did not become ready on {admin}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Conn = http1::SendRequest<Empty<Bytes>>;

/// A keep-alive HTTP/1.1 connection.
async fn connect(addr: SocketAddr) -> Result<Conn, String> {
    let stream = tokio::time::timeout(DEADLINE, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

/// A GET of `/` with `key`; its status.
async fn get(conn: &mut Conn, key: &str) -> Result<u16, String> {
    request(conn, "/", Some(key)).await
}

async fn request(conn: &mut Conn, path: &str, key: Option<&str>) -> Result<u16, String> {
    let mut req = hyper::Request::get(path).header("host", "keygate");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let answer = async {
        conn.ready().await?;
        let resp = conn.send_request(req).await?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        Ok::<_, hyper::Error>(status)
    };
    tokio::time::timeout(DEADLINE, answer)
        .await
        .map_err(|_| format!("GET {path} timed out"))?
        .map_err(|e| format!("GET {path}: {e}"))
}
