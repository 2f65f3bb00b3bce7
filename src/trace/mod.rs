//! W3C trace context for orders: the `traceparent` a client sends with `POST /orders` is kept
//! with the order ([`TraceContext`]), every call the order's steps make carries a `traceparent`
//! of that trace with a span id of its own ([`child_traceparent`]), and every log line of an
//! order's execution carries its `trace_id`. With `[telemetry] otlp_endpoint` set, the spans of
//! each execution are exported over OTLP/HTTP too ([`spans`]).
//!
//! The format is W3C Trace Context level 1: `00-<32 hex trace id>-<16 hex parent id>-<2 hex
//! flags>`. A header that is not of that form is ignored and a new trace started, as the
//! recommendation says; it is never an error.

pub mod spans;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// The `sampled` flag: the caller records this trace.
pub const SAMPLED: u8 = 0x01;
/// The longest `tracestate` kept (the recommendation asks to propagate at least 512 bytes).
const MAX_TRACESTATE: usize = 512;

/// A trace id: 16 bytes, never all zero; shown as 32 lower-case hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub u128);

/// A span id: 8 bytes, never all zero; shown as 16 lower-case hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanId(pub u64);

impl TraceId {
    /// A new random trace id.
    pub fn random() -> TraceId {
        TraceId(rand::random::<u128>().max(1))
    }
}

impl SpanId {
    /// A new random span id.
    pub fn random() -> SpanId {
        SpanId(rand::random::<u64>().max(1))
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// The low `N / 2` bytes of `value` as `N` lower-case hex digits, without the formatting
/// machinery: ids are written for every commit of an order and every call it makes.
fn encode<const N: usize>(value: u128) -> [u8; N] {
    let mut digits = [0u8; N];
    for (index, digit) in digits.iter_mut().enumerate() {
        let nibble = (value >> (4 * (N - 1 - index))) & 0xf;
        *digit = HEX_DIGITS[nibble as usize];
    }
    digits
}

/// Hex digits as text (they are always ASCII).
fn text(digits: &[u8]) -> &str {
    std::str::from_utf8(digits).unwrap_or_default()
}

impl TraceId {
    /// The 32 lower-case hex digits.
    pub fn hex(&self) -> [u8; 32] {
        encode::<32>(self.0)
    }
}

impl SpanId {
    /// The 16 lower-case hex digits.
    pub fn hex(&self) -> [u8; 16] {
        encode::<16>(u128::from(self.0))
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(text(&self.hex()))
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(text(&self.hex()))
    }
}

/// Whether `text` is exactly `digits` lower-case hex digits (the spec allows no upper case).
fn is_lower_hex(text: &str, digits: usize) -> bool {
    text.len() == digits && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `text` as a number if it is exactly `digits` lower-case hex digits, not all zero.
fn hex(text: &str, digits: usize) -> Option<u128> {
    if !is_lower_hex(text, digits) {
        return None;
    }
    u128::from_str_radix(text, 16)
        .ok()
        .filter(|value| *value != 0)
}

impl TraceId {
    pub fn parse(text: &str) -> Option<TraceId> {
        hex(text, 32).map(TraceId)
    }
}

impl SpanId {
    pub fn parse(text: &str) -> Option<SpanId> {
        hex(text, 16)
            .and_then(|value| u64::try_from(value).ok())
            .map(SpanId)
    }
}

impl Serialize for TraceId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(text(&self.hex()))
    }
}

impl Serialize for SpanId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(text(&self.hex()))
    }
}

/// Reads an id from a string without copying it: `parse` it, or fail with `expected`.
struct IdVisitor<T> {
    parse: fn(&str) -> Option<T>,
    expected: &'static str,
}

impl<T> serde::de::Visitor<'_> for IdVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expected)
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<T, E> {
        (self.parse)(value).ok_or_else(|| E::custom(format!("expected {}", self.expected)))
    }
}

impl<'de> Deserialize<'de> for TraceId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(IdVisitor {
            parse: TraceId::parse,
            expected: "a trace id of 32 hex digits, not all zero",
        })
    }
}

impl<'de> Deserialize<'de> for SpanId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(IdVisitor {
            parse: SpanId::parse,
            expected: "a span id of 16 hex digits, not all zero",
        })
    }
}

/// The `traceparent` header value naming span `span` of trace `trace_id`.
pub fn traceparent(trace_id: TraceId, span: SpanId, flags: u8) -> String {
    let mut header = String::with_capacity(55);
    header.push_str("00-");
    header.push_str(text(&encode::<32>(trace_id.0)));
    header.push('-');
    header.push_str(text(&encode::<16>(u128::from(span.0))));
    header.push('-');
    header.push_str(text(&encode::<2>(u128::from(flags))));
    header
}

/// The trace an order belongs to, kept with the order: the trace id, the span the order's own
/// spans hang under (the caller's, or the submission's when spans are exported), and the flags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub trace_id: TraceId,
    /// The span to use as the parent of the order's spans.
    pub parent_id: SpanId,
    /// The trace flags; bit 0 is `sampled`.
    pub flags: u8,
    /// The caller's `tracestate`, passed on unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

impl TraceContext {
    /// A new trace, started here and sampled.
    pub fn new_root() -> TraceContext {
        TraceContext {
            trace_id: TraceId::random(),
            parent_id: SpanId::random(),
            flags: SAMPLED,
            state: None,
        }
    }

    /// Parses a `traceparent` header value (and keeps a `tracestate` with it); `None` when it is
    /// not a valid one. A later version than `00` is read by its first four fields, as the
    /// recommendation says; `ff` is never valid.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        let text = traceparent.trim_matches([' ', '\t']);
        let version = text.get(..2)?;
        if !is_lower_hex(version, 2) || version == "ff" {
            return None;
        }
        // Version 00 is exactly 55 characters; a later one may add fields after a `-`.
        let head = if version == "00" || text.len() == 55 {
            Some(text).filter(|text| text.len() == 55)?
        } else if text.as_bytes().get(55) == Some(&b'-') {
            text.get(..55)?
        } else {
            return None;
        };
        let bytes = head.as_bytes();
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let trace_id = TraceId::parse(head.get(3..35)?)?;
        let parent_id = SpanId::parse(head.get(36..52)?)?;
        let flags = head.get(53..55).filter(|flags| is_lower_hex(flags, 2))?;
        // Only `sampled` goes on: the spec has a tracer pass no flag it does not know.
        let flags = u8::from_str_radix(flags, 16).ok()? & SAMPLED;
        let state = tracestate
            .map(str::trim)
            .filter(|state| !state.is_empty() && state.len() <= MAX_TRACESTATE)
            .map(str::to_string);
        Some(TraceContext {
            trace_id,
            parent_id,
            flags,
            state,
        })
    }

    /// The `traceparent` of a span `span` of this trace.
    pub fn traceparent(&self, span: SpanId) -> String {
        traceparent(self.trace_id, span, self.flags)
    }

    pub fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

/// The trace context of an order. An order stored before orders kept one gets a trace id made
/// from its order id, so every call it makes still names the same trace.
pub fn context_of(order: &crate::order::Order) -> std::borrow::Cow<'_, TraceContext> {
    match &order.trace {
        Some(trace) => std::borrow::Cow::Borrowed(trace),
        None => std::borrow::Cow::Owned(TraceContext {
            trace_id: TraceId(order.order_id.as_u128().max(1)),
            parent_id: SpanId(order.order_id.as_u64_pair().1.max(1)),
            flags: SAMPLED,
            state: None,
        }),
    }
}

/// The order's trace id, for its JSON view and its log lines.
pub fn trace_id(order: &crate::order::Order) -> TraceId {
    context_of(order).trace_id
}

/// A `traceparent` for one outgoing call made for `order`: the order's trace id and flags, and a
/// new span id standing for that call. Every step call carries one; anything else that calls
/// out for an order (a webhook, say) should send one too, made here.
pub fn child_traceparent(order: &crate::order::Order) -> String {
    context_of(order).traceparent(SpanId::random())
}

/// The `tracestate` header a call made for `order` carries with its `traceparent`: the one the
/// order was submitted with, passed on unchanged (W3C trace context asks it of everyone who
/// continues a trace); none when it had none.
pub fn tracestate_header(
    order: &crate::order::Order,
) -> Option<(hyper::header::HeaderName, hyper::header::HeaderValue)> {
    let state = order.trace.as_ref()?.state.as_deref()?;
    let value = hyper::header::HeaderValue::from_str(state).ok()?;
    Some((hyper::header::HeaderName::from_static("tracestate"), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example() {
        let context = TraceContext::parse(VALID, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(
            context.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.parent_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(context.flags, 1);
        assert!(context.is_sampled());
        assert_eq!(context.state.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(context.traceparent(context.parent_id), VALID);
    }

    #[test]
    fn keeps_flags_and_formats_with_leading_zeros() {
        let context = TraceContext::parse(
            "00-00000000000000000000000000000001-0000000000000002-00",
            None,
        )
        .unwrap();
        assert!(!context.is_sampled());
        assert_eq!(
            context.traceparent(SpanId(0xab)),
            "00-00000000000000000000000000000001-00000000000000ab-00"
        );
    }

    #[test]
    fn passes_on_only_the_sampled_flag() {
        for (flags, kept) in [("ff", "01"), ("fe", "00"), ("03", "01")] {
            let header = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
            let context = TraceContext::parse(&header, None).unwrap();
            assert!(context.traceparent(SpanId(1)).ends_with(kept), "{flags}");
        }
    }

    #[test]
    fn rejects_what_the_spec_rejects() {
        for bad in [
            "",
            "00",
            "garbage",
            // all-zero trace id, all-zero parent id
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // upper case, wrong lengths, bad flags
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            // version 00 has exactly four fields; ff is forbidden; a version is two hex digits
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "xx-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad}");
        }
    }

    #[test]
    fn reads_a_later_version_by_its_first_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        let context = TraceContext::parse(later, None).unwrap();
        assert_eq!(context.traceparent(context.parent_id), VALID);
    }

    #[test]
    fn drops_an_empty_or_oversized_tracestate() {
        let empty = TraceContext::parse(VALID, Some("  ")).unwrap();
        assert_eq!(empty.state, None);
        let huge = "a=".to_string() + &"b".repeat(MAX_TRACESTATE);
        assert_eq!(TraceContext::parse(VALID, Some(&huge)).unwrap().state, None);
    }

    #[test]
    fn new_ids_are_never_zero_and_differ() {
        let root = TraceContext::new_root();
        assert_ne!(root.trace_id.0, 0);
        assert_ne!(root.parent_id.0, 0);
        assert!(root.is_sampled());
        assert_ne!(SpanId::random(), SpanId::random());
    }

    #[test]
    fn round_trips_as_json() {
        let context = TraceContext::parse(VALID, Some("congo=t61rcWkgMzE")).unwrap();
        let json = serde_json::to_value(&context).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                "parent_id": "00f067aa0ba902b7",
                "flags": 1,
                "state": "congo=t61rcWkgMzE",
            })
        );
        assert_eq!(
            serde_json::from_value::<TraceContext>(json).unwrap(),
            context
        );
        let bad = serde_json::json!({"trace_id": "0", "parent_id": "00f067aa0ba902b7", "flags": 1});
        assert!(serde_json::from_value::<TraceContext>(bad).is_err());
    }

    #[test]
    fn orders_stored_without_a_trace_still_decode() {
        let mut order = crate::order::Order::new(
            uuid::Uuid::now_v7(),
            "alice".into(),
            serde_json::json!({}),
            "node".into(),
            chrono::Utc::now(),
        );
        let stored = serde_json::to_value(&order).unwrap();
        assert!(stored.get("trace").is_none(), "{stored}");
        let decoded: crate::order::Order = serde_json::from_value(stored).unwrap();
        assert_eq!(decoded.trace, None);
        order.trace = TraceContext::parse(VALID, None);
        let stored = serde_json::to_vec(&order).unwrap();
        let decoded: crate::order::Order = serde_json::from_slice(&stored).unwrap();
        assert_eq!(decoded, order);
        let view = serde_json::to_value(crate::order::OrderView::from(&order)).unwrap();
        assert_eq!(view["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn child_traceparents_keep_the_trace_and_take_new_spans() {
        let mut order = crate::order::Order::new(
            uuid::Uuid::now_v7(),
            "alice".into(),
            serde_json::json!({}),
            "node".into(),
            chrono::Utc::now(),
        );
        // An order stored before orders kept a trace: its trace comes from its id.
        let legacy = child_traceparent(&order);
        assert_eq!(&legacy[3..35], format!("{:032x}", order.order_id.as_u128()));
        assert_eq!(trace_id(&order).to_string(), &legacy[3..35]);
        order.trace = TraceContext::parse(VALID, None);
        let first = child_traceparent(&order);
        let second = child_traceparent(&order);
        for header in [&first, &second] {
            let parsed = TraceContext::parse(header, None).unwrap();
            assert_eq!(
                parsed.trace_id.to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            assert_ne!(parsed.parent_id.to_string(), "00f067aa0ba902b7");
            assert_eq!(parsed.flags, 1);
        }
        assert_ne!(first, second);
    }
}
