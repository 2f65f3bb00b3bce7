//! The campaign from start to verdict: bring up Redis, the ledger and the cluster; make faults
//! under load for the asked duration; heal everything and wait for quiescence; drain the nodes;
//! then check every order and print the summary.

use crate::args::ChaosArgs;
use crate::clock;
use crate::faults::{late_writes_until, Kind};
use crate::ledger::Ledger;
use crate::links::Links;
use crate::load::{load, lock, poll, Seen};
use crate::logs::read_logs;
use crate::netns::{node_host, Network};
use crate::redis::{hosts_needed, server_host, Redis, MIN_REPLICAS};
use crate::report::{print_first, Report, Violation, TAKEOVER_BOUND};
use crate::schedule::{Faults, Spawn};
use crate::settle::{settle, STUCK_BOUND};
use crate::world::{
    get_json, http_client, node_config, wait_formed, wait_ready, Node, Tls, World, NODES,
    RECONCILE_INTERVAL,
};
use chrono::Utc;
use std::net::IpAddr;
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
        || !["single", "sentinel", "cluster"].contains(&args.redis.as_str())
    {
        eprintln!(
            "order-process-chaos: --rate must be > 0, --appendfsync always, everysec or no, and --redis single, sentinel or cluster"
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

/// Seconds since `started`, for the progress lines.
pub fn elapsed(started: Instant) -> f64 {
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
    let mut skip = Vec::new();
    for name in &args.skip {
        match Kind::from_name(name) {
            Some(kind) => skip.push(kind),
            None => return Err(format!("--skip {name}: no such kind of fault")),
        }
    }
    if args.no_partition {
        skip.push(Kind::Partition);
    }
    let sentinel = args.redis == "sentinel";
    let cluster = args.redis == "cluster";
    if !sentinel {
        skip.push(Kind::LoseRedisPrimary);
    }
    if cluster {
        // The cluster's own kill: a primary killed comes back once its replica took over.
        skip.push(Kind::KillRedis);
    } else {
        skip.push(Kind::KillRedisPrimary);
    }
    // The cluster runs on loopback, so the nodes do too.
    let network = hosts(args.no_netns || cluster, sentinel);
    if network.is_none() {
        skip.extend(Kind::NAMESPACED);
    }
    if !Links::available() {
        skip.extend(Kind::IPTABLES);
        println!(
            "chaos: notice: iptables is not usable here, the faults on links ({}) are skipped",
            Kind::IPTABLES.map(Kind::name).join(", ")
        );
    }
    let tls = match args.https {
        true => Some(Tls::new(
            &workdir.join("tls"),
            &node_addresses(network.as_ref())?,
        )?),
        false => None,
    };
    let client = http_client(tls.as_ref())?;
    let gateway = network
        .as_ref()
        .map_or(IpAddr::from([127, 0, 0, 1]), |network| network.gateway);
    let ledger = Ledger::start(seed, gateway)
        .await
        .map_err(|error| format!("cannot start the ledger: {error}"))?;
    let mut world = bring_up(bin, workdir, args, &ledger, &client, network, tls.as_ref()).await?;
    let bases: Arc<Vec<String>> = Arc::new(world.nodes.iter().map(Node::base).collect());
    println!(
        "chaos: redis on {} (appendfsync {}), ledger on {}, nodes on {}, work dir {}",
        world.redis.describe(),
        args.appendfsync,
        ledger.base(),
        world
            .nodes
            .iter()
            .map(Node::base)
            .collect::<Vec<_>>()
            .join(", "),
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
        skip.push(Kind::SkewClock);
        println!(
            "chaos: notice: libfaketime is not installed (Debian package faketime), the clock skew fault is skipped"
        );
    }
    let spawn = Spawn {
        bin: bin.to_path_buf(),
        database: world.redis.database(),
        ledger: ledger.base().to_string(),
        faketime,
        tls,
    };
    let mut faults = Faults::new(seed, skip, spawn);
    faults.spaced = args.spaced;
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
    faults.heal_all(&mut world, &client).await;
    let healed = Instant::now();
    let healed_wall = Utc::now();
    let submitting = Arc::new(AtomicBool::new(true));
    let settling = tokio::spawn(settle(
        client.clone(),
        Arc::clone(&bases),
        healed,
        healed_wall,
        Arc::clone(&submitting),
        late_writes_until(&faults.done),
        ledger.called(),
    ));
    while submitters.join_next().await.is_some() {}
    submitting.store(false, Ordering::SeqCst);
    if !wait_formed(&client, &bases, Duration::from_secs(60)).await {
        let mut views = Vec::new();
        for base in bases.iter() {
            let view = get_json(&client, &format!("{base}/diagnostic/cluster")).await;
            views.push(format!("{base}: {}", view.unwrap_or_default()));
        }
        faults.violations.push(Violation {
            kind: "cluster_not_reformed".into(),
            order_id: None,
            detail: format!(
                "not all 3 nodes live with a leader 60 s after healing; {}",
                views.join("; ")
            ),
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
        &world
            .redis
            .sentinels
            .iter()
            .flat_map(|sentinel| sentinel.switches())
            .collect::<Vec<_>>(),
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
    if world.redis.sentinel_mode() || world.redis.cluster_mode() {
        report
            .lines
            .push(("redis", redis_line(&world.redis, faults.refused_starts)));
    }
    report.lines.push((
        "duplicates",
        if faults.duplicates.is_empty() {
            "none started".into()
        } else {
            let fates = faults
                .duplicates
                .iter()
                .map(|(fate, count)| format!("{fate} {count}"))
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "{fates}; nodes that refused to start while another process held their node id {}",
                faults.id_in_use
            )
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
    print_first(&violations, &stored, &books);
    Ok(violations.is_empty())
}

/// The summary line of sentinel and cluster mode: failovers and how long each took, and nodes
/// that had to be started again.
fn redis_line(redis: &Redis, refused_starts: usize) -> String {
    let until = match redis.cluster_mode() {
        true => "every slot served again",
        false => "every sentinel naming a new primary",
    };
    let times = match median_and_max(&redis.failovers) {
        Some((p50, max)) => format!(" (SIGKILL to {until}: p50 {p50:.1}s, max {max:.1}s)"),
        None => String::new(),
    };
    let failovers = redis.failovers.len();
    if redis.cluster_mode() {
        return format!(
            "cluster mode, 3 primaries with a replica each, min_replicas 0; failovers {failovers}{times}"
        );
    }
    let rejoined = match median_and_max(&redis.rejoins) {
        Some((p50, max)) => format!(
            " (every replica online again after the lost primary started as one: p50 {p50:.1}s, max {max:.1}s)"
        ),
        None => String::new(),
    };
    format!(
        "sentinel mode, min_replicas {MIN_REPLICAS}; failovers {failovers}{times}{rejoined}; failovers the sentinels made on their own {}; replicas promoted by hand after {:?} without a failover {}; nodes started again after refusing to start on too few replicas {refused_starts}",
        redis.own_failovers,
        redis.promote_after,
        redis.hand_failovers
    )
}

/// The median and the largest of `seconds`, if any.
fn median_and_max(seconds: &[f64]) -> Option<(f64, f64)> {
    let mut sorted = seconds.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some((*sorted.get(sorted.len() / 2)?, *sorted.last()?))
}

/// The hosts in network namespaces, one per node and one per Redis server, unless `--no-netns`
/// or they cannot be made here (then one notice says so, and everything runs on loopback).
fn hosts(no_netns: bool, sentinel: bool) -> Option<Network> {
    let names: Vec<String> = (0..NODES)
        .map(node_host)
        .chain((0..hosts_needed(sentinel)).map(server_host))
        .collect();
    let fallback = |why: &str| {
        println!(
            "chaos: notice: {why}; every process runs on 127.0.0.1, and {} are skipped",
            Kind::NAMESPACED.map(Kind::name).join(", ")
        );
        None
    };
    if no_netns {
        return fallback("network namespaces left out (--no-netns)");
    }
    match Network::up(&names) {
        Ok(network) => {
            println!(
                "chaos: hosts in network namespaces on network {}: gateway {} (this process, the ledger), {}",
                network.name(),
                network.gateway,
                names
                    .iter()
                    .filter_map(|name| network.address(name).map(|address| format!("{name} {address}")))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Some(network)
        }
        Err(why) => fallback(&format!("no network namespaces here ({why})")),
    }
}

/// Starts Redis (and its replicas and sentinels in sentinel mode) and the nodes (the first alone,
/// the others joining it), each in its host when there is a network, and waits until they form
/// a cluster; afterwards each node restarts joining the other two.
async fn bring_up(
    bin: &Path,
    workdir: &Path,
    args: &ChaosArgs,
    ledger: &Ledger,
    client: &reqwest::Client,
    network: Option<Network>,
    tls: Option<&Tls>,
) -> Result<World, String> {
    let redis = match args.redis.as_str() {
        "cluster" => Redis::start_cluster(workdir, &args.appendfsync)?,
        mode => Redis::start(
            workdir,
            &args.appendfsync,
            network.as_ref(),
            mode == "sentinel",
        )?,
    };
    let mut nodes = Vec::new();
    for (index, host_address) in node_addresses(network.as_ref())?.into_iter().enumerate() {
        let config = node_config(index, &redis.database(), ledger.base(), tls);
        let mut node = Node::new(bin, workdir.join(format!("node-{index}")), index, &config)
            .map_err(|error| format!("cannot prepare node {index}: {error}"))?;
        if tls.is_some() {
            node.scheme = "https";
        }
        if let Some(network) = &network {
            node.place(host_address, network.hosts.launcher(&node_host(index)));
        }
        nodes.push(node);
    }
    let addresses: Vec<String> = nodes.iter().map(Node::address).collect();
    for (index, node) in nodes.iter_mut().enumerate() {
        node.set_join(addresses[..index].to_vec());
        node.launch()
            .map_err(|error| format!("cannot start node {index}: {error}"))?;
        if !wait_ready(client, &node.base(), Duration::from_secs(30)).await {
            return Err(format!("node {index} did not become ready"));
        }
        let others: Vec<String> = addresses
            .iter()
            .filter(|address| **address != addresses[index])
            .cloned()
            .collect();
        node.set_join(others);
    }
    let bases: Vec<String> = nodes.iter().map(Node::base).collect();
    if !wait_formed(client, &bases, Duration::from_secs(60)).await {
        return Err("the cluster did not form".into());
    }
    Ok(World {
        redis,
        nodes,
        links: Links::new(network.as_ref().map(|network| network.hosts.clone())),
        _network: network,
    })
}

/// The address each node listens on: its namespace's, or loopback.
fn node_addresses(network: Option<&Network>) -> Result<Vec<String>, String> {
    (0..NODES)
        .map(|index| match network {
            None => Ok("127.0.0.1".to_string()),
            Some(network) => {
                let host = node_host(index);
                network
                    .address(&host)
                    .map(|address| address.to_string())
                    .ok_or_else(|| format!("the network has no host {host}"))
            }
        })
        .collect()
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
