//! No order stuck, and no store trusted blindly: a submission whose client hangs up, a store call
//! that times out after Redis applied it, a Redis slower than half a second, a node id held by
//! two processes (one of them started while Redis is stopped, one told to stop while it waits),
//! a Redis that answers but refuses writes, a record that cannot be read (set aside, and taken
//! back once it reads again, on Redis and in the embedded store's file), an owned-set entry left
//! behind for a finished order; and no running order taken for a stuck one on a busy node. Each
//! with the real binary and, where Redis is in it, a real `redis-server` paused with SIGSTOP or
//! reconfigured with `redis-cli`.

use crate::harness::{
    order_ids, port, simulate, spawn, unique_user, Node, Proc, RedisServer, POLL, TERMINAL,
};
use crate::history::assert_completed;
use crate::metrics::{scrape, value};
use order_process::order::{Order, OrderId};
use order_process::store::redis::keys;
use order_process_testkit::poll::until;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A node on `redis` with 10 ms steps, `database.timeout` as given, reconciling every second.
fn redis_node_config(redis: &RedisServer, timeout: &str) -> String {
    format!(
        "{}[pipeline]\nreconcile_interval = \"1s\"\n\
         [database]\nurl = \"{}\"\ntimeout = \"{timeout}\"\n\
         [cluster]\nsecret = \"stuck-test-secret\"\n",
        simulate("10ms"),
        redis.url()
    )
}

/// Redis stopped with SIGSTOP until `resume` or drop (so a failing test never leaves it stopped).
struct Paused(Option<u32>);

impl Paused {
    fn redis(redis: &RedisServer) -> Paused {
        let info = redis.cli(&["INFO", "server"]);
        let pid: u32 = info
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse().ok())
            .unwrap_or_else(|| panic!("no process_id in INFO server:\n{info}"));
        signal(pid, "STOP");
        Paused(Some(pid))
    }

    fn resume(&mut self) {
        if let Some(pid) = self.0.take() {
            signal(pid, "CONT");
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        self.resume();
    }
}

fn signal(pid: u32, name: &str) {
    let sent = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|status| status.success());
    assert!(sent, "kill -{name} {pid}");
}

/// Polls the heartbeat until its status is `want`; panics with the last answer after `within`.
async fn wait_heartbeat(node: &Node, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let reply = node
            .call(reqwest::Method::GET, "/diagnostic/heartbeat")
            .send()
            .await;
        if reply.try_json().is_some_and(|body| body["status"] == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "heartbeat not {want} within {within:?}: {reply}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A node on `redis` with this `database.timeout`, warmed up with one completed order (scripts
/// loaded, connections open): the node, the order's user and its id.
async fn warm_node(redis: &RedisServer, timeout: &str, user: &str) -> (Node, String, String) {
    let node = Node::start(&redis_node_config(redis, timeout)).await;
    let user = unique_user(user);
    let id = node.create_order(&user, &serde_json::json!({})).await;
    assert_completed(&node.wait_terminal(&user, &id, TERMINAL).await);
    (node, user, id)
}

#[tokio::test]
async fn redis_calls_wait_as_long_as_database_timeout_says() {
    let redis = RedisServer::start();
    let (node, user, id) = warm_node(&redis, "10s", "patient").await;

    // Redis stalls for 1.5 s, well within the 10 s timeout: the read waits for it.
    let mut paused = Paused::redis(&redis);
    let started = Instant::now();
    let (reply, ()) = tokio::join!(node.get_order(&user, &id), async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        paused.resume();
    });
    assert_eq!(
        reply.status,
        200,
        "GET during a 1.5 s Redis stall with database.timeout = 10s, after {:?}: {reply}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_order_stored_after_its_create_timed_out_still_runs() {
    let redis = RedisServer::start();
    let (node, user, first) = warm_node(&redis, "500ms", "timed-out").await;

    // The create goes out while Redis is stopped: the node gives up after 500 ms and answers 503,
    // and Redis applies the create when it resumes. Nothing queued that order.
    let mut paused = Paused::redis(&redis);
    let reply = node.post_order(&user, "{}").await;
    assert_eq!(reply.status, 503, "POST while Redis is stopped: {reply}");
    paused.resume();

    // The order Redis stored once it resumed...
    let deadline = Instant::now() + TERMINAL;
    let id = loop {
        // The node's 500 ms timeout can pass on a loaded machine too: a 503 is asked again.
        let page = node.list(&user, &[]).await;
        let ids = match page.status {
            503 => Vec::new(),
            _ => order_ids(&node.expect_json(&page, 200, "GET /orders")),
        };
        if let Some(id) = ids.iter().find(|id| **id != first) {
            break id.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the create sent to the stopped Redis was never applied"
        );
        tokio::time::sleep(POLL).await;
    };
    // ...runs to the end, although no event queued it.
    assert_completed(&node.wait_terminal(&user, &id, TERMINAL).await);
}

#[tokio::test]
async fn submissions_whose_clients_hang_up_all_finish() {
    let node = Node::start(&simulate("10ms")).await;
    let user = unique_user("impatient");
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/orders", node.port);
    // Clients that give up 1–20 ms into the request, many at once.
    let submissions = (0..300u64).map(|index| {
        let request = client
            .post(&url)
            .header("authorization", &user)
            .header("content-type", "application/json")
            .body("{}")
            .timeout(Duration::from_millis(1 + index % 20));
        async move {
            let _ = request.send().await;
        }
    });
    futures_util::future::join_all(submissions).await;

    // Every order that was stored finishes.
    let ids = node.list_all_ids(&user, &[]).await;
    let deadline = Instant::now() + TERMINAL;
    for id in &ids {
        let left = deadline.saturating_duration_since(Instant::now());
        assert_completed(&node.wait_terminal(&user, id, left.max(POLL)).await);
    }
}

/// A second process of `node` (run with `config`) from a copy of its data dir, so with the same
/// node id: the process, its stderr, and the directory that holds both (removed on drop).
fn twin(node: &Node, config: &str) -> (Proc, PathBuf, tempfile::TempDir) {
    let copy = tempfile::tempdir().expect("temp dir");
    let data = copy.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::copy(node.data_dir().join("service_id"), data.join("service_id"))
        .expect("copy service_id");
    let config_path = copy.path().join("config.toml");
    std::fs::write(&config_path, config).expect("write config");
    let args: Vec<String> = vec![
        "--config".into(),
        config_path.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{}", port()),
        "--data-dir".into(),
        data.display().to_string(),
    ];
    let stderr = copy.path().join("stderr.log");
    let process = spawn(&args, &copy.path().join("stdout.log"), &stderr);
    (process, stderr, copy)
}

#[tokio::test]
async fn a_second_process_with_the_same_node_id_refuses_to_start() {
    let _turn = crate::cluster::cluster_turn().await;
    let redis = RedisServer::start();
    let config = redis_node_config(&redis, "1s");
    let node = Node::start(&config).await;

    let (mut twin, stderr, _copy) = twin(&node, &config);
    let status = twin
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| {
            panic!(
                "a second process with the node id still runs:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            )
        });
    let said = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(!status.success(), "the second process exited 0:\n{said}");
    assert!(
        said.contains("is in use by another process"),
        "no clear reason on stderr:\n{said}"
    );
    // The first process carries on.
    wait_heartbeat(&node, "OK", Duration::from_secs(10)).await;
    let user = unique_user("original");
    let id = node.create_order(&user, &serde_json::json!({})).await;
    assert_completed(&node.wait_terminal(&user, &id, TERMINAL).await);
}

/// A copy started while Redis is out of reach cannot tell whether the node id is free: it waits
/// (for Redis at start, or for the lease as it would for a held one), and refuses once Redis is
/// back and the first process renews its lease.
#[tokio::test]
async fn a_second_process_started_while_redis_is_out_of_reach_refuses_once_it_is_back() {
    let _turn = crate::cluster::cluster_turn().await;
    let redis = RedisServer::start();
    // A lease long enough that the first process's does not run out while Redis is stopped.
    let config = format!("{}liveness_ttl = \"4s\"\n", redis_node_config(&redis, "1s"));
    let node = Node::start(&config).await;
    wait_heartbeat(&node, "OK", Duration::from_secs(10)).await;

    let mut paused = Paused::redis(&redis);
    let (mut twin, stderr, _copy) = twin(&node, &config);
    let said = || std::fs::read_to_string(&stderr).unwrap_or_default();
    // Its first call to Redis times out (database.timeout, 1 s).
    until(Duration::from_secs(10), POLL, || async {
        let said = said();
        (said.contains("cannot read redis") || said.contains("liveness lease")).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("never tried the lease:\n{}", said()));
    paused.resume();

    let status = twin
        .wait_exit(Duration::from_secs(40))
        .await
        .unwrap_or_else(|| panic!("a second process with the node id still runs:\n{}", said()));
    assert!(
        !status.success(),
        "the second process exited 0:\n{}",
        said()
    );
    assert!(
        said().contains("is in use by another process"),
        "no clear reason on stderr:\n{}",
        said()
    );
    wait_heartbeat(&node, "OK", Duration::from_secs(10)).await;
}

#[tokio::test]
async fn the_heartbeat_is_degraded_while_redis_refuses_writes() {
    let redis = RedisServer::start();
    let node = Node::start(&redis_node_config(&redis, "1s")).await;
    wait_heartbeat(&node, "OK", Duration::from_secs(10)).await;

    // Redis still answers, but refuses every write that needs memory (OOM).
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    wait_heartbeat(&node, "DEGRADED", Duration::from_secs(10)).await;

    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    wait_heartbeat(&node, "OK", Duration::from_secs(10)).await;
}

/// Stores order `id` of `user` with a record that does not decode, owned by `owner` and in its
/// user's index, as a bad write by an older version or a hand edit would leave it, with `cli`
/// (a `redis-cli` command run where its key, the command's first argument, lives); returns the
/// order's key.
fn garbled_record(cli: &impl Fn(&[&str]) -> String, id: &str, owner: &str, user: &str) -> String {
    let oid = OrderId::parse_str(id).expect("an id");
    let shard = keys::shard_of(oid);
    let order_key = keys::order_key(oid);
    cli(&[
        "HSET",
        &order_key,
        "doc",
        "{\"order_id\": 7",
        "owner",
        owner,
        "epoch",
        "1",
        "user",
        user,
        "state",
        "forward",
        "step",
        "Scheduling",
    ]);
    let member = format!("00000000000000000001-{id}");
    cli(&["ZADD", &keys::user_key(shard, user), "0", &member]);
    cli(&["SADD", &keys::owned_key(shard, owner), id]);
    order_key
}

/// `/diagnostic/set-aside`'s entry for order `id`, once there is one.
async fn set_aside_entry(node: &Node, id: &str) -> serde_json::Value {
    until(TERMINAL, POLL, || async {
        let reply = node
            .call(reqwest::Method::GET, "/diagnostic/set-aside")
            .send()
            .await;
        let body = reply.try_json()?;
        let entries = body["set_aside"].as_array()?.clone();
        entries.into_iter().find(|entry| entry["order_id"] == id)
    })
    .await
    .unwrap_or_else(|| panic!("{id} never set aside; log:\n{}", node.log_tail()))
}

/// Fails unless `/metrics` shows counter `name` at 1.
async fn assert_counted_once(node: &Node, name: &str) {
    assert_eq!(value(&scrape(node).await, name), 1.0, "{name} counted once");
}

/// Asserts that a `GET`, a cancel and a rollback retry of `user`'s order `id`, whose record does
/// not read, say so.
async fn assert_said_unreadable(node: &Node, user: &str, id: &str) {
    let rollback = format!("/orders/{id}/rollback");
    for (what, reply) in [
        ("a read", node.get_order(user, id).await),
        ("a cancel", node.cancel(user, id).await),
        (
            "a rollback retry",
            node.call(reqwest::Method::POST, &rollback)
                .user(user)
                .send()
                .await,
        ),
    ] {
        node.expect_error(&reply, 500, what);
        assert!(
            reply.text.contains("stored record cannot be read"),
            "{what} of an order whose record does not read says so: {reply}"
        );
    }
}

/// Fails unless `/diagnostic/set-aside` lists no order.
async fn assert_none_set_aside(node: &Node) {
    let reply = node
        .call(reqwest::Method::GET, "/diagnostic/set-aside")
        .send()
        .await;
    assert_eq!(
        reply.try_json().map(|body| body["set_aside"].clone()),
        Some(serde_json::json!([])),
        "no longer set aside: {reply}"
    );
}

/// An owned-set entry whose order is gone (its record deleted by hand, or a partial restore) is
/// taken out by the reconciliation that meets it, instead of being queued again at every pass.
#[tokio::test]
async fn an_owned_entry_whose_order_is_gone_is_taken_out() {
    let redis = RedisServer::start();
    let (node, _user, _first) = warm_node(&redis, "2s", "vanished").await;
    let heartbeat = node.heartbeat().await;
    let owner = heartbeat["service_id"].as_str().expect("service_id");
    let id = "01a2320c-0000-7000-8000-00000000dead";
    let owned = keys::owned_key(
        keys::shard_of(OrderId::parse_str(id).expect("an id")),
        owner,
    );
    assert_eq!(redis.cli(&["SADD", &owned, id]), "1");

    let gone = until(TERMINAL, POLL, || async {
        (redis.cli(&["SISMEMBER", &owned, id]) == "0").then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the entry of a missing order stayed; log:\n{}",
        node.log_tail()
    );
}

#[tokio::test]
async fn an_order_whose_record_cannot_be_read_is_set_aside_not_retried() {
    let redis = RedisServer::start();
    let (node, user, first) = warm_node(&redis, "2s", "garbled").await;
    let heartbeat = node.heartbeat().await;
    let owner = heartbeat["service_id"].as_str().expect("service_id");

    let id = "01a2320c-0000-7000-8000-00000000beef";
    let shard = keys::shard_of(OrderId::parse_str(id).expect("an id"));
    let order_key = garbled_record(&|args| redis.cli(args), id, owner, &user);

    // The reconciliation finds it, cannot read it, and sets it aside.
    let listed = set_aside_entry(&node, id).await;
    assert_eq!(listed["node"], owner);
    // When, to the microsecond as the API shows the times of orders.
    let at = listed["at"].as_str().unwrap_or_default();
    assert!(
        chrono::DateTime::parse_from_rfc3339(at).is_ok()
            && at.len() == "2026-12-07T14:14:28.681801Z".len(),
        "set aside at {at}"
    );
    assert!(
        listed["reason"]
            .as_str()
            .is_some_and(|reason| !reason.is_empty()),
        "says why: {listed}"
    );
    assert_eq!(
        redis.cli(&["SISMEMBER", &keys::owned_key(shard, owner), id]),
        "0",
        "no longer among the node's unfinished orders"
    );
    assert_eq!(
        redis.cli(&["HGET", &order_key, "doc"]),
        "{\"order_id\": 7",
        "the record is kept as it was"
    );
    assert_counted_once(&node, "order_process_orders_set_aside_total").await;
    assert_said_unreadable(&node, &user, id).await;

    // The user's listing skips it, and the node goes on with new orders.
    let ids = node.list_all_ids(&user, &[]).await;
    assert_eq!(ids, vec![first.clone()]);
    let next = node.create_order(&user, &serde_json::json!({})).await;
    assert_completed(&node.wait_terminal(&user, &next, TERMINAL).await);
    // A wait for many orders that names it still answers for the others; it is not finished.
    let reply = node
        .call(reqwest::Method::POST, "/orders/wait")
        .user(&user)
        .body(serde_json::json!({"order_ids": [next, id], "wait": "1s"}).to_string())
        .send()
        .await;
    let waited = node.expect_json(&reply, 200, "POST /orders/wait naming an unreadable order");
    assert_eq!(crate::harness::order_ids(&waited), vec![next.clone()]);
    assert_eq!(waited["pending"], serde_json::json!([id]), "{waited}");
    let reply = node
        .call(reqwest::Method::GET, "/diagnostic/set-aside?limit=0")
        .send()
        .await;
    node.expect_error(&reply, 400, "a limit of 0");
}

#[tokio::test]
async fn a_set_aside_order_whose_record_reads_again_is_taken_back_and_finishes() {
    let redis = RedisServer::start();
    // Reconciling every 200 ms, the node looks at the set-aside orders every 2.4 s.
    let config = redis_node_config(&redis, "2s").replace("\"1s\"", "\"200ms\"");
    let node = Node::start(&config).await;
    garbled_then_mended(&node, |args| redis.cli(args)).await;
}

/// An order of a new user stored by `cli` (see [`garbled_record`]) with a record that does not
/// decode, owned by `node`, is set aside; once the record is mended (as a newer version reads
/// what an older one could not) the node takes the order back at a new epoch and runs it to
/// `Completed`, and says so.
pub(crate) async fn garbled_then_mended(node: &Node, cli: impl Fn(&[&str]) -> String) {
    let user = unique_user("mended");
    let heartbeat = node.heartbeat().await;
    let owner = heartbeat["service_id"].as_str().expect("service_id");
    let order = Order::new(
        OrderId::new_v4(),
        user.clone(),
        serde_json::json!({"sku": "A1"}),
        owner.to_string(),
        chrono::Utc::now(),
    );
    let id = order.order_id.to_string();
    let order_key = garbled_record(&cli, &id, owner, &user);
    set_aside_entry(node, &id).await;

    let doc = serde_json::to_string(&order).expect("an order encodes");
    cli(&["HSET", &order_key, "doc", &doc]);
    let finished = node.wait_terminal(&user, &id, TERMINAL).await;
    assert_completed(&finished);
    assert_eq!(finished["order_id"], id.as_str());
    assert_eq!(
        cli(&["HGET", &order_key, "epoch"]),
        "2",
        "taken back at a new epoch"
    );
    assert_none_set_aside(node).await;
    assert_counted_once(node, "order_process_orders_taken_back_total").await;
    assert!(
        node.log()
            .contains("set-aside order reads again, taken back to run on"),
        "says so in its log:\n{}",
        node.log_tail()
    );
}

/// Puts `bytes` in place of order `id`'s record in the embedded store of `node` (stopped), read
/// and written in its file directly; returns the record it held.
fn replace_record(node: &Node, id: &str, bytes: &[u8]) -> Vec<u8> {
    use redb::ReadableTable;
    let path = node.data_dir().join("orders.redb");
    let db = redb::Database::open(&path)
        .unwrap_or_else(|error| panic!("open {}: {error}", path.display()));
    let orders = redb::TableDefinition::<&str, &[u8]>::new("orders");
    let txn = db.begin_write().expect("write transaction");
    let held = {
        let mut table = txn.open_table(orders).expect("orders table");
        let held = table
            .get(id)
            .expect("read the record")
            .map(|record| record.value().to_vec())
            .unwrap_or_else(|| panic!("{id} is not stored"));
        table.insert(id, bytes).expect("write the record");
        held
    };
    txn.commit().expect("commit");
    held
}

/// On the embedded store, an order whose record does not read (as one written compressed reads
/// to an earlier version) is set aside at the next start, not run; once it reads again (a version
/// that reads it starts on the file) the node takes it back and finishes it.
#[tokio::test]
async fn an_order_set_aside_in_the_embedded_store_is_taken_back_once_its_record_reads_again() {
    let config = format!(
        "{}[pipeline]\nreconcile_interval = \"200ms\"\n",
        simulate("700ms")
    );
    let mut node = Node::start(&config).await;
    let user = unique_user("mended-file");
    let id = node.create_order(&user, &serde_json::json!({})).await;
    node.wait_step(&user, &id, "Processing", TERMINAL).await;
    node.kill();
    let record = replace_record(&node, &id, b"{\"order_id\": 7");

    node.restart().await;
    set_aside_entry(&node, &id).await;
    assert_said_unreadable(&node, &user, &id).await;
    node.kill();
    replace_record(&node, &id, &record);

    node.restart().await;
    assert_completed(&node.wait_terminal(&user, &id, TERMINAL).await);
    assert_none_set_aside(&node).await;
}

#[tokio::test]
async fn a_node_told_to_stop_while_it_waits_for_its_lease_exits_cleanly() {
    let _turn = crate::cluster::cluster_turn().await;
    let redis = RedisServer::start();
    let config = redis_node_config(&redis, "1s");
    let node = Node::start(&config).await;

    // A second process with the node's id waits for the first one's lease...
    let (mut waiting, stderr, _copy) = twin(&node, &config);
    let said = || std::fs::read_to_string(&stderr).unwrap_or_default();
    until(Duration::from_secs(10), POLL, || async {
        said().contains("waiting for it to expire").then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("never waited for the lease:\n{}", said()));

    // ...and is told to stop meanwhile: it stops at once, by itself, not killed by the signal.
    assert!(waiting.signal("TERM"), "send SIGTERM");
    let status = waiting
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("still running after SIGTERM:\n{}", said()));
    assert!(status.success(), "exit {status:?}:\n{}", said());
    assert!(said().contains("told to stop while starting"), "{}", said());
    wait_heartbeat(&node, "OK", Duration::from_secs(10)).await;
}

#[tokio::test]
async fn an_owned_entry_left_behind_for_a_finished_order_is_tidied_once() {
    let redis = RedisServer::start();
    let (node, _user, id) = warm_node(&redis, "2s", "tidied").await;
    let owner = node.heartbeat().await["service_id"]
        .as_str()
        .expect("service_id")
        .to_string();
    // The finished order back in its owner's set, as an index sweep that read it before it
    // finished leaves it.
    let owned = keys::owned_key(
        keys::shard_of(OrderId::parse_str(&id).expect("an id")),
        &owner,
    );
    assert_eq!(redis.cli(&["SADD", &owned, &id]), "1");

    // The reconciliation queues it, finds it finished, and takes the entry out.
    until(TERMINAL, POLL, || async {
        (redis.cli(&["SISMEMBER", &owned, &id]) == "0").then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("the entry stays; log:\n{}", node.log_tail()));
    let log = node.log();
    let queued = reconciled(&log)
        .iter()
        .filter(|line| line.contains(&id))
        .count();
    assert_eq!(queued, 1, "queued once, not at every pass:\n{log}");
}

/// A busy node whose orders all run resumes none of them, on Redis and on the embedded store:
/// the reconciliation's sweep reads while orders finish and new ones are stored, and must not
/// take those for orders that nothing runs (each a warning an operator would chase).
#[tokio::test]
async fn a_busy_node_whose_orders_all_run_resumes_none() {
    let redis = RedisServer::start();
    let busy = format!(
        "{}[pipeline]\nreconcile_interval = \"100ms\"\n\
         [limits]\nsubmit_rate = 100000.0\nsubmit_burst = 100000\n",
        simulate("0s")
    );
    let on_redis = format!(
        "{busy}[database]\nurl = \"{}\"\n[cluster]\nsecret = \"stuck-test-secret\"\n",
        redis.url()
    );
    for config in [on_redis, busy] {
        let node = Node::start(&config).await;
        let output = tokio::process::Command::new(crate::harness::BIN)
            .args(["bench", "--url", &node.base, "--json", "--orders", "2000"])
            .args(["--concurrency", "32", "--timeout", "60s"])
            .output()
            .await
            .expect("run the bench");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "bench failed: {stdout}");
        let summary: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON summary");
        assert_eq!(summary["completed"], 2000, "{summary}");
        let log = node.log();
        let resumed = reconciled(&log);
        assert!(resumed.is_empty(), "resumed orders that ran:\n{resumed:#?}");
    }
}

/// The lines of `log` in which the reconciliation resumed orders that nothing ran.
pub(crate) fn reconciled(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| line.contains("resuming unfinished orders that nothing here was running"))
        .collect()
}
