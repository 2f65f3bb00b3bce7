//! The JSON users see: the original system's fields (`order_id`, `current_step`, `start_time`,
//! `complete_time`, `steps[]`), plus payload, failure, rollback state and per-step rollback times.
//! Fields are added, never renamed. Times are RFC 3339 UTC.

use super::model::{
    is_zero, Attempt, Failure, Notification, NotificationState, Order, OrderId, Output,
    RollbackState, Step,
};
use super::rfc3339::micros as rfc3339;
use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};

fn rfc3339_opt<S: Serializer>(
    time: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => rfc3339(time, serializer),
        None => serializer.serialize_none(),
    }
}

/// An attempt as users see it: its time to the microsecond.
#[derive(Serialize)]
struct AttemptView<'a> {
    attempt: u32,
    #[serde(serialize_with = "rfc3339")]
    at: DateTime<Utc>,
    rollback: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    duration_ms: u64,
}

fn attempts<S: Serializer>(attempts: &&[Attempt], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(attempts.iter().map(|attempt| AttemptView {
        attempt: attempt.attempt,
        at: attempt.at,
        rollback: attempt.rollback,
        status: attempt.status,
        error: attempt.error.as_deref(),
        duration_ms: attempt.duration_ms,
    }))
}

/// The answer to `POST /orders`.
#[derive(Debug, Serialize)]
pub struct CreatedView {
    pub order_id: OrderId,
    #[serde(serialize_with = "rfc3339")]
    pub start_time: DateTime<Utc>,
}

impl From<&Order> for CreatedView {
    fn from(order: &Order) -> Self {
        CreatedView {
            order_id: order.order_id,
            start_time: order.start_time,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct StepView<'a> {
    pub step_name: Step,
    #[serde(serialize_with = "rfc3339")]
    pub step_start_time: DateTime<Utc>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339_opt"
    )]
    pub step_complete_time: Option<DateTime<Utc>>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339_opt"
    )]
    pub step_rollback_time: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<&'a serde_json::value::RawValue>,
    #[serde(skip_serializing_if = "<[_]>::is_empty", serialize_with = "attempts")]
    pub attempts: &'a [Attempt],
    /// When the next attempt is due, while a retry is scheduled.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339_opt"
    )]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The node that last ran or rolled back the step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<&'a str>,
}

/// An order's completion webhook as users see it: its times to the microsecond, as every time
/// of the view (its attempts' too).
#[derive(Debug, Serialize)]
pub struct NotificationView<'a> {
    pub state: NotificationState,
    pub generation: u32,
    #[serde(skip_serializing_if = "is_zero")]
    pub attempts_made: u32,
    #[serde(skip_serializing_if = "<[_]>::is_empty", serialize_with = "attempts")]
    pub attempts: &'a [Attempt],
    /// Retries scheduled so far.
    #[serde(skip_serializing_if = "is_zero")]
    pub retries: u32,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339_opt"
    )]
    pub next_attempt_at: Option<DateTime<Utc>>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339_opt"
    )]
    pub delivered_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

impl<'a> From<&'a Notification> for NotificationView<'a> {
    fn from(notification: &'a Notification) -> Self {
        NotificationView {
            state: notification.state,
            generation: notification.generation,
            attempts_made: notification.attempts_made,
            attempts: &notification.attempts,
            retries: notification.retries,
            next_attempt_at: notification.next_attempt_at,
            delivered_at: notification.delivered_at,
            error: notification.error.as_deref(),
        }
    }
}

/// The answer to `GET /orders/{id}`.
#[derive(Debug, Serialize)]
pub struct OrderView<'a> {
    pub order_id: OrderId,
    pub current_step: Step,
    #[serde(serialize_with = "rfc3339")]
    pub start_time: DateTime<Utc>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339_opt"
    )]
    pub complete_time: Option<DateTime<Utc>>,
    pub steps: Vec<StepView<'a>>,
    pub payload: &'a serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<&'a Failure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback_state: Option<RollbackState>,
    /// Why a parked rollback stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback_error: Option<&'a str>,
    /// Steps whose compensation is still to run (only while rolling back or parked).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub pending_rollback: &'a [Step],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
    /// The completion webhook, once the order is finished on a node that sends one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notification: Option<NotificationView<'a>>,
    /// The W3C trace id every call made for the order carries.
    pub trace_id: crate::trace::TraceId,
}

impl<'a> From<&'a Order> for OrderView<'a> {
    fn from(order: &'a Order) -> Self {
        OrderView {
            order_id: order.order_id,
            current_step: order.current_step,
            start_time: order.start_time,
            complete_time: order.complete_time,
            steps: order
                .steps
                .iter()
                .map(|entry| StepView {
                    step_name: entry.step_name,
                    step_start_time: entry.step_start_time,
                    step_complete_time: entry.step_complete_time,
                    step_rollback_time: entry.step_rollback_time,
                    output: entry.output.as_ref().map(Output::json),
                    attempts: &entry.attempts,
                    next_attempt_at: entry.next_attempt_at,
                    node: entry.node.as_deref(),
                })
                .collect(),
            payload: &order.payload,
            failure: order.failure.as_ref(),
            rollback_state: order.rollback_state,
            rollback_error: order.rollback_error.as_deref(),
            pending_rollback: if order.rollback_state == Some(RollbackState::Complete) {
                &[]
            } else {
                &order.pending_rollback
            },
            cancel_requested: order.cancel_requested && !order.is_finished(),
            notification: order.notification.as_ref().map(NotificationView::from),
            trace_id: crate::trace::trace_id(order),
        }
    }
}
