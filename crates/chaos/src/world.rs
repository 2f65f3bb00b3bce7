//! The processes a campaign runs: a `redis-server` with an append-only file, three
//! order-process nodes started from the built binary (each in a network namespace of its own
//! when it can), the link faults between them, and what the cluster says about itself over HTTP.
//! Everything started here is killed by pid when dropped (`order-process-testkit`), then every
//! iptables rule added is removed, then the namespaces.

use crate::clock;
use crate::links::Links;
use crate::netns::Network;
use crate::redis::Redis;
use order_process_history::WORK_STEPS;
use order_process_testkit::{free_port, Proc};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// The cluster secret of the campaign's nodes.
pub const SECRET: &str = "chaos-cluster-secret";
/// The user every order is submitted as.
pub const USER: &str = "chaos";
/// How many nodes the campaign runs.
pub const NODES: usize = 3;
/// How often each node resumes unfinished orders of its own that nothing on it holds.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);
/// A duplicate of node `i` calls the ledger as node `DUPLICATE_BASE + i`.
pub const DUPLICATE_BASE: usize = 10;
/// The nodes' liveness lease (`cluster.liveness_ttl`): a node that cannot renew it starts no
/// step once it has run out.
pub const LIVENESS_TTL: Duration = Duration::from_secs(3);

/// One order-process node: its own directory (config, data, log), port and process.
pub struct Node {
    pub index: usize,
    /// The address it listens on and is reached at (loopback; a namespace's address when nodes
    /// run in network namespaces).
    pub host: String,
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
    /// Addresses (`host:port`) of the nodes it joins.
    join: Vec<String>,
    process: Option<Proc>,
    pub paused: bool,
    launches: usize,
    /// Environment added at launch (libfaketime for a skewed clock); empty normally.
    pub env: Vec<(String, String)>,
    /// The command the node is started by, inside its namespace (`scripts/netns exec NET
    /// HOST`); empty on loopback.
    pub launcher: Vec<String>,
    /// `http`, or `https` when the campaign serves the API over https (`--https`).
    pub scheme: &'static str,
}

impl Node {
    pub fn new(bin: &Path, dir: PathBuf, index: usize, config: &str) -> std::io::Result<Node> {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("config.toml"), config)?;
        Ok(Node {
            index,
            host: "127.0.0.1".into(),
            port: free_port()?,
            dir,
            bin: bin.to_path_buf(),
            join: Vec::new(),
            process: None,
            paused: false,
            launches: 0,
            env: Vec::new(),
            launcher: Vec::new(),
            scheme: "http",
        })
    }

    /// Runs the node at `host` (its namespace's address) through `launcher`.
    pub fn place(&mut self, host: String, launcher: Vec<String>) {
        self.host = host;
        self.launcher = launcher;
    }

    pub fn base(&self) -> String {
        format!("{}://{}", self.scheme, self.address())
    }

    /// `host:port`, what the node listens on and what others join.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }

    /// The node id, once the node has written it.
    pub fn service_id(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("data").join("service_id"))
            .ok()
            .map(|text| text.trim().to_string())
    }

    pub fn set_join(&mut self, addresses: Vec<String>) {
        self.join = addresses;
    }

    pub fn is_running(&mut self) -> bool {
        match self.process.as_mut() {
            Some(process) => process.try_exit().is_none(),
            None => false,
        }
    }

    /// Starts the process (same port, same data dir as before).
    pub fn launch(&mut self) -> std::io::Result<()> {
        self.launches += 1;
        let log = self.log_path();
        let mut marker = order_process_testkit::process::append(&log)?;
        writeln!(marker, "==== launch {} ====", self.launches)?;
        // The node's log times are its own clock's: the reader takes the offset out again.
        if let Some(offset) = clock::offset(&self.env) {
            writeln!(marker, "{}{offset:+}s ====", clock::MARKER)?;
        }
        let mut args = vec![
            "--config".to_string(),
            self.dir.join("config.toml").display().to_string(),
            "--listen".to_string(),
            self.address(),
            "--data-dir".to_string(),
            self.dir.join("data").display().to_string(),
        ];
        for address in &self.join {
            args.push("--join".to_string());
            args.push(address.clone());
        }
        let process = match self.launcher.split_first() {
            None => Proc::spawn_env(&self.bin, &args, &self.env, &log, &log)?,
            // `env` passes the environment to the node only, not to the launcher's own
            // processes (libfaketime in `ip` would skew it too); it execs, keeping the pid.
            Some((program, launcher)) => {
                let mut full = launcher.to_vec();
                if !self.env.is_empty() {
                    full.push("env".into());
                    full.extend(
                        self.env
                            .iter()
                            .map(|(name, value)| format!("{name}={value}")),
                    );
                }
                full.push(self.bin.display().to_string());
                full.extend(args);
                Proc::spawn(Path::new(program), &full, &log, &log)?
            }
        };
        self.process = Some(process);
        self.paused = false;
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        drop(self.process.take());
        self.paused = false;
    }

    /// Sends a signal by name; SIGSTOP and SIGCONT mark the node paused and resumed.
    pub fn signal(&mut self, name: &str) -> bool {
        let sent = self
            .process
            .as_ref()
            .is_some_and(|process| process.signal(name));
        if sent && name == "STOP" {
            self.paused = true;
        }
        if sent && name == "CONT" {
            self.paused = false;
        }
        sent
    }

    /// Why the process exited by itself (not killed or drained by the campaign), if it did.
    pub fn exited(&mut self) -> Option<Exit> {
        let status = self.process.as_mut().and_then(Proc::try_exit)?;
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let marker = format!("==== launch {} ====", self.launches);
        let last = log.rsplit(&marker).next().unwrap_or_default();
        Some(if status.success() {
            Exit::Other(status)
        } else if last.contains("refusing to start") && last.contains("replicas") {
            Exit::TooFewReplicas
        } else if last.contains("is in use by another process") {
            Exit::NodeIdInUse
        } else {
            Exit::Other(status)
        })
    }

    /// Polls until the process exits; `None` if it still runs at the deadline.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let status = self.process.as_mut()?.wait_exit(within).await;
        if status.is_some() {
            self.process = None;
        }
        status
    }
}

/// Why a node's process exited without being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It refused to start: its Redis has fewer replicas than `database.min_replicas` (a start
    /// in the middle of a failover).
    TooFewReplicas,
    /// It refused to start: another process kept its node id's liveness lease (a copy of its
    /// data dir took it first).
    NodeIdInUse,
    /// Anything else: a crash, or an exit nobody asked for.
    Other(ExitStatus),
}

/// The config of node `index`: cluster mode on the Redis that the `[database]` lines `database`
/// reach ([`Redis::database`]), every work step on the ledger. The campaign's user is named in
/// the `Authorization` header, on loopback as on a bridge. The nodes write orders in different
/// stored forms, so orders pass between them as they move: the first whole as JSON, the second
/// compressed with its payloads kept apart (`compress_orders`, `payload_apart`), the third split
/// (`split_orders`, its payloads compressed).
pub fn node_config(index: usize, database: &str, ledger: &str, tls: Option<&Tls>) -> String {
    let reconcile = RECONCILE_INTERVAL.as_secs();
    let liveness = LIVENESS_TTL.as_secs();
    let stored_form = match index % 3 {
        0 => "",
        1 => "compress_orders = true\npayload_apart = true\n",
        _ => "compress_orders = true\nsplit_orders = true\n",
    };
    let (server_tls, cluster_tls) = tls.map_or_else(Default::default, Tls::config_lines);
    let mut config = format!(
        "[server]\nshutdown_grace = \"20s\"\n{server_tls}\
         [pipeline]\nreconcile_interval = \"{reconcile}s\"\n\
         [log]\nlevel = \"info,order_process::pipeline=debug,order_process::cluster=debug\"\nformat = \"json\"\n\
         [database]\n{database}{stored_form}timeout = \"1s\"\n\
         [auth]\nmode = \"header\"\nallow_insecure_header = true\n\
         [cluster]\nsecret = \"{SECRET}\"\nliveness_ttl = \"{liveness}s\"\n{cluster_tls}"
    );
    for step in WORK_STEPS {
        config.push_str(&format!(
            "[steps.{step}]\nhandler = \"http\"\nurl = \"{ledger}/n{index}/run/{step}\"\n\
             rollback_url = \"{ledger}/n{index}/undo/{step}\"\ntimeout = \"5s\"\nretries = 8\n\
             backoff = \"100ms\"\nbackoff_max = \"1s\"\n"
        ));
    }
    config
}

/// The campaign's client of the nodes' API; with `tls`, trusting its CA and showing its
/// certificate.
pub fn http_client(tls: Option<&Tls>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder().pool_max_idle_per_host(64);
    if let Some(tls) = tls {
        builder = tls.client(builder)?;
    }
    builder.build().map_err(|error| error.to_string())
}

/// The campaign's https (`--https`): a CA and one certificate signed by it for every node's
/// address, good for serving and for showing as a client. The nodes serve their API over
/// https with it, require it of every caller (`server.tls_client_ca`), show it to each other,
/// and the campaign's client shows it too.
#[derive(Clone)]
pub struct Tls {
    dir: PathBuf,
}

impl Tls {
    /// Makes the CA and the certificate for `hosts` (IP addresses) in `dir`.
    pub fn new(dir: &Path, hosts: &[String]) -> Result<Tls, String> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair,
        };
        let failed =
            |error: rcgen::Error| format!("cannot make the campaign's certificates: {error}");
        std::fs::create_dir_all(dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "order-process chaos ca");
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(failed)?)
            .map_err(failed)?;
        let key = KeyPair::generate().map_err(failed)?;
        let mut node = CertificateParams::new(hosts.to_vec()).map_err(failed)?;
        node.distinguished_name
            .push(DnType::CommonName, "order-process chaos node");
        node.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let node = node.signed_by(&key, &ca).map_err(failed)?;
        for (name, text) in [
            ("ca.pem", ca.pem()),
            ("node.pem", node.pem()),
            ("node.key", key.serialize_pem()),
        ] {
            std::fs::write(dir.join(name), text)
                .map_err(|error| format!("cannot write {name}: {error}"))?;
        }
        Ok(Tls {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The lines of a node's `[server]` and `[cluster]` tables.
    fn config_lines(&self) -> (String, String) {
        let (ca, cert, key) = (
            self.path("ca.pem"),
            self.path("node.pem"),
            self.path("node.key"),
        );
        (
            format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\"\ntls_client_ca = \"{ca}\"\n"),
            format!("ca_file = \"{ca}\"\n"),
        )
    }

    /// `builder` trusting the CA and showing the certificate.
    fn client(&self, builder: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder, String> {
        let read = |name: &str| {
            std::fs::read(self.dir.join(name))
                .map_err(|error| format!("cannot read {name}: {error}"))
        };
        let ca =
            reqwest::Certificate::from_pem(&read("ca.pem")?).map_err(|error| error.to_string())?;
        let mut identity = read("node.pem")?;
        identity.extend(read("node.key")?);
        let identity = reqwest::Identity::from_pem(&identity).map_err(|error| error.to_string())?;
        Ok(builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .identity(identity))
    }
}

/// `GET url` as the campaign's user; the JSON body of a 2xx answer.
pub async fn get_json(client: &reqwest::Client, url: &str) -> Option<Value> {
    let response = client
        .get(url)
        .header("authorization", USER)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// Waits until the node answers its heartbeat with 200.
pub async fn wait_ready(client: &reqwest::Client, base: &str, within: Duration) -> bool {
    let url = format!("{base}/diagnostic/heartbeat");
    order_process_testkit::poll::until(within, Duration::from_millis(100), || async {
        get_json(client, &url).await.map(|_| ())
    })
    .await
    .is_some()
}

/// True when `base` sees `live` live nodes and names a leader.
async fn formed_at(client: &reqwest::Client, base: &str, live: usize) -> bool {
    let view = get_json(client, &format!("{base}/diagnostic/cluster")).await;
    let connected = view
        .as_ref()
        .and_then(|view| view["nodes"].as_array())
        .map(|nodes| nodes.iter().filter(|n| n["connected"] == true).count())
        .unwrap_or(0);
    connected == live && view.is_some_and(|view| !view["leader_name"].is_null())
}

/// Waits until every listed node sees all of them live and names a leader.
pub async fn wait_formed(client: &reqwest::Client, bases: &[String], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let mut formed = true;
        for base in bases {
            if !formed_at(client, base, bases.len()).await {
                formed = false;
                break;
            }
        }
        if formed {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Everything the campaign runs.
pub struct World {
    pub redis: Redis,
    pub nodes: Vec<Node>,
    pub links: Links,
    /// The namespaces the processes run in; last, so it goes after them and their rules.
    pub _network: Option<Network>,
}

impl World {
    /// The nodes running, not paused and not cut off.
    pub fn healthy(&mut self) -> Vec<usize> {
        let mut healthy = Vec::new();
        for (index, node) in self.nodes.iter_mut().enumerate() {
            if node.is_running() && !node.paused && !self.links.is_cut(index) {
                healthy.push(index);
            }
        }
        healthy
    }

    /// How many unfinished orders a node owns, asked of a healthy node through the cluster view
    /// (`GET /service/nodes/{service_id}/orders`); `None` when no node could say.
    pub async fn owned(
        &mut self,
        client: &reqwest::Client,
        service_id: &Option<String>,
    ) -> Option<usize> {
        let service_id = service_id.as_ref()?;
        for index in self.healthy() {
            let url = format!(
                "{}/service/nodes/{service_id}/orders",
                self.nodes[index].base()
            );
            let reply = client
                .get(&url)
                .header("x-cluster-secret", SECRET)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            let Ok(response) = reply else { continue };
            if !response.status().is_success() {
                continue;
            }
            if let Ok(view) = response.json::<Value>().await {
                if let Some(unfinished) = view["unfinished"].as_array() {
                    return Some(unfinished.len());
                }
            }
        }
        None
    }

    /// The leader's node index, asked of a healthy node.
    pub async fn leader(&mut self, client: &reqwest::Client) -> Option<usize> {
        for index in self.healthy() {
            let base = self.nodes[index].base();
            if let Some(view) = get_json(client, &format!("{base}/diagnostic/cluster")).await {
                let name = view["leader_name"].as_str()?.to_string();
                return self
                    .nodes
                    .iter()
                    .position(|node| node.service_id().as_deref() == Some(name.as_str()));
            }
        }
        None
    }
}
