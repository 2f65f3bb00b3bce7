//! `GET /metrics`: the Prometheus text exposition of this node's metrics. Gauges that are cheap
//! to read but costly to keep current (queue depth, worker use, gossip membership) are read here.

use super::{with_state, ApiError, NodeStatus};
use std::sync::Arc;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

/// The content type of the text format `prometheus_client` writes (OpenMetrics 1.0, which
/// Prometheus reads natively; its `# EOF` line is a comment to older parsers).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type State = Arc<NodeStatus>;

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("metrics")
        .and(warp::get())
        .and(with_state(state))
        .then(metrics)
        .boxed()
}

async fn metrics(state: State) -> Response {
    let pool = &state.pool;
    state.metrics.set_pool(
        pool.queued(),
        pool.capacity(),
        pool.inflight(),
        pool.workers(),
    );
    match state.cluster.as_ref() {
        Some(cluster) => {
            let (_, nodes) = cluster.view().await;
            let live = nodes.iter().filter(|node| node.live).count();
            state.metrics.set_gossip(live, nodes.len() - live);
        }
        None => state.metrics.set_gossip(1, 0),
    }
    match state.metrics.render() {
        Ok(text) => warp::reply::with_header(text, "content-type", CONTENT_TYPE).into_response(),
        Err(_) => {
            tracing::error!("cannot encode metrics");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics")
                .into_response()
        }
    }
}
