//! `order-process bench` as a correctness check: a small run against a real node must lose
//! nothing and find every history right. (Its speed figures are not asserted; see scripts/bench.)

use crate::harness::{Node, BIN};

/// A node with zero-duration steps failing with `failure_rate`, the per-user limits lifted (one
/// user submits everything, as fast as it can).
async fn bench_node(failure_rate: f64) -> Node {
    Node::start(&format!(
        "[simulate]\nduration = \"0s\"\nfailure_rate = {failure_rate:?}\n\
         [limits]\nsubmit_rate = 100000.0\nsubmit_burst = 100000\n"
    ))
    .await
}

/// Runs `order-process bench --url <node> --json <args>`, asserting it exits 0; its summary.
async fn bench(node: &Node, args: &[&str]) -> serde_json::Value {
    let output = tokio::process::Command::new(BIN)
        .args(["bench", "--url", &node.base, "--json"])
        .args(args)
        .output()
        .await
        .expect("run the bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench failed: {stdout}\n{}",
        node.log_tail()
    );
    serde_json::from_str(&stdout).expect("a JSON summary")
}

#[tokio::test]
async fn a_small_bench_run_loses_nothing_and_finds_every_history_right() {
    let node = bench_node(0.0).await;
    let summary = bench(
        &node,
        &[
            "--orders",
            "500",
            "--concurrency",
            "16",
            "--fail-rate",
            "0.2",
            "--timeout",
            "60s",
        ],
    )
    .await;
    assert_eq!(summary["submitted"], 500, "{summary}");
    assert_eq!(summary["lost"], 0, "{summary}");
    assert_eq!(summary["mismatches"], 0, "{summary}");
    let completed = summary["completed"].as_u64().unwrap_or(0);
    let failed = summary["failed"].as_u64().unwrap_or(0);
    assert_eq!(completed + failed, 500, "{summary}");
    assert!(failed > 0, "some orders were asked to fail: {summary}");
}

#[tokio::test]
async fn long_poll_answers_when_the_order_finishes() {
    let node = Node::start("[simulate]\nduration = \"300ms\"\nfailure_rate = 0.0\n").await;
    let id = node.create_order("poller", &serde_json::json!({})).await;
    let poll = |wait: &'static str| {
        node.call(reqwest::Method::GET, &format!("/orders/{id}"))
            .user("poller")
            .query("wait", wait)
            .send()
    };
    let started = std::time::Instant::now();
    let reply = poll("30s").await;
    let order = node.expect_json(&reply, 200, "long poll");
    assert_eq!(order["current_step"], "Completed", "{order}");
    assert!(started.elapsed() < std::time::Duration::from_secs(25));
    let reply = poll("forever").await;
    node.expect_error(&reply, 400, "a bad wait");
}

#[tokio::test]
async fn waiting_for_many_orders_answers_with_finished_pending_and_missing() {
    let node = Node::start("[simulate]\nduration = \"200ms\"\nfailure_rate = 0.0\n").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(node.create_order("batcher", &serde_json::json!({})).await);
    }
    let foreign = node
        .create_order("someone-else", &serde_json::json!({}))
        .await;
    let mut named = ids.clone();
    named.push(foreign.clone());
    named.push("not-an-id".to_string());
    let reply = node
        .call(reqwest::Method::POST, "/orders/wait")
        .user("batcher")
        .body(serde_json::json!({ "order_ids": named, "wait": "30s" }).to_string())
        .send()
        .await;
    let body = node.expect_json(&reply, 200, "batch wait");
    let finished: Vec<&str> = body["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|order| {
            assert_eq!(order["current_step"], "Completed", "{order}");
            order["order_id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(finished.len(), 3, "{body}");
    assert!(ids.iter().all(|id| finished.contains(&id.as_str())));
    assert_eq!(body["pending"], serde_json::json!([]));
    let missing = body["missing"].as_array().unwrap();
    assert!(missing.contains(&serde_json::json!(foreign)), "{body}");
    assert!(missing.contains(&serde_json::json!("not-an-id")), "{body}");
    // A short wait on an unfinished order leaves it pending.
    let slow = node.create_order("batcher", &serde_json::json!({})).await;
    let reply = node
        .call(reqwest::Method::POST, "/orders/wait")
        .user("batcher")
        .body(serde_json::json!({ "order_ids": [slow], "wait": "1ms" }).to_string())
        .send()
        .await;
    let body = node.expect_json(&reply, 200, "short batch wait");
    assert_eq!(body["pending"], serde_json::json!([slow]), "{body}");
    let reply = node
        .call(reqwest::Method::POST, "/orders/wait")
        .user("batcher")
        .body("{\"ids\": []}")
        .send()
        .await;
    node.expect_error(&reply, 400, "a bad batch wait body");
}

#[tokio::test]
async fn orders_failed_by_the_nodes_own_failure_chance_are_not_wrong_histories() {
    let node = bench_node(0.3).await;
    let summary = bench(&node, &["--orders", "100"]).await;
    assert_eq!(summary["mismatches"], 0, "{summary}");
    assert_eq!(summary["failed"], 0, "nothing asked to fail: {summary}");
    assert!(
        summary["failed_by_chance"].as_u64().unwrap_or(0) > 0,
        "{summary}"
    );
}

#[tokio::test]
async fn orders_spread_over_users_stay_under_the_per_user_limits() {
    // The default per-user limits: a burst of 200 submissions per user, which 600 orders from
    // one user would exceed unless the run took longer than the bucket takes to refill.
    let node = Node::start("[simulate]\nduration = \"0s\"\nfailure_rate = 0.0\n").await;
    let args = ["--orders", "600", "--concurrency", "16", "--timeout", "60s"];
    let spread = bench(&node, &[&args[..], &["--users", "6"]].concat()).await;
    assert_eq!(spread["submitted"], 600, "{spread}");
    assert_eq!(spread["lost"], 0, "{spread}");
    assert_eq!(spread["completed"], 600, "{spread}");
    assert_eq!(spread["http_errors"], serde_json::json!({}), "{spread}");
}

#[tokio::test]
async fn orders_carry_the_padding_asked_for() {
    let node = bench_node(0.0).await;
    let args = ["--orders", "40", "--concurrency", "8", "--timeout", "60s"];
    let padded = bench(
        &node,
        &[&args[..], &["--payload-bytes", "4000", "--user", "padded"]].concat(),
    )
    .await;
    assert_eq!(padded["completed"], 40, "{padded}");
    assert_eq!(padded["mismatches"], 0, "{padded}");
    let ids = node.list_all_ids("padded", &[]).await;
    assert_eq!(ids.len(), 40);
    for id in &ids {
        let order = node.order("padded", id).await;
        let pad = order["payload"]["pad"].as_str().unwrap_or_default();
        assert_eq!(pad.len(), 4000, "{order}");
    }
    // Without the flag, no padding.
    bench(&node, &[&args[..], &["--user", "plain"]].concat()).await;
    let ids = node.list_all_ids("plain", &[]).await;
    let order = node.order("plain", &ids[0]).await;
    assert!(order["payload"].get("pad").is_none(), "{order}");
    // Past what any node takes: refused before anything is sent.
    let output = tokio::process::Command::new(BIN)
        .args(["bench", "--url", &node.base, "--payload-bytes", "99999999"])
        .output()
        .await
        .expect("run the bench");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--payload-bytes"), "{stderr}");
}
