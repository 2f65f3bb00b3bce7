//! The built-in `http` handler: each attempt POSTs the order as JSON to the step's URL (to run it)
//! or its rollback URL (to undo it), with an `Idempotency-Key` header.
//!
//! A 2xx answer is success, and its JSON body becomes the step's output. A 4xx is a permanent
//! failure whose text becomes the reason; a 5xx, a timeout or a connection error is worth a
//! retry. Redirects are not followed (a POST turned into a GET would lose the order). The
//! handler makes one attempt per call; the executor owns the retries and their schedule.

use super::handler::{StepContext, StepDone, StepError, StepHandler};
use super::retry::RetryPolicy;
use crate::config::HttpSettings;
use crate::order::{OrderId, Step};
use async_trait::async_trait;
use serde::Serialize;
use std::time::Duration;
use tracing::warn;

/// The most of a response body that is read; a longer success body is not kept as output.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The most of a failure text kept as a reason.
const MAX_REASON_CHARS: usize = 500;

/// The JSON body of every call.
#[derive(Debug, Serialize)]
struct StepRequest<'a> {
    order_id: OrderId,
    step: Step,
    attempt: u32,
    rollback: bool,
    user: &'a str,
    payload: &'a serde_json::Value,
    /// Outputs of the steps that produced one so far, by step name.
    outputs: serde_json::Map<String, serde_json::Value>,
}

/// The one HTTP client every `http` step shares (connection pooling, one DNS cache).
pub fn client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("order-process/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
}

pub struct Http {
    client: reqwest::Client,
    settings: HttpSettings,
}

impl Http {
    pub fn new(client: reqwest::Client, settings: HttpSettings) -> Self {
        Http { client, settings }
    }

    async fn call(
        &self,
        url: &reqwest::Url,
        context: &StepContext<'_>,
        rollback: bool,
    ) -> Result<StepDone, StepError> {
        let body = StepRequest {
            order_id: context.order.order_id,
            step: context.step,
            attempt: context.attempt,
            rollback,
            user: &context.order.user,
            payload: &context.order.payload,
            outputs: context.order.outputs(),
        };
        let sent = self
            .client
            .post(url.clone())
            .timeout(self.settings.timeout)
            .header("Idempotency-Key", &context.idempotency_key)
            .header("traceparent", context.traceparent())
            .json(&body)
            .send()
            .await;
        let mut response = sent.map_err(|error| transport_error(&error, self.settings.timeout))?;
        let status = response.status().as_u16();
        let mut text = Vec::new();
        let mut truncated = false;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_RESPONSE_BYTES.saturating_sub(text.len());
                    if chunk.len() > room {
                        text.extend_from_slice(&chunk[..room]);
                        truncated = true;
                        break;
                    }
                    text.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(error) => {
                    return Err(transport_error(&error, self.settings.timeout).with_status(status))
                }
            }
        }
        let text_reason = || {
            let text = String::from_utf8_lossy(&text);
            let text = text.trim();
            if text.is_empty() {
                format!("HTTP {status}")
            } else {
                shorten(text)
            }
        };
        match status {
            200..=299 => Ok(StepDone {
                output: output(&text, truncated, context),
                status: Some(status),
            }),
            400..=499 => Err(StepError::new(text_reason()).with_status(status)),
            500..=599 => Err(
                StepError::retryable(format!("HTTP {status}: {}", text_reason()))
                    .with_status(status),
            ),
            _ => Err(StepError::new(format!("unexpected HTTP {status}")).with_status(status)),
        }
    }
}

/// The step output in a 2xx body: its JSON, if it is JSON. Anything else is logged and dropped.
fn output(body: &[u8], truncated: bool, context: &StepContext<'_>) -> Option<serde_json::Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    if truncated {
        warn!(order_id = %context.order.order_id, step = %context.step, limit = MAX_RESPONSE_BYTES, "step answer too large to keep as output");
        return None;
    }
    match serde_json::from_slice(body) {
        Ok(value) => Some(value),
        Err(error) => {
            warn!(order_id = %context.order.order_id, step = %context.step, error = %error, "step answer is not JSON, not kept as output");
            None
        }
    }
}

/// A failure before a full answer arrived: always worth a retry.
fn transport_error(error: &reqwest::Error, timeout: Duration) -> StepError {
    if error.is_timeout() {
        return StepError::retryable(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ));
    }
    // reqwest's own message is generic; the cause (refused, reset, DNS) is in the chain.
    let mut reason = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        reason.push_str(": ");
        reason.push_str(&cause.to_string());
        source = cause.source();
    }
    StepError::retryable(shorten(&reason))
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_REASON_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

#[async_trait]
impl StepHandler for Http {
    async fn run(&self, context: &StepContext<'_>) -> Result<StepDone, StepError> {
        self.call(&self.settings.url, context, false).await
    }

    async fn rollback(&self, context: &StepContext<'_>) -> Result<StepDone, StepError> {
        match &self.settings.rollback_url {
            Some(url) => self.call(url, context, true).await,
            // Nothing to undo.
            None => Ok(StepDone::default()),
        }
    }

    fn retry_policy(&self, rollback: bool) -> Option<RetryPolicy> {
        if rollback && self.settings.rollback_url.is_none() {
            return None;
        }
        Some(RetryPolicy::from(&self.settings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::Order;

    fn settings(rollback_url: Option<&str>) -> HttpSettings {
        HttpSettings {
            url: reqwest::Url::parse("http://127.0.0.1:9/charge").unwrap(),
            rollback_url: rollback_url.map(|url| reqwest::Url::parse(url).unwrap()),
            timeout: Duration::from_secs(1),
            retries: 4,
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        }
    }

    /// An order to make requests for.
    fn order() -> Order {
        Order::new(
            OrderId::nil(),
            "alice".into(),
            serde_json::json!({}),
            "node".into(),
            chrono::Utc::now(),
        )
    }

    #[tokio::test]
    async fn without_rollback_url_there_is_nothing_to_undo() {
        let handler = Http::new(client().unwrap(), settings(None));
        assert_eq!(handler.retry_policy(true), None);
        assert_eq!(handler.retry_policy(false).map(|p| p.retries), Some(4));
        let order = order();
        let context = StepContext::attempt(&order, Step::Processing, true, 1);
        assert_eq!(handler.rollback(&context).await, Ok(StepDone::default()));
        let with = Http::new(
            client().unwrap(),
            settings(Some("http://127.0.0.1:9/refund")),
        );
        assert!(with.retry_policy(true).is_some());
    }

    #[test]
    fn idempotency_keys_differ_between_run_and_rollback() {
        let order = order();
        let run = StepContext::attempt(&order, Step::Processing, false, 3);
        let undo = StepContext::attempt(&order, Step::Processing, true, 1);
        assert_eq!(
            run.idempotency_key,
            format!("{}:Processing", OrderId::nil())
        );
        assert_eq!(
            undo.idempotency_key,
            format!("{}:Processing:rollback", OrderId::nil())
        );
    }

    #[test]
    fn long_reasons_are_shortened_on_a_char_boundary() {
        let long = "é".repeat(MAX_REASON_CHARS + 10);
        let short = shorten(&long);
        assert_eq!(short.chars().count(), MAX_REASON_CHARS + 1);
        assert!(short.ends_with('…'));
        assert_eq!(shorten("fine"), "fine");
    }
}
