//! Prometheus metrics for `GET /metrics`, and the small in-memory summary behind
//! `GET /diagnostic/summary` and the console.
//!
//! The hot path only touches atomics: every labelled series an order can reach (per step, per
//! outcome, per store operation) is created once at start, and the code that counts holds a
//! clone of its handle, so counting never looks a label set up in a map. The step-duration and
//! store-latency histograms are [`AtomicHistogram`]s (one atomic per bucket) rather than the
//! library's mutex-guarded histogram. Values that are cheap to read but costly to push (queue
//! depth, worker utilisation, gossip membership) are read when a scrape asks for them.
//!
//! The same events also feed this node's per-second [`Flow`] of the last 15 minutes, which the
//! console charts.
//!
//! Every figure is about this node: the orders it accepted, the steps it ran, the orders in
//! flight here by their current step. Sum over nodes for the cluster.

use crate::flow::{Flow, FlowEvent};
use crate::order::{Order, OrderId, Outcome, Step, CANCELLED};
use chrono::{DateTime, Utc};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Every metric name starts with this.
pub const PREFIX: &str = "order_process";
/// How many recent failures the summary keeps.
pub const RECENT_FAILURES: usize = 20;

/// Upper bounds (seconds) of the step-duration buckets: simulated steps take milliseconds to
/// seconds, real handlers up to their timeouts.
const STEP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Upper bounds (seconds) of the store-latency buckets: an fsync is ~0.1 ms, a Redis round trip
/// well under a millisecond on a LAN; the top buckets catch an unhealthy store.
const STORE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// How a step execution ended, for the duration histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    Succeeded,
    Failed,
    RolledBack,
    RollbackFailed,
}

impl StepOutcome {
    const ALL: [StepOutcome; 4] = [
        StepOutcome::Succeeded,
        StepOutcome::Failed,
        StepOutcome::RolledBack,
        StepOutcome::RollbackFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepOutcome::Succeeded => "succeeded",
            StepOutcome::Failed => "failed",
            StepOutcome::RolledBack => "rolled_back",
            StepOutcome::RollbackFailed => "rollback_failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The order-store operations that are timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOperation {
    Create,
    Get,
    List,
    Commit,
    Cancel,
    OwnedUnfinished,
    Reassign,
    RetryRollback,
    Redeliver,
    Ping,
}

impl StoreOperation {
    const ALL: [StoreOperation; 10] = [
        StoreOperation::Create,
        StoreOperation::Get,
        StoreOperation::List,
        StoreOperation::Commit,
        StoreOperation::Cancel,
        StoreOperation::OwnedUnfinished,
        StoreOperation::Reassign,
        StoreOperation::RetryRollback,
        StoreOperation::Redeliver,
        StoreOperation::Ping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreOperation::Create => "create",
            StoreOperation::Get => "get",
            StoreOperation::List => "list",
            StoreOperation::Commit => "commit",
            StoreOperation::Cancel => "cancel",
            StoreOperation::OwnedUnfinished => "owned_unfinished",
            StoreOperation::Reassign => "reassign",
            StoreOperation::RetryRollback => "retry_rollback",
            StoreOperation::Redeliver => "redeliver",
            StoreOperation::Ping => "ping",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

fn step_index(step: Step) -> usize {
    match step {
        Step::Scheduling => 0,
        Step::PreProcessing => 1,
        Step::Processing => 2,
        Step::PostProcessing => 3,
        Step::Completed => 4,
        Step::Failed => 5,
    }
}

/// A histogram whose observations are a few relaxed atomic adds: one bucket counter, the count
/// and the sum (kept in microseconds so it fits an integer atomic).
#[derive(Clone, Debug)]
pub struct AtomicHistogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    bounds: &'static [f64],
    /// One more than `bounds`: the last is `+Inf`.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> AtomicHistogram {
        AtomicHistogram {
            inner: Arc::new(HistogramInner {
                bounds,
                buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                count: AtomicU64::new(0),
                sum_micros: AtomicU64::new(0),
            }),
        }
    }

    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let index = self
            .inner
            .bounds
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(self.inner.bounds.len());
        if let Some(bucket) = self.inner.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.inner.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.inner.buckets)
            .map(|(bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        // The count is the sum of the buckets read just now, so a scrape racing an observation
        // never shows a count that disagrees with its buckets.
        let count = buckets.iter().map(|(_, count)| count).sum();
        let sum = self.inner.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Why an https connection's TLS handshake failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// `server.tls_client_ca` is set and the caller showed no certificate.
    NoClientCertificate,
    /// The caller's certificate is not from a CA of `server.tls_client_ca` (or expired, …).
    BadClientCertificate,
    /// Anything else: plain http on the https port, no common protocol, a dropped connection.
    Other,
    /// Not done within `limits.header_read_timeout`.
    Timeout,
}

impl TlsFailure {
    const ALL: [TlsFailure; 4] = [
        TlsFailure::NoClientCertificate,
        TlsFailure::BadClientCertificate,
        TlsFailure::Other,
        TlsFailure::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TlsFailure::NoClientCertificate => "no_client_certificate",
            TlsFailure::BadClientCertificate => "bad_client_certificate",
            TlsFailure::Other => "other",
            TlsFailure::Timeout => "timeout",
        }
    }
}

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type HistogramFamily<L> = Family<L, AtomicHistogram, fn() -> AtomicHistogram>;

fn step_histogram() -> AtomicHistogram {
    AtomicHistogram::new(STEP_BUCKETS)
}

fn store_histogram() -> AtomicHistogram {
    AtomicHistogram::new(STORE_BUCKETS)
}

/// A failed order, as the summary shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RecentFailure {
    pub order_id: OrderId,
    pub step: Step,
    pub reason: String,
    pub cancelled: bool,
    /// To the microsecond, as the API shows the times of orders.
    #[serde(serialize_with = "crate::order::rfc3339_micros")]
    pub failed_at: DateTime<Utc>,
}

/// Order totals since this node started.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Totals {
    pub accepted: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// Every metric of the node, and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    orders_accepted: Counter,
    orders_completed: Counter,
    orders_failed: Counter,
    orders_cancelled: Counter,
    /// Orders executing here, by current step (indexed like [`step_index`]).
    in_step: [Gauge; 6],
    /// [work step][outcome].
    step_duration: Vec<Vec<AtomicHistogram>>,
    rollbacks: [Counter; 4],
    queue_depth: Gauge,
    queue_capacity: Gauge,
    workers_busy: Gauge,
    workers: Gauge,
    worker_utilisation: Gauge<f64, AtomicU64>,
    store_duration: Vec<AtomicHistogram>,
    store_errors: Vec<Counter>,
    fencing_rejections: Counter,
    orders_set_aside: Counter,
    orders_taken_back: Counter,
    /// Completion webhook attempts: [delivered, failed].
    notification_attempts: [Counter; 2],
    leader_changes: Counter,
    is_leader: Gauge,
    transfers: Counter,
    transferred_orders: Counter,
    gossip_live: Gauge,
    gossip_dead: Gauge,
    /// https connections given up before a request, by [`TlsFailure`].
    tls_failures: [Counter; 4],
    gossip_dropped: Counter,
    /// Touched only when an order fails, never on the forward path.
    recent_failures: Mutex<VecDeque<RecentFailure>>,
    /// The last 15 minutes, per second, for the console.
    flow: Flow,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix(PREFIX);

        let orders_accepted = Counter::default();
        registry.register(
            "orders_accepted",
            "Orders accepted (201) by this node",
            orders_accepted.clone(),
        );
        let orders_completed = Counter::default();
        registry.register(
            "orders_completed",
            "Orders this node drove to Completed",
            orders_completed.clone(),
        );
        let orders_failed = Counter::default();
        registry.register(
            "orders_failed",
            "Orders this node finished as Failed after a step failure (rollbacks done)",
            orders_failed.clone(),
        );
        let orders_cancelled = Counter::default();
        registry.register(
            "orders_cancelled",
            "Orders this node finished as Failed because their user cancelled them",
            orders_cancelled.clone(),
        );

        let in_step_family = Family::<Labels1, Gauge>::default();
        registry.register(
            "orders_in_step",
            "Orders executing on this node by current step (Failed: still rolling back)",
            in_step_family.clone(),
        );
        let in_step =
            Step::ALL.map(|step| in_step_family.get_or_create_owned(&[("step", step.as_str())]));

        let step_family: HistogramFamily<Labels2> = Family::new_with_constructor(step_histogram);
        registry.register_with_unit(
            "step_duration",
            "Time a step handler took to run or roll back, by step and outcome",
            Unit::Seconds,
            step_family.clone(),
        );
        let step_duration = Step::WORK
            .iter()
            .map(|step| {
                StepOutcome::ALL
                    .iter()
                    .map(|outcome| {
                        step_family.get_or_create_owned(&[
                            ("step", step.as_str()),
                            ("outcome", outcome.as_str()),
                        ])
                    })
                    .collect()
            })
            .collect();

        let rollback_family = Family::<Labels1, Counter>::default();
        registry.register(
            "rollbacks",
            "Step compensations (rollbacks) completed on this node, by step",
            rollback_family.clone(),
        );
        let rollbacks =
            Step::WORK.map(|step| rollback_family.get_or_create_owned(&[("step", step.as_str())]));

        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Accepted orders waiting for a worker",
            queue_depth.clone(),
        );
        let queue_capacity = Gauge::default();
        registry.register(
            "queue_capacity",
            "Queue size past which new orders get 503",
            queue_capacity.clone(),
        );
        let workers_busy = Gauge::default();
        registry.register(
            "workers_busy",
            "Orders executing steps now",
            workers_busy.clone(),
        );
        let workers = Gauge::default();
        registry.register(
            "workers",
            "Orders that may execute steps at once",
            workers.clone(),
        );
        let worker_utilisation = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "worker_utilisation",
            "workers_busy / workers, from 0 to 1",
            worker_utilisation.clone(),
        );

        let store_family: HistogramFamily<Labels1> = Family::new_with_constructor(store_histogram);
        registry.register_with_unit(
            "store_operation_duration",
            "Latency of order-store operations, by operation",
            Unit::Seconds,
            store_family.clone(),
        );
        let store_duration = StoreOperation::ALL
            .iter()
            .map(|operation| store_family.get_or_create_owned(&[("operation", operation.as_str())]))
            .collect();
        let store_error_family = Family::<Labels1, Counter>::default();
        registry.register(
            "store_errors",
            "Order-store operations that failed (unreachable, timed out, corrupt record)",
            store_error_family.clone(),
        );
        let store_errors = StoreOperation::ALL
            .iter()
            .map(|operation| {
                store_error_family.get_or_create_owned(&[("operation", operation.as_str())])
            })
            .collect();
        let fencing_rejections = Counter::default();
        registry.register(
            "fencing_rejections",
            "Commits the store refused because another node (or a newer epoch) owns the order",
            fencing_rejections.clone(),
        );
        let orders_set_aside = Counter::default();
        registry.register(
            "orders_set_aside",
            "Orders this node set aside because their stored record cannot be read",
            orders_set_aside.clone(),
        );
        let orders_taken_back = Counter::default();
        registry.register(
            "orders_taken_back",
            "Set-aside orders this node took back to run on because their record reads again",
            orders_taken_back.clone(),
        );

        let leader_changes = Counter::default();
        registry.register(
            "leader_changes",
            "Times this node became leader or stopped being leader",
            leader_changes.clone(),
        );
        let is_leader = Gauge::default();
        registry.register(
            "is_leader",
            "1 while this node holds the leader lease",
            is_leader.clone(),
        );
        let transfers = Counter::default();
        registry.register(
            "transfers",
            "Transfers (takeovers and hand-overs) of another node's orders this node accepted",
            transfers.clone(),
        );
        let transferred_orders = Counter::default();
        registry.register(
            "transferred_orders",
            "Orders this node took over from other nodes",
            transferred_orders.clone(),
        );
        let notification_family = Family::<Labels1, Counter>::default();
        registry.register(
            "notification_attempts",
            "Completion webhook attempts, by outcome (delivered, or failed: retried or given up)",
            notification_family.clone(),
        );
        let notification_attempts = ["delivered", "failed"]
            .map(|outcome| notification_family.get_or_create_owned(&[("outcome", outcome)]));
        let gossip_family = Family::<Labels1, Gauge>::default();
        registry.register(
            "gossip_nodes",
            "Nodes gossip knows of, by state (live or dead); this node included",
            gossip_family.clone(),
        );
        let gossip_live = gossip_family.get_or_create_owned(&[("state", "live")]);
        let gossip_dead = gossip_family.get_or_create_owned(&[("state", "dead")]);
        let tls_family = Family::<Labels1, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "https connections whose TLS handshake failed, by reason",
            tls_family.clone(),
        );
        let tls_failures = TlsFailure::ALL
            .map(|reason| tls_family.get_or_create_owned(&[("reason", reason.as_str())]));
        let gossip_dropped = Counter::default();
        registry.register(
            "gossip_dropped",
            "Gossip datagrams dropped for not being sealed with this cluster's secret",
            gossip_dropped.clone(),
        );

        Metrics {
            registry,
            orders_accepted,
            orders_completed,
            orders_failed,
            orders_cancelled,
            in_step,
            step_duration,
            rollbacks,
            queue_depth,
            queue_capacity,
            workers_busy,
            workers,
            worker_utilisation,
            store_duration,
            store_errors,
            fencing_rejections,
            orders_set_aside,
            orders_taken_back,
            notification_attempts,
            leader_changes,
            is_leader,
            transfers,
            transferred_orders,
            gossip_live,
            gossip_dead,
            tls_failures,
            gossip_dropped,
            recent_failures: Mutex::new(VecDeque::with_capacity(RECENT_FAILURES)),
            flow: Flow::new(),
        }
    }

    pub fn order_accepted(&self) {
        self.orders_accepted.inc();
        self.flow.record(FlowEvent::Accepted);
    }

    /// Counts an order refused with a 503 because the queue was full or the node stopping.
    pub fn order_shed(&self) {
        self.flow.record(FlowEvent::Shed);
    }

    /// The per-second flow of the last 15 minutes.
    pub fn flow(&self) -> &Flow {
        &self.flow
    }

    /// Counts an order that just reached its terminal state on this node.
    pub fn order_finished(&self, order: &Order) {
        let failure = match order.outcome() {
            None => return,
            Some(Outcome::Completed) => {
                self.orders_completed.inc();
                self.flow.record(FlowEvent::Completed);
                return;
            }
            Some(Outcome::Failed(failure)) => failure,
        };
        let cancelled = failure.reason == CANCELLED;
        if cancelled {
            self.orders_cancelled.inc();
        } else {
            self.orders_failed.inc();
            self.flow.record(FlowEvent::Failed);
        }
        let entry = RecentFailure {
            order_id: order.order_id,
            step: failure.step,
            reason: failure.reason.clone(),
            cancelled,
            failed_at: order.complete_time.unwrap_or_else(Utc::now),
        };
        if let Ok(mut recent) = self.recent_failures.lock() {
            if recent.len() == RECENT_FAILURES {
                recent.pop_back();
            }
            recent.push_front(entry);
        }
    }

    pub fn notification_attempted(&self, delivered: bool) {
        self.notification_attempts[usize::from(!delivered)].inc();
    }

    pub fn step_finished(&self, step: Step, outcome: StepOutcome, elapsed: Duration) {
        let index = step_index(step);
        if let Some(histogram) = self
            .step_duration
            .get(index)
            .and_then(|outcomes| outcomes.get(outcome.index()))
        {
            histogram.observe(elapsed);
        }
        if matches!(outcome, StepOutcome::Succeeded | StepOutcome::Failed) {
            self.flow.record(FlowEvent::StepRan(step, elapsed));
        }
        if outcome == StepOutcome::RolledBack {
            if let Some(counter) = self.rollbacks.get(index) {
                counter.inc();
            }
        }
    }

    /// Starts counting an executing order in its current step; the guard moves it between
    /// steps and stops counting it when dropped.
    pub fn track(&self, step: Step) -> StepTracker<'_> {
        self.in_step[step_index(step)].inc();
        self.tracked(step)
    }

    /// Takes over the count of an order already counted in `step` (see
    /// [`StepTracker::keep_counted`]).
    pub fn tracked(&self, step: Step) -> StepTracker<'_> {
        StepTracker {
            metrics: self,
            step,
        }
    }

    /// Times one store operation; errors other than the expected refusals are counted.
    pub fn store_observed(&self, operation: StoreOperation, elapsed: Duration, failed: bool) {
        if let Some(histogram) = self.store_duration.get(operation.index()) {
            histogram.observe(elapsed);
        }
        if failed {
            if let Some(counter) = self.store_errors.get(operation.index()) {
                counter.inc();
            }
        }
    }

    pub fn fencing_rejected(&self) {
        self.fencing_rejections.inc();
    }

    pub fn order_set_aside(&self) {
        self.orders_set_aside.inc();
    }

    pub fn order_taken_back(&self) {
        self.orders_taken_back.inc();
    }

    pub fn leadership_changed(&self, leader: bool) {
        self.leader_changes.inc();
        self.is_leader.set(i64::from(leader));
    }

    pub fn transfer_accepted(&self, orders: usize) {
        self.transfers.inc();
        self.transferred_orders
            .inc_by(u64::try_from(orders).unwrap_or(u64::MAX));
    }

    /// Sets the gauges read at scrape time from the pool.
    pub fn set_pool(&self, queued: usize, capacity: usize, busy: usize, workers: usize) {
        self.queue_depth.set(to_i64(queued));
        self.queue_capacity.set(to_i64(capacity));
        self.workers_busy.set(to_i64(busy));
        self.workers.set(to_i64(workers));
        let utilisation = if workers == 0 {
            0.0
        } else {
            busy as f64 / workers as f64
        };
        self.worker_utilisation.set(utilisation);
    }

    pub fn tls_handshake_failed(&self, reason: TlsFailure) {
        self.tls_failures[reason as usize].inc();
    }

    pub fn gossip_dropped(&self) {
        self.gossip_dropped.inc();
    }

    /// Sets the gossip gauges, read at scrape time from the membership view.
    pub fn set_gossip(&self, live: usize, dead: usize) {
        self.gossip_live.set(to_i64(live));
        self.gossip_dead.set(to_i64(dead));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// Orders executing here by current step, every step listed.
    pub fn in_step(&self) -> Vec<(Step, i64)> {
        Step::ALL
            .iter()
            .map(|step| (*step, self.in_step[step_index(*step)].get().max(0)))
            .collect()
    }

    pub fn totals(&self) -> Totals {
        Totals {
            accepted: self.orders_accepted.get(),
            completed: self.orders_completed.get(),
            failed: self.orders_failed.get(),
            cancelled: self.orders_cancelled.get(),
        }
    }

    /// The most recent failures on this node, newest first.
    pub fn recent_failures(&self) -> Vec<RecentFailure> {
        self.recent_failures
            .lock()
            .map(|recent| recent.iter().cloned().collect())
            .unwrap_or_default()
    }
}

fn to_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Keeps one executing order counted in `orders_in_step` under its current step.
pub struct StepTracker<'a> {
    metrics: &'a Metrics,
    step: Step,
}

impl StepTracker<'_> {
    /// Lets go of the order but leaves it counted in its step, for [`Metrics::tracked`] to
    /// take over.
    pub fn keep_counted(self) {
        std::mem::forget(self);
    }

    pub fn move_to(&mut self, step: Step) {
        if step != self.step {
            self.metrics.in_step[step_index(self.step)].dec();
            self.metrics.in_step[step_index(step)].inc();
            self.step = step;
        }
    }
}

impl Drop for StepTracker<'_> {
    fn drop(&mut self) {
        self.metrics.in_step[step_index(self.step)].dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let metrics = Metrics::new();
        metrics.step_finished(
            Step::Processing,
            StepOutcome::Succeeded,
            Duration::from_millis(7),
        );
        metrics.step_finished(
            Step::Processing,
            StepOutcome::Succeeded,
            Duration::from_secs(100),
        );
        metrics.step_finished(
            Step::Scheduling,
            StepOutcome::RolledBack,
            Duration::from_millis(1),
        );
        let text = metrics.render().unwrap();
        let line = |needle: &str| {
            text.lines()
                .find(|line| line.starts_with(needle))
                .unwrap_or_else(|| panic!("no line {needle} in\n{text}"))
                .to_string()
        };
        let bucket = |le: &str| {
            line(&format!(
                "order_process_step_duration_seconds_bucket{{le=\"{le}\",step=\"Processing\",outcome=\"succeeded\"}}"
            ))
        };
        assert!(bucket("0.005").ends_with(" 0"));
        assert!(bucket("0.01").ends_with(" 1"));
        assert!(bucket("60.0").ends_with(" 1"));
        assert!(bucket("+Inf").ends_with(" 2"));
        assert!(line(
            "order_process_step_duration_seconds_count{step=\"Processing\",outcome=\"succeeded\"}"
        )
        .ends_with(" 2"));
        assert!(line("order_process_rollbacks_total{step=\"Scheduling\"}").ends_with(" 1"));
    }

    #[test]
    fn finished_orders_are_counted_by_outcome_and_unfinished_ones_not_at_all() {
        use crate::order::{Failure, Phase};
        let metrics = Metrics::new();
        let order = |step: Step, failure: Option<&str>, phase: Phase| {
            let mut order = Order::new(
                uuid::Uuid::now_v7(),
                "alice".into(),
                serde_json::json!({}),
                "node".into(),
                Utc::now(),
            );
            order.current_step = step;
            order.phase = phase;
            order.failure = failure.map(|reason| Failure {
                step: Step::Processing,
                reason: reason.into(),
            });
            order
        };
        metrics.order_finished(&order(Step::Processing, None, Phase::Forward));
        metrics.order_finished(&order(Step::Completed, None, Phase::Finished));
        metrics.order_finished(&order(Step::Failed, Some("boom"), Phase::Finished));
        metrics.order_finished(&order(Step::Failed, Some(CANCELLED), Phase::Finished));
        metrics.order_finished(&order(Step::Failed, Some("boom"), Phase::RollingBack));
        let text = metrics.render().unwrap();
        for (name, count) in [("completed", 1), ("failed", 1), ("cancelled", 1)] {
            let line = format!("order_process_orders_{name}_total {count}");
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        assert_eq!(metrics.recent_failures().len(), 2);
    }

    #[test]
    fn tracker_moves_an_order_between_steps() {
        let metrics = Metrics::new();
        {
            let mut tracker = metrics.track(Step::Scheduling);
            tracker.move_to(Step::Processing);
            let counts: Vec<i64> = metrics.in_step().iter().map(|(_, n)| *n).collect();
            assert_eq!(counts, vec![0, 0, 1, 0, 0, 0]);
        }
        assert!(metrics.in_step().iter().all(|(_, n)| *n == 0));
    }
}
