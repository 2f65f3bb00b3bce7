//! [`Link`]: one connection to a single Redis (or the primary Sentinel names), or to a whole
//! Redis Cluster, which sends each request to the primary that serves its keys' slot and
//! follows slot moves (`MOVED`, `ASK`) and failovers by itself.

use deadpool_redis::redis::aio::{ConnectionLike, MultiplexedConnection};
use deadpool_redis::redis::cluster_async::ClusterConnection;
use deadpool_redis::redis::cluster_routing::{
    MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use deadpool_redis::redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Value};

/// A connection [`Connections`](super::Connections) shares between tasks (both kinds multiplex).
#[derive(Clone)]
pub(crate) enum Link {
    One(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Link {
    /// Sends `command`, which names no key (`SCAN`, `INFO`), to the primary that serves `key`'s
    /// slot; on a single Redis, just sends it.
    pub(crate) async fn query_at<T: FromRedisValue>(
        &mut self,
        command: &Cmd,
        key: &str,
    ) -> RedisResult<T> {
        match self {
            Link::One(connection) => command.query_async(connection).await,
            Link::Cluster(connection) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let answer = connection.route_command(command.clone(), routing).await?;
                Ok(T::from_redis_value(answer)?)
            }
        }
    }

    /// Sends `command`, which names no key (`INFO`), to every primary, and answers a map of each
    /// primary's address to its answer (an error answer among them); on a single Redis, one
    /// entry with an empty address.
    pub(crate) async fn query_primaries(&mut self, command: &Cmd) -> RedisResult<Value> {
        match self {
            Link::One(connection) => {
                let answer: Value = command.query_async(connection).await?;
                Ok(Value::Map(vec![(Value::BulkString(Vec::new()), answer)]))
            }
            Link::Cluster(connection) => {
                // No response policy: each primary's answer, under its address.
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                connection.route_command(command.clone(), routing).await
            }
        }
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::One(connection) => connection.req_packed_command(cmd),
            Link::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::One(connection) => connection.req_packed_commands(cmd, offset, count),
            Link::Cluster(connection) => connection.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::One(connection) => connection.get_db(),
            Link::Cluster(connection) => connection.get_db(),
        }
    }
}
