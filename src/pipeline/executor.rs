//! The executor: drives one order to a terminal state (or until it must let it go), one committed
//! transition at a time, through the state machine in `crate::order`, the store and the step
//! handlers.
//!
//! Each transition is committed before the next step starts; a commit that finds the order owned
//! by someone else ends its execution here. Right before a step's handler is called, the
//! execution checks the node's liveness lease (the [`Gate`](super::Gate)): it must hold, and must
//! not have lapsed since the order was last known to be this node's (when it was queued, loaded
//! or last re-read). After a lapse the order is read again before the service is called, in case
//! it was taken over meanwhile.
//!
//! The executor owns retries: a handler makes one attempt, and after a failed attempt worth
//! retrying the executor commits the attempt and the time the next one is due. The order then
//! gives its worker back and waits outside the pool (a timer task that queues it again when the
//! retry is due), so orders waiting on a failing service do not hold up the others. Waits run on
//! the monotonic clock (see `due`): an order resumed after a restart or a takeover reads the
//! schedule from the store and goes on with it, waiting no longer than its policy's `backoff_max`.
//!
//! A step whose handler needs only time (a simulated step) is not awaited: its outcome is decided
//! as it starts and the order waits as plain data in the `parking` lot, keeping its worker, until
//! the step is over; then an execution commits the outcome and goes on.

use super::due::RetryDue;
use super::handler::{StepContext, StepDone, StepError};
use super::job::{Job, Queued};
use super::shared::Shared;
use crate::metrics::StepOutcome;
use crate::order::{
    apply_owned, next_action, retry_due, Action, Attempt, Event, Notification, Order, OrderId,
    Phase, Step, StoredForm, TransitionError, VIEW_CAPACITY,
};
use crate::store::{same_order, SetAside, StoreError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::{debug, error, info, warn, Instrument};

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

/// Where an execution begins.
enum Start {
    /// The order as this node has it in memory.
    Drive {
        order: Box<Order>,
        ticket: Option<u64>,
        due: Option<RetryDue>,
    },
    /// Read from the store first.
    Load { due: Option<RetryDue> },
    /// Parked while its step took its time: commit the step's outcome, then go on.
    Unpark(Box<Parked>),
}

/// How an execution ended.
enum Ended {
    /// Finished, lost, or left to resume later: nothing more to do here now.
    Done,
    /// Waits for a retry, outside the pool.
    Retry(RetryWait),
    /// Its step takes time and needs no task meanwhile: parked until then.
    Park(tokio::time::Instant, Box<Parked>),
}

/// Drives the job's order until it is finished, lost, waiting for a retry or parked; then the
/// order is no longer active here (or stays so while it waits or is parked). `permit` is the
/// worker it holds, kept while it is parked.
pub(super) async fn execute(
    shared: Arc<Shared>,
    queued: Queued,
    permit: Option<OwnedSemaphorePermit>,
) {
    let Queued { job, ticket, due } = queued;
    let id = job.order_id();
    let start = match job {
        Job::New(order) => Start::Drive { order, ticket, due },
        Job::Resume(_) => Start::Load { due },
    };
    run(shared, id, start, permit).await;
}

/// Runs a parked order again once its step's time is over.
pub(super) async fn resume(shared: Arc<Shared>, mut parked: Box<Parked>) {
    shared.parking.left();
    let id = parked.order_id;
    let permit = parked.permit.take();
    run(Arc::clone(&shared), id, Start::Unpark(parked), permit).await;
}

async fn run(
    shared: Arc<Shared>,
    id: OrderId,
    start: Start,
    mut permit: Option<OwnedSemaphorePermit>,
) {
    let _inflight = InflightGuard::new(&shared.inflight);
    let mut active = ActiveGuard {
        shared: &shared,
        id,
        finished: false,
    };
    let mut start = Some(start);
    loop {
        let ended = match start.take() {
            Some(Start::Drive { order, ticket, due }) => {
                Box::pin(traced(&shared, *order, ticket, due, None)).await
            }
            Some(Start::Unpark(parked)) => {
                let Parked {
                    step,
                    order,
                    ticket,
                    attempt,
                    result,
                    ..
                } = *parked;
                let order = match order.decode() {
                    Ok(order) => order,
                    Err(error) => {
                        // Still in the store, and still owned here: the reconciliation resumes it.
                        error!(order_id = %id, error = %error, "parked order cannot be decoded, leaving it to the reconciliation");
                        // No longer counted in its step here.
                        drop(shared.metrics.tracked(step));
                        break;
                    }
                };
                Box::pin(traced(
                    &shared,
                    order,
                    ticket,
                    None,
                    Some((attempt, result)),
                ))
                .await
            }
            Some(Start::Load { due }) => Box::pin(load_and_drive(&shared, id, due)).await,
            None => Box::pin(load_and_drive(&shared, id, None)).await,
        };
        match ended {
            Ended::Done => {}
            Ended::Retry(retry) => {
                // The order stays marked active while it waits, so it is not run twice meanwhile.
                active.finished = true;
                spawn_retry_wait(Arc::clone(&shared), id, retry);
                return;
            }
            Ended::Park(at, mut parked) => {
                // Still active, and still holding its worker: it is in memory.
                active.finished = true;
                parked.permit = permit.take();
                shared.parking.park(at, parked);
                return;
            }
        }
        if !shared.finish_or_rerun(id) {
            active.finished = true;
            break;
        }
        debug!(order_id = %id, "order changed while it ran here, running it again");
    }
    // Forgotten once no longer active (see `Pool::note_cancel`).
    drop(active);
    shared.cancels.forget(id);
}

/// Reads the order (the node's as of the ticket taken before the read) and drives it.
async fn load_and_drive(shared: &Shared, id: OrderId, due: Option<RetryDue>) -> Ended {
    let ticket = shared.gate.ticket();
    match Box::pin(load(shared, id)).await {
        Some(order) => Box::pin(traced(shared, order, ticket, due, None)).await,
        None => Ended::Done,
    }
}

/// `drive`, in the order's log span (and trace).
async fn traced(
    shared: &Shared,
    order: Order,
    ticket: Option<u64>,
    due: Option<RetryDue>,
    unparked: Option<Unparked>,
) -> Ended {
    // Boxed, as are the steps of `drive`: an order waiting on a step keeps only what that wait
    // needs in memory, not the largest of every state it passes.
    Box::pin(
        crate::trace::spans::Execution::of(&order).run(drive(shared, order, ticket, due, unparked)),
    )
    .await
}

/// Waits, without a worker, until an order's retry is due (or a cancellation of it is noted, or
/// a rerun of it asked for), then queues it again. When the node stops first, the order is left
/// to resume with the schedule kept in the store.
fn spawn_retry_wait(shared: Arc<Shared>, id: OrderId, retry: RetryWait) {
    let task = async move {
        if !wait_then_queue(&shared, id, retry).await {
            shared.unmark(id);
        }
    };
    tokio::spawn(task.instrument(tracing::debug_span!("retry_wait", order_id = %id)));
}

/// True once the order is queued again; false if the node stopped first.
async fn wait_then_queue(shared: &Shared, id: OrderId, retry: RetryWait) -> bool {
    let mut stop_rx = shared.stop_rx.clone();
    // Taken before the looks below, so a wake between a look and the wait is kept for it.
    let Some(wake) = shared.active.waker(id) else {
        return false;
    };
    let sleep = tokio::time::sleep_until(retry.due.when);
    tokio::pin!(sleep);
    loop {
        if *stop_rx.borrow() {
            return false;
        }
        // Looked up after the waker was taken, so a cancellation noted before the wait began
        // (after the execution last looked) ends it too, instead of waiting out the retry.
        if retry.cancellable && shared.cancels.contains(id) {
            break;
        }
        // The order changed in the store (a parked rollback retried while its webhook waits):
        // it is read again now, and waits again if its retry is still not due.
        if shared.active.take_rerun(id) {
            break;
        }
        // The retry is due; or the node stops; or a cancellation of this order was noted, or a
        // rerun of it asked for (a wake may be left from before: the looks above tell).
        tokio::select! {
            _ = &mut sleep => break,
            _ = stop_rx.changed() => return false,
            _ = wake.notified() => {}
        }
    }
    // Either there is room in the queue, or the node stops and the order resumes later.
    tokio::select! {
        sent = shared.queue_tx.send(Queued {
            job: Job::Resume(id),
            ticket: None,
            due: Some(retry.due),
        }) => sent.is_ok(),
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
            self.shared.unmark(self.id);
        }
    }
}

async fn load(shared: &Shared, id: OrderId) -> Option<Order> {
    let mut stop_rx = shared.stop_rx.clone();
    let mut delay = Duration::from_millis(100);
    loop {
        match shared.store.get(id).await {
            Ok(Some(order)) if order.owner == shared.node_id && order.owes_work() => {
                // Read maybe from a primary that has not replicated it yet (a create or commit
                // whose acknowledgement failed): act on it only once it is replicated.
                match shared.store.confirm(&order).await {
                    Ok(true) => return Some(order),
                    Ok(false) => {
                        debug!(order_id = %id, "order changed while it was confirmed, reading it again")
                    }
                    Err(error) => {
                        warn!(order_id = %id, error = %error, "cannot confirm the order is replicated, retrying");
                    }
                }
                if wait_or_stop(&mut stop_rx, &mut delay).await {
                    return None;
                }
                continue;
            }
            Ok(Some(order)) => {
                debug!(order_id = %id, owner = %order.owner, current_step = %order.current_step, "order is finished or another node's now, not resuming");
                // Whatever queued it may have read an owned-set entry left behind by a race:
                // take it out, or every reconciliation would queue the order again.
                if let Err(error) = shared.store.disown(&shared.node_id, id).await {
                    debug!(order_id = %id, error = %error, "cannot tidy the owned set; the next pass tries again");
                }
                return None;
            }
            Ok(None) => {
                warn!(order_id = %id, "order to resume is missing from the store");
                // Its owned-set entry (deleted by hand, a partial restore) would have every
                // reconciliation queue it again.
                if let Err(error) = shared.store.disown(&shared.node_id, id).await {
                    debug!(order_id = %id, error = %error, "cannot tidy the owned set; the next pass tries again");
                }
                return None;
            }
            Err(StoreError::Corrupt(reason)) => {
                if set_aside(shared, id, reason).await
                    || wait_or_stop(&mut stop_rx, &mut delay).await
                {
                    return None;
                }
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

/// Sets aside an order whose record does not read: reading it again will not help, so it is
/// left for an operator, holding no worker, and no reconciliation queues it again. False when
/// the store could not take it (the caller waits and tries again).
async fn set_aside(shared: &Shared, id: OrderId, reason: String) -> bool {
    let aside = SetAside {
        order_id: id,
        node: shared.node_id.clone(),
        reason,
        // To the microsecond, as the API shows the times of orders.
        at: chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6),
    };
    match shared.store.set_aside(&aside).await {
        Ok(()) => {
            error!(order_id = %id, reason = %aside.reason, "order record cannot be read, set aside");
            true
        }
        Err(error) => {
            warn!(order_id = %id, error = %error, "cannot set aside an unreadable order, retrying");
            false
        }
    }
}

/// An order that has to wait for its next attempt.
struct RetryWait {
    due: RetryDue,
    /// Whether a cancellation noted before the wait began ends it: only an order still running
    /// forward can be cancelled (one rolling back stays noted, and would never wait).
    cancellable: bool,
}

/// An order parked while its step's attempt takes its time.
pub(super) struct Parked {
    order_id: OrderId,
    /// The step it is counted in while parked (`orders_in_step`).
    step: Step,
    order: Encoded,
    ticket: Option<u64>,
    attempt: Begun,
    result: Result<StepDone, StepError>,
    /// The worker it holds.
    permit: Option<OwnedSemaphorePermit>,
}

/// An order kept as its JSON: a third of the memory of the decoded order, for the few
/// microseconds it takes to encode and decode it once per parked step.
struct Encoded {
    json: Box<[u8]>,
    /// How the store keeps it, which its JSON does not say.
    form: StoredForm,
}

impl Encoded {
    fn of(order: &Order) -> Option<Encoded> {
        // About the size of its view.
        let mut json = Vec::with_capacity(VIEW_CAPACITY);
        match crate::order::write_order(&mut json, order) {
            Ok(()) => Some(Encoded {
                json: json.into_boxed_slice(),
                form: order.payload.form(),
            }),
            Err(error) => {
                warn!(order_id = %order.order_id, error = %error, "cannot encode an order to park it");
                None
            }
        }
    }

    fn decode(&self) -> Result<Order, serde_json::Error> {
        let order: Order = serde_json::from_slice(&self.json)?;
        order.payload.set_form(self.form);
        Ok(order)
    }
}

/// What an attempt comes to: the events to commit, and when a retry it scheduled is due.
type Concluded = (Vec<Event>, Option<RetryDue>);

/// The attempt a parked order made, now over.
type Unparked = (Begun, Result<StepDone, StepError>);

/// Runs an order's steps (or compensations) until it is finished, the node stops, the order
/// turns out to belong to another node, it has to wait for a retry, or its step takes time it
/// can spend parked. `ticket` is the gate's when the order was last known to be this node's;
/// `due` the retry this process scheduled for it, if any; `unparked` the attempt it made
/// before it was parked, whose outcome is committed first.
async fn drive(
    shared: &Shared,
    mut order: Order,
    mut ticket: Option<u64>,
    mut due: Option<RetryDue>,
    unparked: Option<Unparked>,
) -> Ended {
    debug!(order_id = %order.order_id, current_step = %order.current_step, "order dispatched");
    let mut concluded = unparked.map(|(attempt, result)| conclude(shared, &order, attempt, result));
    let mut tracker = if concluded.is_some() {
        // Counted in its step while it was parked.
        shared.metrics.tracked(order.current_step)
    } else {
        shared.metrics.track(order.current_step)
    };
    loop {
        if let Some((events, scheduled)) = concluded.take() {
            due = scheduled;
            // An order is counted once, when it first finishes (not again when a retry of its
            // parked rollback ends).
            let counted = order.is_finished() || order.is_reopened();
            match Box::pin(commit(shared, order, events)).await {
                Some(next) => {
                    tracker.move_to(next.current_step);
                    if !counted {
                        shared.metrics.order_finished(&next);
                    }
                    order = next;
                }
                None => return Ended::Done,
            }
        }
        if *shared.stop_rx.borrow() {
            debug!(order_id = %order.order_id, "node stopping, order left to resume later");
            return Ended::Done;
        }
        note_cancel(shared, &mut order);
        if let Some(at) = retry_due(&order) {
            let next = RetryDue::for_stored(due, at, longest_wait(shared, &order));
            if !next.is_due() {
                debug!(order_id = %order.order_id, next_attempt_at = %at, "waiting for the next attempt");
                return Ended::Retry(RetryWait {
                    due: next,
                    cancellable: order.phase == Phase::Forward,
                });
            }
        }
        // Room for the call (a step's `concurrency`) is taken before the lease is checked, and
        // held for this one call, not while the order waits for a retry: a call never waits
        // for room after the check. The semaphore is never closed, so `acquire` cannot fail.
        let turn = match next_action(&order) {
            Action::Run(step) => room(shared, step, false).await,
            Action::Rollback(step) => room(shared, step, true).await,
            _ => Room::Unlimited,
        };
        if let Room::Stopping = turn {
            debug!(order_id = %order.order_id, "node stopping while the order waited for its turn, left to resume later");
            return Ended::Done;
        }
        // Checked here first: the lease almost always holds, and `confirm`'s future (boxed, as
        // it is large) is then not worth allocating.
        let fresh = if shared.gate.holds(ticket) {
            None
        } else {
            let Some(fresh) = Box::pin(confirm(shared, &order, &mut ticket)).await else {
                return Ended::Done;
            };
            fresh
        };
        if let Some(fresh) = fresh {
            tracker.move_to(fresh.current_step);
            order = fresh;
            // Read again: it may have been cancelled, or its schedule changed.
            continue;
        }
        note_cancel(shared, &mut order);
        // Nothing awaits between the check in `confirm` and the handler's call.
        let attempted = match next_action(&order) {
            Action::Run(step) => Box::pin(attempt(shared, &order, step, false)).await,
            Action::Rollback(step) => Box::pin(attempt(shared, &order, step, true)).await,
            Action::Cancel(step) => {
                debug!(order_id = %order.order_id, step = %step, "order cancelled before step ran");
                Attempted::Now((vec![Event::Cancel { step }], None))
            }
            Action::Notify => Attempted::Now(Box::pin(notify(shared, &order)).await),
            Action::Done => {
                debug!(order_id = %order.order_id, current_step = %order.current_step, "order finished");
                return Ended::Done;
            }
        };
        match attempted {
            Attempted::Now(now) => concluded = Some(now),
            Attempted::Later {
                at,
                attempt,
                result,
            } => {
                let Some(encoded) = Encoded::of(&order) else {
                    // Cannot happen for an order that was stored; waiting here is as good.
                    tokio::time::sleep_until(at).await;
                    concluded = Some(conclude(shared, &order, attempt, result));
                    continue;
                };
                // Still counted in its step while parked: the wake-up takes the count over.
                tracker.keep_counted();
                let parked = Parked {
                    order_id: order.order_id,
                    step: order.current_step,
                    order: encoded,
                    ticket,
                    attempt,
                    result,
                    permit: None,
                };
                return Ended::Park(at, Box::new(parked));
            }
        }
    }
}

/// Marks the order cancelled if a cancellation was requested through this node.
fn note_cancel(shared: &Shared, order: &mut Order) {
    if !order.cancel_requested {
        order.cancel_requested = shared.cancels.contains(order.order_id);
    }
}

/// The longest an order may wait for its next attempt: its retry policy's `backoff_max` (none
/// without a policy).
fn longest_wait(shared: &Shared, order: &Order) -> Duration {
    let (step, rollback) = match next_action(order) {
        Action::Run(step) => (step, false),
        Action::Rollback(step) => (step, true),
        Action::Notify => {
            return shared
                .handlers
                .notifier()
                .map_or(Duration::ZERO, |notifier| {
                    notifier.retry_policy().backoff_max
                })
        }
        Action::Cancel(_) | Action::Done => return Duration::ZERO,
    };
    shared
        .handlers
        .for_step(step)
        .retry_policy(rollback)
        .map_or(Duration::ZERO, |policy| policy.backoff_max)
}

/// Checks, right before a step, that the lease holds and has not lapsed since `ticket`. If it
/// has, waits for the lease and reads the order again: `Some(Some(fresh))` when it is still this
/// node's (to look at again before its step), `Some(None)` when nothing lapsed, `None` when the
/// order was taken over or the node stops.
async fn confirm(
    shared: &Shared,
    order: &Order,
    ticket: &mut Option<u64>,
) -> Option<Option<Order>> {
    let mut fresh = None;
    loop {
        if shared.gate.holds(*ticket) {
            return Some(fresh);
        }
        if !shared.gate.is_open() {
            debug!(order_id = %order.order_id, "liveness lease lapsed, waiting before the next step");
        }
        let mut stop_rx = shared.stop_rx.clone();
        if *stop_rx.borrow() {
            return None;
        }
        // Either the lease is current again, or the node stops and the order resumes elsewhere.
        *ticket = tokio::select! {
            lapses = shared.gate.wait_open() => Some(lapses),
            _ = stop_rx.changed() => return None,
        };
        // The lease lapsed since the order was known to be ours: someone may have taken it over.
        fresh = Some(still_ours(shared, fresh.as_ref().unwrap_or(order)).await?);
    }
}

/// An attempt under way: what is known of it from its start.
pub(super) struct Begun {
    step: Step,
    rollback: bool,
    number: u32,
    retries_done: u32,
    started_at: chrono::DateTime<chrono::Utc>,
    started: std::time::Instant,
    call: crate::trace::spans::Call,
}

/// What one attempt came to.
// Made once per attempt and matched at once: never kept, so its size costs nothing.
#[allow(clippy::large_enum_variant)]
enum Attempted {
    /// It ended.
    Now(Concluded),
    /// Its outcome is known, but it lasts until `at`: the order can wait parked.
    Later {
        at: tokio::time::Instant,
        attempt: Begun,
        result: Result<StepDone, StepError>,
    },
}

/// A place among the calls `step`'s handler may have on their way at once, if it limits them.
async fn room(shared: &Shared, step: Step, rollback: bool) -> Room<'_> {
    let Some(room) = shared.handlers.for_step(step).room(rollback) else {
        return Room::Unlimited;
    };
    let mut stop_rx = shared.stop_rx.clone();
    if *stop_rx.borrow() {
        return Room::Stopping;
    }
    // Either a turn comes, or the node stops: a drain starts no call that has not begun.
    tokio::select! {
        taken = room.acquire() => taken.map_or(Room::Unlimited, |permit| Room::Taken { _permit: permit }),
        _ = stop_rx.changed() => Room::Stopping,
    }
}

/// A call's turn under its step's `concurrency` (see `room`), held until dropped.
enum Room<'a> {
    /// The step's calls are not limited.
    Unlimited,
    Taken {
        _permit: tokio::sync::SemaphorePermit<'a>,
    },
    /// The node began stopping while the order waited for its turn.
    Stopping,
}

/// Makes one attempt at running (or rolling back) a step and says what happened, as the events
/// to commit: the attempt (for handlers with a retry policy), then the step's end or the retry;
/// and, when it scheduled a retry, when that is due. A handler that decides its outcome up front
/// (see [`StepHandler::decided`](super::StepHandler::decided)) is not awaited: the attempt ends
/// `Later`.
async fn attempt(shared: &Shared, order: &Order, step: Step, rollback: bool) -> Attempted {
    let handler = shared.handlers.for_step(step);
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
    let (result, later) = match handler.decided(&context, rollback) {
        Some(decided) => (
            decided.result,
            Some(tokio::time::Instant::now() + decided.lasts),
        ),
        None if rollback => (handler.rollback(&context).await, None),
        None => (handler.run(&context).await, None),
    };
    let attempt = Begun {
        step,
        rollback,
        number,
        retries_done,
        started_at,
        started,
        call: context.call,
    };
    match later {
        None => Attempted::Now(conclude(shared, order, attempt, result)),
        Some(at) => Attempted::Later {
            at,
            attempt,
            result,
        },
    }
}

/// Says what an attempt that ended came to (see `attempt`), and accounts for it.
fn conclude(
    shared: &Shared,
    order: &Order,
    attempt: Begun,
    result: Result<StepDone, StepError>,
) -> Concluded {
    let Begun {
        step,
        rollback,
        number,
        retries_done,
        started_at,
        started,
        call,
    } = attempt;
    let policy = shared.handlers.for_step(step).retry_policy(rollback);
    let direction = if rollback { "rollback" } else { "run" };
    let elapsed = started.elapsed();
    let outcome = match (&result, rollback) {
        (Ok(_), false) => StepOutcome::Succeeded,
        (Err(_), false) => StepOutcome::Failed,
        (Ok(_), true) => StepOutcome::RolledBack,
        (Err(_), true) => StepOutcome::RollbackFailed,
    };
    shared.metrics.step_finished(step, outcome, elapsed);
    match &result {
        Ok(done) => call.end(outcome.as_str(), done.status, None),
        Err(failure) => call.end(outcome.as_str(), failure.status, Some(&failure.reason)),
    }
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
            return (events, None);
        }
        Err(failure) => failure,
    };
    let mut scheduled = None;
    match policy {
        Some(policy) if failure.retryable && policy.allows_retry(retries_done) => {
            let delay = policy.delay_asked(
                retries_done.saturating_add(1),
                rand::random(),
                failure.retry_after,
            );
            let at = chrono::Utc::now()
                + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
            warn!(order_id = %order.order_id, step = %step, attempt = number, direction, reason = %failure.reason, retry_in = ?delay, "attempt failed, retrying");
            events.push(Event::RetryScheduled { step, rollback, at });
            scheduled = Some(RetryDue::scheduled(at, delay));
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
    (events, scheduled)
}

/// Makes one attempt at delivering a finished order's webhook and says what happened, as the
/// events to commit; and, when it scheduled a retry, when that is due.
async fn notify(shared: &Shared, order: &Order) -> (Vec<Event>, Option<RetryDue>) {
    let Some(notifier) = shared.handlers.notifier() else {
        // Configured on the node that finished the order, not on this one.
        warn!(order_id = %order.order_id, "order owes a completion webhook but notify.url is not set here, giving it up");
        let reason = "notify.url is not set on the node that took the order over".to_string();
        return (vec![Event::NotifyFailed { reason }], None);
    };
    let (number, retries_done) = order.notification.as_ref().map_or((1, 0), |notification| {
        (
            notification.attempts_made.saturating_add(1),
            notification.retries,
        )
    });
    let started_at = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6);
    let started = std::time::Instant::now();
    let result = notifier.send(order).await;
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (status, error) = match &result {
        Ok(status) => (Some(*status), None),
        Err(failure) => (failure.status, Some(failure.reason.clone())),
    };
    shared.metrics.notification_attempted(result.is_ok());
    let mut events = vec![Event::NotifyAttempted {
        attempt: Attempt {
            attempt: number,
            at: started_at,
            rollback: false,
            status,
            error,
            duration_ms,
        },
    }];
    let failure = match result {
        Ok(_) => {
            debug!(order_id = %order.order_id, attempt = number, "completion webhook delivered");
            events.push(Event::Notified);
            return (events, None);
        }
        Err(failure) => failure,
    };
    let policy = notifier.retry_policy();
    if failure.retryable && policy.allows_retry(retries_done) {
        let delay = policy.delay_asked(
            retries_done.saturating_add(1),
            rand::random(),
            failure.retry_after,
        );
        let at =
            chrono::Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
        warn!(order_id = %order.order_id, attempt = number, reason = %failure.reason, retry_in = ?delay, "completion webhook failed, retrying");
        events.push(Event::NotifyRetryScheduled { at });
        return (events, Some(RetryDue::scheduled(at, delay)));
    }
    error!(order_id = %order.order_id, attempt = number, reason = %failure.reason, "completion webhook failed, giving up");
    events.push(Event::NotifyFailed {
        reason: failure.reason,
    });
    (events, None)
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
/// unreachable (also while the node stops: the pool gives up on it when the grace period ends).
/// `None` means this node must let the order go (lost ownership, illegal transition, a record
/// set aside).
async fn commit(shared: &Shared, mut order: Order, events: Vec<Event>) -> Option<Order> {
    let mut stop_rx = shared.stop_rx.clone();
    let mut delay = Duration::from_millis(100);
    // One time for every try of this transition: a commit that timed out may have been applied
    // all the same, and its retry must then write the very same order, not new times.
    let mut now = chrono::Utc::now();
    // Whether an earlier try may have been applied although it failed (its answer was lost).
    let mut maybe_applied = false;
    loop {
        let next = events.iter().try_fold(order.clone(), |current, event| {
            apply_owned(current, event.clone(), now)
        });
        let mut next = match next {
            Ok(next) => next,
            Err(error) => {
                report_illegal(&order, &error);
                return None;
            }
        };
        next.revision = order.revision + 1;
        if next.is_finished() && !order.is_finished() && shared.handlers.notifier().is_some() {
            // Owed in the same write that finishes the order, so no crash can lose it.
            let generation = order
                .notification
                .as_ref()
                .map_or(1, |notification| notification.generation.saturating_add(1));
            next.notification = Some(Notification::pending(generation));
        }
        match shared.store.commit(&next).await {
            Ok(()) => {
                if next.is_finished() {
                    shared.waiters.notify(&next);
                }
                return Some(next);
            }
            Err(StoreError::CancelRequested) => {
                if maybe_applied {
                    if let Some(landed) = landed(shared, &next).await {
                        // The earlier try was applied before the cancellation came: rewriting
                        // it would take back a step the order was seen to finish. The
                        // cancellation applies to the step after it.
                        return Some(landed);
                    }
                }
                // Someone asked to cancel while the step ran: apply the same event again, now
                // knowing, so the order rolls back instead of moving on.
                order.cancel_requested = true;
                now = chrono::Utc::now();
            }
            Err(StoreError::NotOwner) | Err(StoreError::NotFound) => {
                warn!(order_id = %order.order_id, "order is no longer ours, dropping it");
                return None;
            }
            Err(StoreError::Stale) => {
                // Someone wrote a newer revision; this node's view is behind. The stored order
                // is resumed from the store if it is still ours (the reconciliation finds it).
                warn!(order_id = %order.order_id, revision = next.revision, "order changed since it was read here, dropping this copy");
                return None;
            }
            Err(StoreError::Corrupt(reason)) if record_unreadable(shared, order.order_id).await => {
                // The stored record no longer decodes, so the commit cannot check its fence,
                // now or on any retry.
                if set_aside(shared, order.order_id, reason).await
                    || wait_or_stop(&mut stop_rx, &mut delay).await
                {
                    return None;
                }
            }
            Err(error) => {
                maybe_applied = true;
                warn!(order_id = %order.order_id, error = %error, "cannot commit transition, retrying");
                // Also while the node stops: a step that ran is worth committing for as long as
                // the grace period lasts (the pool gives up on it then), not run again elsewhere.
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
}

/// Whether order `id`'s stored record does not decode (a commit answered `Corrupt` may also
/// mean an answer that did not read, which a retry gets past).
async fn record_unreadable(shared: &Shared, id: OrderId) -> bool {
    matches!(shared.store.get(id).await, Err(StoreError::Corrupt(_)))
}

/// The stored order, marked cancelled, when it is `written` plus a cancellation: the write
/// was applied. `None` when it was not, or when the store cannot say now.
async fn landed(shared: &Shared, written: &Order) -> Option<Order> {
    let stored = match shared.store.get(written.order_id).await {
        Ok(Some(stored)) => stored,
        Ok(None) => return None,
        Err(error) => {
            warn!(order_id = %written.order_id, error = %error, "cannot read the order back after a lost answer");
            return None;
        }
    };
    (stored.cancel_requested && same_order(&stored, written)).then_some(stored)
}

fn report_illegal(order: &Order, error: &TransitionError) {
    error!(order_id = %order.order_id, current_step = %order.current_step, error = %error, "illegal transition, dropping order");
}

/// The longest wait between two tries of a store call.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// Sleeps `delay` (doubling it up to 2 s); true when the node began stopping meanwhile.
async fn wait_or_stop(stop_rx: &mut watch::Receiver<bool>, delay: &mut Duration) -> bool {
    if *stop_rx.borrow() {
        return true;
    }
    // Either the delay is over, or the node stops and the caller gives up.
    let stopped = tokio::select! {
        _ = tokio::time::sleep(*delay) => false,
        _ = stop_rx.changed() => true,
    };
    *delay = (*delay * 2).min(MAX_RETRY_DELAY);
    stopped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::order::{RollbackState, CANCELLED};
    use crate::pipeline::fakes::{order, until, Call, FakeStep, FakeStore, Outcome, DEADLINE};
    use crate::pipeline::{Gate, Handlers, RetryPolicy};
    use crate::store::OrderStore;
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    const NODE: &str = "node-a";
    const WORK_STEPS: [Step; 4] = [
        Step::Scheduling,
        Step::PreProcessing,
        Step::Processing,
        Step::PostProcessing,
    ];

    #[test]
    fn a_parked_order_decodes_as_it_was_its_payload_kept_apart_or_not() {
        for form in [StoredForm::Whole, StoredForm::Apart, StoredForm::Split] {
            let order = order(NODE);
            order.payload.set_form(form);
            let decoded = Encoded::of(&order).unwrap().decode().unwrap();
            assert_eq!(decoded, order);
            assert_eq!(decoded.payload.form(), form);
            assert!(!decoded.lacks_payload());
        }
    }

    /// One order, stored in a fake store, and everything an execution of it needs.
    struct Harness {
        shared: Arc<Shared>,
        store: Arc<FakeStore>,
        steps: Arc<FakeStep>,
        gate: Arc<Gate>,
        queue_rx: mpsc::Receiver<Queued>,
        stop_tx: watch::Sender<bool>,
        order: Order,
    }

    impl Harness {
        fn new(steps: Arc<FakeStep>) -> Harness {
            Harness::with_gate(steps, Gate::open())
        }

        fn with_gate(steps: Arc<FakeStep>, gate: Gate) -> Harness {
            let order = order(NODE);
            let store = FakeStore::with(&order);
            let gate = Arc::new(gate);
            let (queue_tx, queue_rx) = mpsc::channel(4);
            let (stop_tx, stop_rx) = watch::channel(false);
            let shared = Arc::new(Shared::new(
                NODE.into(),
                store.clone(),
                Handlers::new(steps.clone()),
                Arc::clone(&gate),
                Arc::new(Metrics::new()),
                queue_tx,
                stop_rx,
            ));
            Harness {
                shared,
                store,
                steps,
                gate,
                queue_rx,
                stop_tx,
                order,
            }
        }

        fn id(&self) -> OrderId {
            self.order.order_id
        }

        /// Executes the order as the pool does: marked active, then driven until it stops.
        async fn execute(&self) {
            self.shared.active.mark(self.id());
            execute(Arc::clone(&self.shared), self.new_job(), None).await;
        }

        /// Like `execute`, in a task of its own, for tests that act while a step runs.
        fn spawn(&self) -> JoinHandle<()> {
            self.shared.active.mark(self.id());
            tokio::spawn(execute(Arc::clone(&self.shared), self.new_job(), None))
        }

        /// The order as `POST /orders` queues it, known to be ours as of now.
        fn new_job(&self) -> Queued {
            Queued {
                job: Job::New(Box::new(self.order.clone())),
                ticket: self.gate.ticket(),
                due: None,
            }
        }

        fn stored(&self) -> Order {
            self.store.order(self.id())
        }

        /// Starts the execution and waits until its first step runs.
        async fn spawn_until_first_step(&self) -> JoinHandle<()> {
            let handle = self.spawn();
            self.until_called(Call::run(Step::Scheduling)).await;
            handle
        }

        /// Checks that the order was cancelled while (or after) its first step ran, and rolled
        /// back without running another step.
        fn assert_cancelled_in_first_step(&self) {
            assert_eq!(
                self.steps.calls(),
                [
                    Call::run(Step::Scheduling),
                    Call::rollback(Step::Scheduling)
                ]
            );
            let stored = self.stored();
            assert_eq!(stored.current_step, Step::Failed);
            assert_eq!(stored.rollback_state, Some(RollbackState::Complete));
            let failure = stored.failure.expect("the failure is recorded");
            assert_eq!(
                (failure.step, failure.reason.as_str()),
                (Step::Scheduling, CANCELLED)
            );
        }

        /// Waits until the fake handler has been asked for `call`.
        async fn until_called(&self, call: Call) {
            until(&format!("{call:?}"), || self.steps.calls().contains(&call)).await;
        }
    }

    async fn finished(handle: JoinHandle<()>) {
        tokio::time::timeout(DEADLINE, handle)
            .await
            .expect("the execution ends")
            .expect("the execution does not panic");
    }

    /// A handler whose first run of the first step waits for `release`.
    fn held_first_step() -> Arc<FakeStep> {
        let steps = FakeStep::new();
        steps.script(Call::run(Step::Scheduling), [Outcome::Hold]);
        steps
    }

    /// Yields to the task an execution left waiting for a retry, so that it runs up to its wait
    /// (tests run on one runtime thread).
    async fn let_retry_wait_begin() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    fn runs(steps: &[Step]) -> Vec<Call> {
        steps.iter().copied().map(Call::run).collect()
    }

    fn retries(backoff: Duration) -> RetryPolicy {
        RetryPolicy {
            retries: 3,
            backoff,
            backoff_max: backoff,
        }
    }

    #[tokio::test]
    async fn an_order_runs_every_step_to_completed() {
        let harness = Harness::new(FakeStep::new());
        let waiter = harness.shared.waiters.register(harness.id());
        harness.execute().await;

        assert_eq!(harness.steps.calls(), runs(&WORK_STEPS));
        let stored = harness.stored();
        assert_eq!(stored.current_step, Step::Completed);
        assert_eq!(stored.phase, Phase::Finished);
        assert!(stored.complete_time.is_some());
        assert_eq!(harness.store.commits(), 4, "one commit per step");
        assert!(!harness.shared.active.contains(harness.id()));
        assert_eq!(
            harness.shared.inflight.load(Ordering::Relaxed),
            0,
            "no longer counted as executing"
        );
        let notified = waiter.await.expect("a long poll hears of the finish");
        assert_eq!(*notified, stored);
    }

    #[tokio::test]
    async fn a_failed_step_rolls_back_every_started_step_newest_first() {
        let steps = FakeStep::new();
        steps.script(Call::run(Step::Processing), [Outcome::Fail]);
        let harness = Harness::new(steps);
        harness.execute().await;

        let mut expected = runs(&WORK_STEPS[..3]);
        expected
            .extend([Step::Processing, Step::PreProcessing, Step::Scheduling].map(Call::rollback));
        assert_eq!(harness.steps.calls(), expected);
        let stored = harness.stored();
        assert_eq!(stored.current_step, Step::Failed);
        assert_eq!(stored.phase, Phase::Finished);
        assert_eq!(stored.rollback_state, Some(RollbackState::Complete));
        let failure = stored.failure.clone().expect("the failure is recorded");
        assert_eq!(
            (failure.step, failure.reason.as_str()),
            (Step::Processing, "refused")
        );
        for step in &WORK_STEPS[..3] {
            let entry = stored.entry(*step).expect("the step was started");
            assert!(entry.step_rollback_time.is_some(), "{step} rolled back");
        }
        assert!(stored.entry(Step::PostProcessing).is_none());
    }

    #[tokio::test]
    async fn a_commit_refused_as_not_owner_ends_the_execution_and_runs_no_further_step() {
        let harness = Harness::new(held_first_step());
        let handle = harness.spawn_until_first_step().await;
        harness.store.take_over(harness.id(), "node-b");
        harness.steps.release();
        finished(handle).await;

        assert_eq!(harness.steps.calls(), runs(&[Step::Scheduling]));
        let stored = harness.stored();
        assert_eq!((stored.owner.as_str(), stored.epoch), ("node-b", 2));
        assert_eq!(stored.current_step, Step::Scheduling, "nothing written");
        assert!(!harness.shared.active.contains(harness.id()));
    }

    #[tokio::test]
    async fn a_commit_the_store_fails_is_retried_with_backoff_without_running_the_step_again() {
        let harness = Harness::new(FakeStep::new());
        harness.store.fail_commits([
            StoreError::Unavailable("timed out".into()),
            StoreError::Unavailable("connection refused".into()),
            StoreError::Corrupt("bad record".into()),
        ]);
        let started = tokio::time::Instant::now();
        harness.execute().await;

        assert!(
            started.elapsed() >= Duration::from_millis(100 + 200 + 400),
            "waits 100 ms, then twice as long each time"
        );
        assert_eq!(harness.steps.calls(), runs(&WORK_STEPS), "each step once");
        assert_eq!(harness.store.commits(), 3 + 4);
        assert_eq!(harness.stored().current_step, Step::Completed);
    }

    #[tokio::test]
    async fn a_commit_applied_but_answered_too_late_is_written_again_unchanged() {
        let harness = Harness::new(FakeStep::new());
        harness.store.answer_late(1);
        harness.execute().await;

        let written = harness.store.written();
        assert_eq!(
            written[0], written[1],
            "the retry writes the order the late answer had already stored"
        );
        assert_eq!(harness.stored().current_step, Step::Completed);
    }

    #[tokio::test]
    async fn a_commit_applied_before_a_cancellation_is_kept_and_the_next_step_is_cancelled() {
        let harness = Harness::new(FakeStep::new());
        harness.store.answer_late_after_a_cancel();
        harness.execute().await;

        let written = harness.store.written();
        let first = written[0].entry(Step::Scheduling).expect("scheduling ran");
        for later in &written[1..] {
            let entry = later.entry(Step::Scheduling).expect("scheduling is kept");
            assert_eq!(
                entry.step_complete_time, first.step_complete_time,
                "a step seen finished stays finished as it was"
            );
            assert!(later.entry(Step::PreProcessing).is_some());
        }
        assert_eq!(
            harness.steps.calls(),
            [
                Call::run(Step::Scheduling),
                Call::rollback(Step::PreProcessing),
                Call::rollback(Step::Scheduling),
            ]
        );
        let failure = harness.stored().failure.expect("the failure is recorded");
        assert_eq!(
            (failure.step, failure.reason.as_str()),
            (Step::PreProcessing, CANCELLED)
        );
    }

    /// An order whose rollback parked is counted as failed then; the retry of its rollback
    /// finishes the same order, and counts it no more.
    #[tokio::test]
    async fn a_retried_parked_rollback_counts_its_order_once() {
        let steps = FakeStep::new();
        steps.script(Call::run(Step::PreProcessing), [Outcome::Fail]);
        steps.script(Call::rollback(Step::Scheduling), [Outcome::Fail]);
        let harness = Harness::new(steps);
        harness.execute().await;
        let parked = harness.stored();
        assert_eq!(parked.rollback_state, Some(RollbackState::Incomplete));
        assert_eq!(harness.shared.metrics.totals().failed, 1);

        let reopened = crate::store::reopen_outcome(
            parked,
            crate::store::Reopening::RollbackRetry,
            NODE,
            chrono::Utc::now(),
        )
        .expect("a parked rollback");
        harness.store.insert(&reopened);
        harness.shared.active.mark(harness.id());
        execute(
            Arc::clone(&harness.shared),
            Queued {
                job: Job::Resume(harness.id()),
                ticket: harness.gate.ticket(),
                due: None,
            },
            None,
        )
        .await;
        assert_eq!(
            harness.stored().rollback_state,
            Some(RollbackState::Complete)
        );
        assert_eq!(harness.shared.metrics.totals().failed, 1);
    }

    #[tokio::test]
    async fn an_order_whose_record_cannot_be_read_is_set_aside_and_runs_no_step() {
        let harness = Harness::new(FakeStep::new());
        harness.store.garble(harness.id());
        harness.shared.active.mark(harness.id());
        let handle = tokio::spawn(execute(
            Arc::clone(&harness.shared),
            Queued {
                job: Job::Resume(harness.id()),
                ticket: None,
                due: None,
            },
            None,
        ));
        finished(handle).await;

        assert!(harness.steps.calls().is_empty());
        let aside = harness.store.set_aside_orders(10).await.unwrap();
        assert_eq!(aside.len(), 1);
        assert_eq!(
            (aside[0].order_id, aside[0].node.as_str()),
            (harness.id(), NODE)
        );
        assert!(aside[0].reason.contains("line 1"), "{}", aside[0].reason);
        assert!(!harness.shared.active.contains(harness.id()));
    }

    #[tokio::test]
    async fn an_order_whose_record_stops_reading_before_a_commit_is_set_aside() {
        let harness = Harness::new(held_first_step());
        let handle = harness.spawn_until_first_step().await;
        harness.store.garble(harness.id());
        harness.steps.release();
        finished(handle).await;

        assert_eq!(harness.steps.calls(), runs(&[Step::Scheduling]));
        let aside = harness.store.set_aside_orders(10).await.unwrap();
        assert_eq!(aside.len(), 1, "set aside, holding no worker");
        assert_eq!(aside[0].order_id, harness.id());
        assert!(!harness.shared.active.contains(harness.id()));
    }

    #[tokio::test]
    async fn a_step_done_as_the_node_stops_is_committed_through_store_failures() {
        let harness = Harness::new(held_first_step());
        harness
            .store
            .fail_commits((0..3).map(|_| StoreError::Unavailable("failing over".into())));
        let handle = harness.spawn_until_first_step().await;
        harness.stop_tx.send(true).unwrap();
        harness.steps.release();
        finished(handle).await;

        assert_eq!(harness.steps.calls(), runs(&[Step::Scheduling]));
        let stored = harness.stored();
        assert!(
            stored
                .entry(Step::Scheduling)
                .and_then(|entry| entry.step_complete_time)
                .is_some(),
            "the step's result is kept, not run again where the order resumes"
        );
        assert_eq!(harness.store.commits(), 4);
        assert!(!harness.shared.active.contains(harness.id()));
    }

    #[tokio::test]
    async fn a_cancellation_while_a_step_runs_rolls_the_order_back_as_cancelled() {
        let harness = Harness::new(held_first_step());
        let handle = harness.spawn_until_first_step().await;
        // As the API does: record the request in the store, then note it here.
        harness
            .store
            .request_cancel(harness.id(), "alice")
            .await
            .unwrap();
        harness.shared.note_cancel(harness.id());
        harness.steps.release();
        finished(handle).await;

        harness.assert_cancelled_in_first_step();
        assert!(
            !harness.shared.cancels.contains(harness.id()),
            "forgotten once the execution ends"
        );
    }

    #[tokio::test]
    async fn a_cancellation_noted_only_here_fails_the_next_step_before_it_runs() {
        let harness = Harness::new(held_first_step());
        let handle = harness.spawn_until_first_step().await;
        harness.shared.note_cancel(harness.id());
        harness.steps.release();
        finished(handle).await;

        assert_eq!(
            harness.steps.calls(),
            [
                Call::run(Step::Scheduling),
                Call::rollback(Step::PreProcessing),
                Call::rollback(Step::Scheduling),
            ],
            "the step that ran is kept, the next one fails without running"
        );
        let failure = harness.stored().failure.expect("the failure is recorded");
        assert_eq!(
            (failure.step, failure.reason.as_str()),
            (Step::PreProcessing, CANCELLED)
        );
    }

    /// Runs the first step while the lease lapses, and waits until its result is committed.
    async fn lapse_during_first_step(harness: &Harness) -> JoinHandle<()> {
        harness
            .gate
            .renewed(std::time::Instant::now() + Duration::from_secs(60));
        let handle = harness.spawn_until_first_step().await;
        harness.gate.renewed(std::time::Instant::now());
        assert!(!harness.gate.is_open());
        harness.steps.release();
        until("the first step's commit", || {
            harness.stored().current_step == Step::PreProcessing
        })
        .await;
        assert_eq!(
            harness.steps.calls(),
            runs(&[Step::Scheduling]),
            "no step starts while the lease has lapsed"
        );
        handle
    }

    #[tokio::test]
    async fn after_a_lease_lapse_an_order_taken_over_meanwhile_runs_no_further_step() {
        let harness = Harness::with_gate(held_first_step(), Gate::closed());
        let handle = lapse_during_first_step(&harness).await;
        harness.store.take_over(harness.id(), "node-b");
        harness
            .gate
            .renewed(std::time::Instant::now() + Duration::from_secs(60));
        finished(handle).await;

        assert_eq!(harness.steps.calls(), runs(&[Step::Scheduling]));
        assert_eq!(harness.stored().owner, "node-b");
        assert!(!harness.shared.active.contains(harness.id()));
    }

    #[tokio::test]
    async fn after_a_lease_lapse_an_order_still_ours_goes_on_once_renewed() {
        let harness = Harness::with_gate(held_first_step(), Gate::closed());
        let handle = lapse_during_first_step(&harness).await;
        harness
            .gate
            .renewed(std::time::Instant::now() + Duration::from_secs(60));
        finished(handle).await;

        assert_eq!(harness.steps.calls(), runs(&WORK_STEPS));
        assert_eq!(harness.stored().current_step, Step::Completed);
    }

    /// Queues the order while the lease holds; while it waits in the queue the lease lapses (and
    /// another node takes the order over, if `taken_over`) and is renewed; then executes it.
    async fn execute_queued_across_a_lapse(taken_over: bool) -> Harness {
        let harness = Harness::with_gate(FakeStep::new(), Gate::closed());
        harness
            .gate
            .renewed(std::time::Instant::now() + Duration::from_secs(60));
        let job = harness.new_job();
        harness.gate.renewed(std::time::Instant::now());
        if taken_over {
            harness.store.take_over(harness.id(), "node-b");
        }
        harness
            .gate
            .renewed(std::time::Instant::now() + Duration::from_secs(60));
        harness.shared.active.mark(harness.id());
        execute(Arc::clone(&harness.shared), job, None).await;
        harness
    }

    #[tokio::test]
    async fn an_order_queued_before_a_lease_lapse_and_taken_over_meanwhile_runs_no_step() {
        let harness = execute_queued_across_a_lapse(true).await;

        assert_eq!(harness.steps.calls(), [], "the service is not called");
        assert_eq!(harness.stored().owner, "node-b");
        assert!(!harness.shared.active.contains(harness.id()));
    }

    #[tokio::test]
    async fn an_order_queued_before_a_lease_lapse_and_still_ours_runs_once_renewed() {
        let harness = execute_queued_across_a_lapse(false).await;

        assert_eq!(harness.steps.calls(), runs(&WORK_STEPS));
        assert_eq!(harness.stored().current_step, Step::Completed);
    }

    /// An order waiting for room to call its step's service (the step's `concurrency` taken by
    /// other calls) while the lease lapses and another node takes it over makes no call once
    /// there is room: the lease is checked after the room is taken.
    #[tokio::test]
    async fn an_order_waiting_for_room_across_a_lease_lapse_calls_nothing_once_taken_over() {
        let steps = FakeStep::with_room(1);
        let harness = Harness::with_gate(steps.clone(), Gate::closed());
        harness
            .gate
            .renewed(std::time::Instant::now() + Duration::from_secs(60));
        let taken = steps.take_room().expect("room for one call");
        let handle = harness.spawn();
        // A turn for the execution, which then waits for room: nothing called yet.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(harness.steps.calls(), []);
        harness.gate.renewed(std::time::Instant::now());
        harness.store.take_over(harness.id(), "node-b");
        harness
            .gate
            .renewed(std::time::Instant::now() + Duration::from_secs(60));
        drop(taken);
        finished(handle).await;

        assert_eq!(harness.steps.calls(), [], "the service is not called");
        assert_eq!(harness.stored().owner, "node-b");
        assert!(!harness.shared.active.contains(harness.id()));
    }

    /// An order waiting for its turn to call its step's service when the node begins to stop
    /// (a drain) starts no call: it is left in the store, to resume later.
    #[tokio::test]
    async fn an_order_waiting_for_room_when_the_node_stops_calls_nothing() {
        let steps = FakeStep::with_room(1);
        let harness = Harness::new(steps.clone());
        let taken = steps.take_room().expect("room for one call");
        let handle = harness.spawn();
        // A turn for the execution, which then waits for room.
        tokio::time::sleep(Duration::from_millis(50)).await;
        harness.stop_tx.send(true).expect("the execution listens");
        finished(handle).await;
        drop(taken);

        assert_eq!(harness.steps.calls(), [], "the service is not called");
        assert_eq!(harness.stored().current_step, Step::Scheduling);
    }

    #[tokio::test]
    async fn a_stored_retry_far_ahead_waits_no_longer_than_the_longest_backoff() {
        let longest = Duration::from_millis(300);
        let steps = FakeStep::with_retries(RetryPolicy {
            retries: 3,
            backoff: Duration::from_millis(100),
            backoff_max: longest,
        });
        steps.script(Call::run(Step::Scheduling), [Outcome::FailRetryable]);
        let mut harness = Harness::new(steps);
        harness.execute().await;
        tokio::time::timeout(DEADLINE, harness.queue_rx.recv())
            .await
            .expect("queued again")
            .expect("the queue is open");
        // As found by a process resuming the order after the clock was stepped back an hour.
        let mut stored = harness.stored();
        let entry = stored.entry_mut(Step::Scheduling).expect("the step entry");
        entry.next_attempt_at = Some(chrono::Utc::now() + chrono::Duration::hours(1));
        harness.store.insert(&stored);

        let resumed = tokio::time::Instant::now();
        execute(
            Arc::clone(&harness.shared),
            Queued::bare(Job::Resume(harness.id())),
            None,
        )
        .await;
        let job = tokio::time::timeout(DEADLINE, harness.queue_rx.recv())
            .await
            .expect("queued again within the longest backoff")
            .expect("the queue is open");
        let waited = resumed.elapsed();
        assert!(waited >= longest - Duration::from_millis(50), "{waited:?}");
        assert!(waited < longest * 3, "{waited:?}");
        execute(Arc::clone(&harness.shared), job, None).await;
        assert_eq!(harness.stored().current_step, Step::Completed);
    }

    #[tokio::test]
    async fn a_retryable_failure_is_recorded_and_the_order_queued_again_when_due() {
        let backoff = Duration::from_millis(300);
        let steps = FakeStep::with_retries(retries(backoff));
        steps.script(Call::run(Step::Scheduling), [Outcome::FailRetryable]);
        let mut harness = Harness::new(steps);
        harness.execute().await;

        let stored = harness.stored();
        assert_eq!(stored.current_step, Step::Scheduling);
        let entry = stored.entry(Step::Scheduling).expect("the step entry");
        assert_eq!((entry.run_attempts, entry.retries), (1, 1));
        let attempt = &entry.attempts[0];
        assert_eq!(
            (attempt.attempt, attempt.rollback, attempt.error.as_deref()),
            (1, false, Some("flaky"))
        );
        let due = entry
            .next_attempt_at
            .expect("the next attempt is scheduled");
        assert!(due - attempt.at >= chrono::Duration::from_std(backoff).unwrap());
        assert!(
            harness.shared.active.contains(harness.id()),
            "still active here while it waits"
        );

        let job = tokio::time::timeout(DEADLINE, harness.queue_rx.recv())
            .await
            .expect("queued again")
            .expect("the queue is open");
        assert!(chrono::Utc::now() >= due - chrono::Duration::milliseconds(2));
        assert!(matches!(job.job, Job::Resume(id) if id == harness.id()));
        execute(Arc::clone(&harness.shared), job, None).await;

        let stored = harness.stored();
        assert_eq!(stored.current_step, Step::Completed);
        let entry = stored.entry(Step::Scheduling).expect("the step entry");
        assert_eq!((entry.run_attempts, entry.retries), (2, 0));
        assert_eq!(entry.next_attempt_at, None);
        assert_eq!(entry.attempts.len(), 2);
        assert_eq!(
            harness.steps.calls()[..2],
            runs(&[Step::Scheduling, Step::Scheduling])
        );
        assert!(!harness.shared.active.contains(harness.id()));
    }

    /// Fails the first step retryably with an hour to wait, notes a cancellation (once the wait
    /// has begun, or at once), and expects the order back in the queue and rolled back.
    async fn cancel_during_retry_wait(wait_begun: bool) {
        let steps = FakeStep::with_retries(retries(Duration::from_secs(3600)));
        steps.script(Call::run(Step::Scheduling), [Outcome::FailRetryable]);
        let mut harness = Harness::new(steps);
        harness.execute().await;
        if wait_begun {
            let_retry_wait_begin().await;
        }
        harness.shared.note_cancel(harness.id());

        let job = tokio::time::timeout(DEADLINE, harness.queue_rx.recv())
            .await
            .expect("queued again long before the retry is due")
            .expect("the queue is open");
        execute(Arc::clone(&harness.shared), job, None).await;

        harness.assert_cancelled_in_first_step();
    }

    #[tokio::test]
    async fn a_cancellation_ends_a_retry_wait_at_once() {
        cancel_during_retry_wait(true).await;
    }

    #[tokio::test]
    async fn a_cancellation_noted_as_the_retry_wait_begins_is_not_missed() {
        cancel_during_retry_wait(false).await;
    }

    #[tokio::test]
    async fn a_rollback_waiting_for_its_retry_is_not_woken_by_the_cancellation_it_carries_out() {
        let steps = FakeStep::with_retries(retries(Duration::from_secs(3600)));
        steps.script(Call::run(Step::Scheduling), [Outcome::Hold]);
        steps.script(Call::rollback(Step::Scheduling), [Outcome::FailRetryable]);
        let mut harness = Harness::new(steps);
        let handle = harness.spawn_until_first_step().await;
        harness.shared.note_cancel(harness.id());
        harness.steps.release();
        finished(handle).await;
        let_retry_wait_begin().await;

        assert!(
            harness.queue_rx.try_recv().is_err(),
            "waits for its retry instead of coming straight back"
        );
        let stored = harness.stored();
        let entry = stored.entry(Step::Scheduling).expect("the step entry");
        assert!(entry.next_attempt_at.is_some());
        assert!(harness.shared.cancels.contains(harness.id()));
    }

    #[tokio::test]
    async fn a_retry_wait_ends_when_the_node_stops_and_the_schedule_stays_stored() {
        let steps = FakeStep::with_retries(retries(Duration::from_secs(3600)));
        steps.script(Call::run(Step::Scheduling), [Outcome::FailRetryable]);
        let mut harness = Harness::new(steps);
        harness.execute().await;
        harness.stop_tx.send(true).unwrap();

        until("the order no longer active", || {
            !harness.shared.active.contains(harness.id())
        })
        .await;
        assert!(harness.queue_rx.try_recv().is_err(), "not queued again");
        let stored = harness.stored();
        assert!(stored
            .entry(Step::Scheduling)
            .unwrap()
            .next_attempt_at
            .is_some());
    }
}
