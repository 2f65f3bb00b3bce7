//! `order-process chaos`: a randomized fault campaign against a live local cluster.
//!
//! It starts a `redis-server` (append-only file on), the [`ledger`] (an in-process HTTP service
//! playing the shop, whose books record every effect and compensation by idempotency key) and
//! three nodes of this very binary whose four steps call the ledger over HTTP. While a steady
//! stream of orders flows in (some refused by the ledger at a chosen step, some slow, some
//! cancelled midway) it makes faults at random from a printed seed: SIGKILL of a node or of the
//! leader, SIGSTOP past the liveness lease, Redis SIGKILL and restart, a gossip partition
//! (iptables), and rolling restarts. Then it heals everything, waits for quiescence and checks
//! every order the API accepted against its history, the ledger and the nodes' logs
//! ([`check`]). The exit code is 0 only when nothing was lost, duplicated or corrupted.
//!
//! Layout: [`procs`] runs processes and makes faults, [`ledger`] is the shop, [`check`] holds the
//! pure checks; this file drives the campaign and prints the summary.

pub mod check;
pub mod ledger;
pub mod procs;

use crate::order::Step;
use crate::store::redis::RedisStore;
use argh::FromArgs;
use check::{End, Intent, Problem};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use procs::{Node, Partitions, Redis};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const SECRET: &str = "chaos-secret";
const USER: &str = "chaos";
const NODES: usize = 3;
/// A node down this long with orders must have seen them taken over within this bound.
const TAKEOVER_BOUND: Duration = Duration::from_secs(15);

#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "chaos")]
/// run a randomized fault campaign against a local 3-node cluster and check every order
pub struct ChaosArgs {
    /// how long to make faults under load, e.g. 60s or 30m (then heal, wait, check)
    #[argh(option, default = "String::from(\"60s\")")]
    pub duration: String,
    /// seed of the fault schedule and of the orders (random when not given; always printed)
    #[argh(option)]
    pub seed: Option<u64>,
    /// orders submitted per second
    #[argh(option, default = "8.0")]
    pub rate: f64,
    /// redis appendfsync: always (the default, what the guarantees rest on) or everysec
    #[argh(option, default = "String::from(\"always\")")]
    pub appendfsync: String,
    /// directory for the nodes' data and logs (default: a new one under the temp dir)
    #[argh(option)]
    pub workdir: Option<PathBuf>,
    /// keep the work directory even when the campaign passes
    #[argh(switch)]
    pub keep: bool,
    /// the order-process binary to run as nodes (default: this one)
    #[argh(option)]
    pub bin: Option<PathBuf>,
    /// leave out the gossip partition (iptables) fault
    #[argh(switch)]
    pub no_partition: bool,
}

/// Runs the campaign; exit code 0 only when no violation was found.
pub fn main(args: ChaosArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("order-process chaos: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let terminate = async {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut stream) => {
                    stream.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            code = run(args) => code,
            // Dropping the campaign kills every process it started and removes its rules.
            _ = tokio::signal::ctrl_c() => {
                eprintln!("chaos: interrupted, stopping everything");
                ExitCode::FAILURE
            }
            _ = terminate => {
                eprintln!("chaos: terminated, stopping everything");
                ExitCode::FAILURE
            }
        }
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    KillNode,
    KillLeader,
    PauseNode,
    KillRedis,
    Partition,
    RollingRestart,
    /// SIGTERM, then SIGKILL while the node drains (hands over its orders).
    KillDraining,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::KillNode,
        Kind::KillLeader,
        Kind::PauseNode,
        Kind::KillRedis,
        Kind::Partition,
        Kind::RollingRestart,
        Kind::KillDraining,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::KillNode => "kill_node",
            Kind::KillLeader => "kill_leader",
            Kind::PauseNode => "pause_node",
            Kind::KillRedis => "kill_redis",
            Kind::Partition => "partition",
            Kind::RollingRestart => "rolling_restart",
            Kind::KillDraining => "kill_draining",
        }
    }
}

/// One fault made.
#[derive(Debug)]
struct Fault {
    kind: Kind,
    node: Option<usize>,
    service_id: Option<String>,
    at: DateTime<Utc>,
    healed: Option<DateTime<Utc>>,
    /// Unfinished orders the victim owned when the fault began (None: Redis did not say).
    owned: Option<usize>,
}

enum Recovery {
    Restart(usize),
    Resume(usize),
    RestartRedis,
    Heal(usize),
}

/// An order the campaign generated (accepted or not).
struct Generated {
    n: u64,
    intent: Intent,
    /// The order id, once the API accepted it (201, or 200 for a retried key).
    id: Option<String>,
    status: u16,
}

/// What the client side saw, shared by the submitting, cancelling and polling tasks.
#[derive(Default)]
struct Seen {
    generated: BTreeMap<u64, Generated>,
    by_id: HashMap<String, u64>,
    /// Last snapshot of each unfinished order, for the progress check.
    last: HashMap<String, Value>,
    finished: HashSet<String>,
    /// Answers to order submissions by kind (`201`, `503`, `timeout`, …).
    submissions: BTreeMap<String, usize>,
    cancels: BTreeMap<String, usize>,
    regressions: Vec<(String, Problem)>,
}

fn lock(seen: &Mutex<Seen>) -> MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A violation found, with the order (if any) it is about.
struct Violation {
    kind: String,
    order_id: Option<String>,
    detail: String,
}

struct World {
    redis: Redis,
    nodes: Vec<Node>,
    partitions: Partitions,
    store: Option<RedisStore>,
}

impl World {
    fn healthy(&mut self) -> Vec<usize> {
        let mut healthy = Vec::new();
        for index in 0..self.nodes.len() {
            let port = self.nodes[index].port;
            let node = &mut self.nodes[index];
            if node.is_running() && !node.paused && !self.partitions.is_cut(port) {
                healthy.push(index);
            }
        }
        healthy
    }

    /// How many unfinished orders a node owns, read from the orders themselves (its owner index
    /// may also hold a few finished ones, which nobody needs to take over).
    async fn owned(&self, service_id: &Option<String>) -> Option<usize> {
        use crate::store::OrderStore;
        let (store, node) = (self.store.as_ref()?, service_id.as_ref()?);
        let mut owned = 0;
        for id in store.owned_unfinished(node).await.ok()? {
            let order = store.get(id).await.ok()?;
            if order.is_some_and(|order| order.owner == *node && !order.is_finished()) {
                owned += 1;
            }
        }
        Some(owned)
    }
}

fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|error| error.to_string())
}

fn node_config(index: usize, redis_url: &str, ledger: &str) -> String {
    let mut config = format!(
        "[server]\nshutdown_grace = \"20s\"\n\
         [log]\nlevel = \"info,order_process::pipeline=debug\"\nformat = \"json\"\n\
         [database]\nurl = \"{redis_url}\"\ntimeout = \"1s\"\n\
         [cluster]\nsecret = \"{SECRET}\"\n"
    );
    for step in Step::WORK {
        config.push_str(&format!(
            "[steps.{step}]\nhandler = \"http\"\nurl = \"{ledger}/n{index}/run/{step}\"\n\
             rollback_url = \"{ledger}/n{index}/undo/{step}\"\ntimeout = \"5s\"\nretries = 8\n\
             backoff = \"100ms\"\nbackoff_max = \"1s\"\n"
        ));
    }
    config
}

async fn get_json(client: &reqwest::Client, url: &str) -> Option<Value> {
    let response = client
        .get(url)
        .header("authorization", USER)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// Waits until the node answers its heartbeat with 200.
async fn wait_ready(client: &reqwest::Client, base: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if get_json(client, &format!("{base}/diagnostic/heartbeat"))
            .await
            .is_some()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Waits until every listed node sees all of them live and names a leader.
async fn wait_formed(client: &reqwest::Client, bases: &[String], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let mut formed = true;
        for base in bases {
            let view = get_json(client, &format!("{base}/diagnostic/cluster")).await;
            let live = view
                .as_ref()
                .and_then(|view| view["nodes"].as_array())
                .map(|nodes| nodes.iter().filter(|n| n["connected"] == true).count())
                .unwrap_or(0);
            let leader = view.is_some_and(|view| !view["leader_name"].is_null());
            if live != bases.len() || !leader {
                formed = false;
                break;
            }
        }
        if formed {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// The intent and payload of order number `n`, drawn from its own seeded generator.
fn generate(seed: u64, n: u64) -> (Intent, Value, Option<Duration>) {
    let mut rng = StdRng::seed_from_u64(seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let fail_at = rng
        .random_bool(0.15)
        .then(|| Step::WORK[rng.random_range(0..Step::WORK.len())]);
    let slow = rng.random_bool(0.4).then(|| {
        (
            Step::WORK[rng.random_range(0..Step::WORK.len())],
            rng.random_range(500..3000u64),
        )
    });
    let cancel_after = rng
        .random_bool(0.12)
        .then(|| Duration::from_millis(rng.random_range(50..2500)));
    let payload = serde_json::json!({
        "chaos": {
            "n": n,
            "fail_at": fail_at.map(Step::as_str),
            "slow": slow.map(|(step, ms)| serde_json::json!({"step": step.as_str(), "ms": ms})),
        }
    });
    let intent = Intent {
        fail_at,
        ..Intent::default()
    };
    (intent, payload, cancel_after)
}

/// Submits order `n` (retrying on other nodes with the same idempotency key), then cancels it
/// later if its intent says so.
async fn submit_one(
    seed: u64,
    n: u64,
    client: reqwest::Client,
    bases: Arc<Vec<String>>,
    seen: Arc<Mutex<Seen>>,
) {
    let (intent, payload, cancel_after) = generate(seed, n);
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
    for attempt in 0..8 {
        let base = &bases[(first + attempt) % bases.len()];
        let reply = client
            .post(format!("{base}/orders"))
            .header("authorization", USER)
            .header("idempotency-key", &key)
            .json(&payload)
            .timeout(Duration::from_secs(3))
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
            Err(error) if error.is_timeout() => "timeout".to_string(),
            Err(error) if error.is_connect() => "connect".to_string(),
            Err(_) => "transport".to_string(),
        };
        *lock(&seen).submissions.entry(outcome).or_default() += 1;
        if accepted.is_some() {
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
    let Some(after) = cancel_after else { return };
    tokio::time::sleep(after).await;
    if let Some(order) = lock(&seen).generated.get_mut(&n) {
        order.intent.cancel_sent = true;
    }
    for attempt in 0..4 {
        let base = &bases[(first + attempt + 1) % bases.len()];
        let reply = client
            .post(format!("{base}/orders/{id}/cancel"))
            .header("authorization", USER)
            .timeout(Duration::from_secs(3))
            .send()
            .await;
        let status = reply.map(|response| response.status().as_u16()).ok();
        *lock(&seen)
            .cancels
            .entry(status.map_or("no answer".into(), |status| status.to_string()))
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

/// Submits orders at `rate` per second until told to stop; returns the tasks still running.
async fn load(
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
async fn poll(
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
                    if let Err(problem) = check::check_progress(before, &view) {
                        seen.regressions.push((id.clone(), problem));
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

fn elapsed(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}

/// The leader's node index, asked of a healthy node.
async fn leader(client: &reqwest::Client, world: &mut World) -> Option<usize> {
    for index in world.healthy() {
        let base = world.nodes[index].base();
        if let Some(view) = get_json(client, &format!("{base}/diagnostic/cluster")).await {
            let name = view["leader_name"].as_str()?.to_string();
            return world
                .nodes
                .iter()
                .position(|node| node.service_id().as_deref() == Some(name.as_str()));
        }
    }
    None
}

/// Drains every node in turn (SIGTERM, exit 0 expected), restarting each before the next.
/// Returns the nodes whose drain did not exit cleanly.
async fn rolling_restart(
    client: &reqwest::Client,
    world: &mut World,
    bases: &[String],
    drains: &mut (usize, usize),
) -> Vec<String> {
    let mut unclean = Vec::new();
    for index in 0..world.nodes.len() {
        let node = &mut world.nodes[index];
        if !node.signal("TERM") {
            continue;
        }
        let status = node.wait_exit(Duration::from_secs(60)).await;
        drains.1 += 1;
        match status {
            Some(status) if status.success() => drains.0 += 1,
            other => {
                unclean.push(format!("n{index}: {other:?}"));
                node.kill();
            }
        }
        if let Err(error) = node.launch() {
            unclean.push(format!("n{index}: cannot start again: {error}"));
        }
        let base = node.base();
        wait_ready(client, &base, Duration::from_secs(30)).await;
        wait_formed(client, bases, Duration::from_secs(30)).await;
    }
    unclean
}

/// The campaign.
async fn run(args: ChaosArgs) -> ExitCode {
    let seed = args.seed.unwrap_or_else(rand::random);
    println!("chaos: seed {seed} (replay with --seed {seed})");
    let duration = match humantime::parse_duration(&args.duration) {
        Ok(duration) => duration,
        Err(error) => {
            eprintln!("order-process chaos: --duration: {error}");
            return ExitCode::from(64);
        }
    };
    if !args.rate.is_finite()
        || args.rate <= 0.0
        || !["always", "everysec", "no"].contains(&args.appendfsync.as_str())
    {
        eprintln!(
            "order-process chaos: --rate must be > 0 and --appendfsync always, everysec or no"
        );
        return ExitCode::from(64);
    }
    let bin = match args
        .bin
        .clone()
        .map(Ok)
        .unwrap_or_else(std::env::current_exe)
    {
        Ok(bin) => bin,
        Err(error) => {
            eprintln!("order-process chaos: cannot find the binary: {error}");
            return ExitCode::FAILURE;
        }
    };
    let workdir = args.workdir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("order-process-chaos-{seed}-{}", std::process::id()))
    });
    let outcome = campaign(&args, seed, duration, &bin, &workdir).await;
    match outcome {
        Ok(true) => {
            if args.keep {
                println!("chaos: logs and data kept in {}", workdir.display());
            } else {
                let _ = std::fs::remove_dir_all(&workdir);
            }
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!(
                "chaos: FAILED (seed {seed}); logs and data in {}",
                workdir.display()
            );
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!(
                "order-process chaos: {error} (seed {seed}; logs in {})",
                workdir.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// Runs the campaign; Ok(true) when it found nothing wrong.
async fn campaign(
    args: &ChaosArgs,
    seed: u64,
    duration: Duration,
    bin: &Path,
    workdir: &Path,
) -> Result<bool, String> {
    std::fs::create_dir_all(workdir)
        .map_err(|error| format!("cannot create {}: {error}", workdir.display()))?;
    let partition = !args.no_partition && Partitions::available();
    if !args.no_partition && !partition {
        println!(
            "chaos: notice: iptables is not usable here, the gossip partition fault is skipped"
        );
    }
    let client = http_client()?;
    let ledger = ledger::Ledger::start(seed)
        .await
        .map_err(|error| format!("cannot start the ledger: {error}"))?;
    let redis = Redis::start(workdir.join("redis"), &args.appendfsync)
        .await
        .map_err(|error| format!("cannot start redis-server: {error}"))?;
    let store = RedisStore::connect(&redis.url(), 1, Duration::from_secs(1)).ok();
    let mut nodes = Vec::new();
    for index in 0..NODES {
        let config = node_config(index, &redis.url(), &ledger.base);
        let node = Node::new(bin, workdir.join(format!("node-{index}")), index, &config)
            .map_err(|error| format!("cannot prepare node {index}: {error}"))?;
        nodes.push(node);
    }
    let ports: Vec<u16> = nodes.iter().map(|node| node.port).collect();
    let mut world = World {
        redis,
        nodes,
        partitions: Partitions::default(),
        store,
    };
    let bases: Arc<Vec<String>> = Arc::new(world.nodes.iter().map(Node::base).collect());
    for index in 0..NODES {
        // The first node starts alone; the others join it; restarts may join through anyone.
        let node = &mut world.nodes[index];
        node.set_join(ports[..index].to_vec());
        node.launch()
            .map_err(|error| format!("cannot start node {index}: {error}"))?;
        if !wait_ready(&client, &node.base(), Duration::from_secs(30)).await {
            return Err(format!("node {index} did not become ready"));
        }
        let others: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|port| *port != ports[index])
            .collect();
        node.set_join(others);
    }
    if !wait_formed(&client, &bases, Duration::from_secs(60)).await {
        return Err("the cluster did not form".into());
    }
    println!(
        "chaos: redis on {} (appendfsync {}), ledger on {}, nodes on ports {:?}, work dir {}",
        world.redis.port,
        args.appendfsync,
        ledger.base,
        ports,
        workdir.display()
    );
    // Let the failure detectors gather a few heartbeats, as in a cluster that has been up.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let seen: Arc<Mutex<Seen>> = Arc::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let loader = tokio::spawn(load(
        seed,
        args.rate,
        client.clone(),
        Arc::clone(&bases),
        Arc::clone(&seen),
        stop_rx.clone(),
    ));
    let (poll_stop_tx, poll_stop_rx) = watch::channel(false);
    let poller = tokio::spawn(poll(
        client.clone(),
        Arc::clone(&bases),
        Arc::clone(&seen),
        poll_stop_rx,
    ));

    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults: Vec<Fault> = Vec::new();
    let mut violations: Vec<Violation> = Vec::new();
    let mut pending: Vec<(Instant, Recovery, usize)> = Vec::new();
    let mut bag: Vec<Kind> = Vec::new();
    let mut drains = (0usize, 0usize);
    let mut next_fault = Instant::now() + Duration::from_millis(rng.random_range(1000..3000));
    while started.elapsed() < duration {
        let wake = pending
            .iter()
            .map(|(at, _, _)| *at)
            .chain(std::iter::once(next_fault))
            .min()
            .unwrap_or(next_fault);
        tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await;
        // Recoveries that are due.
        let now = Instant::now();
        let mut index = 0;
        while index < pending.len() {
            if pending[index].0 <= now {
                let (_, recovery, fault) = pending.remove(index);
                recover(&mut world, recovery, &mut violations).await;
                if let Some(fault) = faults.get_mut(fault) {
                    fault.healed = Some(Utc::now());
                }
            } else {
                index += 1;
            }
        }
        if Instant::now() < next_fault {
            continue;
        }
        next_fault = Instant::now() + Duration::from_millis(rng.random_range(2000..6000));
        if bag.is_empty() {
            bag = Kind::ALL
                .iter()
                .copied()
                .filter(|kind| partition || *kind != Kind::Partition)
                .collect();
            bag.shuffle(&mut rng);
        }
        let healthy = world.healthy();
        let quiet = pending.is_empty() && healthy.len() == NODES && world.redis.is_running();
        let Some(position) = bag.iter().position(|kind| match kind {
            Kind::KillRedis => world.redis.is_running(),
            Kind::RollingRestart => quiet,
            _ => healthy.len() >= 2,
        }) else {
            continue;
        };
        let kind = bag.remove(position);
        let victim = match kind {
            Kind::KillLeader => match leader(&client, &mut world).await {
                Some(index) if healthy.contains(&index) => Some(index),
                _ => {
                    bag.push(kind);
                    continue;
                }
            },
            Kind::KillNode | Kind::PauseNode | Kind::Partition | Kind::KillDraining => {
                Some(healthy[rng.random_range(0..healthy.len())])
            }
            Kind::KillRedis | Kind::RollingRestart => None,
        };
        let service_id = victim.and_then(|index| world.nodes[index].service_id());
        let owned = world.owned(&service_id).await;
        let fault_index = faults.len();
        faults.push(Fault {
            kind,
            node: victim,
            service_id,
            at: Utc::now(),
            healed: None,
            owned,
        });
        let label = victim.map(|index| format!(" n{index}")).unwrap_or_default();
        let owns = owned
            .map(|owned| format!(" (owns {owned})"))
            .unwrap_or_default();
        println!(
            "chaos: {:7.1}s {}{label}{owns}",
            elapsed(started),
            kind.name()
        );
        let later = |rng: &mut StdRng, low: u64, high: u64| {
            Instant::now() + Duration::from_millis(rng.random_range(low..high))
        };
        match (kind, victim) {
            (Kind::KillNode | Kind::KillLeader, Some(index)) => {
                world.nodes[index].kill();
                let at = later(&mut rng, 1000, 20000);
                pending.push((at, Recovery::Restart(index), fault_index));
            }
            (Kind::KillDraining, Some(index)) => {
                let node = &mut world.nodes[index];
                node.signal("TERM");
                let wait = Duration::from_millis(rng.random_range(50..2500));
                if node.wait_exit(wait).await.is_none() {
                    node.kill();
                }
                let at = later(&mut rng, 1000, 10000);
                pending.push((at, Recovery::Restart(index), fault_index));
            }
            (Kind::PauseNode, Some(index)) => {
                world.nodes[index].signal("STOP");
                // Mostly past the liveness lease (3 s), sometimes shorter.
                let at = later(&mut rng, 1500, 12000);
                pending.push((at, Recovery::Resume(index), fault_index));
            }
            (Kind::Partition, Some(index)) => {
                let port = world.nodes[index].port;
                if !world.partitions.cut(port) {
                    println!("chaos: notice: iptables refused the rule for port {port}");
                }
                let at = later(&mut rng, 4000, 10000);
                pending.push((at, Recovery::Heal(index), fault_index));
            }
            (Kind::KillRedis, _) => {
                world.redis.kill();
                let at = later(&mut rng, 300, 5000);
                pending.push((at, Recovery::RestartRedis, fault_index));
            }
            (Kind::RollingRestart, _) => {
                for unclean in rolling_restart(&client, &mut world, &bases, &mut drains).await {
                    violations.push(Violation {
                        kind: "drain_exit".into(),
                        order_id: None,
                        detail: unclean,
                    });
                }
                if let Some(fault) = faults.get_mut(fault_index) {
                    fault.healed = Some(Utc::now());
                }
            }
            _ => {}
        }
    }

    // Heal everything and let the cluster finish its work.
    println!(
        "chaos: {:7.1}s healing, waiting for quiescence",
        elapsed(started)
    );
    let _ = stop_tx.send(true);
    let mut submitters = loader.await.unwrap_or_default();
    pending.sort_by_key(|(at, _, _)| *at);
    for (_, recovery, fault) in pending.drain(..) {
        recover(&mut world, recovery, &mut violations).await;
        if let Some(fault) = faults.get_mut(fault) {
            fault.healed = Some(Utc::now());
        }
    }
    while submitters.join_next().await.is_some() {}
    let formed = wait_formed(&client, &bases, Duration::from_secs(60)).await;
    if !formed {
        violations.push(Violation {
            kind: "cluster_not_reformed".into(),
            order_id: None,
            detail: "not all 3 nodes live with a leader 60 s after healing".into(),
        });
    }
    let quiet_deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let unfinished = {
            let seen = lock(&seen);
            seen.by_id.len() - seen.finished.len()
        };
        if unfinished == 0 || Instant::now() >= quiet_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = poll_stop_tx.send(true);
    let _ = poller.await;
    let quiescent_after = elapsed(started);

    // Every order the cluster stored, through the listing (also those stored without the client
    // hearing so: they must finish too, so list again until all are finished or time is up).
    let list_deadline = Instant::now() + Duration::from_secs(60);
    let stored = loop {
        let stored = list_all(&client, &bases[0]).await?;
        let unfinished = stored
            .values()
            .filter(|order| order["complete_time"].is_null())
            .count();
        if unfinished == 0 || Instant::now() >= list_deadline {
            break stored;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    // Stop the nodes the way an operator would: each must drain and exit 0.
    for (index, node) in world.nodes.iter_mut().enumerate() {
        if node.signal("TERM") {
            drains.1 += 1;
            match node.wait_exit(Duration::from_secs(60)).await {
                Some(status) if status.success() => drains.0 += 1,
                other => violations.push(Violation {
                    kind: "drain_exit".into(),
                    order_id: None,
                    detail: format!("n{index} at the end: {other:?}"),
                }),
            }
        }
    }

    let logs = read_logs(&world.nodes);
    let books = ledger.books();
    let seen = lock(&seen);
    let report = Report::build(&seen, &stored, &books, &logs, &faults, &mut violations);
    report.print(
        seed,
        duration,
        &args.appendfsync,
        &faults,
        &seen,
        &books,
        &logs,
        drains,
        quiescent_after,
        &violations,
    );
    if let Some(first) = violations.first() {
        print_first(first, &stored, &books);
    }
    Ok(violations.is_empty())
}

/// Every order of the campaign's user, by id, read through the listing.
async fn list_all(client: &reqwest::Client, base: &str) -> Result<HashMap<String, Value>, String> {
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

async fn recover(world: &mut World, recovery: Recovery, violations: &mut Vec<Violation>) {
    match recovery {
        Recovery::Restart(index) => {
            let node = &mut world.nodes[index];
            if !node.is_running() {
                if let Err(error) = node.launch() {
                    violations.push(Violation {
                        kind: "restart_failed".into(),
                        order_id: None,
                        detail: format!("n{index}: {error}"),
                    });
                }
            }
        }
        Recovery::Resume(index) => {
            world.nodes[index].signal("CONT");
        }
        Recovery::RestartRedis => {
            if let Err(error) = world.redis.restart().await {
                violations.push(Violation {
                    kind: "restart_failed".into(),
                    order_id: None,
                    detail: format!("redis: {error}"),
                });
            }
        }
        Recovery::Heal(index) => {
            let port = world.nodes[index].port;
            world.partitions.heal(port);
        }
    }
}

/// A structured log line of a node.
struct LogLine {
    node: usize,
    at: DateTime<Utc>,
    message: String,
    fields: Value,
}

#[derive(Default)]
struct Logs {
    lines: Vec<LogLine>,
    panics: Vec<String>,
}

fn read_logs(nodes: &[Node]) -> Logs {
    let mut logs = Logs::default();
    for node in nodes {
        let Ok(text) = std::fs::read_to_string(node.log_path()) else {
            continue;
        };
        for line in text.lines() {
            if line.contains("panicked") {
                logs.panics.push(format!("n{}: {line}", node.index));
            }
            let Ok(entry) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let Some(at) = entry["timestamp"]
                .as_str()
                .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
            else {
                continue;
            };
            let fields = entry["fields"].clone();
            let message = fields["message"].as_str().unwrap_or("").to_string();
            logs.lines.push(LogLine {
                node: node.index,
                at: at.with_timezone(&Utc),
                message,
                fields,
            });
        }
    }
    logs.lines.sort_by_key(|line| line.at);
    logs
}

impl Logs {
    fn count(&self, message: &str) -> usize {
        self.lines
            .iter()
            .filter(|line| line.message == message)
            .count()
    }
}

fn quantile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// The numbers of the summary.
#[derive(Default)]
struct Report {
    accepted: usize,
    accepted_on_retry: usize,
    unanswered: usize,
    completed: usize,
    declined: usize,
    cancelled: usize,
    lost: usize,
    takeovers: Vec<f64>,
    takeover_by_kind: BTreeMap<&'static str, Vec<f64>>,
    /// Orders moved away from a node while only its gossip was cut (its lease held).
    moved_in_partitions: u64,
}

impl Report {
    fn build(
        seen: &Seen,
        stored: &HashMap<String, Value>,
        books: &ledger::Books,
        logs: &Logs,
        faults: &[Fault],
        violations: &mut Vec<Violation>,
    ) -> Report {
        let mut report = Report::default();
        let mut push = |kind: &str, order_id: Option<&str>, detail: String| {
            violations.push(Violation {
                kind: kind.to_string(),
                order_id: order_id.map(str::to_string),
                detail,
            })
        };
        for (id, problem) in &seen.regressions {
            push(problem.kind, Some(id), problem.detail.clone());
        }
        // Orders stored for each generated number: more than one means a key was not honoured.
        let mut by_number: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
        for (id, view) in stored {
            if let Some(n) = view["payload"]["chaos"]["n"].as_u64() {
                by_number.entry(n).or_default().push(id);
            }
        }
        for (n, ids) in &by_number {
            if ids.len() > 1 {
                push(
                    "duplicate_order",
                    ids.first().copied(),
                    format!("order number {n} stored {} times: {ids:?}", ids.len()),
                );
            }
        }
        for generated in seen.generated.values() {
            let id = match &generated.id {
                Some(id) => {
                    report.accepted += 1;
                    if generated.status == 200 {
                        report.accepted_on_retry += 1;
                    }
                    id.clone()
                }
                None => match by_number.get(&generated.n).and_then(|ids| ids.first()) {
                    // Stored, though the client never heard so: it must finish all the same.
                    Some(id) => {
                        report.unanswered += 1;
                        id.to_string()
                    }
                    None => continue,
                },
            };
            let Some(view) = stored.get(&id) else {
                report.lost += 1;
                push("lost", Some(&id), "accepted, not in the store".into());
                continue;
            };
            match check::check_history(view, &generated.intent) {
                Ok(end) => {
                    match end {
                        End::Completed => report.completed += 1,
                        End::Declined(_) => report.declined += 1,
                        End::Cancelled(_) => report.cancelled += 1,
                    }
                    if let Err(problem) = check::check_effects(&id, view, end, books) {
                        push(problem.kind, Some(&id), problem.detail);
                    }
                }
                Err(problem) => {
                    if problem.kind == "lost" {
                        report.lost += 1;
                    }
                    push(problem.kind, Some(&id), problem.detail);
                }
            }
        }
        for call in &books.calls {
            if !seen.by_id.contains_key(&call.order_id) && !stored.contains_key(&call.order_id) {
                push(
                    "unknown_order_effect",
                    Some(&call.order_id),
                    format!(
                        "the ledger was called for an order nobody stored ({})",
                        call.key
                    ),
                );
            }
        }
        for line in &logs.panics {
            push("node_panic", None, line.clone());
        }
        for line in &logs.lines {
            if line.message == "illegal transition, dropping order" {
                push(
                    "illegal_transition",
                    line.fields["order_id"].as_str(),
                    format!("n{}: {}", line.node, line.fields),
                );
            }
        }
        // Takeover latency: from the fault to the victim's orders resuming, on another node
        // ("took over orders") or on the victim itself after its restart.
        for fault in faults {
            if fault.kind == Kind::Partition {
                // The partitioned node keeps its liveness lease: its orders should stay put.
                if let (Some(service_id), Some(healed)) =
                    (fault.service_id.as_deref(), fault.healed)
                {
                    report.moved_in_partitions += logs
                        .lines
                        .iter()
                        .filter(|line| {
                            line.at >= fault.at
                                && line.at <= healed
                                && line.message == "took over orders"
                                && line.fields["from"].as_str() == Some(service_id)
                        })
                        .map(|line| line.fields["orders"].as_u64().unwrap_or(0))
                        .sum::<u64>();
                }
                continue;
            }
            if !matches!(
                fault.kind,
                Kind::KillNode | Kind::KillLeader | Kind::PauseNode | Kind::KillDraining
            ) {
                continue;
            }
            let (Some(victim), Some(service_id)) = (fault.node, fault.service_id.as_deref()) else {
                continue;
            };
            if fault.owned == Some(0) {
                continue;
            }
            // Only what happened while the fault lasted (and just after): later transfers of the
            // same node belong to later faults or to drains.
            let window_end = fault
                .healed
                .map(|healed| healed + chrono::Duration::seconds(5))
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            let resumed = logs.lines.iter().find(|line| {
                line.at >= fault.at
                    && line.at <= window_end
                    && ((line.message == "took over orders"
                        && line.fields["from"].as_str() == Some(service_id)
                        && line.fields["orders"].as_u64().unwrap_or(0) > 0)
                        || (line.message == "resuming unfinished orders"
                            && line.node == victim
                            && fault.kind != Kind::PauseNode))
            });
            let down = fault
                .healed
                .map(|healed| (healed - fault.at).to_std().unwrap_or_default())
                .unwrap_or(Duration::MAX);
            match resumed {
                Some(line) => {
                    let latency = (line.at - fault.at).to_std().unwrap_or_default();
                    report.takeovers.push(latency.as_secs_f64());
                    report
                        .takeover_by_kind
                        .entry(fault.kind.name())
                        .or_default()
                        .push(latency.as_secs_f64());
                    if down > TAKEOVER_BOUND && latency > TAKEOVER_BOUND {
                        push(
                            "slow_takeover",
                            None,
                            format!(
                                "{} of n{victim} at {}: orders resumed only after {:.1}s",
                                fault.kind.name(),
                                fault.at,
                                latency.as_secs_f64()
                            ),
                        );
                    }
                }
                None if down > TAKEOVER_BOUND && fault.owned.is_some_and(|owned| owned > 0) => {
                    push(
                        "no_takeover",
                        None,
                        format!(
                            "{} of n{victim} at {} owning {:?} orders, down {:.1}s: never taken over",
                            fault.kind.name(),
                            fault.at,
                            fault.owned,
                            down.as_secs_f64()
                        ),
                    );
                }
                None => {}
            }
        }
        report.takeovers.sort_by(f64::total_cmp);
        for values in report.takeover_by_kind.values_mut() {
            values.sort_by(f64::total_cmp);
        }
        report
    }

    #[allow(clippy::too_many_arguments)]
    fn print(
        &self,
        seed: u64,
        duration: Duration,
        appendfsync: &str,
        faults: &[Fault],
        seen: &Seen,
        books: &ledger::Books,
        logs: &Logs,
        drains: (usize, usize),
        quiescent_after: f64,
        violations: &[Violation],
    ) {
        let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
        for fault in faults {
            *by_kind.entry(fault.kind.name()).or_default() += 1;
        }
        let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
        for call in &books.calls {
            let name = serde_json::to_value(call.outcome)
                .ok()
                .and_then(|value| value.as_str().map(str::to_string))
                .unwrap_or_default();
            *outcomes.entry(name).or_default() += 1;
        }
        let mut problems: BTreeMap<&str, usize> = BTreeMap::new();
        for violation in violations {
            *problems.entry(violation.kind.as_str()).or_default() += 1;
        }
        let list = |map: &BTreeMap<String, usize>| {
            map.iter()
                .map(|(key, count)| format!("{key} {count}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let list_str = |map: &BTreeMap<&str, usize>| {
            map.iter()
                .map(|(key, count)| format!("{key} {count}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("==== chaos summary ====");
        println!(
            "seed {seed}; {} of faults under load, 3 nodes, redis appendfsync {appendfsync}; quiescent {:.0}s after start",
            humantime::format_duration(duration),
            quiescent_after
        );
        println!("faults        {}: {}", faults.len(), list_str(&by_kind));
        println!(
            "orders        accepted {} ({} of them on a retried key), stored without an answer {}, completed {}, failed {} (refused by the ledger {}, cancelled {}), lost {}",
            self.accepted,
            self.accepted_on_retry,
            self.unanswered,
            self.completed,
            self.declined + self.cancelled,
            self.declined,
            self.cancelled,
            self.lost
        );
        println!("submissions   {}", list(&seen.submissions));
        println!("cancels       {}", list(&seen.cancels));
        println!("ledger calls  {}: {}", books.calls.len(), list(&outcomes));
        println!(
            "fencing       stale commits refused {}, stale orders dropped before a step {}, stale runs refused by the ledger {}, accepted stale writes {} (snapshots that went backwards)",
            logs.count("order is no longer ours, dropping it"),
            logs.count("order was taken over while the liveness lease lapsed, dropping it"),
            outcomes.get("late_run_refused").copied().unwrap_or(0),
            seen.regressions.len()
        );
        let takeover = |values: &[f64]| {
            format!(
                "{} samples, p50 {:.2}s, max {:.2}s",
                values.len(),
                quantile(values, 0.5),
                quantile(values, 1.0)
            )
        };
        println!("takeover      {}", takeover(&self.takeovers));
        for (kind, values) in &self.takeover_by_kind {
            println!("  {kind:<14}{}", takeover(values));
        }
        println!(
            "partitions    orders moved away from a partitioned node: {} (its lease holds, so 0 is expected)",
            self.moved_in_partitions
        );
        println!("drains        {} of {} exited 0", drains.0, drains.1);
        if violations.is_empty() {
            println!("violations    0");
        } else {
            println!(
                "violations    {}: {}",
                violations.len(),
                list_str(&problems)
            );
        }
    }
}

fn print_first(first: &Violation, stored: &HashMap<String, Value>, books: &ledger::Books) {
    println!(
        "first violation: {} {}: {}",
        first.kind,
        first.order_id.as_deref().unwrap_or("(no order)"),
        first.detail
    );
    if let Some(id) = &first.order_id {
        if let Some(view) = stored.get(id) {
            println!(
                "history:\n{}",
                serde_json::to_string_pretty(view).unwrap_or_default()
            );
        }
        println!("ledger calls:");
        for call in books.calls_for(id) {
            println!(
                "  #{} {} n{} {} {} attempt {} -> {} {:?}",
                call.seq,
                call.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                call.node,
                if call.rollback { "undo" } else { "run " },
                call.step,
                call.attempt,
                call.status,
                call.outcome
            );
        }
    }
}
