//! The integration test harness: a real `redis-server` on a free port with its own directory,
//! a real upstream HTTP server on 127.0.0.1:0, keygate in-process on port 0, and a real HTTP
//! client. Each test reads as the scenario it checks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};

use keygate::config::Config;
use keygate::key::{generate, generate_id, GeneratedKey, KeyKind};
use keygate::manage::{self, CreatedKey, NewKey};
use keygate::server::Server;
use keygate::store::redis::{RedisSettings, RedisStore};
use keygate::store::{now_unix, KeyRecord, Store};

/// Polls `cond` every 10 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = UNIQUE.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("keygate-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// Redis

/// A `redis-server` child process on its own port and directory, killed on drop.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port. A port taken between the check and the bind (by another
    /// test's Redis, say) is noticed by the server's pid and another port is tried.
    pub fn start() -> Self {
        let mut why = String::new();
        for _ in 0..5 {
            let port = free_port();
            match Self::start_on(port) {
                Ok(r) => return r,
                Err(e) => why = format!("port {port}: {e}"),
            }
        }
        panic!("redis-server did not start on any of five free ports; last: {why}");
    }

    /// Starts a server on `port`; an error if it cannot be this server that answers there.
    pub fn start_on(port: u16) -> Result<Self, String> {
        let mut r = RedisServer {
            port,
            dir: temp_dir("redis"),
            child: None,
        };
        r.spawn(&[]).map(|()| r)
    }

    /// Spawns the server and waits until it answers as itself: the `process_id` of `INFO
    /// server` must be the child's, or the answer came from someone else's server on that port.
    fn spawn(&mut self, extra: &[&str]) -> Result<(), String> {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--dbfilename", "dump.rdb"])
            .arg("--dir")
            .arg(&self.dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: apt-get install -y redis-server redis-tools");
        let deadline = Instant::now() + Duration::from_secs(10);
        let outcome = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break Err(format!("exited at start ({status}); port taken?"));
            }
            if let Some(pid) = self.server_pid() {
                if pid == child.id() {
                    break Ok(());
                }
                break Err(format!("answered by another server (pid {pid})"));
            }
            if Instant::now() >= deadline {
                break Err("no answer within 10s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        match outcome {
            Ok(()) => self.child = Some(child),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        outcome
    }

    /// The `process_id` of whatever answers on the port, if anything does.
    fn server_pid(&self) -> Option<u32> {
        let client = self.client();
        let mut c = client
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        c.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        let info: String = redis::cmd("INFO").arg("server").query(&mut c).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// A connection of the test's own (it stays authenticated if a password is set later);
    /// a command on it that gets no answer within 10 s fails instead of hanging.
    pub fn conn(&self) -> redis::Connection {
        let c = self
            .client()
            .get_connection_with_timeout(Duration::from_secs(10))
            .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    }

    /// Runs a command on the test's own connection.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut self.conn()).unwrap()
    }

    /// Calls per command name since the last `CONFIG RESETSTAT`, from `INFO commandstats`.
    pub fn command_calls(&self) -> HashMap<String, u64> {
        let info: String = self.cmd(&["INFO", "commandstats"]);
        info.lines()
            .filter_map(|l| l.strip_prefix("cmdstat_"))
            .filter_map(|l| {
                let (name, rest) = l.split_once(':')?;
                let calls = rest.split(',').find_map(|f| f.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().ok()?))
            })
            .collect()
    }

    pub fn reset_stats(&self) {
        let _: () = self.cmd(&["CONFIG", "RESETSTAT"]);
    }

    /// Saves the dataset and stops the server (its port then refuses connections); fails the
    /// test if the server has not exited within 10 s.
    pub fn stop(&mut self) {
        let _ = redis::cmd("SHUTDOWN")
            .arg("SAVE")
            .query::<()>(&mut self.conn());
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("redis-server did not exit within 10s of SHUTDOWN");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Starts again on the same port and directory, reloading the saved dataset.
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// [`RedisServer::restart`] with more `redis-server` arguments (config directives).
    pub fn restart_with(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "stop() first");
        if let Err(why) = self.spawn(extra) {
            panic!("redis-server did not restart on port {}: {why}", self.port);
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A keygate Redis store for the test to create keys with.
pub fn redis_store(redis: &RedisServer, namespace: &str) -> Arc<RedisStore> {
    Arc::new(
        RedisStore::new(&RedisSettings {
            url: redis.url(),
            tls: Default::default(),
            namespace: namespace.to_owned(),
            timeout: Duration::from_secs(2),
            health_check_interval: Duration::from_secs(1),
        })
        .unwrap(),
    )
}

/// Creates a user key in `tenant` with `role` (any role: a fixture may make a key of a role the
/// keygate under test does not define, to see it refused).
pub async fn create_key(store: &dyn Store, tenant: &str, role: &str) -> CreatedKey {
    manage::create_key(
        store,
        &keygate::policy::Roles::new([role.to_owned()]),
        NewKey {
            tenant: tenant.into(),
            role: role.into(),
            name: "test key".into(),
            subject: Some("alice".into()),
            expires_at: None,
        },
        now_unix(),
        "test",
    )
    .await
    .unwrap()
}

/// Stores a user key that expired ten seconds ago; returns the key.
pub async fn insert_expired_key(store: &dyn Store) -> GeneratedKey {
    let expired = generate(KeyKind::User);
    store
        .insert(&KeyRecord {
            id: generate_id("key_"),
            digest: expired.digest,
            name: "old".into(),
            tenant: "acme".into(),
            role: "admin".into(),
            subject: "bob".into(),
            kind: KeyKind::User,
            created_at: now_unix() - 100,
            expires_at: Some(now_unix() - 10),
            revoked_at: None,
            last_used_at: None,
        })
        .await
        .unwrap();
    expired
}

// ---------------------------------------------------------------------------------------------
// Upstream

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
}

/// A real HTTP upstream that records what it receives. Paths:
/// `/hold` waits until [`Upstream::release`]; `/slow?ms=N` answers after N ms;
/// `/upload` counts the body's bytes as they stream; `/download?bytes=N` streams N bytes;
/// anything else answers `200 ok`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    held: Arc<Notify>,
    arrived: Arc<Notify>,
    _stop: oneshot::Sender<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let held = Arc::new(Notify::new());
        let arrived = Arc::new(Notify::new());
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let (s, h, a) = (seen.clone(), held.clone(), arrived.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut stop_rx => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let (s, h, a) = (s.clone(), h.clone(), a.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (s, h, a) = (s.clone(), h.clone(), a.clone());
                        async move { Ok::<_, Infallible>(upstream_answer(req, s, h, a).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            seen,
            held,
            arrived,
            _stop: stop_tx,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Resolves when a `/hold` request has arrived; fails the test if none does within 10 s.
    pub async fn held_request_arrived(&self) {
        if tokio::time::timeout(Duration::from_secs(10), self.arrived.notified())
            .await
            .is_err()
        {
            panic!("no /hold request reached the upstream within 10s");
        }
    }

    /// Lets every held request answer.
    pub fn release(&self) {
        self.held.notify_waiters();
    }
}

type TestBody = BoxBody<Bytes, Infallible>;

fn query_num(req: &Request<Incoming>, name: &str) -> u64 {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn upstream_answer(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    held: Arc<Notify>,
    arrived: Arc<Notify>,
) -> Response<TestBody> {
    seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().map(str::to_owned),
        headers: req.headers().clone(),
    });
    match req.uri().path() {
        "/hold" => {
            let released = held.notified();
            arrived.notify_one();
            released.await;
            text("held and released")
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query_num(&req, "ms"))).await;
            text("slow")
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    n += data.len() as u64;
                }
            }
            text(&n.to_string())
        }
        "/download" => Response::new(zeros(query_num(&req, "bytes"))),
        _ => text("ok"),
    }
}

fn text(s: &str) -> Response<TestBody> {
    Response::new(Full::new(Bytes::copy_from_slice(s.as_bytes())).boxed())
}

/// A body of `len` zero bytes, produced 64 KiB at a time (never held whole in memory).
pub fn zeros(len: u64) -> TestBody {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from(vec![0u8; CHUNK]);
    let full = len / CHUNK as u64;
    let rest = (len % CHUNK as u64) as usize;
    let frames = (0..full)
        .map(move |_| chunk.clone())
        .chain((rest > 0).then(|| Bytes::from(vec![0u8; rest])))
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    StreamBody::new(stream::iter(frames)).boxed()
}

// ---------------------------------------------------------------------------------------------
// keygate

/// How long a test's keygate may take to shut down (its `server.shutdown_grace` is 5 s).
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(15);

/// keygate running in-process on port 0.
pub struct Keygate {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The decision endpoint, when `server.authz_listen` is set.
    pub authz: Option<SocketAddr>,
    pub app: Arc<keygate::proxy::App>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A config for a test: loopback listeners on port 0, the given store and upstream.
pub fn test_config(redis_url: &str, namespace: &str, upstream: &str) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.server.admin_listen = "127.0.0.1:0".into();
    c.server.shutdown_grace = "5s".into();
    c.store.redis_url = redis_url.into();
    c.store.namespace = namespace.into();
    c.store.timeout = "500ms".into();
    c.upstream.url = Some(upstream.into());
    c
}

/// A config for a test on the embedded file store: loopback listeners on port 0.
pub fn file_test_config(keys_file: &std::path::Path, upstream: &str) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.server.admin_listen = "127.0.0.1:0".into();
    c.upstream.url = Some(upstream.into());
    c.store.keys_file = Some(keys_file.to_str().unwrap().into());
    c
}

impl Keygate {
    pub async fn start(config: Config) -> Self {
        let settings = config.serve_settings().expect("valid test config");
        let server = Server::bind(settings).await.unwrap();
        Self::run(server)
    }

    pub fn run(server: Server) -> Self {
        let (proxy, admin, authz) = (
            server.proxy_addr(),
            server.admin_addr(),
            server.authz_addr(),
        );
        let app = server.app().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Keygate {
            proxy,
            admin,
            authz,
            app,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// A URL on the decision endpoint (which must be on).
    pub fn authz_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.authz.expect("server.authz_listen is set")
        )
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Starts keygate in front of a store the test built (e.g. a wrapper that gates lookups).
    pub async fn start_with_store(config: Config, store: Arc<dyn Store>) -> Self {
        let settings = config.serve_settings().expect("valid test config");
        Self::run(Server::bind_with_store(settings, store).await.unwrap())
    }

    /// Waits until `/readyz` answers 200 (store reachable, subscription up).
    pub async fn wait_ready(&self) {
        let (http, url) = (Http::new(), self.admin_url("/readyz"));
        eventually(Duration::from_secs(10), "keygate is ready", || {
            let (http, url) = (http.clone(), url.clone());
            async move { http.get(&url, &[]).await.status == 200 }
        })
        .await;
    }

    /// Scrapes `/metrics` over HTTP.
    pub async fn scrape(&self) -> Scrape {
        let reply = Http::new().get(&self.admin_url("/metrics"), &[]).await;
        assert_eq!(reply.status, 200);
        Scrape::parse(&reply.text())
    }

    /// Invalidation messages this instance has processed.
    pub fn invalidations(&self) -> u64 {
        self.app.metrics.invalidations.get()
    }

    /// Revokes the key `id` through `store` and waits until this instance has processed the
    /// announcement, so the very next request is decided after it.
    pub async fn revoke_and_wait(&self, store: &dyn Store, id: &str) {
        let seen = self.invalidations();
        manage::revoke_key(store, id, now_unix(), "test")
            .await
            .unwrap();
        eventually(
            Duration::from_secs(10),
            "the revocation is announced",
            || {
                let n = self.invalidations();
                async move { n > seen }
            },
        )
        .await;
    }

    /// Stops keygate and waits for it to finish, failing the test if that takes longer than
    /// [`SHUTDOWN_DEADLINE`].
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(SHUTDOWN_DEADLINE, task).await {
                Ok(done) => done.expect("keygate's server task panicked"),
                Err(_) => panic!("keygate did not shut down within {SHUTDOWN_DEADLINE:?}"),
            }
        }
    }
}

impl Drop for Keygate {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP client

/// How long a test's HTTP exchange may take, response head and body: a keygate or upstream
/// that hangs fails the test with a message instead of hanging it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A real HTTP client (HTTP/1.1 by default, or HTTP/2 with prior knowledge); every request
/// has a deadline ([`REQUEST_TIMEOUT`]).
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, TestBody>,
}

/// A response with its body read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn error_code(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Http {
    pub fn new() -> Self {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn http2() -> Self {
        Http {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    /// Sends a request and returns the response head (within [`REQUEST_TIMEOUT`]) with the
    /// body still streaming.
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: TestBody,
    ) -> Response<Incoming> {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        match tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.client.request(req.body(body).unwrap()),
        )
        .await
        {
            Ok(resp) => resp.expect("request reached keygate"),
            Err(_) => panic!("{method} {url}: no response head within {REQUEST_TIMEOUT:?}"),
        }
    }

    pub async fn request(&self, method: &str, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.request_body(method, url, headers, Bytes::new()).await
    }

    /// A request with a body, its response read whole, all within [`REQUEST_TIMEOUT`].
    pub async fn request_body(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let exchange = async {
            let resp = self
                .send(method, url, headers, Full::new(body.into()).boxed())
                .await;
            let (parts, body) = resp.into_parts();
            Reply {
                status: parts.status,
                headers: parts.headers,
                body: body.collect().await.unwrap().to_bytes(),
            }
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(reply) => reply,
            Err(_) => panic!("{method} {url}: no complete response within {REQUEST_TIMEOUT:?}"),
        }
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.request("GET", url, headers).await
    }

    /// GET with `Authorization: Bearer <key>`.
    pub async fn get_with_key(&self, url: &str, key: &str) -> Reply {
        let auth = format!("Bearer {key}");
        self.get(url, &[("authorization", &auth)]).await
    }
}

/// How long an instance may take to apply an invalidation it was sent (generous for a loaded
/// CI machine; `cargo bench --bench revocation` measures the real figure).
pub const PROPAGATION: Duration = Duration::from_secs(3);

/// A GET of `/` with `key`: its status and, unless 200, its error code.
pub async fn status_of(http: &Http, kg: &Keygate, key: &str) -> (u16, String) {
    let reply = http.get_with_key(&kg.url("/"), key).await;
    let code = if reply.status == 200 {
        String::new()
    } else {
        reply.error_code()
    };
    (reply.status.as_u16(), code)
}

/// Polls a GET of `/` with `key` until it answers `want`, within [`PROPAGATION`].
pub async fn wait_for_status(http: &Http, kg: &Keygate, key: &str, want: u16, what: &str) {
    wait_for_status_within(PROPAGATION, http, kg, key, want, what).await;
}

/// Polls a GET of `/` with `key` until it answers `want`, within `limit`.
pub async fn wait_for_status_within(
    limit: Duration,
    http: &Http,
    kg: &Keygate,
    key: &str,
    want: u16,
    what: &str,
) {
    let (http, url, key) = (http.clone(), kg.url("/"), key.to_owned());
    eventually(limit, what, || {
        let (http, url, key) = (http.clone(), url.clone(), key.clone());
        async move { http.get_with_key(&url, &key).await.status == want }
    })
    .await;
}

/// A namespace no other test uses.
pub fn namespace(tag: &str) -> String {
    format!(
        "t{}-{tag}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::SeqCst)
    )
}

// ---------------------------------------------------------------------------------------------
// A TCP relay the test can pause

/// Forwards TCP connections to `target`; while paused, no byte moves in either direction but
/// every connection stays open: to its peers, a silently dead (half-open) link.
pub struct Relay {
    pub addr: SocketAddr,
    paused: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (paused, _) = tokio::sync::watch::channel(false);
        let pause_tx = paused.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(sr), Box::new(cw)),
                ] {
                    let mut gate = pause_tx.subscribe();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if gate.wait_for(|p| !*p).await.is_err() {
                                break;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown().await;
                    });
                }
            }
        });
        Relay { addr, paused }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus text

/// One scrape of `/metrics`: every sample by its series as printed (`name{label="v",…}`).
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: HashMap<String, f64>,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse().ok()?))
            })
            .collect();
        Scrape {
            text: text.to_owned(),
            samples,
        }
    }

    /// A sample's value; 0 for a series not (yet) exported.
    pub fn get(&self, series: &str) -> f64 {
        self.samples.get(series).copied().unwrap_or(0.0)
    }

    /// `keygate_auth_decisions_total` for `mode` (`proxy`, `authz`) and `outcome`.
    pub fn decisions(&self, mode: &str, outcome: &str) -> f64 {
        self.get(&format!(
            "keygate_auth_decisions_total{{mode=\"{mode}\",outcome=\"{outcome}\"}}"
        ))
    }

    /// The metric names exported (histograms also under their `_bucket`, `_sum`, `_count`).
    pub fn names(&self) -> std::collections::HashSet<String> {
        self.samples
            .keys()
            .map(|s| s.split('{').next().unwrap().to_owned())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Key management through the real binary, and what Redis holds

/// The `keygate` binary with `args`, against a Redis namespace, with `--output json`.
pub fn keygate_command(redis_url: &str, ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
    cmd.args(args)
        .args(["--redis-url", redis_url, "--namespace", ns])
        .args(["--output", "json"]);
    cmd
}

/// Runs the `keygate` binary against a Redis namespace with `--output json`.
pub fn keygate_cli(redis_url: &str, ns: &str, args: &[&str]) -> std::process::Output {
    keygate_command(redis_url, ns, args).output().unwrap()
}

/// Runs the binary, expects success, and parses its JSON output.
pub fn keygate_json(redis_url: &str, ns: &str, args: &[&str]) -> serde_json::Value {
    let out = keygate_cli(redis_url, ns, args);
    assert!(
        out.status.success(),
        "keygate {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "keygate {args:?} did not print JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Every value stored under `ns:`, read with the command its type needs, as one string in a
/// canonical order (keys, set members and hash fields sorted), so that two dumps of unchanged
/// data are equal however Redis happens to order its tables.
pub fn dump_redis(redis: &RedisServer, ns: &str) -> String {
    let mut keys: Vec<String> = redis.cmd(&["KEYS", &format!("{ns}:*")]);
    keys.sort();
    let mut out = String::new();
    for k in keys {
        let kind: String = redis.cmd(&["TYPE", &k]);
        let value = match kind.as_str() {
            "string" => format!("{:?}", redis.cmd::<redis::Value>(&["GET", &k])),
            "hash" => {
                let mut fields: Vec<(String, String)> = redis
                    .cmd::<HashMap<String, String>>(&["HGETALL", &k])
                    .into_iter()
                    .collect();
                fields.sort();
                format!("{fields:?}")
            }
            "set" => {
                let mut members: Vec<String> = redis.cmd(&["SMEMBERS", &k]);
                members.sort();
                format!("{members:?}")
            }
            "zset" => format!(
                "{:?}",
                redis.cmd::<redis::Value>(&["ZRANGE", &k, "0", "-1", "WITHSCORES"])
            ),
            "list" => format!(
                "{:?}",
                redis.cmd::<redis::Value>(&["LRANGE", &k, "0", "-1"])
            ),
            "stream" => format!("{:?}", redis.cmd::<redis::Value>(&["XRANGE", &k, "-", "+"])),
            other => panic!("unexpected type {other} of {k}"),
        };
        out.push_str(&format!("{k} {kind} {value}\n"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Child processes with a deadline

/// Runs `cmd` to completion with its stdout and stderr captured, killing it (and failing the
/// test) if it is still running after `within`.
pub fn output_within(cmd: &mut Command, within: Duration) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    // Read both pipes while waiting, so a chatty child cannot block on a full pipe.
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut buf).map(|_| buf)
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut buf).map(|_| buf)
    });
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap().unwrap(),
        stderr: err.join().unwrap().unwrap(),
    }
}

// ---------------------------------------------------------------------------------------------
// Deadlines and raw connections

/// Awaits `fut`, failing the test if it takes longer than `limit`.
pub async fn within<F: std::future::Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?} waiting for: {what}"),
    }
}

/// Sends raw bytes to `addr` (then half-closes when `close_write`) and reads until the peer
/// closes or `limit` passes: what came back, as text.
pub async fn raw_exchange(
    addr: SocketAddr,
    bytes: &[u8],
    close_write: bool,
    limit: Duration,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut out = Vec::new();
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(bytes).await?;
        if close_write {
            s.shutdown().await?;
        }
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return Ok::<_, std::io::Error>(()),
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(limit, exchange).await;
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// keygate as a child process, with its own file descriptor limit

/// The `keygate serve` binary as a child process, killed on drop.
pub struct KeygateProcess {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub pid: u32,
    child: Child,
}

impl KeygateProcess {
    /// Starts `keygate serve ARGS` with `env`, its descriptor limit (soft and hard) set to
    /// `nofile` before it runs, and waits (up to 30 s) for it to log its listeners.
    pub fn start(args: &[&str], env: &[(&str, &str)], nofile: u64) -> Self {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
        cmd.arg("serve")
            .args(args)
            .env("KEYGATE__LOG__FORMAT", "json")
            .env("KEYGATE__LOG__ACCESS", "false")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec this only calls setrlimit, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: nofile as libc::rlim_t,
                    rlim_max: nofile as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("the keygate binary starts");
        let pid = child.id();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        // Keeps reading after the listeners are known, so the child never blocks on its stderr.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("keygate did not log its listeners:\n{}", seen.join("\n"));
                }
            };
            let fields = serde_json::from_str::<serde_json::Value>(&line)
                .map(|v| v["fields"].clone())
                .unwrap_or_default();
            if fields["message"] == "keygate serving" {
                let addr = |f: &str| fields[f].as_str().unwrap().parse().unwrap();
                return KeygateProcess {
                    proxy: addr("listen"),
                    admin: addr("admin"),
                    pid,
                    child,
                };
            }
            seen.push(line);
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

impl Drop for KeygateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 keep-alive connection: every request goes over it, or fails.
pub struct KeptAlive {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    conn: Option<tokio::task::JoinHandle<Result<(), hyper::Error>>>,
}

impl KeptAlive {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = within(
            Duration::from_secs(5),
            "a keep-alive connection",
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .unwrap();
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let conn = Some(tokio::spawn(conn));
        KeptAlive { sender, conn }
    }

    /// A GET on this connection within `limit`: its status and body, or why not.
    pub async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        limit: Duration,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut req = Request::get(path).header("host", "keygate.test");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        let exchange = async {
            self.sender.ready().await.map_err(|e| e.to_string())?;
            let resp = self
                .sender
                .send_request(req)
                .await
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok((status, body.to_bytes()))
        };
        tokio::time::timeout(limit, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
    }
}

/// How long until the peer of `stream` closes it (reads end), or `None` if it stays open past
/// `limit`. Bytes the peer sends are read and ignored.
pub async fn closed_within(
    stream: &mut tokio::net::TcpStream,
    limit: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let read_to_end = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read_to_end)
        .await
        .ok()
        .map(|()| started.elapsed())
}

impl KeptAlive {
    /// Resolves when the connection has ended (the peer closed it).
    pub async fn closed(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Redis over TLS: test certificates (rcgen) and a `redis-server` with a TLS port.
pub mod tls_redis;

// TLS on keygate's listeners: a test CA, a TLS client, HTTP over it

pub mod tls_server;

// Redis Sentinel: a master, a replica and three sentinels

pub mod redis_sentinel;

// Redis Cluster: masters, their replicas, joined with redis-cli --cluster create

pub mod redis_cluster;
