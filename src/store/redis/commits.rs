//! Group commit, for writes that wait for replicas (`database.min_replicas`): the transitions
//! ready at the same moment, from any orders of this node, go to Redis together, as one call of
//! the commit script, which checks and writes each order on its own and answers per order, and
//! one `WAIT` covers them all. A batch is whatever waits when a call can go out: nothing waits
//! for a batch to fill. Without replicas a commit is its own call: measured on one Redis, with
//! and without `appendfsync always`, batches were no faster there and made orders wait longer
//! (each commit then takes two more hops between tasks).

use super::conn::Connections;
use crate::store::StoreError;
use deadpool_redis::redis::{Script, ScriptInvocation};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

/// The most commits in one script call; Redis runs nothing else while a script runs.
const MAX_BATCH: usize = 64;

/// Script calls of commits on their way at once, one per connection kept for writes that wait
/// for replicas; commits that come while all are on their way go together in the next.
const IN_FLIGHT: usize = 64;

/// One order's transition, as the commit script takes it (see `scripts`).
pub(super) struct Commit {
    pub shard: u16,
    /// The order, the owned set, the finished and parked indexes, the new state index.
    pub keys: [String; 5],
    pub owner: String,
    pub epoch: u64,
    pub doc: Vec<u8>,
    pub aware: &'static str,
    pub state: &'static str,
    pub step: &'static str,
    pub id: String,
    pub revision: u64,
    pub retention_ms: u64,
    pub finished_entry: String,
    pub parked: &'static str,
    pub member: String,
}

impl Commit {
    /// Adds this commit's keys and arguments to a call of the commit script.
    pub fn add_to(&self, call: &mut ScriptInvocation<'_>) {
        for key in &self.keys {
            call.key(key);
        }
        call.arg(&self.owner)
            .arg(self.epoch)
            .arg(&self.doc)
            .arg(self.aware)
            .arg(self.state)
            .arg(self.step)
            .arg(&self.id)
            .arg(self.revision)
            .arg(self.retention_ms)
            .arg(&self.finished_entry)
            .arg(self.parked)
            .arg(&self.member);
    }
}

/// A commit on its way, and where its outcome goes.
struct Pending {
    commit: Commit,
    answer: oneshot::Sender<Result<String, StoreError>>,
}

/// The way to the task that sends commits in batches; the task ends when this is dropped.
pub(super) struct Committer {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Committer {
    /// Starts the task that sends commits on `redis` with `script` (the commit script). Must be
    /// called within the runtime.
    pub fn start(redis: Arc<Connections>, script: Script) -> Committer {
        let (queue, waiting) = mpsc::unbounded_channel();
        let task = send_batches(redis, script, waiting);
        tokio::spawn(task.instrument(tracing::info_span!("commits")));
        Committer { queue }
    }

    /// Commits `commit` with whatever else is ready, and answers its outcome as the script
    /// named it. An error of the call as a whole (Redis unreachable, no answer in time) is every
    /// commit's in it: each may or may not have been written.
    pub async fn commit(&self, commit: Commit) -> Result<String, StoreError> {
        let (answer, outcome) = oneshot::channel();
        self.queue
            .send(Pending { commit, answer })
            .map_err(|_| StoreError::Unavailable("the group commit task has stopped".into()))?;
        outcome.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the group commit task dropped a commit".into(),
            ))
        })
    }
}

/// Takes the commits waiting, up to [`MAX_BATCH`], each time one of [`IN_FLIGHT`] calls is
/// free, and sends them. On a Redis Cluster a call holds the commits of one shard only (a script
/// runs on one hash slot); the calls of one batch go out together.
async fn send_batches(
    redis: Arc<Connections>,
    script: Script,
    mut waiting: mpsc::UnboundedReceiver<Pending>,
) {
    let script = Arc::new(script);
    let calls = Arc::new(Semaphore::new(IN_FLIGHT));
    let by_shard = redis.is_cluster();
    while let Some(first) = waiting.recv().await {
        let Ok(permit) = Arc::clone(&calls).acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match waiting.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // A caller that gave up (it timed out, or its task ended) has its commit not sent.
        batch.retain(|pending| !pending.answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        let groups = if by_shard {
            batch.sort_by_key(|pending| pending.commit.shard);
            split_by_shard(batch)
        } else {
            vec![batch]
        };
        let (redis, script) = (Arc::clone(&redis), Arc::clone(&script));
        tokio::spawn(
            send_groups(redis, script, groups, permit).instrument(tracing::Span::current()),
        );
    }
}

/// `batch` (sorted by shard) as one group per shard.
fn split_by_shard(batch: Vec<Pending>) -> Vec<Vec<Pending>> {
    let mut groups: Vec<Vec<Pending>> = Vec::new();
    for pending in batch {
        match groups.last_mut() {
            Some(group) if group[0].commit.shard == pending.commit.shard => group.push(pending),
            _ => groups.push(vec![pending]),
        }
    }
    groups
}

async fn send_groups(
    redis: Arc<Connections>,
    script: Arc<Script>,
    groups: Vec<Vec<Pending>>,
    _permit: OwnedSemaphorePermit,
) {
    let calls = groups
        .into_iter()
        .map(|group| send_group(&redis, &script, group));
    futures_util::future::join_all(calls).await;
}

/// One script call for `group`; each commit in it gets its own outcome.
async fn send_group(redis: &Connections, script: &Script, group: Vec<Pending>) {
    let mut call = script.prepare_invoke();
    for Pending { commit, .. } in &group {
        commit.add_to(&mut call);
    }
    let answers: Result<Vec<String>, StoreError> = redis.write(&call).await;
    match answers {
        Ok(answers) if answers.len() == group.len() => {
            for (pending, answer) in group.into_iter().zip(answers) {
                let _ = pending.answer.send(Ok(answer));
            }
        }
        Ok(answers) => {
            let error = StoreError::Corrupt(format!(
                "the commit script answered {} outcomes for {} orders",
                answers.len(),
                group.len()
            ));
            for pending in group {
                let _ = pending.answer.send(Err(error.clone()));
            }
        }
        Err(error) => {
            for pending in group {
                let _ = pending.answer.send(Err(error.clone()));
            }
        }
    }
}
