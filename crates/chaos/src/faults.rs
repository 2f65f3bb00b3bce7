//! The kinds of fault the campaign makes, the record of each, and how each is undone.

use crate::report::Violation;
use crate::world::{wait_formed, wait_ready, World};
use chrono::{DateTime, Utc};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    KillNode,
    KillLeader,
    PauseNode,
    KillRedis,
    Partition,
    RollingRestart,
    /// SIGTERM, then SIGKILL while the node drains (hands over its orders).
    KillDraining,
    /// SIGSTOP redis-server for about `database.timeout`, then SIGCONT.
    PauseRedis,
    /// A second process from a copy of a live node's data dir.
    DuplicateNode,
    /// A node restarted with its wall clock 5–30 s ahead or behind.
    SkewClock,
    /// A node killed, then Redis paused or the leader killed while its orders move.
    InterruptedTakeover,
    /// A node cut from Redis (not from its peers) past its liveness lease; namespaces only.
    CutRedis,
    /// A node's packets to its peers dropped, or theirs to it, not both; namespaces only.
    OneWayPartition,
    /// A share of the packets on a node's link dropped at random; namespaces only.
    LossyLink,
    /// The Redis primary's host lost: SIGKILL, its directory wiped, a failover, and the host
    /// back as an empty replica; sentinel mode only.
    LoseRedisPrimary,
    /// A primary of the Redis Cluster SIGKILLed: its replica takes over, and it comes back as
    /// a replica; cluster mode only.
    KillRedisPrimary,
}

impl Kind {
    pub const ALL: [Kind; 16] = [
        Kind::KillNode,
        Kind::KillLeader,
        Kind::PauseNode,
        Kind::KillRedis,
        Kind::Partition,
        Kind::RollingRestart,
        Kind::KillDraining,
        Kind::PauseRedis,
        Kind::DuplicateNode,
        Kind::SkewClock,
        Kind::InterruptedTakeover,
        Kind::CutRedis,
        Kind::OneWayPartition,
        Kind::LossyLink,
        Kind::LoseRedisPrimary,
        Kind::KillRedisPrimary,
    ];

    /// The kinds only network namespaces make possible (a node's own links).
    pub const NAMESPACED: [Kind; 3] = [Kind::CutRedis, Kind::OneWayPartition, Kind::LossyLink];

    /// The kinds made with iptables.
    pub const IPTABLES: [Kind; 4] = [
        Kind::Partition,
        Kind::CutRedis,
        Kind::OneWayPartition,
        Kind::LossyLink,
    ];

    /// The kind of this name, as [`Kind::name`] spells it.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::KillNode => "kill_node",
            Kind::KillLeader => "kill_leader",
            Kind::PauseNode => "pause_node",
            Kind::KillRedis => "kill_redis",
            Kind::Partition => "partition",
            Kind::RollingRestart => "rolling_restart",
            Kind::KillDraining => "kill_draining",
            Kind::PauseRedis => "pause_redis",
            Kind::DuplicateNode => "duplicate_node",
            Kind::SkewClock => "skew_clock",
            Kind::InterruptedTakeover => "interrupted_takeover",
            Kind::CutRedis => "cut_redis",
            Kind::OneWayPartition => "one_way_partition",
            Kind::LossyLink => "lossy_link",
            Kind::LoseRedisPrimary => "lose_redis_primary",
            Kind::KillRedisPrimary => "kill_redis_primary",
        }
    }
}

/// One fault made.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: Kind,
    pub node: Option<usize>,
    pub service_id: Option<String>,
    pub at: DateTime<Utc>,
    pub healed: Option<DateTime<Utc>>,
    /// Unfinished orders the victim owned when the fault began (None: Redis did not say).
    pub owned: Option<usize>,
    /// For a cut from Redis: the orders the victim still owned when the cut was healed.
    pub owned_at_heal: Option<usize>,
    /// For a duplicate node: it took the node id's lease, expired while an outage kept the
    /// first process from renewing it; its ledger calls are then not a violation.
    pub lease_taken: bool,
    /// For a drain cut short: when the process was killed (or exited by itself). Until then it
    /// held its liveness lease and finished its steps, as a drain does.
    pub died: Option<DateTime<Utc>>,
}

impl Fault {
    /// From when the victim's orders wait for a takeover: the fault, or for a drain cut short
    /// the kill that ended it.
    pub fn takeover_from(&self) -> DateTime<Utc> {
        self.died.unwrap_or(self.at).max(self.at)
    }
}

/// Until when a write a link fault held back may still arrive: TCP sends it again after a
/// timeout that starts at 200 ms and doubles, so its next try after the heal comes within
/// about as long as it had waited, at most the fault's length; a second is added for the
/// first timeouts and the write's way.
pub fn late_writes_until(done: &[Fault]) -> Option<DateTime<Utc>> {
    done.iter()
        .filter(|fault| Kind::IPTABLES.contains(&fault.kind))
        .filter_map(|fault| {
            let healed = fault.healed?;
            Some(healed + (healed - fault.at) + chrono::Duration::seconds(1))
        })
        .max()
}

pub enum Recovery {
    Restart(usize),
    Resume(usize),
    /// Start the Redis primary killed again: at once for a single Redis; in sentinel mode once
    /// the sentinels have promoted a replica, as a replica of it; in cluster mode once a replica
    /// serves its slots, as a replica.
    RestartRedis,
    ResumeRedis,
    /// Remove the iptables rules of a node's link fault.
    Heal(usize),
    /// Restart a skewed node with the true clock.
    Unskew(usize),
}

/// Drains every node in turn once it answers its heartbeat (SIGTERM, exit 0 expected),
/// restarting each before the next.
/// Returns the nodes whose drain did not exit cleanly.
pub async fn rolling_restart(
    client: &reqwest::Client,
    world: &mut World,
    bases: &[String],
    drains: &mut (usize, usize),
) -> Vec<String> {
    let mut unclean = Vec::new();
    for index in 0..world.nodes.len() {
        let node = &mut world.nodes[index];
        // As an operator would: drain a node that serves, not one still starting (restarted by a
        // recovery a moment ago, waiting for its predecessor's lease).
        wait_ready(client, &node.base(), Duration::from_secs(30)).await;
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

/// Undoes one fault; a process that cannot start again is a violation. False when it cannot be
/// undone yet (no failover yet): try again shortly.
pub async fn recover(
    world: &mut World,
    recovery: &Recovery,
    violations: &mut Vec<Violation>,
) -> bool {
    match *recovery {
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
        Recovery::RestartRedis => match world.redis.restart_lost() {
            Ok(done) => return done,
            Err(error) => violations.push(Violation {
                kind: "restart_failed".into(),
                order_id: None,
                detail: format!("redis: {error}"),
            }),
        },
        Recovery::ResumeRedis => world.redis.resume(),
        Recovery::Unskew(index) => {
            let node = &mut world.nodes[index];
            node.kill();
            node.env.clear();
            if let Err(error) = node.launch() {
                violations.push(Violation {
                    kind: "restart_failed".into(),
                    order_id: None,
                    detail: format!("n{index} with the true clock: {error}"),
                });
            }
        }
        Recovery::Heal(index) => world.links.heal(index),
    }
    true
}
