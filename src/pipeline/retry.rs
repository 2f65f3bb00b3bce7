//! Retry policy and backoff: when the executor tries a failed attempt again.
//!
//! The n-th retry waits a random time between half and all of `backoff × 2^(n−1)`, capped at
//! `backoff_max`, and never less than `backoff`. So the first retry waits exactly `backoff`,
//! waits grow by doubling, and concurrent orders that failed together spread out instead of
//! hitting a recovering service at the same instant. A wait a busy service asks for with
//! `Retry-After` is spread too, by up to a tenth more, so orders told the same instant do not all
//! come back at it.

use crate::config::HttpSettings;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 means one attempt only.
    pub retries: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
}

impl From<&HttpSettings> for RetryPolicy {
    fn from(settings: &HttpSettings) -> Self {
        RetryPolicy {
            retries: settings.retries,
            backoff: settings.backoff,
            backoff_max: settings.backoff_max,
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first retry). `random` in `[0, 1)` picks
    /// the jitter; pass `rand::random()`.
    pub fn delay(&self, retry: u32, random: f64) -> Duration {
        let doublings = retry.saturating_sub(1).min(32);
        let nominal = self
            .backoff
            .checked_mul(1u32 << doublings.min(31))
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max);
        nominal.mul_f64(1.0 - unit(random) / 2.0).max(self.backoff)
    }

    /// The wait before retry number `retry` when the failed attempt's answer asked for
    /// `retry_after` (a `Retry-After`): that wait (at least `backoff`) and up to a tenth more,
    /// but at most `backoff_max`; a wait asked for at or past that cap, up to a tenth less than
    /// it. Without one, [`RetryPolicy::delay`].
    pub fn delay_asked(&self, retry: u32, random: f64, retry_after: Option<Duration>) -> Duration {
        let Some(asked) = retry_after else {
            return self.delay(retry, random);
        };
        let asked = asked.max(self.backoff);
        if asked >= self.backoff_max {
            return self
                .backoff_max
                .mul_f64(1.0 - unit(random) / 10.0)
                .max(self.backoff);
        }
        let most = asked.mul_f64(1.1).min(self.backoff_max);
        asked + (most - asked).mul_f64(unit(random))
    }

    /// Whether another attempt is allowed after `retries_done` retries.
    pub fn allows_retry(&self, retries_done: u32) -> bool {
        retries_done < self.retries
    }
}

/// `random` within `[0, 1]` (0 for what is not a number).
fn unit(random: f64) -> f64 {
    if random.is_finite() {
        random.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            retries: 5,
            backoff: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
        }
    }

    #[test]
    fn first_retry_waits_exactly_the_backoff() {
        for random in [0.0, 0.3, 0.999] {
            assert_eq!(policy().delay(1, random), Duration::from_millis(200));
        }
    }

    #[test]
    fn delays_double_within_half_of_nominal() {
        let policy = policy();
        for retry in 2..=6u32 {
            let nominal = Duration::from_millis(200 * (1 << (retry - 1)));
            let nominal = nominal.min(policy.backoff_max);
            let longest = policy.delay(retry, 0.0);
            let shortest = policy.delay(retry, 0.999_999);
            assert_eq!(longest, nominal, "retry {retry}");
            assert!(shortest >= nominal / 2, "retry {retry}: {shortest:?}");
            assert!(shortest < longest, "retry {retry}: jitter");
            assert!(shortest >= policy.backoff);
        }
    }

    #[test]
    fn delays_are_capped_and_never_below_backoff() {
        let policy = policy();
        for retry in [7, 10, 31, 32, 33, 1000, u32::MAX] {
            for random in [0.0, 0.5, 0.999, f64::NAN, -1.0, 7.0] {
                let delay = policy.delay(retry, random);
                assert!(delay <= policy.backoff_max, "retry {retry}: {delay:?}");
                assert!(delay >= policy.backoff_max / 2, "retry {retry}: {delay:?}");
            }
        }
        let tight = RetryPolicy {
            retries: 3,
            backoff: Duration::from_secs(2),
            backoff_max: Duration::from_secs(2),
        };
        for retry in 1..5 {
            assert_eq!(tight.delay(retry, 0.9), Duration::from_secs(2));
        }
    }

    #[test]
    fn an_asked_wait_replaces_the_backoff_within_its_bounds() {
        let policy = policy();
        let asked = |seconds: f64, random: f64| {
            policy.delay_asked(3, random, Some(Duration::from_secs_f64(seconds)))
        };
        assert_eq!(asked(1.0, 0.0), Duration::from_secs(1));
        assert_eq!(asked(1.0, 0.5), Duration::from_millis(1050), "spread");
        assert_eq!(
            asked(1.0, 0.999_999).as_millis(),
            1099,
            "by a tenth at most"
        );
        assert_eq!(asked(0.0, 0.0), policy.backoff, "never sooner than backoff");
        assert_eq!(
            asked(0.0, 0.5),
            Duration::from_millis(210),
            "spread from backoff"
        );
        assert_eq!(
            asked(9.5, 0.5),
            Duration::from_millis(9750),
            "spread up to backoff_max, just below it"
        );
        assert_eq!(
            asked(9.5, 0.999_999).as_millis(),
            9999,
            "never later than backoff_max"
        );
        assert_eq!(asked(3600.0, 0.0), policy.backoff_max);
        assert_eq!(
            asked(3600.0, 0.5),
            Duration::from_millis(9500),
            "spread below the cap"
        );
        for random in [f64::NAN, -1.0, 7.0, f64::INFINITY] {
            let wait = asked(2.0, random);
            assert!(
                (Duration::from_secs(2)..=Duration::from_millis(2200)).contains(&wait),
                "{random}: {wait:?}"
            );
        }
        assert_eq!(policy.delay_asked(3, 0.5, None), policy.delay(3, 0.5));
    }

    #[test]
    fn retries_count_after_the_first_attempt() {
        let once = RetryPolicy {
            retries: 1,
            ..policy()
        };
        assert!(once.allows_retry(0));
        assert!(!once.allows_retry(1));
        let never = RetryPolicy {
            retries: 0,
            ..policy()
        };
        assert!(!never.allows_retry(0));
    }
}
