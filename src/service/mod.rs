//! The application layer for orders: what a submission, a read, a listing, a cancel, a retry of
//! a parked rollback and a long poll do, and in which order, without HTTP. The REST layer
//! ([`crate::api`]) authenticates the caller, parses the request, calls [`Orders`] and maps an
//! [`OrderError`] to a status in one place.
//!
//! A submission goes: idempotency key checked, the user's in-flight cap ([`InFlight`]), a queue
//! slot reserved (so a full queue stores nothing), the order stored, counted, then queued.

mod activity;
mod error;
mod in_flight;
mod order_service;
#[cfg(test)]
mod tests;
mod wait;

pub use activity::LastActivity;
pub use error::OrderError;
pub use in_flight::{Admission, InFlight};
pub use order_service::OrderService;
pub use wait::Waited;

use crate::order::{CreatedView, Order, OrderId};
use crate::store::{ListQuery, Page};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// How a cancellation reaches the node that runs the order when that is another node of the
/// cluster (the cluster implements it).
#[async_trait]
pub trait Runners: Send + Sync + 'static {
    /// Tells node `owner` that order `id`, which it runs, is to stop: it wakes the order if it
    /// waits to retry, and skips the steps not begun. Best effort: the order's stored flag stops
    /// it at its next commit in any case.
    async fn tell_cancelled(&self, owner: &str, id: OrderId);
}

/// What the REST layer asks of the orders.
#[async_trait]
pub trait Orders: Send + Sync + 'static {
    /// Stores and queues a new order, or answers with the first order of a repeated key.
    async fn submit(&self, new: NewOrder) -> Result<Submitted, OrderError>;

    /// An order the scope may see; anything else is [`OrderError::NotFound`].
    async fn get(&self, scope: Scope<'_>, id: OrderId) -> Result<Order, OrderError>;

    /// A page of `user`'s orders, newest first.
    async fn list(&self, user: &str, query: &ListQuery) -> Result<Page, OrderError>;

    /// Asks `user`'s unfinished order to stop after its running step and roll back.
    async fn cancel(&self, user: &str, id: OrderId) -> Result<Order, OrderError>;

    /// Runs the parked compensations of `user`'s failed order again, on this node.
    async fn retry_rollback(&self, user: &str, id: OrderId) -> Result<Order, OrderError>;

    /// Sends the completion webhook of `user`'s finished order, which failed for good, again
    /// (with its retries anew), from this node.
    async fn redeliver(&self, user: &str, id: OrderId) -> Result<Order, OrderError>;

    /// The order once it is finished, or as it is when `wait` is over.
    async fn wait_one(
        &self,
        scope: Scope<'_>,
        id: OrderId,
        wait: Duration,
    ) -> Result<Arc<Order>, OrderError>;

    /// Waits until every named order is finished or `wait` is over.
    async fn wait_many(
        &self,
        scope: Scope<'_>,
        ids: Vec<OrderId>,
        wait: Duration,
    ) -> Result<Waited, OrderError>;
}

/// A submission, as the REST layer parsed it.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub user: String,
    /// The order's payload; it must be a JSON object.
    pub payload: serde_json::Value,
    /// A repeat of the same key by the same user gets the first order back.
    pub idempotency_key: Option<String>,
    /// The trace the order belongs to; `None` starts a new one.
    pub trace: Option<crate::trace::TraceContext>,
}

/// The answer to a submission.
#[derive(Debug)]
pub struct Submitted {
    pub order: CreatedView,
    /// The key was used before: `order` is the first order, nothing new was stored.
    pub replayed: bool,
}

/// Whose orders a caller may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Only this user's.
    User(&'a str),
    /// Anyone's (an admin).
    All,
}

impl Scope<'_> {
    /// Whether the order is one the scope may see.
    pub fn covers(self, order: &Order) -> bool {
        match self {
            Scope::User(user) => order.user == user,
            Scope::All => true,
        }
    }
}
