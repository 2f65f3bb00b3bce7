//! Long-poll support: requests waiting for an order to finish register here, and the executor
//! hands them the finished order when it commits its final transition on this node, so the
//! request needs no second read of the store. When an order's execution here ends, its waits
//! are released (they resolve with no order) to read the store themselves: the order may have
//! finished before they registered, or it runs elsewhere now.

use crate::order::{IdMap, IdSet, Order, OrderId};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use tokio::sync::{oneshot, watch};

#[derive(Default)]
pub struct Waiters {
    inner: Mutex<Inner>,
    /// True once the node begins to stop: every long poll is answered then, with the order as
    /// it is, rather than cut when the HTTP server stops.
    closing: watch::Sender<bool>,
}

#[derive(Default)]
struct Inner {
    by_order: IdMap<Vec<oneshot::Sender<Arc<Order>>>>,
    /// Orders that finished here while their execution goes on (e.g. it delivers the webhook): a
    /// wait registered meanwhile is released at once, as it would be when the execution ends.
    finished: IdSet,
}

impl Waiters {
    fn lock(&self) -> Option<MutexGuard<'_, Inner>> {
        self.inner.lock().ok()
    }

    /// Ends every long poll, now and to come: the node stops.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// True (now, or once changed) when long polls are to end at once.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// A receiver that resolves with the order once it finishes on this node, or fails when
    /// the wait is released (see [`Waiters::ended`]).
    pub fn register(&self, id: OrderId) -> oneshot::Receiver<Arc<Order>> {
        let (done_tx, done_rx) = oneshot::channel();
        if let Some(mut inner) = self.lock() {
            if !inner.finished.contains(&id) {
                inner.by_order.entry(id).or_default().push(done_tx);
            }
        }
        done_rx
    }

    /// A registration that resolves like [`Waiters::register`]'s receiver and forgets itself
    /// when dropped.
    pub fn watch(&self, id: OrderId) -> Watch<'_> {
        Watch {
            waiters: self,
            id,
            done_rx: Some(self.register(id)),
        }
    }

    /// Hands the finished order to everyone waiting for it. Until its execution ends, a wait
    /// that registers is released at once.
    pub fn notify(&self, order: &Order) {
        let waiting = self.lock().and_then(|mut inner| {
            inner.finished.insert(order.order_id);
            inner.by_order.remove(&order.order_id)
        });
        let Some(waiting) = waiting else { return };
        let finished = Arc::new(order.clone());
        for done_tx in waiting {
            let _ = done_tx.send(Arc::clone(&finished));
        }
    }

    /// The order's execution here ended: its waits are released, to read the store.
    pub fn ended(&self, id: OrderId) {
        let released = self.lock().and_then(|mut inner| {
            inner.finished.remove(&id);
            inner.by_order.remove(&id)
        });
        drop(released);
    }

    /// Forgets waiters of `id` that gave up (their receiver is gone), e.g. when the order
    /// finished on another node.
    pub fn prune(&self, id: OrderId) {
        if let Some(mut inner) = self.lock() {
            if let Some(waiting) = inner.by_order.get_mut(&id) {
                waiting.retain(|done_tx| !done_tx.is_closed());
                if waiting.is_empty() {
                    inner.by_order.remove(&id);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().map(|inner| inner.by_order.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One wait for an order to finish on this node: resolves with the finished order, or `None`
/// when none will come (the wait was released); once resolved, it stays resolved with `None`.
pub struct Watch<'a> {
    waiters: &'a Waiters,
    id: OrderId,
    done_rx: Option<oneshot::Receiver<Arc<Order>>>,
}

impl Future for Watch<'_> {
    type Output = Option<Arc<Order>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(done_rx) = self.done_rx.as_mut() else {
            return Poll::Ready(None);
        };
        let finished = std::task::ready!(Pin::new(done_rx).poll(cx)).ok();
        self.done_rx = None;
        Poll::Ready(finished)
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        drop(self.done_rx.take());
        self.waiters.prune(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> Order {
        Order::new(
            OrderId::new_v4(),
            "alice".into(),
            serde_json::json!({}),
            "node".into(),
            chrono::Utc::now(),
        )
    }

    #[tokio::test]
    async fn notify_wakes_and_prune_forgets() {
        let waiters = Waiters::default();
        let order = order();
        let id = order.order_id;
        let first = waiters.register(id);
        let second = waiters.register(id);
        drop(second);
        waiters.prune(id);
        assert_eq!(waiters.len(), 1);
        waiters.notify(&order);
        assert_eq!(first.await.map(|got| got.order_id).ok(), Some(id));
        assert!(waiters.is_empty());
        let gone = waiters.register(OrderId::new_v4());
        drop(gone);
        assert_eq!(waiters.len(), 1);
    }

    #[tokio::test]
    async fn a_wait_is_released_when_the_execution_ends_and_at_once_after_a_finish_here() {
        let waiters = Waiters::default();
        let order = order();
        let id = order.order_id;
        // The execution ends without a finish here: the wait resolves with nothing.
        let early = waiters.watch(id);
        waiters.ended(id);
        assert_eq!(early.await.map(|got| got.order_id), None);
        // Finished here while the execution goes on: a wait that comes now is released at once.
        waiters.notify(&order);
        assert!(waiters.watch(id).await.is_none());
        assert!(waiters.is_empty());
        // Once the execution ended, a wait is handed the next finish again.
        waiters.ended(id);
        let later = waiters.watch(id);
        waiters.notify(&order);
        assert_eq!(later.await.map(|got| got.order_id), Some(id));
    }

    #[tokio::test]
    async fn a_watch_resolves_once_and_forgets_itself_when_dropped() {
        let waiters = Waiters::default();
        let order = order();
        let watch = waiters.watch(order.order_id);
        waiters.notify(&order);
        assert_eq!(watch.await.map(|got| got.order_id), Some(order.order_id));
        waiters.ended(order.order_id);
        let abandoned = waiters.watch(order.order_id);
        assert_eq!(waiters.len(), 1);
        drop(abandoned);
        assert!(waiters.is_empty());
    }
}
