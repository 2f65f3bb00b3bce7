//! order-process-history: the rules of an order's step history as the order-process API shows
//! it in JSON (`GET /orders/{id}`, `POST /orders/wait`, `GET /orders`).
//!
//! It checks the public contract only: step names are the API's strings, times are RFC 3339 in
//! UTC. The load generator, the fault campaign and the integration tests all judge orders
//! with [`mod@check`].
//!
//! - [`check`](mod@check): the legal histories of completed, failed, cancelled and parked orders.
//! - [`time`]: the one RFC 3339 parser.
//! - [`examples`]: sample legal histories, for tests.

#![forbid(unsafe_code)]

pub mod check;
pub mod examples;
pub mod time;

pub use check::{check, End, Problem};

/// The steps that run a handler, in pipeline order.
pub const WORK_STEPS: [&str; 4] = [
    "Scheduling",
    "Pre-Processing",
    "Processing",
    "Post-Processing",
];

/// The step list of a completed order.
pub const COMPLETED_STEPS: [&str; 5] = [
    "Scheduling",
    "Pre-Processing",
    "Processing",
    "Post-Processing",
    "Completed",
];

/// The `failure.reason` of an order its user cancelled.
pub const CANCELLED: &str = "cancelled";
