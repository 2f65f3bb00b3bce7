//! The gossip keys every node publishes, in one place, and typed accessors to read them.

use chitchat::NodeState;
use std::net::SocketAddr;

/// The node's HTTP address (`host:port`); gossip runs over UDP on the same port.
pub const HTTP_ADDR: &str = "http_addr";
/// The node's version.
pub const VERSION: &str = "version";
/// Orders executing on the node now.
pub const INFLIGHT: &str = "inflight";
/// When the node started, RFC 3339.
pub const STARTED_AT: &str = "started_at";
/// Set while the node drains before exiting: peers stop counting it as live at once.
pub const LEAVING: &str = "leaving";
/// `lost` while the node cannot renew its liveness lease, `held` once it can again: a leader
/// that sees the lease expired need not wait `cluster.takeover_after` for such a node.
pub const LEASE: &str = "lease";

/// Typed reads of a peer's gossip state.
pub trait NodeStateExt {
    fn http_addr(&self) -> Option<SocketAddr>;
    fn version(&self) -> Option<&str>;
    fn inflight(&self) -> usize;
    fn started_at(&self) -> Option<&str>;
    fn is_leaving(&self) -> bool;
    fn lease_lost(&self) -> bool;
}

impl NodeStateExt for NodeState {
    fn http_addr(&self) -> Option<SocketAddr> {
        self.get(HTTP_ADDR)?.parse().ok()
    }

    fn version(&self) -> Option<&str> {
        self.get(VERSION)
    }

    fn inflight(&self) -> usize {
        self.get(INFLIGHT)
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    }

    fn started_at(&self) -> Option<&str> {
        self.get(STARTED_AT)
    }

    fn is_leaving(&self) -> bool {
        self.get(LEAVING).is_some()
    }

    fn lease_lost(&self) -> bool {
        self.get(LEASE) == Some("lost")
    }
}
