//! `GET /service/nodes/{service_id}/orders`: the read-only view of the unfinished orders a node
//! owns, on a cluster node sharing a real `redis-server`, with the same callers as
//! `/service/transfer` (the cluster secret or an admin token; 401, 403, and 409 on a lone node).

use reqwest::Method;
use serde_json::{json, Value};

use crate::cluster::cluster_turn;
use crate::harness::{Node, RedisServer, Reply, TERMINAL};
use crate::security::{bearer, standard_tokens, ALICE, BOB, ROOT};

const SECRET: &str = "service-view-secret";

/// `GET path` as a peer, with the cluster secret.
async fn with_secret(node: &Node, path: &str) -> Reply {
    node.call(Method::GET, path)
        .header("X-Cluster-Secret", SECRET)
        .send()
        .await
}

#[tokio::test]
async fn a_node_lists_the_unfinished_orders_another_owns() {
    let _turn = cluster_turn().await;
    let redis = RedisServer::start();
    let tokens = standard_tokens();
    // Processing takes long enough that the orders stay unfinished for the whole test.
    let config = format!(
        "[simulate]\nduration = \"10ms\"\nfailure_rate = 0.0\n\
         [steps.Processing]\nhandler = \"simulate\"\nduration = \"60s\"\nfailure_rate = 0.0\n\
         [database]\nurl = \"{}\"\ntimeout = \"1s\"\n\
         [cluster]\nsecret = \"{SECRET}\"\n\
         [auth]\nmode = \"tokens\"\ntokens_file = \"{}\"\n",
        redis.url(),
        tokens.path().display()
    );
    let node = Node::start(&config).await;
    let service_id = node.service_id_file();
    let mut ids = Vec::new();
    for sku in ["S1", "S2"] {
        ids.push(
            node.create_order(&bearer(ALICE), &json!({ "sku": sku }))
                .await,
        );
    }
    let path = format!("/service/nodes/{service_id}/orders");

    let reply = node.call(Method::GET, &path).send().await;
    node.expect_error(&reply, 401, "the view without the secret");
    let reply = node
        .call(Method::GET, &path)
        .header("X-Cluster-Secret", "guess")
        .send()
        .await;
    node.expect_error(&reply, 401, "the view with a wrong secret");
    let reply = node
        .call(Method::GET, &path)
        .user(&bearer(BOB))
        .send()
        .await;
    node.expect_error(&reply, 403, "a user asks for the view");

    let listed = |view: &Value| -> Vec<String> {
        let mut listed: Vec<String> = view["unfinished"]
            .as_array()
            .unwrap_or_else(|| panic!("no unfinished array in {view}"))
            .iter()
            .map(|id| id.as_str().unwrap_or_default().to_string())
            .collect();
        listed.sort();
        listed
    };
    ids.sort();
    let reply = with_secret(&node, &path).await;
    let view = node.expect_json(&reply, 200, "the view with the secret");
    assert_eq!(view["service_id"], service_id.as_str(), "{view}");
    assert_eq!(listed(&view), ids, "{view}");
    let reply = node
        .call(Method::GET, &path)
        .user(&bearer(ROOT))
        .send()
        .await;
    let view = node.expect_json(&reply, 200, "the view for an admin");
    assert_eq!(listed(&view), ids, "{view}");

    // A finished order is not in the view; a node that owns nothing has an empty one.
    let failing = json!({"simulate": {"fail_at": "Scheduling"}});
    let finished = node.create_order(&bearer(ALICE), &failing).await;
    node.wait_terminal(&bearer(ALICE), &finished, TERMINAL)
        .await;
    let reply = with_secret(&node, &path).await;
    let view = node.expect_json(&reply, 200, "the view after an order finished");
    assert_eq!(listed(&view), ids, "{view}");
    let reply = with_secret(&node, "/service/nodes/nobody/orders").await;
    let view = node.expect_json(&reply, 200, "the view of an unknown node");
    assert_eq!(view["unfinished"], json!([]), "{view}");
}

#[tokio::test]
async fn a_lone_node_has_no_cluster_view() {
    let tokens = standard_tokens();
    let node = Node::start(&tokens.config("")).await;
    let path = format!("/service/nodes/{}/orders", node.service_id_file());
    let reply = node
        .call(Method::GET, &path)
        .user(&bearer(ROOT))
        .send()
        .await;
    node.expect_error(&reply, 409, "an admin asks a lone node for the view");
    let reply = node
        .call(Method::GET, &path)
        .user(&bearer(BOB))
        .send()
        .await;
    node.expect_error(&reply, 403, "a user asks a lone node for the view");
}
