//! Long-poll support: requests waiting for an order to finish register here, and the executor
//! wakes them when it commits the order's final transition on this node.

use crate::order::OrderId;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::oneshot;

#[derive(Default)]
pub struct Waiters {
    by_order: Mutex<HashMap<OrderId, Vec<oneshot::Sender<()>>>>,
}

impl Waiters {
    /// A receiver that resolves once `id` finishes on this node.
    pub fn register(&self, id: OrderId) -> oneshot::Receiver<()> {
        let (done_tx, done_rx) = oneshot::channel();
        if let Ok(mut by_order) = self.by_order.lock() {
            by_order.entry(id).or_default().push(done_tx);
        }
        done_rx
    }

    /// Wakes everyone waiting for `id`.
    pub fn notify(&self, id: OrderId) {
        let waiting = match self.by_order.lock() {
            Ok(mut by_order) if !by_order.is_empty() => by_order.remove(&id),
            _ => None,
        };
        for done_tx in waiting.into_iter().flatten() {
            let _ = done_tx.send(());
        }
    }

    /// Forgets waiters of `id` that gave up (their receiver is gone), e.g. when the order
    /// finished on another node.
    pub fn prune(&self, id: OrderId) {
        if let Ok(mut by_order) = self.by_order.lock() {
            if let Some(waiting) = by_order.get_mut(&id) {
                waiting.retain(|done_tx| !done_tx.is_closed());
                if waiting.is_empty() {
                    by_order.remove(&id);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_order
            .lock()
            .map(|by_order| by_order.len())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notify_wakes_and_prune_forgets() {
        let waiters = Waiters::default();
        let id = OrderId::new_v4();
        let first = waiters.register(id);
        let second = waiters.register(id);
        drop(second);
        waiters.prune(id);
        assert_eq!(waiters.len(), 1);
        waiters.notify(id);
        assert!(first.await.is_ok());
        assert!(waiters.is_empty());
        let gone = waiters.register(OrderId::new_v4());
        drop(gone);
        assert_eq!(waiters.len(), 1);
    }
}
