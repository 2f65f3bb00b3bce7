//! One run: submitters post orders (round-robin over the nodes, open or closed loop), waiters
//! learn when they finish through batched long polls, and each finished order gets a verdict.

use crate::args::BenchArgs;
use crate::cpu::{cpu_seconds, servers_cpu};
use crate::http::{endpoint, identity, roots, Client, Connections, Endpoint};
use crate::progress::{Counts, Progress};
use crate::summary::{Percentiles, Summary};
use hdrhistogram::Histogram;
use order_process_history::check::{check_history, Field, History};
use order_process_history::{time::utc_text, End, WORK_STEPS};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The most `--payload-bytes`: well past any node's `server.max_body_bytes` default (64 KiB),
/// short of making the bench itself the load.
const MAX_PAYLOAD_BYTES: usize = 16 << 20;

/// An accepted order and the step it asked to fail at.
struct Accepted {
    id: String,
    fail_at: Option<&'static str>,
}

/// The part of a 201 answer to `POST /orders` the bench reads.
#[derive(serde::Deserialize)]
struct Created {
    order_id: String,
}

/// An answer to `POST /orders/wait`: the finished orders' views (what their histories are
/// judged by, borrowed from the answer), and the ids it does not know.
#[derive(serde::Deserialize)]
struct WaitAnswer<'a> {
    #[serde(borrow, default)]
    orders: Vec<History<'a>>,
    #[serde(borrow, default)]
    missing: Vec<Cow<'a, str>>,
}

/// How a finished order's history turned out.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Completed,
    FailedAsAsked,
    FailedByChance,
}

struct Tally {
    /// Microseconds.
    submit: Histogram<u64>,
    /// Microseconds.
    end_to_end: Histogram<u64>,
    http_errors: BTreeMap<String, usize>,
    completed: usize,
    failed: usize,
    failed_by_chance: usize,
    mismatches: usize,
    first_mismatch: Option<String>,
}

impl Tally {
    fn new() -> Result<Tally, String> {
        let histogram = || Histogram::<u64>::new(3).map_err(|error| error.to_string());
        Ok(Tally {
            submit: histogram()?,
            end_to_end: histogram()?,
            http_errors: BTreeMap::new(),
            completed: 0,
            failed: 0,
            failed_by_chance: 0,
            mismatches: 0,
            first_mismatch: None,
        })
    }
}

fn lock(tally: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    tally
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

pub async fn run(args: BenchArgs) -> Result<Summary, String> {
    let urls: Vec<String> = if args.url.is_empty() {
        vec!["http://127.0.0.1:8080".to_string()]
    } else {
        args.url
            .iter()
            .map(|url| url.trim_end_matches('/').to_string())
            .collect()
    };
    let timeout =
        humantime::parse_duration(&args.timeout).map_err(|error| format!("--timeout: {error}"))?;
    if !(0.0..=1.0).contains(&args.fail_rate) {
        return Err("--fail-rate must be between 0 and 1".into());
    }
    if args.rate.is_some_and(|rate| rate <= 0.0) {
        return Err("--rate must be more than 0".into());
    }
    if args.payload_bytes > MAX_PAYLOAD_BYTES {
        return Err(format!(
            "--payload-bytes must be at most {MAX_PAYLOAD_BYTES}"
        ));
    }
    // Parsed once, not for every request.
    let orders_urls = urls
        .iter()
        .enumerate()
        .map(|(node, url)| endpoint(url, "/orders", node))
        .collect::<Result<Vec<_>, _>>()?;
    let wait_urls = urls
        .iter()
        .enumerate()
        .map(|(node, url)| endpoint(url, "/orders/wait", node))
        .collect::<Result<Vec<_>, _>>()?;
    let concurrency = args.concurrency.max(1);
    let https = orders_urls
        .iter()
        .any(|url| url.uri.scheme_str() == Some("https"));
    let roots = roots(args.ca_file.as_deref(), https)?;
    let identity = identity(args.client_cert.as_deref(), args.client_key.as_deref())?;
    let client = Client::new(Duration::from_secs(90), roots, identity)?;
    let cpu_before = cpu_seconds(std::process::id()).unwrap_or(0.0);
    let server_before: Option<f64> = servers_cpu(&args.pid);

    let tally = Arc::new(Mutex::new(Tally::new()?));
    let counts = Arc::new(Counts::default());
    let next = Arc::new(AtomicUsize::new(0));
    let users: Vec<String> = match args.users {
        0 => return Err("--users must be at least 1".into()),
        1 => vec![args.user.clone()],
        n => (0..n).map(|k| format!("{}-{k}", args.user)).collect(),
    };
    // One queue of accepted orders per node and user: a long poll names orders of the node it
    // asks, and of the user it asks as.
    let queues = urls.len() * users.len();
    let (accepted_txs, accepted_rxs): (Vec<_>, Vec<_>) = (0..queues)
        .map(|_| {
            let (accepted_tx, accepted_rx) = mpsc::unbounded_channel::<Accepted>();
            (accepted_tx, Arc::new(tokio::sync::Mutex::new(accepted_rx)))
        })
        .unzip();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;

    let pad: Arc<str> = "x".repeat(args.payload_bytes).into();
    let mut submitters = Vec::new();
    for _ in 0..concurrency {
        let submitter = Submitter {
            connections: Connections::new(client.clone(), urls.len()),
            urls: orders_urls.clone(),
            tally: Arc::clone(&tally),
            counts: Arc::clone(&counts),
            next: Arc::clone(&next),
            accepted_txs: accepted_txs.clone(),
            orders: args.orders,
            rate: args.rate,
            fail_rate: args.fail_rate,
            pad: Arc::clone(&pad),
            users: users.clone(),
            started,
        };
        submitters.push(tokio::spawn(submitter.run()));
    }
    drop(accepted_txs);

    let mut waiters = Vec::new();
    for index in 0..args.waiters.max(queues) {
        let queue = index % queues;
        let waiter = Waiter {
            connections: Connections::new(client.clone(), urls.len()),
            url: wait_urls[queue % urls.len()].clone(),
            user: users[queue / urls.len()].clone(),
            batch: args.batch.clamp(1, 500),
            tally: Arc::clone(&tally),
            counts: Arc::clone(&counts),
            accepted_rx: Arc::clone(&accepted_rxs[queue]),
            deadline,
        };
        waiters.push(tokio::spawn(waiter.run()));
    }

    let progress = Progress::start(Arc::clone(&counts), args.orders);
    for task in submitters {
        let _ = task.await;
    }
    for task in waiters {
        let _ = task.await;
    }
    drop(progress);

    let elapsed = started.elapsed().as_secs_f64();
    let bench_cpu = cpu_seconds(std::process::id()).unwrap_or(0.0) - cpu_before;
    let server_cpu = match (server_before, servers_cpu(&args.pid)) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    let tally = lock(&tally);
    let submitted = counts.accepted.load(Ordering::Relaxed);
    let terminal = tally.completed + tally.failed + tally.failed_by_chance + tally.mismatches;
    let lost = submitted.saturating_sub(terminal);
    let cpu_us_per_order =
        server_cpu.map(|server| (server + bench_cpu) * 1e6 / (terminal.max(1) as f64));
    Ok(Summary {
        orders: args.orders,
        submitted,
        shed: counts.shed.load(Ordering::Relaxed),
        completed: tally.completed,
        failed: tally.failed,
        failed_by_chance: tally.failed_by_chance,
        lost,
        mismatches: tally.mismatches,
        first_mismatch: tally.first_mismatch.clone(),
        elapsed_s: elapsed,
        orders_per_s: terminal as f64 / elapsed.max(f64::EPSILON),
        submit_latency_ms: Percentiles::of(&tally.submit),
        end_to_end_latency_ms: Percentiles::of(&tally.end_to_end),
        http_errors: tally.http_errors.clone(),
        bench_cpu_s: bench_cpu,
        server_cpu_s: server_cpu,
        cpu_us_per_order,
    })
}

/// Posts orders until `orders` were taken, each to the next node in turn.
struct Submitter {
    /// Its own, one to each node.
    connections: Connections,
    /// Each node's `/orders`.
    urls: Vec<Endpoint>,
    tally: Arc<Mutex<Tally>>,
    counts: Arc<Counts>,
    next: Arc<AtomicUsize>,
    accepted_txs: Vec<mpsc::UnboundedSender<Accepted>>,
    orders: usize,
    rate: Option<f64>,
    fail_rate: f64,
    /// Padding for each payload (`--payload-bytes`), none when empty.
    pad: Arc<str>,
    users: Vec<String>,
    started: Instant,
}

impl Submitter {
    async fn run(mut self) {
        loop {
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= self.orders {
                return;
            }
            if let Some(rate) = self.rate {
                let due = self.started + Duration::from_secs_f64(index as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            self.submit(index).await;
        }
    }

    async fn submit(&mut self, index: usize) {
        let node = index % self.urls.len();
        let user = (index / self.urls.len()) % self.users.len();
        let url = &self.urls[node];
        let fail_at = (rand::random::<f64>() < self.fail_rate)
            .then(|| WORK_STEPS[rand::random_range(0..WORK_STEPS.len())]);
        let mut payload = match fail_at {
            Some(step) => serde_json::json!({"bench": index, "simulate": {"fail_at": step}}),
            None => serde_json::json!({"bench": index}),
        };
        if !self.pad.is_empty() {
            payload["pad"] = serde_json::Value::from(&*self.pad);
        }
        let body = serde_json::to_vec(&payload).unwrap_or_default();
        let sent = Instant::now();
        let reply = (self.connections)
            .post_json(url, &self.users[user], body)
            .await;
        let elapsed = sent.elapsed();
        let error = match reply {
            Ok((status, body)) if status.as_u16() == 201 => {
                // Only the id is kept: read without building the rest of the answer.
                let id = serde_json::from_slice::<Created>(&body)
                    .map(|created| created.order_id)
                    .unwrap_or_default();
                let _ = lock(&self.tally).submit.record(micros(elapsed));
                self.counts.accepted.fetch_add(1, Ordering::Relaxed);
                let queue = user * self.urls.len() + node;
                let _ = self.accepted_txs[queue].send(Accepted { id, fail_at });
                return;
            }
            Ok((status, _)) => {
                let status = status.as_u16();
                if status == 503 {
                    self.counts.shed.fetch_add(1, Ordering::Relaxed);
                }
                status.to_string()
            }
            Err(failure) => failure.name().to_string(),
        };
        *lock(&self.tally).http_errors.entry(error).or_default() += 1;
    }
}

/// Long-polls one node for batches of its accepted orders until none is left or time is up.
struct Waiter {
    /// Its own, to its node.
    connections: Connections,
    /// The node's `/orders/wait`.
    url: Endpoint,
    user: String,
    batch: usize,
    tally: Arc<Mutex<Tally>>,
    counts: Arc<Counts>,
    accepted_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Accepted>>>,
    deadline: tokio::time::Instant,
}

impl Waiter {
    async fn run(mut self) {
        let mut waiting: Vec<Accepted> = Vec::new();
        loop {
            if waiting.len() < self.batch {
                let mut accepted_rx = self.accepted_rx.lock().await;
                if waiting.is_empty() {
                    match accepted_rx.recv().await {
                        Some(order) => waiting.push(order),
                        None => return,
                    }
                }
                while waiting.len() < self.batch {
                    match accepted_rx.try_recv() {
                        Ok(order) => waiting.push(order),
                        Err(_) => break,
                    }
                }
            }
            if tokio::time::Instant::now() >= self.deadline {
                // Whatever is still waiting counts as lost.
                return;
            }
            self.wait_batch(&mut waiting).await;
        }
    }

    /// One long poll for a batch of orders (`POST /orders/wait`); takes the finished ones out
    /// of `waiting` and records their final views.
    async fn wait_batch(&mut self, waiting: &mut Vec<Accepted>) {
        let left = self
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        let wait = left.min(Duration::from_secs(30)).as_secs().max(1);
        let ids: Vec<&str> = waiting.iter().map(|order| order.id.as_str()).collect();
        let request = serde_json::json!({ "order_ids": ids, "wait": format!("{wait}s") });
        let reply = self
            .connections
            .post_json(
                &self.url,
                &self.user,
                serde_json::to_vec(&request).unwrap_or_default(),
            )
            .await;
        let judged = match &reply {
            Ok((status, body)) if status.is_success() => judged(body),
            _ => None,
        };
        let Some(judged) = judged else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        };
        for (id, view) in judged {
            if let Some(position) = waiting.iter().position(|order| order.id == id) {
                let order = waiting.swap_remove(position);
                self.counts.finished.fetch_add(1, Ordering::Relaxed);
                record(&self.tally, &order, view.as_ref());
            }
        }
    }
}

/// What is wrong with an order a wait answer lists as missing.
const UNKNOWN: &str = "the node does not know it";

/// An order's id, and its final view or what is wrong instead.
type Named<'a> = (Cow<'a, str>, Result<History<'a>, String>);

/// The orders a wait answer (`body`) names, each with its final view, or what is wrong instead
/// (the node does not know it, or its view does not read as one); `None` when `body` is not
/// JSON. An answer with a view that does not read as one (a field of the wrong type) has each
/// of its orders judged wrong, not left to count as lost.
fn judged(body: &[u8]) -> Option<Vec<Named<'_>>> {
    // Checked as UTF-8 once, not string by string as a parse of bytes does.
    let text = std::str::from_utf8(body).ok()?;
    let answer = match serde_json::from_str::<WaitAnswer>(text) {
        Ok(answer) => answer,
        Err(error) => {
            let answer: serde_json::Value = serde_json::from_str(text).ok()?;
            let problem = format!("the answer's views do not read as order views: {error}");
            let views = answer["orders"].as_array().into_iter().flatten();
            let views = views.filter_map(|view| view["order_id"].as_str());
            let missing = answer["missing"].as_array().into_iter().flatten();
            let missing = missing.filter_map(|id| id.as_str());
            let named = views.map(|id| (id, problem.clone()));
            let named = named.chain(missing.map(|id| (id, UNKNOWN.to_string())));
            return Some(
                named
                    .map(|(id, problem)| (Cow::Owned(id.to_string()), Err(problem)))
                    .collect(),
            );
        }
    };
    let unknown = || Err(UNKNOWN.to_string());
    let missing = answer.missing.into_iter().map(|id| (id, unknown()));
    let views = answer.orders.into_iter().map(|view| {
        let id = match &view.order_id {
            Field::Text(id) => id.clone(),
            _ => Cow::Borrowed(""),
        };
        (id, Ok(view))
    });
    Some(views.chain(missing).collect())
}

/// Counts `order`'s verdict and its time from submit to finish; `view` is what is wrong instead
/// of a view when there is none to judge.
fn record(tally: &Mutex<Tally>, order: &Accepted, view: Result<&History, &String>) {
    let verdict = match view {
        Ok(view) => verdict(view, order.fail_at),
        Err(problem) => Err(problem.clone()),
    };
    let view = view.ok();
    let mut tally = lock(tally);
    let time = |field: &Field| utc_text(field.text()?).ok();
    if let Some((Some(start), Some(end))) =
        view.map(|view| (time(&view.start_time), time(&view.complete_time)))
    {
        if let Ok(taken) = (end - start).to_std() {
            let _ = tally.end_to_end.record(micros(taken));
        }
    }
    match verdict {
        Ok(Verdict::Completed) => tally.completed += 1,
        Ok(Verdict::FailedAsAsked) => tally.failed += 1,
        Ok(Verdict::FailedByChance) => tally.failed_by_chance += 1,
        Err(problem) => {
            tally.mismatches += 1;
            if tally.first_mismatch.is_none() {
                let shown = view.map_or_else(String::new, |view| {
                    serde_json::to_string(view).unwrap_or_default()
                });
                tally.first_mismatch = Some(format!("order {}: {problem}: {shown}", order.id));
            }
        }
    }
}

/// Judges a finished order: its history must be legal, and end where it asked to fail (or
/// complete). A legal failure at an earlier step than asked, or at any step when nothing was
/// asked, is the node's own failure chance.
fn verdict(view: &History, fail_at: Option<&str>) -> Result<Verdict, String> {
    let end = check_history(view).map_err(|problem| problem.to_string())?;
    let position = |step: &str| WORK_STEPS.iter().position(|work| *work == step);
    match (end, fail_at) {
        (End::Completed, None) => Ok(Verdict::Completed),
        (End::Completed, Some(asked)) => Err(format!("asked to fail at {asked}, completed")),
        (End::Failed { parked: true, .. }, _) => Err("its rollback is parked".into()),
        (End::Failed { step, .. }, Some(asked)) if step == asked => Ok(Verdict::FailedAsAsked),
        (End::Failed { step, .. }, Some(asked)) if position(step) > position(asked) => {
            Err(format!("asked to fail at {asked}, failed at {step}"))
        }
        (End::Failed { .. }, _) => Ok(Verdict::FailedByChance),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The verdict on `view` read as the bench reads an answer's views.
    fn judge(view: &Value, fail_at: Option<&str>) -> Result<Verdict, String> {
        let text = serde_json::to_vec(view).map_err(|error| error.to_string())?;
        let history: History = serde_json::from_slice(&text).map_err(|error| error.to_string())?;
        verdict(&history, fail_at)
    }

    fn step(name: &str, complete: bool, rollback: Option<&str>) -> Value {
        let mut step =
            serde_json::json!({"step_name": name, "step_start_time": "2026-01-01T00:00:00Z"});
        if complete {
            step["step_complete_time"] = "2026-01-01T00:00:00Z".into();
        }
        if let Some(at) = rollback {
            step["step_rollback_time"] = at.into();
        }
        step
    }

    fn failed_at_pre_processing(reason: &str) -> Value {
        serde_json::json!({
            "current_step": "Failed",
            "start_time": "2026-01-01T00:00:00Z",
            "complete_time": "2026-01-01T00:00:05Z",
            "failure": {"step": "Pre-Processing", "reason": reason},
            "rollback_state": "complete",
            "steps": [
                step("Scheduling", true, Some("2026-01-01T00:00:05Z")),
                step("Pre-Processing", false, Some("2026-01-01T00:00:04Z")),
                step("Failed", true, None),
            ],
        })
    }

    #[test]
    fn a_wait_answer_names_each_order_with_its_view_or_what_is_wrong() {
        let view = failed_at_pre_processing("declined");
        let mut good = view.clone();
        good["order_id"] = "a".into();
        let answer = serde_json::json!({"orders": [good], "missing": ["b"]});
        let text = serde_json::to_vec(&answer).unwrap();
        let named = judged(&text).unwrap();
        assert_eq!(named.len(), 2);
        assert_eq!(named[0].0, "a");
        let history = named[0].1.as_ref().unwrap();
        assert_eq!(verdict(history, None), Ok(Verdict::FailedByChance));
        assert_eq!(named[1].0, "b");
        assert!(named[1].1.is_err());
        // A view with a field of the wrong type: every order of the answer is judged wrong.
        let mut bad = view;
        bad["order_id"] = "c".into();
        bad["start_time"] = 12.into();
        let answer = serde_json::json!({"orders": [good_again(), bad], "missing": ["e"]});
        let text = serde_json::to_vec(&answer).unwrap();
        let named = judged(&text).unwrap();
        let ids: Vec<&str> = named.iter().map(|(id, _)| &**id).collect();
        assert_eq!(ids, ["d", "c", "e"]);
        assert!(named.iter().all(|(_, view)| view.is_err()));
        assert!(judged(b"not json").is_none());
    }

    fn good_again() -> Value {
        let mut view = failed_at_pre_processing("declined");
        view["order_id"] = "d".into();
        view
    }

    #[test]
    fn verdicts_follow_what_was_asked() {
        let steps: Vec<Value> = order_process_history::COMPLETED_STEPS
            .iter()
            .map(|name| step(name, true, None))
            .collect();
        let completed = serde_json::json!({
            "current_step": "Completed",
            "start_time": "2026-01-01T00:00:00Z",
            "complete_time": "2026-01-01T00:00:01Z",
            "steps": steps,
        });
        assert_eq!(judge(&completed, None), Ok(Verdict::Completed));
        assert!(judge(&completed, Some("Processing")).is_err());
        let failed = failed_at_pre_processing("simulated failure");
        assert_eq!(
            judge(&failed, Some("Pre-Processing")),
            Ok(Verdict::FailedAsAsked)
        );
        // The node's own failure chance: legal, whether or not a later step was asked to fail.
        assert_eq!(judge(&failed, None), Ok(Verdict::FailedByChance));
        assert_eq!(
            judge(&failed, Some("Post-Processing")),
            Ok(Verdict::FailedByChance)
        );
        assert!(judge(&failed, Some("Scheduling")).is_err());
        let mut wrong_order = failed;
        wrong_order["steps"][0]["step_rollback_time"] = "2026-01-01T00:00:03Z".into();
        assert!(judge(&wrong_order, Some("Pre-Processing")).is_err());
    }
}
