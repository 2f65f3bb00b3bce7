//! The fault schedule: a shuffled bag of every kind of fault, drawn from the seed; each fault
//! made on its victim, its recovery scheduled, and everything healed at the end.

use crate::campaign::elapsed;
use crate::clock;
use crate::duplicate::{self, Fate};
use crate::faults::{recover, rolling_restart, Fault, Kind, Recovery};
use crate::links::{self, Direction, Rule};
use crate::netns::node_host;
use crate::report::{is_redis_outage, Violation};
use crate::world::{wait_ready, Exit, Node, Tls, World, NODES};
use chrono::Utc;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What a fault needs to start processes of its own: the node binary, Redis and the ledger.
/// How long after losing the Redis primary the sentinels must have promoted a replica.
const FAILOVER_BOUND: Duration = Duration::from_secs(60);
/// How long after the lost primary starts again as a replica the new primary must have every
/// replica online (a full sync of the wiped one, the other one following the new primary).
const REJOIN_BOUND: Duration = Duration::from_secs(60);
/// With `spaced`: how long the cluster stays whole (every node up, Redis up, nothing pending)
/// before the next fault, so the last fault's takeover and rejoin are over.
const SETTLE: Duration = Duration::from_secs(5);
/// With `spaced`: how often it is checked whether the cluster is whole again.
const SETTLE_POLL: Duration = Duration::from_millis(250);

pub struct Spawn {
    pub bin: PathBuf,
    /// The `[database]` lines of a node's config.
    pub database: String,
    pub ledger: String,
    /// libfaketime, when installed (the clock skew fault needs it).
    pub faketime: Option<PathBuf>,
    /// The certificates of `--https`.
    pub tls: Option<Tls>,
}

/// The fault schedule: a shuffled bag of every kind, drawn from the seed, and what was made.
pub struct Faults {
    rng: StdRng,
    /// Kinds left out (asked, or not possible here).
    skip: Vec<Kind>,
    spawn: Spawn,
    /// What became of each duplicate node, by fate.
    pub duplicates: BTreeMap<&'static str, usize>,
    /// The largest clock offset given to a node, in seconds.
    pub max_skew: i64,
    bag: Vec<Kind>,
    /// Recoveries due: when, what, and the fault they end.
    pending: Vec<(Instant, Recovery, usize)>,
    pub done: Vec<Fault>,
    pub violations: Vec<Violation>,
    /// Drains that exited 0, of all drains.
    pub drains: (usize, usize),
    /// Nodes started again after they refused to start (too few replicas during a failover).
    pub refused_starts: usize,
    /// Nodes started again after they refused to start because another process held their
    /// node id (a copy of their data dir took it first).
    pub id_in_use: usize,
    /// One fault at a time, each once the cluster has been whole for [`SETTLE`].
    pub spaced: bool,
}

impl Faults {
    pub fn new(seed: u64, skip: Vec<Kind>, spawn: Spawn) -> Faults {
        Faults {
            rng: StdRng::seed_from_u64(seed),
            skip,
            spawn,
            duplicates: BTreeMap::new(),
            max_skew: 0,
            bag: Vec::new(),
            pending: Vec::new(),
            done: Vec::new(),
            violations: Vec::new(),
            drains: (0, 0),
            refused_starts: 0,
            id_in_use: 0,
            spaced: false,
        }
    }

    fn later(&mut self, low: u64, high: u64) -> Instant {
        Instant::now() + Duration::from_millis(self.rng.random_range(low..high))
    }

    /// Makes faults at random for `duration`, recovering each when it is due.
    pub async fn make(
        &mut self,
        world: &mut World,
        client: &reqwest::Client,
        bases: &[String],
        started: Instant,
        duration: Duration,
    ) {
        let mut next_fault = self.later(1000, 3000);
        let mut whole_since: Option<Instant> = None;
        while started.elapsed() < duration {
            let wake = self
                .pending
                .iter()
                .map(|(at, _, _)| *at)
                .chain(std::iter::once(next_fault))
                .min()
                .unwrap_or(next_fault);
            tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await;
            self.recover_due(world, client).await;
            self.relaunch_exited(world);
            if self.spaced {
                if self.pending.is_empty() && world.healthy().len() == NODES && world.redis.ready()
                {
                    let since = *whole_since.get_or_insert_with(Instant::now);
                    next_fault = next_fault.max(since + SETTLE);
                } else {
                    whole_since = None;
                    next_fault = Instant::now() + SETTLE_POLL;
                    continue;
                }
            }
            // No fault starts while Redis is paused: a fault first asks the nodes what its victim
            // owns, which waits on Redis (up to 2 s a node), and the pause would outlast its
            // bound (in cluster mode, into a failover).
            if let Some(resume) = self.resume_redis_at() {
                next_fault = next_fault.max(resume);
            }
            if Instant::now() < next_fault {
                continue;
            }
            next_fault = self.later(2000, 6000);
            self.one(world, client, bases, started).await;
            whole_since = None;
        }
    }

    /// When the paused Redis is to be resumed, if it is paused.
    fn resume_redis_at(&self) -> Option<Instant> {
        self.pending
            .iter()
            .filter(|(_, recovery, _)| matches!(recovery, Recovery::ResumeRedis))
            .map(|(at, _, _)| *at)
            .min()
    }

    async fn recover_due(&mut self, world: &mut World, client: &reqwest::Client) {
        let now = Instant::now();
        let mut index = 0;
        while index < self.pending.len() {
            if self.pending[index].0 <= now {
                let (_, recovery, fault) = self.pending.remove(index);
                self.recover(world, client, recovery, fault).await;
            } else {
                index += 1;
            }
        }
    }

    async fn recover(
        &mut self,
        world: &mut World,
        client: &reqwest::Client,
        recovery: Recovery,
        fault: usize,
    ) {
        // Whether a node cut from Redis still owns orders, asked before it can renew its lease.
        if let Some(record) = self.done.get(fault).filter(|f| f.kind == Kind::CutRedis) {
            let owned = world.owned(client, &record.service_id).await;
            if let Some(record) = self.done.get_mut(fault) {
                record.owned_at_heal = owned;
            }
        }
        if !recover(world, &recovery, &mut self.violations).await {
            let again = Instant::now() + Duration::from_millis(200);
            match (world.redis.lost_for(), world.redis.rejoining_for()) {
                (Some(lost), _) if lost < FAILOVER_BOUND => {
                    self.pending.push((again, recovery, fault));
                }
                (None, Some(rejoining)) if rejoining < REJOIN_BOUND => {
                    self.pending.push((again, recovery, fault));
                }
                (None, Some(_)) => self.violations.push(Violation {
                    kind: "no_replicas".into(),
                    order_id: None,
                    detail: format!(
                        "the new primary had not every replica online {REJOIN_BOUND:?} after the lost one started again"
                    ),
                }),
                _ => self.violations.push(Violation {
                    kind: "no_failover".into(),
                    order_id: None,
                    detail: format!("no new primary within {FAILOVER_BOUND:?} of losing it"),
                }),
            }
            return;
        }
        if let Some(fault) = self.done.get_mut(fault) {
            fault.healed = Some(Utc::now());
        }
    }

    /// The next kind from the bag that can be made now (refilled and shuffled when empty).
    fn draw(&mut self, world: &mut World, healthy: &[usize]) -> Option<Kind> {
        if self.bag.is_empty() {
            self.bag = Kind::ALL
                .iter()
                .copied()
                .filter(|kind| !self.skip.contains(kind))
                .collect();
            // Losing the primary is what sentinel and cluster mode are for: twice in every bag.
            for kind in [Kind::LoseRedisPrimary, Kind::KillRedisPrimary] {
                if !self.skip.contains(&kind) {
                    self.bag.push(kind);
                }
            }
            self.bag.shuffle(&mut self.rng);
        }
        let redis = world.redis.ready();
        let quiet = self.pending.is_empty() && healthy.len() == NODES && redis;
        let position = self.bag.iter().position(|kind| match kind {
            Kind::KillRedis
            | Kind::PauseRedis
            | Kind::LoseRedisPrimary
            | Kind::KillRedisPrimary => redis,
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
        // A copy of a node's data dir, or a drain, is made of a cluster that serves: a node
        // still waiting for its old process's lease would race the copy for it.
        if matches!(kind, Kind::DuplicateNode | Kind::RollingRestart)
            && !Self::all_serving(world, client).await
        {
            self.bag.push(kind);
            return;
        }
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
            | Kind::InterruptedTakeover
            | Kind::CutRedis
            | Kind::OneWayPartition
            | Kind::LossyLink => Some(healthy[self.rng.random_range(0..healthy.len())]),
            Kind::KillRedis
            | Kind::PauseRedis
            | Kind::LoseRedisPrimary
            | Kind::KillRedisPrimary
            | Kind::RollingRestart => None,
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
            owned_at_heal: None,
            lease_taken: false,
            died: None,
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
                if let Some(record) = self.done.get_mut(fault) {
                    record.died = Some(Utc::now());
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
                let rules = if world.links.in_namespaces() {
                    links::addresses(&node_host(index), &peers(world, index), Direction::Both)
                } else {
                    links::loopback_gossip(world.nodes[index].port)
                };
                cut(world, index, rules);
                let at = self.later(4000, 10000);
                self.pending.push((at, Recovery::Heal(index), fault));
            }
            (Kind::OneWayPartition, Some(index)) => {
                let direction = if self.rng.random_bool(0.5) {
                    Direction::Outgoing
                } else {
                    Direction::Incoming
                };
                println!("chaos:          n{index}: {}", direction.name());
                let rules = links::addresses(&node_host(index), &peers(world, index), direction);
                cut(world, index, rules);
                let at = self.later(4000, 10000);
                self.pending.push((at, Recovery::Heal(index), fault));
            }
            (Kind::CutRedis, Some(index)) => {
                // Every Redis address: in sentinel mode the replicas and the sentinels too.
                let redis = world.redis.hosts();
                let rules = links::addresses(&node_host(index), &redis, Direction::Both);
                cut(world, index, rules);
                // Around the takeover bound: the liveness lease (3 s) plus `cluster.takeover_after`
                // (1 s) and a sweep, shorter and longer.
                let at = self.later(2000, 14000);
                self.pending.push((at, Recovery::Heal(index), fault));
            }
            (Kind::LossyLink, Some(index)) => {
                let percent = self.rng.random_range(10..=30u32);
                println!(
                    "chaos:          n{index}: {percent} % of the packets on its link dropped"
                );
                let rules = links::lossy(&node_host(index), f64::from(percent) / 100.0);
                cut(world, index, rules);
                let at = self.later(4000, 10000);
                self.pending.push((at, Recovery::Heal(index), fault));
            }
            (Kind::PauseRedis, _) => self.pause_redis(world, fault),
            (Kind::DuplicateNode, Some(index)) => {
                let join = world
                    .nodes
                    .iter()
                    .filter(|node| node.index != index)
                    .map(Node::address)
                    .collect();
                let (fate, detail) = duplicate::run(
                    &world.nodes[index],
                    &self.spawn.bin,
                    &self.spawn.database,
                    &self.spawn.ledger,
                    self.spawn.tls.as_ref(),
                    join,
                )
                .await;
                println!("chaos:          duplicate of n{index}: {fate:?} ({detail})");
                *self.duplicates.entry(fate.name()).or_default() += 1;
                let lease_free =
                    fate == Fate::TookExpiredLease && self.kept_from_redis(index, fault);
                if let Some(record) = self.done.get_mut(fault) {
                    record.lease_taken = lease_free;
                }
                if matches!(fate, Fate::ExitedZero | Fate::StillRunning)
                    || (fate == Fate::TookExpiredLease && !lease_free)
                {
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
            (Kind::KillRedis | Kind::LoseRedisPrimary | Kind::KillRedisPrimary, _) => {
                let wipe = kind == Kind::LoseRedisPrimary;
                if world.redis.sentinel_mode() {
                    let primary = world.redis.primary().address();
                    println!("chaos:          primary {primary}");
                }
                if let Err(error) = world.redis.kill_primary(wipe) {
                    println!("chaos: notice: cannot wipe the redis primary's dir: {error}");
                }
                // A single Redis restarts then; in sentinel mode the old primary comes back as a
                // replica once a replica has been promoted (that can take longer).
                let at = self.later(300, if wipe { 3000 } else { 5000 });
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
                self.pause_redis(world, fault);
            }
        }
        let at = self.later(3000, 10000);
        self.pending.push((at, Recovery::Restart(index), fault));
    }

    /// Whether, while duplicate fault `fault` of node `index` ran, an outage could have kept the
    /// node from renewing its lease (Redis out, or the node cut from it or paused), or had just
    /// ended (the node renews at most a second after).
    fn kept_from_redis(&self, index: usize, fault: usize) -> bool {
        let Some(duplicate) = self.done.get(fault) else {
            return false;
        };
        let slack = chrono::Duration::seconds(2);
        self.done.iter().enumerate().any(|(other, outage)| {
            other != fault
                && (is_redis_outage(outage.kind)
                    || (outage.node == Some(index)
                        && matches!(outage.kind, Kind::CutRedis | Kind::PauseNode)))
                && outage
                    .healed
                    .is_none_or(|healed| healed + slack > duplicate.at)
        })
    }

    /// SIGSTOPs the Redis primary, and schedules its SIGCONT: around `database.timeout` (1 s),
    /// shorter, about as long and longer; in sentinel mode shorter than a failover takes to start.
    fn pause_redis(&mut self, world: &mut World, fault: usize) {
        world.redis.pause();
        let (low, high) = world.redis.pause_range();
        let at = self.later(low, high);
        self.pending.push((at, Recovery::ResumeRedis, fault));
    }

    /// Starts again, as a service manager would (`Restart=on-failure`), each node that exited
    /// by itself: one that refused to start (a start in the middle of a failover finds the new
    /// primary without its replicas yet; a copy of its data dir took its node id first) is
    /// counted, any other exit is a violation.
    fn relaunch_exited(&mut self, world: &mut World) {
        for node in &mut world.nodes {
            let Some(exit) = node.exited() else {
                continue;
            };
            let why = match exit {
                Exit::TooFewReplicas => {
                    self.refused_starts += 1;
                    "refused to start (too few redis replicas)".to_string()
                }
                Exit::NodeIdInUse => {
                    self.id_in_use += 1;
                    "refused to start (its node id in use by another process)".to_string()
                }
                Exit::Other(status) => {
                    self.violations.push(Violation {
                        kind: "node_exited".into(),
                        order_id: None,
                        detail: format!("n{} exited by itself: {status}", node.index),
                    });
                    format!("exited by itself ({status})")
                }
            };
            println!("chaos:          n{} {why}, started again", node.index);
            if let Err(error) = node.launch() {
                self.violations.push(Violation {
                    kind: "restart_failed".into(),
                    order_id: None,
                    detail: format!("n{}: {error}", node.index),
                });
            }
        }
    }

    /// Whether every node answers its heartbeat: each holds its node id's lease and serves (a
    /// node restarted a moment ago may still wait for its old process's lease to expire).
    async fn all_serving(world: &World, client: &reqwest::Client) -> bool {
        for node in &world.nodes {
            if !wait_ready(client, &node.base(), Duration::from_secs(1)).await {
                return false;
            }
        }
        true
    }

    /// Recovers from every fault still in effect, in the order they were due (a Redis restart
    /// waits for its failover), then sees every node running.
    pub async fn heal_all(&mut self, world: &mut World, client: &reqwest::Client) {
        while !self.pending.is_empty() {
            let mut pending = std::mem::take(&mut self.pending);
            pending.sort_by_key(|(at, _, _)| *at);
            for (_, recovery, fault) in pending {
                self.recover(world, client, recovery, fault).await;
            }
            if !self.pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.relaunch_exited(world);
            let mut ready = true;
            for node in &world.nodes {
                ready &= wait_ready(client, &node.base(), Duration::from_secs(1)).await;
            }
            if ready || Instant::now() >= deadline {
                return;
            }
        }
    }

    /// Stops the nodes the way an operator would: each must drain and exit 0.
    pub async fn drain_all(&mut self, world: &mut World) {
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

/// The addresses of node `index`'s peers (what a partition in namespaces cuts it from).
fn peers(world: &World, index: usize) -> Vec<IpAddr> {
    world
        .nodes
        .iter()
        .filter(|node| node.index != index)
        .filter_map(|node| node.host.parse().ok())
        .collect()
}

/// Adds the rules of a link fault on node `index`, saying so if iptables refused one.
fn cut(world: &mut World, index: usize, rules: Vec<Rule>) {
    if !world.links.cut(index, rules) {
        println!("chaos: notice: iptables refused a rule of the fault on n{index}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults() -> Faults {
        let spawn = Spawn {
            bin: PathBuf::from("order-process"),
            database: String::new(),
            ledger: String::new(),
            faketime: None,
            tls: None,
        };
        Faults::new(1, Vec::new(), spawn)
    }

    /// The next fault waits for a paused Redis to be resumed, and only for that.
    #[test]
    fn a_paused_redis_is_resumed_before_the_next_fault() {
        let mut faults = faults();
        let now = Instant::now();
        let (soon, later) = (now + Duration::from_secs(1), now + Duration::from_secs(5));
        faults.pending.push((soon, Recovery::Restart(0), 0));
        faults.pending.push((later, Recovery::Resume(1), 1));
        assert_eq!(faults.resume_redis_at(), None);
        faults.pending.push((later, Recovery::ResumeRedis, 2));
        assert_eq!(faults.resume_redis_at(), Some(later));
    }
}
