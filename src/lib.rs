//! order-process: a clustered order-processing service.
//!
//! # Layout
//!
//! - [`config`]: one `Config` from TOML and flags, validated once.
//! - [`order`]: the order model, the pure state machine and the JSON views.
//! - [`store`]: the `OrderStore` trait and its embedded and Redis implementations.
//! - [`pipeline`]: the bounded worker pool, the executor that drives an order to a terminal
//!   state, and the step handlers.
//! - [`api`]: the warp routes, who may call them (`auth`) and what a client may cost (`limits`),
//!   the connection server (`serve`), and the one place errors become JSON replies; the OpenAPI
//!   description and the status page are files served from the binary.
//! - [`metrics`]: the Prometheus metrics and the in-memory summary of this node's orders.
//! - [`cluster`]: gossip membership, the leader lease and the takeover of dead nodes' orders.
//! - [`node`]: wires the above into a running node and owns its shutdown.
//!
//! The tools around the service are crates of their own in `crates/`: the load generator behind
//! `order-process bench`, the history checker, the test kit and the fault campaign.

#![forbid(unsafe_code)]

pub mod api;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod node;
pub mod order;
pub mod pipeline;
pub mod store;
