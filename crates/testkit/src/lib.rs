//! order-process-testkit: real processes and real HTTP for testing order-process, shared by the
//! integration tests and the fault campaign. Nothing here is mocked: the binary runs as a child
//! process, `redis-server` is the real one, the fake shop is a real warp server on loopback.
//!
//! - [`ports`]: loopback ports free for both TCP and UDP.
//! - [`poll`]: waiting for a condition with a deadline.
//! - [`process`]: a child process killed by pid when dropped, signals by name.
//! - [`redis`]: a `redis-server` on a free port, killed and started again at will.
//! - [`redis_cluster`]: a Redis Cluster of such servers, primaries killed and slots moved at will.
//! - [`node`]: the order-process binary on a free port with its own directory.
//! - [`api`]: the requests tests make of a node's API, asserting the status they expect.
//! - [`http`]: a request builder, the answer it reads, JSON helpers for messages.
//! - [`shop`]: the fake shop the nodes' `http` steps call, scripted or driven by a handler.
//!
//! The test-facing helpers ([`node::Node`], [`redis::RedisServer::start`]) fail the test with a
//! panic naming the log; the `try_` forms return errors for callers that must not panic.

#![forbid(unsafe_code)]

pub mod api;
pub mod http;
pub mod node;
pub mod poll;
pub mod ports;
pub mod process;
pub mod redis;
pub mod redis_cluster;
pub mod shop;

pub use http::{order_ids, pretty, Call, Reply};
pub use node::Node;
pub use poll::POLL;
pub use ports::free_port;
pub use process::{signal, tail, Proc};
pub use redis::RedisServer;
pub use redis_cluster::RedisCluster;
pub use shop::{Answer, Request, Scripted, Shop, ShopCall};
