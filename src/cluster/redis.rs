//! [`RedisCoordinator`]: the [`Coordinator`] on the cluster's Redis, on the connections the
//! order store uses. Keys are in [`crate::store::redis::keys`].

use super::coordination::{Acquired, Coordinator, Leader, Liveness, NodeStatus, Renewal};
use crate::store::redis::keys::{
    alive_key, owned_key, shards, ALIVE_UNTIL, FORGOTTEN, LEADER, LEADER_FENCE, NODES,
};
use crate::store::redis::Connections;
use crate::store::StoreError;
use async_trait::async_trait;
use deadpool_redis::redis::{self, Script};
use futures_util::{StreamExt, TryStreamExt};
use std::sync::Arc;
use std::time::Duration;

/// Renew a lease held by ARGV[1] for ARGV[2] ms. Why a script: only the holder may extend it,
/// and the check and the extension must be one step (compare-and-set).
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

/// Take or renew a node's liveness lease for the process ARGV[1], for ARGV[2] ms, and register
/// the node (ARGV[3]) at its HTTP address (ARGV[4]), noting when the lease expires by Redis's
/// clock. KEYS: the lease, the node registry, the expiry times. Answers
/// nothing when this process held the lease and holds it now, 1 when it took a free lease, or
/// the holder that keeps it from doing so.
/// Why a script: a node id must name one process, so the lease is taken only when free or
/// already ours (set-if-absent, renew by compare-and-set), in one step.
const RENEW_ALIVE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return holder
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
local now = redis.call('TIME')
local expires = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[2])
redis.call('HSET', KEYS[3], ARGV[3], string.format('%d', expires))
if holder then return false end
return 1
";

/// Take node ARGV[1] out of the registry (KEYS[1]) and its lease's expiry time (KEYS[2]), and
/// note when in the forgotten nodes (KEYS[3]), from which those noted more than ARGV[2] ms ago
/// go. Why a script: the forgotten set must name every node the registry dropped, or an order
/// landing as one's own after it was forgotten could go unseen.
const FORGET: &str = r"
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[3], string.format('%d', now_ms), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', string.format('(%d', now_ms - tonumber(ARGV[2])))
return 0
";

/// The nodes of the forgotten set KEYS[1] noted within the last ARGV[1] ms. A script only to
/// read Redis's clock.
const FORGOTTEN_SINCE: &str = r"
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], string.format('%d', now_ms - tonumber(ARGV[1])), '+inf')
";

/// How long a forgotten node is looked at for orders that land as its own: longer than Linux
/// keeps retransmitting a write on a connection that gets no answer (`tcp_retries2`, about
/// 15 minutes).
const FORGOTTEN_KEPT: Duration = Duration::from_secs(3600);

/// Take the leader lease and a fencing token in one step. KEYS: lease, fence. ARGV: holder, ms.
/// Atomic so that every term gets a token greater than any earlier term's.
const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
local left = redis.call('PTTL', KEYS[1])
if left < 0 then
  left = 0
end
return -left
";

/// The leases and the node registry in the cluster's Redis.
pub struct RedisCoordinator {
    redis: Arc<Connections>,
    renew: Script,
    release: Script,
    acquire: Script,
    renew_alive: Script,
    forget: Script,
    forgotten_since: Script,
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// How many shards [`RedisCoordinator::owned_counts`] reads at once.
const FAN_OUT: usize = 8;

/// Reads the answers of `EXISTS alive` and `HGET until`, asked for each node in turn, then of
/// `TIME`: whether each node holds its lease and, when not, how long ago by Redis's clock it
/// expired (when Redis can tell).
fn leases(answers: &[redis::Value]) -> Result<Vec<(bool, Option<Duration>)>, StoreError> {
    let unexpected = |error: redis::ParsingError| StoreError::Corrupt(error.to_string());
    let (time, per_node) = answers
        .split_last()
        .ok_or_else(|| StoreError::Corrupt("no answer to TIME".into()))?;
    let (seconds, micros): (u64, u64) = redis::from_redis_value_ref(time).map_err(unexpected)?;
    let now_ms = seconds.saturating_mul(1000).saturating_add(micros / 1000);
    per_node
        .chunks(2)
        .map(|answers| {
            let [alive, until] = answers else {
                return Err(StoreError::Corrupt("a lease answer is short".into()));
            };
            let alive: usize = redis::from_redis_value_ref(alive).map_err(unexpected)?;
            let until: Option<u64> = redis::from_redis_value_ref(until).map_err(unexpected)?;
            let alive = alive == 1;
            let lapsed = until
                .filter(|_| !alive)
                .map(|until| Duration::from_millis(now_ms.saturating_sub(until)));
            Ok((alive, lapsed))
        })
        .collect()
}

impl RedisCoordinator {
    pub fn new(redis: Arc<Connections>) -> RedisCoordinator {
        RedisCoordinator {
            redis,
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            acquire: Script::new(ACQUIRE),
            renew_alive: Script::new(RENEW_ALIVE),
            forget: Script::new(FORGET),
            forgotten_since: Script::new(FORGOTTEN_SINCE),
        }
    }

    /// How many unfinished orders each of `nodes` owns, summed over the shards (one pipeline per
    /// shard, a few shards at a time).
    async fn owned_counts(&self, nodes: &[String]) -> Result<Vec<u64>, StoreError> {
        let per_shard: Vec<Vec<u64>> = futures_util::stream::iter(shards().map(|shard| {
            let mut pipeline = redis::pipe();
            for node in nodes {
                pipeline.cmd("SCARD").arg(owned_key(shard, node));
            }
            async move { self.redis.query::<Vec<u64>, _>(&pipeline).await }
        }))
        .buffer_unordered(FAN_OUT)
        .try_collect()
        .await?;
        let mut counts = vec![0; nodes.len()];
        for shard in per_shard {
            for (count, owned) in counts.iter_mut().zip(shard) {
                *count += owned;
            }
        }
        Ok(counts)
    }

    /// The liveness lease of each of `nodes`, read in one pipeline (see [`leases`]).
    async fn leases(&self, nodes: &[String]) -> Result<Vec<(bool, Option<Duration>)>, StoreError> {
        let mut pipeline = redis::pipe();
        for node in nodes {
            pipeline.cmd("EXISTS").arg(alive_key(node));
            pipeline.cmd("HGET").arg(ALIVE_UNTIL).arg(node);
        }
        pipeline.cmd("TIME");
        let answers: Vec<redis::Value> = self.redis.query(&pipeline).await?;
        leases(&answers)
    }

    /// Releases the lease at `key` if `holder` holds it.
    async fn release(&self, key: &str, holder: &str) -> Result<(), StoreError> {
        self.redis
            .write::<i64, _>(self.release.key(key).arg(holder))
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Coordinator for RedisCoordinator {
    async fn register_node(&self, node: &str, http_addr: &str) -> Result<(), StoreError> {
        let mut register = redis::cmd("HSET");
        register.arg(NODES).arg(node).arg(http_addr);
        self.redis.write::<i64, _>(&register).await?;
        Ok(())
    }

    async fn known_nodes(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.redis.query(redis::cmd("HGETALL").arg(NODES)).await
    }

    async fn forget_node(&self, node: &str) -> Result<(), StoreError> {
        let mut forget = self.forget.key(NODES);
        forget
            .key(ALIVE_UNTIL)
            .key(FORGOTTEN)
            .arg(node)
            .arg(millis(FORGOTTEN_KEPT));
        self.redis.write::<i64, _>(&forget).await?;
        Ok(())
    }

    async fn forgotten_nodes(&self) -> Result<Vec<String>, StoreError> {
        let mut forgotten = self.forgotten_since.key(FORGOTTEN);
        forgotten.arg(millis(FORGOTTEN_KEPT));
        self.redis.query(&forgotten).await
    }

    async fn remember_node(&self, node: &str) -> Result<bool, StoreError> {
        let mut remember = redis::cmd("HSETNX");
        remember.arg(NODES).arg(node).arg("");
        let added: i64 = self.redis.write(&remember).await?;
        Ok(added == 1)
    }

    async fn node_status(&self, nodes: &[String]) -> Result<Vec<NodeStatus>, StoreError> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let owned = self.owned_counts(nodes).await?;
        let leases = self.leases(nodes).await?;
        Ok(leases
            .into_iter()
            .zip(owned)
            .map(|((alive, lapsed), owned)| NodeStatus {
                alive,
                owned: usize::try_from(owned).unwrap_or(usize::MAX),
                lapsed,
            })
            .collect())
    }

    async fn lease_lapses(&self, nodes: &[String]) -> Result<Vec<Option<Duration>>, StoreError> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let leases = self.leases(nodes).await?;
        Ok(leases.into_iter().map(|(_, lapsed)| lapsed).collect())
    }

    async fn renew_alive(&self, lease: &Liveness, ttl: Duration) -> Result<Renewal, StoreError> {
        let mut renew = self.renew_alive.key(alive_key(&lease.node));
        renew
            .key(NODES)
            .key(ALIVE_UNTIL)
            .arg(&lease.holder)
            .arg(millis(ttl))
            .arg(&lease.node)
            .arg(&lease.http_addr);
        let answer: redis::Value = self.redis.write(&renew).await?;
        Ok(match answer {
            redis::Value::Nil => Renewal::Held,
            redis::Value::Int(1) => Renewal::Taken,
            holder => Renewal::HeldBy(redis::from_redis_value(holder).map_err(|error| {
                StoreError::Corrupt(format!("liveness renewal answered: {error}"))
            })?),
        })
    }

    async fn release_alive(&self, lease: &Liveness) -> Result<(), StoreError> {
        self.release(&alive_key(&lease.node), &lease.holder).await
    }

    async fn is_alive(&self, node: &str) -> Result<bool, StoreError> {
        self.redis
            .query(redis::cmd("EXISTS").arg(alive_key(node)))
            .await
    }

    async fn acquire_leader(&self, holder: &str, ttl: Duration) -> Result<Acquired, StoreError> {
        let mut acquire = self.acquire.key(LEADER);
        acquire.key(LEADER_FENCE).arg(holder).arg(millis(ttl));
        // The new fencing token (from 1 up), or minus the holder's time left in milliseconds.
        let answer: i64 = self.redis.write(&acquire).await?;
        Ok(match u64::try_from(answer) {
            Ok(token) if token > 0 => Acquired::Term(token),
            _ => Acquired::HeldFor(Duration::from_millis(answer.unsigned_abs())),
        })
    }

    async fn renew_leader(&self, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut renew = self.renew.key(LEADER);
        renew.arg(holder).arg(millis(ttl));
        let renewed: i64 = self.redis.write(&renew).await?;
        Ok(renewed == 1)
    }

    async fn release_leader(&self, holder: &str) -> Result<(), StoreError> {
        self.release(LEADER, holder).await
    }

    async fn leader(&self) -> Result<Leader, StoreError> {
        let mut pipeline = redis::pipe();
        pipeline.cmd("GET").arg(LEADER).cmd("GET").arg(LEADER_FENCE);
        let (holder, fence): (Option<String>, Option<u64>) = self.redis.query(&pipeline).await?;
        Ok(Leader {
            holder,
            fence: fence.unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::leases;
    use deadpool_redis::redis::Value;
    use std::time::Duration;

    fn int(value: i64) -> Value {
        Value::Int(value)
    }

    fn text(value: &str) -> Value {
        Value::BulkString(value.as_bytes().to_vec())
    }

    #[test]
    fn answers_make_one_lease_per_node_with_the_lapse_by_redis_clock() {
        let time = Value::Array(vec![text("1000"), text("500000")]);
        let answers = [
            int(1),
            text("999000"),
            int(0),
            Value::Nil,
            int(0),
            text("998000"),
            time,
        ];
        assert_eq!(
            leases(&answers).unwrap(),
            vec![
                (true, None),
                (false, None),
                (false, Some(Duration::from_millis(2500))),
            ]
        );
        let just_time = [Value::Array(vec![text("1"), text("0")])];
        assert!(leases(&just_time).unwrap().is_empty());
        assert!(leases(&[]).is_err());
        assert!(leases(&[int(0), Value::Array(vec![text("1"), text("0")])]).is_err());
    }
}
