//! The stored JSON of an order, the view users see (`OrderView`) and the body of a step call,
//! written directly: the very bytes serde_json writes from the derived `Serialize` (property
//! tests hold the two to that), for a fraction of the CPU. Every commit writes the whole order,
//! most answers and every webhook the whole view, every http step call its body; through
//! serde each field name, time and id is a string scanned byte by byte for characters to
//! escape; here names are constants, and times, ids, step names and numbers, which never need
//! escaping, are copied as they are. Only text that comes from outside (the user, node names,
//! errors, payloads and outputs) goes through serde_json. Every struct written whole is taken
//! apart field by field with no `..`, so a field added to the model does not compile until it
//! is written here too.

use super::model::{
    Attempt, Failure, Notification, NotificationState, Order, Phase, RollbackState, Step, StepEntry,
};
use super::rfc3339::{self, Fraction};
use crate::trace::TraceContext;
use chrono::{DateTime, Utc};
use std::ops::Range;

/// Writes `order` as JSON at the end of `out`, exactly as `serde_json::to_writer` would.
pub fn write_order(out: &mut Vec<u8>, order: &Order) -> Result<(), serde_json::Error> {
    write(&mut Writer::new(out), order, true)
}

/// Writes `order` as [`write_order`] does but without its payload (kept apart by the store).
pub fn write_order_apart(out: &mut Vec<u8>, order: &Order) -> Result<(), serde_json::Error> {
    write(&mut Writer::new(out), order, false)
}

/// How many bytes an order's view is written into at first: the view of an order through all
/// its steps (about 1.5 KB) fits, so its buffer does not grow by reallocation while written.
pub const VIEW_CAPACITY: usize = 2048;

/// Writes the view of `order` that users see, as JSON at the end of `out`: exactly what
/// `serde_json::to_writer` writes of `OrderView::from(order)`.
pub fn write_view(out: &mut Vec<u8>, order: &Order) -> Result<(), serde_json::Error> {
    view(&mut Writer::new(out), order)
}

/// How many bytes the body of a step call is written into at first, besides its payload and
/// outputs.
const STEP_CALL_CAPACITY: usize = 192;

/// Writes the JSON body of a call to `step`'s service for `order` at the end of `out`:
/// `{"order_id":…,"step":…,"attempt":…,"epoch":…,"rollback":…,"user":…,"payload":…,"outputs":{…}}`,
/// `outputs` being each step's newest output so far by step name (see [`Outputs`](super::Outputs)).
pub fn write_step_call(
    out: &mut Vec<u8>,
    order: &Order,
    step: Step,
    attempt: u32,
    rollback: bool,
) -> Result<(), serde_json::Error> {
    let payload = order.payload.text()?;
    // Every output the order holds, a step's older ones too: enough room, counted cheaply.
    let outputs: usize = (order.steps.iter())
        .filter_map(|entry| entry.output.as_ref())
        .map(|output| output.text().len() + 20)
        .sum();
    out.reserve(STEP_CALL_CAPACITY + order.user.len() + payload.len() + outputs);
    let w = &mut Writer::new(out);
    w.out.extend_from_slice(b"{\"order_id\":\"");
    let mut id = uuid::Uuid::encode_buffer();
    w.out
        .extend_from_slice(order.order_id.hyphenated().encode_lower(&mut id).as_bytes());
    w.out.extend_from_slice(b"\",\"step\":");
    self::step(w, step);
    w.out.extend_from_slice(b",\"attempt\":");
    number(w, u64::from(attempt));
    w.out.extend_from_slice(b",\"epoch\":");
    number(w, order.epoch);
    w.out.extend_from_slice(if rollback {
        b",\"rollback\":true,\"user\":"
    } else {
        b",\"rollback\":false,\"user\":"
    });
    quoted(w.out, &order.user)?;
    w.out.extend_from_slice(b",\"payload\":");
    w.out.extend_from_slice(payload.as_bytes());
    w.out.extend_from_slice(b",\"outputs\":{");
    for (at, (step, output)) in order.outputs().iter().enumerate() {
        if at > 0 {
            w.out.push(b',');
        }
        self::step(w, step);
        w.out.push(b':');
        w.out.extend_from_slice(output.text().as_bytes());
    }
    w.out.extend_from_slice(b"}}");
    Ok(())
}

/// Where the JSON goes, and the last time and the last text written with where they are in it:
/// an order repeats both (a step starts when the one before completes, and one node usually
/// runs every step and owns the order), and a repeat is copied instead of written again.
struct Writer<'w, 'a> {
    out: &'w mut Vec<u8>,
    time: Option<(DateTime<Utc>, Fraction, Range<usize>)>,
    text: Option<(&'a str, Range<usize>)>,
}

impl<'w> Writer<'w, '_> {
    fn new(out: &'w mut Vec<u8>) -> Self {
        Writer {
            out,
            time: None,
            text: None,
        }
    }
}

/// Which JSON of an order is written: the stored one, or the view users see.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Stored,
    View,
}

fn write<'a>(
    w: &mut Writer<'_, 'a>,
    order: &'a Order,
    with_payload: bool,
) -> Result<(), serde_json::Error> {
    let Order {
        order_id,
        user,
        payload,
        current_step,
        start_time,
        complete_time,
        steps,
        phase: _,
        failure: _,
        pending_rollback: _,
        rollback_state: _,
        rollback_error: _,
        cancel_requested: _,
        owner: _,
        epoch: _,
        revision: _,
        notification: _,
        trace,
    } = order;
    w.out.push(b'{');
    id_and_user(w, *order_id, user)?;
    if with_payload {
        w.out.extend_from_slice(b",\"payload\":");
        w.out.extend_from_slice(payload.text()?.as_bytes());
    }
    w.out.extend_from_slice(b",\"current_step\":");
    step(w, *current_step);
    w.out.extend_from_slice(b",\"start_time\":");
    time(w, start_time)?;
    optional_time(w, b",\"complete_time\":", complete_time)?;
    w.out.extend_from_slice(b",\"steps\":");
    step_entries(w, steps, Shape::Stored)?;
    progress(w, order)?;
    optional_trace(w, trace.as_ref())?;
    w.out.push(b'}');
    Ok(())
}

/// Writes the part of `order` that never changes, as a split order keeps it apart (see
/// `StoredForm::Split`): its id, user, start time and trace, as the members of a JSON object
/// without the braces.
pub fn write_split_head(out: &mut Vec<u8>, order: &Order) -> Result<(), serde_json::Error> {
    let w = &mut Writer::new(out);
    id_and_user(w, order.order_id, &order.user)?;
    w.out.extend_from_slice(b",\"start_time\":");
    time(w, &order.start_time)?;
    optional_trace(w, order.trace.as_ref())
}

/// Writes what a split order keeps at each of its writes: all of it but its payload, its steps
/// (see [`write_split_step`]) and its [`write_split_head`], as the members of a JSON object
/// without the braces.
pub fn write_split_rest(out: &mut Vec<u8>, order: &Order) -> Result<(), serde_json::Error> {
    let w = &mut Writer::new(out);
    w.out.extend_from_slice(b"\"current_step\":");
    step(w, order.current_step);
    optional_time(w, b",\"complete_time\":", &order.complete_time)?;
    progress(w, order)
}

/// Writes one of an order's steps as it is stored.
pub fn write_split_step(out: &mut Vec<u8>, entry: &StepEntry) -> Result<(), serde_json::Error> {
    step_entry(&mut Writer::new(out), entry, Shape::Stored)
}

/// `"order_id":"…","user":…`.
fn id_and_user<'a>(
    w: &mut Writer<'_, 'a>,
    order_id: crate::order::OrderId,
    user: &'a str,
) -> Result<(), serde_json::Error> {
    w.out.extend_from_slice(b"\"order_id\":\"");
    let mut id = uuid::Uuid::encode_buffer();
    w.out
        .extend_from_slice(order_id.hyphenated().encode_lower(&mut id).as_bytes());
    w.out.extend_from_slice(b"\",\"user\":");
    string(w, user)
}

/// `,"trace":{…}`, when there is one.
fn optional_trace<'a>(
    w: &mut Writer<'_, 'a>,
    trace: Option<&'a TraceContext>,
) -> Result<(), serde_json::Error> {
    if let Some(trace) = trace {
        w.out.extend_from_slice(b",\"trace\":");
        write_trace(w, trace)?;
    }
    Ok(())
}

/// The members of the stored order from `phase` to `notification`: where it is in its run.
fn progress<'a>(w: &mut Writer<'_, 'a>, order: &'a Order) -> Result<(), serde_json::Error> {
    let Order {
        order_id: _,
        user: _,
        payload: _,
        current_step: _,
        start_time: _,
        complete_time: _,
        steps: _,
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
        trace: _,
    } = order;
    w.out.extend_from_slice(b",\"phase\":");
    w.out.extend_from_slice(match phase {
        Phase::Forward => b"\"forward\"",
        Phase::RollingBack => b"\"rolling_back\"",
        Phase::Finished => b"\"finished\"",
    });
    if let Some(failure) = failure {
        write_failure(w, failure)?;
    }
    write_pending_rollback(w, pending_rollback);
    if let Some(rollback_state) = rollback_state {
        write_rollback_state(w, *rollback_state);
    }
    optional_string(w, b",\"rollback_error\":", rollback_error.as_deref())?;
    w.out.extend_from_slice(if *cancel_requested {
        b",\"cancel_requested\":true,\"owner\":"
    } else {
        b",\"cancel_requested\":false,\"owner\":"
    });
    string(w, owner)?;
    w.out.extend_from_slice(b",\"epoch\":");
    number(w, *epoch);
    w.out.extend_from_slice(b",\"revision\":");
    number(w, *revision);
    if let Some(notification) = notification {
        w.out.extend_from_slice(b",\"notification\":");
        write_notification(w, notification, Fraction::Shortest)?;
    }
    Ok(())
}

/// The view (`OrderView`): the order's times with microseconds, its steps without their
/// counters, and none of what only nodes read (user, phase, owner, epoch, revision).
fn view<'a>(w: &mut Writer<'_, 'a>, order: &'a Order) -> Result<(), serde_json::Error> {
    let Order {
        order_id,
        user: _,
        payload,
        current_step,
        start_time,
        complete_time,
        steps,
        phase: _,
        failure,
        pending_rollback,
        rollback_state,
        rollback_error,
        cancel_requested,
        owner: _,
        epoch: _,
        revision: _,
        notification,
        trace: _,
    } = order;
    w.out.extend_from_slice(b"{\"order_id\":\"");
    let mut id = uuid::Uuid::encode_buffer();
    w.out
        .extend_from_slice(order_id.hyphenated().encode_lower(&mut id).as_bytes());
    w.out.extend_from_slice(b"\",\"current_step\":");
    step(w, *current_step);
    w.out.extend_from_slice(b",\"start_time\":");
    time_as(w, start_time, Fraction::Micros)?;
    optional_time_as(w, b",\"complete_time\":", complete_time, Fraction::Micros)?;
    w.out.extend_from_slice(b",\"steps\":");
    step_entries(w, steps, Shape::View)?;
    w.out.extend_from_slice(b",\"payload\":");
    w.out.extend_from_slice(payload.text()?.as_bytes());
    if let Some(failure) = failure {
        write_failure(w, failure)?;
    }
    if let Some(rollback_state) = rollback_state {
        write_rollback_state(w, *rollback_state);
    }
    optional_string(w, b",\"rollback_error\":", rollback_error.as_deref())?;
    if *rollback_state != Some(RollbackState::Complete) {
        write_pending_rollback(w, pending_rollback);
    }
    if *cancel_requested && !order.is_finished() {
        w.out.extend_from_slice(b",\"cancel_requested\":true");
    }
    if let Some(notification) = notification {
        w.out.extend_from_slice(b",\"notification\":");
        write_notification(w, notification, Fraction::Micros)?;
    }
    w.out.extend_from_slice(b",\"trace_id\":\"");
    w.out
        .extend_from_slice(&crate::trace::trace_id(order).hex());
    w.out.extend_from_slice(b"\"}");
    Ok(())
}

/// The steps, as a JSON array.
fn step_entries<'a>(
    w: &mut Writer<'_, 'a>,
    steps: &'a [StepEntry],
    shape: Shape,
) -> Result<(), serde_json::Error> {
    w.out.push(b'[');
    for (index, entry) in steps.iter().enumerate() {
        if index > 0 {
            w.out.push(b',');
        }
        step_entry(w, entry, shape)?;
    }
    w.out.push(b']');
    Ok(())
}

/// A step: as stored, or as the view shows it (`StepView`: times with microseconds, no
/// counters).
fn step_entry<'a>(
    w: &mut Writer<'_, 'a>,
    entry: &'a StepEntry,
    shape: Shape,
) -> Result<(), serde_json::Error> {
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
    let fraction = match shape {
        Shape::Stored => Fraction::Shortest,
        Shape::View => Fraction::Micros,
    };
    w.out.extend_from_slice(b"{\"step_name\":");
    step(w, *step_name);
    w.out.extend_from_slice(b",\"step_start_time\":");
    time_as(w, step_start_time, fraction)?;
    optional_time_as(w, b",\"step_complete_time\":", step_complete_time, fraction)?;
    optional_time_as(w, b",\"step_rollback_time\":", step_rollback_time, fraction)?;
    if let Some(output) = output {
        w.out.extend_from_slice(b",\"output\":");
        w.out.extend_from_slice(output.text().as_bytes());
    }
    if !attempts.is_empty() {
        w.out.extend_from_slice(b",\"attempts\":");
        write_attempts(w, attempts, fraction)?;
    }
    if shape == Shape::Stored {
        nonzero(w, b",\"run_attempts\":", *run_attempts);
        nonzero(w, b",\"rollback_attempts\":", *rollback_attempts);
        nonzero(w, b",\"retries\":", *retries);
    }
    optional_time_as(w, b",\"next_attempt_at\":", next_attempt_at, fraction)?;
    optional_string(w, b",\"node\":", node.as_deref())?;
    w.out.push(b'}');
    Ok(())
}

/// `,"failure":{…}`.
fn write_failure<'a>(
    w: &mut Writer<'_, 'a>,
    failure: &'a Failure,
) -> Result<(), serde_json::Error> {
    let Failure {
        step: failed,
        reason,
    } = failure;
    w.out.extend_from_slice(b",\"failure\":{\"step\":");
    step(w, *failed);
    w.out.extend_from_slice(b",\"reason\":");
    string(w, reason)?;
    w.out.push(b'}');
    Ok(())
}

/// `,"pending_rollback":[…]`, unless there is none.
fn write_pending_rollback(w: &mut Writer<'_, '_>, pending_rollback: &[Step]) {
    if pending_rollback.is_empty() {
        return;
    }
    w.out.extend_from_slice(b",\"pending_rollback\":[");
    for (index, pending) in pending_rollback.iter().enumerate() {
        if index > 0 {
            w.out.push(b',');
        }
        step(w, *pending);
    }
    w.out.push(b']');
}

/// `,"rollback_state":"…"`.
fn write_rollback_state(w: &mut Writer<'_, '_>, rollback_state: RollbackState) {
    w.out.extend_from_slice(match rollback_state {
        RollbackState::Complete => b",\"rollback_state\":\"complete\"",
        RollbackState::Incomplete => b",\"rollback_state\":\"incomplete\"",
    });
}

fn write_attempts<'a>(
    w: &mut Writer<'_, 'a>,
    attempts: &'a [Attempt],
    fraction: Fraction,
) -> Result<(), serde_json::Error> {
    w.out.push(b'[');
    for (index, one) in attempts.iter().enumerate() {
        if index > 0 {
            w.out.push(b',');
        }
        let Attempt {
            attempt,
            at,
            rollback,
            status,
            error,
            duration_ms,
        } = one;
        w.out.extend_from_slice(b"{\"attempt\":");
        number(w, u64::from(*attempt));
        w.out.extend_from_slice(b",\"at\":");
        time_as(w, at, fraction)?;
        w.out.extend_from_slice(if *rollback {
            b",\"rollback\":true"
        } else {
            b",\"rollback\":false"
        });
        if let Some(status) = status {
            w.out.extend_from_slice(b",\"status\":");
            number(w, u64::from(*status));
        }
        optional_string(w, b",\"error\":", error.as_deref())?;
        w.out.extend_from_slice(b",\"duration_ms\":");
        number(w, *duration_ms);
        w.out.push(b'}');
    }
    w.out.push(b']');
    Ok(())
}

/// An order's webhook, its times with `fraction`.
fn write_notification<'a>(
    w: &mut Writer<'_, 'a>,
    notification: &'a Notification,
    fraction: Fraction,
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
    w.out.extend_from_slice(match state {
        NotificationState::Pending => b"{\"state\":\"pending\"",
        NotificationState::Delivered => b"{\"state\":\"delivered\"",
        NotificationState::Failed => b"{\"state\":\"failed\"",
    });
    w.out.extend_from_slice(b",\"generation\":");
    number(w, u64::from(*generation));
    nonzero(w, b",\"attempts_made\":", *attempts_made);
    if !attempts.is_empty() {
        w.out.extend_from_slice(b",\"attempts\":");
        write_attempts(w, attempts, fraction)?;
    }
    nonzero(w, b",\"retries\":", *retries);
    optional_time_as(w, b",\"next_attempt_at\":", next_attempt_at, fraction)?;
    optional_time_as(w, b",\"delivered_at\":", delivered_at, fraction)?;
    optional_string(w, b",\"error\":", error.as_deref())?;
    w.out.push(b'}');
    Ok(())
}

fn write_trace<'a>(
    w: &mut Writer<'_, 'a>,
    trace: &'a TraceContext,
) -> Result<(), serde_json::Error> {
    let TraceContext {
        trace_id,
        parent_id,
        flags,
        state,
    } = trace;
    w.out.extend_from_slice(b"{\"trace_id\":\"");
    w.out.extend_from_slice(&trace_id.hex());
    w.out.extend_from_slice(b"\",\"parent_id\":\"");
    w.out.extend_from_slice(&parent_id.hex());
    w.out.extend_from_slice(b"\",\"flags\":");
    number(w, u64::from(*flags));
    optional_string(w, b",\"state\":", state.as_deref())?;
    w.out.push(b'}');
    Ok(())
}

/// A step's name, quoted (no step name needs escaping).
fn step(w: &mut Writer<'_, '_>, step: Step) {
    w.out.push(b'"');
    w.out.extend_from_slice(step.as_str().as_bytes());
    w.out.push(b'"');
}

/// A time as stored, copied from where it was last written if it is the same.
fn time(w: &mut Writer<'_, '_>, time: &DateTime<Utc>) -> Result<(), serde_json::Error> {
    time_as(w, time, Fraction::Shortest)
}

/// A time with `fraction`, copied from where it was last written if it is the same.
fn time_as(
    w: &mut Writer<'_, '_>,
    time: &DateTime<Utc>,
    fraction: Fraction,
) -> Result<(), serde_json::Error> {
    if let Some((last, last_fraction, at)) = &w.time {
        if last == time && *last_fraction == fraction {
            w.out.extend_from_within(at.clone());
            return Ok(());
        }
    }
    let start = w.out.len();
    rfc3339::write_json(w.out, time, fraction)?;
    w.time = Some((*time, fraction, start..w.out.len()));
    Ok(())
}

/// Text from outside, escaped as serde_json escapes it, or copied from where it was last
/// written if it is the same.
fn string<'a>(w: &mut Writer<'_, 'a>, text: &'a str) -> Result<(), serde_json::Error> {
    if let Some((last, at)) = &w.text {
        if *last == text {
            w.out.extend_from_within(at.clone());
            return Ok(());
        }
    }
    let start = w.out.len();
    quoted(w.out, text)?;
    w.text = Some((text, start..w.out.len()));
    Ok(())
}

/// `text` as a JSON string at the end of `out`. Text with nothing to escape in it (a quote, a
/// backslash or a control character), as nearly every user and node name is, is copied as it
/// is between quotes; other text goes through serde_json, whose scan costs more per byte.
fn quoted(out: &mut Vec<u8>, text: &str) -> Result<(), serde_json::Error> {
    // Every byte looked at, without stopping at the first to escape: the compiler then checks
    // many bytes at once.
    let escapes = text.bytes().fold(false, |any, byte| {
        any | (byte < 0x20) | (byte == b'"') | (byte == b'\\')
    });
    if escapes {
        return serde_json::to_writer(out, text);
    }
    out.reserve(text.len() + 2);
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
    Ok(())
}

/// `name` (the comma, the quoted name and the colon) and `time` as stored, if any.
fn optional_time(
    w: &mut Writer<'_, '_>,
    name: &[u8],
    value: &Option<DateTime<Utc>>,
) -> Result<(), serde_json::Error> {
    optional_time_as(w, name, value, Fraction::Shortest)
}

/// `name` (the comma, the quoted name and the colon) and `time` with `fraction`, if any.
fn optional_time_as(
    w: &mut Writer<'_, '_>,
    name: &[u8],
    value: &Option<DateTime<Utc>>,
    fraction: Fraction,
) -> Result<(), serde_json::Error> {
    match value {
        Some(value) => {
            w.out.extend_from_slice(name);
            time_as(w, value, fraction)
        }
        None => Ok(()),
    }
}

/// `name` (the comma, the quoted name and the colon) and `text`, if any.
fn optional_string<'a>(
    w: &mut Writer<'_, 'a>,
    name: &[u8],
    text: Option<&'a str>,
) -> Result<(), serde_json::Error> {
    match text {
        Some(text) => {
            w.out.extend_from_slice(name);
            string(w, text)
        }
        None => Ok(()),
    }
}

fn number(w: &mut Writer<'_, '_>, number: u64) {
    w.out
        .extend_from_slice(itoa::Buffer::new().format(number).as_bytes());
}

/// `name` (the comma, the quoted name and the colon) and `count`, unless it is zero.
fn nonzero(w: &mut Writer<'_, '_>, name: &[u8], count: u32) {
    if count != 0 {
        w.out.extend_from_slice(name);
        number(w, u64::from(count));
    }
}

/// Whether JSON text nests arrays and objects deeper than `max`. A scan of the bytes, so it is
/// cheap and runs before the parser builds anything; invalid JSON is left to the parser.
pub fn nests_deeper_than(json: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::OrderId;
    use crate::order::Output;
    use crate::trace::{SpanId, TraceId};
    use chrono::TimeZone;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn ours(order: &Order) -> String {
        let mut out = Vec::new();
        write_order(&mut out, order).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Text with what JSON escapes: quotes, backslashes, control characters, and non-ASCII;
    /// often one of a few, so that an order repeats some (as it repeats its node's name).
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec!["node-1", "node-2", "é\"\n"]).prop_map(str::to_string),
            "[a-z0-9-]{0,12}",
            any::<String>(),
            Just("\"\\\u{0}\u{1f}\u{7f}é😀\n\t".to_string()),
        ]
    }

    /// Often one of a few, so that an order repeats some (as a step starts when the one before
    /// it completes).
    fn time() -> impl Strategy<Value = DateTime<Utc>> {
        prop_oneof![
            prop::sample::select(vec![0i64, 1_764_000_000, 1_764_000_001]).prop_map(|seconds| {
                DateTime::from_timestamp(seconds, 1_500).unwrap_or_default()
            }),
            any_time(),
        ]
    }

    fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
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
                prop::option::of(value().prop_map(|value| Output::of(&value).unwrap())),
                prop::collection::vec(attempt(), 0..3),
            ),
            (count(), count(), count()),
            (
                prop::option::of(time()),
                prop::option::of(text().prop_map(Arc::from)),
            ),
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
                    payload: Arc::new(payload.into()),
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
        assert_eq!(our_view(&order), serde_view(&order));
    }

    #[test]
    fn quotes_text_as_serde_json_does_whatever_its_characters() {
        let mut texts: Vec<String> = (0u8..0x80)
            .map(|byte| char::from(byte).to_string())
            .collect();
        texts.extend(
            [
                "",
                "node-1",
                "é",
                "😀",
                "a\u{7f}b",
                "ends with \\",
                "\"quoted\"",
            ]
            .map(str::to_string),
        );
        for text in texts {
            for text in [text.clone(), format!("user {text} name")] {
                let mut out = Vec::new();
                quoted(&mut out, &text).unwrap();
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    serde_json::to_string(&text).unwrap()
                );
            }
        }
    }

    fn our_view(order: &Order) -> String {
        let mut out = Vec::new();
        write_view(&mut out, order).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn serde_view(order: &Order) -> String {
        serde_json::to_string(&crate::order::OrderView::from(order)).unwrap()
    }

    /// The body of a step call as serde writes it: the reference for [`write_step_call`].
    #[derive(serde::Serialize)]
    struct StepCall<'a> {
        order_id: OrderId,
        step: Step,
        attempt: u32,
        epoch: u64,
        rollback: bool,
        user: &'a str,
        payload: &'a serde_json::value::RawValue,
        outputs: crate::order::Outputs<'a>,
    }

    fn step_calls(order: &Order, step: Step, attempt: u32, rollback: bool) -> (String, String) {
        let mut out = b"kept".to_vec();
        write_step_call(&mut out, order, step, attempt, rollback).unwrap();
        let serde = serde_json::to_string(&StepCall {
            order_id: order.order_id,
            step,
            attempt,
            epoch: order.epoch,
            rollback,
            user: &order.user,
            payload: order.payload.json().unwrap(),
            outputs: order.outputs(),
        });
        (
            String::from_utf8(out).unwrap(),
            format!("kept{}", serde.unwrap()),
        )
    }

    #[test]
    fn writes_a_step_call_as_the_readme_shows_it() {
        let now = Utc.with_ymd_and_hms(2026, 11, 26, 5, 36, 15).unwrap();
        let mut order = Order::new(
            OrderId::nil(),
            "alice".into(),
            serde_json::json!({"sku": "A1", "qty": 2}),
            "node-1".into(),
            now,
        );
        order.epoch = 1;
        let (ours, _) = step_calls(&order, Step::Processing, 1, false);
        let ours = ours.strip_prefix("kept").unwrap_or_default();
        assert_eq!(
            ours,
            r#"{"order_id":"00000000-0000-0000-0000-000000000000","step":"Processing","attempt":1,"epoch":1,"rollback":false,"user":"alice","payload":{"qty":2,"sku":"A1"},"outputs":{}}"#
        );
        // A step run again gives its newest output only.
        let output = |value| Some(Output::of(&value).unwrap());
        let mut entry = order.steps[0].clone();
        entry.step_name = Step::Processing;
        entry.output = output(serde_json::json!({"payment_id": "pay_1"}));
        order.steps.push(entry.clone());
        entry.output = output(serde_json::json!({"payment_id": "pay_2"}));
        order.steps.push(entry);
        let (ours, serde) = step_calls(&order, Step::PostProcessing, 3, true);
        assert_eq!(ours, serde);
        assert!(ours.ends_with(
            r#","attempt":3,"epoch":1,"rollback":true,"user":"alice","payload":{"qty":2,"sku":"A1"},"outputs":{"Processing":{"payment_id":"pay_2"}}}"#
        ));
    }

    proptest! {
        #[test]
        fn writes_what_serde_json_writes(order in order()) {
            prop_assert_eq!(ours(&order), serde_json::to_string(&order).unwrap());
            // Again, with the payload's text kept from the first time, and in a copy.
            prop_assert_eq!(ours(&order.clone()), serde_json::to_string(&order).unwrap());
        }

        #[test]
        fn writes_an_order_apart_from_its_payload_as_it_writes_the_rest(order in order()) {
            let mut apart = Vec::new();
            write_order_apart(&mut apart, &order).unwrap();
            // A field name in quotes cannot be in a string value, where quotes are escaped.
            let payload = format!(",\"payload\":{}", order.payload.text().unwrap());
            prop_assert_eq!(String::from_utf8(apart).unwrap(), ours(&order).replacen(&payload, "", 1));
        }

        #[test]
        fn writes_a_split_order_in_parts_that_make_the_order_again(order in order()) {
            let (mut head, mut rest) = (Vec::new(), Vec::new());
            write_split_head(&mut head, &order).unwrap();
            write_split_rest(&mut rest, &order).unwrap();
            let steps: Vec<String> = order
                .steps
                .iter()
                .map(|entry| {
                    let mut step = Vec::new();
                    write_split_step(&mut step, entry).unwrap();
                    String::from_utf8(step).unwrap()
                })
                .collect();
            let (head, rest) = (String::from_utf8(head).unwrap(), String::from_utf8(rest).unwrap());
            // The same members as the order without its payload (which a split order keeps
            // apart), in another order.
            let whole = format!("{{{head},{rest},\"steps\":[{}]}}", steps.join(","));
            let mut apart = Vec::new();
            write_order_apart(&mut apart, &order).unwrap();
            let value = |json: &[u8]| serde_json::from_slice::<serde_json::Value>(json).unwrap();
            prop_assert_eq!(value(whole.as_bytes()), value(&apart));
            // Each part has only its own: no steps, head or payload in the rest.
            for name in ["\"steps\":", "\"order_id\":", "\"start_time\":", "\"payload\":"] {
                prop_assert!(!rest.starts_with(name) && !rest.contains(&format!(",{name}")), "{}", name);
            }
        }

        #[test]
        fn writes_a_step_call_as_serde_json_writes(
            order in order(),
            step in step(),
            attempt in any::<u32>(),
            rollback in any::<bool>(),
        ) {
            let (ours, serde) = step_calls(&order, step, attempt, rollback);
            prop_assert_eq!(ours, serde);
        }

        #[test]
        fn writes_the_view_serde_json_writes(order in order()) {
            prop_assert_eq!(our_view(&order), serde_view(&order));
            prop_assert_eq!(our_view(&order), serde_view(&order));
        }
    }
}
