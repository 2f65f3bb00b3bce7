//! The progress line while a run goes: an `indicatif` bar on a terminal, a line every five
//! seconds otherwise (a log file gets no carriage returns).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counters the run shares with the progress line.
#[derive(Default)]
pub struct Counts {
    pub finished: AtomicUsize,
    pub accepted: AtomicUsize,
    pub shed: AtomicUsize,
}

/// Shows progress until dropped.
pub struct Progress {
    bar: Option<ProgressBar>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub fn start(counts: Arc<Counts>, orders: usize) -> Progress {
        if !std::io::stderr().is_terminal() {
            let task = tokio::spawn(log_lines(counts, orders));
            return Progress { bar: None, task };
        }
        let bar = ProgressBar::with_draw_target(
            Some(orders as u64),
            ProgressDrawTarget::stderr_with_hz(5),
        );
        if let Ok(style) =
            ProgressStyle::with_template("[{bar:30}] {pos}/{len} finished, {msg}, {per_sec}")
        {
            bar.set_style(style.progress_chars("#> "));
        }
        let task = tokio::spawn(update(bar.clone(), counts));
        Progress {
            bar: Some(bar),
            task,
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

async fn update(bar: ProgressBar, counts: Arc<Counts>) {
    loop {
        bar.set_position(counts.finished.load(Ordering::Relaxed) as u64);
        bar.set_message(format!(
            "{} accepted, {} shed",
            counts.accepted.load(Ordering::Relaxed),
            counts.shed.load(Ordering::Relaxed)
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn log_lines(counts: Arc<Counts>, orders: usize) {
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        eprintln!(
            "bench: {}/{orders} finished, {} accepted, {} shed, {:.1}s",
            counts.finished.load(Ordering::Relaxed),
            counts.accepted.load(Ordering::Relaxed),
            counts.shed.load(Ordering::Relaxed),
            started.elapsed().as_secs_f64()
        );
    }
}
