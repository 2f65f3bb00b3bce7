//! The stored shape of an order.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use uuid::Uuid;

/// An order's id: a UUID, shown in its hyphenated lower-case form. New orders get time-ordered
/// v7 ids, so orders created together sit together in the embedded store's B-tree.
pub type OrderId = Uuid;

/// A map keyed by order id, for the maps every order passes through on a node: hashed with
/// foldhash, seeded at random (per process and per map), instead of std's slower SipHash.
pub type IdMap<V> = std::collections::HashMap<OrderId, V, foldhash::fast::RandomState>;

/// A set of order ids, hashed as [`IdMap`] is.
pub type IdSet = std::collections::HashSet<OrderId, foldhash::fast::RandomState>;

/// The steps of the pipeline, plus the two terminal ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Step {
    #[serde(rename = "Scheduling")]
    Scheduling,
    #[serde(rename = "Pre-Processing")]
    PreProcessing,
    #[serde(rename = "Processing")]
    Processing,
    #[serde(rename = "Post-Processing")]
    PostProcessing,
    #[serde(rename = "Completed")]
    Completed,
    #[serde(rename = "Failed")]
    Failed,
}

impl Step {
    /// The four steps that do work, in order.
    pub const WORK: [Step; 4] = [
        Step::Scheduling,
        Step::PreProcessing,
        Step::Processing,
        Step::PostProcessing,
    ];

    /// Every step name, work steps first.
    pub const ALL: [Step; 6] = [
        Step::Scheduling,
        Step::PreProcessing,
        Step::Processing,
        Step::PostProcessing,
        Step::Completed,
        Step::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Scheduling => "Scheduling",
            Step::PreProcessing => "Pre-Processing",
            Step::Processing => "Processing",
            Step::PostProcessing => "Post-Processing",
            Step::Completed => "Completed",
            Step::Failed => "Failed",
        }
    }

    /// The step that follows a work step on the forward path.
    pub fn successor(self) -> Option<Step> {
        match self {
            Step::Scheduling => Some(Step::PreProcessing),
            Step::PreProcessing => Some(Step::Processing),
            Step::Processing => Some(Step::PostProcessing),
            Step::PostProcessing => Some(Step::Completed),
            Step::Completed | Step::Failed => None,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Step::Completed | Step::Failed)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown step `{0}`, expected one of Scheduling, Pre-Processing, Processing, Post-Processing, Completed, Failed")]
pub struct UnknownStep(pub String);

impl FromStr for Step {
    type Err = UnknownStep;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Step::ALL
            .into_iter()
            .find(|step| step.as_str() == text)
            .ok_or_else(|| UnknownStep(text.to_string()))
    }
}

/// How many attempts each step entry keeps (the newest ones).
pub const MAX_ATTEMPTS: usize = 10;

/// One attempt at running or rolling back a step, kept for operators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1 for the first attempt; run and rollback attempts are numbered separately.
    #[serde(default)]
    pub attempt: u32,
    #[serde(serialize_with = "super::rfc3339::serialize")]
    pub at: DateTime<Utc>,
    pub rollback: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// One entry of an order's step history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepEntry {
    pub step_name: Step,
    #[serde(serialize_with = "super::rfc3339::serialize")]
    pub step_start_time: DateTime<Utc>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "super::rfc3339::option"
    )]
    pub step_complete_time: Option<DateTime<Utc>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "super::rfc3339::option"
    )]
    pub step_rollback_time: Option<DateTime<Utc>>,
    /// The JSON a step handler answered with, handed to later steps and rollbacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Output>,
    /// The newest [`MAX_ATTEMPTS`] attempts, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
    /// Attempts made at running this step, all told (numbering survives restarts).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub run_attempts: u32,
    /// Attempts made at rolling this step back, all told.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rollback_attempts: u32,
    /// Retries already scheduled in the current schedule (of the run, or of the rollback).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    /// When the next attempt is due, while a retry is scheduled.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "super::rfc3339::option"
    )]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The node that last ran or rolled back this step (absent in orders stored before it was
    /// kept). Shared: the steps an order's owner ran name it with one string, and an order is
    /// copied at every transition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Arc<str>>,
}

pub(super) fn is_zero(value: &u32) -> bool {
    *value == 0
}

impl StepEntry {
    pub fn started(step: Step, now: DateTime<Utc>) -> Self {
        StepEntry {
            step_name: step,
            step_start_time: now,
            step_complete_time: None,
            step_rollback_time: None,
            output: None,
            attempts: Vec::new(),
            run_attempts: 0,
            rollback_attempts: 0,
            retries: 0,
            next_attempt_at: None,
            node: None,
        }
    }

    /// How many attempts were made in one direction (run or rollback).
    pub fn attempts_made(&self, rollback: bool) -> u32 {
        if rollback {
            self.rollback_attempts
        } else {
            self.run_attempts
        }
    }

    /// Ends a retry schedule: no retry is due and the next schedule starts from zero.
    pub(crate) fn clear_schedule(&mut self) {
        self.retries = 0;
        self.next_attempt_at = None;
    }
}

/// Why an order failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub step: Step,
    pub reason: String,
}

/// Where an order is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Running its steps forward.
    Forward,
    /// Failed; compensating the started steps newest first.
    RollingBack,
    /// Terminal: completed, or failed with every rollback done or parked.
    Finished,
}

/// How far the completion webhook of a finished order got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationState {
    /// Not delivered yet: being sent, or waiting for its next attempt.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt failed, or the receiver refused it for good (a 4xx).
    Failed,
}

/// The completion webhook of an order: one per time the order finishes (a parked rollback that
/// is retried and finishes again is told again, with the next `generation`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub state: NotificationState,
    /// 1 for the first time the order finished.
    pub generation: u32,
    /// Attempts made, all told.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts_made: u32,
    /// The newest [`MAX_ATTEMPTS`] attempts, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
    /// Retries already scheduled.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    /// When the next attempt is due, while a retry is scheduled.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "super::rfc3339::option"
    )]
    pub next_attempt_at: Option<DateTime<Utc>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "super::rfc3339::option"
    )]
    pub delivered_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed, once the notification failed for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Notification {
    /// A notification to send, the `generation`-th of its order.
    pub fn pending(generation: u32) -> Self {
        Notification {
            state: NotificationState::Pending,
            generation,
            attempts_made: 0,
            attempts: Vec::new(),
            retries: 0,
            next_attempt_at: None,
            delivered_at: None,
            error: None,
        }
    }

    pub fn is_pending(&self) -> bool {
        self.state == NotificationState::Pending
    }
}

/// How a finished order ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome<'a> {
    Completed,
    /// Failed (or cancelled: the failure's reason is [`crate::order::CANCELLED`]), rollbacks done or parked.
    Failed(&'a Failure),
}

/// Whether the compensations of a failed order all ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackState {
    Complete,
    /// A compensation kept failing; `pending_rollback` lists what is left.
    Incomplete,
}

/// An order's payload, and its JSON text once written: it never changes after the order is
/// accepted, and the stored order (at every transition), the view (in most answers) and the
/// body of every http step call carry it whole, so it is written once and copied after.
/// Serialized and compared as its value.
#[derive(Debug)]
pub struct Payload {
    value: serde_json::Value,
    text: OnceLock<Box<RawValue>>,
    /// How the store keeps the order (a [`StoredForm`], as its number). Set by the store, on the
    /// one payload every copy of the order shares, when it creates or reads the order so.
    form: AtomicU8,
}

/// How a store keeps an order: each write of it whole; its payload apart, written once when the
/// order is created; or (on Redis, with `database.split_orders`) split: its payload and what
/// never changes written once, and each step's entry only when it changes. An order keeps the
/// form it was created in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredForm {
    Whole = 0,
    Apart = 1,
    Split = 2,
}

impl Payload {
    /// Its JSON text, as `serde_json::to_writer` writes the value.
    pub fn text(&self) -> Result<&str, serde_json::Error> {
        self.json().map(RawValue::get)
    }

    /// Its JSON text, to embed as it is in what serde writes.
    pub fn json(&self) -> Result<&RawValue, serde_json::Error> {
        if let Some(text) = self.text.get() {
            return Ok(text);
        }
        let text = serde_json::value::to_raw_value(&self.value)?;
        Ok(self.text.get_or_init(|| text))
    }

    /// How the store keeps the order.
    pub fn form(&self) -> StoredForm {
        match self.form.load(Ordering::Relaxed) {
            0 => StoredForm::Whole,
            1 => StoredForm::Apart,
            _ => StoredForm::Split,
        }
    }

    /// Marks the order as kept in `form` from now on.
    pub fn set_form(&self, form: StoredForm) {
        self.form.store(form as u8, Ordering::Relaxed);
    }

    /// Whether the store keeps it apart from the rest of the order (in either form that does).
    pub fn is_apart(&self) -> bool {
        self.form() != StoredForm::Whole
    }

    /// Whether the store keeps the order split.
    pub fn is_split(&self) -> bool {
        self.form() == StoredForm::Split
    }

    /// Marks it kept apart from the rest of the order: the order's stored doc leaves it out from
    /// now on. An order kept split stays so.
    pub fn set_apart(&self) {
        self.form
            .fetch_max(StoredForm::Apart as u8, Ordering::Relaxed);
    }

    /// What an order read without a payload (its doc, the payload kept apart) holds until the
    /// store gives it its own: one shared value, told apart by identity (see
    /// [`Order::lacks_payload`]).
    pub(crate) fn missing() -> Arc<Payload> {
        static MISSING: OnceLock<Arc<Payload>> = OnceLock::new();
        Arc::clone(MISSING.get_or_init(|| Arc::new(Payload::from(serde_json::Value::Null))))
    }
}

impl From<serde_json::Value> for Payload {
    fn from(value: serde_json::Value) -> Self {
        Payload {
            value,
            text: OnceLock::new(),
            form: AtomicU8::new(StoredForm::Whole as u8),
        }
    }
}

impl std::ops::Deref for Payload {
    type Target = serde_json::Value;

    fn deref(&self) -> &serde_json::Value {
        &self.value
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value.fmt(f)
    }
}

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde_json::Value::deserialize(deserializer).map(Payload::from)
    }
}

/// The deepest a step's output may nest arrays and objects: later step calls and the order's
/// views carry it a few levels down, and must stay within what JSON readers take (serde_json:
/// 128).
pub const MAX_OUTPUT_DEPTH: usize = 64;

/// A step's output: the JSON its handler answered with, as compact text. It never changes once
/// the step succeeded, and every stored write of the order, the view and the body of every later
/// http step call carry it, so it is written once and shared by every copy of the order.
/// Compared as its text.
#[derive(Clone)]
pub struct Output(Arc<RawValue>);

impl Output {
    /// `value`, written compactly.
    pub fn of(value: &serde_json::Value) -> Result<Output, serde_json::Error> {
        serde_json::value::to_raw_value(value).map(|text| Output(Arc::from(text)))
    }

    /// The JSON `text` holds, written again compactly (whatever spacing it came with).
    pub fn read(text: &[u8]) -> Result<Output, serde_json::Error> {
        Output::of(&serde_json::from_slice(text)?)
    }

    /// Its JSON text, to embed as it is in what serde writes.
    pub fn json(&self) -> &RawValue {
        &self.0
    }

    /// Its JSON text.
    pub fn text(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for Output {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.text() == other.text()
    }
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

impl Serialize for Output {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Output {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(|text| Output(Arc::from(text)))
    }
}

/// The outputs of an order's steps that produced one, by step name (a step run again gives its
/// newest): what handlers of later steps are given. Serialized as a JSON object.
#[derive(Clone, Copy, Debug)]
pub struct Outputs<'a>(&'a [StepEntry]);

impl<'a> Outputs<'a> {
    /// Each step's output, in the order the steps ran.
    pub fn iter(self) -> impl Iterator<Item = (Step, &'a Output)> {
        let steps = self.0;
        steps.iter().enumerate().filter_map(move |(at, entry)| {
            let output = entry.output.as_ref()?;
            let later = steps.get(at + 1..).unwrap_or_default();
            let replaced = later
                .iter()
                .any(|other| other.step_name == entry.step_name && other.output.is_some());
            (!replaced).then_some((entry.step_name, output))
        })
    }
}

impl Serialize for Outputs<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        for (step, output) in self.iter() {
            map.serialize_entry(step.as_str(), output.json())?;
        }
        map.end()
    }
}

/// The stored order. Owner and epoch fence writes in a cluster: a commit goes through only while
/// the stored owner and epoch still match the writer's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: OrderId,
    pub user: String,
    /// Shared: it never changes after the order is accepted, and the order is copied at every
    /// transition. Read from JSON without one, it is a placeholder (see [`Order::lacks_payload`]).
    #[serde(default = "Payload::missing")]
    pub payload: Arc<Payload>,
    pub current_step: Step,
    #[serde(serialize_with = "super::rfc3339::serialize")]
    pub start_time: DateTime<Utc>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "super::rfc3339::option"
    )]
    pub complete_time: Option<DateTime<Utc>>,
    pub steps: Vec<StepEntry>,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// Steps still to roll back, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_rollback: Vec<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_state: Option<RollbackState>,
    /// Why the last compensation gave up, while the rollback is parked (the failure itself is
    /// kept unchanged in `failure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_error: Option<String>,
    #[serde(default)]
    pub cancel_requested: bool,
    /// The node that runs this order.
    pub owner: String,
    /// Bumped each time the order changes owner.
    pub epoch: u64,
    /// Bumped by each committed transition: a store takes a commit only over the revision it
    /// was made from, so a write delivered late (a retransmission after a network cut) cannot
    /// take the order back.
    #[serde(default)]
    pub revision: u64,
    /// The completion webhook, when the node that finished the order had one configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification: Option<Notification>,
    /// The W3C trace the order belongs to (absent in orders stored before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::trace::TraceContext>,
}

impl Order {
    /// Whether it was read without a payload (from a doc whose payload the store keeps apart).
    pub fn lacks_payload(&self) -> bool {
        Arc::ptr_eq(&self.payload, &Payload::missing())
    }

    /// A new order, just accepted: its first step is started at `now`.
    pub fn new(
        order_id: OrderId,
        user: String,
        payload: serde_json::Value,
        owner: String,
        now: DateTime<Utc>,
    ) -> Self {
        Order {
            order_id,
            user,
            payload: Arc::new(payload.into()),
            current_step: Step::Scheduling,
            start_time: now,
            complete_time: None,
            steps: {
                // Room for every entry a run can add (four steps and a terminal one), so the
                // vector is never regrown to twice that.
                let mut steps = Vec::with_capacity(Step::WORK.len() + 1);
                steps.push(StepEntry::started(Step::Scheduling, now));
                steps
            },
            phase: Phase::Forward,
            failure: None,
            pending_rollback: Vec::new(),
            rollback_state: None,
            rollback_error: None,
            cancel_requested: false,
            owner,
            epoch: 1,
            revision: 0,
            notification: None,
            trace: None,
        }
    }

    /// Terminal for its user: completed, or failed with its rollbacks done or parked.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// Whether the order finished before and was re-opened to retry its parked rollback: it
    /// keeps the error that parked it until the rollback is done. Its end was counted then.
    pub fn is_reopened(&self) -> bool {
        self.phase == Phase::RollingBack && self.rollback_error.is_some()
    }

    /// Whether a node still has work to do for the order: its steps or compensations, or the
    /// delivery of its completion webhook. An order that owes work stays in its owner's set, so
    /// a takeover moves it and a reconciliation resumes it.
    pub fn owes_work(&self) -> bool {
        !self.is_finished()
            || self
                .notification
                .as_ref()
                .is_some_and(Notification::is_pending)
    }

    /// How a finished order ended: `None` while it is unfinished. A finished order that did not
    /// complete carries the failure that ended it.
    pub fn outcome(&self) -> Option<Outcome<'_>> {
        if !self.is_finished() {
            return None;
        }
        match &self.failure {
            Some(failure) => Some(Outcome::Failed(failure)),
            None => Some(Outcome::Completed),
        }
    }

    /// The newest entry of a step.
    pub fn entry(&self, step: Step) -> Option<&StepEntry> {
        self.steps
            .iter()
            .rev()
            .find(|entry| entry.step_name == step)
    }

    pub fn entry_mut(&mut self, step: Step) -> Option<&mut StepEntry> {
        self.steps
            .iter_mut()
            .rev()
            .find(|entry| entry.step_name == step)
    }

    /// The outputs of the steps that produced one, for handlers of later steps.
    pub fn outputs(&self) -> Outputs<'_> {
        Outputs(&self.steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_is_written_once_and_compared_and_read_as_its_value() {
        let payload = Payload::from(serde_json::json!({"sku": "A1", "note": "caf\u{e9} \"x\""}));
        let text = payload.text().unwrap();
        assert_eq!(text, serde_json::to_string(&*payload).unwrap());
        // Kept: the same text, not written again.
        assert!(std::ptr::eq(text, payload.text().unwrap()));
        let read: Payload = serde_json::from_str(text).unwrap();
        assert_eq!(read, payload);
        assert_eq!(payload.to_string(), text);
        assert_ne!(read, Payload::from(serde_json::json!({"sku": "A2"})));
    }
    #[test]
    fn an_output_is_kept_compact_and_written_and_read_as_its_text() {
        let answer = "{ \"b\": [1, 2.5],\n  \"a\": \"caf\u{e9} \\\"x\\\"\" }";
        let output = Output::read(answer.as_bytes()).unwrap();
        assert_eq!(output.text(), r#"{"a":"café \"x\"","b":[1,2.5]}"#);
        let value: serde_json::Value = serde_json::from_str(output.text()).unwrap();
        let entry = serde_json::json!({ "output": value });
        let written = format!(r#"{{"output":{}}}"#, output.text());
        assert_eq!(serde_json::to_string(&entry).unwrap(), written);
        let read: Output = serde_json::from_str(output.text()).unwrap();
        assert_eq!(read, output);
        assert_eq!(serde_json::to_string(&read).unwrap(), output.text());
        assert_ne!(read, Output::read(b"{}").unwrap());
        assert!(Output::read(b"not json").is_err());
    }

    #[test]
    fn outputs_give_each_steps_newest_output_in_the_order_the_steps_ran() {
        let now = Utc::now();
        let with = |step, output: Option<&str>| StepEntry {
            output: output.map(|text| Output::read(text.as_bytes()).unwrap()),
            ..StepEntry::started(step, now)
        };
        let steps = [
            with(Step::Scheduling, Some(r#"{"slot":1}"#)),
            with(Step::PreProcessing, None),
            with(Step::Processing, Some(r#""first""#)),
            with(Step::Processing, Some(r#""again""#)),
            with(Step::Processing, None),
            with(Step::PostProcessing, Some("[]")),
        ];
        let outputs = Outputs(&steps);
        assert_eq!(
            serde_json::to_string(&outputs).unwrap(),
            r#"{"Scheduling":{"slot":1},"Processing":"again","Post-Processing":[]}"#
        );
        let get = |step| outputs.iter().find(|(name, _)| *name == step);
        assert_eq!(get(Step::Processing).unwrap().1.text(), r#""again""#);
        assert!(get(Step::PreProcessing).is_none());
        assert_eq!(serde_json::to_string(&Outputs(&[])).unwrap(), "{}");
    }
}
