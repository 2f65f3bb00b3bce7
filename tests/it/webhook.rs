//! Completion webhooks against a real receiver run by the test: a warp server on 127.0.0.1:0
//! that records every delivery (headers and body) and answers as the test scripts it. The
//! signature is checked the way the README tells receivers to: with `openssl dgst -hmac`.

use std::collections::VecDeque;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use warp::http::{HeaderMap, Response, StatusCode};
use warp::Filter;

use crate::cluster::{cluster_turn, node_config, wait_formed, TAKEOVER};
use crate::harness::{pretty, simulate, unique_user, Node, RedisServer, POLL, TERMINAL};
use crate::history::assert_completed;

const SECRET: &str = "webhook-secret-0123456789";

/// One delivery the receiver got.
#[derive(Clone, Debug)]
struct Delivery {
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

impl Delivery {
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct Script {
    /// Statuses to answer next; then `default`.
    queued: VecDeque<u16>,
    default: Option<u16>,
    deliveries: Vec<Delivery>,
}

/// The receiver: answers queued statuses first, then the default (200 unless set).
struct Receiver {
    url: String,
    script: Arc<Mutex<Script>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let script: Arc<Mutex<Script>> = Arc::default();
        let shared = Arc::clone(&script);
        let routes = warp::post()
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .map(move |headers: HeaderMap, body: Bytes| {
                let mut script = shared.lock().unwrap_or_else(|p| p.into_inner());
                script.deliveries.push(Delivery {
                    headers,
                    body,
                    at: Instant::now(),
                });
                let status = script.queued.pop_front().or(script.default).unwrap_or(200);
                let mut response = Response::new(format!("answered {status}"));
                *response.status_mut() =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                response
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let url = format!(
            "http://{}/order-finished",
            listener.local_addr().expect("receiver address")
        );
        let server = tokio::spawn(warp::serve(routes).incoming(listener).run());
        Receiver {
            url,
            script,
            server,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&self, statuses: &[u16]) {
        self.lock().queued.extend(statuses);
    }

    fn answer(&self, status: u16) {
        self.lock().default = Some(status);
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.lock().deliveries.clone()
    }

    /// A `[notify]` section pointing at this receiver.
    fn section(&self, backoff: &str) -> String {
        format!(
            "[notify]\nurl = \"{}\"\nsecret = \"{SECRET}\"\ntimeout = \"2s\"\nretries = 20\n\
             backoff = \"{backoff}\"\nbackoff_max = \"{backoff}\"\n",
            self.url
        )
    }

    /// Waits until at least `count` deliveries arrived.
    async fn wait_deliveries(&self, count: usize, node: &Node) -> Vec<Delivery> {
        let deadline = Instant::now() + TERMINAL;
        loop {
            let deliveries = self.deliveries();
            if deliveries.len() >= count {
                return deliveries;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {count} deliveries within {TERMINAL:?}\n{}",
                deliveries.len(),
                node.log_tail()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Checks the signature header as a receiver would, with openssl (see the README).
fn assert_signed(delivery: &Delivery) {
    let header = delivery.header("order-signature");
    let (timestamp, signature) = header
        .split_once(",v1=")
        .and_then(|(t, v1)| Some((t.strip_prefix("t=")?, v1)))
        .unwrap_or_else(|| panic!("signature header `{header}` is not t=…,v1=…"));
    let age = chrono::Utc::now().timestamp() - timestamp.parse::<i64>().expect("a unix time");
    assert!((0..60).contains(&age), "signed {age} s ago");
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(&delivery.body);
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), &signed).expect("write the signed text");
    let output = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", SECRET, "-r"])
        .arg(file.path())
        .output()
        .expect("run openssl");
    let text = String::from_utf8_lossy(&output.stdout);
    let expected = text.split_whitespace().next().unwrap_or_default();
    assert_eq!(signature, expected, "signature does not verify");
}

fn notification(order: &Value) -> &Value {
    &order["notification"]
}

async fn wait_notification(node: &Node, user: &str, id: &str, state: &str) -> Value {
    node.wait_for(
        user,
        id,
        TERMINAL,
        &format!("notification {state}"),
        |order| notification(order)["state"] == state,
    )
    .await
}

#[tokio::test]
async fn a_finished_order_is_posted_signed_to_the_webhook_once() {
    let receiver = Receiver::start().await;
    let node = Node::start(&format!(
        "{}{}",
        simulate("10ms"),
        receiver.section("100ms")
    ))
    .await;
    let user = unique_user("wendy");
    let id = node.create_order(&user, &json!({"sku": "W1"})).await;

    let order = wait_notification(&node, &user, &id, "delivered").await;
    assert_completed(&order);
    assert_eq!(
        notification(&order)["attempts_made"],
        1,
        "{}",
        pretty(&order)
    );
    let deliveries = receiver.deliveries();
    assert_eq!(deliveries.len(), 1, "one delivery");
    let delivery = &deliveries[0];
    assert_signed(delivery);
    assert_eq!(delivery.header("idempotency-key"), format!("{id}:notify:1"));
    assert_eq!(delivery.header("content-type"), "application/json");
    let body = delivery.json();
    assert_eq!(body["order_id"], id.as_str());
    assert_eq!(body["current_step"], "Completed");
    assert_eq!(body["steps"], order["steps"], "the order as GET shows it");
    assert!(delivery.header("order-epoch").parse::<u64>().is_ok());
    let traceparent = delivery.header("traceparent");
    let trace_id = order["trace_id"].as_str().unwrap_or_default();
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-")),
        "the order's trace: {traceparent}"
    );
    assert_eq!(delivery.header("tracestate"), "", "no tracestate was given");

    // A caller's trace, tracestate and all, goes on to the webhook.
    let reply = node
        .call(reqwest::Method::POST, "/orders")
        .user(&user)
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("tracestate", "congo=t61rcWkgMzE")
        .body(r#"{"sku":"W1"}"#)
        .send()
        .await;
    let traced = node.expect_json(&reply, 201, "POST /orders with a trace");
    let traced = traced["order_id"].as_str().unwrap_or_default();
    wait_notification(&node, &user, traced, "delivered").await;
    let deliveries = receiver.deliveries();
    let delivery = deliveries.last().expect("a second delivery");
    assert_eq!(delivery.json()["order_id"], traced);
    assert!(delivery
        .header("traceparent")
        .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    assert_eq!(delivery.header("tracestate"), "congo=t61rcWkgMzE");
}

#[tokio::test]
async fn a_busy_receiver_is_retried_and_each_attempt_shows_on_the_order() {
    let receiver = Receiver::start().await;
    receiver.queue(&[503, 429]);
    let node = Node::start(&format!(
        "{}{}",
        simulate("10ms"),
        receiver.section("300ms")
    ))
    .await;
    let user = unique_user("wade");
    let id = node.create_order(&user, &json!({"sku": "W2"})).await;

    let order = wait_notification(&node, &user, &id, "delivered").await;
    let statuses: Vec<&Value> = notification(&order)["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|attempt| &attempt["status"])
        .collect();
    assert_eq!(statuses, [503, 429, 200], "{}", pretty(&order));
    let deliveries = receiver.deliveries();
    assert_eq!(deliveries.len(), 3);
    for pair in deliveries.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(300), "retried after {gap:?}");
        assert_eq!(
            pair[0].header("idempotency-key"),
            pair[1].header("idempotency-key"),
            "a retry is recognisable as a repeat"
        );
    }
}

/// A finished order whose webhook waits for its next attempt is not stuck: the stuck-order list
/// shows unfinished orders only (whose cancel button could do something).
#[tokio::test]
async fn a_finished_order_owing_its_webhook_is_not_listed_as_stuck() {
    let receiver = Receiver::start().await;
    receiver.answer(503);
    let node = Node::start(&format!("{}{}", simulate("10ms"), receiver.section("30s"))).await;
    let user = unique_user("stella");
    let id = node.create_order(&user, &json!({"sku": "S3"})).await;
    receiver.wait_deliveries(1, &node).await;
    let order = node.wait_terminal(&user, &id, TERMINAL).await;
    assert_eq!(
        notification(&order)["state"],
        "pending",
        "{}",
        pretty(&order)
    );
    let reply = node
        .call(reqwest::Method::GET, "/diagnostic/stuck?older_than=0s")
        .send()
        .await;
    let stuck = node.expect_json(&reply, 200, "GET /diagnostic/stuck");
    assert_eq!(stuck["count"], 0, "{}", pretty(&stuck));
    assert_eq!(stuck["scanned"], 1, "{}", pretty(&stuck));
}

#[tokio::test]
async fn a_receiver_that_refuses_gets_no_retry_and_the_notification_fails() {
    let receiver = Receiver::start().await;
    receiver.answer(400);
    let node = Node::start(&format!(
        "{}{}",
        simulate("10ms"),
        receiver.section("100ms")
    ))
    .await;
    let user = unique_user("wilma");
    let id = node.create_order(&user, &json!({"sku": "W3"})).await;

    let order = wait_notification(&node, &user, &id, "failed").await;
    assert_completed(&order);
    assert_eq!(
        notification(&order)["attempts_made"],
        1,
        "{}",
        pretty(&order)
    );
    assert_eq!(notification(&order)["error"], "answered 400");
    assert_eq!(receiver.deliveries().len(), 1);

    // Mended, the receiver is sent the same notification again on request: once, and only by
    // the order's user (or an admin).
    receiver.answer(200);
    let again = |user: String| {
        let path = format!("/orders/{id}/notification");
        let node = &node;
        async move {
            node.call(reqwest::Method::POST, &path)
                .user(&user)
                .send()
                .await
        }
    };
    node.expect_error(&again(unique_user("mallory")).await, 404, "another user's");
    let reply = again(user.clone()).await;
    let owed = node.expect_json(&reply, 202, "POST /orders/{id}/notification");
    assert_eq!(notification(&owed)["state"], "pending", "{}", pretty(&owed));
    let order = wait_notification(&node, &user, &id, "delivered").await;
    assert_eq!(
        notification(&order)["attempts_made"],
        2,
        "{}",
        pretty(&order)
    );
    let deliveries = receiver.deliveries();
    assert_eq!(deliveries.len(), 2);
    assert_eq!(
        deliveries[1].header("idempotency-key"),
        format!("{id}:notify:1"),
        "the same notification"
    );
    assert_signed(&deliveries[1]);
    node.expect_error(&again(user.clone()).await, 409, "a delivered webhook");
}

#[tokio::test]
async fn a_webhook_owed_when_the_node_is_killed_is_delivered_after_its_restart() {
    let receiver = Receiver::start().await;
    receiver.answer(503);
    let mut node = Node::start(&format!(
        "{}{}",
        simulate("10ms"),
        receiver.section("200ms")
    ))
    .await;
    let user = unique_user("walt");
    let id = node.create_order(&user, &json!({"sku": "W4"})).await;
    node.wait_for(&user, &id, TERMINAL, "two webhook attempts", |order| {
        notification(order)["attempts_made"].as_u64() >= Some(2)
    })
    .await;
    node.kill();
    receiver.answer(200);

    node.restart().await;
    let order = wait_notification(&node, &user, &id, "delivered").await;
    let made = notification(&order)["attempts_made"].as_u64();
    assert!(
        made >= Some(3),
        "attempt numbering goes on across the restart: {}",
        pretty(&order)
    );
}

#[tokio::test]
async fn a_takeover_delivers_the_webhook_of_a_dead_node() {
    let _turn = cluster_turn().await;
    let receiver = Receiver::start().await;
    receiver.answer(503);
    let redis = RedisServer::start();
    let first = Node::start(&format!(
        "{}{}",
        node_config(&redis, "10ms", &[]),
        receiver.section("500ms")
    ))
    .await;
    let second = Node::start(&format!(
        "{}{}",
        node_config(&redis, "10ms", &[first.port]),
        receiver.section("500ms")
    ))
    .await;
    let mut nodes = vec![first, second];
    wait_formed(&nodes, 2).await;

    let user = unique_user("wanda");
    let id = nodes[0].create_order(&user, &json!({"sku": "W5"})).await;
    receiver.wait_deliveries(1, &nodes[0]).await;
    let owner = nodes[1].order(&user, &id).await;
    assert_eq!(
        notification(&owner)["state"],
        "pending",
        "{}",
        pretty(&owner)
    );
    nodes[0].kill();
    receiver.answer(200);

    let order = nodes[1]
        .wait_for(&user, &id, TAKEOVER, "notification delivered", |order| {
            notification(order)["state"] == "delivered"
        })
        .await;
    assert_completed(&order);
    let last = receiver.deliveries().pop().expect("a delivery");
    assert_signed(&last);
    assert_eq!(last.header("idempotency-key"), format!("{id}:notify:1"));
    let epoch: u64 = last.header("order-epoch").parse().unwrap_or(0);
    assert!(epoch >= 2, "the new owner's epoch, got {epoch}");
}
