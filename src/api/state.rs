//! What the routes are given: [`ApiState`], built once by the node, and the narrower parts
//! [`super::routes`] hands each route group.

use super::auth::{Authenticator, Security};
use super::limits::RateLimiter;
use super::tls::Peers;
use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::pipeline::Pool;
use crate::service::{InFlight, LastActivity, Orders};
use crate::store::embedded::EmbeddedStore;
use crate::store::OrderStore;
use chrono::{DateTime, Utc};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use warp::Filter;

/// Everything the routes need.
pub struct ApiState {
    pub orders: Arc<dyn Orders>,
    pub security: Arc<Checks>,
    pub node: Arc<NodeStatus>,
    /// How long an overloaded client should wait before trying again.
    pub retry_after: Duration,
    /// The embedded store, for backups (none on Redis).
    pub embedded: Option<Arc<EmbeddedStore>>,
}

/// What a request is checked against at the HTTP edge before any work: who calls, and what a
/// client may cost.
pub struct Checks {
    pub auth: Arc<Authenticator>,
    pub rate: RateLimiter,
    pub max_body_bytes: u64,
    pub body_read_timeout: Duration,
    pub max_depth: usize,
}

impl Checks {
    /// Splits the node's security settings: the checks made here, and the per-user cap on
    /// unfinished orders, which the order service keeps.
    pub fn split(security: Security, max_body_bytes: u64) -> (Checks, InFlight) {
        let Security {
            auth,
            rate,
            in_flight,
            body_read_timeout,
            max_depth,
        } = security;
        let checks = Checks {
            auth,
            rate,
            max_body_bytes,
            body_read_timeout,
            max_depth,
        };
        (checks, in_flight)
    }
}

/// What the diagnostics and the metrics report about this node.
pub struct NodeStatus {
    pub service_id: String,
    /// The address the node listens on.
    pub listen: SocketAddr,
    /// The address peers reach it at (`cluster.advertise`, else `listen`).
    pub advertised: SocketAddr,
    pub started_at: DateTime<Utc>,
    /// Checked by the heartbeat and the console's overview.
    pub store: Arc<dyn OrderStore>,
    pub pool: Arc<Pool>,
    /// Present in cluster mode.
    pub cluster: Option<Arc<Cluster>>,
    pub metrics: Arc<Metrics>,
    pub activity: Arc<LastActivity>,
    /// How this node's peers are called (and how any node is reached: http or https).
    pub peers: Peers,
}

/// How long a store check waits for the store before calling it degraded.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

impl NodeStatus {
    /// What is wrong with the store, as the heartbeat and the console show it: it does not
    /// answer, refuses writes, or (Redis) cannot keep orders as configured. `None` when well.
    pub async fn store_problem(&self) -> Option<String> {
        match tokio::time::timeout(STORE_CHECK_TIMEOUT, self.store.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some("store check timed out".to_string()),
        }
    }
}

/// What the cluster-internal `/service` routes need.
pub struct ServiceState {
    pub security: Arc<Checks>,
    /// Present in cluster mode.
    pub cluster: Option<Arc<Cluster>>,
    /// The orders, for the read-only view of what a node owns.
    pub store: Arc<dyn OrderStore>,
    pub retry_after: Duration,
    /// The embedded store, for backups (none on Redis).
    pub embedded: Option<Arc<EmbeddedStore>>,
}

/// The `/service` routes' state.
pub type State = Arc<ServiceState>;

/// Hands each request its route group's state.
pub fn with_state<T: ?Sized + Send + Sync + 'static>(
    state: Arc<T>,
) -> impl Filter<Extract = (Arc<T>,), Error = Infallible> + Clone {
    warp::any().map(move || Arc::clone(&state))
}
