//! Surviving the loss of the Redis host: a node that finds its primary through three real
//! `redis-sentinel` processes follows a failover after the primary is SIGKILLed, without a
//! restart; with `database.min_replicas` a write counts only once a replica has it, so losing
//! the primary's host under load (killed, its directory wiped, back as an empty replica) loses no
//! order answered 201; a node finds and follows its primary the same way with everything over
//! TLS; and a node refuses to start on a Redis weaker than its config asks, or one that may evict
//! keys, and refuses new orders while the Redis it runs on turns so. Every process is killed by pid when
//! its guard is dropped, also when a test fails.

use crate::cluster::{cluster_turn, SECRET};
use crate::config::run_to_exit;
use crate::harness::{pretty, unique_user, Node, RedisServer, POLL};
use crate::history::assert_completed;
use crate::redis_tls::{Pki, Unready};
use crate::security::{bearer, Tokens, ALICE, BOB};
use order_process::order::OrderId;
use order_process::store::redis::RedisStore;
use order_process::store::OrderStore;
use order_process_testkit::redis::RedisSentinel;
use order_process_testkit::Scripted;
use reqwest::Method;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The name the sentinels watch the primary under.
const MASTER: &str = "orders";
/// Sentinels to agree that the primary is down (of three).
const QUORUM: usize = 2;
/// Generous for a failover (down after 1 s, then an election) on two loaded cores.
const FAILOVER: Duration = Duration::from_secs(40);
/// How long orders may take to finish once the store answers again.
const FINISH: Duration = Duration::from_secs(60);

/// Polls `check` until it gives `Some`, failing the test with `what` and `context()` at the
/// deadline.
pub(crate) async fn eventually<T, F, Fut>(
    within: Duration,
    what: &str,
    context: impl Fn() -> String,
    check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match order_process_testkit::poll::until(within, POLL, check).await {
        Some(value) => value,
        None => panic!("{what} within {within:?}\n{}", context()),
    }
}

/// Submits an order, retrying while the node answers 503 (its store is failing over); returns
/// its id once it is accepted.
async fn submit_when_accepted(node: &Node, user: &str, index: usize) -> String {
    let body = serde_json::json!({ "n": index }).to_string();
    eventually(
        FAILOVER,
        "no order accepted",
        || node.log_tail(),
        || async {
            let reply = node.post_order(user, &body).await;
            match reply.status {
                201 => reply.try_json()?["order_id"].as_str().map(str::to_string),
                503 => None,
                _ => panic!(
                    "unexpected answer to POST /orders: {reply}\n{}",
                    node.log_tail()
                ),
            }
        },
    )
    .await
}

/// Waits until every order is finished and completed, reading through answers other than 200
/// while the node's store recovers.
pub(crate) async fn wait_all_completed(node: &Node, user: &str, ids: &[String]) {
    for id in ids {
        let order = eventually(
            FINISH,
            &format!("order {id} not finished"),
            || node.log_tail(),
            || async {
                let reply = node.get_order(user, id).await;
                let order = reply.try_json().filter(|_| reply.status == 200)?;
                (!order["complete_time"].is_null()).then_some(order)
            },
        )
        .await;
        assert_completed(&order);
    }
}

/// Polls the heartbeat until its status is `status` (`OK`, `DEGRADED`).
async fn wait_heartbeat(node: &Node, status: &str) -> Value {
    eventually(
        Duration::from_secs(30),
        &format!("heartbeat not {status}"),
        || node.log_tail(),
        || async {
            let reply = node.call(Method::GET, "/diagnostic/heartbeat").send().await;
            reply
                .try_json()
                .filter(|heartbeat| heartbeat["status"] == status)
        },
    )
    .await
}

/// The leader fencing token as `redis` holds it, once it holds one.
fn fence(redis: &RedisServer) -> Option<u64> {
    redis
        .cli(&["GET", order_process::store::redis::keys::LEADER_FENCE])
        .parse()
        .ok()
}

/// Starts three sentinels watching `primary`, waits until each knows the other two and its
/// `replicas` replicas, and returns them with the `[database]` lines that name them.
async fn start_sentinels(primary: &RedisServer, replicas: usize) -> (Vec<RedisSentinel>, String) {
    watching(replicas, || RedisSentinel::start(primary, MASTER, QUORUM)).await
}

/// Starts three sentinels with `start`, waits until each knows the other two and `replicas`
/// replicas, and returns them with the `[database]` lines that name them.
async fn watching(
    replicas: usize,
    start: impl Fn() -> RedisSentinel,
) -> (Vec<RedisSentinel>, String) {
    let sentinels: Vec<RedisSentinel> = (0..3).map(|_| start()).collect();
    eventually(
        Duration::from_secs(30),
        "sentinels did not find each other and the replicas",
        || logs_of(&sentinels),
        || {
            std::future::ready(
                sentinels
                    .iter()
                    .all(|sentinel| sentinel.knows(MASTER, 2, replicas))
                    .then_some(()),
            )
        },
    )
    .await;
    let addresses: Vec<String> = sentinels
        .iter()
        .map(|sentinel| format!("\"{}\"", sentinel.address()))
        .collect();
    let database = format!(
        "sentinels = [{}]\nmaster_name = \"{MASTER}\"\n",
        addresses.join(", ")
    );
    (sentinels, database)
}

/// Waits until every sentinel names `port` as the primary.
async fn promoted(sentinels: &[RedisSentinel], port: u16) {
    eventually(
        FAILOVER,
        "the sentinels did not promote the replica",
        || logs_of(sentinels),
        || {
            std::future::ready(
                sentinels
                    .iter()
                    .all(|sentinel| sentinel.primary_port(MASTER) == Some(port))
                    .then_some(()),
            )
        },
    )
    .await;
}

/// The sentinels' logs, for assertion messages.
fn logs_of(sentinels: &[RedisSentinel]) -> String {
    sentinels
        .iter()
        .map(RedisSentinel::log_tail)
        .collect::<Vec<_>>()
        .join("\n")
}

fn node_config(database: &str, step: &str) -> String {
    format!(
        "[simulate]\nduration = \"{step}\"\nfailure_rate = 0.0\n\
         [database]\n{database}timeout = \"1s\"\n\
         [cluster]\nsecret = \"{SECRET}\"\n"
    )
}

#[tokio::test]
async fn a_node_follows_a_sentinel_failover_without_a_restart_and_its_fence_keeps_growing() {
    let _turn = cluster_turn().await;
    let mut primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let (sentinels, database) = start_sentinels(&primary, 1).await;
    let mut node = Node::start(&node_config(&database, "500ms")).await;
    assert!(
        node.log().contains("redis primary found through sentinel"),
        "{}",
        node.log_tail()
    );
    let user = unique_user("failover");
    let mut ids = Vec::new();
    for index in 0..5 {
        ids.push(
            node.create_order(&user, &serde_json::json!({ "n": index }))
                .await,
        );
    }
    // The token of the current term, once the replica has it too: replication is asynchronous,
    // and only what the replica had survives the failover.
    let before = eventually(
        Duration::from_secs(30),
        "no leader fencing token on both",
        || node.log_tail(),
        || {
            let token = fence(&primary).filter(|token| fence(&replica) == Some(*token));
            std::future::ready(token)
        },
    )
    .await;

    primary.kill();
    promoted(&sentinels, replica.port).await;
    for index in 5..10 {
        ids.push(submit_when_accepted(&node, &user, index).await);
    }
    wait_all_completed(&node, &user, &ids).await;
    assert!(node.is_running(), "the node stopped\n{}", node.log_tail());
    assert_eq!(
        node.log().matches("==== launch").count(),
        1,
        "the node was restarted"
    );
    assert!(
        node.log().contains("redis primary changed"),
        "{}",
        node.log_tail()
    );
    // The leader lost its lease when the primary died and took a new term on the promoted one.
    let after = eventually(
        Duration::from_secs(30),
        "no new leader term on the promoted replica",
        || node.log_tail(),
        || std::future::ready(fence(&replica).filter(|token| *token > before)),
    )
    .await;
    assert!(after > before, "fence went from {before} to {after}");
    let heartbeat = wait_heartbeat(&node, "OK").await;
    assert_eq!(heartbeat["status"], "OK", "{}", pretty(&heartbeat));
}

/// TLS everywhere: a primary and a replica that serve TLS only (and replicate over it), three
/// sentinels that speak TLS only (to their clients, the servers and each other), all asking
/// for client certificates; a node with `database.tls` finds the primary through them, and
/// follows a failover.
#[tokio::test]
async fn over_tls_a_node_finds_its_primary_through_the_sentinels_and_follows_a_failover() {
    let _turn = cluster_turn().await;
    let pki = Pki::new();
    let files = pki.server_files(true);
    let mut primary = RedisServer::start_tls_only(files.clone(), None);
    let replica = RedisServer::start_tls_only(files.clone(), Some(&primary));
    let (sentinels, database) = watching(1, || {
        RedisSentinel::start_tls(&primary, MASTER, QUORUM, files.clone())
    })
    .await;
    let database = format!(
        "{database}tls = true\n{}{}",
        pki.ca_line(),
        pki.client_lines()
    );
    let node = Node::start(&node_config(&database, "50ms")).await;
    assert!(
        node.log().contains("redis primary found through sentinel"),
        "{}",
        node.log_tail()
    );
    // Without the CA the sentinels' certificates are refused: they are checked, not just used.
    let untrusting = database.replace(&pki.ca_line(), "");
    let mut refused = Unready::start(&node_config(&untrusting, "50ms"));
    refused
        .complains(&["no primary for orders from the sentinels", "UnknownIssuer"])
        .await;
    drop(refused);
    let user = unique_user("tls-sentinel");
    let mut ids = Vec::new();
    for index in 0..3 {
        ids.push(
            node.create_order(&user, &serde_json::json!({ "n": index }))
                .await,
        );
    }
    wait_all_completed(&node, &user, &ids).await;

    primary.kill();
    promoted(&sentinels, replica.port).await;
    for index in 3..6 {
        ids.push(submit_when_accepted(&node, &user, index).await);
    }
    wait_all_completed(&node, &user, &ids).await;
    assert!(
        node.log().contains("redis primary changed"),
        "{}",
        node.log_tail()
    );
    // The orders are on the promoted replica, reached over TLS only.
    let keys: usize = replica.cli(&["DBSIZE"]).parse().expect("DBSIZE");
    assert!(keys > 0, "no keys on the promoted replica");
}

#[tokio::test]
async fn with_min_replicas_a_write_is_done_only_once_a_replica_has_it() {
    let _turn = cluster_turn().await;
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let database = format!(
        "url = \"{}\"\nmin_replicas = 1\nrequire_aof = true\n",
        primary.url()
    );
    let node = Node::start(&node_config(&database, "300ms")).await;
    assert!(
        node.log().contains("connected_replicas=1"),
        "no start-up line with the replicas\n{}",
        node.log_tail()
    );
    let user = unique_user("acked");
    let first = node.create_order(&user, &serde_json::json!({})).await;
    // A 201 means the replica has it already: read it there, at once, on a plain connection.
    let on_replica = RedisStore::connect(&replica.url(), 1, Duration::from_secs(1))
        .expect("connections to the replica");
    let id = OrderId::try_parse(&first).expect("an order id");
    let stored = on_replica.get(id).await.expect("read from the replica");
    assert!(stored.is_some(), "order {first} is not on the replica");
    let mut ids = vec![first];
    for index in 0..3 {
        ids.push(
            node.create_order(&user, &serde_json::json!({ "n": index }))
                .await,
        );
    }

    assert!(replica.signal("STOP"), "cannot stop the replica");
    // No replica acknowledges: a new order is refused, not accepted unreplicated.
    let reply = node.post_order(&user, "{}").await;
    assert_eq!(reply.status, 503, "{reply}\n{}", node.log_tail());
    assert!(reply.header("retry-after").is_some(), "{reply}");
    wait_heartbeat(&node, "DEGRADED").await;
    assert!(
        node.log().contains("replicas acknowledged the write"),
        "{}",
        node.log_tail()
    );

    assert!(replica.signal("CONT"), "cannot continue the replica");
    for index in 3..5 {
        ids.push(submit_when_accepted(&node, &user, index).await);
    }
    wait_all_completed(&node, &user, &ids).await;
    let order: Value = node.order(&user, &ids[0]).await;
    assert_completed(&order);
}

/// An order whose create reached the primary but not the replica (its `WAIT` timed out, the
/// client got a 503) is resumed by the reconciliation while the node's liveness lease still
/// holds: the node must not call a service for it until the replica has it, since a failover
/// now would lose the order but not the call. A retry with the same idempotency key is not
/// answered with that order either until the replica has it. Once the replica is back, the order
/// runs and completes, and the retry gets it.
#[tokio::test]
async fn a_resumed_order_is_acted_on_only_once_a_replica_has_it() {
    let _turn = cluster_turn().await;
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let shop = Scripted::start().await;
    // A long liveness lease keeps the node allowed to start steps while the replica is stopped
    // (its renewals wait for the replica too); a short reconciliation finds the order at once.
    let config = format!(
        "[simulate]\nduration = \"10ms\"\nfailure_rate = 0.0\n\
         [steps.Scheduling]\nhandler = \"http\"\nurl = \"{base}/schedule\"\n\
         rollback_url = \"{base}/unschedule\"\n\
         [pipeline]\nreconcile_interval = \"300ms\"\n\
         [database]\nurl = \"{url}\"\nmin_replicas = 1\ntimeout = \"1500ms\"\n\
         [cluster]\nsecret = \"{SECRET}\"\nliveness_ttl = \"60s\"\n",
        base = shop.base(),
        url = primary.url(),
    );
    let node = Node::start(&config).await;
    wait_heartbeat(&node, "OK").await;
    let user = unique_user("unreplicated");

    assert!(replica.signal("STOP"), "cannot stop the replica");
    let key = "retried-while-unreplicated";
    let reply = node.post_order_keyed(&user, key, "{}").await;
    assert_eq!(reply.status, 503, "{reply}\n{}", node.log_tail());
    // The create is on the primary all the same, in the node's set of unfinished orders.
    let owned = primary.cli(&["KEYS", "op:*:order:*"]);
    assert!(!owned.is_empty(), "the order is not on the primary");
    // The reconciliation reads it there, over and over, and may not act on it: wait until it
    // tried twice (or called the shop, which fails the test below).
    let retried = "cannot confirm the order is replicated";
    eventually(
        Duration::from_secs(20),
        "the node neither resumed the order nor said it waits for its replica",
        || node.log_tail(),
        || {
            let tried = node.log().matches(retried).count() >= 2;
            std::future::ready((tried || !shop.calls().is_empty()).then_some(()))
        },
    )
    .await;
    assert!(
        shop.calls().is_empty(),
        "a service was called for an order the replica does not have: {:?}\n{}",
        shop.paths(),
        node.log_tail()
    );
    // The client retries: the key names the order, which no replica has yet. Answering it
    // (200) would promise an order a failover could still lose.
    let retry = node.post_order_keyed(&user, key, "{}").await;
    assert_eq!(retry.status, 503, "{retry}\n{}", node.log_tail());

    assert!(replica.signal("CONT"), "cannot continue the replica");
    let answered = eventually(
        FINISH,
        "a retry with the key is not answered with the order",
        || node.log_tail(),
        || async {
            let reply = node.post_order_keyed(&user, key, "{}").await;
            (reply.status == 200).then(|| reply.try_json()).flatten()
        },
    )
    .await;
    let ids = eventually(
        FINISH,
        "the order is not listed",
        || node.log_tail(),
        || async {
            let reply = node.list(&user, &[]).await;
            let ids = order_process_testkit::order_ids(
                &reply.try_json().filter(|_| reply.status == 200)?,
            );
            (!ids.is_empty()).then_some(ids)
        },
    )
    .await;
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(
        answered["order_id"].as_str(),
        Some(ids[0].as_str()),
        "{answered}"
    );
    wait_all_completed(&node, &user, &ids).await;
    assert!(!shop.calls_to("/schedule").is_empty(), "{:?}", shop.paths());
}

/// A node starting while its Redis is down waits for it, and is not ended by a SIGHUP meanwhile
/// (a reload of its tokens sent by systemd, say); once Redis answers, it waits the full 10 s for
/// `min_replicas` from then, however long Redis was down, as a Redis just back has had no time
/// for its replicas to connect.
#[tokio::test]
async fn a_node_waiting_at_start_for_redis_survives_a_sighup_and_then_waits_for_replicas() {
    let _turn = cluster_turn().await;
    let mut redis = RedisServer::start();
    redis.kill();
    let tokens = Tokens::new(&[(ALICE, "alice", "user", ""), (BOB, "bob", "user", "")]);
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = dir.path().join("config.toml");
    let config_text = format!(
        "[cluster]\nsecret = \"{SECRET}\"\n[database]\nurl = \"{}\"\nmin_replicas = 1\n\
         [auth]\nmode = \"tokens\"\ntokens_file = \"{}\"\n",
        redis.url(),
        tokens.path().display()
    );
    std::fs::write(&config, config_text).expect("write the config");
    let port = crate::harness::port();
    let log = dir.path().join("node.log");
    let args: Vec<String> = [
        "--config".to_string(),
        config.display().to_string(),
        "--data-dir".to_string(),
        dir.path().join("data").display().to_string(),
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
    ]
    .into();
    let started = Instant::now();
    let mut node = crate::harness::spawn(&args, &log, &log);
    let logged = |text: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(text)
    };
    while !logged("cannot read redis replication and persistence, retrying") {
        assert!(
            node.try_exit().is_none(),
            "{}",
            crate::harness::tail(&log, 40)
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never waited for redis"
        );
        tokio::time::sleep(POLL).await;
    }
    // Alice's token is revoked, and the node told, while it waits.
    tokens.write(&[(BOB, "bob", "user", "")]);
    assert!(node.signal("HUP"));
    // Redis stays down longer than the wait for replicas.
    while started.elapsed() < Duration::from_secs(11) {
        assert!(
            node.try_exit().is_none(),
            "the node ended while waiting for redis\n{}",
            crate::harness::tail(&log, 40)
        );
        tokio::time::sleep(POLL).await;
    }
    redis.restart();
    // The node reads Redis once more before any replica has connected.
    while !logged("redis replication, persistence and memory") {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "redis never answered the node\n{}",
            crate::harness::tail(&log, 40)
        );
        tokio::time::sleep(POLL).await;
    }
    let _replica = RedisServer::start_replica_of(&redis);
    let client = reqwest::Client::new();
    let heartbeat = format!("http://127.0.0.1:{port}/diagnostic/heartbeat");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = node.try_exit() {
            panic!(
                "the node exited ({status})\n{}",
                crate::harness::tail(&log, 40)
            );
        }
        let answered = client.get(&heartbeat).send().await;
        if answered.is_ok_and(|reply| reply.status().is_success()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node never started\n{}",
            crate::harness::tail(&log, 40)
        );
        tokio::time::sleep(POLL).await;
    }
    // It serves with the tokens file of the last SIGHUP, not the one it read at start.
    let orders = format!("http://127.0.0.1:{port}/orders");
    for (token, status) in [(ALICE, 401), (BOB, 200)] {
        let reply = client
            .get(&orders)
            .header("Authorization", bearer(token))
            .send()
            .await
            .expect("the node answers");
        assert_eq!(reply.status().as_u16(), status, "{token}");
    }
}

/// Runs the binary with `config` and asserts it refused to start: a non-zero exit, no panic, and
/// a message naming each of `needles`.
pub(crate) async fn assert_refused(config: &str, needles: &[&str]) {
    let outcome = run_to_exit(Some(config), &[]).await;
    let stderr = &outcome.stderr;
    assert!(!outcome.status.success(), "it started: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "no {needle:?} in: {stderr}");
    }
}

#[tokio::test]
async fn a_node_refuses_to_start_on_a_redis_weaker_than_its_config() {
    let _turn = cluster_turn().await;
    let redis = RedisServer::start();
    let base = format!(
        "[cluster]\nsecret = \"{SECRET}\"\n[database]\nurl = \"{}\"\n",
        redis.url()
    );
    assert_refused(
        &format!("{base}min_replicas = 1\n"),
        &[
            "refusing to start",
            "0 connected replicas",
            "database.min_replicas = 1",
        ],
    )
    .await;
    assert_eq!(redis.cli(&["CONFIG", "SET", "appendonly", "no"]), "OK");
    assert_refused(
        &format!("{base}require_aof = true\n"),
        &["refusing to start", "database.require_aof"],
    )
    .await;
}

/// A Redis that may evict keys at its memory limit would drop orders, their index entries or
/// idempotency keys: a node refuses to start on it, and starts on the same Redis once a full
/// Redis refuses writes instead (`noeviction`). Full, it answers submissions 503, and an order
/// it accepted before goes on once Redis has room.
#[tokio::test]
async fn a_node_refuses_to_start_on_a_redis_that_may_evict_its_orders() {
    let _turn = cluster_turn().await;
    let redis = RedisServer::start();
    let config = format!(
        "{}[cluster]\nsecret = \"{SECRET}\"\n[database]\nurl = \"{}\"\n",
        crate::harness::simulate("1s"),
        redis.url()
    );
    assert_eq!(redis.cli(&["CONFIG", "SET", "maxmemory", "100mb"]), "OK");
    for policy in ["allkeys-lru", "volatile-ttl"] {
        assert_eq!(
            redis.cli(&["CONFIG", "SET", "maxmemory-policy", policy]),
            "OK"
        );
        assert_refused(&config, &["refusing to start", policy, "noeviction"]).await;
    }
    assert_eq!(
        redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
        "OK"
    );
    let node = Node::start(&config).await;
    let user = unique_user("evict");
    let running = node.create_order(&user, &serde_json::json!({})).await;

    // Full: Redis refuses every write that needs memory.
    assert_eq!(redis.cli(&["CONFIG", "SET", "maxmemory", "1"]), "OK");
    let reply = node.post_order(&user, "{}").await;
    node.expect_error(&reply, 503, "POST /orders while redis is full");
    assert!(reply.header("retry-after").is_some(), "{reply}");
    eventually(
        FINISH,
        "the running order's next commit refused",
        || node.log_tail(),
        || async {
            node.log()
                .contains("cannot commit transition, retrying")
                .then_some(())
        },
    )
    .await;
    assert_eq!(redis.cli(&["CONFIG", "SET", "maxmemory", "100mb"]), "OK");
    assert_completed(&node.wait_terminal(&user, &running, FINISH).await);
}

/// Polls the heartbeat until it says `DEGRADED` with a problem naming `needle`, or `OK` when
/// `needle` is `None`.
pub(crate) async fn wait_fitness(node: &Node, needle: Option<&str>) -> Value {
    eventually(
        FAILOVER,
        &format!("heartbeat not degraded for {needle:?}"),
        || node.log_tail(),
        || async {
            let reply = node.call(Method::GET, "/diagnostic/heartbeat").send().await;
            let heartbeat = reply.try_json()?;
            let problem = heartbeat["problem"].as_str().unwrap_or_default();
            match needle {
                Some(needle) => (heartbeat["status"] == "DEGRADED" && problem.contains(needle))
                    .then_some(heartbeat),
                None => (heartbeat["status"] == "OK").then_some(heartbeat),
            }
        },
    )
    .await
}

/// Asserts that a submission is refused with 503 and a `Retry-After`.
pub(crate) async fn assert_refused_order(node: &Node, user: &str, what: &str) {
    let reply = node.post_order(user, "{}").await;
    node.expect_error(&reply, 503, what);
    assert!(reply.header("retry-after").is_some(), "{reply}");
}

/// A running node reads its Redis again every `database.check_interval`: once the primary may
/// evict keys (set by hand), or a failover promotes a replica without the append-only file that
/// `require_aof` asks for, new orders get 503 and the heartbeat says why, while an order
/// accepted before goes on; once Redis is mended, orders are accepted again. No restart.
#[tokio::test]
async fn a_running_node_refuses_new_orders_while_its_redis_cannot_keep_them() {
    let _turn = cluster_turn().await;
    let mut primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    // A replica set up without the append-only file (its primary has one).
    assert_eq!(replica.cli(&["CONFIG", "SET", "appendonly", "no"]), "OK");
    let (sentinels, database) = start_sentinels(&primary, 1).await;
    let database = format!("{database}require_aof = true\ncheck_interval = \"100ms\"\n");
    let node = Node::start(&node_config(&database, "1s")).await;
    let user = unique_user("unfit");
    let running = node.create_order(&user, &serde_json::json!({})).await;

    // Eviction turned on by hand while the node runs.
    assert_eq!(primary.cli(&["CONFIG", "SET", "maxmemory", "100mb"]), "OK");
    assert_eq!(
        primary.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]),
        "OK"
    );
    let heartbeat = wait_fitness(&node, Some("maxmemory-policy allkeys-lru")).await;
    assert!(
        heartbeat["problem"]
            .as_str()
            .unwrap_or_default()
            .contains("noeviction"),
        "{}",
        pretty(&heartbeat)
    );
    assert_refused_order(&node, &user, "POST /orders on a redis that may evict").await;
    let overview = node.expect_json(
        &node.call(Method::GET, "/diagnostic/overview").send().await,
        200,
        "GET /diagnostic/overview",
    );
    assert_eq!(
        overview["store"]["status"],
        "DEGRADED",
        "{}",
        pretty(&overview)
    );
    assert_eq!(
        overview["store"]["problem"],
        heartbeat["problem"],
        "{}",
        pretty(&overview)
    );
    assert!(
        node.log()
            .contains("redis cannot keep orders as configured: new orders are refused"),
        "{}",
        node.log_tail()
    );
    // The order accepted before runs to its end meanwhile: still refused after it finished.
    assert_completed(&node.wait_terminal(&user, &running, FINISH).await);
    assert_refused_order(
        &node,
        &user,
        "POST /orders after the running order finished",
    )
    .await;
    assert_eq!(
        primary.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
        "OK"
    );
    wait_fitness(&node, None).await;
    assert!(
        node.log()
            .contains("redis keeps orders as configured again"),
        "{}",
        node.log_tail()
    );
    let mut ids = vec![node.create_order(&user, &serde_json::json!({})).await];

    // A failover to the replica without an append-only file.
    primary.kill();
    promoted(&sentinels, replica.port).await;
    wait_fitness(&node, Some("database.require_aof")).await;
    assert_refused_order(
        &node,
        &user,
        "POST /orders on a primary without its append-only file",
    )
    .await;
    assert_eq!(replica.cli(&["CONFIG", "SET", "appendonly", "yes"]), "OK");
    ids.push(submit_when_accepted(&node, &user, 1).await);
    wait_all_completed(&node, &user, &ids).await;
    wait_fitness(&node, None).await;
    assert_eq!(
        node.log().matches("==== launch").count(),
        1,
        "the node was restarted"
    );
}

/// Right after a failover the promoted primary has no replica for a moment: a node that starts
/// then waits for one to connect instead of refusing at once.
#[tokio::test]
async fn a_node_starting_before_its_replicas_connect_waits_for_them() {
    let _turn = cluster_turn().await;
    let primary = RedisServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[cluster]\nsecret = \"{SECRET}\"\n[database]\nurl = \"{}\"\nmin_replicas = 1\n",
            primary.url()
        ),
    )
    .expect("write config");
    let port = crate::harness::port();
    let args: Vec<String> = vec![
        "--config".into(),
        config.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data-dir".into(),
        dir.path().join("data").display().to_string(),
    ];
    let stderr = dir.path().join("stderr.log");
    let _node = crate::harness::spawn(&args, &dir.path().join("stdout.log"), &stderr);
    let said = || std::fs::read_to_string(&stderr).unwrap_or_default();
    eventually(FAILOVER, "waited for its replicas", said, || async {
        said().contains("waiting for them").then_some(())
    })
    .await;

    let _replica = RedisServer::start_replica_of(&primary);
    let heartbeat = format!("http://127.0.0.1:{port}/diagnostic/heartbeat");
    eventually(
        FAILOVER,
        "started once a replica connected",
        said,
        || async {
            let answer = reqwest::get(&heartbeat).await.ok()?;
            answer.status().is_success().then_some(())
        },
    )
    .await;
    assert!(!said().contains("refusing to start"), "{}", said());
}

/// Every kind of write the store and the coordinator send (a lone script, a pipeline of
/// scripts, a transaction, a plain command) is on the replica the moment it answers, and fails
/// as unavailable, not silently, while the replica cannot acknowledge.
#[tokio::test]
async fn every_kind_of_write_waits_for_its_replica() {
    use order_process::cluster::{Coordinator, RedisCoordinator};
    use order_process::order::{apply, Event, Order};
    use order_process::store::redis::Connections;
    use order_process::store::{SetAside, StoreError};
    use std::sync::Arc;

    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let connections = Connections::connect(&primary.url(), 2, Duration::from_secs(1))
        .expect("connections to the primary")
        .with_min_replicas(1);
    let connections = Arc::new(connections);
    let store = RedisStore::new(Arc::clone(&connections));
    let coordinator = RedisCoordinator::new(connections);
    let on_replica = RedisStore::connect(&replica.url(), 1, Duration::from_secs(1))
        .expect("connections to the replica");
    let on_replica = &on_replica;
    let read_back = |id| async move { on_replica.get(id).await.expect("read the replica") };
    let new_order = |owner: &str| {
        Order::new(
            OrderId::new_v4(),
            "acked".into(),
            serde_json::json!({}),
            owner.into(),
            chrono::Utc::now(),
        )
    };

    // A lone script call: create, commit, cancel.
    let mut order = new_order("node-a");
    order.order_id = store.new_order_id("acked", Some("key-1"));
    store.create(&order, Some("key-1")).await.expect("create");
    assert_eq!(read_back(order.order_id).await.as_ref(), Some(&order));
    let mut next = apply(
        &order,
        Event::StepSucceeded {
            step: order.current_step,
            output: None,
        },
        chrono::Utc::now(),
    )
    .expect("a legal step");
    next.revision = order.revision + 1;
    store.commit(&next).await.expect("commit");
    let seen = read_back(order.order_id).await.expect("on the replica");
    assert_eq!(seen.current_step, next.current_step);
    store
        .request_cancel(order.order_id, "acked")
        .await
        .expect("cancel");
    assert!(
        read_back(order.order_id)
            .await
            .expect("on the replica")
            .cancel_requested
    );
    // A pipeline of scripts: a takeover, an index repair.
    let moved = store.reassign("node-a", "node-b").await.expect("reassign");
    assert_eq!(moved, vec![order.order_id]);
    assert_eq!(
        read_back(order.order_id)
            .await
            .expect("on the replica")
            .owner,
        "node-b"
    );
    let mut cursor = String::new();
    while let Some(next) = store.repair_indexes(&cursor, 100).await.expect("repair").1 {
        cursor = next;
    }
    // A transaction, then its WAIT.
    let aside = SetAside {
        order_id: order.order_id,
        node: "node-b".into(),
        reason: "unreadable".into(),
        at: chrono::Utc::now(),
    };
    store.set_aside(&aside).await.expect("set aside");
    assert_eq!(
        on_replica
            .set_aside_orders(10)
            .await
            .expect("read the replica"),
        vec![aside]
    );
    // Plain commands and the lease scripts.
    store.ping().await.expect("ping");
    coordinator
        .register_node("node-b", "127.0.0.1:1")
        .await
        .expect("register");
    let token = coordinator
        .acquire_leader("node-b:term", Duration::from_secs(30))
        .await
        .expect("acquire")
        .token()
        .expect("a free lease");
    assert_eq!(fence(&replica), Some(token));

    assert!(replica.signal("STOP"), "cannot stop the replica");
    let unacknowledged = |outcome: Result<(), StoreError>| match outcome {
        Err(StoreError::Unavailable(problem)) => {
            assert!(problem.contains("replicas acknowledged"), "{problem}")
        }
        other => panic!("a write no replica acknowledged answered {other:?}"),
    };
    unacknowledged(store.create(&new_order("node-a"), None).await.map(drop));
    unacknowledged(store.ping().await);
    unacknowledged(
        store
            .set_aside(&SetAside {
                order_id: OrderId::new_v4(),
                node: "node-b".into(),
                reason: "unreadable".into(),
                at: chrono::Utc::now(),
            })
            .await,
    );
    // Its script is new to this Redis: loaded, and the release and its WAIT sent again.
    unacknowledged(coordinator.release_leader("node-b:term").await);
    assert!(replica.signal("CONT"), "cannot continue the replica");
    eventually(
        Duration::from_secs(20),
        "writes not acknowledged again",
        String::new,
        || async { store.ping().await.ok() },
    )
    .await;
}

/// The port every sentinel names as the primary of [`MASTER`], once they all agree.
fn agreed_primary(sentinels: &[RedisSentinel]) -> Option<u16> {
    let first = sentinels.first()?.primary_port(MASTER)?;
    sentinels
        .iter()
        .all(|sentinel| sentinel.primary_port(MASTER) == Some(first))
        .then_some(first)
}

/// Waits until `accepted` holds at least `wanted` ids.
pub(crate) async fn at_least(node: &Node, accepted: &std::sync::Mutex<Vec<String>>, wanted: usize) {
    let count = || accepted.lock().expect("the accepted ids").len();
    eventually(
        FAILOVER,
        &format!("fewer than {wanted} orders accepted"),
        || node.log_tail(),
        || std::future::ready((count() >= wanted).then_some(())),
    )
    .await
}

/// A client that keeps submitting orders to a node until `stop`; `accepted` holds every id
/// answered 201, and `client` answers how many were answered 503.
pub(crate) struct Submitting {
    pub accepted: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub client: tokio::task::JoinHandle<usize>,
}

/// Starts a client that submits `user`'s orders to `node`, one every 20 ms, until stopped.
pub(crate) fn keep_submitting(node: &std::sync::Arc<Node>, user: &str) -> Submitting {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    let accepted: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (node, user, ids, stopped) = (
        Arc::clone(node),
        user.to_string(),
        Arc::clone(&accepted),
        Arc::clone(&stop),
    );
    let client = tokio::spawn(async move {
        let mut refused = 0usize;
        let mut index = 0usize;
        while !stopped.load(Ordering::SeqCst) {
            index += 1;
            let body = serde_json::json!({ "n": index }).to_string();
            let reply = node.post_order(&user, &body).await;
            match reply.status {
                201 => {
                    let id = reply
                        .try_json()
                        .and_then(|order| order["order_id"].as_str().map(str::to_string));
                    let id = id.unwrap_or_else(|| panic!("a 201 without an id: {reply}"));
                    ids.lock().expect("the accepted ids").push(id);
                }
                503 => refused += 1,
                _ => panic!("unexpected answer to POST /orders: {reply}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        refused
    });
    Submitting {
        accepted,
        stop,
        client,
    }
}

/// The Redis host is lost under load: the primary SIGKILLed and its directory wiped, a replica
/// promoted, and the old host back as a fresh, empty replica. With `min_replicas = 1` and two
/// replicas no order answered 201 is lost, and every order finishes.
#[tokio::test]
async fn losing_the_primary_host_under_load_loses_no_acknowledged_order() {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    let _turn = cluster_turn().await;
    let mut servers = vec![RedisServer::start()];
    for _ in 0..2 {
        let replica = RedisServer::start_replica_of(&servers[0]);
        servers.push(replica);
    }
    let (sentinels, database) = start_sentinels(&servers[0], 2).await;
    let sentinel_logs = || logs_of(&sentinels);
    let database = format!("{database}min_replicas = 1\nrequire_aof = true\n");
    let node = Arc::new(Node::start(&node_config(&database, "200ms")).await);
    let user = unique_user("lost-host");

    let Submitting {
        accepted,
        stop,
        client,
    } = keep_submitting(&node, &user);
    let count = || accepted.lock().expect("the accepted ids").len();
    at_least(&node, &accepted, 20).await;

    let lost_port = servers[0].port;
    servers[0].kill_and_wipe().expect("wipe the primary's dir");
    let accepted_at_kill = count();
    let promoted = eventually(
        FAILOVER,
        "the sentinels did not promote a replica",
        sentinel_logs,
        || std::future::ready(agreed_primary(&sentinels).filter(|port| *port != lost_port)),
    )
    .await;
    let primary = servers
        .iter()
        .position(|server| server.port == promoted)
        .unwrap_or_else(|| panic!("the sentinels name an unknown primary on port {promoted}"));
    let primary_address = servers[primary].address();
    servers[0]
        .try_restart_as_replica_of(primary_address)
        .expect("start the lost host again as an empty replica");
    // The sentinels may fail over once more while the lost host comes back (a sentinel that
    // saw the promoted replica late can judge it down): the primary they agree on at each look
    // is the one that must have both replicas.
    eventually(
        FAILOVER,
        "the primary the sentinels name does not have both replicas online",
        sentinel_logs,
        || {
            let now = agreed_primary(&sentinels)
                .and_then(|port| servers.iter().find(|server| server.port == port));
            std::future::ready(
                now.filter(|server| server.has_replicas_online(2))
                    .map(|_| ()),
            )
        },
    )
    .await;
    at_least(&node, &accepted, count() + 20).await;
    stop.store(true, Ordering::SeqCst);
    let refused = client.await.expect("the submitting client");
    let mut node = Arc::into_inner(node).expect("no other owner of the node");

    let ids = accepted.lock().expect("the accepted ids").clone();
    wait_all_completed(&node, &user, &ids).await;
    assert!(node.is_running(), "the node stopped\n{}", node.log_tail());
    assert!(
        node.log().contains("redis primary changed"),
        "{}",
        node.log_tail()
    );
    // The user's order list names every one of them too.
    let listed: std::collections::BTreeSet<String> =
        node.list_all_ids(&user, &[]).await.into_iter().collect();
    for id in &ids {
        assert!(listed.contains(id), "order {id} answered 201 is not listed");
    }
    eprintln!(
        "lost host: {} orders answered 201 ({accepted_at_kill} before the kill), {refused} answered 503, none lost",
        ids.len()
    );
}
