//! Reconciliation: each pass compares the unfinished orders the store says this node owns with
//! the orders this node holds (queued, executing, or waiting for a retry) and resumes those that
//! nothing holds. Events (a submission, the scan at start, a transfer) make an order run at once;
//! this makes sure it runs even when such an event was lost — a client that hung up between the
//! store and the queue, a store call that timed out after it was applied, a transfer cut short —
//! within about one interval.
//!
//! At its first pass and every [`ASIDE_EVERY`] passes after, it also looks at the orders set
//! aside because their record could not be read, and takes back those that read now (a newer
//! version reads what an older one could not, or an operator mended the record): each becomes
//! this node's, at a new epoch, and runs on from its current step.

use super::{Job, Pool};
use crate::order::OrderId;
use crate::store::{OrderStore, StoreError, TakenBack};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn, Instrument};

/// The most orders one pass resumes; the rest wait for the next pass.
pub const MOST_PER_PASS: usize = 1_000;

/// About how many owned order ids one pass reads, in pages of [`PAGE`]: a node owning more
/// goes through them over several passes, each going on where the last one stopped.
pub const MOST_READ_PER_PASS: usize = 20_000;
/// How many owned order ids one read asks for.
pub const PAGE: usize = 1_000;

/// Every how many passes the set-aside orders are looked at again (a minute at the default
/// interval of 5 s), the first pass included.
pub const ASIDE_EVERY: u64 = 12;

/// About how many set-aside orders one look reads, in pages of [`PAGE`]: a look at more goes on
/// where the last one stopped, so that every set-aside order is looked at in turn.
pub const ASIDE_PER_LOOK: usize = 1_000;

/// The owned orders that nothing here holds, at most `most` of them, oldest id first (ids are
/// time-ordered, so the longest forgotten run first).
pub fn unheld(
    mut owned: Vec<OrderId>,
    held: impl Fn(OrderId) -> bool,
    most: usize,
) -> Vec<OrderId> {
    owned.retain(|id| !held(*id));
    owned.sort_unstable();
    // A sweep may name an order twice.
    owned.dedup();
    owned.truncate(most);
    owned
}

/// Runs a pass every `interval` until the pool stops.
pub fn spawn(
    pool: Arc<Pool>,
    store: Arc<dyn OrderStore>,
    node: String,
    interval: Duration,
) -> JoinHandle<()> {
    let task = async move {
        let mut stop_rx = pool.stop_rx();
        // Where the sweep of the owned set goes on at the next pass.
        let mut cursor = String::new();
        let mut passes: u64 = 0;
        // Where the look at the set-aside orders goes on at the next look.
        let mut aside_cursor = String::new();
        loop {
            // Why select: a stopping node must not wait out an interval before it exits.
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop_rx.changed() => return,
            }
            if *stop_rx.borrow() {
                return;
            }
            if passes.is_multiple_of(ASIDE_EVERY) {
                let taken =
                    take_back_readable(store.as_ref(), &node, &mut aside_cursor, ASIDE_PER_LOOK)
                        .await;
                for id in taken {
                    if !pool.enqueue(Job::Resume(id)).await {
                        return;
                    }
                }
            }
            passes += 1;
            pass(&pool, store.as_ref(), &node, &mut cursor).await;
            debug!(passes, "reconciliation pass done");
        }
    };
    tokio::spawn(task.instrument(tracing::info_span!("reconcile")))
}

/// Reads pages with `page(cursor, n)` (up to `n` items from cursor `cursor`, and the next
/// cursor) from `cursor` on, until about `most` items are read or none is left (the cursor then
/// begins again); on an error, what it read before, and the error.
async fn read_pages<T, F, Fut>(
    cursor: &mut String,
    most: usize,
    mut page: F,
) -> (Vec<T>, Option<StoreError>)
where
    F: FnMut(String, usize) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, Option<String>), StoreError>>,
{
    let mut read = Vec::new();
    while read.len() < most {
        match page(cursor.clone(), PAGE.min(most - read.len())).await {
            Ok((items, next)) => {
                read.extend(items);
                match next {
                    Some(next) => *cursor = next,
                    None => {
                        cursor.clear();
                        break;
                    }
                }
            }
            Err(error) => return (read, Some(error)),
        }
    }
    (read, None)
}

/// One pass: reads the next pages of this node's unfinished orders from `cursor` and resumes
/// those that nothing here holds.
async fn pass(pool: &Pool, store: &dyn OrderStore, node: &str, cursor: &mut String) {
    let began = pool.adoptions_now();
    let (owned, error) = read_pages(cursor, MOST_READ_PER_PASS, |at, n| async move {
        store.owned_page(node, &at, n).await
    })
    .await;
    if let Some(error) = error {
        debug!(error = %error, "cannot list own unfinished orders; next pass tries again");
    }
    let unheld_read = unheld(owned, |id| pool.is_active(id), MOST_PER_PASS);
    if unheld_read.is_empty() {
        return;
    }
    // A second look at those in the store: the sweep reads for a while (a page per shard on
    // Redis), and an order that finished meanwhile left the pool after it left the store's list.
    // (A new order is held from before it is stored; orders moved here, see below.)
    let still = match store.still_owned(node, &unheld_read).await {
        Ok(still) => still,
        Err(error) => {
            debug!(error = %error, "cannot look again at own unfinished orders; next pass tries again");
            return;
        }
    };
    let resume = unheld(still, |id| pool.is_active(id), MOST_PER_PASS);
    if resume.is_empty() {
        return;
    }
    // Orders moved here meanwhile are listed before they are held.
    if pool.adopted_since(began) {
        debug!(
            orders = resume.len(),
            "orders were moved here during the pass; the next pass looks again"
        );
        return;
    }
    warn!(orders = resume.len(), first = %resume[0], "resuming unfinished orders that nothing here was running");
    for id in resume {
        if !pool.enqueue(Job::Resume(id)).await {
            return;
        }
    }
}

/// Takes back, for `node`, the set-aside orders whose record reads now, looking at about `most`
/// of them from `cursor` on (where the last look stopped; back to the first once through);
/// returns those it took, to run. An order another node took back first is left to that node;
/// a finished or gone one loses its entry.
pub async fn take_back_readable(
    store: &dyn OrderStore,
    node: &str,
    cursor: &mut String,
    most: usize,
) -> Vec<OrderId> {
    let (aside, error) = read_pages(cursor, most, |at, n| async move {
        store.set_aside_page(&at, n).await
    })
    .await;
    if let Some(error) = error {
        debug!(error = %error, "cannot list set-aside orders; the next look starts again");
        cursor.clear();
    }
    let mut taken = Vec::new();
    for entry in aside {
        let id = entry.order_id;
        match store.get(id).await {
            Ok(_) => {}
            Err(StoreError::Corrupt(_)) => continue,
            Err(error) => {
                debug!(order_id = %id, error = %error, "cannot read a set-aside order; the next look tries again");
                continue;
            }
        }
        match store.take_back(id, node).await {
            Ok(TakenBack::Taken) => {
                warn!(order_id = %id, set_aside_by = %entry.node, "set-aside order reads again, taken back to run on");
                taken.push(id);
            }
            Ok(TakenBack::Dropped) => {
                info!(order_id = %id, "set-aside order reads again and has nothing left to run, entry dropped");
            }
            Ok(TakenBack::NotAside) => {}
            Err(error) => {
                debug!(order_id = %id, error = %error, "cannot take back a set-aside order; the next look tries again");
            }
        }
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::{take_back_readable, unheld};
    use crate::order::OrderId;
    use crate::pipeline::fakes::{order, FakeStore};
    use crate::store::{OrderStore, SetAside};
    use chrono::Utc;

    fn aside(id: OrderId) -> SetAside {
        SetAside {
            order_id: id,
            node: "node-a".into(),
            reason: "expected value at line 1 column 1".into(),
            at: Utc::now(),
        }
    }

    #[tokio::test]
    async fn set_aside_orders_that_read_again_are_taken_back_and_the_others_stay() {
        let (still, mended, gone) = (order("node-a"), order("node-a"), order("node-a"));
        let store = FakeStore::with(&still);
        store.insert(&mended);
        for stored in [&still, &mended] {
            store.garble(stored.order_id);
        }
        for id in [still.order_id, mended.order_id, gone.order_id] {
            store.set_aside(&aside(id)).await.unwrap();
        }
        store.mend(mended.order_id);

        let mut cursor = String::new();
        let taken = take_back_readable(store.as_ref(), "node-b", &mut cursor, 10).await;

        assert_eq!(taken, vec![mended.order_id]);
        let back = store.order(mended.order_id);
        assert_eq!(
            (back.owner.as_str(), back.epoch),
            ("node-b", mended.epoch + 1)
        );
        let left = store.set_aside_orders(10).await.unwrap();
        let left: Vec<OrderId> = left.iter().map(|entry| entry.order_id).collect();
        assert_eq!(
            left,
            vec![still.order_id],
            "the unreadable one stays, the gone one went"
        );
        assert!(cursor.is_empty(), "through: the next look begins again");
        let again = take_back_readable(store.as_ref(), "node-b", &mut cursor, 10).await;
        assert!(again.is_empty());
    }

    #[tokio::test]
    async fn a_look_goes_on_where_the_last_one_stopped() {
        let unreadable: Vec<_> = (0..3).map(|_| order("node-a")).collect();
        let mended = order("node-a");
        let store = FakeStore::with(&mended);
        for stored in unreadable.iter().chain([&mended]) {
            store.insert(stored);
            store.garble(stored.order_id);
            store.set_aside(&aside(stored.order_id)).await.unwrap();
        }
        store.mend(mended.order_id);

        let mut cursor = String::new();
        let first = take_back_readable(store.as_ref(), "node-b", &mut cursor, 2).await;
        assert!(first.is_empty(), "the first two looked at do not read");
        assert!(!cursor.is_empty(), "goes on at the next look");
        let second = take_back_readable(store.as_ref(), "node-b", &mut cursor, 2).await;
        assert_eq!(second, vec![mended.order_id]);
        assert!(cursor.is_empty());
    }

    #[test]
    fn only_orders_nothing_holds_are_resumed_oldest_first_and_bounded() {
        let ids: Vec<OrderId> = (0..5).map(|_| OrderId::now_v7()).collect();
        let held = |id: OrderId| id == ids[1] || id == ids[3];
        let mut owned = ids.clone();
        owned.reverse();
        owned.push(ids[0]);
        assert_eq!(
            unheld(owned.clone(), held, 10),
            vec![ids[0], ids[2], ids[4]]
        );
        assert_eq!(unheld(owned, held, 2), vec![ids[0], ids[2]]);
        assert!(unheld(Vec::new(), held, 10).is_empty());
    }
}
