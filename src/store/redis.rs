//! The Redis store, for clusters: every node reads and writes the same Redis.
//!
//! Layout (all keys under `op:`):
//! - `op:order:{id}`: hash with `doc` (the order JSON), `owner`, `epoch`, `user`, `cancel`,
//!   `state` (`forward`, `rolling_back`, `finished`) and `step`. `owner`, `epoch` and `cancel`
//!   in the hash are the truth; the copies inside `doc` are refreshed on read.
//! - `op:owned:{node}`: set of the node's unfinished orders.
//! - `op:user:{user}`: sorted set (all scores 0) of `{created µs, 20 digits}-{id}`, for listing.
//! - `op:idem:{user}:{key}`: the order an idempotency key created, expiring after 24 h.
//! - `op:nodes`: hash node id → HTTP address of every node that ever started.
//! - `op:alive:{node}`, `op:leader`, `op:leader:fence`: the liveness and leader leases.
//!
//! Every change to an order is one Lua script on its one key that writes only if the caller still
//! owns it (owner and epoch compare-and-set). The index sets are kept up to date in the same round
//! trip, idempotently, and [`RedisStore::repair_indexes`] rebuilds them from the order hashes.

use super::{
    cancel_outcome, decode_cursor, retry_rollback_outcome, CancelOutcome, Created, ListQuery,
    OrderStore, Page, RetryRollbackOutcome, StoreError, IDEMPOTENCY_TTL,
};
use crate::order::{Order, OrderId, Phase};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{self, Script, Value};
use deadpool_redis::{Config as PoolSettings, Pool, PoolConfig, Runtime, Timeouts};
use std::future::Future;
use std::time::Duration;

const NODES: &str = "op:nodes";
const LEADER: &str = "op:leader";
const LEADER_FENCE: &str = "op:leader:fence";

fn order_key(id: &str) -> String {
    format!("op:order:{id}")
}
fn owned_key(node: &str) -> String {
    format!("op:owned:{node}")
}
fn user_key(user: &str) -> String {
    format!("op:user:{user}")
}
fn idem_key(user: &str, key: &str) -> String {
    format!("op:idem:{user}:{key}")
}
fn alive_key(node: &str) -> String {
    format!("op:alive:{node}")
}

/// Commit a transition. KEYS[1] = order. ARGV: owner, epoch, doc, aware of cancellation (1/0),
/// state, step. Why a script: the owner/epoch check and the write must be one atomic step, or a
/// node that just lost the order could overwrite its new owner's progress.
const COMMIT: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'cancel')
if not cur[1] then return 'missing' end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 'not_owner' end
if cur[3] == '1' and ARGV[4] == '0' then return 'cancel' end
redis.call('HSET', KEYS[1], 'doc', ARGV[3], 'state', ARGV[5], 'step', ARGV[6])
return 'ok'
";

/// Create an order. KEYS[1] = order. ARGV: doc, owner, epoch, user, state, step. Returns {'ok'},
/// or {'exists', current owner} and writes nothing. Atomic so that two requests with the same
/// idempotency key (one stalled, one retried elsewhere) cannot both store the order.
const CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists', redis.call('HGET', KEYS[1], 'owner')}
end
redis.call('HSET', KEYS[1], 'doc', ARGV[1], 'owner', ARGV[2], 'epoch', ARGV[3], 'user', ARGV[4], 'state', ARGV[5], 'step', ARGV[6])
return {'ok'}
";

/// Record a cancellation. KEYS[1] = order. ARGV: user. Returns nil for another user's or an
/// unknown order, else {doc, owner, epoch, cancel before}. Atomic so a cancellation is recorded
/// only on an order still running forward.
const CANCEL: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'user', 'state', 'cancel', 'doc', 'owner', 'epoch')
if not cur[1] or cur[1] ~= ARGV[1] then return false end
if cur[2] == 'forward' and cur[3] ~= '1' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
end
return {cur[4], cur[5], cur[6], cur[3] or '0'}
";

/// Move one order. KEYS[1] = order. ARGV: from, to. Returns 'moved', 'mine' (already `to`'s),
/// 'finished', 'missing', or the current owner. Atomic: the owner check and the epoch bump
/// must not interleave with a commit by the old owner.
const REASSIGN: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'state')
if not cur[1] then return 'missing' end
if cur[2] == 'finished' then return 'finished' end
if cur[1] == ARGV[2] then return 'mine' end
if cur[1] ~= ARGV[1] then return cur[1] end
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[2])
return 'moved'
";

/// Re-open a parked order. KEYS[1] = order. ARGV: owner and epoch read, new doc, new owner, new
/// epoch, state, step. Writes only if the order is still finished and unchanged since it was
/// read (compare-and-set), so of two concurrent retries exactly one re-opens it.
const REOPEN: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'state')
if not cur[1] then return 'missing' end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] or cur[3] ~= 'finished' then return 'changed' end
redis.call('HSET', KEYS[1], 'doc', ARGV[3], 'owner', ARGV[4], 'epoch', ARGV[5], 'state', ARGV[6], 'step', ARGV[7])
return 'ok'
";

/// How often a retry of a parked rollback re-reads an order that changed under it.
const REOPEN_TRIES: usize = 5;

/// Renew a lease held by ARGV[1] for ARGV[2] ms. Compare-and-set: only the holder may extend.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Release a lease held by ARGV[1]; compare-and-delete so a lapsed holder cannot delete a
/// successor's lease.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Take the leader lease and a fencing token in one step. KEYS: lease, fence. ARGV: holder, ms.
const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
";

struct Scripts {
    create: Script,
    commit: Script,
    cancel: Script,
    reassign: Script,
    reopen: Script,
    renew: Script,
    release: Script,
    acquire: Script,
}

pub struct RedisStore {
    /// Opens connections; they are then kept and shared, not checked out per operation.
    pool: Pool,
    /// A few multiplexed connections, each shared by every task: redis-rs pipelines concurrent
    /// requests on one socket, so a handful is faster than a pool checkout (which costs a PING
    /// round trip) per operation. A slot is emptied when its connection fails and refilled on
    /// next use.
    slots: Vec<tokio::sync::Mutex<Option<MultiplexedConnection>>>,
    next_slot: std::sync::atomic::AtomicUsize,
    timeout: Duration,
    scripts: Scripts,
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

fn state_name(order: &Order) -> &'static str {
    match order.phase {
        Phase::Forward => "forward",
        Phase::RollingBack => "rolling_back",
        Phase::Finished => "finished",
    }
}

fn micros_member(order: &Order) -> String {
    super::encode_cursor(super::created_micros(order), order.order_id)
}

impl RedisStore {
    /// A store on `url`. Nothing is contacted yet; the first operation connects.
    pub fn connect(
        url: &str,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let mut settings = PoolSettings::from_url(url);
        settings.pool = Some(PoolConfig {
            max_size: pool_size,
            timeouts: Timeouts {
                wait: Some(timeout),
                create: Some(timeout),
                recycle: Some(timeout),
            },
            ..Default::default()
        });
        let pool = settings
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|error| StoreError::Unavailable(format!("bad redis url {url}: {error}")))?;
        Ok(RedisStore {
            pool,
            slots: (0..pool_size.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next_slot: std::sync::atomic::AtomicUsize::new(0),
            timeout,
            scripts: Scripts {
                create: Script::new(CREATE),
                commit: Script::new(COMMIT),
                cancel: Script::new(CANCEL),
                reassign: Script::new(REASSIGN),
                reopen: Script::new(REOPEN),
                renew: Script::new(RENEW),
                release: Script::new(RELEASE),
                acquire: Script::new(ACQUIRE),
            },
        })
    }

    /// Runs one operation with a connection from the pool, bounded by the store timeout.
    async fn with_conn<T, F, Fut>(&self, operation: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let index = self
            .next_slot
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % self.slots.len();
        let work = async {
            let connection = self.connection(index).await?;
            operation(connection).await
        };
        let outcome = tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "redis did not answer in time".into(),
                ))
            });
        if let Err(StoreError::Unavailable(_)) = &outcome {
            // The connection may be broken (Redis restarted) or stuck: the next use opens another.
            if let Some(slot) = self.slots.get(index) {
                *slot.lock().await = None;
            }
        }
        outcome
    }

    /// The shared connection of a slot, opened if the slot is empty.
    async fn connection(&self, index: usize) -> Result<MultiplexedConnection, StoreError> {
        let slot = self
            .slots
            .get(index)
            .ok_or_else(|| StoreError::Unavailable("no connection slot".into()))?;
        let mut slot = slot.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connection =
            deadpool_redis::Connection::take(self.pool.get().await.map_err(unavailable)?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Runs a pipeline that may hold script calls; loads the scripts and retries once when Redis
    /// has forgotten them (after a restart). The pipelines used here are idempotent.
    async fn run_pipeline<T: redis::FromRedisValue>(
        &self,
        connection: &mut MultiplexedConnection,
        pipeline: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        match pipeline.query_async::<T>(connection).await {
            Ok(value) => Ok(value),
            Err(error)
                if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                for script in [
                    &self.scripts.create,
                    &self.scripts.commit,
                    &self.scripts.reassign,
                ] {
                    script
                        .prepare_invoke()
                        .load_async(connection)
                        .await
                        .map_err(unavailable)?;
                }
                pipeline
                    .query_async::<T>(connection)
                    .await
                    .map_err(unavailable)
            }
            Err(error) => Err(unavailable(error)),
        }
    }

    /// Builds an order from the hash fields `doc`, `owner`, `epoch`, `cancel`.
    fn decode(fields: Vec<Option<String>>) -> Result<Option<Order>, StoreError> {
        let mut fields = fields.into_iter();
        let Some(Some(doc)) = fields.next() else {
            return Ok(None);
        };
        let mut order: Order =
            serde_json::from_str(&doc).map_err(|error| StoreError::Corrupt(error.to_string()))?;
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

    /// Registers a node and its HTTP address, so the leader can find its orders if it dies.
    pub async fn register_node(&self, node: &str, http_addr: &str) -> Result<(), StoreError> {
        self.with_conn(|mut connection| async move {
            redis::cmd("HSET")
                .arg(NODES)
                .arg(node)
                .arg(http_addr)
                .query_async::<i64>(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    /// Every node registered, with its HTTP address.
    pub async fn known_nodes(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.with_conn(|mut connection| async move {
            redis::cmd("HGETALL")
                .arg(NODES)
                .query_async::<Vec<(String, String)>>(&mut connection)
                .await
                .map_err(unavailable)
        })
        .await
    }

    pub async fn forget_node(&self, node: &str) -> Result<(), StoreError> {
        self.with_conn(|mut connection| async move {
            redis::cmd("HDEL")
                .arg(NODES)
                .arg(node)
                .query_async::<i64>(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    /// For each node: whether its liveness lease is held, and how many orders it owns.
    pub async fn node_status(&self, nodes: &[String]) -> Result<Vec<(bool, usize)>, StoreError> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        self.with_conn(|mut connection| async move {
            let mut pipeline = redis::pipe();
            for node in nodes {
                pipeline.cmd("EXISTS").arg(alive_key(node));
                pipeline.cmd("SCARD").arg(owned_key(node));
            }
            let values: Vec<usize> = pipeline
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(values
                .chunks(2)
                .map(|pair| (pair.first() == Some(&1), pair.get(1).copied().unwrap_or(0)))
                .collect())
        })
        .await
    }

    /// Sets (or renews) a node's liveness lease, and registers the node with its HTTP address in
    /// the same round trip: a node the leader forgot while it looked dead (paused, say) is known
    /// again from its next renewal on, so its orders are taken over if it dies later.
    pub async fn renew_alive(
        &self,
        node: &str,
        holder: &str,
        ttl: Duration,
        http_addr: &str,
    ) -> Result<(), StoreError> {
        let ttl_ms = ttl.as_millis() as u64;
        self.with_conn(|mut connection| async move {
            redis::pipe()
                .cmd("SET")
                .arg(alive_key(node))
                .arg(holder)
                .arg("PX")
                .arg(ttl_ms)
                .ignore()
                .cmd("HSET")
                .arg(NODES)
                .arg(node)
                .arg(http_addr)
                .ignore()
                .query_async::<()>(&mut connection)
                .await
                .map_err(unavailable)
        })
        .await
    }

    pub async fn release_alive(&self, node: &str, holder: &str) -> Result<(), StoreError> {
        self.with_conn(|mut connection| async move {
            self.scripts
                .release
                .key(alive_key(node))
                .arg(holder)
                .invoke_async::<i64>(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    pub async fn is_alive(&self, node: &str) -> Result<bool, StoreError> {
        self.with_conn(|mut connection| async move {
            redis::cmd("EXISTS")
                .arg(alive_key(node))
                .query_async::<bool>(&mut connection)
                .await
                .map_err(unavailable)
        })
        .await
    }

    /// Tries to take the leader lease; `Some(fencing token)` on success.
    pub async fn acquire_leader(
        &self,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let ttl_ms = ttl.as_millis() as u64;
        self.with_conn(|mut connection| async move {
            let token: u64 = self
                .scripts
                .acquire
                .key(LEADER)
                .key(LEADER_FENCE)
                .arg(holder)
                .arg(ttl_ms)
                .invoke_async(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok((token > 0).then_some(token))
        })
        .await
    }

    /// Extends the leader lease if `holder` still has it.
    pub async fn renew_leader(&self, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let ttl_ms = ttl.as_millis() as u64;
        self.with_conn(|mut connection| async move {
            let renewed: i64 = self
                .scripts
                .renew
                .key(LEADER)
                .arg(holder)
                .arg(ttl_ms)
                .invoke_async(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(renewed == 1)
        })
        .await
    }

    pub async fn release_leader(&self, holder: &str) -> Result<(), StoreError> {
        self.with_conn(|mut connection| async move {
            self.scripts
                .release
                .key(LEADER)
                .arg(holder)
                .invoke_async::<i64>(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    /// The current leader lease holder (`{node}:{term id}`) and the latest fencing token.
    pub async fn leader(&self) -> Result<(Option<String>, u64), StoreError> {
        self.with_conn(|mut connection| async move {
            let (holder, fence): (Option<String>, Option<u64>) = redis::pipe()
                .cmd("GET")
                .arg(LEADER)
                .cmd("GET")
                .arg(LEADER_FENCE)
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok((holder, fence.unwrap_or(0)))
        })
        .await
    }

    /// Rebuilds the owner and user indexes from the order hashes. Idempotent; safe while nodes
    /// run, since it only adds missing entries and removes finished or foreign ones.
    pub async fn repair_indexes(&self) -> Result<usize, StoreError> {
        let mut cursor: u64 = 0;
        let mut repaired = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = self
                .with_conn(|mut connection| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg("op:order:*")
                        .arg("COUNT")
                        .arg(500)
                        .query_async(&mut connection)
                        .await
                        .map_err(unavailable)
                })
                .await?;
            if !keys.is_empty() {
                repaired += self.repair_batch(&keys).await?;
            }
            if next == 0 {
                return Ok(repaired);
            }
            cursor = next;
        }
    }

    async fn repair_batch(&self, keys: &[String]) -> Result<usize, StoreError> {
        self.with_conn(|mut connection| async move {
            let mut read = redis::pipe();
            for key in keys {
                read.cmd("HMGET")
                    .arg(key)
                    .arg("doc")
                    .arg("owner")
                    .arg("epoch")
                    .arg("cancel");
            }
            let rows: Vec<Vec<Option<String>>> = read
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            let mut write = redis::pipe();
            let mut count = 0;
            for fields in rows {
                let Some(order) = Self::decode(fields)? else {
                    continue;
                };
                let id = order.order_id.to_string();
                if order.is_finished() {
                    write
                        .cmd("SREM")
                        .arg(owned_key(&order.owner))
                        .arg(&id)
                        .ignore();
                } else {
                    write
                        .cmd("SADD")
                        .arg(owned_key(&order.owner))
                        .arg(&id)
                        .ignore();
                }
                write
                    .cmd("ZADD")
                    .arg(user_key(&order.user))
                    .arg(0)
                    .arg(micros_member(&order))
                    .ignore();
                count += 1;
            }
            write
                .query_async::<()>(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(count)
        })
        .await
    }

    /// Removes ids from an owner set when the order there is someone else's or finished.
    /// Writes a new order unless its id exists already (false then). Its owner and user indexes
    /// are written in the same round trip, so an order is never stored without them; when the id
    /// turns out to exist, the entries this call added are taken back.
    async fn write_new(&self, order: &Order) -> Result<bool, StoreError> {
        let id = order.order_id.to_string();
        let doc =
            serde_json::to_string(order).map_err(|error| StoreError::Corrupt(error.to_string()))?;
        let member = micros_member(order);
        let added = member.as_str();
        let (created, existing_owner): (String, Option<String>) = self
            .with_conn(|mut connection| async move {
                let mut pipeline = redis::pipe();
                pipeline
                    .cmd("SADD")
                    .arg(owned_key(&order.owner))
                    .arg(&id)
                    .ignore()
                    .cmd("ZADD")
                    .arg(user_key(&order.user))
                    .arg(0)
                    .arg(added)
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
                let (outcome,): (Vec<Option<String>>,) =
                    self.run_pipeline(&mut connection, &pipeline).await?;
                let mut outcome = outcome.into_iter();
                Ok((
                    outcome.next().flatten().unwrap_or_default(),
                    outcome.next().flatten(),
                ))
            })
            .await?;
        if created == "ok" {
            return Ok(true);
        }
        let existing = self.get(order.order_id).await?;
        let id = order.order_id.to_string();
        self.with_conn(|mut connection| async move {
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
            pipeline
                .query_async::<()>(&mut connection)
                .await
                .map_err(unavailable)
        })
        .await?;
        Ok(false)
    }

    async fn fix_owned(
        &self,
        connection: &mut MultiplexedConnection,
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
        pipeline
            .query_async::<()>(connection)
            .await
            .map_err(unavailable)
    }
}

#[async_trait]
impl OrderStore for RedisStore {
    async fn create(
        &self,
        order: &Order,
        idempotency_key: Option<&str>,
    ) -> Result<Created, StoreError> {
        let mut adopted: Option<Order> = None;
        if let Some(given) = idempotency_key {
            let key = idem_key(&order.user, given);
            let id = order.order_id.to_string();
            let ttl = IDEMPOTENCY_TTL.as_secs();
            let earlier: Option<String> = self
                .with_conn(|mut connection| async move {
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(&id)
                        .arg("NX")
                        .arg("GET")
                        .arg("EX")
                        .arg(ttl)
                        .query_async(&mut connection)
                        .await
                        .map_err(unavailable)
                })
                .await?;
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
                    let key = idem_key(&order.user, given);
                    let id = order.order_id.to_string();
                    self.with_conn(|mut connection| async move {
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(&id)
                            .arg("EX")
                            .arg(ttl)
                            .query_async::<()>(&mut connection)
                            .await
                            .map_err(unavailable)
                    })
                    .await?;
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
        let key = order_key(&id.to_string());
        let fields: Vec<Option<String>> = self
            .with_conn(|mut connection| async move {
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg("doc")
                    .arg("owner")
                    .arg("epoch")
                    .arg("cancel")
                    .query_async(&mut connection)
                    .await
                    .map_err(unavailable)
            })
            .await?;
        Self::decode(fields)
    }

    async fn list_for_user(&self, user: &str, query: &ListQuery) -> Result<Page, StoreError> {
        let mut page = Page::default();
        let mut upper = match query.cursor.as_deref() {
            Some(cursor) => {
                let (micros, id) = decode_cursor(cursor).ok_or(StoreError::NotFound)?;
                format!("({}", super::encode_cursor(micros, id))
            }
            None => "+".to_string(),
        };
        let batch = query.limit.clamp(1, 500);
        loop {
            let key = user_key(user);
            let bound = upper.clone();
            let members: Vec<String> = self
                .with_conn(|mut connection| async move {
                    redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(&bound)
                        .arg("-")
                        .arg("BYLEX")
                        .arg("REV")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(batch)
                        .query_async(&mut connection)
                        .await
                        .map_err(unavailable)
                })
                .await?;
            if members.is_empty() {
                return Ok(page);
            }
            let ids: Vec<String> = members
                .iter()
                .filter_map(|member| member.split_once('-').map(|(_, id)| id.to_string()))
                .collect();
            let rows: Vec<Vec<Option<String>>> = self
                .with_conn(|mut connection| async move {
                    let mut pipeline = redis::pipe();
                    for id in &ids {
                        let key = OrderId::try_parse(id)
                            .map(|id| order_key(&id.to_string()))
                            .unwrap_or_default();
                        pipeline
                            .cmd("HMGET")
                            .arg(key)
                            .arg("doc")
                            .arg("owner")
                            .arg("epoch")
                            .arg("cancel");
                    }
                    pipeline
                        .query_async(&mut connection)
                        .await
                        .map_err(unavailable)
                })
                .await?;
            let exhausted = members.len() < batch;
            for (member, fields) in members.iter().zip(rows) {
                upper = format!("({member}");
                let Some(order) = Self::decode(fields)? else {
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
        let doc =
            serde_json::to_string(order).map_err(|error| StoreError::Corrupt(error.to_string()))?;
        let aware = if order.cancel_requested || order.failure.is_some() {
            "1"
        } else {
            "0"
        };
        let outcome: String = self
            .with_conn(|mut connection| async move {
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
                    // Idempotent, and right even if the commit was refused: a finished order (or
                    // one that is not ours) does not belong in our set.
                    pipeline
                        .cmd("SREM")
                        .arg(owned_key(&order.owner))
                        .arg(&id)
                        .ignore();
                }
                let (outcome,): (String,) = self.run_pipeline(&mut connection, &pipeline).await?;
                Ok(outcome)
            })
            .await?;
        match outcome.as_str() {
            "ok" => Ok(()),
            "not_owner" => Err(StoreError::NotOwner),
            "cancel" => Err(StoreError::CancelRequested),
            "missing" => Err(StoreError::NotFound),
            other => Err(StoreError::Corrupt(format!("commit answered `{other}`"))),
        }
    }

    async fn request_cancel(&self, id: OrderId, user: &str) -> Result<CancelOutcome, StoreError> {
        let key = order_key(&id.to_string());
        let reply: Value = self
            .with_conn(|mut connection| async move {
                self.scripts
                    .cancel
                    .key(&key)
                    .arg(user)
                    .invoke_async(&mut connection)
                    .await
                    .map_err(unavailable)
            })
            .await?;
        let fields: Option<Vec<Option<String>>> = redis::FromRedisValue::from_redis_value(reply)
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        let fields = fields
            .filter(|fields| !fields.is_empty())
            .ok_or(StoreError::NotFound)?;
        let stored = Self::decode(fields)?.ok_or(StoreError::NotFound)?;
        let (outcome, _) = cancel_outcome(stored);
        Ok(outcome)
    }

    async fn retry_rollback(
        &self,
        id: OrderId,
        user: &str,
        node: &str,
        now: DateTime<Utc>,
    ) -> Result<RetryRollbackOutcome, StoreError> {
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
            let doc = serde_json::to_string(&next)
                .map_err(|error| StoreError::Corrupt(error.to_string()))?;
            let key = order_key(&id.to_string());
            let (owner, epoch) = (next.owner.as_str(), next.epoch);
            let (state, step) = (state_name(&next), next.current_step.as_str());
            let outcome: String = self
                .with_conn(|mut connection| async move {
                    self.scripts
                        .reopen
                        .key(&key)
                        .arg(&read_owner)
                        .arg(read_epoch)
                        .arg(&doc)
                        .arg(owner)
                        .arg(epoch)
                        .arg(state)
                        .arg(step)
                        .invoke_async(&mut connection)
                        .await
                        .map_err(unavailable)
                })
                .await?;
            match outcome.as_str() {
                "ok" => {
                    // The owner index is idempotent; the repair sweep re-adds it if this is lost.
                    let owned = owned_key(node);
                    let member = id.to_string();
                    self.with_conn(|mut connection| async move {
                        redis::cmd("SADD")
                            .arg(&owned)
                            .arg(&member)
                            .query_async::<i64>(&mut connection)
                            .await
                            .map_err(unavailable)?;
                        Ok(())
                    })
                    .await?;
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
        let key = owned_key(node);
        let ids: Vec<String> = self
            .with_conn(|mut connection| async move {
                redis::cmd("SMEMBERS")
                    .arg(&key)
                    .query_async(&mut connection)
                    .await
                    .map_err(unavailable)
            })
            .await?;
        Ok(ids
            .iter()
            .filter_map(|id| OrderId::try_parse(id).ok())
            .collect())
    }

    async fn reassign(&self, from: &str, to: &str) -> Result<Vec<OrderId>, StoreError> {
        let ids = self.owned_unfinished(from).await?;
        let mut owned = Vec::new();
        for chunk in ids.chunks(256) {
            let moved = self
                .with_conn(|mut connection| async move {
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
                    let outcomes: Vec<String> =
                        self.run_pipeline(&mut connection, &pipeline).await?;
                    let mut ours = Vec::new();
                    let mut stale = Vec::new();
                    for (id, outcome) in chunk.iter().zip(outcomes) {
                        match outcome.as_str() {
                            "moved" | "mine" => {
                                ours.push(*id);
                                stale.push((id.to_string(), Some(to.to_string())));
                            }
                            "finished" | "missing" => stale.push((id.to_string(), None)),
                            other_owner => {
                                stale.push((id.to_string(), Some(other_owner.to_string())))
                            }
                        }
                    }
                    self.fix_owned(&mut connection, from, &stale).await?;
                    Ok(ours)
                })
                .await?;
            owned.extend(moved);
        }
        Ok(owned)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|mut connection| async move {
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }
}
