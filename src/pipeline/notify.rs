//! The completion webhook: once an order is terminal, its owner POSTs the order (as
//! `GET /orders/{id}` shows it) to `notify.url`, signed so the receiver can tell it came from
//! this service and was not replayed from long ago.
//!
//! Each attempt is one call; the executor owns the retries and stores their schedule with the
//! order, exactly as for an http step, so a delivery survives restarts and takeovers. Delivery
//! is at least once: a receiver recognises a repeat by its `Idempotency-Key`.

use super::handler::StepError;
use super::retry::RetryPolicy;
use crate::config::NotifySettings;
use crate::order::{write_view, Order, VIEW_CAPACITY};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt::Write;

/// The header that carries the signature: `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "Order-Signature";

pub struct Notifier {
    client: reqwest::Client,
    settings: NotifySettings,
}

impl Notifier {
    pub fn new(client: reqwest::Client, settings: NotifySettings) -> Self {
        Notifier { client, settings }
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            retries: self.settings.retries,
            backoff: self.settings.backoff,
            backoff_max: self.settings.backoff_max,
        }
    }

    /// One attempt at delivering the order's webhook. `Ok` carries the receiver's status.
    pub async fn send(&self, order: &Order) -> Result<u16, StepError> {
        let mut body = Vec::with_capacity(VIEW_CAPACITY);
        if let Err(error) = write_view(&mut body, order) {
            return Err(StepError::new(format!("cannot encode the order: {error}")));
        }
        let generation = order
            .notification
            .as_ref()
            .map_or(1, |notification| notification.generation);
        let timestamp = chrono::Utc::now().timestamp();
        let response = self
            .client
            .post(self.settings.url.clone())
            .timeout(self.settings.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                "Idempotency-Key",
                format!("{}:notify:{generation}", order.order_id),
            )
            .header(super::http::EPOCH_HEADER, order.epoch)
            .header("traceparent", crate::trace::child_traceparent(order))
            .header(
                SIGNATURE_HEADER,
                signature(self.settings.secret.as_bytes(), timestamp, &body),
            )
            .body(body)
            .send()
            .await
            .map_err(|error| super::http::transport_error(&error, self.settings.timeout))?;
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Ok(status);
        }
        let asked = super::http::asked_wait(response.headers());
        let text = response.bytes().await.unwrap_or_default();
        Err(super::http::failed_answer(status, asked, &text))
    }
}

/// The signature header's value for `body` sent at `timestamp`: HMAC-SHA256 with `secret` over
/// `"{timestamp}.{body}"`, hex.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut value = format!("t={timestamp},v1=");
    for byte in digest {
        let _ = write!(value, "{byte:02x}");
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
        // Reference value from `printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac key`.
        assert_eq!(
            signature(b"key", 1_700_000_000, br#"{"a":1}"#),
            "t=1700000000,v1=a438e398bfafc57e4396bb7fc2304422f0f768e965d073ca313cb52e22e6ad03"
        );
    }
}
