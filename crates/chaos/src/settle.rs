//! After the last heal, every order in the store, whether its client heard the answer or not,
//! must reach `Completed` or `Failed` within the reconcile interval plus the takeover bound.
//! The listing (`GET /orders`, the campaign's user) is read over and over until every order it
//! shows is finished, noting when each was first seen finished.

use crate::ledger::Called;
use crate::load::list_all;
use crate::report::TAKEOVER_BOUND;
use crate::world::RECONCILE_INTERVAL;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest an order may stay unfinished after the last heal (or after it was first listed,
/// for one stored later by a submission still being retried).
pub const STUCK_BOUND: Duration =
    Duration::from_secs(RECONCILE_INTERVAL.as_secs() + TAKEOVER_BOUND.as_secs());

/// How long past the bound the listing is still read, to tell a slow order from a stuck one.
const GRACE: Duration = Duration::from_secs(30);

/// The orders as last listed, and how long they took to finish.
pub struct Settled {
    pub orders: HashMap<String, Value>,
    /// Orders finished later than the bound, or never: id and what was seen.
    pub stuck: Vec<(String, String)>,
    /// The order that took longest to finish after the heal, and how long, in seconds.
    pub slowest: Option<(String, f64)>,
}

/// How long after `healed_wall` the order was stored (zero when before): an order stored by a
/// submission retried after the heal, yet already in the first listing (which can take many
/// seconds to page through), counts from when it was stored.
fn created_since(order: &Value, healed_wall: DateTime<Utc>) -> Duration {
    order["start_time"]
        .as_str()
        .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
        .and_then(|at| (at.with_timezone(&Utc) - healed_wall).to_std().ok())
        .unwrap_or_default()
}

/// How long after `healed_wall` (or after it was stored, if later) the order recorded itself
/// complete. Only an upper bound with [`created_since`]'s when its node's clock was true.
fn completed_since(order: &Value, healed_wall: DateTime<Utc>) -> Option<Duration> {
    let complete = order["complete_time"]
        .as_str()
        .and_then(|at| DateTime::parse_from_rfc3339(at).ok())?;
    let from = healed_wall + chrono::Duration::from_std(created_since(order, healed_wall)).ok()?;
    Some(
        (complete.with_timezone(&Utc) - from)
            .to_std()
            .unwrap_or_default(),
    )
}

/// Reads the listing until every order is finished, no submission is still being tried, no write
/// a link fault held back can still arrive (`late_writes_until`: a create sent before the heal
/// may be stored seconds after it, by TCP trying again) and every order the ledger was called
/// for is listed (or until the bound and a grace have passed). An order counts as finished when a read first sees it
/// so, or when it recorded itself complete, whichever is sooner: a read of the whole listing
/// can take many seconds, and an order that finished at its start is seen only by the next;
/// a node's clock skewed ahead cannot delay an order either, as the read bounds it.
pub async fn settle(
    client: reqwest::Client,
    bases: Arc<Vec<String>>,
    healed: Instant,
    healed_wall: DateTime<Utc>,
    submitting: Arc<AtomicBool>,
    late_writes_until: Option<DateTime<Utc>>,
    called: Called,
) -> Result<Settled, String> {
    let mut since: HashMap<String, Instant> = HashMap::new();
    let mut finished: HashMap<String, f64> = HashMap::new();
    let mut orders: HashMap<String, Value>;
    let mut round = 0usize;
    let mut first = true;
    let mut failures = 0;
    loop {
        round += 1;
        let base = &bases[round % bases.len()];
        // Read before the listing: an order the ledger was called for is stored by then.
        let round_began = Utc::now();
        let called_before = called.order_ids();
        let listed = match list_all(&client, base).await {
            Ok(listed) => listed,
            Err(_) if failures < 40 => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(error) => return Err(error),
        };
        let now = Instant::now();
        for (id, order) in &listed {
            let start = *since.entry(id.clone()).or_insert_with(|| {
                if first {
                    healed + created_since(order, healed_wall).min(now - healed)
                } else {
                    now
                }
            });
            if !order["complete_time"].is_null() && !finished.contains_key(id) {
                let seen = now.duration_since(start);
                let took = completed_since(order, healed_wall).map_or(seen, |at| at.min(seen));
                finished.insert(id.clone(), took.as_secs_f64());
            }
        }
        first = false;
        orders = listed;
        let all_done = !submitting.load(Ordering::SeqCst)
            && late_writes_until.is_none_or(|until| round_began >= until)
            && called_before.iter().all(|id| orders.contains_key(id))
            && orders.keys().all(|id| finished.contains_key(id));
        let latest = since.values().max().copied().unwrap_or(healed);
        if all_done || now >= latest + STUCK_BOUND + GRACE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut stuck = Vec::new();
    for (id, order) in &orders {
        match finished.get(id) {
            Some(took) if *took > STUCK_BOUND.as_secs_f64() => {
                stuck.push((id.clone(), format!("finished {took:.1}s after the heal")))
            }
            Some(_) => {}
            None => stuck.push((
                id.clone(),
                format!("still {} at the end", order["current_step"]),
            )),
        }
    }
    let slowest = finished
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(id, took)| (id.clone(), *took));
    Ok(Settled {
        orders,
        stuck,
        slowest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_counts_from_the_heal_or_from_when_it_was_stored() {
        let healed = DateTime::parse_from_rfc3339("2026-12-02T03:47:15Z")
            .map(|at| at.with_timezone(&Utc))
            .unwrap_or_default();
        let stored_before = serde_json::json!({
            "start_time": "2026-12-02T03:47:00Z",
            "complete_time": "2026-12-02T03:47:20Z",
        });
        assert_eq!(
            completed_since(&stored_before, healed),
            Some(Duration::from_secs(5))
        );
        let stored_after = serde_json::json!({
            "start_time": "2026-12-02T03:47:42Z",
            "complete_time": "2026-12-02T03:47:44Z",
        });
        assert_eq!(
            completed_since(&stored_after, healed),
            Some(Duration::from_secs(2))
        );
        let done_before = serde_json::json!({
            "start_time": "2026-12-02T03:46:00Z",
            "complete_time": "2026-12-02T03:46:30Z",
        });
        assert_eq!(completed_since(&done_before, healed), Some(Duration::ZERO));
        let running = serde_json::json!({"start_time": "2026-12-02T03:47:00Z"});
        assert_eq!(completed_since(&running, healed), None);
    }
}
