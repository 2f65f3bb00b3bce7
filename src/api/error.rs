//! The one place where failures become HTTP answers: every error is `{"error": "..."}` with the
//! right status, and overload carries `Retry-After`.

use crate::service::OrderError;
use crate::store::StoreError;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Rejection, Reply};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found() -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "order not found")
    }

    pub fn unauthorized() -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or empty Authorization header",
        )
    }

    /// 503 with a `Retry-After`.
    pub fn overloaded(message: impl Into<String>, retry_after: Duration) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            retry_after: Some(retry_after),
        }
    }

    /// 429 with a `Retry-After`: this caller should slow down.
    pub fn too_many(message: impl Into<String>, retry_after: Duration) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            retry_after: Some(retry_after),
        }
    }

    /// A store failure, as the client should see it.
    pub fn from_store(error: StoreError, retry_after: Duration) -> Self {
        match error {
            StoreError::NotFound => ApiError::not_found(),
            StoreError::Unavailable(detail) => {
                if let Some(others) = UNAVAILABLE_LOGGED.admit(millis_now(), UNAVAILABLE_LOG_EVERY)
                {
                    tracing::warn!(error = %detail, others_since_last = others, "store unavailable");
                }
                ApiError::overloaded("store unavailable, try again", retry_after)
            }
            other => {
                tracing::error!(error = %other, "store error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal store error")
            }
        }
    }
}

/// A request answered 503 because the store is unavailable is logged at most once per this
/// many milliseconds, with how many more were answered so since: an outage under thousands of
/// requests a second must not write a line for each.
const UNAVAILABLE_LOG_EVERY: u64 = 1_000;

static UNAVAILABLE_LOGGED: Throttle = Throttle::new();

/// Milliseconds since the first call: a clock for [`Throttle`].
fn millis_now() -> u64 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(START.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Lets one event in per period and counts the rest.
struct Throttle {
    /// When the next event may be let in, in [`millis_now`]'s milliseconds.
    next_ms: AtomicU64,
    /// Events kept out since the last one let in.
    kept_out: AtomicU64,
}

impl Throttle {
    const fn new() -> Throttle {
        Throttle {
            next_ms: AtomicU64::new(0),
            kept_out: AtomicU64::new(0),
        }
    }

    /// An event at `now_ms`: `Some(events kept out since the last one let in)` when this one
    /// is let in, at most one each `every_ms`.
    fn admit(&self, now_ms: u64, every_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        let first = now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(every_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if first {
            Some(self.kept_out.swap(0, Ordering::Relaxed))
        } else {
            self.kept_out.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl From<OrderError> for ApiError {
    fn from(error: OrderError) -> Self {
        let message = error.to_string();
        match error {
            OrderError::NotFound => ApiError::not_found(),
            OrderError::Invalid(message) => ApiError::bad_request(message),
            OrderError::TooManyInFlight { retry_after } => ApiError::too_many(message, retry_after),
            OrderError::QueueFull { retry_after } | OrderError::Stopping { retry_after } => {
                ApiError::overloaded(message, retry_after)
            }
            OrderError::Finished
            | OrderError::AlreadyFailing
            | OrderError::NotParked
            | OrderError::NotifyNotFailed
            | OrderError::NoNotify => ApiError::new(StatusCode::CONFLICT, message),
            OrderError::KeyReused(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message),
            OrderError::Unreadable => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message),
            OrderError::Store {
                source,
                retry_after,
            } => ApiError::from_store(source, retry_after),
        }
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let body = warp::reply::json(&serde_json::json!({ "error": self.message }));
        let mut response = warp::reply::with_status(body, self.status).into_response();
        if let Some(retry_after) = self.retry_after {
            let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(value) = warp::http::HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert("retry-after", value);
            }
        }
        response
    }
}

/// Turns whatever warp rejected into the JSON error shape. A request is rejected by every route
/// it does not take, so one that a route took by path and method and then refused (a header
/// that is not text, say) also carries the other routes' 405s and 404s: what that route said
/// is the answer, and 405 only when no route took the method.
pub async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    use warp::reject::{
        InvalidHeader, InvalidQuery, LengthRequired, MethodNotAllowed, MissingHeader,
        PayloadTooLarge, UnsupportedMediaType,
    };
    let error = if rejection.is_not_found() {
        ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
    } else if rejection.find::<PayloadTooLarge>().is_some() {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
    } else if rejection.find::<LengthRequired>().is_some() {
        ApiError::new(StatusCode::LENGTH_REQUIRED, "content-length required")
    } else if rejection.find::<InvalidQuery>().is_some() {
        ApiError::bad_request("invalid query string")
    } else if let Some(header) = rejection.find::<MissingHeader>() {
        ApiError::bad_request(format!("missing header {}", header.name()))
    } else if let Some(header) = rejection.find::<InvalidHeader>() {
        ApiError::bad_request(format!("invalid header {}", header.name()))
    } else if rejection.find::<UnsupportedMediaType>().is_some() {
        ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported media type")
    } else if rejection.find::<MethodNotAllowed>().is_some() {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed on this path",
        )
    } else {
        tracing::warn!(rejection = ?rejection, "unhandled rejection");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    };
    Ok(error.into_response())
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn a_throttle_lets_one_event_in_per_period_and_counts_the_rest() {
        let throttle = Throttle::new();
        assert_eq!(throttle.admit(0, 1_000), Some(0));
        assert_eq!(throttle.admit(10, 1_000), None);
        assert_eq!(throttle.admit(999, 1_000), None);
        assert_eq!(throttle.admit(1_000, 1_000), Some(2));
        assert_eq!(throttle.admit(1_500, 1_000), None);
        assert_eq!(throttle.admit(9_000, 1_000), Some(1));
        assert_eq!(throttle.admit(9_000, 1_000), None);
    }
}
