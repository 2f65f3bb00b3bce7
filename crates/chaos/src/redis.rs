//! The campaign's Redis: one `redis-server` (the default), or with `--redis sentinel` a primary,
//! two replicas and three `redis-sentinel`s that the nodes ask for the primary (each server on a
//! host of its own in network namespaces, a sentinel beside each on another port). Which server
//! is the primary changes with every failover; the faults on Redis ask this module for it.
//! With `--redis cluster`, a Redis Cluster of three primaries with a replica each, on loopback;
//! a primary killed is replaced by its replica, and comes back as a replica.

use crate::netns::{Network, REDIS_HOST};
use chrono::{DateTime, NaiveDateTime, Utc};
use order_process_testkit::process::Proc;
use order_process_testkit::redis::cli_on;
use order_process_testkit::{free_port, RedisCluster, RedisServer};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The name the sentinels watch the primary under.
pub const MASTER: &str = "orders";
/// Sentinels that must agree the primary is down (of three).
const QUORUM: usize = 2;
/// Replicas in sentinel mode.
const REPLICAS: usize = 2;
/// The nodes' `database.min_replicas` in sentinel mode: every replica, the setting under which
/// no failover loses an acknowledged write. With fewer, a failover that the sentinels start
/// while the primary still serves (a stall under load is enough) can promote a replica that
/// lacks writes another replica, still following the old primary, acknowledged.
pub const MIN_REPLICAS: usize = REPLICAS;
/// How long the sentinels wait for a silent primary before they call it down.
pub const DOWN_AFTER: Duration = Duration::from_millis(1000);
/// How long a started set may take to be whole: replicas in sync, sentinels knowing each other.
const FORM: Duration = Duration::from_secs(30);
/// How long a lost primary waits for the sentinels before the campaign promotes a replica by
/// hand, as an operator would. Sentinel gives up for good on a replica whose link to the primary
/// was down ten `down-after-milliseconds` longer than the primary itself: a machine that stalls
/// for 2 s puts every sentinel in TILT mode for 30 s, which is enough.
const PROMOTE_AFTER: Duration = Duration::from_secs(30);

/// The host server `index` runs in: `redis`, `redis1`, `redis2`.
pub fn server_host(index: usize) -> String {
    match index {
        0 => REDIS_HOST.to_string(),
        _ => format!("redis{index}"),
    }
}

/// How many Redis hosts a mode needs.
pub fn hosts_needed(sentinel: bool) -> usize {
    if sentinel {
        1 + REPLICAS
    } else {
        1
    }
}

/// A `redis-sentinel` on a host's address, its config file (which it rewrites) and log in a
/// directory of the campaign; killed by pid when dropped.
pub struct Sentinel {
    pub host: IpAddr,
    pub port: u16,
    /// Its log, where it notes each switch of primary.
    pub log: PathBuf,
    _process: Proc,
}

impl Sentinel {
    /// Starts one watching `primary` as [`MASTER`], on `host` through `launcher` (empty on
    /// loopback); returns once it answers PING.
    fn start(
        dir: &Path,
        host: IpAddr,
        launcher: &[String],
        primary: SocketAddr,
    ) -> std::io::Result<Sentinel> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let settings = [
            format!("port {port}"),
            format!("bind {host}"),
            "protected-mode no".into(),
            format!("dir {}", dir.display()),
            format!(
                "sentinel monitor {MASTER} {} {} {QUORUM}",
                primary.ip(),
                primary.port()
            ),
        ]
        .into_iter()
        .chain(
            watch_settings()
                .iter()
                .map(|(name, value)| format!("sentinel {name} {MASTER} {value}")),
        )
        .collect::<Vec<String>>();
        let config = dir.join("sentinel.conf");
        std::fs::write(&config, settings.join("\n") + "\n")?;
        let log = dir.join("sentinel.log");
        let mut args: Vec<String> = launcher.iter().skip(1).cloned().collect();
        let program = match launcher.first() {
            Some(program) => {
                args.push("redis-sentinel".into());
                PathBuf::from(program)
            }
            None => PathBuf::from("redis-sentinel"),
        };
        args.push(config.display().to_string());
        let mut process = Proc::spawn(&program, &args, &log, &log)?;
        let log_path = log.clone();
        let deadline = Instant::now() + FORM;
        while cli_on(host, port, &["PING"]).as_deref() != Some("PONG") {
            if let Some(status) = process.try_exit() {
                return Err(std::io::Error::other(format!(
                    "redis-sentinel on {host}:{port} exited at start: {status}"
                )));
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "redis-sentinel on {host}:{port} did not answer PING within {FORM:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Sentinel {
            host,
            port,
            log: log_path,
            _process: process,
        })
    }

    /// When this sentinel switched to a new primary (`+switch-master` in its log; Redis logs
    /// in the machine's time zone, UTC here).
    pub fn switches(&self) -> Vec<DateTime<Utc>> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(switch_time)
            .collect()
    }

    /// The primary this sentinel names now.
    pub fn primary(&self) -> Option<SocketAddr> {
        let answer = cli_on(
            self.host,
            self.port,
            &["SENTINEL", "get-master-addr-by-name", MASTER],
        )?;
        let mut lines = answer.lines().map(str::trim);
        let host: IpAddr = lines.next()?.parse().ok()?;
        let port: u16 = lines.next()?.parse().ok()?;
        Some(SocketAddr::from((host, port)))
    }

    /// Watches `primary` from now on, forgetting the primary it watched and what it knew of it:
    /// `SENTINEL REMOVE`, `SENTINEL MONITOR` and the settings of [`watch_settings`].
    fn watch(&self, primary: SocketAddr) -> Result<(), String> {
        // REMOVE fails on a sentinel that watches nothing under the name; MONITOR then succeeds.
        cli_on(self.host, self.port, &["SENTINEL", "REMOVE", MASTER]);
        let (host, port) = (primary.ip().to_string(), primary.port().to_string());
        let quorum = QUORUM.to_string();
        let monitor = ["SENTINEL", "MONITOR", MASTER, &host, &port, &quorum];
        command(self.host, self.port, &monitor)?;
        for (name, value) in watch_settings() {
            command(
                self.host,
                self.port,
                &["SENTINEL", "SET", MASTER, name, &value],
            )?;
        }
        Ok(())
    }

    /// True once it knows the two other sentinels and every replica.
    fn knows_everyone(&self) -> bool {
        let Some(answer) = cli_on(self.host, self.port, &["SENTINEL", "MASTER", MASTER]) else {
            return false;
        };
        let lines: Vec<&str> = answer.lines().map(str::trim).collect();
        let count = |field: &str| {
            let at = lines.iter().position(|line| *line == field)?;
            lines.get(at + 1)?.parse::<usize>().ok()
        };
        count("num-other-sentinels") == Some(2) && count("num-slaves") == Some(REPLICAS)
    }
}

/// What each sentinel is told about the primary besides where it is: quick to call it down, quick
/// to try again.
fn watch_settings() -> [(&'static str, String); 3] {
    [
        (
            "down-after-milliseconds",
            DOWN_AFTER.as_millis().to_string(),
        ),
        ("failover-timeout", "4000".to_string()),
        ("parallel-syncs", "1".to_string()),
    ]
}

/// The time of a sentinel's log line that notes a switch of primary
/// (`22079:X 02 Dec 2026 04:49:55.109 # +switch-master …`).
fn switch_time(line: &str) -> Option<DateTime<Utc>> {
    if !line.contains("+switch-master") {
        return None;
    }
    let text = line.split_once(' ')?.1.get(..24)?;
    NaiveDateTime::parse_from_str(text, "%d %b %Y %H:%M:%S%.3f")
        .ok()
        .map(|at| at.and_utc())
}

/// The Redis servers and, in sentinel mode, their sentinels.
pub struct Redis {
    /// Server 0 is the first primary; in sentinel mode 1 and 2 start as its replicas.
    pub servers: Vec<RedisServer>,
    /// Empty for a single Redis.
    pub sentinels: Vec<Sentinel>,
    /// The server the nodes write to: the one the sentinels agreed on last.
    primary: usize,
    /// The server SIGSTOPped, if one is.
    paused: Option<usize>,
    /// When the server (or cluster primary) SIGSTOPped now was stopped, to tell how long it was.
    paused_at: Option<Instant>,
    /// The primary killed (and maybe wiped) awaiting a failover, and when.
    lost: Option<(usize, Instant)>,
    /// In sentinel mode, when the lost primary was started again as a replica, until the
    /// primary has every replica online: before that, no write reaches `min_replicas`.
    rejoining: Option<Instant>,
    /// Seconds from each primary's SIGKILL to all sentinels naming another (in cluster mode: to
    /// every slot served again).
    pub failovers: Vec<f64>,
    /// Seconds from the lost primary starting again as a replica to the new primary having
    /// every replica online (sentinel mode).
    pub rejoins: Vec<f64>,
    /// Failovers the sentinels made with no fault killing the primary (it stalled past
    /// [`DOWN_AFTER`] on a loaded machine, or they lost sight of it).
    pub own_failovers: usize,
    /// Primaries lost that the sentinels did not replace within `promote_after`, a replica
    /// promoted by hand instead.
    pub hand_failovers: usize,
    /// [`PROMOTE_AFTER`], shorter in tests.
    pub promote_after: Duration,
    /// Whether a promotion by hand was tried for the primary lost now.
    hand_tried: bool,
    /// The sentinels were told of a primary promoted by hand and have yet to find each other
    /// and its replicas again.
    reforming: bool,
    /// The Redis Cluster of cluster mode (then `servers` and `sentinels` are empty), and the
    /// port of its primary SIGSTOPped or SIGKILLed.
    cluster: Option<(RedisCluster, Option<u16>)>,
}

/// Primaries of cluster mode, each with one replica.
const PRIMARIES: usize = 3;

/// Cluster mode's `cluster-node-timeout`: well above the longest pause ([`Redis::pause_range`]),
/// since a primary paused takes a moment more to answer again on two busy cores, and a pause
/// that turns into a failover is a known way to lose writes with `min_replicas` 0.
const CLUSTER_NODE_TIMEOUT: Duration = Duration::from_secs(2);

impl Redis {
    /// Starts one server, or a primary, two replicas and three sentinels, each server on its
    /// host of `network` when there is one; returns once replicas and sentinels are in place.
    pub fn start(
        workdir: &Path,
        appendfsync: &str,
        network: Option<&Network>,
        sentinel: bool,
    ) -> Result<Redis, String> {
        let place = |index: usize| -> Result<(IpAddr, Vec<String>), String> {
            let Some(network) = network else {
                return Ok((IpAddr::from([127, 0, 0, 1]), Vec::new()));
            };
            let host = server_host(index);
            let address = network
                .address(&host)
                .ok_or_else(|| format!("the network has no host {host}"))?;
            Ok((address, network.hosts.launcher(&host)))
        };
        let dir = |index: usize| match index {
            0 => workdir.join("redis"),
            _ => workdir.join(format!("redis{index}")),
        };
        let failed = |error: std::io::Error| format!("cannot start redis-server: {error}");
        let (host, launcher) = place(0)?;
        let primary =
            RedisServer::try_start_on(dir(0), appendfsync, host, launcher).map_err(failed)?;
        let mut redis = Redis {
            servers: vec![primary],
            sentinels: Vec::new(),
            primary: 0,
            paused: None,
            paused_at: None,
            lost: None,
            rejoining: None,
            failovers: Vec::new(),
            rejoins: Vec::new(),
            own_failovers: 0,
            hand_failovers: 0,
            promote_after: PROMOTE_AFTER,
            hand_tried: false,
            reforming: false,
            cluster: None,
        };
        if !sentinel {
            return Ok(redis);
        }
        let first = redis.servers[0].address();
        for index in 1..=REPLICAS {
            let (host, launcher) = place(index)?;
            let replica =
                RedisServer::try_start_replica_on(dir(index), appendfsync, host, launcher, first)
                    .map_err(failed)?;
            redis.servers.push(replica);
        }
        wait_for(FORM, || redis.servers[0].has_replicas_online(REPLICAS))
            .then_some(())
            .ok_or("the replicas did not catch up with the primary")?;
        for index in 0..redis.servers.len() {
            let (host, launcher) = place(index)?;
            let dir = workdir.join(format!("sentinel{index}"));
            let sentinel = Sentinel::start(&dir, host, &launcher, first)
                .map_err(|error| format!("cannot start redis-sentinel: {error}"))?;
            redis.sentinels.push(sentinel);
        }
        wait_for(FORM, || {
            redis.sentinels.iter().all(Sentinel::knows_everyone)
        })
        .then_some(())
        .ok_or("the sentinels did not find each other and the replicas")?;
        Ok(redis)
    }

    /// A Redis Cluster of three primaries with a replica each, on loopback, each server's
    /// directory (its log too) in `workdir/redis-cluster/<port>`.
    pub fn start_cluster(workdir: &Path, appendfsync: &str) -> Result<Redis, String> {
        let dir = workdir.join("redis-cluster");
        std::fs::create_dir_all(&dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
        let cluster =
            RedisCluster::try_start_in(&dir, PRIMARIES, 1, appendfsync, CLUSTER_NODE_TIMEOUT)
                .map_err(|error| format!("cannot start a redis cluster: {error}"))?;
        Ok(Redis {
            servers: Vec::new(),
            sentinels: Vec::new(),
            primary: 0,
            paused: None,
            paused_at: None,
            lost: None,
            rejoining: None,
            failovers: Vec::new(),
            rejoins: Vec::new(),
            own_failovers: 0,
            hand_failovers: 0,
            promote_after: PROMOTE_AFTER,
            hand_tried: false,
            reforming: false,
            cluster: Some((cluster, None)),
        })
    }

    pub fn sentinel_mode(&self) -> bool {
        !self.sentinels.is_empty()
    }

    pub fn cluster_mode(&self) -> bool {
        self.cluster.is_some()
    }

    /// A primary of the cluster to make a fault on: of those serving now, the next in turn.
    fn cluster_primary(cluster: &RedisCluster, turn: usize) -> Option<u16> {
        let primaries = cluster.primaries();
        primaries.get(turn % primaries.len().max(1)).copied()
    }

    /// The sentinels' `host:port`s, quoted as TOML strings when `quote` is.
    fn sentinel_list(&self, quote: &str) -> String {
        let sentinels: Vec<String> = self
            .sentinels
            .iter()
            .map(|sentinel| format!("{quote}{}:{}{quote}", sentinel.host, sentinel.port))
            .collect();
        sentinels.join(", ")
    }

    /// The `[database]` lines of a node's config that reach this Redis.
    pub fn database(&self) -> String {
        if let Some((cluster, _)) = &self.cluster {
            return cluster
                .database_config()
                .trim_start_matches("[database]\n")
                .to_string();
        }
        if !self.sentinel_mode() {
            return format!("url = \"{}\"\n", self.servers[0].url());
        }
        format!(
            "sentinels = [{}]\nmaster_name = \"{MASTER}\"\nmin_replicas = {MIN_REPLICAS}\nrequire_aof = true\n",
            self.sentinel_list("\"")
        )
    }

    /// Where it runs, for the first lines of the campaign.
    pub fn describe(&self) -> String {
        if let Some((cluster, _)) = &self.cluster {
            return format!(
                "a redis cluster of {PRIMARIES} primaries with a replica each: {}",
                cluster.addresses().join(", ")
            );
        }
        let primary = self.servers[0].address();
        if !self.sentinel_mode() {
            return primary.to_string();
        }
        let replicas: Vec<String> = self.servers[1..]
            .iter()
            .map(|server| server.address().to_string())
            .collect();
        format!(
            "{primary} with replicas on {} and sentinels on {} (min_replicas {MIN_REPLICAS})",
            replicas.join(", "),
            self.sentinel_list("")
        )
    }

    /// Every address a Redis process listens on (what a cut from Redis drops).
    pub fn hosts(&self) -> Vec<IpAddr> {
        if self.cluster_mode() {
            return vec![IpAddr::from([127, 0, 0, 1])];
        }
        let mut hosts: Vec<IpAddr> = self.servers.iter().map(|server| server.host).collect();
        hosts.extend(self.sentinels.iter().map(|sentinel| sentinel.host));
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// The primary the nodes write to.
    pub fn primary(&mut self) -> &mut RedisServer {
        &mut self.servers[self.primary]
    }

    /// Whether a fault on Redis may start now: nothing of Redis is down or paused, and in
    /// sentinel mode the primary (the one the sentinels name) has both replicas online and
    /// caught up, and after a promotion by hand every sentinel knows them and the others.
    pub fn ready(&mut self) -> bool {
        if let Some((cluster, touched)) = &self.cluster {
            return touched.is_none() && cluster.is_settled(PRIMARIES);
        }
        self.follow_sentinels();
        let primary = self.primary;
        let whole = self.paused.is_none()
            && self.lost.is_none()
            && self.rejoining.is_none()
            && self.servers.iter().all(RedisServer::is_running)
            && (!self.sentinel_mode() || self.servers[primary].has_replicas_online(REPLICAS));
        if whole && self.reforming {
            self.reforming = !self.sentinels.iter().all(Sentinel::knows_everyone);
        }
        whole && !self.reforming
    }

    /// The shortest and longest pause of the primary, in milliseconds: around `database.timeout`
    /// (1 s) for a single Redis; in sentinel mode below [`DOWN_AFTER`] (in cluster mode below
    /// [`CLUSTER_NODE_TIMEOUT`]), so that a pause stays a stall and does not turn into a failover
    /// with the old primary coming back.
    pub fn pause_range(&self) -> (u64, u64) {
        if self.sentinel_mode() || self.cluster_mode() {
            (300, 800)
        } else {
            (300, 3000)
        }
    }

    /// SIGSTOPs the primary; true when it was stopped.
    pub fn pause(&mut self) -> bool {
        let stopped = if let Some((cluster, touched)) = &mut self.cluster {
            let port = Redis::cluster_primary(cluster, self.failovers.len())
                .filter(|port| cluster.signal(*port, "STOP"));
            *touched = port;
            port.is_some()
        } else {
            let primary = self.primary;
            let stopped = self.servers[primary].signal("STOP");
            if stopped {
                self.paused = Some(primary);
            }
            stopped
        };
        if stopped {
            self.paused_at = Some(Instant::now());
        }
        stopped
    }

    /// Takes the server every sentinel names as the primary when they moved it on their own,
    /// so that the next fault on the primary strikes the one the nodes write to.
    fn follow_sentinels(&mut self) {
        if !self.sentinel_mode() || self.lost.is_some() || self.paused.is_some() {
            return;
        }
        let current = self.servers[self.primary].address();
        // One sentinel asked in the common case: the others only when it names another server.
        let Some(named) = self.sentinels.first().and_then(Sentinel::primary) else {
            return;
        };
        if named == current || !self.sentinels.iter().all(|s| s.primary() == Some(named)) {
            return;
        }
        if let Some(index) = self.servers.iter().position(|s| s.address() == named) {
            println!("chaos:          the sentinels promoted {named} on their own");
            self.primary = index;
            self.own_failovers += 1;
        }
    }

    /// SIGCONTs the server paused.
    pub fn resume(&mut self) {
        if let Some(at) = self.paused_at.take() {
            let paused = at.elapsed().as_secs_f64();
            println!("chaos:          redis resumed after {paused:.2}s");
        }
        if let Some((cluster, touched)) = &mut self.cluster {
            if let Some(port) = touched.take() {
                cluster.signal(port, "CONT");
            }
            return;
        }
        if let Some(index) = self.paused.take() {
            self.servers[index].signal("CONT");
        }
    }

    /// SIGKILLs the primary; with `wipe`, its directory is emptied too (the host is gone).
    pub fn kill_primary(&mut self, wipe: bool) -> std::io::Result<()> {
        if let Some((cluster, touched)) = &mut self.cluster {
            let port = Redis::cluster_primary(cluster, self.failovers.len())
                .ok_or_else(|| std::io::Error::other("no primary serves slots"))?;
            println!("chaos:          primary 127.0.0.1:{port}");
            cluster.kill(port);
            *touched = Some(port);
            self.lost = Some((usize::from(port), Instant::now()));
            return Ok(());
        }
        let primary = self.primary;
        self.lost = Some((primary, Instant::now()));
        self.hand_tried = false;
        if wipe {
            self.servers[primary].kill_and_wipe()
        } else {
            self.servers[primary].kill();
            Ok(())
        }
    }

    /// How long ago the primary was lost, while it waits for a failover.
    pub fn lost_for(&self) -> Option<Duration> {
        self.lost.map(|(_, at)| at.elapsed())
    }

    /// How long ago the lost primary was started again as a replica, while the new primary
    /// waits for its replicas.
    pub fn rejoining_for(&self) -> Option<Duration> {
        self.rejoining.map(|at| at.elapsed())
    }

    /// Starts the server killed by [`Redis::kill_primary`] again: a single Redis at once, on its
    /// append-only file; in sentinel mode once every sentinel names another primary, as a replica
    /// of it (empty if it was wiped). `Ok(false)` while the failover has not happened yet; in
    /// sentinel mode a replica is promoted by hand once the sentinels have not for
    /// `promote_after`, and Redis is back only once the new primary has every replica online
    /// (until then the nodes' writes cannot reach `min_replicas`: no node can take orders over).
    pub fn restart_lost(&mut self) -> std::io::Result<bool> {
        if let Some(since) = self.rejoining {
            self.follow_sentinels();
            let back = self.servers[self.primary].has_replicas_online(REPLICAS);
            if back {
                self.rejoins.push(since.elapsed().as_secs_f64());
                self.rejoining = None;
            }
            return Ok(back);
        }
        let Some((lost, at)) = self.lost else {
            return Ok(true);
        };
        if let Some((cluster, touched)) = &mut self.cluster {
            // Once a replica serves the killed primary's slots, it comes back as a replica.
            if cluster.primaries().len() < PRIMARIES {
                return Ok(false);
            }
            self.failovers.push(at.elapsed().as_secs_f64());
            self.lost = None;
            let port = u16::try_from(lost).map_err(std::io::Error::other)?;
            *touched = None;
            return cluster.restart(port).map(|()| true);
        }
        if !self.sentinel_mode() {
            self.lost = None;
            return self.servers[lost].try_restart().map(|()| true);
        }
        let named: Vec<Option<SocketAddr>> = self.sentinels.iter().map(Sentinel::primary).collect();
        let promoted = named.first().copied().flatten().and_then(|address| {
            self.servers
                .iter()
                .position(|server| server.address() == address)
        });
        let Some(promoted) =
            promoted.filter(|index| *index != lost && named.iter().all(|name| *name == named[0]))
        else {
            return self.replace_by_hand(lost, at, &named);
        };
        self.failovers.push(at.elapsed().as_secs_f64());
        self.primary = promoted;
        self.lost = None;
        let address = self.servers[promoted].address();
        self.servers[lost].try_restart_as_replica_of(address)?;
        self.rejoining = Some(Instant::now());
        Ok(false)
    }

    /// A lost primary the sentinels have not replaced within `promote_after`: once every
    /// sentinel still names it, a replica is promoted by hand ([`Redis::promote_by_hand`]), the
    /// lost server starts again as its replica and every sentinel watches it. Tried once per
    /// loss; `Ok(false)` until then, or when it failed.
    fn replace_by_hand(
        &mut self,
        lost: usize,
        at: Instant,
        named: &[Option<SocketAddr>],
    ) -> std::io::Result<bool> {
        // Only while every sentinel still names the lost one: none is midway through a
        // failover of its own.
        let lost_address = self.servers[lost].address();
        if self.hand_tried
            || at.elapsed() < self.promote_after
            || !named.iter().all(|name| *name == Some(lost_address))
        {
            return Ok(false);
        }
        self.hand_tried = true;
        let promoted = match self.promote_by_hand(lost) {
            Ok(promoted) => promoted,
            Err(error) => {
                println!("chaos:          cannot promote a replica by hand: {error}");
                return Ok(false);
            }
        };
        let address = self.servers[promoted].address();
        let after = self.promote_after;
        println!("chaos:          no failover in {after:?}: promoted {address} by hand");
        self.hand_failovers += 1;
        self.reforming = true;
        self.primary = promoted;
        self.lost = None;
        // Its replica before the sentinels look at the new primary: they find it at once.
        self.servers[lost].try_restart_as_replica_of(address)?;
        self.rejoining = Some(Instant::now());
        for sentinel in &self.sentinels {
            if let Err(error) = sentinel.watch(address) {
                println!("chaos:          cannot point a sentinel at {address}: {error}");
            }
        }
        Ok(false)
    }

    /// What an operator does when the sentinels do not fail over: the running replica furthest
    /// along the lost primary's stream becomes the primary (`REPLICAOF NO ONE`) and any other
    /// replica follows it; the caller then points the sentinels at it. Returns its index.
    fn promote_by_hand(&self, lost: usize) -> Result<usize, String> {
        let offset = |server: &RedisServer| {
            server
                .info_on("replication", "slave_repl_offset")
                .and_then(|offset| offset.parse::<u64>().ok())
        };
        let (chosen, _) = self
            .servers
            .iter()
            .enumerate()
            .filter(|(index, server)| *index != lost && server.is_running())
            .filter_map(|(index, server)| Some((index, offset(server)?)))
            .max_by_key(|(_, offset)| *offset)
            .ok_or("no running replica says how far it got")?;
        let address = self.servers[chosen].address();
        let chosen_server = &self.servers[chosen];
        command(
            chosen_server.host,
            chosen_server.port,
            &["REPLICAOF", "NO", "ONE"],
        )?;
        let (host, port) = (address.ip().to_string(), address.port().to_string());
        for (index, server) in self.servers.iter().enumerate() {
            if index != lost && index != chosen && server.is_running() {
                command(server.host, server.port, &["REPLICAOF", &host, &port])?;
            }
        }
        Ok(chosen)
    }
}

/// Sends `args` to the server or sentinel at `host:port`: an error unless it answers OK.
fn command(host: IpAddr, port: u16, args: &[&str]) -> Result<(), String> {
    match cli_on(host, port, args).as_deref() {
        Some("OK") => Ok(()),
        other => Err(format!(
            "{host}:{port} answered {other:?} to {}",
            args.join(" ")
        )),
    }
}

/// Polls `check` every 100 ms until it holds or `within` has passed; whether it held.
fn wait_for(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lost primary whose replicas Sentinel will not promote (`replica-priority 0` here; a
    /// stalled machine, or a link down too long, elsewhere) is replaced by hand: the sentinels
    /// then name the promoted replica and know it, the lost server comes back as its replica.
    #[test]
    fn a_primary_the_sentinels_do_not_replace_is_replaced_by_hand() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut redis = Redis::start(dir.path(), "everysec", None, true)
            .expect("a primary, replicas, sentinels");
        redis.promote_after = Duration::from_secs(1);
        for replica in &redis.servers[1..] {
            let args = ["CONFIG", "SET", "replica-priority", "0"];
            command(replica.host, replica.port, &args).expect("replica-priority 0");
        }
        let lost = redis.servers[0].address();
        redis.kill_primary(true).expect("kill the primary");
        let replaced = wait_for(Duration::from_secs(60), || {
            redis.restart_lost().expect("start the lost primary again")
        });
        assert!(replaced, "the lost primary was not replaced within 60 s");
        assert_eq!((redis.hand_failovers, redis.failovers.len()), (1, 0));
        let primary = redis.primary().address();
        assert_ne!(primary, lost);
        for sentinel in &redis.sentinels {
            assert_eq!(
                sentinel.primary(),
                Some(primary),
                "sentinel {}",
                sentinel.port
            );
        }
        assert!(
            wait_for(Duration::from_secs(60), || redis.ready()),
            "the promoted primary did not get both replicas, or the sentinels did not find them"
        );
    }

    /// A lost primary counts as replaced only once the new primary has every replica online:
    /// before, no write reaches the nodes' `min_replicas`. Here the lost server, started again
    /// as a replica, is killed at once and started again only later.
    #[test]
    fn a_lost_primary_is_back_only_once_every_replica_is_online() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut redis = Redis::start(dir.path(), "everysec", None, true)
            .expect("a primary, replicas, sentinels");
        let lost = redis.primary;
        redis.kill_primary(true).expect("kill the primary");
        let started_again = wait_for(Duration::from_secs(60), || {
            let back = redis.restart_lost().expect("start the lost primary again");
            if redis.lost.is_none() {
                redis.servers[lost].kill();
                return true;
            }
            assert!(!back, "back before the lost primary started again");
            false
        });
        assert!(started_again, "no failover within 60 s");
        let down = Instant::now();
        while down.elapsed() < Duration::from_secs(2) {
            let back = redis.restart_lost().expect("ask again");
            assert!(!back, "back while a replica is down");
            assert!(!redis.ready());
            std::thread::sleep(Duration::from_millis(100));
        }
        redis.servers[lost]
            .try_restart()
            .expect("start the replica again");
        let back = wait_for(Duration::from_secs(60), || {
            redis.restart_lost().expect("ask again")
        });
        assert!(back, "the replicas were not back within 60 s");
        assert!(redis.primary().has_replicas_online(REPLICAS));
    }

    #[test]
    fn a_switch_of_primary_is_read_with_its_time() {
        let line = "22079:X 02 Dec 2026 04:49:55.109 # +switch-master orders 10.1.1.14 33305 10.1.1.15 44047";
        let at = switch_time(line).map(|at| at.to_rfc3339());
        assert_eq!(at.as_deref(), Some("2026-12-02T04:49:55.109+00:00"));
        let other =
            "22079:X 02 Dec 2026 04:49:53.867 # +failover-end master orders 10.1.1.16 40931";
        assert_eq!(switch_time(other), None);
    }
}
