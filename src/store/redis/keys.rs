//! The Redis key layout, all keys under `op:`. Order storage:
//!
//! - `op:order:{id}`: hash with `doc` (the order JSON), `owner`, `epoch`, `user`, `cancel`,
//!   `state` (`forward`, `rolling_back`, `finished`) and `step`. `owner`, `epoch` and `cancel`
//!   in the hash are the truth; the copies inside `doc` are refreshed on read.
//! - `op:owned:{node}`: set of the node's unfinished orders.
//! - `op:user:{user}`: sorted set (all scores 0) of `{created µs, 20 digits}-{id}`, for listing.
//! - `op:idem:{user}:{key}`: the order an idempotency key created, expiring after 24 h, or
//!   with the order if that comes first (the order hash names it in `idem`).
//! - `op:finished`: sorted set of `{id} {user index member} {user}` scored with when that
//!   finished order expires (ms, Redis's clock): what the retention pass takes user index
//!   entries out by. A finished order's hash expires `orders.retention` after it finished.
//! - `op:parked`: sorted set (all scores 0) of the ids of orders whose rollback is parked,
//!   kept by the scripts that finish, re-open and expire an order.
//! - `op:aside`: hash order id → why it was set aside (JSON), for orders whose record cannot be
//!   read; they are in no owned set.
//!
//! Cluster coordination:
//!
//! - `op:nodes`: hash node id → HTTP address of every node that ever started.
//! - `op:alive:{node}`, `op:leader`, `op:leader:fence`: the liveness and leader leases.
//! - `op:alive:until`: hash node id → when its liveness lease as last renewed expires, in ms of
//!   Redis's clock, so any leader can tell how long a lease has been expired.
//! - `op:probe`: written by health checks, so they see a Redis that answers but refuses writes.

/// Every registered node and its HTTP address.
pub(crate) const NODES: &str = "op:nodes";
/// Hash node id → when its liveness lease, as last renewed, expires (ms, Redis's clock).
pub(crate) const ALIVE_UNTIL: &str = "op:alive:until";
/// The leader lease: `{node}:{term id}` of the holder.
pub(crate) const LEADER: &str = "op:leader";
/// The latest fencing token, one per leader term.
pub(crate) const LEADER_FENCE: &str = "op:leader:fence";
/// What health checks write, with a short expiry.
pub(crate) const PROBE: &str = "op:probe";
/// The orders set aside because their record cannot be read.
pub(crate) const ASIDE: &str = "op:aside";
/// The orders whose rollback is parked.
pub(crate) const PARKED: &str = "op:parked";
/// What a `SCAN` for every order hash matches.
pub(crate) const ORDER_PATTERN: &str = "op:order:*";
/// What an order hash's key is its id prefixed with.
pub(crate) const ORDER_PREFIX: &str = "op:order:";
/// Finished orders by when they expire.
pub(crate) const FINISHED: &str = "op:finished";
/// What a user index's key is the user prefixed with.
pub(crate) const USER_PREFIX: &str = "op:user:";

pub(crate) fn order_key(id: &str) -> String {
    format!("{ORDER_PREFIX}{id}")
}

/// What a node's owned set's key is its id prefixed with.
pub(crate) const OWNED_PREFIX: &str = "op:owned:";

pub(crate) fn owned_key(node: &str) -> String {
    format!("{OWNED_PREFIX}{node}")
}

pub(crate) fn user_key(user: &str) -> String {
    format!("{USER_PREFIX}{user}")
}

pub(crate) fn idem_key(user: &str, key: &str) -> String {
    format!("op:idem:{user}:{key}")
}

pub(crate) fn alive_key(node: &str) -> String {
    format!("op:alive:{node}")
}
