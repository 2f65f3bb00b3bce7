//! The campaign's checks, pure functions over what it observed: an order's final history, the
//! ledger's books for it, and successive snapshots of the same order.

use super::ledger::{Books, Outcome};
use crate::order::Step;
use serde_json::Value;

/// What the campaign asked of an order.
#[derive(Clone, Debug, Default)]
pub struct Intent {
    /// The ledger refuses this step (422).
    pub fail_at: Option<Step>,
    /// A cancellation was sent; `cancel_accepted` when it was answered 202.
    pub cancel_sent: bool,
    pub cancel_accepted: bool,
}

/// How an order ended, as far as the checks are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Completed,
    /// Failed at this step, refused by the ledger.
    Declined(Step),
    /// Cancelled while this step was current.
    Cancelled(Step),
}

/// A broken promise: its kind (for the summary) and what exactly is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub kind: &'static str,
    pub detail: String,
}

fn problem(kind: &'static str, detail: impl Into<String>) -> Problem {
    Problem {
        kind,
        detail: detail.into(),
    }
}

fn time(value: &Value) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    chrono::DateTime::parse_from_rfc3339(value.as_str()?).ok()
}

const COMPLETED: [&str; 5] = [
    "Scheduling",
    "Pre-Processing",
    "Processing",
    "Post-Processing",
    "Completed",
];

/// Checks a final history: a finished order on a legal path of the state machine that agrees
/// with what was asked of it.
pub fn check_history(view: &Value, intent: &Intent) -> Result<End, Problem> {
    let steps = view["steps"]
        .as_array()
        .ok_or_else(|| problem("illegal_history", "no steps"))?;
    let names: Vec<&str> = steps
        .iter()
        .map(|step| step["step_name"].as_str().unwrap_or(""))
        .collect();
    if view["complete_time"].is_null() {
        return Err(problem(
            "lost",
            format!("not finished: current step {}", view["current_step"]),
        ));
    }
    match view["current_step"].as_str() {
        Some("Completed") => {
            if names != COMPLETED {
                return Err(problem(
                    "illegal_history",
                    format!("completed with steps {names:?}"),
                ));
            }
            if steps
                .iter()
                .any(|step| step["step_complete_time"].is_null())
            {
                return Err(problem("illegal_history", "a step has no completion time"));
            }
            if steps
                .iter()
                .any(|step| !step["step_rollback_time"].is_null())
            {
                return Err(problem(
                    "illegal_history",
                    "a completed order was rolled back",
                ));
            }
            if !view["failure"].is_null() {
                return Err(problem("illegal_history", "completed with a failure"));
            }
            if let Some(step) = intent.fail_at {
                return Err(problem(
                    "completed_despite_refusal",
                    format!("the ledger refuses {step}"),
                ));
            }
            if intent.cancel_accepted {
                return Err(problem(
                    "cancel_ignored",
                    "cancellation answered 202, order completed",
                ));
            }
            Ok(End::Completed)
        }
        Some("Failed") => check_failed(view, steps, &names, intent),
        other => Err(problem(
            "illegal_history",
            format!("finished with current step {other:?}"),
        )),
    }
}

fn check_failed(
    view: &Value,
    steps: &[Value],
    names: &[&str],
    intent: &Intent,
) -> Result<End, Problem> {
    let failed: Step = view["failure"]["step"]
        .as_str()
        .and_then(|step| step.parse().ok())
        .ok_or_else(|| problem("illegal_history", "failed without a failure step"))?;
    let position = Step::WORK
        .iter()
        .position(|step| *step == failed)
        .ok_or_else(|| problem("illegal_history", "failure at a terminal step"))?;
    let mut expected: Vec<&str> = Step::WORK[..=position].iter().map(|s| s.as_str()).collect();
    expected.push("Failed");
    if names != expected.as_slice() {
        return Err(problem(
            "illegal_history",
            format!("failed at {failed} with steps {names:?}"),
        ));
    }
    let reason = view["failure"]["reason"].as_str().unwrap_or("");
    let cancelled = reason == crate::order::CANCELLED;
    if steps[..position]
        .iter()
        .any(|step| step["step_complete_time"].is_null())
    {
        return Err(problem(
            "illegal_history",
            "a step before the failed one has no completion time",
        ));
    }
    // A cancellation noted when a step succeeded fails the order at that step, completed; a
    // refused step never completes.
    if !cancelled && !steps[position]["step_complete_time"].is_null() {
        return Err(problem(
            "illegal_history",
            "the failed step has a completion time",
        ));
    }
    if steps[position + 1]["step_complete_time"].is_null() {
        return Err(problem(
            "illegal_history",
            "the Failed entry is not complete",
        ));
    }
    if view["rollback_state"] != "complete" {
        return Err(problem(
            "rollback_incomplete",
            format!("rollback_state {}", view["rollback_state"]),
        ));
    }
    let mut rollback_times = Vec::new();
    for step in &steps[..=position] {
        match time(&step["step_rollback_time"]) {
            Some(at) => rollback_times.push(at),
            None => {
                return Err(problem(
                    "illegal_history",
                    format!("{} was started but not rolled back", step["step_name"]),
                ))
            }
        }
    }
    // Newest first: the failed step is undone first, Scheduling last.
    if rollback_times.windows(2).any(|pair| pair[0] < pair[1]) {
        return Err(problem("illegal_history", "rollback not in reverse order"));
    }
    if let (Some(done), Some(last)) = (time(&view["complete_time"]), rollback_times.first()) {
        if done < *last {
            return Err(problem(
                "illegal_history",
                "finished before its last rollback",
            ));
        }
    }
    if cancelled {
        if !intent.cancel_sent {
            return Err(problem("illegal_history", "cancelled, but nobody asked"));
        }
        return Ok(End::Cancelled(failed));
    }
    // A cancellation accepted while the refused step ran: that step's own failure came first,
    // and the order rolled back all the same.
    match intent.fail_at {
        Some(step) if step == failed && reason.contains("declined") => Ok(End::Declined(failed)),
        _ => Err(problem(
            "unexpected_failure",
            format!("failed at {failed}: {reason}"),
        )),
    }
}

/// Checks the ledger's books for one finished order: exactly one effect per completed step and
/// no compensation for a completed order; for a failed one, a compensation of every applied
/// effect, in reverse order, and no effect beyond the failed step. Also checks that the history
/// never records a step complete before the ledger applied it.
pub fn check_effects(order_id: &str, view: &Value, end: End, books: &Books) -> Result<(), Problem> {
    for call in books.calls_for(order_id) {
        if call.outcome == Outcome::BadKey {
            return Err(problem(
                "bad_idempotency_key",
                format!("{} {} with key {}", call.step, call.seq, call.key),
            ));
        }
    }
    let effect = |step: Step| books.effects.get(&(order_id.to_string(), step.to_string()));
    let compensation = |step: Step| {
        books
            .compensations
            .get(&(order_id.to_string(), step.to_string()))
    };
    let steps = view["steps"].as_array().cloned().unwrap_or_default();
    // A step recorded complete was applied before (the ledger answers after applying).
    for entry in &steps {
        let Ok(step) = entry["step_name"].as_str().unwrap_or("").parse::<Step>() else {
            continue;
        };
        if step.is_terminal() {
            continue;
        }
        if let Some(done) = time(&entry["step_complete_time"]) {
            match effect(step) {
                Some(applied) if applied.at <= done => {}
                Some(applied) => {
                    return Err(problem(
                        "recorded_before_applied",
                        format!("{step} complete at {done}, applied at {}", applied.at),
                    ))
                }
                None => {
                    return Err(problem(
                        "missing_effect",
                        format!("{step} recorded complete, never applied"),
                    ))
                }
            }
        }
    }
    match end {
        End::Completed => {
            for step in Step::WORK {
                if effect(step).is_none() {
                    return Err(problem("missing_effect", format!("{step} never applied")));
                }
                if compensation(step).is_some() {
                    return Err(problem(
                        "compensated_completed",
                        format!("{step} of a completed order was compensated"),
                    ));
                }
            }
            Ok(())
        }
        End::Declined(failed) | End::Cancelled(failed) => {
            let position = Step::WORK
                .iter()
                .position(|step| *step == failed)
                .unwrap_or(0);
            let mut last_seq = 0;
            // Compensations newest step first: their sequence numbers grow as steps get older.
            for step in Step::WORK[..=position].iter().rev() {
                let undo = compensation(*step);
                if let Some(applied) = effect(*step) {
                    match undo {
                        Some(undo) if undo.seq > applied.seq && undo.undid_effect => {}
                        _ => {
                            return Err(problem(
                                "effect_not_compensated",
                                format!("{step} applied by n{} and never undone", applied.node),
                            ))
                        }
                    }
                }
                if let Some(undo) = undo {
                    if undo.seq < last_seq {
                        return Err(problem(
                            "compensation_order",
                            format!("{step} undone before a later step"),
                        ));
                    }
                    last_seq = undo.seq;
                }
            }
            for step in &Step::WORK[position + 1..] {
                if effect(*step).is_some() || compensation(*step).is_some() {
                    return Err(problem(
                        "effect_beyond_failure",
                        format!("{step} touched after the order failed at {failed}"),
                    ));
                }
            }
            if matches!(end, End::Declined(_)) && effect(failed).is_some() {
                return Err(problem(
                    "effect_of_refused_step",
                    format!("{failed} was refused yet applied"),
                ));
            }
            Ok(())
        }
    }
}

/// Checks that a later snapshot of an order only adds to an earlier one: a step recorded
/// complete or rolled back stays so, no step disappears, a finished order does not change.
/// A snapshot that goes backwards means a write from someone who had lost the order, or a
/// write the store forgot.
pub fn check_progress(before: &Value, after: &Value) -> Result<(), Problem> {
    let empty = Vec::new();
    let old = before["steps"].as_array().unwrap_or(&empty);
    let new = after["steps"].as_array().unwrap_or(&empty);
    if new.len() < old.len() {
        return Err(problem(
            "went_backwards",
            format!("{} steps, then {}", old.len(), new.len()),
        ));
    }
    for (index, (was, now)) in old.iter().zip(new).enumerate() {
        if was["step_name"] != now["step_name"] || was["step_start_time"] != now["step_start_time"]
        {
            return Err(problem(
                "went_backwards",
                format!("step entry {index} changed from {} to {}", was, now),
            ));
        }
        for field in ["step_complete_time", "step_rollback_time"] {
            if !was[field].is_null() && was[field] != now[field] {
                return Err(problem(
                    "went_backwards",
                    format!("{field} of {} changed", was["step_name"]),
                ));
            }
        }
    }
    if !before["complete_time"].is_null()
        && (before["complete_time"] != after["complete_time"]
            || before["current_step"] != after["current_step"])
    {
        return Err(problem("went_backwards", "a finished order changed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::ledger::Entry;

    fn entry(name: &str, start: u32, complete: Option<u32>, rollback: Option<u32>) -> Value {
        let at = |second: u32| format!("2026-01-01T00:00:{second:02}Z");
        let mut value = serde_json::json!({"step_name": name, "step_start_time": at(start)});
        if let Some(second) = complete {
            value["step_complete_time"] = at(second).into();
        }
        if let Some(second) = rollback {
            value["step_rollback_time"] = at(second).into();
        }
        value
    }

    fn completed() -> Value {
        serde_json::json!({
            "current_step": "Completed",
            "complete_time": "2026-01-01T00:00:04Z",
            "steps": [
                entry("Scheduling", 0, Some(1), None),
                entry("Pre-Processing", 1, Some(2), None),
                entry("Processing", 2, Some(3), None),
                entry("Post-Processing", 3, Some(4), None),
                entry("Completed", 4, Some(4), None),
            ]
        })
    }

    fn declined_at_processing() -> Value {
        serde_json::json!({
            "current_step": "Failed",
            "complete_time": "2026-01-01T00:00:09Z",
            "failure": {"step": "Processing", "reason": "declined Processing"},
            "rollback_state": "complete",
            "steps": [
                entry("Scheduling", 0, Some(1), Some(9)),
                entry("Pre-Processing", 1, Some(2), Some(8)),
                entry("Processing", 2, None, Some(7)),
                entry("Failed", 3, Some(3), None),
            ]
        })
    }

    fn books(effects: &[(&str, u64, u32)], undos: &[(&str, u64, u32, bool)]) -> Books {
        let at = |second: u32| {
            chrono::DateTime::parse_from_rfc3339(&format!("2026-01-01T00:00:{second:02}Z"))
                .unwrap()
                .with_timezone(&chrono::Utc)
        };
        let mut books = Books::default();
        for (step, seq, second) in effects {
            books.effects.insert(
                ("o".into(), step.to_string()),
                Entry {
                    seq: *seq,
                    at: at(*second),
                    node: 0,
                    key: format!("o:{step}"),
                    undid_effect: false,
                },
            );
        }
        for (step, seq, second, undid) in undos {
            books.compensations.insert(
                ("o".into(), step.to_string()),
                Entry {
                    seq: *seq,
                    at: at(*second),
                    node: 0,
                    key: format!("o:{step}:rollback"),
                    undid_effect: *undid,
                },
            );
        }
        books
    }

    #[test]
    fn a_completed_history_with_its_effects_passes() {
        let view = completed();
        let end = check_history(&view, &Intent::default()).unwrap();
        assert_eq!(end, End::Completed);
        let books = books(
            &[
                ("Scheduling", 1, 1),
                ("Pre-Processing", 2, 2),
                ("Processing", 3, 3),
                ("Post-Processing", 4, 4),
            ],
            &[],
        );
        assert_eq!(check_effects("o", &view, end, &books), Ok(()));
        let mut late = books;
        late.compensations.insert(
            ("o".into(), "Processing".into()),
            late.effects[&("o".to_string(), "Processing".to_string())].clone(),
        );
        assert_eq!(
            check_effects("o", &view, end, &late).unwrap_err().kind,
            "compensated_completed"
        );
    }

    #[test]
    fn a_declined_history_needs_reverse_compensations() {
        let view = declined_at_processing();
        let intent = Intent {
            fail_at: Some(Step::Processing),
            ..Intent::default()
        };
        let end = check_history(&view, &intent).unwrap();
        assert_eq!(end, End::Declined(Step::Processing));
        let good = books(
            &[("Scheduling", 1, 1), ("Pre-Processing", 2, 2)],
            &[
                ("Processing", 4, 7, false),
                ("Pre-Processing", 5, 8, true),
                ("Scheduling", 6, 9, true),
            ],
        );
        assert_eq!(check_effects("o", &view, end, &good), Ok(()));
        let missing = books(
            &[("Scheduling", 1, 1), ("Pre-Processing", 2, 2)],
            &[("Processing", 4, 7, false), ("Scheduling", 6, 9, true)],
        );
        assert_eq!(
            check_effects("o", &view, end, &missing).unwrap_err().kind,
            "effect_not_compensated"
        );
        let backwards = books(
            &[("Scheduling", 1, 1), ("Pre-Processing", 2, 2)],
            &[
                ("Processing", 4, 7, false),
                ("Pre-Processing", 6, 8, true),
                ("Scheduling", 5, 9, true),
            ],
        );
        assert_eq!(
            check_effects("o", &view, end, &backwards).unwrap_err().kind,
            "compensation_order"
        );
    }

    #[test]
    fn illegal_histories_are_caught() {
        let mut twice = completed();
        twice["steps"]
            .as_array_mut()
            .unwrap()
            .insert(2, entry("Pre-Processing", 1, Some(2), None));
        assert_eq!(
            check_history(&twice, &Intent::default()).unwrap_err().kind,
            "illegal_history"
        );
        let mut unfinished = completed();
        unfinished["complete_time"] = Value::Null;
        assert_eq!(
            check_history(&unfinished, &Intent::default())
                .unwrap_err()
                .kind,
            "lost"
        );
        let mut wrong_order = declined_at_processing();
        wrong_order["steps"][0]["step_rollback_time"] = "2026-01-01T00:00:05Z".into();
        let intent = Intent {
            fail_at: Some(Step::Processing),
            ..Intent::default()
        };
        assert_eq!(
            check_history(&wrong_order, &intent).unwrap_err().kind,
            "illegal_history"
        );
        assert_eq!(
            check_history(&declined_at_processing(), &Intent::default())
                .unwrap_err()
                .kind,
            "unexpected_failure"
        );
    }

    #[test]
    fn snapshots_may_only_grow() {
        let mut early = completed();
        early["complete_time"] = Value::Null;
        early["current_step"] = "Processing".into();
        early["steps"].as_array_mut().unwrap().truncate(3);
        early["steps"][2]["step_complete_time"] = Value::Null;
        assert_eq!(check_progress(&early, &completed()), Ok(()));
        assert_eq!(
            check_progress(&completed(), &early).unwrap_err().kind,
            "went_backwards"
        );
    }
}
