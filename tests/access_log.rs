//! The access log of `keygate serve` as an operator sees it on stderr: one line per request in
//! text or JSON, written soon after the request without more traffic, every line written before
//! keygate exits on SIGTERM, and a stderr nobody reads never holding up a request (the lines
//! it cannot take are dropped and counted).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// `keygate serve` with the embedded file store in front of `upstream`, its stderr read line
/// by line on a thread (which stops reading after startup while `hold` is set).
struct Serve {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    /// The decision endpoint's line of `keygate serving` (`off` unless configured).
    authz: String,
    lines: mpsc::Receiver<String>,
    /// Dropping it (or sending on it) lets a held reader read on.
    resume: Option<mpsc::Sender<()>>,
    key: String,
    key_id: String,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Serve {
    fn start(upstream: &str, env: &[(&str, &str)], hold: bool) -> Serve {
        let dir = TempDir(temp_dir("access-log"));
        let keys = dir.0.join("keys.toml");
        let keys = keys.to_str().unwrap();
        let created = output_within(
            Command::new(env!("CARGO_BIN_EXE_keygate")).args([
                "keys",
                "create",
                "--keys-file",
                keys,
                "--tenant",
                "acme",
                "--role",
                "member",
                "--name",
                "access-log",
                "--output",
                "json",
            ]),
            Duration::from_secs(20),
        );
        assert!(created.status.success(), "{created:?}");
        let created: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["serve", "--keys-file", keys, "--upstream", upstream])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the keygate binary starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let (resume, held) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            let mut started = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let serving = line.contains("keygate serving");
                let _ = tx.send(line);
                if serving && !started && hold {
                    // Until resumed, nobody reads keygate's stderr: the pipe fills.
                    let _ = held.recv();
                }
                started |= serving;
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        let (proxy, admin, authz) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    panic!("keygate did not log its listeners:\n{}", seen.join("\n"));
                }
            };
            if line.contains("keygate serving") {
                break (
                    field(&line, "listen"),
                    field(&line, "admin"),
                    text_field(&line, "authz"),
                );
            }
            seen.push(line);
        };
        Serve {
            child,
            proxy,
            admin,
            authz,
            lines,
            resume: Some(resume),
            key: created["key"].as_str().unwrap().to_owned(),
            key_id: created["id"].as_str().unwrap().to_owned(),
            _dir: dir,
        }
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.key)
    }

    /// Lines read so far, waiting (up to 10 s) until `done` holds of them.
    fn lines_until(&self, seen: &mut Vec<String>, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => panic!("stderr so far:\n{}", seen.join("\n")),
            }
        }
    }

    /// Lets a held reader read keygate's stderr again.
    fn resume(&mut self) {
        self.resume.take();
    }

    /// SIGTERM, then the exit (within 20 s) and the lines keygate wrote that were not read yet.
    fn terminate(self) -> Vec<String> {
        self.sigterm();
        self.exit_lines()
    }

    fn sigterm(&self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    }

    /// The exit (within 20 s, successful) and the lines keygate wrote that were not read yet.
    fn exit_lines(mut self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("keygate did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{status}");
        self.resume.take();
        // The reader ends at the pipe's end, once keygate has exited.
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            lines.push(line);
        }
        lines
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address after `name=` in a text line, or in a JSON line's `fields`.
fn field(line: &str, name: &str) -> SocketAddr {
    text_field(line, name).parse().unwrap()
}

/// The value after `name=` in a text line, or in a JSON line's `fields`.
fn text_field(line: &str, name: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        return v["fields"][name].as_str().unwrap().to_owned();
    }
    let rest = line.split(&format!("{name}=")).nth(1).unwrap();
    rest.split_whitespace().next().unwrap().to_owned()
}

fn access_lines(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|l| l.contains("keygate::access"))
        .collect()
}

const LIMIT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_gets_its_line_soon_without_more_traffic() {
    let upstream = Upstream::start().await;
    let kg = Serve::start(&upstream.url(), &[], false);
    let mut conn = KeptAlive::connect(kg.proxy).await;
    let auth = kg.auth();
    let (status, _) = conn
        .get(
            "/things",
            &[("authorization", &auth), ("x-request-id", "t-1")],
            LIMIT,
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    // No more traffic: the line still comes (the writer flushes within milliseconds; the
    // deadline here is loose).
    let mut seen = Vec::new();
    kg.lines_until(&mut seen, |l| !access_lines(l).is_empty());
    let line = access_lines(&seen)[0].clone();
    let want = format!(
        "  INFO request{{request_id=\"t-1\" route=\"default\" key_id=\"{}\" tenant=\"acme\" \
         outcome=\"allowed\"}}: keygate::access: method=GET status=200 latency_us=",
        kg.key_id
    );
    assert!(line.contains(&want), "{line}");
    assert!(line.contains(" upstream_us="), "{line}");
    // An RFC 3339 timestamp in UTC, as on every other line.
    assert_eq!(&line[26..27], "Z", "{line}");
    drop(conn);
    let key = kg.key.clone();
    let rest = kg.terminate();
    for l in seen.iter().chain(&rest) {
        assert!(!l.contains(&key), "a key in the log: {l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_on_the_decision_endpoint_gets_the_proxys_line_for_the_original_request() {
    let upstream = Upstream::start().await;
    let kg = Serve::start(
        &upstream.url(),
        &[
            ("KEYGATE__SERVER__AUTHZ_LISTEN", "127.0.0.1:0"),
            ("KEYGATE__SERVER__AUTHZ_CALLER", "nginx"),
        ],
        false,
    );
    let authz: SocketAddr = kg.authz.parse().expect("the decision endpoint is on");
    let mut conn = KeptAlive::connect(authz).await;
    let auth = kg.auth();
    let (status, _) = conn
        .get(
            "/_keygate",
            &[
                ("authorization", &auth),
                ("x-request-id", "check-1"),
                ("x-original-method", "PUT"),
                ("x-original-uri", "/things/7"),
            ],
            LIMIT,
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    let mut seen = Vec::new();
    kg.lines_until(&mut seen, |l| !access_lines(l).is_empty());
    let line = access_lines(&seen)[0].clone();
    // The original request's method, its route, the key; no upstream time (nothing forwarded).
    let want = format!(
        "  INFO request{{request_id=\"check-1\" route=\"default\" key_id=\"{}\" tenant=\"acme\" \
         outcome=\"allowed\"}}: keygate::access: method=PUT status=200 latency_us=",
        kg.key_id
    );
    assert!(line.contains(&want), "{line}");
    assert!(!line.contains("upstream_us="), "{line}");
    assert!(upstream.requests().is_empty());
    drop(conn);
    let key = kg.key.clone();
    let rest = kg.terminate();
    for l in seen.iter().chain(&rest) {
        assert!(!l.contains(&key), "a key in the log: {l}");
    }
}

/// A request (method, URL, headers) and the status it gets.
type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, u16);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_stay_valid_for_odd_request_ids_methods_and_paths() {
    let upstream = Upstream::start().await;
    let kg = Serve::start(&upstream.url(), &[("KEYGATE__LOG__FORMAT", "json")], false);
    let http = Http::new();
    let auth = kg.auth();
    let url = |path: &str| format!("http://{}{path}", kg.proxy);
    let odd_id = r#"a"b\c{}[],:'"#;
    let cases: Vec<Case> = vec![
        (
            "GET",
            url("/things"),
            vec![("authorization", &auth), ("x-request-id", odd_id)],
            200,
        ),
        (
            "PURGE",
            url("/%22q%7B?x=%22&y=%5C"),
            vec![("authorization", &auth), ("user-agent", "ua \" \\ {")],
            200,
        ),
        ("GET", url("/no-key"), vec![], 401),
        (
            "GET",
            url("/a/../../etc"),
            vec![("authorization", &auth)],
            400,
        ),
    ];
    for (method, url, headers, want) in &cases {
        let reply = http.request(method, url, headers).await;
        assert_eq!(reply.status, *want, "{method} {url}");
    }
    let mut seen = Vec::new();
    kg.lines_until(&mut seen, |l| access_lines(l).len() == cases.len());
    let parsed: Vec<serde_json::Value> = access_lines(&seen)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    // As `tracing` recorded it: the header value's `Debug` form.
    let recorded = format!("{:?}", http::HeaderValue::from_static(odd_id));
    assert_eq!(parsed[0]["span"]["request_id"], recorded);
    assert_eq!(parsed[0]["span"]["key_id"], kg.key_id);
    assert_eq!(parsed[0]["span"]["tenant"], "acme");
    assert_eq!(parsed[1]["fields"]["method"], "PURGE");
    assert_eq!(parsed[2]["span"]["outcome"], "missing_credentials");
    assert_eq!(parsed[3]["span"]["route"], "-");
    for (v, (_, _, _, status)) in parsed.iter().zip(&cases) {
        assert_eq!(v["target"], "keygate::access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["fields"]["status"], *status);
        assert!(v["fields"]["latency_us"].is_u64());
        assert_eq!(v["span"], v["spans"][0]);
        assert_eq!(v["span"]["name"], "request");
    }
    assert!(parsed[2]["fields"].get("upstream_us").is_none());
    kg.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_writes_every_queued_line_before_exit() {
    let upstream = Upstream::start().await;
    let kg = Serve::start(&upstream.url(), &[], false);
    let auth = kg.auth();
    let get = |path: String, id: String| {
        let (addr, auth) = (kg.proxy, auth.clone());
        async move {
            let mut conn = KeptAlive::connect(addr).await;
            let headers = [("authorization", &*auth), ("x-request-id", &*id)];
            let (status, _) = conn.get(&path, &headers, LIMIT).await.unwrap();
            assert_eq!(status, 200);
            conn
        }
    };
    // Requests answered before the signal…
    let mut ids = Vec::new();
    for n in 0..200 {
        ids.push(format!("before-{n}"));
        drop(get("/".into(), ids[n].clone()).await);
    }
    // …and requests in flight when it comes, answered while keygate drains: their lines are
    // queued just before keygate would exit.
    let mut in_flight = Vec::new();
    for n in 0..20 {
        ids.push(format!("draining-{n}"));
        in_flight.push(tokio::spawn(get(
            "/slow?ms=300".into(),
            format!("draining-{n}"),
        )));
    }
    eventually(LIMIT, "the slow requests reach the upstream", || async {
        upstream
            .requests()
            .iter()
            .filter(|r| r.path == "/slow")
            .count()
            == 20
    })
    .await;
    kg.sigterm();
    for t in in_flight {
        drop(t.await.unwrap());
    }
    let lines = kg.exit_lines();
    let access = access_lines(&lines);
    assert_eq!(access.len(), ids.len(), "{lines:#?}");
    for id in &ids {
        let field = format!("request_id=\"{id}\" ");
        assert_eq!(
            access.iter().filter(|l| l.contains(&field)).count(),
            1,
            "{id}"
        );
    }
    let exiting = lines.iter().position(|l| l.contains("drained; exiting"));
    let last_access = lines.iter().rposition(|l| l.contains("keygate::access"));
    assert!(
        last_access < exiting,
        "every line is written before keygate exits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_stderr_drops_lines_and_never_holds_up_a_request() {
    let upstream = Upstream::start().await;
    let env = [
        ("KEYGATE__LOG__FORMAT", "json"),
        ("KEYGATE__LOG__ACCESS_BUFFER", "16"),
    ];
    // Nobody reads keygate's stderr after startup: once the pipe (64 KiB) is full, every
    // write to it blocks.
    let mut kg = Serve::start(&upstream.url(), &env, true);
    let auth = kg.auth();
    let (conns, per_conn) = (4, 500);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (addr, auth) = (kg.proxy, auth.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = KeptAlive::connect(addr).await;
            for _ in 0..per_conn {
                let headers = [("authorization", &*auth)];
                let (status, _) = conn.get("/", &headers, LIMIT).await.unwrap();
                assert_eq!(status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let http = Http::new();
    let scrape = Scrape::parse(
        &http
            .get(&format!("http://{}/metrics", kg.admin), &[])
            .await
            .text(),
    );
    let dropped = scrape.get("keygate_access_log_dropped_total");
    assert!(dropped > 0.0, "no line was dropped");
    // Read again: every line written is whole, valid JSON, and the drop is reported once.
    kg.resume();
    let mut lines = Vec::new();
    kg.lines_until(&mut lines, |l| {
        l.iter().any(|l| l.contains("access log lines dropped"))
    });
    lines.extend(kg.terminate());
    let access = access_lines(&lines);
    for l in &access {
        serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"));
    }
    assert_eq!(
        access.len() as f64 + dropped,
        (conns * per_conn) as f64,
        "each line written or counted as dropped"
    );
    let reports = lines
        .iter()
        .filter(|l| l.contains("access log lines dropped"))
        .count();
    assert_eq!(reports, 1, "{:#?}", &lines[lines.len().saturating_sub(5)..]);
}
