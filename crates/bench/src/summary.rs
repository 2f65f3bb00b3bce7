//! What one run measured, and how it is printed (text lines, or JSON with `--json`).

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;

/// Latency percentiles in milliseconds.
#[derive(Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of a histogram of microseconds.
    pub fn of(micros: &Histogram<u64>) -> Percentiles {
        if micros.is_empty() {
            return Percentiles::default();
        }
        let ms = |value: u64| value as f64 / 1000.0;
        Percentiles {
            p50: ms(micros.value_at_quantile(0.50)),
            p90: ms(micros.value_at_quantile(0.90)),
            p99: ms(micros.value_at_quantile(0.99)),
            max: ms(micros.max()),
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
    /// Failed where the order asked to.
    pub failed: usize,
    /// Failed on a legal history the order did not ask for: the node's own failure chance
    /// (`simulate.failure_rate`).
    pub failed_by_chance: usize,
    /// Accepted but not finished within the timeout.
    pub lost: usize,
    /// Finished with a history that is illegal or not what the order asked for.
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

impl Summary {
    /// The text summary.
    pub fn print(&self) {
        println!("orders           {}", self.orders);
        println!(
            "accepted         {} (shed with 503: {})",
            self.submitted, self.shed
        );
        println!("completed        {}", self.completed);
        println!("failed           {} (as asked)", self.failed);
        if self.failed_by_chance > 0 {
            println!(
                "failed by chance {} (the node's simulate.failure_rate)",
                self.failed_by_chance
            );
        }
        println!("lost             {}", self.lost);
        println!("wrong history    {}", self.mismatches);
        if let Some(first) = &self.first_mismatch {
            println!("  first: {first}");
        }
        println!(
            "throughput       {:.0} orders/s over {:.2}s",
            self.orders_per_s, self.elapsed_s
        );
        let submit = &self.submit_latency_ms;
        println!(
            "submit latency   p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            submit.p50, submit.p90, submit.p99, submit.max
        );
        let end = &self.end_to_end_latency_ms;
        println!(
            "submit→terminal  p50 {:.2} ms, p99 {:.2} ms",
            end.p50, end.p99
        );
        if !self.http_errors.is_empty() {
            println!("http errors      {:?}", self.http_errors);
        }
        println!("bench cpu        {:.2}s", self.bench_cpu_s);
        if let (Some(server), Some(per_order)) = (self.server_cpu_s, self.cpu_us_per_order) {
            println!("server cpu       {server:.2}s; all processes {per_order:.0} µs per order");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let mut micros = Histogram::<u64>::new(3).unwrap();
        for ms in 1..=100u64 {
            micros.record(ms * 1000).unwrap();
        }
        let p = Percentiles::of(&micros);
        assert!((49.9..=51.1).contains(&p.p50), "{p:?}");
        assert!((98.9..=99.1).contains(&p.p99), "{p:?}");
        assert!((99.9..=100.1).contains(&p.max), "{p:?}");
        assert_eq!(Percentiles::of(&Histogram::new(3).unwrap()).max, 0.0);
    }
}
