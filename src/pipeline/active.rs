//! The orders a node is executing, has queued, or keeps waiting for a retry, so that no order runs
//! twice at once on one node, and a request to run one again while it runs is not lost.

use crate::order::{IdMap, OrderId};
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Order id → what is asked of it.
///
/// Why a lock: the API, the pool and every execution mark and unmark orders from their own
/// tasks; each call holds it for one map operation.
#[derive(Debug, Default)]
pub struct ActiveOrders {
    orders: Mutex<IdMap<Marked>>,
    /// How many orders `orders` holds, to read without the lock.
    count: AtomicUsize,
}

#[derive(Debug, Default)]
struct Marked {
    /// It must be loaded and driven once more when its current execution ends.
    rerun: bool,
    /// Woken when a rerun or a cancellation of this order is asked for while it waits for a
    /// retry; one per order, so that no other order's wait wakes.
    wake: Option<Arc<Notify>>,
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

    /// What wakes the wait for a retry of `id` (see [`ActiveOrders::wake`]); `None` when the
    /// order is not active. A wake that comes while nobody waits is kept for the next wait.
    pub fn waker(&self, id: OrderId) -> Option<Arc<Notify>> {
        let mut active = self.orders.lock().ok()?;
        let marked = active.get_mut(&id)?;
        Some(Arc::clone(marked.wake.get_or_insert_with(Default::default)))
    }

    /// Wakes the order's wait for a retry, if it waits, so it looks at once whether it may go on.
    pub fn wake(&self, id: OrderId) {
        if let Ok(active) = self.orders.lock() {
            if let Some(wake) = active.get(&id).and_then(|marked| marked.wake.as_ref()) {
                wake.notify_one();
            }
        }
    }

    /// True (and the flag cleared) when a rerun of `id` was asked for: an order waiting for a
    /// retry then reads the store at once, as it may have changed there (a retried rollback).
    pub fn take_rerun(&self, id: OrderId) -> bool {
        self.orders
            .lock()
            .map(|mut active| match active.get_mut(&id) {
                Some(marked) => std::mem::take(&mut marked.rerun),
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
                    slot.insert(Marked::default());
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
        self.orders
            .lock()
            .map(|mut active| match active.entry(id) {
                Entry::Occupied(mut slot) => {
                    let marked = slot.get_mut();
                    marked.rerun = true;
                    if let Some(wake) = &marked.wake {
                        wake.notify_one();
                    }
                    false
                }
                Entry::Vacant(slot) => {
                    slot.insert(Marked::default());
                    self.count.fetch_add(1, Ordering::Relaxed);
                    true
                }
            })
            .unwrap_or(true)
    }

    /// At the end of an execution: true (and the flag cleared) when a rerun was asked for, else
    /// the order is no longer active. One lock, so a rerun request is never lost in between.
    pub fn finish_or_rerun(&self, id: OrderId) -> bool {
        let Ok(mut active) = self.orders.lock() else {
            return false;
        };
        match active.get_mut(&id) {
            Some(marked) if marked.rerun => {
                marked.rerun = false;
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
    use std::time::Duration;

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
    async fn a_rerun_asked_for_wakes_only_that_orders_wait_and_is_taken_once() {
        let active = ActiveOrders::default();
        let (id, other) = (OrderId::new_v4(), OrderId::new_v4());
        assert!(
            active.waker(id).is_none(),
            "not active: nothing to wait for"
        );
        assert!(active.mark(id));
        assert!(active.mark(other));
        let (wake, other_wake) = (active.waker(id).unwrap(), active.waker(other).unwrap());
        let (woken, other_woken) = (wake.notified(), other_wake.notified());
        tokio::pin!(woken, other_woken);
        assert!(!active.mark_or_rerun(id));
        tokio::time::timeout(Duration::from_secs(5), &mut woken)
            .await
            .expect("its own wait is woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut other_woken)
                .await
                .is_err(),
            "no other order's wait is woken"
        );
        assert!(!active.take_rerun(other));
        assert!(active.take_rerun(id), "taken by the wait");
        assert!(!active.take_rerun(id), "once");
        assert!(active.contains(id), "still active");
        assert!(!active.finish_or_rerun(id), "taken, so not run once more");
        assert!(active.mark(id));
    }

    #[tokio::test]
    async fn a_wake_before_the_wait_is_kept_for_it() {
        let active = ActiveOrders::default();
        let id = OrderId::new_v4();
        assert!(active.mark(id));
        let wake = active.waker(id).unwrap();
        active.wake(id);
        tokio::time::timeout(Duration::from_secs(5), wake.notified())
            .await
            .expect("the wake was kept");
        assert!(
            Arc::ptr_eq(&wake, &active.waker(id).unwrap()),
            "one per order"
        );
    }
}
