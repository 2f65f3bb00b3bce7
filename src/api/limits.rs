//! What one client may cost the node at the HTTP edge: bodies read with a size cap and a
//! deadline ([`Body`]), payloads with a nesting cap, and a submission rate per user
//! ([`RateLimiter`]). All of them answer with a JSON error. The cap on each user's unfinished
//! orders belongs to the order service ([`InFlight`]).

use super::ApiError;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::StateStore;
use governor::Quota;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use warp::http::StatusCode;
use warp::Filter;

/// Built here with the other limits (`auth::Security`), kept by the order service.
pub use crate::service::InFlight;

/// A request body not read yet, so a handler reads it only once the caller passed the cheaper
/// checks (who calls, how often).
pub struct Body(Pin<Box<dyn Stream<Item = Result<Bytes, warp::Error>> + Send>>);

/// The request's body, to read with [`Body::read`].
pub fn body() -> impl Filter<Extract = (Body,), Error = warp::Rejection> + Clone {
    warp::body::stream().map(Body::new)
}

impl Body {
    fn new<S, B>(stream: S) -> Body
    where
        S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
        B: Buf,
    {
        Body(Box::pin(stream.map(|chunk| {
            chunk.map(|mut chunk| chunk.copy_to_bytes(chunk.remaining()))
        })))
    }

    /// Reads at most `limit` bytes within `timeout`; more is a 413, slower a 408.
    pub async fn read(mut self, limit: u64, timeout: Duration) -> Result<Bytes, ApiError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut collected = BytesMut::new();
        loop {
            let next = tokio::time::timeout_at(deadline, self.0.next())
                .await
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "request body not received within {}",
                            humantime::format_duration(timeout)
                        ),
                    )
                })?;
            let Some(chunk) = next else {
                return Ok(collected.freeze());
            };
            let chunk = chunk
                .map_err(|error| ApiError::bad_request(format!("cannot read body: {error}")))?;
            if (collected.len() + chunk.len()) as u64 > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body larger than {limit} bytes"),
                ));
            }
            collected.extend_from_slice(&chunk);
        }
    }
}

pub use crate::order::nests_deeper_than;

/// How deep a parsed value nests (a scalar is 0, `[]` is 1).
pub fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A token bucket per user (GCRA, from `governor`): `burst` submissions at once, refilled at
/// `rate` per second. At most `capacity` users are remembered: when the table is full, the users
/// whose bucket has refilled (the same as a forgotten one) are dropped, and while it stays full a
/// user not in it is checked against one bucket shared by everyone else not in it, so memory
/// stays bounded, an unknown user is never let through unchecked, and a flood of new names does
/// not move the users already known onto that shared bucket.
pub struct RateLimiter<C: Clock = DefaultClock> {
    buckets: governor::RateLimiter<String, Buckets, C, NoOpMiddleware<C::Instant>>,
    /// The same table as `buckets`', to ask whether a user is in it.
    known: Buckets,
    capacity: usize,
    /// When the table was last swept, so a full table is swept at most every [`SWEEP_PERIOD`].
    last_sweep: Mutex<Option<C::Instant>>,
}

/// The key of the bucket shared by the users who do not fit in a full table.
const OVERFLOW: &str = "";
/// How often a full table of buckets may be swept for refilled ones.
const SWEEP_PERIOD: Duration = Duration::from_millis(100);

impl RateLimiter {
    pub fn new(rate: f64, burst: usize, capacity: usize) -> Self {
        Self::with_clock(rate, burst, capacity, DefaultClock::default())
    }
}

impl<C: Clock> RateLimiter<C> {
    fn with_clock(rate: f64, burst: usize, capacity: usize, clock: C) -> Self {
        // One token every 1/rate seconds; a rate too high for a nanosecond period is one per ns.
        let period =
            Duration::from_secs_f64(1.0 / rate.max(f64::MIN_POSITIVE)).max(Duration::from_nanos(1));
        let burst =
            NonZeroU32::new(u32::try_from(burst).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        let known = Buckets::default();
        RateLimiter {
            buckets: governor::RateLimiter::new(quota, known.clone(), clock),
            known,
            capacity: capacity.max(1),
            last_sweep: Mutex::new(None),
        }
    }

    /// Takes one submission from `user`'s bucket, or says how long until one is available.
    pub fn check(&self, user: &str) -> Result<(), Duration> {
        let mut key = user;
        if self.buckets.len() >= self.capacity && !self.known.0.contains_key(user) {
            self.sweep();
            if self.buckets.len() >= self.capacity {
                key = OVERFLOW;
            }
        }
        self.buckets
            .check_key(&key.to_string())
            .map_err(|not_until| not_until.wait_time_from(self.buckets.clock().now()))
    }

    /// Forgets the users whose bucket has refilled, at most once every [`SWEEP_PERIOD`].
    fn sweep(&self) {
        let now = self.buckets.clock().now();
        let mut last_sweep = match self.last_sweep.lock() {
            Ok(last_sweep) => last_sweep,
            Err(poisoned) => poisoned.into_inner(),
        };
        let due =
            last_sweep.is_none_or(|last| Duration::from(now.duration_since(last)) >= SWEEP_PERIOD);
        if due {
            *last_sweep = Some(now);
            self.buckets.retain_recent();
        }
    }

    pub fn users(&self) -> usize {
        self.buckets.len()
    }
}

/// governor's table of buckets, shared: its rate limiter keeps the store it is given and has
/// no lookup of a key that leaves the table as it is.
#[derive(Clone, Default)]
struct Buckets(Arc<DashMapStateStore<String>>);

impl StateStore for Buckets {
    type Key = String;

    fn measure_and_replace<T, F, E>(&self, key: &String, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<String> for Buckets {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn depth_scan_ignores_brackets_in_strings() {
        assert!(!nests_deeper_than(br#"{"a": "[[[[[[", "b": "\"{{{{"}"#, 1));
        assert!(nests_deeper_than(br#"{"a": [[1]]}"#, 2));
        assert!(!nests_deeper_than(br#"{"a": [[1]]}"#, 3));
        assert!(!nests_deeper_than(b"", 0));
        assert!(nests_deeper_than(b"[", 0));
        assert_eq!(depth(&serde_json::json!({"a": [[1]]})), 3);
        assert_eq!(depth(&serde_json::json!(1)), 0);
    }

    #[test]
    fn the_slowest_rate_with_the_largest_burst_is_a_limiter() {
        use crate::config::{MAX_SUBMIT_BURST, MIN_SUBMIT_RATE};
        let limiter = RateLimiter::new(MIN_SUBMIT_RATE, MAX_SUBMIT_BURST, 4);
        for _ in 0..3 {
            assert!(limiter.check("alice").is_ok(), "within the burst");
        }
    }

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::with_clock(10.0, 3, 100, clock.clone());
        for _ in 0..3 {
            assert!(limiter.check("alice").is_ok());
        }
        let wait = limiter.check("alice").unwrap_err();
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Other users have their own bucket.
        assert!(limiter.check("bob").is_ok());
        // 100 ms later one more is allowed, and only one.
        clock.advance(Duration::from_millis(100));
        assert!(limiter.check("alice").is_ok());
        assert!(limiter.check("alice").is_err());
    }

    #[test]
    fn buckets_stay_bounded_and_a_full_table_still_limits() {
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::with_clock(1.0, 2, 10, clock.clone());
        for index in 0..1000 {
            let _ = limiter.check(&format!("user-{index}"));
            // The table, plus the bucket shared by whoever does not fit.
            assert!(limiter.users() <= 11, "{} users", limiter.users());
        }
        // The table is full of recent users: a newcomer shares one bucket with the others that
        // do not fit, so it is limited all the same.
        assert!(limiter.check("hot").is_err());
        // Once the buckets refill they are forgotten, and a newcomer has its own again.
        clock.advance(Duration::from_secs(5));
        assert!(limiter.check("hot").is_ok());
        assert!(limiter.check("hot").is_ok());
        assert!(limiter.check("hot").is_err());
        assert!(limiter.users() <= 11);
    }

    #[test]
    fn a_user_in_a_full_table_keeps_its_own_bucket() {
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::with_clock(1.0, 2, 10, clock.clone());
        assert!(limiter.check("alice").is_ok());
        // Many newcomers fill the table and empty the bucket they share.
        for index in 0..1000 {
            let _ = limiter.check(&format!("user-{index}"));
        }
        assert!(limiter.check("newcomer").is_err());
        // alice was remembered before: her own bucket still has a submission in it.
        assert!(limiter.check("alice").is_ok());
        assert!(limiter.check("alice").is_err());
    }
}
