//! The Redis store, for clusters: every node reads and writes the same Redis.
//!
//! - [`access`]: the URL, ACL user and password, and TLS files a node connects with.
//! - [`Connections`]: the connections every Redis user of a node shares (to one address, to
//!   the primary Redis Sentinel names, or to a Redis Cluster), and the one way to send a request on them.
//! - [`checks`]: the primaries' replication, persistence and eviction, checked before a node
//!   starts and while it runs.
//! - [`keys`]: the key layout, order storage and cluster coordination alike.
//! - [`RedisStore`]: the [`OrderStore`](super::OrderStore) on Redis, its Lua scripts in
//!   `scripts`, its group commit in `commits`, the split form of orders in `split`. The
//!   cluster's coordinator shares its connections.
//!
//! Every change to an order is one Lua script that writes only if the caller still owns it (owner
//! and epoch compare-and-set) and changes the order's index entries (owned sets, user and state
//! indexes, idempotency key) in the same atomic step, so no failure between calls leaves an index that
//! disagrees with the order. [`OrderStore::repair_indexes`](super::OrderStore::repair_indexes)
//! still rebuilds them from the order hashes.

pub mod access;
pub mod checks;
mod commits;
mod conn;
pub mod keys;
mod link;
mod orders;
mod scripts;
mod split;

pub use conn::Connections;
pub use orders::RedisStore;
