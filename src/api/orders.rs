//! `/orders`: submit, read, list and cancel orders. Callers are named by the `Authorization`
//! header ([`super::auth`]) and see only their own orders; anything else is a 404, as if it did
//! not exist. An admin may also read and list anyone's orders and retry anyone's parked
//! rollback; each such action is an `audit` log line.

use super::auth::{audit, Principal};
use super::limits::{body, nests_deeper_than, Body};
use super::{json_reply, respond, with_state, ApiError, State};
use crate::order::{CreatedView, Order, OrderId, OrderView, RollbackState, Step};
use crate::pipeline::Job;
use crate::store::{CancelOutcome, Created, ListQuery, RetryRollbackOutcome};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::time::Duration;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Filter;

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;
/// The longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY: usize = 256;

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    create(state.clone())
        .or(list(state.clone()))
        .unify()
        .or(get(state.clone()))
        .unify()
        .or(cancel(state.clone()))
        .unify()
        .or(retry_rollback(state.clone()))
        .unify()
        .or(wait_many(state))
        .unify()
        .boxed()
}

fn user_header() -> impl Filter<Extract = (Option<String>,), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("authorization")
}

fn create(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("orders")
        .and(warp::post())
        .and(with_state(state))
        .and(user_header())
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(body())
        .then(|state, user, key, body| async move {
            respond(create_order(state, user, key, body).await)
        })
        .boxed()
}

async fn create_order(
    state: State,
    user_header: Option<String>,
    idempotency_key: Option<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = state.security.auth.authenticate(user_header.as_deref())?;
    if let Err(wait) = state.security.rate.check(&caller.user) {
        return Err(ApiError::too_many("too many submissions, slow down", wait));
    }
    let body = body
        .read(state.max_body_bytes, state.security.body_read_timeout)
        .await?;
    let max_depth = state.security.max_depth;
    if nests_deeper_than(&body, max_depth) {
        return Err(ApiError::bad_request(format!(
            "body nests arrays or objects deeper than {max_depth} levels"
        )));
    }
    let payload: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|error| ApiError::bad_request(format!("body is not valid JSON: {error}")))?;
    if !payload.is_object() {
        return Err(ApiError::bad_request("body must be a JSON object"));
    }
    let idempotency_key = idempotency_key
        .map(|key| key.trim().to_string())
        .filter(|key| !key.is_empty());
    if idempotency_key
        .as_ref()
        .is_some_and(|key| key.len() > MAX_IDEMPOTENCY_KEY)
    {
        return Err(ApiError::bad_request(format!(
            "Idempotency-Key longer than {MAX_IDEMPOTENCY_KEY} bytes"
        )));
    }
    let Some(admission) = state
        .security
        .in_flight
        .admit(&caller.user, |id| state.pool.is_active(id))
    else {
        return Err(ApiError::too_many(
            "too many unfinished orders for this user on this node, try again later",
            state.retry_after,
        ));
    };
    // Reserve the queue slot first: when the node is full or stopping, nothing is stored.
    let Some(slot) = state.pool.try_reserve() else {
        let reason = if state.pool.is_stopping() {
            "node is shutting down"
        } else {
            "too many orders in progress, try again later"
        };
        return Err(ApiError::overloaded(reason, state.retry_after));
    };
    let order = Order::new(
        OrderId::now_v7(),
        caller.user,
        payload,
        state.service_id.clone(),
        chrono::Utc::now(),
    );
    match state
        .store
        .create(&order, idempotency_key.as_deref())
        .await
        .map_err(|error| ApiError::from_store(error, state.retry_after))?
    {
        Created::New => {
            tracing::debug!(order_id = %order.order_id, user = %order.user, "new order created");
            tracing::trace!(order_id = %order.order_id, payload = %order.payload, "new order payload");
            let view = CreatedView::from(&order);
            state.metrics.order_accepted();
            let order_id = order.order_id;
            slot.send(Job::New(Box::new(order)));
            admission.created(order_id);
            Ok(json_reply(StatusCode::CREATED, &view))
        }
        Created::Adopted(order) => {
            tracing::debug!(order_id = %order.order_id, user = %order.user, "new order created under the id its key reserved");
            let view = CreatedView::from(order.as_ref());
            state.metrics.order_accepted();
            let order_id = order.order_id;
            slot.send(Job::New(order));
            admission.created(order_id);
            Ok(json_reply(StatusCode::CREATED, &view))
        }
        Created::Existing(first) => Ok(json_reply(
            StatusCode::OK,
            &CreatedView::from(first.as_ref()),
        )),
    }
}

fn get(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("orders" / String)
        .and(warp::get())
        .and(with_state(state))
        .and(user_header())
        .and(warp::query::<HashMap<String, String>>())
        .then(|id: String, state, user, query| async move {
            respond(get_order(state, user, id, query).await)
        })
        .boxed()
}

/// The most orders one `POST /orders/wait` may name.
const MAX_WAIT_IDS: usize = 500;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitRequest {
    order_ids: Vec<String>,
    /// How long to wait at most, e.g. `30s` (default), at most 60 s.
    #[serde(default)]
    wait: Option<String>,
}

fn wait_many(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("orders" / "wait")
        .and(warp::post())
        .and(with_state(state))
        .and(user_header())
        .and(warp::body::content_length_limit(64 * 1024))
        .and(warp::body::bytes())
        .then(|state, user, body| async move { respond(wait_for_many(state, user, body).await) })
        .boxed()
}

/// `POST /orders/wait {"order_ids": [...], "wait": "30s"}`: a long poll for many orders at
/// once. Answers once every named order is finished, or when the wait is over, with the
/// finished ones in `orders`, the rest in `pending`, and ids that are not the caller's orders
/// in `missing`.
async fn wait_for_many(
    state: State,
    user_header: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let caller = state.security.auth.authenticate(user_header.as_deref())?;
    let request: WaitRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "body must be {{\"order_ids\": [...], \"wait\": \"30s\"}}: {error}"
        ))
    })?;
    if request.order_ids.len() > MAX_WAIT_IDS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_WAIT_IDS} order_ids"
        )));
    }
    let wait = match request.wait.as_deref() {
        None => Duration::from_secs(30),
        Some(text) => humantime::parse_duration(text)
            .ok()
            .filter(|wait| *wait <= MAX_WAIT)
            .ok_or_else(|| {
                ApiError::bad_request("wait must be a duration like 30s, at most 60s")
            })?,
    };
    let mut missing = Vec::new();
    let mut ids = Vec::new();
    for text in &request.order_ids {
        match OrderId::try_parse(text) {
            Ok(id) if !ids.contains(&id) => ids.push(id),
            Ok(_) => {}
            Err(_) => missing.push(text.clone()),
        }
    }
    // Registered before the first read, so a finish in between is not missed.
    let waiters = state.pool.waiters();
    let mut woken: futures_util::stream::FuturesUnordered<_> = ids
        .iter()
        .map(|id| {
            let done_rx = waiters.register(*id);
            let id = *id;
            async move { (id, done_rx.await) }
        })
        .collect();
    let deadline = tokio::time::Instant::now() + wait;
    let mut finished: Vec<std::sync::Arc<Order>> = Vec::new();
    let mut pending: Vec<OrderId> = ids.clone();
    let mut outcome = Ok(());
    let mut first = true;
    while !pending.is_empty() {
        if !first {
            let recheck = deadline.min(tokio::time::Instant::now() + WAIT_RECHECK);
            // Handed finished orders as they end on this node; the rest (running elsewhere, or
            // finished between registration and the first read) are read again now and then.
            tokio::select! {
                Some((id, Ok(order))) = woken.next() => {
                    if may_see(&caller, &order) {
                        if let Some(position) = pending.iter().position(|pending| *pending == id) {
                            pending.swap_remove(position);
                            finished.push(order);
                        }
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(recheck) => {}
            }
        }
        first = false;
        let reads =
            futures_util::future::join_all(pending.iter().map(|id| state.store.get(*id))).await;
        let mut still = Vec::new();
        for (id, read) in pending.iter().zip(reads) {
            match read {
                Ok(Some(order)) if may_see(&caller, &order) => {
                    if order.is_finished() {
                        finished.push(std::sync::Arc::new(order));
                    } else {
                        still.push(*id);
                    }
                }
                Ok(_) => missing.push(id.to_string()),
                Err(error) => {
                    outcome = Err(ApiError::from_store(error, state.retry_after));
                    still.push(*id);
                }
            }
        }
        pending = still;
        if outcome.is_err() || tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    drop(woken);
    for id in &ids {
        waiters.prune(*id);
    }
    outcome?;
    let orders: Vec<OrderView<'_>> = finished
        .iter()
        .map(|order| OrderView::from(order.as_ref()))
        .collect();
    Ok(json_reply(
        StatusCode::OK,
        &serde_json::json!({ "orders": orders, "pending": pending, "missing": missing }),
    ))
}

/// The longest `?wait=` a long poll may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// How often a long poll re-reads the store, for orders that finish on another node.
const WAIT_RECHECK: Duration = Duration::from_millis(250);

pub(super) fn parse_wait(params: &HashMap<String, String>) -> Result<Option<Duration>, ApiError> {
    for key in params.keys() {
        if key != "wait" {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter `{key}`"
            )));
        }
    }
    params
        .get("wait")
        .map(|text| {
            humantime::parse_duration(text)
                .ok()
                .filter(|wait| *wait <= MAX_WAIT)
                .ok_or_else(|| {
                    ApiError::bad_request("wait must be a duration like 30s, at most 60s")
                })
        })
        .transpose()
}

/// Whether the caller may see an order: their own, or any for an admin.
fn may_see(caller: &Principal, order: &Order) -> bool {
    order.user == caller.user || caller.is_admin()
}

/// Loads an order the caller may see (its own, or any for an admin); anything else is a 404.
async fn owned_order(state: &State, caller: &Principal, id: &str) -> Result<Order, ApiError> {
    let id = OrderId::try_parse(id).map_err(|_| ApiError::not_found())?;
    state
        .store
        .get(id)
        .await
        .map_err(|error| ApiError::from_store(error, state.retry_after))?
        .filter(|order| may_see(caller, order))
        .ok_or_else(ApiError::not_found)
}

/// `GET /orders/{id}`; with `?wait=30s` the answer waits until the order is finished (or the
/// wait is over), so a client learns of the end without polling.
async fn get_order(
    state: State,
    user_header: Option<String>,
    id: String,
    params: HashMap<String, String>,
) -> Result<Response, ApiError> {
    if id == "wait" {
        // `/orders/wait` is the batch long poll, which only takes POST.
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed on this path",
        ));
    }
    let caller = state.security.auth.authenticate(user_header.as_deref())?;
    let wait = parse_wait(&params)?;
    let Some(wait) = wait else {
        let order = owned_order(&state, &caller, &id).await?;
        if order.user != caller.user {
            audit(&caller.user, caller.role.as_str(), "read order", &id);
        }
        return Ok(json_reply(StatusCode::OK, &OrderView::from(&order)));
    };
    let order_id = OrderId::try_parse(&id).map_err(|_| ApiError::not_found())?;
    // Registered before the first read, so a finish in between is not missed.
    let waiters = state.pool.waiters();
    let mut done_rx = waiters.register(order_id);
    let answer = wait_finished(&state, &caller, &id, wait, &mut done_rx).await;
    drop(done_rx);
    waiters.prune(order_id);
    let order = answer?;
    Ok(json_reply(StatusCode::OK, &OrderView::from(order.as_ref())))
}

/// The order once it is finished, or as it is when `wait` is over.
async fn wait_finished(
    state: &State,
    caller: &Principal,
    id: &str,
    wait: Duration,
    done_rx: &mut tokio::sync::oneshot::Receiver<std::sync::Arc<Order>>,
) -> Result<std::sync::Arc<Order>, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut order = std::sync::Arc::new(owned_order(state, caller, id).await?);
    let mut woken = false;
    while !order.is_finished() && tokio::time::Instant::now() < deadline {
        // Handed the finished order when it ends on this node; otherwise re-read now and then,
        // since it may be running on another node.
        let recheck = deadline.min(tokio::time::Instant::now() + WAIT_RECHECK);
        let finished = tokio::select! {
            finished = &mut *done_rx, if !woken => {
                woken = true;
                finished.ok()
            }
            _ = tokio::time::sleep_until(recheck) => None,
        };
        order = match finished {
            Some(finished) if may_see(caller, &finished) => finished,
            _ => std::sync::Arc::new(owned_order(state, caller, id).await?),
        };
    }
    Ok(order)
}

fn list(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("orders")
        .and(warp::get())
        .and(with_state(state))
        .and(user_header())
        .and(warp::query::<HashMap<String, String>>())
        .then(|state, user, query| async move { respond(list_orders(state, user, query).await) })
        .boxed()
}

pub(super) fn parse_list_query(params: &HashMap<String, String>) -> Result<ListQuery, ApiError> {
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=MAX_LIMIT).contains(&limit) => limit,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "limit must be a number from 1 to {MAX_LIMIT}"
                )))
            }
        },
    };
    let current_step = params
        .get("current_step")
        .map(|text| text.parse::<Step>())
        .transpose()
        .map_err(|error| ApiError::bad_request(error.to_string()))?;
    let rollback_state = match params.get("rollback_state").map(String::as_str) {
        None => None,
        Some("incomplete") => Some(RollbackState::Incomplete),
        Some("complete") => Some(RollbackState::Complete),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "rollback_state must be `incomplete` or `complete`, not `{other}`"
            )))
        }
    };
    let cursor = params.get("cursor").cloned();
    if cursor
        .as_deref()
        .is_some_and(|cursor| crate::store::decode_cursor(cursor).is_none())
    {
        return Err(ApiError::bad_request("invalid cursor"));
    }
    for key in params.keys() {
        if !matches!(
            key.as_str(),
            "limit" | "cursor" | "current_step" | "rollback_state" | "user"
        ) {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter `{key}`"
            )));
        }
    }
    Ok(ListQuery {
        limit,
        cursor,
        current_step,
        rollback_state,
    })
}

async fn list_orders(
    state: State,
    user_header: Option<String>,
    params: HashMap<String, String>,
) -> Result<Response, ApiError> {
    let caller = state.security.auth.authenticate(user_header.as_deref())?;
    let query = parse_list_query(&params)?;
    // `?user=<name>`: an admin lists another user's orders.
    let user = match params.get("user") {
        Some(user) if *user != caller.user => {
            caller.require_admin("listing another user's orders")?;
            audit(&caller.user, caller.role.as_str(), "list orders", user);
            user.clone()
        }
        _ => caller.user,
    };
    let page = state
        .store
        .list_for_user(&user, &query)
        .await
        .map_err(|error| ApiError::from_store(error, state.retry_after))?;
    let orders: Vec<OrderView<'_>> = page.orders.iter().map(OrderView::from).collect();
    Ok(json_reply(
        StatusCode::OK,
        &serde_json::json!({ "orders": orders, "next_cursor": page.next_cursor }),
    ))
}

fn cancel(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("orders" / String / "cancel")
        .and(warp::post())
        .and(with_state(state))
        .and(user_header())
        .then(|id: String, state, user| async move { respond(cancel_order(state, user, id).await) })
        .boxed()
}

async fn cancel_order(
    state: State,
    user_header: Option<String>,
    id: String,
) -> Result<Response, ApiError> {
    let caller = state.security.auth.authenticate(user_header.as_deref())?;
    let id = OrderId::try_parse(&id).map_err(|_| ApiError::not_found())?;
    let outcome = state
        .store
        .request_cancel(id, &caller.user)
        .await
        .map_err(|error| ApiError::from_store(error, state.retry_after))?;
    match outcome {
        CancelOutcome::Accepted(order) => {
            state.pool.note_cancel(order.order_id);
            tracing::debug!(order_id = %order.order_id, "cancellation requested");
            Ok(json_reply(StatusCode::ACCEPTED, &OrderView::from(&order)))
        }
        CancelOutcome::Finished(_) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "order is already finished",
        )),
        CancelOutcome::AlreadyFailing(_) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "order already failed and is rolling back",
        )),
    }
}

fn retry_rollback(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("orders" / String / "rollback")
        .and(warp::post())
        .and(with_state(state))
        .and(user_header())
        .then(|id: String, state, user| async move {
            respond(retry_parked_rollback(state, user, id).await)
        })
        .boxed()
}

/// Retries the compensations of an order whose rollback is parked; this node runs them. The
/// order's user may ask, and so may an admin for anyone's order.
async fn retry_parked_rollback(
    state: State,
    user_header: Option<String>,
    id: String,
) -> Result<Response, ApiError> {
    let caller = state.security.auth.authenticate(user_header.as_deref())?;
    let user = if caller.is_admin() {
        let order = owned_order(&state, &caller, &id).await?;
        audit(
            &caller.user,
            caller.role.as_str(),
            "retry parked rollback",
            &id,
        );
        order.user
    } else {
        caller.user
    };
    let id = OrderId::try_parse(&id).map_err(|_| ApiError::not_found())?;
    if state.pool.is_stopping() {
        return Err(ApiError::overloaded(
            "node is shutting down",
            state.retry_after,
        ));
    }
    let outcome = state
        .store
        .retry_rollback(id, &user, &state.service_id, chrono::Utc::now())
        .await
        .map_err(|error| ApiError::from_store(error, state.retry_after))?;
    match outcome {
        RetryRollbackOutcome::Accepted(order) => {
            let pending: Vec<&str> = order.pending_rollback.iter().map(|step| step.as_str()).collect();
            tracing::info!(order_id = %order.order_id, pending = %pending.join(", "), "retrying parked rollback");
            state.pool.resume_all(vec![order.order_id]);
            Ok(json_reply(StatusCode::ACCEPTED, &OrderView::from(&order)))
        }
        RetryRollbackOutcome::NotParked(_) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "order's rollback is not parked: only a failed order with rollback_state incomplete can retry it",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn list_query_defaults_and_bounds() {
        assert_eq!(parse_list_query(&params(&[])).unwrap().limit, DEFAULT_LIMIT);
        assert_eq!(
            parse_list_query(&params(&[("limit", "500")]))
                .unwrap()
                .limit,
            500
        );
        for bad in ["0", "501", "-1", "ten"] {
            assert!(
                parse_list_query(&params(&[("limit", bad)])).is_err(),
                "{bad}"
            );
        }
        assert!(parse_list_query(&params(&[("current_step", "Shipping")])).is_err());
        assert!(parse_list_query(&params(&[("cursor", "nope")])).is_err());
        assert!(parse_list_query(&params(&[("sort", "asc")])).is_err());
        assert_eq!(
            parse_list_query(&params(&[("current_step", "Failed")]))
                .unwrap()
                .current_step,
            Some(Step::Failed)
        );
        assert_eq!(
            parse_list_query(&params(&[("rollback_state", "incomplete")]))
                .unwrap()
                .rollback_state,
            Some(RollbackState::Incomplete)
        );
        assert!(parse_list_query(&params(&[("rollback_state", "parked")])).is_err());
    }
}
