//! The order service without HTTP: a real embedded store in a temp dir and a real worker pool,
//! with step handlers scripted for each case.

use super::*;
use crate::config::SimulateConfig;
use crate::metrics::Metrics;
use crate::order::{Phase, RollbackState, Step, CANCELLED};
use crate::pipeline::{
    Gate, Handlers, Pool, RetryPolicy, Simulate, StepContext, StepDone, StepError, StepHandler,
};
use crate::store::embedded::EmbeddedStore;
use crate::store::OrderStore;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

const NODE: &str = "node-a";
const RETRY_AFTER: Duration = Duration::from_secs(3);
/// How long a test waits for an order to finish before it fails.
const FINISH: Duration = Duration::from_secs(10);

struct Fixture {
    service: OrderService,
    store: Arc<dyn OrderStore>,
    pool: Arc<Pool>,
    _dir: tempfile::TempDir,
}

/// A node with `workers` workers (0: nothing ever runs), a queue of `queue`, at most `per_user`
/// unfinished orders per user, and `handler` for every step.
fn node(workers: usize, queue: usize, per_user: usize, handler: Arc<dyn StepHandler>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn OrderStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let metrics = Arc::new(Metrics::new());
    let pool = Pool::start(
        NODE.into(),
        Arc::clone(&store),
        Handlers::new(handler),
        Arc::new(Gate::open()),
        workers,
        queue,
        usize::MAX,
        Arc::clone(&metrics),
    );
    let service = OrderService::new(
        NODE.into(),
        Arc::clone(&store),
        Arc::clone(&pool),
        metrics,
        InFlight::new(per_user),
        RETRY_AFTER,
    );
    Fixture {
        service,
        store,
        pool,
        _dir: dir,
    }
}

fn simulate(duration: Duration) -> Arc<dyn StepHandler> {
    Arc::new(Simulate::new(SimulateConfig {
        duration,
        failure_rate: 0.0,
        output_bytes: 0,
    }))
}

/// A node whose orders never start.
fn idle(queue: usize, per_user: usize) -> Fixture {
    node(0, queue, per_user, simulate(Duration::ZERO))
}

/// A node that runs every step in a millisecond.
fn running() -> Fixture {
    node(2, 16, 16, simulate(Duration::from_millis(1)))
}

fn new_order(user: &str, key: Option<&str>) -> NewOrder {
    NewOrder {
        user: user.into(),
        payload: serde_json::json!({"sku": "A1"}),
        idempotency_key: key.map(str::to_string),
        trace: None,
    }
}

impl Fixture {
    async fn submit(&self, user: &str) -> OrderId {
        let submitted = self.accepted(new_order(user, None)).await;
        assert!(!submitted.replayed);
        submitted.order.order_id
    }

    async fn accepted(&self, new: NewOrder) -> Submitted {
        self.service.submit(new).await.unwrap()
    }

    async fn refused(&self, new: NewOrder) -> OrderError {
        self.service.submit(new).await.unwrap_err()
    }

    async fn count(&self, user: &str) -> usize {
        let query = ListQuery {
            limit: 500,
            ..ListQuery::default()
        };
        self.service.list(user, &query).await.unwrap().orders.len()
    }

    /// Stores an order of `user` that is never queued, so it stays unfinished.
    async fn stored(&self, user: &str) -> OrderId {
        let order = Order::new(
            OrderId::now_v7(),
            user.into(),
            serde_json::json!({}),
            NODE.into(),
            chrono::Utc::now(),
        );
        self.store.create(&order, None).await.unwrap();
        order.order_id
    }

    async fn finished(&self, user: &str, id: OrderId) -> Arc<Order> {
        let order = self
            .service
            .wait_one(Scope::User(user), id, FINISH)
            .await
            .unwrap();
        assert!(order.is_finished(), "not finished within {FINISH:?}");
        order
    }
}

#[tokio::test]
async fn an_idempotent_replay_returns_the_first_order() {
    let node = idle(8, 8);
    let first = node.accepted(new_order("alice", Some(" cart-42 "))).await;
    assert!(!first.replayed);
    let again = node.accepted(new_order("alice", Some("cart-42"))).await;
    assert!(again.replayed);
    assert_eq!(again.order.order_id, first.order.order_id);
    assert_eq!(again.order.start_time, first.order.start_time);
    assert_eq!(node.count("alice").await, 1);
    // Another user's key is another key.
    let bob = node.accepted(new_order("bob", Some("cart-42"))).await;
    assert!(!bob.replayed);
    assert_ne!(bob.order.order_id, first.order.order_id);
    // The same key with another body is refused, and stores nothing.
    let other = NewOrder {
        payload: serde_json::json!({"sku": "B2"}),
        ..new_order("alice", Some("cart-42"))
    };
    match node.refused(other).await {
        OrderError::KeyReused(id) => assert_eq!(id, first.order.order_id),
        other => panic!("expected KeyReused, got {other:?}"),
    }
    assert_eq!(node.count("alice").await, 1);
}

#[tokio::test]
async fn bad_submissions_are_invalid_and_store_nothing() {
    let node = idle(8, 8);
    let long_key = "k".repeat(257);
    let mut not_an_object = new_order("alice", None);
    not_an_object.payload = serde_json::json!([1]);
    for bad in [new_order("alice", Some(&long_key)), not_an_object] {
        let error = node.refused(bad).await;
        assert!(matches!(error, OrderError::Invalid(_)), "{error:?}");
    }
    assert_eq!(node.count("alice").await, 0);
}

#[tokio::test]
async fn a_full_queue_is_an_overload_and_stores_nothing() {
    let node = idle(1, 8);
    node.submit("alice").await;
    let error = node.refused(new_order("alice", None)).await;
    assert!(
        matches!(error, OrderError::QueueFull { retry_after } if retry_after == RETRY_AFTER),
        "{error:?}"
    );
    assert_eq!(node.count("alice").await, 1);
}

#[tokio::test]
async fn a_stopping_node_takes_nothing() {
    let node = idle(8, 8);
    node.pool.shutdown(Duration::ZERO).await;
    let error = node.refused(new_order("alice", None)).await;
    assert!(matches!(error, OrderError::Stopping { .. }), "{error:?}");
    assert_eq!(node.count("alice").await, 0);
    let id = node.stored("alice").await;
    let error = node.service.retry_rollback("alice", id).await.unwrap_err();
    assert!(matches!(error, OrderError::Stopping { .. }), "{error:?}");
}

#[tokio::test]
async fn each_user_has_a_cap_on_unfinished_orders() {
    let node = idle(8, 2);
    node.submit("alice").await;
    node.submit("alice").await;
    let error = node.refused(new_order("alice", None)).await;
    assert!(
        matches!(error, OrderError::TooManyInFlight { .. }),
        "{error:?}"
    );
    assert_eq!(node.count("alice").await, 2);
    node.submit("bob").await;
    // A replay is not a new order: it passes while the user is under the cap only.
    let keyed = idle(8, 1);
    keyed.accepted(new_order("alice", Some("k"))).await;
    let error = keyed.refused(new_order("alice", Some("k"))).await;
    assert!(
        matches!(error, OrderError::TooManyInFlight { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn finished_orders_no_longer_count_against_the_cap() {
    let node = node(2, 8, 1, simulate(Duration::from_millis(1)));
    for _ in 0..3 {
        let id = node.submit("alice").await;
        node.finished("alice", id).await;
    }
}

#[tokio::test]
async fn a_caller_sees_only_their_own_orders_and_an_admin_all() {
    let node = idle(8, 8);
    let id = node.submit("alice").await;
    assert_eq!(
        node.service
            .get(Scope::User("alice"), id)
            .await
            .unwrap()
            .order_id,
        id
    );
    assert_eq!(
        node.service.get(Scope::All, id).await.unwrap().user,
        "alice"
    );
    for (scope, id) in [(Scope::User("bob"), id), (Scope::All, OrderId::new_v4())] {
        let error = node.service.get(scope, id).await.unwrap_err();
        assert!(matches!(error, OrderError::NotFound), "{error:?}");
    }
}

#[tokio::test]
async fn cancel_of_a_finished_order_is_a_conflict() {
    let node = running();
    let id = node.submit("alice").await;
    assert_eq!(
        node.finished("alice", id).await.current_step,
        Step::Completed
    );
    let error = node.service.cancel("alice", id).await.unwrap_err();
    assert!(matches!(error, OrderError::Finished), "{error:?}");
    let error = node.service.cancel("bob", id).await.unwrap_err();
    assert!(matches!(error, OrderError::NotFound), "{error:?}");
}

/// Fails each step with an error worth retrying an hour later; rollbacks succeed.
struct Unreachable;

#[async_trait]
impl StepHandler for Unreachable {
    async fn run(&self, _context: &StepContext<'_>) -> Result<StepDone, StepError> {
        Err(StepError::retryable("connection refused"))
    }

    async fn rollback(&self, _context: &StepContext<'_>) -> Result<StepDone, StepError> {
        Ok(StepDone::default())
    }

    fn retry_policy(&self, rollback: bool) -> Option<RetryPolicy> {
        (!rollback).then_some(RetryPolicy {
            retries: 5,
            backoff: Duration::from_secs(3600),
            backoff_max: Duration::from_secs(3600),
        })
    }
}

#[tokio::test]
async fn cancel_of_an_unfinished_order_notes_the_pool() {
    let node = node(2, 8, 8, Arc::new(Unreachable));
    let id = node.submit("alice").await;
    // Wait until the order sits out its retry, an hour away.
    let deadline = Instant::now() + FINISH;
    loop {
        let order = node.service.get(Scope::User("alice"), id).await.unwrap();
        let waiting = order
            .entry(Step::Scheduling)
            .is_some_and(|entry| entry.next_attempt_at.is_some());
        if waiting {
            break;
        }
        assert!(Instant::now() < deadline, "no retry scheduled: {order:?}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let order = node.service.cancel("alice", id).await.unwrap();
    assert!(order.cancel_requested);
    // Only the pool's note wakes the order before its retry is due.
    let order = node.finished("alice", id).await;
    assert_eq!(order.current_step, Step::Failed);
    assert_eq!(
        order
            .failure
            .as_ref()
            .map(|failure| failure.reason.as_str()),
        Some(CANCELLED)
    );
}

/// Fails the first step for good; its rollback fails until `heal` is called.
#[derive(Default)]
struct BrokenRollback {
    healed: AtomicBool,
}

impl BrokenRollback {
    fn heal(&self) {
        self.healed.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl StepHandler for BrokenRollback {
    async fn run(&self, _context: &StepContext<'_>) -> Result<StepDone, StepError> {
        Err(StepError::new("out of stock"))
    }

    async fn rollback(&self, _context: &StepContext<'_>) -> Result<StepDone, StepError> {
        if self.healed.load(Ordering::SeqCst) {
            Ok(StepDone::default())
        } else {
            Err(StepError::new("ledger down"))
        }
    }
}

#[tokio::test]
async fn a_parked_rollback_is_retried_on_this_node() {
    let handler = Arc::new(BrokenRollback::default());
    let node = node(2, 8, 8, handler.clone());
    let id = node.submit("alice").await;
    let parked = node.finished("alice", id).await;
    assert_eq!(parked.rollback_state, Some(RollbackState::Incomplete));
    let error = node.service.retry_rollback("bob", id).await.unwrap_err();
    assert!(matches!(error, OrderError::NotFound), "{error:?}");

    handler.heal();
    let order = node.service.retry_rollback("alice", id).await.unwrap();
    assert_eq!(order.phase, Phase::RollingBack);
    // Queued again: the rollback runs to its end.
    let order = node.finished("alice", id).await;
    assert_eq!(order.rollback_state, Some(RollbackState::Complete));
}

#[tokio::test]
async fn a_rollback_that_is_not_parked_is_a_conflict() {
    let node = running();
    let id = node.submit("alice").await;
    node.finished("alice", id).await;
    let error = node.service.retry_rollback("alice", id).await.unwrap_err();
    assert!(matches!(error, OrderError::NotParked), "{error:?}");
}

#[tokio::test]
async fn a_node_without_a_webhook_sends_none_again() {
    let node = running();
    let id = node.submit("alice").await;
    node.finished("alice", id).await;
    let error = node.service.redeliver("alice", id).await.unwrap_err();
    assert!(matches!(error, OrderError::NoNotify), "{error:?}");
}

#[tokio::test]
async fn wait_one_answers_when_the_order_finishes() {
    let node = node(2, 8, 8, simulate(Duration::from_millis(20)));
    let id = node.submit("alice").await;
    let order = node.finished("alice", id).await;
    assert_eq!(order.current_step, Step::Completed);
}

#[tokio::test]
async fn wait_one_answers_with_the_unfinished_order_when_the_wait_is_over() {
    let node = idle(8, 8);
    let id = node.submit("alice").await;
    let wait = Duration::from_millis(300);
    let started = Instant::now();
    let order = node
        .service
        .wait_one(Scope::User("alice"), id, wait)
        .await
        .unwrap();
    assert!(started.elapsed() >= wait);
    assert!(!order.is_finished());
    assert_eq!(order.current_step, Step::Scheduling);
    let error = node
        .service
        .wait_one(Scope::User("bob"), id, wait)
        .await
        .unwrap_err();
    assert!(matches!(error, OrderError::NotFound), "{error:?}");
    assert!(node.pool.waiters().is_empty(), "waits forget themselves");
}

#[tokio::test]
async fn wait_many_sorts_finished_pending_and_missing() {
    let node = running();
    let done = node.submit("alice").await;
    node.finished("alice", done).await;
    let pending = node.stored("alice").await;
    let bobs = node.stored("bob").await;
    let unknown = OrderId::new_v4();
    let wait = Duration::from_millis(300);
    let started = Instant::now();
    let waited = node
        .service
        .wait_many(
            Scope::User("alice"),
            vec![done, pending, bobs, unknown, done],
            wait,
        )
        .await
        .unwrap();
    assert!(started.elapsed() >= wait);
    let finished: Vec<OrderId> = waited.finished.iter().map(|order| order.order_id).collect();
    assert_eq!(finished, vec![done]);
    assert_eq!(waited.pending, vec![pending]);
    assert_eq!(waited.missing, vec![bobs, unknown]);
    assert!(node.pool.waiters().is_empty(), "waits forget themselves");
}

#[tokio::test]
async fn wait_many_answers_once_every_order_finished() {
    let node = node(4, 8, 8, simulate(Duration::from_millis(20)));
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(node.submit("alice").await);
    }
    let started = Instant::now();
    let waited = node
        .service
        .wait_many(Scope::User("alice"), ids.clone(), FINISH)
        .await
        .unwrap();
    assert!(started.elapsed() < FINISH);
    assert!(waited.pending.is_empty() && waited.missing.is_empty());
    let mut finished: Vec<OrderId> = waited.finished.iter().map(|order| order.order_id).collect();
    finished.sort();
    ids.sort();
    assert_eq!(finished, ids);
}

#[tokio::test]
async fn accepting_an_order_is_activity() {
    let node = idle(8, 8);
    let before = node.service.activity().get();
    node.submit("alice").await;
    assert!(node.service.activity().get() > before);
}

/// Waits until `check` holds, failing the test after [`FINISH`].
async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + FINISH;
    while !check() {
        assert!(Instant::now() < deadline, "not {what} within {FINISH:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn orders_whose_steps_only_take_time_wait_without_a_task() {
    const ORDERS: usize = 200;
    let node = node(ORDERS, ORDERS, ORDERS, simulate(Duration::from_secs(3600)));
    let before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    for _ in 0..ORDERS {
        node.submit("alice").await;
    }
    until("every order in its first step", || {
        node.pool.inflight() == ORDERS && node.pool.queued() == 0
    })
    .await;
    // Each order waits as data in the parking lot: no task of its own is left alive.
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(
        tasks < before + ORDERS / 10,
        "{tasks} tasks alive for {ORDERS} waiting orders ({before} before)"
    );
}

#[tokio::test]
async fn a_shutdown_lets_a_parked_step_end_and_commit() {
    let node = node(4, 4, 4, simulate(Duration::from_millis(300)));
    let id = node.submit("alice").await;
    until("the order in flight", || node.pool.inflight() == 1).await;
    node.pool.shutdown(FINISH).await;
    assert_eq!(node.pool.inflight(), 0);
    let stored = node.store.get(id).await.unwrap().unwrap();
    // The first step ended during the grace period and was committed; no other step began.
    assert_eq!(stored.current_step, Step::PreProcessing);
    assert!(stored.steps[0].step_complete_time.is_some(), "{stored:?}");
}

/// `simulate.output_bytes`: every step answers with an output of about that many bytes, kept
/// with the order.
#[tokio::test]
async fn simulated_steps_answer_with_outputs_of_the_size_configured() {
    let handler = Arc::new(Simulate::new(SimulateConfig {
        duration: Duration::ZERO,
        failure_rate: 0.0,
        output_bytes: 300,
    }));
    let node = node(2, 8, 8, handler);
    let id = node.submit("alice").await;
    let order = node.finished("alice", id).await;
    assert_eq!(order.current_step, Step::Completed);
    let work: Vec<_> = order
        .steps
        .iter()
        .filter(|entry| Step::WORK.contains(&entry.step_name))
        .collect();
    assert_eq!(work.len(), 4);
    for entry in work {
        let output = entry.output.as_ref().expect("an output");
        assert_eq!(output.text().len(), 300);
    }
}
