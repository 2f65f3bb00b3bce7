//! The step-handler trait: what runs (and compensates) one step of an order.

use crate::order::{Order, Step};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Arc;

/// What a handler is given. `idempotency_key` is `"{order_id}:{step}"`: the same for every
/// attempt, so a service can recognise a repeat (execution is at-least-once per step).
pub struct StepContext<'a> {
    pub order: &'a Order,
    pub step: Step,
    pub idempotency_key: String,
}

impl<'a> StepContext<'a> {
    pub fn new(order: &'a Order, step: Step) -> Self {
        StepContext {
            order,
            step,
            idempotency_key: format!("{}:{}", order.order_id, step),
        }
    }
}

/// Why a step (or its compensation) failed; `reason` is recorded in the order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct StepError {
    pub reason: String,
}

impl StepError {
    pub fn new(reason: impl Into<String>) -> Self {
        StepError {
            reason: reason.into(),
        }
    }
}

#[async_trait]
pub trait StepHandler: Send + Sync + 'static {
    /// Does the step's work. `Ok(Some(json))` is kept as the step's output for later steps.
    async fn run(&self, context: &StepContext<'_>) -> Result<Option<serde_json::Value>, StepError>;

    /// Undoes the step's work. Called for the failed step too, so it must cope with work that
    /// was never done.
    async fn rollback(&self, context: &StepContext<'_>) -> Result<(), StepError>;
}

/// The handler of each work step.
#[derive(Clone)]
pub struct Handlers {
    by_step: HashMap<Step, Arc<dyn StepHandler>>,
    fallback: Arc<dyn StepHandler>,
}

impl Handlers {
    /// Every step uses `fallback` unless `set` gives it its own handler.
    pub fn new(fallback: Arc<dyn StepHandler>) -> Self {
        Handlers {
            by_step: HashMap::new(),
            fallback,
        }
    }

    pub fn set(&mut self, step: Step, handler: Arc<dyn StepHandler>) {
        self.by_step.insert(step, handler);
    }

    pub fn for_step(&self, step: Step) -> &Arc<dyn StepHandler> {
        self.by_step.get(&step).unwrap_or(&self.fallback)
    }
}
