//! In-memory fakes of the pipeline's collaborators, for unit tests: an order store that can be
//! told to refuse or fail commits, and a step handler that is told how each attempt goes and
//! counts them; with a fresh order of user `alice` and a way to wait for what they record.

use super::handler::{StepContext, StepDone, StepError, StepHandler};
use super::retry::RetryPolicy;
use crate::order::{Order, OrderId, Step};
use crate::store::{
    cancel_outcome, check_commit, reopen_outcome, same_order, AsidePage, CancelOutcome, Checked,
    Created, Fence, ListQuery, OrderStore, OwnedPage, Page, Reopen, Reopened, RepairPage, Repaired,
    SetAside, StoreError, TakenBack,
};
use async_trait::async_trait;
use chrono::Utc;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// The longest a test waits for something before it fails.
pub(super) const DEADLINE: Duration = Duration::from_secs(10);

/// A new order of user `alice`, owned by `node`.
pub(super) fn order(node: &str) -> Order {
    Order::new(
        OrderId::new_v4(),
        "alice".into(),
        serde_json::json!({}),
        node.into(),
        Utc::now(),
    )
}

/// Polls `done` until it holds, failing the test after `DEADLINE`.
pub(super) async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An order store in memory that fences commits like the real ones (`check_commit`).
#[derive(Default)]
pub(super) struct FakeStore {
    /// Why a lock: the execution under test and the test itself use the store at once.
    orders: Mutex<HashMap<OrderId, Order>>,
    /// Errors the next commits return, oldest first, before any commit goes through again.
    commit_faults: Mutex<VecDeque<StoreError>>,
    /// Commits asked for, refused ones included.
    commits: AtomicUsize,
    /// How many of the next commits are applied and then answered with a timeout, as when
    /// Redis applies a write whose answer comes too late.
    late_answers: AtomicUsize,
    /// Whether a late answer also lets a cancellation in, as one recorded while the answer
    /// was on its way.
    cancel_while_late: AtomicBool,
    /// Every order a commit wrote, in order.
    written: Mutex<Vec<Order>>,
    /// Orders whose record reads as corrupt.
    unreadable: Mutex<Vec<OrderId>>,
    /// What `set_aside` recorded.
    aside: Mutex<Vec<SetAside>>,
}

impl FakeStore {
    /// A store holding `order`.
    pub(super) fn with(order: &Order) -> Arc<FakeStore> {
        let store = Arc::new(FakeStore::default());
        store.insert(order);
        store
    }

    /// Stores `order` as it is.
    pub(super) fn insert(&self, order: &Order) {
        (self.orders.lock().unwrap()).insert(order.order_id, order.clone());
    }

    /// The stored order.
    pub(super) fn order(&self, id: OrderId) -> Order {
        self.orders.lock().unwrap().get(&id).cloned().unwrap()
    }

    /// The next commits fail with these errors, one each, whatever they write.
    pub(super) fn fail_commits(&self, faults: impl IntoIterator<Item = StoreError>) {
        self.commit_faults.lock().unwrap().extend(faults);
    }

    /// The next `count` commits are applied, then answered with a timeout.
    pub(super) fn answer_late(&self, count: usize) {
        self.late_answers.store(count, Ordering::Relaxed);
    }

    /// The next commit is applied, then the order's user cancels it, then the commit is
    /// answered with a timeout.
    pub(super) fn answer_late_after_a_cancel(&self) {
        self.answer_late(1);
        self.cancel_while_late.store(true, Ordering::Relaxed);
    }

    /// Every order a commit wrote, in order.
    pub(super) fn written(&self) -> Vec<Order> {
        self.written.lock().unwrap().clone()
    }

    /// Another node takes the order over, as a takeover does: new owner, next epoch.
    pub(super) fn take_over(&self, id: OrderId, node: &str) {
        let mut orders = self.orders.lock().unwrap();
        let order = orders.get_mut(&id).unwrap();
        order.owner = node.to_string();
        order.epoch += 1;
    }

    /// Reading the order fails from now on as a record that does not decode.
    pub(super) fn garble(&self, id: OrderId) {
        self.unreadable.lock().unwrap().push(id);
    }

    /// Makes order `id`'s record readable again.
    pub(super) fn mend(&self, id: OrderId) {
        self.unreadable
            .lock()
            .unwrap()
            .retain(|garbled| *garbled != id);
    }

    pub(super) fn commits(&self) -> usize {
        self.commits.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl OrderStore for FakeStore {
    async fn create(&self, order: &Order, _key: Option<&str>) -> Result<Created, StoreError> {
        let mut orders = self.orders.lock().unwrap();
        if let Some(existing) = orders.get(&order.order_id) {
            return Ok(Created::Existing(Box::new(existing.clone())));
        }
        orders.insert(order.order_id, order.clone());
        Ok(Created::New)
    }

    async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        if self.unreadable.lock().unwrap().contains(&id) {
            return Err(StoreError::Corrupt(
                "expected value at line 1 column 1".into(),
            ));
        }
        Ok(self.orders.lock().unwrap().get(&id).cloned())
    }

    async fn list_for_user(&self, user: &str, query: &ListQuery) -> Result<Page, StoreError> {
        let mut orders: Vec<Order> = (self.orders.lock().unwrap().values())
            .filter(|order| order.user == user && query.matches(order))
            .cloned()
            .collect();
        orders.sort_by_key(|order| std::cmp::Reverse(order.start_time));
        orders.truncate(query.limit);
        Ok(Page {
            orders,
            next_cursor: None,
        })
    }

    async fn commit(&self, order: &Order) -> Result<(), StoreError> {
        self.commits.fetch_add(1, Ordering::Relaxed);
        if let Some(fault) = self.commit_faults.lock().unwrap().pop_front() {
            return Err(fault);
        }
        if self.unreadable.lock().unwrap().contains(&order.order_id) {
            // As the embedded store does: the stored record is read to check the fence.
            return Err(StoreError::Corrupt(
                "expected value at line 1 column 1".into(),
            ));
        }
        let mut orders = self.orders.lock().unwrap();
        let stored = orders.get(&order.order_id).ok_or(StoreError::NotFound)?;
        let checked = check_commit(Fence::from(stored), order, || Ok(same_order(stored, order)))?;
        if checked == Checked::Write {
            orders.insert(order.order_id, order.clone());
        }
        self.written.lock().unwrap().push(order.clone());
        let late = self.late_answers.load(Ordering::Relaxed);
        if late > 0 {
            self.late_answers.store(late - 1, Ordering::Relaxed);
            if self.cancel_while_late.swap(false, Ordering::Relaxed) {
                let (outcome, _) = cancel_outcome(order.clone());
                if let CancelOutcome::Accepted(cancelled) = outcome {
                    orders.insert(order.order_id, cancelled);
                }
            }
            return Err(StoreError::Unavailable(
                "redis did not answer in time".into(),
            ));
        }
        Ok(())
    }

    async fn request_cancel(&self, id: OrderId, user: &str) -> Result<CancelOutcome, StoreError> {
        let mut orders = self.orders.lock().unwrap();
        let stored = users_order(&orders, id, user)?;
        let (outcome, changed) = cancel_outcome(stored);
        if let (CancelOutcome::Accepted(updated), true) = (&outcome, changed) {
            orders.insert(id, updated.clone());
        }
        Ok(outcome)
    }

    async fn reopen(&self, reopen: Reopen<'_>) -> Result<Reopened, StoreError> {
        let mut orders = self.orders.lock().unwrap();
        let stored = users_order(&orders, reopen.id, reopen.user)?;
        match reopen_outcome(stored, reopen.what, reopen.node, reopen.now) {
            Ok(next) => {
                orders.insert(reopen.id, next.clone());
                Ok(Reopened::Accepted(next))
            }
            Err(stored) => Ok(Reopened::Refused(*stored)),
        }
    }

    async fn owned_unfinished(&self, node: &str) -> Result<Vec<OrderId>, StoreError> {
        Ok((self.orders.lock().unwrap().values())
            .filter(|order| order.owner == node && order.owes_work())
            .map(|order| order.order_id)
            .collect())
    }

    async fn owned_page(&self, node: &str, at: &str, n: usize) -> Result<OwnedPage, StoreError> {
        let mut owned = self.owned_unfinished(node).await?;
        owned.sort_unstable();
        owned.retain(|id| at.is_empty() || id.to_string().as_str() > at);
        let next = (owned.len() > n).then(|| owned[n - 1].to_string());
        owned.truncate(n);
        Ok((owned, next))
    }

    async fn still_owned(&self, node: &str, ids: &[OrderId]) -> Result<Vec<OrderId>, StoreError> {
        let owned = self.owned_unfinished(node).await?;
        Ok(ids
            .iter()
            .copied()
            .filter(|id| owned.contains(id))
            .collect())
    }

    async fn parked_page(&self, at: &str, n: usize) -> Result<OwnedPage, StoreError> {
        let mut parked: Vec<OrderId> = (self.orders.lock().unwrap().values())
            .filter(|order| crate::store::is_parked(order))
            .map(|order| order.order_id)
            .collect();
        parked.sort_unstable();
        parked.retain(|id| at.is_empty() || id.to_string().as_str() > at);
        let next = (parked.len() > n).then(|| parked[n - 1].to_string());
        parked.truncate(n);
        Ok((parked, next))
    }

    async fn reassign(&self, from: &str, to: &str) -> Result<Vec<OrderId>, StoreError> {
        let mut orders = self.orders.lock().unwrap();
        let mut owned = Vec::new();
        for order in orders.values_mut().filter(|order| order.owes_work()) {
            if order.owner == from {
                order.owner = to.to_string();
                order.epoch += 1;
            }
            if order.owner == to {
                owned.push(order.order_id);
            }
        }
        Ok(owned)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn repair_indexes(&self, _at: &str, _n: usize) -> Result<RepairPage, StoreError> {
        Ok((Repaired::default(), None))
    }

    async fn purge_expired(&self, _n: usize) -> Result<usize, StoreError> {
        Ok(0)
    }

    async fn disown(&self, _node: &str, _id: OrderId) -> Result<bool, StoreError> {
        // The owned orders are worked out from the orders themselves: no entry to leave behind.
        Ok(false)
    }

    async fn set_aside(&self, aside: &SetAside) -> Result<(), StoreError> {
        self.aside.lock().unwrap().push(aside.clone());
        Ok(())
    }

    async fn set_aside_page(&self, at: &str, n: usize) -> Result<AsidePage, StoreError> {
        // The cursor is the index of the page's first entry.
        let first: usize = if at.is_empty() {
            0
        } else {
            at.parse().unwrap()
        };
        let aside = self.aside.lock().unwrap();
        let page: Vec<SetAside> = aside.iter().skip(first).take(n).cloned().collect();
        let next = (first + page.len() < aside.len()).then(|| (first + page.len()).to_string());
        Ok((page, next))
    }

    async fn take_back(&self, id: OrderId, to: &str) -> Result<TakenBack, StoreError> {
        let mut aside = self.aside.lock().unwrap();
        let before = aside.len();
        aside.retain(|entry| entry.order_id != id);
        if aside.len() == before {
            return Ok(TakenBack::NotAside);
        }
        match self.orders.lock().unwrap().get_mut(&id) {
            Some(order) if order.owes_work() => {
                order.owner = to.to_string();
                order.epoch += 1;
                Ok(TakenBack::Taken)
            }
            _ => Ok(TakenBack::Dropped),
        }
    }
}

/// A user's stored order; another user's is not found, as in the real stores.
fn users_order(
    orders: &HashMap<OrderId, Order>,
    id: OrderId,
    user: &str,
) -> Result<Order, StoreError> {
    (orders.get(&id))
        .filter(|order| order.user == user)
        .cloned()
        .ok_or(StoreError::NotFound)
}

/// How one attempt of the fake step handler goes.
#[derive(Clone, Copy, Debug)]
pub(super) enum Outcome {
    Succeed,
    /// A permanent failure, reason `refused`.
    Fail,
    /// A failure worth a retry, reason `flaky`.
    FailRetryable,
    /// Waits until the test calls `release`, then succeeds.
    Hold,
}

/// One attempt the fake step handler was asked to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Call {
    pub(super) step: Step,
    pub(super) rollback: bool,
}

impl Call {
    pub(super) fn run(step: Step) -> Call {
        Call {
            step,
            rollback: false,
        }
    }

    pub(super) fn rollback(step: Step) -> Call {
        Call {
            step,
            rollback: true,
        }
    }
}

/// A step handler for every step: succeeds unless told otherwise, and keeps every call.
#[derive(Default)]
pub(super) struct FakeStep {
    /// Why a lock: attempts run in the execution's task while the test scripts and reads.
    script: Mutex<HashMap<Call, VecDeque<Outcome>>>,
    calls: Mutex<Vec<Call>>,
    released: Notify,
    policy: Option<RetryPolicy>,
    /// The room its calls share, when limited (as a step's `concurrency`).
    room: Option<tokio::sync::Semaphore>,
}

impl FakeStep {
    /// One attempt per step, no retries, no attempt records.
    pub(super) fn new() -> Arc<FakeStep> {
        Arc::new(FakeStep::default())
    }

    /// Retried attempts (and attempt records) under `policy`, in both directions.
    pub(super) fn with_retries(policy: RetryPolicy) -> Arc<FakeStep> {
        Arc::new(FakeStep {
            policy: Some(policy),
            ..FakeStep::default()
        })
    }

    /// Room for `calls` calls at once.
    pub(super) fn with_room(calls: usize) -> Arc<FakeStep> {
        Arc::new(FakeStep {
            room: Some(tokio::sync::Semaphore::new(calls)),
            ..FakeStep::default()
        })
    }

    /// Takes the room of one call until the permit is dropped.
    pub(super) fn take_room(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.room.as_ref()?.try_acquire().ok()
    }

    /// The next attempts at `call` go like this, then succeed.
    pub(super) fn script(&self, call: Call, outcomes: impl IntoIterator<Item = Outcome>) {
        (self.script.lock().unwrap().entry(call).or_default()).extend(outcomes);
    }

    /// Every attempt asked for so far, oldest first.
    pub(super) fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Lets a held attempt (the one waiting now, or the next one) succeed.
    pub(super) fn release(&self) {
        self.released.notify_one();
    }

    async fn attempt(&self, step: Step, rollback: bool) -> Result<StepDone, StepError> {
        let call = Call { step, rollback };
        self.calls.lock().unwrap().push(call);
        let outcome = (self.script.lock().unwrap().get_mut(&call))
            .and_then(VecDeque::pop_front)
            .unwrap_or(Outcome::Succeed);
        match outcome {
            Outcome::Succeed => Ok(StepDone::default()),
            Outcome::Fail => Err(StepError::new("refused")),
            Outcome::FailRetryable => Err(StepError::retryable("flaky")),
            Outcome::Hold => {
                self.released.notified().await;
                Ok(StepDone::default())
            }
        }
    }
}

#[async_trait]
impl StepHandler for FakeStep {
    async fn run(&self, context: &StepContext<'_>) -> Result<StepDone, StepError> {
        self.attempt(context.step, false).await
    }

    async fn rollback(&self, context: &StepContext<'_>) -> Result<StepDone, StepError> {
        self.attempt(context.step, true).await
    }

    fn retry_policy(&self, _rollback: bool) -> Option<RetryPolicy> {
        self.policy
    }

    fn room(&self, _rollback: bool) -> Option<&tokio::sync::Semaphore> {
        self.room.as_ref()
    }
}
