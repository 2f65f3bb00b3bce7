//! A real Redis Cluster on loopback: `redis-server --cluster-enabled yes` on free ports (each
//! with its cluster bus port, 10000 above, free too), joined by `redis-cli --cluster create`,
//! each node killed by pid when dropped. A primary can be SIGKILLed (its replica takes over) and
//! slots moved between primaries (`redis-cli --cluster reshard`) while clients use it. A cluster
//! may speak TLS only, to its clients and on its bus and replication links.

use crate::ports::free_port_pair;
use crate::process::{append, Proc};
use crate::redis::{cli_at, cli_with, TlsFiles};
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long the cluster may take to form, or to settle after a failover.
const SETTLE: Duration = Duration::from_secs(30);

/// How long a primary may not answer before the others call it failing and its replica takes
/// over (`cluster-node-timeout`), unless the caller names another.
const NODE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where a node's cluster bus listens, above its port.
const BUS_OFFSET: u16 = 10_000;

/// A running Redis Cluster.
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    /// What every node serves TLS with, when the cluster speaks TLS only.
    tls: Option<TlsFiles>,
    /// Where the nodes' directories are, removed with the cluster unless the caller gave it.
    _dir: Option<TempDir>,
}

struct ClusterNode {
    port: u16,
    dir: std::path::PathBuf,
    appendfsync: String,
    node_timeout: Duration,
    tls: Option<TlsFiles>,
    process: Option<Proc>,
}

impl ClusterNode {
    /// Starts its `redis-server`; a node started again reads its `nodes.conf` and rejoins.
    fn launch(&mut self) -> std::io::Result<()> {
        let port = self.port.to_string();
        // With TLS, `port` is the TLS port and the bus (still 10000 above) speaks TLS too.
        let listen: Vec<String> = match &self.tls {
            None => vec!["--port".into(), port],
            Some(files) => ["--port", "0", "--tls-port", &port]
                .into_iter()
                .chain(["--tls-cluster", "yes", "--tls-replication", "yes"])
                .map(str::to_string)
                .chain(
                    files
                        .settings()
                        .into_iter()
                        .flat_map(|(name, value)| [format!("--{name}"), value]),
                )
                .collect(),
        };
        let node_timeout = self.node_timeout.as_millis().to_string();
        let child = Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                &node_timeout,
            ])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", &self.appendfsync])
            // A new replica syncs at once, not after the default 5 s wait for others.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(append(&self.dir.join("redis.log"))?)
            .stderr(Stdio::null())
            .spawn()?;
        self.process = Some(Proc::from_child(child));
        Ok(())
    }
}

impl RedisCluster {
    /// Three primaries with a replica each; fails the test if it cannot.
    pub fn start() -> RedisCluster {
        RedisCluster::try_start(3, 1).unwrap_or_else(|error| {
            panic!("cannot start a redis cluster (scripts/test installs redis): {error}")
        })
    }

    /// `primaries` primaries with `replicas` replicas each, formed and every slot served, with
    /// `appendfsync everysec`.
    pub fn try_start(primaries: usize, replicas: usize) -> std::io::Result<RedisCluster> {
        RedisCluster::try_start_with(primaries, replicas, "everysec")
    }

    /// Like [`RedisCluster::try_start`], with this `appendfsync`.
    pub fn try_start_with(
        primaries: usize,
        replicas: usize,
        appendfsync: &str,
    ) -> std::io::Result<RedisCluster> {
        RedisCluster::try_start_on(primaries, replicas, appendfsync, None, None, NODE_TIMEOUT)
    }

    /// Like [`RedisCluster::try_start_with`], each node's directory (data, `nodes.conf` and
    /// `redis.log`) under `dir`, which outlives the cluster, and its `cluster-node-timeout`
    /// `node_timeout`.
    pub fn try_start_in(
        dir: &std::path::Path,
        primaries: usize,
        replicas: usize,
        appendfsync: &str,
        node_timeout: Duration,
    ) -> std::io::Result<RedisCluster> {
        RedisCluster::try_start_on(
            primaries,
            replicas,
            appendfsync,
            None,
            Some(dir),
            node_timeout,
        )
    }

    /// Like [`RedisCluster::try_start`], every node speaking TLS only with `files`: to its
    /// clients, on the cluster bus and between primary and replica.
    pub fn try_start_tls(
        primaries: usize,
        replicas: usize,
        files: TlsFiles,
    ) -> std::io::Result<RedisCluster> {
        RedisCluster::try_start_on(
            primaries,
            replicas,
            "everysec",
            Some(files),
            None,
            NODE_TIMEOUT,
        )
    }

    fn try_start_on(
        primaries: usize,
        replicas: usize,
        appendfsync: &str,
        tls: Option<TlsFiles>,
        dir: Option<&std::path::Path>,
        node_timeout: Duration,
    ) -> std::io::Result<RedisCluster> {
        let (temp, base) = match dir {
            Some(dir) => (None, dir.to_path_buf()),
            None => {
                let temp = tempfile::tempdir()?;
                let base = temp.path().to_path_buf();
                (Some(temp), base)
            }
        };
        let mut nodes = Vec::new();
        for _ in 0..primaries * (1 + replicas) {
            let port = free_port_pair(BUS_OFFSET)?;
            let node_dir = base.join(port.to_string());
            std::fs::create_dir_all(&node_dir)?;
            let mut node = ClusterNode {
                port,
                dir: node_dir,
                appendfsync: appendfsync.to_string(),
                node_timeout,
                tls: tls.clone(),
                process: None,
            };
            node.launch()?;
            nodes.push(node);
        }
        let cluster = RedisCluster {
            nodes,
            tls,
            _dir: temp,
        };
        let deadline = Instant::now() + SETTLE;
        for node in &cluster.nodes {
            while cluster.cli(node.port, &["PING"]).as_deref() != Some("PONG") {
                if Instant::now() > deadline {
                    return Err(std::io::Error::other(format!(
                        "redis-server on port {} did not answer PING",
                        node.port
                    )));
                }
                std::thread::sleep(crate::POLL);
            }
        }
        let addresses = cluster.addresses();
        let output = Command::new("redis-cli")
            .args(cluster.tls_args())
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()?;
        if !output.status.success() {
            return Err(std::io::Error::other(format!(
                "redis-cli --cluster create: {}",
                String::from_utf8_lossy(&output.stdout)
            )));
        }
        cluster.wait_settled(primaries)?;
        Ok(cluster)
    }

    /// `127.0.0.1:port` of every node still running.
    pub fn addresses(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|node| node.process.is_some())
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect()
    }

    /// The `[database]` lines of a node that keeps its orders in this cluster.
    pub fn database_config(&self) -> String {
        let nodes: Vec<String> = self
            .addresses()
            .iter()
            .map(|address| format!("\"{address}\""))
            .collect();
        format!("[database]\ncluster_nodes = [{}]\n", nodes.join(", "))
    }

    /// Runs `redis-cli` against the node on `port` (over TLS when the cluster speaks it);
    /// `None` when it fails.
    pub fn cli(&self, port: u16, args: &[&str]) -> Option<String> {
        match &self.tls {
            None => cli_at(port, args),
            Some(files) => cli_with(IpAddr::from([127, 0, 0, 1]), port, Some(files), args),
        }
    }

    /// The `redis-cli` arguments that reach its nodes.
    fn tls_args(&self) -> Vec<String> {
        self.tls
            .as_ref()
            .map(TlsFiles::cli_args)
            .unwrap_or_default()
    }

    /// The ports of the primaries that serve slots now, as a running node sees them.
    pub fn primaries(&self) -> Vec<u16> {
        let Some(view) = self
            .running()
            .find_map(|port| self.cli(port, &["CLUSTER", "NODES"]))
        else {
            return Vec::new();
        };
        let mut ports: Vec<u16> = view
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let serving = fields.len() > 8;
                let primary = fields.get(2)?.contains("master") && !fields[2].contains("fail");
                let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                (primary && serving).then_some(port)
            })
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The port of the primary that serves `slot` now, as a running node sees it.
    pub fn primary_of(&self, slot: u16) -> Option<u16> {
        let view = self
            .running()
            .find_map(|port| self.cli(port, &["CLUSTER", "NODES"]))?;
        view.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let serves = fields.iter().skip(8).any(|range| {
                let (low, high) = range.split_once('-').unwrap_or((range, range));
                matches!((low.parse::<u16>(), high.parse::<u16>()), (Ok(low), Ok(high)) if (low..=high).contains(&slot))
            });
            let primary = fields.get(2)?.contains("master");
            let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
            (serves && primary).then_some(port)
        })
    }

    /// `CLUSTER NODES` as a running node sees it, for failure messages.
    pub fn view(&self) -> String {
        self.running()
            .find_map(|port| self.cli(port, &["CLUSTER", "NODES"]))
            .unwrap_or_default()
    }

    /// How many slots the node on `port` serves, as a running node sees it.
    pub fn slots_of(&self, port: u16) -> usize {
        let view = self.view();
        let Some(line) = view.lines().find(|line| {
            line.split_whitespace()
                .nth(1)
                .and_then(|address| address.split(['@', ':']).nth(1))
                == Some(&port.to_string())
        }) else {
            return 0;
        };
        line.split_whitespace()
            .skip(8)
            .filter_map(|range| {
                let (low, high) = range.split_once('-').unwrap_or((range, range));
                Some(high.parse::<usize>().ok()? + 1 - low.parse::<usize>().ok()?)
            })
            .sum()
    }

    /// The hash slot of `key`, as the cluster computes it.
    pub fn slot_of(&self, key: &str) -> Option<u16> {
        self.running()
            .find_map(|port| self.cli(port, &["CLUSTER", "KEYSLOT", key]))?
            .parse()
            .ok()
    }

    fn running(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes
            .iter()
            .filter(|node| node.process.is_some())
            .map(|node| node.port)
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|node| node.port == port) {
            drop(node.process.take());
        }
    }

    /// Starts the node on `port` again after [`RedisCluster::kill`]: it rejoins the cluster
    /// (as a replica, once another took its slots over).
    pub fn restart(&mut self, port: u16) -> std::io::Result<()> {
        match self.nodes.iter_mut().find(|node| node.port == port) {
            Some(node) => node.launch(),
            None => Err(std::io::Error::other(format!("no cluster node on {port}"))),
        }
    }

    /// Sends a signal by name (`STOP`, `CONT`) to the node on `port`; true when delivered.
    pub fn signal(&self, port: u16, name: &str) -> bool {
        self.nodes
            .iter()
            .find(|node| node.port == port)
            .and_then(|node| node.process.as_ref())
            .is_some_and(|process| process.signal(name))
    }

    /// Whether every running node sees every slot served, `primaries` primaries serve them, and
    /// every replica is in sync with its primary (until then it could not take over).
    pub fn is_settled(&self, primaries: usize) -> bool {
        self.running().all(|port| {
            let cluster = self.cli(port, &["CLUSTER", "INFO"]).is_some_and(|info| {
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            });
            let replicating = self
                .cli(port, &["INFO", "replication"])
                .is_some_and(|info| {
                    info.contains("role:master") || info.contains("master_link_status:up")
                });
            cluster && replicating
        }) && self.primaries().len() == primaries
    }

    /// Waits until the cluster [is settled](RedisCluster::is_settled).
    pub fn wait_settled(&self, primaries: usize) -> std::io::Result<()> {
        let deadline = Instant::now() + SETTLE;
        while !self.is_settled(primaries) {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "the redis cluster did not settle within {SETTLE:?}: {}",
                    self.view()
                )));
            }
            std::thread::sleep(crate::POLL);
        }
        Ok(())
    }

    /// Moves `slots` slots from the primary on `from` to the one on `to`, with
    /// `redis-cli --cluster reshard` (key by key, `MIGRATE`), while clients go on.
    pub fn reshard(&self, from: u16, to: u16, slots: usize) -> std::io::Result<()> {
        let id = |port: u16| {
            self.cli(port, &["CLUSTER", "MYID"])
                .ok_or_else(|| std::io::Error::other(format!("no CLUSTER MYID from {port}")))
        };
        let output = Command::new("redis-cli")
            .args(self.tls_args())
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
            .args(["--cluster-from", &id(from)?, "--cluster-to", &id(to)?])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .output()?;
        if !output.status.success() {
            return Err(std::io::Error::other(format!(
                "redis-cli --cluster reshard: {}",
                String::from_utf8_lossy(&output.stdout)
            )));
        }
        Ok(())
    }

    /// Calls made of the primaries now serving (`INFO commandstats`), summed; `EXEC`'s are
    /// left out (its commands count themselves), as are those of this accounting.
    pub fn calls(&self) -> u64 {
        self.primaries()
            .into_iter()
            .filter_map(|port| self.cli(port, &["INFO", "commandstats"]))
            .flat_map(|stats| {
                stats
                    .lines()
                    .filter(|line| !line.starts_with("cmdstat_info:"))
                    .filter_map(|line| {
                        let calls = line.split_once("calls=")?.1;
                        calls.split(',').next()?.parse::<u64>().ok()
                    })
                    .collect::<Vec<_>>()
            })
            .sum()
    }
}
