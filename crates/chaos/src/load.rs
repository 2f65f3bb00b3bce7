//! The load on the cluster while the faults go on: orders submitted at a steady rate (retried on
//! other nodes with the same idempotency key), some cancelled midway, and every unfinished one
//! read again each second to check it only moved forward.

use crate::checks::{check_progress, Intent, Problem};
use crate::world::{get_json, USER};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use order_process_history::WORK_STEPS;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;

/// An order the campaign generated (accepted or not).
pub struct Generated {
    pub n: u64,
    pub intent: Intent,
    /// The order id, once the API accepted it (201, or 200 for a retried key).
    pub id: Option<String>,
    pub status: u16,
}

/// What the client side saw, shared by the submitting, cancelling and polling tasks.
#[derive(Default)]
pub struct Seen {
    pub generated: BTreeMap<u64, Generated>,
    pub by_id: HashMap<String, u64>,
    /// Last snapshot of each unfinished order, for the progress check.
    pub last: HashMap<String, Value>,
    pub finished: HashSet<String>,
    /// Answers to order submissions by kind (`201`, `503`, `timeout`, …).
    pub submissions: BTreeMap<String, usize>,
    pub cancels: BTreeMap<String, usize>,
    /// Answers to rollback retries (`POST /orders/{id}/rollback`) by kind.
    pub rollback_retries: BTreeMap<String, usize>,
    /// Orders whose snapshot went backwards, and when that was seen.
    pub regressions: Vec<(String, Problem, DateTime<Utc>)>,
}

pub fn lock(seen: &Mutex<Seen>) -> MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The intent and payload of order number `n`, drawn from its own seeded generator.
pub fn generate(seed: u64, n: u64) -> (Intent, Value, Option<Duration>) {
    let mut rng = StdRng::seed_from_u64(seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let fail_at = rng
        .random_bool(0.15)
        .then(|| WORK_STEPS[rng.random_range(0..WORK_STEPS.len())]);
    let slow = rng.random_bool(0.4).then(|| {
        (
            WORK_STEPS[rng.random_range(0..WORK_STEPS.len())],
            rng.random_range(500..3000u64),
        )
    });
    let cancel_after = rng
        .random_bool(0.12)
        .then(|| Duration::from_millis(rng.random_range(50..2500)));
    let payload = serde_json::json!({
        "chaos": {
            "n": n,
            "fail_at": fail_at,
            "slow": slow.map(|(step, ms)| serde_json::json!({"step": step, "ms": ms})),
        }
    });
    let intent = Intent {
        fail_at,
        ..Intent::default()
    };
    (intent, payload, cancel_after)
}

/// Requests the client sends with a timeout of a few milliseconds and never retries: it does not
/// learn whether they were done. Drawn per order, apart from its payload.
#[derive(Clone, Copy, Debug, Default)]
struct Hangups {
    /// The submission's only attempt times out after this long.
    submit: Option<Duration>,
    /// The cancellation's only attempt times out after this long.
    cancel: Option<Duration>,
    /// A rollback retry sent after this long, timing out after a few milliseconds.
    rollback_retry: Option<(Duration, Duration)>,
}

fn hangups(seed: u64, n: u64) -> Hangups {
    let mut rng = StdRng::seed_from_u64(seed ^ n.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) ^ 0x5eed);
    let few_ms = |rng: &mut StdRng| Duration::from_millis(rng.random_range(1..8));
    Hangups {
        submit: rng.random_bool(0.08).then(|| few_ms(&mut rng)),
        cancel: rng.random_bool(0.3).then(|| few_ms(&mut rng)),
        rollback_retry: rng.random_bool(0.05).then(|| {
            let after = Duration::from_millis(rng.random_range(50..3000));
            (after, few_ms(&mut rng))
        }),
    }
}

/// The kind of a transport error, for the counts.
fn error_kind(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timeout".to_string()
    } else if error.is_connect() {
        "connect".to_string()
    } else {
        "transport".to_string()
    }
}

/// Submits order `n` (retrying on other nodes with the same idempotency key), then cancels it
/// later if its intent says so. Some submissions, cancellations and rollback retries hang up
/// after a few milliseconds instead (see [`Hangups`]).
async fn submit_one(
    seed: u64,
    n: u64,
    client: reqwest::Client,
    bases: Arc<Vec<String>>,
    seen: Arc<Mutex<Seen>>,
) {
    let (intent, payload, cancel_after) = generate(seed, n);
    let hangups = hangups(seed, n);
    lock(&seen).generated.insert(
        n,
        Generated {
            n,
            intent,
            id: None,
            status: 0,
        },
    );
    let key = format!("chaos-{seed}-{n}");
    let first = usize::try_from(n).unwrap_or(0) % bases.len();
    let mut accepted = None;
    let attempts = if hangups.submit.is_some() { 1 } else { 8 };
    for attempt in 0..attempts {
        let base = &bases[(first + attempt) % bases.len()];
        let reply = client
            .post(format!("{base}/orders"))
            .header("authorization", USER)
            .header("idempotency-key", &key)
            .json(&payload)
            .timeout(hangups.submit.unwrap_or(Duration::from_secs(3)))
            .send()
            .await;
        let outcome = match reply {
            Ok(response) => {
                let status = response.status().as_u16();
                if status == 201 || status == 200 {
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    if let Some(id) = body["order_id"].as_str() {
                        accepted = Some((id.to_string(), status));
                    }
                }
                status.to_string()
            }
            Err(error) if hangups.submit.is_some() => format!("hung_up_{}", error_kind(&error)),
            Err(error) => error_kind(&error),
        };
        *lock(&seen).submissions.entry(outcome).or_default() += 1;
        if accepted.is_some() || attempt + 1 == attempts {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let Some((id, status)) = accepted else {
        *lock(&seen)
            .submissions
            .entry("given_up".into())
            .or_default() += 1;
        return;
    };
    {
        let mut seen = lock(&seen);
        seen.by_id.insert(id.clone(), n);
        if let Some(order) = seen.generated.get_mut(&n) {
            order.id = Some(id.clone());
            order.status = status;
        }
    }
    if let Some((after, timeout)) = hangups.rollback_retry {
        tokio::spawn(retry_rollback(
            client.clone(),
            bases[(first + 2) % bases.len()].clone(),
            id.clone(),
            after,
            timeout,
            Arc::clone(&seen),
        ));
    }
    let Some(after) = cancel_after else { return };
    tokio::time::sleep(after).await;
    if let Some(order) = lock(&seen).generated.get_mut(&n) {
        order.intent.cancel_sent = true;
    }
    let attempts = if hangups.cancel.is_some() { 1 } else { 4 };
    for attempt in 0..attempts {
        let base = &bases[(first + attempt + 1) % bases.len()];
        let reply = client
            .post(format!("{base}/orders/{id}/cancel"))
            .header("authorization", USER)
            .timeout(hangups.cancel.unwrap_or(Duration::from_secs(3)))
            .send()
            .await;
        let status = reply.map(|response| response.status().as_u16()).ok();
        let hung_up = if hangups.cancel.is_some() {
            "hung_up"
        } else {
            "no answer"
        };
        *lock(&seen)
            .cancels
            .entry(status.map_or(hung_up.into(), |status| status.to_string()))
            .or_default() += 1;
        match status {
            Some(202) => {
                if let Some(order) = lock(&seen).generated.get_mut(&n) {
                    order.intent.cancel_accepted = true;
                }
                return;
            }
            Some(409) | Some(404) => return,
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Asks for a retry of the order's rollback after `after`, hanging up after `timeout`: whatever
/// the node does with it (usually 409, nothing parked), the order must still finish.
async fn retry_rollback(
    client: reqwest::Client,
    base: String,
    id: String,
    after: Duration,
    timeout: Duration,
    seen: Arc<Mutex<Seen>>,
) {
    tokio::time::sleep(after).await;
    let reply = client
        .post(format!("{base}/orders/{id}/rollback"))
        .header("authorization", USER)
        .timeout(timeout)
        .send()
        .await;
    let outcome = match reply {
        Ok(response) => response.status().as_u16().to_string(),
        Err(error) => format!("hung_up_{}", error_kind(&error)),
    };
    *lock(&seen).rollback_retries.entry(outcome).or_default() += 1;
}

/// Submits orders at `rate` per second until told to stop; returns the tasks still running.
pub async fn load(
    seed: u64,
    rate: f64,
    client: reqwest::Client,
    bases: Arc<Vec<String>>,
    seen: Arc<Mutex<Seen>>,
    mut stop_rx: watch::Receiver<bool>,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let started = tokio::time::Instant::now();
    let mut n: u64 = 0;
    loop {
        let due = started + Duration::from_secs_f64(n as f64 / rate);
        // The next order is due, or the campaign stops submitting.
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop_rx.changed() => return tasks,
        }
        if *stop_rx.borrow() {
            return tasks;
        }
        tasks.spawn(submit_one(
            seed,
            n,
            client.clone(),
            Arc::clone(&bases),
            Arc::clone(&seen),
        ));
        while tasks.try_join_next().is_some() {}
        n += 1;
    }
}

/// Reads one order through any node that answers.
async fn read_order(
    client: &reqwest::Client,
    bases: &[String],
    id: &str,
    start: usize,
) -> Option<Value> {
    for attempt in 0..bases.len() {
        let base = &bases[(start + attempt) % bases.len()];
        if let Some(view) = get_json(client, &format!("{base}/orders/{id}")).await {
            return Some(view);
        }
    }
    None
}

/// Every second, reads every accepted unfinished order and checks it only moved forward.
pub async fn poll(
    client: reqwest::Client,
    bases: Arc<Vec<String>>,
    seen: Arc<Mutex<Seen>>,
    mut stop_rx: watch::Receiver<bool>,
) {
    let mut round = 0usize;
    loop {
        let pending: Vec<String> = {
            let seen = lock(&seen);
            seen.by_id
                .keys()
                .filter(|id| !seen.finished.contains(*id))
                .cloned()
                .collect()
        };
        round = round.wrapping_add(1);
        let reads = futures_util::stream::iter(pending.into_iter().enumerate())
            .map(|(index, id)| {
                let (client, bases) = (&client, &bases);
                async move {
                    let view = read_order(client, bases, &id, index + round).await;
                    (id, view)
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        {
            let mut seen = lock(&seen);
            for (id, view) in reads {
                let Some(view) = view else { continue };
                if let Some(before) = seen.last.get(&id) {
                    if let Err(problem) = check_progress(before, &view) {
                        seen.regressions.push((id.clone(), problem, Utc::now()));
                    }
                }
                if !view["complete_time"].is_null() {
                    seen.finished.insert(id.clone());
                }
                seen.last.insert(id, view);
            }
        }
        // Poll again in a second, or stop.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop_rx.changed() => return,
        }
    }
}

/// Every order of the campaign's user, by id, read through the listing.
pub async fn list_all(
    client: &reqwest::Client,
    base: &str,
) -> Result<HashMap<String, Value>, String> {
    let mut stored = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/orders?limit=500");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let Some(page) = get_json(client, &url).await else {
            return Err("cannot list the orders at the end".into());
        };
        for order in page["orders"].as_array().cloned().unwrap_or_default() {
            if let Some(id) = order["order_id"].as_str() {
                stored.insert(id.to_string(), order);
            }
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return Ok(stored),
        }
    }
}
