//! The stored JSON of an order, written directly: the very bytes serde_json writes from the
//! derived `Serialize` (a property test holds the two to that), for a fraction of the CPU. Every
//! commit writes the whole order, and through serde each field name, time and id is a string
//! scanned byte by byte for characters to escape; here names are constants, and times, ids,
//! step names and numbers, which never need escaping, are copied as they are. Only text that
//! comes from outside (the user, node names, errors, payloads and outputs) goes through
//! serde_json. Every struct is taken apart field by field with no `..`, so a field added to the
//! model does not compile until it is written here too.

use super::model::{
    Attempt, Failure, Notification, NotificationState, Order, Phase, RollbackState, Step, StepEntry,
};
use super::rfc3339;
use crate::trace::TraceContext;
use chrono::{DateTime, Utc};

/// Writes `order` as JSON at the end of `out`, exactly as `serde_json::to_writer` would.
pub fn write_order(out: &mut Vec<u8>, order: &Order) -> Result<(), serde_json::Error> {
    let Order {
        order_id,
        user,
        payload,
        current_step,
        start_time,
        complete_time,
        steps,
        phase,
        failure,
        pending_rollback,
        rollback_state,
        rollback_error,
        cancel_requested,
        owner,
        epoch,
        revision,
        notification,
        trace,
    } = order;
    out.extend_from_slice(b"{\"order_id\":\"");
    let mut id = uuid::Uuid::encode_buffer();
    out.extend_from_slice(order_id.hyphenated().encode_lower(&mut id).as_bytes());
    out.extend_from_slice(b"\",\"user\":");
    string(out, user)?;
    out.extend_from_slice(b",\"payload\":");
    serde_json::to_writer(&mut *out, &**payload)?;
    out.extend_from_slice(b",\"current_step\":");
    step(out, *current_step);
    out.extend_from_slice(b",\"start_time\":");
    time(out, start_time)?;
    optional_time(out, b",\"complete_time\":", complete_time)?;
    out.extend_from_slice(b",\"steps\":[");
    for (index, entry) in steps.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        step_entry(out, entry)?;
    }
    out.extend_from_slice(b"],\"phase\":");
    out.extend_from_slice(match phase {
        Phase::Forward => b"\"forward\"",
        Phase::RollingBack => b"\"rolling_back\"",
        Phase::Finished => b"\"finished\"",
    });
    if let Some(Failure {
        step: failed,
        reason,
    }) = failure
    {
        out.extend_from_slice(b",\"failure\":{\"step\":");
        step(out, *failed);
        out.extend_from_slice(b",\"reason\":");
        string(out, reason)?;
        out.push(b'}');
    }
    if !pending_rollback.is_empty() {
        out.extend_from_slice(b",\"pending_rollback\":[");
        for (index, pending) in pending_rollback.iter().enumerate() {
            if index > 0 {
                out.push(b',');
            }
            step(out, *pending);
        }
        out.push(b']');
    }
    if let Some(rollback_state) = rollback_state {
        out.extend_from_slice(match rollback_state {
            RollbackState::Complete => b",\"rollback_state\":\"complete\"",
            RollbackState::Incomplete => b",\"rollback_state\":\"incomplete\"",
        });
    }
    optional_string(out, b",\"rollback_error\":", rollback_error)?;
    out.extend_from_slice(if *cancel_requested {
        b",\"cancel_requested\":true,\"owner\":"
    } else {
        b",\"cancel_requested\":false,\"owner\":"
    });
    string(out, owner)?;
    out.extend_from_slice(b",\"epoch\":");
    number(out, *epoch);
    out.extend_from_slice(b",\"revision\":");
    number(out, *revision);
    if let Some(notification) = notification {
        out.extend_from_slice(b",\"notification\":");
        write_notification(out, notification)?;
    }
    if let Some(trace) = trace {
        out.extend_from_slice(b",\"trace\":");
        write_trace(out, trace)?;
    }
    out.push(b'}');
    Ok(())
}

fn step_entry(out: &mut Vec<u8>, entry: &StepEntry) -> Result<(), serde_json::Error> {
    let StepEntry {
        step_name,
        step_start_time,
        step_complete_time,
        step_rollback_time,
        output,
        attempts,
        run_attempts,
        rollback_attempts,
        retries,
        next_attempt_at,
        node,
    } = entry;
    out.extend_from_slice(b"{\"step_name\":");
    step(out, *step_name);
    out.extend_from_slice(b",\"step_start_time\":");
    time(out, step_start_time)?;
    optional_time(out, b",\"step_complete_time\":", step_complete_time)?;
    optional_time(out, b",\"step_rollback_time\":", step_rollback_time)?;
    if let Some(output) = output {
        out.extend_from_slice(b",\"output\":");
        serde_json::to_writer(&mut *out, output)?;
    }
    if !attempts.is_empty() {
        out.extend_from_slice(b",\"attempts\":");
        write_attempts(out, attempts)?;
    }
    nonzero(out, b",\"run_attempts\":", *run_attempts);
    nonzero(out, b",\"rollback_attempts\":", *rollback_attempts);
    nonzero(out, b",\"retries\":", *retries);
    optional_time(out, b",\"next_attempt_at\":", next_attempt_at)?;
    optional_string(out, b",\"node\":", node)?;
    out.push(b'}');
    Ok(())
}

fn write_attempts(out: &mut Vec<u8>, attempts: &[Attempt]) -> Result<(), serde_json::Error> {
    out.push(b'[');
    for (index, one) in attempts.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        let Attempt {
            attempt,
            at,
            rollback,
            status,
            error,
            duration_ms,
        } = one;
        out.extend_from_slice(b"{\"attempt\":");
        number(out, u64::from(*attempt));
        out.extend_from_slice(b",\"at\":");
        time(out, at)?;
        out.extend_from_slice(if *rollback {
            b",\"rollback\":true"
        } else {
            b",\"rollback\":false"
        });
        if let Some(status) = status {
            out.extend_from_slice(b",\"status\":");
            number(out, u64::from(*status));
        }
        optional_string(out, b",\"error\":", error)?;
        out.extend_from_slice(b",\"duration_ms\":");
        number(out, *duration_ms);
        out.push(b'}');
    }
    out.push(b']');
    Ok(())
}

fn write_notification(
    out: &mut Vec<u8>,
    notification: &Notification,
) -> Result<(), serde_json::Error> {
    let Notification {
        state,
        generation,
        attempts_made,
        attempts,
        retries,
        next_attempt_at,
        delivered_at,
        error,
    } = notification;
    out.extend_from_slice(match state {
        NotificationState::Pending => b"{\"state\":\"pending\"",
        NotificationState::Delivered => b"{\"state\":\"delivered\"",
        NotificationState::Failed => b"{\"state\":\"failed\"",
    });
    out.extend_from_slice(b",\"generation\":");
    number(out, u64::from(*generation));
    nonzero(out, b",\"attempts_made\":", *attempts_made);
    if !attempts.is_empty() {
        out.extend_from_slice(b",\"attempts\":");
        write_attempts(out, attempts)?;
    }
    nonzero(out, b",\"retries\":", *retries);
    optional_time(out, b",\"next_attempt_at\":", next_attempt_at)?;
    optional_time(out, b",\"delivered_at\":", delivered_at)?;
    optional_string(out, b",\"error\":", error)?;
    out.push(b'}');
    Ok(())
}

fn write_trace(out: &mut Vec<u8>, trace: &TraceContext) -> Result<(), serde_json::Error> {
    let TraceContext {
        trace_id,
        parent_id,
        flags,
        state,
    } = trace;
    out.extend_from_slice(b"{\"trace_id\":\"");
    out.extend_from_slice(&trace_id.hex());
    out.extend_from_slice(b"\",\"parent_id\":\"");
    out.extend_from_slice(&parent_id.hex());
    out.extend_from_slice(b"\",\"flags\":");
    number(out, u64::from(*flags));
    optional_string(out, b",\"state\":", state)?;
    out.push(b'}');
    Ok(())
}

/// A step's name, quoted (no step name needs escaping).
fn step(out: &mut Vec<u8>, step: Step) {
    out.push(b'"');
    out.extend_from_slice(step.as_str().as_bytes());
    out.push(b'"');
}

fn time(out: &mut Vec<u8>, time: &DateTime<Utc>) -> Result<(), serde_json::Error> {
    rfc3339::write_json(out, time)
}

/// Text from outside, escaped as serde_json escapes it.
fn string(out: &mut Vec<u8>, text: &str) -> Result<(), serde_json::Error> {
    serde_json::to_writer(&mut *out, text)
}

fn number(out: &mut Vec<u8>, number: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(number).as_bytes());
}

/// `name` (the comma, the quoted name and the colon) and `time`, if any.
fn optional_time(
    out: &mut Vec<u8>,
    name: &[u8],
    time: &Option<DateTime<Utc>>,
) -> Result<(), serde_json::Error> {
    match time {
        Some(time) => {
            out.extend_from_slice(name);
            rfc3339::write_json(out, time)
        }
        None => Ok(()),
    }
}

/// `name` (the comma, the quoted name and the colon) and `text`, if any.
fn optional_string(
    out: &mut Vec<u8>,
    name: &[u8],
    text: &Option<String>,
) -> Result<(), serde_json::Error> {
    match text {
        Some(text) => {
            out.extend_from_slice(name);
            string(out, text)
        }
        None => Ok(()),
    }
}

/// `name` (the comma, the quoted name and the colon) and `count`, unless it is zero.
fn nonzero(out: &mut Vec<u8>, name: &[u8], count: u32) {
    if count != 0 {
        out.extend_from_slice(name);
        number(out, u64::from(count));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::OrderId;
    use crate::trace::{SpanId, TraceId};
    use chrono::TimeZone;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn ours(order: &Order) -> String {
        let mut out = Vec::new();
        write_order(&mut out, order).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Text with what JSON escapes: quotes, backslashes, control characters, and non-ASCII.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9-]{0,12}",
            any::<String>(),
            Just("\"\\\u{0}\u{1f}\u{7f}é😀\n\t".to_string()),
        ]
    }

    fn time() -> impl Strategy<Value = DateTime<Utc>> {
        // Years 0 to 9999 (written here) and past them (left to chrono), every fraction.
        (
            -62_167_219_200i64..300_000_000_000i64,
            0u32..1_000_000_000,
            0u8..4,
        )
            .prop_map(|(seconds, nanos, round)| {
                let nanos = match round {
                    0 => 0,
                    1 => nanos / 1_000_000 * 1_000_000,
                    2 => nanos / 1_000 * 1_000,
                    _ => nanos,
                };
                DateTime::from_timestamp(seconds, nanos).unwrap_or_default()
            })
    }

    fn step() -> impl Strategy<Value = Step> {
        prop::sample::select(Step::ALL.to_vec())
    }

    fn value() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(serde_json::json!({})),
            Just(serde_json::json!({"a": [1, 2.5, -3e300, null, true], "é\"": {"x": "y\n"}})),
            text().prop_map(serde_json::Value::String),
            any::<f64>().prop_map(|x| serde_json::json!(x)),
            any::<i64>().prop_map(|x| serde_json::json!({ "n": x })),
        ]
    }

    fn attempt() -> impl Strategy<Value = Attempt> {
        (
            any::<u32>(),
            time(),
            any::<bool>(),
            any::<Option<u16>>(),
            prop::option::of(text()),
            any::<u64>(),
        )
            .prop_map(
                |(attempt, at, rollback, status, error, duration_ms)| Attempt {
                    attempt,
                    at,
                    rollback,
                    status,
                    error,
                    duration_ms,
                },
            )
    }

    fn count() -> impl Strategy<Value = u32> {
        prop_oneof![Just(0u32), any::<u32>()]
    }

    fn step_entry() -> impl Strategy<Value = StepEntry> {
        (
            (
                step(),
                time(),
                prop::option::of(time()),
                prop::option::of(time()),
            ),
            (
                prop::option::of(value()),
                prop::collection::vec(attempt(), 0..3),
            ),
            (count(), count(), count()),
            (prop::option::of(time()), prop::option::of(text())),
        )
            .prop_map(
                |(
                    (step_name, step_start_time, step_complete_time, step_rollback_time),
                    (output, attempts),
                    (run_attempts, rollback_attempts, retries),
                    (next_attempt_at, node),
                )| StepEntry {
                    step_name,
                    step_start_time,
                    step_complete_time,
                    step_rollback_time,
                    output,
                    attempts,
                    run_attempts,
                    rollback_attempts,
                    retries,
                    next_attempt_at,
                    node,
                },
            )
    }

    fn notification() -> impl Strategy<Value = Notification> {
        (
            prop::sample::select(vec![
                NotificationState::Pending,
                NotificationState::Delivered,
                NotificationState::Failed,
            ]),
            (
                any::<u32>(),
                count(),
                prop::collection::vec(attempt(), 0..3),
            ),
            (
                count(),
                prop::option::of(time()),
                prop::option::of(time()),
                prop::option::of(text()),
            ),
        )
            .prop_map(
                |(
                    state,
                    (generation, attempts_made, attempts),
                    (retries, next_attempt_at, delivered_at, error),
                )| Notification {
                    state,
                    generation,
                    attempts_made,
                    attempts,
                    retries,
                    next_attempt_at,
                    delivered_at,
                    error,
                },
            )
    }

    fn trace() -> impl Strategy<Value = TraceContext> {
        (
            any::<u128>(),
            any::<u64>(),
            any::<u8>(),
            prop::option::of(text()),
        )
            .prop_map(|(trace_id, parent_id, flags, state)| TraceContext {
                trace_id: TraceId(trace_id),
                parent_id: SpanId(parent_id),
                flags,
                state,
            })
    }

    fn order() -> impl Strategy<Value = Order> {
        (
            (any::<u128>(), text(), value(), step(), time()),
            (
                prop::option::of(time()),
                prop::collection::vec(step_entry(), 0..6),
                prop::sample::select(vec![Phase::Forward, Phase::RollingBack, Phase::Finished]),
                prop::option::of((step(), text())),
            ),
            (
                prop::collection::vec(step(), 0..4),
                prop::option::of(prop::sample::select(vec![
                    RollbackState::Complete,
                    RollbackState::Incomplete,
                ])),
                prop::option::of(text()),
                any::<bool>(),
            ),
            (
                text(),
                any::<u64>(),
                any::<u64>(),
                prop::option::of(notification()),
                prop::option::of(trace()),
            ),
        )
            .prop_map(
                |(
                    (id, user, payload, current_step, start_time),
                    (complete_time, steps, phase, failure),
                    (pending_rollback, rollback_state, rollback_error, cancel_requested),
                    (owner, epoch, revision, notification, trace),
                )| Order {
                    order_id: OrderId::from_u128(id),
                    user,
                    payload: Arc::new(payload),
                    current_step,
                    start_time,
                    complete_time,
                    steps,
                    phase,
                    failure: failure.map(|(step, reason)| Failure { step, reason }),
                    pending_rollback,
                    rollback_state,
                    rollback_error,
                    cancel_requested,
                    owner,
                    epoch,
                    revision,
                    notification,
                    trace,
                },
            )
    }

    #[test]
    fn writes_what_serde_json_writes_for_an_order_through_its_steps() {
        let now = Utc.with_ymd_and_hms(2026, 12, 3, 23, 7, 51).unwrap();
        let mut order = Order::new(
            OrderId::now_v7(),
            "alice".into(),
            serde_json::json!({"items": ["a", "b"], "note": "say \"hi\""}),
            "node-1".into(),
            now,
        );
        assert_eq!(ours(&order), serde_json::to_string(&order).unwrap());
        order.trace = Some(TraceContext::new_root());
        order.steps[0].step_complete_time = Some(now + chrono::Duration::nanoseconds(1_307_071));
        order.steps[0].node = Some("node-1".into());
        assert_eq!(ours(&order), serde_json::to_string(&order).unwrap());
    }

    proptest! {
        #[test]
        fn writes_what_serde_json_writes(order in order()) {
            prop_assert_eq!(ours(&order), serde_json::to_string(&order).unwrap());
        }
    }
}
