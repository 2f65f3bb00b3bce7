//! order-process: a clustered order-processing service.
//!
//! # Layout
//!
//! - [`about`]: the service's name and version.
//! - [`config`]: one `Config` from TOML and flags, validated once.
//! - [`order`]: the order model, the pure state machine and the JSON views.
//! - [`store`]: the `OrderStore` trait and its embedded and Redis implementations.
//! - [`pipeline`]: the bounded worker pool, the executor that drives an order to a terminal
//!   state (each in a file of its own, unit-tested against an in-memory store), the liveness
//!   gate, and the step handlers.
//! - [`service`]: the application layer: what each order operation does and in which order
//!   (idempotency, per-user cap, queue before store), and the long polls; no HTTP.
//! - [`api`]: the warp routes, who may call them (`auth`) and what a client may cost (`limits`),
//!   the connection server (`serve`), and the one place errors become JSON replies; the OpenAPI
//!   description and the console are files served from the binary.
//! - [`secret`]: the constant-time comparison of secrets.
//! - [`crypto`]: the one TLS crypto provider, for every connection.
//! - [`trace`]: W3C trace context kept with each order and passed on every step call; the
//!   order's log span; spans exported over OTLP/HTTP when configured.
//! - [`metrics`]: the Prometheus metrics and the in-memory summary of this node's orders.
//! - [`flow`]: this node's orders per second and step latencies of the last 15 minutes, in a
//!   bounded ring whose histograms merge exactly across nodes.
//! - [`cluster`]: gossip membership; the node registry, the liveness and leader leases behind
//!   `Coordinator`; and the takeover of dead nodes' orders.
//! - [`node`]: wires the above into a running node and owns its shutdown.
//!
//! The tools around the service are crates of their own in `crates/`: the load generator behind
//! `order-process bench`, the history checker, the test kit and the fault campaign.

#![forbid(unsafe_code)]

pub mod about;
pub mod api;
pub mod cluster;
pub mod config;
pub mod crypto;
pub mod flow;
pub mod metrics;
pub mod node;
pub mod order;
pub mod pipeline;
pub mod secret;
pub mod service;
pub mod store;
pub mod trace;
