//! The legal histories of a finished order.
//!
//! A completed order went through the four work steps and `Completed`, each started and
//! completed in turn, nothing rolled back. A failed (or cancelled) order went through a prefix of
//! the work steps, the last of them without a completion time (unless a cancellation stopped the
//! order right after it completed), then a `Failed` entry; every started step is then rolled
//! back newest first, after the `Failed` entry, and the order finishes after the last rollback.
//! A parked order (`rollback_state: "incomplete"`) has rolled back only its newest steps so far.

use crate::time::utc;
use crate::{CANCELLED, COMPLETED_STEPS, WORK_STEPS};
use chrono::{DateTime, FixedOffset};
use serde_json::Value;

/// How a legal finished history ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    Completed,
    /// Failed at `step` (one of [`WORK_STEPS`]) for `reason`.
    Failed {
        step: &'static str,
        reason: String,
        /// The rollback stopped at a compensation that kept failing (`rollback_state:
        /// "incomplete"`); the older steps are still to be undone.
        parked: bool,
    },
}

impl End {
    /// True when the order failed because its user cancelled it.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, End::Failed { reason, .. } if reason == CANCELLED)
    }
}

/// What is wrong with a history: a kind (`unfinished`, `illegal_history`) and the detail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub kind: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}: {}", self.kind, self.detail)
    }
}

fn illegal(detail: impl Into<String>) -> Problem {
    Problem {
        kind: "illegal_history",
        detail: detail.into(),
    }
}

type Time = DateTime<FixedOffset>;

/// `Some(time)` if `object[key]` is there, `None` if it is absent; a `null` is illegal (the API
/// leaves out what is not set) and so is a time that is not RFC 3339 in UTC.
fn optional(object: &Value, key: &str, what: &str) -> Result<Option<Time>, Problem> {
    match object.get(key) {
        None => Ok(None),
        Some(Value::Null) => Err(illegal(format!(
            "{what}: {key} is null; the API leaves out unset fields"
        ))),
        Some(value) => utc(value)
            .map(Some)
            .map_err(|error| illegal(format!("{what}.{key}: {error}"))),
    }
}

fn required(object: &Value, key: &str, what: &str) -> Result<Time, Problem> {
    optional(object, key, what)?.ok_or_else(|| illegal(format!("{what}: {key} missing")))
}

fn ordered(earlier: Time, later: Time, detail: impl FnOnce() -> String) -> Result<(), Problem> {
    if earlier <= later {
        Ok(())
    } else {
        Err(illegal(detail()))
    }
}

/// Checks that `view` (an order as the API shows it) is finished on a legal history; returns
/// how it ended. An order not finished yet is a problem of kind `unfinished`.
pub fn check(view: &Value) -> Result<End, Problem> {
    let steps = view["steps"]
        .as_array()
        .ok_or_else(|| illegal("no steps array"))?;
    let names: Vec<&str> = steps
        .iter()
        .map(|step| step["step_name"].as_str().unwrap_or(""))
        .collect();
    if optional(view, "complete_time", "order")?.is_none() {
        return Err(Problem {
            kind: "unfinished",
            detail: format!("not finished: current step {}", view["current_step"]),
        });
    }
    match view["current_step"].as_str() {
        Some("Completed") => check_completed(view, steps, &names),
        Some("Failed") => check_failed(view, steps, &names),
        other => Err(illegal(format!("finished with current step {other:?}"))),
    }
}

fn check_completed(view: &Value, steps: &[Value], names: &[&str]) -> Result<End, Problem> {
    if names != COMPLETED_STEPS {
        return Err(illegal(format!("completed with steps {names:?}")));
    }
    if view.get("failure").is_some() {
        return Err(illegal("completed with a failure"));
    }
    let mut previous = required(view, "start_time", "order")?;
    for (index, step) in steps.iter().enumerate() {
        let what = format!("steps[{index}] ({})", names[index]);
        let started = required(step, "step_start_time", &what)?;
        let completed = required(step, "step_complete_time", &what)?;
        if step.get("step_rollback_time").is_some() {
            return Err(illegal(format!(
                "{what} of a completed order was rolled back"
            )));
        }
        ordered(previous, started, || {
            format!("{what} started before the time before it")
        })?;
        ordered(started, completed, || {
            format!("{what} completed before it started")
        })?;
        previous = completed;
    }
    let done = required(view, "complete_time", "order")?;
    ordered(previous, done, || {
        "complete_time is before the last step completed".into()
    })?;
    Ok(End::Completed)
}

fn check_failed(view: &Value, steps: &[Value], names: &[&str]) -> Result<End, Problem> {
    let step = view["failure"]["step"]
        .as_str()
        .ok_or_else(|| illegal("failed without failure.step"))?;
    let reason = view["failure"]["reason"]
        .as_str()
        .filter(|reason| !reason.trim().is_empty())
        .ok_or_else(|| illegal("failed without a failure.reason"))?;
    let position = WORK_STEPS
        .iter()
        .position(|work| *work == step)
        .ok_or_else(|| illegal(format!("failure.step {step:?} is not a work step")))?;
    let mut expected: Vec<&str> = WORK_STEPS[..=position].to_vec();
    expected.push("Failed");
    if names != expected.as_slice() {
        return Err(illegal(format!("failed at {step} with steps {names:?}")));
    }
    let (failed_entry, forward) = steps
        .split_last()
        .ok_or_else(|| illegal("no Failed entry"))?;
    let cancelled = reason == CANCELLED;

    // The forward path: started in turn, all but the failed step completed.
    let mut previous = required(view, "start_time", "order")?;
    for (index, entry) in forward.iter().enumerate() {
        let what = format!("steps[{index}] ({})", names[index]);
        let started = required(entry, "step_start_time", &what)?;
        ordered(previous, started, || {
            format!("{what} started before the time before it")
        })?;
        previous = started;
        let completed = optional(entry, "step_complete_time", &what)?;
        match completed {
            Some(completed) => {
                // A cancellation noted when a step succeeded fails the order at that step,
                // completed; a step that failed never completes.
                if index == position && !cancelled {
                    return Err(illegal(format!(
                        "the failed step {what} has a completion time"
                    )));
                }
                ordered(started, completed, || {
                    format!("{what} completed before it started")
                })?;
                previous = completed;
            }
            None if index < position => {
                return Err(illegal(format!(
                    "{what} precedes the failed step but has no completion time"
                )))
            }
            None => {}
        }
    }

    // The Failed entry: at once, after the forward path, never rolled back.
    let failed_started = required(failed_entry, "step_start_time", "the Failed entry")?;
    let failed_done = required(failed_entry, "step_complete_time", "the Failed entry")?;
    ordered(previous, failed_started, || {
        "the Failed entry started before the forward path ended".into()
    })?;
    ordered(failed_started, failed_done, || {
        "the Failed entry completed before it started".into()
    })?;
    if failed_entry.get("step_rollback_time").is_some() {
        return Err(illegal("the Failed entry was rolled back"));
    }

    // The rollback: newest step first, each after the one after it and after the Failed entry.
    let parked = match view["rollback_state"].as_str() {
        Some("complete") => false,
        Some("incomplete") => true,
        _ => {
            return Err(illegal(format!(
                "rollback_state {} is neither complete nor incomplete",
                view["rollback_state"]
            )))
        }
    };
    let mut previous_rollback = failed_done;
    let mut pending = false;
    for (index, entry) in forward.iter().enumerate().rev() {
        let what = format!("steps[{index}] ({})", names[index]);
        match optional(entry, "step_rollback_time", &what)? {
            Some(_) if pending => {
                return Err(illegal(format!(
                    "{what} was rolled back before a newer step; rollback goes newest first"
                )))
            }
            Some(rolled_back) => {
                ordered(previous_rollback, rolled_back, || {
                    format!(
                        "{what} rolled back before the step after it; rollback goes newest first"
                    )
                })?;
                previous_rollback = rolled_back;
            }
            None if parked => pending = true,
            None => {
                return Err(illegal(format!("{what} was started but not rolled back")));
            }
        }
    }
    if parked && !pending {
        return Err(illegal(
            "rollback_state incomplete, yet every step was rolled back",
        ));
    }
    let done = required(view, "complete_time", "order")?;
    ordered(previous_rollback, done, || {
        "complete_time is before the last rollback".into()
    })?;
    Ok(End::Failed {
        step: WORK_STEPS[position],
        reason: reason.to_string(),
        parked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::examples::{at, completed, entry, failed_at_processing};

    #[test]
    fn a_completed_history_is_legal() {
        assert_eq!(check(&completed()), Ok(End::Completed));
    }

    #[test]
    fn a_failed_history_rolled_back_newest_first_is_legal() {
        let end = check(&failed_at_processing("simulated failure")).unwrap();
        assert_eq!(
            end,
            End::Failed {
                step: "Processing",
                reason: "simulated failure".into(),
                parked: false
            }
        );
        assert!(!end.is_cancelled());
        assert!(check(&failed_at_processing(CANCELLED))
            .unwrap()
            .is_cancelled());
    }

    #[test]
    fn a_parked_rollback_is_legal_while_the_older_steps_wait() {
        let mut parked = failed_at_processing("declined");
        parked["rollback_state"] = "incomplete".into();
        for index in 0..2 {
            parked["steps"][index]
                .as_object_mut()
                .unwrap()
                .remove("step_rollback_time");
        }
        assert!(matches!(
            check(&parked),
            Ok(End::Failed { parked: true, .. })
        ));
        // Rolled back out of order: an older step undone while a newer one waits.
        let mut skipped = parked.clone();
        skipped["steps"][0]["step_rollback_time"] = at(9).into();
        skipped["steps"][2]
            .as_object_mut()
            .unwrap()
            .remove("step_rollback_time");
        assert_eq!(check(&skipped).unwrap_err().kind, "illegal_history");
    }

    #[test]
    fn illegal_histories_are_caught() {
        let mut twice = completed();
        twice["steps"]
            .as_array_mut()
            .unwrap()
            .insert(2, entry("Pre-Processing", 1, Some(2), None));
        assert_eq!(check(&twice).unwrap_err().kind, "illegal_history");

        let mut rolled_back = completed();
        rolled_back["steps"][1]["step_rollback_time"] = at(5).into();
        assert_eq!(check(&rolled_back).unwrap_err().kind, "illegal_history");

        let mut wrong_order = failed_at_processing("declined");
        wrong_order["steps"][0]["step_rollback_time"] = at(5).into();
        assert_eq!(check(&wrong_order).unwrap_err().kind, "illegal_history");

        let mut not_undone = failed_at_processing("declined");
        not_undone["steps"][1]
            .as_object_mut()
            .unwrap()
            .remove("step_rollback_time");
        assert_eq!(check(&not_undone).unwrap_err().kind, "illegal_history");

        let mut failed_step_done = failed_at_processing("declined");
        failed_step_done["steps"][2]["step_complete_time"] = at(3).into();
        assert_eq!(
            check(&failed_step_done).unwrap_err().kind,
            "illegal_history"
        );

        let mut null_time = completed();
        null_time["steps"][0]["step_rollback_time"] = Value::Null;
        assert_eq!(check(&null_time).unwrap_err().kind, "illegal_history");

        let mut unfinished = completed();
        unfinished.as_object_mut().unwrap().remove("complete_time");
        assert_eq!(check(&unfinished).unwrap_err().kind, "unfinished");
    }
}
