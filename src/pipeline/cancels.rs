//! Cancellations requested through this node. The executor checks them before each step (and
//! [`Shared::note_cancel`](super::shared::Shared::note_cancel) wakes an order waiting for a retry,
//! so a cancelled one need not wait it out).

use crate::order::{IdSet, OrderId};
use std::sync::Mutex;

pub(super) struct Cancellations {
    /// The orders whose cancellation was noted and whose execution has not ended yet.
    ids: Mutex<IdSet>,
}

impl Cancellations {
    pub(super) fn new() -> Self {
        Cancellations {
            ids: Mutex::new(IdSet::default()),
        }
    }

    /// Notes a cancellation of `id`.
    pub(super) fn note(&self, id: OrderId) {
        // Why a lock: the API notes and executions read and forget from many tasks at once.
        if let Ok(mut ids) = self.ids.lock() {
            ids.insert(id);
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_noted_cancellation_is_kept_until_forgotten() {
        let cancels = Cancellations::new();
        let id = OrderId::new_v4();
        assert!(!cancels.contains(id));
        cancels.note(id);
        assert!(cancels.contains(id));
        assert!(!cancels.contains(OrderId::new_v4()));
        cancels.forget(id);
        assert!(!cancels.contains(id));
    }
}
