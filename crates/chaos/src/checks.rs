//! The campaign's checks, pure functions over what it observed: an order's final history, the
//! ledger's books for it, and successive snapshots of the same order.

use crate::ledger::{Books, Outcome};
pub use order_process_history::Problem;
use order_process_history::{self as history, time::rfc3339 as time, CANCELLED, WORK_STEPS};
use serde_json::Value;

/// What the campaign asked of an order.
#[derive(Clone, Debug, Default)]
pub struct Intent {
    /// The ledger refuses this step (422).
    pub fail_at: Option<&'static str>,
    /// A cancellation was sent; `cancel_accepted` when it was answered 202.
    pub cancel_sent: bool,
    pub cancel_accepted: bool,
}

/// How an order ended, as far as the checks are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Completed,
    /// Failed at this step, refused by the ledger.
    Declined(&'static str),
    /// Cancelled while this step was current.
    Cancelled(&'static str),
}

fn problem(kind: &'static str, detail: impl Into<String>) -> Problem {
    Problem {
        kind,
        detail: detail.into(),
    }
}

/// Checks a final history: a finished order on a legal history (`order-process-history`)
/// that agrees with what was asked of it.
pub fn check_history(view: &Value, intent: &Intent) -> Result<End, Problem> {
    let end = order_process_history::check(view).map_err(|found| match found.kind {
        "unfinished" => problem("lost", found.detail),
        _ => found,
    })?;
    match end {
        history::End::Completed => {
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
        history::End::Failed { parked: true, .. } => Err(problem(
            "rollback_incomplete",
            format!("rollback_state {}", view["rollback_state"]),
        )),
        history::End::Failed { step, reason, .. } => {
            if reason == CANCELLED {
                if !intent.cancel_sent {
                    return Err(problem("illegal_history", "cancelled, but nobody asked"));
                }
                return Ok(End::Cancelled(step));
            }
            // A cancellation accepted while the refused step ran: that step's own failure came
            // first, and the order rolled back all the same.
            match intent.fail_at {
                Some(refused) if refused == step && reason.contains("declined") => {
                    Ok(End::Declined(step))
                }
                _ => Err(problem(
                    "unexpected_failure",
                    format!("failed at {step}: {reason}"),
                )),
            }
        }
    }
}

/// Checks the ledger's books for one finished order: exactly one effect per completed step and
/// no compensation for a completed order; for a failed one, a compensation of every applied
/// effect, in reverse order, and no effect beyond the failed step. Also checks that the history
/// never records a step complete before the ledger applied it.
/// `tolerance` is how far a node's clock may be off (a skewed clock; zero otherwise).
pub fn check_effects(
    order_id: &str,
    view: &Value,
    end: End,
    books: &Books,
    tolerance: chrono::Duration,
) -> Result<(), Problem> {
    for call in books.calls_for(order_id) {
        if call.outcome == Outcome::BadKey {
            return Err(problem(
                "bad_idempotency_key",
                format!("{} {} with key {}", call.step, call.seq, call.key),
            ));
        }
    }
    let effect = |step: &str| books.effects.get(&(order_id.to_string(), step.to_string()));
    let compensation = |step: &str| {
        books
            .compensations
            .get(&(order_id.to_string(), step.to_string()))
    };
    let steps = view["steps"].as_array().cloned().unwrap_or_default();
    // A step recorded complete was applied before (the ledger answers after applying).
    for entry in &steps {
        let step = entry["step_name"].as_str().unwrap_or("");
        if !WORK_STEPS.contains(&step) {
            continue;
        }
        if let Some(done) = time(&entry["step_complete_time"]) {
            match effect(step) {
                Some(applied) if applied.at <= done + tolerance => {}
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
            for step in WORK_STEPS {
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
            let position = WORK_STEPS
                .iter()
                .position(|step| *step == failed)
                .unwrap_or(0);
            let mut last_seq = 0;
            // Compensations newest step first: their sequence numbers grow as steps get older.
            for step in WORK_STEPS[..=position].iter().rev() {
                let undo = compensation(step);
                if let Some(applied) = effect(step) {
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
            for step in &WORK_STEPS[position + 1..] {
                if effect(step).is_some() || compensation(step).is_some() {
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

/// The order with its times replaced by times in the order its states were reached: start,
/// each step started and completed in turn, rollbacks newest step first, then the end. For a
/// history written by nodes whose clocks disagree, so that its states can still be checked.
pub fn with_ordered_times(view: &Value) -> Value {
    let mut view = view.clone();
    let base = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
    let mut tick = 0i64;
    let mut next = || {
        tick += 1;
        Value::from(
            (base + chrono::Duration::seconds(tick))
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        )
    };
    view["start_time"] = next();
    let count = view["steps"].as_array().map_or(0, Vec::len);
    for index in 0..count {
        for field in ["step_start_time", "step_complete_time"] {
            if view["steps"][index].get(field).is_some() {
                view["steps"][index][field] = next();
            }
        }
    }
    for index in (0..count).rev() {
        if view["steps"][index].get("step_rollback_time").is_some() {
            view["steps"][index]["step_rollback_time"] = next();
        }
    }
    if view.get("complete_time").is_some() {
        view["complete_time"] = next();
    }
    view
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
    use crate::ledger::Entry;
    use order_process_history::examples::{completed, failed_at_processing};

    fn declined_at_processing() -> Value {
        failed_at_processing("declined Processing")
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
        assert_eq!(
            check_effects("o", &view, end, &books, chrono::Duration::zero()),
            Ok(())
        );
        let mut late = books;
        late.compensations.insert(
            ("o".into(), "Processing".into()),
            late.effects[&("o".to_string(), "Processing".to_string())].clone(),
        );
        assert_eq!(
            check_effects("o", &view, end, &late, chrono::Duration::zero())
                .unwrap_err()
                .kind,
            "compensated_completed"
        );
    }

    #[test]
    fn a_declined_history_needs_reverse_compensations() {
        let view = declined_at_processing();
        let intent = Intent {
            fail_at: Some("Processing"),
            ..Intent::default()
        };
        let end = check_history(&view, &intent).unwrap();
        assert_eq!(end, End::Declined("Processing"));
        let good = books(
            &[("Scheduling", 1, 1), ("Pre-Processing", 2, 2)],
            &[
                ("Processing", 4, 7, false),
                ("Pre-Processing", 5, 8, true),
                ("Scheduling", 6, 9, true),
            ],
        );
        assert_eq!(
            check_effects("o", &view, end, &good, chrono::Duration::zero()),
            Ok(())
        );
        let missing = books(
            &[("Scheduling", 1, 1), ("Pre-Processing", 2, 2)],
            &[("Processing", 4, 7, false), ("Scheduling", 6, 9, true)],
        );
        assert_eq!(
            check_effects("o", &view, end, &missing, chrono::Duration::zero())
                .unwrap_err()
                .kind,
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
            check_effects("o", &view, end, &backwards, chrono::Duration::zero())
                .unwrap_err()
                .kind,
            "compensation_order"
        );
    }

    #[test]
    fn histories_must_agree_with_the_intent() {
        let mut unfinished = completed();
        unfinished.as_object_mut().unwrap().remove("complete_time");
        assert_eq!(
            check_history(&unfinished, &Intent::default())
                .unwrap_err()
                .kind,
            "lost"
        );
        let refused = Intent {
            fail_at: Some("Processing"),
            ..Intent::default()
        };
        assert_eq!(
            check_history(&completed(), &refused).unwrap_err().kind,
            "completed_despite_refusal"
        );
        assert_eq!(
            check_history(&declined_at_processing(), &Intent::default())
                .unwrap_err()
                .kind,
            "unexpected_failure"
        );
        assert_eq!(
            check_history(&failed_at_processing("cancelled"), &Intent::default())
                .unwrap_err()
                .kind,
            "illegal_history"
        );
    }

    #[test]
    fn a_skewed_history_is_checked_without_its_times() {
        let mut skewed = declined_at_processing();
        skewed["steps"][1]["step_start_time"] = "2030-01-01T00:00:00Z".into();
        assert_eq!(
            order_process_history::check(&skewed).unwrap_err().kind,
            "illegal_history"
        );
        let intent = Intent {
            fail_at: Some("Processing"),
            ..Intent::default()
        };
        assert_eq!(
            check_history(&with_ordered_times(&skewed), &intent),
            Ok(End::Declined("Processing"))
        );
        let mut illegal = completed();
        illegal["steps"].as_array_mut().unwrap().remove(1);
        assert!(check_history(&with_ordered_times(&illegal), &Intent::default()).is_err());
    }

    #[test]
    fn snapshots_may_only_grow() {
        let mut early = completed();
        early.as_object_mut().unwrap().remove("complete_time");
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
