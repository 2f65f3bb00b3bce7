//! The unit of work the pool queues: an order to drive, fresh or to be loaded from the store.

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
