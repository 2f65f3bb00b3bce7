//! [`RedisStore`]: the [`OrderStore`] on Redis. Every change to an order is one Lua script on its
//! key (see `scripts`); its owner and user indexes are written in the same round trip.

use super::conn::{Connections, Scripted};
use super::keys::{idem_key, order_key, owned_key, user_key, ORDER_PATTERN, PROBE};
use super::scripts::Scripts;
use crate::order::{Order, OrderId, Phase};
use crate::store::{
    cancel_outcome, decode_cursor, encode_cursor, retry_rollback_outcome, CancelOutcome, Created,
    ListQuery, OrderStore, Page, Reopen, RetryRollbackOutcome, StoreError, IDEMPOTENCY_TTL,
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
}

fn corrupt(error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(error.to_string())
}

fn state_name(order: &Order) -> &'static str {
    match order.phase {
        Phase::Forward => "forward",
        Phase::RollingBack => "rolling_back",
        Phase::Finished => "finished",
    }
}

fn micros_member(order: &Order) -> String {
    encode_cursor(crate::store::created_micros(order), order.order_id)
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

/// What the commit script's answer means.
fn commit_outcome(answer: &str) -> Result<(), StoreError> {
    match answer {
        "ok" => Ok(()),
        "not_owner" => Err(StoreError::NotOwner),
        "cancel" => Err(StoreError::CancelRequested),
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
        }
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

    /// Sends a pipeline that holds calls of this store's scripts.
    async fn scripted<T: redis::FromRedisValue + Send>(
        &self,
        pipeline: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let scripts = self.scripts.pipelined();
        self.redis
            .query(&Scripted {
                pipeline,
                scripts: &scripts,
            })
            .await
    }

    async fn repair_batch(&self, keys: &[String]) -> Result<usize, StoreError> {
        let mut read = redis::pipe();
        for key in keys {
            read_order(&mut read, key);
        }
        let rows: Vec<Vec<Option<String>>> = self.redis.query(&read).await?;
        let mut write = redis::pipe();
        let mut count = 0;
        for fields in rows {
            let Some(order) = decode(fields)? else {
                continue;
            };
            let id = order.order_id.to_string();
            let owned = if order.is_finished() { "SREM" } else { "SADD" };
            write
                .cmd(owned)
                .arg(owned_key(&order.owner))
                .arg(&id)
                .ignore();
            write
                .cmd("ZADD")
                .arg(user_key(&order.user))
                .arg(0)
                .arg(micros_member(&order))
                .ignore();
            count += 1;
        }
        self.redis.query::<(), _>(&write).await?;
        Ok(count)
    }

    /// Writes a new order unless its id exists already (false then). Its owner and user indexes
    /// are written in the same round trip, so an order is never stored without them; when the id
    /// turns out to exist, the entries this call added are taken back.
    async fn write_new(&self, order: &Order) -> Result<bool, StoreError> {
        let id = order.order_id.to_string();
        let doc = serde_json::to_string(order).map_err(corrupt)?;
        let member = micros_member(order);
        let mut pipeline = redis::pipe();
        pipeline
            .cmd("SADD")
            .arg(owned_key(&order.owner))
            .arg(&id)
            .ignore()
            .cmd("ZADD")
            .arg(user_key(&order.user))
            .arg(0)
            .arg(&member)
            .ignore();
        pipeline.invoke_script(
            self.scripts
                .create
                .key(order_key(&id))
                .arg(&doc)
                .arg(&order.owner)
                .arg(order.epoch)
                .arg(&order.user)
                .arg(state_name(order))
                .arg(order.current_step.as_str()),
        );
        let (outcome,): (Vec<Option<String>>,) = self.scripted(&pipeline).await?;
        let mut outcome = outcome.into_iter();
        let created = outcome.next().flatten().unwrap_or_default();
        let existing_owner = outcome.next().flatten();
        if created == "ok" {
            return Ok(true);
        }
        let existing = self.get(order.order_id).await?;
        let mut pipeline = redis::pipe();
        if existing_owner.as_deref() != Some(order.owner.as_str()) {
            pipeline
                .cmd("SREM")
                .arg(owned_key(&order.owner))
                .arg(&id)
                .ignore();
        }
        if existing.as_ref().map(micros_member).as_deref() != Some(member.as_str()) {
            pipeline
                .cmd("ZREM")
                .arg(user_key(&order.user))
                .arg(&member)
                .ignore();
        }
        self.redis.query::<(), _>(&pipeline).await?;
        Ok(false)
    }

    /// Removes ids from an owner set when the order there is someone else's or finished, and
    /// adds each to its actual owner's set.
    async fn fix_owned(
        &self,
        node: &str,
        stale: &[(String, Option<String>)],
    ) -> Result<(), StoreError> {
        if stale.is_empty() {
            return Ok(());
        }
        let mut pipeline = redis::pipe();
        for (id, actual_owner) in stale {
            pipeline.cmd("SREM").arg(owned_key(node)).arg(id).ignore();
            if let Some(owner) = actual_owner {
                pipeline.cmd("SADD").arg(owned_key(owner)).arg(id).ignore();
            }
        }
        self.redis.query(&pipeline).await
    }

    /// Points an idempotency key at `id` for [`IDEMPOTENCY_TTL`]: only if the key is free (`NX`)
    /// when `only_new`, answering what the key held before.
    async fn set_idempotency_key(
        &self,
        key: &str,
        id: &str,
        only_new: bool,
    ) -> Result<Option<String>, StoreError> {
        let mut command = redis::cmd("SET");
        command.arg(key).arg(id);
        if only_new {
            command.arg("NX").arg("GET");
        }
        command.arg("EX").arg(IDEMPOTENCY_TTL.as_secs());
        if only_new {
            self.redis.query(&command).await
        } else {
            self.redis.query::<(), _>(&command).await.map(|()| None)
        }
    }
}

#[async_trait]
impl OrderStore for RedisStore {
    async fn create(&self, order: &Order, key: Option<&str>) -> Result<Created, StoreError> {
        let mut adopted: Option<Order> = None;
        if let Some(given) = key {
            let key = idem_key(&order.user, given);
            let id = order.order_id.to_string();
            let earlier = self.set_idempotency_key(&key, &id, true).await?;
            match earlier.map(|earlier| OrderId::try_parse(&earlier)) {
                None => {}
                Some(Ok(earlier)) => {
                    if let Some(first) = self.get(earlier).await? {
                        return Ok(Created::Existing(Box::new(first)));
                    }
                    // The key's first request reserved this id and wrote no order: it failed, or
                    // it is stalled and may still write it. This one is stored under the same id,
                    // so whichever writes first wins and there is never a second order.
                    let mut same = order.clone();
                    same.order_id = earlier;
                    adopted = Some(same);
                }
                Some(Err(_)) => {
                    // Not an order id (written by something else): this request takes the key.
                    self.set_idempotency_key(&key, &id, false).await?;
                }
            }
        }
        let order = adopted.as_ref().unwrap_or(order);
        if self.write_new(order).await? {
            return Ok(match adopted {
                Some(adopted) => Created::Adopted(Box::new(adopted)),
                None => Created::New,
            });
        }
        // Another request with the same key stored this id first.
        match self.get(order.order_id).await? {
            Some(first) => Ok(Created::Existing(Box::new(first))),
            None => Err(StoreError::Unavailable(
                "order of this idempotency key is being written, try again".into(),
            )),
        }
    }

    async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        let mut command = redis::cmd("HMGET");
        command
            .arg(order_key(&id.to_string()))
            .arg(&READ_FIELDS[..]);
        decode(self.redis.query(&command).await?)
    }

    async fn list_for_user(&self, user: &str, query: &ListQuery) -> Result<Page, StoreError> {
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
            for member in &members {
                let key = member
                    .split_once('-')
                    .and_then(|(_, id)| OrderId::try_parse(id).ok())
                    .map(|id| order_key(&id.to_string()))
                    .unwrap_or_default();
                read_order(&mut read, &key);
            }
            let rows: Vec<Vec<Option<String>>> = self.redis.query(&read).await?;
            let exhausted = members.len() < batch;
            for (member, fields) in members.iter().zip(rows) {
                upper = format!("({member}");
                let Some(order) = decode(fields)? else {
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

    async fn commit(&self, order: &Order) -> Result<(), StoreError> {
        let id = order.order_id.to_string();
        let doc = serde_json::to_string(order).map_err(corrupt)?;
        let aware = if order.cancel_requested || order.failure.is_some() {
            "1"
        } else {
            "0"
        };
        let mut pipeline = redis::pipe();
        pipeline.invoke_script(
            self.scripts
                .commit
                .key(order_key(&id))
                .arg(&order.owner)
                .arg(order.epoch)
                .arg(&doc)
                .arg(aware)
                .arg(state_name(order))
                .arg(order.current_step.as_str()),
        );
        if order.is_finished() {
            // Idempotent, and right even if the commit was refused: a finished order (or one
            // that is not ours) does not belong in our set.
            pipeline
                .cmd("SREM")
                .arg(owned_key(&order.owner))
                .arg(&id)
                .ignore();
        }
        let (outcome,): (String,) = self.scripted(&pipeline).await?;
        commit_outcome(&outcome)
    }

    async fn request_cancel(&self, id: OrderId, user: &str) -> Result<CancelOutcome, StoreError> {
        let key = order_key(&id.to_string());
        let reply: Value = self
            .redis
            .query(self.scripts.cancel.key(&key).arg(user))
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
                .arg(&read_owner)
                .arg(read_epoch)
                .arg(&doc)
                .arg(&next.owner)
                .arg(next.epoch)
                .arg(state_name(&next))
                .arg(next.current_step.as_str());
            let outcome: String = self.redis.query(&reopen).await?;
            match outcome.as_str() {
                "ok" => {
                    // The owner index is idempotent; the repair sweep re-adds it if this is lost.
                    let mut index = redis::cmd("SADD");
                    index.arg(owned_key(node)).arg(id.to_string());
                    self.redis.query::<i64, _>(&index).await?;
                    return Ok(RetryRollbackOutcome::Accepted(next));
                }
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

    async fn reassign(&self, from: &str, to: &str) -> Result<Vec<OrderId>, StoreError> {
        let ids = self.owned_unfinished(from).await?;
        let mut owned = Vec::new();
        for chunk in ids.chunks(256) {
            let mut pipeline = redis::pipe();
            for id in chunk {
                pipeline.invoke_script(
                    self.scripts
                        .reassign
                        .key(order_key(&id.to_string()))
                        .arg(from)
                        .arg(to),
                );
            }
            let outcomes: Vec<String> = self.scripted(&pipeline).await?;
            let mut stale = Vec::new();
            for (id, outcome) in chunk.iter().zip(outcomes) {
                let owner = owner_after_reassign(&outcome, to);
                if owner.as_deref() == Some(to) {
                    owned.push(*id);
                }
                stale.push((id.to_string(), owner));
            }
            self.fix_owned(from, &stale).await?;
        }
        Ok(owned)
    }

    async fn repair_indexes(&self) -> Result<usize, StoreError> {
        let mut cursor: u64 = 0;
        let mut repaired = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(ORDER_PATTERN)
                .arg("COUNT")
                .arg(500);
            let (next, keys): (u64, Vec<String>) = self.redis.query(&scan).await?;
            if !keys.is_empty() {
                repaired += self.repair_batch(&keys).await?;
            }
            if next == 0 {
                return Ok(repaired);
            }
            cursor = next;
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // A write, not a PING: a Redis that answers but refuses writes (MISCONF after a failed
        // save, OOM at maxmemory, READONLY on a replica) cannot keep orders either.
        let mut probe = redis::cmd("SET");
        probe.arg(PROBE).arg(1).arg("PX").arg(60_000);
        self.redis.query::<(), _>(&probe).await
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
