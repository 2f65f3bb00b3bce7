//! The legal histories of a finished order.
//!
//! A completed order went through the four work steps and `Completed`, each started and
//! completed in turn, nothing rolled back. A failed (or cancelled) order went through a prefix of
//! the work steps, the last of them without a completion time (unless a cancellation stopped the
//! order right after it completed), then a `Failed` entry; every started step is then rolled
//! back newest first, after the `Failed` entry, and the order finishes after the last rollback.
//! A parked order (`rollback_state: "incomplete"`) has rolled back only its newest steps so far.

use crate::time::utc_text;
use crate::{CANCELLED, COMPLETED_STEPS, WORK_STEPS};
use chrono::{DateTime, FixedOffset};
use serde::de::{Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use std::borrow::Cow;

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

/// A text field of the view: left out, `null` (which the API never writes: it leaves out what
/// is not set), or a string, borrowed from the JSON when it has no escapes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Field<'a> {
    #[default]
    Absent,
    Null,
    Text(Cow<'a, str>),
}

impl Field<'_> {
    fn is_absent(&self) -> bool {
        matches!(self, Field::Absent)
    }

    /// The text, if the field is a string.
    pub fn text(&self) -> Option<&str> {
        match self {
            Field::Text(text) => Some(text),
            _ => None,
        }
    }
}

impl std::fmt::Display for Field<'_> {
    /// As JSON shows it (`null` also when absent).
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Text(text) => write!(formatter, "{text:?}"),
            _ => formatter.write_str("null"),
        }
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a string or null")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Field<'de>, E> {
        Ok(Field::Null)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Field<'de>, E> {
        Ok(Field::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Field<'de>, D::Error> {
        deserializer.deserialize_str(FieldVisitor)
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, text: &'de str) -> Result<Field<'de>, E> {
        Ok(Field::Text(Cow::Borrowed(text)))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Field<'de>, E> {
        Ok(Field::Text(Cow::Owned(text.to_owned())))
    }

    fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Field<'de>, E> {
        Ok(Field::Text(Cow::Owned(text)))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Field<'a>, D::Error> {
        deserializer.deserialize_option(FieldVisitor)
    }
}

impl Serialize for Field<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Field::Text(text) => serializer.serialize_str(text),
            _ => serializer.serialize_none(),
        }
    }
}

/// An object field of the view: left out, `null`, or there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Object<T> {
    #[default]
    Absent,
    Null,
    Present(T),
}

impl<T> Object<T> {
    fn is_absent(&self) -> bool {
        matches!(self, Object::Absent)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Object<T>, D::Error> {
        Ok(Option::<T>::deserialize(deserializer)?.map_or(Object::Null, Object::Present))
    }
}

/// The fields of an order's view (as the API shows it) that its history is judged by, borrowed
/// from the JSON where they can be; every other field is skipped. Read from a view's JSON text
/// with serde_json, or from a [`Value`] by [`check`].
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct History<'a> {
    #[serde(borrow, default, skip_serializing_if = "Field::is_absent")]
    pub order_id: Field<'a>,
    #[serde(borrow, default, skip_serializing_if = "Field::is_absent")]
    pub current_step: Field<'a>,
    #[serde(borrow, default, skip_serializing_if = "Field::is_absent")]
    pub start_time: Field<'a>,
    #[serde(borrow, default, skip_serializing_if = "Field::is_absent")]
    pub complete_time: Field<'a>,
    #[serde(borrow, default, skip_serializing_if = "Object::is_absent")]
    pub failure: Object<Failure<'a>>,
    #[serde(borrow, default, skip_serializing_if = "Field::is_absent")]
    pub rollback_state: Field<'a>,
    #[serde(borrow, default, skip_serializing_if = "Object::is_absent")]
    pub steps: Object<Vec<Step<'a>>>,
}

/// The view's `failure`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Failure<'a> {
    #[serde(borrow, default, skip_serializing_if = "Field::is_absent")]
    pub step: Field<'a>,
    #[serde(borrow, default, skip_serializing_if = "Field::is_absent")]
    pub reason: Field<'a>,
}

/// One entry of the view's `steps`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Step<'a> {
    #[serde(borrow, default, skip_serializing_if = "Field::is_absent")]
    pub step_name: Field<'a>,
    #[serde(borrow, default, skip_serializing_if = "Field::is_absent")]
    pub step_start_time: Field<'a>,
    #[serde(borrow, default, skip_serializing_if = "Field::is_absent")]
    pub step_complete_time: Field<'a>,
    #[serde(borrow, default, skip_serializing_if = "Field::is_absent")]
    pub step_rollback_time: Field<'a>,
}

/// What a time belongs to, as a problem names it; written only for a problem.
#[derive(Clone, Copy)]
enum What<'n> {
    Order,
    /// A step entry: its index and name.
    Step(usize, &'n str),
    FailedEntry,
}

impl std::fmt::Display for What<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            What::Order => formatter.write_str("order"),
            What::Step(index, name) => write!(formatter, "steps[{index}] ({name})"),
            What::FailedEntry => formatter.write_str("the Failed entry"),
        }
    }
}

/// `Some(time)` if `field` is there, `None` if it is absent; a `null` is illegal (the API
/// leaves out what is not set) and so is a time that is not RFC 3339 in UTC.
fn optional(field: &Field, key: &str, what: What) -> Result<Option<Time>, Problem> {
    match field {
        Field::Absent => Ok(None),
        Field::Null => Err(illegal(format!(
            "{what}: {key} is null; the API leaves out unset fields"
        ))),
        Field::Text(text) => utc_text(text)
            .map(Some)
            .map_err(|error| illegal(format!("{what}.{key}: {error}"))),
    }
}

fn required(field: &Field, key: &str, what: What) -> Result<Time, Problem> {
    optional(field, key, what)?.ok_or_else(|| illegal(format!("{what}: {key} missing")))
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
    let history = History::deserialize(view)
        .map_err(|error| illegal(format!("not an order's view: {error}")))?;
    check_history(&history)
}

/// [`check`], of a view read as its [`History`].
pub fn check_history(view: &History) -> Result<End, Problem> {
    let Object::Present(steps) = &view.steps else {
        return Err(illegal("no steps array"));
    };
    let names: Vec<&str> = steps
        .iter()
        .map(|step| step.step_name.text().unwrap_or(""))
        .collect();
    if optional(&view.complete_time, "complete_time", What::Order)?.is_none() {
        return Err(Problem {
            kind: "unfinished",
            detail: format!("not finished: current step {}", view.current_step),
        });
    }
    match view.current_step.text() {
        Some("Completed") => check_completed(view, steps, &names),
        Some("Failed") => check_failed(view, steps, &names),
        other => Err(illegal(format!("finished with current step {other:?}"))),
    }
}

fn check_completed(view: &History, steps: &[Step], names: &[&str]) -> Result<End, Problem> {
    if names != COMPLETED_STEPS {
        return Err(illegal(format!("completed with steps {names:?}")));
    }
    if !view.failure.is_absent() {
        return Err(illegal("completed with a failure"));
    }
    let mut previous = required(&view.start_time, "start_time", What::Order)?;
    for (index, step) in steps.iter().enumerate() {
        let what = What::Step(index, names[index]);
        let started = required(&step.step_start_time, "step_start_time", what)?;
        let completed = required(&step.step_complete_time, "step_complete_time", what)?;
        if !step.step_rollback_time.is_absent() {
            return Err(illegal(format!(
                "{} of a completed order was rolled back",
                what
            )));
        }
        ordered(previous, started, || {
            format!("{} started before the time before it", what)
        })?;
        ordered(started, completed, || {
            format!("{} completed before it started", what)
        })?;
        previous = completed;
    }
    let done = required(&view.complete_time, "complete_time", What::Order)?;
    ordered(previous, done, || {
        "complete_time is before the last step completed".into()
    })?;
    Ok(End::Completed)
}

fn check_failed(view: &History, steps: &[Step], names: &[&str]) -> Result<End, Problem> {
    let failure = match &view.failure {
        Object::Present(failure) => failure,
        _ => &Failure::default(),
    };
    let step = failure
        .step
        .text()
        .ok_or_else(|| illegal("failed without failure.step"))?;
    let reason = failure
        .reason
        .text()
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
    let mut previous = required(&view.start_time, "start_time", What::Order)?;
    for (index, entry) in forward.iter().enumerate() {
        let what = What::Step(index, names[index]);
        let started = required(&entry.step_start_time, "step_start_time", what)?;
        ordered(previous, started, || {
            format!("{} started before the time before it", what)
        })?;
        previous = started;
        let completed = optional(&entry.step_complete_time, "step_complete_time", what)?;
        match completed {
            Some(completed) => {
                // A cancellation noted when a step succeeded fails the order at that step,
                // completed; a step that failed never completes.
                if index == position && !cancelled {
                    return Err(illegal(format!(
                        "the failed step {} has a completion time",
                        what
                    )));
                }
                ordered(started, completed, || {
                    format!("{} completed before it started", what)
                })?;
                previous = completed;
            }
            None if index < position => {
                return Err(illegal(format!(
                    "{} precedes the failed step but has no completion time",
                    what
                )))
            }
            None => {}
        }
    }

    // The Failed entry: at once, after the forward path, never rolled back.
    let what = What::FailedEntry;
    let failed_started = required(&failed_entry.step_start_time, "step_start_time", what)?;
    let failed_done = required(&failed_entry.step_complete_time, "step_complete_time", what)?;
    ordered(previous, failed_started, || {
        "the Failed entry started before the forward path ended".into()
    })?;
    ordered(failed_started, failed_done, || {
        "the Failed entry completed before it started".into()
    })?;
    if !failed_entry.step_rollback_time.is_absent() {
        return Err(illegal("the Failed entry was rolled back"));
    }

    // The rollback: newest step first, each after the one after it and after the Failed entry.
    let parked = match view.rollback_state.text() {
        Some("complete") => false,
        Some("incomplete") => true,
        _ => {
            return Err(illegal(format!(
                "rollback_state {} is neither complete nor incomplete",
                view.rollback_state
            )))
        }
    };
    let mut previous_rollback = failed_done;
    let mut pending = false;
    for (index, entry) in forward.iter().enumerate().rev() {
        let what = What::Step(index, names[index]);
        match optional(&entry.step_rollback_time, "step_rollback_time", what)? {
            Some(_) if pending => {
                return Err(illegal(format!(
                    "{} was rolled back before a newer step; rollback goes newest first",
                    what
                )))
            }
            Some(rolled_back) => {
                ordered(previous_rollback, rolled_back, || {
                    format!(
                        "{} rolled back before the step after it; rollback goes newest first",
                        what
                    )
                })?;
                previous_rollback = rolled_back;
            }
            None if parked => pending = true,
            None => {
                return Err(illegal(format!("{} was started but not rolled back", what)));
            }
        }
    }
    if parked && !pending {
        return Err(illegal(
            "rollback_state incomplete, yet every step was rolled back",
        ));
    }
    let done = required(&view.complete_time, "complete_time", What::Order)?;
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

        let mut null_failure = completed();
        null_failure["failure"] = Value::Null;
        assert_eq!(check(&null_failure).unwrap_err().kind, "illegal_history");

        let mut number_time = completed();
        number_time["steps"][3]["step_complete_time"] = 4.into();
        assert_eq!(check(&number_time).unwrap_err().kind, "illegal_history");

        let mut unfinished = completed();
        unfinished.as_object_mut().unwrap().remove("complete_time");
        assert_eq!(check(&unfinished).unwrap_err().kind, "unfinished");
    }

    #[test]
    fn a_view_read_from_its_text_is_judged_as_its_value_is_and_borrows_its_texts() {
        let mut parked = failed_at_processing("declined");
        parked["rollback_state"] = "incomplete".into();
        parked["steps"][0]
            .as_object_mut()
            .unwrap()
            .remove("step_rollback_time");
        let mut unfinished = completed();
        unfinished.as_object_mut().unwrap().remove("complete_time");
        let mut null_time = completed();
        null_time["steps"][0]["step_rollback_time"] = Value::Null;
        let mut escaped = failed_at_processing("said \"no\"");
        escaped["payload"] = serde_json::json!({"nested": [1, {"steps": 2}]});
        for view in [
            completed(),
            failed_at_processing("declined"),
            failed_at_processing(CANCELLED),
            parked,
            unfinished,
            null_time,
            escaped,
        ] {
            let text = serde_json::to_vec(&view).unwrap();
            let history: History = serde_json::from_slice(&text).unwrap();
            assert_eq!(check_history(&history), check(&view), "{view}");
            // What the rules read survives a round trip through the history's own JSON.
            let again: Value = serde_json::to_value(&history).unwrap();
            assert_eq!(check(&again), check(&view), "{view}");
        }
        let text = serde_json::to_vec(&completed()).unwrap();
        let history: History = serde_json::from_slice(&text).unwrap();
        let Object::Present(steps) = &history.steps else {
            panic!("no steps");
        };
        assert!(matches!(
            steps[0].step_start_time,
            Field::Text(Cow::Borrowed(_))
        ));
        // A view that is not an object, or has a field of the wrong type, is illegal.
        assert_eq!(check(&Value::from(12)).unwrap_err().kind, "illegal_history");
        assert!(serde_json::from_slice::<History>(b"{\"steps\": 3}").is_err());
    }
}
