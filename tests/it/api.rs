//! The orders HTTP API: input validation and JSON errors (401/400/413/404/405), idempotent
//! submission, per-user isolation, listing with cursor paging and filters, and overload (503).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{order_ids, pretty, simulate, unique_user, Node, POLL, TERMINAL};
use crate::history::assert_completed;
use crate::metrics::{scrape, value};
use order_process_testkit::poll::until;

#[tokio::test]
async fn bad_requests_get_json_errors_and_the_node_stays_healthy() {
    let node = Node::start(&simulate("10ms")).await;
    let user = unique_user("alice");
    let id = node.create_order(&user, &json!({})).await;

    // 401: no user.
    let reply = node.call(Method::POST, "/orders").body("{}").send().await;
    node.expect_error(&reply, 401, "POST /orders without Authorization");
    let reply = node
        .call(Method::POST, "/orders")
        .user("")
        .body("{}")
        .send()
        .await;
    node.expect_error(&reply, 401, "POST /orders with an empty Authorization");
    let reply = node.call(Method::GET, "/orders").send().await;
    node.expect_error(&reply, 401, "GET /orders without Authorization");
    let reply = node
        .call(Method::GET, &format!("/orders/{id}"))
        .send()
        .await;
    node.expect_error(&reply, 401, "GET /orders/{id} without Authorization");

    // 400: the body must be one JSON object.
    for body in [
        "[]",
        "\"x\"",
        "null",
        "42",
        "true",
        "{bad",
        "",
        "{\"a\":1} trailing",
    ] {
        let reply = node.post_order(&user, body).await;
        node.expect_error(&reply, 400, &format!("POST /orders with body {body:?}"));
    }

    // 413: over max_body_bytes (64 KiB); just under it is fine.
    let big = json!({"blob": "x".repeat(70 * 1024)}).to_string();
    let reply = node.post_order(&user, &big).await;
    node.expect_error(&reply, 413, "POST /orders with a 70 KiB body");
    let near_limit = json!({"blob": "x".repeat(60 * 1024)}).to_string();
    let reply = node.post_order(&user, &near_limit).await;
    node.expect_json(&reply, 201, "POST /orders with a 60 KiB body");

    // 404: unknown order, malformed id, unknown path.
    let unknown = uuid::Uuid::new_v4().to_string();
    node.expect_error(
        &node.get_order(&user, &unknown).await,
        404,
        "GET of an unknown order id",
    );
    node.expect_error(
        &node.get_order(&user, "not-a-uuid").await,
        404,
        "GET of a malformed order id",
    );
    let reply = node.call(Method::GET, "/no/such/path").send().await;
    node.expect_error(&reply, 404, "GET of an unknown path");
    let reply = node
        .call(Method::GET, &format!("/orders/{id}/nope"))
        .user(&user)
        .send()
        .await;
    node.expect_error(&reply, 404, "GET of an unknown path under an order");

    // 405: a known path with the wrong method (authorized, so only the method is wrong).
    let reply = node
        .call(Method::DELETE, "/orders")
        .user(&user)
        .send()
        .await;
    node.expect_error(&reply, 405, "DELETE /orders");
    let reply = node
        .call(Method::PUT, &format!("/orders/{id}"))
        .user(&user)
        .body("{}")
        .send()
        .await;
    node.expect_error(&reply, 405, "PUT /orders/{id}");
    let reply = node
        .call(Method::GET, &format!("/orders/{id}/cancel"))
        .user(&user)
        .send()
        .await;
    node.expect_error(&reply, 405, "GET /orders/{id}/cancel");
    let reply = node
        .call(Method::POST, "/diagnostic/heartbeat")
        .send()
        .await;
    node.expect_error(&reply, 405, "POST /diagnostic/heartbeat");

    // Still healthy, and never panicked.
    node.heartbeat().await;
    let after = node
        .create_order(&user, &json!({"after": "bad input"}))
        .await;
    assert_completed(&node.wait_terminal(&user, &after, TERMINAL).await);
    assert!(
        !node.log().contains("panicked"),
        "the node panicked:\n{}",
        node.log_tail()
    );
}

/// One request written by hand (so that a header can hold bytes that are not text, and a body
/// can come in chunks) on a connection of its own; the status and the body of the answer.
async fn raw_request(node: &Node, head: &[u8], body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = node.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to the node");
    let mut request = head.to_vec();
    request.extend_from_slice(b"Host: localhost\r\nConnection: close\r\n\r\n");
    request.extend_from_slice(body);
    if let Err(error) = stream.write_all(&request).await {
        // A node that answered before the whole body came closes the connection: its answer is
        // read below.
        eprintln!("sending the request: {error}");
    }
    // Read until the node closes the connection; a node that refused a body before reading all
    // of it may reset the connection after its answer, which ends the answer too.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(read)) => answer.extend_from_slice(&chunk[..read]),
            Ok(Err(error)) if !answer.is_empty() => {
                eprintln!("connection ended by {error} after the answer");
                break;
            }
            Ok(Err(error)) => panic!("reading the answer: {error}"),
            Err(_) => panic!("no whole answer within 20s: {answer:?}"),
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A request that a route took by path and method and then refused gets that route's answer,
/// not the 405 of another route on the same path; and the batch long poll reads its body as
/// submissions do (in chunks too, a larger one refused with 413).
#[tokio::test]
async fn a_refused_header_or_body_gets_its_own_error_not_405() {
    let node = Node::start(&simulate("10ms")).await;
    let user = unique_user("raw");
    let id = node.create_order(&user, &json!({})).await;
    let expect = |(status, body): (u16, String), want: u16, mention: &str, what: &str| {
        let error: Value = serde_json::from_str(&body)
            .unwrap_or_else(|_| panic!("{what}: not a JSON body: {status} {body:?}"));
        assert_eq!(status, want, "{what}: {body}");
        let message = error["error"].as_str().unwrap_or_default();
        assert!(message.contains(mention), "{what}: {body}");
    };

    // "café" in Latin-1: a byte that is not text.
    let head = [
        format!("POST /orders HTTP/1.1\r\nAuthorization: {user}\r\nContent-Length: 2\r\n")
            .as_bytes(),
        b"Idempotency-Key: caf\xe9\r\n",
    ]
    .concat();
    expect(
        raw_request(&node, &head, b"{}").await,
        400,
        "idempotency-key",
        "POST /orders with an Idempotency-Key that is not text",
    );
    let head = [
        format!("GET /orders/{id} HTTP/1.1\r\nAuthorization: caf").as_bytes(),
        &[0xe9],
        b"\r\n",
    ]
    .concat();
    expect(
        raw_request(&node, &head, b"").await,
        400,
        "authorization",
        "GET /orders/{id} with an Authorization that is not text",
    );

    let ids = |count: usize| {
        let ids = vec![id.clone(); count];
        json!({"order_ids": ids, "wait": "1s"}).to_string()
    };
    let big = ids(1700);
    assert!(big.len() > 64 * 1024, "{} bytes", big.len());
    let head = format!(
        "POST /orders/wait HTTP/1.1\r\nAuthorization: {user}\r\nContent-Length: {}\r\n",
        big.len()
    );
    expect(
        raw_request(&node, head.as_bytes(), big.as_bytes()).await,
        413,
        "larger than",
        "POST /orders/wait with a body over 64 KiB",
    );

    let unknown = uuid::Uuid::new_v4().to_string();
    let small = json!({"order_ids": [id.clone(), unknown.clone()], "wait": "1s"}).to_string();
    let chunked = format!("{:x}\r\n{small}\r\n0\r\n\r\n", small.len());
    let head = format!(
        "POST /orders/wait HTTP/1.1\r\nAuthorization: {user}\r\nTransfer-Encoding: chunked\r\n"
    );
    let (status, body) = raw_request(&node, head.as_bytes(), chunked.as_bytes()).await;
    assert_eq!(status, 200, "POST /orders/wait in chunks: {body}");
    let answer: Value = serde_json::from_str(&body).expect("a JSON answer");
    assert_eq!(
        answer["orders"]
            .as_array()
            .map(Vec::len)
            .unwrap_or_default()
            + answer["pending"]
                .as_array()
                .map(Vec::len)
                .unwrap_or_default(),
        1,
        "the order, finished or pending: {body}"
    );
    assert_eq!(answer["missing"], json!([unknown]), "{body}");

    // The wrong method on a known path is still a 405.
    let head = format!("DELETE /orders/wait HTTP/1.1\r\nAuthorization: {user}\r\n");
    expect(
        raw_request(&node, head.as_bytes(), b"").await,
        405,
        "method",
        "DELETE /orders/wait",
    );
    node.heartbeat().await;
}

/// The curl line of DESIGN.md (`curl -X POST -d '{…}'`) sends
/// `Content-Type: application/x-www-form-urlencoded`; clients may also send no content type.
/// Only the body decides.
#[tokio::test]
async fn content_type_does_not_matter_only_the_body() {
    let node = Node::start(&simulate("10ms")).await;
    let user = unique_user("curl");
    let body = r#"{"sku":"A1","qty":2}"#;

    let reply = node
        .call(Method::POST, "/orders")
        .user(&user)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await;
    node.expect_json(&reply, 201, "POST /orders the way curl -d sends it");

    let reply = node
        .call(Method::POST, "/orders")
        .user(&user)
        .body(body)
        .without_content_type()
        .send()
        .await;
    node.expect_json(&reply, 201, "POST /orders without Content-Type");
}

/// A payload's numbers come back as they were sent: each to the same double (read correctly
/// rounded, where a fast reading can be one unit off in the last place), written the shortest
/// way that reads back to it; and a replay with the same body is the same order.
#[tokio::test]
async fn a_payloads_numbers_come_back_as_sent() {
    let node = Node::start(&simulate("10ms")).await;
    let user = unique_user("numbers");
    let body = r#"{"a":1.5777777777770001,"b":2.2250738585072011e-308,"c":0.30000000000000004,"d":-0.0,"e":12345678901234567890,"f":-9007199254740993,"g":1e300}"#;
    let created = node.expect_json(
        &node.post_order_keyed(&user, "numbers-1", body).await,
        201,
        "POST /orders with numbers",
    );
    let id = created["order_id"].as_str().unwrap_or_default().to_string();
    let reply = node.get_order(&user, &id).await;
    let start = reply
        .text
        .find(r#""payload":"#)
        .map(|at| at + r#""payload":"#.len());
    let shown = start
        .and_then(|start| {
            reply.text[start..]
                .find('}')
                .map(|end| &reply.text[start..=start + end])
        })
        .unwrap_or_else(|| panic!("no payload in {reply}"));
    assert_eq!(
        shown,
        r#"{"a":1.5777777777770001,"b":2.225073858507201e-308,"c":0.30000000000000004,"d":-0.0,"e":12345678901234567890,"f":-9007199254740993,"g":1e+300}"#
    );
    let again = node.expect_json(
        &node.post_order_keyed(&user, "numbers-1", body).await,
        200,
        "the same keyed POST again",
    );
    assert_eq!(again["order_id"], created["order_id"]);
}

#[tokio::test]
async fn idempotency_key_is_per_user() {
    let node = Node::start(&simulate("10ms")).await;
    let alice = unique_user("alice");
    let bob = unique_user("bob");
    let key = uuid::Uuid::new_v4().to_string();

    let first = node.expect_json(
        &node.post_order_keyed(&alice, &key, "{}").await,
        201,
        "first keyed POST",
    );
    let again = node.expect_json(
        &node.post_order_keyed(&alice, &key, "{}").await,
        200,
        "same user, same key",
    );
    assert_eq!(
        again["order_id"], first["order_id"],
        "a replay returns the same order"
    );
    assert_eq!(
        again["start_time"], first["start_time"],
        "a replay returns the same start_time"
    );
    // The same key with another body is another order, not a retry: refused.
    let reply = node.post_order_keyed(&alice, &key, r#"{"sku":"B2"}"#).await;
    node.expect_error(&reply, 422, "same user, same key, another body");
    let first_id = first["order_id"].as_str().unwrap_or_default();
    assert!(reply.text.contains(first_id), "{reply}");

    let bobs = node.expect_json(
        &node.post_order_keyed(&bob, &key, "{}").await,
        201,
        "other user, same key",
    );
    assert_ne!(
        bobs["order_id"], first["order_id"],
        "another user's key is another order"
    );
    let other = node.expect_json(
        &node.post_order_keyed(&alice, "another-key", "{}").await,
        201,
        "new key",
    );
    assert_ne!(
        other["order_id"], first["order_id"],
        "another key is another order"
    );

    // The replay stored nothing new.
    let mut listed = node.list_all_ids(&alice, &[]).await;
    listed.sort();
    let mut expected = vec![
        first["order_id"].as_str().unwrap().to_string(),
        other["order_id"].as_str().unwrap().to_string(),
    ];
    expected.sort();
    assert_eq!(listed, expected, "alice's orders after a replay");
}

/// On Redis too, with the payload kept apart from the stored order (`database.payload_apart`),
/// a key used again with the same body gets its order back and with another body a 422.
#[tokio::test]
async fn a_key_used_again_with_another_body_is_refused_on_redis() {
    let redis = crate::harness::RedisServer::start();
    let node = Node::start(&format!(
        "{}[database]\nurl = \"{}\"\npayload_apart = true\n[cluster]\nsecret = \"api-test-cluster-secret\"\n",
        simulate("10ms"),
        redis.url()
    ))
    .await;
    let user = unique_user("keyed");
    let body = r#"{"sku":"A1","qty":2}"#;
    let first = node.expect_json(
        &node.post_order_keyed(&user, "cart-7", body).await,
        201,
        "first keyed POST",
    );
    let again = node.expect_json(
        &node
            .post_order_keyed(&user, "cart-7", r#"{"qty": 2, "sku": "A1"}"#)
            .await,
        200,
        "the same body again, its keys in another order",
    );
    assert_eq!(again["order_id"], first["order_id"]);
    let reply = node
        .post_order_keyed(&user, "cart-7", r#"{"sku":"A1","qty":3}"#)
        .await;
    node.expect_error(&reply, 422, "the same key with another body");
}

#[tokio::test]
async fn users_only_see_their_own_orders() {
    let node = Node::start(&simulate("10ms")).await;
    let alice = unique_user("alice");
    let bob = unique_user("bob");
    let id = node.create_order(&alice, &json!({"secret": true})).await;

    node.expect_error(
        &node.get_order(&bob, &id).await,
        404,
        "bob reads alice's order",
    );
    node.expect_error(
        &node.cancel(&bob, &id).await,
        404,
        "bob cancels alice's order",
    );
    let bobs = node.expect_json(&node.list(&bob, &[]).await, 200, "bob lists his orders");
    assert_eq!(
        order_ids(&bobs),
        Vec::<String>::new(),
        "bob's list: {}",
        pretty(&bobs)
    );

    let unknown = uuid::Uuid::new_v4().to_string();
    node.expect_error(
        &node.cancel(&alice, &unknown).await,
        404,
        "cancel of an unknown order",
    );

    // Bob's attempts changed nothing for alice.
    let order = node.wait_terminal(&alice, &id, TERMINAL).await;
    assert_completed(&order);
    assert_eq!(
        node.list_all_ids(&alice, &[]).await,
        vec![id],
        "alice's list"
    );
}

#[tokio::test]
async fn listing_pages_newest_first_and_filters_by_step() {
    let node = Node::start(&simulate("10ms")).await;
    let user = unique_user("lister");

    // Five orders, created one after the other; the 2nd and 4th fail.
    let mut created = Vec::new();
    for index in 0..5 {
        let body = if index % 2 == 1 {
            json!({"simulate": {"fail_at": "Scheduling"}})
        } else {
            json!({"n": index})
        };
        created.push(node.create_order(&user, &body).await);
    }
    let mut views = Vec::new();
    for id in &created {
        views.push(node.wait_terminal(&user, id, TERMINAL).await);
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    let failed: Vec<String> = newest_first
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, id)| id.clone())
        .collect();
    let completed: Vec<String> = newest_first
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(_, id)| id.clone())
        .collect();

    // Default limit: everything on one page, no cursor; entries are the GET /orders/{id} view.
    let page = node.expect_json(&node.list(&user, &[]).await, 200, "GET /orders");
    assert_eq!(
        order_ids(&page),
        newest_first,
        "GET /orders is newest first: {}",
        pretty(&page)
    );
    assert_eq!(
        page["next_cursor"],
        Value::Null,
        "one page only: {}",
        pretty(&page)
    );
    for listed in page["orders"].as_array().unwrap() {
        let single = views
            .iter()
            .find(|view| view["order_id"] == listed["order_id"])
            .unwrap();
        assert_eq!(
            listed, single,
            "a listed order is the same view as GET /orders/{{id}}"
        );
    }

    // limit=2: pages of 2, 2, 1 through the cursor, nothing repeated or skipped.
    let mut paged = Vec::new();
    let mut sizes = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..5 {
        let mut query = vec![("limit", "2")];
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor.as_str()));
        }
        let page = node.expect_json(&node.list(&user, &query).await, 200, "GET /orders?limit=2");
        let ids = order_ids(&page);
        sizes.push(ids.len());
        paged.extend(ids);
        match &page["next_cursor"] {
            Value::String(next) => cursor = Some(next.clone()),
            Value::Null => break,
            other => panic!("next_cursor must be a string or null, got {other}"),
        }
    }
    assert_eq!(sizes, [2, 2, 1], "page sizes with limit=2 over 5 orders");
    assert_eq!(
        paged, newest_first,
        "paging with limit=2 yields every order once, newest first"
    );
    let unique: HashSet<&String> = paged.iter().collect();
    assert_eq!(unique.len(), paged.len(), "no order appears on two pages");

    // Filters, alone and with paging.
    assert_eq!(
        node.list_all_ids(&user, &[("current_step", "Failed")])
            .await,
        failed,
        "current_step=Failed"
    );
    assert_eq!(
        node.list_all_ids(&user, &[("current_step", "Completed")])
            .await,
        completed,
        "current_step=Completed"
    );
    assert_eq!(
        node.list_all_ids(&user, &[("current_step", "Completed"), ("limit", "1")])
            .await,
        completed,
        "current_step=Completed&limit=1, paged"
    );
    node.expect_json(
        &node.list(&user, &[("limit", "500")]).await,
        200,
        "limit=500 is allowed",
    );

    // Bad parameters.
    for limit in ["0", "501", "abc", "-1", ""] {
        let reply = node.list(&user, &[("limit", limit)]).await;
        node.expect_error(&reply, 400, &format!("GET /orders?limit={limit}"));
    }
    let reply = node.list(&user, &[("current_step", "Bogus")]).await;
    node.expect_error(&reply, 400, "GET /orders?current_step=Bogus");
}

#[tokio::test]
async fn full_queue_answers_503_with_retry_after_and_stores_nothing() {
    let config = "[pipeline]\nworkers = 1\nqueue_capacity = 1\n[simulate]\nduration = \"30s\"\nfailure_rate = 0.0\n";
    let node = Node::start(config).await;
    let user = unique_user("flood");

    let mut accepted = vec![node.create_order(&user, &json!({"n": 0})).await];
    // Let the only worker take the first order, so the second one fills the queue: poll the
    // node's in-flight count (best effort, bounded; an order counted while queued is fine too).
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && inflight(&node.cluster().await) < 1 {
        tokio::time::sleep(POLL).await;
    }

    let mut rejection = None;
    for n in 1..=10 {
        let reply = node.post_order(&user, &json!({"n": n}).to_string()).await;
        match reply.status {
            201 => accepted.push(
                node.expect_json(&reply, 201, "POST /orders")["order_id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            ),
            503 => {
                rejection = Some(reply);
                break;
            }
            _ => panic!(
                "POST /orders on a full queue: expected 201 or 503, got {reply}\n{}",
                node.log_tail()
            ),
        }
    }
    let rejection = rejection.unwrap_or_else(|| {
        panic!(
            "no 503 after 10 orders with 1 worker and queue 1\n{}",
            node.log_tail()
        )
    });
    node.expect_error(&rejection, 503, "POST /orders on a full queue");
    let retry_after = rejection
        .header("retry-after")
        .unwrap_or_else(|| panic!("503 without Retry-After: {rejection}"));
    let seconds: u64 = retry_after
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {retry_after:?} is not seconds"));
    assert!(
        seconds >= 1,
        "Retry-After of retry_after = 1s: {retry_after:?}"
    );
    assert_eq!(
        accepted.len(),
        2,
        "with workers = 1 and queue_capacity = 1, exactly 2 orders are accepted"
    );

    // Nothing was stored for the 503.
    let newest_first: Vec<String> = accepted.iter().rev().cloned().collect();
    assert_eq!(
        node.list_all_ids(&user, &[]).await,
        newest_first,
        "the user's orders are exactly the accepted ones"
    );
    node.heartbeat().await;
}

/// The `inflight` count of the (single) node in `GET /diagnostic/cluster`, 0 if absent.
fn inflight(cluster: &Value) -> u64 {
    cluster["nodes"][0]["inflight"].as_u64().unwrap_or(0)
}

/// Long polls waiting when the node is told to stop are answered then, with the order as it
/// is, not cut off when the HTTP server stops after the grace period.
#[tokio::test]
async fn long_polls_are_answered_when_the_node_begins_to_stop() {
    let mut node = Node::start(&format!(
        "{}[server]\nshutdown_grace = \"20s\"\n",
        simulate("60s")
    ))
    .await;
    let user = unique_user("poller");
    let id = node.create_order(&user, &json!({})).await;
    let gets = "order_process_store_operation_duration_seconds_count{operation=\"get\"}";
    let read_before = value(&scrape(&node).await, gets);
    let client = reqwest::Client::new();
    let one = client
        .get(format!("{}/orders/{id}?wait=60s", node.base))
        .header("Authorization", &user)
        .send();
    // With an id that does not run here, which the batch reads once it waits.
    let absent = "00000000-0000-4000-8000-000000000000";
    let many = client
        .post(format!("{}/orders/wait", node.base))
        .header("Authorization", &user)
        .header("Content-Type", "application/json")
        .body(json!({"order_ids": [id, absent], "wait": "60s"}).to_string())
        .send();
    let polls = tokio::spawn(async move { tokio::join!(one, many) });
    // Each poll reads the store once it is registered to be told of the end.
    let waiting = until(Duration::from_secs(10), POLL, || async {
        (value(&scrape(&node).await, gets) >= read_before + 2.0).then_some(())
    })
    .await;
    assert!(waiting.is_some(), "the polls never read the store");
    let stopped = Instant::now();
    node.term();
    let (one, many) = tokio::time::timeout(Duration::from_secs(10), polls)
        .await
        .expect("both polls answered long before the grace period ends")
        .expect("the polls' task");
    let one = one.expect("an answer to the wait for one");
    assert_eq!(one.status().as_u16(), 200);
    let order: Value = one.json().await.expect("the order");
    assert_eq!(order["order_id"], id.as_str(), "{order}");
    assert!(order["complete_time"].is_null(), "still running: {order}");
    let many = many.expect("an answer to the wait for many");
    assert_eq!(many.status().as_u16(), 200);
    let waited: Value = many.json().await.expect("the batch");
    assert_eq!(waited["pending"], json!([id]), "{waited}");
    assert!(stopped.elapsed() < Duration::from_secs(10));
    // A poll that comes while the node drains is told to ask again later (elsewhere), rather
    // than answered at once, over and over, by a client that polls until the order ends.
    let reply = node
        .call(Method::GET, &format!("/orders/{id}"))
        .user(&user)
        .query("wait", "60s")
        .send()
        .await;
    node.expect_error(&reply, 503, "a long poll while the node drains");
    assert!(reply.header("retry-after").is_some(), "{reply}");
    let reply = node
        .call(Method::POST, "/orders/wait")
        .user(&user)
        .body(json!({"order_ids": [id], "wait": "60s"}).to_string())
        .send()
        .await;
    node.expect_error(&reply, 503, "a batch long poll while the node drains");
    // A read that does not wait is answered as ever.
    node.expect_json(
        &node.get_order(&user, &id).await,
        200,
        "a read while the node drains",
    );
    node.wait_exit(Duration::from_secs(60)).await;
}
