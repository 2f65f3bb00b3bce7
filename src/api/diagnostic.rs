//! `/diagnostic/heartbeat` (a real check of the store), `/diagnostic/cluster` and
//! `/diagnostic/summary` (this node's orders by current step and its recent failures, from
//! memory: no store query, bounded size).
//!
//! A node's `last_activity` is, in a cluster, when gossip last heard from it; for a single node,
//! when it last accepted, cancelled or re-queued an order (its start before the first).

use super::{json_reply, with_state, NodeStatus};
use crate::about::{SERVICE_NAME, VERSION};
use chrono::{SecondsFormat, Utc};
use std::sync::Arc;
use std::time::Duration;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Filter;

/// How long the heartbeat waits for the store before calling it degraded.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

type State = Arc<NodeStatus>;

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    let heartbeat = warp::path!("diagnostic" / "heartbeat")
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(heartbeat);
    let cluster = warp::path!("diagnostic" / "cluster")
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(cluster);
    let summary = warp::path!("diagnostic" / "summary")
        .and(warp::get())
        .and(with_state(state))
        .then(summary);
    heartbeat.or(cluster).unify().or(summary).unify().boxed()
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

async fn heartbeat(state: State) -> Response {
    let check = tokio::time::timeout(STORE_CHECK_TIMEOUT, state.store.ping()).await;
    let (status, code, problem) = match check {
        Ok(Ok(())) => ("OK", StatusCode::OK, None),
        Ok(Err(error)) => (
            "DEGRADED",
            StatusCode::SERVICE_UNAVAILABLE,
            Some(error.to_string()),
        ),
        Err(_) => (
            "DEGRADED",
            StatusCode::SERVICE_UNAVAILABLE,
            Some("store check timed out".to_string()),
        ),
    };
    let mut body = serde_json::json!({
        "generated_at": now(),
        "service_id": state.service_id,
        "service_name": SERVICE_NAME,
        "status": status,
        "version": VERSION,
    });
    if let Some(problem) = problem {
        body["problem"] = serde_json::Value::String(problem);
    }
    json_reply(code, &body)
}

async fn cluster(state: State) -> Response {
    if let Some(cluster) = state.cluster.as_ref() {
        let (leader, nodes) = cluster.view().await;
        let nodes: Vec<serde_json::Value> = nodes
            .iter()
            .map(|seen| {
                let is_self = seen.member.node_id == state.service_id;
                let role = if leader.as_deref() == Some(seen.member.node_id.as_str()) {
                    "leader"
                } else {
                    "follower"
                };
                serde_json::json!({
                    "name": seen.member.node_id,
                    "connected": seen.live,
                    "connection_string": seen.member.http_addr.map(|addr| format!("http://{addr}")),
                    "last_activity": seen.last_seen.to_rfc3339_opts(SecondsFormat::Micros, true),
                    "role": role,
                    "inflight": if is_self { state.pool.inflight() } else { seen.member.inflight },
                    "version": seen.member.version,
                    "started_at": seen.member.started_at,
                    "generation": seen.member.generation,
                })
            })
            .collect();
        return json_reply(
            StatusCode::OK,
            &serde_json::json!({
                "generated_at": now(),
                "leader_name": leader,
                "nodes_count": nodes.len(),
                "nodes": nodes,
            }),
        );
    }
    let node = serde_json::json!({
        "name": state.service_id,
        "connected": true,
        "connection_string": format!("http://{}", state.advertised),
        "last_activity": state.activity.get().to_rfc3339_opts(SecondsFormat::Micros, true),
        "role": "leader",
        "inflight": state.pool.inflight(),
        "queued": state.pool.queued(),
        "version": VERSION,
        "started_at": state.started_at.to_rfc3339_opts(SecondsFormat::Secs, true),
    });
    json_reply(
        StatusCode::OK,
        &serde_json::json!({
            "generated_at": now(),
            "leader_name": state.service_id,
            "nodes": [node],
            "nodes_count": 1,
        }),
    )
}

async fn summary(state: State) -> Response {
    let by_step: serde_json::Map<String, serde_json::Value> = state
        .metrics
        .in_step()
        .into_iter()
        .map(|(step, count)| (step.as_str().to_string(), serde_json::Value::from(count)))
        .collect();
    json_reply(
        StatusCode::OK,
        &serde_json::json!({
            "generated_at": now(),
            "service_id": state.service_id,
            "inflight": state.pool.inflight(),
            "queued": state.pool.queued(),
            "inflight_by_step": by_step,
            "totals": state.metrics.totals(),
            "recent_failures": state.metrics.recent_failures(),
        }),
    )
}
