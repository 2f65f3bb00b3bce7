//! Integration tests for the `order-process` binary.
//!
//! One test binary (ripgrep style): every module below starts the real binary as a child
//! process on a free loopback port with its own temporary data directory, and talks to it over
//! real HTTP. `util` holds the process harness, the HTTP helpers and the shared order checks.
//!
//! Layout:
//! - `util`       — `Node` (start / restart / kill / term / wait_exit / Drop), HTTP helpers, checks
//! - `api`        — input validation, auth, idempotency, user isolation, listing, overload (503)
//! - `pipeline`   — completed orders, deterministic failures with rollback, cancellation
//! - `restart`    — SIGKILL and restart on the same data dir, SIGTERM drain
//! - `config`     — bad config files and flags, port already in use
//! - `diagnostic` — `/`, heartbeat and cluster views
//! - `http_steps` — the `http` step handler against a fake shop: calls, retries, timeouts,
//!   outputs, parked rollbacks, restarts between attempts
//! - `metrics`    — `/metrics` counters, `/diagnostic/summary`, `/openapi.json` against the router
//! - `status_page` — the HTML status page in headless Chromium (skipped without Chromium)
//! - `security`   — tokens, roles, SIGHUP reload, rate and in-flight limits, slow clients
//! - `service`    — the cluster-internal view of the orders a node owns

mod util;

mod api;
mod config;
mod diagnostic;
mod http_steps;
mod metrics;
mod pipeline;
mod restart;
mod security;
mod status_page;

mod bench;
mod cluster;
mod redis;
mod service;
mod store;
