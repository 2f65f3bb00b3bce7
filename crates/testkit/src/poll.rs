//! Waiting is polling with a deadline, never a fixed sleep.

use std::future::Future;
use std::time::{Duration, Instant};

/// Interval between two polls of any condition.
pub const POLL: Duration = Duration::from_millis(25);

/// Polls `check` every `every` until it gives `Some`, or `None` once `within` has passed.
pub async fn until<T, F, Fut>(within: Duration, every: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}
