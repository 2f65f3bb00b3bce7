//! The built-in `simulate` handler: sleeps, then fails with a configured probability or where the
//! payload says `{"simulate": {"fail_at": "<step>"}}`, or succeeds, with an output of
//! `output_bytes` when set. Its rollback always succeeds.

use super::handler::{Decided, StepContext, StepDone, StepError, StepHandler};
use crate::config::SimulateConfig;
use crate::order::Output;
use async_trait::async_trait;
use rand::Rng;

pub struct Simulate {
    settings: SimulateConfig,
}

impl Simulate {
    pub fn new(settings: SimulateConfig) -> Self {
        Simulate { settings }
    }
}

/// The step a payload asks to fail at, if any.
fn fail_at(payload: &serde_json::Value) -> Option<&str> {
    payload.get("simulate")?.get("fail_at")?.as_str()
}

impl Simulate {
    /// How the attempt ends, decided as it starts.
    fn outcome(&self, context: &StepContext<'_>) -> Result<StepDone, StepError> {
        if fail_at(&context.order.payload) == Some(context.step.as_str()) {
            return Err(StepError::new("simulated failure"));
        }
        if self.settings.failure_rate > 0.0 && rand::rng().random_bool(self.settings.failure_rate) {
            return Err(StepError::new("random failure"));
        }
        let output = (self.settings.output_bytes > 0).then(|| {
            let pad = "x".repeat(self.settings.output_bytes.saturating_sub(10));
            Output::of(&serde_json::json!({ "pad": pad }))
        });
        let output = output
            .transpose()
            .map_err(|error| StepError::new(format!("cannot write the output: {error}")))?;
        Ok(StepDone {
            output,
            status: None,
        })
    }
}

#[async_trait]
impl StepHandler for Simulate {
    async fn run(&self, context: &StepContext<'_>) -> Result<StepDone, StepError> {
        if !self.settings.duration.is_zero() {
            tokio::time::sleep(self.settings.duration).await;
        }
        self.outcome(context)
    }

    /// A step that takes time is held as data while it "runs"; one that takes none is run, and
    /// a rollback takes none.
    fn decided(&self, context: &StepContext<'_>, rollback: bool) -> Option<Decided> {
        (!rollback && !self.settings.duration.is_zero()).then(|| Decided {
            lasts: self.settings.duration,
            result: self.outcome(context),
        })
    }

    async fn rollback(&self, _context: &StepContext<'_>) -> Result<StepDone, StepError> {
        Ok(StepDone::default())
    }
}
