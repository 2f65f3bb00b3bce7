//! The verdict: every accepted order checked against its history, the ledger and the logs,
//! takeover times measured from the faults, and the summary printed.

use crate::checks::{check_effects, check_history, with_ordered_times, End};
use crate::faults::{Fault, Kind};
use crate::ledger::Books;
use crate::ledger::Outcome;
use crate::load::Seen;
use crate::logs::Logs;
use crate::world::{DUPLICATE_BASE, LIVENESS_TTL, NODES};
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// A node down this long with orders must have seen them taken over within this bound, counted
/// from when Redis and some other node were last able to take them over ([`Outages`]).
pub const TAKEOVER_BOUND: Duration = Duration::from_secs(15);

/// How long after a node is cut from Redis it may still start a step: its liveness lease, renewed
/// at most just before the cut, and a second for a start on a loaded machine.
pub const CUT_GRACE: Duration = Duration::from_secs(LIVENESS_TTL.as_secs() + 1);
/// How long before a cut's recorded heal a call is not counted against it: the heal takes its
/// rules out one by one (many with Sentinel's servers), and the node may reach Redis, renew its
/// lease and start a step before the last one is gone.
pub const HEAL_GRACE: Duration = Duration::from_secs(1);

/// A node cut from Redis this long, owning orders, must see them taken over while no other fault
/// holds takeovers back: its liveness lease runs out, the leader waits `cluster.takeover_after`
/// (1 s) and a sweep, and there are 6 s to spare.
pub const CUT_TAKEOVER_BOUND: Duration = Duration::from_secs(LIVENESS_TTL.as_secs() + 7);

/// How long after another fault ended it still disturbs a partition of the same node: a lease
/// that lapsed during it (a cut from Redis, a kill, a restart) is taken over in the seconds after
/// (the leader waits `cluster.takeover_after` and a sweep, and may have started the move before
/// the node renewed).
const AFTERMATH: chrono::Duration = chrono::Duration::seconds(5);

/// Whether another fault was in effect at some time during `fault`.
fn overlapped(faults: &[Fault], fault: &Fault) -> bool {
    overlapped_by(faults, fault, |_| true)
}

/// Whether another fault of a kind `which` picks was in effect at some time during `fault`.
fn overlapped_by(faults: &[Fault], fault: &Fault, which: impl Fn(Kind) -> bool) -> bool {
    let end = fault.healed.unwrap_or(DateTime::<Utc>::MAX_UTC);
    faults.iter().any(|other| {
        !std::ptr::eq(other, fault)
            && which(other.kind)
            && other.at < end
            && other.healed.unwrap_or(DateTime::<Utc>::MAX_UTC) > fault.at
    })
}

/// Faults that take Redis away from every node: takeovers wait for Redis to come back.
pub fn is_redis_outage(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::KillRedis | Kind::PauseRedis | Kind::LoseRedisPrimary | Kind::KillRedisPrimary
    )
}

/// A stretch of time, on the true clock.
type Span = (DateTime<Utc>, DateTime<Utc>);

/// How long a node restarted by the campaign may take to serve when its log never says so (it
/// was killed again first, or its log was lost).
const START_BOUND: chrono::Duration = chrono::Duration::seconds(15);

/// When no node could take a victim's orders over: when Redis was out for every node, and when
/// each node was down, paused, starting again or cut from Redis. A takeover is measured from
/// the last moment some node other than the victim became able to make it.
#[derive(Default)]
struct Outages {
    everyone: Vec<Span>,
    nodes: BTreeMap<usize, Vec<Span>>,
}

impl Outages {
    fn new(faults: &[Fault], logs: &Logs) -> Outages {
        let mut outages = Outages::default();
        // A node started again serves once it logs `listening` (it may first wait for its
        // previous process's lease to run out).
        let serving = |node: usize, from: DateTime<Utc>| {
            logs.lines
                .iter()
                .find(|line| line.node == node && line.at >= from && line.message == "listening")
                .map_or(from + START_BOUND, |line| line.at)
        };
        for fault in faults {
            let healed = fault.healed.unwrap_or(DateTime::<Utc>::MAX_UTC);
            if is_redis_outage(fault.kind) {
                outages.everyone.push((fault.at, healed));
                continue;
            }
            let Some(node) = fault.node else {
                continue;
            };
            let spans = outages.nodes.entry(node).or_default();
            match fault.kind {
                Kind::KillNode | Kind::KillLeader | Kind::KillDraining => {
                    spans.push((fault.at, serving(node, fault.at)));
                }
                Kind::PauseNode | Kind::CutRedis => spans.push((fault.at, healed)),
                // Started with a skewed clock, then again with the true one.
                Kind::SkewClock => {
                    spans.push((fault.at, serving(node, fault.at)));
                    if healed < DateTime::<Utc>::MAX_UTC {
                        spans.push((healed, serving(node, healed)));
                    }
                }
                // The victim killed, then the taker killed or Redis paused at a time not
                // recorded: no other takeover is measured through it.
                Kind::InterruptedTakeover => outages.everyone.push((fault.at, healed)),
                _ => {}
            }
        }
        outages
    }

    /// Whether `node` was down, paused, starting again or cut from Redis at some time between
    /// `from` and `to`.
    fn out_during(&self, node: usize, from: DateTime<Utc>, to: DateTime<Utc>) -> bool {
        self.nodes
            .get(&node)
            .is_some_and(|spans| spans.iter().any(|(start, end)| *start < to && *end > from))
    }

    /// Whether no node but `victim` was able to take orders over at `at`.
    fn blocked(&self, victim: usize, at: DateTime<Utc>) -> bool {
        let within = |spans: &[Span]| spans.iter().any(|(from, to)| *from <= at && at < *to);
        within(&self.everyone)
            || (0..NODES)
                .filter(|node| *node != victim)
                .all(|node| self.nodes.get(&node).is_some_and(|spans| within(spans)))
    }

    /// The start of the last stretch before `until` through which some node other than
    /// `victim` was able to take over, `from` at the earliest; `until` when none was at the end.
    fn able_since(
        &self,
        victim: usize,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> DateTime<Utc> {
        let mut changes: Vec<DateTime<Utc>> = self
            .everyone
            .iter()
            .chain(self.nodes.values().flatten())
            .flat_map(|(start, end)| [*start, *end])
            .filter(|at| from < *at && *at < until)
            .collect();
        changes.push(from);
        changes.sort();
        changes.dedup();
        // Between two changes nothing changes: the state at each change holds until the next.
        let mut since = until;
        for at in changes.into_iter().rev() {
            if self.blocked(victim, at) {
                break;
            }
            since = at;
        }
        since
    }
}

/// How long after a switch of primary a snapshot going backwards is put down to the failover:
/// nodes still connected to the old primary read and write there until it is demoted.
const FAILOVER_READS: chrono::Duration = chrono::Duration::seconds(20);

/// A violation found, with the order (if any) it is about.
pub struct Violation {
    pub kind: String,
    pub order_id: Option<String>,
    pub detail: String,
}

/// `N samples, p50 Xs, max Ys` of latencies in seconds (an hdrhistogram of milliseconds).
fn latencies(seconds: &[f64]) -> String {
    let (p50, p99, max) = Histogram::<u64>::new(3)
        .map(|mut millis| {
            for value in seconds {
                let _ = millis.record((value * 1000.0).round() as u64);
            }
            (
                millis.value_at_quantile(0.5) as f64 / 1000.0,
                millis.value_at_quantile(0.99) as f64 / 1000.0,
                millis.max() as f64 / 1000.0,
            )
        })
        .unwrap_or_default();
    format!(
        "{} samples, p50 {p50:.2}s, p99 {p99:.2}s, max {max:.2}s",
        seconds.len()
    )
}

/// The numbers of the summary.
#[derive(Default)]
pub struct Report {
    accepted: usize,
    accepted_on_retry: usize,
    unanswered: usize,
    completed: usize,
    declined: usize,
    cancelled: usize,
    lost: usize,
    takeovers: Vec<f64>,
    /// Takeovers measured from when a node other than the victim was last able to make them
    /// (see [`Outages`]), interrupted takeovers left out.
    takeovers_able: Vec<f64>,
    /// The slowest of those: seconds, and which fault of which node, when.
    slowest_able: Option<(f64, String)>,
    /// Of [`takeovers_able`](Report::takeovers_able), those of faults that no outage of Redis
    /// overlapped, and the slowest of them.
    takeovers_no_outage: Vec<f64>,
    slowest_no_outage: Option<(f64, String)>,
    /// Takeovers of faults that no other fault overlapped, interrupted takeovers left out.
    takeovers_alone: Vec<f64>,
    takeover_by_kind: BTreeMap<&'static str, Vec<f64>>,
    /// The slowest takeover: seconds, and which fault of which node, when.
    slowest_takeover: Option<(f64, String)>,
    /// Orders moved away from a node while only its gossip was cut (its lease held), in the
    /// partitions no other fault on that node, on Redis or on every node overlapped.
    moved_in_partitions: u64,
    /// Partitions that another fault on the same node, on Redis or on every node overlapped.
    partitions_disturbed: usize,
    /// Drains that finished before the kill came: their orders were handed over (or done), so
    /// there was no takeover to measure.
    drains_finished: usize,
    /// Pauses and cuts from Redis whose victim held its liveness lease again before any
    /// takeover: its orders were its own again, and a takeover after that is a later fault's.
    leases_back: usize,
    /// Effects applied more than once for one idempotency key (must be 0).
    effects_applied_twice: usize,
    /// Runs repeated with a key already applied: answered again, nothing applied (at-least-once
    /// execution allows them).
    repeated_runs: usize,
    /// Ledger calls made by a duplicate node (must be 0, but for those below).
    duplicate_node_calls: usize,
    /// Of those, calls by a duplicate that took the node id's lease once it had expired.
    duplicate_lease_calls: usize,
    /// Ledger calls made by a node cut from Redis after its lease ran out (must be 0).
    cut_node_calls: usize,
    /// Cuts from Redis of a node owning orders lasting [`CUT_TAKEOVER_BOUND`] or more, and how
    /// many of them ended with the node owning none (all taken over).
    redis_cuts: (usize, usize),
    /// Snapshots that went backwards soon after a failover (unacknowledged writes it lost).
    lost_in_failover: usize,
    /// Histories whose times are out of order only because a node's clock was skewed; their
    /// states were checked with the times left out.
    skewed_histories: usize,
    /// Further summary lines: label and text.
    pub lines: Vec<(&'static str, String)>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        seen: &Seen,
        stored: &HashMap<String, Value>,
        books: &Books,
        logs: &Logs,
        faults: &[Fault],
        max_skew: i64,
        failovers: &[DateTime<Utc>],
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
        for (id, problem, at) in &seen.regressions {
            // A failover in sentinel mode loses the writes not every replica had acknowledged
            // (their commits failed, and were retried), which a read of the old primary could see.
            let after_failover = failovers
                .iter()
                .any(|switch| *switch <= *at && *at - *switch <= FAILOVER_READS);
            if after_failover {
                report.lost_in_failover += 1;
                continue;
            }
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
            let mut checked = check_history(view, &generated.intent);
            // A node with a skewed clock writes its own times: the order of the times says
            // nothing then, the order of the states still must be legal.
            if max_skew > 0 && checked.as_ref().is_err_and(|p| p.kind == "illegal_history") {
                let again = check_history(&with_ordered_times(view), &generated.intent);
                if again.is_ok() {
                    report.skewed_histories += 1;
                    checked = again;
                }
            }
            let tolerance = chrono::Duration::seconds(max_skew);
            match checked {
                Ok(end) => {
                    match end {
                        End::Completed => report.completed += 1,
                        End::Declined(_) => report.declined += 1,
                        End::Cancelled(_) => report.cancelled += 1,
                    }
                    if let Err(problem) = check_effects(&id, view, end, books, tolerance) {
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
        let mut applied: HashMap<&str, usize> = HashMap::new();
        for call in &books.calls {
            match call.outcome {
                Outcome::Applied => *applied.entry(call.key.as_str()).or_default() += 1,
                Outcome::Duplicate => report.repeated_runs += 1,
                _ => {}
            }
            if call.node >= DUPLICATE_BASE {
                report.duplicate_node_calls += 1;
                let node = call.node - DUPLICATE_BASE;
                // A copy that took the node id's expired lease runs as the node.
                let as_the_node = faults.iter().any(|fault| {
                    fault.kind == Kind::DuplicateNode
                        && fault.lease_taken
                        && fault.node == Some(node)
                        && fault.at <= call.arrived
                        && fault.healed.is_none_or(|healed| call.arrived <= healed)
                });
                if as_the_node {
                    report.duplicate_lease_calls += 1;
                    continue;
                }
                push(
                    "duplicate_node_ran_step",
                    Some(&call.order_id),
                    format!(
                        "a copy of n{} called the ledger: {}",
                        call.node - DUPLICATE_BASE,
                        call.what()
                    ),
                );
            }
        }
        // A node cut from Redis cannot renew its liveness lease: once it has run out, the node
        // must start no step (run or compensation) until the cut is healed.
        for fault in faults.iter().filter(|fault| fault.kind == Kind::CutRedis) {
            let (Some(victim), Some(healed)) = (fault.node, fault.healed) else {
                continue;
            };
            let from = fault.at + chrono::Duration::from_std(CUT_GRACE).unwrap_or_default();
            let healed = healed - chrono::Duration::from_std(HEAL_GRACE).unwrap_or_default();
            let late = books
                .calls
                .iter()
                .filter(|call| call.node == victim && call.arrived > from && call.arrived < healed);
            for call in late {
                report.cut_node_calls += 1;
                let detail = format!(
                    "n{victim}, cut from redis at {} until {healed}, called the ledger at {}: {}",
                    fault.at,
                    call.arrived,
                    call.what()
                );
                push("step_while_cut_from_redis", Some(&call.order_id), detail);
            }
        }
        for (key, times) in applied {
            if times > 1 {
                report.effects_applied_twice += 1;
                push(
                    "effect_applied_twice",
                    key.split(':').next(),
                    format!("{key} applied {times} times"),
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
        // ("took over orders") or on the victim itself after its restart; and from when some
        // other node was last able to take them over.
        let outages = Outages::new(faults, logs);
        for fault in faults {
            if matches!(fault.kind, Kind::Partition | Kind::OneWayPartition) {
                // The partitioned node keeps its liveness lease: its orders should stay put,
                // unless something else disturbed the partition.
                let disturbed = partition_disturbed(faults, fault, &outages);
                if disturbed {
                    report.partitions_disturbed += 1;
                } else if let (Some(service_id), Some(healed)) =
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
                Kind::KillNode
                    | Kind::KillLeader
                    | Kind::PauseNode
                    | Kind::KillDraining
                    | Kind::InterruptedTakeover
                    | Kind::CutRedis
            ) {
                continue;
            }
            let (Some(victim), Some(service_id)) = (fault.node, fault.service_id.as_deref()) else {
                continue;
            };
            if fault.owned == Some(0) {
                continue;
            }
            if fault.kind == Kind::KillDraining && drain_finished(logs, victim, fault) {
                report.drains_finished += 1;
                continue;
            }
            // Only what happened while the fault lasted (and just after): later transfers of the
            // same node belong to later faults or to drains.
            let window_end = fault
                .healed
                .map(|healed| healed + chrono::Duration::seconds(5))
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            let start = fault.takeover_from();
            let resumed = logs.lines.iter().find(|line| {
                line.at >= start
                    && line.at <= window_end
                    && ((line.message == "took over orders"
                        && line.fields["from"].as_str() == Some(service_id)
                        && line.fields["orders"].as_u64().unwrap_or(0) > 0)
                        || (line.message == "resuming unfinished orders"
                            && line.node == victim
                            && !matches!(fault.kind, Kind::PauseNode | Kind::CutRedis)))
            });
            let down = fault
                .healed
                .map(|healed| (healed - fault.at).to_std().unwrap_or_default())
                .unwrap_or(Duration::MAX);
            if fault.kind == Kind::CutRedis && down >= CUT_TAKEOVER_BOUND {
                report.redis_cuts.0 += 1;
                report.redis_cuts.1 += usize::from(fault.owned_at_heal == Some(0));
                let left = fault.owned_at_heal.unwrap_or(0);
                if left > 0 && !overlapped(faults, fault) {
                    push(
                        "no_takeover",
                        None,
                        format!(
                            "n{victim} cut from redis at {} for {:.1}s, no other fault meanwhile: it still owned {left} orders when healed",
                            fault.at,
                            down.as_secs_f64(),
                        ),
                    );
                }
            }
            // A takeover needs Redis and a node to make it: the bound counts from when both were
            // last there. An interrupted takeover's interruption is not recorded: one that an
            // outage of Redis held back is bounded by the heal (the stuck check).
            let interrupted = fault.kind == Kind::InterruptedTakeover;
            let redis_out = overlapped_by(faults, fault, is_redis_outage);
            let too_slow = |latency: Duration, until: DateTime<Utc>| {
                if interrupted {
                    down > TAKEOVER_BOUND && latency > TAKEOVER_BOUND && !redis_out
                } else {
                    let since = outages.able_since(victim, start, until);
                    (until - since).to_std().unwrap_or_default() > TAKEOVER_BOUND
                }
            };
            if let Some(line) = resumed {
                if matches!(fault.kind, Kind::PauseNode | Kind::CutRedis)
                    && lease_back(logs, faults, victim, fault, line.at)
                {
                    report.leases_back += 1;
                    continue;
                }
            }
            match resumed {
                Some(line) => {
                    let latency = (line.at - start).to_std().unwrap_or_default();
                    let able = (line.at - outages.able_since(victim, start, line.at))
                        .to_std()
                        .unwrap_or_default();
                    report.takeovers.push(latency.as_secs_f64());
                    if report
                        .slowest_takeover
                        .as_ref()
                        .is_none_or(|(slowest, _)| latency.as_secs_f64() > *slowest)
                    {
                        let what = format!("{} of n{victim} at {}", fault.kind.name(), fault.at);
                        report.slowest_takeover = Some((latency.as_secs_f64(), what));
                    }
                    if fault.kind != Kind::InterruptedTakeover && !overlapped(faults, fault) {
                        report.takeovers_alone.push(latency.as_secs_f64());
                    }
                    if !interrupted {
                        let what = format!(
                            "{} of n{victim} at {}, {:.2}s in all",
                            fault.kind.name(),
                            fault.at,
                            latency.as_secs_f64()
                        );
                        report.takeovers_able.push(able.as_secs_f64());
                        if report
                            .slowest_able
                            .as_ref()
                            .is_none_or(|(slowest, _)| able.as_secs_f64() > *slowest)
                        {
                            report.slowest_able = Some((able.as_secs_f64(), what.clone()));
                        }
                        if !redis_out {
                            report.takeovers_no_outage.push(able.as_secs_f64());
                            if report
                                .slowest_no_outage
                                .as_ref()
                                .is_none_or(|(slowest, _)| able.as_secs_f64() > *slowest)
                            {
                                report.slowest_no_outage = Some((able.as_secs_f64(), what));
                            }
                        }
                    }
                    report
                        .takeover_by_kind
                        .entry(fault.kind.name())
                        .or_default()
                        .push(latency.as_secs_f64());
                    if too_slow(latency, line.at) {
                        push(
                            "slow_takeover",
                            None,
                            format!(
                                "{} of n{victim} at {}: orders resumed only after {:.1}s, {:.1}s after a node was last able to take them over",
                                fault.kind.name(),
                                fault.at,
                                latency.as_secs_f64(),
                                able.as_secs_f64()
                            ),
                        );
                    }
                }
                None if down > TAKEOVER_BOUND
                    && fault.owned.is_some_and(|owned| owned > 0)
                    && fault.healed.is_some_and(|healed| too_slow(down, healed)) =>
                {
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
        report
    }

    #[allow(clippy::too_many_arguments)]
    pub fn print(
        &self,
        seed: u64,
        duration: Duration,
        appendfsync: &str,
        faults: &[Fault],
        seen: &Seen,
        books: &Books,
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
        println!("rollback retry {}", list(&seen.rollback_retries));
        println!("ledger calls  {}: {}", books.calls.len(), list(&outcomes));
        println!(
            "fencing       stale commits refused {}, stale orders dropped before a step {}, stale runs refused by the ledger {}, stale epochs refused by the ledger {}, accepted stale writes {} (snapshots that went backwards; {} of them within 20 s of a failover, writes not every replica acknowledged)",
            logs.count("order is no longer ours, dropping it"),
            logs.count("order was taken over while the liveness lease lapsed, dropping it"),
            outcomes.get("late_run_refused").copied().unwrap_or(0),
            outcomes.get("stale_epoch_refused").copied().unwrap_or(0),
            seen.regressions.len(),
            self.lost_in_failover
        );
        println!(
            "takeover      {} (a drain cut short: from the kill; {} drains that finished first left out; {} pauses and cuts from redis whose node held its lease again first left out)",
            latencies(&self.takeovers),
            self.drains_finished,
            self.leases_back
        );
        for (kind, values) in &self.takeover_by_kind {
            println!("  {kind:<21}{}", latencies(values));
        }
        if let Some((seconds, what)) = &self.slowest_takeover {
            println!("  slowest: {what}, {seconds:.2}s");
        }
        println!(
            "takeover, from when a node was last able to make it (redis up, another node serving and reaching redis; not interrupted) {}",
            latencies(&self.takeovers_able)
        );
        if let Some((seconds, what)) = &self.slowest_able {
            println!("  slowest: {seconds:.2}s, {what}");
        }
        println!(
            "takeover, the same, faults no outage of redis overlapped {}",
            latencies(&self.takeovers_no_outage)
        );
        if let Some((seconds, what)) = &self.slowest_no_outage {
            println!("  slowest: {seconds:.2}s, {what}");
        }
        println!(
            "takeover, alone (no other fault meanwhile, not interrupted) {}",
            latencies(&self.takeovers_alone)
        );
        println!(
            "partitions    orders moved away from a partitioned node: {} (its lease holds, so 0 is expected; left out: {} partitions that a fault on the node, on redis or on every node overlapped)",
            self.moved_in_partitions, self.partitions_disturbed
        );
        if let Some(cuts) = by_kind.get(Kind::CutRedis.name()) {
            println!(
                "redis cuts    {cuts}; of those lasting {}s or more on a node owning orders, {} of {} ended with all of them taken over; ledger calls by a cut node after its lease ran out {}",
                CUT_TAKEOVER_BOUND.as_secs(),
                self.redis_cuts.1,
                self.redis_cuts.0,
                self.cut_node_calls
            );
        }
        println!(
            "effects       applied twice for one key {}, runs repeated with an applied key {} (answered again: at-least-once allows them), ledger calls by duplicate nodes {} ({} by a duplicate that took an expired lease)",
            self.effects_applied_twice,
            self.repeated_runs,
            self.duplicate_node_calls,
            self.duplicate_lease_calls
        );
        if self.skewed_histories > 0 {
            println!(
                "clocks        histories with times out of order from a skewed clock {} (states checked without the times)",
                self.skewed_histories
            );
        }
        for (label, text) in &self.lines {
            println!("{label:<14}{text}");
        }
        println!(
            "registry      owners of unfinished orders that a new leader's index repair found missing from the node registry {} (each one's orders had waited for that leader)",
            logs.count("an owner of unfinished orders was not registered; registered it so the sweep looks at it")
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

/// How many violations are listed one by one after the summary.
const LISTED: usize = 30;

/// Lists the first violations, one a line, then shows the first in full.
pub fn print_first(violations: &[Violation], stored: &HashMap<String, Value>, books: &Books) {
    let Some(first) = violations.first() else {
        return;
    };
    for violation in violations.iter().take(LISTED) {
        println!(
            "violation: {} {}: {}",
            violation.kind,
            violation.order_id.as_deref().unwrap_or("(no order)"),
            violation.detail
        );
    }
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

/// Whether another fault on the same node, on Redis or on every node overlapped partition
/// `fault`, or ended less than [`AFTERMATH`] before it; or the node, restarted by a fault that
/// ended before the partition began, did not serve yet (it waits for its old process's lease).
fn partition_disturbed(faults: &[Fault], fault: &Fault, outages: &Outages) -> bool {
    let end = fault.healed.unwrap_or(DateTime::<Utc>::MAX_UTC);
    faults.iter().any(|other| {
        !std::ptr::eq(other, fault)
            && (other.node.is_none() || other.node == fault.node)
            && other.at < end
            && other
                .healed
                .map_or(DateTime::<Utc>::MAX_UTC, |healed| healed + AFTERMATH)
                > fault.at
    }) || fault
        .node
        .is_some_and(|node| outages.out_during(node, fault.at, end))
}

/// Whether the drain of `fault` finished before its kill: the victim logged `stopped` between
/// the SIGTERM and its death, having handed over what it owned (or owning nothing by then).
fn drain_finished(logs: &Logs, victim: usize, fault: &Fault) -> bool {
    let (from, until) = (
        fault.at,
        fault.takeover_from() + chrono::Duration::seconds(1),
    );
    let during = |message: &str| {
        logs.lines.iter().any(|line| {
            line.node == victim && line.at >= from && line.at <= until && line.message == message
        })
    };
    during("stopped")
        && !during("no live peer took the unfinished orders; the leader's sweep will move them")
        && !during("cannot list unfinished orders to hand over; the leader will move them")
}

/// Whether the victim of `fault` (paused, or cut from Redis) logged its liveness lease renewed
/// after the fault healed and before `until`. Read only from a victim whose clock was true then:
/// a skewed clock could put a later renewal before `until`.
fn lease_back(
    logs: &Logs,
    faults: &[Fault],
    victim: usize,
    fault: &Fault,
    until: DateTime<Utc>,
) -> bool {
    let Some(healed) = fault.healed else {
        return false;
    };
    // A skewed process's last lines may come up to the largest skew after its restart.
    let skewed = faults.iter().any(|skew| {
        skew.kind == Kind::SkewClock
            && skew.node == Some(victim)
            && skew.at < until
            && skew
                .healed
                .is_none_or(|end| end + chrono::Duration::seconds(30) > healed)
    });
    !skewed
        && logs.lines.iter().any(|line| {
            line.node == victim
                && line.at >= healed
                && line.at < until
                && line.message == "liveness lease renewed again"
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::LogLine;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(seconds)
    }

    fn fault(kind: Kind, node: Option<usize>, from: i64, to: i64) -> Fault {
        Fault {
            kind,
            node,
            service_id: node.map(|node| format!("n{node}")),
            at: at(from),
            healed: Some(at(to)),
            owned: Some(1),
            owned_at_heal: None,
            lease_taken: false,
            died: None,
        }
    }

    #[test]
    fn writes_held_back_by_a_link_fault_may_arrive_as_long_after_its_heal_as_it_lasted() {
        assert_eq!(crate::faults::late_writes_until(&[]), None);
        let faults = [
            fault(Kind::CutRedis, Some(0), 100, 110),
            fault(Kind::LossyLink, Some(1), 90, 112),
            // Not a link fault: a killed process's connections are gone with it.
            fault(Kind::KillNode, Some(2), 100, 160),
        ];
        // The cut: 110 + 10 + 1; the lossy link: 112 + 22 + 1.
        assert_eq!(crate::faults::late_writes_until(&faults), Some(at(135)));
        assert_eq!(
            crate::faults::late_writes_until(&faults[..1]),
            Some(at(121))
        );
    }

    #[test]
    fn a_drain_cut_short_waits_for_a_takeover_from_the_kill() {
        let mut drained = fault(Kind::KillDraining, Some(0), 100, 105);
        assert_eq!(drained.takeover_from(), at(100), "not killed yet");
        drained.died = Some(at(102));
        assert_eq!(drained.takeover_from(), at(102));
        // A clock that stepped back between the two never puts the start before the fault.
        drained.died = Some(at(99));
        assert_eq!(drained.takeover_from(), at(100));
    }

    fn logged(node: usize, seconds: i64, message: &str) -> LogLine {
        LogLine {
            node,
            at: at(seconds),
            message: message.into(),
            fields: Value::Null,
        }
    }

    #[test]
    fn a_drain_that_finished_before_its_kill_has_no_takeover() {
        let mut drained = fault(Kind::KillDraining, Some(0), 100, 105);
        drained.died = Some(at(102));
        let finished = Logs {
            lines: vec![logged(1, 101, "stopped"), logged(0, 101, "stopped")],
            panics: Vec::new(),
        };
        assert!(drain_finished(&finished, 0, &drained));
        let restarted = Logs {
            lines: vec![logged(0, 110, "stopped")],
            panics: Vec::new(),
        };
        assert!(!drain_finished(&restarted, 0, &drained), "stopped later");
        let left = Logs {
            lines: vec![
                logged(
                    0,
                    101,
                    "no live peer took the unfinished orders; the leader's sweep will move them",
                ),
                logged(0, 101, "stopped"),
            ],
            panics: Vec::new(),
        };
        assert!(!drain_finished(&left, 0, &drained), "orders left behind");
    }

    #[test]
    fn a_takeover_after_the_victim_held_its_lease_again_is_not_the_faults() {
        let cut = fault(Kind::CutRedis, Some(0), 100, 105);
        let renewed_at = |seconds| Logs {
            lines: vec![
                logged(1, 106, "liveness lease renewed again"),
                logged(0, seconds, "liveness lease renewed again"),
            ],
            panics: Vec::new(),
        };
        assert!(lease_back(&renewed_at(106), &[], 0, &cut, at(108)));
        assert!(
            !lease_back(&renewed_at(109), &[], 0, &cut, at(108)),
            "after"
        );
        assert!(!lease_back(&renewed_at(103), &[], 0, &cut, at(108)), "cut");
        let skewed = fault(Kind::SkewClock, Some(0), 80, 95);
        assert!(
            !lease_back(&renewed_at(106), &[skewed], 0, &cut, at(108)),
            "a clock not to be trusted"
        );
        let long_ago = fault(Kind::SkewClock, Some(0), 20, 40);
        assert!(lease_back(&renewed_at(106), &[long_ago], 0, &cut, at(108)));
    }

    fn listening(node: usize, seconds: i64) -> LogLine {
        LogLine {
            node,
            at: at(seconds),
            message: "listening".into(),
            fields: Value::Null,
        }
    }

    #[test]
    fn a_takeover_counts_from_when_a_node_was_last_able_to_make_it() {
        let faults = [
            // n0 killed at 100: the victim.
            fault(Kind::KillNode, Some(0), 100, 110),
            // n1 paused 99..104, n2 restarted with a skewed clock at 102, serving at 105.
            fault(Kind::PauseNode, Some(1), 99, 104),
            fault(Kind::SkewClock, Some(2), 102, 130),
            // Redis out 106..107.
            fault(Kind::PauseRedis, None, 106, 107),
        ];
        let logs = Logs {
            lines: vec![listening(2, 105), listening(0, 111), listening(2, 131)],
            panics: Vec::new(),
        };
        let outages = Outages::new(&faults, &logs);
        // 102..104: n1 paused and n2 starting; 106..107: Redis out.
        assert!(!outages.blocked(0, at(101)));
        assert!(outages.blocked(0, at(103)));
        assert!(!outages.blocked(0, at(104)));
        assert!(outages.blocked(0, at(106)));
        // For n1, n0 is out from its kill on.
        assert!(!outages.blocked(1, at(101)));
        assert!(outages.blocked(1, at(103)));
        assert_eq!(outages.able_since(0, at(100), at(109)), at(107));
        assert_eq!(outages.able_since(0, at(100), at(105)), at(104));
        assert_eq!(outages.able_since(0, at(100), at(101)), at(100));
        // Resumed while still blocked: nothing to count.
        assert_eq!(outages.able_since(0, at(100), at(103)), at(103));
        // n2's second start (the true clock) keeps it out only until it serves again.
        assert!(!outages.blocked(0, at(130)), "n1 serves");
    }

    #[test]
    fn a_restart_that_never_serves_is_out_for_the_start_bound() {
        let faults = [
            fault(Kind::KillNode, Some(0), 100, 101),
            fault(Kind::KillNode, Some(1), 100, 101),
            fault(Kind::CutRedis, Some(2), 90, 200),
        ];
        let logs = Logs::default();
        let outages = Outages::new(&faults, &logs);
        let bound = START_BOUND.num_seconds();
        assert!(outages.blocked(2, at(100 + bound - 1)));
        assert!(!outages.blocked(2, at(100 + bound)));
    }

    #[test]
    fn a_partition_just_after_another_fault_on_the_node_is_disturbed() {
        let logs = Logs::default();
        let cut = fault(Kind::CutRedis, Some(0), 90, 100);
        // n0 cut from Redis 90..100, then partitioned from 103 or from 106; or n1 from 103.
        for (node, from, disturbed) in [(0, 103, true), (0, 106, false), (1, 103, false)] {
            let faults = [cut.clone(), fault(Kind::Partition, Some(node), from, 110)];
            let outages = Outages::new(&faults, &logs);
            assert_eq!(
                partition_disturbed(&faults, &faults[1], &outages),
                disturbed,
                "n{node} from {from}"
            );
        }
    }

    #[test]
    fn a_partition_of_a_node_not_serving_again_yet_is_disturbed() {
        // n0 killed at 100 and healed (restarted) at 101, serving only at 106: a partition of
        // n0 from 104 meets the restart; one from 107 does not.
        let faults = [fault(Kind::KillLeader, Some(0), 100, 101)];
        let logs = Logs {
            lines: vec![listening(0, 106)],
            panics: Vec::new(),
        };
        let outages = Outages::new(&faults, &logs);
        assert!(outages.out_during(0, at(104), at(110)));
        assert!(!outages.out_during(0, at(107), at(110)));
        assert!(!outages.out_during(1, at(104), at(110)));
    }
}
