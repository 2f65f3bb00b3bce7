//! order-process-bench: `order-process bench`, a load generator that drives running nodes over
//! HTTP, learns when orders finish through batched long polls (`POST /orders/wait`, one request
//! per batch of up to `--batch` orders), checks every order's step history with
//! `order-process-history`, and reports throughput, latency, errors and CPU.
//!
//! It speaks only the public HTTP API, so it does not depend on the service library.
//!
//! - [`args`]: the flags.
//! - [`run`](mod@run): submitters, long-poll waiters and the verdict on each order.
//! - [`summary`]: what a run measured, printed as text or JSON.
//! - [`progress`]: the progress line while a run goes.
//! - [`cpu`]: CPU time of processes, from `/proc`.
//! - [`http`]: the HTTP client.

#![forbid(unsafe_code)]

pub mod args;
pub mod cpu;
pub mod http;
pub mod progress;
pub mod run;
pub mod summary;

pub use args::BenchArgs;
pub use run::run;
pub use summary::{Percentiles, Summary};

use std::process::ExitCode;

/// Runs the bench; the exit code is 0 only when nothing was lost or wrong.
pub fn main(args: BenchArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("order-process bench: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args.clone())) {
        Ok(summary) => {
            if args.json {
                match serde_json::to_string_pretty(&summary) {
                    Ok(text) => println!("{text}"),
                    Err(error) => eprintln!("order-process bench: {error}"),
                }
            } else {
                summary.print();
            }
            if summary.lost == 0 && summary.mismatches == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("order-process bench: {error}");
            ExitCode::from(64)
        }
    }
}
