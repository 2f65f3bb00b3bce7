//! Integration tests for the `order-process` binary.
//!
//! One test binary (ripgrep style): every test starts the real binary as a child process on a
//! free loopback port with its own temporary data directory (`order-process-testkit`), and
//! talks to it over real HTTP; cluster and store tests start their own `redis-server`.
//!
//! Layout:
//! - `harness`    — the testkit bound to the binary under test; config snippets, user names
//! - `history`    — assertions on orders' endings, on top of `order-process-history`
//! - `api`        — input validation, auth, idempotency, user isolation, listing, overload (503)
//! - `pipeline`   — completed orders, deterministic failures with rollback, cancellation
//! - `restart`    — SIGKILL and restart on the same data dir, SIGTERM drain
//! - `config`     — bad config files and flags, port already in use
//! - `diagnostic` — `/`, heartbeat and cluster views
//! - `faketime`   — a node under libfaketime, its wall clock stepped by the test
//! - `full_disk`  — a full disk (a tmpfs, as root) under the embedded store (its file reopened
//!   once there is room) and under Redis (exiting with `appendfsync always`, refusing writes
//!   with `everysec`)
//! - `http_steps` — the `http` step handler against the scripted shop: calls, retries,
//!   timeouts, outputs, parked rollbacks, restarts between attempts, a clock stepped back,
//!   a node paused with orders queued
//! - `http_services` — https steps with a private CA and a client certificate, busy answers
//!   with `Retry-After`, a step's `concurrency`, the `Order-Epoch` header
//! - `https`      — the API over https: a new certificate on SIGHUP, hand-overs between nodes
//! - `trace`      — W3C traceparent kept with orders, passed on step calls, in log lines; spans
//!   exported to an OTLP/HTTP receiver
//! - `readme`     — the README's API examples sent as written to a live node, answers compared;
//!   its worked example's step calls against a scripted service
//! - `metrics`    — `/metrics` counters, `/diagnostic/summary`, `/openapi.json` against the router
//! - `console`    — the web console in headless Chromium over the DevTools protocol, against
//!   three nodes: charts, an order's story, a parked rollback retried with a click (skipped
//!   without Chromium)
//! - `security`   — tokens, roles, SIGHUP reload, rate and in-flight limits, slow clients
//! - `service`    — the cluster-internal view of the orders a node owns
//! - `bench`      — `order-process bench` against a real node; long polls
//! - `cluster`    — three nodes on one Redis: takeover, leases, fencing, drains
//! - `stuck`      — no order stuck: lost answers, timed-out creates, one process per node id,
//!   a Redis that refuses writes
//! - `store`      — the Redis store under a real `redis-server`: crashes, timeouts, lost replies
//! - `takeover`   — takeovers that fail part-way, and the takeover bound when gossip is wrong
//! - `proxy`      — a TCP proxy in front of Redis that cuts connections and loses replies
//! - `sentinel`   — a Sentinel failover followed without a restart, replicated acknowledgements
//!   (`min_replicas`), start-up refusal on a Redis weaker than the config

#![forbid(unsafe_code)]

mod harness;
mod history;
mod proxy;

mod api;
mod config;
mod diagnostic;
mod faketime;
mod full_disk;
mod http_services;
mod http_steps;
mod https;
mod metrics;
mod pipeline;
mod readme;
mod restart;
mod security;
mod trace;

mod bench;
mod cluster;
mod console;
mod redis_cluster;
mod redis_tls;
mod sentinel;
mod service;
mod store;
mod stuck;
mod takeover;
mod webhook;
