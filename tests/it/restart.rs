//! Crash and shutdown: a node SIGKILLed mid-pipeline resumes its orders when restarted on the
//! same data dir (nothing accepted is lost, the node id survives); SIGTERM refuses new orders,
//! lets running steps finish, closes the store's file cleanly and exits 0, and the orders finish
//! after a restart; a backup taken while the node runs restores the orders of its moment.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::harness::{simulate, unique_user, Node, POLL, TERMINAL};
use crate::history::assert_completed;

/// Whether the embedded store's file says it needs repair before its next use: redb sets a bit
/// in its header (after the 9-byte magic number, the "god byte", bit 1) while the file is open,
/// and clears it when the database is closed cleanly. A repair reads the whole file.
fn needs_repair(node: &Node) -> bool {
    let path = node.data_dir().join("orders.redb");
    let header =
        std::fs::read(&path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    assert_eq!(
        header.get(..4),
        Some(&b"redb"[..]),
        "{} is not a redb file",
        path.display()
    );
    header.get(9).is_some_and(|god_byte| god_byte & 2 != 0)
}

#[tokio::test]
async fn sigkill_mid_pipeline_then_restart_loses_nothing() {
    let mut node = Node::start(&simulate("700ms")).await;
    let user = unique_user("crash");
    let service_id = node.heartbeat().await["service_id"]
        .as_str()
        .expect("service_id")
        .to_string();

    // One order carries an Idempotency-Key: the key must survive the crash too.
    let key = uuid::Uuid::new_v4().to_string();
    let keyed = node.post_order_keyed(&user, &key, "{}").await;
    let keyed = node.expect_json(&keyed, 201, "keyed POST /orders");
    let mut ids = vec![keyed["order_id"].as_str().expect("order_id").to_string()];
    for n in 1..4 {
        ids.push(node.create_order(&user, &json!({"n": n})).await);
    }
    node.wait_step(&user, &ids[0], "Processing", TERMINAL).await;
    node.kill();
    assert!(
        needs_repair(&node),
        "the store file of a killed node needs no repair"
    );

    node.restart().await;
    let heartbeat = node.heartbeat().await;
    assert_eq!(
        heartbeat["service_id"],
        service_id.as_str(),
        "service_id after a restart on the same data dir"
    );
    assert_eq!(
        node.service_id_file(),
        service_id,
        "<data_dir>/service_id after a restart"
    );
    let replay = node.post_order_keyed(&user, &key, "{}").await;
    let replay = node.expect_json(&replay, 200, "keyed POST replayed after the crash");
    assert_eq!(
        replay["order_id"], keyed["order_id"],
        "the replay after a crash returns the same order"
    );

    for id in &ids {
        let order = node.wait_terminal(&user, id, TERMINAL).await;
        assert_completed(&order);
        assert_eq!(order["order_id"], id.as_str());
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(
        node.list_all_ids(&user, &[]).await,
        newest_first,
        "every accepted order survived the crash"
    );
}

#[tokio::test]
async fn sigterm_refuses_new_orders_drains_and_exits_zero() {
    let config = format!("[server]\nshutdown_grace = \"10s\"\n{}", simulate("1s"));
    let mut node = Node::start(&config).await;
    let user = unique_user("drain");
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(node.create_order(&user, &json!({"n": n})).await);
    }
    node.wait_step(&user, &ids[0], "Pre-Processing", TERMINAL)
        .await;

    node.term();
    let signalled = Instant::now();
    // A new order during the drain gets 503, or a refused connection once the listener is
    // closed. Delivering the signal takes a moment, so an order accepted right after `kill`
    // returned is tolerated (and must not be lost); one accepted a second later is a bug.
    loop {
        match node.call(Method::POST, "/orders").user(&user).body("{}").try_send().await {
            Err(_) => break,
            Ok(reply) if reply.status == 503 => {
                node.expect_error(&reply, 503, "POST /orders while draining");
                break;
            }
            Ok(reply) if reply.status == 201 && signalled.elapsed() < Duration::from_secs(1) => {
                let created = node.expect_json(&reply, 201, "POST /orders just after SIGTERM");
                ids.push(created["order_id"].as_str().expect("order_id").to_string());
            }
            Ok(reply) => panic!(
                "POST /orders {:?} after SIGTERM: expected 503 or a refused connection, got {reply}\n{}",
                signalled.elapsed(),
                node.log_tail()
            ),
        }
        tokio::time::sleep(POLL).await;
    }

    let status = node.wait_exit(Duration::from_secs(25)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}\n{}",
        node.log_tail()
    );
    assert!(
        !node.log().contains("panicked"),
        "the node panicked:\n{}",
        node.log_tail()
    );
    assert!(
        !needs_repair(&node),
        "a node stopped by SIGTERM left its store file needing repair\n{}",
        node.log_tail()
    );

    node.restart().await;
    for id in &ids {
        assert_completed(&node.wait_terminal(&user, id, TERMINAL).await);
    }
}

#[tokio::test]
async fn sigterm_on_an_idle_node_exits_zero_promptly() {
    let mut node = Node::start(&simulate("10ms")).await;
    node.term();
    let status = node.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}\n{}",
        node.log_tail()
    );
}

/// The first bytes of each order the embedded store in `node`'s data dir keeps, read from its
/// file directly (opening it repairs a file a killed node left).
fn stored_heads(node: &Node) -> Vec<Vec<u8>> {
    use redb::{ReadableDatabase, ReadableTable};
    let path = node.data_dir().join("orders.redb");
    let db = redb::Database::open(&path)
        .unwrap_or_else(|error| panic!("open {}: {error}", path.display()));
    let txn = db.begin_read().expect("read transaction");
    let orders = txn
        .open_table(redb::TableDefinition::<&str, &[u8]>::new("orders"))
        .expect("orders table");
    orders
        .iter()
        .expect("iterate orders")
        .map(|entry| {
            let (_, bytes) = entry.expect("an order");
            bytes.value().iter().take(4).copied().collect()
        })
        .collect()
}

/// A node on the embedded store with `database.compress_orders` keeps its orders compressed;
/// SIGKILLed mid-pipeline and restarted with the option off, it reads them, finishes and lists
/// them, and writes them as JSON again.
#[tokio::test]
async fn orders_kept_compressed_finish_after_a_restart_without_the_option() {
    const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    let plain = simulate("700ms");
    let mut node = Node::start(&format!("{plain}[database]\ncompress_orders = true\n")).await;
    let user = unique_user("compressed");
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(node.create_order(&user, &json!({"n": n})).await);
    }
    node.wait_step(&user, &ids[0], "Processing", TERMINAL).await;
    node.kill();
    let heads = stored_heads(&node);
    assert_eq!(heads.len(), ids.len(), "orders stored: {heads:?}");
    assert!(
        heads.iter().all(|head| head[..] == ZSTD_MAGIC),
        "orders not stored compressed: {heads:?}"
    );

    let dir = node.data_dir();
    let config = dir.parent().expect("the node's dir").join("config.toml");
    std::fs::write(&config, &plain).expect("write config.toml");
    node.restart().await;
    for id in &ids {
        assert_completed(&node.wait_terminal(&user, id, TERMINAL).await);
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(node.list_all_ids(&user, &[]).await, newest_first);
    node.kill();
    assert!(
        stored_heads(&node)
            .iter()
            .all(|head| head.first() == Some(&b'{')),
        "orders finished without the option are not JSON again"
    );
}

/// `GET /service/backup` copies the embedded store while the node runs: put back in place of
/// `orders.redb` (the node stopped), it holds the orders of that moment and no later one, and
/// an order unfinished in it goes on to finish. On Redis the node refuses with a 409.
#[tokio::test]
async fn a_backup_taken_while_running_restores_the_orders_of_its_moment() {
    let mut node = Node::start(&simulate("300ms")).await;
    let user = unique_user("backup");
    let finished = node.create_order(&user, &json!({"n": 1})).await;
    assert_completed(&node.wait_terminal(&user, &finished, TERMINAL).await);
    let running = node.create_order(&user, &json!({"n": 2})).await;

    let answer = reqwest::get(format!("{}/service/backup", node.base))
        .await
        .expect("GET /service/backup");
    assert_eq!(answer.status().as_u16(), 200, "{}", node.log_tail());
    assert_eq!(
        answer
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok()),
        Some("application/octet-stream")
    );
    let copy = answer.bytes().await.expect("the backup's bytes");
    assert_eq!(copy.get(..4), Some(&b"redb"[..]), "not a redb file");
    // The copy was written in the data dir and is gone from it.
    let left: Vec<_> = std::fs::read_dir(node.data_dir())
        .expect("read the data dir")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("backup"))
        .collect();
    assert!(left.is_empty(), "left in the data dir: {left:?}");

    let later = node.create_order(&user, &json!({"n": 3})).await;
    assert_completed(&node.wait_terminal(&user, &later, TERMINAL).await);
    assert_completed(&node.wait_terminal(&user, &running, TERMINAL).await);

    node.kill();
    std::fs::write(node.data_dir().join("orders.redb"), &copy).expect("put the backup in place");
    let restored_at = chrono::Utc::now();
    node.restart().await;
    let order = node.wait_terminal(&user, &finished, TERMINAL).await;
    assert_completed(&order);
    assert_eq!(order["payload"], json!({"n": 1}));
    let resumed = node.wait_terminal(&user, &running, TERMINAL).await;
    assert_completed(&resumed);
    // Unfinished in the copy, it finished again after the restore.
    let completed: chrono::DateTime<chrono::Utc> = resumed["complete_time"]
        .as_str()
        .and_then(|time| time.parse().ok())
        .unwrap_or_else(|| panic!("no complete_time in {resumed}"));
    assert!(completed > restored_at, "{resumed}");
    let reply = node.get_order(&user, &later).await;
    node.expect_error(&reply, 404, "an order created after the backup");
    let after = node.create_order(&user, &json!({"n": 4})).await;
    assert_completed(&node.wait_terminal(&user, &after, TERMINAL).await);

    let redis = crate::harness::RedisServer::start();
    let on_redis = Node::start(&format!(
        "{}[database]\nurl = \"{}\"\n[cluster]\nsecret = \"backup-test-secret\"\n",
        simulate("10ms"),
        redis.url()
    ))
    .await;
    let reply = on_redis.call(Method::GET, "/service/backup").send().await;
    on_redis.expect_error(&reply, 409, "GET /service/backup on redis");
}

/// A node restarted with more unfinished orders than its queue holds resumes them all, and its
/// reconciliation does not take those still waiting for room in the queue for orders that
/// nothing runs (each a warning an operator would chase, and a second run queued).
#[tokio::test]
async fn orders_waiting_for_room_after_a_restart_are_not_resumed_twice() {
    let limits = "[limits]\nsubmit_rate = 100000.0\nsubmit_burst = 100000\n\
                  max_in_flight_per_user = 100000\n";
    let mut node = Node::start(&format!("{}{limits}", simulate("1s"))).await;
    let user = unique_user("backlog");
    let mut ids = Vec::new();
    for n in 0..30 {
        ids.push(node.create_order(&user, &json!({ "n": n })).await);
    }
    node.kill();

    // Two workers and a queue of two for the 30 orders: most wait for room, while the
    // reconciliation looks every 100 ms.
    let config = node.data_dir().with_file_name("config.toml");
    std::fs::write(
        &config,
        format!(
            "{}{limits}[pipeline]\nworkers = 2\nqueue_capacity = 2\nreconcile_interval = \"100ms\"\n",
            simulate("20ms")
        ),
    )
    .expect("write the config");
    node.restart().await;
    for id in &ids {
        assert_completed(&node.wait_terminal(&user, id, TERMINAL).await);
    }
    let log = node.log();
    let resumed = crate::stuck::reconciled(&log);
    assert!(resumed.is_empty(), "resumed twice:\n{resumed:#?}");
}
