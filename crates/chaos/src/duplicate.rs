//! A duplicate node: a second process started from a copy of a live node's data dir (a copied
//! VM, a restored backup), same node id, same cluster. It must refuse to run: exit non-zero once
//! it sees the node id's liveness lease kept renewed by the first, and never call the ledger
//! (its steps call it as node `DUPLICATE_BASE + i`, so any call it made shows in the books).
//! Unless the first could not renew the lease (an outage kept it from Redis) and it expired:
//! the node id is free then, and the copy may take it and start.

use crate::world::{node_config, Node, Tls, DUPLICATE_BASE};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long a duplicate may run before it must have exited: two liveness lease lifetimes and a
/// renewal (what the node waits), with room for a start on a loaded machine.
pub const EXIT_BOUND: Duration = Duration::from_secs(20);

/// What became of a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Exited non-zero within the bound, as it must.
    Refused,
    /// Exited 0: it ran as if it were the node.
    ExitedZero,
    /// Still running at the bound; stopped with SIGKILL.
    StillRunning,
    /// Took the node id's lease, having found it expired, and started (it logged `listening`);
    /// stopped with SIGKILL.
    TookExpiredLease,
    /// It could not be started at all (the copy failed).
    NotStarted,
}

impl Fate {
    pub fn name(self) -> &'static str {
        match self {
            Fate::Refused => "refused",
            Fate::ExitedZero => "exited_0",
            Fate::StillRunning => "still_running",
            Fate::TookExpiredLease => "took_expired_lease",
            Fate::NotStarted => "not_started",
        }
    }
}

/// Starts a copy of `original` (its data dir copied as it is while it runs) on a port of its
/// own on the same host (its namespace, when it has one), waits up to [`EXIT_BOUND`] for it to exit, and stops it if it still runs.
pub async fn run(
    original: &Node,
    bin: &Path,
    database: &str,
    ledger: &str,
    tls: Option<&Tls>,
    join: Vec<String>,
) -> (Fate, String) {
    let dir = PathBuf::from(format!("{}-duplicate", original.dir.display()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = node_config(DUPLICATE_BASE + original.index, database, ledger, tls);
    let mut node = match Node::new(bin, dir.clone(), DUPLICATE_BASE + original.index, &config) {
        Ok(node) => node,
        Err(error) => return (Fate::NotStarted, format!("cannot prepare: {error}")),
    };
    let copied = Command::new("cp")
        .arg("-a")
        .arg(original.dir.join("data"))
        .arg(dir.join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !copied.is_ok_and(|status| status.success()) {
        return (Fate::NotStarted, "cannot copy the data dir".into());
    }
    node.place(original.host.clone(), original.launcher.clone());
    node.set_join(join);
    if let Err(error) = node.launch() {
        return (Fate::NotStarted, format!("cannot start: {error}"));
    }
    let exited = node.wait_exit(EXIT_BOUND).await;
    // A node listens only once it holds its lease (or gave up reaching Redis to take it).
    let took_lease = std::fs::read_to_string(node.log_path())
        .is_ok_and(|log| log.contains("\"message\":\"listening\""));
    match exited {
        Some(status) if status.success() => (Fate::ExitedZero, format!("{status}")),
        Some(status) => (Fate::Refused, format!("{status}")),
        None if took_lease => {
            node.kill();
            (
                Fate::TookExpiredLease,
                format!("took the expired lease, running after {EXIT_BOUND:?}"),
            )
        }
        None => {
            node.kill();
            (Fate::StillRunning, format!("running after {EXIT_BOUND:?}"))
        }
    }
}
