//! `/orders`: submit, read, list, cancel and wait for orders, over the order service
//! ([`Orders`]). Callers are named by the `Authorization` header ([`super::auth`]) and see only
//! their own orders; anything else is a 404, as if it did not exist. An admin may also read and
//! list anyone's orders and retry anyone's parked rollback; each such action is an `audit` log
//! line. The submission rate, the body's size, read time and nesting are checked here, before
//! the service sees the order.

use super::auth::{audit, credentials, Credentials, Principal};
use super::limits::{body, nests_deeper_than, Body};
use super::state::{with_state, Checks};
use super::{
    json_reply, order_reply, raw_header, respond, written_reply, ApiError, ANSWER_CAPACITY,
};
use crate::order::{write_view, Order, OrderId, RollbackState, Step};
use crate::service::{NewOrder, Orders, Scope};
use crate::store::ListQuery;
use crate::trace::TraceContext;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Filter;

/// What an order handler answers: the reply, or the error as JSON.
type Answer = Result<Response, ApiError>;

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;
/// The most orders one `POST /orders/wait` may name.
const MAX_WAIT_IDS: usize = 500;
/// The longest `?wait=` a long poll may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// How long `POST /orders/wait` waits when the request does not say.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// The largest `POST /orders/wait` body: [`MAX_WAIT_IDS`] ids take some 20 KB.
const MAX_WAIT_BODY: u64 = 64 * 1024;

/// What the `/orders` handlers need: the service, and the checks made before calling it.
pub struct OrdersApi {
    pub orders: Arc<dyn Orders>,
    pub checks: Arc<Checks>,
}

type State = Arc<OrdersApi>;

impl OrdersApi {
    fn caller(&self, credentials: &Credentials) -> Result<Principal, ApiError> {
        self.checks.auth.caller(credentials)
    }
}

/// Whose orders a caller may see: their own, or anyone's for an admin.
fn scope(caller: &Principal) -> Scope<'_> {
    if caller.is_admin() {
        Scope::All
    } else {
        Scope::User(&caller.user)
    }
}

/// An order id from the path; a malformed one is a 404, like an unknown one.
fn order_id(id: &str) -> Result<OrderId, ApiError> {
    OrderId::try_parse(id).map_err(|_| ApiError::not_found())
}

/// The busiest first: creating, and waiting for, orders.
pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    create(state.clone())
        .or(wait_many(state.clone()))
        .unify()
        .or(list(state.clone()))
        .unify()
        .or(get(state.clone()))
        .unify()
        .or(order_action(state.clone(), "cancel", cancel_order))
        .unify()
        .or(order_action(
            state.clone(),
            "rollback",
            retry_parked_rollback,
        ))
        .unify()
        .or(order_action(state, "notification", redeliver_webhook))
        .unify()
        .boxed()
}

fn create(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("orders")
        .and(warp::post())
        .and(with_state(state))
        .and(credentials())
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(raw_header("traceparent"))
        .and(raw_header("tracestate"))
        .and(body())
        .then(
            |state, user, key, traceparent, tracestate, body| async move {
                let caller = caller_trace(traceparent, tracestate);
                respond(create_order(state, user, key, caller, body).await)
            },
        )
        .boxed()
}

/// The caller's trace context, if its `traceparent` is a valid one.
fn caller_trace(
    traceparent: Option<warp::http::HeaderValue>,
    tracestate: Option<warp::http::HeaderValue>,
) -> Option<TraceContext> {
    let traceparent = traceparent?;
    let tracestate = tracestate.as_ref().and_then(|value| value.to_str().ok());
    TraceContext::parse(traceparent.to_str().ok()?, tracestate)
}

async fn create_order(
    state: State,
    credentials: Credentials,
    idempotency_key: Option<String>,
    caller_trace: Option<TraceContext>,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = state.caller(&credentials)?;
    let checks = &state.checks;
    if let Err(wait) = checks.rate.check(&caller.user) {
        return Err(ApiError::too_many("too many submissions, slow down", wait));
    }
    let body = body
        .read(checks.max_body_bytes, checks.body_read_timeout)
        .await?;
    let max_depth = checks.max_depth;
    if nests_deeper_than(&body, max_depth) {
        return Err(ApiError::bad_request(format!(
            "body nests arrays or objects deeper than {max_depth} levels"
        )));
    }
    let payload: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|error| ApiError::bad_request(format!("body is not valid JSON: {error}")))?;
    let (trace, mut submission) = crate::trace::spans::submission(caller_trace);
    let submitted = state
        .orders
        .submit(NewOrder {
            user: caller.user,
            payload,
            idempotency_key,
            trace: Some(trace),
        })
        .await?;
    submission.note_order(submitted.order.order_id);
    let status = if submitted.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json_reply(status, &submitted.order))
}

fn get(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("orders" / String)
        .and(warp::get())
        .and(with_state(state))
        .and(credentials())
        .and(warp::query::<HashMap<String, String>>())
        .then(|id: String, state, user, query| async move {
            respond(get_order(state, user, id, query).await)
        })
        .boxed()
}

/// `GET /orders/{id}`; with `?wait=30s` the answer waits until the order is finished (or the
/// wait is over), so a client learns of the end without polling.
async fn get_order(
    state: State,
    credentials: Credentials,
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
    let caller = state.caller(&credentials)?;
    let wait = parse_wait(&params)?;
    let order_id = order_id(&id)?;
    let Some(wait) = wait else {
        let order = state.orders.get(scope(&caller), order_id).await?;
        if order.user != caller.user {
            audit(
                &caller.user,
                caller.role.as_str(),
                "read order",
                &order_id.to_string(),
            );
        }
        return Ok(order_reply(StatusCode::OK, &order));
    };
    let order = state
        .orders
        .wait_one(scope(&caller), order_id, wait)
        .await?;
    if order.user != caller.user {
        audit(
            &caller.user,
            caller.role.as_str(),
            "read order",
            &order_id.to_string(),
        );
    }
    Ok(order_reply(StatusCode::OK, &order))
}

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
        .and(credentials())
        .and(body())
        .then(|state, user, body| async move { respond(wait_for_many(state, user, body).await) })
        .boxed()
}

/// `POST /orders/wait {"order_ids": [...], "wait": "30s"}`: a long poll for many orders at
/// once. Answers once every named order is finished, or when the wait is over, with the
/// finished ones in `orders`, the rest in `pending`, and ids that are not the caller's orders
/// in `missing`: in their standard form, as `order_id` shows them, but for text that is not a
/// UUID, which is given back as it came.
async fn wait_for_many(
    state: State,
    credentials: Credentials,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = state.caller(&credentials)?;
    let body = body
        .read(MAX_WAIT_BODY, state.checks.body_read_timeout)
        .await?;
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
        None => DEFAULT_WAIT,
        Some(text) => parse_duration(text)?,
    };
    let mut missing = Vec::new();
    let mut ids = Vec::new();
    for text in request.order_ids {
        match OrderId::try_parse(&text) {
            Ok(id) => ids.push(id),
            Err(_) => missing.push(text),
        }
    }
    let waited = state.orders.wait_many(scope(&caller), ids, wait).await?;
    for order in waited
        .finished
        .iter()
        .filter(|order| order.user != caller.user)
    {
        audit(
            &caller.user,
            caller.role.as_str(),
            "read order",
            &order.order_id.to_string(),
        );
    }
    // An order still pending is known to exist, and whose it is is not read here: an admin's
    // wait on one is audited whoever's it is.
    if caller.is_admin() {
        for id in &waited.pending {
            audit(
                &caller.user,
                caller.role.as_str(),
                "wait for order",
                &id.to_string(),
            );
        }
    }
    missing.extend(waited.missing.iter().map(OrderId::to_string));
    let capacity = ANSWER_CAPACITY * waited.finished.len().max(1);
    Ok(written_reply(StatusCode::OK, capacity, |body| {
        write_wait_answer(body, &waited.finished, &waited.pending, &missing)
    }))
}

/// The answer to `POST /orders/wait`: `{"orders": [views], "pending": [ids], "missing":
/// [ids]}`.
fn write_wait_answer(
    body: &mut Vec<u8>,
    finished: &[Arc<Order>],
    pending: &[OrderId],
    missing: &[String],
) -> Result<(), serde_json::Error> {
    body.extend_from_slice(b"{\"orders\":");
    write_views(body, finished.iter().map(Arc::as_ref))?;
    body.extend_from_slice(b",\"pending\":");
    serde_json::to_writer(&mut *body, pending)?;
    body.extend_from_slice(b",\"missing\":");
    serde_json::to_writer(&mut *body, missing)?;
    body.push(b'}');
    Ok(())
}

/// The answer to `GET /orders`: `{"next_cursor": cursor or null, "orders": [views]}`.
fn write_page(
    body: &mut Vec<u8>,
    orders: &[Order],
    next_cursor: Option<&str>,
) -> Result<(), serde_json::Error> {
    body.extend_from_slice(b"{\"next_cursor\":");
    serde_json::to_writer(&mut *body, &next_cursor)?;
    body.extend_from_slice(b",\"orders\":");
    write_views(body, orders.iter())?;
    body.push(b'}');
    Ok(())
}

/// A JSON array of the orders' views.
fn write_views<'a>(
    body: &mut Vec<u8>,
    orders: impl Iterator<Item = &'a Order>,
) -> Result<(), serde_json::Error> {
    body.push(b'[');
    for (index, order) in orders.enumerate() {
        if index > 0 {
            body.push(b',');
        }
        write_view(body, order)?;
    }
    body.push(b']');
    Ok(())
}

/// A wait such as `30s`, at most [`MAX_WAIT`].
fn parse_duration(text: &str) -> Result<Duration, ApiError> {
    humantime::parse_duration(text)
        .ok()
        .filter(|wait| *wait <= MAX_WAIT)
        .ok_or_else(|| ApiError::bad_request("wait must be a duration like 30s, at most 60s"))
}

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
        .map(|text| parse_duration(text))
        .transpose()
}

fn list(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("orders")
        .and(warp::get())
        .and(with_state(state))
        .and(credentials())
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
    credentials: Credentials,
    params: HashMap<String, String>,
) -> Result<Response, ApiError> {
    let caller = state.caller(&credentials)?;
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
    let page = state.orders.list(&user, &query).await?;
    let capacity = ANSWER_CAPACITY * page.orders.len().max(1);
    Ok(written_reply(StatusCode::OK, capacity, |body| {
        write_page(body, &page.orders, page.next_cursor.as_deref())
    }))
}

/// `POST /orders/{id}/<action>`, answered by `handle` with the state, the caller's
/// credentials and the id as given.
fn order_action<H, F>(state: State, action: &'static str, handle: H) -> BoxedFilter<(Response,)>
where
    H: Fn(State, Credentials, String) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response, ApiError>> + Send + 'static,
{
    warp::path("orders")
        .and(warp::path::param::<String>())
        .and(warp::path(action))
        .and(warp::path::end())
        .and(warp::post())
        .and(with_state(state))
        .and(credentials())
        .then(move |id: String, state, user| {
            let answer = handle(state, user, id);
            async move { respond(answer.await) }
        })
        .boxed()
}

/// Cancels an unfinished order. The order's user may ask, and so may an admin for anyone's order
/// (the console's list of stuck orders has a button for it).
async fn cancel_order(state: State, credentials: Credentials, id: String) -> Answer {
    let caller = state.caller(&credentials)?;
    let order_id = order_id(&id)?;
    let user = owner_for(&state, &caller, order_id, "cancel order").await?;
    let order = state.orders.cancel(&user, order_id).await?;
    Ok(order_reply(StatusCode::ACCEPTED, &order))
}

/// The user an action on order `id` is taken for: the caller's own name, or for an admin the
/// order's user (audited as `action` when that is another user).
async fn owner_for(
    state: &State,
    caller: &Principal,
    order_id: OrderId,
    action: &str,
) -> Result<String, ApiError> {
    if !caller.is_admin() {
        return Ok(caller.user.clone());
    }
    let order = state.orders.get(Scope::All, order_id).await?;
    if order.user != caller.user {
        audit(
            &caller.user,
            caller.role.as_str(),
            action,
            &order_id.to_string(),
        );
    }
    Ok(order.user)
}

/// Retries the compensations of an order whose rollback is parked; this node runs them. The
/// order's user may ask, and so may an admin for anyone's order.
async fn retry_parked_rollback(state: State, credentials: Credentials, id: String) -> Answer {
    let caller = state.caller(&credentials)?;
    let order_id = order_id(&id)?;
    let user = owner_for(&state, &caller, order_id, "retry parked rollback").await?;
    let order = state.orders.retry_rollback(&user, order_id).await?;
    Ok(order_reply(StatusCode::ACCEPTED, &order))
}

/// Sends the completion webhook of a finished order again, once every attempt at it failed
/// (its receiver was down longer than its retries); this node sends it. The order's user may
/// ask, and so may an admin for anyone's order.
async fn redeliver_webhook(state: State, credentials: Credentials, id: String) -> Answer {
    let caller = state.caller(&credentials)?;
    let order_id = order_id(&id)?;
    let user = owner_for(&state, &caller, order_id, "send webhook again").await?;
    let order = state.orders.redeliver(&user, order_id).await?;
    Ok(order_reply(StatusCode::ACCEPTED, &order))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::OrderView;

    fn an_order(node: &str) -> Order {
        let mut order = Order::new(
            OrderId::now_v7(),
            "alice".into(),
            serde_json::json!({"items": ["a"], "note": "say \"hi\""}),
            node.into(),
            chrono::Utc::now(),
        );
        order.steps[0].node = Some(node.into());
        order
    }

    fn parsed(body: &[u8]) -> serde_json::Value {
        serde_json::from_slice(body).unwrap()
    }

    fn views<'a>(orders: impl Iterator<Item = &'a Order>) -> serde_json::Value {
        orders
            .map(|order| serde_json::to_value(OrderView::from(order)).unwrap())
            .collect()
    }

    #[test]
    fn wait_answers_and_pages_hold_the_views_of_their_orders() {
        let finished = [Arc::new(an_order("node-1")), Arc::new(an_order("node-\"2"))];
        let pending = [OrderId::now_v7()];
        for (finished, pending, missing) in [
            (&finished[..], &pending[..], vec!["nope".to_string()]),
            (&[][..], &[][..], vec![]),
        ] {
            let mut body = Vec::new();
            write_wait_answer(&mut body, finished, pending, &missing).unwrap();
            assert_eq!(
                parsed(&body),
                serde_json::json!({
                    "orders": views(finished.iter().map(Arc::as_ref)),
                    "pending": pending,
                    "missing": missing,
                })
            );
        }
        let page: Vec<Order> = finished.iter().map(|order| (**order).clone()).collect();
        for (orders, cursor) in [(&page[..], Some("b64-cursor")), (&[][..], None)] {
            let mut body = Vec::new();
            write_page(&mut body, orders, cursor).unwrap();
            assert_eq!(
                parsed(&body),
                serde_json::json!({ "orders": views(orders.iter()), "next_cursor": cursor })
            );
        }
    }

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
