//! The pure state machine: `(order, event, now) -> order`, and `order -> next action`.
//!
//! Forward path: `Scheduling → Pre-Processing → Processing → Post-Processing → Completed`.
//! Completing a step and starting the next is one transition, so a stored order always names the
//! step to run (or re-run, after a crash) next. On a failure in step S: S keeps no completion time,
//! a completed `Failed` entry is appended, and S and every earlier step are rolled back newest
//! first; the order is finished when the last rollback is done. A cancellation requested while a
//! step runs takes effect once that step ends: the order then fails with reason `cancelled`.
//!
//! Retries are part of the stored order, not of a running task: each attempt is recorded on the
//! step's entry (`Attempted`), and a retry is scheduled there with the time it is due
//! (`RetryScheduled`), so whoever resumes the order continues the same schedule. Every event that
//! ends a step's run or rollback clears the schedule.

use super::model::{
    Attempt, Failure, NotificationState, Order, Output, Phase, RollbackState, Step, StepEntry,
    MAX_ATTEMPTS,
};
use chrono::{DateTime, Utc};
use std::sync::Arc;

/// The failure reason recorded for a cancelled order.
pub const CANCELLED: &str = "cancelled";

/// What has to happen next to an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run this step's handler.
    Run(Step),
    /// Cancellation was requested before the step ran: fail it without running it.
    Cancel(Step),
    /// Run this step's compensation.
    Rollback(Step),
    /// Send the finished order's completion webhook.
    Notify,
    /// Nothing: the order is finished (and its webhook, if any, settled).
    Done,
}

/// Something that happened to an order.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    StepSucceeded {
        step: Step,
        output: Option<Output>,
    },
    StepFailed {
        step: Step,
        reason: String,
    },
    /// Fail the current step with reason `cancelled` (it did not run).
    Cancel {
        step: Step,
    },
    RolledBack {
        step: Step,
    },
    /// A compensation kept failing: park the order with its rollback incomplete.
    RollbackFailed {
        step: Step,
        reason: String,
    },
    /// An operator asks to retry the parked compensations.
    RetryRollback,
    /// One attempt at running (or, with `attempt.rollback`, rolling back) the step was made.
    Attempted {
        step: Step,
        attempt: Attempt,
    },
    /// The last attempt failed in a way worth retrying: try again at `at`.
    RetryScheduled {
        step: Step,
        rollback: bool,
        at: DateTime<Utc>,
    },
    /// One attempt at delivering the completion webhook was made.
    NotifyAttempted {
        attempt: Attempt,
    },
    /// The webhook's last attempt failed in a way worth retrying: try again at `at`.
    NotifyRetryScheduled {
        at: DateTime<Utc>,
    },
    /// The receiver took the webhook.
    Notified,
    /// The webhook failed for good.
    NotifyFailed {
        reason: String,
    },
    /// Someone asks to send a webhook that failed for good once more, with its retries anew.
    Redeliver,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TransitionError {
    #[error("order is finished")]
    Finished,
    #[error("step {event} does not match the order's current step {current}")]
    WrongStep { current: Step, event: Step },
    #[error("event {event} is not allowed while the order is {phase:?}")]
    WrongPhase { phase: Phase, event: &'static str },
}

pub fn next_action(order: &Order) -> Action {
    match order.phase {
        Phase::Forward if order.cancel_requested => Action::Cancel(order.current_step),
        Phase::Forward => Action::Run(order.current_step),
        Phase::RollingBack => match order.pending_rollback.first() {
            Some(step) => Action::Rollback(*step),
            None => Action::Done,
        },
        Phase::Finished if order.notification.as_ref().is_some_and(|n| n.is_pending()) => {
            Action::Notify
        }
        Phase::Finished => Action::Done,
    }
}

/// Applies one event to a copy of the order. An illegal event is an error and changes nothing.
pub fn apply(order: &Order, event: Event, now: DateTime<Utc>) -> Result<Order, TransitionError> {
    apply_owned(order.clone(), event, now)
}

/// [`apply`] to an order the caller gives up, so applying several events copies it once.
pub fn apply_owned(
    order: Order,
    event: Event,
    now: DateTime<Utc>,
) -> Result<Order, TransitionError> {
    let ran = match &event {
        Event::StepSucceeded { step, .. }
        | Event::StepFailed { step, .. }
        | Event::RolledBack { step }
        | Event::RollbackFailed { step, .. }
        | Event::Attempted { step, .. } => Some(*step),
        _ => None,
    };
    let mut next = transition(order, event, now)?;
    // The step's work was done by the order's owner: kept so an operator sees where it ran.
    let (owner, steps) = (&next.owner, &mut next.steps);
    let Some(step) = ran else {
        return Ok(next);
    };
    // The newest entry of the step, as `Order::entry_mut` finds it.
    let Some(at) = steps.iter().rposition(|entry| entry.step_name == step) else {
        return Ok(next);
    };
    let named = |entry: &StepEntry| entry.node.as_deref() == Some(owner.as_str());
    if !steps.get(at).is_some_and(named) {
        // The name another step of the owner's holds, if any, rather than a copy of its own.
        let node = steps
            .iter()
            .find(|entry| named(entry))
            .and_then(|entry| entry.node.clone())
            .unwrap_or_else(|| Arc::from(owner.as_str()));
        if let Some(entry) = steps.get_mut(at) {
            entry.node = Some(node);
        }
    }
    Ok(next)
}

/// [`apply`] but for noting the node that ran the step.
fn transition(order: Order, event: Event, now: DateTime<Utc>) -> Result<Order, TransitionError> {
    let mut next = order;
    match event {
        Event::StepSucceeded { step, output } => {
            expect_forward(&next, step, "step_succeeded")?;
            if let Some(entry) = next.entry_mut(step) {
                entry.step_complete_time = Some(now);
                entry.output = output;
                entry.clear_schedule();
            }
            if next.cancel_requested {
                fail(&mut next, step, CANCELLED.to_string(), now);
                return Ok(next);
            }
            match step.successor() {
                Some(Step::Completed) => {
                    let mut done = StepEntry::started(Step::Completed, now);
                    done.step_complete_time = Some(now);
                    next.steps.push(done);
                    next.current_step = Step::Completed;
                    next.complete_time = Some(now);
                    next.phase = Phase::Finished;
                }
                Some(following) => {
                    next.steps.push(StepEntry::started(following, now));
                    next.current_step = following;
                }
                None => unreachable_forward(step)?,
            }
        }
        Event::StepFailed { step, reason } => {
            expect_forward(&next, step, "step_failed")?;
            fail(&mut next, step, reason, now);
        }
        Event::Cancel { step } => {
            expect_forward(&next, step, "cancel")?;
            fail(&mut next, step, CANCELLED.to_string(), now);
        }
        Event::RolledBack { step } => {
            expect_rollback_head(&next, step, "rolled_back")?;
            if let Some(entry) = next.entry_mut(step) {
                entry.step_rollback_time = Some(now);
                entry.clear_schedule();
            }
            next.pending_rollback.remove(0);
            if next.pending_rollback.is_empty() {
                next.phase = Phase::Finished;
                next.rollback_state = Some(RollbackState::Complete);
                next.rollback_error = None;
                next.complete_time = Some(now);
            }
        }
        Event::RollbackFailed { step, reason } => {
            expect_rollback_head(&next, step, "rollback_failed")?;
            if let Some(entry) = next.entry_mut(step) {
                entry.clear_schedule();
            }
            next.phase = Phase::Finished;
            next.rollback_state = Some(RollbackState::Incomplete);
            next.complete_time = Some(now);
            next.rollback_error = Some(format!("rollback of {step} failed: {reason}"));
        }
        Event::RetryRollback => {
            if next.phase != Phase::Finished
                || next.rollback_state != Some(RollbackState::Incomplete)
            {
                return Err(TransitionError::WrongPhase {
                    phase: next.phase,
                    event: "retry_rollback",
                });
            }
            next.phase = Phase::RollingBack;
            next.rollback_state = None;
            next.complete_time = None;
            for step in next.pending_rollback.clone() {
                if let Some(entry) = next.entry_mut(step) {
                    entry.clear_schedule();
                }
            }
        }
        Event::Attempted { step, attempt } => {
            expect_direction(&next, step, attempt.rollback, "attempted")?;
            if let Some(entry) = next.entry_mut(step) {
                if attempt.rollback {
                    entry.rollback_attempts = entry.rollback_attempts.saturating_add(1);
                } else {
                    entry.run_attempts = entry.run_attempts.saturating_add(1);
                }
                entry.attempts.push(attempt);
                let excess = entry.attempts.len().saturating_sub(MAX_ATTEMPTS);
                entry.attempts.drain(..excess);
            }
        }
        Event::RetryScheduled { step, rollback, at } => {
            expect_direction(&next, step, rollback, "retry_scheduled")?;
            if let Some(entry) = next.entry_mut(step) {
                entry.retries = entry.retries.saturating_add(1);
                entry.next_attempt_at = Some(at);
            }
        }
        Event::NotifyAttempted { attempt } => {
            let notification = pending_notification(&mut next, "notify_attempted")?;
            notification.attempts_made = notification.attempts_made.saturating_add(1);
            notification.attempts.push(attempt);
            let excess = notification.attempts.len().saturating_sub(MAX_ATTEMPTS);
            notification.attempts.drain(..excess);
        }
        Event::NotifyRetryScheduled { at } => {
            let notification = pending_notification(&mut next, "notify_retry_scheduled")?;
            notification.retries = notification.retries.saturating_add(1);
            notification.next_attempt_at = Some(at);
        }
        Event::Notified => {
            let notification = pending_notification(&mut next, "notified")?;
            notification.state = NotificationState::Delivered;
            notification.delivered_at = Some(now);
            notification.next_attempt_at = None;
            notification.error = None;
        }
        Event::NotifyFailed { reason } => {
            let notification = pending_notification(&mut next, "notify_failed")?;
            notification.state = NotificationState::Failed;
            notification.next_attempt_at = None;
            notification.error = Some(reason);
        }
        Event::Redeliver => {
            // Only once finished: an order rolling back again owes a new notification when it
            // ends, not this one.
            let phase = next.phase;
            let Some(notification) = next
                .notification
                .as_mut()
                .filter(|notification| notification.state == NotificationState::Failed)
                .filter(|_| phase == Phase::Finished)
            else {
                return Err(TransitionError::WrongPhase {
                    phase,
                    event: "redeliver",
                });
            };
            // The same notification (its generation, so its Idempotency-Key): a receiver that
            // took an attempt after all sees a repeat. Its attempts go on being counted.
            notification.state = NotificationState::Pending;
            notification.retries = 0;
            notification.next_attempt_at = None;
            notification.error = None;
        }
    }
    Ok(next)
}

/// The webhook of a finished order that still has to be delivered.
fn pending_notification<'a>(
    order: &'a mut Order,
    event: &'static str,
) -> Result<&'a mut super::model::Notification, TransitionError> {
    let phase = order.phase;
    match order.notification.as_mut() {
        Some(notification) if phase == Phase::Finished && notification.is_pending() => {
            Ok(notification)
        }
        _ => Err(TransitionError::WrongPhase { phase, event }),
    }
}

/// When an order is (or may be) waiting to retry its next action: the time the retry is due.
pub fn retry_due(order: &Order) -> Option<DateTime<Utc>> {
    match next_action(order) {
        Action::Run(step) | Action::Rollback(step) => order.entry(step)?.next_attempt_at,
        Action::Notify => order.notification.as_ref()?.next_attempt_at,
        Action::Cancel(_) | Action::Done => None,
    }
}

/// Checks that `step` is being run (forward) or is the next to roll back.
fn expect_direction(
    order: &Order,
    step: Step,
    rollback: bool,
    event: &'static str,
) -> Result<(), TransitionError> {
    if rollback {
        expect_rollback_head(order, step, event)
    } else {
        expect_forward(order, step, event)
    }
}

/// Records the failure of `step`, appends the completed `Failed` entry and queues the rollback of
/// `step` and every earlier work step, newest first.
fn fail(order: &mut Order, step: Step, reason: String, now: DateTime<Utc>) {
    if let Some(entry) = order.entry_mut(step) {
        entry.clear_schedule();
    }
    let mut failed = StepEntry::started(Step::Failed, now);
    failed.step_complete_time = Some(now);
    order.steps.push(failed);
    order.current_step = Step::Failed;
    order.failure = Some(Failure { step, reason });
    order.pending_rollback = order
        .steps
        .iter()
        .rev()
        .map(|entry| entry.step_name)
        .filter(|name| !name.is_terminal())
        .collect();
    order.phase = Phase::RollingBack;
}

fn expect_forward(order: &Order, step: Step, event: &'static str) -> Result<(), TransitionError> {
    match order.phase {
        Phase::Finished => Err(TransitionError::Finished),
        Phase::RollingBack => Err(TransitionError::WrongPhase {
            phase: order.phase,
            event,
        }),
        Phase::Forward if order.current_step != step => Err(TransitionError::WrongStep {
            current: order.current_step,
            event: step,
        }),
        Phase::Forward => Ok(()),
    }
}

fn expect_rollback_head(
    order: &Order,
    step: Step,
    event: &'static str,
) -> Result<(), TransitionError> {
    match (order.phase, order.pending_rollback.first()) {
        (Phase::Finished, _) => Err(TransitionError::Finished),
        (Phase::RollingBack, Some(head)) if *head == step => Ok(()),
        (Phase::RollingBack, Some(head)) => Err(TransitionError::WrongStep {
            current: *head,
            event: step,
        }),
        (phase, _) => Err(TransitionError::WrongPhase { phase, event }),
    }
}

/// A forward order's current step is always a work step; anything else is a corrupt record.
fn unreachable_forward(step: Step) -> Result<(), TransitionError> {
    Err(TransitionError::WrongStep {
        current: step,
        event: step,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(second: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, second)
            .single()
            .unwrap_or_default()
    }

    fn new_order() -> Order {
        Order::new(
            uuid::Uuid::nil(),
            "alice".into(),
            serde_json::json!({}),
            "node".into(),
            at(0),
        )
    }

    fn succeed(order: &Order, step: Step, second: u32) -> Order {
        apply(
            order,
            Event::StepSucceeded { step, output: None },
            at(second),
        )
        .unwrap()
    }

    fn names(order: &Order) -> Vec<Step> {
        order.steps.iter().map(|entry| entry.step_name).collect()
    }

    /// Each step names the owner that ran it; the steps one owner ran share one name, and a
    /// new owner's steps are named anew.
    #[test]
    fn steps_name_the_owner_that_ran_them_with_one_shared_name() {
        let mut order = succeed(&new_order(), Step::Scheduling, 1);
        order = succeed(&order, Step::PreProcessing, 2);
        order.owner = "other".into();
        order = succeed(&order, Step::Processing, 3);
        order = succeed(&order, Step::PostProcessing, 4);
        let nodes: Vec<Arc<str>> = order.steps.iter().filter_map(|e| e.node.clone()).collect();
        let names: Vec<&str> = nodes.iter().map(|node| &**node).collect();
        assert_eq!(names, ["node", "node", "other", "other"]);
        assert!(Arc::ptr_eq(&nodes[0], &nodes[1]));
        assert!(Arc::ptr_eq(&nodes[2], &nodes[3]));
    }

    #[test]
    fn new_order_runs_scheduling() {
        let order = new_order();
        assert_eq!(order.current_step, Step::Scheduling);
        assert_eq!(next_action(&order), Action::Run(Step::Scheduling));
        assert_eq!(order.steps.len(), 1);
        assert_eq!(order.steps[0].step_start_time, at(0));
    }

    #[test]
    fn forward_path_completes_with_five_entries() {
        let mut order = new_order();
        for (index, step) in Step::WORK.into_iter().enumerate() {
            assert_eq!(next_action(&order), Action::Run(step));
            order = succeed(&order, step, index as u32 + 1);
        }
        assert_eq!(
            names(&order),
            vec![
                Step::Scheduling,
                Step::PreProcessing,
                Step::Processing,
                Step::PostProcessing,
                Step::Completed
            ]
        );
        assert_eq!(order.current_step, Step::Completed);
        assert_eq!(order.phase, Phase::Finished);
        assert_eq!(order.complete_time, Some(at(4)));
        assert!(order.steps.iter().all(|e| e.step_complete_time.is_some()));
        // Each step starts when the one before completes.
        for pair in order.steps.windows(2) {
            assert_eq!(Some(pair[1].step_start_time), pair[0].step_complete_time);
        }
        assert_eq!(next_action(&order), Action::Done);
    }

    #[test]
    fn failure_at_each_step_rolls_back_that_step_and_earlier_newest_first() {
        for (index, failing) in Step::WORK.into_iter().enumerate() {
            let mut order = new_order();
            for step in &Step::WORK[..index] {
                order = succeed(&order, *step, 1);
            }
            order = apply(
                &order,
                Event::StepFailed {
                    step: failing,
                    reason: "boom".into(),
                },
                at(10),
            )
            .unwrap();
            assert_eq!(order.current_step, Step::Failed);
            assert_eq!(order.phase, Phase::RollingBack);
            assert!(order.entry(failing).unwrap().step_complete_time.is_none());
            let failed = order.steps.last().unwrap();
            assert_eq!(failed.step_name, Step::Failed);
            assert_eq!(failed.step_complete_time, Some(at(10)));
            assert!(order.complete_time.is_none());
            let expected: Vec<Step> = Step::WORK[..=index].iter().rev().copied().collect();
            assert_eq!(order.pending_rollback, expected);
            for (offset, step) in expected.iter().enumerate() {
                assert_eq!(next_action(&order), Action::Rollback(*step));
                order = apply(
                    &order,
                    Event::RolledBack { step: *step },
                    at(11 + offset as u32),
                )
                .unwrap();
            }
            assert_eq!(order.phase, Phase::Finished);
            assert_eq!(order.rollback_state, Some(RollbackState::Complete));
            assert_eq!(order.complete_time, Some(at(11 + index as u32)));
            assert_eq!(
                order.failure,
                Some(Failure {
                    step: failing,
                    reason: "boom".into()
                })
            );
            assert_eq!(next_action(&order), Action::Done);
        }
    }

    #[test]
    fn cancel_before_a_step_runs_fails_that_step() {
        let mut order = succeed(&new_order(), Step::Scheduling, 1);
        order.cancel_requested = true;
        assert_eq!(next_action(&order), Action::Cancel(Step::PreProcessing));
        let order = apply(
            &order,
            Event::Cancel {
                step: Step::PreProcessing,
            },
            at(2),
        )
        .unwrap();
        assert_eq!(order.failure.as_ref().unwrap().reason, CANCELLED);
        assert_eq!(
            order.pending_rollback,
            vec![Step::PreProcessing, Step::Scheduling]
        );
    }

    #[test]
    fn cancel_during_a_step_takes_effect_when_it_ends() {
        let mut order = new_order();
        order.cancel_requested = true;
        let order = succeed(&order, Step::Scheduling, 1);
        assert_eq!(order.current_step, Step::Failed);
        assert_eq!(
            order.entry(Step::Scheduling).unwrap().step_complete_time,
            Some(at(1))
        );
        assert_eq!(order.pending_rollback, vec![Step::Scheduling]);
        assert_eq!(
            order.failure,
            Some(Failure {
                step: Step::Scheduling,
                reason: CANCELLED.into()
            })
        );
        // No later step was started.
        assert_eq!(names(&order), vec![Step::Scheduling, Step::Failed]);
    }

    #[test]
    fn step_output_is_kept_and_offered_to_later_steps() {
        let order = apply(
            &new_order(),
            Event::StepSucceeded {
                step: Step::Scheduling,
                output: Some(Output::of(&serde_json::json!({"slot": 7})).unwrap()),
            },
            at(1),
        )
        .unwrap();
        let (step, output) = order.outputs().iter().next().unwrap();
        assert_eq!(step, Step::Scheduling);
        let value: serde_json::Value = serde_json::from_str(output.text()).unwrap();
        assert_eq!(value, serde_json::json!({"slot": 7}));
        assert_eq!(
            serde_json::to_string(&order.outputs()).unwrap(),
            r#"{"Scheduling":{"slot":7}}"#
        );
    }

    #[test]
    fn rollback_failure_parks_the_order_and_retry_resumes_it() {
        let order = succeed(&new_order(), Step::Scheduling, 1);
        let order = apply(
            &order,
            Event::StepFailed {
                step: Step::PreProcessing,
                reason: "no stock".into(),
            },
            at(2),
        )
        .unwrap();
        let order = apply(
            &order,
            Event::RollbackFailed {
                step: Step::PreProcessing,
                reason: "timeout".into(),
            },
            at(3),
        )
        .unwrap();
        assert_eq!(order.phase, Phase::Finished);
        assert_eq!(order.rollback_state, Some(RollbackState::Incomplete));
        assert_eq!(
            order.pending_rollback,
            vec![Step::PreProcessing, Step::Scheduling]
        );
        assert_eq!(next_action(&order), Action::Done);
        let order = apply(&order, Event::RetryRollback, at(4)).unwrap();
        assert_eq!(next_action(&order), Action::Rollback(Step::PreProcessing));
        assert!(order.complete_time.is_none());
    }

    #[test]
    fn illegal_transitions_are_refused() {
        let order = new_order();
        // Wrong step.
        assert_eq!(
            apply(
                &order,
                Event::StepSucceeded {
                    step: Step::Processing,
                    output: None
                },
                at(1)
            ),
            Err(TransitionError::WrongStep {
                current: Step::Scheduling,
                event: Step::Processing
            })
        );
        // Rollback while running forward.
        assert!(matches!(
            apply(
                &order,
                Event::RolledBack {
                    step: Step::Scheduling
                },
                at(1)
            ),
            Err(TransitionError::WrongPhase { .. })
        ));
        // Retry of a rollback that is not parked.
        assert!(apply(&order, Event::RetryRollback, at(1)).is_err());
        // Forward events while rolling back, and rollback out of order.
        let failing = apply(
            &order,
            Event::StepFailed {
                step: Step::Scheduling,
                reason: "x".into(),
            },
            at(1),
        )
        .unwrap();
        for forward in [
            Event::StepSucceeded {
                step: Step::Scheduling,
                output: None,
            },
            Event::Cancel {
                step: Step::Scheduling,
            },
        ] {
            assert!(matches!(
                apply(&failing, forward, at(2)),
                Err(TransitionError::WrongPhase { .. })
            ));
        }
        assert!(matches!(
            apply(
                &failing,
                Event::RolledBack {
                    step: Step::Processing
                },
                at(2)
            ),
            Err(TransitionError::WrongStep { .. })
        ));
        // Anything on a finished order.
        let mut done = order.clone();
        for step in Step::WORK {
            done = succeed(&done, step, 5);
        }
        for event in [
            Event::StepSucceeded {
                step: Step::Completed,
                output: None,
            },
            Event::StepFailed {
                step: Step::Completed,
                reason: "x".into(),
            },
            Event::Cancel {
                step: Step::Completed,
            },
            Event::RolledBack {
                step: Step::Scheduling,
            },
            Event::RollbackFailed {
                step: Step::Scheduling,
                reason: "x".into(),
            },
        ] {
            assert_eq!(apply(&done, event, at(6)), Err(TransitionError::Finished));
        }
        assert!(apply(&done, Event::RetryRollback, at(6)).is_err());
    }

    fn attempt(number: u32, rollback: bool, second: u32) -> Attempt {
        Attempt {
            attempt: number,
            at: at(second),
            rollback,
            status: Some(503),
            error: Some("unavailable".into()),
            duration_ms: 5,
        }
    }

    #[test]
    fn attempts_are_counted_and_only_the_newest_kept() {
        let mut order = new_order();
        for number in 1..=12 {
            order = apply(
                &order,
                Event::Attempted {
                    step: Step::Scheduling,
                    attempt: attempt(number, false, number),
                },
                at(number),
            )
            .unwrap();
        }
        let entry = order.entry(Step::Scheduling).unwrap();
        assert_eq!(entry.run_attempts, 12);
        assert_eq!(entry.rollback_attempts, 0);
        assert_eq!(entry.attempts.len(), MAX_ATTEMPTS);
        assert_eq!(entry.attempts[0].attempt, 3);
        assert_eq!(entry.attempts[MAX_ATTEMPTS - 1].attempt, 12);
    }

    #[test]
    fn a_scheduled_retry_is_due_until_the_step_ends() {
        let order = apply(
            &new_order(),
            Event::Attempted {
                step: Step::Scheduling,
                attempt: attempt(1, false, 1),
            },
            at(1),
        )
        .unwrap();
        assert_eq!(retry_due(&order), None);
        let order = apply(
            &order,
            Event::RetryScheduled {
                step: Step::Scheduling,
                rollback: false,
                at: at(3),
            },
            at(1),
        )
        .unwrap();
        assert_eq!(retry_due(&order), Some(at(3)));
        assert_eq!(order.entry(Step::Scheduling).unwrap().retries, 1);
        assert_eq!(next_action(&order), Action::Run(Step::Scheduling));
        // Success clears the schedule and keeps the attempts.
        let done = succeed(&order, Step::Scheduling, 4);
        let entry = done.entry(Step::Scheduling).unwrap();
        assert_eq!((entry.retries, entry.next_attempt_at), (0, None));
        assert_eq!(entry.run_attempts, 1);
        assert_eq!(retry_due(&done), None);
        // Failure clears it too, so the rollback starts a schedule of its own.
        let failed = apply(
            &order,
            Event::StepFailed {
                step: Step::Scheduling,
                reason: "gave up".into(),
            },
            at(4),
        )
        .unwrap();
        let entry = failed.entry(Step::Scheduling).unwrap();
        assert_eq!((entry.retries, entry.next_attempt_at), (0, None));
        assert_eq!(next_action(&failed), Action::Rollback(Step::Scheduling));
        assert_eq!(retry_due(&failed), None);
    }

    #[test]
    fn rollback_attempts_have_their_own_count_and_schedule() {
        let order = apply(
            &new_order(),
            Event::StepFailed {
                step: Step::Scheduling,
                reason: "declined".into(),
            },
            at(1),
        )
        .unwrap();
        // A run attempt is refused while rolling back, a rollback attempt accepted.
        assert!(matches!(
            apply(
                &order,
                Event::Attempted {
                    step: Step::Scheduling,
                    attempt: attempt(1, false, 2),
                },
                at(2)
            ),
            Err(TransitionError::WrongPhase { .. })
        ));
        let order = apply(
            &order,
            Event::Attempted {
                step: Step::Scheduling,
                attempt: attempt(1, true, 2),
            },
            at(2),
        )
        .unwrap();
        let order = apply(
            &order,
            Event::RetryScheduled {
                step: Step::Scheduling,
                rollback: true,
                at: at(5),
            },
            at(2),
        )
        .unwrap();
        assert_eq!(retry_due(&order), Some(at(5)));
        let entry = order.entry(Step::Scheduling).unwrap();
        assert_eq!((entry.run_attempts, entry.rollback_attempts), (0, 1));
        let parked = apply(
            &order,
            Event::RollbackFailed {
                step: Step::Scheduling,
                reason: "refund service down".into(),
            },
            at(6),
        )
        .unwrap();
        assert_eq!(retry_due(&parked), None);
        assert_eq!(parked.entry(Step::Scheduling).unwrap().retries, 0);
        // Forward-only events are refused on a parked order.
        assert_eq!(
            apply(
                &parked,
                Event::RetryScheduled {
                    step: Step::Scheduling,
                    rollback: true,
                    at: at(7)
                },
                at(7)
            ),
            Err(TransitionError::Finished)
        );
        let retried = apply(&parked, Event::RetryRollback, at(8)).unwrap();
        assert_eq!(next_action(&retried), Action::Rollback(Step::Scheduling));
        assert_eq!(
            retried.entry(Step::Scheduling).unwrap().rollback_attempts,
            1,
            "numbering continues after a retried rollback"
        );
    }

    #[test]
    fn failed_order_serializes_and_reads_back() {
        let order = apply(
            &new_order(),
            Event::StepFailed {
                step: Step::Scheduling,
                reason: "x".into(),
            },
            at(1),
        )
        .unwrap();
        let text = serde_json::to_string(&order).unwrap();
        let back: Order = serde_json::from_str(&text).unwrap();
        assert_eq!(back, order);
    }

    /// A completed order that owes its webhook.
    fn owing_webhook() -> Order {
        let mut order = new_order();
        for (second, step) in (1..).zip(Step::WORK) {
            order = succeed(&order, step, second);
        }
        order.notification = Some(super::super::model::Notification::pending(1));
        order
    }

    /// `order` after one failed attempt at its webhook, waiting to retry it at second 20.
    fn webhook_tried_once(order: &Order) -> Order {
        let tried = apply(
            order,
            Event::NotifyAttempted {
                attempt: attempt(1, false, 10),
            },
            at(10),
        )
        .unwrap();
        apply(&tried, Event::NotifyRetryScheduled { at: at(20) }, at(10)).unwrap()
    }

    #[test]
    fn a_finished_order_owing_its_webhook_notifies_until_delivered() {
        let order = owing_webhook();
        assert!(order.is_finished() && order.owes_work());
        assert_eq!(next_action(&order), Action::Notify);
        let waiting = webhook_tried_once(&order);
        assert_eq!(retry_due(&waiting), Some(at(20)));
        assert_eq!(next_action(&waiting), Action::Notify);
        let delivered = apply(&waiting, Event::Notified, at(21)).unwrap();
        let notification = delivered.notification.clone().unwrap();
        assert_eq!(notification.state, NotificationState::Delivered);
        assert_eq!(notification.attempts_made, 1);
        assert_eq!(notification.delivered_at, Some(at(21)));
        assert_eq!(notification.next_attempt_at, None);
        assert_eq!(next_action(&delivered), Action::Done);
        assert!(!delivered.owes_work());
        // Settled: nothing more happens to it.
        assert!(apply(&delivered, Event::Notified, at(22)).is_err());
        let failed = apply(
            &waiting,
            Event::NotifyFailed {
                reason: "gone".into(),
            },
            at(21),
        );
        assert_eq!(
            failed.unwrap().notification.unwrap().state,
            NotificationState::Failed
        );
    }

    #[test]
    fn a_webhook_failed_for_good_is_sent_again_on_request_with_its_retries_anew() {
        let waited = webhook_tried_once(&owing_webhook());
        assert!(
            apply(&waited, Event::Redeliver, at(11)).is_err(),
            "still pending"
        );
        let failed = apply(
            &waited,
            Event::NotifyFailed {
                reason: "gone".into(),
            },
            at(21),
        )
        .unwrap();
        assert!(!failed.owes_work());
        let again = apply(&failed, Event::Redeliver, at(30)).unwrap();
        assert!(again.owes_work());
        assert_eq!(next_action(&again), Action::Notify);
        assert_eq!(retry_due(&again), None, "due at once");
        let notification = again.notification.clone().unwrap();
        assert_eq!(notification.state, NotificationState::Pending);
        assert_eq!(notification.generation, 1, "the same notification");
        assert_eq!(notification.retries, 0);
        assert_eq!(
            notification.attempts_made, 1,
            "attempts go on being counted"
        );
        assert_eq!(notification.error, None);
        let delivered = apply(&again, Event::Notified, at(31)).unwrap();
        assert!(
            apply(&delivered, Event::Redeliver, at(32)).is_err(),
            "delivered"
        );
        let mut without = failed.clone();
        without.notification = None;
        assert!(apply(&without, Event::Redeliver, at(32)).is_err(), "none");
    }

    #[test]
    fn a_failed_webhook_of_an_order_rolling_back_again_is_not_sent_again() {
        let mut order = new_order();
        order = apply(
            &order,
            Event::StepFailed {
                step: Step::Scheduling,
                reason: "declined".into(),
            },
            at(1),
        )
        .unwrap();
        order = apply(
            &order,
            Event::RollbackFailed {
                step: Step::Scheduling,
                reason: "refund down".into(),
            },
            at(2),
        )
        .unwrap();
        order.notification = Some(super::super::model::Notification::pending(1));
        order = apply(
            &order,
            Event::NotifyFailed {
                reason: "gone".into(),
            },
            at(3),
        )
        .unwrap();
        assert!(apply(&order, Event::Redeliver, at(4)).is_ok(), "parked");
        let rolling_back = apply(&order, Event::RetryRollback, at(5)).unwrap();
        assert_eq!(rolling_back.phase, Phase::RollingBack);
        assert!(
            apply(&rolling_back, Event::Redeliver, at(6)).is_err(),
            "it owes a new notification when it ends"
        );
    }

    #[test]
    fn no_webhook_event_applies_to_an_unfinished_order_or_one_owing_none() {
        let running = new_order();
        assert!(apply(&running, Event::Notified, at(1)).is_err());
        let mut done = owing_webhook();
        done.notification = None;
        assert_eq!(next_action(&done), Action::Done);
        assert!(apply(&done, Event::NotifyRetryScheduled { at: at(2) }, at(1)).is_err());
    }

    #[test]
    fn step_names_parse_and_print() {
        for step in Step::ALL {
            assert_eq!(step.as_str().parse::<Step>().unwrap(), step);
            assert_eq!(
                serde_json::to_value(step).unwrap(),
                serde_json::json!(step.as_str())
            );
        }
        assert!("Shipping".parse::<Step>().is_err());
    }
}
