//! The flow of orders over the last [`SECONDS`] seconds, per second, in bounded memory: a ring
//! of [`SECONDS`] buckets, each with the orders accepted, completed, failed and shed (answered
//! 503 because the queue was full or the node stopping) in that second, and for each work step
//! a small fixed histogram of how long its runs took ([`LATENCY_BOUNDS_MS`]).
//!
//! The histograms have the same bounds on every node, so the buckets of several nodes add up
//! exactly ([`FlowView::merge`]) before percentiles are taken from them. `GET /diagnostic/flow`
//! serves a [`FlowView`]; the console draws it.
//!
//! One mutex guards the ring: each event holds it for a few additions, far less than the work
//! that produced the event.

use crate::order::Step;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// How many seconds the ring keeps.
pub const SECONDS: usize = 900;

/// Upper bounds (ms) of the latency histogram's buckets; one more bucket counts the slower.
pub const LATENCY_BOUNDS_MS: [u64; 15] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
];
/// Buckets per histogram: one per bound and one past the last.
const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;
/// The steps timed: the work steps.
const STEPS: usize = Step::WORK.len();

/// One second of one node.
#[derive(Clone, Copy)]
struct Bucket {
    /// The Unix second this bucket counts; another means it is stale.
    second: i64,
    accepted: u32,
    completed: u32,
    failed: u32,
    shed: u32,
    latency: [[u32; LATENCY_BUCKETS]; STEPS],
}

impl Bucket {
    const EMPTY: Bucket = Bucket {
        second: i64::MIN,
        accepted: 0,
        completed: 0,
        failed: 0,
        shed: 0,
        latency: [[0; LATENCY_BUCKETS]; STEPS],
    };

    fn is_empty(&self) -> bool {
        self.accepted == 0
            && self.completed == 0
            && self.failed == 0
            && self.shed == 0
            && self.latency.iter().flatten().all(|count| *count == 0)
    }
}

/// What one event adds to the flow.
#[derive(Clone, Copy, Debug)]
pub enum FlowEvent {
    Accepted,
    Completed,
    Failed,
    Shed,
    /// A run of a work step, and how long it took.
    StepRan(Step, Duration),
}

/// The ring of one node.
pub struct Flow {
    ring: Mutex<Vec<Bucket>>,
}

impl Default for Flow {
    fn default() -> Self {
        Flow::new()
    }
}

/// The Unix second now, read without making a calendar date of it (a node records several
/// events per order).
fn unix_now() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        // Before 1970: the second it falls in, as chrono's `timestamp()` counts it.
        Err(before) => {
            let before = before.duration();
            let whole = i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
            -whole - i64::from(before.subsec_nanos() > 0)
        }
    }
}

fn slot(second: i64) -> usize {
    usize::try_from(second.rem_euclid(SECONDS as i64)).unwrap_or(0)
}

/// The histogram bucket of a duration.
fn latency_bucket(elapsed: Duration) -> usize {
    let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    LATENCY_BOUNDS_MS
        .iter()
        .position(|bound| ms <= *bound)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

impl Flow {
    pub fn new() -> Flow {
        Flow {
            ring: Mutex::new(vec![Bucket::EMPTY; SECONDS]),
        }
    }

    /// Counts an event in the current second.
    pub fn record(&self, event: FlowEvent) {
        self.record_at(unix_now(), event);
    }

    fn record_at(&self, second: i64, event: FlowEvent) {
        let Ok(mut ring) = self.ring.lock() else {
            return;
        };
        let bucket = &mut ring[slot(second)];
        if bucket.second != second {
            *bucket = Bucket::EMPTY;
            bucket.second = second;
        }
        match event {
            FlowEvent::Accepted => bucket.accepted = bucket.accepted.saturating_add(1),
            FlowEvent::Completed => bucket.completed = bucket.completed.saturating_add(1),
            FlowEvent::Failed => bucket.failed = bucket.failed.saturating_add(1),
            FlowEvent::Shed => bucket.shed = bucket.shed.saturating_add(1),
            FlowEvent::StepRan(step, elapsed) => {
                if let Some(steps) = Step::WORK.iter().position(|work| *work == step) {
                    let count = &mut bucket.latency[steps][latency_bucket(elapsed)];
                    *count = count.saturating_add(1);
                }
            }
        }
    }

    /// The seconds after `since` (a Unix second) up to now, within the last [`SECONDS`], that
    /// counted anything.
    pub fn view(&self, since: Option<i64>) -> FlowView {
        self.view_at(unix_now(), since)
    }

    fn view_at(&self, now: i64, since: Option<i64>) -> FlowView {
        let oldest = now - SECONDS as i64 + 1;
        let from = since.map_or(oldest, |since| since.saturating_add(1).max(oldest));
        let mut seconds = Vec::new();
        if let Ok(ring) = self.ring.lock() {
            for second in from..=now {
                let bucket = &ring[slot(second)];
                if bucket.second == second && !bucket.is_empty() {
                    seconds.push(Second::from(bucket));
                }
            }
        }
        FlowView { now, seconds }
    }
}

/// The flow of some seconds, of one node or merged over several.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowView {
    /// The Unix second the view was taken at (the latest of the nodes merged).
    pub now: i64,
    /// The seconds that counted anything, oldest first.
    pub seconds: Vec<Second>,
}

/// One second's counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Second {
    /// The Unix second.
    pub t: i64,
    #[serde(default)]
    pub accepted: u64,
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub failed: u64,
    #[serde(default)]
    pub shed: u64,
    /// Per work step that ran in this second: the counts of its latency histogram, one per
    /// bound of [`LATENCY_BOUNDS_MS`] and one past the last.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latency: BTreeMap<String, Vec<u64>>,
}

impl From<&Bucket> for Second {
    fn from(bucket: &Bucket) -> Self {
        let latency = Step::WORK
            .iter()
            .zip(bucket.latency.iter())
            .filter(|(_, counts)| counts.iter().any(|count| *count > 0))
            .map(|(step, counts)| {
                (
                    step.as_str().to_string(),
                    counts.iter().map(|count| u64::from(*count)).collect(),
                )
            })
            .collect();
        Second {
            t: bucket.second,
            accepted: u64::from(bucket.accepted),
            completed: u64::from(bucket.completed),
            failed: u64::from(bucket.failed),
            shed: u64::from(bucket.shed),
            latency,
        }
    }
}

impl FlowView {
    /// Adds another node's view: counts of the same second add up, histograms bucket by
    /// bucket. Histograms of another length (another version's bounds) are left out.
    pub fn merge(&mut self, other: FlowView) {
        self.now = self.now.max(other.now);
        let mut by_second: BTreeMap<i64, Second> = std::mem::take(&mut self.seconds)
            .into_iter()
            .map(|second| (second.t, second))
            .collect();
        for second in other.seconds {
            let into = by_second.entry(second.t).or_insert_with(|| Second {
                t: second.t,
                ..Second::default()
            });
            // Peers' figures: a huge one must not overflow the sum.
            into.accepted = into.accepted.saturating_add(second.accepted);
            into.completed = into.completed.saturating_add(second.completed);
            into.failed = into.failed.saturating_add(second.failed);
            into.shed = into.shed.saturating_add(second.shed);
            for (step, counts) in second.latency {
                if counts.len() != LATENCY_BUCKETS {
                    continue;
                }
                let sum = into
                    .latency
                    .entry(step)
                    .or_insert_with(|| vec![0; LATENCY_BUCKETS]);
                for (total, count) in sum.iter_mut().zip(counts) {
                    *total = total.saturating_add(count);
                }
            }
        }
        self.seconds = by_second.into_values().collect();
    }
}

/// The latency (ms) under which a fraction `q` of a histogram's runs finished: the upper
/// bound of the bucket that reaches it (the last bound for the slowest bucket). `None` when
/// the histogram is empty.
pub fn percentile(counts: &[u64], q: f64) -> Option<u64> {
    let total = counts
        .iter()
        .fold(0u64, |total, count| total.saturating_add(*count));
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (index, count) in counts.iter().enumerate() {
        seen = count.saturating_add(seen);
        if seen >= rank {
            return Some(LATENCY_BOUNDS_MS[index.min(LATENCY_BOUNDS_MS.len() - 1)]);
        }
    }
    LATENCY_BOUNDS_MS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_now_is_chronos() {
        let before = chrono::Utc::now().timestamp();
        let now = unix_now();
        assert!(before <= now && now <= chrono::Utc::now().timestamp());
    }

    #[test]
    fn events_land_in_their_second_and_old_seconds_are_overwritten() {
        let flow = Flow::new();
        flow.record_at(1_000, FlowEvent::Accepted);
        flow.record_at(1_000, FlowEvent::Accepted);
        flow.record_at(1_001, FlowEvent::Completed);
        flow.record_at(
            1_001,
            FlowEvent::StepRan(Step::Processing, Duration::from_millis(7)),
        );
        flow.record_at(1_001, FlowEvent::StepRan(Step::Completed, Duration::ZERO));
        let view = flow.view_at(1_001, None);
        assert_eq!(view.seconds.len(), 2);
        assert_eq!(view.seconds[0].accepted, 2);
        assert_eq!(view.seconds[1].completed, 1);
        let processing = &view.seconds[1].latency["Processing"];
        assert_eq!(processing.len(), LATENCY_BUCKETS);
        assert_eq!(processing[3], 1, "7 ms is in the 10 ms bucket");
        assert_eq!(
            view.seconds[1].latency.len(),
            1,
            "only work steps are timed"
        );
        // Only what is newer than `since`.
        assert_eq!(flow.view_at(1_001, Some(1_000)).seconds.len(), 1);
        // Any `since` a caller can send is answered, the largest with nothing.
        assert!(flow.view_at(1_001, Some(i64::MAX)).seconds.is_empty());
        assert_eq!(flow.view_at(1_001, Some(i64::MIN)).seconds.len(), 2);
        // A full turn later the slot holds the new second only.
        flow.record_at(1_000 + SECONDS as i64, FlowEvent::Shed);
        let view = flow.view_at(1_000 + SECONDS as i64, None);
        assert_eq!(view.seconds.len(), 2);
        assert_eq!(view.seconds[0].t, 1_001);
        assert_eq!((view.seconds[1].accepted, view.seconds[1].shed), (0, 1));
    }

    #[test]
    fn views_merge_exactly_and_percentiles_come_from_the_sum() {
        let (a, b) = (Flow::new(), Flow::new());
        for _ in 0..99 {
            a.record_at(
                50,
                FlowEvent::StepRan(Step::Scheduling, Duration::from_millis(3)),
            );
        }
        b.record_at(
            50,
            FlowEvent::StepRan(Step::Scheduling, Duration::from_secs(40)),
        );
        b.record_at(51, FlowEvent::Failed);
        let mut merged = a.view_at(51, None);
        merged.merge(b.view_at(52, None));
        assert_eq!(merged.now, 52);
        assert_eq!(merged.seconds.len(), 2);
        let counts = &merged.seconds[0].latency["Scheduling"];
        assert_eq!(counts.iter().sum::<u64>(), 100);
        assert_eq!(percentile(counts, 0.5), Some(5));
        assert_eq!(percentile(counts, 0.99), Some(5));
        assert_eq!(percentile(counts, 1.0), Some(60_000));
        assert_eq!(merged.seconds[1].failed, 1);
        assert_eq!(percentile(&[0; LATENCY_BUCKETS], 0.5), None);
        assert_eq!(
            percentile(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], 0.5),
            Some(60_000)
        );
    }

    #[test]
    fn a_peers_huge_figures_do_not_overflow_the_merge() {
        let mut merged = Flow::new().view_at(50, None);
        for _ in 0..2 {
            let mut huge = Flow::new().view_at(50, None);
            huge.seconds = vec![Second {
                t: 50,
                accepted: u64::MAX,
                latency: [("Scheduling".to_string(), vec![u64::MAX; LATENCY_BUCKETS])]
                    .into_iter()
                    .collect(),
                ..Second::default()
            }];
            merged.merge(huge);
        }
        let second = merged.seconds.last().expect("the second merged");
        assert_eq!(second.accepted, u64::MAX);
        assert!(percentile(&second.latency["Scheduling"], 0.5).is_some());
    }
}
