//! Each user's unfinished orders on this node, capped: a user cannot fill the node's queue
//! alone.

use crate::order::OrderId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Each user's unfinished orders accepted by this node, capped at `max` per user. An order
/// counts until the node stops executing it (finished, parked, or handed to another node).
pub struct InFlight {
    max: usize,
    by_user: Mutex<HashMap<String, UserOrders>>,
    admissions: AtomicUsize,
}

#[derive(Debug, Default)]
struct UserOrders {
    ids: Vec<OrderId>,
    /// Submissions admitted whose order is not created yet.
    pending: usize,
}

impl UserOrders {
    fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.pending == 0
    }
}

/// Every this many admissions, users with no unfinished order are forgotten.
const SWEEP_EVERY: usize = 1024;

impl InFlight {
    pub fn new(max: usize) -> Self {
        InFlight {
            max,
            by_user: Mutex::new(HashMap::new()),
            admissions: AtomicUsize::new(0),
        }
    }

    /// Room for one more order of `user`, or `None` when the user is at the cap. `running`
    /// tells whether an order still runs here.
    pub fn admit(
        self: &Arc<Self>,
        user: &str,
        running: impl Fn(OrderId) -> bool,
    ) -> Option<Admission> {
        let mut by_user = match self.by_user.lock() {
            Ok(by_user) => by_user,
            Err(poisoned) => poisoned.into_inner(),
        };
        if self.admissions.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            by_user.retain(|_, orders| {
                orders.ids.retain(|id| running(*id));
                !orders.is_empty()
            });
        }
        let orders = by_user.entry(user.to_string()).or_default();
        if orders.ids.len() + orders.pending >= self.max {
            orders.ids.retain(|id| running(*id));
            if orders.ids.len() + orders.pending >= self.max {
                return None;
            }
        }
        orders.pending += 1;
        Some(Admission {
            in_flight: Arc::clone(self),
            user: user.to_string(),
            created: None,
        })
    }

    /// The orders counted for `user` now (running or not).
    pub fn count(&self, user: &str) -> usize {
        self.by_user
            .lock()
            .ok()
            .and_then(|by_user| {
                by_user
                    .get(user)
                    .map(|orders| orders.ids.len() + orders.pending)
            })
            .unwrap_or(0)
    }

    fn settle(&self, user: &str, created: Option<OrderId>) {
        let mut by_user = match self.by_user.lock() {
            Ok(by_user) => by_user,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some(orders) = by_user.get_mut(user) else {
            return;
        };
        orders.pending = orders.pending.saturating_sub(1);
        if let Some(id) = created {
            orders.ids.push(id);
        }
        if orders.is_empty() {
            by_user.remove(user);
        }
    }
}

/// One admitted submission: counted as pending until dropped; [`Admission::created`] makes it
/// count as that order instead.
pub struct Admission {
    in_flight: Arc<InFlight>,
    user: String,
    created: Option<OrderId>,
}

impl Admission {
    pub fn created(mut self, id: OrderId) {
        self.created = Some(id);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.in_flight.settle(&self.user, self.created);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_caps_each_user_and_forgets_finished_orders() {
        let in_flight = Arc::new(InFlight::new(2));
        let first = OrderId::new_v4();
        let second = OrderId::new_v4();
        let all_running = |_| true;
        in_flight
            .admit("alice", all_running)
            .unwrap()
            .created(first);
        let pending = in_flight.admit("alice", all_running).unwrap();
        assert!(in_flight.admit("alice", all_running).is_none());
        assert!(in_flight.admit("bob", all_running).is_some());
        drop(pending);
        in_flight
            .admit("alice", all_running)
            .unwrap()
            .created(second);
        assert_eq!(in_flight.count("alice"), 2);
        assert!(in_flight.admit("alice", all_running).is_none());
        // Once an order stops running here it no longer counts.
        assert!(in_flight.admit("alice", |id| id != first).is_some());
        assert_eq!(in_flight.count("bob"), 0);
    }
}
