//! [`OrderService`]: the [`Orders`] of this node, over its store and its worker pool.

use super::wait::{wait_finished, wait_for_many, Waited};
use super::{InFlight, LastActivity, NewOrder, OrderError, Orders, Runners, Scope, Submitted};
use crate::metrics::Metrics;
use crate::order::{CreatedView, Order, OrderId};
use crate::pipeline::{Job, Pool};
use crate::store::{
    CancelOutcome, Created, ListQuery, OrderStore, Page, Reopen, Reopened, Reopening, StoreError,
};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// The longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// This node's orders: its store for what is kept, its worker pool for what runs.
pub struct OrderService {
    service_id: String,
    store: Arc<dyn OrderStore>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    in_flight: Arc<InFlight>,
    activity: Arc<LastActivity>,
    /// How long a client should wait before trying again after an overload.
    retry_after: Duration,
    /// The other nodes that run orders (cluster mode).
    runners: Option<Arc<dyn Runners>>,
}

impl OrderService {
    pub fn new(
        service_id: String,
        store: Arc<dyn OrderStore>,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        in_flight: InFlight,
        retry_after: Duration,
    ) -> Self {
        OrderService {
            service_id,
            store,
            pool,
            metrics,
            in_flight: Arc::new(in_flight),
            activity: Arc::new(LastActivity::new(chrono::Utc::now())),
            retry_after,
            runners: None,
        }
    }

    /// Passes cancellations of orders other nodes run on to them through `runners`.
    pub fn with_runners(mut self, runners: Arc<dyn Runners>) -> Self {
        self.runners = Some(runners);
        self
    }

    /// When this node last accepted, cancelled or re-queued an order.
    pub fn activity(&self) -> Arc<LastActivity> {
        Arc::clone(&self.activity)
    }

    /// A long poll begins only while the node is not stopping: those under way are answered
    /// as the drain begins, and one begun later would be answered at once, over and over, to a
    /// client that polls until its order ends. (One that does not wait is a plain read.)
    fn may_wait(&self, wait: Duration) -> Result<(), OrderError> {
        if !wait.is_zero() && self.pool.is_stopping() {
            return Err(OrderError::Stopping {
                retry_after: self.retry_after,
            });
        }
        Ok(())
    }

    /// A store failure; an order the store does not find (or finds another user's) is not found.
    fn store_error(&self, source: StoreError) -> OrderError {
        match source {
            StoreError::NotFound => OrderError::NotFound,
            source => OrderError::Store {
                source,
                retry_after: self.retry_after,
            },
        }
    }

    /// Re-opens `user`'s finished order `id` for `what` (see [`OrderStore::reopen`]) and runs
    /// it on this node.
    async fn reopen(&self, user: &str, id: OrderId, what: Reopening) -> Result<Order, OrderError> {
        if self.pool.is_stopping() {
            return Err(OrderError::Stopping {
                retry_after: self.retry_after,
            });
        }
        // Held from before the store makes it this node's to run: a reconciliation pass
        // meanwhile must not take it for one that nothing runs. (One active here already is
        // resumed as before: its run goes once more.)
        let held = self.pool.hold(id);
        // Re-opening and queueing run in a task of their own, as a submission's do: a client
        // that hangs up must not leave the order re-opened but not run.
        let (store, pool) = (Arc::clone(&self.store), Arc::clone(&self.pool));
        let activity = Arc::clone(&self.activity);
        let (user, node) = (user.to_string(), self.service_id.clone());
        let reopened = detached("re-opening", async move {
            let reopen = Reopen {
                id,
                user: &user,
                node: &node,
                now: chrono::Utc::now(),
                what,
            };
            let outcome = store.reopen(reopen).await?;
            if let Reopened::Accepted(order) = &outcome {
                match what {
                    Reopening::RollbackRetry => {
                        let pending: Vec<&str> = order
                            .pending_rollback
                            .iter()
                            .map(|step| step.as_str())
                            .collect();
                        tracing::info!(order_id = %order.order_id, trace_id = %crate::trace::trace_id(order), pending = %pending.join(", "), "retrying parked rollback");
                    }
                    Reopening::Redelivery => {
                        tracing::info!(order_id = %order.order_id, trace_id = %crate::trace::trace_id(order), "sending the webhook again");
                    }
                }
                match held {
                    Some(held) => held.resume(&pool),
                    None => pool.resume_all(vec![order.order_id]),
                }
                activity.touch();
            }
            Ok(outcome)
        })
        .await;
        match reopened.map_err(|error| self.order_error(id, error))? {
            Reopened::Accepted(order) => Ok(order),
            Reopened::Refused(_) => Err(match what {
                Reopening::RollbackRetry => OrderError::NotParked,
                Reopening::Redelivery => OrderError::NotifyNotFailed,
            }),
        }
    }

    /// A store error of a call on order `id` alone: one whose record does not read is said so.
    fn order_error(&self, id: OrderId, source: StoreError) -> OrderError {
        match source {
            StoreError::Corrupt(reason) => {
                tracing::warn!(order_id = %id, reason = %reason, "order record cannot be read");
                OrderError::Unreadable
            }
            source => self.store_error(source),
        }
    }
}

/// The key with surrounding blanks trimmed, `None` when blank; too long is invalid.
fn idempotency_key(key: Option<String>) -> Result<Option<String>, OrderError> {
    let key = key
        .map(|key| key.trim().to_string())
        .filter(|key| !key.is_empty());
    if key
        .as_ref()
        .is_some_and(|key| key.len() > MAX_IDEMPOTENCY_KEY)
    {
        return Err(OrderError::Invalid(format!(
            "Idempotency-Key longer than {MAX_IDEMPOTENCY_KEY} bytes"
        )));
    }
    Ok(key)
}

/// What storing a new order came to.
enum Stored {
    /// Stored now (or under the id its key had reserved).
    New(CreatedView),
    /// Its idempotency key's first order, asked for again with the same body.
    Replayed(CreatedView),
    /// Its idempotency key's first order, which had another body.
    KeyReused(OrderId),
}

#[async_trait]
impl Orders for OrderService {
    async fn submit(&self, new: NewOrder) -> Result<Submitted, OrderError> {
        if !new.payload.is_object() {
            return Err(OrderError::Invalid("body must be a JSON object".into()));
        }
        let key = idempotency_key(new.idempotency_key)?;
        let retry_after = self.retry_after;
        let Some(admission) = self
            .in_flight
            .admit(&new.user, |id| self.pool.is_active(id))
        else {
            return Err(OrderError::TooManyInFlight { retry_after });
        };
        // The queue slot first: when the node is full or stopping, nothing is stored.
        let Some(mut slot) = self.pool.try_reserve() else {
            self.metrics.order_shed();
            return Err(if self.pool.is_stopping() {
                OrderError::Stopping { retry_after }
            } else {
                OrderError::QueueFull { retry_after }
            });
        };
        let mut order = Order::new(
            self.store.new_order_id(&new.user, key.as_deref()),
            new.user,
            new.payload,
            self.service_id.clone(),
            chrono::Utc::now(),
        );
        order.trace = Some(
            new.trace
                .unwrap_or_else(crate::trace::TraceContext::new_root),
        );
        // Held here from before it is stored (a fresh id is never active already).
        slot.claim(order.order_id);
        // Storing and queueing run in a task of their own, the admission with them: a client
        // that hangs up drops this future, and must not leave an order stored but never queued,
        // nor one left out of its user's count.
        let store = Arc::clone(&self.store);
        let metrics = Arc::clone(&self.metrics);
        let activity = Arc::clone(&self.activity);
        let stored = detached("order creation", async move {
            let order = match store.create(&order, key.as_deref()).await? {
                Created::New => {
                    tracing::debug!(order_id = %order.order_id, trace_id = %crate::trace::trace_id(&order), user = %order.user, "new order created");
                    tracing::trace!(order_id = %order.order_id, trace_id = %crate::trace::trace_id(&order), payload = %order.payload, "new order payload");
                    Box::new(order)
                }
                Created::Adopted(order) => {
                    tracing::debug!(order_id = %order.order_id, trace_id = %crate::trace::trace_id(&order), user = %order.user, "new order created under the id its key reserved");
                    order
                }
                // The same key with another body is another order, not a retry: refused
                // rather than answered with the first order. (An order read without its
                // payload, kept apart, is taken as the same.)
                Created::Existing(first)
                    if !first.lacks_payload() && first.payload != order.payload =>
                {
                    return Ok(Stored::KeyReused(first.order_id));
                }
                Created::Existing(first) => {
                    return Ok(Stored::Replayed(CreatedView::from(first.as_ref())))
                }
            };
            let view = CreatedView::from(order.as_ref());
            metrics.order_accepted();
            activity.touch();
            slot.send(Job::New(order));
            admission.created(view.order_id);
            Ok(Stored::New(view))
        })
        .await;
        let view = match stored.map_err(|error| self.store_error(error))? {
            Stored::New(view) => view,
            Stored::Replayed(view) => {
                return Ok(Submitted {
                    order: view,
                    replayed: true,
                })
            }
            Stored::KeyReused(first) => return Err(OrderError::KeyReused(first)),
        };
        Ok(Submitted {
            order: view,
            replayed: false,
        })
    }

    async fn get(&self, scope: Scope<'_>, id: OrderId) -> Result<Order, OrderError> {
        visible(self.store.as_ref(), scope, id)
            .await
            .map_err(|error| self.order_error(id, error))?
            .ok_or(OrderError::NotFound)
    }

    async fn list(&self, user: &str, query: &ListQuery) -> Result<Page, OrderError> {
        self.store
            .list_for_user(user, query)
            .await
            .map_err(|error| self.store_error(error))
    }

    async fn cancel(&self, user: &str, id: OrderId) -> Result<Order, OrderError> {
        // In a task of its own, as a submission: a client that hangs up once the store took
        // the cancel must not keep the node that runs the order from hearing of it.
        let (store, pool) = (Arc::clone(&self.store), Arc::clone(&self.pool));
        let (activity, runners) = (Arc::clone(&self.activity), self.runners.clone());
        let (user, node) = (user.to_string(), self.service_id.clone());
        let asked = detached("cancel", async move {
            let outcome = store.request_cancel(id, &user).await?;
            if let CancelOutcome::Accepted(order) = &outcome {
                pool.note_cancel(order.order_id);
                activity.touch();
                tracing::debug!(order_id = %order.order_id, trace_id = %crate::trace::trace_id(order), "cancellation requested");
                if let Some(runners) = runners.filter(|_| order.owner != node) {
                    let (owner, id) = (order.owner.clone(), order.order_id);
                    tokio::spawn(async move { runners.tell_cancelled(&owner, id).await });
                }
            }
            Ok(outcome)
        })
        .await;
        match asked.map_err(|error| self.order_error(id, error))? {
            CancelOutcome::Accepted(order) => Ok(order),
            CancelOutcome::Finished(_) => Err(OrderError::Finished),
            CancelOutcome::AlreadyFailing(_) => Err(OrderError::AlreadyFailing),
        }
    }

    async fn retry_rollback(&self, user: &str, id: OrderId) -> Result<Order, OrderError> {
        self.reopen(user, id, Reopening::RollbackRetry).await
    }

    async fn redeliver(&self, user: &str, id: OrderId) -> Result<Order, OrderError> {
        // Its owner sends it: a node without a webhook would record it failed at once.
        if !self.pool.notifies() {
            return Err(OrderError::NoNotify);
        }
        self.reopen(user, id, Reopening::Redelivery).await
    }

    async fn wait_one(
        &self,
        scope: Scope<'_>,
        id: OrderId,
        wait: Duration,
    ) -> Result<Arc<Order>, OrderError> {
        self.may_wait(wait)?;
        wait_finished(self.store.as_ref(), self.pool.waiters(), scope, id, wait)
            .await
            .map_err(|error| self.order_error(id, error))?
            .ok_or(OrderError::NotFound)
    }

    async fn wait_many(
        &self,
        scope: Scope<'_>,
        ids: Vec<OrderId>,
        wait: Duration,
    ) -> Result<Waited, OrderError> {
        self.may_wait(wait)?;
        let runs_here = |id| self.pool.is_active(id);
        wait_for_many(
            self.store.as_ref(),
            self.pool.waiters(),
            &runs_here,
            scope,
            ids,
            wait,
        )
        .await
        .map_err(|error| self.store_error(error))
    }
}

/// Runs `work` in a task of its own, so that a caller hanging up (which drops the future that
/// awaits it) cannot cut it short between a store write and what must follow it; `what` names
/// it should the task fail.
async fn detached<T: Send + 'static>(
    what: &str,
    work: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::spawn(work)
        .await
        .map_err(|error| StoreError::Unavailable(format!("{what} stopped: {error}")))?
}

/// The order if it exists and the scope may see it.
pub(super) async fn visible(
    store: &dyn OrderStore,
    scope: Scope<'_>,
    id: OrderId,
) -> Result<Option<Order>, StoreError> {
    Ok(store.get(id).await?.filter(|order| scope.covers(order)))
}
