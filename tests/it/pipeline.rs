//! The order pipeline end to end: a completed order, a deterministic failure in each forward
//! step with its rollback (saga compensation, newest step first), and cancellation.

use serde_json::json;

use crate::harness::{pretty, simulate, unique_user, Node, TERMINAL};
use crate::history::{assert_completed, assert_failed_at, assert_rolled_back, FORWARD_STEPS};

#[tokio::test]
async fn completed_order_has_five_ordered_steps() {
    let node = Node::start(&simulate("50ms")).await;
    let user = unique_user("alice");
    let payload = json!({"sku": "A1", "qty": 2});

    let reply = node.post_order(&user, &payload.to_string()).await;
    let created = node.expect_json(&reply, 201, "POST /orders");
    let id = created["order_id"].as_str().expect("order_id").to_string();

    let order = node.wait_terminal(&user, &id, TERMINAL).await;
    assert_completed(&order);
    assert_eq!(
        order["order_id"],
        id.as_str(),
        "order_id in the view:\n{}",
        pretty(&order)
    );
    assert_eq!(
        order["start_time"], created["start_time"],
        "start_time of the 201 and of the view"
    );
    assert_eq!(
        order["payload"],
        payload,
        "the submitted payload is kept:\n{}",
        pretty(&order)
    );
}

#[tokio::test]
async fn failure_in_each_step_rolls_back_newest_first() {
    let node = Node::start(&simulate("50ms")).await;
    let user = unique_user("alice");

    // Submit all four at once, then wait for each: they run concurrently.
    let mut orders = Vec::new();
    for step in FORWARD_STEPS {
        let id = node
            .create_order(&user, &json!({"simulate": {"fail_at": step}}))
            .await;
        orders.push((step, id));
    }
    for (step, id) in &orders {
        let order = node.wait_terminal(&user, id, TERMINAL).await;
        assert_failed_at(&order, step);
    }
}

#[tokio::test]
async fn cancel_stops_after_the_running_step_and_rolls_back() {
    let node = Node::start(&simulate("1s")).await;
    let user = unique_user("alice");
    let id = node.create_order(&user, &json!({"sku": "A1"})).await;
    node.wait_step(&user, &id, "Pre-Processing", TERMINAL).await;

    let reply = node.cancel(&user, &id).await;
    let view = node.expect_json(&reply, 202, "cancel of a running order");
    assert_eq!(
        view["order_id"],
        id.as_str(),
        "the 202 carries the order view: {reply}"
    );

    let order = node.wait_terminal(&user, &id, TERMINAL).await;
    let shown = pretty(&order);
    let rollback = assert_rolled_back(&order);
    assert_eq!(
        rollback.failure_reason, "cancelled",
        "failure.reason of a cancelled order:\n{shown}"
    );
    // We cancelled during Pre-Processing; the order stops after the step that was running
    // (Processing only if Pre-Processing ended between our poll and the cancel).
    let last = rollback.forward.last().map(String::as_str);
    assert!(
        matches!(last, Some("Pre-Processing" | "Processing")),
        "a cancel during Pre-Processing stops at Pre-Processing, got steps up to {last:?}:\n{shown}"
    );
    assert!(
        FORWARD_STEPS.contains(&rollback.failure_step.as_str()),
        "failure.step names a forward step:\n{shown}"
    );

    let again = node.cancel(&user, &id).await;
    node.expect_error(&again, 409, "cancel of a finished order");
}

#[tokio::test]
async fn cancel_of_a_completed_order_is_a_conflict() {
    let node = Node::start(&simulate("10ms")).await;
    let user = unique_user("alice");
    let id = node.create_order(&user, &json!({})).await;
    assert_completed(&node.wait_terminal(&user, &id, TERMINAL).await);

    let reply = node.cancel(&user, &id).await;
    node.expect_error(&reply, 409, "cancel of a completed order");
    assert_completed(&node.order(&user, &id).await);
}
