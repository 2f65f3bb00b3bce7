//! The connections to one Redis that the order store and the cluster coordinator share, and
//! [`Connections::query`], the one way to send them a request, bounded by the store timeout.
//! [`Connections::write`] sends a write the same way, and with `database.min_replicas` counts it
//! done only once that many replicas acknowledged it.
//!
//! The Redis is either at a fixed address or, with Sentinel, wherever the sentinels say the
//! primary is: they are asked each time a connection is opened, and a connection is dropped on
//! any failure, so the node follows a failover without a restart. Or it is a Redis Cluster: each
//! connection ([`Link`]) reaches all of it, and sends a request to the primary that serves its
//! keys' slot. TLS (to the sentinels too) and the ACL login come from [`access`](super::access).

use super::access::{self, ClusterAccess};
use super::link::Link;
use crate::config::DatabaseConfig;
use crate::store::StoreError;
use deadpool_redis::redis::cluster::ClusterClient;
use deadpool_redis::redis::sentinel::SentinelClient;
use deadpool_redis::redis::{
    self, AsyncConnectionConfig, ConnectionInfo, FromRedisValue, RedisResult, Script,
    ScriptInvocation, Value,
};
use deadpool_redis::{Manager, Pool, PoolConfig, Runtime, Timeouts};
use futures_util::future::BoxFuture;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, OwnedMutexGuard};

/// A node's connections to its Redis, shared by all that node's Redis users.
pub struct Connections {
    /// Where new connections come from; they are then kept and shared, not checked out per
    /// operation.
    source: Arc<Source>,
    /// A few multiplexed connections, each shared by every task: redis-rs pipelines concurrent
    /// requests on one socket, so a handful is faster than a pool checkout (which costs a PING
    /// round trip) per operation. A slot is emptied when its connection fails (see
    /// [`Connections::forget`]) and refilled on next use. Why a lock per slot: two tasks that
    /// find a slot empty must not both open a connection for it.
    slots: Vec<Slot>,
    next_slot: AtomicUsize,
    /// Numbers each connection opened, to tell it from the ones its slot holds later.
    opened: AtomicU64,
    timeout: Duration,
    /// Replicas that must acknowledge each [`Connections::write`]; 0 does not wait.
    min_replicas: usize,
    /// With `min_replicas`, the connections writes and their `WAIT` go on, each used by one
    /// write at a time: Redis holds a client for the whole of a `WAIT`, so a request pipelined
    /// behind it on a shared connection would wait for the replicas too.
    acked: Vec<Slot>,
    next_acked: AtomicUsize,
}

/// Where [`Connections`] keeps one connection, empty until it is opened.
type Slot = Arc<Mutex<Option<Opened>>>;

/// A connection as a slot keeps it.
struct Opened {
    link: Link,
    /// Which opening this is (see [`Connections::opened`]).
    id: u64,
}

/// How many store timeouts an open may take in all before it is given up on. The open goes on
/// after the request that asked for it gives up (see [`Connections::open_into`]); redis-rs
/// bounds each connect and answer in it by the store timeout, so this is only a backstop.
const OPEN_LIMIT: u32 = 5;

/// How many writes wait for their replicas at once, each on a connection of its own. With 16
/// the waits were the limit of a node on a durable primary and one replica (`scripts/bench
/// --only redis-replica`: about 1,060 orders/s); 64 gave about 1,540, and 128 no more.
const ACKED_CONNECTIONS: usize = 64;

/// Where connections are opened.
enum Source {
    /// One Redis at a fixed address.
    Direct(Pool),
    /// The primary the sentinels name at the time. Why a lock: a lookup needs the sentinel
    /// client mutably (it caches its connections to the sentinels).
    Sentinel(Box<(Mutex<Primary>, AsyncConnectionConfig)>),
    /// A Redis Cluster, reached through any of its nodes; each connection follows its slots.
    Cluster(Box<ClusterClient>),
}

/// The sentinels (with the name they know the primary by, and how to reach and log in to it),
/// and the primary they named last.
struct Primary {
    client: SentinelClient,
    master_name: String,
    /// `host:port` of the primary last connected to, to log a failover once.
    last: Option<String>,
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

/// The store timeout bounds connecting and every answer inside redis-rs too: left to its
/// defaults, redis-rs gives up on an answer after 0.5 s whatever the store timeout says.
fn connection_config(timeout: Duration) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
}

impl Connections {
    /// The connections `database` asks for: to `url`, or to the primary its `sentinels` name
    /// (both over TLS with `tls`), with its TLS files, ACL user and password, and
    /// `min_replicas`. The files are read now; one that cannot be is a
    /// [`ConfigError`](crate::config::ConfigError). Nothing is contacted yet; the first request
    /// connects.
    pub fn open(database: &DatabaseConfig) -> anyhow::Result<Connections> {
        let pool_size = database.pool_size.get();
        let connections = if !database.cluster_nodes.is_empty() {
            Connections::connect_cluster(
                &database.cluster_nodes,
                access::cluster(database)?,
                pool_size,
                database.timeout,
            )?
        } else if database.sentinels.is_empty() {
            Connections::direct(access::direct(database)?, pool_size, database.timeout)?
        } else {
            Connections::sentinel(
                access::sentinel(database)?,
                &database.master_name,
                pool_size,
                database.timeout,
            )
        };
        Ok(connections.with_min_replicas(database.min_replicas))
    }

    /// Up to `pool_size` connections to `url` (which may carry a user and password, and be
    /// `rediss://` with the platform's roots). Nothing is contacted yet; the first request
    /// connects.
    pub fn connect(
        url: &str,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<Connections, StoreError> {
        let info = access::parse_url("database.url", url).map_err(unavailable)?;
        Connections::direct(info, pool_size, timeout)
    }

    /// Up to `pool_size` connections to the Redis `info` describes. Nothing is contacted yet.
    fn direct(
        info: ConnectionInfo,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<Connections, StoreError> {
        let connection_config = connection_config(timeout);
        // Displayed, `info` would be the address; the URL it came from is not repeated here.
        let bad_url = |error: &dyn std::fmt::Display| {
            StoreError::Unavailable(format!("cannot set up redis connections: {error}"))
        };
        let manager =
            Manager::new_with_config(info, connection_config).map_err(|error| bad_url(&error))?;
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
        Ok(Connections::new(Source::Direct(pool), pool_size, timeout))
    }

    /// Up to `pool_size` connections to the primary that `client`'s sentinels name for
    /// `master_name`, asked again whenever a connection is opened. Nothing is contacted yet.
    fn sentinel(
        client: SentinelClient,
        master_name: &str,
        pool_size: usize,
        timeout: Duration,
    ) -> Connections {
        let primary = Primary {
            client,
            master_name: master_name.to_string(),
            last: None,
        };
        let source = Source::Sentinel(Box::new((Mutex::new(primary), connection_config(timeout))));
        Connections::new(source, pool_size, timeout)
    }

    /// Up to `pool_size` connections to the Redis Cluster that `nodes` (`host:port` each, any
    /// of its nodes) belong to, reaching every node as `access` says (user and password, TLS).
    /// Nothing is contacted yet.
    pub fn connect_cluster(
        nodes: &[String],
        access: ClusterAccess,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<Connections, StoreError> {
        let scheme = if access.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let urls: Vec<String> = nodes
            .iter()
            .map(|address| format!("{scheme}://{address}"))
            .collect();
        let mut builder = redis::cluster::ClusterClientBuilder::new(urls)
            .connection_timeout(timeout)
            .response_timeout(timeout);
        if let Some(username) = access.login.username() {
            builder = builder.username(username);
        }
        if let Some(password) = access.login.password() {
            builder = builder.password(password);
        }
        if let Some(certificates) = access.tls {
            builder = builder.certs(certificates);
        }
        let client = builder.build().map_err(|error| {
            StoreError::Unavailable(format!("bad redis cluster addresses {nodes:?}: {error}"))
        })?;
        Ok(Connections::new(
            Source::Cluster(Box::new(client)),
            pool_size,
            timeout,
        ))
    }

    fn new(source: Source, pool_size: usize, timeout: Duration) -> Connections {
        let pool_size = pool_size.max(1);
        Connections {
            source: Arc::new(source),
            slots: (0..pool_size).map(|_| Slot::default()).collect(),
            next_slot: AtomicUsize::new(0),
            opened: AtomicU64::new(0),
            timeout,
            min_replicas: 0,
            acked: Vec::new(),
            next_acked: AtomicUsize::new(0),
        }
    }

    /// Whether writes wait for replicas.
    pub fn waits_for_replicas(&self) -> bool {
        self.min_replicas > 0
    }

    /// How many group-commit calls may be on their way at once: one for each connection a
    /// write can go on (`database.pool_size`, or with `min_replicas` the connections kept for
    /// writes and their `WAIT`). Writes ready while all are on their way go together in the
    /// next call, so batches grow with the load and never wait at low load.
    pub(crate) fn write_calls(&self) -> usize {
        if self.min_replicas > 0 && !self.acked.is_empty() {
            self.acked.len()
        } else {
            self.slots.len()
        }
    }

    /// Makes every write wait for `replicas` replicas to acknowledge it (`WAIT`); fewer is
    /// [`StoreError::Unavailable`].
    pub fn with_min_replicas(mut self, replicas: usize) -> Connections {
        self.min_replicas = replicas;
        let connections = if replicas == 0 { 0 } else { ACKED_CONNECTIONS };
        self.acked = (0..connections).map(|_| Slot::default()).collect();
        self
    }

    /// How long a write waits for its replicas: a third of the store timeout, so that a short
    /// count comes back as an answer before the request itself times out (which would also throw
    /// the connection away), even when Redis had forgotten the write's script and the write and
    /// its `WAIT` go twice.
    fn replica_wait(&self) -> Duration {
        (self.timeout / 3).max(Duration::from_millis(1))
    }

    /// Sends a write like [`Connections::query`]; with `min_replicas`, it is followed on the
    /// same connection by `WAIT`, and counts as done only when that many replicas acknowledged
    /// it in time. Fewer is [`StoreError::Unavailable`]: the write is on the primary, but a
    /// failover could lose it.
    pub(crate) async fn write<T, R>(&self, request: &R) -> Result<T, StoreError>
    where
        T: FromRedisValue + Send,
        R: Request + ?Sized,
    {
        if self.min_replicas == 0 {
            return self.query(request).await;
        }
        let wait_ms = u64::try_from(self.replica_wait().as_millis()).unwrap_or(u64::MAX);
        let mut wait = redis::cmd("WAIT");
        wait.arg(self.min_replicas).arg(wait_ms);
        let (answer, acknowledged): (T, usize) = self.acked(&Acked { request, wait }).await?;
        if acknowledged < self.min_replicas {
            return Err(StoreError::Unavailable(format!(
                "only {acknowledged} of {} replicas acknowledged the write within {wait_ms} ms",
                self.min_replicas
            )));
        }
        Ok(answer)
    }

    /// Sends a write and its `WAIT` on a connection nothing else uses meanwhile (a free one if
    /// any, else the next in turn once it is free), within the store timeout.
    async fn acked<T, R>(&self, request: &R) -> Result<T, StoreError>
    where
        T: FromRedisValue + Send,
        R: Request + ?Sized,
    {
        let count = self.acked.len();
        if count == 0 {
            return self.query(request).await;
        }
        let first = self.next_acked.fetch_add(1, Ordering::Relaxed) % count;
        let late = || StoreError::Unavailable("redis did not answer in time".into());
        let deadline = tokio::time::Instant::now() + self.timeout;
        let free = (0..count).find_map(|step| {
            Arc::clone(&self.acked[(first + step) % count])
                .try_lock_owned()
                .ok()
        });
        let mut slot = match free {
            Some(slot) => slot,
            None => tokio::time::timeout_at(deadline, Arc::clone(&self.acked[first]).lock_owned())
                .await
                .map_err(|_| late())?,
        };
        if slot.is_none() {
            slot = tokio::time::timeout_at(deadline, self.open_into(slot))
                .await
                .map_err(|_| late())??;
        }
        let work = async {
            match slot.as_mut() {
                Some(opened) => request.send(&mut opened.link).await.map_err(unavailable),
                None => Err(StoreError::Unavailable("no connection".into())),
            }
        };
        let outcome = tokio::time::timeout_at(deadline, work)
            .await
            .unwrap_or_else(|_| Err(late()));
        if outcome.is_err() {
            // The connection may be broken, or still held by its WAIT: the next write opens
            // another.
            *slot = None;
        }
        outcome
    }

    /// How long a request may take before it is given up on (`database.timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether this is a Redis Cluster, whose keys are spread over several primaries.
    pub fn is_cluster(&self) -> bool {
        matches!(*self.source, Source::Cluster(_))
    }

    /// Sends `command`, which names no key (such as `SCAN` or `INFO`), to the primary that
    /// serves `key`, like [`Connections::query`]. One Redis holds every key.
    pub(crate) async fn query_at<T: FromRedisValue + Send>(
        &self,
        command: &redis::Cmd,
        key: &str,
    ) -> Result<T, StoreError> {
        self.query(&At { command, key }).await
    }

    /// Sends `command`, which names no key (`INFO`), to every primary, like
    /// [`Connections::query`]: each primary's address (empty on a single Redis, which is the
    /// one primary) with its answer, which may be an error answer.
    pub(crate) async fn query_primaries(
        &self,
        command: &redis::Cmd,
    ) -> Result<Vec<(String, Value)>, StoreError> {
        match self.query(&OnPrimaries { command }).await? {
            Value::Map(answers) => answers
                .into_iter()
                .map(|(address, answer)| {
                    let address =
                        String::from_redis_value(address).map_err(crate::store::corrupt)?;
                    Ok((address, answer))
                })
                .collect(),
            other => Err(StoreError::Corrupt(format!(
                "not an answer per primary: {other:?}"
            ))),
        }
    }

    /// Sends one request on a shared connection and reads its answer, within the store timeout.
    pub(crate) async fn query<T, R>(&self, request: &R) -> Result<T, StoreError>
    where
        T: FromRedisValue + Send,
        R: Request + ?Sized,
    {
        let index = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut used = None;
        let work = async {
            let (id, mut link) = self.connection(index).await?;
            used = Some(id);
            request.send(&mut link).await.map_err(unavailable)
        };
        let outcome = tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "redis did not answer in time".into(),
                ))
            });
        if let (Err(StoreError::Unavailable(_)), Some(id)) = (&outcome, used) {
            self.forget(index, id);
        }
        outcome
    }

    /// The shared connection of a slot and its id, opened if the slot is empty.
    async fn connection(&self, index: usize) -> Result<(u64, Link), StoreError> {
        let slot = self
            .slots
            .get(index)
            .ok_or_else(|| StoreError::Unavailable("no connection slot".into()))?;
        let mut slot = Arc::clone(slot).lock_owned().await;
        if slot.is_none() {
            slot = self.open_into(slot).await?;
        }
        match slot.as_ref() {
            Some(opened) => Ok((opened.id, opened.link.clone())),
            None => Err(StoreError::Unavailable("no connection".into())),
        }
    }

    /// Opens a connection into the empty `slot` and gives the slot back with it. The open runs
    /// as a task of its own: one that outlasts the request that asked for it still fills the
    /// slot for the next request. Abandoned at each request's timeout instead, a slow open (a
    /// TLS handshake with every node of a Redis Cluster, on a loaded host) started over again
    /// and again and never completed.
    async fn open_into(
        &self,
        mut slot: OwnedMutexGuard<Option<Opened>>,
    ) -> Result<OwnedMutexGuard<Option<Opened>>, StoreError> {
        let source = Arc::clone(&self.source);
        let id = self.opened.fetch_add(1, Ordering::Relaxed);
        let limit = self.timeout * OPEN_LIMIT;
        let open = tokio::spawn(async move {
            let link = tokio::time::timeout(limit, source.open())
                .await
                .map_err(|_| {
                    StoreError::Unavailable(format!("no redis connection within {limit:?}"))
                })??;
            *slot = Some(Opened { link, id });
            Ok(slot)
        });
        open.await.map_err(|error| {
            StoreError::Unavailable(format!("opening a redis connection failed: {error}"))
        })?
    }

    /// Empties slot `index` after a request failed on its connection `id` (which may be broken,
    /// Redis restarted, or stuck), so that the next request opens another; not if the slot holds
    /// a newer connection by now, or is being filled. On a Redis Cluster too: a connection kept
    /// through failures reconnects node by node by itself, but learns that a primary was
    /// replaced only from a node that says so, while a new one asks the cluster for its slots
    /// afresh (a primary that stalled and came back unaware of its replica's promotion takes
    /// writes the cluster then drops). A fault campaign with cluster connections kept through
    /// failures lost two acknowledged orders; none of those that replaced them lost any.
    fn forget(&self, index: usize, id: u64) {
        let Some(Ok(mut slot)) = self.slots.get(index).map(|slot| slot.try_lock()) else {
            return;
        };
        if slot.as_ref().is_some_and(|opened| opened.id == id) {
            *slot = None;
        }
    }
}

impl Source {
    /// Opens a connection: to the fixed address, to the primary the sentinels name now, or to the
    /// Redis Cluster.
    async fn open(&self) -> Result<Link, StoreError> {
        match self {
            Source::Direct(pool) => Ok(Link::One(deadpool_redis::Connection::take(
                pool.get().await.map_err(unavailable)?,
            ))),
            Source::Cluster(client) => client
                .get_async_connection()
                .await
                .map(Link::Cluster)
                .map_err(|error| StoreError::Unavailable(format!("redis cluster: {error}"))),
            Source::Sentinel(sentinel) => {
                let (primary, config) = &**sentinel;
                let mut primary = primary.lock().await;
                let Primary {
                    client,
                    master_name,
                    last,
                } = &mut *primary;
                // The sentinels' answer is checked: the address they name must say (ROLE) that
                // it is a primary, so no connection is opened to a replica. One opened before a
                // failover gets READONLY from a demoted primary, fails, and is dropped.
                let client = client.async_get_client().await.map_err(|error| {
                    StoreError::Unavailable(format!(
                        "no primary for {master_name} from the sentinels: {error}"
                    ))
                })?;
                let address = client.get_connection_info().addr().to_string();
                let connection = client
                    .get_multiplexed_async_connection_with_config(config)
                    .await
                    .map_err(|error| {
                        StoreError::Unavailable(format!("redis primary {address}: {error}"))
                    })?;
                if last.as_deref() != Some(address.as_str()) {
                    match last.as_deref() {
                        Some(previous) => tracing::warn!(
                            master_name = %master_name,
                            primary = %address,
                            previous = %previous,
                            "redis primary changed"
                        ),
                        None => tracing::info!(
                            master_name = %master_name,
                            primary = %address,
                            "redis primary found through sentinel"
                        ),
                    }
                    *last = Some(address);
                }
                Ok(Link::One(connection))
            }
        }
    }
}

/// A keyless command for the primary that serves a key: see [`Connections::query_at`].
struct At<'a> {
    command: &'a redis::Cmd,
    key: &'a str,
}

impl Request for At<'_> {
    fn send<'a, T: FromRedisValue + Send + 'a>(
        &'a self,
        connection: &'a mut Link,
    ) -> BoxFuture<'a, RedisResult<T>> {
        Box::pin(connection.query_at(self.command, self.key))
    }
}

/// A command for every primary (see [`Link::query_primaries`]).
struct OnPrimaries<'a> {
    command: &'a redis::Cmd,
}

impl Request for OnPrimaries<'_> {
    fn send<'a, T: FromRedisValue + Send + 'a>(
        &'a self,
        connection: &'a mut Link,
    ) -> BoxFuture<'a, RedisResult<T>> {
        Box::pin(async move {
            let answers = connection.query_primaries(self.command).await?;
            Ok(T::from_redis_value(answers)?)
        })
    }
}

/// What [`Connections::query`] sends: a command, a pipeline, or a script call.
pub(crate) trait Request: Sync {
    fn send<'a, T: FromRedisValue + Send + 'a>(
        &'a self,
        connection: &'a mut Link,
    ) -> BoxFuture<'a, RedisResult<T>>;

    /// This request as a pipeline that a `WAIT` can join, so that both take one round trip;
    /// `None` when it cannot (a transaction: `WAIT` inside `MULTI` would not wait).
    fn pipelined(&self) -> Option<Pipelined> {
        None
    }

    /// Loads the scripts this request calls, once Redis has answered that it does not know them.
    fn load_scripts<'a>(&'a self, _connection: &'a mut Link) -> BoxFuture<'a, RedisResult<()>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A request put in a pipeline of its own (see [`Request::pipelined`]).
pub(crate) struct Pipelined {
    pipeline: redis::Pipeline,
    /// The request is one command: its answer is the pipeline's first, not the list of them.
    single: bool,
}

/// Commands, pipelines and lone script calls each have their own way to send themselves; a lone
/// script call loads its script itself when Redis has forgotten it.
macro_rules! request {
    ($send:ident) => {
        fn send<'a, T: FromRedisValue + Send + 'a>(
            &'a self,
            connection: &'a mut Link,
        ) -> BoxFuture<'a, RedisResult<T>> {
            Box::pin(self.$send(connection))
        }
    };
}

impl Request for redis::Cmd {
    request!(query_async);

    fn pipelined(&self) -> Option<Pipelined> {
        let mut pipeline = redis::pipe();
        pipeline.add_command(self.clone());
        Some(Pipelined {
            pipeline,
            single: true,
        })
    }
}

/// A pipeline may be a transaction (`MULTI`/`EXEC`), which a `WAIT` must not join: it is sent
/// after it.
impl Request for redis::Pipeline {
    request!(query_async);
}

impl Request for ScriptInvocation<'_> {
    request!(invoke_async);

    fn pipelined(&self) -> Option<Pipelined> {
        let mut pipeline = redis::pipe();
        pipeline.invoke_script(self);
        Some(Pipelined {
            pipeline,
            single: true,
        })
    }

    fn load_scripts<'a>(&'a self, connection: &'a mut Link) -> BoxFuture<'a, RedisResult<()>> {
        Box::pin(async move { self.load_async(connection).await.map(drop) })
    }
}

/// Sends `pipeline`, which holds calls of the scripts of `request`; when Redis has forgotten them
/// (restarted, failed over), nothing of the pipeline's scripts ran: they are loaded and the
/// pipeline is sent once more, so it must be idempotent.
async fn query_loading<T: FromRedisValue + Send, R: Request + ?Sized>(
    pipeline: &redis::Pipeline,
    request: &R,
    connection: &mut Link,
) -> RedisResult<T> {
    match pipeline.query_async::<T>(connection).await {
        Err(error)
            if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
        {
            request.load_scripts(connection).await?;
            pipeline.query_async::<T>(connection).await
        }
        other => other,
    }
}

/// One call of a script, as the `EVALSHA` command it is sent as; when Redis has forgotten the
/// script, it is loaded and the call sent once more (nothing of it ran). Built straight into its
/// command, its keys and arguments are copied once (a `ScriptInvocation` keeps each in a buffer of
/// its own and copies them all into the command it sends).
pub(crate) struct ScriptCall<'s> {
    pub command: redis::Cmd,
    pub script: &'s Script,
}

impl<'s> ScriptCall<'s> {
    /// A call of `script` with `keys` keys, which the caller adds to `command` before its
    /// arguments; room for `bytes` bytes of them.
    pub fn new(script: &'s Script, keys: usize, bytes: usize) -> ScriptCall<'s> {
        let mut command = redis::Cmd::with_capacity(3 + keys, bytes + 64);
        command.arg("EVALSHA").arg(script.get_hash()).arg(keys);
        ScriptCall { command, script }
    }
}

impl Request for ScriptCall<'_> {
    fn send<'a, T: FromRedisValue + Send + 'a>(
        &'a self,
        connection: &'a mut Link,
    ) -> BoxFuture<'a, RedisResult<T>> {
        Box::pin(async move {
            match self.command.query_async(connection).await {
                Err(error)
                    if error.kind()
                        == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    self.script.load_async(connection).await?;
                    self.command.query_async(connection).await
                }
                other => other,
            }
        })
    }

    fn pipelined(&self) -> Option<Pipelined> {
        let mut pipeline = redis::pipe();
        pipeline.add_command(self.command.clone());
        Some(Pipelined {
            pipeline,
            single: true,
        })
    }

    fn load_scripts<'a>(&'a self, connection: &'a mut Link) -> BoxFuture<'a, RedisResult<()>> {
        Box::pin(async move { self.script.load_async(connection).await.map(drop) })
    }
}

/// A write followed by `WAIT` on the same connection: see [`Connections::write`].
struct Acked<'a, R: ?Sized> {
    request: &'a R,
    wait: redis::Cmd,
}

impl<R: Request + ?Sized> Request for Acked<'_, R> {
    /// Answers `(the write's answer, replicas that acknowledged it)`, in one round trip when the
    /// write can share a pipeline with the `WAIT`.
    fn send<'a, T: FromRedisValue + Send + 'a>(
        &'a self,
        connection: &'a mut Link,
    ) -> BoxFuture<'a, RedisResult<T>> {
        Box::pin(async move {
            let (answer, acknowledged) = match self.request.pipelined() {
                Some(Pipelined {
                    mut pipeline,
                    single,
                }) => {
                    pipeline.add_command(self.wait.clone());
                    let mut answers: Vec<Value> =
                        query_loading(&pipeline, self.request, connection).await?;
                    let acknowledged = answers.pop().unwrap_or(Value::Int(0));
                    let answer = match single {
                        true => answers.pop().unwrap_or(Value::Nil),
                        false => Value::Array(answers),
                    };
                    (answer, acknowledged)
                }
                None => {
                    let answer: Value = self.request.send(connection).await?;
                    (answer, self.wait.query_async(connection).await?)
                }
            };
            Ok(T::from_redis_value(Value::Array(vec![
                answer,
                acknowledged,
            ]))?)
        })
    }
}

/// A pipeline that holds script calls. When Redis has forgotten the scripts (after a restart),
/// `scripts` are loaded and the pipeline is sent once more, so it must be idempotent.
pub(crate) struct Scripted<'a> {
    pub pipeline: &'a redis::Pipeline,
    pub scripts: &'a [&'a Script],
}

impl Request for Scripted<'_> {
    fn send<'a, T: FromRedisValue + Send + 'a>(
        &'a self,
        connection: &'a mut Link,
    ) -> BoxFuture<'a, RedisResult<T>> {
        Box::pin(query_loading(self.pipeline, self, connection))
    }

    fn pipelined(&self) -> Option<Pipelined> {
        Some(Pipelined {
            pipeline: self.pipeline.clone(),
            single: false,
        })
    }

    fn load_scripts<'a>(&'a self, connection: &'a mut Link) -> BoxFuture<'a, RedisResult<()>> {
        Box::pin(async move {
            for script in self.scripts {
                script.prepare_invoke().load_async(connection).await?;
            }
            Ok(())
        })
    }
}
