//! The bounded worker pool: a queue of accepted orders and at most `workers` executions at once.
//!
//! Accepted orders wait in a bounded queue; at most `workers` of them execute at once (each an
//! async task holding a semaphore permit). `POST /orders` reserves a queue slot before it stores
//! anything, so a full queue is a 503 and never an order stored but not queued. On shutdown the
//! pool stops taking jobs and gives running steps a grace period to finish and commit.

use super::adoptions::{Adopting, Adoptions, Since};
use super::executor::execute;
use super::gate::Gate;
use super::handler::Handlers;
use super::job::{Job, Queued};
use super::shared::Shared;
use super::waiters::Waiters;
use crate::metrics::Metrics;
use crate::order::OrderId;
use crate::store::OrderStore;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn, Instrument};

/// How often a shutdown looks whether the parked orders' steps have ended.
const PARKED_POLL: Duration = Duration::from_millis(20);

/// A reserved slot in the queue: holding one guarantees the job can be queued. It keeps the
/// gate's ticket from the moment it was reserved, before the order was stored: if the lease lapses
/// after that, the order is read again before its first step.
pub struct Slot {
    permit: mpsc::OwnedPermit<Queued>,
    ticket: Option<u64>,
    claimed: Claimed,
}

/// The pool a [`Slot`] or a [`Held`] belongs to, and the order it counts as active there while
/// the store call runs; let go when it is dropped unused (a slot unsent: the order was not
/// stored, or is stored under another id; a hold not resumed: the store refused, or the caller
/// went away).
struct Claimed {
    shared: Arc<Shared>,
    id: Option<OrderId>,
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.shared.let_go(id);
        }
    }
}

/// An order held by [`Pool::hold`] until it is resumed, or let go when dropped.
pub struct Held {
    claimed: Claimed,
}

impl Held {
    /// Queues the held order's run in the background, waiting for room; let go if the pool
    /// stops first (it stays in the store).
    pub fn resume(mut self, pool: &Arc<Pool>) {
        let Some(id) = self.claimed.id.take() else {
            return;
        };
        let pool = Arc::clone(pool);
        tokio::spawn(async move { pool.queue_marked(Job::Resume(id)).await });
    }
}

impl Slot {
    /// Counts the new order `id` as active here from now on, before it is stored: the
    /// reconciliation may list the order as soon as it is stored, and must find it held, not
    /// take it for one that nothing runs. False (and nothing claimed) when it is active already.
    pub fn claim(&mut self, id: OrderId) -> bool {
        if self.claimed.id.is_some() || !self.claimed.shared.active.mark(id) {
            return false;
        }
        self.claimed.id = Some(id);
        true
    }

    /// Queues the job in the reserved slot; a new order counts as active here from now on (the
    /// one claimed, or the job's). A new order that is already active here, unclaimed, is not
    /// queued again: the run that holds it drives the stored order.
    pub fn send(self, job: Job) {
        let Slot {
            permit,
            ticket,
            mut claimed,
        } = self;
        if let Job::New(order) = &job {
            if claimed.id == Some(order.order_id) {
                claimed.id = None;
            } else if !claimed.shared.active.mark(order.order_id) {
                return;
            }
        }
        drop(claimed);
        permit.send(Queued {
            job,
            ticket,
            due: None,
        });
    }
}

/// The bounded worker pool of one node.
pub struct Pool {
    shared: Arc<Shared>,
    queue_tx: mpsc::Sender<Queued>,
    capacity: usize,
    workers: usize,
    /// The most orders active here (see [`crate::config::PipelineConfig::max_orders`]) before
    /// new ones are refused.
    max_orders: usize,
    stop_tx: watch::Sender<bool>,
    /// Moves of orders to this node under way.
    adoptions: Adoptions,
    /// Why an async lock: `shutdown` holds it across awaiting the dispatcher, and only the first
    /// caller takes the handle.
    dispatcher: tokio::sync::Mutex<Option<tokio::task::JoinHandle<JoinSet<()>>>>,
}

impl Pool {
    /// Starts the dispatcher: at most `workers` orders execute at once, `queue_capacity` more
    /// wait for a worker, and new orders are refused while `max_orders` are active here.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        node_id: String,
        store: Arc<dyn OrderStore>,
        handlers: Handlers,
        gate: Arc<Gate>,
        workers: usize,
        queue_capacity: usize,
        max_orders: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<Pool> {
        let (queue_tx, queue_rx) = mpsc::channel(queue_capacity);
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared::new(
            node_id,
            store,
            handlers,
            gate,
            metrics,
            queue_tx.clone(),
            stop_rx,
        ));
        tokio::spawn(
            super::parking::wake_parked(Arc::clone(&shared))
                .instrument(tracing::info_span!("parking")),
        );
        let dispatcher = tokio::spawn(
            dispatch(Arc::clone(&shared), queue_rx, workers)
                .instrument(tracing::info_span!("dispatcher")),
        );
        Arc::new(Pool {
            shared,
            queue_tx,
            capacity: queue_capacity,
            workers,
            max_orders,
            stop_tx,
            adoptions: Adoptions::default(),
            dispatcher: tokio::sync::Mutex::new(Some(dispatcher)),
        })
    }

    /// Reserves a queue slot for a new order, or `None` when the queue is full, `max_orders`
    /// are active here already, or the pool is stopping.
    pub fn try_reserve(&self) -> Option<Slot> {
        if *self.stop_tx.borrow() || self.shared.active.len() >= self.max_orders {
            return None;
        }
        self.queue_tx
            .clone()
            .try_reserve_owned()
            .ok()
            .map(|permit| {
                let ticket = self.shared.gate.ticket();
                Slot {
                    permit,
                    ticket,
                    claimed: Claimed {
                        shared: Arc::clone(&self.shared),
                        id: None,
                    },
                }
            })
    }

    /// Queues a job, waiting for room; false once the pool stops. An order already queued or
    /// executing here is not queued twice.
    pub async fn enqueue(&self, job: Job) -> bool {
        if *self.shared.stop_rx.borrow() {
            return false;
        }
        let id = job.order_id();
        let fresh = match &job {
            Job::New(_) => self.shared.active.mark(id),
            Job::Resume(_) => self.shared.active.mark_or_rerun(id),
        };
        if !fresh {
            return true;
        }
        self.queue_marked(job).await
    }

    /// See [`Shared::queue_marked`].
    async fn queue_marked(&self, job: Job) -> bool {
        self.shared.queue_marked(job).await
    }

    /// Queues the resumption of many orders in the background, in order. Each counts as active
    /// here at once, not only once the queue has room for it: a reconciliation pass meanwhile
    /// must not take those still waiting for room for orders that nothing runs.
    pub fn resume_all(self: &Arc<Self>, ids: Vec<OrderId>) {
        let fresh: Vec<OrderId> = ids
            .into_iter()
            .filter(|id| self.shared.active.mark_or_rerun(*id))
            .collect();
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            let mut fresh = fresh.into_iter();
            for id in fresh.by_ref() {
                if !pool.queue_marked(Job::Resume(id)).await {
                    break;
                }
            }
            // Not queued before the pool stopped: they stay in the store.
            for id in fresh {
                pool.shared.unmark(id);
            }
        });
    }

    /// Counts `id` as active here from now on, before a store call that makes it this node's to
    /// run (a parked rollback's retry): a reconciliation pass meanwhile finds it held. `None`
    /// when it is active here already. Dropped unused, it lets the order go.
    pub fn hold(&self, id: OrderId) -> Option<Held> {
        self.shared.active.mark(id).then(|| Held {
            claimed: Claimed {
                shared: Arc::clone(&self.shared),
                id: Some(id),
            },
        })
    }

    /// Notes a move of orders to this node under way (a takeover, the start's scan) until the
    /// guard is dropped, once [`Pool::resume_all`] holds them: a reconciliation pass it
    /// overlapped leaves what it found to the next pass.
    pub fn adopting(&self) -> Adopting<'_> {
        self.adoptions.begin()
    }

    /// Now, for [`Pool::adopted_since`].
    pub fn adoptions_now(&self) -> Since {
        self.adoptions.now()
    }

    /// Whether a move of orders to this node was under way at some moment since `since`.
    pub fn adopted_since(&self, since: Since) -> bool {
        self.adoptions.overlapped(since)
    }

    /// Changes to true when the pool starts stopping.
    pub(super) fn stop_rx(&self) -> watch::Receiver<bool> {
        self.shared.stop_rx.clone()
    }

    /// Whether this node executes the order, has it queued or waits to retry one of its steps.
    pub fn is_active(&self, id: OrderId) -> bool {
        self.shared.active.contains(id)
    }

    /// Orders executing now, or parked while their step takes its time.
    pub fn inflight(&self) -> usize {
        self.shared.inflight.load(Ordering::Relaxed) + self.shared.parking.len()
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

    /// Notes a cancellation requested through this node: the order stops before its next step,
    /// and stops waiting if it waits for a retry. Only an order active here reads the note (any
    /// other learns of the cancellation from the store when it is next read), so no other is
    /// noted: the notes stay as many as the orders here. An execution forgets its order's note
    /// after it stops being active, so a note made as it ends is taken back here.
    pub fn note_cancel(&self, id: OrderId) {
        self.shared.note_cancel(id);
    }

    /// Whether this node sends completion webhooks (it has a `[notify]` section).
    pub fn notifies(&self) -> bool {
        self.shared.handlers.notifier().is_some()
    }

    /// Whether `shutdown` has begun: the pool takes no more jobs.
    pub fn is_stopping(&self) -> bool {
        *self.stop_tx.borrow()
    }

    /// Stops taking jobs, lets running steps finish and commit for up to `grace`, then abandons
    /// what is left (those steps run again wherever the order resumes).
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.stop_tx.send(true);
        // Long polls are answered now, with their orders as they are: the HTTP server stops
        // after the grace period, and would cut them.
        self.shared.waiters.close();
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
        let running = self.inflight();
        if running > 0 {
            info!(running, grace = ?grace, "waiting for running steps to finish");
        }
        let drained = tokio::time::timeout(grace, async {
            while tasks.join_next().await.is_some() {}
            // Parked steps end on their timer and commit from tasks of their own.
            while self.inflight() > 0 {
                tokio::time::sleep(PARKED_POLL).await;
            }
        })
        .await;
        if drained.is_err() {
            warn!(
                abandoned = self.inflight(),
                "grace period over, abandoning running steps; they run again on resume"
            );
            tasks.shutdown().await;
        }
    }
}

/// Takes a worker permit, then a job, and runs it; returns the running tasks once stopped.
async fn dispatch(
    shared: Arc<Shared>,
    mut queue_rx: mpsc::Receiver<Queued>,
    workers: usize,
) -> JoinSet<()> {
    let permits = Arc::new(Semaphore::new(workers));
    let mut tasks = JoinSet::new();
    let mut stop_rx = shared.stop_rx.clone();
    loop {
        // Reap finished executions so the set only holds running ones.
        while tasks.try_join_next().is_some() {}
        // Permit first, then job: a job leaves the queue only when a worker is free for it, so
        // the queue bound is exact. Either a worker frees up or the node stops.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stop_rx.changed() => break,
        };
        // Either a job arrives or the node stops (the job then stays in the store).
        let job = tokio::select! {
            job = queue_rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
            _ = stop_rx.changed() => break,
        };
        let shared = Arc::clone(&shared);
        tasks.spawn(execute(shared, job, Some(permit)));
    }
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::{Order, Step};
    use crate::pipeline::fakes::{order, until, Call, FakeStep, FakeStore, Outcome, DEADLINE};

    const NODE: &str = "node-a";

    /// A pool of one worker and a queue of one, whose first step waits for `release` each time,
    /// with one order submitted and running.
    async fn running_one() -> (Arc<FakeStore>, Arc<FakeStep>, Arc<Pool>, Order) {
        let (store, steps) = (Arc::new(FakeStore::default()), FakeStep::new());
        steps.script(Call::run(Step::Scheduling), [Outcome::Hold, Outcome::Hold]);
        let pool = one_worker(&store, &steps, Arc::new(Gate::open()), 1);
        let order = submit(&pool, &store).expect("a free worker");
        until("the first order running", || pool.inflight() == 1).await;
        (store, steps, pool, order)
    }

    /// A pool of one worker on `store` and `steps`, behind `gate`, with a queue of `queue`.
    fn one_worker(
        store: &Arc<FakeStore>,
        steps: &Arc<FakeStep>,
        gate: Arc<Gate>,
        queue: usize,
    ) -> Arc<Pool> {
        Pool::start(
            NODE.into(),
            store.clone(),
            Handlers::new(steps.clone()),
            gate,
            1,
            queue,
            usize::MAX,
            Arc::new(Metrics::new()),
        )
    }

    /// Submits a stored order as `POST /orders` does.
    fn submit(pool: &Pool, store: &FakeStore) -> Option<Order> {
        let order = order(NODE);
        store.insert(&order);
        pool.try_reserve()?.send(Job::New(Box::new(order.clone())));
        Some(order)
    }

    #[tokio::test]
    async fn orders_beyond_the_workers_and_the_queue_are_refused() {
        let (store, steps, pool, first) = running_one().await;
        let second = submit(&pool, &store).expect("room in the queue");
        assert_eq!(pool.queued(), 1);
        assert!(submit(&pool, &store).is_none(), "worker busy, queue full");
        assert!(pool.is_active(first.order_id) && pool.is_active(second.order_id));

        steps.release();
        steps.release();
        until("both orders done", || {
            !pool.is_active(first.order_id) && !pool.is_active(second.order_id)
        })
        .await;
        assert_eq!(store.order(second.order_id).current_step, Step::Completed);
        assert_eq!((pool.inflight(), pool.queued()), (0, 0));
    }

    /// A cancellation asked through this node of an order that runs elsewhere (or has ended
    /// here) leaves no note behind; one of an order running here is noted until it ends.
    #[tokio::test]
    async fn only_cancellations_of_orders_active_here_are_noted_and_only_while_they_are() {
        let (store, steps, pool, running) = running_one().await;
        for _ in 0..3 {
            pool.note_cancel(OrderId::new_v4());
        }
        assert_eq!(pool.shared.cancels.len(), 0);
        pool.note_cancel(running.order_id);
        assert_eq!(pool.shared.cancels.len(), 1);
        steps.release();
        until("the order done", || !pool.is_active(running.order_id)).await;
        assert_eq!(pool.shared.cancels.len(), 0);
        assert_eq!(store.order(running.order_id).current_step, Step::Failed);
        pool.shutdown(DEADLINE).await;
    }

    #[tokio::test]
    async fn an_order_queued_before_a_lease_lapse_and_taken_over_meanwhile_is_not_run() {
        let (store, steps) = (Arc::new(FakeStore::default()), FakeStep::new());
        let gate = Arc::new(Gate::closed());
        gate.renewed(std::time::Instant::now() + Duration::from_secs(60));
        let pool = one_worker(&store, &steps, Arc::clone(&gate), 1);
        let slot = pool.try_reserve().expect("room in the queue");
        let order = order(NODE);
        store.insert(&order);
        // The lease lapses, another node takes the order over, the lease is renewed; only then
        // is the order queued.
        gate.renewed(std::time::Instant::now());
        store.take_over(order.order_id, "node-b");
        gate.renewed(std::time::Instant::now() + Duration::from_secs(60));
        slot.send(Job::New(Box::new(order.clone())));
        until("the order let go", || !pool.is_active(order.order_id)).await;

        assert_eq!(steps.calls(), [], "the service is not called");
        assert_eq!(store.order(order.order_id).owner, "node-b");
        pool.shutdown(DEADLINE).await;
    }

    #[tokio::test]
    async fn a_claimed_order_is_held_until_it_is_queued_or_the_slot_is_dropped() {
        let (store, steps) = (Arc::new(FakeStore::default()), FakeStep::new());
        let pool = one_worker(&store, &steps, Arc::new(Gate::open()), 4);
        // Not stored (the store refused it): let go with the slot.
        let unstored = order(NODE);
        let mut slot = pool.try_reserve().expect("room in the queue");
        assert!(slot.claim(unstored.order_id));
        assert!(
            pool.is_active(unstored.order_id),
            "held before it is stored"
        );
        assert!(!slot.claim(order(NODE).order_id), "one claim a slot");
        drop(slot);
        assert!(!pool.is_active(unstored.order_id));

        // Stored under another id: the claimed one is let go, the stored one runs.
        let (claimed, stored) = (order(NODE), order(NODE));
        store.insert(&stored);
        let mut slot = pool.try_reserve().expect("room in the queue");
        assert!(slot.claim(claimed.order_id));
        slot.send(Job::New(Box::new(stored.clone())));
        assert!(!pool.is_active(claimed.order_id));
        until("the stored order done", || !pool.is_active(stored.order_id)).await;
        assert_eq!(store.order(stored.order_id).current_step, Step::Completed);

        // Stored under the claimed id: queued once, and runs.
        let claimed = order(NODE);
        store.insert(&claimed);
        let mut slot = pool.try_reserve().expect("room in the queue");
        assert!(slot.claim(claimed.order_id));
        slot.send(Job::New(Box::new(claimed.clone())));
        until("the claimed order done", || {
            !pool.is_active(claimed.order_id)
        })
        .await;
        assert_eq!(store.order(claimed.order_id).current_step, Step::Completed);
        pool.shutdown(DEADLINE).await;
    }

    #[tokio::test]
    async fn an_order_held_before_its_store_call_is_let_go_when_dropped_or_runs_when_resumed() {
        let (store, steps) = (Arc::new(FakeStore::default()), FakeStep::new());
        let pool = one_worker(&store, &steps, Arc::new(Gate::open()), 4);
        let held = order(NODE);
        store.insert(&held);
        let hold = pool.hold(held.order_id).expect("not active yet");
        assert!(pool.is_active(held.order_id));
        assert!(pool.hold(held.order_id).is_none(), "held once");
        drop(hold);
        assert!(!pool.is_active(held.order_id), "let go when dropped");

        pool.hold(held.order_id)
            .expect("let go before")
            .resume(&pool);
        assert!(pool.is_active(held.order_id), "held while queued");
        until("the held order done", || !pool.is_active(held.order_id)).await;
        assert_eq!(store.order(held.order_id).current_step, Step::Completed);
        pool.shutdown(DEADLINE).await;
    }

    #[tokio::test]
    async fn a_held_order_asked_to_run_meanwhile_runs_when_the_hold_is_dropped() {
        let (store, steps) = (Arc::new(FakeStore::default()), FakeStep::new());
        let pool = one_worker(&store, &steps, Arc::new(Gate::open()), 4);
        let held = order(NODE);
        store.insert(&held);
        // One rollback retry holds the order; another re-opens it in the store meanwhile and
        // asks for a run, which finds it held; the first is refused and lets go.
        let hold = pool.hold(held.order_id).expect("not active yet");
        pool.resume_all(vec![held.order_id]);
        drop(hold);
        until("the order run", || {
            store.order(held.order_id).current_step == Step::Completed
        })
        .await;
        until("the order done", || !pool.is_active(held.order_id)).await;
        pool.shutdown(DEADLINE).await;
    }

    #[tokio::test]
    async fn orders_resumed_together_are_held_at_once_and_let_go_if_the_pool_stops_first() {
        let (store, steps, pool, running) = running_one().await;
        let waiting: Vec<Order> = (0..3).map(|_| order(NODE)).collect();
        for order in &waiting {
            store.insert(order);
        }
        pool.resume_all(waiting.iter().map(|order| order.order_id).collect());
        // One fits in the queue; the others wait for room, and are held all the same.
        assert!(waiting.iter().all(|order| pool.is_active(order.order_id)));
        until("one queued", || pool.queued() == 1).await;

        let stopping = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.shutdown(DEADLINE).await }
        });
        until("the pool stopping", || pool.is_stopping()).await;
        until("the waiting ones let go", || {
            !pool.is_active(waiting[1].order_id) && !pool.is_active(waiting[2].order_id)
        })
        .await;
        steps.release();
        tokio::time::timeout(DEADLINE, stopping)
            .await
            .expect("shutdown ends")
            .unwrap();
        // The running one stopped after its step; the ones let go never ran, and stay stored.
        assert!(!pool.is_active(running.order_id));
        for order in &waiting[1..] {
            assert_eq!(store.order(order.order_id).current_step, order.current_step);
        }
    }

    #[tokio::test]
    async fn shutdown_lets_a_running_step_finish_and_commit_then_takes_no_more() {
        let (store, steps, pool, order) = running_one().await;
        let stopping = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.shutdown(DEADLINE).await }
        });
        until("the pool stopping", || pool.is_stopping()).await;
        steps.release();
        tokio::time::timeout(DEADLINE, stopping)
            .await
            .expect("shutdown ends")
            .unwrap();

        let stored = store.order(order.order_id);
        assert_eq!(
            stored.current_step,
            Step::PreProcessing,
            "the step's result is kept, the next step left to resume"
        );
        assert!(!pool.is_active(order.order_id));
        assert!(pool.try_reserve().is_none());
        assert!(!pool.enqueue(Job::Resume(order.order_id)).await);
    }

    #[tokio::test]
    async fn shutdown_abandons_a_step_still_running_when_the_grace_is_over() {
        let (store, _, pool, order) = running_one().await;
        pool.shutdown(Duration::from_millis(50)).await;

        assert_eq!(store.order(order.order_id), order, "nothing written");
        assert!(!pool.is_active(order.order_id));
        assert_eq!(pool.inflight(), 0);
    }
}
