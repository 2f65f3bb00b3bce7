//! Where orders live. One trait, [`OrderStore`], and its implementations: the embedded store
//! (one node, a durable file in the data dir) and, for clusters, Redis.
//!
//! Every write that changes an order is a compare-and-set on its owner and ownership epoch, so a
//! node that has lost an order can never overwrite it.

mod doc;
pub use doc::MAX_DOC;
pub mod embedded;
pub mod metered;
pub mod redis;

use crate::order::{apply, Event, Order, OrderId, Phase, RollbackState, Step};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::time::Duration;

/// A store error for data that does not read as it should.
pub(crate) fn corrupt(error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(error.to_string())
}

/// How long an idempotency key maps to the order it first created (less once the order is
/// deleted: see [`DEFAULT_RETENTION`]).
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How long a finished order is kept by default (`orders.retention`): then it is deleted with
/// its index entries and its idempotency key.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// How many expired orders (or index entries of expired orders) one purge step goes through:
/// one write transaction, or one script, of bounded work.
pub const PURGE_BATCH: usize = 1_000;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("order not found")]
    NotFound,
    /// The order belongs to another node (or another ownership epoch) now.
    #[error("order is owned by another node")]
    NotOwner,
    /// A cancellation was recorded since the writer last read the order; it must apply it first.
    #[error("order has a pending cancellation")]
    CancelRequested,
    /// The write was made from an older revision of the order than the one stored.
    #[error("order changed since it was read")]
    Stale,
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// The outcome of a create with an idempotency key.
#[derive(Debug)]
pub enum Created {
    New,
    /// The key was used before by the same user: here is the order it created.
    Existing(Box<Order>),
    /// Stored, under another id than the one given: the id an earlier request with the same key
    /// had reserved without storing its order (it failed midway, or stalls), or one the store
    /// keeps orders of that key under (see [`OrderStore::new_order_id`]): this is the order as
    /// stored.
    Adopted(Box<Order>),
}

/// What a cancellation request found.
#[derive(Debug)]
pub enum CancelOutcome {
    /// Recorded (or already recorded); the order will stop after its running step.
    Accepted(Order),
    /// The order already finished.
    Finished(Order),
    /// The order is already rolling back after a failure.
    AlreadyFailing(Order),
}

/// A page of a user's orders, newest first.
#[derive(Debug, Default)]
pub struct Page {
    pub orders: Vec<Order>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub limit: usize,
    pub cursor: Option<String>,
    pub current_step: Option<Step>,
    /// Only failed orders whose compensations all ran (`Complete`) or are parked (`Incomplete`).
    pub rollback_state: Option<RollbackState>,
}

/// Whether an order's rollback is parked: failed, finished, with compensations left to run.
pub fn is_parked(order: &Order) -> bool {
    order.phase == Phase::Finished && order.rollback_state == Some(RollbackState::Incomplete)
}

impl ListQuery {
    /// Whether an order passes the query's filters.
    pub fn matches(&self, order: &Order) -> bool {
        self.current_step
            .is_none_or(|step| step == order.current_step)
            && self
                .rollback_state
                .is_none_or(|state| Some(state) == order.rollback_state)
    }
}

/// What a request to re-open a finished order found.
#[derive(Debug)]
pub enum Reopened {
    /// The order owes work again (see [`Reopening`]), now owned by the requesting node.
    Accepted(Order),
    /// The order is not in a state the re-opening asks for (for a rollback retry: not parked,
    /// as it is still running, complete, or the order never failed; for a redelivery: its
    /// webhook is not failed, as it is pending, delivered, or there is none).
    Refused(Order),
}

/// What re-opening a finished order is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reopening {
    /// Run its parked compensations again.
    RollbackRetry,
    /// Send its completion webhook, which failed for good, again.
    Redelivery,
}

/// A request to re-open a finished order: `user`'s order `id`, for `what`, to be run by
/// `node`, at `now`.
#[derive(Clone, Copy, Debug)]
pub struct Reopen<'a> {
    pub id: OrderId,
    pub user: &'a str,
    pub node: &'a str,
    pub now: DateTime<Utc>,
    pub what: Reopening,
}

/// What an index repair went through.
#[derive(Debug, Default)]
pub struct Repaired {
    /// Orders read.
    pub orders: usize,
    /// The nodes that own unfinished orders.
    pub owners: std::collections::BTreeSet<String>,
}

/// A page of order ids (a node's unfinished orders, or the parked rollbacks), and the cursor of
/// the next page (`None`: the last).
pub type OwnedPage = (Vec<OrderId>, Option<String>);

/// A page of set-aside orders, and the cursor of the next page (`None`: the last).
pub type AsidePage = (Vec<SetAside>, Option<String>);

/// What one page of an index repair went through, and the cursor of the next page (`None`:
/// the repair is through).
pub type RepairPage = (Repaired, Option<String>);

/// An order whose record cannot be read, taken out of execution so no node retries it forever.
/// Its record stays as it was, for an operator to look at, and the order is taken back
/// ([`OrderStore::take_back`]) once the record reads again.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SetAside {
    pub order_id: OrderId,
    /// The node that owned it.
    pub node: String,
    /// Why its record could not be read.
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// What [`OrderStore::take_back`] came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakenBack {
    /// The order is the caller's now, unfinished, to run on from its current step.
    Taken,
    /// The order is finished or no longer stored: its entry went, with nothing to run.
    Dropped,
    /// The order was not (or no longer) set aside.
    NotAside,
}

#[async_trait]
pub trait OrderStore: Send + Sync + 'static {
    /// The id for a new order of `user`, created with idempotency key `key` if any: a new
    /// UUIDv7, which a store may pick so that it keeps the order where it keeps the key (an
    /// order created under another id may then be stored as [`Created::Adopted`]).
    fn new_order_id(&self, _user: &str, _key: Option<&str>) -> OrderId {
        OrderId::now_v7()
    }

    /// Stores a new order durably. With an idempotency key already used by the same user within
    /// [`IDEMPOTENCY_TTL`], stores nothing and returns the first order.
    async fn create(&self, order: &Order, key: Option<&str>) -> Result<Created, StoreError>;

    async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError>;

    /// Whether `order`, as read, is on as many replicas as a write must reach
    /// (`database.min_replicas`), so that acting on it cannot act on something a failover then
    /// loses: true once it is; false when the stored order is gone or has moved on (read it
    /// again). Stores without replicas have nothing to wait for.
    async fn confirm(&self, _order: &Order) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// Reads many orders, each as `get` would, in the order of `ids`.
    async fn get_many(&self, ids: &[OrderId]) -> Vec<Result<Option<Order>, StoreError>> {
        futures_util::future::join_all(ids.iter().map(|id| self.get(*id))).await
    }

    async fn list_for_user(&self, user: &str, query: &ListQuery) -> Result<Page, StoreError>;

    /// Writes a transition, only if the stored owner and epoch equal the order's
    /// ([`StoreError::NotOwner`] otherwise), its revision is newer than the stored one
    /// ([`StoreError::Stale`] otherwise, unless it is the very write already stored, which is
    /// then done), and no cancellation is pending that the new state ignores
    /// ([`StoreError::CancelRequested`]).
    async fn commit(&self, order: &Order) -> Result<(), StoreError>;

    /// Records a user's request to cancel an order.
    async fn request_cancel(&self, id: OrderId, user: &str) -> Result<CancelOutcome, StoreError>;

    /// Re-opens a finished order so that `node` does what it owes again (see [`Reopening`]:
    /// the rest of its parked rollback, or its failed webhook): the order owes work again and
    /// becomes `node`'s (its epoch bumped if it changes hands), atomically, so two concurrent
    /// requests cannot both re-open it. Another user's order is `NotFound`.
    async fn reopen(&self, reopen: Reopen<'_>) -> Result<Reopened, StoreError>;

    /// The unfinished orders a node owns.
    async fn owned_unfinished(&self, node: &str) -> Result<Vec<OrderId>, StoreError>;

    /// One page of the unfinished orders a node owns, for a sweep with bounded work per call:
    /// about `n` ids from cursor `at` (`""` to begin) and the cursor of the next page, `None`
    /// once the sweep is through. An order may show up twice in one sweep; one owned throughout
    /// shows up at least once.
    async fn owned_page(&self, node: &str, at: &str, n: usize) -> Result<OwnedPage, StoreError>;

    /// Of `ids`, those still among the unfinished orders `node` owns (in no particular order): a
    /// second look at what a sweep of [`OrderStore::owned_page`] found, which may have finished
    /// or changed hands while the sweep went on.
    async fn still_owned(&self, node: &str, ids: &[OrderId]) -> Result<Vec<OrderId>, StoreError>;

    /// Moves every unfinished order of `from` to `to`, one compare-and-set per order that bumps
    /// its epoch, so `from` can no longer commit to it. Returns the orders `to` owns as a result
    /// (including any it already owned from an earlier, interrupted move).
    async fn reassign(&self, from: &str, to: &str) -> Result<Vec<OrderId>, StoreError>;

    /// Rebuilds the owner, user and state indexes from the orders themselves, one page of about `n`
    /// orders from cursor `at` (`""` to begin) at a time, and says how many orders the page went
    /// through and which nodes own unfinished ones. Idempotent and safe while nodes run: it only
    /// adds missing entries, removes finished or foreign ones, and gives a finished order kept
    /// forever by an older version its retention. The leader runs it, page by page, at the start
    /// of each term.
    async fn repair_indexes(&self, at: &str, n: usize) -> Result<RepairPage, StoreError>;

    /// One bounded step of retention: deletes up to `n` finished orders whose retention ran out,
    /// with their index entries and idempotency keys (where the store deletes them itself: the
    /// index entries of up to `n` such orders). Returns how many it went through; fewer than `n`
    /// means none is left due now.
    async fn purge_expired(&self, n: usize) -> Result<usize, StoreError>;

    /// Takes order `id` out of `node`'s unfinished orders unless `node` owns it and it is
    /// unfinished: an entry left behind by a race. True when one was taken out.
    async fn disown(&self, node: &str, id: OrderId) -> Result<bool, StoreError>;

    /// Takes an order out of its owner's unfinished orders and lists it as set aside, in one
    /// atomic step. Setting aside an order twice keeps the latest entry.
    async fn set_aside(&self, aside: &SetAside) -> Result<(), StoreError>;

    /// The orders set aside, at most `limit` of them, in no particular order.
    async fn set_aside_orders(&self, limit: usize) -> Result<Vec<SetAside>, StoreError> {
        let (mut page, _) = self.set_aside_page("", limit).await?;
        page.truncate(limit);
        Ok(page)
    }

    /// One page of the orders set aside, in the store's order: from cursor `at` (`""` to begin),
    /// at least `n` of them unless none is left (a page may hold more), and the cursor of the
    /// next page, `None` once through.
    async fn set_aside_page(&self, at: &str, n: usize) -> Result<AsidePage, StoreError>;

    /// Takes order `id` back from the orders set aside, once its record reads again (the caller
    /// has read it): it leaves the set-aside orders and, unless it is finished or gone, becomes
    /// `to`'s, at a new epoch, among `to`'s unfinished orders, in one atomic step. Of two nodes
    /// that ask, one takes it.
    async fn take_back(&self, id: OrderId, to: &str) -> Result<TakenBack, StoreError>;

    /// One page of the orders whose rollback is parked ([`RollbackState::Incomplete`]), any
    /// user's, in id order: up to `n` ids after cursor `at` (`""` to begin) and the cursor of the
    /// next page, `None` once through. Kept in the same atomic step that parks, re-opens or
    /// deletes an order; an order parked by an older version shows up once an index repair
    /// went through it. Callers read the orders and may meet one that is no longer parked.
    async fn parked_page(&self, at: &str, n: usize) -> Result<OwnedPage, StoreError>;

    /// A real round trip to the store, for health checks: an error when it cannot be read, or
    /// (where the store can tell cheaply) cannot be written.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// What a commit is checked against: the stored order's owner, epoch, cancellation flag and
/// revision.
#[derive(Clone, Copy, Debug)]
pub struct Fence<'a> {
    pub owner: &'a str,
    pub epoch: u64,
    pub cancel_requested: bool,
    pub revision: u64,
}

impl<'a> From<&'a Order> for Fence<'a> {
    fn from(order: &'a Order) -> Self {
        Fence {
            owner: &order.owner,
            epoch: order.epoch,
            cancel_requested: order.cancel_requested,
            revision: order.revision,
        }
    }
}

/// Whether a commit of `new` over a stored order fenced by `stored` must be refused, and why;
/// `same_as_stored` tells (asked only when the revisions are equal) whether `new` is the very
/// order stored. The embedded store's check; the Redis store's writes script applies the same
/// rule in Lua, and the conformance tests hold both to it.
pub fn check_commit(
    stored: Fence<'_>,
    new: &Order,
    same_as_stored: impl FnOnce() -> Result<bool, StoreError>,
) -> Result<Checked, StoreError> {
    if stored.owner != new.owner || stored.epoch != new.epoch {
        return Err(StoreError::NotOwner);
    }
    // The same write again (a retry after a lost answer) is done already; anything older
    // would take the order back.
    let applied = new.revision <= stored.revision;
    if applied && !(new.revision == stored.revision && same_as_stored()?) {
        return Err(StoreError::Stale);
    }
    if stored.cancel_requested && !new.cancel_requested && new.failure.is_none() {
        return Err(StoreError::CancelRequested);
    }
    Ok(if applied {
        Checked::Applied
    } else {
        Checked::Write
    })
}

/// Whether `new` is `stored` but for the cancellation flag (which a cancellation sets on the
/// stored order without a new revision).
pub fn same_order(stored: &Order, new: &Order) -> bool {
    let mut same = new.clone();
    same.cancel_requested = stored.cancel_requested;
    same == *stored
}

/// What a commit that passed [`check_commit`] does.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    /// Write the new order.
    Write,
    /// Nothing: the very same write was applied already.
    Applied,
}

/// What a cancellation request does to a stored order, and whether the order in the outcome
/// changed and must be written.
pub fn cancel_outcome(stored: Order) -> (CancelOutcome, bool) {
    match stored.phase {
        Phase::Finished => (CancelOutcome::Finished(stored), false),
        Phase::RollingBack => {
            let by_cancel = stored
                .failure
                .as_ref()
                .is_some_and(|failure| failure.reason == crate::order::CANCELLED);
            if by_cancel {
                (CancelOutcome::Accepted(stored), false)
            } else {
                (CancelOutcome::AlreadyFailing(stored), false)
            }
        }
        Phase::Forward if stored.cancel_requested => (CancelOutcome::Accepted(stored), false),
        Phase::Forward => {
            let mut updated = stored;
            updated.cancel_requested = true;
            (CancelOutcome::Accepted(updated), true)
        }
    }
}

/// The order `stored` is re-opened as for `what` (owned by `node`), or the stored order
/// unchanged when it is not in a state to be re-opened so. Shared by every store so they agree
/// on the rule. The re-opened order is a new revision: a commit its owner made of the finished
/// order (its webhook's outcome, say) and writes after the re-opening is then refused as stale
/// instead of undoing it.
pub fn reopen_outcome(
    stored: Order,
    what: Reopening,
    node: &str,
    now: DateTime<Utc>,
) -> Result<Order, Box<Order>> {
    let event = match what {
        Reopening::RollbackRetry => Event::RetryRollback,
        Reopening::Redelivery => Event::Redeliver,
    };
    let Ok(mut next) = apply(&stored, event, now) else {
        return Err(Box::new(stored));
    };
    next.revision = next.revision.saturating_add(1);
    if next.owner != node {
        next.owner = node.to_string();
        next.epoch = next.epoch.saturating_add(1);
    }
    Ok(next)
}

/// An opaque listing cursor: the creation time (µs) and id of the last order of a page.
/// Zero-padded, so cursors sort like the times they hold.
/// Written into one allocation, the time's digits by `itoa` (two at a time): it is also the
/// user index member every commit on Redis sends, and the formatting machinery cost more than
/// the rest of it.
pub fn encode_cursor(created_micros: u64, id: OrderId) -> String {
    /// The digits of `u64::MAX`, which every cursor's time is padded to.
    const DIGITS: usize = 20;
    let mut number = itoa::Buffer::new();
    let digits = number.format(created_micros);
    let mut text = uuid::Uuid::encode_buffer();
    let id = id.simple().encode_lower(&mut text);
    let mut cursor = String::with_capacity(DIGITS + 1 + id.len());
    for _ in digits.len()..DIGITS {
        cursor.push('0');
    }
    cursor.push_str(digits);
    cursor.push('-');
    cursor.push_str(id);
    cursor
}

pub fn decode_cursor(cursor: &str) -> Option<(u64, OrderId)> {
    let (micros, id) = cursor.split_once('-')?;
    Some((micros.parse().ok()?, OrderId::try_parse(id).ok()?))
}

pub fn created_micros(order: &Order) -> u64 {
    u64::try_from(order.start_time.timestamp_micros()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_is_the_zero_padded_time_and_the_simple_id() {
        let id = OrderId::now_v7();
        let powers = (0..20).flat_map(|power| {
            let ten = 10u64.pow(power);
            [ten - 1, ten, ten + 1]
        });
        for micros in [7, 1_764_000_000_123_456, u64::MAX - 1, u64::MAX]
            .into_iter()
            .chain(powers)
        {
            let cursor = encode_cursor(micros, id);
            assert_eq!(cursor, format!("{micros:020}-{}", id.simple()));
            assert_eq!(decode_cursor(&cursor), Some((micros, id)));
        }
    }
}
