//! The pipeline: how accepted orders get executed on this node.
//!
//! - `pool`: the bounded queue and the workers ([`Pool`], [`Slot`]), and shutdown.
//! - `job`: what the pool queues ([`Job`]).
//! - `due`: when a retry is due, on the monotonic clock.
//! - `executor`: drives one order to a terminal state, commit by commit, with retries.
//! - `parking`: orders whose step only takes time, held as data until it is over.
//! - `shared`: the state the pool and the executor share.
//! - `active`, `cancels`: the orders active here, and the cancellations noted here.
//! - [`reconcile`]: resumes unfinished orders of this node that nothing here holds.
//! - `adoptions`: moves of orders to this node under way, which a reconcile pass leaves alone.
//! - `gate`: the liveness gate no step passes while the node's lease has lapsed ([`Gate`]).
//! - `handler`, `simulate`, [`http`], [`retry`]: the step handlers and their retry policy.
//! - [`notify`]: the completion webhook.
//! - `waiters`: long polls waiting for an order to finish ([`Waiters`]).

mod active;
mod adoptions;
mod cancels;
mod client;
mod due;
mod executor;
#[cfg(test)]
mod fakes;
mod gate;
mod handler;
pub mod http;
mod job;
pub mod notify;
mod parking;
mod pool;
pub mod reconcile;
pub mod retry;
mod shared;
mod simulate;
mod waiters;

pub use adoptions::{Adopting, Since};
pub use gate::Gate;
pub use handler::{Handlers, StepContext, StepDone, StepError, StepHandler};
pub use http::Http;
pub use job::Job;
pub use notify::Notifier;
pub use pool::{Held, Pool, Slot};
pub use retry::RetryPolicy;
pub use simulate::Simulate;
pub use waiters::Waiters;
