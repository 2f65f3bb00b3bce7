//! The `http` step handler against a real HTTP service run by the test: the testkit's scripted
//! shop on 127.0.0.1:0 playing the scheduling, stock, payment and shipping services. It records
//! every call (path, idempotency key, body, time) and answers as each test scripts it: 200 with
//! a body, a 4xx or 5xx with a text, or no answer at all. The node is the real binary, its
//! steps pointed at the shop.

use std::ops::Deref;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::cluster::{cluster_turn, node_config, wait_formed, TAKEOVER};
use crate::faketime::FakeClock;
use crate::harness::{pretty, simulate, unique_user, Node, RedisServer, POLL, TERMINAL};
use crate::history::{assert_completed, assert_failed_at, utc_time};
use order_process_testkit::{Answer, Scripted, ShopCall as Call};

/// Each step's run and rollback paths on the shop.
const PATHS: [(&str, &str, &str); 4] = [
    ("Scheduling", "/schedule", "/unschedule"),
    ("Pre-Processing", "/reserve", "/release"),
    ("Processing", "/charge", "/refund"),
    ("Post-Processing", "/ship", "/cancel-shipment"),
];

/// The testkit's scripted shop, with the node config that points the steps at it.
struct Shop(Scripted);

impl Deref for Shop {
    type Target = Scripted;

    fn deref(&self) -> &Scripted {
        &self.0
    }
}

impl Shop {
    async fn start() -> Shop {
        Shop(Scripted::start().await)
    }

    /// A `[steps.<Step>]` section pointing `step` at this shop.
    fn section(&self, step: &str, timing: &Timing) -> String {
        let (_, run, rollback) = PATHS
            .iter()
            .find(|(name, _, _)| *name == step)
            .expect("a work step");
        format!(
            "[steps.{step}]\nhandler = \"http\"\nurl = \"{base}{run}\"\nrollback_url = \"{base}{rollback}\"\n\
             timeout = \"{}\"\nretries = {}\nbackoff = \"{}\"\nbackoff_max = \"{}\"\n",
            timing.timeout,
            timing.retries,
            timing.backoff,
            timing.backoff_max,
            base = self.base()
        )
    }

    /// Two cluster nodes on `redis` with every step on this shop, Processing timed by
    /// `processing`; returns once they see each other and a leader.
    async fn two_nodes(&self, redis: &RedisServer, processing: Timing) -> Vec<Node> {
        let special = Some(("Processing", processing));
        let first =
            Node::start(&self.sections(node_config(redis, "10ms", &[]), &QUICK, special.clone()))
                .await;
        let second =
            Node::start(&self.sections(node_config(redis, "10ms", &[first.port]), &QUICK, special))
                .await;
        let nodes = vec![first, second];
        wait_formed(&nodes, 2).await;
        nodes
    }

    /// A node config with every step on this shop; `special` overrides the timing of one step.
    fn config(&self, timing: &Timing, special: Option<(&str, Timing)>) -> String {
        self.sections(simulate("10ms"), timing, special)
    }

    /// `config` followed by a section for every step.
    fn sections(
        &self,
        mut config: String,
        timing: &Timing,
        special: Option<(&str, Timing)>,
    ) -> String {
        for (step, _, _) in PATHS {
            match &special {
                Some((name, own)) if *name == step => config.push_str(&self.section(step, own)),
                _ => config.push_str(&self.section(step, timing)),
            }
        }
        config
    }
}

/// Timeout, retries and backoff of one step.
#[derive(Clone)]
struct Timing {
    timeout: &'static str,
    retries: u32,
    backoff: &'static str,
    backoff_max: &'static str,
}

impl Timing {
    const fn new(
        timeout: &'static str,
        retries: u32,
        backoff: &'static str,
        backoff_max: &'static str,
    ) -> Timing {
        Timing {
            timeout,
            retries,
            backoff,
            backoff_max,
        }
    }
}

const QUICK: Timing = Timing::new("5s", 3, "50ms", "200ms");

/// One node with `timing` for every http step runs one order for a new user `who` to its end:
/// the order's id and its final view.
async fn one_order(shop: &Shop, timing: &Timing, who: &str) -> (String, Value) {
    let node = Node::start(&shop.config(timing, None)).await;
    let user = unique_user(who);
    let id = node.create_order(&user, &json!({"sku": "C3"})).await;
    let order = node.wait_terminal(&user, &id, TERMINAL).await;
    (id, order)
}

/// One quick retry: a step that fails twice in a row gives up.
const ONE_RETRY: Timing = Timing::new("5s", 1, "50ms", "50ms");

/// A shop that refuses to ship (so every order fails at Post-Processing) and whose refund
/// service is down for the next `failures` calls.
async fn shop_with_refunds_down(failures: usize) -> Shop {
    let shop = Shop::start().await;
    shop.answer("/ship", Answer::Status(400, "bad address".into()));
    shop.queue(
        "/refund",
        vec![Answer::Status(500, "ledger down".into()); failures],
    );
    shop
}

fn step_entry<'a>(order: &'a Value, step: &str) -> &'a Value {
    order["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|entry| entry["step_name"] == step))
        .unwrap_or_else(|| panic!("no {step} entry in {}", pretty(order)))
}

fn attempts(order: &Value, step: &str) -> Vec<Value> {
    step_entry(order, step)["attempts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn attempt_numbers(calls: &[Call]) -> Vec<u64> {
    calls
        .iter()
        .map(|call| call.body["attempt"].as_u64().unwrap_or(0))
        .collect()
}

/// Asserts that consecutive calls are at least `at_least` apart.
fn assert_gaps(calls: &[Call], at_least: Duration, what: &str) {
    for pair in calls.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap >= at_least,
            "{what}: retry after {gap:?}, before the backoff of {at_least:?}"
        );
    }
}

#[tokio::test]
async fn steps_call_the_services_in_order_with_idempotency_keys() {
    let shop = Shop::start().await;
    let node = Node::start(&shop.config(&QUICK, None)).await;
    let user = unique_user("alice");
    let payload = json!({"sku": "A1", "qty": 2});
    let id = node.create_order(&user, &payload).await;
    let order = node.wait_terminal(&user, &id, TERMINAL).await;
    assert_completed(&order);

    let calls = shop.calls();
    let paths: Vec<&str> = calls.iter().map(|call| call.path.as_str()).collect();
    assert_eq!(paths, ["/schedule", "/reserve", "/charge", "/ship"]);
    for (call, (step, _, _)) in calls.iter().zip(PATHS) {
        assert_eq!(
            call.key,
            format!("{id}:{step}"),
            "Idempotency-Key of {step}"
        );
        assert_eq!(call.body["order_id"], id.as_str());
        assert_eq!(call.body["step"], step);
        assert_eq!(call.body["attempt"], 1);
        assert_eq!(call.body["rollback"], false);
        assert_eq!(call.body["user"], user.as_str());
        assert_eq!(call.body["payload"], payload);
        assert!(call.body["outputs"].is_object(), "{}", call.body);
        // One attempt per step is recorded, with its status and duration.
        let recorded = attempts(&order, step);
        assert_eq!(recorded.len(), 1, "{step}: {}", pretty(&order));
        assert_eq!(recorded[0]["attempt"], 1);
        assert_eq!(recorded[0]["status"], 200);
        assert_eq!(recorded[0]["rollback"], false);
        assert!(recorded[0]["duration_ms"].is_u64());
        assert!(recorded[0].get("error").is_none());
    }
}

#[tokio::test]
async fn client_error_fails_the_step_at_once_and_compensates_newest_first() {
    let shop = Shop::start().await;
    shop.answer(
        "/ship",
        Answer::Status(422, "address is not deliverable".into()),
    );
    let node = Node::start(&shop.config(&QUICK, None)).await;
    let user = unique_user("bob");
    let id = node.create_order(&user, &json!({"sku": "B2"})).await;
    let order = node.wait_terminal(&user, &id, TERMINAL).await;
    assert_failed_at(&order, "Post-Processing");
    assert_eq!(order["failure"]["reason"], "address is not deliverable");
    assert_eq!(order["rollback_state"], "complete");

    assert_eq!(
        shop.paths(),
        [
            "/schedule",
            "/reserve",
            "/charge",
            "/ship",
            "/cancel-shipment",
            "/refund",
            "/release",
            "/unschedule"
        ],
        "a 4xx is not retried, and compensation runs newest first"
    );
    for call in &shop.calls()[4..] {
        let step = call.body["step"].as_str().unwrap_or_default();
        assert_eq!(call.body["rollback"], true, "{}", call.path);
        assert_eq!(call.key, format!("{id}:{step}:rollback"), "{}", call.path);
    }
    // One attempt at shipping (no retry), then its rollback, on the same entry.
    let shipping = attempts(&order, "Post-Processing");
    assert_eq!(shipping.len(), 2, "{}", pretty(&order));
    assert_eq!(shipping[0]["rollback"], false);
    assert_eq!(shipping[0]["status"], 422);
    assert_eq!(shipping[0]["error"], "address is not deliverable");
    assert_eq!(shipping[1]["rollback"], true);
    let charge = attempts(&order, "Processing");
    assert_eq!(charge.len(), 2, "{}", pretty(&order));
    assert_eq!(charge[1]["rollback"], true);
    assert_eq!(charge[1]["status"], 200);
}

#[tokio::test]
async fn server_errors_are_retried_after_the_backoff() {
    let shop = Shop::start().await;
    shop.queue(
        "/charge",
        vec![
            Answer::Status(503, "try later".into()),
            Answer::Status(503, "try later".into()),
        ],
    );
    let timing = Timing::new("5s", 5, "300ms", "2s");
    let (id, order) = one_order(&shop, &timing, "carol").await;
    assert_completed(&order);

    let charges = shop.calls_to("/charge");
    assert_eq!(attempt_numbers(&charges), [1, 2, 3]);
    assert!(charges
        .iter()
        .all(|call| call.key == format!("{id}:Processing")));
    assert_gaps(&charges, Duration::from_millis(300), "/charge");
    let recorded = attempts(&order, "Processing");
    let statuses: Vec<&Value> = recorded.iter().map(|attempt| &attempt["status"]).collect();
    assert_eq!(statuses, [&json!(503), &json!(503), &json!(200)]);
    assert_eq!(recorded[0]["error"], "HTTP 503: try later");
    assert!(
        step_entry(&order, "Processing")
            .get("next_attempt_at")
            .is_none(),
        "no retry is due once the step succeeded: {}",
        pretty(&order)
    );
}

#[tokio::test]
async fn a_service_that_never_answers_times_out_retries_and_fails_the_step() {
    let shop = Shop::start().await;
    shop.answer("/reserve", Answer::Hang);
    let timing = Timing::new("300ms", 2, "100ms", "100ms");
    let (_, order) = one_order(&shop, &timing, "dave").await;
    assert_failed_at(&order, "Pre-Processing");

    assert_eq!(attempt_numbers(&shop.calls_to("/reserve")), [1, 2, 3]);
    let reason = order["failure"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("no answer within 300ms"), "{reason}");
    let recorded = attempts(&order, "Pre-Processing");
    let runs: Vec<&Value> = recorded
        .iter()
        .filter(|attempt| attempt["rollback"] == false)
        .collect();
    assert_eq!(runs.len(), 3, "{}", pretty(&order));
    for attempt in runs {
        assert!(attempt.get("status").is_none(), "{attempt}");
        assert!(
            attempt["duration_ms"].as_u64().unwrap_or(0) >= 300,
            "{attempt}"
        );
    }
    // The step that never answered is compensated too, then the one before it.
    let paths = shop.paths();
    assert_eq!(&paths[paths.len() - 2..], ["/release", "/unschedule"]);
}

#[tokio::test]
async fn outputs_reach_later_steps_and_rollbacks() {
    let shop = Shop::start().await;
    shop.answer("/schedule", Answer::Status(200, r#"{"slot": 7}"#.into()));
    shop.answer(
        "/charge",
        Answer::Status(201, r#"{"payment_id": "pay_123"}"#.into()),
    );
    shop.answer("/ship", Answer::Status(409, "no courier".into()));
    // `null` is no output, on the node that ran the step as on any that reads the order.
    shop.answer("/reserve", Answer::Status(200, "null".into()));
    let node = Node::start(&shop.config(&QUICK, None)).await;
    let user = unique_user("erin");
    let id = node.create_order(&user, &json!({"sku": "E5"})).await;
    let order = node.wait_terminal(&user, &id, TERMINAL).await;
    assert_failed_at(&order, "Post-Processing");
    assert_eq!(
        step_entry(&order, "Processing")["output"],
        json!({"payment_id": "pay_123"})
    );
    assert!(step_entry(&order, "Pre-Processing").get("output").is_none());

    let body = |path: &str| {
        shop.calls_to(path)
            .first()
            .map(|call| call.body.clone())
            .unwrap_or_else(|| panic!("no call to {path}: {:?}", shop.paths()))
    };
    assert_eq!(
        body("/reserve")["outputs"],
        json!({"Scheduling": {"slot": 7}})
    );
    let everything = json!({"Scheduling": {"slot": 7}, "Processing": {"payment_id": "pay_123"}});
    assert_eq!(body("/ship")["outputs"], everything);
    // The refund learns the payment id from the charge's answer.
    assert_eq!(body("/refund")["outputs"], everything);
    assert_eq!(body("/refund")["rollback"], true);
}

#[tokio::test]
async fn a_failing_compensation_parks_the_order_until_retried_on_request() {
    let shop = shop_with_refunds_down(3).await;
    let payment = ONE_RETRY;
    let node = Node::start(&shop.config(&QUICK, Some(("Processing", payment)))).await;
    let user = unique_user("frank");
    let id = node.create_order(&user, &json!({"sku": "F6"})).await;

    let parked = node
        .wait_for(&user, &id, TERMINAL, "parked", |order| {
            order["rollback_state"] == "incomplete"
        })
        .await;
    assert_eq!(parked["current_step"], "Failed");
    assert_eq!(
        parked["pending_rollback"],
        json!(["Processing", "Pre-Processing", "Scheduling"]),
        "{}",
        pretty(&parked)
    );
    let reason = parked["failure"]["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("bad address"), "{reason}");
    let rollback_error = parked["rollback_error"].as_str().unwrap_or_default();
    assert!(
        rollback_error.contains("Processing") && rollback_error.contains("ledger down"),
        "{}",
        pretty(&parked)
    );
    assert_eq!(attempt_numbers(&shop.calls_to("/refund")), [1, 2]);
    assert!(
        shop.calls_to("/release").is_empty(),
        "stopped at the refund"
    );
    let log = node.log();
    assert!(
        log.lines()
            .any(|line| line.contains("ERROR") && line.contains("rollback failed")),
        "a parked rollback is logged at error level\n{}",
        node.log_tail()
    );

    // Operators find it by its rollback state.
    let listed = node
        .list_all_ids(&user, &[("rollback_state", "incomplete")])
        .await;
    assert_eq!(listed, std::slice::from_ref(&id));
    let reply = node.list(&user, &[("rollback_state", "maybe")]).await;
    node.expect_error(&reply, 400, "GET /orders?rollback_state=maybe");

    // Only its owner may retry it.
    let path = format!("/orders/{id}/rollback");
    let reply = node.call(Method::POST, &path).user("mallory").send().await;
    node.expect_error(&reply, 404, "POST rollback by another user");
    let reply = node.call(Method::POST, &path).user(&user).send().await;
    let accepted = node.expect_json(&reply, 202, "POST /orders/{id}/rollback");
    assert!(
        accepted.get("rollback_state").is_none(),
        "{}",
        pretty(&accepted)
    );

    // Third refund fails, the retry after it succeeds, and the rest is compensated.
    let order = node.wait_terminal(&user, &id, TERMINAL).await;
    assert_failed_at(&order, "Post-Processing");
    assert_eq!(order["rollback_state"], "complete", "{}", pretty(&order));
    assert_eq!(attempt_numbers(&shop.calls_to("/refund")), [1, 2, 3, 4]);
    let paths = shop.paths();
    assert_eq!(&paths[paths.len() - 2..], ["/release", "/unschedule"]);
    assert!(node
        .list_all_ids(&user, &[("rollback_state", "incomplete")])
        .await
        .is_empty());

    // Nothing parked any more: a second retry is a conflict.
    let reply = node.call(Method::POST, &path).user(&user).send().await;
    node.expect_error(&reply, 409, "POST rollback of a rolled-back order");
}

/// A parked rollback retried while the order's completion webhook is still on its way: the
/// webhook's outcome, written when it comes back, must not undo the retry the user was told of.
#[tokio::test]
async fn a_rollback_retried_while_the_webhook_is_out_is_carried_out() {
    rollback_retried_while_the_webhook_is_out(simulate("10ms")).await;
}

/// The same on Redis, whose re-opening of a parked order is a script of its own.
#[tokio::test]
async fn a_rollback_retried_while_the_webhook_is_out_is_carried_out_on_redis() {
    let redis = RedisServer::start();
    rollback_retried_while_the_webhook_is_out(node_config(&redis, "10ms", &[])).await;
}

async fn rollback_retried_while_the_webhook_is_out(base: String) {
    let shop = shop_with_refunds_down(2).await;
    shop.queue("/order-finished", vec![Answer::Hang]);
    let mut config = shop.sections(base, &QUICK, Some(("Processing", ONE_RETRY)));
    config.push_str(&format!(
        "[notify]\nurl = \"{}/order-finished\"\nsecret = \"webhook-secret-0123456789\"\n\
         timeout = \"3s\"\nretries = 5\nbackoff = \"100ms\"\nbackoff_max = \"100ms\"\n",
        shop.base()
    ));
    let node = Node::start(&config).await;
    let user = unique_user("gina");
    let id = node.create_order(&user, &json!({"sku": "G7"})).await;

    // The order parks and its webhook's first delivery hangs until the node gives up on it.
    let deadline = std::time::Instant::now() + TERMINAL;
    while shop.calls_to("/order-finished").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no webhook call within {TERMINAL:?}: {:?}\n{}",
            shop.paths(),
            node.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
    let path = format!("/orders/{id}/rollback");
    let reply = node.call(Method::POST, &path).user(&user).send().await;
    node.expect_json(
        &reply,
        202,
        "POST /orders/{id}/rollback while the webhook is out",
    );

    let order = node
        .wait_for(&user, &id, TERMINAL, "rolled back", |order| {
            order["rollback_state"] == "complete"
        })
        .await;
    assert_failed_at(&order, "Post-Processing");
    assert_eq!(attempt_numbers(&shop.calls_to("/refund")), [1, 2, 3]);
    // The finished order's webhook is delivered too, telling of the completed rollback.
    let delivered = node
        .wait_for(&user, &id, TERMINAL, "webhook delivered", |order| {
            order["notification"]["state"] == "delivered"
        })
        .await;
    assert_eq!(
        delivered["rollback_state"],
        "complete",
        "{}",
        pretty(&delivered)
    );
    let last = shop
        .calls_to("/order-finished")
        .last()
        .map(|call| call.body.clone());
    assert_eq!(
        last.as_ref().map(|body| &body["rollback_state"]),
        Some(&json!("complete")),
        "{last:?}"
    );
}

/// A parked order whose webhook failed and waits a minute for its next try: a retry of its
/// rollback asked of the same node runs now, not once the webhook's wait is over.
#[tokio::test]
async fn a_rollback_retried_while_the_webhook_waits_to_retry_runs_at_once() {
    let shop = shop_with_refunds_down(2).await;
    shop.queue(
        "/order-finished",
        vec![Answer::Status(500, "receiver down".into())],
    );
    let mut config = shop.sections(simulate("10ms"), &QUICK, Some(("Processing", ONE_RETRY)));
    config.push_str(&format!(
        "[notify]\nurl = \"{}/order-finished\"\nsecret = \"webhook-secret-0123456789\"\n\
         retries = 5\nbackoff = \"60s\"\nbackoff_max = \"60s\"\n",
        shop.base()
    ));
    let node = Node::start(&config).await;
    let user = unique_user("hana");
    let id = node.create_order(&user, &json!({"sku": "H8"})).await;
    node.wait_for(&user, &id, TERMINAL, "webhook waiting to retry", |order| {
        order["notification"]["attempts_made"] == 1
    })
    .await;

    let path = format!("/orders/{id}/rollback");
    let reply = node.call(Method::POST, &path).user(&user).send().await;
    node.expect_json(
        &reply,
        202,
        "POST /orders/{id}/rollback while the webhook waits",
    );
    let order = node
        .wait_for(&user, &id, TERMINAL, "rolled back", |order| {
            order["rollback_state"] == "complete"
        })
        .await;
    assert_failed_at(&order, "Post-Processing");
}

/// Processing's timing for tests that act while an order waits to retry its charge.
const SLOW_CHARGE: Timing = Timing::new("5s", 3, "2s", "2s");

/// A shop whose first charge answers 503.
async fn busy_once() -> Shop {
    let shop = Shop::start().await;
    shop.queue("/charge", vec![Answer::Status(503, "busy".into())]);
    shop
}

/// Creates an order for `user` and waits until its charge failed once and waits to be retried;
/// returns its id and that view of it.
async fn waiting_to_retry_the_charge(
    node: &order_process_testkit::Node,
    user: &str,
) -> (String, Value) {
    let id = node.create_order(user, &json!({"sku": "G7"})).await;
    let waiting = retry_of_the_charge_scheduled(node, user, &id).await;
    (id, waiting)
}

/// Waits until order `id`'s charge failed and waits to be retried; returns that view of it.
async fn retry_of_the_charge_scheduled(
    node: &order_process_testkit::Node,
    user: &str,
    id: &str,
) -> Value {
    node.wait_for(user, id, TERMINAL, "waiting to retry the charge", |order| {
        order["current_step"] == "Processing"
            && step_entry(order, "Processing")
                .get("next_attempt_at")
                .is_some()
    })
    .await
}

/// Retries an hour apart: an order whose charge failed waits for the whole test.
const PATIENT: Timing = Timing::new("5s", 3, "1h", "1h");

#[tokio::test]
async fn a_node_killed_between_attempts_resumes_the_retry_schedule() {
    let shop = busy_once().await;
    let mut node = Node::start(&shop.config(&QUICK, Some(("Processing", SLOW_CHARGE)))).await;
    let user = unique_user("grace");
    let (id, waiting) = waiting_to_retry_the_charge(&node, &user).await;
    let before = attempts(&waiting, "Processing");
    assert_eq!(before.len(), 1, "{}", pretty(&waiting));
    node.kill();
    node.restart().await;

    let order = node.wait_terminal(&user, &id, TERMINAL).await;
    assert_completed(&order);
    let charges = shop.calls_to("/charge");
    assert_eq!(
        attempt_numbers(&charges),
        [1, 2],
        "numbering continues after the restart"
    );
    assert_gaps(&charges, Duration::from_secs(2), "/charge across a restart");
    let after = attempts(&order, "Processing");
    assert_eq!(after.len(), 2, "{}", pretty(&order));
    assert_eq!(
        after[0], before[0],
        "the attempt made before the kill is kept"
    );
    assert_eq!(after[1]["attempt"], 2);
    assert_eq!(after[1]["status"], 200);
}

#[tokio::test]
async fn a_clock_stepped_back_during_a_retry_wait_does_not_stretch_it() {
    let Some(clock) = FakeClock::new() else {
        return;
    };
    let shop = busy_once().await;
    let node = clock
        .start(&shop.config(&QUICK, Some(("Processing", SLOW_CHARGE))))
        .await;
    let user = unique_user("clock");
    let (id, waiting) = waiting_to_retry_the_charge(&node, &user).await;
    assert_eq!(attempts(&waiting, "Processing").len(), 1);
    clock.set("-1h");

    let order = node
        .wait_terminal(&user, &id, Duration::from_secs(15))
        .await;
    // Not a legal history by the checker: its times go back an hour.
    assert_eq!(order["current_step"], "Completed", "{}", pretty(&order));
    let charges = shop.calls_to("/charge");
    assert_eq!(attempt_numbers(&charges), [1, 2]);
    let gap = charges[1].at.duration_since(charges[0].at);
    assert!(gap < Duration::from_secs(10), "retried after {gap:?}");
    let made = attempts(&order, "Processing");
    let (first, second) = (
        utc_time(&made[0]["at"], "first attempt"),
        utc_time(&made[1]["at"], "second attempt"),
    );
    assert!(
        second < first - chrono::Duration::minutes(50),
        "the node's clock was stepped back: {}",
        pretty(&order)
    );
}

#[tokio::test]
async fn cancelling_an_order_waiting_to_retry_does_not_wait_for_the_retry() {
    let shop = Shop::start().await;
    shop.answer("/charge", Answer::Status(503, "busy".into()));
    let patient = PATIENT;
    let node = Node::start(&shop.config(&QUICK, Some(("Processing", patient)))).await;
    let user = unique_user("heidi");
    let id = node.create_order(&user, &json!({"sku": "H8"})).await;
    retry_of_the_charge_scheduled(&node, &user, &id).await;
    let reply = node.cancel(&user, &id).await;
    node.expect_json(&reply, 202, "POST /orders/{id}/cancel");

    let order = node.wait_terminal(&user, &id, TERMINAL).await;
    assert_failed_at(&order, "Processing");
    assert_eq!(order["failure"]["reason"], "cancelled");
    assert_eq!(attempt_numbers(&shop.calls_to("/charge")), [1]);
    assert!(step_entry(&order, "Processing")
        .get("next_attempt_at")
        .is_none());
}

/// Orders waiting to retry a step hold no worker, but they are held in memory: past
/// `pipeline.max_orders` of them, new orders are refused with 503 until some end.
#[tokio::test]
async fn orders_waiting_to_retry_count_against_the_nodes_cap() {
    let shop = Shop::start().await;
    shop.answer("/charge", Answer::Status(503, "busy".into()));
    let mut config = shop.config(&QUICK, Some(("Processing", PATIENT)));
    config.push_str("[pipeline]\nmax_orders = 2\n");
    let node = Node::start(&config).await;
    let user = unique_user("jun");
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let (id, _) = waiting_to_retry_the_charge(&node, &user).await;
        waiting.push(id);
    }
    let reply = node.post_order(&user, r#"{"sku": "J1"}"#).await;
    node.expect_error(&reply, 503, "a third order with two waiting to retry");
    assert!(reply.header("retry-after").is_some(), "{reply}");
    // One ends (cancelled): there is room again.
    node.expect_json(&node.cancel(&user, &waiting[0]).await, 202, "cancel");
    node.wait_terminal(&user, &waiting[0], TERMINAL).await;
    let deadline = std::time::Instant::now() + TERMINAL;
    loop {
        let reply = node.post_order(&user, r#"{"sku": "J2"}"#).await;
        if reply.status == 201 {
            break;
        }
        node.expect_error(&reply, 503, "while the cancelled order winds down");
        assert!(std::time::Instant::now() < deadline, "never room again");
        tokio::time::sleep(POLL).await;
    }
}

/// The same, the cancel asked of another node of the cluster: it tells the node that runs the
/// order, which wakes it.
#[tokio::test]
async fn cancelling_through_another_node_an_order_waiting_to_retry_does_not_wait_either() {
    let _turn = cluster_turn().await;
    let shop = Shop::start().await;
    shop.answer("/charge", Answer::Status(503, "busy".into()));
    let redis = RedisServer::start();
    let nodes = shop.two_nodes(&redis, PATIENT).await;
    let user = unique_user("ivan");
    let id = nodes[0].create_order(&user, &json!({"sku": "H8"})).await;
    retry_of_the_charge_scheduled(&nodes[0], &user, &id).await;
    // A word of a cancel the store does not bear out stops nothing.
    let reply = nodes[0]
        .call(Method::POST, "/service/cancels")
        .header("x-cluster-secret", crate::cluster::SECRET)
        .body(json!({ "order_id": id }).to_string())
        .send()
        .await;
    let heard = nodes[0].expect_json(&reply, 200, "a cancel note with no cancel stored");
    assert_eq!(heard["noted"], false, "{heard}");
    let reply = nodes[1].cancel(&user, &id).await;
    nodes[1].expect_json(&reply, 202, "POST /orders/{id}/cancel on the other node");

    let order = nodes[1].wait_terminal(&user, &id, TERMINAL).await;
    assert_failed_at(&order, "Processing");
    assert_eq!(order["failure"]["reason"], "cancelled");
    assert_eq!(attempt_numbers(&shop.calls_to("/charge")), [1]);
}

/// Regression (a paused node, back from SIGSTOP, called the services for orders another node had
/// already finished): orders queued on a node when it is paused past its lease are taken over
/// and finished elsewhere; back from the pause, the node calls no service for them.
#[tokio::test]
async fn a_node_paused_with_orders_queued_calls_no_service_for_orders_taken_over() {
    let _turn = cluster_turn().await;
    let shop = Shop::start().await;
    // The paused node's only worker hangs in its first call; the other orders wait in its queue.
    shop.queue("/schedule", vec![Answer::Hang]);
    let redis = RedisServer::start();
    let one_worker = |seeds: &[u16]| {
        let mut config = node_config(&redis, "10ms", seeds);
        config.push_str("[pipeline]\nworkers = 1\n");
        shop.sections(config, &QUICK, None)
    };
    let paused = Node::start(&one_worker(&[])).await;
    let other = Node::start(&one_worker(&[paused.port])).await;
    let nodes = vec![paused, other];
    wait_formed(&nodes, 2).await;

    let user = unique_user("paused");
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(nodes[0].create_order(&user, &json!({ "n": n })).await);
    }
    until_load(&nodes[0], "one order running, the others queued", (1, 3)).await;
    nodes[0].signal("STOP");
    for id in &ids {
        let order = nodes[1].wait_terminal(&user, id, TAKEOVER).await;
        assert_completed(&order);
    }
    let finished = std::time::Instant::now();
    let calls_before = shop.calls().len();
    nodes[0].signal("CONT");
    until_load(&nodes[0], "the paused node idle again", (0, 0)).await;

    let late: Vec<_> = shop
        .calls()
        .into_iter()
        .filter(|call| call.at > finished)
        .map(|call| (call.path, call.key))
        .collect();
    assert_eq!(
        late,
        [],
        "calls after every order was finished elsewhere ({calls_before} before)\n{}",
        nodes[0].log_tail()
    );
}

/// Waits until `node` executes and queues `(inflight, queued)` orders, by its own account.
async fn until_load(node: &Node, what: &str, load: (u64, u64)) {
    let deadline = std::time::Instant::now() + TAKEOVER;
    loop {
        let now = (inflight(node).await, queued(node).await);
        if now == (Some(load.0), Some(load.1)) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: (inflight, queued) is {now:?}\n{}",
            node.log_tail()
        );
        tokio::time::sleep(crate::harness::POLL).await;
    }
}

/// The node's own `inflight` in its cluster view.
async fn inflight(node: &Node) -> Option<u64> {
    let name = node.service_id_file();
    node.cluster().await["nodes"]
        .as_array()?
        .iter()
        .find(|entry| entry["name"] == name.as_str())?["inflight"]
        .as_u64()
}

/// The node's `order_process_queue_depth` in `/metrics`.
async fn queued(node: &Node) -> Option<u64> {
    let text = node.call(Method::GET, "/metrics").send().await.text;
    text.lines()
        .find_map(|line| line.strip_prefix("order_process_queue_depth "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
}

#[tokio::test]
async fn a_takeover_continues_the_retry_schedule_of_a_dead_node() {
    let _turn = cluster_turn().await;
    let shop = Shop::start().await;
    shop.queue("/charge", vec![Answer::Status(503, "busy".into())]);
    let slow = Timing::new("5s", 3, "4s", "4s");
    let redis = RedisServer::start();
    let mut nodes = shop.two_nodes(&redis, slow).await;

    let user = unique_user("ivan");
    let id = nodes[0].create_order(&user, &json!({"sku": "I9"})).await;
    let waiting = retry_of_the_charge_scheduled(&nodes[1], &user, &id).await;
    let before = attempts(&waiting, "Processing");
    nodes[0].kill();

    let order = nodes[1].wait_terminal(&user, &id, TAKEOVER).await;
    assert_completed(&order);
    let charges = shop.calls_to("/charge");
    assert_eq!(
        attempt_numbers(&charges),
        [1, 2],
        "numbering continues on the new owner"
    );
    assert_gaps(
        &charges,
        Duration::from_secs(4),
        "/charge across a takeover",
    );
    let epochs: Vec<u64> = charges
        .iter()
        .map(|call| call.body["epoch"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        epochs[0] >= 1 && epochs[1] > epochs[0],
        "the new owner calls with a newer epoch: {epochs:?}"
    );
    let after = attempts(&order, "Processing");
    assert_eq!(after.len(), 2, "{}", pretty(&order));
    assert_eq!(after[0], before[0], "the dead node's attempt is kept");
    assert!(
        nodes[1].log().contains("took over orders"),
        "no takeover logged\n{}",
        nodes[1].log_tail()
    );
}

/// A node's liveness lease gone from Redis while the node's own clock says it holds (Redis's
/// clock stepped ahead, the node's host suspended, a hand deleted it) is lost: its orders may
/// have been taken over. An order of the node waiting for its turn to call a service (the
/// step's `concurrency`) meanwhile makes no call at its old epoch once it has its turn.
#[tokio::test]
async fn a_lease_gone_from_redis_is_a_lapse_and_no_call_is_made_at_the_old_epoch() {
    use order_process::store::redis::{keys, RedisStore};
    use order_process::store::OrderStore;
    let shop = Shop::start().await;
    shop.queue("/charge", vec![Answer::Hang]);
    let redis = RedisServer::start();
    let held = Timing::new("5s", 0, "50ms", "50ms");
    let mut config = shop.sections(
        node_config(&redis, "10ms", &[]),
        &QUICK,
        Some(("Processing", held)),
    );
    config = config.replace(
        "[steps.Processing]\n",
        "[steps.Processing]\nconcurrency = 1\n",
    );
    let node = Node::start(&config).await;
    let user = unique_user("lena");
    node.create_order(&user, &json!({"sku": "L1"})).await;
    let deadline = std::time::Instant::now() + TERMINAL;
    while shop.calls_to("/charge").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no charge\n{}",
            node.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
    // The second order waits for the first one's call to end.
    let second = node.create_order(&user, &json!({"sku": "L2"})).await;
    node.wait_for(&user, &second, TERMINAL, "waiting to charge", |order| {
        order["current_step"] == "Processing"
    })
    .await;
    // The lease vanishes from Redis and the node's orders go to another node, as a leader
    // would move them once it saw the lease gone; the node takes its lease again at its next
    // renewal, long before the first call ends.
    let node_id = node.service_id_file();
    redis.cli(&["DEL", &keys::alive_key(&node_id)]);
    let store = RedisStore::connect(&redis.url(), 2, Duration::from_secs(2)).expect("store");
    let moved = store.reassign(&node_id, "node-b").await.expect("reassign");
    assert_eq!(moved.len(), 2, "{moved:?}");

    // The first call times out, the second order gets its turn: it is let go, having read that
    // it was taken over (or, made at its old epoch, its call's outcome is refused).
    let dropped = |log: &str| {
        log.lines().any(|line| {
            line.contains(&second)
                && (line.contains("dropping it") || line.contains("not resuming"))
        })
    };
    let deadline = std::time::Instant::now() + TERMINAL;
    while !dropped(&node.log()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the second order was not dropped\n{}",
            node.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
    let late: Vec<Call> = shop
        .calls_to("/charge")
        .into_iter()
        .filter(|call| call.body["order_id"] == second.as_str())
        .collect();
    assert!(
        late.is_empty(),
        "called at its old epoch after the lease was lost: {late:?}"
    );
    assert!(
        node.log()
            .contains("liveness lease was gone from the store"),
        "{}",
        node.log_tail()
    );
}

#[tokio::test]
async fn an_order_waiting_to_retry_does_not_hold_a_worker() {
    let shop = Shop::start().await;
    shop.queue("/charge", vec![Answer::Status(503, "busy".into())]);
    let patient = PATIENT;
    let mut config = shop.config(&QUICK, Some(("Processing", patient)));
    config.push_str("[pipeline]\nworkers = 1\n");
    let node = Node::start(&config).await;
    let user = unique_user("judy");
    let waiting = node.create_order(&user, &json!({"sku": "J1"})).await;
    retry_of_the_charge_scheduled(&node, &user, &waiting).await;

    // The only worker is free for the next order while the first one waits.
    let next = node.create_order(&user, &json!({"sku": "J2"})).await;
    let order = node.wait_terminal(&user, &next, TERMINAL).await;
    assert_completed(&order);
    let first = node.order(&user, &waiting).await;
    assert_eq!(first["current_step"], "Processing", "{}", pretty(&first));
    assert_eq!(attempts(&first, "Processing").len(), 1);
}

#[tokio::test]
async fn a_parked_rollback_can_be_retried_through_another_node() {
    let _turn = cluster_turn().await;
    let shop = shop_with_refunds_down(2).await;
    let payment = ONE_RETRY;
    let redis = RedisServer::start();
    let nodes = shop.two_nodes(&redis, payment).await;

    let user = unique_user("kim");
    let id = nodes[0].create_order(&user, &json!({"sku": "K1"})).await;
    nodes[1]
        .wait_for(&user, &id, TERMINAL, "parked", |order| {
            order["rollback_state"] == "incomplete"
        })
        .await;
    let listed = nodes[1]
        .list_all_ids(&user, &[("rollback_state", "incomplete")])
        .await;
    assert_eq!(
        listed,
        std::slice::from_ref(&id),
        "listed from the Redis store"
    );

    // The node asked runs the remaining compensations, whoever ran the order before.
    let reply = nodes[1]
        .call(Method::POST, &format!("/orders/{id}/rollback"))
        .user(&user)
        .send()
        .await;
    nodes[1].expect_json(&reply, 202, "POST /orders/{id}/rollback on the other node");
    let order = nodes[0].wait_terminal(&user, &id, TERMINAL).await;
    assert_failed_at(&order, "Post-Processing");
    assert_eq!(order["rollback_state"], "complete", "{}", pretty(&order));
    assert_eq!(attempt_numbers(&shop.calls_to("/refund")), [1, 2, 3]);
    let paths = shop.paths();
    assert_eq!(&paths[paths.len() - 2..], ["/release", "/unschedule"]);
    let log = nodes[1].log();
    assert!(
        log.lines().any(|line| line.contains("attempt started")
            && line.contains(&id)
            && line.contains("attempt=3")
            && line.contains("rollback")),
        "the third refund was made by the node asked\n{}",
        nodes[1].log_tail()
    );
}
