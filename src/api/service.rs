//! `POST /service/transfer`: a cluster-internal call by which the leader (or a draining node) has
//! this node take over another node's unfinished orders. It needs the cluster secret.

use super::{json_reply, respond, with_state, ApiError, State};
use crate::cluster::{TransferError, SECRET_HEADER};
use bytes::Bytes;
use serde::Deserialize;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
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

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("service" / "transfer")
        .and(warp::post())
        .and(with_state(state))
        .and(warp::header::optional::<String>(SECRET_HEADER))
        .and(warp::body::content_length_limit(4096))
        .and(warp::body::bytes())
        .then(|state, secret, body| async move { respond(transfer(state, secret, body).await) })
        .boxed()
}

async fn transfer(state: State, secret: Option<String>, body: Bytes) -> Result<Response, ApiError> {
    let Some(cluster) = state.cluster.as_ref() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this node runs alone (no database.url): there is nothing to transfer",
        ));
    };
    if !secret.is_some_and(|secret| cluster.secret_matches(&secret)) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("missing or wrong {SECRET_HEADER} header"),
        ));
    }
    let request: TransferRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "body must be {{\"service_id\": \"<node id>\"}}: {error}"
        ))
    })?;
    if request.service_id.trim().is_empty() {
        return Err(ApiError::bad_request("service_id must not be empty"));
    }
    match cluster
        .accept_transfer(&request.service_id, request.fence, request.handover)
        .await
    {
        Ok(done) => Ok(json_reply(StatusCode::OK, &done)),
        Err(TransferError::Store(error)) => Err(ApiError::from_store(error, state.retry_after)),
        Err(refused) => Err(ApiError::new(StatusCode::CONFLICT, refused.to_string())),
    }
}
