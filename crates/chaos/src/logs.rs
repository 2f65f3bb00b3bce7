//! The nodes' logs, read back after the campaign: their JSON lines (what was taken over, what
//! was refused, illegal transitions) and any panic. Times are the true clock's, also for a
//! node that ran with a skewed one.

use crate::clock;
use crate::world::Node;
use chrono::{DateTime, Utc};
use serde_json::Value;

/// A structured (JSON) log line of a node.
pub struct LogLine {
    pub node: usize,
    pub at: DateTime<Utc>,
    pub message: String,
    pub fields: Value,
}

#[derive(Default)]
pub struct Logs {
    pub lines: Vec<LogLine>,
    pub panics: Vec<String>,
}

pub fn read_logs(nodes: &[Node]) -> Logs {
    let mut logs = Logs::default();
    for node in nodes {
        let Ok(text) = std::fs::read_to_string(node.log_path()) else {
            continue;
        };
        // The offset of the clock of the process writing: a skewed node's times are taken back
        // to the true clock, so they compare with the campaign's.
        let mut offset = chrono::Duration::zero();
        for line in text.lines() {
            if line.starts_with("==== launch ") {
                offset = chrono::Duration::zero();
            } else if let Some(seconds) = clock::marked_offset(line) {
                offset = chrono::Duration::seconds(seconds);
            }
            if line.contains("panicked") {
                logs.panics.push(format!("n{}: {line}", node.index));
            }
            let Ok(entry) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let Some(at) = order_process_history::time::rfc3339(&entry["timestamp"]) else {
                continue;
            };
            let fields = entry["fields"].clone();
            let message = fields["message"].as_str().unwrap_or("").to_string();
            logs.lines.push(LogLine {
                node: node.index,
                at: at.with_timezone(&Utc) - offset,
                message,
                fields,
            });
        }
    }
    logs.lines.sort_by_key(|line| line.at);
    logs
}

impl Logs {
    pub fn count(&self, message: &str) -> usize {
        self.lines
            .iter()
            .filter(|line| line.message == message)
            .count()
    }
}
