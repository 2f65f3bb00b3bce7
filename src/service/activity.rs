//! When this node last did something with an order, for the diagnostics of a single node.

use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicI64, Ordering};

/// The time of the last order this node accepted, cancelled or re-queued for a rollback retry;
/// its start time before the first.
#[derive(Debug)]
pub struct LastActivity(AtomicI64);

impl LastActivity {
    pub fn new(since: DateTime<Utc>) -> Self {
        LastActivity(AtomicI64::new(since.timestamp_micros()))
    }

    /// Records activity now.
    pub fn touch(&self) {
        self.0
            .fetch_max(Utc::now().timestamp_micros(), Ordering::Relaxed);
    }

    pub fn get(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.0.load(Ordering::Relaxed)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_the_given_time_and_only_moves_forward() {
        let start = Utc::now() - chrono::Duration::hours(1);
        let activity = LastActivity::new(start);
        assert_eq!(activity.get().timestamp_micros(), start.timestamp_micros());
        activity.touch();
        assert!(activity.get() > start);
    }
}
