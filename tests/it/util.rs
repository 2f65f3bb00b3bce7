//! Test harness: a `Node` that runs the real `order-process` binary as a child process, HTTP
//! helpers to talk to it, and the shared checks on order JSON (completed pipeline, rollback).
//!
//! Every node gets its own temporary directory holding `config.toml`, `data/` and `node.log`
//! (the child's stdout and stderr, appended across restarts, one `==== launch N ====` marker per
//! start). A failing helper puts the tail of that log in its panic message, and a node dropped
//! while the test is panicking prints it too. Waiting is always polling with a deadline.

#![allow(dead_code)] // not every test module uses every helper

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset};
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::Value;
use tempfile::TempDir;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_order-process");

/// Interval between two polls of any condition.
pub const POLL: Duration = Duration::from_millis(25);
/// How long a node may take to answer its first heartbeat.
pub const STARTUP: Duration = Duration::from_secs(20);
/// Default deadline for an order to reach a terminal state (generous: 2 loaded cores).
pub const TERMINAL: Duration = Duration::from_secs(20);

/// The forward steps, in pipeline order.
pub const FORWARD_STEPS: [&str; 4] = [
    "Scheduling",
    "Pre-Processing",
    "Processing",
    "Post-Processing",
];
/// The step list of a completed order.
pub const COMPLETED_STEPS: [&str; 5] = [
    "Scheduling",
    "Pre-Processing",
    "Processing",
    "Post-Processing",
    "Completed",
];

/// A `[simulate]` section: steps sleep `duration` and never fail at random.
pub fn simulate(duration: &str) -> String {
    format!("[simulate]\nduration = \"{duration}\"\nfailure_rate = 0.0\n")
}

/// A user name no other test uses, so tests sharing nothing still never see each other's orders.
pub fn unique_user(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The last `lines` lines of a file, or a note saying why it could not be read.
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            format!(
                "---- {} (last {} lines) ----\n{}\n----",
                path.display(),
                all.len() - start,
                all[start..].join("\n")
            )
        }
        Err(error) => format!("---- {}: unreadable: {error} ----", path.display()),
    }
}

/// Ports handed out by this test binary, so two concurrent tests never get the same one.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port that is free for both TCP and UDP right now (gossip uses UDP on the HTTP port).
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind a TCP port on 127.0.0.1");
        let port = tcp
            .local_addr()
            .expect("local address of a bound listener")
            .port();
        let Ok(udp) = UdpSocket::bind(("127.0.0.1", port)) else {
            continue;
        };
        drop((tcp, udp));
        let mut handed_out = HANDED_OUT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if handed_out.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("found no port free for both TCP and UDP on 127.0.0.1");
}

/// A child process that is SIGKILLed and reaped when dropped, so no test leaves one behind.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Starts `BIN args…` with stdin closed and stdout + stderr appended to `log`.
    pub fn spawn(args: &[String], log: &Path) -> Proc {
        Proc::spawn_split(args, log, log)
    }

    /// Starts `BIN args…` with stdin closed, stdout appended to `stdout` and stderr to `stderr`.
    pub fn spawn_split(args: &[String], stdout: &Path, stderr: &Path) -> Proc {
        let open = |path: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap_or_else(|error| panic!("open {}: {error}", path.display()))
        };
        let child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(open(stdout))
            .stderr(open(stderr))
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {BIN}: {error}"));
        Proc { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on a child process")
    }

    /// Polls until the process exits; `None` if it is still running at the deadline.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // `Child::kill` sends SIGKILL to this pid, and does nothing if the child was already reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP answer, read completely.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    }

    /// The body as JSON, or `None` if it is not JSON.
    pub fn try_json(&self) -> Option<Value> {
        serde_json::from_str(&self.text).ok()
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let content_type = self.header("content-type").unwrap_or_default();
        write!(
            formatter,
            "HTTP {} (content-type {content_type:?}) body: {}",
            self.status, self.text
        )
    }
}

/// Why one launch of a node did not become ready.
enum Launch {
    Ready,
    PortTaken,
}

/// The real binary running on a loopback port, with its own temp dir (config, data, log).
pub struct Node {
    pub port: u16,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    dir: TempDir,
    process: Option<Proc>,
    launches: usize,
    client: reqwest::Client,
}

impl Node {
    /// Writes `config` (TOML) to the node's temp dir and starts the binary with it, on a free
    /// port, with `--log-level debug`; returns once `GET /diagnostic/heartbeat` answers 200.
    pub async fn start(config: &str) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("order-process-it-")
            .tempdir()
            .expect("create a temp dir");
        fs::write(dir.path().join("config.toml"), config).expect("write config.toml");
        let mut node = Node {
            port: 0,
            base: String::new(),
            dir,
            process: None,
            launches: 0,
            client: http_client(),
        };
        for _ in 0..5 {
            node.port = free_port();
            node.base = format!("http://127.0.0.1:{}", node.port);
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

        self.process = Some(Proc::spawn(&args, &self.log_path()));
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
            format!("127.0.0.1:{}", self.port),
            "--data-dir".into(),
            self.data_dir().display().to_string(),
            "--log-level".into(),
            "debug".into(),
        ]
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
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(process.pid().to_string())
            .status()
            .expect("run kill -TERM");
        assert!(
            status.success(),
            "kill -TERM {} failed: {status}",
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

    /// `POST /orders` with a raw body (sent as `application/json`).
    pub async fn post_order(&self, user: &str, body: &str) -> Reply {
        self.call(Method::POST, "/orders")
            .user(user)
            .body(body)
            .send()
            .await
    }

    /// `POST /orders` with an `Idempotency-Key`.
    pub async fn post_order_keyed(&self, user: &str, key: &str, body: &str) -> Reply {
        self.call(Method::POST, "/orders")
            .user(user)
            .header("Idempotency-Key", key)
            .body(body)
            .send()
            .await
    }

    /// Creates an order, asserts the 201 `{"order_id", "start_time"}` shape, returns the id.
    pub async fn create_order(&self, user: &str, body: &Value) -> String {
        let reply = self.post_order(user, &body.to_string()).await;
        let created = self.expect_json(&reply, 201, "POST /orders");
        let id = created["order_id"]
            .as_str()
            .unwrap_or_else(|| panic!("201 without a string order_id: {reply}"))
            .to_string();
        assert!(
            uuid::Uuid::parse_str(&id).is_ok(),
            "order_id is not a UUID: {reply}"
        );
        utc_time(&created["start_time"], "start_time of the 201");
        id
    }

    pub async fn get_order(&self, user: &str, id: &str) -> Reply {
        self.call(Method::GET, &format!("/orders/{id}"))
            .user(user)
            .send()
            .await
    }

    /// `GET /orders/{id}`, asserting 200.
    pub async fn order(&self, user: &str, id: &str) -> Value {
        let reply = self.get_order(user, id).await;
        self.expect_json(&reply, 200, &format!("GET /orders/{id}"))
    }

    /// Polls `GET /orders/{id}` until `ready(order)`; panics at the deadline with the last view.
    pub async fn wait_for(
        &self,
        user: &str,
        id: &str,
        within: Duration,
        what: &str,
        ready: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let order = self.order(user, id).await;
            if ready(&order) {
                return order;
            }
            if Instant::now() >= deadline {
                panic!(
                    "order {id}: not {what} within {within:?}; last view:\n{}\n{}",
                    pretty(&order),
                    self.log_tail()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls until the order has a `complete_time` (it is finished) and returns it.
    pub async fn wait_terminal(&self, user: &str, id: &str, within: Duration) -> Value {
        self.wait_for(user, id, within, "finished (complete_time set)", |order| {
            order
                .get("complete_time")
                .is_some_and(|time| !time.is_null())
        })
        .await
    }

    /// Polls until the order's `current_step` is `step`.
    pub async fn wait_step(&self, user: &str, id: &str, step: &str, within: Duration) -> Value {
        self.wait_for(user, id, within, &format!("at step {step}"), |order| {
            order["current_step"] == step
        })
        .await
    }

    /// `GET /orders` with query parameters.
    pub async fn list(&self, user: &str, query: &[(&str, &str)]) -> Reply {
        let mut call = self.call(Method::GET, "/orders").user(user);
        for (name, value) in query {
            call = call.query(name, value);
        }
        call.send().await
    }

    /// The order ids of every page of `GET /orders` (following `next_cursor`), in order.
    pub async fn list_all_ids(&self, user: &str, query: &[(&str, &str)]) -> Vec<String> {
        let mut ids = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let mut query: Vec<(&str, &str)> = query.to_vec();
            if let Some(cursor) = &cursor {
                query.push(("cursor", cursor));
            }
            let page = self.expect_json(&self.list(user, &query).await, 200, "GET /orders");
            ids.extend(order_ids(&page));
            match &page["next_cursor"] {
                Value::Null => return ids,
                Value::String(next) => cursor = Some(next.clone()),
                other => panic!("next_cursor is neither a string nor null: {other}"),
            }
        }
        panic!("GET /orders: more than 100 pages, is next_cursor advancing?");
    }

    pub async fn cancel(&self, user: &str, id: &str) -> Reply {
        self.call(Method::POST, &format!("/orders/{id}/cancel"))
            .user(user)
            .send()
            .await
    }

    /// `GET /diagnostic/heartbeat`, asserting 200.
    pub async fn heartbeat(&self) -> Value {
        let reply = self.call(Method::GET, "/diagnostic/heartbeat").send().await;
        self.expect_json(&reply, 200, "GET /diagnostic/heartbeat")
    }

    /// `GET /diagnostic/cluster`, asserting 200.
    pub async fn cluster(&self) -> Value {
        let reply = self.call(Method::GET, "/diagnostic/cluster").send().await;
        self.expect_json(&reply, 200, "GET /diagnostic/cluster")
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

/// A client without connection reuse: nodes get killed and restarted on the same port, and a
/// pooled connection to a dead process would fail the next request for the wrong reason.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("build the HTTP client")
}

/// A request being built against a node (see `Node::call`).
pub struct Call<'a> {
    node: &'a Node,
    method: Method,
    path: String,
    user: Option<String>,
    headers: Vec<(String, String)>,
    query: Vec<(String, String)>,
    body: Option<String>,
    bare: bool,
}

impl Call<'_> {
    /// Sets `Authorization: <user>` (the user id, verbatim).
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_string());
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn query(mut self, name: &str, value: &str) -> Self {
        self.query.push((name.to_string(), value.to_string()));
        self
    }

    /// The request body; sent with `Content-Type: application/json` unless a header sets another.
    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sends the body without any `Content-Type` header.
    pub fn without_content_type(mut self) -> Self {
        self.bare = true;
        self
    }

    /// Sends the request; `Err` only for transport errors (refused, reset, timeout).
    pub async fn try_send(self) -> Result<Reply, reqwest::Error> {
        let url = format!("{}{}", self.node.base, self.path);
        let mut request = self.node.client.request(self.method, url);
        if !self.query.is_empty() {
            request = request.query(&self.query);
        }
        if let Some(user) = &self.user {
            request = request.header("Authorization", user);
        }
        let has_content_type = self
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        if let Some(body) = self.body {
            if !has_content_type && !self.bare {
                request = request.header("Content-Type", "application/json");
            }
            request = request.body(body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await?;
        Ok(Reply {
            status,
            headers,
            text,
        })
    }

    /// Sends the request; a transport error fails the test (with the log tail).
    pub async fn send(self) -> Reply {
        let node = self.node;
        let what = format!("{} {}", self.method, self.path);
        self.try_send().await.unwrap_or_else(|error| {
            panic!("{what}: transport error: {error:?}\n{}", node.log_tail())
        })
    }
}

/// Pretty JSON for messages.
pub fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// The `order_id`s of a `GET /orders` page, in order.
pub fn order_ids(page: &Value) -> Vec<String> {
    page["orders"]
        .as_array()
        .unwrap_or_else(|| panic!("GET /orders: no \"orders\" array in {}", pretty(page)))
        .iter()
        .map(|order| {
            order["order_id"]
                .as_str()
                .unwrap_or_else(|| panic!("listed order without order_id: {order}"))
                .to_string()
        })
        .collect()
}

/// Parses an RFC 3339 time and asserts it is UTC.
pub fn utc_time(value: &Value, what: &str) -> DateTime<FixedOffset> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected an RFC 3339 string, got {value}"));
    let time = DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|error| panic!("{what}: {text:?} is not RFC 3339: {error}"));
    assert_eq!(
        time.offset().local_minus_utc(),
        0,
        "{what}: {text:?} is not UTC"
    );
    time
}

/// `Some(time)` if `object[key]` is present, `None` if the key is absent. A present `null` fails:
/// the API omits fields that are not set yet.
fn optional_time(object: &Value, key: &str, what: &str) -> Option<DateTime<FixedOffset>> {
    match object.get(key) {
        None => None,
        Some(Value::Null) => panic!("{what}: {key} is null; the API omits unset fields"),
        Some(value) => Some(utc_time(value, &format!("{what}.{key}"))),
    }
}

fn required_time(object: &Value, key: &str, what: &str) -> DateTime<FixedOffset> {
    optional_time(object, key, what).unwrap_or_else(|| panic!("{what}: {key} missing"))
}

fn steps(order: &Value) -> &Vec<Value> {
    order["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps array in {}", pretty(order)))
}

fn step_names(order: &Value) -> Vec<String> {
    steps(order)
        .iter()
        .map(|step| {
            step["step_name"]
                .as_str()
                .unwrap_or("<missing step_name>")
                .to_string()
        })
        .collect()
}

/// Asserts a successfully completed order: five steps in pipeline order, each started and
/// completed, times non-decreasing, `complete_time` set, `current_step` Completed, no failure,
/// nothing rolled back.
pub fn assert_completed(order: &Value) {
    let shown = pretty(order);
    assert_eq!(
        order["current_step"], "Completed",
        "current_step of a completed order:\n{shown}"
    );
    assert_eq!(
        step_names(order),
        COMPLETED_STEPS,
        "steps of a completed order:\n{shown}"
    );
    assert!(
        order.get("failure").is_none(),
        "a completed order has no failure field:\n{shown}"
    );

    let mut previous = utc_time(&order["start_time"], "start_time");
    for (index, step) in steps(order).iter().enumerate() {
        let what = format!("steps[{index}] ({})", step["step_name"]);
        let started = required_time(step, "step_start_time", &what);
        let completed = required_time(step, "step_complete_time", &what);
        assert!(
            step.get("step_rollback_time").is_none(),
            "{what} must not be rolled back:\n{shown}"
        );
        assert!(
            previous <= started,
            "{what} started before the previous time {previous}:\n{shown}"
        );
        assert!(
            started <= completed,
            "{what} completed before it started:\n{shown}"
        );
        previous = completed;
    }
    let complete_time = required_time(order, "complete_time", "order");
    assert!(
        previous <= complete_time,
        "complete_time is before the last step completed:\n{shown}"
    );
}

/// What `assert_rolled_back` found in a failed order.
pub struct Rollback {
    /// Forward steps that appear (a prefix of `FORWARD_STEPS`).
    pub forward: Vec<String>,
    /// Whether the last forward step has a `step_complete_time`.
    pub last_completed: bool,
    pub failure_step: String,
    pub failure_reason: String,
}

/// Asserts a failed (or cancelled) order's saga shape: a prefix of the forward steps, then one
/// `Failed` entry started and completed; every forward step rolled back, newest first and after
/// the `Failed` entry; `current_step` Failed; `complete_time` at or after the last rollback; a
/// `failure {step, reason}`. Every step before the last forward one completed normally.
pub fn assert_rolled_back(order: &Value) -> Rollback {
    let shown = pretty(order);
    assert_eq!(
        order["current_step"], "Failed",
        "current_step of a failed order:\n{shown}"
    );
    let names = step_names(order);
    assert!(
        names.len() >= 2,
        "a failed order has at least one forward step and Failed:\n{shown}"
    );
    let (failed_entry, forward_entries) = steps(order).split_last().expect("non-empty steps");
    let forward: Vec<String> = names[..names.len() - 1].to_vec();
    assert_eq!(
        names.last().map(String::as_str),
        Some("Failed"),
        "the last entry is Failed:\n{shown}"
    );
    assert!(
        forward.len() <= FORWARD_STEPS.len() && forward.iter().zip(FORWARD_STEPS).all(|(name, step)| name == step),
        "the entries before Failed must be a prefix of {FORWARD_STEPS:?}, got {forward:?}:\n{shown}"
    );

    // Forward path: started in order, all but the last completed.
    let mut previous = utc_time(&order["start_time"], "start_time");
    let mut last_completed = false;
    for (index, step) in forward_entries.iter().enumerate() {
        let what = format!("steps[{index}] ({})", step["step_name"]);
        let started = required_time(step, "step_start_time", &what);
        assert!(
            previous <= started,
            "{what} started before the previous time {previous}:\n{shown}"
        );
        previous = started;
        let completed = optional_time(step, "step_complete_time", &what);
        if index + 1 < forward_entries.len() {
            assert!(
                completed.is_some(),
                "{what} precedes the failed step so it completed:\n{shown}"
            );
        } else {
            last_completed = completed.is_some();
        }
        if let Some(completed) = completed {
            assert!(
                started <= completed,
                "{what} completed before it started:\n{shown}"
            );
            previous = completed;
        }
    }

    // The Failed entry: started and completed at once, after the forward path, never rolled back.
    let failed_started = required_time(failed_entry, "step_start_time", "Failed entry");
    let failed_completed = required_time(failed_entry, "step_complete_time", "Failed entry");
    assert!(
        previous <= failed_started,
        "the Failed entry started before the forward path ended:\n{shown}"
    );
    assert!(
        failed_started <= failed_completed,
        "the Failed entry completed before it started:\n{shown}"
    );
    assert!(
        failed_entry.get("step_rollback_time").is_none(),
        "the Failed entry is not rolled back:\n{shown}"
    );

    // Rollback: newest step first, so walking from the last forward step back to Scheduling the
    // rollback times never decrease, and the first rollback comes after the Failed entry.
    let mut previous_rollback = failed_completed;
    for (index, step) in forward_entries.iter().enumerate().rev() {
        let what = format!("steps[{index}] ({})", step["step_name"]);
        let rolled_back = required_time(step, "step_rollback_time", &what);
        assert!(
            previous_rollback <= rolled_back,
            "{what} rolled back at {rolled_back}, before the step after it / the Failed entry \
             ({previous_rollback}); rollback must go newest first:\n{shown}"
        );
        previous_rollback = rolled_back;
    }
    let complete_time = required_time(order, "complete_time", "order");
    assert!(
        previous_rollback <= complete_time,
        "complete_time is before the last rollback:\n{shown}"
    );

    let failure = order
        .get("failure")
        .unwrap_or_else(|| panic!("a failed order has a failure field:\n{shown}"));
    let failure_step = failure["step"]
        .as_str()
        .unwrap_or_else(|| panic!("failure.step is a string:\n{shown}"));
    let failure_reason = failure["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("failure.reason is a string:\n{shown}"));
    assert!(
        !failure_reason.trim().is_empty(),
        "failure.reason is empty:\n{shown}"
    );
    Rollback {
        forward,
        last_completed,
        failure_step: failure_step.to_string(),
        failure_reason: failure_reason.to_string(),
    }
}

/// Asserts an order that failed in step `step` (see `assert_rolled_back`): the steps end with
/// `step` (not completed) then Failed, and `failure.step` names it.
pub fn assert_failed_at(order: &Value, step: &str) {
    let shown = pretty(order);
    let rollback = assert_rolled_back(order);
    assert_eq!(
        rollback.forward.last().map(String::as_str),
        Some(step),
        "last forward step:\n{shown}"
    );
    assert!(
        !rollback.last_completed,
        "the failed step {step} must have no step_complete_time:\n{shown}"
    );
    assert_eq!(rollback.failure_step, step, "failure.step:\n{shown}");
}

impl Node {
    /// Sends a signal by name (`STOP`, `CONT`, `TERM`, …) with `kill -SIG pid`.
    pub fn signal(&self, name: &str) {
        let process = self
            .process
            .as_ref()
            .expect("signal() on a node that is not running");
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(process.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", process.pid());
    }

    /// True while the node's process runs.
    pub fn is_running(&mut self) -> bool {
        match self.process.as_mut() {
            Some(process) => process.try_exit().is_none(),
            None => false,
        }
    }
}
