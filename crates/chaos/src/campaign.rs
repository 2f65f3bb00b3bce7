//! The campaign from start to verdict: bring up Redis, the ledger and the cluster; make faults
//! under load for the asked duration; heal everything and wait for quiescence; drain the nodes;
//! then check every order and print the summary.

use crate::args::ChaosArgs;
use crate::clock;
use crate::duplicate::{self, Fate};
use crate::faults::{recover, rolling_restart, Fault, Kind, Recovery};
use crate::ledger::Ledger;
use crate::load::{load, lock, poll, Seen};
use crate::logs::read_logs;
use crate::partitions::Partitions;
use crate::report::{print_first, Report, Violation, TAKEOVER_BOUND};
use crate::settle::{settle, STUCK_BOUND};
use crate::world::{
    http_client, node_config, wait_formed, wait_ready, Node, World, NODES, RECONCILE_INTERVAL,
};
use chrono::Utc;
use order_process_testkit::RedisServer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Exit code for a bad flag (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Runs the campaign; exit code 0 only when no violation was found.
pub async fn run(args: ChaosArgs) -> ExitCode {
    let seed = args.seed.unwrap_or_else(rand::random);
    println!("chaos: seed {seed} (replay with --seed {seed})");
    let duration = match humantime::parse_duration(&args.duration) {
        Ok(duration) => duration,
        Err(error) => {
            eprintln!("order-process-chaos: --duration: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if !args.rate.is_finite()
        || args.rate <= 0.0
        || !["always", "everysec", "no"].contains(&args.appendfsync.as_str())
    {
        eprintln!(
            "order-process-chaos: --rate must be > 0 and --appendfsync always, everysec or no"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let bin = match node_binary(&args) {
        Ok(bin) => bin,
        Err(error) => {
            eprintln!("order-process-chaos: cannot find the order-process binary: {error}");
            return ExitCode::FAILURE;
        }
    };
    let workdir = args.workdir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("order-process-chaos-{seed}-{}", std::process::id()))
    });
    match campaign(&args, seed, duration, &bin, &workdir).await {
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
                "order-process-chaos: {error} (seed {seed}; logs in {})",
                workdir.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// `--bin`, or the `order-process` binary next to this one (cargo builds both into one dir).
fn node_binary(args: &ChaosArgs) -> std::io::Result<PathBuf> {
    if let Some(bin) = &args.bin {
        return Ok(bin.clone());
    }
    let bin = std::env::current_exe()?.with_file_name("order-process");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(std::io::Error::other(format!(
            "{} is missing; build it (cargo build --bin order-process) or pass --bin",
            bin.display()
        )))
    }
}

fn elapsed(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
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
    let ledger = Ledger::start(seed)
        .await
        .map_err(|error| format!("cannot start the ledger: {error}"))?;
    let mut world = bring_up(bin, workdir, &args.appendfsync, &ledger, &client).await?;
    let bases: Arc<Vec<String>> = Arc::new(world.nodes.iter().map(Node::base).collect());
    println!(
        "chaos: redis on {} (appendfsync {}), ledger on {}, nodes on ports {:?}, work dir {}",
        world.redis.port,
        args.appendfsync,
        ledger.base(),
        world.nodes.iter().map(|node| node.port).collect::<Vec<_>>(),
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
        stop_rx,
    ));
    let (poll_stop_tx, poll_stop_rx) = watch::channel(false);
    let poller = tokio::spawn(poll(
        client.clone(),
        Arc::clone(&bases),
        Arc::clone(&seen),
        poll_stop_rx,
    ));

    let started = Instant::now();
    let faketime = clock::libfaketime();
    if faketime.is_none() {
        println!(
            "chaos: notice: libfaketime is not installed (Debian package faketime), the clock skew fault is skipped"
        );
    }
    let spawn = Spawn {
        bin: bin.to_path_buf(),
        redis_url: world.redis.url(),
        ledger: ledger.base().to_string(),
        faketime,
    };
    let mut faults = Faults::new(seed, partition, spawn);
    faults
        .make(&mut world, &client, &bases, started, duration)
        .await;

    // Heal everything and let the cluster finish its work.
    println!(
        "chaos: {:7.1}s healing, waiting for quiescence",
        elapsed(started)
    );
    let _ = stop_tx.send(true);
    let mut submitters = loader.await.unwrap_or_default();
    faults.heal_all(&mut world).await;
    let healed = Instant::now();
    let submitting = Arc::new(AtomicBool::new(true));
    let settling = tokio::spawn(settle(
        client.clone(),
        Arc::clone(&bases),
        healed,
        Arc::clone(&submitting),
    ));
    while submitters.join_next().await.is_some() {}
    submitting.store(false, Ordering::SeqCst);
    if !wait_formed(&client, &bases, Duration::from_secs(60)).await {
        faults.violations.push(Violation {
            kind: "cluster_not_reformed".into(),
            order_id: None,
            detail: "not all 3 nodes live with a leader 60 s after healing".into(),
        });
    }
    // Every stored order, answered or not, must be terminal within the bound of the last heal.
    let settled = settling
        .await
        .map_err(|error| format!("the listing task failed: {error}"))??;
    wait_quiet(&seen, Duration::from_secs(180)).await;
    let _ = poll_stop_tx.send(true);
    let _ = poller.await;
    let quiescent_after = elapsed(started);
    for (id, detail) in &settled.stuck {
        faults.violations.push(Violation {
            kind: "stuck".into(),
            order_id: Some(id.clone()),
            detail: format!("{detail} (bound {STUCK_BOUND:?} after the last heal)"),
        });
    }
    let stored = settled.orders.clone();
    faults.drain_all(&mut world).await;

    let logs = read_logs(&world.nodes);
    let books = ledger.books();
    let seen = lock(&seen);
    let mut violations = faults.violations;
    let mut report = Report::build(
        &seen,
        &stored,
        &books,
        &logs,
        &faults.done,
        faults.max_skew,
        &mut violations,
    );
    report.lines.push((
        "stuck",
        format!(
            "{} (bound {}s: reconcile {}s + takeover {}s); slowest order after the last heal: {}",
            settled.stuck.len(),
            STUCK_BOUND.as_secs(),
            RECONCILE_INTERVAL.as_secs(),
            TAKEOVER_BOUND.as_secs(),
            settled
                .slowest
                .as_ref()
                .map_or("none".into(), |(id, took)| format!("{id} {took:.1}s"))
        ),
    ));
    report.lines.push((
        "duplicates",
        if faults.duplicates.is_empty() {
            "none started".into()
        } else {
            faults
                .duplicates
                .iter()
                .map(|(fate, count)| format!("{fate} {count}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
    ));
    report.print(
        seed,
        duration,
        &args.appendfsync,
        &faults.done,
        &seen,
        &books,
        &logs,
        faults.drains,
        quiescent_after,
        &violations,
    );
    if let Some(first) = violations.first() {
        print_first(first, &stored, &books);
    }
    Ok(violations.is_empty())
}

/// Starts Redis and the nodes (the first alone, the others joining it) and waits until they
/// form a cluster; afterwards each node restarts joining the other two.
async fn bring_up(
    bin: &Path,
    workdir: &Path,
    appendfsync: &str,
    ledger: &Ledger,
    client: &reqwest::Client,
) -> Result<World, String> {
    let redis = RedisServer::try_start(workdir.join("redis"), appendfsync)
        .map_err(|error| format!("cannot start redis-server: {error}"))?;
    let mut nodes = Vec::new();
    for index in 0..NODES {
        let config = node_config(index, &redis.url(), ledger.base());
        let node = Node::new(bin, workdir.join(format!("node-{index}")), index, &config)
            .map_err(|error| format!("cannot prepare node {index}: {error}"))?;
        nodes.push(node);
    }
    let ports: Vec<u16> = nodes.iter().map(|node| node.port).collect();
    for (index, node) in nodes.iter_mut().enumerate() {
        node.set_join(ports[..index].to_vec());
        node.launch()
            .map_err(|error| format!("cannot start node {index}: {error}"))?;
        if !wait_ready(client, &node.base(), Duration::from_secs(30)).await {
            return Err(format!("node {index} did not become ready"));
        }
        let others: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|port| *port != ports[index])
            .collect();
        node.set_join(others);
    }
    let bases: Vec<String> = nodes.iter().map(Node::base).collect();
    if !wait_formed(client, &bases, Duration::from_secs(60)).await {
        return Err("the cluster did not form".into());
    }
    Ok(World {
        redis,
        redis_paused: false,
        nodes,
        partitions: Partitions::default(),
    })
}

/// Waits until every accepted order was seen finished, or `within` has passed.
async fn wait_quiet(seen: &Mutex<Seen>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let unfinished = {
            let seen = lock(seen);
            seen.by_id.len() - seen.finished.len()
        };
        if unfinished == 0 || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What a fault needs to start processes of its own: the node binary, Redis and the ledger.
pub struct Spawn {
    pub bin: PathBuf,
    pub redis_url: String,
    pub ledger: String,
    /// libfaketime, when installed (the clock skew fault needs it).
    pub faketime: Option<PathBuf>,
}

/// The fault schedule: a shuffled bag of every kind, drawn from the seed, and what was made.
struct Faults {
    rng: StdRng,
    partition: bool,
    spawn: Spawn,
    /// What became of each duplicate node, by fate.
    duplicates: BTreeMap<&'static str, usize>,
    /// The largest clock offset given to a node, in seconds.
    max_skew: i64,
    bag: Vec<Kind>,
    /// Recoveries due: when, what, and the fault they end.
    pending: Vec<(Instant, Recovery, usize)>,
    done: Vec<Fault>,
    violations: Vec<Violation>,
    /// Drains that exited 0, of all drains.
    drains: (usize, usize),
}

impl Faults {
    fn new(seed: u64, partition: bool, spawn: Spawn) -> Faults {
        Faults {
            rng: StdRng::seed_from_u64(seed),
            partition,
            spawn,
            duplicates: BTreeMap::new(),
            max_skew: 0,
            bag: Vec::new(),
            pending: Vec::new(),
            done: Vec::new(),
            violations: Vec::new(),
            drains: (0, 0),
        }
    }

    fn later(&mut self, low: u64, high: u64) -> Instant {
        Instant::now() + Duration::from_millis(self.rng.random_range(low..high))
    }

    /// Makes faults at random for `duration`, recovering each when it is due.
    async fn make(
        &mut self,
        world: &mut World,
        client: &reqwest::Client,
        bases: &[String],
        started: Instant,
        duration: Duration,
    ) {
        let mut next_fault = self.later(1000, 3000);
        while started.elapsed() < duration {
            let wake = self
                .pending
                .iter()
                .map(|(at, _, _)| *at)
                .chain(std::iter::once(next_fault))
                .min()
                .unwrap_or(next_fault);
            tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await;
            self.recover_due(world).await;
            if Instant::now() < next_fault {
                continue;
            }
            next_fault = self.later(2000, 6000);
            self.one(world, client, bases, started).await;
        }
    }

    async fn recover_due(&mut self, world: &mut World) {
        let now = Instant::now();
        let mut index = 0;
        while index < self.pending.len() {
            if self.pending[index].0 <= now {
                let (_, recovery, fault) = self.pending.remove(index);
                self.recover(world, recovery, fault).await;
            } else {
                index += 1;
            }
        }
    }

    async fn recover(&mut self, world: &mut World, recovery: Recovery, fault: usize) {
        recover(world, recovery, &mut self.violations).await;
        if let Some(fault) = self.done.get_mut(fault) {
            fault.healed = Some(Utc::now());
        }
    }

    /// The next kind from the bag that can be made now (refilled and shuffled when empty).
    fn draw(&mut self, world: &mut World, healthy: &[usize]) -> Option<Kind> {
        if self.bag.is_empty() {
            let partition = self.partition;
            let skew = self.spawn.faketime.is_some();
            self.bag = Kind::ALL
                .iter()
                .copied()
                .filter(|kind| partition || *kind != Kind::Partition)
                .filter(|kind| skew || *kind != Kind::SkewClock)
                .collect();
            self.bag.shuffle(&mut self.rng);
        }
        let redis = world.redis.is_running() && !world.redis_paused;
        let quiet = self.pending.is_empty() && healthy.len() == NODES && redis;
        let position = self.bag.iter().position(|kind| match kind {
            Kind::KillRedis | Kind::PauseRedis => redis,
            Kind::RollingRestart | Kind::DuplicateNode => quiet,
            Kind::InterruptedTakeover => healthy.len() == NODES && redis,
            _ => healthy.len() >= 2,
        })?;
        Some(self.bag.remove(position))
    }

    /// Makes one fault, if one can be made now.
    async fn one(
        &mut self,
        world: &mut World,
        client: &reqwest::Client,
        bases: &[String],
        started: Instant,
    ) {
        let healthy = world.healthy();
        let Some(kind) = self.draw(world, &healthy) else {
            return;
        };
        let victim = match kind {
            Kind::KillLeader => match world.leader(client).await {
                Some(index) if healthy.contains(&index) => Some(index),
                _ => {
                    self.bag.push(kind);
                    return;
                }
            },
            Kind::KillNode
            | Kind::PauseNode
            | Kind::Partition
            | Kind::KillDraining
            | Kind::DuplicateNode
            | Kind::SkewClock
            | Kind::InterruptedTakeover => Some(healthy[self.rng.random_range(0..healthy.len())]),
            Kind::KillRedis | Kind::PauseRedis | Kind::RollingRestart => None,
        };
        let service_id = victim.and_then(|index| world.nodes[index].service_id());
        let owned = world.owned(client, &service_id).await;
        let fault = self.done.len();
        self.done.push(Fault {
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
        self.strike(world, client, bases, kind, victim, fault).await;
    }

    /// Makes fault number `fault` and schedules its recovery.
    async fn strike(
        &mut self,
        world: &mut World,
        client: &reqwest::Client,
        bases: &[String],
        kind: Kind,
        victim: Option<usize>,
        fault: usize,
    ) {
        match (kind, victim) {
            (Kind::KillNode | Kind::KillLeader, Some(index)) => {
                world.nodes[index].kill();
                let at = self.later(1000, 20000);
                self.pending.push((at, Recovery::Restart(index), fault));
            }
            (Kind::KillDraining, Some(index)) => {
                let wait = Duration::from_millis(self.rng.random_range(50..2500));
                let node = &mut world.nodes[index];
                node.signal("TERM");
                if node.wait_exit(wait).await.is_none() {
                    node.kill();
                }
                let at = self.later(1000, 10000);
                self.pending.push((at, Recovery::Restart(index), fault));
            }
            (Kind::PauseNode, Some(index)) => {
                world.nodes[index].signal("STOP");
                // Mostly past the liveness lease (3 s), sometimes shorter.
                let at = self.later(1500, 12000);
                self.pending.push((at, Recovery::Resume(index), fault));
            }
            (Kind::Partition, Some(index)) => {
                let port = world.nodes[index].port;
                if !world.partitions.cut(port) {
                    println!("chaos: notice: iptables refused the rule for port {port}");
                }
                let at = self.later(4000, 10000);
                self.pending.push((at, Recovery::Heal(index), fault));
            }
            (Kind::PauseRedis, _) => {
                if world.redis.signal("STOP") {
                    world.redis_paused = true;
                }
                // Around `database.timeout` (1 s): shorter, about as long, and longer.
                let at = self.later(300, 3000);
                self.pending.push((at, Recovery::ResumeRedis, fault));
            }
            (Kind::DuplicateNode, Some(index)) => {
                let join = world
                    .nodes
                    .iter()
                    .filter(|node| node.index != index)
                    .map(|node| node.port)
                    .collect();
                let (fate, detail) = duplicate::run(
                    &world.nodes[index],
                    &self.spawn.bin,
                    &self.spawn.redis_url,
                    &self.spawn.ledger,
                    join,
                )
                .await;
                println!("chaos:          duplicate of n{index}: {fate:?} ({detail})");
                *self.duplicates.entry(fate.name()).or_default() += 1;
                if matches!(fate, Fate::ExitedZero | Fate::StillRunning) {
                    self.violations.push(Violation {
                        kind: "duplicate_node_ran".into(),
                        order_id: None,
                        detail: format!("a copy of n{index}'s data dir: {detail}"),
                    });
                }
                if let Some(fault) = self.done.get_mut(fault) {
                    fault.healed = Some(Utc::now());
                }
            }
            (Kind::SkewClock, Some(index)) => {
                let Some(library) = self.spawn.faketime.clone() else {
                    return;
                };
                let seconds = self.rng.random_range(5..=30i64);
                let offset = if self.rng.random_bool(0.5) {
                    seconds
                } else {
                    -seconds
                };
                self.max_skew = self.max_skew.max(seconds);
                println!("chaos:          n{index} restarted with its clock {offset:+} s off");
                let node = &mut world.nodes[index];
                node.kill();
                node.env = clock::skewed(&library, offset);
                if let Err(error) = node.launch() {
                    self.violations.push(Violation {
                        kind: "restart_failed".into(),
                        order_id: None,
                        detail: format!("n{index} with a skewed clock: {error}"),
                    });
                }
                let at = self.later(5000, 15000);
                self.pending.push((at, Recovery::Unskew(index), fault));
            }
            (Kind::InterruptedTakeover, Some(index)) => {
                self.interrupt_takeover(world, client, index, fault).await;
            }
            (Kind::KillRedis, _) => {
                world.redis.kill();
                let at = self.later(300, 5000);
                self.pending.push((at, Recovery::RestartRedis, fault));
            }
            (Kind::RollingRestart, _) => {
                for unclean in rolling_restart(client, world, bases, &mut self.drains).await {
                    self.violations.push(Violation {
                        kind: "drain_exit".into(),
                        order_id: None,
                        detail: unclean,
                    });
                }
                if let Some(fault) = self.done.get_mut(fault) {
                    fault.healed = Some(Utc::now());
                }
            }
            _ => {}
        }
    }

    /// Kills node `index`, waits until its orders start to move to another node, and then pauses
    /// Redis or kills the leader (the node that moves them) in the middle of it.
    async fn interrupt_takeover(
        &mut self,
        world: &mut World,
        client: &reqwest::Client,
        index: usize,
        fault: usize,
    ) {
        let (service_id, owned) = match self.done.get(fault) {
            Some(record) => (record.service_id.clone(), record.owned.unwrap_or(0)),
            None => return,
        };
        world.nodes[index].kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while owned > 0 && Instant::now() < deadline {
            if world
                .owned(client, &service_id)
                .await
                .is_some_and(|now| now < owned)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let leader = world.leader(client).await.filter(|leader| *leader != index);
        match leader {
            Some(leader) if self.rng.random_bool(0.5) => {
                println!("chaos:          taker n{leader} killed mid-takeover");
                world.nodes[leader].kill();
                let at = self.later(1000, 8000);
                self.pending.push((at, Recovery::Restart(leader), fault));
            }
            _ => {
                println!("chaos:          redis paused mid-takeover");
                if world.redis.signal("STOP") {
                    world.redis_paused = true;
                }
                let at = self.later(300, 3000);
                self.pending.push((at, Recovery::ResumeRedis, fault));
            }
        }
        let at = self.later(3000, 10000);
        self.pending.push((at, Recovery::Restart(index), fault));
    }

    /// Recovers from every fault still in effect, in the order they were due.
    async fn heal_all(&mut self, world: &mut World) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_by_key(|(at, _, _)| *at);
        for (_, recovery, fault) in pending {
            self.recover(world, recovery, fault).await;
        }
    }

    /// Stops the nodes the way an operator would: each must drain and exit 0.
    async fn drain_all(&mut self, world: &mut World) {
        for (index, node) in world.nodes.iter_mut().enumerate() {
            if node.signal("TERM") {
                self.drains.1 += 1;
                match node.wait_exit(Duration::from_secs(60)).await {
                    Some(status) if status.success() => self.drains.0 += 1,
                    other => self.violations.push(Violation {
                        kind: "drain_exit".into(),
                        order_id: None,
                        detail: format!("n{index} at the end: {other:?}"),
                    }),
                }
            }
        }
    }
}
