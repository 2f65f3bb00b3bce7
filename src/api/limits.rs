//! What one client may cost the node: bodies read with a size cap and a deadline, payloads with
//! a nesting cap, a submission rate per user ([`RateLimiter`]) and a cap on each user's
//! unfinished orders on this node ([`InFlight`]). All of them answer with a JSON error.

use super::ApiError;
use crate::order::OrderId;
use bytes::{Buf, BytesMut};
use futures_util::{Stream, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use warp::http::StatusCode;

/// Reads at most `limit` bytes of body within `timeout`; more is a 413, slower a 408.
pub async fn read_body<S, B>(body: S, limit: u64, timeout: Duration) -> Result<BytesMut, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut collected = BytesMut::new();
    futures_util::pin_mut!(body);
    loop {
        let next = tokio::time::timeout_at(deadline, body.next())
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
            return Ok(collected);
        };
        let mut chunk =
            chunk.map_err(|error| ApiError::bad_request(format!("cannot read body: {error}")))?;
        if (collected.len() + chunk.remaining()) as u64 > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {limit} bytes"),
            ));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let length = part.len();
            collected.extend_from_slice(part);
            chunk.advance(length);
        }
    }
}

/// Whether JSON text nests arrays and objects deeper than `max`. A scan of the bytes, so it is
/// cheap and runs before the parser builds anything; invalid JSON is left to the parser.
pub fn nests_deeper_than(json: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// How deep a parsed value nests (a scalar is 0, `[]` is 1).
pub fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A token bucket per user: `burst` submissions at once, refilled at `rate` per second. At most
/// `capacity` users are remembered; a full bucket is the same as a forgotten one, so those go
/// first, then the longest idle.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    capacity: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: usize, capacity: usize) -> Self {
        RateLimiter {
            rate,
            burst: burst as f64,
            capacity: capacity.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one submission from `user`'s bucket, or says how long until one is available.
    pub fn check(&self, user: &str) -> Result<(), Duration> {
        self.check_at(user, Instant::now())
    }

    fn check_at(&self, user: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = match self.buckets.lock() {
            Ok(buckets) => buckets,
            Err(poisoned) => poisoned.into_inner(),
        };
        let refill = |bucket: &Bucket| {
            let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
            (bucket.tokens + elapsed * self.rate).min(self.burst)
        };
        if !buckets.contains_key(user) && buckets.len() >= self.capacity {
            buckets.retain(|_, bucket| refill(bucket) < self.burst);
            if buckets.len() >= self.capacity {
                let idlest = buckets
                    .iter()
                    .min_by_key(|(_, bucket)| bucket.updated)
                    .map(|(name, _)| name.clone());
                if let Some(idlest) = idlest {
                    buckets.remove(&idlest);
                }
            }
        }
        let bucket = buckets.entry(user.to_string()).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        bucket.tokens = refill(bucket);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }

    pub fn users(&self) -> usize {
        self.buckets
            .lock()
            .map(|buckets| buckets.len())
            .unwrap_or(0)
    }
}

/// Each user's unfinished orders accepted by this node, capped at `max` per user. An order
/// counts until the node stops executing it (finished, parked, or handed to another node).
pub struct InFlight {
    max: usize,
    by_user: Mutex<HashMap<String, UserOrders>>,
    admissions: AtomicUsize,
}

#[derive(Debug, Default)]
struct UserOrders {
    ids: Vec<OrderId>,
    /// Submissions admitted whose order is not created yet.
    pending: usize,
}

impl UserOrders {
    fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.pending == 0
    }
}

/// Every this many admissions, users with no unfinished order are forgotten.
const SWEEP_EVERY: usize = 1024;

impl InFlight {
    pub fn new(max: usize) -> Self {
        InFlight {
            max,
            by_user: Mutex::new(HashMap::new()),
            admissions: AtomicUsize::new(0),
        }
    }

    /// Room for one more order of `user`, or `None` when the user is at the cap. `running`
    /// tells whether an order still runs here.
    pub fn admit(&self, user: &str, running: impl Fn(OrderId) -> bool) -> Option<Admission<'_>> {
        let mut by_user = match self.by_user.lock() {
            Ok(by_user) => by_user,
            Err(poisoned) => poisoned.into_inner(),
        };
        if self.admissions.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            by_user.retain(|_, orders| {
                orders.ids.retain(|id| running(*id));
                !orders.is_empty()
            });
        }
        let orders = by_user.entry(user.to_string()).or_default();
        if orders.ids.len() + orders.pending >= self.max {
            orders.ids.retain(|id| running(*id));
            if orders.ids.len() + orders.pending >= self.max {
                return None;
            }
        }
        orders.pending += 1;
        Some(Admission {
            in_flight: self,
            user: user.to_string(),
            created: None,
        })
    }

    /// The orders counted for `user` now (running or not).
    pub fn count(&self, user: &str) -> usize {
        self.by_user
            .lock()
            .ok()
            .and_then(|by_user| {
                by_user
                    .get(user)
                    .map(|orders| orders.ids.len() + orders.pending)
            })
            .unwrap_or(0)
    }

    fn settle(&self, user: &str, created: Option<OrderId>) {
        let mut by_user = match self.by_user.lock() {
            Ok(by_user) => by_user,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some(orders) = by_user.get_mut(user) else {
            return;
        };
        orders.pending = orders.pending.saturating_sub(1);
        if let Some(id) = created {
            orders.ids.push(id);
        }
        if orders.is_empty() {
            by_user.remove(user);
        }
    }
}

/// One admitted submission: counted as pending until dropped; [`Admission::created`] makes it
/// count as that order instead.
pub struct Admission<'a> {
    in_flight: &'a InFlight,
    user: String,
    created: Option<OrderId>,
}

impl Admission<'_> {
    pub fn created(mut self, id: OrderId) {
        self.created = Some(id);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.in_flight.settle(&self.user, self.created);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn bucket_allows_the_burst_then_the_rate() {
        let limiter = RateLimiter::new(10.0, 3, 100);
        let start = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at("alice", start).is_ok());
        }
        let wait = limiter.check_at("alice", start).unwrap_err();
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Other users have their own bucket.
        assert!(limiter.check_at("bob", start).is_ok());
        // 100 ms later one more is allowed, and only one.
        let later = start + Duration::from_millis(100);
        assert!(limiter.check_at("alice", later).is_ok());
        assert!(limiter.check_at("alice", later).is_err());
    }

    #[test]
    fn buckets_stay_bounded() {
        let limiter = RateLimiter::new(1.0, 2, 10);
        let start = Instant::now();
        for index in 0..1000 {
            let _ = limiter.check_at(&format!("user-{index}"), start);
            assert!(limiter.users() <= 10);
        }
        // An exhausted user keeps its bucket while others come and go, unless it is the idlest.
        let _ = limiter.check_at("hot", start);
        let _ = limiter.check_at("hot", start);
        assert!(limiter.check_at("hot", start).is_err());
    }

    #[test]
    fn in_flight_caps_each_user_and_forgets_finished_orders() {
        let in_flight = InFlight::new(2);
        let first = OrderId::new_v4();
        let second = OrderId::new_v4();
        let all_running = |_| true;
        in_flight
            .admit("alice", all_running)
            .unwrap()
            .created(first);
        let pending = in_flight.admit("alice", all_running).unwrap();
        assert!(in_flight.admit("alice", all_running).is_none());
        assert!(in_flight.admit("bob", all_running).is_some());
        drop(pending);
        in_flight
            .admit("alice", all_running)
            .unwrap()
            .created(second);
        assert_eq!(in_flight.count("alice"), 2);
        assert!(in_flight.admit("alice", all_running).is_none());
        // Once an order stops running here it no longer counts.
        assert!(in_flight.admit("alice", |id| id != first).is_some());
        assert_eq!(in_flight.count("bob"), 0);
    }
}
