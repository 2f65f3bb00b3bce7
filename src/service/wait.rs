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
use std::collections::HashSet;
use std::future::Future;
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
    // Released once (watched again once, so that a finish in a new execution here is handed
    // over too), then woken for good.
    let (mut released, mut woken) = (false, false);
    let mut closing = waiters.closing();
    while !order.is_finished() && Instant::now() < deadline && !*closing.borrow() {
        // Handed the finished order when it ends on this node; otherwise read again now and
        // then, since it may be running on another node; or, as the node stops, once more.
        let recheck = deadline.min(Instant::now() + WAIT_RECHECK);
        let (finished, from_watch) = tokio::select! {
            finished = &mut watch, if !woken => (finished, true),
            _ = sleep_until(recheck) => (None, false),
            _ = closing.changed() => (None, false),
        };
        if from_watch {
            if finished.is_none() && !released {
                // Registered before the read below, as the first watch was.
                released = true;
                watch = waiters.watch(id);
            } else {
                woken = true;
            }
        }
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

/// Waits until every one of `ids` (repeats count once) is finished, or `wait` is over. An order
/// that runs on this node (`runs_here`) is not read at first: it is handed over when it
/// finishes here, or its wait is released to read the store when its execution ends here;
/// every order still pending is read again now and then (it may have moved to another node).
pub async fn wait_for_many(
    store: &dyn OrderStore,
    waiters: &Waiters,
    runs_here: &(dyn Fn(OrderId) -> bool + Sync),
    scope: Scope<'_>,
    mut ids: Vec<OrderId>,
    wait: Duration,
) -> Result<Waited, StoreError> {
    let mut seen = HashSet::new();
    ids.retain(|id| seen.insert(*id));
    // Registered before anything is looked at, so a finish in between is not missed.
    let mut woken: FuturesUnordered<_> = ids.iter().map(|id| watched(waiters, *id)).collect();
    let deadline = Instant::now() + wait;
    let mut to_read: Vec<OrderId> = ids.iter().copied().filter(|id| !runs_here(*id)).collect();
    let mut waited = Waited {
        pending: ids,
        ..Waited::default()
    };
    // Read at least once in this wait; released once (watched again once, so that a finish in
    // a new execution here is handed over too).
    let (mut read, mut released) = (HashSet::new(), HashSet::new());
    let mut closing = waiters.closing();
    loop {
        if !to_read.is_empty() {
            read.extend(to_read.iter().copied());
            sort(store, scope, &mut waited, &to_read).await?;
            to_read.clear();
        }
        if waited.pending.is_empty() || Instant::now() >= deadline || *closing.borrow() {
            break;
        }
        let recheck = deadline.min(Instant::now() + WAIT_RECHECK);
        // Handed finished orders as they end on this node; all are read again now and then.
        to_read = tokio::select! {
            Some((id, handed)) = woken.next() => {
                let Some(position) = waited.pending.iter().position(|pending| *pending == id) else {
                    continue;
                };
                match handed {
                    Some(order) if scope.covers(&order) => {
                        waited.pending.swap_remove(position);
                        waited.finished.push(order);
                        Vec::new()
                    }
                    // Not the caller's: the read tells it so.
                    Some(_) => vec![id],
                    // Released: read now, and watch once more in case it runs here again.
                    None if released.insert(id) => {
                        woken.push(watched(waiters, id));
                        vec![id]
                    }
                    None => Vec::new(),
                }
            }
            _ = sleep_until(recheck) => waited.pending.clone(),
            // The node stops: all are read once more, and the wait answered.
            _ = closing.changed() => waited.pending.clone(),
        };
    }
    drop(woken);
    // What ran here may not have been read yet: read it now, so that an order the caller may
    // not see is reported missing, never pending.
    let unread: Vec<OrderId> = waited
        .pending
        .iter()
        .copied()
        .filter(|id| !read.contains(id))
        .collect();
    if !unread.is_empty() {
        sort(store, scope, &mut waited, &unread).await?;
    }
    Ok(waited)
}

/// The watch of `id` in `waiters`, as a future of the id and what it resolved with.
fn watched(
    waiters: &Waiters,
    id: OrderId,
) -> impl Future<Output = (OrderId, Option<Arc<Order>>)> + '_ {
    let watch = waiters.watch(id);
    async move { (id, watch.await) }
}

/// Reads `ids` (all pending in `waited`) and moves the finished ones to `waited.finished`, and
/// the unknown ones and those `scope` may not see to `waited.missing`.
async fn sort(
    store: &dyn OrderStore,
    scope: Scope<'_>,
    waited: &mut Waited,
    ids: &[OrderId],
) -> Result<(), StoreError> {
    let reads = store.get_many(ids).await;
    for (id, read) in ids.iter().zip(reads) {
        let read = match read {
            // Its record does not read (its `GET` says so): it stays pending, and the others
            // are answered for.
            Err(StoreError::Corrupt(_)) => continue,
            read => read?,
        };
        let outcome = match read.filter(|order| scope.covers(order)) {
            Some(order) if order.is_finished() => Some(Arc::new(order)),
            Some(_) => continue,
            None => None,
        };
        let Some(position) = waited.pending.iter().position(|pending| pending == id) else {
            continue;
        };
        waited.pending.swap_remove(position);
        match outcome {
            Some(order) => waited.finished.push(order),
            None => waited.missing.push(*id),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    /// A wait released when the order's execution here ended, with the order not finished in
    /// the store (it is to run here again), is handed the order when it finishes here then.
    #[tokio::test]
    async fn a_single_wait_released_is_handed_a_finish_in_a_new_execution_here() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let waiters = &Waiters::default();
        let order = Order::new(
            OrderId::now_v7(),
            "alice".into(),
            serde_json::json!({}),
            "node-a".into(),
            chrono::Utc::now(),
        );
        store.create(&order, None).await.unwrap();
        let id = order.order_id;
        let wait = wait_finished(
            &store,
            waiters,
            Scope::User("alice"),
            id,
            Duration::from_secs(5),
        );
        let run = async {
            // The wait is registered (first, and again after its release).
            let registered = || async move {
                let deadline = Instant::now() + Duration::from_secs(3);
                while waiters.len() != 1 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            };
            registered().await;
            waiters.ended(id);
            registered().await;
            let mut finished = order.clone();
            finished.phase = crate::order::Phase::Finished;
            finished.current_step = crate::order::Step::Completed;
            waiters.notify(&finished);
        };
        let (waited, ()) = tokio::join!(wait, run);
        let waited = waited.unwrap().unwrap();
        assert!(waited.is_finished(), "not handed the finish: {waited:?}");
    }
}
