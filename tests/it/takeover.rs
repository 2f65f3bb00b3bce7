//! Takeovers under faults that the plain cluster tests do not make: a takeover whose store calls
//! fail part-way (replies lost by a proxy in front of Redis), and a node cut off from Redis while
//! gossip still calls it live. Real nodes, a real `redis-server`, a real TCP proxy.

use crate::cluster::{cluster_turn, leader_of, wait_formed, SECRET, TAKEOVER};
use crate::harness::{unique_user, Node, RedisServer, POLL};
use crate::proxy::Proxy;
use futures_util::StreamExt;
use order_process::cluster::{Acquired, Coordinator, RedisCoordinator};
use order_process::order::{Order, OrderId};
use order_process::store::redis::{keys, Connections, RedisStore};
use order_process::store::OrderStore;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn config(redis_url: &str, step: &str, extra: &str, seeds: &[u16]) -> String {
    let seeds: Vec<String> = seeds
        .iter()
        .map(|port| format!("\"127.0.0.1:{port}\""))
        .collect();
    format!(
        "[simulate]\nduration = \"{step}\"\nfailure_rate = 0.0\n{extra}\
         [database]\nurl = \"{redis_url}\"\ntimeout = \"1s\"\n\
         [cluster]\nsecret = \"{SECRET}\"\nseeds = [{}]\n",
        seeds.join(", ")
    )
}

/// A new order of `user`, number `index`, owned by `owner`.
fn new_order(user: &str, owner: &str, index: usize) -> Order {
    Order::new(
        OrderId::new_v4(),
        user.to_string(),
        serde_json::json!({ "n": index }),
        owner.to_string(),
        chrono::Utc::now(),
    )
}

/// Stores `count` unfinished orders of `user` owned by `owner`, straight in Redis.
async fn orders_of(store: &RedisStore, user: &str, owner: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for index in 0..count {
        let order = new_order(user, owner, index);
        store.create(&order, None).await.expect("store an order");
        ids.push(order.order_id.to_string());
    }
    ids
}

/// Waits until every one of `ids` is finished, read straight from Redis (a node behind a faulty
/// proxy may answer 503 meanwhile).
async fn wait_all_finished(store: &RedisStore, ids: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    for id in ids {
        let id = OrderId::try_parse(id).unwrap();
        loop {
            let order = store.get(id).await.ok().flatten();
            if order.as_ref().is_some_and(Order::is_finished) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "order {id} did not finish within {within:?}: {order:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Regression: a takeover that failed part-way (its second chunk of moves timed out) returned
/// on the error, so the orders of its first chunk, already moved to the taker, were never
/// resumed, and the next attempt no longer saw them under the dead node. The taker now resumes
/// everything it owns that it does not run as soon as a takeover fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_fails_part_way_resumes_what_it_moved() {
    let _turn = cluster_turn().await;
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    // Reconciliation would find the stranded orders eventually; here it must not be what helps.
    let taker = Node::start(&config(
        &proxy.url(),
        "10ms",
        "[pipeline]\nreconcile_interval = \"10m\"\n",
        &[],
    ))
    .await;
    let taker_id = taker.service_id_file();
    assert_eq!(leader_of(&taker).await, taker_id);
    let store = RedisStore::connect(&redis.url(), 2, Duration::from_secs(2)).unwrap();
    let connections = Connections::connect(&redis.url(), 1, Duration::from_secs(2)).unwrap();
    let coordinator = RedisCoordinator::new(Arc::new(connections));
    let user = unique_user("part-way");
    // A first dead node with one order: its takeover gets Redis to know the move script, so the
    // real takeover below sends each move once.
    let warm_up = uuid::Uuid::new_v4().to_string();
    let first = orders_of(&store, &user, &warm_up, 1).await;
    coordinator
        .register_node(&warm_up, "127.0.0.1:9")
        .await
        .unwrap();
    wait_all_finished(&store, &first, TAKEOVER).await;
    // 300 orders: moved in a chunk of 256, then one of 44 whose replies are lost.
    let dead = uuid::Uuid::new_v4().to_string();
    let ids = orders_of(&store, &user, &dead, 300).await;
    proxy.lose_replies_after(&format!("{dead}\r\n${}\r\n{taker_id}", taker_id.len()), 280);
    coordinator
        .register_node(&dead, "127.0.0.1:9")
        .await
        .unwrap();
    wait_all_finished(&store, &ids, Duration::from_secs(40)).await;
    assert_eq!(proxy.faults_made(), 1, "no reply was lost");
    assert!(
        taker.log().contains("takeover failed part-way"),
        "the takeover did not fail part-way"
    );
}

/// A takeover moves a dead node's orders shard by shard and holds them only once all are moved:
/// a reconciliation pass of the taker meanwhile must not take those already moved for orders
/// that nothing here runs (a warning an operator would chase, and each order run twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_a_takeover_is_still_moving_are_not_taken_for_forgotten_ones() {
    let _turn = cluster_turn().await;
    let redis = RedisServer::start();
    // Steps that outlast the test, so what the taker resumes stays held; passes back to back,
    // each reading at most 20,000 owned orders, so that some begin and end inside the takeover
    // of 30,000 (one that reads them all ends after it).
    let taker = Node::start(&config(
        &redis.url(),
        "1h",
        "[pipeline]\nreconcile_interval = \"5ms\"\n\
         [log]\nlevel = \"info,order_process::pipeline::reconcile=debug\"\n",
        &[],
    ))
    .await;
    assert_eq!(leader_of(&taker).await, taker.service_id_file());
    let store = RedisStore::connect(&redis.url(), 8, Duration::from_secs(2)).unwrap();
    let connections = Connections::connect(&redis.url(), 1, Duration::from_secs(2)).unwrap();
    let coordinator = RedisCoordinator::new(Arc::new(connections));
    let user = unique_user("moving");
    let dead = uuid::Uuid::new_v4().to_string();
    let stored = futures_util::stream::iter(0..30_000)
        .map(|index| {
            let order = new_order(&user, &dead, index);
            let store = &store;
            async move { store.create(&order, None).await.is_ok() }
        })
        .buffer_unordered(64)
        .filter(|stored| std::future::ready(*stored))
        .count()
        .await;
    assert_eq!(stored, 30_000);
    coordinator
        .register_node(&dead, "127.0.0.1:9")
        .await
        .unwrap();
    // Until a pass that began after the takeover ended has ended too.
    let deadline = Instant::now() + Duration::from_secs(120);
    let log = loop {
        let log = taker.log();
        let passes_after = log.split_once("took over orders").map_or(0, |(_, after)| {
            after.matches("reconciliation pass done").count()
        });
        if passes_after >= 2 {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "no takeover and two passes after it"
        );
        tokio::time::sleep(POLL).await;
    };
    let resumed = crate::stuck::reconciled(&log);
    assert!(resumed.is_empty(), "taken for forgotten:\n{resumed:#?}");
}

/// Three nodes on one Redis, the third (the victim) reaching it through a proxy, with `cluster`
/// lines added to each config; ten orders of 2 s steps submitted to the victim.
async fn three_with_a_victim_behind_a_proxy(
    cluster: &str,
) -> (RedisServer, Proxy, Vec<Node>, Vec<String>) {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    let first = Node::start(&(config(&redis.url(), "10ms", "", &[]) + cluster)).await;
    let seed = first.port;
    let second = Node::start(&(config(&redis.url(), "10ms", "", &[seed]) + cluster)).await;
    let victim = Node::start(&(config(&proxy.url(), "2s", "", &[seed]) + cluster)).await;
    let nodes = vec![first, second, victim];
    wait_formed(&nodes, 3).await;
    let user = unique_user("cut-off");
    let mut ids = Vec::new();
    for index in 0..10 {
        ids.push(
            nodes[2]
                .create_order(&user, &serde_json::json!({ "n": index }))
                .await,
        );
    }
    (redis, proxy, nodes, ids)
}

/// Regression: a node cut off from Redis cannot renew its liveness lease and starts no step, but
/// gossip still calls it live, and the leader took over only nodes gossip called dead: its orders
/// waited as long as the cut. The lease is the authority now: the node's orders are taken over
/// once it has expired (the node says in gossip it cannot renew it; at the latest once it has
/// been expired for `cluster.takeover_after`), whatever gossip says of the node's liveness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_redis_but_live_in_gossip_is_taken_over() {
    let _turn = cluster_turn().await;
    let (redis, proxy, nodes, ids) = three_with_a_victim_behind_a_proxy("").await;
    proxy.sever();
    let cut = Instant::now();
    // Gossip keeps calling the victim live all along; its orders complete on the others.
    let store = RedisStore::connect(&redis.url(), 2, Duration::from_secs(2)).unwrap();
    // The bound: the lease lapses (`liveness_ttl`, 3 s), stays lapsed `takeover_after` (1 s);
    // plus room for a loaded machine.
    wait_all_finished(&store, &ids, Duration::from_secs(3 + 1 + 10)).await;
    let took = cut.elapsed();
    let view = nodes[0].cluster().await;
    proxy.heal();
    let victim_id = nodes[2].service_id_file();
    let live = view["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|node| node["name"] == victim_id.as_str() && node["connected"] == true);
    assert!(
        live,
        "gossip no longer calls the victim live: the test shows nothing"
    );
    let log = format!("{}{}", nodes[0].log(), nodes[1].log());
    assert!(log.contains("took over orders"), "no takeover logged");
    eprintln!("orders of a node cut off from redis finished {took:?} after the cut");
}

/// A node cut off from Redis says so in gossip, and the leader takes it over as soon as the
/// lease has expired, without waiting `cluster.takeover_after` (a minute here): gossip makes a
/// takeover sooner, the lease keeps it safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_says_it_cannot_renew_its_lease_is_taken_over_once_the_lease_expires() {
    let _turn = cluster_turn().await;
    let (redis, proxy, nodes, ids) =
        three_with_a_victim_behind_a_proxy("takeover_after = \"60s\"\n").await;
    proxy.sever();
    let cut = Instant::now();
    let store = RedisStore::connect(&redis.url(), 2, Duration::from_secs(2)).unwrap();
    // The lease lapses within `liveness_ttl` (3 s); the rest is room for a loaded machine, and
    // far less than the 60 s bound.
    wait_all_finished(&store, &ids, Duration::from_secs(3 + 20)).await;
    let took = cut.elapsed();
    proxy.heal();
    let log = format!("{}{}", nodes[0].log(), nodes[1].log());
    assert!(
        log.contains("node cannot renew its liveness lease and the lease expired"),
        "the takeover did not come from the node's own word"
    );
    eprintln!("orders of a node that said it lost redis finished {took:?} after the cut");
}

/// A lease's lapse is told by Redis's clock, so that any leader, also one new in office, knows
/// how long ago a node's lease expired.
#[tokio::test]
async fn the_store_tells_how_long_ago_a_liveness_lease_expired() {
    let redis = RedisServer::start();
    let coordinator = crate::cluster::coordinator_of(&redis);
    let lease = order_process::cluster::Liveness {
        node: "node-l".into(),
        holder: "node-l:1".into(),
        http_addr: "127.0.0.1:1".into(),
    };
    coordinator
        .renew_alive(&lease, Duration::from_millis(300))
        .await
        .expect("take the lease");
    coordinator
        .register_node("node-never", "127.0.0.1:2")
        .await
        .expect("register");
    let nodes = ["node-l".to_string(), "node-never".to_string()];
    let held = coordinator.node_status(&nodes).await.expect("status");
    assert!(held[0].alive && held[0].lapsed.is_none(), "{held:?}");
    assert!(!held[1].alive && held[1].lapsed.is_none(), "{held:?}");

    let deadline = Instant::now() + Duration::from_secs(10);
    let lapsed = loop {
        let status = coordinator.node_status(&nodes).await.expect("status");
        if let Some(lapsed) = status[0]
            .lapsed
            .filter(|lapsed| *lapsed >= Duration::from_millis(500))
        {
            assert!(!status[0].alive);
            break lapsed;
        }
        assert!(Instant::now() < deadline, "never lapsed: {status:?}");
        tokio::time::sleep(POLL).await;
    };
    assert!(lapsed < Duration::from_secs(10), "{lapsed:?}");
}

/// A leader whose renewal got no answer (a reply lost on its way) renews the same term once
/// Redis answers again: Redis still holds that term's lease, so a new term of its own could
/// only begin once it expired, leaving the cluster without a leader meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_renewal_got_no_answer_keeps_its_term() {
    let _turn = cluster_turn().await;
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    let node = Node::start(&config(&proxy.url(), "10ms", "", &[])).await;
    assert_eq!(leader_of(&node).await, node.service_id_file());
    let leads = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|line| line.contains("follower -> leader"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(leads(&node.log()).len(), 1, "{}", node.log_tail());
    // Once a renewal has gone through (Redis knows its script, and runs the next one sent at
    // once), the next call naming the leader lease (a renewal: nothing else asks for it now)
    // gets no answer, though Redis runs it.
    let left = || {
        redis
            .cli(&["PTTL", keys::LEADER])
            .trim()
            .parse::<i64>()
            .unwrap_or(-1)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = left();
    loop {
        let now = left();
        if now > last {
            break;
        }
        assert!(Instant::now() < deadline, "the lease was never renewed");
        last = now;
        tokio::time::sleep(POLL).await;
    }
    proxy.lose_replies_after(keys::LEADER, 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let again = loop {
        let log = node.log();
        if let Some(line) = leads(&log).get(1) {
            break line.clone();
        }
        assert!(
            Instant::now() < deadline,
            "never led again\n{}",
            node.log_tail()
        );
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(proxy.faults_made(), 1);
    assert!(
        node.log()
            .contains("leader -> follower: cannot renew lease"),
        "{}",
        node.log_tail()
    );
    assert!(again.contains("token=1"), "a new term began: {again}");
}

/// A renewal says whether it kept the lease or took a free one: a lease gone from the store
/// (expired by its clock, or deleted) while its holder's clock said it held is lost, and the
/// holder must treat it as a lapse.
#[tokio::test]
async fn a_liveness_renewal_tells_a_kept_lease_from_one_taken_afresh() {
    use order_process::cluster::Renewal;
    let redis = RedisServer::start();
    let coordinator = crate::cluster::coordinator_of(&redis);
    let lease = order_process::cluster::Liveness {
        node: "node-r".into(),
        holder: "node-r:1".into(),
        http_addr: "127.0.0.1:1".into(),
    };
    let ttl = Duration::from_secs(30);
    let renew = || coordinator.renew_alive(&lease, ttl);
    assert_eq!(renew().await.expect("renew"), Renewal::Taken);
    assert_eq!(renew().await.expect("renew"), Renewal::Held);
    redis.cli(&["DEL", &keys::alive_key("node-r")]);
    assert_eq!(renew().await.expect("renew"), Renewal::Taken);
    assert_eq!(renew().await.expect("renew"), Renewal::Held);
    let other = order_process::cluster::Liveness {
        holder: "node-r:2".into(),
        ..lease.clone()
    };
    assert_eq!(
        coordinator.renew_alive(&other, ttl).await.expect("renew"),
        Renewal::HeldBy("node-r:1".into())
    );
}

#[tokio::test]
async fn a_held_leader_lease_says_how_long_it_has_left_and_is_free_then() {
    let redis = RedisServer::start();
    let connections = Connections::connect(&redis.url(), 1, Duration::from_secs(2)).unwrap();
    let coordinator = RedisCoordinator::new(Arc::new(connections));
    let ttl = Duration::from_millis(1500);
    let first = coordinator.acquire_leader("a:1", ttl).await.unwrap();
    let token = first.token().expect("a free lease is taken");
    let Acquired::HeldFor(left) = coordinator.acquire_leader("b:1", ttl).await.unwrap() else {
        panic!("the lease was taken twice")
    };
    assert!(left > Duration::ZERO && left <= ttl, "time left {left:?}");
    // What is under test is that the lease is free once the time it named has passed.
    tokio::time::sleep(left + Duration::from_millis(25)).await;
    let second = coordinator.acquire_leader("b:1", ttl).await.unwrap();
    assert_eq!(second, Acquired::Term(token + 1));
}

/// Whether the doc of order `id` in `redis` is compressed (starts with zstd's magic number), and
/// its length in bytes.
fn stored_doc(redis: &RedisServer, id: &str) -> (bool, usize) {
    let key = keys::order_key(OrderId::try_parse(id).expect("an order id"));
    let magic = redis.cli(&[
        "EVAL",
        "return string.sub(redis.call('HGET', KEYS[1], 'doc'), 1, 4) == '\\40\\181\\47\\253' and 1 or 0",
        "1",
        &key,
    ]);
    let length = redis.cli(&["HSTRLEN", &key, "doc"]);
    (
        magic == "1",
        length.parse().expect("HSTRLEN answers a number"),
    )
}

/// `database.compress_orders`: a node that writes orders compressed takes over orders stored as
/// JSON (by a node of an earlier version, or without the option) and finishes them, writing
/// them compressed, at a fraction of their JSON's size; a store without the option reads them,
/// and the node reads and lists them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_writing_compressed_orders_takes_over_json_ones_that_plain_readers_still_read() {
    let _turn = cluster_turn().await;
    let redis = RedisServer::start();
    let plain = RedisStore::connect(&redis.url(), 2, Duration::from_secs(2)).unwrap();
    let user = unique_user("compressed");
    let node = Node::start(
        &config(&redis.url(), "10ms", "", &[])
            .replace("[database]\n", "[database]\ncompress_orders = true\n"),
    )
    .await;
    // Orders a dead node left, stored as JSON.
    let dead = uuid::Uuid::new_v4().to_string();
    let left = orders_of(&plain, &user, &dead, 20).await;
    for id in &left {
        assert!(!stored_doc(&redis, id).0, "stored as JSON");
    }
    let connections = Connections::connect(&redis.url(), 1, Duration::from_secs(2)).unwrap();
    RedisCoordinator::new(Arc::new(connections))
        .register_node(&dead, "127.0.0.1:9")
        .await
        .unwrap();
    wait_all_finished(&plain, &left, TAKEOVER).await;
    // And orders submitted to the node.
    let mut submitted = Vec::new();
    for index in 0..5 {
        submitted.push(
            node.create_order(&user, &serde_json::json!({ "n": index }))
                .await,
        );
    }
    wait_all_finished(&plain, &submitted, TAKEOVER).await;
    for id in left.iter().chain(&submitted) {
        let order = plain
            .get(OrderId::try_parse(id).unwrap())
            .await
            .expect("read")
            .expect("kept");
        assert_eq!(order.current_step.as_str(), "Completed", "{order:?}");
        let json = serde_json::to_vec(&order).unwrap().len();
        let (compressed, length) = stored_doc(&redis, id);
        assert!(compressed, "{id} written compressed by the node");
        assert!(
            length * 2 < json,
            "{id}: {length} bytes compressed, {json} as JSON"
        );
        // The node reads them as well.
        let view = node.order(&user, id).await;
        assert_eq!(view["current_step"], "Completed", "{view}");
    }
    // And lists them, filtered by step too (the listing reads the orders it names).
    for query in [&[][..], &[("current_step", "Completed")][..]] {
        let mut listed = node.list_all_ids(&user, query).await;
        listed.sort();
        let mut all: Vec<String> = left.iter().chain(&submitted).cloned().collect();
        all.sort();
        assert_eq!(listed, all, "listed with {query:?}");
    }
}

/// `database.payload_apart`: a node that keeps payloads apart takes over orders stored whole and
/// finishes them, still whole; the orders it is given keep their payloads apart; its answers
/// and a store without the option read both whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeping_payloads_apart_takes_over_whole_ones_and_both_read_whole() {
    takes_over_whole_orders_and_both_read_whole("payload_apart", "payload").await;
}

/// `database.split_orders`: the same for a node that keeps orders split (their head in a field
/// of their own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeping_orders_split_takes_over_whole_ones_and_both_read_whole() {
    takes_over_whole_orders_and_both_read_whole("split_orders", "head").await;
}

/// A node with `database.{option} = true` takes over orders stored whole and finishes them,
/// still whole; the orders it is given are kept in its form (their hash has `field`); its
/// answers and a store without the option read both whole.
async fn takes_over_whole_orders_and_both_read_whole(option: &str, field: &str) {
    let _turn = cluster_turn().await;
    let redis = RedisServer::start();
    let plain = RedisStore::connect(&redis.url(), 2, Duration::from_secs(2)).unwrap();
    let user = unique_user("apart");
    let node = Node::start(
        &config(&redis.url(), "10ms", "", &[])
            .replace("[database]\n", &format!("[database]\n{option} = true\n")),
    )
    .await;
    let dead = uuid::Uuid::new_v4().to_string();
    let left = orders_of(&plain, &user, &dead, 5).await;
    let connections = Connections::connect(&redis.url(), 1, Duration::from_secs(2)).unwrap();
    RedisCoordinator::new(Arc::new(connections))
        .register_node(&dead, "127.0.0.1:9")
        .await
        .unwrap();
    let mut submitted = Vec::new();
    for index in 0..5 {
        let payload = serde_json::json!({ "n": index, "note": "x".repeat(100) });
        submitted.push((node.create_order(&user, &payload).await, payload));
    }
    wait_all_finished(&plain, &left, TAKEOVER).await;
    let ids: Vec<String> = submitted.iter().map(|(id, _)| id.clone()).collect();
    wait_all_finished(&plain, &ids, TAKEOVER).await;
    let left = left
        .iter()
        .enumerate()
        .map(|(index, id)| (id.clone(), serde_json::json!({ "n": index })));
    for (id, payload) in left.chain(submitted.iter().cloned()) {
        let order = plain
            .get(OrderId::try_parse(&id).unwrap())
            .await
            .expect("read")
            .expect("kept");
        assert_eq!(order.current_step.as_str(), "Completed", "{order:?}");
        assert_eq!(**order.payload, payload);
        let view = node.order(&user, &id).await;
        assert_eq!(view["payload"], payload, "{view}");
        let key = keys::order_key(OrderId::try_parse(&id).unwrap());
        let apart = redis.cli(&["HEXISTS", &key, field]) == "1";
        assert_eq!(apart, ids.contains(&id), "{id} kept with `{field}`");
    }
}
