//! [`RedisStore`]: the [`OrderStore`] on Redis. Every change to an order is one Lua script (see
//! `scripts`) that writes its index entries in the same atomic step.

use super::access::ClusterAccess;
use super::checks::Fitness;
use super::commits::{Committer, Shape, Write};
use super::conn::{Connections, Scripted};
use super::keys;
use super::keys::{
    aside_key, finished_key, in_shard, order_key, order_pattern, owned_key, parked_key, probe_key,
    shard_of, shard_of_key, shards, state_code, state_key, user_key, FINISHED_CODES, RUNNING,
    STATE_INDEXED,
};
use super::scripts::Scripts;
use super::split::{Steps, Written as SplitWritten, SPLIT_STEPS};
use crate::order::{Order, OrderId, Phase, RollbackState, Step, StoredForm};
use crate::store::corrupt;
use crate::store::doc::{self, DOC_CAPACITY};
use crate::store::{
    cancel_outcome, decode_cursor, encode_cursor, is_parked, reopen_outcome, AsidePage,
    CancelOutcome, Created, ListQuery, OrderStore, OwnedPage, Page, Reopen, Reopened, RepairPage,
    Repaired, SetAside, StoreError, TakenBack, DEFAULT_RETENTION, IDEMPOTENCY_TTL,
};
use async_trait::async_trait;
use deadpool_redis::redis::{self, Value};
use futures_util::{StreamExt, TryStreamExt};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use uuid::Uuid;

/// How many shards a view over all of them (a node's orders, a user's, the parked ones) reads
/// at once.
const FAN_OUT: usize = 8;

/// How often a retry of a parked rollback re-reads an order that changed under it.
const REOPEN_TRIES: usize = 5;

/// The hash fields an order is read from, in the order [`decode`] takes them: a split order's
/// head and steps last (see `split`).
const READ_FIELDS: [&str; 6 + SPLIT_STEPS] = [
    "doc", "owner", "epoch", "cancel", "payload", "head", "s0", "s1", "s2", "s3", "s4", "s5",
];

/// The orders of a cluster, in its Redis.
pub struct RedisStore {
    redis: Arc<Connections>,
    scripts: Scripts,
    /// How long a finished order is kept, in ms (what the scripts' `PEXPIRE` takes).
    retention_ms: u64,
    /// The shard the next retention pass starts at, so that every shard gets its turn.
    purge_from: AtomicUsize,
    /// The group commit of writes that wait for replicas, started with the first write
    /// (within the runtime, which the store may be made outside of).
    committer: OnceLock<Committer>,
    /// Whether orders are written compressed (see `doc`); either form is read.
    compress: bool,
    /// Whether an order created keeps its payload apart from its doc, written once (see
    /// `doc::write_payload`); either form is read, and an order keeps the form it was created in.
    payload_apart: bool,
    /// Whether an order created is split (see `split`); either form is read, and an order keeps
    /// the form it was created in.
    split: bool,
    /// The steps of the split orders this node wrote last.
    split_written: SplitWritten,
    /// Whether Redis keeps orders as configured (see `checks::watch`): new orders are refused
    /// while it does not.
    fitness: Arc<Fitness>,
}

/// A script's answer as `T`.
fn from_value<T: redis::FromRedisValue>(value: Value) -> Result<T, StoreError> {
    T::from_redis_value(value).map_err(corrupt)
}

/// The `state` field the scripts decide on: `finished` only once no work is owed, so a
/// finished order whose webhook is still to be delivered stays in its owner's set.
fn state_name(order: &Order) -> &'static str {
    match order.phase {
        Phase::Forward => "forward",
        Phase::RollingBack => "rolling_back",
        Phase::Finished if order.owes_work() => "notifying",
        Phase::Finished => "finished",
    }
}

fn micros_member(order: &Order) -> String {
    encode_cursor(crate::store::created_micros(order), order.order_id)
}

/// The order's entry in the finished index: `{id} {user index member} {user}`, all the
/// retention pass needs to take its user index entry out once it expired. `id` is the order's
/// id as text and `member` its [`micros_member`], which the caller has at hand.
fn finished_entry<'a>(order: &'a Order, id: &'a str, member: &'a str) -> [&'a str; 5] {
    [id, " ", member, " ", &order.user]
}

/// Room for a write's keys and arguments: its doc and a few hundred bytes more.
const WRITE_CAPACITY: usize = DOC_CAPACITY + 512;

/// The state index `order` is filed under.
fn state_index(order: &Order) -> String {
    state_key(
        shard_of(order.order_id),
        state_code(order.current_step, order.rollback_state),
        &order.user,
    )
}

/// The state index codes a filtered listing reads (then filtering what it reads by `query`), or
/// `None` for an unfiltered one. A rollback state is set only on failed orders, which never
/// change step again: `Completed` orders are all in its own index; `Failed` ones in that and in
/// the two rollback states'; a work step's in the running index, or in the step's own where an
/// earlier version filed them.
fn listing_codes(query: &ListQuery) -> Option<Vec<&'static str>> {
    match (query.rollback_state, query.current_step) {
        (Some(state), _) => Some(vec![state_code(Step::Failed, Some(state))]),
        (None, Some(Step::Failed)) => Some(
            [
                None,
                Some(RollbackState::Complete),
                Some(RollbackState::Incomplete),
            ]
            .map(|state| state_code(Step::Failed, state))
            .to_vec(),
        ),
        (None, Some(step)) if Step::WORK.contains(&step) => {
            Some(vec![state_code(step, None), step.as_str()])
        }
        (None, Some(step)) => Some(vec![state_code(step, None)]),
        (None, None) => None,
    }
}

/// Every state index code, an earlier version's included, for taking a gone order out of all.
fn all_codes() -> impl Iterator<Item = &'static str> {
    Step::ALL
        .iter()
        .map(|step| step.as_str())
        .chain([RUNNING])
        .chain(FINISHED_CODES[1..].iter().copied())
}

/// An `HMGET` of the fields an order is read from.
fn read_order(pipeline: &mut redis::Pipeline, key: &str) {
    pipeline.cmd("HMGET").arg(key).arg(&READ_FIELDS[..]);
}

/// An order's hash fields as read: [`READ_FIELDS`] (bytes: a doc may be compressed).
type Fields = Vec<Option<Vec<u8>>>;

/// Builds an order from the hash fields [`READ_FIELDS`] names: `doc`, `owner`, `epoch`,
/// `cancel`, `payload` (only where the order keeps its payload apart), and where it is split,
/// its `head` and steps.
fn decode(fields: Fields) -> Result<Option<Order>, StoreError> {
    let payload = fields.get(4).and_then(Option::as_deref);
    let Some(Some(doc)) = fields.first() else {
        return Ok(None);
    };
    let mut order = match fields.get(5).and_then(Option::as_deref) {
        Some(head) => {
            let steps: Vec<&[u8]> = fields.iter().skip(6).map_while(Option::as_deref).collect();
            let payload = payload
                .ok_or_else(|| StoreError::Corrupt("split order without its payload".into()))?;
            let split = doc::Split {
                head,
                rest: doc,
                steps: &steps,
            };
            doc::read_split(split, payload)?
        }
        None => doc::read(doc, payload)?,
    };
    let mut fields = fields.into_iter().skip(1);
    let text = |field: Vec<u8>, name: &str| {
        String::from_utf8(field).map_err(|_| StoreError::Corrupt(format!("{name} not UTF-8")))
    };
    if let Some(Some(owner)) = fields.next() {
        order.owner = text(owner, "owner")?;
    }
    if let Some(Some(epoch)) = fields.next() {
        let epoch = text(epoch, "epoch")?;
        order.epoch = epoch
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("epoch `{epoch}`")))?;
    }
    if let Some(Some(cancel)) = fields.next() {
        order.cancel_requested |= cancel == b"1";
    }
    Ok(Some(order))
}

/// The order in `fields`, or `None` when there is none or it cannot be read (logged: a listing
/// or a sweep goes on past one unreadable record).
fn decode_or_skip(fields: Fields, key: &str) -> Option<Order> {
    decode(fields).unwrap_or_else(|error| {
        tracing::warn!(key = %key, error = %error, "skipping an unreadable order");
        None
    })
}

/// What the writes script answered to a commit.
fn commit_outcome(answer: &str) -> Result<(), StoreError> {
    match answer {
        "ok" => Ok(()),
        "not_owner" => Err(StoreError::NotOwner),
        "cancel" => Err(StoreError::CancelRequested),
        "stale" => Err(StoreError::Stale),
        "missing" => Err(StoreError::NotFound),
        other => Err(StoreError::Corrupt(format!("commit answered `{other}`"))),
    }
}

/// Where an order the reassign script answered for belongs now: `to` (moved, or `to`'s already),
/// nobody (finished or gone), or the other owner it names.
fn owner_after_reassign(answer: &str, to: &str) -> Option<String> {
    match answer {
        "moved" | "mine" => Some(to.to_string()),
        "finished" | "missing" => None,
        other_owner => Some(other_owner.to_string()),
    }
}

impl RedisStore {
    /// The order store on shared connections.
    pub fn new(redis: Arc<Connections>) -> RedisStore {
        RedisStore {
            redis,
            scripts: Scripts::new(),
            retention_ms: millis(DEFAULT_RETENTION),
            purge_from: AtomicUsize::new(0),
            committer: OnceLock::new(),
            compress: false,
            payload_apart: false,
            split: false,
            split_written: SplitWritten::default(),
            fitness: Arc::default(),
        }
    }

    /// The store, refusing new orders while `fitness` says Redis cannot keep them.
    pub fn with_fitness(mut self, fitness: Arc<Fitness>) -> RedisStore {
        self.fitness = fitness;
        self
    }

    /// Unavailable while Redis cannot keep orders as configured.
    fn fit(&self) -> Result<(), StoreError> {
        match self.fitness.problem() {
            Some(problem) => Err(StoreError::Unavailable(problem.to_string())),
            None => Ok(()),
        }
    }

    /// The store, writing orders compressed (see `doc`) when `compress` says so.
    pub fn with_compression(mut self, compress: bool) -> RedisStore {
        self.compress = compress;
        self
    }

    /// The store, creating orders with their payload apart from their doc when `apart` says so.
    pub fn with_payload_apart(mut self, apart: bool) -> RedisStore {
        self.payload_apart = apart;
        self
    }

    /// The store, creating orders split (see `split`) when `split` says so.
    pub fn with_split_orders(mut self, split: bool) -> RedisStore {
        self.split = split;
        self
    }

    /// The store, keeping finished orders for `retention` after they finished.
    pub fn with_retention(mut self, retention: Duration) -> RedisStore {
        self.retention_ms = millis(retention).max(1);
        self
    }

    /// A store on its own connections to `url`. Nothing is contacted yet; the first operation
    /// connects.
    pub fn connect(
        url: &str,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        Ok(RedisStore::new(Arc::new(Connections::connect(
            url, pool_size, timeout,
        )?)))
    }

    /// A store on its own connections to the Redis Cluster `nodes` (`host:port`) belong to.
    /// Nothing is contacted yet; the first operation connects.
    pub fn connect_cluster(
        nodes: &[String],
        pool_size: usize,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        Ok(RedisStore::new(Arc::new(Connections::connect_cluster(
            nodes,
            ClusterAccess::default(),
            pool_size,
            timeout,
        )?)))
    }

    /// Sends a pipeline of writes that holds calls of this store's scripts. All its keys are in
    /// one shard.
    async fn scripted<T: redis::FromRedisValue + Send>(
        &self,
        pipeline: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let scripts = self.scripts.pipelined();
        self.redis
            .write(&Scripted {
                pipeline,
                scripts: &scripts,
            })
            .await
    }

    /// Runs `work` for every shard, [`FAN_OUT`] at a time, and answers in shard order.
    async fn each_shard<T, F, Fut>(&self, work: F) -> Result<Vec<T>, StoreError>
    where
        F: Fn(u16) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        futures_util::stream::iter(shards().map(work))
            .buffered(FAN_OUT)
            .try_collect()
            .await
    }

    /// The hash fields of the orders `ids` (in that order), read one pipeline per shard.
    async fn read_orders(&self, ids: &[OrderId]) -> Result<Vec<Fields>, StoreError> {
        let mut by_shard: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (at, id) in ids.iter().enumerate() {
            by_shard.entry(shard_of(*id)).or_default().push(at);
        }
        let reads = by_shard.into_values().map(|positions| async move {
            let mut read = redis::pipe();
            for &at in &positions {
                read_order(&mut read, &order_key(ids[at]));
            }
            let rows: Vec<Fields> = self.redis.query(&read).await?;
            Ok::<_, StoreError>(positions.into_iter().zip(rows).collect::<Vec<_>>())
        });
        let mut rows = vec![Vec::new(); ids.len()];
        let read: Vec<Vec<(usize, Fields)>> = futures_util::stream::iter(reads)
            .buffer_unordered(FAN_OUT)
            .try_collect()
            .await?;
        for (at, row) in read.into_iter().flatten() {
            rows[at] = row;
        }
        Ok(rows)
    }

    /// Adds to `found` one HSCAN call's worth of the orders set aside in `shard`, from HSCAN
    /// cursor `cursor`; returns the cursor of the next call (0: through the shard).
    async fn set_aside_scan(
        &self,
        shard: u16,
        cursor: u64,
        found: &mut Vec<SetAside>,
    ) -> Result<u64, StoreError> {
        let mut scan = redis::cmd("HSCAN");
        scan.arg(aside_key(shard)).arg(cursor).arg("COUNT").arg(500);
        let (next, pairs): (u64, Vec<(String, String)>) = self.redis.query(&scan).await?;
        for (id, entry) in pairs {
            match serde_json::from_str(&entry) {
                Ok(entry) => found.push(entry),
                Err(error) => {
                    tracing::warn!(order_id = %id, error = %error, "skipping an unreadable set-aside entry");
                }
            }
        }
        Ok(next)
    }

    /// Repairs the index entries of the orders `ids`, counting them into `repaired`.
    async fn repair_batch(
        &self,
        ids: &[OrderId],
        repaired: &mut Repaired,
    ) -> Result<(), StoreError> {
        let rows = self.read_orders(ids).await?;
        let mut writes: BTreeMap<u16, redis::Pipeline> = BTreeMap::new();
        for (id, fields) in ids.iter().zip(rows) {
            let key = order_key(*id);
            let doc = fields.first().cloned().flatten();
            let Some(order) = decode_or_skip(fields, &key) else {
                continue;
            };
            if order.owes_work() && !repaired.owners.contains(&order.owner) {
                repaired.owners.insert(order.owner.clone());
            }
            let shard = shard_of(*id);
            let (id, member) = (id.to_string(), micros_member(&order));
            // Decided on the order as it is when the write runs, not as read above.
            writes
                .entry(shard)
                .or_insert_with(redis::pipe)
                .invoke_script(
                    self.scripts
                        .repair_owned
                        .key(&key)
                        .key(finished_key(shard))
                        .key(user_key(shard, &order.user))
                        .key(parked_key(shard))
                        .key(owned_key(shard, &order.owner))
                        .key(state_index(&order))
                        .key(aside_key(shard))
                        .arg(&order.owner)
                        .arg(&id)
                        .arg(self.retention_ms)
                        .arg(finished_entry(&order, &id, &member).concat())
                        .arg(&member)
                        .arg(flag(is_parked(&order)))
                        .arg(doc),
                )
                .ignore();
            repaired.orders += 1;
        }
        for write in writes.values() {
            self.scripted::<()>(write).await?;
        }
        Ok(())
    }

    /// Up to `batch` members below `upper` (exclusive, `+` for the newest), newest first, of
    /// the indexes `indexes` names for each shard (`user`'s index, or some of their state
    /// indexes), merged from every shard: each shard's in one pipeline, each index's newest
    /// `batch`.
    async fn index_members(
        &self,
        indexes: &(dyn Fn(u16) -> Vec<String> + Sync),
        upper: &str,
        batch: usize,
    ) -> Result<Vec<String>, StoreError> {
        let pages = self
            .each_shard(|shard| async move {
                let mut ranges = redis::pipe();
                for index in indexes(shard) {
                    ranges
                        .cmd("ZRANGE")
                        .arg(index)
                        .arg(upper)
                        .arg("-")
                        .arg("BYLEX")
                        .arg("REV")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(batch);
                }
                self.redis.query::<Vec<Vec<String>>, _>(&ranges).await
            })
            .await?;
        let mut members: Vec<String> = pages.into_iter().flatten().flatten().collect();
        members.sort_unstable_by(|a, b| b.cmp(a));
        // An order filed twice (by a version that moved it without taking it out) is one.
        members.dedup();
        members.truncate(batch);
        Ok(members)
    }

    /// Whether every order is filed in the state indexes (see [`STATE_INDEXED`]).
    async fn state_indexed(&self) -> Result<bool, StoreError> {
        let mut exists = redis::cmd("EXISTS");
        exists.arg(STATE_INDEXED);
        Ok(self.redis.query::<i64, _>(&exists).await? == 1)
    }

    /// A page of `user`'s orders, gathering into `gone` the index entries (order id, member)
    /// whose order retention deleted: they are skipped, and the page is filled past them.
    async fn list_page(
        &self,
        user: &str,
        query: &ListQuery,
        gone: &mut Vec<(OrderId, String)>,
    ) -> Result<Page, StoreError> {
        let mut page = Page::default();
        let mut upper = match query.cursor.as_deref() {
            Some(cursor) => {
                let (micros, id) = decode_cursor(cursor).ok_or(StoreError::NotFound)?;
                format!("({}", encode_cursor(micros, id))
            }
            None => "+".to_string(),
        };
        let batch = query.limit.clamp(1, 500);
        // A filtered listing reads the state indexes of what it asks for, once they are
        // complete; until then (a Redis of an earlier version) the user's whole index.
        let codes = match listing_codes(query) {
            Some(codes) if self.state_indexed().await? => Some(codes),
            _ => None,
        };
        let indexes = |shard: u16| match &codes {
            Some(codes) => codes
                .iter()
                .map(|code| state_key(shard, code, user))
                .collect(),
            None => vec![user_key(shard, user)],
        };
        loop {
            let members = self.index_members(&indexes, &upper, batch).await?;
            if members.is_empty() {
                return Ok(page);
            }
            let ids: Vec<Option<OrderId>> = members
                .iter()
                .map(|member| {
                    member
                        .split_once('-')
                        .and_then(|(_, id)| OrderId::try_parse(id).ok())
                })
                .collect();
            let known: Vec<OrderId> = ids.iter().flatten().copied().collect();
            let mut rows = self.read_orders(&known).await?.into_iter();
            let exhausted = members.len() < batch;
            for (member, id) in members.iter().zip(ids) {
                upper = format!("({member}");
                let Some(id) = id else { continue };
                let fields = rows.next().unwrap_or_default();
                if matches!(fields.first(), Some(None)) {
                    gone.push((id, member.clone()));
                    continue;
                }
                let Some(order) = decode_or_skip(fields, member) else {
                    continue;
                };
                // A member left by a create that lost its id to another request with the same
                // idempotency key (and crashed before taking the member back) is not this order's.
                if order.user != user || !query.matches(&order) || micros_member(&order) != *member
                {
                    continue;
                }
                page.orders.push(order);
                if page.orders.len() >= query.limit {
                    page.next_cursor = Some(member.clone());
                    return Ok(page);
                }
            }
            if exhausted {
                return Ok(page);
            }
        }
    }

    /// Takes out of `user`'s index and state indexes the entries (order id, member) whose order
    /// is gone, each only if its order is still gone. Best effort: what fails stays for the
    /// retention pass.
    async fn prune_members(&self, user: &str, gone: &[(OrderId, String)]) {
        let mut by_shard: BTreeMap<u16, redis::Pipeline> = BTreeMap::new();
        for (id, member) in gone {
            let shard = shard_of(*id);
            let mut prune = self.scripts.prune_member.key(order_key(*id));
            prune.key(user_key(shard, user));
            for code in all_codes() {
                prune.key(state_key(shard, code, user));
            }
            prune.arg(member);
            by_shard
                .entry(shard)
                .or_insert_with(redis::pipe)
                .invoke_script(&prune)
                .ignore();
        }
        for prune in by_shard.values() {
            if let Err(error) = self.scripted::<()>(prune).await {
                tracing::debug!(user = %user, error = %error, "cannot prune index entries of deleted orders");
            }
        }
    }

    /// Makes one create or commit together with whatever other writes are ready (group
    /// commit); on a Redis Cluster, together with those of its shard (a script call holds one
    /// shard's keys).
    async fn write(&self, write: Write) -> Result<Value, StoreError> {
        if write.malformed() {
            return Err(StoreError::Corrupt(
                "a write does not have the keys and arguments its shape takes".into(),
            ));
        }
        let committer = self
            .committer
            .get_or_init(|| Committer::start(Arc::clone(&self.redis), self.scripts.writes.clone()));
        // The store timeout bounds the wait for a turn in a batch as well as the call.
        tokio::time::timeout(self.redis.timeout(), committer.write(write))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "redis did not answer in time".into(),
                ))
            })
    }

    /// The arguments a commit's write and a step's write (see `scripts`) begin with: the
    /// owner, the epoch, the doc, whether the order is aware of its cancellation (1/0), its
    /// state and its step.
    fn transition_args(
        &self,
        write: &mut Write,
        order: &Order,
        state: &str,
    ) -> Result<(), StoreError> {
        let aware = order.cancel_requested || order.failure.is_some();
        write.arg(&order.owner);
        write.number(order.epoch);
        self.doc_arg(write, order)?;
        write.arg(flag(aware));
        write.arg(state);
        write.arg(order.current_step.as_str());
        Ok(())
    }

    /// Commits `order`'s transition; for a split order (`steps` given), with the steps that
    /// changed since the ones this node last wrote, which it leaves in `steps` as written.
    async fn commit_with(
        &self,
        order: &Order,
        mut steps: Option<&mut Option<Steps>>,
    ) -> Result<(), StoreError> {
        let state = state_name(order);
        // Only a write that stores the order finished or notifying touches the finished and
        // parked indexes (see the commit script).
        let finishing = matches!(state, "finished" | "notifying");
        let code = state_code(order.current_step, order.rollback_state);
        // Whether a split order's write gives every step (its base was not as stored).
        let mut whole = false;
        if !finishing && code == RUNNING {
            // To a work step, so most likely from one: the step script's write, which asks for
            // the whole commit only when there is more to do than write the order.
            let mut write = Write::new(shard_of(order.order_id), WRITE_CAPACITY);
            let mut id_text = Uuid::encode_buffer();
            write.key(&keys::order_parts(
                order.order_id.hyphenated().encode_lower(&mut id_text),
            ));
            write.key(&keys::state_parts(code, &order.user));
            self.begin(&mut write, Shape::Step, steps.is_some());
            self.transition_args(&mut write, order, state)?;
            write.number(order.revision);
            if let Some(steps) = steps.as_deref_mut() {
                *steps = Some(self.split_written.add_commit(&mut write, order, false)?);
            }
            let outcome: String = from_value(self.write(write).await?)?;
            if outcome != "full" {
                return commit_outcome(&outcome);
            }
            whole = true;
        }
        let mut id_text = Uuid::encode_buffer();
        let id = &*order.order_id.hyphenated().encode_lower(&mut id_text);
        let member = micros_member(order);
        loop {
            let mut write = Write::new(shard_of(order.order_id), WRITE_CAPACITY);
            write.key(&keys::order_parts(id));
            write.key(&keys::owned_parts(&order.owner));
            write.key(&keys::state_parts(code, &order.user));
            if finishing {
                write.key(&keys::FINISHED_PARTS);
                write.key(&keys::PARKED_PARTS);
            }
            self.begin(&mut write, Shape::Commit { finishing }, steps.is_some());
            self.transition_args(&mut write, order, state)?;
            write.arg(id);
            write.number(order.revision);
            write.arg(&member);
            if finishing {
                write.number(self.retention_ms);
                write.arg_concat(&finished_entry(order, id, &member));
                write.arg(flag(is_parked(order)));
            }
            if let Some(steps) = steps.as_deref_mut() {
                *steps = Some(self.split_written.add_commit(&mut write, order, whole)?);
            }
            let outcome: String = from_value(self.write(write).await?)?;
            // A split order's steps were not as the base it gave left them: all of them.
            if outcome == "full" && steps.is_some() && !whole {
                whole = true;
                continue;
            }
            return commit_outcome(&outcome);
        }
    }

    /// Begins `write` with `shape`, as a split order's write when `split` says so.
    fn begin(&self, write: &mut Write, shape: Shape, split: bool) {
        if split {
            write.begin_split(shape);
        } else {
            write.begin(shape);
        }
    }

    /// Adds `order`'s doc to `write`.
    fn doc_arg(&self, write: &mut Write, order: &Order) -> Result<(), StoreError> {
        write.arg_with(|bytes| self.write_doc(bytes, order))
    }

    /// Appends `order`'s doc to `bytes`: what a split order keeps at each write, or the whole
    /// order.
    fn write_doc(&self, bytes: &mut Vec<u8>, order: &Order) -> Result<(), StoreError> {
        if order.payload.is_split() {
            doc::write_split(bytes, order)
        } else {
            doc::write(bytes, order, self.compress)
        }
    }

    /// The order `id` as stored, once it is on as many replicas as a write must reach: the
    /// first order of an idempotency key is answered to a retry only then, since the first
    /// request may have stored it on the primary alone (its `WAIT` failed, it answered 503).
    /// Unavailable while the replicas do not acknowledge it.
    async fn replicated(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        for _ in 0..REOPEN_TRIES {
            let Some(order) = self.get(id).await? else {
                return Ok(None);
            };
            // False: it changed between the read and the confirmation; read it again.
            if self.confirm(&order).await? {
                return Ok(Some(order));
            }
        }
        Err(StoreError::Unavailable(
            "the order of this idempotency key kept changing while it was read, try again".into(),
        ))
    }

    /// Creates `order`: the order, its index entries and (with `idempotency`, the key and
    /// whether to take over a key that holds no order id) its idempotency key, in one atomic
    /// step of the writes script. Not inside a pipeline, so a Redis that has forgotten the script
    /// loads it and runs the whole call again: nothing of it ran before. The order's id must be
    /// in the key's shard.
    async fn write_new(
        &self,
        order: &Order,
        idempotency: Option<(&str, bool)>,
    ) -> Result<Written, StoreError> {
        let mut id_text = Uuid::encode_buffer();
        let id = &*order.order_id.hyphenated().encode_lower(&mut id_text);
        let member = micros_member(order);
        let shard = shard_of(order.order_id);
        let code = state_code(order.current_step, order.rollback_state);
        let state = state_name(order);
        // Only an order stored finished is filed in the finished index at once.
        let finishing = state == "finished";
        let shape = Shape::Create {
            finishing,
            keyed: idempotency.is_some(),
        };
        // The keys: the order, its owner's owned set, its user's index, the finished index (if
        // finishing), the idempotency key (if any), the state index; then the arguments (see
        // `scripts`).
        let mut write = Write::new(shard, WRITE_CAPACITY);
        write.key(&keys::order_parts(id));
        write.key(&keys::owned_parts(&order.owner));
        write.key(&keys::user_parts(&order.user));
        if finishing {
            write.key(&keys::FINISHED_PARTS);
        }
        if let Some((key, _)) = idempotency {
            write.key_of(
                shard_of_key(&order.user, key),
                &keys::idem_parts(&keys::idem_user(&order.user), key),
            );
        }
        write.key(&keys::state_parts(code, &order.user));
        // Before the doc is written: it then leaves the payload out (and a split order, its
        // steps and head), as every later write of the order does.
        if self.split {
            order.payload.set_form(StoredForm::Split);
            write.begin_split(shape);
        } else {
            if self.payload_apart {
                order.payload.set_apart();
            }
            write.begin(shape);
        }
        self.doc_arg(&mut write, order)?;
        if order.payload.is_apart() {
            write.arg_with(|bytes| doc::write_payload(bytes, &order.payload, self.compress))?;
        } else {
            write.arg("");
        }
        write.arg(&order.owner);
        write.number(order.epoch);
        write.arg(&order.user);
        write.arg(state);
        write.arg(order.current_step.as_str());
        write.arg(&member);
        write.arg(id);
        if let Some((_, take)) = idempotency {
            write.number(IDEMPOTENCY_TTL.as_secs());
            write.arg(flag(take));
        }
        if finishing {
            write.number(self.retention_ms);
            write.arg_concat(&finished_entry(order, id, &member));
        }
        let steps = match order.payload.is_split() {
            true => Some(self.split_written.add_create(&mut write, order)?),
            false => None,
        };
        let answer = self.write(write).await?;
        // A create that stored the order answers a word; one that did not, a list.
        if matches!(&answer, Value::BulkString(word) if word == b"ok") {
            if let Some(steps) = steps.filter(|_| !finishing) {
                self.split_written.stored(order.order_id, steps);
            }
            return Ok(Written::New);
        }
        let answer: Vec<Option<String>> = from_value(answer)?;
        let mut answer = answer.into_iter();
        let outcome = answer.next().flatten().unwrap_or_default();
        let detail = answer.next().flatten();
        match (outcome.as_str(), detail) {
            ("exists", _) => Ok(Written::Exists),
            ("key", Some(earlier)) => Ok(Written::KeyUsed(earlier)),
            (other, _) => Err(StoreError::Corrupt(format!("create answered `{other}`"))),
        }
    }

    /// Moves `from`'s orders of `shard` to `to`; the ones `to` owns as a result.
    async fn reassign_shard(
        &self,
        shard: u16,
        from: &str,
        to: &str,
    ) -> Result<Vec<OrderId>, StoreError> {
        let mut members = redis::cmd("SMEMBERS");
        members.arg(owned_key(shard, from));
        let ids: Vec<String> = self.redis.query(&members).await?;
        let ids: Vec<OrderId> = ids
            .iter()
            .filter_map(|id| OrderId::try_parse(id).ok())
            .collect();
        let mut owned = Vec::new();
        for chunk in ids.chunks(256) {
            let mut pipeline = redis::pipe();
            for id in chunk {
                pipeline.invoke_script(
                    self.scripts
                        .reassign
                        .key(order_key(*id))
                        .key(owned_key(shard, from))
                        .key(owned_key(shard, to))
                        .arg(from)
                        .arg(to)
                        .arg(id.to_string()),
                );
            }
            // A chunk that fails leaves the orders it moved in `to`'s owned set: the caller
            // finds them there.
            let outcomes: Vec<String> = self.scripted(&pipeline).await?;
            let mut enlist = redis::pipe();
            for (id, outcome) in chunk.iter().zip(outcomes) {
                match owner_after_reassign(&outcome, to) {
                    Some(owner) if owner == to => owned.push(*id),
                    Some(owner) => {
                        enlist
                            .invoke_script(
                                self.scripts
                                    .enlist
                                    .key(order_key(*id))
                                    .key(owned_key(shard, &owner))
                                    .arg(&owner)
                                    .arg(id.to_string()),
                            )
                            .ignore();
                    }
                    None => {}
                }
            }
            if enlist.cmd_iter().next().is_some() {
                self.scripted::<()>(&enlist).await?;
            }
        }
        Ok(owned)
    }

    /// The retention pass over one shard: up to `n` due entries of its finished index.
    async fn purge_shard(&self, shard: u16, n: usize) -> Result<usize, StoreError> {
        // Which entries look due by this node's clock; the script checks each by Redis's.
        let now_ms = chrono::Utc::now().timestamp_millis();
        let finished = finished_key(shard);
        let mut due = redis::cmd("ZRANGE");
        due.arg(&finished)
            .arg("-inf")
            .arg(now_ms)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(n);
        let entries: Vec<String> = self.redis.query(&due).await?;
        if entries.is_empty() {
            return Ok(0);
        }
        let mut prune = redis::pipe();
        for entry in &entries {
            let parsed = entry.split_once(' ').and_then(|(id, rest)| {
                let (member, user) = rest.split_once(' ')?;
                Some((OrderId::try_parse(id).ok()?, member, user))
            });
            match parsed {
                Some((id, member, user)) if shard_of(id) == shard => {
                    let mut prune_one = self.scripts.prune_finished.key(&finished);
                    prune_one
                        .key(parked_key(shard))
                        .key(order_key(id))
                        .key(user_key(shard, user));
                    for code in FINISHED_CODES {
                        prune_one.key(state_key(shard, code, user));
                    }
                    prune_one.arg(entry).arg(member).arg(id.to_string());
                    prune.invoke_script(&prune_one);
                }
                // Not an entry this store writes: it just goes.
                _ => {
                    prune.cmd("ZREM").arg(&finished).arg(entry);
                }
            }
        }
        let done: Vec<i64> = self.scripted(&prune).await?;
        Ok(done.iter().filter(|&&went| went == 1).count())
    }
}

/// A script's yes/no argument.
fn flag(yes: bool) -> &'static str {
    if yes {
        "1"
    } else {
        "0"
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// What the writes script did with a create.
enum Written {
    /// Stored, with its index entries and idempotency key.
    New,
    /// The id is taken: nothing was written.
    Exists,
    /// The idempotency key names this other id: nothing was written.
    KeyUsed(String),
}

#[async_trait]
impl OrderStore for RedisStore {
    fn new_order_id(&self, user: &str, key: Option<&str>) -> OrderId {
        let id = OrderId::now_v7();
        match key {
            Some(key) => in_shard(id, shard_of_key(user, key)),
            None => id,
        }
    }

    async fn create(&self, order: &Order, key: Option<&str>) -> Result<Created, StoreError> {
        self.fit()?;
        let mut order = order.clone();
        // An order created with a key is stored in the key's shard: an id from elsewhere is
        // moved there (see `keys`), and the caller learns the id as stored.
        let mut adopted = match key {
            Some(key) => {
                let shard = shard_of_key(&order.user, key);
                let moved = shard_of(order.order_id) != shard;
                order.order_id = in_shard(order.order_id, shard);
                moved
            }
            None => false,
        };
        let mut take_key = false;
        // At most: the key names an id whose order is not stored (adopt it), then that id turns
        // out to be taken or the key names yet another id (another request won the race).
        for _ in 0..3 {
            let idempotency = key.map(|key| (key, take_key));
            let earlier = match self.write_new(&order, idempotency).await? {
                Written::New if adopted => return Ok(Created::Adopted(Box::new(order))),
                Written::New => return Ok(Created::New),
                Written::Exists => {
                    // Another request with the same key (or a stalled one) stored this id first.
                    return match self.replicated(order.order_id).await? {
                        Some(first) if first.user == order.user => {
                            Ok(Created::Existing(Box::new(first)))
                        }
                        // Only through a key of another user's (below): never answered with.
                        Some(_) => Err(StoreError::Unavailable(
                            "order id taken by another user's order, try again".into(),
                        )),
                        None => Err(StoreError::Unavailable(
                            "order of this idempotency key is being written, try again".into(),
                        )),
                    };
                }
                Written::KeyUsed(earlier) => earlier,
            };
            match OrderId::try_parse(&earlier) {
                // The key names an id of its shard (as every id it is given is).
                Ok(earlier)
                    if key
                        .is_none_or(|key| shard_of(earlier) == shard_of_key(&order.user, key)) =>
                {
                    match self.replicated(earlier).await? {
                        Some(first) if first.user == order.user => {
                            return Ok(Created::Existing(Box::new(first)));
                        }
                        // Another user's order: the key is one an earlier version wrote for a
                        // user whose name holds a `:` (see `keys::idem_user`), spelled as this
                        // user's key. Never this user's: this request takes the key.
                        Some(_) => take_key = true,
                        // The key names an id with no order (reserved by a request that failed
                        // or stalls before storing it): this one is stored under that id, so
                        // whichever writes first wins and there is never a second order.
                        None => {
                            order.order_id = earlier;
                            adopted = true;
                        }
                    }
                }
                // Not an order id of its shard (written by something else): this request takes
                // the key.
                _ => take_key = true,
            }
        }
        Err(StoreError::Unavailable(
            "idempotency key kept changing while the order was created, try again".into(),
        ))
    }

    async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        let mut command = redis::cmd("HMGET");
        command.arg(order_key(id)).arg(&READ_FIELDS[..]);
        decode(self.redis.query(&command).await?)
    }

    async fn confirm(&self, order: &Order) -> Result<bool, StoreError> {
        if !self.redis.waits_for_replicas() {
            return Ok(true);
        }
        let mut confirm = self.scripts.confirm.key(order_key(order.order_id));
        confirm.arg(order.revision);
        let confirmed: i64 = self.redis.write(&confirm).await?;
        Ok(confirmed == 1)
    }

    async fn list_for_user(&self, user: &str, query: &ListQuery) -> Result<Page, StoreError> {
        let mut gone = Vec::new();
        let page = self.list_page(user, query, &mut gone).await;
        if !gone.is_empty() {
            // Lazily, so a listing never meets them again; the retention pass would too, later.
            self.prune_members(user, &gone).await;
        }
        page
    }

    async fn commit(&self, order: &Order) -> Result<(), StoreError> {
        if !order.payload.is_split() {
            return self.commit_with(order, None).await;
        }
        let mut steps = None;
        let committed = self.commit_with(order, Some(&mut steps)).await;
        // Only steps stored are a base for the order's next write; a finished order has none.
        match steps {
            Some(steps) if committed.is_ok() && state_name(order) != "finished" => {
                self.split_written.stored(order.order_id, steps);
            }
            _ => self.split_written.forget(order.order_id),
        }
        committed
    }
    async fn request_cancel(&self, id: OrderId, user: &str) -> Result<CancelOutcome, StoreError> {
        let key = order_key(id);
        let reply: Value = self
            .redis
            .write(self.scripts.cancel.key(&key).arg(user))
            .await?;
        let fields: Option<Fields> =
            redis::FromRedisValue::from_redis_value(reply).map_err(corrupt)?;
        let fields = fields
            .filter(|fields| !fields.is_empty())
            .ok_or(StoreError::NotFound)?;
        let stored = decode(fields)?.ok_or(StoreError::NotFound)?;
        let (outcome, _) = cancel_outcome(stored);
        Ok(outcome)
    }

    async fn reopen(&self, reopen: Reopen<'_>) -> Result<Reopened, StoreError> {
        let (id, user, node, now) = (reopen.id, reopen.user, reopen.node, reopen.now);
        let shard = shard_of(id);
        for _ in 0..REOPEN_TRIES {
            let stored = self
                .get(id)
                .await?
                .filter(|order| order.user == user)
                .ok_or(StoreError::NotFound)?;
            let (read_owner, read_epoch, read_revision) =
                (stored.owner.clone(), stored.epoch, stored.revision);
            let next = match reopen_outcome(stored, reopen.what, node, now) {
                Ok(next) => next,
                Err(stored) => return Ok(Reopened::Refused(*stored)),
            };
            let mut doc = Vec::with_capacity(DOC_CAPACITY);
            self.write_doc(&mut doc, &next)?;
            let mut reopen = self.scripts.reopen.key(order_key(id));
            reopen
                .key(owned_key(shard, &next.owner))
                .key(parked_key(shard))
                .key(state_index(&next))
                .arg(&read_owner)
                .arg(read_epoch)
                .arg(&doc)
                .arg(&next.owner)
                .arg(next.epoch)
                .arg(state_name(&next))
                .arg(next.current_step.as_str())
                .arg(id.to_string())
                .arg(micros_member(&next))
                .arg(read_revision)
                .arg(next.revision)
                .arg(flag(is_parked(&next)));
            if next.payload.is_split() {
                // Every step, and the order's next write gives every step too (see `split`).
                self.split_written.add_reopen(&mut reopen, &next)?;
            }
            let outcome: String = self.redis.write(&reopen).await?;
            match outcome.as_str() {
                "ok" => return Ok(Reopened::Accepted(next)),
                "missing" => return Err(StoreError::NotFound),
                // Changed since read: read again and decide on the new state.
                _ => continue,
            }
        }
        Err(StoreError::Unavailable(
            "order kept changing while it was being re-opened".into(),
        ))
    }

    async fn owned_unfinished(&self, node: &str) -> Result<Vec<OrderId>, StoreError> {
        let per_shard = self
            .each_shard(|shard| async move {
                let mut members = redis::cmd("SMEMBERS");
                members.arg(owned_key(shard, node));
                self.redis.query::<Vec<String>, _>(&members).await
            })
            .await?;
        Ok(per_shard
            .iter()
            .flatten()
            .filter_map(|id| OrderId::try_parse(id).ok())
            .collect())
    }

    async fn owned_page(&self, node: &str, at: &str, n: usize) -> Result<OwnedPage, StoreError> {
        // The cursor is `{shard}:{SSCAN cursor}`: the sweep goes through the shards in turn.
        let (mut shard, mut cursor) = match at.split_once(':') {
            Some((shard, cursor)) => (
                shard.parse::<u16>().map_err(|_| StoreError::NotFound)?,
                cursor.to_string(),
            ),
            None => (0, "0".to_string()),
        };
        let mut ids = Vec::new();
        while shard < keys::SHARDS {
            let mut scan = redis::cmd("SSCAN");
            scan.arg(owned_key(shard, node))
                .arg(&cursor)
                .arg("COUNT")
                .arg(n.max(1));
            let (next, found): (String, Vec<String>) = self.redis.query(&scan).await?;
            ids.extend(found.iter().filter_map(|id| OrderId::try_parse(id).ok()));
            if next == "0" {
                shard += 1;
                cursor = "0".to_string();
            } else {
                cursor = next;
            }
            if ids.len() >= n.max(1) {
                break;
            }
        }
        let next = (shard < keys::SHARDS).then(|| format!("{shard}:{cursor}"));
        Ok((ids, next))
    }

    async fn still_owned(&self, node: &str, ids: &[OrderId]) -> Result<Vec<OrderId>, StoreError> {
        let mut by_shard: BTreeMap<u16, Vec<OrderId>> = BTreeMap::new();
        for id in ids {
            by_shard.entry(shard_of(*id)).or_default().push(*id);
        }
        let checks = by_shard.into_iter().map(|(shard, ids)| async move {
            let mut members = redis::cmd("SMISMEMBER");
            members.arg(owned_key(shard, node));
            for id in &ids {
                members.arg(id.to_string());
            }
            let found: Vec<bool> = self.redis.query(&members).await?;
            Ok::<_, StoreError>(
                ids.into_iter()
                    .zip(found)
                    .filter_map(|(id, found)| found.then_some(id))
                    .collect::<Vec<_>>(),
            )
        });
        let still: Vec<Vec<OrderId>> = futures_util::stream::iter(checks)
            .buffer_unordered(FAN_OUT)
            .try_collect()
            .await?;
        Ok(still.into_iter().flatten().collect())
    }

    async fn parked_page(&self, at: &str, n: usize) -> Result<OwnedPage, StoreError> {
        let n = n.max(1);
        let lower = if at.is_empty() {
            "-".to_string()
        } else {
            format!("({at}")
        };
        let lower = lower.as_str();
        let pages = self
            .each_shard(|shard| async move {
                let mut range = redis::cmd("ZRANGE");
                range
                    .arg(parked_key(shard))
                    .arg(lower)
                    .arg("+")
                    .arg("BYLEX")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(n);
                self.redis.query::<Vec<String>, _>(&range).await
            })
            .await?;
        let mut members: Vec<String> = pages.into_iter().flatten().collect();
        members.sort_unstable();
        members.truncate(n);
        let next = (members.len() >= n)
            .then(|| members.last().cloned())
            .flatten();
        let ids = members
            .iter()
            .filter_map(|id| OrderId::try_parse(id).ok())
            .collect();
        Ok((ids, next))
    }

    async fn reassign(&self, from: &str, to: &str) -> Result<Vec<OrderId>, StoreError> {
        let per_shard = self
            .each_shard(|shard| self.reassign_shard(shard, from, to))
            .await?;
        Ok(per_shard.into_iter().flatten().collect())
    }

    async fn repair_indexes(&self, at: &str, n: usize) -> Result<RepairPage, StoreError> {
        // The cursor is `{shard}:{SCAN cursor}`. One Redis holds every shard: one SCAN walks
        // them all (shard `all`). A Redis Cluster is walked shard by shard, each SCAN on the
        // primary that serves the shard's slot.
        let cluster = self.redis.is_cluster();
        let (shard, cursor) = match at.split_once(':') {
            Some(("all", cursor)) => (None, cursor),
            Some((shard, cursor)) => (
                Some(shard.parse::<u16>().map_err(|_| StoreError::NotFound)?),
                cursor,
            ),
            None => (cluster.then_some(0), "0"),
        };
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(order_pattern(shard))
            .arg("COUNT")
            .arg(n.max(1));
        let (next, found): (String, Vec<String>) = match shard {
            Some(shard) => self.redis.query_at(&scan, &order_key_in(shard)).await?,
            None => self.redis.query(&scan).await?,
        };
        let ids: Vec<OrderId> = found
            .iter()
            .filter_map(|key| key.rsplit_once(':'))
            .filter_map(|(_, id)| OrderId::try_parse(id).ok())
            .collect();
        let mut repaired = Repaired::default();
        for chunk in ids.chunks(500) {
            self.repair_batch(chunk, &mut repaired).await?;
        }
        let next = match (next.as_str(), shard) {
            ("0", None) => None,
            (next, None) => Some(format!("all:{next}")),
            ("0", Some(at)) => (at + 1 < keys::SHARDS).then(|| format!("{}:0", at + 1)),
            (next, Some(at)) => Some(format!("{at}:{next}")),
        };
        if next.is_none() {
            // The pass went through every order that was stored when it began: each is filed
            // (orders stored since were filed by their create).
            let mut indexed = redis::cmd("SET");
            indexed.arg(STATE_INDEXED).arg(1);
            self.redis.write::<(), _>(&indexed).await?;
        }
        Ok((repaired, next))
    }

    async fn purge_expired(&self, n: usize) -> Result<usize, StoreError> {
        // The order hashes and idempotency keys expire by themselves; what is left is their
        // user index entries. Shard by shard from where the last pass left off, until `n`.
        let n = n.max(1);
        let first = self.purge_from.fetch_add(1, Ordering::Relaxed);
        let mut done = 0;
        for step in 0..usize::from(keys::SHARDS) {
            let shard = u16::try_from((first + step) % usize::from(keys::SHARDS)).unwrap_or(0);
            done += self.purge_shard(shard, n - done).await?;
            if done >= n {
                break;
            }
        }
        Ok(done)
    }

    async fn disown(&self, node: &str, id: OrderId) -> Result<bool, StoreError> {
        let mut disown = self.scripts.disown.key(order_key(id));
        disown
            .key(owned_key(shard_of(id), node))
            .arg(node)
            .arg(id.to_string());
        let removed: i64 = self.redis.write(&disown).await?;
        Ok(removed == 1)
    }

    async fn set_aside(&self, aside: &SetAside) -> Result<(), StoreError> {
        let shard = shard_of(aside.order_id);
        let entry = serde_json::to_string(aside).map_err(corrupt)?;
        let mut set_aside = self.scripts.set_aside.key(owned_key(shard, &aside.node));
        set_aside
            .key(aside_key(shard))
            .arg(aside.order_id.to_string())
            .arg(entry);
        self.redis.write::<(), _>(&set_aside).await
    }

    async fn take_back(&self, id: OrderId, to: &str) -> Result<TakenBack, StoreError> {
        let shard = shard_of(id);
        let mut take_back = self.scripts.take_back.key(aside_key(shard));
        take_back
            .key(order_key(id))
            .key(owned_key(shard, to))
            .arg(id.to_string())
            .arg(to);
        let answer: String = self.redis.write(&take_back).await?;
        match answer.as_str() {
            "taken" => Ok(TakenBack::Taken),
            "dropped" => Ok(TakenBack::Dropped),
            "not_aside" => Ok(TakenBack::NotAside),
            other => Err(StoreError::Corrupt(format!(
                "the take-back script answered {other:?}"
            ))),
        }
    }

    async fn set_aside_page(&self, at: &str, n: usize) -> Result<AsidePage, StoreError> {
        // The cursor is `{shard}:{HSCAN cursor of that shard's aside index}`; a page ends after
        // the HSCAN call that brought it to `n` entries (one call brings up to about 500).
        let (mut shard, mut cursor) = match at {
            "" => (0, 0),
            at => at
                .split_once(':')
                .and_then(|(shard, cursor)| Some((shard.parse().ok()?, cursor.parse().ok()?)))
                .ok_or_else(|| StoreError::Corrupt(format!("not a set-aside cursor: {at:?}")))?,
        };
        let mut found = Vec::new();
        while shard < keys::SHARDS {
            cursor = self.set_aside_scan(shard, cursor, &mut found).await?;
            if cursor == 0 {
                shard += 1;
            }
            if found.len() >= n.max(1) && shard < keys::SHARDS {
                return Ok((found, Some(format!("{shard}:{cursor}"))));
            }
        }
        Ok((found, None))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // A write, not a PING: a Redis that answers but refuses writes (MISCONF after a failed
        // save, OOM at maxmemory, READONLY on a replica) cannot keep orders either; nor can one
        // whose replicas do not acknowledge writes when `database.min_replicas` asks them to.
        // On a Redis Cluster, one per shard, so every primary is written.
        self.fit()?;
        let probe = |shard: u16| async move {
            let mut probe = redis::cmd("SET");
            probe.arg(probe_key(shard)).arg(1).arg("PX").arg(60_000);
            self.redis.write::<(), _>(&probe).await
        };
        if !self.redis.is_cluster() {
            return probe(0).await;
        }
        self.each_shard(probe).await.map(drop)
    }
}

/// A key of `shard`, to route a keyless command (`SCAN`) to the primary that serves it.
fn order_key_in(shard: u16) -> String {
    keys::order_pattern(Some(shard))
}

#[cfg(test)]
mod tests {
    use super::{all_codes, commit_outcome, decode, listing_codes, owner_after_reassign};
    use crate::order::{Order, OrderId, RollbackState, Step};
    use crate::store::doc::encode;
    use crate::store::{ListQuery, StoreError};

    #[test]
    fn a_filtered_listing_reads_the_state_indexes_its_orders_can_be_in() {
        let codes = |current_step, rollback_state| {
            listing_codes(&ListQuery {
                current_step,
                rollback_state,
                ..ListQuery::default()
            })
        };
        assert_eq!(codes(None, None), None);
        assert_eq!(
            codes(Some(Step::Processing), None),
            Some(vec!["running", "Processing"])
        );
        assert_eq!(codes(Some(Step::Completed), None), Some(vec!["Completed"]));
        assert_eq!(
            codes(Some(Step::Failed), None),
            Some(vec!["Failed", "rollback-complete", "rollback-incomplete"])
        );
        for step in [None, Some(Step::Failed)] {
            assert_eq!(
                codes(step, Some(RollbackState::Incomplete)),
                Some(vec!["rollback-incomplete"])
            );
        }
        let mut every: Vec<&str> = all_codes().collect();
        every.sort_unstable();
        every.dedup();
        assert_eq!(every.len(), Step::ALL.len() + 3);
        for code in [
            "running",
            "Scheduling",
            "Post-Processing",
            "rollback-complete",
        ] {
            assert!(every.contains(&code), "{code} missing");
        }
    }

    #[test]
    fn commit_answers_map_to_outcomes() {
        assert!(commit_outcome("ok").is_ok());
        assert!(matches!(
            commit_outcome("not_owner"),
            Err(StoreError::NotOwner)
        ));
        assert!(matches!(
            commit_outcome("cancel"),
            Err(StoreError::CancelRequested)
        ));
        assert!(matches!(
            commit_outcome("missing"),
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            commit_outcome("what"),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn a_reassigned_order_belongs_to_whom_the_script_says() {
        assert_eq!(owner_after_reassign("moved", "b").as_deref(), Some("b"));
        assert_eq!(owner_after_reassign("mine", "b").as_deref(), Some("b"));
        assert_eq!(owner_after_reassign("finished", "b"), None);
        assert_eq!(owner_after_reassign("missing", "b"), None);
        assert_eq!(owner_after_reassign("c", "b").as_deref(), Some("c"));
    }

    #[test]
    fn the_hash_fields_override_the_copies_in_the_doc() {
        let order = Order::new(
            OrderId::new_v4(),
            "alice".into(),
            serde_json::json!({}),
            "node-a".into(),
            chrono::Utc::now(),
        );
        let doc = serde_json::to_vec(&order).unwrap();
        let field = |text: &str| Some(text.as_bytes().to_vec());
        let read = decode(vec![
            Some(doc.clone()),
            field("node-b"),
            field("7"),
            field("1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (read.owner.as_str(), read.epoch, read.cancel_requested),
            ("node-b", 7, true)
        );
        let plain = decode(vec![Some(doc.clone()), None, None, None])
            .unwrap()
            .unwrap();
        assert_eq!(plain, order);
        let compressed = encode(&order, true).unwrap();
        assert_ne!(compressed, doc);
        let unpacked = decode(vec![Some(compressed), None, None, None]);
        assert_eq!(unpacked.unwrap().unwrap(), order);
        assert!(decode(vec![None, None, None, None]).unwrap().is_none());
        assert!(matches!(
            decode(vec![field("{")]),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            decode(vec![Some(doc.clone()), None, field("x")]),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            decode(vec![Some(doc), Some(vec![0xff])]),
            Err(StoreError::Corrupt(_))
        ));
    }
}
