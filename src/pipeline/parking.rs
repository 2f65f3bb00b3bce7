//! Orders whose step needs nothing but time (a simulated step), held as plain data until their
//! step ends instead of as a suspended task: a waiting order then costs its record and a heap
//! entry, not a task, its futures and its log span.
//!
//! One timer task per node wakes each parked order when its time comes and spawns its
//! execution again, which commits the step's outcome and goes on. A parked order keeps its
//! worker permit, so `pipeline.workers` still bounds the orders held in memory.

use super::executor::{resume, Parked};
use super::shared::Shared;
use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The orders parked on this node, earliest wake first.
#[derive(Default)]
pub(super) struct ParkingLot {
    /// Why a lock: executions park from their own tasks and the timer task takes them out;
    /// each holds it for one heap operation.
    heap: Mutex<BinaryHeap<Entry>>,
    /// Told when an order is parked ahead of every other, so the timer task sleeps less.
    earlier: Notify,
    /// Parked or being woken: counted among the orders in flight.
    len: AtomicUsize,
    /// Ties broken in parking order.
    next_seq: AtomicUsize,
}

struct Entry {
    at: Instant,
    seq: usize,
    parked: Box<Parked>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed: the heap is a max-heap and the earliest entry must come out first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl ParkingLot {
    /// Parks an order until `at`.
    pub(super) fn park(&self, at: Instant, parked: Box<Parked>) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.len.fetch_add(1, Ordering::Relaxed);
        let Ok(mut heap) = self.heap.lock() else {
            return;
        };
        let first = heap.peek().is_none_or(|head| at < head.at);
        heap.push(Entry { at, seq, parked });
        drop(heap);
        if first {
            self.earlier.notify_one();
        }
    }

    /// Orders parked now, or woken and not yet running again.
    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// An order taken out of the lot is running again (or was dropped).
    pub(super) fn left(&self) {
        self.len.fetch_sub(1, Ordering::Relaxed);
    }

    /// The entries due at `now`, and when the next one is.
    fn take_due(&self, now: Instant) -> (Vec<Entry>, Option<Instant>) {
        let Ok(mut heap) = self.heap.lock() else {
            return (Vec::new(), None);
        };
        let mut due = Vec::new();
        while heap.peek().is_some_and(|head| head.at <= now) {
            if let Some(entry) = heap.pop() {
                due.push(entry);
            }
        }
        (due, heap.peek().map(|head| head.at))
    }
}

/// The timer task: wakes each parked order when it is due and runs it again. Runs for as long
/// as the node: parked steps may still end and commit during a shutdown's grace period.
pub(super) async fn wake_parked(shared: Arc<Shared>) {
    loop {
        // Registered before the heap is looked at, so a park in between is not missed.
        let earlier = shared.parking.earlier.notified();
        tokio::pin!(earlier);
        earlier.as_mut().enable();
        let (due, next) = shared.parking.take_due(Instant::now());
        for entry in due {
            tokio::spawn(resume(Arc::clone(&shared), entry.parked));
        }
        match next {
            Some(at) => {
                // Either the earliest order is due, or one parked ahead of it.
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = &mut earlier => {}
                }
            }
            None => earlier.await,
        }
    }
}
