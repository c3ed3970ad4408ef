//! A Redis Sentinel deployment on loopback for tests: one master, one replica (`--replicaof`)
//! and three sentinels (`redis-server sentinel.conf --sentinel`), each on a free port with its
//! own temp dir; with a password on the data servers and another on the sentinels. Failure
//! detection is tuned down (`down-after-milliseconds`, `failover-timeout`) so that a failover
//! takes a few seconds. [`Sentinels::start_tls`] starts the same deployment speaking TLS only
//! (`--port 0`, `--tls-port`, `tls-replication yes`, client certificates required).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::tls_redis::{Leaf, TestCa};
use super::{free_port, temp_dir};

/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "kgmaster";
/// The data servers' password (`requirepass`, `masterauth`, `auth-pass`).
pub const DATA_PASSWORD: &str = "data-pw-7c1";
/// The sentinels' password (`requirepass`, `sentinel-pass`).
pub const SENTINEL_PASSWORD: &str = "sentinel-pw-41a";

/// How long a sentinel waits for a silent master before calling it down.
pub const DOWN_AFTER_MS: u64 = 1000;

/// One `redis-server` process (a data server or a sentinel), killed when dropped.
pub struct Node {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    password: &'static str,
    /// In a TLS deployment: the certificates the test's own connections use.
    tls: Option<redis::TlsCertificates>,
}

/// The TLS files of a TLS deployment: every node's certificate (server and client) and the
/// CA that signed it.
pub(super) struct Tls {
    ca: PathBuf,
    node: Leaf,
    client: redis::TlsCertificates,
}

impl Tls {
    /// `redis-server` arguments (or sentinel.conf lines, with `line`) for TLS only.
    fn settings(&self, port: u16) -> Vec<(String, String)> {
        [
            ("port", "0".to_owned()),
            ("tls-port", port.to_string()),
            ("tls-cert-file", self.node.cert.display().to_string()),
            ("tls-key-file", self.node.key.display().to_string()),
            ("tls-ca-cert-file", self.ca.display().to_string()),
            ("tls-auth-clients", "yes".into()),
            ("tls-replication", "yes".into()),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .to_vec()
    }
}

impl Node {
    /// Starts `redis-server` with `args` and waits until it answers a PING.
    pub(super) fn spawn(
        port: u16,
        dir: PathBuf,
        args: &[String],
        password: &'static str,
        tls: Option<&Tls>,
    ) -> Node {
        let child = Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: apt-get install -y redis-server redis-tools");
        let node = Node {
            port,
            dir,
            child: Some(child),
            password,
            tls: tls.map(|t| t.client.clone()),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while node.try_cmd::<String>(&["PING"]).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not answer within 10s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        node
    }

    /// Runs a command on a fresh authenticated connection, with 2 s bounds.
    pub fn try_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = match &self.tls {
            Some(certs) => redis::Client::build_with_tls(
                format!("rediss://:{}@127.0.0.1:{}", self.password, self.port),
                certs.clone(),
            )?,
            None => redis::Client::open(format!(
                "redis://:{}@127.0.0.1:{}",
                self.password, self.port
            ))?,
        };
        let mut c = client.get_connection_with_timeout(Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        c.set_write_timeout(Some(Duration::from_secs(2)))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c)
    }

    /// Like [`Node::try_cmd`], failing the test on an error.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("{args:?} on port {}: {e}", self.port))
    }

    /// Whether the node is up and calls itself a master.
    pub fn is_master(&self) -> bool {
        let role: redis::RedisResult<Vec<redis::Value>> = self.try_cmd(&["ROLE"]);
        matches!(role.as_deref(), Ok([redis::Value::BulkString(r), ..]) if r == b"master")
    }

    /// Whether the process has not been killed.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILLs the process: no goodbye to its clients, its port refuses at once.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The deployment.
pub struct Sentinels {
    pub master: Node,
    pub replica: Node,
    pub sentinels: Vec<Node>,
}

fn data_server(replica_of: Option<u16>, tls: Option<&Tls>) -> Node {
    let (port, dir) = (free_port(), temp_dir("sentinel-data"));
    let mut args: Vec<String> = match tls {
        Some(tls) => tls
            .settings(port)
            .into_iter()
            .flat_map(|(k, v)| [format!("--{k}"), v])
            .collect(),
        None => vec!["--port".into(), port.to_string()],
    };
    args.extend(
        [
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            DATA_PASSWORD,
            "--masterauth",
            DATA_PASSWORD,
            "--dir",
            dir.to_str().unwrap(),
        ]
        .map(String::from),
    );
    if let Some(m) = replica_of {
        args.extend(["--replicaof".into(), "127.0.0.1".into(), m.to_string()]);
    }
    Node::spawn(port, dir, &args, DATA_PASSWORD, tls)
}

fn sentinel(master_port: u16, tls: Option<&Tls>) -> Node {
    let (port, dir) = (free_port(), temp_dir("sentinel"));
    let conf = dir.join("sentinel.conf");
    let listen: String = match tls {
        Some(tls) => tls
            .settings(port)
            .into_iter()
            .map(|(k, v)| format!("{k} {v}\n"))
            .collect(),
        None => format!("port {port}\n"),
    };
    std::fs::write(
        &conf,
        format!(
            "{listen}bind 127.0.0.1\ndir {dir}\n\
             requirepass {SENTINEL_PASSWORD}\nsentinel sentinel-pass {SENTINEL_PASSWORD}\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
             sentinel auth-pass {MASTER_NAME} {DATA_PASSWORD}\n\
             sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
             sentinel failover-timeout {MASTER_NAME} 3000\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let args = [conf.to_str().unwrap().to_owned(), "--sentinel".into()];
    Node::spawn(port, dir, &args, SENTINEL_PASSWORD, tls)
}

impl Sentinels {
    /// Starts the master, its replica and three sentinels, and waits (10 s at most) until the
    /// replica is in sync and every sentinel knows the replica and the two other sentinels, so
    /// that a failover can happen.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// The same deployment speaking TLS only, on every node (data servers and sentinels): its
    /// certificates signed by `ca`, client certificates signed by `ca` required everywhere.
    pub fn start_tls(ca: &TestCa) -> Self {
        keygate::tls::install_default_provider();
        let node = ca.leaf("sentinel-node", &["127.0.0.1", "localhost"]);
        let read = |p: &PathBuf| std::fs::read(p).unwrap();
        let client = redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: read(&node.cert),
                client_key: read(&node.key),
            }),
            root_cert: Some(read(&ca.cert)),
        };
        Self::start_with(Some(&Tls {
            ca: ca.cert.clone(),
            node,
            client,
        }))
    }

    fn start_with(tls: Option<&Tls>) -> Self {
        let master = data_server(None, tls);
        let replica = data_server(Some(master.port), tls);
        let sentinels: Vec<Node> = (0..3).map(|_| sentinel(master.port, tls)).collect();
        let s = Sentinels {
            master,
            replica,
            sentinels,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let synced = s
                .replica
                .try_cmd::<String>(&["INFO", "replication"])
                .is_ok_and(|i| i.contains("master_link_status:up"));
            let known = s.sentinels.iter().all(|n| {
                n.try_cmd::<Vec<String>>(&["SENTINEL", "MASTER", MASTER_NAME])
                    .is_ok_and(|f| {
                        field(&f, "num-slaves") == "1" && field(&f, "num-other-sentinels") == "2"
                    })
            });
            if synced && known {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinel deployment did not settle within 10s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `host:port` of each sentinel.
    pub fn addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// The port of the master the first answering sentinel names.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|n| {
            n.try_cmd::<Vec<String>>(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME])
                .ok()
                .and_then(|a| a.get(1)?.parse().ok())
        })
    }
}

fn field<'a>(flat: &'a [String], name: &str) -> &'a str {
    flat.chunks(2)
        .find(|kv| kv[0] == name)
        .and_then(|kv| kv.get(1))
        .map_or("", String::as_str)
}
