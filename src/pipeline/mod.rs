//! The bounded worker pool and the executor that drives one order to a terminal state.
//!
//! Accepted orders wait in a bounded queue; at most `workers` of them execute at once (each an
//! async task holding a semaphore permit). `POST /orders` reserves a queue slot before it stores
//! anything, so a full queue is a 503 and never an order stored but not queued. Each transition
//! is committed before the next step starts; a commit that finds the order owned by someone else
//! ends its execution here.
//!
//! The executor owns retries: a handler makes one attempt, and after a failed attempt worth
//! retrying the executor commits the attempt and the time the next one is due. The order then
//! gives its worker back and waits outside the pool (a timer task that queues it again when the
//! retry is due), so orders waiting on a failing service do not hold up the others. An order
//! resumed after a restart or a takeover reads the schedule from the store and goes on with it.

mod active;
mod gate;
mod handler;
pub mod http;
pub mod retry;
mod simulate;
mod waiters;

pub use gate::Gate;
pub use handler::{Handlers, StepContext, StepDone, StepError, StepHandler};
pub use http::Http;
pub use retry::RetryPolicy;
pub use simulate::Simulate;
pub use waiters::Waiters;

use crate::metrics::{Metrics, StepOutcome};
use crate::order::{
    apply, next_action, retry_due, Action, Attempt, Event, Order, OrderId, Step, TransitionError,
};
use crate::store::{OrderStore, StoreError};
use active::ActiveOrders;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn, Instrument};

/// Work for the pool.
pub enum Job {
    /// A freshly accepted order, as stored.
    New(Box<Order>),
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
    fn mark_active(&self, id: OrderId) -> bool {
        self.active.mark(id)
    }

    fn mark_active_or_rerun(&self, id: OrderId) -> bool {
        self.active.mark_or_rerun(id)
    }

    fn finish_or_rerun(&self, id: OrderId) -> bool {
        self.active.finish_or_rerun(id)
    }

    fn unmark_active(&self, id: OrderId) {
        self.active.unmark(id);
    }
}

struct Shared {
    node_id: String,
    store: Arc<dyn OrderStore>,
    handlers: Handlers,
    inflight: AtomicUsize,
    /// Orders whose cancellation was requested through this node, checked before each step.
    cancelled: Mutex<HashSet<OrderId>>,
    /// Bumped on each noted cancellation, to wake orders waiting for a retry.
    cancel_tx: watch::Sender<u64>,
    /// For orders coming back from a retry wait (already marked active).
    queue_tx: mpsc::Sender<Job>,
    /// Orders executing, queued or waiting to retry here, so none runs twice at once.
    active: ActiveOrders,
    gate: Arc<Gate>,
    /// Long polls waiting for orders to finish.
    waiters: Waiters,
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
            cancel_tx: watch::Sender::new(0),
            queue_tx: queue_tx.clone(),
            active: ActiveOrders::default(),
            gate,
            waiters: Waiters::default(),
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
        let (id, fresh) = match &job {
            Job::New(order) => (order.order_id, self.shared.mark_active(order.order_id)),
            Job::Resume(id) => (*id, self.shared.mark_active_or_rerun(*id)),
        };
        if !fresh {
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

    /// Whether this node executes the order, has it queued or waits to retry one of its steps.
    pub fn is_active(&self, id: OrderId) -> bool {
        self.shared.active.contains(id)
    }

    /// Orders executing now.
    pub fn inflight(&self) -> usize {
        self.shared.inflight.load(Ordering::Relaxed)
    }

    /// Orders accepted and waiting for a worker.
    pub fn queued(&self) -> usize {
        self.capacity.saturating_sub(self.queue_tx.capacity())
    }

    /// Long polls: wait here for an order to finish on this node.
    pub fn waiters(&self) -> &Waiters {
        &self.shared.waiters
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
        self.shared
            .cancel_tx
            .send_modify(|count| *count = count.wrapping_add(1));
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
    let mut active = ActiveGuard {
        shared: &shared,
        id,
        finished: false,
    };
    let mut job = Some(job);
    loop {
        let order = match job.take() {
            Some(Job::New(order)) => Some(*order),
            Some(Job::Resume(_)) | None => load(&shared, id).await,
        };
        let retry_at = match order {
            Some(order) => {
                drive(&shared, order)
                    .instrument(tracing::debug_span!("order", order_id = %id))
                    .await
            }
            None => None,
        };
        if let Some(due) = retry_at {
            // The order stays marked active while it waits, so it is not run twice meanwhile.
            active.finished = true;
            spawn_retry_wait(Arc::clone(&shared), id, due);
            return;
        }
        if !shared.finish_or_rerun(id) {
            active.finished = true;
            break;
        }
        debug!(order_id = %id, "order changed while it ran here, running it again");
    }
    if let Ok(mut cancelled) = shared.cancelled.lock() {
        cancelled.remove(&id);
    }
}

/// Waits, without a worker, until an order's retry is due (or a cancellation of it is noted),
/// then queues it again. When the node stops first, the order is left to resume with the schedule
/// kept in the store.
fn spawn_retry_wait(shared: Arc<Shared>, id: OrderId, due: chrono::DateTime<chrono::Utc>) {
    let task = async move {
        if !wait_then_queue(&shared, id, due).await {
            shared.unmark_active(id);
        }
    };
    tokio::spawn(task.instrument(tracing::debug_span!("retry_wait", order_id = %id)));
}

/// True once the order is queued again; false if the node stopped first.
async fn wait_then_queue(shared: &Shared, id: OrderId, due: chrono::DateTime<chrono::Utc>) -> bool {
    let mut stop_rx = shared.stop_rx.clone();
    let mut cancel_rx = shared.cancel_tx.subscribe();
    let wait = (due - chrono::Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    let sleep = tokio::time::sleep(wait);
    tokio::pin!(sleep);
    loop {
        if *stop_rx.borrow() {
            return false;
        }
        // The retry is due; or the node stops; or some cancellation was noted, which ends the
        // wait only if it is this order's.
        tokio::select! {
            _ = &mut sleep => break,
            _ = stop_rx.changed() => return false,
            changed = cancel_rx.changed() => {
                if changed.is_err() {
                    return false;
                }
                let cancelled = shared
                    .cancelled
                    .lock()
                    .map(|cancelled| cancelled.contains(&id))
                    .unwrap_or(false);
                if cancelled {
                    break;
                }
            }
        }
    }
    // Either there is room in the queue, or the node stops and the order resumes later.
    tokio::select! {
        sent = shared.queue_tx.send(Job::Resume(id)) => sent.is_ok(),
        _ = stop_rx.changed() => false,
    }
}

/// Marks an order inactive when its execution ends, however it ends (also when the task is
/// abandoned at shutdown).
struct ActiveGuard<'a> {
    shared: &'a Shared,
    id: OrderId,
    /// Already marked inactive by `finish_or_rerun`.
    finished: bool,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.unmark_active(self.id);
        }
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

/// Runs an order's steps (or compensations) until it is finished, the node stops, the order
/// turns out to belong to another node, or it has to wait for a retry: then the time it is due.
async fn drive(shared: &Shared, mut order: Order) -> Option<chrono::DateTime<chrono::Utc>> {
    debug!(order_id = %order.order_id, current_step = %order.current_step, "order dispatched");
    let mut tracker = shared.metrics.track(order.current_step);
    let mut lapses = shared.gate.lapses();
    loop {
        if *shared.stop_rx.borrow() {
            debug!(order_id = %order.order_id, "node stopping, order left to resume later");
            return None;
        }
        note_cancel(shared, &mut order);
        if let Some(due) = retry_due(&order) {
            // A little early (clocks differ by a hair) counts as due.
            if due - chrono::Utc::now() > chrono::Duration::milliseconds(2) {
                debug!(order_id = %order.order_id, next_attempt_at = %due, "waiting for the next attempt");
                return Some(due);
            }
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
                None => return None,
            }
            lapses = now_lapses;
        }
        note_cancel(shared, &mut order);
        let events = match next_action(&order) {
            Action::Run(step) => attempt(shared, &order, step, false).await,
            Action::Cancel(step) => {
                debug!(order_id = %order.order_id, step = %step, "order cancelled before step ran");
                vec![Event::Cancel { step }]
            }
            Action::Rollback(step) => attempt(shared, &order, step, true).await,
            Action::Done => {
                debug!(order_id = %order.order_id, current_step = %order.current_step, "order finished");
                return None;
            }
        };
        match commit(shared, order, events).await {
            Some(next) => {
                tracker.move_to(next.current_step);
                shared.metrics.order_finished(&next);
                order = next;
            }
            None => return None,
        }
    }
}

/// Marks the order cancelled if a cancellation was requested through this node.
fn note_cancel(shared: &Shared, order: &mut Order) {
    if !order.cancel_requested {
        order.cancel_requested = shared
            .cancelled
            .lock()
            .map(|cancelled| cancelled.contains(&order.order_id))
            .unwrap_or(false);
    }
}

/// Makes one attempt at running (or rolling back) a step and says what happened, as the events
/// to commit: the attempt (for handlers with a retry policy), then the step's end or the retry.
async fn attempt(shared: &Shared, order: &Order, step: Step, rollback: bool) -> Vec<Event> {
    let handler = shared.handlers.for_step(step);
    let policy = handler.retry_policy(rollback);
    let entry = order.entry(step);
    let number = entry
        .map_or(0, |entry| entry.attempts_made(rollback))
        .saturating_add(1);
    let retries_done = entry.map_or(0, |entry| entry.retries);
    let context = StepContext::attempt(order, step, rollback, number);
    let direction = if rollback { "rollback" } else { "run" };
    debug!(order_id = %order.order_id, step = %step, attempt = number, direction, "attempt started");
    // Microseconds, like every other time the API shows.
    let started_at = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6);
    let started = std::time::Instant::now();
    let result = if rollback {
        handler.rollback(&context).await
    } else {
        handler.run(&context).await
    };
    let elapsed = started.elapsed();
    let outcome = match (&result, rollback) {
        (Ok(_), false) => StepOutcome::Succeeded,
        (Err(_), false) => StepOutcome::Failed,
        (Ok(_), true) => StepOutcome::RolledBack,
        (Err(_), true) => StepOutcome::RollbackFailed,
    };
    shared.metrics.step_finished(step, outcome, elapsed);
    let duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    let mut events = Vec::with_capacity(2);
    if policy.is_some() {
        let (status, error) = match &result {
            Ok(done) => (done.status, None),
            Err(failure) => (failure.status, Some(failure.reason.clone())),
        };
        events.push(Event::Attempted {
            step,
            attempt: Attempt {
                attempt: number,
                at: started_at,
                rollback,
                status,
                error,
                duration_ms,
            },
        });
    }
    let failure = match result {
        Ok(done) => {
            debug!(order_id = %order.order_id, step = %step, attempt = number, direction, "attempt succeeded");
            events.push(if rollback {
                Event::RolledBack { step }
            } else {
                Event::StepSucceeded {
                    step,
                    output: done.output,
                }
            });
            return events;
        }
        Err(failure) => failure,
    };
    match policy {
        Some(policy) if failure.retryable && policy.allows_retry(retries_done) => {
            let delay = policy.delay(retries_done.saturating_add(1), rand::random());
            let at = chrono::Utc::now()
                + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
            warn!(order_id = %order.order_id, step = %step, attempt = number, direction, reason = %failure.reason, retry_in = ?delay, "attempt failed, retrying");
            events.push(Event::RetryScheduled { step, rollback, at });
        }
        _ if rollback => {
            error!(order_id = %order.order_id, step = %step, attempt = number, reason = %failure.reason, "rollback failed, order parked with its rollback incomplete");
            events.push(Event::RollbackFailed {
                step,
                reason: failure.reason,
            });
        }
        _ => {
            info!(order_id = %order.order_id, step = %step, attempt = number, reason = %failure.reason, "step failed, rolling back");
            events.push(Event::StepFailed {
                step,
                reason: failure.reason,
            });
        }
    }
    events
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

/// Applies events in order and commits the result as one write, retrying while the store is
/// unreachable. `None` means this node must let the order go (lost ownership, illegal
/// transition, stopping).
async fn commit(shared: &Shared, mut order: Order, events: Vec<Event>) -> Option<Order> {
    let mut stop_rx = shared.stop_rx.clone();
    let mut delay = Duration::from_millis(100);
    loop {
        let now = chrono::Utc::now();
        let next = events.iter().try_fold(order.clone(), |current, event| {
            apply(&current, event.clone(), now)
        });
        let next = match next {
            Ok(next) => next,
            Err(error) => {
                report_illegal(&order, &error);
                return None;
            }
        };
        match shared.store.commit(&next).await {
            Ok(()) => {
                if next.is_finished() {
                    shared.waiters.notify(&next);
                }
                return Some(next);
            }
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
