//! Property tests of the state machine: random event sequences (some aimed at what the order
//! expects next, the rest anything at all) never panic, an illegal event changes nothing, and
//! every order reached satisfies the saga's invariants.

use super::machine::{apply, next_action, retry_due, Action, Event};
use super::model::{
    Attempt, NotificationState, Order, Output, Phase, RollbackState, Step, MAX_ATTEMPTS,
};
use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;

fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default()
}

/// What to do at one point of a sequence.
#[derive(Debug, Clone)]
enum Move {
    /// Whatever the order expects next, succeeding or failing by the flag.
    Expected { fail: bool },
    /// An event chosen at random, legal or not.
    Any(Event),
    /// Let time pass.
    Wait(u32),
}

fn step() -> impl Strategy<Value = Step> {
    prop::sample::select(Step::ALL.to_vec())
}

fn reason() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z ]{0,12}",
        Just("cancelled".to_string())
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (step(), any::<bool>()).prop_map(|(step, with_output)| Event::StepSucceeded {
            step,
            output: with_output.then(|| Output::of(&serde_json::json!({"ok": true})).unwrap()),
        }),
        (step(), reason()).prop_map(|(step, reason)| Event::StepFailed { step, reason }),
        step().prop_map(|step| Event::Cancel { step }),
        step().prop_map(|step| Event::RolledBack { step }),
        (step(), reason()).prop_map(|(step, reason)| Event::RollbackFailed { step, reason }),
        Just(Event::RetryRollback),
        Just(Event::Redeliver),
        (step(), any::<bool>(), 0u32..5, any::<Option<u16>>()).prop_map(
            |(step, rollback, attempt, status)| Event::Attempted {
                step,
                attempt: Attempt {
                    attempt,
                    at: base(),
                    rollback,
                    status,
                    error: None,
                    duration_ms: 1,
                },
            }
        ),
        (step(), any::<bool>(), 0i64..100).prop_map(|(step, rollback, seconds)| {
            Event::RetryScheduled {
                step,
                rollback,
                at: base() + Duration::seconds(seconds),
            }
        }),
    ]
}

fn moves() -> impl Strategy<Value = Vec<Move>> {
    prop::collection::vec(
        prop_oneof![
            4 => any::<bool>().prop_map(|fail| Move::Expected { fail }),
            3 => event().prop_map(Move::Any),
            1 => (1u32..3600).prop_map(Move::Wait),
        ],
        0..60,
    )
}

/// The event that moves the order along its expected path.
fn expected_event(order: &Order, fail: bool, now: DateTime<Utc>) -> Option<Event> {
    Some(match next_action(order) {
        Action::Run(step) if fail => Event::StepFailed {
            step,
            reason: "boom".into(),
        },
        Action::Run(step) => Event::StepSucceeded { step, output: None },
        Action::Cancel(step) => Event::Cancel { step },
        Action::Rollback(step) if fail => Event::RollbackFailed {
            step,
            reason: "refund down".into(),
        },
        Action::Rollback(step) => Event::RolledBack { step },
        Action::Notify if fail => Event::NotifyFailed {
            reason: "receiver down".into(),
        },
        Action::Notify => Event::Notified,
        Action::Done if order.rollback_state == Some(RollbackState::Incomplete) => {
            Event::RetryRollback
        }
        Action::Done
            if order
                .notification
                .as_ref()
                .is_some_and(|notification| notification.state == NotificationState::Failed) =>
        {
            Event::Redeliver
        }
        Action::Done => {
            return order.steps.last().map(|entry| Event::Attempted {
                step: entry.step_name,
                attempt: Attempt {
                    attempt: 1,
                    at: now,
                    rollback: false,
                    status: None,
                    error: None,
                    duration_ms: 0,
                },
            })
        }
    })
}

/// Every invariant a reachable order must satisfy; the message says which one broke.
fn check(order: &Order) -> Result<(), String> {
    let names: Vec<Step> = order.steps.iter().map(|entry| entry.step_name).collect();
    // Entries: a prefix of the forward steps, each once, then at most one terminal entry, last.
    let forward_count = names.iter().take_while(|step| !step.is_terminal()).count();
    if names[..forward_count] != Step::WORK[..forward_count] {
        return Err(format!(
            "entries are not a prefix of the forward steps: {names:?}"
        ));
    }
    let terminal = &names[forward_count..];
    if terminal.len() > 1 {
        return Err(format!("more than one terminal entry: {names:?}"));
    }
    let forward = &order.steps[..forward_count];
    // No step completed twice (each step has one entry); completed after it started.
    for entry in &order.steps {
        if entry
            .step_complete_time
            .is_some_and(|done| done < entry.step_start_time)
        {
            return Err(format!("{} completed before it started", entry.step_name));
        }
        if entry.attempts.len() > MAX_ATTEMPTS {
            return Err(format!("{} keeps too many attempts", entry.step_name));
        }
    }
    // Rollback only of started forward steps, newest first: the rolled-back steps are a suffix
    // of the forward entries and their times never decrease going back.
    let mut rolled_back_seen = false;
    let mut unrolled_seen = false;
    let mut previous_rollback: Option<DateTime<Utc>> = None;
    for entry in forward.iter().rev() {
        match entry.step_rollback_time {
            Some(time) => {
                if unrolled_seen {
                    return Err(format!(
                        "{} rolled back while a newer step was not",
                        entry.step_name
                    ));
                }
                if time < entry.step_start_time {
                    return Err(format!("{} rolled back before it started", entry.step_name));
                }
                if previous_rollback.is_some_and(|previous| time < previous) {
                    return Err(format!(
                        "{} rolled back before a newer step",
                        entry.step_name
                    ));
                }
                rolled_back_seen = true;
                previous_rollback = Some(time);
            }
            None => unrolled_seen = true,
        }
    }
    for entry in &order.steps[forward_count..] {
        if entry.step_rollback_time.is_some() {
            return Err(format!("terminal entry {} rolled back", entry.step_name));
        }
    }
    // Pending rollbacks: started forward steps not rolled back yet, newest first.
    for pair in order.pending_rollback.windows(2) {
        if pair[0] <= pair[1] {
            return Err(format!(
                "pending_rollback not newest first: {:?}",
                order.pending_rollback
            ));
        }
    }
    for step in &order.pending_rollback {
        match forward.iter().find(|entry| entry.step_name == *step) {
            None => return Err(format!("{step} pending rollback but never started")),
            Some(entry) if entry.step_rollback_time.is_some() => {
                return Err(format!("{step} pending rollback but already rolled back"))
            }
            Some(_) => {}
        }
    }
    match order.phase {
        Phase::Forward => {
            let last = order
                .steps
                .last()
                .ok_or("a forward order without entries")?;
            if last.step_name != order.current_step || !terminal.is_empty() {
                return Err(format!(
                    "forward order at {} with entries {names:?}",
                    order.current_step
                ));
            }
            if last.step_complete_time.is_some() || order.complete_time.is_some() {
                return Err("forward order whose current step is complete".into());
            }
            if order.failure.is_some() || !order.pending_rollback.is_empty() {
                return Err("forward order with a failure or rollbacks".into());
            }
            if forward[..forward_count - 1]
                .iter()
                .any(|entry| entry.step_complete_time.is_none())
            {
                return Err("forward order with an earlier step not complete".into());
            }
        }
        Phase::RollingBack | Phase::Finished => {
            let completed = terminal == [Step::Completed];
            if order.phase == Phase::Finished && order.complete_time.is_none() {
                return Err("finished without complete_time".into());
            }
            if order.phase == Phase::RollingBack && order.complete_time.is_some() {
                return Err("rolling back with complete_time".into());
            }
            if completed {
                if order.phase != Phase::Finished
                    || order.failure.is_some()
                    || forward_count != Step::WORK.len()
                    || rolled_back_seen
                {
                    return Err(format!("inconsistent completed order: {names:?}"));
                }
            } else {
                if terminal != [Step::Failed] || order.current_step != Step::Failed {
                    return Err(format!("failed order without a Failed entry: {names:?}"));
                }
                let failure = order
                    .failure
                    .as_ref()
                    .ok_or("failed order without failure")?;
                if !forward.iter().any(|entry| entry.step_name == failure.step) {
                    return Err(format!("failure at {} which never started", failure.step));
                }
                // A step that failed keeps no completion time; a cancellation that arrived while
                // a step ran lets that step complete, then fails the order at it.
                if failure.reason != super::machine::CANCELLED
                    && forward.iter().any(|entry| {
                        entry.step_name == failure.step && entry.step_complete_time.is_some()
                    })
                {
                    return Err(format!("failed step {} completed", failure.step));
                }
                match (order.phase, order.rollback_state) {
                    (Phase::Finished, Some(RollbackState::Complete)) => {
                        if !order.pending_rollback.is_empty()
                            || forward
                                .iter()
                                .any(|entry| entry.step_rollback_time.is_none())
                        {
                            return Err("rollback complete but steps not rolled back".into());
                        }
                    }
                    (Phase::Finished, Some(RollbackState::Incomplete)) => {
                        if order.pending_rollback.is_empty() {
                            return Err("rollback incomplete with nothing pending".into());
                        }
                    }
                    (Phase::Finished, None) => {
                        return Err("failed and finished without rollback_state".into())
                    }
                    (_, _) => {}
                }
            }
        }
    }
    let done = order.is_finished()
        || (order.phase == Phase::RollingBack && order.pending_rollback.is_empty());
    let settled = matches!(next_action(order), Action::Done | Action::Notify);
    if settled != done {
        return Err(format!(
            "next_action {:?} disagrees with phase {:?}",
            next_action(order),
            order.phase
        ));
    }
    let _ = retry_due(order);
    // What is stored reads back the same.
    let text = serde_json::to_string(order).map_err(|error| error.to_string())?;
    let back: Order = serde_json::from_str(&text).map_err(|error| error.to_string())?;
    if &back != order {
        return Err("the order does not survive a JSON round trip".into());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn random_event_sequences_keep_the_invariants(moves in moves(), cancel_at in 0usize..60) {
        let mut order = Order::new(
            uuid::Uuid::nil(),
            "alice".into(),
            serde_json::json!({}),
            "node".into(),
            base(),
        );
        let mut now = base();
        for (index, step_move) in moves.into_iter().enumerate() {
            now += Duration::milliseconds(10);
            if index == cancel_at && order.phase == Phase::Forward {
                // What a user's cancellation does to the stored order.
                order.cancel_requested = true;
            }
            let event = match step_move {
                Move::Wait(seconds) => {
                    now += Duration::seconds(i64::from(seconds));
                    continue;
                }
                Move::Expected { fail } => match expected_event(&order, fail, now) {
                    Some(event) => event,
                    None => continue,
                },
                Move::Any(event) => event,
            };
            // An illegal event is an error; `apply` works on a copy, so the order stays as it was.
            if let Ok(next) = apply(&order, event.clone(), now) {
                if let Err(problem) = check(&next) {
                    return Err(TestCaseError::fail(format!(
                        "{problem}\nafter {event:?}\nfrom {order:#?}\nto {next:#?}"
                    )));
                }
                order = next;
            }
        }
    }
}
