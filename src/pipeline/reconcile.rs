//! Reconciliation: each pass compares the unfinished orders the store says this node owns with
//! the orders this node holds (queued, executing, or waiting for a retry) and resumes those that
//! nothing holds. Events (a submission, the scan at start, a transfer) make an order run at once;
//! this makes sure it runs even when such an event was lost — a client that hung up between the
//! store and the queue, a store call that timed out after it was applied, a transfer cut short —
//! within about one interval.

use super::{Job, Pool};
use crate::order::OrderId;
use crate::store::OrderStore;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{debug, warn, Instrument};

/// The most orders one pass resumes; the rest wait for the next pass.
pub const MOST_PER_PASS: usize = 1_000;

/// About how many owned order ids one pass reads, in pages of [`PAGE`]: a node owning more
/// goes through them over several passes, each going on where the last one stopped.
pub const MOST_READ_PER_PASS: usize = 20_000;
/// How many owned order ids one read asks for.
pub const PAGE: usize = 1_000;

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
        loop {
            // Why select: a stopping node must not wait out an interval before it exits.
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop_rx.changed() => return,
            }
            if *stop_rx.borrow() {
                return;
            }
            pass(&pool, store.as_ref(), &node, &mut cursor).await;
        }
    };
    tokio::spawn(task.instrument(tracing::info_span!("reconcile")))
}

/// One pass: reads the next pages of this node's unfinished orders from `cursor` and resumes
/// those that nothing here holds.
async fn pass(pool: &Pool, store: &dyn OrderStore, node: &str, cursor: &mut String) {
    let mut owned = Vec::new();
    while owned.len() < MOST_READ_PER_PASS {
        match store.owned_page(node, cursor, PAGE).await {
            Ok((page, next)) => {
                owned.extend(page);
                match next {
                    Some(next) => *cursor = next,
                    None => {
                        cursor.clear();
                        break;
                    }
                }
            }
            Err(error) => {
                debug!(error = %error, "cannot list own unfinished orders; next pass tries again");
                break;
            }
        }
    }
    let resume = unheld(owned, |id| pool.is_active(id), MOST_PER_PASS);
    if resume.is_empty() {
        return;
    }
    warn!(orders = resume.len(), first = %resume[0], "resuming unfinished orders that nothing here was running");
    for id in resume {
        if !pool.enqueue(Job::Resume(id)).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::unheld;
    use crate::order::OrderId;

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
