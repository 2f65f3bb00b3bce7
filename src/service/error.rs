//! Why an order operation did not happen; `crate::api::error` gives each its HTTP status.

use crate::store::StoreError;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// Unknown, or not the caller's to see.
    #[error("order not found")]
    NotFound,
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The user has as many unfinished orders on this node as allowed.
    #[error("too many unfinished orders for this user on this node, try again later")]
    TooManyInFlight { retry_after: Duration },
    /// The queue is full: nothing was stored.
    #[error("too many orders in progress, try again later")]
    QueueFull { retry_after: Duration },
    /// The node is draining: it begins nothing (no order stored, no long poll).
    #[error("node is shutting down")]
    Stopping { retry_after: Duration },
    #[error("order is already finished")]
    Finished,
    #[error("order already failed and is rolling back")]
    AlreadyFailing,
    #[error("order's rollback is not parked: only a failed order with rollback_state incomplete can retry it")]
    NotParked,
    #[error(
        "order's webhook has not failed: only one whose notification state is failed is sent again"
    )]
    NotifyNotFailed,
    #[error("this node sends no webhooks: it has no [notify] section")]
    NoNotify,
    /// The idempotency key was used before for an order with another body.
    #[error("Idempotency-Key already used for order {0} with a different body; use a new key for a new order")]
    KeyReused(crate::order::OrderId),
    /// The order's stored record does not read (damaged, or written by a newer version).
    #[error(
        "the order's stored record cannot be read; it is kept as it is for an operator to look at"
    )]
    Unreadable,
    #[error("{source}")]
    Store {
        source: StoreError,
        retry_after: Duration,
    },
}
