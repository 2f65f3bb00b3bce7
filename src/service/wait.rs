//! The long-poll engine: waits for orders to finish. This node's executor hands over the orders
//! that finish here ([`Waiters`]); the store is read again now and then for those that run, or
//! finished, elsewhere.

use super::order_service::visible;
use super::Scope;
use crate::order::{Order, OrderId};
use crate::pipeline::Waiters;
use crate::store::{OrderStore, StoreError};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{sleep_until, Instant};

/// How often a long poll re-reads the store, for orders that finish on another node (or were
/// taken over by one). An order finishing here is handed over at once, so this is only the
/// fallback: slow enough that a batch of 500 waiting ids costs the store 250 reads a second.
const WAIT_RECHECK: Duration = Duration::from_secs(2);

/// What a wait for many orders found.
#[derive(Debug, Default)]
pub struct Waited {
    /// Finished, in the order they were seen to finish.
    pub finished: Vec<Arc<Order>>,
    /// Not finished when the wait was over.
    pub pending: Vec<OrderId>,
    /// Unknown, or not the caller's to see.
    pub missing: Vec<OrderId>,
}

/// The order once it is finished, or as it is when `wait` is over; `None` when the scope may
/// not see it.
pub async fn wait_finished(
    store: &dyn OrderStore,
    waiters: &Waiters,
    scope: Scope<'_>,
    id: OrderId,
    wait: Duration,
) -> Result<Option<Arc<Order>>, StoreError> {
    // Registered before the first read, so a finish in between is not missed.
    let mut watch = waiters.watch(id);
    let deadline = Instant::now() + wait;
    let Some(order) = visible(store, scope, id).await? else {
        return Ok(None);
    };
    let mut order = Arc::new(order);
    let mut woken = false;
    while !order.is_finished() && Instant::now() < deadline {
        // Handed the finished order when it ends on this node; otherwise read again now and
        // then, since it may be running on another node.
        let recheck = deadline.min(Instant::now() + WAIT_RECHECK);
        let finished = tokio::select! {
            finished = &mut watch, if !woken => {
                woken = true;
                finished
            }
            _ = sleep_until(recheck) => None,
        };
        order = match finished {
            Some(finished) if scope.covers(&finished) => finished,
            _ => match visible(store, scope, id).await? {
                Some(order) => Arc::new(order),
                None => return Ok(None),
            },
        };
    }
    Ok(Some(order))
}

/// Waits until every one of `ids` (repeats count once) is finished, or `wait` is over.
pub async fn wait_for_many(
    store: &dyn OrderStore,
    waiters: &Waiters,
    scope: Scope<'_>,
    mut ids: Vec<OrderId>,
    wait: Duration,
) -> Result<Waited, StoreError> {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    // Registered before the first read, so a finish in between is not missed.
    let mut woken: FuturesUnordered<_> = ids
        .iter()
        .map(|id| {
            let watch = waiters.watch(*id);
            let id = *id;
            async move { (id, watch.await) }
        })
        .collect();
    let deadline = Instant::now() + wait;
    let mut waited = Waited {
        pending: ids,
        ..Waited::default()
    };
    let mut failure = None;
    let mut first = true;
    while !waited.pending.is_empty() {
        if !first {
            let recheck = deadline.min(Instant::now() + WAIT_RECHECK);
            // Handed finished orders as they end on this node; the rest (running elsewhere, or
            // finished between registration and the first read) are read again now and then.
            tokio::select! {
                Some((id, Some(order))) = woken.next() => {
                    if scope.covers(&order) {
                        if let Some(position) = waited.pending.iter().position(|pending| *pending == id) {
                            waited.pending.swap_remove(position);
                            waited.finished.push(order);
                        }
                    }
                    continue;
                }
                _ = sleep_until(recheck) => {}
            }
        }
        first = false;
        let reads = store.get_many(&waited.pending).await;
        let mut still = Vec::new();
        for (id, read) in waited.pending.iter().zip(reads) {
            let read = read.map(|order| order.filter(|order| scope.covers(order)));
            match read {
                Ok(Some(order)) if order.is_finished() => waited.finished.push(Arc::new(order)),
                Ok(Some(_)) => still.push(*id),
                Ok(None) => waited.missing.push(*id),
                Err(error) => {
                    failure = Some(error);
                    still.push(*id);
                }
            }
        }
        waited.pending = still;
        if failure.is_some() || Instant::now() >= deadline {
            break;
        }
    }
    drop(woken);
    match failure {
        Some(error) => Err(error),
        None => Ok(waited),
    }
}
