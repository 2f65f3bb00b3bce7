//! What the pool and the executions it runs share: the node's store, step handlers and lease
//! gate, the orders active here, the cancellations noted here, the stop signal, and the way back
//! into the queue for an order whose retry is due.

use super::active::ActiveOrders;
use super::cancels::Cancellations;
use super::gate::Gate;
use super::handler::Handlers;
use super::job::{Job, Queued};
use super::parking::ParkingLot;
use super::waiters::Waiters;
use crate::metrics::Metrics;
use crate::order::OrderId;
use crate::store::OrderStore;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

pub(super) struct Shared {
    /// This node: the owner its orders carry.
    pub(super) node_id: String,
    pub(super) store: Arc<dyn OrderStore>,
    pub(super) handlers: Handlers,
    pub(super) gate: Arc<Gate>,
    pub(super) metrics: Arc<Metrics>,
    /// Executions running now.
    pub(super) inflight: AtomicUsize,
    /// Orders whose cancellation was requested through this node, checked before each step.
    pub(super) cancels: Cancellations,
    /// Orders executing, queued or waiting to retry here, so none runs twice at once.
    pub(super) active: ActiveOrders,
    /// Long polls waiting for orders to finish.
    pub(super) waiters: Waiters,
    /// Orders whose step takes its time without a task.
    pub(super) parking: ParkingLot,
    /// For orders coming back from a retry wait (already marked active).
    pub(super) queue_tx: mpsc::Sender<Queued>,
    /// True once the node stops.
    pub(super) stop_rx: watch::Receiver<bool>,
}

impl Shared {
    pub(super) fn new(
        node_id: String,
        store: Arc<dyn OrderStore>,
        handlers: Handlers,
        gate: Arc<Gate>,
        metrics: Arc<Metrics>,
        queue_tx: mpsc::Sender<Queued>,
        stop_rx: watch::Receiver<bool>,
    ) -> Shared {
        Shared {
            node_id,
            store,
            handlers,
            gate,
            metrics,
            inflight: AtomicUsize::new(0),
            cancels: Cancellations::new(),
            active: ActiveOrders::default(),
            waiters: Waiters::default(),
            parking: ParkingLot::default(),
            queue_tx,
            stop_rx,
        }
    }

    /// The order is no longer active here: waits for it read the store again.
    pub(super) fn unmark(&self, id: OrderId) {
        self.active.unmark(id);
        self.waiters.ended(id);
    }

    /// Notes a cancellation of `id` (see [`Pool::note_cancel`](super::Pool::note_cancel)) and
    /// wakes the order if it waits for a retry.
    pub(super) fn note_cancel(&self, id: OrderId) {
        if !self.active.contains(id) {
            return;
        }
        self.cancels.note(id);
        if !self.active.contains(id) {
            self.cancels.forget(id);
        }
        self.active.wake(id);
    }

    /// Queues a job whose order is marked active here, waiting for room; false once the pool
    /// stops, and the order is no longer marked (it stays in the store).
    pub(super) async fn queue_marked(&self, job: Job) -> bool {
        let id = job.order_id();
        let mut stop_rx = self.stop_rx.clone();
        let sent = !*stop_rx.borrow()
            && tokio::select! {
                sent = self.queue_tx.send(Queued::bare(job)) => sent.is_ok(),
                _ = stop_rx.changed() => false,
            };
        if !sent {
            self.unmark(id);
        }
        sent
    }

    /// Lets go of order `id`, held while a store call ran and then not queued: unless a run of
    /// it was asked for meanwhile and found it held (another rollback retry re-opened it, a
    /// takeover moved it here), which is queued now instead of lost with the hold.
    pub(super) fn let_go(self: &Arc<Self>, id: OrderId) {
        if !self.finish_or_rerun(id) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let shared = Arc::clone(self);
                runtime.spawn(async move { shared.queue_marked(Job::Resume(id)).await });
            }
            Err(_) => self.unmark(id),
        }
    }

    /// At the end of an execution: true when the order is to be loaded and driven once more
    /// (see [`ActiveOrders::finish_or_rerun`]). Either way, waits for it read the store again:
    /// it may have finished, or changed since.
    pub(super) fn finish_or_rerun(&self, id: OrderId) -> bool {
        let rerun = self.active.finish_or_rerun(id);
        self.waiters.ended(id);
        rerun
    }
}
