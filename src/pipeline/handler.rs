//! The step-handler trait: what runs (and compensates) one step of an order.
//!
//! A handler makes ONE attempt and says how it went; the executor owns retries, so the retry
//! schedule can be stored with the order and survive restarts and takeovers.

use super::notify::Notifier;
use super::retry::RetryPolicy;
use crate::order::{Order, Output, Step};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// What a handler is given.
pub struct StepContext<'a> {
    pub order: &'a Order,
    pub step: Step,
    /// Whether this attempt undoes the step.
    pub rollback: bool,
    /// 1 for the first attempt in this direction; counts on across restarts.
    pub attempt: u32,
    /// The call this attempt makes: its `traceparent` (the order's trace, a span of its own).
    pub call: crate::trace::spans::Call,
}

impl<'a> StepContext<'a> {
    /// The context of attempt number `attempt` at running (or undoing) `step`.
    pub fn attempt(order: &'a Order, step: Step, rollback: bool, attempt: u32) -> Self {
        StepContext {
            order,
            step,
            rollback,
            attempt,
            call: crate::trace::spans::Call::start(order, step, rollback, attempt),
        }
    }

    /// The same for every attempt of the same direction, so a service can recognise a repeat
    /// (execution is at-least-once per step): `"{order_id}:{step}"` to run the step,
    /// `"{order_id}:{step}:rollback"` to undo it. Made when asked: only handlers that call a
    /// service send it.
    pub fn idempotency_key(&self) -> String {
        let mut id = uuid::Uuid::encode_buffer();
        let id = self.order.order_id.hyphenated().encode_lower(&mut id);
        let step = self.step.as_str();
        let mut key = String::with_capacity(id.len() + step.len() + ":rollback".len() + 1);
        key.push_str(id);
        key.push(':');
        key.push_str(step);
        if self.rollback {
            key.push_str(":rollback");
        }
        key
    }

    /// The `traceparent` header value a call for this attempt sends.
    pub fn traceparent(&self) -> String {
        self.call.traceparent()
    }
}

/// A successful attempt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepDone {
    /// Kept as the step's output and handed to later steps and rollbacks (ignored for rollbacks).
    pub output: Option<Output>,
    /// The HTTP status, for handlers that call a service.
    pub status: Option<u16>,
}

/// The outcome of an attempt known before it ends (see [`StepHandler::decided`]).
pub struct Decided {
    /// How long the attempt takes.
    pub lasts: Duration,
    pub result: Result<StepDone, StepError>,
}

/// Why a step (or its compensation) failed; `reason` is recorded in the order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct StepError {
    pub reason: String,
    /// Worth another attempt (a 5xx, a timeout, a refused connection); else permanent.
    pub retryable: bool,
    /// The HTTP status, when the service answered.
    pub status: Option<u16>,
    /// How long the service asked to be left alone (its `Retry-After`): the executor waits this
    /// long, within the retry policy's bounds, instead of its own backoff.
    pub retry_after: Option<Duration>,
}

impl StepError {
    /// A permanent failure.
    pub fn new(reason: impl Into<String>) -> Self {
        StepError {
            reason: reason.into(),
            retryable: false,
            status: None,
            retry_after: None,
        }
    }

    /// A failure another attempt may get past.
    pub fn retryable(reason: impl Into<String>) -> Self {
        StepError {
            reason: reason.into(),
            retryable: true,
            status: None,
            retry_after: None,
        }
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    pub fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }
}

#[async_trait]
pub trait StepHandler: Send + Sync + 'static {
    /// One attempt at the step's work. `output` of the success is kept for later steps.
    async fn run(&self, context: &StepContext<'_>) -> Result<StepDone, StepError>;

    /// One attempt at undoing the step's work. Called for the failed step too, so it must cope
    /// with work that was never done.
    async fn rollback(&self, context: &StepContext<'_>) -> Result<StepDone, StepError>;

    /// For a handler that calls nothing and only takes time (the `simulate` handler): the
    /// attempt's outcome, decided now, and how long the attempt lasts. The executor then holds
    /// the order as data until then instead of awaiting `run` (or `rollback`). `None`: await it.
    fn decided(&self, _context: &StepContext<'_>, _rollback: bool) -> Option<Decided> {
        None
    }

    /// The room for calls in one direction that this handler's orders share (a step's
    /// `concurrency`), if limited: the executor takes a place before its last check of the
    /// order's lease, so no call waits for room after that check. `None`: unlimited.
    fn room(&self, _rollback: bool) -> Option<&Semaphore> {
        None
    }

    /// How failed attempts in one direction are retried. `None`: one attempt, no attempt
    /// records, any failure is final (the `simulate` handler, or a rollback with nothing to undo).
    fn retry_policy(&self, _rollback: bool) -> Option<RetryPolicy> {
        None
    }
}

/// The handler of each work step, and the completion webhook if there is one.
#[derive(Clone)]
pub struct Handlers {
    by_step: HashMap<Step, Arc<dyn StepHandler>>,
    fallback: Arc<dyn StepHandler>,
    notifier: Option<Arc<Notifier>>,
}

impl Handlers {
    /// Every step uses `fallback` unless `set` gives it its own handler.
    pub fn new(fallback: Arc<dyn StepHandler>) -> Self {
        Handlers {
            by_step: HashMap::new(),
            fallback,
            notifier: None,
        }
    }

    pub fn set_notifier(&mut self, notifier: Arc<Notifier>) {
        self.notifier = Some(notifier);
    }

    pub fn notifier(&self) -> Option<&Arc<Notifier>> {
        self.notifier.as_ref()
    }

    pub fn set(&mut self, step: Step, handler: Arc<dyn StepHandler>) {
        self.by_step.insert(step, handler);
    }

    pub fn for_step(&self, step: Step) -> &Arc<dyn StepHandler> {
        self.by_step.get(&step).unwrap_or(&self.fallback)
    }
}
