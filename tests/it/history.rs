//! Assertions on the orders the tests read, on top of `order-process-history`: the history
//! crate says whether a finished order's history is legal, these say which ending a test
//! expected, and fail with the whole order pretty-printed.

#![allow(dead_code)] // not every test module uses every helper

use chrono::{DateTime, FixedOffset};
use order_process_history::{check, End, WORK_STEPS};
use serde_json::Value;

use crate::harness::pretty;

/// The forward steps, in pipeline order.
pub const FORWARD_STEPS: [&str; 4] = WORK_STEPS;

/// Parses an RFC 3339 time and asserts it is UTC.
pub fn utc_time(value: &Value, what: &str) -> DateTime<FixedOffset> {
    order_process_history::time::utc(value).unwrap_or_else(|problem| panic!("{what}: {problem}"))
}

/// Asserts a finished order on a legal history and returns how it ended.
fn legal(order: &Value) -> End {
    check(order).unwrap_or_else(|problem| panic!("{problem}:\n{}", pretty(order)))
}

/// Asserts a successfully completed order: five steps in pipeline order, each started and
/// completed, times non-decreasing, `complete_time` set, no failure, nothing rolled back.
pub fn assert_completed(order: &Value) {
    let end = legal(order);
    assert_eq!(end, End::Completed, "not completed:\n{}", pretty(order));
}

/// What `assert_rolled_back` found in a failed order.
pub struct Rollback {
    /// Forward steps that appear (a prefix of `FORWARD_STEPS`).
    pub forward: Vec<String>,
    /// Whether the last forward step has a `step_complete_time`.
    pub last_completed: bool,
    pub failure_step: String,
    pub failure_reason: String,
}

/// Asserts a failed (or cancelled) order on a legal history with its rollback complete: a
/// prefix of the forward steps, then one `Failed` entry; every forward step rolled back newest
/// first, after the `Failed` entry; `complete_time` at or after the last rollback.
pub fn assert_rolled_back(order: &Value) -> Rollback {
    let shown = pretty(order);
    let (step, reason) = match legal(order) {
        End::Failed {
            step,
            reason,
            parked: false,
        } => (step, reason),
        other => panic!("not failed and rolled back ({other:?}):\n{shown}"),
    };
    let steps = order["steps"].as_array().cloned().unwrap_or_default();
    let forward: Vec<String> = steps[..steps.len() - 1]
        .iter()
        .map(|entry| entry["step_name"].as_str().unwrap_or_default().to_string())
        .collect();
    let last_completed = steps
        .len()
        .checked_sub(2)
        .is_some_and(|last| steps[last].get("step_complete_time").is_some());
    Rollback {
        forward,
        last_completed,
        failure_step: step.to_string(),
        failure_reason: reason,
    }
}

/// Asserts an order that failed in step `step` (see `assert_rolled_back`): the steps end with
/// `step` (not completed) then Failed, and `failure.step` names it.
pub fn assert_failed_at(order: &Value, step: &str) {
    let shown = pretty(order);
    let rollback = assert_rolled_back(order);
    assert_eq!(
        rollback.forward.last().map(String::as_str),
        Some(step),
        "last forward step:\n{shown}"
    );
    assert!(
        !rollback.last_completed,
        "the failed step {step} must have no step_complete_time:\n{shown}"
    );
    assert_eq!(rollback.failure_step, step, "failure.step:\n{shown}");
}
