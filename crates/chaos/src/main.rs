//! order-process-chaos: a randomized fault campaign against a live local cluster.
//!
//! It starts a `redis-server` (append-only file on), the [`ledger`] (an HTTP service playing
//! the shop, whose books record every effect and compensation by idempotency key) and three
//! order-process nodes whose four steps call the ledger over HTTP. While a steady stream of
//! orders flows in (some refused by the ledger at a chosen step, some slow, some cancelled
//! midway) it makes faults at random from a printed seed: SIGKILL of a node or of the leader,
//! SIGSTOP past the liveness lease, Redis SIGKILL and restart, Redis SIGSTOP, a partition
//! (iptables), rolling restarts, a duplicate of a node from a copy of its data dir, a node with
//! a skewed clock, a takeover interrupted, and clients that hang up before the answer. Each node
//! and Redis run in a network namespace of their own where it can, and then it also cuts a node
//! from Redis, partitions one way, and drops packets at random on a node's link. Then it heals
//! everything, waits for quiescence and checks every order the API accepted against its history,
//! the ledger and the nodes' logs. The exit code is 0 only when nothing was lost, duplicated or
//! corrupted.
//!
//! - [`args`]: the flags.
//! - [`campaign`]: the campaign from start to verdict.
//! - [`world`]: the processes (Redis, the nodes) and what the cluster says about itself.
//! - [`netns`]: hosts in network namespaces on a bridge (`scripts/netns`), when they can be made.
//! - [`redis`]: one Redis, or a primary, two replicas and three sentinels (`--redis sentinel`).
//! - [`links`]: faults on a node's links made with iptables: partitions (gossip ports on
//!   loopback; by address in namespaces), one-way partitions, a cut from Redis, packet loss.
//! - [`faults`]: the kinds of fault, their record and their recovery.
//! - [`schedule`]: which fault when, made on which victim, and healed.
//! - [`duplicate`]: a second process from a copy of a live node's data dir.
//! - [`clock`]: a node's wall clock skewed with libfaketime.
//! - [`settle`]: after the last heal, every stored order finished within a bound.
//! - [`load`]: the orders submitted, cancelled and watched while the faults go on.
//! - [`ledger`]: the shop and its books.
//! - [`checks`]: the pure checks of histories, effects and snapshots.
//! - [`logs`]: the nodes' structured logs, read back.
//! - [`report`]: the summary and the violations.

#![forbid(unsafe_code)]

mod args;
mod campaign;
mod checks;
mod clock;
mod duplicate;
mod faults;
mod ledger;
mod links;
mod load;
mod logs;
mod netns;
mod redis;
mod report;
mod schedule;
mod settle;
mod world;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: args::ChaosArgs = argh::from_env();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("order-process-chaos: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let terminate = async {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut stream) => {
                    stream.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            code = campaign::run(args) => code,
            // Dropping the campaign kills every process it started and removes its rules.
            _ = tokio::signal::ctrl_c() => {
                eprintln!("chaos: interrupted, stopping everything");
                ExitCode::FAILURE
            }
            _ = terminate => {
                eprintln!("chaos: terminated, stopping everything");
                ExitCode::FAILURE
            }
        }
    })
}
