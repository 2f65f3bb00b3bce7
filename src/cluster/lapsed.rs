//! [`LapsedLeases`]: how long the leader has seen each node without its liveness lease, so that
//! a node whose lease stays expired is taken over within a bound whatever gossip says.
//!
//! Kept in the leader's memory and started afresh with each term: a lease that is absent now
//! says nothing about since when, and clocks of different hosts are not compared. A new leader
//! therefore waits the whole bound from its first look, at most once per term; in return nothing
//! more is written to the store on each renewal.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// When this term's leader first saw each node's liveness lease absent.
#[derive(Debug, Default)]
pub(super) struct LapsedLeases {
    /// The fencing token of the term the record belongs to.
    term: u64,
    since: HashMap<String, Instant>,
}

impl LapsedLeases {
    /// Records what the leader of term `term` sees of `node`'s lease at `now`, and answers how
    /// long it has seen the lease absent (zero when held, or absent for the first time).
    pub fn observe(&mut self, term: u64, node: &str, held: bool, now: Instant) -> Duration {
        if term != self.term {
            self.term = term;
            self.since.clear();
        }
        if held {
            self.since.remove(node);
            return Duration::ZERO;
        }
        let since = *self.since.entry(node.to_string()).or_insert(now);
        now.saturating_duration_since(since)
    }

    /// Forgets a node (it was taken out of the registry).
    pub fn forget(&mut self, node: &str) {
        self.since.remove(node);
    }
}

#[cfg(test)]
mod tests {
    use super::LapsedLeases;
    use std::time::{Duration, Instant};

    #[test]
    fn absence_counts_from_the_first_look_of_the_term_until_the_lease_is_back() {
        let start = Instant::now();
        let later = |ms| start + Duration::from_millis(ms);
        let mut lapsed = LapsedLeases::default();
        assert_eq!(lapsed.observe(1, "a", false, start), Duration::ZERO);
        assert_eq!(
            lapsed.observe(1, "a", false, later(1500)),
            Duration::from_millis(1500)
        );
        // Another node is counted on its own.
        assert_eq!(lapsed.observe(1, "b", false, later(1500)), Duration::ZERO);
        // A renewed lease starts the count again.
        assert_eq!(lapsed.observe(1, "a", true, later(1600)), Duration::ZERO);
        assert_eq!(lapsed.observe(1, "a", false, later(1700)), Duration::ZERO);
        // A new term forgets what the old one saw.
        assert_eq!(lapsed.observe(2, "b", false, later(3000)), Duration::ZERO);
        lapsed.forget("b");
        assert_eq!(lapsed.observe(2, "b", false, later(4000)), Duration::ZERO);
    }
}
