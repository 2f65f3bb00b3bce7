//! The one place where failures become HTTP answers: every error is `{"error": "..."}` with the
//! right status, and overload carries `Retry-After`.

use crate::service::OrderError;
use crate::store::StoreError;
use std::convert::Infallible;
use std::time::Duration;
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
                tracing::warn!(error = %detail, "store unavailable");
                ApiError::overloaded("store unavailable, try again", retry_after)
            }
            other => {
                tracing::error!(error = %other, "store error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal store error")
            }
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
            OrderError::Finished | OrderError::AlreadyFailing | OrderError::NotParked => {
                ApiError::new(StatusCode::CONFLICT, message)
            }
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
