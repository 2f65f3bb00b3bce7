//! Sample histories as the API shows them, one second apart from 2026-01-01T00:00:00Z: a
//! completed order and one failed at Processing and rolled back. For tests that need a legal
//! history to start from.

use serde_json::{json, Value};

/// `2026-01-01T00:00:{second}Z`.
pub fn at(second: u32) -> String {
    format!("2026-01-01T00:00:{second:02}Z")
}

/// One step entry; the times are seconds.
pub fn entry(name: &str, start: u32, complete: Option<u32>, rollback: Option<u32>) -> Value {
    let mut value = json!({"step_name": name, "step_start_time": at(start)});
    if let Some(second) = complete {
        value["step_complete_time"] = at(second).into();
    }
    if let Some(second) = rollback {
        value["step_rollback_time"] = at(second).into();
    }
    value
}

/// An order that went through every step, one a second.
pub fn completed() -> Value {
    json!({
        "current_step": "Completed",
        "start_time": at(0),
        "complete_time": at(4),
        "steps": [
            entry("Scheduling", 0, Some(1), None),
            entry("Pre-Processing", 1, Some(2), None),
            entry("Processing", 2, Some(3), None),
            entry("Post-Processing", 3, Some(4), None),
            entry("Completed", 4, Some(4), None),
        ]
    })
}

/// An order that failed at Processing for `reason` and rolled back its three steps.
pub fn failed_at_processing(reason: &str) -> Value {
    json!({
        "current_step": "Failed",
        "start_time": at(0),
        "complete_time": at(9),
        "failure": {"step": "Processing", "reason": reason},
        "rollback_state": "complete",
        "steps": [
            entry("Scheduling", 0, Some(1), Some(9)),
            entry("Pre-Processing", 1, Some(2), Some(8)),
            entry("Processing", 2, None, Some(7)),
            entry("Failed", 3, Some(3), None),
        ]
    })
}
