//! The orders a node is executing, has queued, or keeps waiting for a retry, so that no order runs
//! twice at once on one node, and a request to run one again while it runs is not lost.

use crate::order::{IdMap, OrderId};
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use tokio::sync::watch;

/// Order id → whether it must be loaded and driven once more when its current execution ends.
///
/// Why a lock: the API, the pool and every execution mark and unmark orders from their own
/// tasks; each call holds it for one map operation.
#[derive(Debug, Default)]
pub struct ActiveOrders {
    orders: Mutex<IdMap<bool>>,
    /// How many orders `orders` holds, to read without the lock.
    count: AtomicUsize,
    /// Bumped on each rerun asked for, so orders waiting for a retry look whether it is theirs.
    asked_tx: watch::Sender<u64>,
}

impl ActiveOrders {
    /// How many orders are active here (at most a moment old).
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn contains(&self, id: OrderId) -> bool {
        self.orders
            .lock()
            .map(|active| active.contains_key(&id))
            .unwrap_or(false)
    }

    /// Changes whenever a rerun (of any order) is asked for.
    pub fn subscribe_reruns(&self) -> watch::Receiver<u64> {
        self.asked_tx.subscribe()
    }

    /// True (and the flag cleared) when a rerun of `id` was asked for: an order waiting for a
    /// retry then reads the store at once, as it may have changed there (a retried rollback).
    pub fn take_rerun(&self, id: OrderId) -> bool {
        self.orders
            .lock()
            .map(|mut active| match active.get_mut(&id) {
                Some(rerun) => std::mem::take(rerun),
                None => false,
            })
            .unwrap_or(false)
    }

    /// Records an order as active; false if it already was.
    pub fn mark(&self, id: OrderId) -> bool {
        self.orders
            .lock()
            .map(|mut active| match active.entry(id) {
                Entry::Occupied(_) => false,
                Entry::Vacant(slot) => {
                    slot.insert(false);
                    self.count.fetch_add(1, Ordering::Relaxed);
                    true
                }
            })
            .unwrap_or(true)
    }

    /// Like `mark`, but an order already active is flagged to be loaded and driven once more when
    /// its execution ends: it may have changed in the store meanwhile (e.g. a parked rollback
    /// retried just as the execution that parked it was ending). True if it was not active.
    pub fn mark_or_rerun(&self, id: OrderId) -> bool {
        let fresh = self
            .orders
            .lock()
            .map(|mut active| match active.entry(id) {
                Entry::Occupied(mut slot) => {
                    slot.insert(true);
                    false
                }
                Entry::Vacant(slot) => {
                    slot.insert(false);
                    self.count.fetch_add(1, Ordering::Relaxed);
                    true
                }
            })
            .unwrap_or(true);
        if !fresh {
            self.asked_tx
                .send_modify(|count| *count = count.wrapping_add(1));
        }
        fresh
    }

    /// At the end of an execution: true (and the flag cleared) when a rerun was asked for, else
    /// the order is no longer active. One lock, so a rerun request is never lost in between.
    pub fn finish_or_rerun(&self, id: OrderId) -> bool {
        let Ok(mut active) = self.orders.lock() else {
            return false;
        };
        match active.get_mut(&id) {
            Some(rerun) if *rerun => {
                *rerun = false;
                true
            }
            _ => {
                if active.remove(&id).is_some() {
                    self.count.fetch_sub(1, Ordering::Relaxed);
                }
                false
            }
        }
    }

    pub fn unmark(&self, id: OrderId) {
        if let Ok(mut active) = self.orders.lock() {
            if active.remove(&id).is_some() {
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
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
        assert_eq!(active.len(), 1);
        assert!(!active.finish_or_rerun(id), "no rerun was asked for");
        assert_eq!(active.len(), 0);
        assert!(active.mark(id), "inactive again after its execution");
        active.unmark(id);
        active.unmark(id);
        assert_eq!(active.len(), 0, "counted once");
        assert!(active.mark_or_rerun(id), "not active: run it");
        assert!(!active.mark_or_rerun(id));
        assert_eq!(active.len(), 1);
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
    }

    #[tokio::test]
    async fn a_rerun_asked_for_wakes_waits_and_is_taken_once() {
        let active = ActiveOrders::default();
        let (id, other) = (OrderId::new_v4(), OrderId::new_v4());
        let mut asked_rx = active.subscribe_reruns();
        assert!(active.mark(id));
        assert!(
            active.mark_or_rerun(other),
            "not active: no rerun to ask for"
        );
        assert!(!asked_rx.has_changed().unwrap(), "nobody woken");
        assert!(!active.mark_or_rerun(id));
        asked_rx.changed().await.unwrap();
        assert!(!active.take_rerun(other));
        assert!(active.take_rerun(id), "taken by the wait");
        assert!(!active.take_rerun(id), "once");
        assert!(active.contains(id), "still active");
        assert!(!active.finish_or_rerun(id), "taken, so not run once more");
        assert!(active.mark(id));
    }
}
