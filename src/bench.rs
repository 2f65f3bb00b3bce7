//! `order-process bench`: a load generator that drives running nodes over HTTP, learns when
//! orders finish through batched long polls (`POST /orders/wait`, one request per batch of up to
//! `--batch` orders), checks every order's step history, and reports throughput, latency, errors
//! and CPU.

use crate::order::Step;
use argh::FromArgs;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "bench")]
/// drive running nodes with orders; report throughput, latency and any lost or wrong order
pub struct BenchArgs {
    /// base URL of a node (repeatable; orders go round-robin); default http://127.0.0.1:8080
    #[argh(option)]
    pub url: Vec<String>,
    /// how many orders to submit
    #[argh(option, default = "1000")]
    pub orders: usize,
    /// submissions in flight at once
    #[argh(option, default = "64")]
    pub concurrency: usize,
    /// open-loop arrival rate in orders per second (default: as fast as concurrency allows)
    #[argh(option)]
    pub rate: Option<f64>,
    /// fraction of orders that fail on purpose at a random step
    #[argh(option, default = "0.0")]
    pub fail_rate: f64,
    /// how long to wait for all orders to finish, e.g. 120s
    #[argh(option, default = "String::from(\"120s\")")]
    pub timeout: String,
    /// long polls in flight at once, each waiting for a batch of orders to finish
    #[argh(option, default = "16")]
    pub waiters: usize,
    /// orders named in one long poll (POST /orders/wait)
    #[argh(option, default = "100")]
    pub batch: usize,
    /// user name the orders are submitted as
    #[argh(option, default = "String::from(\"bench\")")]
    pub user: String,
    /// pid of a server process whose CPU time counts in the report (repeatable)
    #[argh(option)]
    pub pid: Vec<u32>,
    /// print the summary as JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(mut values: Vec<f64>) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        values.sort_by(f64::total_cmp);
        let at = |fraction: f64| {
            let index = ((values.len() as f64 - 1.0) * fraction).round() as usize;
            values[index.min(values.len() - 1)]
        };
        Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// What one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub orders: usize,
    /// Accepted (201).
    pub submitted: usize,
    /// Refused with 503 (load shed); not accepted, so not lost.
    pub shed: usize,
    pub completed: usize,
    pub failed: usize,
    /// Accepted but not finished within the timeout.
    pub lost: usize,
    /// Finished with a history that is not what the order asked for.
    pub mismatches: usize,
    pub first_mismatch: Option<String>,
    pub elapsed_s: f64,
    pub orders_per_s: f64,
    pub submit_latency_ms: Percentiles,
    pub end_to_end_latency_ms: Percentiles,
    pub http_errors: BTreeMap<String, usize>,
    pub bench_cpu_s: f64,
    pub server_cpu_s: Option<f64>,
    pub cpu_us_per_order: Option<f64>,
}

/// An accepted order and the outcome it asked for.
struct Accepted {
    id: String,
    fail_at: Option<Step>,
}

#[derive(Default)]
struct Tally {
    submit_ms: Vec<f64>,
    end_to_end_ms: Vec<f64>,
    http_errors: BTreeMap<String, usize>,
    shed: usize,
    submitted: usize,
    completed: usize,
    failed: usize,
    mismatches: usize,
    first_mismatch: Option<String>,
}

fn lock(tally: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    tally
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs the bench; the exit code is 0 only when nothing was lost or wrong.
pub fn main(args: BenchArgs) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("order-process bench: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args.clone())) {
        Ok(summary) => {
            if args.json {
                match serde_json::to_string_pretty(&summary) {
                    Ok(text) => println!("{text}"),
                    Err(error) => eprintln!("order-process bench: {error}"),
                }
            } else {
                print_summary(&summary);
            }
            if summary.lost == 0 && summary.mismatches == 0 {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("order-process bench: {error}");
            std::process::ExitCode::from(64)
        }
    }
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
    let concurrency = args.concurrency.max(1);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency + args.waiters.max(1))
        .timeout(Duration::from_secs(90))
        .build()
        .map_err(|error| error.to_string())?;
    let cpu_before = cpu_seconds(std::process::id()).unwrap_or(0.0);
    let server_before: Option<f64> = servers_cpu(&args.pid);

    let tally = Arc::new(Mutex::new(Tally::default()));
    let next = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    // One queue of accepted orders per node: a long poll names orders of the node it asks.
    let (accepted_txs, accepted_rxs): (Vec<_>, Vec<_>) = urls
        .iter()
        .map(|_| {
            let (accepted_tx, accepted_rx) = mpsc::unbounded_channel::<Accepted>();
            (accepted_tx, Arc::new(tokio::sync::Mutex::new(accepted_rx)))
        })
        .unzip();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;

    let mut submitters = Vec::new();
    for _ in 0..concurrency {
        let (client, urls, tally, next, accepted_txs) = (
            client.clone(),
            urls.clone(),
            Arc::clone(&tally),
            Arc::clone(&next),
            accepted_txs.clone(),
        );
        let (orders, rate, fail_rate, user) =
            (args.orders, args.rate, args.fail_rate, args.user.clone());
        submitters.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= orders {
                    return;
                }
                if let Some(rate) = rate {
                    let due = started + Duration::from_secs_f64(index as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let url = &urls[index % urls.len()];
                let fail_at = (rand::random::<f64>() < fail_rate)
                    .then(|| Step::WORK[rand::random_range(0..Step::WORK.len())]);
                let payload = match fail_at {
                    Some(step) => {
                        serde_json::json!({"bench": index, "simulate": {"fail_at": step.as_str()}})
                    }
                    None => serde_json::json!({"bench": index}),
                };
                let sent = Instant::now();
                let reply = client
                    .post(format!("{url}/orders"))
                    .header("authorization", &user)
                    .json(&payload)
                    .send()
                    .await;
                let elapsed_ms = sent.elapsed().as_secs_f64() * 1000.0;
                match reply {
                    Ok(response) if response.status().as_u16() == 201 => {
                        let id = match response.json::<Value>().await {
                            Ok(body) => body["order_id"].as_str().unwrap_or_default().to_string(),
                            Err(_) => String::new(),
                        };
                        {
                            let mut tally = lock(&tally);
                            tally.submit_ms.push(elapsed_ms);
                            tally.submitted += 1;
                        }
                        let _ = accepted_txs[index % urls.len()].send(Accepted { id, fail_at });
                    }
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let mut tally = lock(&tally);
                        if status == 503 {
                            tally.shed += 1;
                        }
                        *tally.http_errors.entry(status.to_string()).or_default() += 1;
                    }
                    Err(error) => {
                        let kind = if error.is_connect() {
                            "connect"
                        } else if error.is_timeout() {
                            "timeout"
                        } else {
                            "other"
                        };
                        *lock(&tally)
                            .http_errors
                            .entry(kind.to_string())
                            .or_default() += 1;
                    }
                }
            }
        }));
    }
    drop(accepted_txs);

    let mut waiters = Vec::new();
    for index in 0..args.waiters.max(urls.len()) {
        let (client, tally, finished) = (client.clone(), Arc::clone(&tally), Arc::clone(&finished));
        let accepted_rx = Arc::clone(&accepted_rxs[index % urls.len()]);
        let url = urls[index % urls.len()].clone();
        let (user, batch) = (args.user.clone(), args.batch.clamp(1, 500));
        waiters.push(tokio::spawn(async move {
            let mut waiting: Vec<Accepted> = Vec::new();
            loop {
                if waiting.len() < batch {
                    let mut accepted_rx = accepted_rx.lock().await;
                    if waiting.is_empty() {
                        match accepted_rx.recv().await {
                            Some(order) => waiting.push(order),
                            None => return,
                        }
                    }
                    while waiting.len() < batch {
                        match accepted_rx.try_recv() {
                            Ok(order) => waiting.push(order),
                            Err(_) => break,
                        }
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    // Whatever is still waiting counts as lost.
                    return;
                }
                for (order, view) in wait_batch(&client, &url, &user, &mut waiting, deadline).await
                {
                    finished.fetch_add(1, Ordering::Relaxed);
                    record(&tally, &order, &view);
                }
            }
        }));
    }

    let progress = tokio::spawn(show_progress(
        Arc::clone(&tally),
        Arc::clone(&finished),
        args.orders,
    ));
    for task in submitters {
        let _ = task.await;
    }
    for task in waiters {
        let _ = task.await;
    }
    progress.abort();
    if std::io::stderr().is_terminal() {
        eprintln!();
    }

    let elapsed = started.elapsed().as_secs_f64();
    let bench_cpu = cpu_seconds(std::process::id()).unwrap_or(0.0) - cpu_before;
    let server_cpu = match (server_before, servers_cpu(&args.pid)) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    let tally = std::mem::take(&mut *lock(&tally));
    let terminal = tally.completed + tally.failed + tally.mismatches;
    let lost = tally.submitted.saturating_sub(terminal);
    let cpu_us_per_order =
        server_cpu.map(|server| (server + bench_cpu) * 1e6 / (terminal.max(1) as f64));
    Ok(Summary {
        orders: args.orders,
        submitted: tally.submitted,
        shed: tally.shed,
        completed: tally.completed,
        failed: tally.failed,
        lost,
        mismatches: tally.mismatches,
        first_mismatch: tally.first_mismatch,
        elapsed_s: elapsed,
        orders_per_s: terminal as f64 / elapsed.max(f64::EPSILON),
        submit_latency_ms: Percentiles::of(tally.submit_ms),
        end_to_end_latency_ms: Percentiles::of(tally.end_to_end_ms),
        http_errors: tally.http_errors,
        bench_cpu_s: bench_cpu,
        server_cpu_s: server_cpu,
        cpu_us_per_order,
    })
}

/// One long poll for a batch of orders (`POST /orders/wait`); takes the finished ones out of
/// `waiting` and returns them with their final views.
async fn wait_batch(
    client: &reqwest::Client,
    url: &str,
    user: &str,
    waiting: &mut Vec<Accepted>,
    deadline: tokio::time::Instant,
) -> Vec<(Accepted, Value)> {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let wait = left.min(Duration::from_secs(30)).as_secs().max(1);
    let ids: Vec<&str> = waiting.iter().map(|order| order.id.as_str()).collect();
    let reply = client
        .post(format!("{url}/orders/wait"))
        .header("authorization", user)
        .json(&serde_json::json!({ "order_ids": ids, "wait": format!("{wait}s") }))
        .send()
        .await;
    let body = match reply {
        Ok(response) if response.status().is_success() => response.json::<Value>().await.ok(),
        _ => None,
    };
    let Some(body) = body else {
        tokio::time::sleep(Duration::from_millis(200)).await;
        return Vec::new();
    };
    let mut done = Vec::new();
    for view in body["orders"].as_array().into_iter().flatten() {
        let id = view["order_id"].as_str().unwrap_or_default();
        if let Some(position) = waiting.iter().position(|order| order.id == id) {
            done.push((waiting.swap_remove(position), view.clone()));
        }
    }
    for id in body["missing"].as_array().into_iter().flatten() {
        let id = id.as_str().unwrap_or_default();
        if let Some(position) = waiting.iter().position(|order| order.id == id) {
            let order = waiting.swap_remove(position);
            done.push((order, serde_json::json!({ "missing": id })));
        }
    }
    done
}

fn record(tally: &Mutex<Tally>, order: &Accepted, view: &Value) {
    let verdict = check_history(view, order.fail_at);
    let mut tally = lock(tally);
    if let (Some(start), Some(end)) = (
        time_of(&view["start_time"]),
        time_of(&view["complete_time"]),
    ) {
        tally
            .end_to_end_ms
            .push((end - start).num_microseconds().unwrap_or(0) as f64 / 1000.0);
    }
    match verdict {
        Ok(Step::Completed) => tally.completed += 1,
        Ok(_) => tally.failed += 1,
        Err(problem) => {
            tally.mismatches += 1;
            if tally.first_mismatch.is_none() {
                tally.first_mismatch = Some(format!("order {}: {problem}: {view}", order.id));
            }
        }
    }
}

fn time_of(value: &Value) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    chrono::DateTime::parse_from_rfc3339(value.as_str()?).ok()
}

/// Checks a finished order's history against what it asked for: the five steps in order when
/// it should complete, or, when it should fail at `fail_at`, the steps up to it, a `Failed`
/// entry, and a rollback of exactly those steps, newest first. Returns the final step.
pub fn check_history(view: &Value, fail_at: Option<Step>) -> Result<Step, String> {
    let steps = view["steps"].as_array().ok_or("no steps")?;
    let names: Vec<&str> = steps
        .iter()
        .map(|step| step["step_name"].as_str().unwrap_or(""))
        .collect();
    let times_ordered = |field: &str, entries: &[&Value]| {
        entries
            .windows(2)
            .all(|pair| time_of(&pair[0][field]) <= time_of(&pair[1][field]))
    };
    match fail_at {
        None => {
            let expected = [
                "Scheduling",
                "Pre-Processing",
                "Processing",
                "Post-Processing",
                "Completed",
            ];
            if names != expected {
                return Err(format!("expected the five steps, got {names:?}"));
            }
            if view["current_step"] != "Completed" {
                return Err("not completed".into());
            }
            if steps
                .iter()
                .any(|step| step["step_complete_time"].is_null())
            {
                return Err("a step has no completion time".into());
            }
            let all: Vec<&Value> = steps.iter().collect();
            if !times_ordered("step_start_time", &all) {
                return Err("step start times go backwards".into());
            }
            Ok(Step::Completed)
        }
        Some(failing) => {
            let position = Step::WORK
                .iter()
                .position(|step| *step == failing)
                .ok_or("not a work step")?;
            let mut expected: Vec<&str> =
                Step::WORK[..=position].iter().map(|s| s.as_str()).collect();
            expected.push("Failed");
            if names != expected {
                return Err(format!("expected {expected:?}, got {names:?}"));
            }
            if view["current_step"] != "Failed" || view["failure"]["step"] != failing.as_str() {
                return Err("wrong failure".into());
            }
            let work: Vec<&Value> = steps[..=position].iter().collect();
            if work.iter().any(|step| step["step_rollback_time"].is_null()) {
                return Err("a started step was not rolled back".into());
            }
            if !steps[position]["step_complete_time"].is_null() {
                return Err("the failed step has a completion time".into());
            }
            // Rolled back newest first: rollback times fall as the steps get older.
            let reversed: Vec<&Value> = work.iter().rev().copied().collect();
            if !times_ordered("step_rollback_time", &reversed) {
                return Err("rollback not newest first".into());
            }
            Ok(Step::Failed)
        }
    }
}

async fn show_progress(tally: Arc<Mutex<Tally>>, finished: Arc<AtomicUsize>, orders: usize) {
    let terminal = std::io::stderr().is_terminal();
    let every = if terminal {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(5)
    };
    let started = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let (submitted, shed) = {
            let tally = lock(&tally);
            (tally.submitted, tally.shed)
        };
        let done = finished.load(Ordering::Relaxed);
        if terminal {
            let width = 30;
            let filled = (done * width)
                .checked_div(orders)
                .unwrap_or(width)
                .min(width);
            eprint!(
                "\r[{}{}] {done}/{orders} finished, {submitted} accepted, {shed} shed, {:.0}/s   ",
                "#".repeat(filled),
                " ".repeat(width - filled),
                done as f64 / started.elapsed().as_secs_f64()
            );
        } else {
            eprintln!(
                "bench: {done}/{orders} finished, {submitted} accepted, {shed} shed, {:.1}s",
                started.elapsed().as_secs_f64()
            );
        }
    }
}

fn print_summary(summary: &Summary) {
    println!("orders           {}", summary.orders);
    println!(
        "accepted         {} (shed with 503: {})",
        summary.submitted, summary.shed
    );
    println!("completed        {}", summary.completed);
    println!("failed           {} (as asked)", summary.failed);
    println!("lost             {}", summary.lost);
    println!("wrong history    {}", summary.mismatches);
    if let Some(first) = &summary.first_mismatch {
        println!("  first: {first}");
    }
    println!(
        "throughput       {:.0} orders/s over {:.2}s",
        summary.orders_per_s, summary.elapsed_s
    );
    let submit = &summary.submit_latency_ms;
    println!(
        "submit latency   p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        submit.p50, submit.p90, submit.p99, submit.max
    );
    let end = &summary.end_to_end_latency_ms;
    println!(
        "submit→terminal  p50 {:.2} ms, p99 {:.2} ms",
        end.p50, end.p99
    );
    if !summary.http_errors.is_empty() {
        println!("http errors      {:?}", summary.http_errors);
    }
    println!("bench cpu        {:.2}s", summary.bench_cpu_s);
    if let (Some(server), Some(per_order)) = (summary.server_cpu_s, summary.cpu_us_per_order) {
        println!("server cpu       {server:.2}s; all processes {per_order:.0} µs per order");
    }
}

/// User + system CPU seconds of a process, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    // Linux reports in clock ticks, 100 per second on every common configuration.
    Some((user + system) / 100.0)
}

fn servers_cpu(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|pid| cpu_seconds(*pid)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(values);
        assert_eq!(p.p50, 51.0);
        assert_eq!(p.p99, 99.0);
        assert_eq!(p.max, 100.0);
        assert_eq!(Percentiles::of(Vec::new()).max, 0.0);
    }

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(cpu_seconds(std::process::id()).is_some());
    }

    fn step(name: &str, complete: bool, rollback: Option<&str>) -> Value {
        let mut step =
            serde_json::json!({"step_name": name, "step_start_time": "2026-01-01T00:00:00Z"});
        if complete {
            step["step_complete_time"] = "2026-01-01T00:00:01Z".into();
        }
        if let Some(at) = rollback {
            step["step_rollback_time"] = at.into();
        }
        step
    }

    #[test]
    fn histories_are_checked() {
        let steps: Vec<Value> = [
            "Scheduling",
            "Pre-Processing",
            "Processing",
            "Post-Processing",
            "Completed",
        ]
        .iter()
        .map(|name| step(name, true, None))
        .collect();
        let completed = serde_json::json!({ "current_step": "Completed", "steps": steps });
        assert_eq!(check_history(&completed, None), Ok(Step::Completed));
        assert!(check_history(&completed, Some(Step::Processing)).is_err());
        let failed = serde_json::json!({
            "current_step": "Failed",
            "failure": {"step": "Pre-Processing", "reason": "x"},
            "steps": [
                step("Scheduling", true, Some("2026-01-01T00:00:05Z")),
                step("Pre-Processing", false, Some("2026-01-01T00:00:04Z")),
                step("Failed", true, None),
            ],
        });
        assert_eq!(
            check_history(&failed, Some(Step::PreProcessing)),
            Ok(Step::Failed)
        );
        let mut wrong_order = failed.clone();
        wrong_order["steps"][0]["step_rollback_time"] = "2026-01-01T00:00:03Z".into();
        assert!(check_history(&wrong_order, Some(Step::PreProcessing)).is_err());
        assert!(check_history(&failed, None).is_err());
    }
}
