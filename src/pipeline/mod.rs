//! The bounded worker pool and the executor that drives one order to a terminal state.
//!
//! Accepted orders wait in a bounded queue; at most `workers` of them execute at once (each an
//! async task holding a semaphore permit). `POST /orders` reserves a queue slot before it stores
//! anything, so a full queue is a 503 and never an order stored but not queued. Each transition
//! is committed before the next step starts; a commit that finds the order owned by someone else
//! ends its execution here.

mod gate;
mod handler;
mod simulate;

pub use gate::Gate;
pub use handler::{Handlers, StepContext, StepError, StepHandler};
pub use simulate::Simulate;

use crate::metrics::{Metrics, StepOutcome};
use crate::order::{apply, next_action, Action, Event, Order, OrderId, TransitionError};
use crate::store::{OrderStore, StoreError};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn, Instrument};

/// Work for the pool.
pub enum Job {
    /// A freshly accepted order, as stored.
    New(Order),
    /// An order to load from the store and resume (after a restart or a takeover).
    Resume(OrderId),
}

/// A reserved slot in the queue: holding one guarantees the job can be queued.
pub struct Slot(mpsc::OwnedPermit<Job>, Arc<Shared>);

impl Slot {
    pub fn send(self, job: Job) {
        if let Job::New(order) = &job {
            self.1.mark_active(order.order_id);
        }
        self.0.send(job);
    }
}

impl Shared {
    /// Records an order as queued or executing here; false if it already was.
    fn mark_active(&self, id: OrderId) -> bool {
        self.active
            .lock()
            .map(|mut active| active.insert(id))
            .unwrap_or(true)
    }

    fn unmark_active(&self, id: OrderId) {
        if let Ok(mut active) = self.active.lock() {
            active.remove(&id);
        }
    }
}

struct Shared {
    node_id: String,
    store: Arc<dyn OrderStore>,
    handlers: Handlers,
    inflight: AtomicUsize,
    /// Orders whose cancellation was requested through this node, checked before each step.
    cancelled: Mutex<HashSet<OrderId>>,
    /// Orders executing or queued here, so a second resume of the same order is a no-op.
    active: Mutex<HashSet<OrderId>>,
    gate: Arc<Gate>,
    stop_rx: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
}

pub struct Pool {
    shared: Arc<Shared>,
    queue_tx: mpsc::Sender<Job>,
    capacity: usize,
    workers: usize,
    stop_tx: watch::Sender<bool>,
    dispatcher: tokio::sync::Mutex<Option<tokio::task::JoinHandle<JoinSet<()>>>>,
}

impl Pool {
    pub fn start(
        node_id: String,
        store: Arc<dyn OrderStore>,
        handlers: Handlers,
        gate: Arc<Gate>,
        workers: usize,
        queue_capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<Pool> {
        let (queue_tx, queue_rx) = mpsc::channel(queue_capacity);
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            node_id,
            store,
            handlers,
            inflight: AtomicUsize::new(0),
            cancelled: Mutex::new(HashSet::new()),
            active: Mutex::new(HashSet::new()),
            gate,
            stop_rx,
            metrics,
        });
        let dispatcher = tokio::spawn(
            dispatch(Arc::clone(&shared), queue_rx, workers)
                .instrument(tracing::info_span!("dispatcher")),
        );
        Arc::new(Pool {
            shared,
            queue_tx,
            capacity: queue_capacity,
            workers,
            stop_tx,
            dispatcher: tokio::sync::Mutex::new(Some(dispatcher)),
        })
    }

    /// Reserves a queue slot, or `None` when the queue is full or the pool is stopping.
    pub fn try_reserve(&self) -> Option<Slot> {
        if *self.stop_tx.borrow() {
            return None;
        }
        self.queue_tx
            .clone()
            .try_reserve_owned()
            .ok()
            .map(|permit| Slot(permit, Arc::clone(&self.shared)))
    }

    /// Queues a job, waiting for room; false once the pool stops. An order already queued or
    /// executing here is not queued twice.
    pub async fn enqueue(&self, job: Job) -> bool {
        let mut stop_rx = self.shared.stop_rx.clone();
        if *stop_rx.borrow() {
            return false;
        }
        let id = match &job {
            Job::New(order) => order.order_id,
            Job::Resume(id) => *id,
        };
        if !self.shared.mark_active(id) {
            return true;
        }
        // Either room frees up in the queue, or the pool stops and the job stays in the store.
        let sent = tokio::select! {
            sent = self.queue_tx.send(job) => sent.is_ok(),
            _ = stop_rx.changed() => false,
        };
        if !sent {
            self.shared.unmark_active(id);
        }
        sent
    }

    /// Queues the resumption of many orders in the background, in order.
    pub fn resume_all(self: &Arc<Self>, ids: Vec<OrderId>) {
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            for id in ids {
                if !pool.enqueue(Job::Resume(id)).await {
                    return;
                }
            }
        });
    }

    /// Orders executing now.
    pub fn inflight(&self) -> usize {
        self.shared.inflight.load(Ordering::Relaxed)
    }

    /// Orders accepted and waiting for a worker.
    pub fn queued(&self) -> usize {
        self.capacity.saturating_sub(self.queue_tx.capacity())
    }

    /// Orders that may execute at once.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The size of the queue.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn note_cancel(&self, id: OrderId) {
        if let Ok(mut cancelled) = self.shared.cancelled.lock() {
            cancelled.insert(id);
        }
    }

    pub fn is_stopping(&self) -> bool {
        *self.stop_tx.borrow()
    }

    /// Stops taking jobs, lets running steps finish and commit for up to `grace`, then abandons
    /// what is left (those steps run again wherever the order resumes).
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.stop_tx.send(true);
        let Some(dispatcher) = self.dispatcher.lock().await.take() else {
            return;
        };
        let mut tasks = match dispatcher.await {
            Ok(tasks) => tasks,
            Err(error) => {
                error!(error = %error, "dispatcher ended abnormally");
                return;
            }
        };
        let running = tasks.len();
        if running > 0 {
            info!(running, grace = ?grace, "waiting for running steps to finish");
        }
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!(
                abandoned = tasks.len(),
                "grace period over, abandoning running steps; they run again on resume"
            );
            tasks.shutdown().await;
        }
    }
}

/// Takes a worker permit, then a job, and runs it; returns the running tasks once stopped.
async fn dispatch(
    shared: Arc<Shared>,
    mut queue_rx: mpsc::Receiver<Job>,
    workers: usize,
) -> JoinSet<()> {
    let permits = Arc::new(Semaphore::new(workers));
    let mut tasks = JoinSet::new();
    let mut stop_rx = shared.stop_rx.clone();
    loop {
        // Reap finished executions so the set only holds running ones.
        while tasks.try_join_next().is_some() {}
        // Permit first, then job: a job leaves the queue only when a worker is free for it, so
        // the queue bound is exact.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stop_rx.changed() => break,
        };
        let job = tokio::select! {
            job = queue_rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
            _ = stop_rx.changed() => break,
        };
        let shared = Arc::clone(&shared);
        tasks.spawn(async move {
            let _permit = permit;
            execute(shared, job).await;
        });
    }
    tasks
}

/// Counts an execution in `inflight` for as long as it lives.
struct InflightGuard<'a>(&'a AtomicUsize);

impl<'a> InflightGuard<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InflightGuard(counter)
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn execute(shared: Arc<Shared>, job: Job) {
    let _inflight = InflightGuard::new(&shared.inflight);
    let id = match &job {
        Job::New(order) => order.order_id,
        Job::Resume(id) => *id,
    };
    let _active = ActiveGuard(&shared, id);
    let order = match job {
        Job::New(order) => order,
        Job::Resume(id) => match load(&shared, id).await {
            Some(order) => order,
            None => return,
        },
    };
    let order_id = order.order_id;
    drive(&shared, order)
        .instrument(tracing::debug_span!("order", order_id = %order_id))
        .await;
    if let Ok(mut cancelled) = shared.cancelled.lock() {
        cancelled.remove(&order_id);
    }
}

/// Marks an order inactive when its execution ends, however it ends.
struct ActiveGuard<'a>(&'a Shared, OrderId);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.unmark_active(self.1);
    }
}

async fn load(shared: &Shared, id: OrderId) -> Option<Order> {
    let mut stop_rx = shared.stop_rx.clone();
    let mut delay = Duration::from_millis(100);
    loop {
        match shared.store.get(id).await {
            Ok(Some(order)) if order.owner == shared.node_id => return Some(order),
            Ok(Some(_)) => {
                debug!(order_id = %id, "order is owned by another node now, not resuming");
                return None;
            }
            Ok(None) => {
                warn!(order_id = %id, "order to resume is missing from the store");
                return None;
            }
            Err(error) => {
                warn!(order_id = %id, error = %error, "cannot load order, retrying");
                if wait_or_stop(&mut stop_rx, &mut delay).await {
                    return None;
                }
            }
        }
    }
}

/// Runs an order's steps (or compensations) until it is finished, the node stops, or the order
/// turns out to belong to another node.
async fn drive(shared: &Shared, mut order: Order) {
    debug!(order_id = %order.order_id, current_step = %order.current_step, "order dispatched");
    let mut tracker = shared.metrics.track(order.current_step);
    let mut lapses = shared.gate.lapses();
    loop {
        if *shared.stop_rx.borrow() {
            debug!(order_id = %order.order_id, "node stopping, order left to resume later");
            return;
        }
        if !shared.gate.is_open() {
            debug!(order_id = %order.order_id, "liveness lease lapsed, waiting before the next step");
        }
        let mut stop_rx = shared.stop_rx.clone();
        // Either the lease is current again, or the node stops and the order resumes elsewhere.
        let now_lapses = tokio::select! {
            lapses = shared.gate.wait_open() => lapses,
            _ = stop_rx.changed() => continue,
        };
        if now_lapses != lapses {
            // The lease lapsed while this order was ours: someone may have taken it over.
            match still_ours(shared, &order).await {
                Some(fresh) => {
                    tracker.move_to(fresh.current_step);
                    order = fresh;
                }
                None => return,
            }
            lapses = now_lapses;
        }
        if !order.cancel_requested {
            let noted = shared
                .cancelled
                .lock()
                .map(|cancelled| cancelled.contains(&order.order_id))
                .unwrap_or(false);
            order.cancel_requested = noted;
        }
        let event = match next_action(&order) {
            Action::Run(step) => {
                debug!(order_id = %order.order_id, step = %step, "step started");
                let context = StepContext::new(&order, step);
                let started = Instant::now();
                match shared.handlers.for_step(step).run(&context).await {
                    Ok(output) => {
                        debug!(order_id = %order.order_id, step = %step, "step finished");
                        shared.metrics.step_finished(
                            step,
                            StepOutcome::Succeeded,
                            started.elapsed(),
                        );
                        Event::StepSucceeded { step, output }
                    }
                    Err(failure) => {
                        debug!(order_id = %order.order_id, step = %step, reason = %failure.reason, "step failed");
                        shared
                            .metrics
                            .step_finished(step, StepOutcome::Failed, started.elapsed());
                        Event::StepFailed {
                            step,
                            reason: failure.reason,
                        }
                    }
                }
            }
            Action::Cancel(step) => {
                debug!(order_id = %order.order_id, step = %step, "order cancelled before step ran");
                Event::Cancel { step }
            }
            Action::Rollback(step) => {
                let context = StepContext::new(&order, step);
                let started = Instant::now();
                match shared.handlers.for_step(step).rollback(&context).await {
                    Ok(()) => {
                        debug!(order_id = %order.order_id, step = %step, "step rolled back");
                        shared.metrics.step_finished(
                            step,
                            StepOutcome::RolledBack,
                            started.elapsed(),
                        );
                        Event::RolledBack { step }
                    }
                    Err(failure) => {
                        error!(order_id = %order.order_id, step = %step, reason = %failure.reason, "rollback failed, order parked");
                        shared.metrics.step_finished(
                            step,
                            StepOutcome::RollbackFailed,
                            started.elapsed(),
                        );
                        Event::RollbackFailed {
                            step,
                            reason: failure.reason,
                        }
                    }
                }
            }
            Action::Done => {
                debug!(order_id = %order.order_id, current_step = %order.current_step, "order finished");
                return;
            }
        };
        match commit(shared, order, event).await {
            Some(next) => {
                tracker.move_to(next.current_step);
                shared.metrics.order_finished(&next);
                order = next;
            }
            None => return,
        }
    }
}

/// Re-reads an order after a lease lapse: the stored copy when this node still owns it at the
/// same epoch, `None` when it does not (or the node stops before the store answers).
async fn still_ours(shared: &Shared, order: &Order) -> Option<Order> {
    let stored = load(shared, order.order_id).await?;
    if stored.epoch != order.epoch {
        warn!(order_id = %order.order_id, "order was taken over while the liveness lease lapsed, dropping it");
        return None;
    }
    Some(stored)
}

/// Applies an event and commits the result, retrying while the store is unreachable. `None`
/// means this node must let the order go (lost ownership, illegal transition, stopping).
async fn commit(shared: &Shared, mut order: Order, event: Event) -> Option<Order> {
    let mut stop_rx = shared.stop_rx.clone();
    let mut delay = Duration::from_millis(100);
    loop {
        let next = match apply(&order, event.clone(), chrono::Utc::now()) {
            Ok(next) => next,
            Err(error) => {
                report_illegal(&order, &error);
                return None;
            }
        };
        match shared.store.commit(&next).await {
            Ok(()) => return Some(next),
            Err(StoreError::CancelRequested) => {
                // Someone asked to cancel while the step ran: apply the same event again, now
                // knowing, so the order rolls back instead of moving on.
                order.cancel_requested = true;
            }
            Err(StoreError::NotOwner) | Err(StoreError::NotFound) => {
                warn!(order_id = %order.order_id, "order is no longer ours, dropping it");
                return None;
            }
            Err(error) => {
                warn!(order_id = %order.order_id, error = %error, "cannot commit transition, retrying");
                if wait_or_stop(&mut stop_rx, &mut delay).await {
                    return None;
                }
            }
        }
    }
}

fn report_illegal(order: &Order, error: &TransitionError) {
    error!(order_id = %order.order_id, current_step = %order.current_step, error = %error, "illegal transition, dropping order");
}

/// Sleeps `delay` (doubling it up to 2 s); true when the node began stopping meanwhile.
async fn wait_or_stop(stop_rx: &mut watch::Receiver<bool>, delay: &mut Duration) -> bool {
    if *stop_rx.borrow() {
        return true;
    }
    let stopped = tokio::select! {
        _ = tokio::time::sleep(*delay) => false,
        _ = stop_rx.changed() => true,
    };
    *delay = (*delay * 2).min(Duration::from_secs(2));
    stopped
}
