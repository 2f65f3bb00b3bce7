//! Moves of orders to this node that are under way: a takeover, the start's scan of the node's
//! own orders. Their orders are in this node's list in the store a while before
//! [`Pool::resume_all`](super::Pool::resume_all) holds them (a takeover moves them shard by
//! shard, and only then queues them all), so a reconciliation pass that read the list meanwhile
//! must not take them for orders that nothing here runs. (A move of one known order, a parked
//! rollback's retry, holds that order from before instead: [`Pool::hold`](super::Pool::hold).)

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts the moves begun and ended.
#[derive(Default)]
pub(super) struct Adoptions {
    begun: AtomicU64,
    ended: AtomicU64,
}

/// One move under way, until dropped (after the orders it moved are held).
#[must_use = "the move ends when this is dropped"]
pub struct Adopting<'a>(&'a Adoptions);

/// A moment, as the moves that had ended by then: see [`Pool::adopted_since`](super::Pool::adopted_since).
#[derive(Clone, Copy, Debug)]
pub struct Since(u64);

impl Adoptions {
    pub(super) fn begin(&self) -> Adopting<'_> {
        self.begun.fetch_add(1, Ordering::SeqCst);
        Adopting(self)
    }

    pub(super) fn now(&self) -> Since {
        Since(self.ended.load(Ordering::SeqCst))
    }

    /// Whether a move was under way at some moment from `since` to now: one was under way then,
    /// or one began after. (Moves begun never fall behind moves ended: the two counts are equal
    /// exactly when none is under way.)
    pub(super) fn overlapped(&self, since: Since) -> bool {
        self.begun.load(Ordering::SeqCst) != since.0
    }
}

impl Drop for Adopting<'_> {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_under_way_at_the_start_or_begun_since_overlaps_and_one_ended_before_does_not() {
        let adoptions = Adoptions::default();
        let since = adoptions.now();
        assert!(!adoptions.overlapped(since));
        drop(adoptions.begin());
        assert!(adoptions.overlapped(since), "begun and ended since");
        let after = adoptions.now();
        assert!(!adoptions.overlapped(after), "ended before");

        let under_way = adoptions.begin();
        let during = adoptions.now();
        assert!(adoptions.overlapped(during), "under way at the start");
        drop(under_way);
        assert!(
            adoptions.overlapped(during),
            "under way at the start, ended since"
        );
        assert!(!adoptions.overlapped(adoptions.now()));
    }
}
