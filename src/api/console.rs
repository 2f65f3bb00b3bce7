//! The JSON behind the console (`console.html`, served at `GET /`):
//!
//! - `/diagnostic/overview`: every node the cluster knows, with its role, liveness, version,
//!   uptime and its own figures (in flight, queued, totals), and the totals summed over the
//!   nodes that answered, and the store as this node finds it (as its heartbeat does). Counts
//!   only: no token needed, like the summary.
//! - `/diagnostic/flow`: this node's orders per second and step latency histograms of the last
//!   15 minutes ([`crate::flow`]); with `?scope=cluster`, merged over every live node that
//!   answers; `?since=<unix second>` returns only the newer seconds.
//! - `/diagnostic/parked`: the parked rollbacks of every user, a page at a time.
//! - `/diagnostic/stuck`: the unfinished orders nothing has moved for longer than
//!   `?older_than=` (default 60s), from a bounded walk of the nodes' owned orders.
//!
//! The last two name users' orders: in tokens mode only for an admin's token (401 without one,
//! 403 for a user's), in header mode for anyone, as `/diagnostic/set-aside`.
//!
//! A node gets its peers' figures from their own `/diagnostic/summary` and `/diagnostic/flow`
//! over HTTP: at most [`FAN_OUT`] requests at a time, each given up after [`PEER_TIMEOUT`].
//! Those routes need no credentials, so none are sent. A flow of 900 histograms per node is
//! far too much to gossip, and asking gives a node that does not answer as exactly that,
//! rather than as the stale figures gossip last carried.

use super::auth::{credentials, Authenticator, Credentials};
use super::tls::Peers;
use super::{json_reply, respond, with_state, ApiError, NodeStatus};
use crate::flow::{FlowView, LATENCY_BOUNDS_MS, SECONDS};
use crate::order::{Order, OrderId, Step};
use crate::store::is_parked;
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Filter;

/// How long a peer may take to answer before it counts as not answering.
pub const PEER_TIMEOUT: Duration = Duration::from_millis(1500);
/// The most peers asked at once.
pub const FAN_OUT: usize = 8;
/// The most parked rollbacks one page holds, and how many unless `?limit=` says otherwise.
const MAX_PARKED: usize = 200;
const DEFAULT_PARKED: usize = 50;
/// The most stuck orders one answer lists, and how many unless `?limit=` says otherwise.
const MAX_STUCK: usize = 500;
const DEFAULT_STUCK: usize = 100;
/// The most owned order ids one `/diagnostic/stuck` reads, over all nodes: its bound on work.
const STUCK_SCAN: usize = 5_000;
/// Owned ids read per store call while looking for stuck orders.
const STUCK_PAGE: usize = 500;
const DEFAULT_OLDER_THAN: Duration = Duration::from_secs(60);
/// How long a client waits before asking again when the store is unavailable.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the console routes need.
pub struct Console {
    pub node: Arc<NodeStatus>,
    pub auth: Arc<Authenticator>,
    /// For the peers' figures; `None` if it could not be built (peers then show as not
    /// answering).
    pub client: Option<reqwest::Client>,
}

impl Console {
    pub fn new(node: Arc<NodeStatus>, auth: Arc<Authenticator>) -> Console {
        let client = node
            .peers
            .client(reqwest::Client::builder())
            .timeout(PEER_TIMEOUT)
            .connect_timeout(PEER_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("order-process/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| tracing::warn!(error = %error, "no http client for the console's peer figures"))
            .ok();
        Console { node, auth, client }
    }
}

type State = Arc<Console>;

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    let overview = warp::path!("diagnostic" / "overview")
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(|state| async move { respond(overview(state).await) });
    let flow = warp::path!("diagnostic" / "flow")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(warp::query::<HashMap<String, String>>())
        .then(|state, query| async move { respond(flow(state, query).await) });
    let parked = warp::path!("diagnostic" / "parked")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(credentials())
        .and(warp::query::<HashMap<String, String>>())
        .then(|state, credentials, query| async move {
            respond(parked(state, credentials, query).await)
        });
    let stuck = warp::path!("diagnostic" / "stuck")
        .and(warp::get())
        .and(with_state(state))
        .and(credentials())
        .and(warp::query::<HashMap<String, String>>())
        .then(|state, credentials, query| async move {
            respond(stuck(state, credentials, query).await)
        });
    overview
        .or(flow)
        .unify()
        .or(parked)
        .unify()
        .or(stuck)
        .unify()
        .boxed()
}

fn now() -> String {
    rfc3339(Utc::now())
}

fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// In tokens mode, an admin (by token or client certificate) or an error; in header mode,
/// anyone.
fn require_admin(
    auth: &Authenticator,
    credentials: &Credentials,
    what: &str,
) -> Result<(), ApiError> {
    if auth.checks_tokens() {
        auth.caller(credentials)?.require_admin(what)?;
    }
    Ok(())
}

/// The query parameters, refusing any not in `known`.
fn only(query: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    match query.keys().find(|name| !known.contains(&name.as_str())) {
        Some(other) => Err(ApiError::bad_request(format!(
            "unknown query parameter `{other}`"
        ))),
        None => Ok(()),
    }
}

/// `?limit=` from 1 to `max`, `default` when absent.
fn limit(query: &HashMap<String, String>, default: usize, max: usize) -> Result<usize, ApiError> {
    match query.get("limit") {
        None => Ok(default),
        Some(value) => value
            .parse()
            .ok()
            .filter(|limit| (1..=max).contains(limit))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit must be a number from 1 to {max}"))
            }),
    }
}

/// A peer the console asks for its figures.
struct Peer {
    name: String,
    addr: SocketAddr,
}

/// Asks every peer for `path` (with `query`), at most [`FAN_OUT`] at once; each answer is the
/// JSON, or why there is none.
async fn ask_peers(
    client: Option<&reqwest::Client>,
    how: &Peers,
    peers: Vec<Peer>,
    path: &str,
) -> HashMap<String, Result<Value, String>> {
    futures_util::stream::iter(peers)
        .map(|peer| async move {
            let answer = match client {
                None => Err("no http client".to_string()),
                Some(client) => ask(client, &how.url(peer.addr, path)).await,
            };
            (peer.name, answer)
        })
        .buffer_unordered(FAN_OUT)
        .collect()
        .await
}

async fn ask(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    let response = client.get(url).send().await.map_err(|error| {
        if error.is_timeout() {
            "timed out".to_string()
        } else {
            "unreachable".to_string()
        }
    })?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("answered {}", status.as_u16()));
    }
    response
        .json()
        .await
        .map_err(|error| format!("unreadable answer: {error}"))
}

/// The peers gossip says are live, with the address they serve HTTP on.
async fn live_peers(node: &NodeStatus) -> Vec<Peer> {
    let Some(cluster) = node.cluster.as_ref() else {
        return Vec::new();
    };
    let (_, nodes) = cluster.view().await;
    nodes
        .into_iter()
        .filter(|seen| seen.live && seen.member.node_id != node.service_id)
        .filter_map(|seen| {
            Some(Peer {
                addr: seen.member.http_addr?,
                name: seen.member.node_id,
            })
        })
        .collect()
}

/// This node's own figures, as its `/diagnostic/summary` gives them to peers.
fn own_figures(node: &NodeStatus) -> Value {
    json!({
        "inflight": node.pool.inflight(),
        "queued": node.pool.queued(),
        "totals": node.metrics.totals(),
    })
}

fn uptime_seconds(started_at: Option<&str>, now: DateTime<Utc>) -> Option<i64> {
    let started = DateTime::parse_from_rfc3339(started_at?).ok()?;
    Some((now - started.with_timezone(&Utc)).num_seconds().max(0))
}

const TOTALS: [&str; 4] = ["accepted", "completed", "failed", "cancelled"];

async fn overview(state: State) -> Result<Response, ApiError> {
    let node = &state.node;
    // Checked while the peers are asked, not after them.
    let store_check = tokio::spawn({
        let node = Arc::clone(node);
        async move { node.store_problem().await }
    });
    let time = Utc::now();
    let mut rows: Vec<Value> = Vec::new();
    let leader;
    match node.cluster.as_ref() {
        None => {
            leader = Some(node.service_id.clone());
            let started = rfc3339(node.started_at);
            rows.push(json!({
                "name": node.service_id,
                "role": "leader",
                "live": true,
                "self": true,
                "version": crate::about::VERSION,
                "started_at": started,
                "uptime_s": uptime_seconds(Some(&started), time),
                "connection_string": node.peers.url(node.advertised, ""),
                "answered": true,
                "figures": own_figures(node),
            }));
        }
        Some(cluster) => {
            let (current, seen) = cluster.view().await;
            leader = current;
            let peers = seen
                .iter()
                .filter(|seen| seen.live && seen.member.node_id != node.service_id)
                .filter_map(|seen| {
                    Some(Peer {
                        addr: seen.member.http_addr?,
                        name: seen.member.node_id.clone(),
                    })
                })
                .collect();
            let mut answers = ask_peers(
                state.client.as_ref(),
                &node.peers,
                peers,
                "/diagnostic/summary",
            )
            .await;
            for seen in &seen {
                let member = &seen.member;
                let is_self = member.node_id == node.service_id;
                let answer = if is_self {
                    Ok(own_figures(node))
                } else if !seen.live {
                    Err("not live".to_string())
                } else {
                    answers
                        .remove(&member.node_id)
                        .unwrap_or_else(|| Err("no http address".to_string()))
                };
                let role = if leader.as_deref() == Some(member.node_id.as_str()) {
                    "leader"
                } else {
                    "follower"
                };
                let mut row = json!({
                    "name": member.node_id,
                    "role": role,
                    "live": seen.live,
                    "self": is_self,
                    "version": member.version,
                    "started_at": member.started_at,
                    "uptime_s": uptime_seconds(member.started_at.as_deref(), time),
                    "connection_string": member.http_addr.map(|addr| node.peers.url(addr, "")),
                    "last_activity": rfc3339(seen.last_seen),
                });
                match answer {
                    Ok(figures) => {
                        row["answered"] = json!(true);
                        row["figures"] = json!({
                            "inflight": figures["inflight"],
                            "queued": figures["queued"],
                            "totals": figures["totals"],
                        });
                    }
                    Err(problem) => {
                        row["answered"] = json!(false);
                        row["problem"] = json!(problem);
                    }
                }
                rows.push(row);
            }
        }
    }
    let mut totals: HashMap<&str, u64> = HashMap::new();
    for row in rows.iter().filter(|row| row["answered"] == json!(true)) {
        let figures = &row["figures"];
        for (name, value) in [
            ("inflight", &figures["inflight"]),
            ("queued", &figures["queued"]),
        ]
        .into_iter()
        .chain(TOTALS.iter().map(|name| (*name, &figures["totals"][*name])))
        {
            // Peers' figures: a huge one must not overflow the sum.
            let total = totals.entry(name).or_default();
            *total = total.saturating_add(value.as_u64().unwrap_or(0));
        }
    }
    let answered = rows
        .iter()
        .filter(|row| row["answered"] == json!(true))
        .count();
    let problem = store_check
        .await
        .unwrap_or_else(|error| Some(format!("store check failed: {error}")));
    let store = match problem {
        None => json!({ "status": "OK" }),
        Some(problem) => json!({ "status": "DEGRADED", "problem": problem }),
    };
    Ok(json_reply(
        StatusCode::OK,
        &json!({
            "generated_at": now(),
            "service_id": node.service_id,
            "auth_mode": if state.auth.checks_tokens() { "tokens" } else { "header" },
            "leader_name": leader,
            "nodes_count": rows.len(),
            "nodes_answered": answered,
            "totals": totals,
            "nodes": rows,
            "store": store,
        }),
    ))
}

async fn flow(state: State, query: HashMap<String, String>) -> Result<Response, ApiError> {
    only(&query, &["scope", "since"])?;
    let since = match query.get("since") {
        None => None,
        Some(value) => Some(
            value
                .parse::<i64>()
                .map_err(|_| ApiError::bad_request("since must be a Unix time in seconds"))?,
        ),
    };
    let cluster = match query.get("scope").map(String::as_str) {
        None | Some("node") => false,
        Some("cluster") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "scope must be `node` or `cluster`, not `{other}`"
            )))
        }
    };
    let mut view = state.node.metrics.flow().view(since);
    let mut missing = Vec::new();
    let mut answered = 1;
    if cluster {
        let path = match since {
            Some(since) => format!("/diagnostic/flow?since={since}"),
            None => "/diagnostic/flow".to_string(),
        };
        let peers = live_peers(&state.node).await;
        for (name, answer) in
            ask_peers(state.client.as_ref(), &state.node.peers, peers, &path).await
        {
            match answer.and_then(|value| {
                serde_json::from_value::<FlowView>(value).map_err(|error| error.to_string())
            }) {
                Ok(other) => {
                    view.merge(other);
                    answered += 1;
                }
                Err(problem) => missing.push(json!({ "name": name, "problem": problem })),
            }
        }
    }
    let steps: Vec<&str> = Step::WORK.iter().map(|step| step.as_str()).collect();
    Ok(json_reply(
        StatusCode::OK,
        &json!({
            "generated_at": now(),
            "scope": if cluster { "cluster" } else { "node" },
            "window_s": SECONDS,
            "latency_bounds_ms": LATENCY_BOUNDS_MS,
            "steps": steps,
            "nodes_answered": answered,
            "nodes_missing": missing,
            "now": view.now,
            "seconds": view.seconds,
        }),
    ))
}

/// What the console shows of an order in a list.
fn listed(order: &Order) -> Value {
    json!({
        "order_id": order.order_id,
        "user": order.user,
        "owner": order.owner,
        "current_step": order.current_step,
        "phase": order.phase,
        "start_time": rfc3339(order.start_time),
        "complete_time": order.complete_time.map(rfc3339),
        "failure": order.failure,
        "rollback_error": order.rollback_error,
        "pending_rollback": order.pending_rollback,
    })
}

async fn parked(
    state: State,
    credentials: Credentials,
    query: HashMap<String, String>,
) -> Result<Response, ApiError> {
    require_admin(&state.auth, &credentials, "/diagnostic/parked")?;
    only(&query, &["limit", "cursor"])?;
    let limit = limit(&query, DEFAULT_PARKED, MAX_PARKED)?;
    let cursor = query.get("cursor").map(String::as_str).unwrap_or("");
    if !cursor.is_empty() && OrderId::try_parse(cursor).is_err() {
        return Err(ApiError::bad_request("cursor is not one this route gave"));
    }
    let store = &state.node.store;
    let (ids, next) = store
        .parked_page(cursor, limit)
        .await
        .map_err(|error| ApiError::from_store(error, STORE_RETRY_AFTER))?;
    let mut orders = Vec::with_capacity(ids.len());
    for read in store.get_many(&ids).await {
        match read {
            Ok(Some(order)) if is_parked(&order) => orders.push(listed(&order)),
            Ok(_) => {}
            Err(error) => return Err(ApiError::from_store(error, STORE_RETRY_AFTER)),
        }
    }
    Ok(json_reply(
        StatusCode::OK,
        &json!({
            "generated_at": now(),
            "parked": orders,
            "next_cursor": next,
        }),
    ))
}

/// When anything last happened to an order: its start, a step's start, end or rollback, or an
/// attempt.
fn last_update(order: &Order) -> DateTime<Utc> {
    order
        .steps
        .iter()
        .flat_map(|entry| {
            [
                Some(entry.step_start_time),
                entry.step_complete_time,
                entry.step_rollback_time,
            ]
            .into_iter()
            .flatten()
            .chain(entry.attempts.iter().map(|attempt| attempt.at))
        })
        .chain([order.start_time])
        .max()
        .unwrap_or(order.start_time)
}

async fn stuck(
    state: State,
    credentials: Credentials,
    query: HashMap<String, String>,
) -> Result<Response, ApiError> {
    require_admin(&state.auth, &credentials, "/diagnostic/stuck")?;
    only(&query, &["limit", "older_than"])?;
    let limit = limit(&query, DEFAULT_STUCK, MAX_STUCK)?;
    let older_than = match query.get("older_than") {
        None => DEFAULT_OLDER_THAN,
        Some(value) => humantime::parse_duration(value)
            .map_err(|_| ApiError::bad_request("older_than must be a duration like 30s or 5m"))?,
    };
    let cutoff = chrono::Duration::from_std(older_than)
        .ok()
        .and_then(|older_than| Utc::now().checked_sub_signed(older_than))
        .ok_or_else(|| ApiError::bad_request("older_than is too long"))?;
    let node = &state.node;
    let mut owners = vec![node.service_id.clone()];
    if let Some(cluster) = node.cluster.as_ref() {
        let (_, seen) = cluster.view().await;
        owners.extend(
            seen.into_iter()
                .map(|seen| seen.member.node_id)
                .filter(|name| *name != node.service_id),
        );
    }
    let store = &node.store;
    let mut scanned = 0;
    let mut complete = true;
    let mut found: Vec<(DateTime<Utc>, Value)> = Vec::new();
    'owners: for owner in &owners {
        let mut cursor = String::new();
        loop {
            if scanned >= STUCK_SCAN {
                complete = false;
                break 'owners;
            }
            let page = STUCK_PAGE.min(STUCK_SCAN - scanned);
            let (ids, next) = store
                .owned_page(owner, &cursor, page)
                .await
                .map_err(|error| ApiError::from_store(error, STORE_RETRY_AFTER))?;
            scanned += ids.len();
            for read in store.get_many(&ids).await {
                let Ok(Some(order)) = read else { continue };
                let updated = last_update(&order);
                // Unfinished only: a finished order owing its webhook is retried on its own
                // schedule, and there is nothing left to cancel.
                if !order.is_finished() && updated < cutoff {
                    let mut entry = listed(&order);
                    entry["last_update"] = json!(rfc3339(updated));
                    entry["idle_s"] = json!((Utc::now() - updated).num_seconds());
                    entry["next_attempt_at"] = json!(order
                        .steps
                        .iter()
                        .filter_map(|entry| entry.next_attempt_at)
                        .max()
                        .map(rfc3339));
                    found.push((updated, entry));
                }
            }
            match next {
                Some(next) => cursor = next,
                None => break,
            }
        }
    }
    found.sort_by_key(|(updated, _)| *updated);
    let count = found.len();
    let stuck: Vec<Value> = found
        .into_iter()
        .take(limit)
        .map(|(_, entry)| entry)
        .collect();
    Ok(json_reply(
        StatusCode::OK,
        &json!({
            "generated_at": now(),
            "older_than_s": older_than.as_secs(),
            "scanned": scanned,
            "complete": complete,
            "count": count,
            "stuck": stuck,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_update_is_the_latest_time_the_order_records() {
        let start = Utc::now() - chrono::Duration::minutes(10);
        let mut order = Order::new(
            OrderId::new_v4(),
            "alice".into(),
            json!({}),
            "node".into(),
            start,
        );
        assert_eq!(last_update(&order), start);
        let later = start + chrono::Duration::minutes(3);
        order.steps[0].step_complete_time = Some(later);
        assert_eq!(last_update(&order), later);
    }

    #[test]
    fn uptime_is_counted_from_the_start() {
        let now = Utc::now();
        let started = rfc3339(now - chrono::Duration::seconds(90));
        assert_eq!(uptime_seconds(Some(&started), now), Some(90));
        assert_eq!(uptime_seconds(Some("soon"), now), None);
        assert_eq!(uptime_seconds(None, now), None);
    }
}
