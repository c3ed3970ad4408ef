//! A Redis Cluster on loopback for tests: `masters` masters, each with `replicas` replicas,
//! every node a `redis-server --cluster-enabled yes` on a free port with its own temp dir and a
//! password, joined with `redis-cli --cluster create`. Failure detection is tuned down
//! (`cluster-node-timeout`) so that a replica takes over a killed master within seconds.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, temp_dir};

/// Every node's password (`requirepass`, `masterauth`).
pub const PASSWORD: &str = "cluster-pw-5d2";

/// How long the other nodes wait for a silent node before calling it failed.
pub const NODE_TIMEOUT_MS: u64 = 1000;

pub use super::redis_sentinel::Node;

/// Starts one cluster node on `port`.
fn spawn(port: u16) -> Node {
    let dir = temp_dir(&format!("cluster-{port}"));
    let args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        &dir.join("nodes.conf").to_string_lossy(),
        "--cluster-node-timeout",
        &NODE_TIMEOUT_MS.to_string(),
        "--dir",
        &dir.to_string_lossy(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--requirepass",
        PASSWORD,
        "--masterauth",
        PASSWORD,
        // A replica's first sync starts at once (not after the 5 s wait for more replicas),
        // and a replica may take over however long it was cut off.
        "--repl-diskless-sync-delay",
        "0",
        "--cluster-replica-validity-factor",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Node::spawn(port, dir, &args, PASSWORD, None)
}

/// The cluster's nodes, masters first (as `redis-cli --cluster create` assigns them).
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub masters: usize,
}

impl Cluster {
    /// Starts the nodes, joins them, and waits until every node sees every slot served.
    pub fn start(masters: usize, replicas: usize) -> Cluster {
        let total = masters * (1 + replicas);
        let nodes: Vec<Node> = (0..total).map(|_| spawn(free_port())).collect();
        let mut create = Command::new("redis-cli");
        create.args(["-a", PASSWORD, "--no-auth-warning", "--cluster", "create"]);
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli is not installed: apt-get install -y redis-tools");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Cluster { nodes, masters };
        cluster.wait_ok(Duration::from_secs(30));
        // Replicas in sync, so that each can take over its master.
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in &cluster.nodes[masters..] {
            while !n
                .try_cmd::<String>(&["INFO", "replication"])
                .is_ok_and(|i| i.contains("master_link_status:up"))
            {
                assert!(Instant::now() < deadline, "replica {} not in sync", n.port);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        cluster
    }

    /// Waits until every live node reports `cluster_state:ok` with all slots served.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.nodes.iter().filter(|n| n.running()).all(|n| {
                n.try_cmd::<String>(&["CLUSTER", "INFO"]).is_ok_and(|i| {
                    i.contains("cluster_state:ok") && i.contains("cluster_slots_ok:16384")
                })
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ok within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `host:port` of the given nodes, for `store.cluster_nodes`.
    pub fn addrs(&self, which: &[usize]) -> Vec<String> {
        which
            .iter()
            .map(|&i| format!("127.0.0.1:{}", self.nodes[i].port))
            .collect()
    }

    /// The node serving `key`'s slot now (as the first node that answers sees it).
    pub fn master_of(&self, key: &str) -> usize {
        let slot: i64 = self
            .nodes
            .iter()
            .find_map(|n| n.try_cmd(&["CLUSTER", "KEYSLOT", key]).ok())
            .expect("a node answers");
        let slots: Vec<redis::Value> = self
            .nodes
            .iter()
            .find_map(|n| n.try_cmd(&["CLUSTER", "SLOTS"]).ok())
            .expect("a node answers");
        for range in slots {
            let redis::Value::Array(r) = range else {
                continue;
            };
            let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi))) = (r.first(), r.get(1))
            else {
                continue;
            };
            if (*lo..=*hi).contains(&slot) {
                let Some(redis::Value::Array(m)) = r.get(2) else {
                    break;
                };
                let Some(redis::Value::Int(port)) = m.get(1) else {
                    break;
                };
                return self
                    .nodes
                    .iter()
                    .position(|n| i64::from(n.port) == *port)
                    .expect("the master is one of the nodes");
            }
        }
        panic!("no master serves slot {slot}")
    }
}

impl Cluster {
    /// The node id of node `i` (`CLUSTER MYID`).
    pub fn id_of(&self, i: usize) -> String {
        self.nodes[i].cmd(&["CLUSTER", "MYID"])
    }

    /// Moves the slot of `key`, with every key in it, from master `from` to master `to`, the
    /// way `redis-cli --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE, then the new owner
    /// announced to every master.
    pub fn move_slot_of(&self, key: &str, from: usize, to: usize) {
        let slot: i64 = self.nodes[from].cmd(&["CLUSTER", "KEYSLOT", key]);
        let slot = slot.to_string();
        let (from_id, to_id) = (self.id_of(from), self.id_of(to));
        let () = self.nodes[to].cmd(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
        let () = self.nodes[from].cmd(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
        loop {
            let keys: Vec<String> =
                self.nodes[from].cmd(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
            if keys.is_empty() {
                break;
            }
            let port = self.nodes[to].port.to_string();
            let mut args = vec![
                "MIGRATE",
                "127.0.0.1",
                &port,
                "",
                "0",
                "5000",
                "AUTH",
                PASSWORD,
                "KEYS",
            ];
            args.extend(keys.iter().map(String::as_str));
            let () = self.nodes[from].cmd(&args);
        }
        for i in 0..self.masters {
            if self.nodes[i].running() {
                let () = self.nodes[i].cmd(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
            }
        }
    }
}
