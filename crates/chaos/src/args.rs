//! The flags of `order-process-chaos`.

use argh::FromArgs;
use std::path::PathBuf;

#[derive(FromArgs, Debug, Clone)]
/// Run a randomized fault campaign against a local 3-node order-process cluster and check
/// every order.
pub struct ChaosArgs {
    /// how long to make faults under load, e.g. 60s or 30m (then heal, wait, check)
    #[argh(option, default = "String::from(\"60s\")")]
    pub duration: String,
    /// seed of the fault schedule and of the orders (random when not given; always printed)
    #[argh(option)]
    pub seed: Option<u64>,
    /// orders submitted per second
    #[argh(option, default = "8.0")]
    pub rate: f64,
    /// single (the default: one redis-server), sentinel (a primary, two replicas and three
    /// sentinels; nodes with min_replicas = 2; adds the lose_redis_primary fault) or cluster (a
    /// Redis Cluster of three primaries with a replica each, on loopback with the nodes; adds
    /// kill_redis_primary in place of kill_redis)
    #[argh(option, default = "String::from(\"single\")")]
    pub redis: String,
    /// redis appendfsync: always (the default, what the guarantees rest on) or everysec
    #[argh(option, default = "String::from(\"always\")")]
    pub appendfsync: String,
    /// directory for the nodes' data and logs (default: a new one under the temp dir)
    #[argh(option)]
    pub workdir: Option<PathBuf>,
    /// keep the work directory even when the campaign passes
    #[argh(switch)]
    pub keep: bool,
    /// the order-process binary to run as nodes (default: the one next to this binary)
    #[argh(option)]
    pub bin: Option<PathBuf>,
    /// leave out the gossip partition (iptables) fault
    #[argh(switch)]
    pub no_partition: bool,
    /// run every process on loopback even where network namespaces can be made (which leaves
    /// out cut_redis, one_way_partition and lossy_link)
    #[argh(switch)]
    pub no_netns: bool,
    /// one fault at a time: each begins once the one before has healed and the cluster has been
    /// whole for a few seconds, so each takeover measures one fault alone
    #[argh(switch)]
    pub spaced: bool,
    /// serve the nodes' API over https, requiring client certificates (server.tls_client_ca):
    /// hand-overs, transfers and the campaign's own calls all go over mutual TLS
    #[argh(switch)]
    pub https: bool,
    /// leave out a kind of fault, e.g. --skip skew_clock or --skip cut_redis (repeatable)
    #[argh(option)]
    pub skip: Vec<String>,
}
