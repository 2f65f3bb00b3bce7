//! The orders a node is executing, has queued, or keeps waiting for a retry, so that no order runs
//! twice at once on one node, and a request to run one again while it runs is not lost.

use crate::order::{IdMap, OrderId};
use std::collections::hash_map::Entry;
use std::sync::Mutex;

/// Order id → whether it must be loaded and driven once more when its current execution ends.
///
/// Why a lock: the API, the pool and every execution mark and unmark orders from their own
/// tasks; each call holds it for one map operation.
#[derive(Debug, Default)]
pub struct ActiveOrders(Mutex<IdMap<bool>>);

impl ActiveOrders {
    pub fn contains(&self, id: OrderId) -> bool {
        self.0
            .lock()
            .map(|active| active.contains_key(&id))
            .unwrap_or(false)
    }

    /// Records an order as active; false if it already was.
    pub fn mark(&self, id: OrderId) -> bool {
        self.0
            .lock()
            .map(|mut active| match active.entry(id) {
                Entry::Occupied(_) => false,
                Entry::Vacant(slot) => {
                    slot.insert(false);
                    true
                }
            })
            .unwrap_or(true)
    }

    /// Like `mark`, but an order already active is flagged to be loaded and driven once more when
    /// its execution ends: it may have changed in the store meanwhile (e.g. a parked rollback
    /// retried just as the execution that parked it was ending). True if it was not active.
    pub fn mark_or_rerun(&self, id: OrderId) -> bool {
        self.0
            .lock()
            .map(|mut active| match active.entry(id) {
                Entry::Occupied(mut slot) => {
                    slot.insert(true);
                    false
                }
                Entry::Vacant(slot) => {
                    slot.insert(false);
                    true
                }
            })
            .unwrap_or(true)
    }

    /// At the end of an execution: true (and the flag cleared) when a rerun was asked for, else
    /// the order is no longer active. One lock, so a rerun request is never lost in between.
    pub fn finish_or_rerun(&self, id: OrderId) -> bool {
        let Ok(mut active) = self.0.lock() else {
            return false;
        };
        match active.get_mut(&id) {
            Some(rerun) if *rerun => {
                *rerun = false;
                true
            }
            _ => {
                active.remove(&id);
                false
            }
        }
    }

    pub fn unmark(&self, id: OrderId) {
        if let Ok(mut active) = self.0.lock() {
            active.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_is_active_once() {
        let active = ActiveOrders::default();
        let id = OrderId::new_v4();
        assert!(active.mark(id));
        assert!(!active.mark(id));
        assert!(!active.finish_or_rerun(id), "no rerun was asked for");
        assert!(active.mark(id), "inactive again after its execution");
        active.unmark(id);
        assert!(active.mark_or_rerun(id), "not active: run it");
    }

    #[test]
    fn a_rerun_asked_for_while_running_runs_once_more() {
        let active = ActiveOrders::default();
        let id = OrderId::new_v4();
        assert!(active.mark(id));
        assert!(
            !active.mark_or_rerun(id),
            "already running: flagged, not queued"
        );
        assert!(
            !active.mark_or_rerun(id),
            "asking twice still means once more"
        );
        assert!(active.finish_or_rerun(id), "runs once more");
        assert!(!active.mark(id), "still active during the rerun");
        assert!(!active.finish_or_rerun(id), "then it is done");
        assert!(active.mark(id));
    }
}
