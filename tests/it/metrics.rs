//! `GET /metrics` (counters move with the orders a node runs; in a cluster, leadership, gossip
//! membership and takeovers show), `GET /diagnostic/summary`, and
//! `GET /openapi.json` against the router: every listed route is served, every other method on
//! those paths is refused.

use std::collections::{BTreeSet, HashMap};

use reqwest::Method;
use serde_json::{json, Value};

use crate::cluster::{
    cluster_turn, start_cluster, submit, wait_all_completed, wait_started, TAKEOVER,
};
use crate::harness::{simulate, unique_user, Node, RedisServer, TERMINAL};

/// Parses the Prometheus text exposition into `series → value` (series with their labels, as
/// printed, e.g. `order_process_rollbacks_total{step="Processing"}`).
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

pub(crate) async fn scrape(node: &Node) -> HashMap<String, f64> {
    let reply = node.call(Method::GET, "/metrics").send().await;
    assert_eq!(reply.status, 200, "GET /metrics: {reply}");
    let content_type = reply.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/openmetrics-text")
            || content_type.starts_with("text/plain"),
        "metrics content type: {content_type}"
    );
    parse(&reply.text)
}

pub(crate) fn value(metrics: &HashMap<String, f64>, series: &str) -> f64 {
    *metrics
        .get(series)
        .unwrap_or_else(|| panic!("no series {series} in /metrics: {metrics:#?}"))
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> f64 {
    value(after, series) - value(before, series)
}

#[tokio::test]
async fn counters_move_with_orders() {
    let node = Node::start(&simulate("10ms")).await;
    let user = unique_user("metrics");
    let before = scrape(&node).await;
    for name in [
        "order_process_queue_depth",
        "order_process_workers",
        "order_process_worker_utilisation",
        "order_process_fencing_rejections_total",
        "order_process_leader_changes_total",
        "order_process_transfers_total",
        "order_process_gossip_nodes{state=\"live\"}",
        "order_process_store_errors_total{operation=\"commit\"}",
    ] {
        value(&before, name);
    }

    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(node.create_order(&user, &json!({"sku": "A1"})).await);
    }
    for _ in 0..2 {
        let failing = json!({"simulate": {"fail_at": "Processing"}});
        ids.push(node.create_order(&user, &failing).await);
    }
    for id in &ids {
        node.wait_terminal(&user, id, TERMINAL).await;
    }
    let after = scrape(&node).await;

    let moved = |series: &str| delta(&before, &after, series);
    assert_eq!(moved("order_process_orders_accepted_total"), 5.0);
    assert_eq!(moved("order_process_orders_completed_total"), 3.0);
    assert_eq!(moved("order_process_orders_failed_total"), 2.0);
    assert_eq!(moved("order_process_orders_cancelled_total"), 0.0);
    assert_eq!(
        moved(
            "order_process_step_duration_seconds_count{step=\"Scheduling\",outcome=\"succeeded\"}"
        ),
        5.0
    );
    assert_eq!(
        moved("order_process_step_duration_seconds_count{step=\"Processing\",outcome=\"failed\"}"),
        2.0
    );
    assert_eq!(
        moved("order_process_step_duration_seconds_count{step=\"Post-Processing\",outcome=\"succeeded\"}"),
        3.0
    );
    // A failure in Processing rolls back Processing, Pre-Processing and Scheduling.
    for step in ["Scheduling", "Pre-Processing", "Processing"] {
        assert_eq!(
            moved(&format!("order_process_rollbacks_total{{step=\"{step}\"}}")),
            2.0,
            "rollbacks of {step}"
        );
    }
    assert_eq!(
        moved("order_process_rollbacks_total{step=\"Post-Processing\"}"),
        0.0
    );
    // 5 creates; at least one commit per transition.
    assert_eq!(
        moved("order_process_store_operation_duration_seconds_count{operation=\"create\"}"),
        5.0
    );
    assert!(
        moved("order_process_store_operation_duration_seconds_count{operation=\"commit\"}")
            >= 5.0 * 4.0
    );
    // Buckets are cumulative and end in +Inf = count.
    let commits = "order_process_store_operation_duration_seconds";
    assert_eq!(
        value(
            &after,
            &format!("{commits}_bucket{{le=\"+Inf\",operation=\"commit\"}}")
        ),
        value(&after, &format!("{commits}_count{{operation=\"commit\"}}"))
    );
    // Nothing is in flight once every order is finished.
    for step in [
        "Scheduling",
        "Pre-Processing",
        "Processing",
        "Post-Processing",
        "Completed",
        "Failed",
    ] {
        assert_eq!(
            value(
                &after,
                &format!("order_process_orders_in_step{{step=\"{step}\"}}")
            ),
            0.0,
            "in flight in {step}"
        );
    }
    assert_eq!(
        value(&after, "order_process_gossip_nodes{state=\"live\"}"),
        1.0
    );

    // The summary agrees, and lists the failures newest first.
    let reply = node.call(Method::GET, "/diagnostic/summary").send().await;
    let summary = node.expect_json(&reply, 200, "GET /diagnostic/summary");
    assert_eq!(summary["totals"]["completed"], 3, "{summary}");
    assert_eq!(summary["totals"]["failed"], 2, "{summary}");
    let failures = summary["recent_failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 2, "{summary}");
    let failed_ids: BTreeSet<&str> = failures
        .iter()
        .filter_map(|failure| failure["order_id"].as_str())
        .collect();
    assert_eq!(failed_ids, ids[3..].iter().map(String::as_str).collect());
    assert!(failures
        .iter()
        .all(|failure| failure["step"] == "Processing"));
    // When it failed: the order's complete time, written as the order's view writes it.
    for failure in failures {
        let id = failure["order_id"].as_str().unwrap_or_default();
        let order = node.order(&user, id).await;
        assert_eq!(failure["failed_at"], order["complete_time"], "{summary}");
    }
}

fn method(name: &str) -> Method {
    Method::from_bytes(name.as_bytes()).expect("an HTTP method")
}

#[tokio::test]
async fn every_described_route_is_served() {
    let node = Node::start(&simulate("10ms")).await;
    let reply = node.call(Method::GET, "/openapi.json").send().await;
    let document: Value = node.expect_json(&reply, 200, "GET /openapi.json");
    assert!(document["openapi"]
        .as_str()
        .is_some_and(|version| version.starts_with("3.")));
    let paths = document["paths"].as_object().expect("paths");

    let described: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item")
                .keys()
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    let listed: BTreeSet<(String, String)> = order_process::api::ROUTES
        .iter()
        .map(|(method, path)| (method.to_string(), path.to_string()))
        .collect();
    assert_eq!(described, listed, "served openapi.json vs api::ROUTES");

    let order_id = uuid::Uuid::new_v4().to_string();
    let user = unique_user("openapi");
    for (method_name, path) in &listed {
        let concrete = path.replace("{order_id}", &order_id);
        let reply = node
            .call(method(method_name), &concrete)
            .user(&user)
            .body("{}")
            .send()
            .await;
        let unknown = reply.status == 404
            && reply
                .try_json()
                .is_some_and(|body| body["error"] == "no such endpoint");
        assert!(
            !unknown && reply.status != 405,
            "{method_name} {path} is described but not served: {reply}"
        );
    }
    // No other method is served on a described path.
    for path in paths.keys() {
        let concrete = path.replace("{order_id}", &order_id);
        for other in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if listed.contains(&(other.to_string(), path.clone())) {
                continue;
            }
            let reply = node.call(method(other), &concrete).user(&user).send().await;
            assert_eq!(
                reply.status, 405,
                "{other} {path} is not described, yet answered: {reply}"
            );
        }
    }
}

/// Sums one series over several nodes' scrapes.
async fn sum(nodes: &[&Node], series: &str) -> f64 {
    let mut total = 0.0;
    for node in nodes {
        total += value(&scrape(node).await, series);
    }
    total
}

#[tokio::test]
async fn cluster_metrics_show_leadership_gossip_and_takeover() {
    let _turn = cluster_turn().await;
    let redis = RedisServer::start();
    let mut nodes = start_cluster(&redis, 3, "1s").await;
    let all: Vec<&Node> = nodes.iter().collect();
    assert_eq!(
        sum(&all, "order_process_is_leader").await,
        1.0,
        "one leader"
    );
    assert!(sum(&all, "order_process_leader_changes_total").await >= 1.0);
    for node in &nodes {
        let metrics = scrape(node).await;
        assert_eq!(
            value(&metrics, "order_process_gossip_nodes{state=\"live\"}"),
            3.0,
            "node on port {} sees 3 live nodes",
            node.port
        );
    }

    let user = unique_user("metrics-takeover");
    let orders = submit(&nodes[1], &user, 10).await;
    wait_started(&nodes[0], &user, &orders).await;
    nodes[1].kill();
    wait_all_completed(&nodes[0], &user, &orders, TAKEOVER).await;

    let survivors = [&nodes[0], &nodes[2]];
    assert!(sum(&survivors, "order_process_transfers_total").await >= 1.0);
    assert!(sum(&survivors, "order_process_transferred_orders_total").await >= 1.0);
    // The takeover's move of the orders is a timed store call like the others.
    let reassigns = "order_process_store_operation_duration_seconds_count{operation=\"reassign\"}";
    assert!(sum(&survivors, reassigns).await >= 1.0);
    assert!(sum(&survivors, "order_process_orders_completed_total").await >= 1.0);
    assert_eq!(sum(&survivors, "order_process_is_leader").await, 1.0);
    let metrics = scrape(&nodes[0]).await;
    assert_eq!(
        value(&metrics, "order_process_gossip_nodes{state=\"live\"}"),
        2.0
    );
    assert_eq!(
        value(&metrics, "order_process_gossip_nodes{state=\"dead\"}"),
        1.0
    );
}

/// A long poll for orders that run on the node it asks does not read them from the store: each
/// is handed over as it finishes there.
#[tokio::test]
async fn a_long_poll_for_orders_running_here_does_not_read_them() {
    let node = Node::start(&simulate("200ms")).await;
    let user = unique_user("local-waiter");
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(node.create_order(&user, &json!({})).await);
    }
    let before = scrape(&node).await;
    let reply = node
        .call(Method::POST, "/orders/wait")
        .user(&user)
        .body(json!({ "order_ids": ids, "wait": "30s" }).to_string())
        .send()
        .await;
    let body = node.expect_json(&reply, 200, "batch wait");
    assert_eq!(body["orders"].as_array().map(Vec::len), Some(20), "{body}");
    let after = scrape(&node).await;
    // Read only: orders that finished before the poll came, and those a slow machine kept
    // running until the poll's recheck (2 s).
    let reads = delta(
        &before,
        &after,
        "order_process_store_operation_duration_seconds_count{operation=\"get\"}",
    );
    assert!(reads < 20.0, "the poll read {reads} orders");
}
