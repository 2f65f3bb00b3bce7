//! The connections to one Redis that the order store and the cluster coordinator share, and
//! [`Connections::query`], the one way to send them a request, bounded by the store timeout.

use crate::store::StoreError;
use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{
    self, AsyncConnectionConfig, FromRedisValue, RedisResult, Script, ScriptInvocation,
};
use deadpool_redis::{Manager, Pool, PoolConfig, Runtime, Timeouts};
use futures_util::future::BoxFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Mutex;

/// A node's connections to its Redis, shared by all that node's Redis users.
pub struct Connections {
    /// Opens connections; they are then kept and shared, not checked out per operation.
    pool: Pool,
    /// A few multiplexed connections, each shared by every task: redis-rs pipelines concurrent
    /// requests on one socket, so a handful is faster than a pool checkout (which costs a PING
    /// round trip) per operation. A slot is emptied when its connection fails and refilled on
    /// next use. Why a lock per slot: two tasks that find a slot empty must not both open a
    /// connection for it.
    slots: Vec<Mutex<Option<MultiplexedConnection>>>,
    next_slot: AtomicUsize,
    timeout: Duration,
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

impl Connections {
    /// Up to `pool_size` connections to `url`. Nothing is contacted yet; the first request
    /// connects.
    pub fn connect(
        url: &str,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<Connections, StoreError> {
        // The store timeout bounds connecting and every answer inside redis-rs too: left to its
        // defaults, redis-rs gives up on an answer after 0.5 s whatever the store timeout says.
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let bad_url = |error: &dyn std::fmt::Display| {
            StoreError::Unavailable(format!("bad redis url {url}: {error}"))
        };
        let manager =
            Manager::new_with_config(url, connection_config).map_err(|error| bad_url(&error))?;
        let pool = Pool::builder(manager)
            .config(PoolConfig {
                max_size: pool_size,
                timeouts: Timeouts {
                    wait: Some(timeout),
                    create: Some(timeout),
                    recycle: Some(timeout),
                },
                ..Default::default()
            })
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|error| bad_url(&error))?;
        Ok(Connections {
            pool,
            slots: (0..pool_size.max(1)).map(|_| Mutex::new(None)).collect(),
            next_slot: AtomicUsize::new(0),
            timeout,
        })
    }

    /// Sends one request on a shared connection and reads its answer, within the store timeout.
    pub(crate) async fn query<T, R>(&self, request: &R) -> Result<T, StoreError>
    where
        T: FromRedisValue + Send,
        R: Request + ?Sized,
    {
        let index = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let work = async {
            let mut connection = self.connection(index).await?;
            request.send(&mut connection).await.map_err(unavailable)
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
}

/// What [`Connections::query`] sends: a command, a pipeline, or a script call.
pub(crate) trait Request: Sync {
    fn send<'a, T: FromRedisValue + Send + 'a>(
        &'a self,
        connection: &'a mut MultiplexedConnection,
    ) -> BoxFuture<'a, RedisResult<T>>;
}

/// Commands, pipelines and lone script calls each have their own way to send themselves; a lone
/// script call loads its script itself when Redis has forgotten it.
macro_rules! request {
    ($type:ty, $send:ident) => {
        impl Request for $type {
            fn send<'a, T: FromRedisValue + Send + 'a>(
                &'a self,
                connection: &'a mut MultiplexedConnection,
            ) -> BoxFuture<'a, RedisResult<T>> {
                Box::pin(self.$send(connection))
            }
        }
    };
}

request!(redis::Cmd, query_async);
request!(redis::Pipeline, query_async);
request!(ScriptInvocation<'_>, invoke_async);

/// A pipeline that holds script calls. When Redis has forgotten the scripts (after a restart),
/// `scripts` are loaded and the pipeline is sent once more, so it must be idempotent.
pub(crate) struct Scripted<'a> {
    pub pipeline: &'a redis::Pipeline,
    pub scripts: &'a [&'a Script],
}

impl Request for Scripted<'_> {
    fn send<'a, T: FromRedisValue + Send + 'a>(
        &'a self,
        connection: &'a mut MultiplexedConnection,
    ) -> BoxFuture<'a, RedisResult<T>> {
        Box::pin(async move {
            match self.pipeline.query_async::<T>(connection).await {
                Err(error)
                    if error.kind()
                        == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    for script in self.scripts {
                        script.prepare_invoke().load_async(connection).await?;
                    }
                    self.pipeline.query_async::<T>(connection).await
                }
                other => other,
            }
        })
    }
}
