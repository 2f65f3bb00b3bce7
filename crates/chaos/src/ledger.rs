//! The ledger: an HTTP service (the testkit's shop, in this process) that plays the shop's payment, stock and shipping for
//! the campaign's nodes, and keeps the books the checker reads afterwards.
//!
//! Every node calls `POST /n{node}/run/{step}` to run a step and `/n{node}/undo/{step}` to
//! compensate it (the node index in the path says who called). The ledger behaves like a careful
//! real service:
//! - an effect is applied once per idempotency key; a repeat gets the first answer again;
//! - a compensation is recorded once per key, and remembers whether it undid an effect;
//! - a call whose ownership epoch (`epoch` in the body, also the `Order-Epoch` header) is older
//!   than the newest it has seen for the order is refused (409): it comes from a node that has
//!   lost the order;
//! - a run that arrives after its step was compensated is refused (409) instead of applied, so a
//!   stale caller cannot leave an effect behind that nobody will undo (this also covers a run
//!   and a compensation of the same epoch);
//! - the order's payload can ask for a refusal at one step (`"fail_at"`, answered 422) and for
//!   one slow step (`"slow": {"step": …, "ms": …}`);
//! - the first two attempts of any call fail with 503 now and then (decided by a hash of the
//!   seed, the key and the attempt number, so a replay with the same seed flakes the same way).

use chrono::{DateTime, Utc};
use order_process_history::WORK_STEPS;
use order_process_testkit::{Answer, Request, Shop};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The HTTP statuses the ledger answers with.
mod status {
    pub const OK: u16 = 200;
    pub const BAD_REQUEST: u16 = 400;
    pub const NOT_FOUND: u16 = 404;
    pub const CONFLICT: u16 = 409;
    pub const UNPROCESSABLE_ENTITY: u16 = 422;
    pub const SERVICE_UNAVAILABLE: u16 = 503;
}

/// In how many of 1000 first or second attempts the ledger answers 503.
const FLAKY_PER_MILLE: u64 = 40;

/// What the ledger did with one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A run applied its effect.
    Applied,
    /// A run whose key was seen before: answered again, nothing applied.
    Duplicate,
    /// A run the order's payload asked to refuse (422).
    Declined,
    /// A 503 before doing anything (the caller retries).
    Flaky,
    /// A run after its step's compensation: refused (409), nothing applied.
    LateRunRefused,
    /// A call with an older epoch than the order's newest seen: refused (409), nothing done.
    StaleEpochRefused,
    /// A compensation that undid an applied effect.
    Compensated,
    /// A compensation of a step that had no effect (the failed step, or a cancelled one).
    NothingToUndo,
    /// A compensation whose key was seen before: answered again, nothing done.
    UndoDuplicate,
    /// The idempotency key is not `{order_id}:{step}` (or `…:rollback` to undo).
    BadKey,
}

/// One call the ledger answered.
#[derive(Clone, Debug, Serialize)]
pub struct Call {
    pub seq: u64,
    /// When the call came in (before a slow step's wait).
    pub arrived: DateTime<Utc>,
    /// When it was answered.
    pub at: DateTime<Utc>,
    pub node: usize,
    pub order_id: String,
    pub step: String,
    pub rollback: bool,
    pub key: String,
    pub attempt: u32,
    /// The caller's ownership epoch of the order (0 when it sent none).
    pub epoch: u64,
    pub status: u16,
    pub outcome: Outcome,
}

/// An applied effect or a recorded compensation of one step of one order.
#[derive(Clone, Debug)]
pub struct Entry {
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub node: usize,
    /// For a compensation: whether an effect was applied when it came.
    pub undid_effect: bool,
}

impl Call {
    /// `run KEY` or `undo KEY`.
    pub fn what(&self) -> String {
        let direction = if self.rollback { "undo" } else { "run" };
        format!("{direction} {}", self.key)
    }
}

#[derive(Default)]
pub struct Books {
    pub calls: Vec<Call>,
    /// (order id, step) → the effect applied.
    pub effects: HashMap<(String, String), Entry>,
    /// (order id, step) → the compensation recorded.
    pub compensations: HashMap<(String, String), Entry>,
    /// Order id → the newest ownership epoch a call carried.
    pub epochs: HashMap<String, u64>,
    seq: u64,
}

impl Books {
    /// The calls made for one order, in the order they were answered.
    pub fn calls_for(&self, order_id: &str) -> Vec<&Call> {
        self.calls
            .iter()
            .filter(|call| call.order_id == order_id)
            .collect()
    }
}

/// What the nodes send (the `http` step handler's body); only the fields the ledger needs.
#[derive(Deserialize)]
struct StepRequest {
    order_id: String,
    step: String,
    #[serde(default)]
    attempt: u32,
    #[serde(default)]
    epoch: u64,
    #[serde(default)]
    payload: serde_json::Value,
}

pub struct Ledger {
    pub shop: Shop,
    books: Arc<Mutex<Books>>,
}

impl Ledger {
    /// Starts the ledger on a free port of `ip` (loopback, or the bridge the nodes are on).
    pub async fn start(seed: u64, ip: IpAddr) -> std::io::Result<Ledger> {
        let books: Arc<Mutex<Books>> = Arc::default();
        let shared = Arc::clone(&books);
        let shop = Shop::serve_on(ip, move |request: Request| {
            let books = Arc::clone(&shared);
            async move { route(seed, &books, request).await }
        })
        .await?;
        Ok(Ledger { shop, books })
    }

    pub fn base(&self) -> &str {
        &self.shop.base
    }

    pub fn books(&self) -> MutexGuard<'_, Books> {
        lock(&self.books)
    }

    pub fn called(&self) -> Called {
        Called(Arc::clone(&self.books))
    }
}

/// The ledger's books, to ask which orders it was called for while the campaign goes on.
#[derive(Clone)]
pub struct Called(Arc<Mutex<Books>>);

impl Called {
    /// The ids of the orders the ledger was called for so far.
    pub fn order_ids(&self) -> HashSet<String> {
        lock(&self.0)
            .calls
            .iter()
            .map(|call| call.order_id.clone())
            .collect()
    }
}

fn lock(books: &Mutex<Books>) -> MutexGuard<'_, Books> {
    books
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// FNV-1a over the seed and the parts: a stable, seeded coin for flaky answers.
fn coin(seed: u64, parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0xff)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The step a payload asks to refuse, and its slow step with how long it takes.
pub fn payload_asks(payload: &serde_json::Value) -> (Option<String>, Option<(String, u64)>) {
    let chaos = &payload["chaos"];
    let fail_at = chaos["fail_at"].as_str().map(str::to_string);
    let slow = chaos["slow"]["step"]
        .as_str()
        .map(|step| (step.to_string(), chaos["slow"]["ms"].as_u64().unwrap_or(0)));
    (fail_at, slow)
}

/// Answers `POST /n{node}/{run|undo}/{step}`.
async fn route(seed: u64, books: &Mutex<Books>, request: Request) -> Answer {
    let parts: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
    let (text, status) = match parts.as_slice() {
        [node, direction, step] => {
            answer(
                seed,
                books,
                node,
                direction,
                step,
                request.key.clone(),
                &request.body,
            )
            .await
        }
        _ => ("unknown path".to_string(), status::NOT_FOUND),
    };
    Answer::Status(status, text)
}

async fn answer(
    seed: u64,
    books: &Mutex<Books>,
    node: &str,
    direction: &str,
    step: &str,
    key: Option<String>,
    body: &[u8],
) -> (String, u16) {
    let arrived = Utc::now();
    let node: usize = match node.strip_prefix('n').and_then(|n| n.parse().ok()) {
        Some(node) => node,
        None => return ("unknown node".into(), status::NOT_FOUND),
    };
    let rollback = match direction {
        "run" => false,
        "undo" => true,
        _ => return ("unknown direction".into(), status::NOT_FOUND),
    };
    if !WORK_STEPS.contains(&step) {
        return ("unknown step".into(), status::NOT_FOUND);
    }
    let request: StepRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(error) => return (format!("bad body: {error}"), status::BAD_REQUEST),
    };
    let key = key.unwrap_or_default();
    let (fail_at, slow) = payload_asks(&request.payload);
    if !rollback {
        if let Some((slow_step, ms)) = &slow {
            if slow_step == step {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
            }
        }
    }
    let expected = if rollback {
        format!("{}:{}:rollback", request.order_id, step)
    } else {
        format!("{}:{}", request.order_id, step)
    };
    let flaky = request.attempt <= 2
        && coin(seed, &[&key, &request.attempt.to_string()]) % 1000 < FLAKY_PER_MILLE;
    let mut books = lock(books);
    books.seq += 1;
    let seq = books.seq;
    let at = Utc::now();
    let id = (request.order_id.clone(), step.to_string());
    let entry = Entry {
        seq,
        at,
        node,
        undid_effect: false,
    };
    let newest = books.epochs.get(&request.order_id).copied().unwrap_or(0);
    let (outcome, status, text) = if key != expected || request.step != step {
        (
            Outcome::BadKey,
            status::BAD_REQUEST,
            format!("idempotency key `{key}` is not `{expected}`"),
        )
    } else if request.epoch < newest {
        (
            Outcome::StaleEpochRefused,
            status::CONFLICT,
            format!("epoch {} is older than {newest}", request.epoch),
        )
    } else if flaky {
        (
            Outcome::Flaky,
            status::SERVICE_UNAVAILABLE,
            "ledger busy".to_string(),
        )
    } else if rollback {
        if books.compensations.contains_key(&id) {
            (Outcome::UndoDuplicate, status::OK, "{}".to_string())
        } else {
            let undid_effect = books.effects.contains_key(&id);
            books.compensations.insert(
                id,
                Entry {
                    undid_effect,
                    ..entry
                },
            );
            let outcome = if undid_effect {
                Outcome::Compensated
            } else {
                Outcome::NothingToUndo
            };
            (outcome, status::OK, "{}".to_string())
        }
    } else if books.compensations.contains_key(&id) {
        (
            Outcome::LateRunRefused,
            status::CONFLICT,
            "already compensated".to_string(),
        )
    } else if fail_at.as_deref() == Some(step) {
        (
            Outcome::Declined,
            status::UNPROCESSABLE_ENTITY,
            format!("declined {step}"),
        )
    } else if let Some(first) = books.effects.get(&id) {
        let text = serde_json::json!({ "ref": format!("{step}-{}", first.seq) }).to_string();
        (Outcome::Duplicate, status::OK, text)
    } else {
        books.effects.insert(id, entry);
        let text = serde_json::json!({ "ref": format!("{step}-{seq}") }).to_string();
        (Outcome::Applied, status::OK, text)
    };
    if outcome != Outcome::BadKey && request.epoch > newest {
        books.epochs.insert(request.order_id.clone(), request.epoch);
    }
    books.calls.push(Call {
        seq,
        arrived,
        at,
        node,
        order_id: request.order_id,
        step: step.to_string(),
        rollback,
        key,
        attempt: request.attempt,
        epoch: request.epoch,
        status,
        outcome,
    });
    (text, status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(order: &str, step: &str, attempt: u32, payload: serde_json::Value) -> Vec<u8> {
        epoch_body(order, step, attempt, 1, payload)
    }

    fn epoch_body(
        order: &str,
        step: &str,
        attempt: u32,
        epoch: u64,
        payload: serde_json::Value,
    ) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "order_id": order, "step": step, "attempt": attempt, "epoch": epoch, "payload": payload
        }))
        .unwrap()
    }

    /// A seed under which no attempt of the keys used below flakes.
    fn calm_seed() -> u64 {
        (0..1000u64)
            .find(|seed| {
                ["o:Processing", "o:Processing:rollback", "p:Processing"]
                    .iter()
                    .all(|key| {
                        (1..=2).all(|attempt| {
                            coin(*seed, &[key, &attempt.to_string()]) % 1000 >= FLAKY_PER_MILLE
                        })
                    })
            })
            .unwrap()
    }

    #[tokio::test]
    async fn effects_apply_once_and_late_runs_are_refused() {
        let books = Mutex::new(Books::default());
        let seed = calm_seed();
        let run = body("o", "Processing", 1, serde_json::json!({}));
        let key = Some("o:Processing".to_string());
        let (_, status) = answer(seed, &books, "n0", "run", "Processing", key.clone(), &run).await;
        assert_eq!(status, status::OK);
        let (_, status) = answer(seed, &books, "n1", "run", "Processing", key.clone(), &run).await;
        assert_eq!(status, status::OK);
        let undo_key = Some("o:Processing:rollback".to_string());
        let (_, status) = answer(seed, &books, "n1", "undo", "Processing", undo_key, &run).await;
        assert_eq!(status, status::OK);
        let (_, status) = answer(seed, &books, "n0", "run", "Processing", key, &run).await;
        assert_eq!(status, status::CONFLICT);
        let books = lock(&books);
        let outcomes: Vec<Outcome> = books.calls.iter().map(|call| call.outcome).collect();
        assert_eq!(
            outcomes,
            vec![
                Outcome::Applied,
                Outcome::Duplicate,
                Outcome::Compensated,
                Outcome::LateRunRefused
            ]
        );
        assert_eq!(books.effects.len(), 1);
    }

    #[tokio::test]
    async fn calls_from_an_older_epoch_are_refused() {
        let books = Mutex::new(Books::default());
        let seed = calm_seed();
        let key = || Some("o:Processing".to_string());
        let undo_key = Some("o:Processing:rollback".to_string());
        let at = |epoch| epoch_body("o", "Processing", 1, epoch, serde_json::json!({}));
        let (_, status) = answer(seed, &books, "n0", "run", "Processing", key(), &at(1)).await;
        assert_eq!(status, status::OK);
        // A takeover: the new owner's call is newer and goes through.
        let (_, status) = answer(seed, &books, "n1", "run", "Processing", key(), &at(2)).await;
        assert_eq!(status, status::OK);
        // The old owner, late: both its run and its compensation are refused.
        let (_, status) = answer(seed, &books, "n0", "run", "Processing", key(), &at(1)).await;
        assert_eq!(status, status::CONFLICT);
        let (_, status) = answer(
            seed,
            &books,
            "n0",
            "undo",
            "Processing",
            undo_key.clone(),
            &at(1),
        )
        .await;
        assert_eq!(status, status::CONFLICT);
        let (_, status) = answer(seed, &books, "n1", "undo", "Processing", undo_key, &at(2)).await;
        assert_eq!(status, status::OK);
        let books = lock(&books);
        let outcomes: Vec<Outcome> = books.calls.iter().map(|call| call.outcome).collect();
        assert_eq!(
            outcomes,
            vec![
                Outcome::Applied,
                Outcome::Duplicate,
                Outcome::StaleEpochRefused,
                Outcome::StaleEpochRefused,
                Outcome::Compensated
            ]
        );
        assert_eq!(books.epochs.get("o"), Some(&2));
    }

    #[tokio::test]
    async fn declines_on_request_and_checks_the_key() {
        let books = Mutex::new(Books::default());
        let seed = calm_seed();
        let run = body(
            "p",
            "Processing",
            1,
            serde_json::json!({"chaos": {"fail_at": "Processing"}}),
        );
        let key = Some("p:Processing".to_string());
        let (_, status) = answer(seed, &books, "n0", "run", "Processing", key, &run).await;
        assert_eq!(status, status::UNPROCESSABLE_ENTITY);
        let wrong = Some("p:Scheduling".to_string());
        let (_, status) = answer(seed, &books, "n0", "run", "Processing", wrong, &run).await;
        assert_eq!(status, status::BAD_REQUEST);
        assert!(lock(&books).effects.is_empty());
    }
}
