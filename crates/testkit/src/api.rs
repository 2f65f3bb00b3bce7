//! The requests the tests make of a node's API: orders submitted, read, listed, waited for and
//! cancelled, and the diagnostics; each asserts the status it expects.

use crate::http::Reply;
use crate::node::Node;
use crate::{order_ids, pretty, POLL};
use reqwest::Method;
use serde_json::Value;
use std::time::{Duration, Instant};

impl Node {
    /// `POST /orders` with a raw body (sent as `application/json`).
    pub async fn post_order(&self, user: &str, body: &str) -> Reply {
        self.call(Method::POST, "/orders")
            .user(user)
            .body(body)
            .send()
            .await
    }

    /// `POST /orders` with an `Idempotency-Key`.
    pub async fn post_order_keyed(&self, user: &str, key: &str, body: &str) -> Reply {
        self.call(Method::POST, "/orders")
            .user(user)
            .header("Idempotency-Key", key)
            .body(body)
            .send()
            .await
    }

    /// Creates an order, asserts the 201 `{"order_id", "start_time"}` shape, returns the id.
    pub async fn create_order(&self, user: &str, body: &Value) -> String {
        let reply = self.post_order(user, &body.to_string()).await;
        let created = self.expect_json(&reply, 201, "POST /orders");
        let id = created["order_id"]
            .as_str()
            .unwrap_or_else(|| panic!("201 without a string order_id: {reply}"))
            .to_string();
        assert!(
            uuid::Uuid::parse_str(&id).is_ok(),
            "order_id is not a UUID: {reply}"
        );
        if let Err(problem) = order_process_history::time::utc(&created["start_time"]) {
            panic!("start_time of the 201: {problem}: {reply}");
        }
        id
    }

    pub async fn get_order(&self, user: &str, id: &str) -> Reply {
        self.as_user(Method::GET, &format!("/orders/{id}"), user)
            .await
    }

    /// A request with no body on `path`, as `user`.
    async fn as_user(&self, method: Method, path: &str, user: &str) -> Reply {
        self.call(method, path).user(user).send().await
    }

    /// `GET /orders/{id}`, asserting 200.
    pub async fn order(&self, user: &str, id: &str) -> Value {
        let reply = self.get_order(user, id).await;
        self.expect_json(&reply, 200, &format!("GET /orders/{id}"))
    }

    /// Polls `GET /orders/{id}` until `ready(order)`; panics at the deadline with the last view.
    /// A 503 (the store did not answer within the node's timeout, as on a loaded machine) is
    /// asked again, as a client would; any other status but 200 fails at once.
    pub async fn wait_for(
        &self,
        user: &str,
        id: &str,
        within: Duration,
        what: &str,
        ready: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        let mut last = Value::Null;
        loop {
            let reply = self.get_order(user, id).await;
            if reply.status != 503 {
                let order = self.expect_json(&reply, 200, &format!("GET /orders/{id}"));
                if ready(&order) {
                    return order;
                }
                last = order;
            }
            if Instant::now() >= deadline {
                panic!(
                    "order {id}: not {what} within {within:?}; last view ({reply}):\n{}\n{}",
                    pretty(&last),
                    self.log_tail()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls until the order has a `complete_time` (it is finished) and returns it.
    pub async fn wait_terminal(&self, user: &str, id: &str, within: Duration) -> Value {
        self.wait_for(user, id, within, "finished (complete_time set)", |order| {
            order
                .get("complete_time")
                .is_some_and(|time| !time.is_null())
        })
        .await
    }

    /// Polls until the order's `current_step` is `step`.
    pub async fn wait_step(&self, user: &str, id: &str, step: &str, within: Duration) -> Value {
        self.wait_for(user, id, within, &format!("at step {step}"), |order| {
            order["current_step"] == step
        })
        .await
    }

    /// `GET /orders` with query parameters.
    pub async fn list(&self, user: &str, query: &[(&str, &str)]) -> Reply {
        let mut call = self.call(Method::GET, "/orders").user(user);
        for (name, value) in query {
            call = call.query(name, value);
        }
        call.send().await
    }

    /// The order ids of every page of `GET /orders` (following `next_cursor`), in order.
    pub async fn list_all_ids(&self, user: &str, query: &[(&str, &str)]) -> Vec<String> {
        let mut ids = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let mut query: Vec<(&str, &str)> = query.to_vec();
            if let Some(cursor) = &cursor {
                query.push(("cursor", cursor));
            }
            let page = self.expect_json(&self.list(user, &query).await, 200, "GET /orders");
            ids.extend(order_ids(&page));
            match &page["next_cursor"] {
                Value::Null => return ids,
                Value::String(next) => cursor = Some(next.clone()),
                other => panic!("next_cursor is neither a string nor null: {other}"),
            }
        }
        panic!("GET /orders: more than 100 pages, is next_cursor advancing?");
    }

    pub async fn cancel(&self, user: &str, id: &str) -> Reply {
        self.as_user(Method::POST, &format!("/orders/{id}/cancel"), user)
            .await
    }

    /// `GET /diagnostic/heartbeat`, asserting 200.
    pub async fn heartbeat(&self) -> Value {
        let reply = self.call(Method::GET, "/diagnostic/heartbeat").send().await;
        self.expect_json(&reply, 200, "GET /diagnostic/heartbeat")
    }

    /// `GET /diagnostic/cluster`, asserting 200.
    pub async fn cluster(&self) -> Value {
        let reply = self.call(Method::GET, "/diagnostic/cluster").send().await;
        self.expect_json(&reply, 200, "GET /diagnostic/cluster")
    }
}
