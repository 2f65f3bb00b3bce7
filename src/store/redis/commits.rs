//! Group commit: the creates and transitions ready at the same moment, from any orders of this
//! node, go to Redis together, as one call of the writes script, which checks and makes each on
//! its own and answers each; with replicas to wait for (`database.min_replicas`), one `WAIT`
//! covers them all. A batch is whatever waits when a call can go out, at most one call per
//! connection being on its way at once: nothing waits for a batch to fill, and under load the
//! writes that come while the calls are on their way make the next batch. Fewer calls cost
//! Redis and the node less CPU per write (fewer commands to parse, scripts to start and
//! syscalls on both sides) than the hops between tasks a batch adds.

use super::conn::{Connections, ScriptCall};
use super::keys;
use crate::store::StoreError;
use deadpool_redis::redis::{Script, Value};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

/// The most writes in one script call; Redis runs nothing else while a script runs.
const MAX_BATCH: usize = 64;

/// On a Redis Cluster, how long a batch keeps its turn (see [`send_batches`]) while a call of it
/// is unanswered: a call to a primary that stalled or is gone waits until the store timeout,
/// and the batches after it, mostly for other primaries, go on after this long. Calls to a
/// primary that answers take a few milliseconds at most, even on two busy cores.
const SLOW_CALL: std::time::Duration = std::time::Duration::from_millis(20);
/// How often writes waiting for a free call are looked over, to forget those whose caller gave
/// up: while Redis does not answer, callers time out much faster than calls free up.
const FORGET_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The most keys and arguments of one write: a split order's create with every step (see
/// [`Shape::split_args`]), six keys, its shape and twenty-eight arguments.
const MAX_PARTS: usize = 35;

/// What a write of the writes script is: a create or a commit, and whether it stores the order
/// finished (a create) or finished or notifying (a commit), and whether a create has an
/// idempotency key. The shape is the write's first argument, and sets how many keys and
/// arguments the script takes for it (see [`scripts`](super::scripts)): a write sends only
/// what its shape uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    Commit {
        finishing: bool,
    },
    /// A commit of a move from one work step to the next (see the step script).
    Step,
    Create {
        finishing: bool,
        keyed: bool,
    },
}

impl Shape {
    /// Its name in the writes script.
    fn name(self) -> &'static str {
        match self {
            Shape::Commit { finishing: false } => "c",
            Shape::Commit { finishing: true } => "cf",
            Shape::Step => "s",
            Shape::Create {
                finishing: false,
                keyed: false,
            } => "n",
            Shape::Create {
                finishing: true,
                keyed: false,
            } => "nf",
            Shape::Create {
                finishing: false,
                keyed: true,
            } => "ni",
            Shape::Create {
                finishing: true,
                keyed: true,
            } => "nfi",
        }
    }

    /// Its name in the writes script for a split order's write (see `StoredForm::Split`).
    fn split_name(self) -> &'static str {
        match self {
            Shape::Commit { finishing: false } => "cx",
            Shape::Commit { finishing: true } => "cfx",
            Shape::Step => "sx",
            Shape::Create {
                finishing: false,
                keyed: false,
            } => "nx",
            Shape::Create {
                finishing: true,
                keyed: false,
            } => "nfx",
            Shape::Create {
                finishing: false,
                keyed: true,
            } => "nix",
            Shape::Create {
                finishing: true,
                keyed: true,
            } => "nfix",
        }
    }

    /// How many arguments a split order's write of it has past the others before the steps
    /// it gives (two each): its base and how many steps it gives, and a create's head (see the
    /// scripts' `SPLIT`).
    pub fn split_args(self) -> usize {
        match self {
            Shape::Create { .. } => 3,
            Shape::Commit { .. } | Shape::Step => 2,
        }
    }

    /// How many keys, then how many arguments after the shape, a write of it has.
    fn parts(self) -> (usize, usize) {
        match self {
            Shape::Commit { finishing: false } => (3, 9),
            Shape::Commit { finishing: true } => (5, 12),
            Shape::Step => (2, 7),
            Shape::Create { finishing, keyed } => {
                let (finishing, keyed) = (usize::from(finishing), usize::from(keyed));
                (4 + finishing + keyed, 9 + 2 * finishing + 2 * keyed)
            }
        }
    }
}

/// One write of the writes script (see `scripts`): its keys, then its arguments (its shape,
/// then the script's own), back to back in one buffer, so that making one allocates once and
/// its doc is encoded where it is sent from.
pub(super) struct Write {
    shard: u16,
    bytes: Vec<u8>,
    /// Where each key, then each argument, ends in `bytes`.
    ends: [u32; MAX_PARTS],
    parts: usize,
    keys: usize,
    /// How many parts its shape takes, once begun.
    shaped: Option<usize>,
    /// Set when a part did not fit in `ends` (or `bytes` passed 4 GiB), or a key came after the
    /// shape or did not match it: the write is refused.
    refused: bool,
}

impl Write {
    /// A write of an order of `shard`, with room for `capacity` bytes of keys and arguments.
    pub fn new(shard: u16, capacity: usize) -> Write {
        Write {
            shard,
            bytes: Vec::with_capacity(capacity),
            ends: [0; MAX_PARTS],
            parts: 0,
            keys: 0,
            shaped: None,
            refused: false,
        }
    }

    /// Ends the part written since the last.
    fn end(&mut self) {
        match (
            self.ends.get_mut(self.parts),
            u32::try_from(self.bytes.len()),
        ) {
            (Some(end), Ok(len)) => {
                *end = len;
                self.parts += 1;
            }
            _ => self.refused = true,
        }
    }

    /// Adds the key of this write's shard made of `parts` (see [`keys::write_shard_key`]);
    /// every key comes before the first argument.
    pub fn key(&mut self, parts: &[&str]) {
        self.key_of(self.shard, parts);
    }

    /// Adds a key of `shard`, which must share this write's hash slot.
    pub fn key_of(&mut self, shard: u16, parts: &[&str]) {
        if self.parts > self.keys || self.shaped.is_some() {
            self.refused = true;
        }
        keys::write_shard_key(&mut self.bytes, shard, parts);
        self.end();
        self.keys = self.parts;
    }

    /// Starts the arguments with the write's shape, which must match the keys given.
    pub fn begin(&mut self, shape: Shape) {
        self.begin_as(shape, false);
    }

    /// Starts the arguments of a split order's write (see `StoredForm::Split`) with its shape;
    /// how many steps it gives is told with [`Write::steps`].
    pub fn begin_split(&mut self, shape: Shape) {
        self.begin_as(shape, true);
    }

    /// Adds how many steps of a split order it gives (the last argument before them): `given`,
    /// each as its field and its JSON, which its shape then takes.
    pub fn steps(&mut self, given: usize) {
        self.number(given as u64);
        match &mut self.shaped {
            Some(parts) => *parts += 2 * given,
            None => self.refused = true,
        }
    }

    fn begin_as(&mut self, shape: Shape, split: bool) {
        let (keys, mut args) = shape.parts();
        if self.keys != keys {
            self.refused = true;
        }
        if split {
            self.arg(shape.split_name());
            args += shape.split_args();
        } else {
            self.arg(shape.name());
        }
        self.shaped = Some(keys + 1 + args);
    }

    pub fn arg(&mut self, arg: impl AsRef<[u8]>) {
        self.bytes.extend_from_slice(arg.as_ref());
        self.end();
    }

    /// Adds an argument made of `pieces`, one after another.
    pub fn arg_concat(&mut self, pieces: &[&str]) {
        for piece in pieces {
            self.bytes.extend_from_slice(piece.as_bytes());
        }
        self.end();
    }

    pub fn number(&mut self, number: u64) {
        self.bytes
            .extend_from_slice(itoa::Buffer::new().format(number).as_bytes());
        self.end();
    }

    /// Adds an argument `write` writes in place.
    pub fn arg_with<E>(
        &mut self,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        write(&mut self.bytes)?;
        self.end();
        Ok(())
    }

    /// Whether it is not a whole write of its shape (not begun, a part too many or too few,
    /// or a part that did not fit): such a write must not be sent.
    pub fn malformed(&self) -> bool {
        self.refused || self.shaped != Some(self.parts)
    }

    fn shard(&self) -> u16 {
        self.shard
    }

    /// Part `index`.
    fn part(&self, index: usize) -> &[u8] {
        let start = match index.checked_sub(1) {
            Some(before) => self.ends.get(before).map_or(0, |end| *end as usize),
            None => 0,
        };
        let end = self.ends.get(index).map_or(0, |end| *end as usize);
        self.bytes.get(start..end).unwrap_or_default()
    }

    fn keys(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.keys).map(|index| self.part(index))
    }

    fn args(&self) -> impl Iterator<Item = &[u8]> {
        (self.keys..self.parts).map(|index| self.part(index))
    }
}

/// The call of the writes script `script` that makes `writes`, in their order: all their keys,
/// then each write's arguments.
fn call<'s, 'w>(
    script: &'s Script,
    writes: impl Iterator<Item = &'w Write> + Clone,
) -> ScriptCall<'s> {
    let keys = writes.clone().map(|write| write.keys).sum();
    let bytes = writes.clone().map(|write| write.bytes.len()).sum();
    let mut call = ScriptCall::new(script, keys, bytes);
    for write in writes.clone() {
        for key in write.keys() {
            call.command.arg(key);
        }
    }
    for write in writes {
        for arg in write.args() {
            call.command.arg(arg);
        }
    }
    call
}

/// Each write's answer in the writes script's answer to a call: its words (one string, see
/// [`WRITES`](super::scripts)), each as a string of its own, or its list of answers.
fn answers(answer: Value) -> Result<Vec<Value>, StoreError> {
    match answer {
        Value::BulkString(words) => Ok(words
            .split(|byte| *byte == b' ')
            .map(|word| Value::BulkString(word.to_vec()))
            .collect()),
        Value::Array(answers) => Ok(answers),
        other => Err(StoreError::Corrupt(format!(
            "the writes script answered {other:?}"
        ))),
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

/// Takes the writes waiting, up to [`MAX_BATCH`], each time one of the calls `redis` allows on
/// their way at once ([`Connections::write_calls`]) is free, and sends them. On a Redis Cluster
/// a call holds the writes of one shard only (a script runs on one hash slot); the calls of one
/// batch go out together, and a batch gives its turn back after [`SLOW_CALL`] even if one of
/// them is still unanswered, so that a primary that stalls holds back only its own shards'
/// writes.
async fn send_batches(
    redis: Arc<Connections>,
    script: Script,
    mut waiting: mpsc::UnboundedReceiver<Pending>,
) {
    let script = Arc::new(script);
    let calls = Arc::new(Semaphore::new(redis.write_calls().max(1)));
    let by_shard = redis.is_cluster();
    // Taken off the queue, in order, while every call was busy.
    let mut ready: VecDeque<Pending> = VecDeque::new();
    loop {
        if ready.is_empty() {
            match waiting.recv().await {
                Some(first) => ready.push_back(first),
                None => return,
            }
        }
        // Every call may be on its way to a Redis that does not answer: the writes that come
        // meanwhile are taken off the queue and those whose caller gave up forgotten, so that
        // only writes someone waits for are held.
        let permit = loop {
            if let Ok(permit) = Arc::clone(&calls).try_acquire_owned() {
                break Ok(permit);
            }
            tokio::select! {
                biased;
                permit = Arc::clone(&calls).acquire_owned() => break permit,
                _ = tokio::time::sleep(FORGET_EVERY) => {
                    while let Ok(next) = waiting.try_recv() {
                        ready.push_back(next);
                    }
                    ready.retain(|pending| !pending.answer.is_closed());
                }
            }
        };
        let Ok(permit) = permit else {
            return;
        };
        let mut batch = Vec::with_capacity(MAX_BATCH.min(ready.len().max(1)));
        while batch.len() < MAX_BATCH {
            match ready
                .pop_front()
                .map(Ok)
                .unwrap_or_else(|| waiting.try_recv())
            {
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
        let turn = Turn {
            permit,
            at_most: by_shard.then_some(SLOW_CALL),
        };
        tokio::spawn(send_groups(redis, script, groups, turn).instrument(tracing::Span::current()));
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

/// A batch's turn among the calls on their way: held until its calls are answered, or for at
/// most `at_most`.
struct Turn {
    permit: OwnedSemaphorePermit,
    at_most: Option<std::time::Duration>,
}

async fn send_groups(
    redis: Arc<Connections>,
    script: Arc<Script>,
    groups: Vec<Vec<Pending>>,
    turn: Turn,
) {
    let calls = groups
        .into_iter()
        .map(|group| send_group(&redis, &script, group));
    let calls = futures_util::future::join_all(calls);
    let Some(at_most) = turn.at_most else {
        calls.await;
        return;
    };
    tokio::pin!(calls);
    if tokio::time::timeout(at_most, &mut calls).await.is_err() {
        drop(turn.permit);
        calls.await;
    }
}

/// One script call for `group`; each write in it gets its own answer.
async fn send_group(redis: &Connections, script: &Script, group: Vec<Pending>) {
    let call = call(script, group.iter().map(|pending| &pending.write));
    let answers = redis.write(&call).await.and_then(answers);
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

#[cfg(test)]
mod tests {
    use super::super::split::SPLIT_STEPS;
    use super::*;
    use deadpool_redis::redis::{Arg, FromRedisValue};

    fn args(call: &ScriptCall<'_>) -> Vec<String> {
        call.command
            .args_iter()
            .map(|arg| match arg {
                Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => "<cursor>".into(),
            })
            .collect()
    }

    const SHAPES: [Shape; 7] = [
        Shape::Commit { finishing: false },
        Shape::Commit { finishing: true },
        Shape::Step,
        Shape::Create {
            finishing: false,
            keyed: false,
        },
        Shape::Create {
            finishing: true,
            keyed: false,
        },
        Shape::Create {
            finishing: false,
            keyed: true,
        },
        Shape::Create {
            finishing: true,
            keyed: true,
        },
    ];

    /// A write of `shape` whose keys are `k0`, `k1`… and arguments `a0`, `a1`…, with `more`
    /// arguments beyond what the shape takes (or fewer, when negative).
    fn shaped(shape: Shape, more: isize) -> Write {
        let (keys, args) = shape.parts();
        let mut write = Write::new(3, 64);
        for key in 0..keys {
            write.key(&[&format!("k{key}")]);
        }
        write.begin(shape);
        for arg in 0..args.saturating_add_signed(more) {
            write.arg(format!("a{arg}"));
        }
        write
    }

    #[test]
    fn a_call_names_every_key_of_its_writes_then_every_argument() {
        let script = Script::new("return 1");
        let mut first = Write::new(3, 64);
        first.key(&keys::order_parts("a"));
        first.key(&keys::owned_parts("n"));
        first.key(&keys::FINISHED_PARTS);
        first.begin(Shape::Commit { finishing: false });
        first.arg("{}");
        first.number(42);
        first.arg_concat(&["a", " ", "u"]);
        for _ in 3..9 {
            first.arg("x");
        }
        let writes = [first, shaped(Shape::Commit { finishing: false }, 0)];
        let tag = keys::shard_tag(3);
        let key = |part: &str| format!("op:{{{tag}}}:{part}");
        assert!(writes.iter().all(|write| !write.malformed()));
        let mut expected = vec![
            "EVALSHA".to_string(),
            script.get_hash().to_string(),
            "6".into(),
            key("order:a"),
            key("owned:n"),
            key("finished"),
            key("k0"),
            key("k1"),
            key("k2"),
            "c".into(),
            "{}".into(),
            "42".into(),
            "a u".into(),
        ];
        expected.extend(["x"; 6].map(String::from));
        expected.push("c".into());
        expected.extend((0..9).map(|arg| format!("a{arg}")));
        assert_eq!(args(&call(&script, writes.iter())), expected);
    }

    #[test]
    fn each_shape_takes_the_keys_and_arguments_the_writes_script_reads_for_it() {
        // The writes script's table of shapes: name = {kind, finishing, keyed, keys, args}.
        let script = super::super::scripts::WRITES;
        for shape in SHAPES {
            let (keys, args) = shape.parts();
            let (kind, finishing, keyed) = match shape {
                Shape::Commit { finishing } => ("commit", finishing, false),
                Shape::Step => ("step", false, false),
                Shape::Create { finishing, keyed } => ("create", finishing, keyed),
            };
            let entry = format!(
                "{} = {{'{kind}', {finishing}, {keyed}, {keys}, {args}}}",
                shape.name()
            );
            assert!(script.contains(&entry), "the writes script lacks `{entry}`");
            let split = format!(
                "{} = {{'{kind}', {finishing}, {keyed}, {keys}, {args}, {}}}",
                shape.split_name(),
                shape.split_args()
            );
            assert!(script.contains(&split), "the writes script lacks `{split}`");
            assert_eq!(shape.split_name(), format!("{}x", shape.name()));
            let most = keys + 1 + args + shape.split_args() + 2 * SPLIT_STEPS;
            assert!(most <= MAX_PARTS, "{shape:?}");
        }
        assert!(SHAPES.iter().any(|shape| {
            let (keys, args) = shape.parts();
            keys + 1 + args + shape.split_args() + 2 * SPLIT_STEPS == MAX_PARTS
        }));
    }

    #[test]
    fn an_answer_of_words_is_one_answer_per_word_and_a_list_is_taken_as_it_is() {
        let words = answers(Value::BulkString(b"ok stale ok not_owner".to_vec()));
        let words: Vec<String> = words
            .map(|answers| {
                answers
                    .into_iter()
                    .map(|answer| String::from_redis_value(answer).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(words, ["ok", "stale", "ok", "not_owner"]);
        let list = vec![
            Value::BulkString(b"ok".to_vec()),
            Value::Array(vec![Value::BulkString(b"exists".to_vec()), Value::Nil]),
        ];
        assert_eq!(answers(Value::Array(list.clone())).ok(), Some(list));
        assert!(matches!(
            answers(Value::Int(1)),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn a_write_that_is_not_whole_for_its_shape_is_refused() {
        for shape in SHAPES {
            assert!(!shaped(shape, 0).malformed(), "{shape:?}");
            assert!(
                shaped(shape, 1).malformed(),
                "{shape:?} with one argument more"
            );
            assert!(
                shaped(shape, -1).malformed(),
                "{shape:?} with one argument less"
            );
        }
        // Not begun.
        let mut write = Write::new(0, 0);
        write.key(&keys::FINISHED_PARTS);
        write.arg("x");
        assert!(write.malformed());
        // Keys that do not match the shape.
        let mut write = Write::new(0, 0);
        write.key(&keys::FINISHED_PARTS);
        write.begin(Shape::Commit { finishing: false });
        for _ in 0..9 {
            write.arg("x");
        }
        assert!(write.malformed());
        // A key after the shape.
        let mut write = shaped(Shape::Commit { finishing: false }, 0);
        write.key(&keys::PARKED_PARTS);
        assert!(write.malformed());
        // A split order's write: whole once it says how many steps it gives, and gives them.
        let (keys, args) = Shape::Step.parts();
        let mut write = Write::new(3, 64);
        for key in 0..keys {
            write.key(&[&format!("k{key}")]);
        }
        write.begin_split(Shape::Step);
        for arg in 0..=args {
            write.arg(format!("a{arg}"));
        }
        assert!(write.malformed());
        write.steps(1);
        write.arg("s0");
        assert!(write.malformed());
        write.arg("{}");
        assert!(!write.malformed());
        // More parts than any write has.
        let mut write = shaped(
            Shape::Create {
                finishing: true,
                keyed: true,
            },
            0,
        );
        write.arg("one more");
        assert!(write.malformed());
    }
}
