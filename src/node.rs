//! Wires config, store, worker pool and API into one running node, and owns its shutdown.

use crate::api::tls::{Peers, ServerTls};
use crate::api::{self, ApiState, Checks, NodeStatus};
use crate::cluster::{Cluster, Coordinator, RedisCoordinator};
use crate::config::{Config, HandlerSettings};
use crate::metrics::Metrics;
use crate::order::Step;
use crate::pipeline::{self, http, Gate, Handlers, Http, Notifier, Pool, Simulate, StepHandler};
use crate::service::OrderService;
use crate::store::embedded::EmbeddedStore;
use crate::store::metered::MeteredStore;
use crate::store::redis::{checks, Connections, RedisStore};
use crate::store::{OrderStore, StoreError};
use anyhow::Context;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{info, warn, Instrument};

/// How long the HTTP server may take to finish its open requests once the node has drained.
const HTTP_DRAIN: Duration = Duration::from_secs(5);

/// Reads the node id from `<data_dir>/service_id`, creating it on first start.
pub fn service_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("service_id");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = uuid::Uuid::try_parse(text.trim())
                .with_context(|| format!("{} does not hold a UUID", path.display()))?;
            Ok(id.to_string())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            write_durably(data_dir, "service_id", &id)?;
            Ok(id)
        }
        Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// This process's gossip generation: the time in ms, but always above the last one this data
/// dir handed out (kept in `<data_dir>/generation`). Peers take the node's highest generation
/// for its current process, so a node that ran with its clock ahead and restarts with the right
/// time must still come after itself.
pub fn generation(data_dir: &Path) -> anyhow::Result<u64> {
    let path = data_dir.join("generation");
    let last = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().unwrap_or_else(|_| {
            warn!(path = %path.display(), "generation file does not hold a number, starting over");
            0
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    };
    let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    let generation = now.max(last.saturating_add(1));
    write_durably(data_dir, "generation", &generation.to_string())?;
    Ok(generation)
}

/// Writes `<dir>/<name>` so that a crash or a power loss leaves it whole or as it was: written
/// aside, flushed to the disk, renamed over, and the rename flushed too. The node id must not
/// come back empty after the orders stored under it did not.
fn write_durably(dir: &Path, name: &str, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let path = dir.join(name);
    let fresh = dir.join(format!("{name}.new"));
    let written = std::fs::File::create(&fresh)
        .and_then(|mut file| {
            file.write_all(contents.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&fresh, &path))
        .and_then(|()| std::fs::File::open(dir)?.sync_all());
    written.with_context(|| format!("cannot write {}", path.display()))
}

/// The step handlers and the completion webhook the config asks for. `http` steps with the
/// same TLS files (and the webhook, which has none of its own) share one HTTP client.
pub fn handlers(config: &Config) -> anyhow::Result<Handlers> {
    let mut handlers = Handlers::new(Arc::new(Simulate::new(config.simulate)));
    let mut clients = http::Clients::default();
    for step in Step::WORK {
        if !config.steps.contains_key(step.as_str()) {
            continue;
        }
        let handler: Arc<dyn StepHandler> = match config.handler_for(step)? {
            HandlerSettings::Simulate(settings) => Arc::new(Simulate::new(settings)),
            HandlerSettings::Http(settings) => Arc::new(Http::new(
                step,
                clients.for_step(step, &settings)?,
                *settings,
            )?),
        };
        handlers.set(step, handler);
    }
    if let Some(settings) = config.notify_settings()? {
        let client = clients.for_notify(&settings)?;
        handlers.set_notifier(Arc::new(Notifier::new(client, settings)?));
    }
    Ok(handlers)
}

/// Checks what [`run`] reads before it touches the data dir or the network: the config, the
/// tokens file, the TLS files (the node's, its peers' CA, Redis's, the steps' and the
/// webhook's), the step handlers and the webhook, Redis's address and password file, and
/// `cluster.advertise`. For `order-process check-config`, so that a rollout refuses a config
/// the node would refuse before it stops the node.
pub fn check(config: &Config) -> anyhow::Result<()> {
    Prepared::from_config(config).map(drop)
}

/// What a node builds from its config before it touches the data dir or the network (nothing
/// here contacts anyone): all that can refuse a config at start, shared by [`run`] and
/// [`check`].
struct Prepared {
    security: api::auth::Security,
    server_tls: Option<Arc<ServerTls>>,
    peers: Peers,
    handlers: Handlers,
    /// The connections to Redis in cluster mode, none made yet.
    redis: Option<Connections>,
    advertised: Option<std::net::SocketAddr>,
}

impl Prepared {
    fn from_config(config: &Config) -> anyhow::Result<Prepared> {
        // First, so a bad tokens file stops the node before anything else.
        let security = api::auth::Security::from_config(config)?;
        let server_tls = ServerTls::from_config(config)?.map(Arc::new);
        let peers = Peers::from_config(config, server_tls.as_deref())?;
        let handlers = handlers(config)?;
        let redis = if config.is_cluster() {
            Some(Connections::open(&config.database)?)
        } else {
            None
        };
        Ok(Prepared {
            security,
            server_tls,
            peers,
            handlers,
            redis,
            advertised: advertised_address(config)?,
        })
    }
}

/// `cluster.advertise` as an address, `None` when empty (peers use the listen address).
fn advertised_address(config: &Config) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if config.cluster.advertise.is_empty() {
        return Ok(None);
    }
    let address = config
        .cluster
        .advertise
        .parse()
        .context("cluster.advertise is not an address")?;
    Ok(Some(address))
}

/// Runs a node on `listener` until `shutdown` resolves, then drains: new orders get 503,
/// running steps finish and commit (up to `server.shutdown_grace`), and the HTTP server stops.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // Polled while the node starts too: a node told to stop while it waits for its lease stops.
    let mut shutdown = std::pin::pin!(shutdown);
    // Before the tokens file is read: a SIGHUP sent while the node starts (waiting for Redis or
    // its lease) is kept for the reload task, which then reads the file in place.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    // First, so a bad config (tokens file, TLS files, ...) stops the node before it touches
    // its store.
    let Prepared {
        security,
        server_tls,
        peers,
        handlers,
        redis,
        advertised,
    } = Prepared::from_config(&config)?;
    if security.auth.names_certificates() && config.server.tls_client_ca.as_os_str().is_empty() {
        warn!("the tokens file has [[certificate]] entries, but server.tls_client_ca is not set: no caller shows a client certificate, so none is used");
    }
    let data_dir = &config.server.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let service_id = service_id(data_dir)?;
    let listen = listener
        .local_addr()
        .context("cannot read the listen address")?;
    let advertised = advertised.unwrap_or(listen);
    let workers = config.pipeline.workers.get();
    let queue = config.pipeline.queue_capacity.get();
    let metrics = Arc::new(Metrics::new());
    let retention = config.orders.retention;
    // The embedded store, closed once the node has stopped.
    let mut embedded = None;
    // On Redis: the task that keeps checking it can keep orders as configured.
    let mut watch_redis = None;
    let (store, pool, cluster): (Arc<dyn OrderStore>, Arc<Pool>, Option<Arc<Cluster>>) =
        if let Some(redis) = redis {
            // The order store and the coordinator share one set of connections to Redis.
            let redis = Arc::new(redis);
            tokio::select! {
                checked = checks::check(&redis, &config.database) => checked?,
                () = &mut shutdown => {
                    info!("told to stop while starting; stopping");
                    return Ok(());
                }
            }
            let fitness = Arc::new(checks::Fitness::default());
            let orders = RedisStore::new(Arc::clone(&redis))
                .with_fitness(Arc::clone(&fitness))
                .with_retention(retention)
                .with_compression(config.database.compress_orders)
                .with_payload_apart(config.database.payload_apart)
                .with_split_orders(config.database.split_orders);
            let orders: Arc<dyn OrderStore> = Arc::new(orders);
            let coordinator = RedisCoordinator::new(Arc::clone(&redis));
            let coordinator: Arc<dyn Coordinator> = Arc::new(coordinator);
            let store: Arc<dyn OrderStore> =
                Arc::new(MeteredStore::new(orders, Arc::clone(&metrics)));
            // Closed until the first liveness renewal: no step starts before the lease is held.
            let gate = Arc::new(Gate::closed());
            let pool = Pool::start(
                service_id.clone(),
                Arc::clone(&store),
                handlers.clone(),
                Arc::clone(&gate),
                workers,
                queue,
                config.pipeline.max_orders.get(),
                Arc::clone(&metrics),
            );
            let start = Cluster::start(
                service_id.clone(),
                generation(data_dir)?,
                listen,
                advertised,
                config.cluster.clone(),
                coordinator,
                Arc::clone(&store),
                Arc::clone(&pool),
                gate,
                Arc::clone(&metrics),
                peers.clone(),
            );
            let cluster = tokio::select! {
                cluster = start => cluster?,
                () = &mut shutdown => {
                    // Usually still waiting for the lease, so nothing ran yet; an order started
                    // in the last moments resumes elsewhere once the lease expires, as after a
                    // crash.
                    info!("told to stop while starting; stopping");
                    pool.shutdown(Duration::ZERO).await;
                    return Ok(());
                }
            };
            watch_redis = Some(tokio::spawn(checks::watch(
                redis,
                config.database.clone(),
                fitness,
            )));
            (store, pool, Some(cluster))
        } else {
            let file = Arc::new(
                EmbeddedStore::open_with(data_dir, retention, config.database.compress_orders)?
                    .with_payload_apart(config.database.payload_apart),
            );
            embedded = Some(Arc::clone(&file));
            let metered = MeteredStore::new(file, Arc::clone(&metrics));
            let store: Arc<dyn OrderStore> = Arc::new(metered);
            let pool = Pool::start(
                service_id.clone(),
                Arc::clone(&store),
                handlers.clone(),
                Arc::new(Gate::open()),
                workers,
                queue,
                config.pipeline.max_orders.get(),
                Arc::clone(&metrics),
            );
            spawn_resume(Arc::clone(&store), Arc::clone(&pool), service_id.clone());
            (store, pool, None)
        };

    // Level-triggered: whatever event was lost, an unfinished order of this node runs again
    // within about one interval.
    let reconcile = pipeline::reconcile::spawn(
        Arc::clone(&pool),
        Arc::clone(&store),
        service_id.clone(),
        config.pipeline.reconcile_interval,
    );
    let (checks, in_flight) = Checks::split(security, config.server.max_body_bytes);
    let mut orders = OrderService::new(
        service_id.clone(),
        Arc::clone(&store),
        Arc::clone(&pool),
        Arc::clone(&metrics),
        in_flight,
        config.server.retry_after,
    );
    if let Some(cluster) = &cluster {
        orders = orders.with_runners(Arc::clone(cluster) as Arc<dyn crate::service::Runners>);
    }
    let node = NodeStatus {
        service_id: service_id.clone(),
        listen,
        advertised,
        started_at: chrono::Utc::now(),
        store,
        pool: Arc::clone(&pool),
        cluster: cluster.clone(),
        metrics: Arc::clone(&metrics),
        activity: orders.activity(),
        peers,
    };
    let reload = spawn_reload_on_hangup(hangups, Arc::clone(&checks.auth), server_tls.clone());
    let state = ApiState {
        orders: Arc::new(orders),
        security: Arc::new(checks),
        node: Arc::new(node),
        retry_after: config.server.retry_after,
        embedded: embedded.clone(),
    };
    let (http_stop_tx, mut http_stop_rx) = tokio::sync::watch::channel(false);
    let server = api::serve::serve(
        api::routes(state),
        listener,
        config.limits.header_read_timeout,
        config.limits.max_connections.get(),
        server_tls.clone(),
        Arc::clone(&metrics),
        async move {
            let _ = http_stop_rx.changed().await;
        },
    );
    let server = tokio::spawn(server.instrument(tracing::info_span!("http")));
    info!(
        service_id = %service_id,
        listen = %listen,
        store = if cluster.is_some() { "redis" } else { "embedded" },
        https = server_tls.is_some(),
        data_dir = %data_dir.display(),
        "listening"
    );

    shutdown.await;
    info!("shutting down: no new orders, letting running steps finish");
    match &cluster {
        Some(cluster) => cluster.drain(config.server.shutdown_grace).await,
        None => pool.shutdown(config.server.shutdown_grace).await,
    }
    let _ = http_stop_tx.send(true);
    if tokio::time::timeout(HTTP_DRAIN, server).await.is_err() {
        warn!("http server did not stop in time");
    }
    reload.abort();
    reconcile.abort();
    if let Some(watch) = watch_redis {
        watch.abort();
    }
    if let Some(file) = embedded {
        close(file).await;
    }
    info!("stopped");
    Ok(())
}

/// How long a stopping node waits for the reads and writes still under way before it closes the
/// embedded store's file.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// Closes the embedded store's file, so the next start need not repair it.
async fn close(file: Arc<EmbeddedStore>) {
    let closed = tokio::task::spawn_blocking(move || file.close(CLOSE_WITHIN))
        .await
        .map_err(|error| StoreError::Unavailable(error.to_string()))
        .and_then(|closed| closed);
    match closed {
        Ok(()) => info!("store file closed"),
        Err(error) => {
            warn!(error = %error, "store file not closed cleanly, the next start repairs it")
        }
    }
}

/// Re-reads the tokens file, and the https certificate and key, on each SIGHUP; a bad file
/// keeps what is in force.
fn spawn_reload_on_hangup(
    hangups: std::io::Result<tokio::signal::unix::Signal>,
    auth: Arc<api::auth::Authenticator>,
    tls: Option<Arc<ServerTls>>,
) -> tokio::task::JoinHandle<()> {
    let task = async move {
        let mut hangups = match hangups {
            Ok(hangups) => hangups,
            Err(error) => {
                warn!(error = %error, "cannot listen for SIGHUP: tokens cannot be reloaded");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            match auth.reload() {
                Ok(count) => info!(
                    tokens = count.tokens,
                    certificates = count.certificates,
                    "received SIGHUP: tokens reloaded"
                ),
                Err(error) => {
                    tracing::error!(error = %error, "received SIGHUP: cannot reload tokens, keeping the old ones")
                }
            }
            match tls.as_ref().map(|tls| tls.reload()) {
                None => {}
                Some(Ok(())) => info!("received SIGHUP: https certificate reloaded"),
                Some(Err(error)) => {
                    tracing::error!(error = %error, "received SIGHUP: cannot reload the https certificate, keeping the old one")
                }
            }
        }
    };
    tokio::spawn(task.instrument(tracing::info_span!("reload")))
}

/// Queues every unfinished order this node owns, so a restart resumes each at its current step.
fn spawn_resume(store: Arc<dyn OrderStore>, pool: Arc<Pool>, service_id: String) {
    let task = async move {
        let _adopting = pool.adopting();
        let mut delay = Duration::from_millis(100);
        let ids = loop {
            match store.owned_unfinished(&service_id).await {
                Ok(ids) => break ids,
                Err(error) => {
                    warn!(error = %error, "cannot list unfinished orders, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    if pool.is_stopping() {
                        return;
                    }
                }
            }
        };
        if ids.is_empty() {
            return;
        }
        info!(orders = ids.len(), "resuming unfinished orders");
        pool.resume_all(ids);
    };
    tokio::spawn(task.instrument(tracing::info_span!("resume")));
}

#[cfg(test)]
mod tests {
    use super::{generation, service_id};

    #[test]
    fn the_node_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let id = service_id(dir.path()).unwrap();
        assert!(uuid::Uuid::try_parse(&id).is_ok(), "{id}");
        assert_eq!(service_id(dir.path()).unwrap(), id);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["service_id"], "nothing left aside");
        std::fs::write(dir.path().join("service_id"), "").unwrap();
        assert!(
            service_id(dir.path()).is_err(),
            "an empty id is not replaced"
        );
    }

    #[test]
    fn generations_always_grow_even_after_a_clock_that_ran_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let first = generation(dir.path()).unwrap();
        let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap();
        assert!(first <= now && now - first < 60_000, "{first} vs {now}");
        assert!(generation(dir.path()).unwrap() > first);
        // The last process ran an hour ahead: the next one still comes after it.
        let ahead = now + 3_600_000;
        std::fs::write(dir.path().join("generation"), ahead.to_string()).unwrap();
        assert_eq!(generation(dir.path()).unwrap(), ahead + 1);
        // A file that does not hold a number starts over from the clock.
        std::fs::write(dir.path().join("generation"), "garbage").unwrap();
        assert!(generation(dir.path()).unwrap() >= now);
    }
}
