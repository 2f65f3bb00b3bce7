//! Cancellations requested through this node. The executor checks them before each step, and a
//! noted cancellation wakes orders waiting for a retry so a cancelled one need not wait it out.

use crate::order::{IdSet, OrderId};
use std::sync::Mutex;
use tokio::sync::watch;

pub(super) struct Cancellations {
    /// The orders whose cancellation was noted and whose execution has not ended yet.
    ids: Mutex<IdSet>,
    /// Bumped on each noted cancellation.
    noted_tx: watch::Sender<u64>,
}

impl Cancellations {
    pub(super) fn new() -> Self {
        Cancellations {
            ids: Mutex::new(IdSet::default()),
            noted_tx: watch::Sender::new(0),
        }
    }

    /// Notes a cancellation of `id` and wakes everyone who subscribed.
    pub(super) fn note(&self, id: OrderId) {
        // Why a lock: the API notes and executions read and forget from many tasks at once.
        if let Ok(mut ids) = self.ids.lock() {
            ids.insert(id);
        }
        self.noted_tx
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    pub(super) fn contains(&self, id: OrderId) -> bool {
        // Why a lock: see `note`; held only for the lookup.
        self.ids
            .lock()
            .map(|ids| ids.contains(&id))
            .unwrap_or(false)
    }

    /// Forgets `id` once its execution here has ended.
    pub(super) fn forget(&self, id: OrderId) {
        // Why a lock: see `note`; held only for the removal.
        if let Ok(mut ids) = self.ids.lock() {
            ids.remove(&id);
        }
    }

    /// How many orders are noted.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.ids.lock().map(|ids| ids.len()).unwrap_or(0)
    }

    /// Changes whenever a cancellation (of any order) is noted.
    pub(super) fn subscribe(&self) -> watch::Receiver<u64> {
        self.noted_tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_noted_cancellation_wakes_subscribers_until_forgotten() {
        let cancels = Cancellations::new();
        let id = OrderId::new_v4();
        let mut noted_rx = cancels.subscribe();
        assert!(!cancels.contains(id));
        cancels.note(id);
        noted_rx.changed().await.unwrap();
        assert!(cancels.contains(id));
        assert!(!cancels.contains(OrderId::new_v4()));
        cancels.forget(id);
        assert!(!cancels.contains(id));
    }
}
