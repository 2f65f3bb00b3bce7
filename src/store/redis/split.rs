//! Split orders (`StoredForm::Split`, `database.split_orders`): an order's hash keeps what never
//! changes (`head`) and its payload apart, written once when it is created, each of its steps in
//! a field of its own (`s0` to `s5`), and the rest in `doc`. A write sends `doc` and only the
//! steps that changed since a base: the revision whose steps this node wrote last, which the
//! hash names in `sv`. The script takes such a write only when `sv` still names that base (and
//! the owner and epoch are the writer's), and otherwise asks for the write with every step.
//! So a transition sends a few hundred bytes, not the whole order, whatever its steps' outputs
//! hold: Redis hashes, copies and appends to its append-only file that much less.

use super::commits::Write;
use crate::order::{IdMap, Order, OrderId, StepEntry};
use crate::store::doc;
use crate::store::StoreError;
use std::sync::{Mutex, MutexGuard};

/// How many steps a split order keeps: as many as there are step names (an order's steps are
/// its four work steps and `Completed` or `Failed`).
pub const SPLIT_STEPS: usize = crate::order::Step::ALL.len();

/// The hash fields of a split order's steps, in its steps' order.
pub const STEP_FIELDS: [&str; SPLIT_STEPS] = ["s0", "s1", "s2", "s3", "s4", "s5"];

/// How many orders' steps are remembered at most: more (orders this node stopped writing
/// without finishing them, taken over by another node) and all are forgotten. Forgetting only
/// costs the next write of each order its whole steps.
const REMEMBERED: usize = 65_536;

/// An order's steps as one write sent them: its epoch and revision, and the steps. They share
/// their outputs with the order, so remembering them costs little past the outputs it holds.
pub struct Steps {
    epoch: u64,
    revision: u64,
    steps: Vec<StepEntry>,
}

impl Steps {
    /// `order`'s steps.
    fn of(order: &Order) -> Result<Steps, StoreError> {
        if order.steps.len() > SPLIT_STEPS {
            return Err(StoreError::Corrupt(format!(
                "a split order keeps at most {SPLIT_STEPS} steps, this one has {}",
                order.steps.len()
            )));
        }
        Ok(Steps {
            epoch: order.epoch,
            revision: order.revision,
            steps: order.steps.clone(),
        })
    }
}

/// The steps of the split orders this node wrote last, by order: what its next write of each
/// can leave out.
#[derive(Default)]
pub struct Written {
    steps: Mutex<IdMap<Steps>>,
}

impl Written {
    fn lock(&self) -> MutexGuard<'_, IdMap<Steps>> {
        // A panic while the lock was held leaves at worst a stale entry, which the script's
        // base check refuses.
        self.steps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds to `write` the arguments of a create of the split `order` past the others: its head,
    /// the revision its steps are written at and every step. Answers the steps, for
    /// [`Written::stored`] once the create is.
    pub fn add_create(&self, write: &mut Write, order: &Order) -> Result<Steps, StoreError> {
        let steps = Steps::of(order)?;
        write.arg_with(|bytes| doc::write_head(bytes, order))?;
        write.number(order.revision);
        add_steps(write, &steps, |_| true)?;
        Ok(steps)
    }

    /// Adds to `write` the arguments of a commit of the split `order` past the others: its base
    /// and its steps, only those that changed since the steps this node last wrote of it
    /// (unless `whole`, or there are none it knows to be stored: then every step, with `f` as
    /// its base). Answers the steps, for [`Written::stored`] once the write is.
    pub fn add_commit(
        &self,
        write: &mut Write,
        order: &Order,
        whole: bool,
    ) -> Result<Steps, StoreError> {
        let steps = Steps::of(order)?;
        let remembered = self.lock();
        let base = remembered.get(&order.order_id).filter(|base| {
            !whole
                && base.epoch == order.epoch
                && base.revision < order.revision
                && base.steps.len() <= steps.steps.len()
        });
        match base {
            Some(base) => {
                write.number(base.revision);
                add_steps(write, &steps, |index| {
                    base.steps.get(index) != steps.steps.get(index)
                })?;
            }
            None => {
                write.arg("f");
                add_steps(write, &steps, |_| true)?;
            }
        }
        Ok(steps)
    }

    /// Adds to a reopen of the split `order` (the reopen script's call, `reopen`) its base, `f`,
    /// and every step.
    pub fn add_reopen(
        &self,
        reopen: &mut deadpool_redis::redis::ScriptInvocation<'_>,
        order: &Order,
    ) -> Result<(), StoreError> {
        let steps = Steps::of(order)?;
        reopen.arg("f").arg(steps.steps.len());
        for (field, step) in STEP_FIELDS.iter().zip(&steps.steps) {
            let mut bytes = Vec::new();
            doc::write_step(&mut bytes, step)?;
            reopen.arg(*field).arg(bytes);
        }
        self.forget(order.order_id);
        Ok(())
    }

    /// Remembers `steps` as stored for order `id` (its write was answered `ok`).
    pub fn stored(&self, id: OrderId, steps: Steps) {
        let mut remembered = self.lock();
        if remembered.len() >= REMEMBERED && !remembered.contains_key(&id) {
            remembered.clear();
        }
        remembered.insert(id, steps);
    }

    /// Forgets order `id`'s steps: it finished, or a write of it was refused or may not have
    /// been stored.
    pub fn forget(&self, id: OrderId) {
        self.lock().remove(&id);
    }
}

/// Adds to `write` how many of `steps` `give` picks, then each of those, its field and JSON.
fn add_steps(
    write: &mut Write,
    steps: &Steps,
    give: impl Fn(usize) -> bool,
) -> Result<(), StoreError> {
    let given = (0..steps.steps.len()).filter(|&index| give(index)).count();
    write.steps(given);
    for (index, (field, step)) in STEP_FIELDS.iter().zip(&steps.steps).enumerate() {
        if give(index) {
            write.arg(field);
            write.arg_with(|bytes| doc::write_step(bytes, step))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_fields_are_the_scripts() {
        let script = super::super::scripts::SPLIT;
        let fields = STEP_FIELDS.map(|field| format!("'{field}'")).join(", ");
        assert!(script.contains(&format!("local SLOTS = {{{fields}}}")));
    }
}
