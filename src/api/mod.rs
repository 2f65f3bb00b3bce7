//! The HTTP API: one function per route, each a warp filter; handlers are plain async functions
//! that answer with a reply or an [`ApiError`]; [`error::recover`] turns every rejection into the
//! same JSON error shape.
//!
//! Paths are matched before methods, so a known path with the wrong method is a 405 and an
//! unknown path a 404.

pub mod auth;
mod diagnostic;
pub mod error;
pub mod limits;
mod orders;
#[cfg(test)]
mod props;
pub mod serve;
mod service;

pub use error::ApiError;

use crate::cluster::Cluster;
use crate::pipeline::Pool;
use crate::store::OrderStore;
use chrono::{DateTime, Utc};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

/// The service name reported by the diagnostics.
pub const SERVICE_NAME: &str = "order-process";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the handlers share.
pub struct ApiState {
    pub service_id: String,
    pub advertised: SocketAddr,
    pub started_at: DateTime<Utc>,
    pub store: Arc<dyn OrderStore>,
    pub pool: Arc<Pool>,
    /// Present in cluster mode.
    pub cluster: Option<Arc<Cluster>>,
    pub max_body_bytes: u64,
    pub retry_after: Duration,
    /// Authentication and per-client limits.
    pub security: auth::Security,
}

pub type State = Arc<ApiState>;

fn with_state(state: State) -> impl Filter<Extract = (State,), Error = Infallible> + Clone {
    warp::any().map(move || Arc::clone(&state))
}

/// Every route, with errors recovered into JSON.
pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    let welcome = warp::path::end()
        .and(warp::get())
        .map(|| "Welcome to Order Processing System!".into_response());
    welcome
        .or(orders::routes(state.clone()))
        .unify()
        .or(diagnostic::routes(state.clone()))
        .unify()
        .or(service::routes(state))
        .unify()
        .recover(error::recover)
        .unify()
        .with(warp::log::custom(|info| {
            tracing::debug!(
                method = %info.method(),
                path = %info.path(),
                status = info.status().as_u16(),
                elapsed_us = info.elapsed().as_micros() as u64,
                "request"
            );
        }))
        .map(Reply::into_response)
        .boxed()
}

/// Either reply: the success, or the error as JSON.
fn respond<T: Reply>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(reply) => reply.into_response(),
        Err(error) => error.into_response(),
    }
}

fn json_reply<T: serde::Serialize>(status: warp::http::StatusCode, value: &T) -> Response {
    warp::reply::with_status(warp::reply::json(value), status).into_response()
}
