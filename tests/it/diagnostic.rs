//! The welcome page and the diagnostic endpoints: heartbeat (node id from
//! `<data_dir>/service_id`) and the cluster view of a single node.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{pretty, simulate, unique_user, Node, POLL, TERMINAL};
use crate::history::utc_time;

#[tokio::test]
async fn root_says_welcome() {
    let node = Node::start(&simulate("10ms")).await;
    let reply = node.call(Method::GET, "/").send().await;
    assert_eq!(reply.status, 200, "GET /: {reply}");
    assert_eq!(
        reply.text, "Welcome to Order Processing System!",
        "GET / body"
    );
}

/// The console's lists take any query a caller can send: what is out of range is a 400 with a
/// JSON error (not a dropped connection), what is far off but valid is an empty answer.
#[tokio::test]
async fn console_queries_at_their_extremes_get_answers() {
    let node = Node::start(&simulate("10ms")).await;
    for path in [
        "/diagnostic/stuck?older_than=300000y",
        "/diagnostic/stuck?older_than=10000000000000s",
        "/diagnostic/stuck?older_than=soon",
        "/diagnostic/stuck?limit=0",
        "/diagnostic/flow?since=now",
        "/diagnostic/flow?since=99999999999999999999",
    ] {
        let reply = node.call(Method::GET, path).send().await;
        node.expect_error(&reply, 400, &format!("GET {path}"));
    }
    let reply = node
        .call(Method::GET, "/diagnostic/stuck?older_than=1000y")
        .send()
        .await;
    let stuck = node.expect_json(&reply, 200, "GET /diagnostic/stuck?older_than=1000y");
    assert_eq!(stuck["count"], 0, "{}", pretty(&stuck));
    for since in [i64::MAX, i64::MIN] {
        let path = format!("/diagnostic/flow?since={since}");
        let reply = node.call(Method::GET, &path).send().await;
        let flow = node.expect_json(&reply, 200, &format!("GET {path}"));
        assert!(flow["seconds"].is_array(), "{}", pretty(&flow));
    }
    // The node is still there to answer.
    assert_eq!(node.heartbeat().await["status"], "OK");
}

#[tokio::test]
async fn heartbeat_and_cluster_describe_this_node() {
    let node = Node::start(&simulate("10ms")).await;

    let heartbeat = node.heartbeat().await;
    let shown = pretty(&heartbeat);
    utc_time(&heartbeat["generated_at"], "heartbeat generated_at");
    assert_eq!(heartbeat["status"], "OK", "heartbeat status:\n{shown}");
    let service_id = heartbeat["service_id"]
        .as_str()
        .unwrap_or_else(|| panic!("service_id:\n{shown}"));
    assert!(
        uuid::Uuid::parse_str(service_id).is_ok(),
        "service_id is a UUID:\n{shown}"
    );
    assert_eq!(
        service_id,
        node.service_id_file(),
        "service_id is <data_dir>/service_id"
    );
    assert!(
        non_empty_string(&heartbeat["service_name"]),
        "service_name:\n{shown}"
    );
    assert!(non_empty_string(&heartbeat["version"]), "version:\n{shown}");

    let cluster = node.cluster().await;
    let shown = pretty(&cluster);
    utc_time(&cluster["generated_at"], "cluster generated_at");
    assert_eq!(
        cluster["leader_name"], service_id,
        "a single node leads itself:\n{shown}"
    );
    assert_eq!(cluster["nodes_count"], 1, "nodes_count:\n{shown}");
    let nodes = cluster["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("nodes array:\n{shown}"));
    assert_eq!(nodes.len(), 1, "one node listed:\n{shown}");
    let this = &nodes[0];
    assert_eq!(
        this["name"], service_id,
        "node name is its service_id:\n{shown}"
    );
    assert_eq!(this["connected"], true, "connected:\n{shown}");
    assert_eq!(
        this["connection_string"],
        node.base.as_str(),
        "connection_string:\n{shown}"
    );
    utc_time(&this["last_activity"], "nodes[0].last_activity");
    assert!(non_empty_string(&this["role"]), "role:\n{shown}");
    assert!(this["inflight"].is_u64(), "inflight is a count:\n{shown}");
    assert_eq!(
        this["version"], heartbeat["version"],
        "node version is the heartbeat's:\n{shown}"
    );
}

#[tokio::test]
async fn cluster_inflight_counts_unfinished_orders() {
    let node = Node::start(&simulate("300ms")).await;
    let user = unique_user("busy");
    let id = node.create_order(&user, &json!({})).await;

    wait_inflight(&node, "at least 1 while an order runs", |count| count >= 1).await;
    node.wait_terminal(&user, &id, TERMINAL).await;
    wait_inflight(&node, "0 once every order finished", |count| count == 0).await;
}

/// Polls the cluster view until this node's `inflight` satisfies `ready`.
async fn wait_inflight(node: &Node, what: &str, ready: impl Fn(u64) -> bool) {
    let inflight = || async { node.cluster().await["nodes"][0]["inflight"].as_u64() };
    let seen = order_process_testkit::poll::until(Duration::from_secs(10), POLL, || async {
        inflight().await.filter(|count| ready(*count))
    })
    .await;
    if seen.is_none() {
        panic!(
            "inflight not {what}; last cluster view:\n{}\n{}",
            pretty(&node.cluster().await),
            node.log_tail()
        );
    }
}

fn non_empty_string(value: &Value) -> bool {
    value.as_str().is_some_and(|text| !text.trim().is_empty())
}
