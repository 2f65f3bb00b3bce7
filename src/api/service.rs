//! The cluster-internal routes. `POST /service/transfer`: the leader (or a draining node) has
//! this node take over another node's unfinished orders; each accepted call is an `audit` log
//! line. `GET /service/nodes/{service_id}/orders`: a read-only view of the unfinished orders a
//! node owns. Both need the cluster secret (`X-Cluster-Secret`) or an admin (token, or client
//! certificate with an entry); without either it is a 401, for a user a 403, and on a node that
//! runs alone a 409. `POST /service/cancels`, with the same checks: a peer took a cancel of an
//! order this node runs. `GET /service/backup`: a copy of a node's embedded store, for an admin (in
//! header mode, anyone); a 409 on Redis.

use super::auth::{audit, credentials, Credentials};
use super::limits::{body, Body};
use super::{json_reply, respond, with_state, ApiError, State};
use crate::cluster::{Cluster, TransferError, CANCELS_PATH, SECRET_HEADER};
use crate::order::OrderId;
use crate::store::embedded::BackupError;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    service_id: String,
    /// The leader's fencing token; a request from an older term is refused.
    #[serde(default)]
    fence: Option<u64>,
    /// Set by a draining node handing over its own orders.
    #[serde(default)]
    handover: bool,
}

/// The most order ids one `GET /service/nodes/{service_id}/orders` answer names.
pub const MAX_OWNED_LISTED: usize = 10_000;

/// The answer of `GET /service/nodes/{service_id}/orders`.
#[derive(Serialize)]
struct Owned {
    service_id: String,
    /// Unfinished orders whose stored owner is the node, at most [`MAX_OWNED_LISTED`].
    unfinished: Vec<String>,
}

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    let transfer = warp::path!("service" / "transfer")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(warp::header::optional::<String>(SECRET_HEADER))
        .and(credentials())
        .and(body())
        .then(|state, secret, credentials, body| async move {
            respond(transfer(state, secret, credentials, body).await)
        });
    let owned = warp::path!("service" / "nodes" / String / "orders")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(warp::header::optional::<String>(SECRET_HEADER))
        .and(credentials())
        .then(|service_id, state, secret, credentials| async move {
            respond(owned(state, service_id, secret, credentials).await)
        });
    let cancels = warp::path!("service" / "cancels")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(warp::header::optional::<String>(SECRET_HEADER))
        .and(credentials())
        .and(body())
        .then(|state, secret, credentials, body| async move {
            respond(cancel_noted(state, secret, credentials, body).await)
        });
    let backup = warp::path!("service" / "backup")
        .and(warp::get())
        .and(with_state(state))
        .and(credentials())
        .then(|state, credentials| async move { respond(backup(state, credentials).await) });
    transfer
        .or(owned)
        .unify()
        .or(cancels)
        .unify()
        .or(backup)
        .unify()
        .boxed()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelNoted {
    order_id: OrderId,
}

/// `POST /service/cancels`: another node took a cancel of an order this node may run; if it
/// runs here and its stored record says it is cancelled, it stops after its running step or
/// wakes from its retry wait to roll back. The cancel itself is in the store already: this only
/// hastens it, and cancels nothing the store does not.
async fn cancel_noted(
    state: State,
    secret: Option<String>,
    credentials: Credentials,
    body: Body,
) -> Result<Response, ApiError> {
    let (who, cluster, noted) = peer_request::<CancelNoted>(
        &state,
        (secret, credentials, body),
        CANCELS_PATH,
        "cancels are taken by POST /orders/{id}/cancel",
        r#"{"order_id": "<order id>"}"#,
    )
    .await?;
    if who.1 != "peer" {
        audit(&who.0, who.1, "note a cancel", &noted.order_id.to_string());
    }
    let stopped = cluster
        .note_cancel(noted.order_id)
        .await
        .map_err(|error| ApiError::from_store(error, state.retry_after))?;
    Ok(json_reply(
        StatusCode::OK,
        &serde_json::json!({ "order_id": noted.order_id, "noted": stopped }),
    ))
}

/// The bytes a backup is sent in at a time.
const BACKUP_CHUNK: usize = 256 * 1024;

/// `GET /service/backup`: the embedded store's file as of one moment (see
/// [`EmbeddedStore::backup`](crate::store::embedded::EmbeddedStore::backup)), to put in place
/// of `orders.redb` while the node is stopped.
async fn backup(state: State, credentials: Credentials) -> Result<Response, ApiError> {
    let auth = &state.security.auth;
    let (who, role) = if auth.checks_tokens() {
        let caller = auth.caller(&credentials.as_write())?;
        caller.require_admin("/service/backup")?;
        (caller.user, caller.role.as_str())
    } else {
        let named = credentials.authorization.as_deref().map(str::trim);
        (named.unwrap_or_default().to_string(), "header mode")
    };
    let Some(store) = &state.embedded else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "the orders are in redis: back up redis itself (its append-only file, or an RDB \
             from BGSAVE)",
        ));
    };
    let backup = store.backup().await.map_err(|error| match error {
        BackupError::Busy => ApiError::overloaded(
            "another backup is being made or sent; one at a time",
            state.retry_after,
        ),
        BackupError::NoRoom { .. } => {
            tracing::warn!(error = %error, "backup refused");
            ApiError::new(StatusCode::INSUFFICIENT_STORAGE, error.to_string())
        }
        BackupError::Store(error) => ApiError::from_store(error, state.retry_after),
    })?;
    audit(&who, role, "backup", &format!("{} orders", backup.orders));
    // The turn goes with the file, so no other backup is made until this one is sent.
    let sending = (tokio::fs::File::from_std(backup.file), backup.turn);
    let chunks = futures_util::stream::try_unfold(sending, |(mut file, turn)| async move {
        use tokio::io::AsyncReadExt;
        let mut chunk = bytes::BytesMut::with_capacity(BACKUP_CHUNK);
        match file.read_buf(&mut chunk).await? {
            0 => Ok::<_, std::io::Error>(None),
            _ => Ok(Some((chunk.freeze(), (file, turn)))),
        }
    });
    let mut response = warp::reply::stream(chunks).into_response();
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        warp::http::HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(
        "content-disposition",
        warp::http::HeaderValue::from_static("attachment; filename=\"orders.redb\""),
    );
    headers.insert("content-length", backup.bytes.into());
    Ok(response)
}

/// Who is calling a cluster-internal route: a peer with the cluster secret (`("cluster",
/// "peer")`) or an admin (by token or client certificate); a 401 without either, a 403 for a
/// user's.
fn authorize(
    state: &State,
    secret: Option<String>,
    credentials: Credentials,
    route: &str,
) -> Result<(String, &'static str), ApiError> {
    let with_secret = secret.is_some_and(|secret| {
        state
            .cluster
            .as_ref()
            .is_some_and(|cluster| cluster.secret_matches(&secret))
    });
    let no_secret = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("missing or wrong {SECRET_HEADER} header, and no admin token or certificate"),
        )
    };
    if with_secret {
        return Ok(("cluster".to_string(), "peer"));
    }
    if !credentials.shown() {
        return Err(no_secret());
    }
    match state.security.auth.caller(&credentials) {
        Ok(caller) => {
            caller.require_admin(route)?;
            Ok((caller.user, caller.role.as_str()))
        }
        // A peer shows its node certificate, which usually has no entry: its secret is wrong.
        Err(_) if credentials.authorization.is_none() => Err(no_secret()),
        Err(refused) => Err(refused),
    }
}

/// The unfinished orders whose stored owner is `service_id`: the store's owner index, each
/// order read back so that one finished or moved since is left out.
async fn owned(
    state: State,
    service_id: String,
    secret: Option<String>,
    credentials: Credentials,
) -> Result<Response, ApiError> {
    authorize(
        &state,
        secret,
        credentials,
        "/service/nodes/{service_id}/orders",
    )?;
    if state.cluster.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this node runs alone (no database.url or database.sentinels): no node owns orders in a cluster",
        ));
    }
    let store_error = |error| ApiError::from_store(error, state.retry_after);
    let ids = state
        .store
        .owned_unfinished(&service_id)
        .await
        .map_err(store_error)?;
    let mut unfinished = Vec::new();
    for id in ids {
        if unfinished.len() >= MAX_OWNED_LISTED {
            break;
        }
        let order = state.store.get(id).await.map_err(store_error)?;
        if order.is_some_and(|order| order.owner == service_id && order.owes_work()) {
            unfinished.push(id.to_string());
        }
    }
    Ok(json_reply(
        StatusCode::OK,
        &Owned {
            service_id,
            unfinished,
        },
    ))
}

/// The largest body of a cluster-internal request.
const MAX_PEER_BODY: u64 = 4096;

/// The caller (with the cluster secret, a peer; otherwise an admin), this node's cluster and
/// the JSON body, `shape` as the error says, of a cluster-internal request to `route`; a lone
/// node refuses it with a 409 that says `alone`.
async fn peer_request<T: serde::de::DeserializeOwned>(
    state: &State,
    (secret, credentials, body): (Option<String>, Credentials, Body),
    route: &str,
    alone: &str,
    shape: &str,
) -> Result<((String, &'static str), Arc<Cluster>, T), ApiError> {
    let who = authorize(state, secret, credentials, route)?;
    let Some(cluster) = state.cluster.as_ref() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("this node runs alone (no database.url or database.sentinels): {alone}"),
        ));
    };
    let body = body
        .read(MAX_PEER_BODY, state.security.body_read_timeout)
        .await?;
    let request = serde_json::from_slice(&body)
        .map_err(|error| ApiError::bad_request(format!("body must be {shape}: {error}")))?;
    Ok((who, Arc::clone(cluster), request))
}

async fn transfer(
    state: State,
    secret: Option<String>,
    credentials: Credentials,
    body: Body,
) -> Result<Response, ApiError> {
    let (who, cluster, request) = peer_request::<TransferRequest>(
        &state,
        (secret, credentials, body),
        "/service/transfer",
        "there is nothing to transfer",
        r#"{"service_id": "<node id>"}"#,
    )
    .await?;
    if request.service_id.trim().is_empty() {
        return Err(ApiError::bad_request("service_id must not be empty"));
    }
    audit(&who.0, who.1, "transfer orders", &request.service_id);
    // The move runs as a task of its own: should the caller give up and close the connection,
    // the orders moved so far are still queued here, not left to the next reconciliation.
    let moving = tokio::spawn(async move {
        cluster
            .accept_transfer(&request.service_id, request.fence, request.handover)
            .await
    });
    let outcome = moving.await.map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("transfer task failed: {error}"),
        )
    })?;
    match outcome {
        Ok(done) => Ok(json_reply(StatusCode::OK, &done)),
        Err(TransferError::Store(error)) => Err(ApiError::from_store(error, state.retry_after)),
        Err(TransferError::Stopping) => Err(ApiError::overloaded(
            "node is stopping; ask another node",
            state.retry_after,
        )),
        Err(refused) => Err(ApiError::new(StatusCode::CONFLICT, refused.to_string())),
    }
}
