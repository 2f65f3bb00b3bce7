//! `/diagnostic/heartbeat` (a real check of the store), `/diagnostic/cluster` and
//! `/diagnostic/summary` (this node's orders by current step and its recent failures, from
//! memory: no store query, bounded size).
//!
//! None needs a token, but the summary's recent failures name other users' orders and reasons:
//! in tokens mode they are shown only to an admin's token, and without an `Authorization`
//! header the summary holds the counts only (what the console shows). A header that is not
//! a valid token is a 401, a user's token a 403.
//!
//! `/diagnostic/set-aside` lists the orders set aside because their stored record cannot be
//! read: in header mode to anyone, in tokens mode to an admin's token only (401 without one).
//!
//! A node's `last_activity` is, in a cluster, when gossip last heard from it; for a single node,
//! when it last accepted, cancelled or re-queued an order (its start before the first).

use super::auth::{credentials, Authenticator, Credentials};
use super::{json_reply, respond, with_state, ApiError, NodeStatus};
use crate::about::{SERVICE_NAME, VERSION};
use chrono::{SecondsFormat, Utc};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Filter;

type State = Arc<NodeStatus>;

pub fn routes(state: State, auth: Arc<Authenticator>) -> BoxedFilter<(Response,)> {
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
        .and(with_state(state.clone()))
        .and(with_state(auth.clone()))
        .and(credentials())
        .then(|state, auth, credentials| async move { respond(summary(state, auth, credentials)) });
    let set_aside = warp::path!("diagnostic" / "set-aside")
        .and(warp::get())
        .and(with_state(state))
        .and(with_state(auth))
        .and(credentials())
        .and(warp::query::<HashMap<String, String>>())
        .then(|state, auth, credentials, query| async move {
            respond(set_aside(state, auth, credentials, query).await)
        });
    heartbeat
        .or(cluster)
        .unify()
        .or(summary)
        .unify()
        .or(set_aside)
        .unify()
        .boxed()
}

/// The most entries one `/diagnostic/set-aside` answer holds, and how many it holds unless
/// `?limit=` says otherwise.
const MAX_SET_ASIDE: usize = 1000;
const DEFAULT_SET_ASIDE: usize = 100;

/// How long a client waits before asking again when the store is unavailable.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

async fn set_aside(
    state: State,
    auth: Arc<Authenticator>,
    credentials: Credentials,
    query: HashMap<String, String>,
) -> Result<Response, ApiError> {
    if auth.checks_tokens() {
        auth.caller(&credentials)?
            .require_admin("/diagnostic/set-aside")?;
    }
    let mut limit = DEFAULT_SET_ASIDE;
    for (name, value) in &query {
        match name.as_str() {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=MAX_SET_ASIDE).contains(limit))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "limit must be a number from 1 to {MAX_SET_ASIDE}"
                        ))
                    })?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{other}`"
                )))
            }
        }
    }
    let orders = state
        .store
        .set_aside_orders(limit)
        .await
        .map_err(|error| ApiError::from_store(error, STORE_RETRY_AFTER))?;
    Ok(json_reply(
        StatusCode::OK,
        &serde_json::json!({
            "generated_at": now(),
            "set_aside": orders,
        }),
    ))
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

async fn heartbeat(state: State) -> Response {
    let problem = state.store_problem().await;
    let (status, code) = match problem {
        None => ("OK", StatusCode::OK),
        Some(_) => ("DEGRADED", StatusCode::SERVICE_UNAVAILABLE),
    };
    let mut body = serde_json::json!({
        "generated_at": now(),
        "service_id": state.service_id,
        "service_name": SERVICE_NAME,
        "status": status,
        "version": VERSION,
    });
    let Some(problem) = problem else {
        return json_reply(code, &body);
    };
    // A 503 like any other: its problem also as `error`, and when to ask again.
    body["error"] = serde_json::Value::String(problem.clone());
    body["problem"] = serde_json::Value::String(problem);
    let mut reply = json_reply(code, &body);
    reply.headers_mut().insert(
        warp::http::header::RETRY_AFTER,
        STORE_RETRY_AFTER.as_secs().into(),
    );
    reply
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
                    "connection_string": seen.member.http_addr.map(|addr| state.peers.url(addr, "")),
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
        "connection_string": state.peers.url(state.advertised, ""),
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

/// Whether the caller may see the recent failures: always in header mode; in tokens mode only
/// as an admin. No header gives the counts only (so does a client certificate alone, unless
/// its entry is an admin's); a bad token is a 401, a user's a 403.
fn shows_failures(auth: &Authenticator, credentials: &Credentials) -> Result<bool, ApiError> {
    if !auth.checks_tokens() {
        return Ok(true);
    }
    if credentials.authorization.is_none() {
        return Ok(credentials.certificate.is_some()
            && auth
                .caller(credentials)
                .is_ok_and(|caller| caller.is_admin()));
    }
    auth.caller(credentials)?
        .require_admin("the recent failures of /diagnostic/summary")?;
    Ok(true)
}

fn summary(
    state: State,
    auth: Arc<Authenticator>,
    credentials: Credentials,
) -> Result<Response, ApiError> {
    let full = shows_failures(&auth, &credentials)?;
    let by_step: serde_json::Map<String, serde_json::Value> = state
        .metrics
        .in_step()
        .into_iter()
        .map(|(step, count)| (step.as_str().to_string(), serde_json::Value::from(count)))
        .collect();
    let mut body = serde_json::json!({
        "generated_at": now(),
        "service_id": state.service_id,
        "inflight": state.pool.inflight(),
        "queued": state.pool.queued(),
        "inflight_by_step": by_step,
        "totals": state.metrics.totals(),
    });
    if full {
        body["recent_failures"] = serde_json::json!(state.metrics.recent_failures());
    }
    Ok(json_reply(StatusCode::OK, &body))
}
