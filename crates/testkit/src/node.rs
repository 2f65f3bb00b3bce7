//! The order-process binary under test: a [`Node`] runs it as a child process on a free
//! loopback port with its own temporary directory holding `config.toml`, `data/` and `node.log`
//! (the child's stdout and stderr, appended across restarts, one `==== launch N ====` marker per
//! start). A failing helper puts the tail of that log in its panic message, and a node dropped
//! while the test is panicking prints it too. Waiting is always polling with a deadline.

use crate::http::{Call, Reply};
use crate::ports::free_port_on;
use crate::process::Proc;
use crate::{tail, POLL};
use reqwest::Method;
use serde_json::Value;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Where nodes listen unless told otherwise.
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// How long a node may take to answer its first heartbeat: generous, since on two cores busy
/// with the whole suite a node's first connections (TLS to six Redis Cluster nodes) are slow.
pub const STARTUP: Duration = Duration::from_secs(60);

/// Why one launch of a node did not become ready.
enum Launch {
    Ready,
    PortTaken,
}

/// The real binary running on a loopback port, with its own temp dir (config, data, log).
pub struct Node {
    /// The binary this node runs.
    bin: PathBuf,
    /// The loopback address it listens on (127.0.0.1 unless started with [`Node::start_on`]).
    pub host: IpAddr,
    pub port: u16,
    /// `http://127.0.0.1:PORT` (`https://` for [`Node::start_https`], `[::1]` for a node on
    /// that address)
    pub base: String,
    dir: TempDir,
    process: Option<Proc>,
    launches: usize,
    client: reqwest::Client,
    /// Variables added to the binary's environment.
    env: Vec<(String, String)>,
}

impl Node {
    /// Writes `config` (TOML) to the node's temp dir and starts the binary with it, on a free
    /// port, with `--log-level debug`; returns once `GET /diagnostic/heartbeat` answers 200.
    pub async fn start(bin: &Path, config: &str) -> Node {
        Node::start_with(bin, config, None).await
    }

    /// Starts the binary as [`start`](Node::start) does, with `service_id` as its node id.
    pub async fn start_as(bin: &Path, config: &str, service_id: &str) -> Node {
        Node::start_with(bin, config, Some(service_id)).await
    }

    /// Starts the binary as [`start`](Node::start) does, for a `config` that serves https
    /// with a certificate for 127.0.0.1 signed by the CA in `ca_file`: requests go to
    /// `https://127.0.0.1:PORT`, trusting that CA only. With `identity` (a PEM certificate and
    /// its PEM private key), requests show that client certificate.
    pub async fn start_https(
        bin: &Path,
        config: &str,
        ca_file: &Path,
        identity: Option<(&Path, &Path)>,
    ) -> Node {
        let client = crate::http::https_client(ca_file, identity);
        Node::launch_new(bin, config, None, "https", client, LOCALHOST, Vec::new()).await
    }

    /// Starts the binary as [`start`](Node::start) does, listening on `host` (a loopback
    /// address: `::1` for a node on IPv6).
    pub async fn start_on(bin: &Path, config: &str, host: IpAddr) -> Node {
        Node::launch_new(
            bin,
            config,
            None,
            "http",
            crate::http::client(),
            host,
            Vec::new(),
        )
        .await
    }

    /// Starts the binary as [`start`](Node::start) does, with `env` added to its environment.
    pub async fn start_env(bin: &Path, config: &str, env: &[(&str, &str)]) -> Node {
        let env = env
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let client = crate::http::client();
        Node::launch_new(bin, config, None, "http", client, LOCALHOST, env).await
    }

    async fn start_with(bin: &Path, config: &str, service_id: Option<&str>) -> Node {
        Node::launch_new(
            bin,
            config,
            service_id,
            "http",
            crate::http::client(),
            LOCALHOST,
            Vec::new(),
        )
        .await
    }

    async fn launch_new(
        bin: &Path,
        config: &str,
        service_id: Option<&str>,
        scheme: &str,
        client: reqwest::Client,
        host: IpAddr,
        env: Vec<(String, String)>,
    ) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("order-process-it-")
            .tempdir()
            .expect("create a temp dir");
        fs::write(dir.path().join("config.toml"), config).expect("write config.toml");
        if let Some(id) = service_id {
            let data = dir.path().join("data");
            fs::create_dir_all(&data).expect("create the data dir");
            fs::write(data.join("service_id"), id).expect("write service_id");
        }
        let mut node = Node {
            bin: bin.to_path_buf(),
            host,
            port: 0,
            base: String::new(),
            dir,
            process: None,
            launches: 0,
            client,
            env,
        };
        for _ in 0..5 {
            node.port = free_port_on(host).expect("a free loopback port");
            node.base = format!("{scheme}://{}", node.listen());
            if let Launch::Ready = node.launch().await {
                return node;
            }
        }
        panic!(
            "node could not get a free port in 5 attempts\n{}",
            node.log_tail()
        );
    }

    /// Starts the binary again on the same data dir, config and port (SIGKILLing the current
    /// process first if it still runs); returns once it answers its heartbeat.
    pub async fn restart(&mut self) {
        self.kill();
        for _ in 0..5 {
            if let Launch::Ready = self.launch().await {
                return;
            }
            // Something else holds the port for now; give it a moment before trying again.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "node could not bind its port {} again in 5 attempts\n{}",
            self.port,
            self.log_tail()
        );
    }

    /// One attempt to start the process and see it ready.
    async fn launch(&mut self) -> Launch {
        self.launches += 1;
        let args = self.args();
        let marker = format!("==== launch {}: {} ====", self.launches, args.join(" "));
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open node.log");
        writeln!(log, "{marker}").expect("write to node.log");
        drop(log);

        let log = self.log_path();
        let process = Proc::spawn_env(&self.bin, &args, &self.env, &log, &log)
            .unwrap_or_else(|error| panic!("spawn {}: {error}", self.bin.display()));
        self.process = Some(process);
        let deadline = Instant::now() + STARTUP;
        loop {
            let exited = self.process.as_mut().and_then(Proc::try_exit);
            if let Some(status) = exited {
                self.process = None;
                let this_launch = self.log_since(&marker).to_lowercase();
                if ["address already in use", "addrinuse", "os error 98"]
                    .iter()
                    .any(|needle| this_launch.contains(needle))
                {
                    return Launch::PortTaken;
                }
                panic!(
                    "node exited before it was ready ({status})\n{}",
                    self.log_tail()
                );
            }
            if let Ok(reply) = self
                .call(Method::GET, "/diagnostic/heartbeat")
                .try_send()
                .await
            {
                if reply.status == 200 {
                    return Launch::Ready;
                }
            }
            if Instant::now() >= deadline {
                panic!("node not ready within {STARTUP:?}\n{}", self.log_tail());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--config".into(),
            self.dir.path().join("config.toml").display().to_string(),
            "--listen".into(),
            self.listen().to_string(),
            "--data-dir".into(),
            self.data_dir().display().to_string(),
            "--log-level".into(),
            "debug".into(),
        ]
    }

    /// The address it listens on (HTTP on TCP, gossip on UDP).
    pub fn listen(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }

    /// The last lines of the node's log, for assertion messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log_path(), 60)
    }

    /// Everything the node logged since `marker`.
    fn log_since(&self, marker: &str) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        match text.rfind(marker) {
            Some(position) => text[position..].to_string(),
            None => text,
        }
    }

    /// The whole log (all launches).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The node id stored in `<data_dir>/service_id`, trimmed.
    pub fn service_id_file(&self) -> String {
        let path = self.data_dir().join("service_id");
        fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("read {}: {error}\n{}", path.display(), self.log_tail()))
            .trim()
            .to_string()
    }

    /// SIGKILLs the process (if running) and reaps it.
    pub fn kill(&mut self) {
        drop(self.process.take());
    }

    /// Sends SIGTERM (via `kill -TERM pid`; the crate forbids unsafe code, so no libc).
    pub fn term(&self) {
        let process = self
            .process
            .as_ref()
            .expect("term() on a node that is not running");
        assert!(
            process.signal("TERM"),
            "kill -TERM {} failed",
            process.pid()
        );
    }

    /// Polls until the process exits and returns its status; panics at the deadline.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let process = self
            .process
            .as_mut()
            .expect("wait_exit() on a node that is not running");
        match process.wait_exit(within).await {
            Some(status) => {
                self.process = None;
                status
            }
            None => panic!("node did not exit within {within:?}\n{}", self.log_tail()),
        }
    }

    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Starts building a request to `path` (which may carry no query; use `.query()`).
    pub fn call(&self, method: Method, path: &str) -> Call<'_> {
        Call {
            node: self,
            method,
            path: path.to_string(),
            user: None,
            headers: Vec::new(),
            query: Vec::new(),
            body: None,
            bare: false,
        }
    }

    /// Asserts the status and returns the JSON body, with the reply and log tail on failure.
    pub fn expect_json(&self, reply: &Reply, status: u16, what: &str) -> Value {
        assert_eq!(
            reply.status,
            status,
            "{what}: unexpected status; got {reply}\n{}",
            self.log_tail()
        );
        reply
            .try_json()
            .unwrap_or_else(|| panic!("{what}: body is not JSON; got {reply}\n{}", self.log_tail()))
    }

    /// Asserts an error reply: this status and a JSON body `{"error": "<non-empty string>"}`.
    pub fn expect_error(&self, reply: &Reply, status: u16, what: &str) {
        let body = self.expect_json(reply, status, what);
        let message = body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or_default();
        assert!(
            !message.trim().is_empty(),
            "{what}: expected {{\"error\": \"<message>\"}}; got {reply}\n{}",
            self.log_tail()
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "node on port {} (test failed):\n{}",
                self.port,
                tail(&self.log_path(), 150)
            );
        }
        self.kill();
    }
}

impl Node {
    /// Sends a signal by name (`STOP`, `CONT`, `TERM`, …) with `kill -SIG pid`.
    pub fn signal(&self, name: &str) {
        let process = self
            .process
            .as_ref()
            .expect("signal() on a node that is not running");
        assert!(
            process.signal(name),
            "kill -{name} {} failed",
            process.pid()
        );
    }

    /// True while the node's process runs.
    pub fn is_running(&mut self) -> bool {
        match self.process.as_mut() {
            Some(process) => process.try_exit().is_none(),
            None => false,
        }
    }
}
