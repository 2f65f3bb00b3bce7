//! The HTTP API: one function per route, each a warp filter; handlers are plain async functions
//! that authenticate the caller, parse the request, call the order service
//! ([`crate::service::Orders`]) and answer with a reply or an [`ApiError`]; [`error`] is the one
//! place a service error becomes a status, and [`error::recover`] turns every rejection into the
//! same JSON error shape. Each route group gets only its part of the [`ApiState`].
//!
//! [`ROUTES`] lists every route; `openapi.json` (served at `/openapi.json`) describes exactly
//! those, which a test checks. `GET /` answers a browser with the console (`console.html`, fed
//! by the `/diagnostic` routes of `console` and the order routes) and anyone else with the welcome text.
//!
//! Paths are matched before methods, so a known path with the wrong method is a 405 and an
//! unknown path a 404.

pub mod auth;
mod console;
mod diagnostic;
pub mod error;
pub mod limits;
mod metrics;
mod orders;
#[cfg(test)]
mod props;
pub mod serve;
mod service;
mod state;
pub mod tls;

pub use error::ApiError;
pub use state::{ApiState, Checks, NodeStatus};

use state::{with_state, ServiceState, State};
use std::sync::Arc;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

/// Every route the router serves, as (method, path) with OpenAPI-style `{parameters}`. The
/// OpenAPI description must list exactly these (checked by a test).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/openapi.json"),
    ("GET", "/metrics"),
    ("POST", "/orders"),
    ("GET", "/orders"),
    ("POST", "/orders/wait"),
    ("GET", "/orders/{order_id}"),
    ("POST", "/orders/{order_id}/cancel"),
    ("POST", "/orders/{order_id}/rollback"),
    ("POST", "/orders/{order_id}/notification"),
    ("GET", "/diagnostic/heartbeat"),
    ("GET", "/diagnostic/cluster"),
    ("GET", "/diagnostic/summary"),
    ("GET", "/diagnostic/set-aside"),
    ("GET", "/diagnostic/overview"),
    ("GET", "/diagnostic/flow"),
    ("GET", "/diagnostic/parked"),
    ("GET", "/diagnostic/stuck"),
    ("POST", "/service/transfer"),
    ("POST", "/service/cancels"),
    ("GET", "/service/nodes/{service_id}/orders"),
    ("GET", "/service/backup"),
];

/// The OpenAPI 3 description of [`ROUTES`].
pub const OPENAPI: &str = include_str!("openapi.json");
/// The console: one self-contained HTML file (no external script or style) that polls the
/// JSON diagnostics and draws its charts itself.
const CONSOLE: &str = include_str!("console.html");
const WELCOME: &str = "Welcome to Order Processing System!";

/// `GET /`: the console for a browser (`Accept` naming `text/html`), the welcome text for
/// everyone else.
fn root() -> BoxedFilter<(Response,)> {
    warp::path::end()
        .and(warp::get())
        .and(warp::header::optional::<String>("accept"))
        .map(|accept: Option<String>| {
            if accept.is_some_and(|accept| accept.contains("text/html")) {
                // Never inside another site's frame, whose page could steer its buttons.
                let mut page = warp::reply::html(CONSOLE).into_response();
                let headers = page.headers_mut();
                headers.insert(
                    "x-frame-options",
                    warp::http::HeaderValue::from_static("DENY"),
                );
                headers.insert(
                    "content-security-policy",
                    warp::http::HeaderValue::from_static("frame-ancestors 'none'"),
                );
                page
            } else {
                WELCOME.into_response()
            }
        })
        .boxed()
}

fn openapi() -> BoxedFilter<(Response,)> {
    warp::path!("openapi.json")
        .and(warp::get())
        .map(|| {
            warp::reply::with_header(OPENAPI, "content-type", "application/json").into_response()
        })
        .boxed()
}

/// Every route, with errors recovered into JSON; each route group gets only its part of `state`.
pub fn routes(state: ApiState) -> BoxedFilter<(Response,)> {
    let auth = Arc::clone(&state.security.auth);
    // In header mode on loopback (a developer's `cargo run`), a web page could rebind its own
    // host name to 127.0.0.1 and read and act through the node as any user: only requests
    // naming the node by a loopback host are served. The listener decides, whatever address
    // the node advertises to peers.
    let loopback_only = !auth.checks_tokens() && state.node.listen.ip().is_loopback();
    let orders = Arc::new(orders::OrdersApi {
        orders: state.orders,
        checks: Arc::clone(&state.security),
    });
    let service: State = Arc::new(ServiceState {
        security: state.security,
        cluster: state.node.cluster.clone(),
        store: Arc::clone(&state.node.store),
        retry_after: state.retry_after,
        embedded: state.embedded,
    });
    // The order routes first: each route tried before the one a request takes makes and
    // drops a rejection, and orders are most of the requests.
    let routes = orders::routes(orders)
        .or(root())
        .unify()
        .or(openapi())
        .unify()
        .or(metrics::routes(Arc::clone(&state.node)))
        .unify()
        .or(console::routes(Arc::new(console::Console::new(
            Arc::clone(&state.node),
            Arc::clone(&auth),
        ))))
        .unify()
        .or(diagnostic::routes(state.node, auth))
        .unify()
        .or(service::routes(service))
        .unify()
        .boxed();
    let routes = match loopback_only {
        true => foreign_host().or(routes).unify().boxed(),
        false => routes,
    };
    routes
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

/// A header's value if present, as bytes, not copied: one that is not text is the caller's to
/// ignore (as W3C trace context asks of a malformed `traceparent`) or refuse.
pub(crate) fn raw_header(
    name: &'static str,
) -> impl Filter<Extract = (Option<warp::http::HeaderValue>,), Error = std::convert::Infallible> + Clone
{
    warp::header::value(name)
        .map(Some)
        .or(warp::any().map(|| None))
        .unify()
}

/// A 403 for a request whose `Host` is not a loopback name or address; any other (one that
/// sends none too) goes on to the routes.
fn foreign_host() -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    // The header as it came (no copy): this runs before every request such a node serves.
    raw_header("host").and_then(|host: Option<warp::http::HeaderValue>| async move {
        let host = host.as_ref().map(|host| host.to_str().unwrap_or_default());
        match host.is_none_or(is_loopback_host) {
            true => Err(warp::reject()),
            false => Ok(ApiError::new(
                warp::http::StatusCode::FORBIDDEN,
                "a node in header mode on loopback serves only requests that name it by a \
                 loopback host (localhost, 127.0.0.1, [::1])",
            )
            .into_response()),
        }
    })
}

/// Whether a `Host` header value (`name` or `name:port`) names this machine's loopback.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Either reply: the success, or the error as JSON.
fn respond<T: Reply>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(reply) => reply.into_response(),
        Err(error) => error.into_response(),
    }
}

/// How many bytes an answer's JSON is written into at first: an order's view, the answer to
/// most requests, fits.
const ANSWER_CAPACITY: usize = crate::order::VIEW_CAPACITY;

fn json_reply<T: serde::Serialize>(status: warp::http::StatusCode, value: &T) -> Response {
    json_reply_sized(status, value, ANSWER_CAPACITY)
}

/// An order's view (`OrderView`), written by the order's own JSON writer.
fn order_reply(status: warp::http::StatusCode, order: &crate::order::Order) -> Response {
    written_reply(status, ANSWER_CAPACITY, |body| {
        crate::order::write_view(body, order)
    })
}

/// [`json_reply`] written into a buffer of `capacity` bytes at first, for answers that hold
/// many orders.
fn json_reply_sized<T: serde::Serialize>(
    status: warp::http::StatusCode,
    value: &T,
    capacity: usize,
) -> Response {
    written_reply(status, capacity, |body| serde_json::to_writer(body, value))
}

/// A JSON answer that `write` writes into a buffer of `capacity` bytes at first.
fn written_reply(
    status: warp::http::StatusCode,
    capacity: usize,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), serde_json::Error>,
) -> Response {
    let mut body = Vec::with_capacity(capacity);
    if let Err(error) = write(&mut body) {
        tracing::error!(error = %error, "cannot encode an answer");
        return ApiError::new(
            warp::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal error",
        )
        .into_response();
    }
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::{json_reply_sized, OPENAPI, ROUTES};
    use std::collections::BTreeSet;

    #[tokio::test]
    async fn a_json_answer_is_the_value_as_json_with_its_status_and_type() {
        let value = serde_json::json!({"order_id": "x", "steps": [1, 2, 3]});
        // A capacity smaller than the answer: the buffer grows as before.
        let response = json_reply_sized(warp::http::StatusCode::ACCEPTED, &value, 4);
        assert_eq!(response.status(), warp::http::StatusCode::ACCEPTED);
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body, serde_json::to_vec(&value).unwrap());
    }

    fn described() -> BTreeSet<(String, String)> {
        let document: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(
            document["openapi"].as_str().unwrap().starts_with("3."),
            "an OpenAPI 3 document"
        );
        let mut found = BTreeSet::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if matches!(method.as_str(), "get" | "post" | "put" | "delete" | "patch") {
                    found.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        found
    }

    #[test]
    fn openapi_describes_exactly_the_routes() {
        let routes: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(method, path)| (method.to_string(), path.to_string()))
            .collect();
        assert_eq!(routes.len(), ROUTES.len(), "no route listed twice");
        let described = described();
        let undocumented: Vec<_> = routes.difference(&described).collect();
        let unserved: Vec<_> = described.difference(&routes).collect();
        assert!(
            undocumented.is_empty(),
            "routes missing from openapi.json: {undocumented:?}"
        );
        assert!(
            unserved.is_empty(),
            "openapi.json lists routes the router lacks: {unserved:?}"
        );
    }

    #[test]
    fn openapi_references_resolve() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let mut stack = vec![&document];
        while let Some(value) = stack.pop() {
            match value {
                serde_json::Value::Object(map) => {
                    if let Some(reference) = map.get("$ref").and_then(|r| r.as_str()) {
                        let pointer = reference.trim_start_matches('#');
                        assert!(
                            document.pointer(pointer).is_some(),
                            "dangling $ref {reference}"
                        );
                    }
                    stack.extend(map.values());
                }
                serde_json::Value::Array(items) => stack.extend(items),
                _ => {}
            }
        }
    }

    #[test]
    fn only_loopback_hosts_are_loopback() {
        use super::is_loopback_host;
        for host in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.3.2.1:1",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.5:8080",
            "[fd00::1]:8080",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
