//! When an order's next attempt is due, on this process's monotonic clock.
//!
//! The schedule is stored as wall-clock time (the API shows it, and whoever resumes the order
//! reads it), but waiting on the wall clock would stall for as long as the clock is stepped
//! back. So a retry this process schedules keeps its due moment as a monotonic [`Instant`] beside
//! the stored time, and a stored schedule this process did not make (after a restart or a
//! takeover) is converted once, never to a wait longer than the retry policy's `backoff_max`.

use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio::time::Instant;

/// How far apart two readings of the same stored time may be (a store may keep fewer digits).
const SAME_TIME: Duration = Duration::from_millis(1);

/// An order's next attempt: when it is stored as due, and when this process runs it.
#[derive(Clone, Copy, Debug)]
pub(super) struct RetryDue {
    /// As stored: wall-clock time.
    pub(super) at: DateTime<Utc>,
    /// When this process makes the attempt.
    pub(super) when: Instant,
}

impl RetryDue {
    /// A retry this process schedules `delay` from now, stored as due `at`.
    pub(super) fn scheduled(at: DateTime<Utc>, delay: Duration) -> RetryDue {
        let now = Instant::now();
        RetryDue {
            at,
            // A delay too long to add up to an instant (no policy allows one) is due at once.
            when: now.checked_add(delay).unwrap_or(now),
        }
    }

    /// The schedule to follow for the stored due time `at`: the one kept here when it is that
    /// one, else `at` converted now, waiting no longer than `longest`.
    pub(super) fn for_stored(
        kept: Option<RetryDue>,
        at: DateTime<Utc>,
        longest: Duration,
    ) -> RetryDue {
        match kept {
            Some(kept)
                if (kept.at - at)
                    .abs()
                    .to_std()
                    .is_ok_and(|gap| gap <= SAME_TIME) =>
            {
                kept
            }
            _ => {
                let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                RetryDue::scheduled(at, wait.min(longest))
            }
        }
    }

    /// Whether the attempt is due now.
    pub(super) fn is_due(&self) -> bool {
        Instant::now() >= self.when
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn in_(duration: Duration) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::from_std(duration).unwrap()
    }

    #[test]
    fn a_stored_time_far_ahead_waits_no_longer_than_the_longest_backoff() {
        let longest = Duration::from_secs(2);
        let due = RetryDue::for_stored(None, in_(HOUR), longest);
        assert!(due.when <= Instant::now() + longest);
        assert!(due.when >= Instant::now() + longest - Duration::from_millis(500));
        assert!(!due.is_due());
    }

    #[test]
    fn a_stored_time_past_is_due_at_once() {
        let at = Utc::now() - chrono::Duration::hours(1);
        assert!(RetryDue::for_stored(None, at, HOUR).is_due());
    }

    #[test]
    fn the_schedule_kept_here_wins_over_the_wall_clock() {
        // Kept as due now, stored as due in an hour (the clock was stepped back since).
        let at = in_(HOUR);
        let kept = RetryDue::scheduled(at, Duration::ZERO);
        let truncated = chrono::SubsecRound::trunc_subsecs(at, 6);
        assert!(RetryDue::for_stored(Some(kept), truncated, HOUR).is_due());
        // Another stored time: the kept schedule is not that one's.
        let other = at + chrono::Duration::seconds(5);
        assert!(!RetryDue::for_stored(Some(kept), other, HOUR).is_due());
    }
}
