//! [`Coordinator`]: what the nodes of a cluster agree on through a shared store, apart from the
//! orders themselves: which nodes exist, which are alive (liveness leases), and which one leads
//! (the leader lease and its fencing tokens).

use crate::store::StoreError;
use async_trait::async_trait;
use std::time::Duration;

/// A registered node's state as the shared store sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// Whether its liveness lease is held.
    pub alive: bool,
    /// How many unfinished orders it owns.
    pub owned: usize,
    /// How long its lease has been expired, by the store's clock, when the store can tell.
    pub lapsed: Option<Duration>,
}

/// A node's liveness lease: the node, the process that holds the lease for it
/// (`{node}:{generation}`), and the node's HTTP address, registered again with each renewal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Liveness {
    pub node: String,
    pub holder: String,
    pub http_addr: String,
}

/// What a liveness renewal found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// This process holds the lease, until the ttl from the renewal.
    Held,
    /// This process took the lease afresh, until the ttl from the renewal: it was free (never
    /// taken, or gone from the store: expired by the store's clock, or deleted), so a lease
    /// this process held before was lost, whatever its own clock says.
    Taken,
    /// Another process holds the lease of this node id (named by its holder): this one must
    /// start no step for the node until that lease has expired.
    HeldBy(String),
}

/// What an attempt at the leader lease found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// Taken, with this fencing token.
    Term(u64),
    /// Another holds it, for this long yet by the store's clock.
    HeldFor(Duration),
}

impl Acquired {
    /// The fencing token, when the lease was taken.
    pub fn token(self) -> Option<u64> {
        match self {
            Acquired::Term(token) => Some(token),
            Acquired::HeldFor(_) => None,
        }
    }
}

/// The leader lease as the shared store sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leader {
    /// `{node}:{term id}` of the holder; none while nobody leads.
    pub holder: Option<String>,
    /// The latest fencing token handed out; a leader's requests with an older one are stale.
    pub fence: u64,
}

impl Leader {
    /// The node that holds the lease.
    pub fn node(&self) -> Option<&str> {
        self.holder
            .as_deref()
            .and_then(|holder| holder.rsplit_once(':'))
            .map(|(node, _)| node)
    }
}

#[async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// Registers a node and its HTTP address, so the leader can find its orders if it dies.
    async fn register_node(&self, node: &str, http_addr: &str) -> Result<(), StoreError>;

    /// Every node registered, with its HTTP address.
    async fn known_nodes(&self) -> Result<Vec<(String, String)>, StoreError>;

    /// Takes a node out of the registry (a dead node that owns nothing), and notes it among
    /// the [`forgotten_nodes`](Coordinator::forgotten_nodes).
    async fn forget_node(&self, node: &str) -> Result<(), StoreError>;

    /// The nodes forgotten in the last hour: an order can still land as one's own (a create
    /// sent before it died, delayed on a bad link), and the sweep then registers it again.
    async fn forgotten_nodes(&self) -> Result<Vec<String>, StoreError>;

    /// Puts a node that owns orders back in the registry, with no address, unless it is there:
    /// the sweep then looks at it like any other. For an owner the registry lost.
    async fn remember_node(&self, node: &str) -> Result<bool, StoreError>;

    /// The status of each of `nodes`, in the same order.
    async fn node_status(&self, nodes: &[String]) -> Result<Vec<NodeStatus>, StoreError>;

    /// For each of `nodes`, in the same order, how long its liveness lease has been expired by
    /// the store's clock (none while held, or when the store cannot tell): the leases of
    /// [`node_status`](Coordinator::node_status) without counting owned orders.
    async fn lease_lapses(&self, nodes: &[String]) -> Result<Vec<Option<Duration>>, StoreError>;

    /// Takes or renews a node's liveness lease for `ttl` unless another process holds it, and
    /// registers the node with its HTTP address in the same step: a node the leader forgot while
    /// it looked dead (paused, say) is known again from its next renewal on, so its orders are
    /// taken over if it dies later.
    async fn renew_alive(&self, lease: &Liveness, ttl: Duration) -> Result<Renewal, StoreError>;

    /// Gives up a node's liveness lease, if its holder still holds it.
    async fn release_alive(&self, lease: &Liveness) -> Result<(), StoreError>;

    /// Whether a node's liveness lease is held.
    async fn is_alive(&self, node: &str) -> Result<bool, StoreError>;

    /// Tries to take the leader lease for `ttl`: its fencing token on success, or how long the
    /// current holder's lease still runs.
    async fn acquire_leader(&self, holder: &str, ttl: Duration) -> Result<Acquired, StoreError>;

    /// Extends the leader lease if `holder` still has it; false when it was lost.
    async fn renew_leader(&self, holder: &str, ttl: Duration) -> Result<bool, StoreError>;

    /// Gives up the leader lease, if `holder` still holds it.
    async fn release_leader(&self, holder: &str) -> Result<(), StoreError>;

    /// The current leader lease holder and the latest fencing token.
    async fn leader(&self) -> Result<Leader, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::Leader;

    #[test]
    fn the_leader_node_is_the_holder_without_its_term() {
        let leader = Leader {
            holder: Some("2f1c0a9e-node:5d1e".into()),
            fence: 3,
        };
        assert_eq!(leader.node(), Some("2f1c0a9e-node"));
        assert_eq!(Leader::default().node(), None);
        let odd = Leader {
            holder: Some("no-term".into()),
            fence: 1,
        };
        assert_eq!(odd.node(), None);
    }
}
