//! W3C trace context: the `traceparent` of a submission is kept with the order, shown by
//! `GET /orders/{id}`, carried by every step call (with a span id of its own) and by the
//! node's log lines; with `[telemetry] otlp_endpoint` the order's spans reach an OTLP/HTTP
//! receiver. The services and the receiver are one small warp server run by the test, which
//! records every POST it gets.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use reqwest::Method;
use serde_json::Value;

use crate::harness::{pretty, simulate, unique_user, Node, POLL, TERMINAL};
use order_process_testkit::poll::until;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
/// The caller's trace context, as the W3C recommendation's example has it.
const GIVEN: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// Where each step's service is on the recorder.
const STEPS: [(&str, &str); 4] = [
    ("Scheduling", "/schedule"),
    ("Pre-Processing", "/reserve"),
    ("Processing", "/charge"),
    ("Post-Processing", "/ship"),
];
/// How long exported spans may take to arrive (the batch is sent every 5 s).
const SPANS_ARRIVE: Duration = Duration::from_secs(30);

/// One POST the recorder got.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    traceparent: Option<String>,
    tracestate: Option<String>,
    body: Bytes,
}

/// A warp server on a free loopback port that answers every POST with 200 (`{}` for the step
/// services, nothing for `/v1/traces`) and records it; stopped when dropped.
struct Recorder {
    base: String,
    received: Arc<Mutex<Vec<Received>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Recorder {
    async fn start() -> Recorder {
        use warp::Filter;
        let received = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&received);
        let routes = warp::post()
            .and(warp::path::full())
            .and(warp::header::optional::<String>("traceparent"))
            .and(warp::header::optional::<String>("tracestate"))
            .and(warp::body::content_length_limit(16 * 1024 * 1024))
            .and(warp::body::bytes())
            .map(
                move |path: warp::path::FullPath,
                      traceparent: Option<String>,
                      tracestate: Option<String>,
                      body: Bytes| {
                    let path = path.as_str().to_string();
                    let answer = if path == "/v1/traces" { "" } else { "{}" };
                    kept.lock().expect("recorder lock").push(Received {
                        path,
                        traceparent,
                        tracestate,
                        body,
                    });
                    warp::reply::with_header(answer, "content-type", "application/json")
                },
            );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind the recorder");
        let base = format!(
            "http://{}",
            listener.local_addr().expect("recorder address")
        );
        let server = tokio::spawn(warp::serve(routes).incoming(listener).run());
        Recorder {
            base,
            received,
            server,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("recorder lock").clone()
    }

    /// The step calls made for one order, in the order they came.
    fn step_calls(&self, order_id: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|call| call.path != "/v1/traces")
            .filter(|call| {
                serde_json::from_slice::<Value>(&call.body)
                    .is_ok_and(|body| body["order_id"] == order_id)
            })
            .collect()
    }

    /// Every span exported to `/v1/traces` so far.
    fn spans(&self) -> Vec<ExportedSpan> {
        let mut spans = Vec::new();
        for call in self.received() {
            if call.path != "/v1/traces" {
                continue;
            }
            let request = ExportTraceServiceRequest::decode(call.body.as_ref())
                .expect("an OTLP/HTTP protobuf export request");
            for resource in request.resource_spans {
                for scope in resource.scope_spans {
                    for span in scope.spans {
                        let attribute = |key: &str| {
                            span.attributes
                                .iter()
                                .find(|kv| kv.key == key)
                                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                    AnyValue::StringValue(text) => Some(text.clone()),
                                    AnyValue::IntValue(number) => Some(number.to_string()),
                                    AnyValue::BoolValue(flag) => Some(flag.to_string()),
                                    other => Some(format!("{other:?}")),
                                })
                        };
                        spans.push(ExportedSpan {
                            trace_id: hex(&span.trace_id),
                            span_id: hex(&span.span_id),
                            parent_id: hex(&span.parent_span_id),
                            name: span.name.clone(),
                            kind: span.kind,
                            order_id: attribute("order_id"),
                            attempt: attribute("attempt"),
                            outcome: attribute("outcome"),
                        });
                    }
                }
            }
        }
        spans
    }
}

/// What the tests look at in an exported span.
#[derive(Debug, Clone)]
struct ExportedSpan {
    trace_id: String,
    span_id: String,
    parent_id: String,
    name: String,
    /// OTLP's numbering: 1 internal, 2 server, 3 client.
    kind: i32,
    order_id: Option<String>,
    attempt: Option<String>,
    outcome: Option<String>,
}

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A node config with every step an `http` step on the recorder, plus `extra`.
fn config(recorder: &Recorder, extra: &str) -> String {
    let mut config = simulate("10ms");
    for (step, path) in STEPS {
        config.push_str(&format!(
            "[steps.{step}]\nhandler = \"http\"\nurl = \"{}{path}\"\n",
            recorder.base
        ));
    }
    config.push_str(extra);
    config
}

/// Submits an order with these extra headers; returns its id.
async fn submit(node: &Node, user: &str, headers: &[(&str, &str)]) -> String {
    let mut call = node
        .call(Method::POST, "/orders")
        .user(user)
        .body(r#"{"sku":"A1"}"#);
    for (name, value) in headers {
        call = call.header(name, value);
    }
    let reply = call.send().await;
    let created = node.expect_json(&reply, 201, "submit an order");
    created["order_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no order_id in {}", pretty(&created)))
        .to_string()
}

/// The fields of a `traceparent`: trace id, parent (span) id, flags.
fn fields(traceparent: &str) -> (String, String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {traceparent}");
    assert_eq!(parts[0], "00", "traceparent {traceparent}");
    assert_eq!(parts[1].len(), 32, "traceparent {traceparent}");
    assert_eq!(parts[2].len(), 16, "traceparent {traceparent}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

/// Waits until the order is finished and checks it completed with this trace id; returns the
/// traceparent of each of its step calls, one per step.
async fn completed_calls(node: &Node, recorder: &Recorder, user: &str, id: &str) -> Vec<String> {
    let order = node.wait_terminal(user, id, TERMINAL).await;
    assert_eq!(order["current_step"], "Completed", "{}", pretty(&order));
    let calls = recorder.step_calls(id);
    let paths: Vec<&str> = calls.iter().map(|call| call.path.as_str()).collect();
    assert_eq!(
        paths,
        STEPS.map(|(_, path)| path).to_vec(),
        "one call per step"
    );
    calls
        .iter()
        .map(|call| {
            call.traceparent
                .clone()
                .unwrap_or_else(|| panic!("call to {} without traceparent", call.path))
        })
        .collect()
}

#[tokio::test]
async fn the_callers_trace_is_kept_shown_passed_on_and_logged() {
    let recorder = Recorder::start().await;
    let node = Node::start(&config(&recorder, "")).await;
    let user = unique_user("trace");
    let id = submit(
        &node,
        &user,
        &[
            ("traceparent", GIVEN),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("tracestate", "rojo=00f067aa0ba902b7"),
        ],
    )
    .await;
    let sent = completed_calls(&node, &recorder, &user, &id).await;
    // The caller's tracestate goes with every call, unchanged; two headers are one list.
    let states: Vec<Option<String>> = recorder
        .step_calls(&id)
        .into_iter()
        .map(|call| call.tracestate)
        .collect();
    assert_eq!(
        states,
        vec![Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".to_string()); 4]
    );
    let mut span_ids = HashSet::new();
    for traceparent in &sent {
        let (trace_id, span_id, flags) = fields(traceparent);
        assert_eq!(trace_id, TRACE_ID, "the caller's trace: {traceparent}");
        assert_ne!(
            span_id, PARENT_ID,
            "a span of the call's own: {traceparent}"
        );
        assert_eq!(flags, "01", "the caller's flags: {traceparent}");
        span_ids.insert(span_id);
    }
    assert_eq!(
        span_ids.len(),
        sent.len(),
        "each call a span id of its own: {sent:?}"
    );
    let order = node.order(&user, &id).await;
    assert_eq!(order["trace_id"], TRACE_ID, "{}", pretty(&order));
    // The node logs as text here: the execution's lines carry the order's span, as the
    // README shows it.
    let log = node.log();
    let span = format!("order{{order_id={id} trace_id={TRACE_ID}}}: ");
    let traced = log
        .lines()
        .filter(|line| line.contains("attempt started") && line.contains(&span))
        .count();
    assert_eq!(
        traced, 4,
        "an attempt line per step with the trace id\n{log}"
    );
}

#[tokio::test]
async fn an_invalid_or_missing_traceparent_starts_a_new_trace() {
    let recorder = Recorder::start().await;
    let node = Node::start(&config(&recorder, "[log]\nformat = \"json\"\n")).await;
    let user = unique_user("trace");
    let all_zero = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
    let invalid = submit(&node, &user, &[("traceparent", all_zero)]).await;
    let missing = submit(&node, &user, &[]).await;
    let mut trace_ids = HashSet::new();
    for id in [&invalid, &missing] {
        let sent = completed_calls(&node, &recorder, &user, id).await;
        let order = node.order(&user, id).await;
        let trace_id = order["trace_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no trace_id in {}", pretty(&order)))
            .to_string();
        assert_ne!(trace_id, "0".repeat(32));
        for traceparent in &sent {
            let (sent_trace, span_id, flags) = fields(traceparent);
            assert_eq!(sent_trace, trace_id, "the order's trace: {traceparent}");
            assert_ne!(span_id, "0".repeat(16));
            assert_eq!(flags, "01", "a trace started here is sampled");
        }
        // JSON lines carry the order's span, with its fields, under "span".
        let log = node.log();
        let traced = log
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["fields"]["message"] == "attempt started")
            .filter(|line| line["span"]["order_id"] == id.as_str())
            .filter(|line| line["span"]["trace_id"] == trace_id.as_str())
            .count();
        assert_eq!(
            traced, 4,
            "an attempt line per step with the trace id\n{log}"
        );
        trace_ids.insert(trace_id);
    }
    assert_eq!(trace_ids.len(), 2, "each a new trace: {trace_ids:?}");
}

/// The spans of `id`'s trace once they include its submission, its execution and a call per
/// step; `None` before.
fn spans_of(recorder: &Recorder, id: &str) -> Option<Vec<ExportedSpan>> {
    let spans: Vec<ExportedSpan> = recorder
        .spans()
        .into_iter()
        .filter(|span| span.trace_id == TRACE_ID && span.order_id.as_deref() == Some(id))
        .collect();
    let named = |name: &str| spans.iter().filter(|span| span.name == name).count();
    let calls = STEPS
        .iter()
        .all(|(step, _)| named(&format!("step {step}")) == 1);
    (named("POST /orders") == 1 && named("order") >= 1 && calls).then_some(spans)
}

#[tokio::test]
async fn spans_of_the_order_reach_the_otlp_receiver() {
    let recorder = Recorder::start().await;
    let telemetry = format!("[telemetry]\notlp_endpoint = \"{}\"\n", recorder.base);
    let mut node = Node::start(&config(&recorder, &telemetry)).await;
    let user = unique_user("trace");
    let id = submit(&node, &user, &[("traceparent", GIVEN)]).await;
    let sent = completed_calls(&node, &recorder, &user, &id).await;
    let spans = until(SPANS_ARRIVE, POLL, || async { spans_of(&recorder, &id) })
        .await
        .unwrap_or_else(|| {
            panic!(
                "no complete trace of {id} within {SPANS_ARRIVE:?}: {:#?}\n{}",
                recorder.spans(),
                node.log_tail()
            )
        });
    let submission = spans
        .iter()
        .find(|span| span.name == "POST /orders")
        .expect("the submission span");
    assert_eq!(submission.parent_id, PARENT_ID, "under the caller's span");
    assert_eq!(submission.kind, SERVER);
    let executions: Vec<&ExportedSpan> = spans.iter().filter(|span| span.name == "order").collect();
    for execution in &executions {
        assert_eq!(execution.parent_id, submission.span_id, "{execution:?}");
    }
    // Each call's span is the one its traceparent named, under an execution of the order.
    let called: HashSet<String> = sent.iter().map(|header| fields(header).1).collect();
    for (step, _) in STEPS {
        let call = spans
            .iter()
            .find(|span| span.name == format!("step {step}"))
            .expect("a call span");
        assert_eq!(call.kind, CLIENT, "{call:?}");
        assert!(called.contains(&call.span_id), "{call:?} not in {sent:?}");
        assert!(
            executions
                .iter()
                .any(|execution| execution.span_id == call.parent_id),
            "{call:?} under an execution"
        );
        assert_eq!(call.attempt.as_deref(), Some("1"), "{call:?}");
        assert_eq!(call.outcome.as_deref(), Some("succeeded"), "{call:?}");
    }

    // What is still queued when the node stops is sent before it exits.
    let last = submit(&node, &user, &[("traceparent", GIVEN)]).await;
    completed_calls(&node, &recorder, &user, &last).await;
    node.term();
    let status = node.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit {status:?}\n{}", node.log_tail());
    assert!(
        spans_of(&recorder, &last).is_some(),
        "spans of {last} sent at shutdown: {:#?}",
        recorder.spans()
    );
}

/// With a sampler that does not follow the caller (`always_on`), an order the caller did not
/// sample is sampled here, its spans exported, and its calls say so: a service's spans then hang
/// under spans that exist.
#[tokio::test]
async fn the_calls_flags_are_the_samplers_decision_not_the_callers() {
    let recorder = Recorder::start().await;
    let telemetry = format!("[telemetry]\notlp_endpoint = \"{}\"\n", recorder.base);
    let node = Node::start_env(
        &config(&recorder, &telemetry),
        &[("OTEL_TRACES_SAMPLER", "always_on")],
    )
    .await;
    let user = unique_user("sampler");
    let unsampled = GIVEN.replace("-01", "-00");
    let id = submit(&node, &user, &[("traceparent", &unsampled)]).await;
    let sent = completed_calls(&node, &recorder, &user, &id).await;
    for header in &sent {
        assert_eq!(fields(header).2, "01", "{header}");
    }
    until(SPANS_ARRIVE, POLL, || async { spans_of(&recorder, &id) })
        .await
        .unwrap_or_else(|| panic!("no spans of {id}: {:#?}", recorder.spans()));
}
