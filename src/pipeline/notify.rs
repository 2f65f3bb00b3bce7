//! The completion webhook: once an order is terminal, its owner POSTs the order (as
//! `GET /orders/{id}` shows it) to `notify.url`, signed so the receiver can tell it came from
//! this service and was not replayed from long ago.
//!
//! Each attempt is one call; the executor owns the retries and stores their schedule with the
//! order, exactly as for an http step, so a delivery survives restarts and takeovers. Delivery
//! is at least once: a receiver recognises a repeat by its `Idempotency-Key`.

use super::client::{target, Client, Target};
use super::handler::StepError;
use super::http::{
    asked_wait, failed_answer, header, transport_error, IDEMPOTENCY_KEY, MAX_RESPONSE_BYTES,
    ORDER_EPOCH, TRACEPARENT,
};
use super::retry::RetryPolicy;
use crate::config::{ConfigError, NotifySettings};
use crate::order::{write_view, Order, VIEW_CAPACITY};
use hmac::{Hmac, Mac};
use hyper::header::{HeaderName, HeaderValue};
use sha2::Sha256;
use std::fmt::Write;

/// The header that carries the signature: `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
const ORDER_SIGNATURE: HeaderName = HeaderName::from_static("order-signature");

pub struct Notifier {
    client: Client,
    settings: NotifySettings,
    /// `settings.url`, as each call's request takes it.
    url: Target,
}

impl Notifier {
    pub fn new(client: Client, settings: NotifySettings) -> Result<Self, ConfigError> {
        let url = target("notify.url", &settings.url)?;
        Ok(Notifier {
            client,
            settings,
            url,
        })
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
        let signed = signature(self.settings.secret.as_bytes(), timestamp, &body);
        let headers = [
            header(
                IDEMPOTENCY_KEY,
                format!("{}:notify:{generation}", order.order_id),
            )?,
            (ORDER_EPOCH, HeaderValue::from(order.epoch)),
            header(TRACEPARENT, crate::trace::child_traceparent(order))?,
            header(ORDER_SIGNATURE, signed)?,
        ]
        .into_iter()
        .chain(crate::trace::tracestate_header(order));
        let timeout = self.settings.timeout;
        let answer = self
            .client
            .post_json(&self.url, headers, body, timeout, MAX_RESPONSE_BYTES)
            .await
            .map_err(|error| transport_error(error, timeout))?;
        match answer.status {
            200..=299 => Ok(answer.status),
            status => Err(failed_answer(
                status,
                asked_wait(&answer.headers),
                &answer.body,
            )),
        }
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
