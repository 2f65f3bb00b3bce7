//! The order: its stored model, the pure state machine that moves it along, and the JSON views
//! users see.
//!
//! Nothing in here does I/O or reads a clock: callers pass `now` in, so every transition is a
//! plain function that unit tests can drive exhaustively.

mod json;
mod machine;
mod model;
#[cfg(test)]
mod props;
mod rfc3339;
mod view;

pub use json::{
    nests_deeper_than, write_order, write_order_apart, write_split_head, write_split_rest,
    write_split_step, write_step_call, write_view, VIEW_CAPACITY,
};
pub use machine::{
    apply, apply_owned, next_action, retry_due, Action, Event, TransitionError, CANCELLED,
};
pub use model::{
    Attempt, Failure, IdMap, IdSet, Notification, NotificationState, Order, OrderId, Outcome,
    Output, Outputs, Payload, Phase, RollbackState, Step, StepEntry, StoredForm, UnknownStep,
    MAX_ATTEMPTS, MAX_OUTPUT_DEPTH,
};
pub use rfc3339::micros as rfc3339_micros;
pub use view::{CreatedView, OrderView};
