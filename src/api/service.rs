//! `POST /service/transfer`: a cluster-internal call by which the leader (or a draining node) has
//! this node take over another node's unfinished orders. It needs the cluster secret
//! (`X-Cluster-Secret`) or an admin's token; without either it is a 401, with a user's token a
//! 403. Each accepted call is an `audit` log line.

use super::auth::audit;
use super::limits::{body, Body};
use super::{json_reply, respond, with_state, ApiError, State};
use crate::cluster::{TransferError, SECRET_HEADER};
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
        .and(warp::header::optional::<String>("authorization"))
        .and(body())
        .then(|state, secret, authorization, body| async move {
            respond(transfer(state, secret, authorization, body).await)
        })
        .boxed()
}

/// The largest transfer request body.
const MAX_TRANSFER_BODY: u64 = 4096;

async fn transfer(
    state: State,
    secret: Option<String>,
    authorization: Option<String>,
    body: Body,
) -> Result<Response, ApiError> {
    // With the secret this is a peer; otherwise the caller must be an admin.
    let with_secret = secret.is_some_and(|secret| {
        state
            .cluster
            .as_ref()
            .is_some_and(|cluster| cluster.secret_matches(&secret))
    });
    let who = if with_secret {
        ("cluster".to_string(), "peer")
    } else if authorization.is_some() {
        let caller = state.security.auth.authenticate(authorization.as_deref())?;
        caller.require_admin("/service/transfer")?;
        (caller.user, caller.role.as_str())
    } else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("missing or wrong {SECRET_HEADER} header, and no admin token"),
        ));
    };
    let Some(cluster) = state.cluster.as_ref() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this node runs alone (no database.url): there is nothing to transfer",
        ));
    };
    let body = body
        .read(MAX_TRANSFER_BODY, state.security.body_read_timeout)
        .await?;
    let request: TransferRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "body must be {{\"service_id\": \"<node id>\"}}: {error}"
        ))
    })?;
    if request.service_id.trim().is_empty() {
        return Err(ApiError::bad_request("service_id must not be empty"));
    }
    audit(&who.0, who.1, "transfer orders", &request.service_id);
    match cluster
        .accept_transfer(&request.service_id, request.fence, request.handover)
        .await
    {
        Ok(done) => Ok(json_reply(StatusCode::OK, &done)),
        Err(TransferError::Store(error)) => Err(ApiError::from_store(error, state.retry_after)),
        Err(refused) => Err(ApiError::new(StatusCode::CONFLICT, refused.to_string())),
    }
}
