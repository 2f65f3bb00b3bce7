//! `/orders`: submit, read, list and cancel orders. Callers are named by the `Authorization`
//! header and see only their own orders; anything else is a 404, as if it did not exist.

use super::{json_reply, respond, with_state, ApiError, State};
use crate::order::{CreatedView, Order, OrderId, OrderView, RollbackState, Step};
use crate::pipeline::Job;
use crate::store::{CancelOutcome, Created, ListQuery, RetryRollbackOutcome};
use bytes::{Buf, BytesMut};
use futures_util::{Stream, StreamExt};
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
        .or(retry_rollback(state))
        .unify()
        .boxed()
}

fn user_header() -> impl Filter<Extract = (Option<String>,), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("authorization")
}

/// The caller's user name: the `Authorization` header, which must not be empty.
fn user(header: Option<String>) -> Result<String, ApiError> {
    header
        .map(|value| value.trim().to_string())
        .filter(|value| !value.is_empty())
        .ok_or_else(ApiError::unauthorized)
}

fn create(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("orders")
        .and(warp::post())
        .and(with_state(state))
        .and(user_header())
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(warp::body::stream())
        .then(|state, user, key, body| async move {
            respond(create_order(state, user, key, body).await)
        })
        .boxed()
}

/// Reads at most `limit` bytes of body; more is a 413.
async fn read_body<S, B>(body: S, limit: u64) -> Result<BytesMut, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut collected = BytesMut::new();
    futures_util::pin_mut!(body);
    while let Some(chunk) = body.next().await {
        let mut chunk =
            chunk.map_err(|error| ApiError::bad_request(format!("cannot read body: {error}")))?;
        if (collected.len() + chunk.remaining()) as u64 > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {limit} bytes"),
            ));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let length = part.len();
            collected.extend_from_slice(part);
            chunk.advance(length);
        }
    }
    Ok(collected)
}

async fn create_order<S, B>(
    state: State,
    user_header: Option<String>,
    idempotency_key: Option<String>,
    body: S,
) -> Result<Response, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let user = user(user_header)?;
    let body = read_body(body, state.max_body_bytes).await?;
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
        OrderId::new_v4(),
        user,
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
            let view = CreatedView::from(&order);
            slot.send(Job::New(order));
            Ok(json_reply(StatusCode::CREATED, &view))
        }
        Created::Adopted(order) => {
            tracing::debug!(order_id = %order.order_id, user = %order.user, "new order created under the id its key reserved");
            let view = CreatedView::from(order.as_ref());
            slot.send(Job::New(*order));
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

/// The longest `?wait=` a long poll may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// How often a long poll re-reads the store, for orders that finish on another node.
const WAIT_RECHECK: Duration = Duration::from_millis(250);

fn parse_wait(params: &HashMap<String, String>) -> Result<Option<Duration>, ApiError> {
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

/// Loads an order the caller may see; anything else is a 404.
async fn owned_order(state: &State, user: &str, id: &str) -> Result<Order, ApiError> {
    let id = OrderId::try_parse(id).map_err(|_| ApiError::not_found())?;
    state
        .store
        .get(id)
        .await
        .map_err(|error| ApiError::from_store(error, state.retry_after))?
        .filter(|order| order.user == user)
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
    let user = user(user_header)?;
    let wait = parse_wait(&params)?;
    let order = owned_order(&state, &user, &id).await?;
    let Some(wait) = wait.filter(|_| !order.is_finished()) else {
        return Ok(json_reply(StatusCode::OK, &OrderView::from(&order)));
    };
    let deadline = tokio::time::Instant::now() + wait;
    let order_id = order.order_id;
    let mut done_rx = state.pool.waiters().register(order_id);
    let order = loop {
        // Woken when the order finishes here; otherwise re-read now and then, since it may be
        // running on another node.
        let woke = tokio::select! {
            _ = &mut done_rx => true,
            _ = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + WAIT_RECHECK)) => false,
        };
        let current = owned_order(&state, &user, &id).await?;
        if current.is_finished() || tokio::time::Instant::now() >= deadline {
            break current;
        }
        if woke {
            done_rx = state.pool.waiters().register(order_id);
        }
    };
    drop(done_rx);
    state.pool.waiters().prune(order_id);
    Ok(json_reply(StatusCode::OK, &OrderView::from(&order)))
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

fn parse_list_query(params: &HashMap<String, String>) -> Result<ListQuery, ApiError> {
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
            "limit" | "cursor" | "current_step" | "rollback_state"
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
    let user = user(user_header)?;
    let query = parse_list_query(&params)?;
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
    let user = user(user_header)?;
    let id = OrderId::try_parse(&id).map_err(|_| ApiError::not_found())?;
    let outcome = state
        .store
        .request_cancel(id, &user)
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

/// Retries the compensations of an order whose rollback is parked; this node runs them.
async fn retry_parked_rollback(
    state: State,
    user_header: Option<String>,
    id: String,
) -> Result<Response, ApiError> {
    let user = user(user_header)?;
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
