//! Spans of orders, exported over OTLP/HTTP (protobuf) when `[telemetry] otlp_endpoint` is set.
//!
//! A trace of an order holds: the submission (`POST /orders`, kind server) under the caller's
//! span; one `order` span per execution of the order on a node (from being picked up until it
//! finishes, waits for a retry or is let go) under the submission; and under that one span per
//! step call (`step <name>` or `rollback <name>`, kind client) whose span id is the one in the
//! `traceparent` the call sends. Spans are batched and sent from a thread of their own; the
//! batch still queued is sent when the node stops ([`Exporter::shutdown`]).
//!
//! Without an endpoint nothing here records anything: an execution only gets its log span
//! (`order_id`, `trace_id`), and each call a `traceparent` with a random span id.

use super::{context_of, SpanId, TraceContext, TraceId};
use crate::config::TelemetryConfig;
use crate::order::Order;
use futures_util::future::Either;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};
use opentelemetry_sdk::Resource;
use std::future::Future;
use std::sync::OnceLock;
use tracing::Instrument as _;

/// The tracer of the installed exporter; unset when spans are not exported.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The installed span exporter; [`Exporter::shutdown`] sends what is still queued.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Sends the spans still queued and stops the export thread.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(error = %error, "cannot send the last spans");
        }
    }
}

/// The URL spans are posted to: the endpoint's `/v1/traces`.
pub fn traces_url(endpoint: &reqwest::Url) -> String {
    format!("{}/v1/traces", endpoint.as_str().trim_end_matches('/'))
}

/// Starts exporting spans when the config names an OTLP endpoint; `None` when it does not.
/// Call it outside the async runtime (the exporter's HTTP client is a blocking one).
pub fn install(config: &TelemetryConfig) -> anyhow::Result<Option<Exporter>> {
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(traces_url(endpoint))
        .with_timeout(config.export_timeout)
        .build()
        .map_err(|error| anyhow::anyhow!("cannot build the OTLP span exporter: {error}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(crate::about::SERVICE_NAME)
                .with_attribute(KeyValue::new("service.version", crate::about::VERSION))
                .build(),
        )
        .build();
    if TRACER
        .set(provider.tracer(crate::about::SERVICE_NAME))
        .is_err()
    {
        anyhow::bail!("spans are already exported");
    }
    Ok(Some(Exporter { provider }))
}

fn trace_id(id: opentelemetry::trace::TraceId) -> TraceId {
    TraceId(u128::from_be_bytes(id.to_bytes()))
}

fn span_id(id: opentelemetry::trace::SpanId) -> SpanId {
    SpanId(u64::from_be_bytes(id.to_bytes()))
}

/// A context whose span is the (remote) parent a trace context names.
fn remote_parent(trace: &TraceContext) -> Context {
    let parent = SpanContext::new(
        opentelemetry::trace::TraceId::from_bytes(trace.trace_id.0.to_be_bytes()),
        opentelemetry::trace::SpanId::from_bytes(trace.parent_id.0.to_be_bytes()),
        TraceFlags::new(trace.flags),
        true,
        TraceState::NONE,
    );
    Context::new().with_remote_span_context(parent)
}

/// The span of a submission, ended when dropped (after the answer is made).
pub struct Submission(Option<Span>);

impl Submission {
    /// Names the order the submission created (or found under its idempotency key).
    pub fn note_order(&mut self, order_id: crate::order::OrderId) {
        if let Some(span) = &mut self.0 {
            span.set_attribute(KeyValue::new("order_id", order_id.to_string()));
        }
    }
}

/// The trace a new order belongs to, given the caller's trace context if it sent a valid one:
/// the caller's trace, or a new one. With spans exported, the submission is a span of that
/// trace and the order's spans hang under it; else under the caller's span.
pub fn submission(caller: Option<TraceContext>) -> (TraceContext, Submission) {
    let Some(tracer) = TRACER.get() else {
        return (
            caller.unwrap_or_else(TraceContext::new_root),
            Submission(None),
        );
    };
    let parent = caller.as_ref().map_or_else(Context::new, remote_parent);
    let span = tracer
        .span_builder("POST /orders")
        .with_kind(SpanKind::Server)
        .start_with_context(tracer, &parent);
    let own = span.span_context();
    if !own.is_valid() {
        // A tracer already shut down gives all-zero ids, which no trace context may carry.
        return (
            caller.unwrap_or_else(TraceContext::new_root),
            Submission(None),
        );
    }
    let context = TraceContext {
        trace_id: trace_id(own.trace_id()),
        parent_id: span_id(own.span_id()),
        // The sampler's decision (the caller's, with the default parent-based sampler): what
        // the order's calls tell their services is whether spans of this trace are exported.
        flags: own.trace_flags().to_u8() & super::SAMPLED,
        state: caller.and_then(|caller| caller.state),
    };
    (context, Submission(Some(span)))
}

/// One execution of an order on this node: what its spans need to know of the order.
pub struct Execution {
    order_id: crate::order::OrderId,
    current_step: crate::order::Step,
    trace: TraceContext,
}

impl Execution {
    pub fn of(order: &Order) -> Execution {
        Execution {
            order_id: order.order_id,
            current_step: order.current_step,
            trace: context_of(order).into_owned(),
        }
    }

    /// Runs the execution (`work`) in its log span, so every line logged inside carries
    /// `order_id` and `trace_id`; with spans exported, also as the `order` span of its trace.
    pub fn run<F: Future>(self, work: F) -> impl Future<Output = F::Output> {
        // Made at the error level: a span's level only decides whether it is kept, and it must
        // be kept whenever a line about the order can be logged.
        let work = work.instrument(tracing::error_span!(
            "order",
            order_id = %self.order_id,
            trace_id = %self.trace.trace_id
        ));
        let Some(tracer) = TRACER.get() else {
            return Either::Left(work);
        };
        let span = tracer
            .span_builder("order")
            .with_attributes([
                KeyValue::new("order_id", self.order_id.to_string()),
                KeyValue::new("current_step", self.current_step.as_str()),
            ])
            .start_with_context(tracer, &remote_parent(&self.trace));
        Either::Right(work.with_context(Context::new().with_span(span)))
    }
}

/// One call made for a step: its `traceparent`, and with spans exported its client span.
pub struct Call {
    trace_id: TraceId,
    flags: u8,
    /// The span the call stands for: the client span's when spans are exported.
    span_id: SpanId,
    /// Boxed: a call is kept with every order parked on a step, mostly with no span.
    span: Option<Box<Span>>,
}

impl Call {
    /// A call for attempt `attempt` at running (or rolling back) `step` of `order`. Its span
    /// is a child of the execution's `order` span when there is one.
    pub fn start(order: &Order, step: crate::order::Step, rollback: bool, attempt: u32) -> Call {
        let trace = context_of(order);
        let Some(tracer) = TRACER.get() else {
            return Call {
                trace_id: trace.trace_id,
                flags: trace.flags,
                span_id: SpanId::random(),
                span: None,
            };
        };
        let current = Context::current();
        let parent = if trace_id(current.span().span_context().trace_id()) == trace.trace_id {
            current
        } else {
            remote_parent(&trace)
        };
        let name = if rollback { "rollback" } else { "step" };
        let span = tracer
            .span_builder(format!("{name} {step}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("order_id", order.order_id.to_string()),
                KeyValue::new("step", step.as_str()),
                KeyValue::new("attempt", i64::from(attempt)),
                KeyValue::new("rollback", rollback),
            ])
            .start_with_context(tracer, &parent);
        Call {
            trace_id: trace.trace_id,
            // Whether this call's span is exported: the span the service's spans hang under.
            flags: span.span_context().trace_flags().to_u8() & super::SAMPLED,
            span_id: span_id(span.span_context().span_id()),
            span: Some(Box::new(span)),
        }
    }

    /// The `traceparent` header value the call sends (made when asked: a simulated step makes
    /// no call).
    pub fn traceparent(&self) -> String {
        super::traceparent(self.trace_id, self.span_id, self.flags)
    }

    /// Ends the call's span with how it went: `outcome` (`succeeded`, `failed`, …), the HTTP
    /// status if a service answered, the failure's reason if it failed.
    pub fn end(self, outcome: &'static str, status: Option<u16>, error: Option<&str>) {
        let Some(mut span) = self.span else {
            return;
        };
        span.set_attribute(KeyValue::new("outcome", outcome));
        if let Some(status) = status {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        if let Some(error) = error {
            span.set_status(Status::error(error.to_string()));
        }
        span.end();
    }
}
