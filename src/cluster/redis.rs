//! [`RedisCoordinator`]: the [`Coordinator`] on the cluster's Redis, on the connections the
//! order store uses. Keys are in [`crate::store::redis::keys`].

use super::coordination::{Coordinator, Leader, Liveness, NodeStatus, Renewal};
use crate::store::redis::keys::{alive_key, owned_key, LEADER, LEADER_FENCE, NODES};
use crate::store::redis::Connections;
use crate::store::StoreError;
use async_trait::async_trait;
use deadpool_redis::redis::{self, Script};
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
/// the node (ARGV[3]) at its HTTP address (ARGV[4]). KEYS: the lease, the node registry. Answers
/// nothing when this process holds the lease now, or the holder that keeps it from doing so.
/// Why a script: a node id must name one process, so the lease is taken only when free or
/// already ours (set-if-absent, renew by compare-and-set), in one step.
const RENEW_ALIVE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return holder
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return false
";

/// Take the leader lease and a fencing token in one step. KEYS: lease, fence. ARGV: holder, ms.
/// Atomic so that every term gets a token greater than any earlier term's.
const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
";

/// The leases and the node registry in the cluster's Redis.
pub struct RedisCoordinator {
    redis: Arc<Connections>,
    renew: Script,
    release: Script,
    acquire: Script,
    renew_alive: Script,
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// Pairs the answers of `EXISTS alive`, `SCARD owned`, asked for each node in turn.
fn statuses(answers: &[usize]) -> Vec<NodeStatus> {
    answers
        .chunks(2)
        .map(|pair| NodeStatus {
            alive: pair.first() == Some(&1),
            owned: pair.get(1).copied().unwrap_or(0),
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
        }
    }

    /// Releases the lease at `key` if `holder` holds it.
    async fn release(&self, key: &str, holder: &str) -> Result<(), StoreError> {
        self.redis
            .query::<i64, _>(self.release.key(key).arg(holder))
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Coordinator for RedisCoordinator {
    async fn register_node(&self, node: &str, http_addr: &str) -> Result<(), StoreError> {
        let mut register = redis::cmd("HSET");
        register.arg(NODES).arg(node).arg(http_addr);
        self.redis.query::<i64, _>(&register).await?;
        Ok(())
    }

    async fn known_nodes(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.redis.query(redis::cmd("HGETALL").arg(NODES)).await
    }

    async fn forget_node(&self, node: &str) -> Result<(), StoreError> {
        self.redis
            .query::<i64, _>(redis::cmd("HDEL").arg(NODES).arg(node))
            .await?;
        Ok(())
    }

    async fn remember_node(&self, node: &str) -> Result<bool, StoreError> {
        let mut remember = redis::cmd("HSETNX");
        remember.arg(NODES).arg(node).arg("");
        let added: i64 = self.redis.query(&remember).await?;
        Ok(added == 1)
    }

    async fn node_status(&self, nodes: &[String]) -> Result<Vec<NodeStatus>, StoreError> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipeline = redis::pipe();
        for node in nodes {
            pipeline.cmd("EXISTS").arg(alive_key(node));
            pipeline.cmd("SCARD").arg(owned_key(node));
        }
        let answers: Vec<usize> = self.redis.query(&pipeline).await?;
        Ok(statuses(&answers))
    }

    async fn renew_alive(&self, lease: &Liveness, ttl: Duration) -> Result<Renewal, StoreError> {
        let mut renew = self.renew_alive.key(alive_key(&lease.node));
        renew
            .key(NODES)
            .arg(&lease.holder)
            .arg(millis(ttl))
            .arg(&lease.node)
            .arg(&lease.http_addr);
        let holder: Option<String> = self.redis.query(&renew).await?;
        Ok(match holder {
            None => Renewal::Held,
            Some(holder) => Renewal::HeldBy(holder),
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

    async fn acquire_leader(&self, holder: &str, ttl: Duration) -> Result<Option<u64>, StoreError> {
        let mut acquire = self.acquire.key(LEADER);
        acquire.key(LEADER_FENCE).arg(holder).arg(millis(ttl));
        let token: u64 = self.redis.query(&acquire).await?;
        Ok((token > 0).then_some(token))
    }

    async fn renew_leader(&self, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut renew = self.renew.key(LEADER);
        renew.arg(holder).arg(millis(ttl));
        let renewed: i64 = self.redis.query(&renew).await?;
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
    use super::{statuses, NodeStatus};

    #[test]
    fn answers_pair_up_per_node() {
        assert_eq!(
            statuses(&[1, 3, 0, 0, 0, 2]),
            vec![
                NodeStatus {
                    alive: true,
                    owned: 3
                },
                NodeStatus {
                    alive: false,
                    owned: 0
                },
                NodeStatus {
                    alive: false,
                    owned: 2
                },
            ]
        );
        assert!(statuses(&[]).is_empty());
    }
}
