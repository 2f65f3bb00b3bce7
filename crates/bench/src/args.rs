//! The flags of `order-process bench`.

use argh::FromArgs;

#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "bench")]
/// drive running nodes with orders; report throughput, latency and any lost or wrong order
pub struct BenchArgs {
    /// base URL of a node (repeatable; orders go round-robin): http:// or https://; default
    /// http://127.0.0.1:8080
    #[argh(option)]
    pub url: Vec<String>,
    /// PEM file of a CA to trust, besides the system's roots, for https:// nodes
    #[argh(option)]
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate shown to https:// nodes that ask for one (with --client-key)
    #[argh(option)]
    pub client_cert: Option<std::path::PathBuf>,
    /// PEM private key of --client-cert
    #[argh(option)]
    pub client_key: Option<std::path::PathBuf>,
    /// how many orders to submit
    #[argh(option, default = "1000")]
    pub orders: usize,
    /// submissions in flight at once
    #[argh(option, default = "64")]
    pub concurrency: usize,
    /// open-loop arrival rate in orders per second (default: as fast as concurrency allows)
    #[argh(option)]
    pub rate: Option<f64>,
    /// fraction of orders that fail on purpose at a random step
    #[argh(option, default = "0.0")]
    pub fail_rate: f64,
    /// bytes of padding in each order's payload (a "pad" string), to measure orders of a
    /// realistic size; 0: none
    #[argh(option, default = "0")]
    pub payload_bytes: usize,
    /// how long to wait for all orders to finish, e.g. 120s
    #[argh(option, default = "String::from(\"120s\")")]
    pub timeout: String,
    /// long polls in flight at once, each waiting for a batch of orders to finish
    #[argh(option, default = "16")]
    pub waiters: usize,
    /// orders named in one long poll (POST /orders/wait)
    #[argh(option, default = "100")]
    pub batch: usize,
    /// user name the orders are submitted as
    #[argh(option, default = "String::from(\"bench\")")]
    pub user: String,
    /// spread the orders over this many users (USER-0, USER-1, ...), so per-user limits do not
    /// shape the test (header auth only); 1: all as USER
    #[argh(option, default = "1")]
    pub users: usize,
    /// pid of a server process whose CPU time counts in the report (repeatable)
    #[argh(option)]
    pub pid: Vec<u32>,
    /// print the summary as JSON
    #[argh(switch)]
    pub json: bool,
}
