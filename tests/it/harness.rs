//! The testkit bound to the binary under test: [`Node`] runs `order-process` (built by cargo
//! for these tests), plus what only these tests share: config snippets, user names, deadlines.

#![allow(dead_code)] // not every test module uses every helper

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};

pub use order_process_testkit::{
    free_port, order_ids, pretty, tail, Proc, RedisServer, Reply, POLL,
};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_order-process");

/// Default deadline for an order to reach a terminal state (generous: 2 loaded cores).
pub const TERMINAL: std::time::Duration = std::time::Duration::from_secs(20);

/// A `[simulate]` section: steps sleep `duration` and never fail at random.
pub fn simulate(duration: &str) -> String {
    format!("[simulate]\nduration = \"{duration}\"\nfailure_rate = 0.0\n")
}

/// A user name no other test uses, so tests sharing nothing still never see each other's orders.
pub fn unique_user(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A free loopback port; fails the test when there is none.
pub fn port() -> u16 {
    free_port().expect("a free loopback port")
}

/// Starts the binary with `args`, stdout and stderr appended to these files.
pub fn spawn(args: &[String], stdout: &Path, stderr: &Path) -> Proc {
    Proc::spawn(&PathBuf::from(BIN), args, stdout, stderr)
        .unwrap_or_else(|error| panic!("spawn {BIN}: {error}"))
}

/// A testkit node running the binary under test.
pub struct Node(order_process_testkit::Node);

impl Node {
    /// Starts the binary with `config` on a free port; returns once its heartbeat answers.
    pub async fn start(config: &str) -> Node {
        Node(order_process_testkit::Node::start(Path::new(BIN), config).await)
    }

    /// Starts the binary as [`start`](Node::start) does, with `env` added to its environment.
    pub async fn start_env(config: &str, env: &[(&str, &str)]) -> Node {
        Node(order_process_testkit::Node::start_env(Path::new(BIN), config, env).await)
    }

    /// Starts the binary as [`start`](Node::start) does, listening on `host` (a loopback
    /// address).
    pub async fn start_on(config: &str, host: std::net::IpAddr) -> Node {
        Node(order_process_testkit::Node::start_on(Path::new(BIN), config, host).await)
    }

    /// Starts the binary as [`start`](Node::start) does, with `service_id` as its node id.
    pub async fn start_as(config: &str, service_id: &str) -> Node {
        Node(order_process_testkit::Node::start_as(Path::new(BIN), config, service_id).await)
    }

    /// Starts the binary as [`start`](Node::start) does, serving https with a certificate
    /// signed by the CA in `ca_file`, which its requests trust.
    pub async fn start_https(config: &str, ca_file: &Path) -> Node {
        Node(order_process_testkit::Node::start_https(Path::new(BIN), config, ca_file, None).await)
    }

    /// Starts a node as [`start_https`](Node::start_https) does; requests show the client
    /// certificate `cert` with its key `key`.
    pub async fn start_mutual_tls(config: &str, ca_file: &Path, cert: &Path, key: &Path) -> Node {
        let identity = Some((cert, key));
        Node(
            order_process_testkit::Node::start_https(Path::new(BIN), config, ca_file, identity)
                .await,
        )
    }
}

impl Deref for Node {
    type Target = order_process_testkit::Node;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Node {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}
