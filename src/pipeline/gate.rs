//! The liveness gate: in a cluster a node may start a step only while its liveness lease in the
//! store is current. Once the lease has lapsed (store unreachable, process paused), the node's
//! orders may have been taken over, so steps wait until the lease is renewed, and an order whose
//! execution spans a lapse is checked against the store before its next step.

use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug)]
struct GateState {
    /// `None`: always open (a node running alone).
    until: Option<Instant>,
    /// How many times the lease was renewed only after it had lapsed.
    lapses: u64,
}

pub struct Gate {
    state_tx: watch::Sender<GateState>,
}

impl Gate {
    /// A gate that never closes, for a node running alone.
    pub fn open() -> Gate {
        Gate {
            state_tx: watch::Sender::new(GateState {
                until: None,
                lapses: 0,
            }),
        }
    }

    /// A gate closed until the first renewal.
    pub fn closed() -> Gate {
        Gate {
            state_tx: watch::Sender::new(GateState {
                until: Some(Instant::now()),
                lapses: 0,
            }),
        }
    }

    /// The lease now holds until `until`.
    pub fn renewed(&self, until: Instant) {
        self.state_tx.send_modify(|state| {
            if state.until.is_some_and(|old| Instant::now() >= old) {
                state.lapses += 1;
            }
            state.until = Some(until);
        });
    }

    /// The lease is known to be lost now (another process holds it, or it was gone from the
    /// store before it ran out here): closed until renewed, and every ticket taken before it is
    /// void, as after a lapse.
    pub fn lapsed(&self) {
        self.state_tx.send_modify(|state| {
            state.lapses += 1;
            state.until = Some(Instant::now());
        });
    }

    pub fn is_open(&self) -> bool {
        let state = *self.state_tx.borrow();
        state.until.is_none_or(|until| Instant::now() < until)
    }

    pub fn lapses(&self) -> u64 {
        self.state_tx.borrow().lapses
    }

    /// What an execution confirms when it learns (or is told) the order is this node's: the lapse
    /// count while the lease holds; `None` while it has lapsed, which no later state honours.
    pub fn ticket(&self) -> Option<u64> {
        let state = *self.state_tx.borrow();
        state
            .until
            .is_none_or(|until| Instant::now() < until)
            .then_some(state.lapses)
    }

    /// Whether the lease holds now and has not lapsed since `ticket` was taken.
    pub fn holds(&self, ticket: Option<u64>) -> bool {
        let state = *self.state_tx.borrow();
        ticket == Some(state.lapses) && state.until.is_none_or(|until| Instant::now() < until)
    }

    /// Waits until the lease is current; returns the lapse count at that moment.
    pub async fn wait_open(&self) -> u64 {
        let mut state_rx = self.state_tx.subscribe();
        loop {
            let state = *state_rx.borrow_and_update();
            match state.until {
                None => return state.lapses,
                Some(until) if Instant::now() < until => return state.lapses,
                Some(_) => {}
            }
            // Wake on a renewal, or re-check now and then in case the clock moved on.
            let _ = tokio::time::timeout(Duration::from_millis(100), state_rx.changed()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_gate_never_closes() {
        let gate = Gate::open();
        assert!(gate.is_open());
        assert_eq!(gate.lapses(), 0);
    }

    #[test]
    fn a_lease_known_lost_voids_the_tickets_taken_while_it_held() {
        let gate = Gate::closed();
        gate.renewed(Instant::now() + Duration::from_secs(60));
        let ticket = gate.ticket();
        assert!(gate.holds(ticket));
        gate.lapsed();
        assert!(!gate.is_open());
        assert!(!gate.holds(ticket));
        gate.renewed(Instant::now() + Duration::from_secs(60));
        assert!(gate.is_open());
        assert!(
            !gate.holds(ticket),
            "a ticket from before the loss stays void"
        );
        assert!(gate.holds(gate.ticket()));
    }

    #[test]
    fn renewal_after_expiry_counts_a_lapse() {
        let gate = Gate::closed();
        assert!(!gate.is_open());
        gate.renewed(Instant::now() + Duration::from_secs(60));
        assert!(gate.is_open());
        assert_eq!(gate.lapses(), 1);
        // Renewed in time: no lapse.
        gate.renewed(Instant::now() + Duration::from_secs(60));
        assert_eq!(gate.lapses(), 1);
    }

    #[test]
    fn a_ticket_holds_only_until_the_lease_lapses() {
        let gate = Gate::closed();
        assert_eq!(gate.ticket(), None, "no ticket while the lease has lapsed");
        assert!(!gate.holds(None));
        gate.renewed(Instant::now() + Duration::from_secs(60));
        let ticket = gate.ticket();
        assert!(gate.holds(ticket));
        gate.renewed(Instant::now() + Duration::from_secs(60));
        assert!(gate.holds(ticket), "renewed in time");
        gate.renewed(Instant::now());
        assert!(!gate.holds(ticket), "lapsed");
        gate.renewed(Instant::now() + Duration::from_secs(60));
        assert!(!gate.holds(ticket), "renewed after the lapse");
        assert!(gate.holds(gate.ticket()));
        assert!(Gate::open().holds(Gate::open().ticket()));
    }

    #[tokio::test]
    async fn wait_open_returns_once_renewed() {
        let gate = std::sync::Arc::new(Gate::closed());
        let waiter = tokio::spawn({
            let gate = std::sync::Arc::clone(&gate);
            async move { gate.wait_open().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        gate.renewed(Instant::now() + Duration::from_secs(60));
        let lapses = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(lapses, 1);
    }
}
