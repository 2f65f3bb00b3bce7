//! Group commit: the creates and transitions ready at the same moment, from any orders of this
//! node, go to Redis together, as one call of the writes script, which checks and makes each on
//! its own and answers each; with replicas to wait for (`database.min_replicas`), one `WAIT`
//! covers them all. A batch is whatever waits when a call can go out: nothing waits for a batch
//! to fill. Fewer calls cost Redis and the node less CPU per write (fewer commands to parse,
//! scripts to start and syscalls on both sides) than the hops between tasks a batch adds.

use super::conn::{Connections, ScriptCall};
use crate::store::StoreError;
use deadpool_redis::redis::{Cmd, Script, Value};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

/// The most writes in one script call; Redis runs nothing else while a script runs.
const MAX_BATCH: usize = 64;

/// Script calls on their way at once (with replicas to wait for, one per connection kept for
/// such writes); writes that come while all are on their way go together in the next.
const IN_FLIGHT: usize = 64;

/// One write of the writes script (see `scripts`).
pub(super) enum Write {
    Commit(Commit),
    Create(Create),
}

impl Write {
    fn shard(&self) -> u16 {
        match self {
            Write::Commit(commit) => commit.shard,
            Write::Create(create) => create.shard,
        }
    }

    fn keys(&self) -> &[String] {
        match self {
            Write::Commit(commit) => &commit.keys,
            Write::Create(create) => &create.keys,
        }
    }

    /// About how many bytes its keys and arguments take: its doc and a few hundred more.
    fn bytes(&self) -> usize {
        let doc = match self {
            Write::Commit(commit) => commit.doc.len(),
            Write::Create(create) => create.doc.len(),
        };
        doc + 512
    }

    /// Adds this write's arguments to a call of the writes script.
    fn add_args(&self, call: &mut Cmd) {
        match self {
            Write::Commit(commit) => commit.add_args(call),
            Write::Create(create) => create.add_args(call),
        }
    }
}

/// The call of the writes script `script` that makes `writes`, in their order: all their keys,
/// then each write's arguments.
pub(super) fn call<'s, 'w>(
    script: &'s Script,
    writes: impl Iterator<Item = &'w Write> + Clone,
) -> ScriptCall<'s> {
    let keys = writes.clone().map(|write| write.keys().len()).sum();
    let bytes = writes.clone().map(Write::bytes).sum();
    let mut call = ScriptCall::new(script, keys, bytes);
    for write in writes.clone() {
        for key in write.keys() {
            call.command.arg(key);
        }
    }
    for write in writes {
        write.add_args(&mut call.command);
    }
    call
}

/// One order's transition, as the writes script takes it.
pub(super) struct Commit {
    pub shard: u16,
    /// The order, the owned set, the new state index; for a finishing write (stored finished
    /// or notifying), then the finished and parked indexes.
    pub keys: Vec<String>,
    pub owner: String,
    pub epoch: u64,
    pub doc: Vec<u8>,
    pub aware: &'static str,
    pub state: &'static str,
    pub step: &'static str,
    pub id: String,
    pub revision: u64,
    pub member: String,
    /// What only a finishing write takes, with the two keys more.
    pub finish: Option<Finish>,
}

/// The arguments of a write that stores an order finished or notifying.
pub(super) struct Finish {
    pub retention_ms: u64,
    pub finished_entry: String,
    pub parked: &'static str,
}

impl Commit {
    fn add_args(&self, call: &mut Cmd) {
        call.arg("commit")
            .arg(self.keys.len())
            .arg(&self.owner)
            .arg(self.epoch)
            .arg(&self.doc)
            .arg(self.aware)
            .arg(self.state)
            .arg(self.step)
            .arg(&self.id)
            .arg(self.revision)
            .arg(&self.member);
        if let Some(finish) = &self.finish {
            call.arg(finish.retention_ms)
                .arg(&finish.finished_entry)
                .arg(finish.parked);
        }
    }
}

/// A new order with its index entries, as the writes script takes it.
pub(super) struct Create {
    pub shard: u16,
    /// The order, its owner's owned set, its user's index, the finished index, the idempotency
    /// key (if any), the state index.
    pub keys: Vec<String>,
    pub doc: Vec<u8>,
    pub owner: String,
    pub epoch: u64,
    pub user: String,
    pub state: &'static str,
    pub step: &'static str,
    pub member: String,
    pub id: String,
    pub idempotency_ttl_secs: u64,
    /// Whether it takes over an idempotency key that names no order id.
    pub take_key: bool,
    pub retention_ms: u64,
    pub finished_entry: String,
}

impl Create {
    fn add_args(&self, call: &mut Cmd) {
        call.arg("create")
            .arg(self.keys.len())
            .arg(&self.doc)
            .arg(&self.owner)
            .arg(self.epoch)
            .arg(&self.user)
            .arg(self.state)
            .arg(self.step)
            .arg(&self.member)
            .arg(&self.id)
            .arg(self.idempotency_ttl_secs)
            .arg(if self.take_key { "1" } else { "0" })
            .arg(self.retention_ms)
            .arg(&self.finished_entry);
    }
}

/// A write on its way, and where its answer goes.
struct Pending {
    write: Write,
    answer: oneshot::Sender<Result<Value, StoreError>>,
}

/// The way to the task that sends writes in batches; the task ends when this is dropped.
pub(super) struct Committer {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Committer {
    /// Starts the task that sends writes on `redis` with `script` (the writes script). Must be
    /// called within the runtime.
    pub fn start(redis: Arc<Connections>, script: Script) -> Committer {
        let (queue, waiting) = mpsc::unbounded_channel();
        let task = send_batches(redis, script, waiting);
        tokio::spawn(task.instrument(tracing::info_span!("group_commit")));
        Committer { queue }
    }

    /// Makes `write` with whatever else is ready, and returns the script's answer to it. An
    /// error of the call as a whole (Redis unreachable, no answer in time) is every write's in
    /// it: each may or may not have been made.
    pub async fn write(&self, write: Write) -> Result<Value, StoreError> {
        let (answer, outcome) = oneshot::channel();
        self.queue
            .send(Pending { write, answer })
            .map_err(|_| StoreError::Unavailable("the group commit task has stopped".into()))?;
        outcome.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the group commit task dropped a write".into(),
            ))
        })
    }
}

/// Takes the writes waiting, up to [`MAX_BATCH`], each time one of [`IN_FLIGHT`] calls is
/// free, and sends them. On a Redis Cluster a call holds the writes of one shard only (a script
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
        // A caller that gave up (it timed out, or its task ended) has its write not sent.
        batch.retain(|pending| !pending.answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        let groups = if by_shard {
            batch.sort_by_key(|pending| pending.write.shard());
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
            Some(group) if group[0].write.shard() == pending.write.shard() => group.push(pending),
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

/// One script call for `group`; each write in it gets its own answer.
async fn send_group(redis: &Connections, script: &Script, group: Vec<Pending>) {
    let call = call(script, group.iter().map(|pending| &pending.write));
    let answers: Result<Vec<Value>, StoreError> = redis.write(&call).await;
    match answers {
        Ok(answers) if answers.len() == group.len() => {
            for (pending, answer) in group.into_iter().zip(answers) {
                let _ = pending.answer.send(Ok(answer));
            }
        }
        Ok(answers) => {
            let error = StoreError::Corrupt(format!(
                "the writes script answered {} times for {} writes",
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
