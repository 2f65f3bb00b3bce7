//! The unit of work the pool queues: an order to drive, fresh or to be loaded from the store.

use super::due::RetryDue;
use crate::order::{Order, OrderId};

/// Work for the pool.
pub enum Job {
    /// A freshly accepted order, as stored.
    New(Box<Order>),
    /// An order to load from the store and resume (after a restart or a takeover).
    Resume(OrderId),
}

impl Job {
    /// The order the job is about.
    pub(crate) fn order_id(&self) -> OrderId {
        match self {
            Job::New(order) => order.order_id,
            Job::Resume(id) => *id,
        }
    }
}

/// A job as it waits in the queue, with what this process knows of it beyond the store.
pub(super) struct Queued {
    pub(super) job: Job,
    /// The gate's ticket when the order was last known to be this node's (a new order: when its
    /// queue slot was reserved, before it was stored); `None`: confirm it before its first step.
    pub(super) ticket: Option<u64>,
    /// The retry this process scheduled for it, on the monotonic clock.
    pub(super) due: Option<RetryDue>,
}

impl Queued {
    /// A job of which nothing is known here beyond the store.
    pub(super) fn bare(job: Job) -> Queued {
        Queued {
            job,
            ticket: None,
            due: None,
        }
    }
}
