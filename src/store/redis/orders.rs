//! [`RedisStore`]: the [`OrderStore`] on Redis. Every change to an order is one Lua script (see
//! `scripts`) that writes its index entries in the same atomic step.

use super::conn::{Connections, Scripted};
use super::keys::{
    idem_key, order_key, owned_key, user_key, ASIDE, FINISHED, ORDER_PATTERN, ORDER_PREFIX,
    OWNED_PREFIX, PARKED, PROBE, USER_PREFIX,
};
use super::scripts::Scripts;
use crate::order::{Order, OrderId, Phase};
use crate::store::{
    cancel_outcome, decode_cursor, encode_cursor, is_parked, retry_rollback_outcome, CancelOutcome,
    Created, ListQuery, OrderStore, OwnedPage, Page, Reopen, RepairPage, Repaired,
    RetryRollbackOutcome, SetAside, StoreError, DEFAULT_RETENTION, IDEMPOTENCY_TTL,
};
use async_trait::async_trait;
use deadpool_redis::redis::{self, Value};
use std::sync::Arc;
use std::time::Duration;

/// How often a retry of a parked rollback re-reads an order that changed under it.
const REOPEN_TRIES: usize = 5;

/// The hash fields an order is read from, in the order [`decode`] takes them.
const READ_FIELDS: [&str; 4] = ["doc", "owner", "epoch", "cancel"];

/// The orders of a cluster, in its Redis.
pub struct RedisStore {
    redis: Arc<Connections>,
    scripts: Scripts,
    /// How long a finished order is kept, in ms (what the scripts' `PEXPIRE` takes).
    retention_ms: u64,
}

fn corrupt(error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(error.to_string())
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
/// retention pass needs to take its user index entry out once it expired.
fn finished_entry(order: &Order) -> String {
    format!("{} {} {}", order.order_id, micros_member(order), order.user)
}

/// An `HMGET` of the fields an order is read from.
fn read_order(pipeline: &mut redis::Pipeline, key: &str) {
    pipeline.cmd("HMGET").arg(key).arg(&READ_FIELDS[..]);
}

/// Builds an order from the hash fields `doc`, `owner`, `epoch`, `cancel`.
fn decode(fields: Vec<Option<String>>) -> Result<Option<Order>, StoreError> {
    let mut fields = fields.into_iter();
    let Some(Some(doc)) = fields.next() else {
        return Ok(None);
    };
    let mut order: Order = serde_json::from_str(&doc).map_err(corrupt)?;
    if let Some(Some(owner)) = fields.next() {
        order.owner = owner;
    }
    if let Some(Some(epoch)) = fields.next() {
        order.epoch = epoch
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("epoch `{epoch}`")))?;
    }
    if let Some(Some(cancel)) = fields.next() {
        order.cancel_requested |= cancel == "1";
    }
    Ok(Some(order))
}

/// The order in `fields`, or `None` when there is none or it cannot be read (logged: a listing
/// or a sweep goes on past one unreadable record).
fn decode_or_skip(fields: Vec<Option<String>>, key: &str) -> Option<Order> {
    decode(fields).unwrap_or_else(|error| {
        tracing::warn!(key = %key, error = %error, "skipping an unreadable order");
        None
    })
}

/// What the commit script's answer means.
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
        }
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

    /// Sends a pipeline of writes that holds calls of this store's scripts.
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

    /// Repairs the index entries of the orders at `keys`, counting them into `repaired`.
    async fn repair_batch(
        &self,
        keys: &[String],
        repaired: &mut Repaired,
    ) -> Result<(), StoreError> {
        let mut read = redis::pipe();
        for key in keys {
            read_order(&mut read, key);
        }
        let rows: Vec<Vec<Option<String>>> = self.redis.query(&read).await?;
        let mut write = redis::pipe();
        for (key, fields) in keys.iter().zip(rows) {
            let Some(order) = decode_or_skip(fields, key) else {
                continue;
            };
            if order.owes_work() && !repaired.owners.contains(&order.owner) {
                repaired.owners.insert(order.owner.clone());
            }
            let id = order.order_id.to_string();
            // Decided on the order as it is when the write runs, not as read above.
            write
                .invoke_script(
                    self.scripts
                        .repair_owned
                        .key(key)
                        .key(FINISHED)
                        .key(user_key(&order.user))
                        .key(PARKED)
                        .arg(OWNED_PREFIX)
                        .arg(&id)
                        .arg(self.retention_ms)
                        .arg(finished_entry(&order))
                        .arg(micros_member(&order))
                        .arg(flag(is_parked(&order))),
                )
                .ignore();
            repaired.orders += 1;
        }
        self.scripted::<()>(&write).await
    }

    /// A page of `user`'s orders, gathering into `gone` the index entries (order key, member)
    /// whose order retention deleted: they are skipped, and the page is filled past them.
    async fn list_page(
        &self,
        user: &str,
        query: &ListQuery,
        gone: &mut Vec<(String, String)>,
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
        loop {
            let mut range = redis::cmd("ZRANGE");
            range
                .arg(user_key(user))
                .arg(&upper)
                .arg("-")
                .arg("BYLEX")
                .arg("REV")
                .arg("LIMIT")
                .arg(0)
                .arg(batch);
            let members: Vec<String> = self.redis.query(&range).await?;
            if members.is_empty() {
                return Ok(page);
            }
            let mut read = redis::pipe();
            let keys: Vec<String> = members
                .iter()
                .map(|member| {
                    member
                        .split_once('-')
                        .and_then(|(_, id)| OrderId::try_parse(id).ok())
                        .map(|id| order_key(&id.to_string()))
                        .unwrap_or_default()
                })
                .collect();
            for key in &keys {
                read_order(&mut read, key);
            }
            let rows: Vec<Vec<Option<String>>> = self.redis.query(&read).await?;
            let exhausted = members.len() < batch;
            for ((member, key), fields) in members.iter().zip(keys).zip(rows) {
                upper = format!("({member}");
                if matches!(fields.first(), Some(None)) && !key.is_empty() {
                    gone.push((key, member.clone()));
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

    /// Takes out of `user`'s index the entries (order key, member) whose order is gone, each
    /// only if its order is still gone. Best effort: what fails stays for the retention pass.
    async fn prune_members(&self, user: &str, gone: &[(String, String)]) {
        let index = user_key(user);
        let mut prune = redis::pipe();
        for (key, member) in gone {
            prune
                .invoke_script(self.scripts.prune_member.key(key).key(&index).arg(member))
                .ignore();
        }
        if let Err(error) = self.scripted::<()>(&prune).await {
            tracing::debug!(user = %user, error = %error, "cannot prune index entries of deleted orders");
        }
    }

    /// Runs the create script for `order`: the order, its index entries and (with `idempotency`,
    /// the key and whether to take over a key that holds no order id) its idempotency key, in
    /// one atomic step. A lone script call, so a Redis that has forgotten the script loads it and
    /// runs the whole create again: nothing of it ran before.
    async fn write_new(
        &self,
        order: &Order,
        idempotency: Option<(&str, bool)>,
    ) -> Result<Written, StoreError> {
        let id = order.order_id.to_string();
        let doc = serde_json::to_string(order).map_err(corrupt)?;
        let mut create = self.scripts.create.key(order_key(&id));
        create
            .key(owned_key(&order.owner))
            .key(user_key(&order.user))
            .key(FINISHED);
        if let Some((key, _)) = idempotency {
            create.key(idem_key(&order.user, key));
        }
        create
            .arg(&doc)
            .arg(&order.owner)
            .arg(order.epoch)
            .arg(&order.user)
            .arg(state_name(order))
            .arg(order.current_step.as_str())
            .arg(micros_member(order))
            .arg(&id)
            .arg(IDEMPOTENCY_TTL.as_secs())
            .arg(if matches!(idempotency, Some((_, true))) {
                "1"
            } else {
                "0"
            })
            .arg(self.retention_ms)
            .arg(finished_entry(order));
        let answer: Vec<Option<String>> = self.redis.write(&create).await?;
        let mut answer = answer.into_iter();
        let outcome = answer.next().flatten().unwrap_or_default();
        let detail = answer.next().flatten();
        match (outcome.as_str(), detail) {
            ("ok", _) => Ok(Written::New),
            ("exists", _) => Ok(Written::Exists),
            ("key", Some(earlier)) => Ok(Written::KeyUsed(earlier)),
            (other, _) => Err(StoreError::Corrupt(format!("create answered `{other}`"))),
        }
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

/// What the create script did.
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
    async fn create(&self, order: &Order, key: Option<&str>) -> Result<Created, StoreError> {
        let mut order = order.clone();
        let mut adopted = false;
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
                    return match self.get(order.order_id).await? {
                        Some(first) => Ok(Created::Existing(Box::new(first))),
                        None => Err(StoreError::Unavailable(
                            "order of this idempotency key is being written, try again".into(),
                        )),
                    };
                }
                Written::KeyUsed(earlier) => earlier,
            };
            match OrderId::try_parse(&earlier) {
                Ok(earlier) => {
                    if let Some(first) = self.get(earlier).await? {
                        return Ok(Created::Existing(Box::new(first)));
                    }
                    // The key names an id with no order (reserved by a request that failed or
                    // stalls before storing it): this one is stored under that id, so whichever
                    // writes first wins and there is never a second order.
                    order.order_id = earlier;
                    adopted = true;
                }
                // Not an order id (written by something else): this request takes the key.
                Err(_) => take_key = true,
            }
        }
        Err(StoreError::Unavailable(
            "idempotency key kept changing while the order was created, try again".into(),
        ))
    }

    async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        let mut command = redis::cmd("HMGET");
        command
            .arg(order_key(&id.to_string()))
            .arg(&READ_FIELDS[..]);
        decode(self.redis.query(&command).await?)
    }

    async fn confirm(&self, order: &Order) -> Result<bool, StoreError> {
        if !self.redis.waits_for_replicas() {
            return Ok(true);
        }
        let mut confirm = self
            .scripts
            .confirm
            .key(order_key(&order.order_id.to_string()));
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
        let id = order.order_id.to_string();
        let doc = serde_json::to_string(order).map_err(corrupt)?;
        let aware = if order.cancel_requested || order.failure.is_some() {
            "1"
        } else {
            "0"
        };
        let mut commit = self.scripts.commit.key(order_key(&id));
        commit
            .key(owned_key(&order.owner))
            .key(FINISHED)
            .key(PARKED)
            .arg(&order.owner)
            .arg(order.epoch)
            .arg(&doc)
            .arg(aware)
            .arg(state_name(order))
            .arg(order.current_step.as_str())
            .arg(&id)
            .arg(order.revision)
            .arg(self.retention_ms)
            .arg(finished_entry(order))
            .arg(flag(is_parked(order)));
        let outcome: String = self.redis.write(&commit).await?;
        commit_outcome(&outcome)
    }

    async fn request_cancel(&self, id: OrderId, user: &str) -> Result<CancelOutcome, StoreError> {
        let key = order_key(&id.to_string());
        let reply: Value = self
            .redis
            .write(self.scripts.cancel.key(&key).arg(user))
            .await?;
        let fields: Option<Vec<Option<String>>> =
            redis::FromRedisValue::from_redis_value(reply).map_err(corrupt)?;
        let fields = fields
            .filter(|fields| !fields.is_empty())
            .ok_or(StoreError::NotFound)?;
        let stored = decode(fields)?.ok_or(StoreError::NotFound)?;
        let (outcome, _) = cancel_outcome(stored);
        Ok(outcome)
    }

    async fn retry_rollback(&self, reopen: Reopen<'_>) -> Result<RetryRollbackOutcome, StoreError> {
        let (id, user, node, now) = (reopen.id, reopen.user, reopen.node, reopen.now);
        for _ in 0..REOPEN_TRIES {
            let stored = self
                .get(id)
                .await?
                .filter(|order| order.user == user)
                .ok_or(StoreError::NotFound)?;
            let (read_owner, read_epoch) = (stored.owner.clone(), stored.epoch);
            let next = match retry_rollback_outcome(stored, node, now) {
                Ok(next) => next,
                Err(stored) => return Ok(RetryRollbackOutcome::NotParked(*stored)),
            };
            let doc = serde_json::to_string(&next).map_err(corrupt)?;
            let mut reopen = self.scripts.reopen.key(order_key(&id.to_string()));
            reopen
                .key(owned_key(&next.owner))
                .key(PARKED)
                .arg(&read_owner)
                .arg(read_epoch)
                .arg(&doc)
                .arg(&next.owner)
                .arg(next.epoch)
                .arg(state_name(&next))
                .arg(next.current_step.as_str())
                .arg(id.to_string());
            let outcome: String = self.redis.write(&reopen).await?;
            match outcome.as_str() {
                "ok" => return Ok(RetryRollbackOutcome::Accepted(next)),
                "missing" => return Err(StoreError::NotFound),
                // Changed since read: read again and decide on the new state.
                _ => continue,
            }
        }
        Err(StoreError::Unavailable(
            "order kept changing while its rollback was being retried".into(),
        ))
    }

    async fn owned_unfinished(&self, node: &str) -> Result<Vec<OrderId>, StoreError> {
        let mut members = redis::cmd("SMEMBERS");
        members.arg(owned_key(node));
        let ids: Vec<String> = self.redis.query(&members).await?;
        Ok(ids
            .iter()
            .filter_map(|id| OrderId::try_parse(id).ok())
            .collect())
    }

    async fn owned_page(&self, node: &str, at: &str, n: usize) -> Result<OwnedPage, StoreError> {
        let mut scan = redis::cmd("SSCAN");
        scan.arg(owned_key(node))
            .arg(if at.is_empty() { "0" } else { at })
            .arg("COUNT")
            .arg(n.max(1));
        let (next, ids): (String, Vec<String>) = self.redis.query(&scan).await?;
        let ids = ids
            .iter()
            .filter_map(|id| OrderId::try_parse(id).ok())
            .collect();
        Ok((ids, (next != "0").then_some(next)))
    }

    async fn parked_page(&self, at: &str, n: usize) -> Result<OwnedPage, StoreError> {
        let n = n.max(1);
        let mut range = redis::cmd("ZRANGE");
        range
            .arg(PARKED)
            .arg(if at.is_empty() {
                "-".to_string()
            } else {
                format!("({at}")
            })
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(n);
        let members: Vec<String> = self.redis.query(&range).await?;
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
        let ids = self.owned_unfinished(from).await?;
        let mut owned = Vec::new();
        for chunk in ids.chunks(256) {
            let mut pipeline = redis::pipe();
            for id in chunk {
                let id = id.to_string();
                pipeline.invoke_script(
                    self.scripts
                        .reassign
                        .key(order_key(&id))
                        .key(owned_key(from))
                        .key(owned_key(to))
                        .arg(from)
                        .arg(to)
                        .arg(&id)
                        .arg(OWNED_PREFIX),
                );
            }
            // A chunk that fails leaves the orders it moved in `to`'s owned set: the caller
            // finds them there.
            let outcomes: Vec<String> = self.scripted(&pipeline).await?;
            for (id, outcome) in chunk.iter().zip(outcomes) {
                if owner_after_reassign(&outcome, to).as_deref() == Some(to) {
                    owned.push(*id);
                }
            }
        }
        Ok(owned)
    }

    async fn repair_indexes(&self, at: &str, n: usize) -> Result<RepairPage, StoreError> {
        let mut scan = redis::cmd("SCAN");
        scan.arg(if at.is_empty() { "0" } else { at })
            .arg("MATCH")
            .arg(ORDER_PATTERN)
            .arg("COUNT")
            .arg(n.max(1));
        let (next, keys): (String, Vec<String>) = self.redis.query(&scan).await?;
        let mut repaired = Repaired::default();
        for chunk in keys.chunks(500) {
            self.repair_batch(chunk, &mut repaired).await?;
        }
        Ok((repaired, (next != "0").then_some(next)))
    }

    async fn purge_expired(&self, n: usize) -> Result<usize, StoreError> {
        // The order hashes and idempotency keys expire by themselves; what is left is their
        // user index entries.
        let mut prune = self.scripts.prune_finished.key(FINISHED);
        prune
            .key(PARKED)
            .arg(n.max(1))
            .arg(ORDER_PREFIX)
            .arg(USER_PREFIX);
        self.redis.write(&prune).await
    }

    async fn disown(&self, node: &str, id: OrderId) -> Result<bool, StoreError> {
        let id = id.to_string();
        let mut disown = self.scripts.disown.key(order_key(&id));
        disown.key(owned_key(node)).arg(node).arg(&id);
        let removed: i64 = self.redis.write(&disown).await?;
        Ok(removed == 1)
    }

    async fn set_aside(&self, aside: &SetAside) -> Result<(), StoreError> {
        let id = aside.order_id.to_string();
        let entry = serde_json::to_string(aside).map_err(corrupt)?;
        let mut both = redis::pipe();
        both.atomic()
            .cmd("SREM")
            .arg(owned_key(&aside.node))
            .arg(&id)
            .ignore()
            .cmd("HSET")
            .arg(ASIDE)
            .arg(&id)
            .arg(entry)
            .ignore();
        self.redis.write::<(), _>(&both).await
    }

    async fn set_aside_orders(&self, limit: usize) -> Result<Vec<SetAside>, StoreError> {
        let mut found = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("HSCAN");
            scan.arg(ASIDE)
                .arg(cursor)
                .arg("COUNT")
                .arg(limit.clamp(1, 500));
            let (next, pairs): (u64, Vec<(String, String)>) = self.redis.query(&scan).await?;
            for (id, entry) in pairs {
                match serde_json::from_str(&entry) {
                    Ok(entry) if found.len() < limit => found.push(entry),
                    Ok(_) => return Ok(found),
                    Err(error) => {
                        tracing::warn!(order_id = %id, error = %error, "skipping an unreadable set-aside entry");
                    }
                }
            }
            if next == 0 || found.len() >= limit {
                return Ok(found);
            }
            cursor = next;
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // A write, not a PING: a Redis that answers but refuses writes (MISCONF after a failed
        // save, OOM at maxmemory, READONLY on a replica) cannot keep orders either; nor can one
        // whose replicas do not acknowledge writes when `database.min_replicas` asks them to.
        let mut probe = redis::cmd("SET");
        probe.arg(PROBE).arg(1).arg("PX").arg(60_000);
        self.redis.write::<(), _>(&probe).await
    }
}

#[cfg(test)]
mod tests {
    use super::{commit_outcome, decode, owner_after_reassign};
    use crate::order::{Order, OrderId};
    use crate::store::StoreError;

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
        let doc = serde_json::to_string(&order).unwrap();
        let read = decode(vec![
            Some(doc.clone()),
            Some("node-b".into()),
            Some("7".into()),
            Some("1".into()),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (read.owner.as_str(), read.epoch, read.cancel_requested),
            ("node-b", 7, true)
        );
        let plain = decode(vec![Some(doc), None, None, None]).unwrap().unwrap();
        assert_eq!(plain, order);
        assert!(decode(vec![None, None, None, None]).unwrap().is_none());
        assert!(matches!(
            decode(vec![Some("{".into())]),
            Err(StoreError::Corrupt(_))
        ));
        let epoch = serde_json::to_string(&order).unwrap();
        assert!(matches!(
            decode(vec![Some(epoch), None, Some("x".into())]),
            Err(StoreError::Corrupt(_))
        ));
    }
}
