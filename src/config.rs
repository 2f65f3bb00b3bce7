//! One `Config` for the whole node: TOML file, then command-line flags on top, validated once.
//!
//! Every key has a default, so no file is needed. `config/order-process.toml` is the commented
//! sample that lists them all. A bad key or value is a [`ConfigError`] naming the key; `main`
//! turns it into exit code 64.

use crate::order::Step;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config problem: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config: {}: {}", self.key, self.problem)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub pipeline: PipelineConfig,
    pub orders: OrdersConfig,
    pub simulate: SimulateConfig,
    /// Per-step handler sections, keyed by step name (`[steps.Processing]`).
    pub steps: BTreeMap<String, StepConfig>,
    pub database: DatabaseConfig,
    pub cluster: ClusterConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub notify: NotifyConfig,
    pub telemetry: TelemetryConfig,
}

/// The largest `server.max_body_bytes`: an order's payload and what its steps add must stay
/// within the largest doc a store reads back ([`crate::store::MAX_DOC`]).
pub const MAX_BODY_BYTES: u64 = 32 << 20;
const _: () = assert!(2 * MAX_BODY_BYTES <= crate::store::MAX_DOC);

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// How long running steps may take to finish on SIGTERM before the node exits anyway.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    pub max_body_bytes: u64,
    /// The `Retry-After` a client is given with a 503.
    #[serde(deserialize_with = "duration")]
    pub retry_after: Duration,
    /// Threads running the node's async tasks: 0 is one per core, 1 runs everything on one
    /// thread (often fastest on a small machine that also hosts Redis or clients).
    pub worker_threads: usize,
    /// A PEM certificate chain to serve the API over https with (this node's certificate
    /// first); empty serves plain http. Read again on SIGHUP.
    pub tls_cert: PathBuf,
    /// The PEM private key of `tls_cert`.
    pub tls_key: PathBuf,
    /// With `tls_cert`: a PEM file of the CAs whose client certificates every caller must show
    /// (mutual TLS), read again on SIGHUP; empty asks for none. Peers are then shown this
    /// node's own certificate.
    pub tls_client_ca: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            shutdown_grace: Duration::from_secs(30),
            max_body_bytes: 64 * 1024,
            retry_after: Duration::from_secs(1),
            worker_threads: 0,
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            tls_client_ca: PathBuf::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: a level (`info`) or directives (`info,order_process=debug`).
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// At most this many orders execute at once. An order waiting on a step (a timer, a call in
    /// flight) holds no thread, only a few KB of memory.
    pub workers: NonZeroUsize,
    /// Accepted orders waiting for a worker; when full, new orders get 503.
    pub queue_capacity: NonZeroUsize,
    /// At most this many unfinished orders are held here at once: executing, queued, or waiting
    /// for a retry of a step or of the webhook (which holds no worker). Past it, new orders get
    /// 503: this bounds memory. Orders taken over or resumed at start are never refused.
    pub max_orders: NonZeroUsize,
    /// How often the node looks for unfinished orders of its own that nothing here runs, queues
    /// or waits on, and resumes them: the longest an order can sit unnoticed. At the first pass
    /// and every 12th it also takes back set-aside orders whose record reads again.
    #[serde(deserialize_with = "duration")]
    pub reconcile_interval: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            workers: NonZeroUsize::new(50_000).unwrap_or(NonZeroUsize::MIN),
            queue_capacity: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
            max_orders: NonZeroUsize::new(200_000).unwrap_or(NonZeroUsize::MIN),
            reconcile_interval: Duration::from_secs(5),
        }
    }
}

/// What the store keeps of orders.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrdersConfig {
    /// How long a finished order (and its idempotency key) is kept after it finished; then it
    /// is deleted, and reading it is a 404.
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
}

/// Most orders held in memory at once, or waiting for a worker, or calls to one step service in
/// flight: far past what one node's memory holds (about 1.3 KB an order), short of sizes that
/// abort the process at start.
pub const MAX_ORDERS: usize = 10_000_000;
/// The deepest `limits.max_depth` may let a payload nest: stored, in a step call and in a
/// view, an order carries it a few levels down, and serde_json reads at most 128.
pub const MAX_PAYLOAD_DEPTH: usize = 100;
/// The slowest `limits.submit_rate`: the rate limiter counts a bucket's refill time (one period
/// per submission of the burst) in nanoseconds, which must fit 64 bits.
pub const MIN_SUBMIT_RATE: f64 = 0.001;
/// The largest `limits.submit_burst`, for the same reason.
pub const MAX_SUBMIT_BURST: usize = 1_000_000;
/// Most threads for async tasks, and most shared Redis connections.
pub const MAX_THREADS: usize = 1024;
/// Most connections `limits.max_connections` may let in: past any file limit.
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// The shortest `orders.retention` taken.
pub const MIN_RETENTION: Duration = Duration::from_secs(1);
/// The longest `orders.retention` taken (about ten years): longer is as good as forever, and
/// would overflow the stores' clocks.
pub const MAX_RETENTION: Duration = Duration::from_secs(3650 * 24 * 60 * 60);

impl Default for OrdersConfig {
    fn default() -> Self {
        OrdersConfig {
            retention: crate::store::DEFAULT_RETENTION,
        }
    }
}

/// The built-in `simulate` handler: each step sleeps `duration` and fails with `failure_rate`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulateConfig {
    #[serde(deserialize_with = "duration")]
    pub duration: Duration,
    pub failure_rate: f64,
    /// Each step that succeeds answers with an output of about this many bytes
    /// (`{"pad": "xx…"}`), as a step service answering with data would; 0: none.
    pub output_bytes: usize,
}

impl Default for SimulateConfig {
    fn default() -> Self {
        SimulateConfig {
            duration: Duration::from_secs(5),
            failure_rate: 0.05,
            output_bytes: 0,
        }
    }
}

/// One `[steps.<Step>]` section, as written. [`Config::handler_for`] turns it into typed
/// [`HandlerSettings`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// `simulate` or `http`.
    pub handler: String,
    // simulate
    #[serde(default, deserialize_with = "duration_opt")]
    pub duration: Option<Duration>,
    #[serde(default)]
    pub failure_rate: Option<f64>,
    // http
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub rollback_url: Option<String>,
    #[serde(default, deserialize_with = "duration_opt")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub retries: Option<u32>,
    #[serde(default, deserialize_with = "duration_opt")]
    pub backoff: Option<Duration>,
    #[serde(default, deserialize_with = "duration_opt")]
    pub backoff_max: Option<Duration>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    #[serde(default)]
    pub concurrency: Option<usize>,
}

/// The handler a step runs with, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum HandlerSettings {
    Simulate(SimulateConfig),
    Http(Box<HttpSettings>),
}

/// The `http` handler of one step: POST to `url` (and `rollback_url` to undo), each attempt
/// bounded by `timeout`, up to `retries` retries after the first attempt, waiting `backoff`
/// before the first retry and doubling up to `backoff_max`; at most `concurrency` calls in flight
/// from this node.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    pub url: reqwest::Url,
    pub rollback_url: Option<reqwest::Url>,
    pub timeout: Duration,
    pub retries: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub tls: StepTls,
    /// No limit when `None`.
    pub concurrency: Option<NonZeroUsize>,
}

/// The TLS files (PEM) of an `http` step with an https URL: a private CA added to the trusted
/// roots, and a client certificate and key for a service that asks for one. Steps with the same
/// files share one HTTP client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct StepTls {
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl StepTls {
    fn is_set(&self) -> bool {
        self != &StepTls::default()
    }

    /// These files, for the section `section` whose calls go to `urls`: refused unless one of
    /// them is https (`why` says so), and read and built into a TLS setup once, to refuse bad
    /// files at start.
    fn checked(
        self,
        section: &str,
        urls: &[&reqwest::Url],
        why: &str,
    ) -> Result<StepTls, ConfigError> {
        if !self.is_set() {
            return Ok(self);
        }
        if !urls.iter().any(|url| url.scheme() == "https") {
            let field = [
                ("ca_file", &self.ca_file),
                ("client_cert", &self.client_cert),
                ("client_key", &self.client_key),
            ]
            .into_iter()
            .find_map(|(field, path)| path.as_ref().map(|_| field))
            .unwrap_or("ca_file");
            return Err(ConfigError::new(format!("{section}.{field}"), why));
        }
        crate::pipeline::http::tls_config(&self, rustls::RootCertStore::empty(), section)?;
        Ok(self)
    }
}

impl HttpSettings {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_RETRIES: u32 = 3;
    pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(200);
    pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(10);
}

/// Parses a step URL: `http://` or `https://host[:port]/path`.
fn step_url(key: &str, text: &str) -> Result<reqwest::Url, ConfigError> {
    let url = reqwest::Url::parse(text)
        .map_err(|error| ConfigError::new(key, format!("`{text}` is not a URL: {error}")))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(ConfigError::new(
                key,
                format!("`{text}`: scheme `{other}` is not supported, use http:// or https://"),
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new(key, format!("`{text}` has no host")));
    }
    Ok(url)
}

/// Checks that every entry of the list at `key` is `host:port`.
fn host_ports(key: &str, entries: &[String], example_port: u16) -> Result<(), ConfigError> {
    for entry in entries {
        let valid = entry
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid {
            return Err(ConfigError::new(
                key,
                format!("`{entry}` is not host:port, such as 10.0.0.2:{example_port}"),
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `redis://…` (or `rediss://…`, over TLS) selects the Redis store (cluster mode); empty
    /// means the embedded store in `data_dir`, unless `sentinels` is set. It may carry an ACL
    /// user and password (`redis://user:password@host:port`).
    pub url: String,
    /// Redis Sentinels (`host:port`) that name the Redis primary instead of `url`: the node asks
    /// them for the primary of `master_name` whenever it opens a connection, so it follows a
    /// failover.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under; required with `sentinels`.
    pub master_name: String,
    /// With `sentinels`: reach the sentinels and the primary they name over TLS (with `ca_file`,
    /// `client_cert` and `client_key`); with `cluster_nodes`, every node of the cluster. With
    /// `url` its scheme says it (`rediss://`).
    pub tls: bool,
    /// Nodes (`host:port`) of a Redis Cluster, instead of `url`: any few of its primaries or
    /// replicas; the node learns the rest, and follows slot moves and failovers.
    pub cluster_nodes: Vec<String>,
    /// Connections to Redis, each shared by all tasks (requests are pipelined on them).
    pub pool_size: NonZeroUsize,
    /// Longest wait for one Redis operation before it counts as a failure.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Replicas that must acknowledge each write (`WAIT`) before it counts as done; 0 does not
    /// wait. The node also refuses to start while fewer replicas are connected.
    pub min_replicas: usize,
    /// Refuse to start on a Redis whose append-only file is off (and, while running, refuse
    /// new orders once it is).
    pub require_aof: bool,
    /// How often a running node reads its Redis's persistence and eviction again (see
    /// `require_aof`; a Redis that may evict keys is refused too).
    #[serde(deserialize_with = "duration")]
    pub check_interval: Duration,
    /// Write each order compressed (zstd with a built-in dictionary, about a fifth of its JSON):
    /// less work for Redis and its append-only file, about half its memory per kept order, and
    /// an embedded store's file several times smaller. Orders are read in either form whatever
    /// this says; turn it on once no node of an earlier version, which reads only JSON, is left.
    pub compress_orders: bool,
    /// Keep each order's payload apart from the rest of it: written once, when the order is
    /// created, in a field (Redis) or table (embedded store) of its own, instead of in the stored
    /// order at every change. Orders are read in either form whatever this says, and keep the
    /// form they were created in; turn it on once no node of an earlier version, which reads
    /// only payloads stored in the order, is left.
    pub payload_apart: bool,
    /// Redis only: keep each order split, its payload and what never changes written once when
    /// it is created, each of its steps in a field of its own written only when it changes, so
    /// that a change writes a few hundred bytes instead of the whole order. Orders are read in
    /// either form whatever this says, and keep the form they were created in; turn it on once
    /// no node of an earlier version, which reads only orders stored whole, is left. Refused
    /// with the embedded store, which writes every order whole.
    pub split_orders: bool,
    /// PEM file of the CA that signed the Redis server's certificate (`rediss://` or `tls`
    /// only); empty: the platform's roots.
    pub ca_file: PathBuf,
    /// PEM certificate presented to a Redis that asks for one (`tls-auth-clients yes`), with
    /// `client_key`.
    pub client_cert: PathBuf,
    /// PEM private key of `client_cert`.
    pub client_key: PathBuf,
    /// The Redis ACL user to log in as, with the password in `password_file`.
    pub username: String,
    /// A file holding the Redis password (one line), read at start; instead of a password in
    /// `url`.
    pub password_file: PathBuf,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: String::new(),
            sentinels: Vec::new(),
            master_name: String::new(),
            tls: false,
            cluster_nodes: Vec::new(),
            pool_size: NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN),
            timeout: Duration::from_secs(2),
            min_replicas: 0,
            require_aof: false,
            check_interval: Duration::from_secs(5),
            compress_orders: false,
            payload_apart: false,
            split_orders: false,
            ca_file: PathBuf::new(),
            client_cert: PathBuf::new(),
            client_key: PathBuf::new(),
            username: String::new(),
            password_file: PathBuf::new(),
        }
    }
}

impl DatabaseConfig {
    /// True when the node keeps its orders in Redis (a plain URL or Sentinel), as a cluster member.
    pub fn is_redis(&self) -> bool {
        !self.url.is_empty() || !self.sentinels.is_empty() || !self.cluster_nodes.is_empty()
    }

    /// Checks the Redis keys against each other; errors name the key to change.
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.url.is_empty()
            && !self.url.starts_with("redis://")
            && !self.url.starts_with("rediss://")
        {
            return Err(ConfigError::new(
                "database.url",
                "must be empty (embedded store) or start with redis:// (or rediss:// for TLS)",
            ));
        }
        if !self.url.is_empty() && !self.sentinels.is_empty() {
            return Err(ConfigError::new(
                "database.sentinels",
                "set either database.url (one Redis) or database.sentinels (found through Sentinel), not both",
            ));
        }
        host_ports("database.sentinels", &self.sentinels, 26379)?;
        self.validate_redis_cluster()?;
        if self.sentinels.is_empty() {
            if !self.master_name.is_empty() {
                return Err(ConfigError::new(
                    "database.master_name",
                    "only used with database.sentinels",
                ));
            }
            if self.tls && self.cluster_nodes.is_empty() {
                return Err(ConfigError::new(
                    "database.tls",
                    "only used with database.sentinels or database.cluster_nodes: a database.url asks for TLS with rediss://",
                ));
            }
        } else if self.master_name.trim().is_empty() {
            return Err(ConfigError::new(
                "database.master_name",
                "required with database.sentinels: the name they monitor the primary under",
            ));
        }
        if !self.is_redis() {
            if self.min_replicas > 0 {
                return Err(ConfigError::new(
                    "database.min_replicas",
                    "only used with Redis (database.url, database.sentinels or database.cluster_nodes)",
                ));
            }
            if self.require_aof {
                return Err(ConfigError::new(
                    "database.require_aof",
                    "only used with Redis (database.url, database.sentinels or database.cluster_nodes)",
                ));
            }
            if self.split_orders {
                return Err(ConfigError::new(
                    "database.split_orders",
                    "only used with Redis (database.url, database.sentinels or database.cluster_nodes): the embedded store writes every order whole",
                ));
            }
        }
        self.validate_access()
    }

    /// Checks `cluster_nodes` against the keys it cannot go with.
    fn validate_redis_cluster(&self) -> Result<(), ConfigError> {
        if self.cluster_nodes.is_empty() {
            return Ok(());
        }
        host_ports("database.cluster_nodes", &self.cluster_nodes, 6379)?;
        if !self.url.is_empty() || !self.sentinels.is_empty() {
            return Err(ConfigError::new(
                "database.cluster_nodes",
                "set one of database.url, database.sentinels or database.cluster_nodes, not two",
            ));
        }
        Ok(())
    }

    /// Checks the TLS and login keys: each only where it applies, the files present.
    fn validate_access(&self) -> Result<(), ConfigError> {
        let set = |path: &Path| !path.as_os_str().is_empty();
        let url = match self.url.is_empty() {
            true => None,
            false => Some(crate::store::redis::access::parse_url(
                "database.url",
                &self.url,
            )?),
        };
        let tls = url
            .as_ref()
            .is_some_and(crate::store::redis::access::is_tls)
            || (self.tls && (!self.sentinels.is_empty() || !self.cluster_nodes.is_empty()));
        for (key, path) in [
            ("database.ca_file", &self.ca_file),
            ("database.client_cert", &self.client_cert),
            ("database.client_key", &self.client_key),
        ] {
            if set(path) && !tls {
                let problem = match url.is_some() {
                    true => "only used with a rediss:// database.url (TLS)",
                    false => "only used over TLS: set database.tls = true with database.sentinels or database.cluster_nodes",
                };
                return Err(ConfigError::new(key, problem));
            }
        }
        if set(&self.client_cert) != set(&self.client_key) {
            let (key, other) = match set(&self.client_cert) {
                true => ("database.client_key", "database.client_cert"),
                false => ("database.client_cert", "database.client_key"),
            };
            return Err(ConfigError::new(
                key,
                format!("required with {other}: set both or neither"),
            ));
        }
        if !self.is_redis() {
            for (key, used) in [
                ("database.username", !self.username.is_empty()),
                ("database.password_file", set(&self.password_file)),
            ] {
                if used {
                    return Err(ConfigError::new(
                        key,
                        "only used with Redis (database.url, database.sentinels or database.cluster_nodes)",
                    ));
                }
            }
        }
        if let Some(settings) = url.as_ref().map(|url| url.redis_settings()) {
            if settings.password().is_some() && set(&self.password_file) {
                return Err(ConfigError::new(
                    "database.password_file",
                    "database.url has a password already: use one or the other",
                ));
            }
            if settings.username().is_some() && !self.username.is_empty() {
                return Err(ConfigError::new(
                    "database.username",
                    "database.url names a user already: use one or the other",
                ));
            }
        }
        if !self.username.is_empty() && !set(&self.password_file) {
            return Err(ConfigError::new(
                "database.username",
                "needs database.password_file (the user's password), or both in database.url",
            ));
        }
        for (key, path) in [
            ("database.ca_file", &self.ca_file),
            ("database.client_cert", &self.client_cert),
            ("database.client_key", &self.client_key),
            ("database.password_file", &self.password_file),
        ] {
            if set(path) && !path.is_file() {
                return Err(ConfigError::new(
                    key,
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Nodes with another cluster id ignore each other's gossip.
    pub id: String,
    /// HTTP addresses (`host:port`) of members to join; gossip uses UDP on the same port.
    pub seeds: Vec<String>,
    /// Shared by all nodes; cluster-internal calls such as `/service/transfer` must carry it.
    pub secret: String,
    /// The address peers use to reach this node; empty means the listen address.
    pub advertise: String,
    #[serde(deserialize_with = "duration")]
    pub gossip_interval: Duration,
    /// The failure detector's prior for the heartbeat interval of a node it just met.
    #[serde(deserialize_with = "duration")]
    pub initial_interval: Duration,
    pub phi_threshold: f64,
    /// How long a dead node's gossip state is kept (shown in /diagnostic/cluster).
    #[serde(deserialize_with = "duration")]
    pub dead_node_grace_period: Duration,
    #[serde(deserialize_with = "duration")]
    pub leader_lease_ttl: Duration,
    #[serde(deserialize_with = "duration")]
    pub leader_renew_interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub liveness_ttl: Duration,
    #[serde(deserialize_with = "duration")]
    pub liveness_renew_interval: Duration,
    /// How often the leader looks for orders of nodes that are neither live nor leased.
    #[serde(deserialize_with = "duration")]
    pub sweep_interval: Duration,
    /// Longest wait for a peer to answer a transfer request; then the next peer is asked.
    #[serde(deserialize_with = "duration")]
    pub transfer_timeout: Duration,
    /// How long the leader sees a node's liveness lease expired before it takes the node's
    /// orders over even though gossip still calls the node live.
    #[serde(deserialize_with = "duration")]
    pub takeover_after: Duration,
    /// How long a dead node that owns no orders stays in the registry before the leader
    /// forgets it. An order that lands as a node's after its lease lapsed (a create delayed on
    /// a bad link) is taken over at once while the node is remembered; in the hour after, the
    /// sweep registers the node again first.
    #[serde(deserialize_with = "duration")]
    pub forget_after: Duration,
    /// With `server.tls_cert` (peers are then called over https): a PEM file of the CA that
    /// signed the peers' certificates, trusted besides the system's roots.
    pub ca_file: PathBuf,
    /// Whether gossip is sealed with `secret`.
    pub gossip_seal: GossipSeal,
}

/// How gossip is sealed with the cluster secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GossipSeal {
    /// Sends sealed gossip and hears only sealed gossip.
    #[default]
    On,
    /// Sends sealed gossip and hears plain gossip too: the second step onto sealing.
    Send,
    /// Sends plain gossip and hears sealed gossip too: the first step onto sealing, from a
    /// version that does not seal.
    Accept,
}

impl GossipSeal {
    pub fn sends_sealed(self) -> bool {
        self != GossipSeal::Accept
    }

    pub fn hears_plain(self) -> bool {
        self != GossipSeal::On
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            id: "order-process".into(),
            seeds: Vec::new(),
            secret: String::new(),
            advertise: String::new(),
            gossip_interval: Duration::from_millis(500),
            initial_interval: Duration::from_millis(500),
            phi_threshold: 6.0,
            dead_node_grace_period: Duration::from_secs(600),
            leader_lease_ttl: Duration::from_secs(3),
            leader_renew_interval: Duration::from_secs(1),
            liveness_ttl: Duration::from_secs(3),
            liveness_renew_interval: Duration::from_secs(1),
            sweep_interval: Duration::from_millis(500),
            transfer_timeout: Duration::from_secs(2),
            takeover_after: Duration::from_secs(1),
            forget_after: Duration::from_secs(60),
            ca_file: PathBuf::new(),
            gossip_seal: GossipSeal::On,
        }
    }
}

/// How callers prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// `Authorization: Bearer <token>`, checked against the hashed tokens in `auth.tokens_file`.
    Tokens,
    /// Development only: the `Authorization` header's value is the user name, unchecked.
    Header,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Unset: `header` when the node listens on a loopback address, `tokens` otherwise.
    pub mode: Option<AuthMode>,
    /// The tokens file (see the README's "Security" section); reloaded on SIGHUP.
    pub tokens_file: PathBuf,
    /// Allows `mode = "header"` on a non-loopback listener, where anyone could claim any user.
    pub allow_insecure_header: bool,
}

/// The completion webhook: a `POST` to `url` when an order becomes terminal, signed with
/// `secret`, retried like an http step.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Empty: no webhooks.
    pub url: String,
    pub secret: String,
    #[serde(default, deserialize_with = "duration_opt")]
    pub timeout: Option<Duration>,
    pub retries: Option<u32>,
    #[serde(default, deserialize_with = "duration_opt")]
    pub backoff: Option<Duration>,
    #[serde(default, deserialize_with = "duration_opt")]
    pub backoff_max: Option<Duration>,
    /// With an https `url`: a PEM CA bundle trusted besides the system's roots, and a client
    /// certificate and key for a receiver that asks for one (as a step's keys of those names).
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// The completion webhook, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct NotifySettings {
    pub url: reqwest::Url,
    pub secret: String,
    pub timeout: Duration,
    pub retries: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub tls: StepTls,
}

impl NotifySettings {
    pub const DEFAULT_RETRIES: u32 = 10;
    pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
    pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);
}

/// What one client may cost the node.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Longest time a client may take to send a request's headers; an idle keep-alive
    /// connection is closed after it too.
    #[serde(deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// Longest time a client may take to send a request body once its headers are in.
    #[serde(deserialize_with = "duration")]
    pub body_read_timeout: Duration,
    /// Order submissions per second one user may keep up (a token bucket refilled at this rate).
    pub submit_rate: f64,
    /// Submissions one user may make at once before the rate applies.
    pub submit_burst: NonZeroUsize,
    /// Users whose submission buckets are remembered; past it, users share one bucket until some refill.
    pub rate_limit_users: NonZeroUsize,
    /// Deepest nesting of arrays and objects accepted in an order's payload.
    pub max_depth: NonZeroUsize,
    /// Unfinished orders one user may have on this node; more submissions get 429.
    pub max_in_flight_per_user: NonZeroUsize,
    /// Connections served at once; past it new ones wait to be accepted.
    pub max_connections: NonZeroUsize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            submit_rate: 100.0,
            submit_burst: NonZeroUsize::new(200).unwrap_or(NonZeroUsize::MIN),
            rate_limit_users: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
            max_depth: NonZeroUsize::new(32).unwrap_or(NonZeroUsize::MIN),
            max_in_flight_per_user: NonZeroUsize::new(1000).unwrap_or(NonZeroUsize::MIN),
            max_connections: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

/// Where spans of orders are exported.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The base `http://` URL of an OTLP/HTTP receiver (a collector, Jaeger): spans are posted
    /// to `<otlp_endpoint>/v1/traces` as protobuf. Unset: no spans are exported.
    #[serde(deserialize_with = "otlp_endpoint")]
    pub otlp_endpoint: Option<reqwest::Url>,
    /// How long one export may take before it is given up.
    #[serde(deserialize_with = "duration")]
    pub export_timeout: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            export_timeout: Duration::from_secs(10),
        }
    }
}

/// An OTLP/HTTP base URL: `http://host[:port][/path]`, without query or fragment (the exporter
/// has no TLS; a collector on the same host or network forwards further).
fn otlp_endpoint<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<reqwest::Url>, D::Error> {
    let text = String::deserialize(deserializer)?;
    let url = reqwest::Url::parse(&text)
        .map_err(|error| de::Error::custom(format!("`{text}` is not a URL: {error}")))?;
    if url.scheme() != "http" {
        return Err(de::Error::custom(format!(
            "`{text}`: use an http:// URL such as http://127.0.0.1:4318 (this build exports without TLS)"
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(de::Error::custom(format!("`{text}` has no host")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(de::Error::custom(format!(
            "`{text}`: give the base URL, without query or fragment; spans go to its /v1/traces"
        )));
    }
    Ok(Some(url))
}

/// Values given on the command line; each one overrides the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub log_level: Option<String>,
    /// `--join`: seeds added to `cluster.seeds`.
    pub join: Vec<String>,
    /// `--redis`: sets `database.url`.
    pub redis: Option<String>,
}

impl Config {
    /// Reads the file (if any), applies the flags and validates the result.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| {
                    ConfigError::new(
                        "--config",
                        format!("cannot read {}: {error}", path.display()),
                    )
                })?;
                Config::from_toml(&text)?
            }
            None => Config::default(),
        };
        if let Some(listen) = &overrides.listen {
            config.server.listen = listen.parse().map_err(|_| {
                ConfigError::new(
                    "--listen",
                    format!("`{listen}` is not an address like 127.0.0.1:8080"),
                )
            })?;
        }
        if let Some(dir) = &overrides.data_dir {
            config.server.data_dir = dir.clone();
        }
        if let Some(level) = &overrides.log_level {
            config.log.level = level.clone();
        }
        config.cluster.seeds.extend(overrides.join.iter().cloned());
        if let Some(url) = &overrides.redis {
            // `--redis "$REDIS_URL"` with the variable unset would quietly make a cluster node
            // a lone one on its own embedded store.
            if url.trim().is_empty() {
                return Err(ConfigError::new(
                    "--redis",
                    "must name a Redis (redis://host:port); leave the flag out for the embedded store",
                ));
            }
            // The flag names the one Redis to use, in place of any the file names.
            config.database.url = url.clone();
            config.database.sentinels.clear();
            config.database.master_name.clear();
            // The URL's scheme says whether it is TLS.
            config.database.tls = false;
            config.database.cluster_nodes.clear();
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; errors name the key (`pipeline.workers`) or the line of a syntax error.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = text.parse().map_err(|error: toml::de::Error| {
            let line = error
                .span()
                .map(|span| text[..span.start.min(text.len())].lines().count().max(1))
                .unwrap_or(0);
            ConfigError::new(
                format!("line {line}"),
                error.message().trim().replace('\n', " "),
            )
        })?;
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|error| {
            let key = error.path().to_string();
            let problem = error.into_inner().to_string().trim().replace('\n', " ");
            // toml names the key itself too; say it once.
            let problem = problem
                .strip_suffix(&format!(" in `{key}`"))
                .map(str::to_string)
                .unwrap_or(problem);
            ConfigError::new(if key == "." { "config".into() } else { key }, problem)
        })
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err()
            || self.log.level.trim().is_empty()
        {
            return Err(ConfigError::new(
                "log.level",
                format!(
                    "`{}` is not a level (error, warn, info, debug, trace) or filter",
                    self.log.level
                ),
            ));
        }
        if !(1..=MAX_BODY_BYTES).contains(&self.server.max_body_bytes) {
            return Err(ConfigError::new(
                "server.max_body_bytes",
                format!(
                    "must be from 1 to {MAX_BODY_BYTES} (32 MiB): an order is stored whole, \
                     payload and steps, and must stay readable"
                ),
            ));
        }
        self.validate_sizes()?;
        self.validate_https()?;
        check_rate("simulate.failure_rate", self.simulate.failure_rate)?;
        let most = crate::pipeline::http::MAX_RESPONSE_BYTES;
        if self.simulate.output_bytes > most {
            return Err(ConfigError::new(
                "simulate.output_bytes",
                format!("must be at most {most}, the most a step service's answer may be"),
            ));
        }
        for name in self.steps.keys() {
            let step: Step = name.parse().map_err(|error: crate::order::UnknownStep| {
                ConfigError::new(format!("steps.{name}"), error.to_string())
            })?;
            if step.is_terminal() {
                return Err(ConfigError::new(
                    format!("steps.{name}"),
                    "only Scheduling, Pre-Processing, Processing and Post-Processing run handlers",
                ));
            }
            self.handler_for(step)?;
        }
        self.database.validate()?;
        if !(MIN_RETENTION..=MAX_RETENTION).contains(&self.orders.retention) {
            return Err(ConfigError::new(
                "orders.retention",
                format!(
                    "must be between {} and {}",
                    humantime::format_duration(MIN_RETENTION),
                    humantime::format_duration(MAX_RETENTION)
                ),
            ));
        }
        nonzero_durations(&[
            ("server.retry_after", self.server.retry_after),
            (
                "pipeline.reconcile_interval",
                self.pipeline.reconcile_interval,
            ),
            ("database.timeout", self.database.timeout),
            ("database.check_interval", self.database.check_interval),
            ("telemetry.export_timeout", self.telemetry.export_timeout),
        ])?;
        self.validate_cluster()?;
        self.validate_auth()?;
        self.validate_limits()?;
        self.notify_settings().map(drop)
    }

    /// The completion webhook, if one is configured.
    pub fn notify_settings(&self) -> Result<Option<NotifySettings>, ConfigError> {
        let notify = &self.notify;
        if notify.url.is_empty() {
            let set = !notify.secret.is_empty()
                || notify.timeout.is_some()
                || notify.retries.is_some()
                || notify.backoff.is_some()
                || notify.backoff_max.is_some()
                || notify.ca_file.is_some()
                || notify.client_cert.is_some()
                || notify.client_key.is_some();
            return match set {
                true => Err(ConfigError::new(
                    "notify.url",
                    "required with other notify keys",
                )),
                false => Ok(None),
            };
        }
        let url = step_url("notify.url", &notify.url)?;
        if notify.secret.trim().chars().count() < 16 {
            return Err(ConfigError::new(
                "notify.secret",
                "required with notify.url, at least 16 characters: receivers check each webhook's signature with it",
            ));
        }
        let timeout = notify.timeout.unwrap_or(HttpSettings::DEFAULT_TIMEOUT);
        let backoff = notify.backoff.unwrap_or(NotifySettings::DEFAULT_BACKOFF);
        let backoff_max = notify
            .backoff_max
            .unwrap_or(NotifySettings::DEFAULT_BACKOFF_MAX.max(backoff));
        nonzero_durations(&[("notify.timeout", timeout), ("notify.backoff", backoff)])?;
        if backoff_max < backoff {
            return Err(ConfigError::new(
                "notify.backoff_max",
                "must be at least backoff",
            ));
        }
        let tls = StepTls {
            ca_file: notify.ca_file.clone(),
            client_cert: notify.client_cert.clone(),
            client_key: notify.client_key.clone(),
        }
        .checked("notify", &[&url], "only used with an https:// url")?;
        Ok(Some(NotifySettings {
            url,
            secret: notify.secret.clone(),
            timeout,
            retries: notify.retries.unwrap_or(NotifySettings::DEFAULT_RETRIES),
            backoff,
            backoff_max,
            tls,
        }))
    }

    /// The auth mode in force: the configured one, else `header` on a loopback listener and
    /// `tokens` on any other.
    pub fn auth_mode(&self) -> AuthMode {
        self.auth
            .mode
            .unwrap_or(if self.server.listen.ip().is_loopback() {
                AuthMode::Header
            } else {
                AuthMode::Tokens
            })
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        match self.auth_mode() {
            AuthMode::Header => {
                let listen = self.server.listen;
                if !listen.ip().is_loopback() && !self.auth.allow_insecure_header {
                    return Err(ConfigError::new(
                        "auth.allow_insecure_header",
                        format!(
                            "auth.mode = \"header\" trusts any Authorization header and is refused on the \
                             non-loopback listener {listen}: use auth.mode = \"tokens\", or set \
                             auth.allow_insecure_header = true if this network is trusted"
                        ),
                    ));
                }
            }
            AuthMode::Tokens => {
                if self.auth.tokens_file.as_os_str().is_empty() {
                    return Err(ConfigError::new(
                        "auth.tokens_file",
                        "required with auth.mode = \"tokens\" (the default when server.listen is not loopback)",
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let limits = &self.limits;
        nonzero_durations(&[
            ("limits.header_read_timeout", limits.header_read_timeout),
            ("limits.body_read_timeout", limits.body_read_timeout),
        ])?;
        if limits.max_depth.get() > MAX_PAYLOAD_DEPTH {
            return Err(ConfigError::new(
                "limits.max_depth",
                format!(
                    "must be at most {MAX_PAYLOAD_DEPTH}: an order carries its payload a few levels \
                     down, within what JSON readers take"
                ),
            ));
        }
        if !(limits.submit_rate.is_finite() && limits.submit_rate >= MIN_SUBMIT_RATE) {
            return Err(ConfigError::new(
                "limits.submit_rate",
                format!(
                    "must be a number of submissions per second, at least {MIN_SUBMIT_RATE} (one \
                     in {} s)",
                    1.0 / MIN_SUBMIT_RATE
                ),
            ));
        }
        if limits.submit_burst.get() > MAX_SUBMIT_BURST {
            return Err(ConfigError::new(
                "limits.submit_burst",
                format!("must be at most {MAX_SUBMIT_BURST}"),
            ));
        }
        Ok(())
    }

    /// Checks the sizes the node allocates or counts permits by at start.
    fn validate_sizes(&self) -> Result<(), ConfigError> {
        let sizes = [
            (
                "server.worker_threads",
                self.server.worker_threads,
                MAX_THREADS,
            ),
            ("pipeline.workers", self.pipeline.workers.get(), MAX_ORDERS),
            (
                "pipeline.queue_capacity",
                self.pipeline.queue_capacity.get(),
                MAX_ORDERS,
            ),
            (
                "pipeline.max_orders",
                self.pipeline.max_orders.get(),
                MAX_ORDERS,
            ),
            (
                "database.pool_size",
                self.database.pool_size.get(),
                MAX_THREADS,
            ),
            (
                "limits.max_connections",
                self.limits.max_connections.get(),
                MAX_CONNECTIONS,
            ),
        ];
        for (key, size, most) in sizes {
            if size > most {
                return Err(ConfigError::new(key, format!("must be at most {most}")));
            }
        }
        Ok(())
    }

    /// True when the node runs as a cluster member on Redis.
    pub fn is_cluster(&self) -> bool {
        self.database.is_redis()
    }

    /// Checks the files of https: `server.tls_cert` and `server.tls_key` both or neither,
    /// `server.tls_client_ca` and `cluster.ca_file` only with them, each a file.
    fn validate_https(&self) -> Result<(), ConfigError> {
        let set = |path: &Path| !path.as_os_str().is_empty();
        let (cert, key) = (&self.server.tls_cert, &self.server.tls_key);
        if set(cert) != set(key) {
            let (missing, other) = match set(cert) {
                true => ("server.tls_key", "server.tls_cert"),
                false => ("server.tls_cert", "server.tls_key"),
            };
            return Err(ConfigError::new(
                missing,
                format!("required with {other}: set both or neither"),
            ));
        }
        if set(&self.cluster.ca_file) && !set(cert) {
            return Err(ConfigError::new(
                "cluster.ca_file",
                "only used with server.tls_cert: peers are called over https when this node serves it",
            ));
        }
        if set(&self.server.tls_client_ca) && !set(cert) {
            return Err(ConfigError::new(
                "server.tls_client_ca",
                "only used with server.tls_cert: client certificates are asked for over https",
            ));
        }
        for (name, path) in [
            ("server.tls_cert", cert),
            ("server.tls_key", key),
            ("server.tls_client_ca", &self.server.tls_client_ca),
            ("cluster.ca_file", &self.cluster.ca_file),
        ] {
            if set(path) && !path.is_file() {
                return Err(ConfigError::new(
                    name,
                    format!("{} is not a file", path.display()),
                ));
            }
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let cluster = &self.cluster;
        if !self.is_cluster() {
            if !cluster.seeds.is_empty() {
                return Err(ConfigError::new(
                    "cluster.seeds",
                    "joining a cluster needs a shared store: set database.url (or --redis) to redis://…, database.sentinels or database.cluster_nodes",
                ));
            }
            return Ok(());
        }
        if cluster.secret.trim().chars().count() < 16 {
            return Err(ConfigError::new(
                "cluster.secret",
                "required in cluster mode (the store is Redis), at least 16 characters: the same \
                 secret on every node, which seals gossip and admits peers' transfers",
            ));
        }
        if cluster.id.trim().is_empty() {
            return Err(ConfigError::new("cluster.id", "must not be empty"));
        }
        for seed in &cluster.seeds {
            if seed
                .rsplit_once(':')
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .is_none()
            {
                return Err(ConfigError::new(
                    "cluster.seeds",
                    format!("`{seed}` is not host:port"),
                ));
            }
        }
        if !cluster.advertise.is_empty() && cluster.advertise.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::new(
                "cluster.advertise",
                format!(
                    "`{}` is not an address like 10.0.0.5:8080",
                    cluster.advertise
                ),
            ));
        }
        if cluster.advertise.is_empty() && self.server.listen.ip().is_unspecified() {
            return Err(ConfigError::new(
                "cluster.advertise",
                "required when server.listen is a wildcard address: peers need a reachable one",
            ));
        }
        if !(cluster.phi_threshold > 0.0 && cluster.phi_threshold.is_finite()) {
            return Err(ConfigError::new(
                "cluster.phi_threshold",
                "must be a number more than 0",
            ));
        }
        nonzero_durations(&[
            ("cluster.gossip_interval", cluster.gossip_interval),
            ("cluster.initial_interval", cluster.initial_interval),
            ("cluster.sweep_interval", cluster.sweep_interval),
            ("cluster.transfer_timeout", cluster.transfer_timeout),
        ])?;
        if cluster.leader_renew_interval.is_zero()
            || cluster.leader_renew_interval * 2 > cluster.leader_lease_ttl
        {
            return Err(ConfigError::new(
                "cluster.leader_renew_interval",
                "must be more than 0s and at most half of cluster.leader_lease_ttl",
            ));
        }
        if cluster.liveness_renew_interval.is_zero()
            || cluster.liveness_renew_interval * 2 > cluster.liveness_ttl
        {
            return Err(ConfigError::new(
                "cluster.liveness_renew_interval",
                "must be more than 0s and at most half of cluster.liveness_ttl",
            ));
        }
        Ok(())
    }

    /// The validated handler settings of one step: its `[steps.<Step>]` section, else the
    /// `[simulate]` defaults.
    pub fn handler_for(&self, step: Step) -> Result<HandlerSettings, ConfigError> {
        let Some(section) = self.steps.get(step.as_str()) else {
            return Ok(HandlerSettings::Simulate(self.simulate));
        };
        let key = |field: &str| format!("steps.{step}.{field}");
        let only = |field: &str, set: bool, handler: &str| {
            if set {
                Err(ConfigError::new(
                    key(field),
                    format!("only used with handler = \"{handler}\""),
                ))
            } else {
                Ok(())
            }
        };
        match section.handler.as_str() {
            "simulate" => {
                for (field, set) in [
                    ("url", section.url.is_some()),
                    ("rollback_url", section.rollback_url.is_some()),
                    ("timeout", section.timeout.is_some()),
                    ("retries", section.retries.is_some()),
                    ("backoff", section.backoff.is_some()),
                    ("backoff_max", section.backoff_max.is_some()),
                    ("ca_file", section.ca_file.is_some()),
                    ("client_cert", section.client_cert.is_some()),
                    ("client_key", section.client_key.is_some()),
                    ("concurrency", section.concurrency.is_some()),
                ] {
                    only(field, set, "http")?;
                }
                if let Some(rate) = section.failure_rate {
                    check_rate(&key("failure_rate"), rate)?;
                }
                Ok(HandlerSettings::Simulate(self.simulate_for(step)))
            }
            "http" => {
                only("duration", section.duration.is_some(), "simulate")?;
                only("failure_rate", section.failure_rate.is_some(), "simulate")?;
                let url = match section.url.as_deref() {
                    Some(text) => step_url(&key("url"), text)?,
                    None => {
                        return Err(ConfigError::new(
                            key("url"),
                            "required with handler = \"http\"",
                        ))
                    }
                };
                let rollback_url = section
                    .rollback_url
                    .as_deref()
                    .map(|text| step_url(&key("rollback_url"), text))
                    .transpose()?;
                let timeout = section.timeout.unwrap_or(HttpSettings::DEFAULT_TIMEOUT);
                if timeout.is_zero() {
                    return Err(ConfigError::new(key("timeout"), "must be more than 0s"));
                }
                let backoff = section.backoff.unwrap_or(HttpSettings::DEFAULT_BACKOFF);
                if backoff.is_zero() {
                    return Err(ConfigError::new(key("backoff"), "must be more than 0s"));
                }
                let backoff_max = section
                    .backoff_max
                    .unwrap_or(HttpSettings::DEFAULT_BACKOFF_MAX.max(backoff));
                if backoff_max < backoff {
                    return Err(ConfigError::new(
                        key("backoff_max"),
                        "must be at least backoff",
                    ));
                }
                let concurrency = match section.concurrency {
                    None => None,
                    Some(limit) if limit > MAX_ORDERS => {
                        return Err(ConfigError::new(
                            key("concurrency"),
                            format!("must be at most {MAX_ORDERS}"),
                        ))
                    }
                    Some(limit) => Some(NonZeroUsize::new(limit).ok_or_else(|| {
                        ConfigError::new(key("concurrency"), "must be at least 1")
                    })?),
                };
                let urls: Vec<&reqwest::Url> = std::iter::once(&url).chain(&rollback_url).collect();
                let tls = StepTls {
                    ca_file: section.ca_file.clone(),
                    client_cert: section.client_cert.clone(),
                    client_key: section.client_key.clone(),
                }
                .checked(
                    &format!("steps.{step}"),
                    &urls,
                    "only used with an https:// url or rollback_url",
                )?;
                Ok(HandlerSettings::Http(Box::new(HttpSettings {
                    url,
                    rollback_url,
                    timeout,
                    retries: section.retries.unwrap_or(HttpSettings::DEFAULT_RETRIES),
                    backoff,
                    backoff_max,
                    tls,
                    concurrency,
                })))
            }
            other => Err(ConfigError::new(
                key("handler"),
                format!("unknown handler `{other}`, expected `simulate` or `http`"),
            )),
        }
    }

    /// The simulate settings of one step: its own section, else `[simulate]`.
    pub fn simulate_for(&self, step: Step) -> SimulateConfig {
        let mut settings = self.simulate;
        if let Some(section) = self.steps.get(step.as_str()) {
            if let Some(duration) = section.duration {
                settings.duration = duration;
            }
            if let Some(rate) = section.failure_rate {
                settings.failure_rate = rate;
            }
        }
        settings
    }
}

fn check_rate(key: &str, rate: f64) -> Result<(), ConfigError> {
    if (0.0..=1.0).contains(&rate) {
        Ok(())
    } else {
        Err(ConfigError::new(
            key,
            format!("{rate} is not between 0 and 1"),
        ))
    }
}

/// Each of these durations must be more than zero; the first that is not names its key.
fn nonzero_durations(durations: &[(&str, Duration)]) -> Result<(), ConfigError> {
    match durations.iter().find(|(_, value)| value.is_zero()) {
        Some((key, _)) => Err(ConfigError::new(*key, "must be more than 0s")),
        None => Ok(()),
    }
}

/// The longest duration any key takes: longer ones are mistakes, and would overflow the
/// arithmetic of clocks and leases made with them.
const LONGEST: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A humantime duration such as `500ms`, `5s` or `1m 30s`, at most [`LONGEST`].
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    let duration = humantime::parse_duration(&text).map_err(|error| {
        de::Error::custom(format!(
            "`{text}` is not a duration like 500ms or 5s: {error}"
        ))
    })?;
    if duration > LONGEST {
        return Err(de::Error::custom(format!(
            "`{text}` is longer than 100 years"
        )));
    }
    Ok(duration)
}

fn duration_opt<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(
            config.server.listen,
            SocketAddr::from(([127, 0, 0, 1], 8080))
        );
        assert_eq!(config.simulate.duration, Duration::from_secs(5));
        assert_eq!(config.simulate.failure_rate, 0.05);
        config.validate().unwrap();
    }

    #[test]
    fn retention_is_a_duration_of_at_least_a_second() {
        let week = Config::from_toml("").unwrap();
        assert_eq!(week.orders.retention, Duration::from_secs(7 * 24 * 60 * 60));
        let short = Config::from_toml("[orders]\nretention = \"10s\"\n").unwrap();
        short.validate().unwrap();
        assert_eq!(short.orders.retention, Duration::from_secs(10));
        for bad in ["0s", "500ms", "20y"] {
            let config = Config::from_toml(&format!("[orders]\nretention = \"{bad}\"\n")).unwrap();
            assert_eq!(
                config.validate().unwrap_err().key,
                "orders.retention",
                "{bad}"
            );
        }
        assert!(Config::from_toml("[orders]\nretention = \"soon\"\n").is_err());
        assert!(Config::from_toml("[orders]\nretention = \"20000y\"\n").is_err());
    }

    #[test]
    fn sample_config_is_the_defaults() {
        let text = include_str!("../config/order-process.toml");
        let sample = Config::from_toml(text).unwrap();
        sample.validate().unwrap();
        let defaults = Config::default();
        assert_eq!(format!("{sample:?}"), format!("{defaults:?}"));
    }

    /// The keys of config section `section` (`""`: the top level; `steps.Processing`: a step's
    /// section), as serde lists them when it refuses a key that is none of them.
    fn keys_of(section: &str) -> Vec<String> {
        let text = match section {
            "" => "not_a_key = 1\n".to_string(),
            section => format!("[{section}]\nnot_a_key = 1\n"),
        };
        let error = Config::from_toml(&text).unwrap_err();
        let listed = error
            .problem
            .split_once(", expected ")
            .map(|(_, listed)| listed.split(" in `").next().unwrap_or(listed))
            .unwrap_or_else(|| panic!("[{section}]: no list of keys in {error}"));
        listed
            .split('`')
            .skip(1)
            .step_by(2)
            .map(String::from)
            .collect()
    }

    /// The sections and keys the sample config names, set or commented out (`# key = …`).
    fn sample_keys() -> BTreeSet<(String, String)> {
        let mut found = BTreeSet::new();
        let mut section = String::new();
        for line in include_str!("../config/order-process.toml").lines() {
            let line = line.trim_start_matches('#').trim();
            if let Some(header) = line
                .strip_prefix('[')
                .and_then(|line| line.split(']').next())
            {
                // `[steps.Processing]` holds a step's keys, whichever step.
                section = match header.split_once('.') {
                    Some(("steps", _)) => "steps.Processing".to_string(),
                    _ => header.to_string(),
                };
            } else if let Some((key, _)) = line.split_once(" = ") {
                found.insert((section.clone(), key.trim().to_string()));
            }
        }
        found
    }

    #[test]
    fn sample_config_names_every_key() {
        let sample = sample_keys();
        let sections = keys_of("");
        assert!(sections.contains(&"database".to_string()), "{sections:?}");
        let mut missing = Vec::new();
        for section in sections {
            let section = match section.as_str() {
                "steps" => "steps.Processing".to_string(),
                _ => section,
            };
            for key in keys_of(&section) {
                if !sample.contains(&(section.clone(), key.clone())) {
                    missing.push(format!("{section}.{key}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "config/order-process.toml does not name {missing:?}"
        );
    }

    #[test]
    fn readme_config_table_names_real_keys() {
        let readme = include_str!("../README.md");
        let table = readme
            .split_once("\n## Configuration\n")
            .and_then(|(_, rest)| rest.split("\n## ").next())
            .expect("the README's Configuration section");
        let mut named = 0;
        for row in table.lines().filter(|line| line.starts_with("| `")) {
            let cell = row.split(" | ").next().unwrap_or_default();
            let mut section = String::new();
            for name in cell.split('`').skip(1).step_by(2) {
                let key = match name.split_once('.') {
                    Some((head, key)) => {
                        section = head.to_string();
                        key
                    }
                    None => name,
                };
                if key.contains(['*', '<']) {
                    continue;
                }
                let keys = keys_of(&section);
                assert!(
                    keys.iter().any(|known| known == key),
                    "the README's config table names {section}.{key}, which is not a key: {keys:?}"
                );
                named += 1;
            }
        }
        assert!(named > 40, "only {named} keys found in the README's table");
    }

    #[test]
    fn readme_config_examples_read() {
        let readme = include_str!("../README.md");
        let mut parsed = 0;
        for block in readme.split("\n```toml\n").skip(1) {
            let text = block.split("\n```").next().unwrap_or_default();
            // A tokens file's entries, which the node reads from `auth.tokens_file`.
            if text.starts_with("[[") {
                if let Err(error) = crate::api::auth::check_tokens(text) {
                    panic!("a README tokens file example does not read: {error}\n{text}");
                }
                parsed += 1;
                continue;
            }
            if let Err(error) = Config::from_toml(text) {
                panic!("a README config example does not read: {error}\n{text}");
            }
            parsed += 1;
        }
        assert!(parsed >= 12, "only {parsed} config examples found");
    }

    #[test]
    fn telemetry_takes_an_http_endpoint() {
        let config =
            Config::from_toml("[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\n").unwrap();
        config.validate().unwrap();
        let endpoint = config.telemetry.otlp_endpoint.unwrap();
        assert_eq!(
            crate::trace::spans::traces_url(&endpoint),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(Config::default().telemetry.otlp_endpoint, None);
        for bad in [
            "127.0.0.1:4318",
            "https://collector:4318",
            "grpc://collector:4317",
            "http://collector:4318/?x=1",
        ] {
            let error = Config::from_toml(&format!("[telemetry]\notlp_endpoint = \"{bad}\"\n"))
                .unwrap_err();
            assert_eq!(error.key, "telemetry.otlp_endpoint", "{bad}");
        }
        let config = Config::from_toml("[telemetry]\nexport_timeout = \"0s\"\n").unwrap();
        assert_eq!(
            config.validate().unwrap_err().key,
            "telemetry.export_timeout"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let error = Config::from_toml("[pipeline]\nworkers = \"lots\"\n").unwrap_err();
        assert_eq!(error.key, "pipeline.workers");
        let error = Config::from_toml("[pipeline]\nworkers = 0\n").unwrap_err();
        assert_eq!(error.key, "pipeline.workers");
        let error = Config::from_toml("[server]\nlisten_on = 1\n").unwrap_err();
        assert!(error.problem.contains("listen_on"), "{error}");
        let error = Config::from_toml("[simulate]\nduration = \"soon\"\n").unwrap_err();
        assert_eq!(error.key, "simulate.duration");
        let long = "[cluster]\nleader_renew_interval = \"300000000000y\"\n";
        let error = Config::from_toml(long).unwrap_err();
        assert_eq!(error.key, "cluster.leader_renew_interval");
        assert!(error.problem.contains("100 years"), "{error}");
        for phi in ["nan", "inf", "-1.0", "0.0"] {
            let config = Config::from_toml(&format!(
                "[database]\nurl = \"redis://127.0.0.1:6379\"\n[cluster]\nsecret = \"0123456789abcdef\"\nphi_threshold = {phi}\n"
            ))
            .unwrap();
            assert_eq!(
                config.validate().unwrap_err().key,
                "cluster.phi_threshold",
                "{phi}"
            );
        }
        for (section, key, most) in [
            ("server", "worker_threads", MAX_THREADS),
            ("pipeline", "workers", MAX_ORDERS),
            ("pipeline", "queue_capacity", MAX_ORDERS),
            ("pipeline", "max_orders", MAX_ORDERS),
            ("database", "pool_size", MAX_THREADS),
            ("steps.Processing", "concurrency", MAX_ORDERS),
        ] {
            let step = match section {
                "steps.Processing" => "handler = \"http\"\nurl = \"http://shop/charge\"\n",
                _ => "",
            };
            for (size, fits) in [(most, true), (most + 1, false), (usize::MAX >> 2, false)] {
                let text = format!("[{section}]\n{step}{key} = {size}\n");
                let checked = Config::from_toml(&text).and_then(|config| config.validate());
                match fits {
                    true => checked.unwrap(),
                    false => assert_eq!(checked.unwrap_err().key, format!("{section}.{key}")),
                }
            }
        }
        let config = Config::from_toml("[limits]\nmax_depth = 101\n").unwrap();
        assert_eq!(config.validate().unwrap_err().key, "limits.max_depth");
        Config::from_toml("[limits]\nmax_depth = 100\n")
            .and_then(|config| config.validate())
            .unwrap();
        let error = Config::from_toml("[server\n").unwrap_err();
        assert_eq!(error.key, "line 1");
        let config = Config::from_toml("[simulate]\nfailure_rate = 2.0\n").unwrap();
        assert_eq!(config.validate().unwrap_err().key, "simulate.failure_rate");
        let config = Config::from_toml("[simulate]\noutput_bytes = 9223372036854775807\n").unwrap();
        assert_eq!(config.validate().unwrap_err().key, "simulate.output_bytes");
        Config::from_toml("[simulate]\noutput_bytes = 65536\n")
            .and_then(|config| config.validate())
            .unwrap();
        let config = Config::from_toml("[log]\nlevel = \"loud[\"\n").unwrap();
        assert_eq!(config.validate().unwrap_err().key, "log.level");
        let config = Config::from_toml("[steps.Shipping]\nhandler = \"simulate\"\n").unwrap();
        assert_eq!(config.validate().unwrap_err().key, "steps.Shipping");
        let config = Config::from_toml("[steps.Processing]\nhandler = \"ftp\"\n").unwrap();
        assert_eq!(
            config.validate().unwrap_err().key,
            "steps.Processing.handler"
        );
    }

    #[test]
    fn a_webhook_needs_a_url_and_a_long_secret() {
        let key = |text: &str| Config::from_toml(text).unwrap().validate().unwrap_err().key;
        assert_eq!(
            key("[notify]\nsecret = \"0123456789abcdef\"\n"),
            "notify.url"
        );
        assert_eq!(
            key("[notify]\nurl = \"http://127.0.0.1:9/hook\"\n"),
            "notify.secret"
        );
        let short = "[notify]\nurl = \"http://127.0.0.1:9/hook\"\nsecret = \"short\"\n";
        assert_eq!(key(short), "notify.secret");
        // Characters, not bytes: eight two-byte letters are eight.
        let narrow = "[notify]\nurl = \"http://127.0.0.1:9/hook\"\nsecret = \"éééééééé\"\n";
        assert_eq!(key(narrow), "notify.secret");
        let bad_url = "[notify]\nurl = \"ftp://host/\"\nsecret = \"0123456789abcdef\"\n";
        assert_eq!(key(bad_url), "notify.url");
        let good = "[notify]\nurl = \"http://127.0.0.1:9/hook\"\nsecret = \"0123456789abcdef\"\n";
        let settings = Config::from_toml(good)
            .unwrap()
            .notify_settings()
            .unwrap()
            .unwrap();
        assert_eq!(settings.retries, NotifySettings::DEFAULT_RETRIES);
        assert_eq!(settings.backoff_max, NotifySettings::DEFAULT_BACKOFF_MAX);
        assert_eq!(Config::default().notify_settings().unwrap(), None);
        // TLS files only for an https receiver, and only files that read.
        let plain = format!("{good}ca_file = \"ca.pem\"\n");
        assert_eq!(key(&plain), "notify.ca_file");
        let https = good.replace("http://", "https://");
        let missing = format!("{https}client_cert = \"/nonexistent/client.pem\"\n");
        assert!(key(&missing).starts_with("notify"), "{}", key(&missing));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("op-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "[server]\nlisten = \"127.0.0.1:9000\"\n[log]\nlevel = \"warn\"\n",
        )
        .unwrap();
        let overrides = Overrides {
            listen: Some("127.0.0.1:9001".into()),
            data_dir: None,
            log_level: Some("debug".into()),
            ..Overrides::default()
        };
        let config = Config::load(Some(&path), &overrides).unwrap();
        assert_eq!(config.server.listen.port(), 9001);
        assert_eq!(config.log.level, "debug");
        let bad = Overrides {
            listen: Some("nowhere".into()),
            ..Overrides::default()
        };
        let joining = Overrides {
            join: vec!["127.0.0.1:8081".into()],
            ..Overrides::default()
        };
        assert_eq!(
            Config::load(Some(&path), &joining).unwrap_err().key,
            "cluster.seeds"
        );
        let clustered = Overrides {
            join: vec!["127.0.0.1:8081".into()],
            redis: Some("redis://127.0.0.1:6390".into()),
            ..Overrides::default()
        };
        assert_eq!(
            Config::load(Some(&path), &clustered).unwrap_err().key,
            "cluster.secret"
        );
        assert_eq!(Config::load(Some(&path), &bad).unwrap_err().key, "--listen");
        // An empty --redis (a variable left unset) is refused, not taken for no Redis.
        std::fs::write(
            &path,
            "[database]\nurl = \"redis://127.0.0.1:6390\"\n[cluster]\nsecret = \"0123456789abcdef\"\n",
        )
        .unwrap();
        Config::load(Some(&path), &Overrides::default()).unwrap();
        for empty in ["", " "] {
            let unset = Overrides {
                redis: Some(empty.into()),
                ..Overrides::default()
            };
            assert_eq!(
                Config::load(Some(&path), &unset).unwrap_err().key,
                "--redis"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn auth_mode_defaults_by_listener_and_header_mode_is_refused_on_a_network() {
        let loopback = Config::from_toml("").unwrap();
        assert_eq!(loopback.auth_mode(), AuthMode::Header);
        loopback.validate().unwrap();
        let public = Config::from_toml("[server]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
        assert_eq!(public.auth_mode(), AuthMode::Tokens);
        assert_eq!(public.validate().unwrap_err().key, "auth.tokens_file");
        let with_tokens = Config::from_toml(
            "[server]\nlisten = \"0.0.0.0:8080\"\n[auth]\ntokens_file = \"tokens.toml\"\n",
        )
        .unwrap();
        with_tokens.validate().unwrap();
        let header =
            Config::from_toml("[server]\nlisten = \"10.0.0.5:8080\"\n[auth]\nmode = \"header\"\n")
                .unwrap();
        let error = header.validate().unwrap_err();
        assert_eq!(error.key, "auth.allow_insecure_header");
        assert!(error.to_string().contains("auth.allow_insecure_header"));
        let allowed = Config::from_toml(
            "[server]\nlisten = \"10.0.0.5:8080\"\n[auth]\nmode = \"header\"\nallow_insecure_header = true\n",
        )
        .unwrap();
        allowed.validate().unwrap();
        let tokens_on_loopback = Config::from_toml("[auth]\nmode = \"tokens\"\n").unwrap();
        assert_eq!(
            tokens_on_loopback.validate().unwrap_err().key,
            "auth.tokens_file"
        );
        assert_eq!(
            Config::from_toml("[auth]\nmode = \"basic\"\n")
                .unwrap_err()
                .key,
            "auth.mode"
        );
        for (section, key) in [
            ("header_read_timeout = \"0s\"", "limits.header_read_timeout"),
            ("body_read_timeout = \"0s\"", "limits.body_read_timeout"),
            ("submit_rate = 0.0", "limits.submit_rate"),
            ("submit_rate = -1.0", "limits.submit_rate"),
            ("submit_rate = 1e-300", "limits.submit_rate"),
            ("submit_rate = 0.000000001", "limits.submit_rate"),
            ("submit_burst = 1000001", "limits.submit_burst"),
        ] {
            let config = Config::from_toml(&format!("[limits]\n{section}\n")).unwrap();
            assert_eq!(config.validate().unwrap_err().key, key, "{section}");
        }
        assert_eq!(
            Config::from_toml("[limits]\nmax_depth = 0\n")
                .unwrap_err()
                .key,
            "limits.max_depth"
        );
        for bytes in [0, MAX_BODY_BYTES + 1, i64::MAX as u64] {
            let config =
                Config::from_toml(&format!("[server]\nmax_body_bytes = {bytes}\n")).unwrap();
            assert_eq!(
                config.validate().unwrap_err().key,
                "server.max_body_bytes",
                "{bytes}"
            );
        }
        let largest = format!("[server]\nmax_body_bytes = {MAX_BODY_BYTES}\n");
        Config::from_toml(&largest).unwrap().validate().unwrap();
    }

    #[test]
    fn sentinel_and_replica_keys_are_checked_against_each_other() {
        let sentinels = "[database]\nsentinels = [\"127.0.0.1:26379\", \"[::1]:26380\"]\n\
                         master_name = \"orders\"\nmin_replicas = 1\nrequire_aof = true\n\
                         [cluster]\nsecret = \"0123456789abcdef\"\n";
        let config = Config::from_toml(sentinels).unwrap();
        config.validate().unwrap();
        assert!(config.is_cluster());
        assert_eq!(config.database.min_replicas, 1);
        let over_tls = sentinels.replace(
            "require_aof = true\n",
            "require_aof = true\ntls = true\nca_file = \"/etc/hostname\"\n",
        );
        let config = Config::from_toml(&over_tls).unwrap();
        config.validate().unwrap();
        assert!(config.database.tls);
        let plain = Config::from_toml(
            "[database]\nurl = \"redis://127.0.0.1:6379\"\nmin_replicas = 2\n[cluster]\nsecret = \"0123456789abcdef\"\n",
        )
        .unwrap();
        plain.validate().unwrap();
        for (text, key, needle) in [
            (
                "[database]\nurl = \"redis://a:1\"\nsentinels = [\"a:2\"]\nmaster_name = \"m\"\n",
                "database.sentinels",
                "not both",
            ),
            (
                "[database]\nsentinels = [\"a:2\"]\n",
                "database.master_name",
                "required",
            ),
            (
                "[database]\nsentinels = [\"a\"]\nmaster_name = \"m\"\n",
                "database.sentinels",
                "host:port",
            ),
            (
                "[database]\nsentinels = [\":26379\"]\nmaster_name = \"m\"\n",
                "database.sentinels",
                "host:port",
            ),
            (
                "[database]\nmaster_name = \"m\"\n",
                "database.master_name",
                "only used with database.sentinels",
            ),
            (
                "[database]\nurl = \"rediss://a:1\"\ntls = true\n",
                "database.tls",
                "only used with database.sentinels",
            ),
            (
                "[database]\nsentinels = [\"a:2\"]\nmaster_name = \"m\"\nca_file = \"/etc/hostname\"\n",
                "database.ca_file",
                "set database.tls = true",
            ),
            (
                "[database]\nsentinels = [\"a:2\"]\nmaster_name = \"m\"\ntls = true\n\
                 client_cert = \"/etc/hostname\"\n",
                "database.client_key",
                "set both or neither",
            ),
            (
                "[database]\nmin_replicas = 1\n",
                "database.min_replicas",
                "only used with Redis",
            ),
            (
                "[database]\nrequire_aof = true\n",
                "database.require_aof",
                "only used with Redis",
            ),
            (
                "[database]\nsplit_orders = true\n",
                "database.split_orders",
                "only used with Redis",
            ),
            (
                "[database]\nsentinels = [\"a:2\"]\nmaster_name = \"m\"\n",
                "cluster.secret",
                "required",
            ),
            (
                "[database]\nurl = \"redis://127.0.0.1:6390\"\n[cluster]\nsecret = \"change-me\"\n",
                "cluster.secret",
                "at least 16 characters",
            ),
            (
                "[database]\nurl = \"redis://127.0.0.1:6390\"\n[cluster]\nsecret = \"   fifteen chars   \"\n",
                "cluster.secret",
                "at least 16 characters",
            ),
        ] {
            let error = Config::from_toml(text).unwrap().validate().unwrap_err();
            assert_eq!(error.key, key, "{text}: {error}");
            assert!(error.problem.contains(needle), "{text}: {error}");
        }
        assert_eq!(
            Config::from_toml("[database]\nmin_replicas = -1\n")
                .unwrap_err()
                .key,
            "database.min_replicas"
        );
        // --redis names the one Redis to use, in place of the file's sentinels.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, sentinels).unwrap();
        let overrides = Overrides {
            redis: Some("redis://127.0.0.1:6390".into()),
            ..Overrides::default()
        };
        let config = Config::load(Some(&path), &overrides).unwrap();
        assert_eq!(config.database.url, "redis://127.0.0.1:6390");
        assert!(config.database.sentinels.is_empty());
        assert!(config.database.master_name.is_empty());
    }

    #[test]
    fn redis_cluster_keys_are_checked_against_each_other() {
        let cluster = "[database]\ncluster_nodes = [\"127.0.0.1:7000\", \"127.0.0.1:7001\"]\n\
                       min_replicas = 1\n[cluster]\nsecret = \"0123456789abcdef\"\n";
        let config = Config::from_toml(cluster).unwrap();
        config.validate().unwrap();
        assert!(config.is_cluster());
        let over_tls = "[database]\ncluster_nodes = [\"127.0.0.1:7000\"]\ntls = true\n\
                        [cluster]\nsecret = \"0123456789abcdef\"\n";
        Config::from_toml(over_tls).unwrap().validate().unwrap();
        for (text, key, needle) in [
            (
                "[database]\nurl = \"redis://a:1\"\ncluster_nodes = [\"a:2\"]\n",
                "database.cluster_nodes",
                "not two",
            ),
            (
                "[database]\ncluster_nodes = [\"a\"]\n",
                "database.cluster_nodes",
                "host:port",
            ),
            (
                "[database]\ncluster_nodes = [\"a:2\"]\nca_file = \"/ca.pem\"\n",
                "database.ca_file",
                "set database.tls = true with database.sentinels or database.cluster_nodes",
            ),
        ] {
            let error = Config::from_toml(text).unwrap().validate().unwrap_err();
            assert_eq!(error.key, key, "{text}: {error}");
            assert!(error.problem.contains(needle), "{text}: {error}");
        }
    }

    fn step_error(section: &str) -> ConfigError {
        let config = Config::from_toml(&format!("[steps.Processing]\n{section}"))
            .unwrap_or_else(|error| panic!("{section}: does not parse: {error}"));
        config
            .validate()
            .expect_err(&format!("{section}: should be refused"))
    }

    #[test]
    fn bad_step_sections_name_the_step_and_key() {
        let http = "handler = \"http\"\n";
        for (section, key, needle) in [
            ("handler = \"grpc\"\n", "steps.Processing.handler", "grpc"),
            (http, "steps.Processing.url", "required"),
            (
                &format!("{http}url = \"not a url\"\n"),
                "steps.Processing.url",
                "not a URL",
            ),
            (
                &format!("{http}url = \"ftp://shop/charge\"\n"),
                "steps.Processing.url",
                "ftp",
            ),
            (
                &format!("{http}url = \"https://shop/charge\"\nconcurrency = 0\n"),
                "steps.Processing.concurrency",
                "at least 1",
            ),
            (
                &format!("{http}url = \"http://shop/charge\"\nca_file = \"/etc/hostname\"\n"),
                "steps.Processing.ca_file",
                "https",
            ),
            (
                &format!("{http}url = \"https://shop/charge\"\nca_file = \"/no/such/ca.pem\"\n"),
                "steps.Processing.ca_file",
                "cannot read /no/such/ca.pem",
            ),
            (
                "handler = \"simulate\"\nconcurrency = 2\n",
                "steps.Processing.concurrency",
                "http",
            ),
            (
                &format!("{http}url = \"http://shop/charge\"\nrollback_url = \"refund\"\n"),
                "steps.Processing.rollback_url",
                "not a URL",
            ),
            (
                &format!("{http}url = \"http://shop/charge\"\ntimeout = \"0s\"\n"),
                "steps.Processing.timeout",
                "more than 0s",
            ),
            (
                &format!("{http}url = \"http://shop/charge\"\nbackoff = \"0s\"\n"),
                "steps.Processing.backoff",
                "more than 0s",
            ),
            (
                &format!(
                    "{http}url = \"http://shop/charge\"\nbackoff = \"2s\"\nbackoff_max = \"1s\"\n"
                ),
                "steps.Processing.backoff_max",
                "at least backoff",
            ),
            (
                &format!("{http}url = \"http://shop/charge\"\nduration = \"1s\"\n"),
                "steps.Processing.duration",
                "simulate",
            ),
            (
                "handler = \"simulate\"\nurl = \"http://shop/charge\"\n",
                "steps.Processing.url",
                "http",
            ),
        ] {
            let error = step_error(section);
            assert_eq!(error.key, key, "{section}: {error}");
            assert!(error.problem.contains(needle), "{section}: {error}");
        }
        // A negative retry count is a type error that names the key.
        let error = Config::from_toml("[steps.Processing]\nhandler = \"http\"\nretries = -1\n")
            .unwrap_err();
        assert_eq!(error.key, "steps.Processing.retries");
    }

    #[test]
    fn step_tls_files_are_read_and_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let client_key = rcgen::KeyPair::generate().unwrap();
        let client = rcgen::CertificateParams::new(vec!["client".to_string()])
            .unwrap()
            .self_signed(&client_key)
            .unwrap();
        let ca_file = write("ca.pem", &ca.pem());
        let cert_file = write("client.pem", &client.pem());
        let key_file = write("client.key", &client_key.serialize_pem());
        let other_key = write("other.key", &ca_key.serialize_pem());
        let section =
            |files: &str| format!("handler = \"http\"\nurl = \"https://shop/charge\"\n{files}");
        let good = section(&format!(
            "ca_file = \"{ca_file}\"\nclient_cert = \"{cert_file}\"\nclient_key = \"{key_file}\"\n"
        ));
        let config = Config::from_toml(&format!("[steps.Processing]\n{good}")).unwrap();
        config.validate().unwrap();
        let HandlerSettings::Http(settings) = config.handler_for(Step::Processing).unwrap() else {
            panic!("Processing should use http");
        };
        assert_eq!(settings.tls.ca_file.as_deref(), Some(Path::new(&ca_file)));
        for (files, key, needle) in [
            (
                format!("ca_file = \"{key_file}\"\n"),
                "steps.Processing.ca_file",
                "holds no PEM certificate",
            ),
            (
                format!("client_cert = \"{cert_file}\"\n"),
                "steps.Processing.client_key",
                "set both or neither",
            ),
            (
                format!("client_key = \"{key_file}\"\n"),
                "steps.Processing.client_cert",
                "set both or neither",
            ),
            (
                format!("client_cert = \"{cert_file}\"\nclient_key = \"{ca_file}\"\n"),
                "steps.Processing.client_key",
                "no PEM private key",
            ),
            (
                format!("client_cert = \"{cert_file}\"\nclient_key = \"{other_key}\"\n"),
                "steps.Processing.client_key",
                "does not go with client_cert",
            ),
        ] {
            let error = step_error(&section(&files));
            assert_eq!(error.key, key, "{files}: {error}");
            assert!(error.problem.contains(needle), "{files}: {error}");
        }
    }

    #[test]
    fn http_step_section_gives_typed_settings_with_defaults() {
        let config = Config::from_toml(
            "[steps.Processing]\nhandler = \"http\"\nurl = \"http://127.0.0.1:9001/charge\"\n\
             rollback_url = \"http://127.0.0.1:9001/refund\"\ntimeout = \"2s\"\nretries = 5\n\
             backoff = \"100ms\"\nbackoff_max = \"1s\"\n[steps.Scheduling]\nhandler = \"http\"\n\
             url = \"http://localhost:9002/slot\"\n",
        )
        .unwrap();
        config.validate().unwrap();
        let HandlerSettings::Http(processing) = config.handler_for(Step::Processing).unwrap()
        else {
            panic!("Processing should use http");
        };
        assert_eq!(processing.url.as_str(), "http://127.0.0.1:9001/charge");
        assert_eq!(
            processing.rollback_url.map(String::from),
            Some("http://127.0.0.1:9001/refund".to_string())
        );
        assert_eq!(processing.timeout, Duration::from_secs(2));
        assert_eq!(processing.retries, 5);
        assert_eq!(processing.backoff, Duration::from_millis(100));
        assert_eq!(processing.backoff_max, Duration::from_secs(1));
        let HandlerSettings::Http(scheduling) = config.handler_for(Step::Scheduling).unwrap()
        else {
            panic!("Scheduling should use http");
        };
        assert_eq!(scheduling.rollback_url, None);
        assert_eq!(scheduling.timeout, HttpSettings::DEFAULT_TIMEOUT);
        assert_eq!(scheduling.retries, HttpSettings::DEFAULT_RETRIES);
        assert_eq!(scheduling.backoff, HttpSettings::DEFAULT_BACKOFF);
        assert_eq!(scheduling.backoff_max, HttpSettings::DEFAULT_BACKOFF_MAX);
        // Steps without a section keep simulate.
        assert_eq!(
            config.handler_for(Step::PostProcessing).unwrap(),
            HandlerSettings::Simulate(config.simulate)
        );
    }

    #[test]
    fn step_sections_override_simulate() {
        let config = Config::from_toml(
            "[simulate]\nduration = \"1s\"\n[steps.Processing]\nhandler = \"simulate\"\nduration = \"2s\"\nfailure_rate = 0.5\n",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.simulate_for(Step::Scheduling).duration,
            Duration::from_secs(1)
        );
        assert_eq!(
            config.simulate_for(Step::Processing).duration,
            Duration::from_secs(2)
        );
        assert_eq!(config.simulate_for(Step::Processing).failure_rate, 0.5);
    }
}
