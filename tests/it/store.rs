//! One conformance suite for every `OrderStore`: the embedded store in a temp dir and the Redis
//! store against a real `redis-server` started by the test.

use crate::harness::RedisServer;
use crate::proxy::Proxy;
use chrono::{Duration as Span, Utc};
use futures_util::future::join_all;
use order_process::metrics::Metrics;
use order_process::order::{
    apply, Event, Notification, Order, OrderId, Output, Phase, RollbackState, Step,
};
use order_process::store::embedded::EmbeddedStore;
use order_process::store::metered::MeteredStore;
use order_process::store::redis::{keys, RedisStore};
use order_process::store::{
    CancelOutcome, Created, ListQuery, OrderStore, Reopen, Reopened, Reopening, Repaired, SetAside,
    StoreError, TakenBack, PURGE_BATCH,
};
use order_process_testkit::RedisCluster;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn new_order(user: &str, owner: &str, offset_ms: i64) -> Order {
    Order::new(
        OrderId::new_v4(),
        user.to_string(),
        serde_json::json!({"sku": "A1"}),
        owner.to_string(),
        Utc::now() + Span::milliseconds(offset_ms),
    )
}

/// The order after `event`, at the next revision, as the executor commits it.
fn step(order: &Order, event: Event) -> Order {
    let mut next = apply(order, event, Utc::now()).expect("legal transition");
    next.revision = order.revision + 1;
    next
}

fn succeed(order: &Order) -> Order {
    step(
        order,
        Event::StepSucceeded {
            step: order.current_step,
            output: None,
        },
    )
}

/// `user`'s retry of the parked rollback of order `id`, to run on `node`, now.
fn reopen<'a>(id: OrderId, user: &'a str, node: &'a str) -> Reopen<'a> {
    Reopen {
        id,
        user,
        node,
        now: Utc::now(),
        what: Reopening::RollbackRetry,
    }
}

/// `user`'s request to send the failed webhook of order `id` again, from `node`, now.
fn redelivery<'a>(id: OrderId, user: &'a str, node: &'a str) -> Reopen<'a> {
    Reopen {
        what: Reopening::Redelivery,
        ..reopen(id, user, node)
    }
}

/// The ids of the first page of `user`'s orders that `query` lists.
async fn ids_listed(store: &dyn OrderStore, user: &str, query: &ListQuery) -> Vec<OrderId> {
    let page = store.list_for_user(user, query).await.unwrap();
    page.orders.iter().map(|order| order.order_id).collect()
}

/// Whether `node`'s unfinished orders include `id`.
async fn owns(store: &dyn OrderStore, node: &str, id: OrderId) -> bool {
    store.owned_unfinished(node).await.unwrap().contains(&id)
}

/// A new order that is to be created with idempotency key `key`, under an id the store picked.
fn keyed(store: &dyn OrderStore, user: &str, owner: &str, offset_ms: i64, key: &str) -> Order {
    let mut order = new_order(user, owner, offset_ms);
    order.order_id = store.new_order_id(user, Some(key));
    order
}

async fn create(store: &dyn OrderStore, order: &Order) {
    match store.create(order, None).await.expect("create") {
        Created::New => {}
        other => panic!("a fresh order was not created: {other:?}"),
    }
}

/// An order moved to another node (`before`, as its old owner holds it; `now`, as read after
/// the move): a commit from the old owner is refused, one from the new owner goes through.
async fn fenced_over(store: &dyn OrderStore, before: &Order, now: &Order) {
    assert!(matches!(
        store.commit(&succeed(before)).await,
        Err(StoreError::NotOwner)
    ));
    store
        .commit(&succeed(now))
        .await
        .expect("the new owner commits");
}

/// Runs the index repair through, page by page, as a new leader does.
async fn repair_all(store: &dyn OrderStore) -> Repaired {
    let mut all = Repaired::default();
    let mut cursor = String::new();
    loop {
        let (page, next) = store.repair_indexes(&cursor, 100).await.expect("repair");
        all.orders += page.orders;
        all.owners.extend(page.owners);
        match next {
            Some(next) => cursor = next,
            None => return all,
        }
    }
}

/// `order` committed through to `Completed`.
async fn finish(store: &dyn OrderStore, order: &Order) -> Order {
    let mut order = order.clone();
    while !order.is_finished() {
        order = succeed(&order);
        store.commit(&order).await.expect("commit");
    }
    order
}

/// A new order of `user`'s whose rollback is parked: finished, with compensation left to retry.
async fn parked(store: &dyn OrderStore, user: &str, offset_ms: i64) -> Order {
    let mut parked = new_order(user, "node-a", offset_ms);
    create(store, &parked).await;
    for event in [
        Event::StepFailed {
            step: Step::Scheduling,
            reason: "declined".into(),
        },
        Event::RollbackFailed {
            step: Step::Scheduling,
            reason: "refund service down".into(),
        },
    ] {
        parked = step(&parked, event);
        store.commit(&parked).await.expect("commit");
    }
    assert!(parked.is_finished());
    parked
}

/// Every order of `user` that `current_step` and `rollback_state` select, newest first, paged
/// two at a time.
async fn listed(
    store: &dyn OrderStore,
    user: &str,
    current_step: Option<Step>,
    rollback_state: Option<RollbackState>,
) -> Vec<OrderId> {
    let mut all = Vec::new();
    let mut cursor = None;
    for _ in 0..1000 {
        let query = ListQuery {
            limit: 2,
            cursor,
            current_step,
            rollback_state,
        };
        let page = store.list_for_user(user, &query).await.expect("list");
        assert!(
            page.orders.len() <= 2,
            "a page of {} for 2",
            page.orders.len()
        );
        all.extend(page.orders.iter().map(|order| order.order_id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return all,
        }
    }
    panic!("the listing never ends");
}

/// Listings filtered by step or rollback state follow every transition, re-opening and
/// deletion, and page like the unfiltered one.
async fn listings_by_state(store: &dyn OrderStore) {
    let user = format!("states-{}", uuid::Uuid::new_v4().simple());
    let mut scheduling = Vec::new();
    for offset in 0..4 {
        let order = new_order(&user, "node-a", offset * 10);
        create(store, &order).await;
        scheduling.push(order);
    }
    // The newest moves on a step, the next newest finishes, two fail (one parked).
    let moved = succeed(&scheduling[3]);
    store.commit(&moved).await.expect("commit");
    let completed = finish(store, &scheduling[2]).await;
    let failed_parked = parked(store, &user, 50).await;
    let mut rolled_back = new_order(&user, "node-a", 60);
    create(store, &rolled_back).await;
    for event in [
        Event::StepFailed {
            step: Step::Scheduling,
            reason: "declined".into(),
        },
        Event::RolledBack {
            step: Step::Scheduling,
        },
    ] {
        rolled_back = step(&rolled_back, event);
        store.commit(&rolled_back).await.expect("commit");
    }
    assert_eq!(rolled_back.rollback_state, Some(RollbackState::Complete));

    let ids = |orders: &[&Order]| {
        orders
            .iter()
            .map(|order| order.order_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        listed(store, &user, Some(Step::Scheduling), None).await,
        ids(&[&scheduling[1], &scheduling[0]])
    );
    assert_eq!(
        listed(store, &user, Some(Step::PreProcessing), None).await,
        ids(&[&moved])
    );
    assert_eq!(
        listed(store, &user, Some(Step::Completed), None).await,
        ids(&[&completed])
    );
    assert_eq!(
        listed(store, &user, Some(Step::Failed), None).await,
        ids(&[&rolled_back, &failed_parked])
    );
    assert_eq!(
        listed(store, &user, None, Some(RollbackState::Incomplete)).await,
        ids(&[&failed_parked])
    );
    assert_eq!(
        listed(
            store,
            &user,
            Some(Step::Failed),
            Some(RollbackState::Complete)
        )
        .await,
        ids(&[&rolled_back])
    );
    assert!(listed(
        store,
        &user,
        Some(Step::Completed),
        Some(RollbackState::Complete)
    )
    .await
    .is_empty());

    // A parked rollback retried is no longer listed as parked.
    let retried = store
        .reopen(reopen(failed_parked.order_id, &user, "node-a"))
        .await
        .expect("retry");
    assert!(matches!(retried, Reopened::Accepted(_)));
    assert!(listed(store, &user, None, Some(RollbackState::Incomplete))
        .await
        .is_empty());
}

/// Every order the parked index lists, paged two at a time as an operator's view would.
async fn all_parked(store: &dyn OrderStore) -> Vec<OrderId> {
    let mut all = Vec::new();
    let mut cursor = String::new();
    for _ in 0..1000 {
        let (page, next) = store.parked_page(&cursor, 2).await.expect("parked page");
        assert!(page.len() <= 2, "a page of {} for 2", page.len());
        all.extend(page);
        match next {
            Some(next) => cursor = next,
            None => return all,
        }
    }
    panic!("the parked pages never end");
}

/// Polls until order `id` is gone, for at most `within`.
async fn wait_gone(store: &dyn OrderStore, id: OrderId, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    while store.get(id).await.expect("get").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "order {id} still stored after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// For a store with a retention of 1 s: a finished order goes after it, with its idempotency
/// key; an unfinished one and a parked rollback re-opened stay; a listing skips what went and
/// still fills its page. Returns the user, whose index holds 4 orders after this.
async fn retention(store: &dyn OrderStore) -> String {
    let user = format!("keeper-{}", uuid::Uuid::new_v4().simple());
    let running = new_order(&user, "node-a", 0);
    create(store, &running).await;
    let parked = parked(store, &user, 1).await;
    // Parked and left so: it goes with its retention, and out of the parked index.
    let lapsed = self::parked(store, &user, 4).await;
    let done = keyed(store, &user, "node-a", 2, "cart-1");
    assert!(matches!(
        store.create(&done, Some("cart-1")).await.expect("create"),
        Created::New
    ));
    let done = finish(store, &done).await;
    // Stored finished from the start, with a key and without: owned by no node, and each goes
    // with its retention, its key too.
    let mut born_done = Vec::new();
    for (offset, key) in [(5, Some("cart-2")), (6, None)] {
        let mut order = match key {
            Some(key) => keyed(store, &user, "node-a", offset, key),
            None => new_order(&user, "node-a", offset),
        };
        while !order.is_finished() {
            order = succeed(&order);
        }
        assert!(matches!(
            store.create(&order, key).await.expect("create"),
            Created::New
        ));
        assert!(!owns(store, "node-a", order.order_id).await);
        born_done.push(order.order_id);
    }
    // Newer than the orders kept, so a page of them must be filled past these.
    let mut newer = Vec::new();
    for offset in 10..15 {
        let order = new_order(&user, "node-a", offset);
        create(store, &order).await;
        newer.push(finish(store, &order).await.order_id);
    }
    // Re-opened after it finished: kept again.
    match store
        .reopen(reopen(parked.order_id, &user, "node-a"))
        .await
        .expect("retry")
    {
        Reopened::Accepted(order) => assert!(!order.is_finished()),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store
            .create(&new_order(&user, "node-a", 3), Some("cart-1"))
            .await,
        Ok(Created::Existing(_))
    ));

    wait_gone(store, done.order_id, Duration::from_secs(15)).await;
    wait_gone(store, lapsed.order_id, Duration::from_secs(5)).await;
    for id in newer.iter().chain(&born_done) {
        wait_gone(store, *id, Duration::from_secs(5)).await;
    }
    // Every order that finished with `done` is past its retention: what is left is kept.
    store.purge_expired(PURGE_BATCH).await.expect("purge");
    assert!(store.get(running.order_id).await.unwrap().is_some());
    assert!(store.get(parked.order_id).await.unwrap().is_some());
    assert!(
        !all_parked(store).await.contains(&lapsed.order_id),
        "an order gone by retention is still listed as parked"
    );
    let page = store
        .list_for_user(
            &user,
            &ListQuery {
                limit: 2,
                ..ListQuery::default()
            },
        )
        .await
        .expect("list");
    let listed: Vec<OrderId> = page.orders.iter().map(|order| order.order_id).collect();
    assert_eq!(listed, vec![parked.order_id, running.order_id]);
    // The idempotency key went with its order: the same key makes a new order.
    let again = keyed(store, &user, "node-a", 20, "cart-1");
    match store.create(&again, Some("cart-1")).await.expect("create") {
        Created::New => {}
        other => panic!("a key whose order is gone still answered: {other:?}"),
    }
    let again = keyed(store, &user, "node-a", 21, "cart-2");
    match store.create(&again, Some("cart-2")).await.expect("create") {
        Created::New => {}
        other => panic!("the key of an order stored finished still answered: {other:?}"),
    }
    assert_eq!(store.get(done.order_id).await.unwrap(), None);
    user
}

/// A key of `user`'s and another user whose key `k` an earlier version spelled as that one on
/// Redis (`idem:{user}:p{n}:k`), in the same shard: `p{n}:k` and `{user}:p{n}`.
fn keys_spelled_alike(user: &str) -> (String, String) {
    (0..)
        .map(|n| (format!("p{n}:k"), format!("{user}:p{n}")))
        .find(|(key, colon_user)| {
            keys::shard_of_key(user, key) == keys::shard_of_key(colon_user, "k")
        })
        .unwrap_or_default()
}

async fn conformance(store: &dyn OrderStore) {
    store.ping().await.expect("ping");
    let user = format!("user-{}", uuid::Uuid::new_v4().simple());
    let other = format!("other-{}", uuid::Uuid::new_v4().simple());

    // Create and read back.
    let order = new_order(&user, "node-a", 0);
    create(store, &order).await;
    assert_eq!(
        store.get(order.order_id).await.unwrap(),
        Some(order.clone())
    );
    assert_eq!(store.get(OrderId::new_v4()).await.unwrap(), None);
    let read = store
        .get_many(&[order.order_id, OrderId::new_v4(), order.order_id])
        .await;
    let read: Vec<Option<Order>> = read.into_iter().map(|one| one.unwrap()).collect();
    assert_eq!(read, [Some(order.clone()), None, Some(order.clone())]);
    assert!(store
        .owned_unfinished("node-a")
        .await
        .unwrap()
        .contains(&order.order_id));

    // Idempotency keys are per user.
    let first = keyed(store, &user, "node-a", 1, "key-1");
    assert!(matches!(
        store.create(&first, Some("key-1")).await.unwrap(),
        Created::New
    ));
    let again = new_order(&user, "node-a", 2);
    match store.create(&again, Some("key-1")).await.unwrap() {
        Created::Existing(existing) => assert_eq!(existing.order_id, first.order_id),
        other => panic!("same user and key created a second order: {other:?}"),
    }
    assert_eq!(store.get(again.order_id).await.unwrap(), None);
    let theirs = keyed(store, &other, "node-a", 3, "key-1");
    assert!(matches!(
        store.create(&theirs, Some("key-1")).await.unwrap(),
        Created::New
    ));
    // Also when user and key both hold a `:`, spelled alike as an earlier version spelled them.
    let (key, colon_user) = keys_spelled_alike(&user);
    let mine = keyed(store, &user, "node-a", 4, &key);
    let colons = keyed(store, &colon_user, "node-a", 5, "k");
    for (order, key) in [(&mine, key.as_str()), (&colons, "k")] {
        match store.create(order, Some(key)).await.unwrap() {
            Created::New => {}
            other => panic!("{} with key {key} created no order: {other:?}", order.user),
        }
    }
    for (order, key) in [(&mine, key.as_str()), (&colons, "k")] {
        let again = new_order(&order.user, "node-a", 6);
        match store.create(&again, Some(key)).await.unwrap() {
            Created::Existing(existing) => assert_eq!(existing.order_id, order.order_id),
            other => panic!("{} with key {key} again: {other:?}", order.user),
        }
    }

    // Commits are compare-and-set on owner and epoch.
    let next = succeed(&order);
    let mut stranger = next.clone();
    stranger.owner = "node-z".into();
    assert!(matches!(
        store.commit(&stranger).await,
        Err(StoreError::NotOwner)
    ));
    let mut stale = next.clone();
    stale.epoch += 1;
    assert!(matches!(
        store.commit(&stale).await,
        Err(StoreError::NotOwner)
    ));
    store.commit(&next).await.expect("owner commits");
    assert_eq!(store.get(order.order_id).await.unwrap(), Some(next.clone()));

    // Finishing removes the order from its owner's unfinished set.
    let mut done = next.clone();
    while !done.is_finished() {
        done = succeed(&done);
        store.commit(&done).await.expect("commit step");
    }
    assert_eq!(done.current_step, Step::Completed);
    assert!(!store
        .owned_unfinished("node-a")
        .await
        .unwrap()
        .contains(&order.order_id));

    // Cancellation: recorded once, refused for others, enforced on the next forward commit.
    assert!(matches!(
        store.request_cancel(first.order_id, &other).await,
        Err(StoreError::NotFound)
    ));
    match store.request_cancel(first.order_id, &user).await.unwrap() {
        CancelOutcome::Accepted(order) => assert!(order.cancel_requested),
        other => panic!("cancel of a running order: {other:?}"),
    }
    assert!(matches!(
        store.request_cancel(first.order_id, &user).await.unwrap(),
        CancelOutcome::Accepted(_)
    ));
    let unaware = succeed(&first);
    assert!(matches!(
        store.commit(&unaware).await,
        Err(StoreError::CancelRequested)
    ));
    let mut aware = first.clone();
    aware.cancel_requested = true;
    let cancelled = succeed(&aware);
    assert_eq!(cancelled.phase, Phase::RollingBack);
    store.commit(&cancelled).await.expect("cancel-aware commit");
    assert!(matches!(
        store.request_cancel(order.order_id, &user).await.unwrap(),
        CancelOutcome::Finished(_)
    ));

    // Listing: newest first, paged by cursor, filtered by step, per user.
    let lister = format!("lister-{}", uuid::Uuid::new_v4().simple());
    let mut ids = Vec::new();
    for offset in 0..5 {
        let order = new_order(&lister, "node-a", offset * 10);
        create(store, &order).await;
        ids.push(order.order_id);
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list_for_user(
                &lister,
                &ListQuery {
                    limit: 2,
                    cursor: cursor.clone(),
                    current_step: None,
                    rollback_state: None,
                },
            )
            .await
            .unwrap();
        seen.extend(page.orders.iter().map(|order| order.order_id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
        assert!(seen.len() <= 5, "paging does not end");
    }
    assert_eq!(seen, ids);
    let failed_only = store
        .list_for_user(
            &user,
            &ListQuery {
                limit: 50,
                cursor: None,
                current_step: Some(Step::Completed),
                rollback_state: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        failed_only
            .orders
            .iter()
            .map(|order| order.order_id)
            .collect::<Vec<_>>(),
        vec![order.order_id]
    );

    // Reassign moves unfinished orders, bumps epochs and fences the old owner out.
    let moving = new_order(&user, "node-b", 0);
    create(store, &moving).await;
    let moved = store.reassign("node-b", "node-c").await.unwrap();
    assert_eq!(moved, vec![moving.order_id]);
    let now = store.get(moving.order_id).await.unwrap().unwrap();
    assert_eq!(now.owner, "node-c");
    assert_eq!(now.epoch, moving.epoch + 1);
    fenced_over(store, &moving, &now).await;
    assert!(store.owned_unfinished("node-b").await.unwrap().is_empty());
    assert_eq!(
        store.owned_unfinished("node-c").await.unwrap(),
        vec![moving.order_id]
    );
    assert!(store.reassign("node-b", "node-c").await.unwrap().is_empty());

    listings_by_state(store).await;
    parked_rollbacks(store).await;
    set_aside(store).await;
    take_back(store).await;
    owned_pages(store).await;
    disown(store).await;
    late_writes(store).await;
    redeliveries(store).await;
}

/// `order`, finishing with the event given, its webhook owed in that write, and then failed for
/// good: as the store keeps an order whose receiver was down longer than its retries.
async fn webhook_failed(store: &dyn OrderStore, order: &Order, finishing: Event) -> Order {
    let mut finished = step(order, finishing);
    assert!(finished.is_finished());
    finished.notification = Some(Notification::pending(1));
    store.commit(&finished).await.expect("the finishing commit");
    let failed = step(
        &finished,
        Event::NotifyFailed {
            reason: "receiver down".into(),
        },
    );
    store.commit(&failed).await.expect("the webhook failed");
    assert!(!failed.owes_work());
    failed
}

/// A webhook that failed for good: sent again once for its order's user only, by (and for) the
/// node that asks, which owns the order again until it is delivered; a parked order stays
/// parked meanwhile.
async fn redeliveries(store: &dyn OrderStore) {
    let user = format!("notified-{}", uuid::Uuid::new_v4().simple());
    let mut completing = new_order(&user, "node-a", 0);
    create(store, &completing).await;
    for _ in 0..Step::WORK.len() - 1 {
        completing = succeed(&completing);
        store.commit(&completing).await.expect("commit");
    }
    let last = completing.current_step;
    let completed = webhook_failed(
        store,
        &completing,
        Event::StepSucceeded {
            step: last,
            output: None,
        },
    )
    .await;
    assert!(!owns(store, "node-a", completed.order_id).await);

    assert!(matches!(
        store
            .reopen(redelivery(completed.order_id, "someone-else", "node-b"))
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .reopen(reopen(completed.order_id, &user, "node-b"))
            .await
            .unwrap(),
        Reopened::Refused(_)
    ));
    let again = match store
        .reopen(redelivery(completed.order_id, &user, "node-b"))
        .await
        .unwrap()
    {
        Reopened::Accepted(order) => order,
        other => panic!("redelivery of a failed webhook: {other:?}"),
    };
    assert!(again.is_finished() && again.owes_work());
    assert_eq!(
        (again.owner.as_str(), again.epoch),
        ("node-b", completed.epoch + 1)
    );
    assert_eq!(
        store.get(again.order_id).await.unwrap(),
        Some(again.clone())
    );
    assert!(owns(store, "node-b", again.order_id).await);
    assert!(
        matches!(
            store
                .reopen(redelivery(completed.order_id, &user, "node-c"))
                .await
                .unwrap(),
            Reopened::Refused(_)
        ),
        "only once: it is owed now"
    );
    assert!(matches!(
        store.commit(&completed).await,
        Err(StoreError::NotOwner)
    ));
    let delivered = step(&again, Event::Notified);
    store.commit(&delivered).await.expect("delivered");
    assert!(!owns(store, "node-b", again.order_id).await);
    assert_eq!(
        store.get(again.order_id).await.unwrap(),
        Some(delivered.clone())
    );

    // A parked order whose webhook failed: sent again, and parked all the while.
    let failing = new_order(&user, "node-a", 10);
    create(store, &failing).await;
    let failing = step(
        &failing,
        Event::StepFailed {
            step: Step::Scheduling,
            reason: "declined".into(),
        },
    );
    store.commit(&failing).await.expect("commit");
    let parked = webhook_failed(
        store,
        &failing,
        Event::RollbackFailed {
            step: Step::Scheduling,
            reason: "refund service down".into(),
        },
    )
    .await;
    assert!(all_parked(store).await.contains(&parked.order_id));
    let Reopened::Accepted(again) = store
        .reopen(redelivery(parked.order_id, &user, "node-b"))
        .await
        .unwrap()
    else {
        panic!("redelivery of a parked order's failed webhook");
    };
    assert_eq!(again.rollback_state, Some(RollbackState::Incomplete));
    assert!(owns(store, "node-b", parked.order_id).await);
    assert!(
        all_parked(store).await.contains(&parked.order_id),
        "a parked order sent its webhook again is no longer listed as parked"
    );
    store
        .commit(&step(&again, Event::Notified))
        .await
        .expect("delivered");
    assert!(all_parked(store).await.contains(&parked.order_id));
    assert!(!owns(store, "node-b", parked.order_id).await);
}

/// A commit is taken only over the revision it was made from: the same write again is done
/// already, an older one (delivered late) or another one of the same revision is refused.
async fn late_writes(store: &dyn OrderStore) {
    let order = new_order("late", "node-l", 0);
    create(store, &order).await;
    let first = succeed(&order);
    store.commit(&first).await.expect("first commit");
    store.commit(&first).await.expect("the same commit again");
    let second = succeed(&first);
    store.commit(&second).await.expect("second commit");
    assert!(matches!(store.commit(&first).await, Err(StoreError::Stale)));
    let mut other = second.clone();
    other.payload = std::sync::Arc::new(serde_json::json!({"sku": "B2"}).into());
    assert!(matches!(store.commit(&other).await, Err(StoreError::Stale)));
    assert_eq!(
        store.get(order.order_id).await.unwrap(),
        Some(second.clone())
    );
    // Revisions past one digit: 10 is newer than 9, and 99 older than 100.
    let mut write = succeed(&second);
    for (newer, older) in [(10, 9), (100, 99), (1_000_000, 999_999)] {
        write.revision = newer;
        store.commit(&write).await.expect("a newer revision");
        let mut late = write.clone();
        late.revision = older;
        assert!(
            matches!(store.commit(&late).await, Err(StoreError::Stale)),
            "revision {older} after {newer}"
        );
    }
    assert_eq!(store.get(order.order_id).await.unwrap(), Some(write));
}

/// 120 orders past their first step, ready for [`commit_together`].
async fn committed_once(store: &dyn OrderStore) -> Vec<Order> {
    committed_once_as(store, |id| id).await
}

/// [`committed_once`], each order's id made by `id` from a random one.
async fn committed_once_as(store: &dyn OrderStore, id: impl Fn(OrderId) -> OrderId) -> Vec<Order> {
    let mut orders = Vec::new();
    for offset in 0..120 {
        let mut order = new_order("together", "node-g", offset);
        order.order_id = id(order.order_id);
        create(store, &order).await;
        let first = succeed(&order);
        store.commit(&first).await.expect("first commit");
        orders.push(first);
    }
    orders
}

/// Commits made at the same moment, each judged on its own: of the transitions of `orders`
/// sent together, those by a node that does not own the order and those older than what is
/// stored are refused, and every other one is written. Answers how many were sent.
async fn commit_together(store: &dyn OrderStore, orders: &[Order]) -> usize {
    let commits: Vec<(Order, &str)> = orders
        .iter()
        .enumerate()
        .map(|(index, order)| match index % 3 {
            0 => {
                let mut foreign = succeed(order);
                foreign.owner = "node-x".into();
                (foreign, "not_owner")
            }
            1 => {
                let mut late = order.clone();
                late.revision -= 1;
                (late, "stale")
            }
            _ => (succeed(order), "ok"),
        })
        .collect();
    let outcomes = join_all(commits.iter().map(|(order, _)| store.commit(order))).await;
    for ((order, expected), outcome) in commits.iter().zip(outcomes) {
        let got = match outcome {
            Ok(()) => "ok",
            Err(StoreError::NotOwner) => "not_owner",
            Err(StoreError::Stale) => "stale",
            Err(other) => panic!("commit of {}: {other}", order.order_id),
        };
        assert_eq!(got, *expected, "commit of {}", order.order_id);
        let stored = store.get(order.order_id).await.unwrap().expect("stored");
        let advanced = stored.revision == order.revision && *expected == "ok";
        assert_eq!(advanced, got == "ok", "{stored:?}");
    }
    commits.len()
}

/// Creates sent at the same moment, each judged on its own: a third are new orders, a third new
/// orders with an idempotency key, and a third orders created before (found, not created
/// again). Answers how many were sent.
async fn create_together(store: &dyn OrderStore) -> usize {
    let mut earlier = Vec::new();
    for offset in 0..40 {
        let order = new_order("creator", "node-c", offset);
        create(store, &order).await;
        earlier.push(order);
    }
    let mut creates: Vec<(Order, Option<String>)> = Vec::new();
    for offset in 0..40 {
        creates.push((new_order("creator", "node-c", 100 + offset), None));
        let key = format!("together-{offset}");
        let mut keyed = new_order("creator", "node-c", 200 + offset);
        keyed.order_id = store.new_order_id("creator", Some(&key));
        creates.push((keyed, Some(key)));
        creates.push((earlier[offset as usize].clone(), None));
    }
    let outcomes = join_all(
        creates
            .iter()
            .map(|(order, key)| store.create(order, key.as_deref())),
    )
    .await;
    for ((order, key), outcome) in creates.iter().zip(outcomes) {
        let outcome =
            outcome.unwrap_or_else(|error| panic!("create of {}: {error}", order.order_id));
        let again = earlier.iter().any(|first| first.order_id == order.order_id);
        match outcome {
            Created::New => assert!(!again, "{} created twice", order.order_id),
            Created::Existing(first) => {
                assert!(again, "{} found, not created", order.order_id);
                assert_eq!(first.order_id, order.order_id);
            }
            Created::Adopted(other) => panic!("{} stored as {}", order.order_id, other.order_id),
        }
        let stored = store.get(order.order_id).await.unwrap().expect("stored");
        assert_eq!(stored.user, "creator");
        if let Some(key) = key {
            let found = store
                .create(&new_order("creator", "node-c", 0), Some(key))
                .await;
            assert!(
                matches!(found, Ok(Created::Existing(ref first)) if first.order_id == order.order_id),
                "key {key}: {found:?}"
            );
        }
    }
    creates.len()
}

/// An owned-set entry is taken out only when the node does not own the order unfinished.
async fn disown(store: &dyn OrderStore) {
    let order = new_order("disowner", "node-d", 0);
    create(store, &order).await;
    assert!(!store.disown("node-d", order.order_id).await.unwrap());
    assert!(owns(store, "node-d", order.order_id).await, "still its own");
    assert!(!store.disown("node-e", order.order_id).await.unwrap());
    assert!(!store.disown("node-d", OrderId::new_v4()).await.unwrap());
}

/// A sweep page by page names every order a node owns, and nothing else.
async fn owned_pages(store: &dyn OrderStore) {
    let mut expected = Vec::new();
    for offset in 0..7 {
        let order = new_order("pager", "node-p", offset);
        create(store, &order).await;
        expected.push(order.order_id);
    }
    create(store, &new_order("pager", "node-q", 0)).await;
    let mut seen = Vec::new();
    let mut cursor = String::new();
    for _ in 0..100 {
        let (page, next) = store.owned_page("node-p", &cursor, 2).await.unwrap();
        seen.extend(page);
        match next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    seen.sort_unstable();
    seen.dedup();
    expected.sort_unstable();
    assert_eq!(seen, expected);
}

/// An order set aside leaves its owner's unfinished orders, is listed once however often it
/// is set aside, and its record stays readable as it was.
async fn set_aside(store: &dyn OrderStore) {
    let order = new_order("aside", "node-s", 0);
    create(store, &order).await;
    let aside = SetAside {
        order_id: order.order_id,
        node: "node-s".into(),
        reason: "expected value at line 1 column 1".into(),
        at: Utc::now(),
    };
    store.set_aside(&aside).await.expect("set aside");
    store.set_aside(&aside).await.expect("set aside again");
    assert!(!owns(store, "node-s", order.order_id).await);
    assert_eq!(store.set_aside_orders(10).await.unwrap(), vec![aside]);
    assert_eq!(store.get(order.order_id).await.unwrap(), Some(order));
    assert_eq!(store.set_aside_orders(0).await.unwrap(), vec![]);
}

/// A set-aside order taken back is the taker's, at a new epoch, among its unfinished orders and
/// no longer set aside, once; a finished or gone one only loses its entry.
async fn take_back(store: &dyn OrderStore) {
    let aside = |order_id: OrderId| SetAside {
        order_id,
        node: "node-t".into(),
        reason: "expected value at line 1 column 1".into(),
        at: Utc::now(),
    };
    let order = new_order("taken-back", "node-t", 0);
    create(store, &order).await;
    store
        .set_aside(&aside(order.order_id))
        .await
        .expect("set aside");
    // The index repair leaves a set-aside order out of its owner's unfinished orders.
    repair_all(store).await;
    assert!(!owns(store, "node-t", order.order_id).await);

    assert_eq!(
        store.take_back(order.order_id, "node-u").await.unwrap(),
        TakenBack::Taken
    );
    let now = store
        .get(order.order_id)
        .await
        .unwrap()
        .expect("still stored");
    assert_eq!((now.owner.as_str(), now.epoch), ("node-u", order.epoch + 1));
    assert!(owns(store, "node-u", order.order_id).await);
    assert!(!owns(store, "node-t", order.order_id).await);
    let listed = store.set_aside_orders(1_000).await.unwrap();
    assert!(listed.iter().all(|entry| entry.order_id != order.order_id));
    fenced_over(store, &order, &now).await;
    assert_eq!(
        store.take_back(order.order_id, "node-v").await.unwrap(),
        TakenBack::NotAside
    );
    assert!(owns(store, "node-u", order.order_id).await);

    let done = new_order("taken-back", "node-t", 1);
    create(store, &done).await;
    let done = finish(store, &done).await;
    let gone = new_order("taken-back", "node-t", 2);
    for id in [done.order_id, gone.order_id] {
        store.set_aside(&aside(id)).await.expect("set aside");
        assert_eq!(
            store.take_back(id, "node-u").await.unwrap(),
            TakenBack::Dropped
        );
    }
    let listed = store.set_aside_orders(1_000).await.unwrap();
    assert!(listed
        .iter()
        .all(|entry| entry.order_id != done.order_id && entry.order_id != gone.order_id));
    assert!(!owns(store, "node-u", done.order_id).await);
    assert_eq!(store.get(done.order_id).await.unwrap(), Some(done));

    // Paged one at a time (a page may hold more), every set-aside order comes once.
    for n in 0..3 {
        let waiting = new_order("taken-back", "node-t", 3 + n);
        store
            .set_aside(&aside(waiting.order_id))
            .await
            .expect("set aside");
    }
    let all: Vec<OrderId> = (store.set_aside_orders(1_000).await.unwrap().iter())
        .map(|entry| entry.order_id)
        .collect();
    assert!(all.len() >= 3, "{all:?}");
    let (mut paged, mut cursor) = (Vec::new(), String::new());
    loop {
        let (page, next) = store.set_aside_page(&cursor, 1).await.expect("a page");
        assert!(
            !page.is_empty() || next.is_none(),
            "an empty page before the last"
        );
        paged.extend(page.iter().map(|entry| entry.order_id));
        match next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    let (mut all, mut unique) = (all, paged.clone());
    all.sort_unstable();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), paged.len(), "an order paged twice: {paged:?}");
    assert_eq!(unique, all);
}

/// A parked rollback: listed by `rollback_state`, re-opened once for its owner user only, by
/// (and for) the node that asks, and back in that node's unfinished set.
async fn parked_rollbacks(store: &dyn OrderStore) {
    let user = format!("parker-{}", uuid::Uuid::new_v4().simple());
    let order = parked(store, &user, 0).await;
    assert!(!owns(store, "node-a", order.order_id).await);
    let done = new_order(&user, "node-a", 10);
    create(store, &done).await;
    // Any user's parked rollbacks are listed, in pages, and nothing else.
    let others: Vec<OrderId> = join_all((0..4).map(|n| {
        let user = format!("other-parker-{n}-{}", uuid::Uuid::new_v4().simple());
        async move { parked(store, &user, 0).await.order_id }
    }))
    .await;
    let listed = all_parked(store).await;
    for id in others.iter().chain([&order.order_id]) {
        assert!(listed.contains(id), "parked order {id} not listed");
    }
    assert!(!listed.contains(&done.order_id));
    let mut sorted = listed.clone();
    sorted.sort_by_key(ToString::to_string);
    sorted.dedup();
    assert_eq!(listed, sorted, "parked pages in id order, no order twice");

    let incomplete = ListQuery {
        limit: 50,
        rollback_state: Some(RollbackState::Incomplete),
        ..ListQuery::default()
    };
    let listed = ids_listed(store, &user, &incomplete).await;
    assert_eq!(listed, vec![order.order_id]);

    assert!(matches!(
        store
            .reopen(reopen(order.order_id, "someone-else", "node-b"))
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .reopen(reopen(done.order_id, &user, "node-b"))
            .await
            .unwrap(),
        Reopened::Refused(_)
    ));
    let reopened = match store
        .reopen(reopen(order.order_id, &user, "node-b"))
        .await
        .unwrap()
    {
        Reopened::Accepted(order) => order,
        other => panic!("retry of a parked rollback: {other:?}"),
    };
    assert_eq!(reopened.phase, Phase::RollingBack);
    assert_eq!(reopened.owner, "node-b");
    assert_eq!(reopened.epoch, order.epoch + 1);
    assert_eq!(
        store.get(order.order_id).await.unwrap(),
        Some(reopened.clone())
    );
    assert!(owns(store, "node-b", order.order_id).await);
    assert!(
        !all_parked(store).await.contains(&order.order_id),
        "a re-opened order is still listed as parked"
    );
    // Only once: it is rolling back now, and the old owner is fenced out.
    assert!(matches!(
        store
            .reopen(reopen(order.order_id, &user, "node-c"))
            .await
            .unwrap(),
        Reopened::Refused(_)
    ));
    assert!(matches!(
        store.commit(&order).await,
        Err(StoreError::NotOwner)
    ));
    assert!(store
        .list_for_user(&user, &incomplete)
        .await
        .unwrap()
        .orders
        .is_empty());
    let rolled_back = step(
        &reopened,
        Event::RolledBack {
            step: Step::Scheduling,
        },
    );
    store.commit(&rolled_back).await.expect("new owner commits");
    assert!(!owns(store, "node-b", order.order_id).await);
    assert!(rolled_back.is_finished());
    assert!(!all_parked(store).await.contains(&order.order_id));
}

#[tokio::test]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    conformance(&store).await;
}

#[tokio::test]
async fn embedded_backups_are_made_one_at_a_time() {
    use order_process::store::embedded::BackupError;
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    create(&store, &new_order("alice", "node-a", 0)).await;
    let first = store.backup().await.expect("a backup");
    assert_eq!(first.orders, 1);
    assert!(
        matches!(store.backup().await, Err(BackupError::Busy)),
        "a second while the first is held"
    );
    drop(first);
    store.backup().await.expect("once the first is sent");

    // A caller that gives up on a backup does not end its copy, which keeps its turn: a backup
    // asked for meanwhile is refused, or made once that copy is out of the data dir.
    let padding = "x".repeat(2048);
    let orders: Vec<Order> = (0..3000)
        .map(|n| {
            let mut order = new_order("bulky", "node-a", n);
            order.payload = Arc::new(serde_json::json!({ "padding": padding }).into());
            order
        })
        .collect();
    join_all(orders.iter().map(|order| create(&store, order))).await;
    // How many copies are in the data dir at once, at the most, looked at all along.
    let (most, done) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let watcher = std::thread::spawn({
        let (most, done, dir) = (Arc::clone(&most), Arc::clone(&done), dir.path().to_owned());
        move || {
            while !done.load(Ordering::SeqCst) {
                let copies = std::fs::read_dir(&dir)
                    .map(|entries| {
                        entries
                            .flatten()
                            .filter(|entry| {
                                entry
                                    .file_name()
                                    .to_string_lossy()
                                    .starts_with("backup-partial-")
                            })
                            .count()
                    })
                    .unwrap_or(0);
                most.fetch_max(copies, Ordering::SeqCst);
            }
        }
    });
    let mut given_up = Box::pin(store.backup());
    // Begun (its copy runs in a thread of its own), then dropped.
    assert!(futures_util::poll!(&mut given_up).is_pending());
    drop(given_up);
    match store.backup().await {
        Err(BackupError::Busy) => {}
        Ok(copy) => assert_eq!(copy.orders, 3001),
        Err(other) => panic!("{other}"),
    }
    done.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    assert!(most.load(Ordering::SeqCst) <= 1, "two copies at once");
}

#[tokio::test]
async fn embedded_store_keeps_orders_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let order = new_order("alice", "node-a", 0);
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        create(&store, &order).await;
    }
    let store = reopen_embedded(dir.path()).await;
    assert_eq!(store.get(order.order_id).await.unwrap(), Some(order));
}

#[tokio::test]
async fn a_closed_embedded_store_says_it_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let order = new_order("alice", "node-a", 0);
    let store = EmbeddedStore::open(dir.path()).unwrap();
    create(&store, &order).await;
    store.close(Duration::from_secs(5)).expect("close");
    // A node's tasks still running while it stops get this, not a reopen after a failed write.
    match store.get(order.order_id).await {
        Err(StoreError::Unavailable(why)) => assert!(why.contains("closed"), "{why}"),
        other => panic!("a read of a closed store: {other:?}"),
    }
    let store = reopen_embedded(dir.path()).await;
    assert_eq!(store.get(order.order_id).await.unwrap(), Some(order));
}

/// The embedded store in `dir` opened again, once the writer thread of the one dropped before
/// let go of the file.
async fn reopen_embedded(dir: &std::path::Path) -> EmbeddedStore {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match EmbeddedStore::open(dir) {
            Ok(store) => return store,
            Err(error) if std::time::Instant::now() > deadline => panic!("reopen: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test]
async fn embedded_store_writing_compressed_orders_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_with(dir.path(), Duration::from_secs(3600), true).unwrap();
    conformance(&store).await;
}

/// The ids of the orders the embedded store's file in `dir` keeps, and of those whose payload it
/// keeps apart (their doc without one), read from the file directly once the store let go of it.
async fn embedded_payloads_apart(dir: &std::path::Path) -> (Vec<String>, Vec<String>) {
    use redb::{ReadableDatabase, ReadableTable};
    let db = open_redb(dir).await;
    let txn = db.begin_read().unwrap();
    let orders = txn
        .open_table(redb::TableDefinition::<&str, &[u8]>::new("orders"))
        .unwrap();
    let payloads = txn
        .open_table(redb::TableDefinition::<&str, &[u8]>::new("order_payloads"))
        .unwrap();
    let (mut all, mut apart) = (Vec::new(), Vec::new());
    for entry in orders.iter().unwrap() {
        let (id, doc) = entry.unwrap();
        let doc = String::from_utf8_lossy(doc.value()).to_string();
        all.push(id.value().to_string());
        if payloads.get(id.value()).unwrap().is_some() && !doc.contains("\"payload\":") {
            apart.push(id.value().to_string());
        }
    }
    // No payload is left behind by an order gone.
    for entry in payloads.iter().unwrap() {
        let (id, _) = entry.unwrap();
        assert!(
            all.contains(&id.value().to_string()),
            "payload of gone order {}",
            id.value()
        );
    }
    (all, apart)
}

/// `database.payload_apart` on the embedded store: every order created keeps its payload apart
/// from its doc, through every change, reads back whole, and its payload goes with it.
#[tokio::test]
async fn embedded_store_keeping_payloads_apart_conforms() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EmbeddedStore::open(dir.path())
            .unwrap()
            .with_payload_apart(true);
        conformance(&store).await;
    }
    let (all, apart) = embedded_payloads_apart(dir.path()).await;
    assert!(all.len() > 10, "{} orders", all.len());
    assert_eq!(apart, all);
    // Retention deletes an order's payload with it.
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EmbeddedStore::open_retaining(dir.path(), Duration::from_secs(1))
            .unwrap()
            .with_payload_apart(true);
        retention(&store).await;
    }
    let (all, apart) = embedded_payloads_apart(dir.path()).await;
    assert_eq!(apart, all);
}

/// An embedded store with `database.payload_apart` and one without it read each other's orders
/// and take their next transitions, which keep the form they were created in.
#[tokio::test]
async fn embedded_store_reads_orders_whichever_payload_form_it_creates() {
    let dir = tempfile::tempdir().unwrap();
    let (kept_apart, whole) = (
        new_order("forms", "node-a", 0),
        new_order("forms", "node-a", 1),
    );
    {
        let store = EmbeddedStore::open(dir.path())
            .unwrap()
            .with_payload_apart(true);
        create(&store, &kept_apart).await;
    }
    let mut reopened = None;
    for apart in [false, true, false] {
        drop(reopened.take());
        let store = reopen_embedded(dir.path()).await.with_payload_apart(apart);
        if !apart && store.get(whole.order_id).await.unwrap().is_none() {
            create(&store, &whole).await;
        }
        for order in [&kept_apart, &whole] {
            let read = store.get(order.order_id).await.unwrap().expect("kept");
            assert_eq!(read.payload, order.payload);
            store.commit(&succeed(&read)).await.expect("commit");
        }
        reopened = Some(store);
    }
    drop(reopened);
    let (all, apart) = embedded_payloads_apart(dir.path()).await;
    assert_eq!(all.len(), 2);
    assert_eq!(apart, vec![kept_apart.order_id.to_string()]);
}

/// The bytes the embedded store in `dir` keeps for order `id`, read from its file directly.
async fn stored_bytes(dir: &std::path::Path, id: OrderId) -> Vec<u8> {
    use redb::ReadableDatabase;
    let db = open_redb(dir).await;
    let txn = db.begin_read().unwrap();
    let orders = txn
        .open_table(redb::TableDefinition::<&str, &[u8]>::new("orders"))
        .unwrap();
    let bytes = orders
        .get(id.to_string().as_str())
        .unwrap()
        .expect("stored");
    bytes.value().to_vec()
}

/// An embedded store with `database.compress_orders` keeps orders compressed, several times
/// smaller than their JSON; opened again without it, it reads them, lists them and takes
/// their next transitions (written as JSON again), and the other way round.
#[tokio::test]
async fn embedded_store_reads_orders_whichever_form_it_writes() {
    const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    let dir = tempfile::tempdir().unwrap();
    let user = "compressed";
    let retention = Duration::from_secs(3600);
    let running = new_order(user, "node-a", 0);
    let done = new_order(user, "node-a", 1);
    let done = {
        let store = EmbeddedStore::open_with(dir.path(), retention, true).unwrap();
        create(&store, &running).await;
        create(&store, &done).await;
        finish(&store, &done).await
    };
    for order in [&running, &done] {
        let bytes = stored_bytes(dir.path(), order.order_id).await;
        let mut json = Vec::new();
        order_process::order::write_order(&mut json, order).unwrap();
        assert!(bytes.starts_with(&ZSTD_MAGIC), "stored compressed");
        assert!(
            bytes.len() * 2 < json.len(),
            "{} of {}",
            bytes.len(),
            json.len()
        );
    }

    let running = {
        let store = EmbeddedStore::open_with(dir.path(), retention, false).unwrap();
        assert_eq!(
            store.get(running.order_id).await.unwrap(),
            Some(running.clone())
        );
        assert_eq!(store.get(done.order_id).await.unwrap(), Some(done.clone()));
        let all = ListQuery {
            limit: 10,
            ..ListQuery::default()
        };
        let listed = ids_listed(&store, user, &all).await;
        assert_eq!(listed, vec![done.order_id, running.order_id]);
        let next = succeed(&running);
        store
            .commit(&next)
            .await
            .expect("commit over a compressed order");
        next
    };
    assert_eq!(
        stored_bytes(dir.path(), running.order_id).await.first(),
        Some(&b'{')
    );

    let store = EmbeddedStore::open_with(dir.path(), retention, true).unwrap();
    assert_eq!(
        store.get(running.order_id).await.unwrap(),
        Some(running.clone())
    );
    let next = succeed(&running);
    store.commit(&next).await.expect("commit over a JSON order");
    assert_eq!(store.get(next.order_id).await.unwrap(), Some(next));
}

#[tokio::test]
async fn redis_store_conforms() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 4, Duration::from_secs(2)).unwrap();
    // As a first leader does: the repair of an empty Redis marks its state indexes complete, so
    // filtered listings read them.
    repair_all(&store).await;
    conformance(&store).await;
    // The indexes can be rebuilt from the order hashes alone, and the repair names the owners
    // of unfinished orders.
    let repaired = repair_all(&store).await;
    assert!(repaired.orders > 0);
    assert!(repaired.owners.contains("node-p"), "{repaired:?}");
    assert!(!repaired.owners.contains("node-t"), "{repaired:?}");
}

/// How many order hashes `redis` holds, and how many of them hold their payload apart (in a
/// field of its own, their doc without one).
fn payloads_apart(redis: &RedisServer) -> (usize, usize) {
    let counted = redis.cli(&[
        "EVAL",
        "local n, apart = 0, 0 \
         for _, key in ipairs(redis.call('KEYS', 'op:*:order:*')) do \
           n = n + 1 \
           local doc = redis.call('HGET', key, 'doc') \
           if redis.call('HEXISTS', key, 'payload') == 1 and not string.find(doc, '\"payload\":', 1, true) then apart = apart + 1 end \
         end \
         return {n, apart}",
        "0",
    ]);
    let mut counted = counted.lines().map(|line| line.parse().expect("a count"));
    (counted.next().expect("n"), counted.next().expect("apart"))
}

/// `database.payload_apart`: every order created keeps its payload apart from its doc, through
/// every change, and reads back whole.
#[tokio::test]
async fn redis_store_keeping_payloads_apart_conforms() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 4, Duration::from_secs(2))
        .unwrap()
        .with_payload_apart(true);
    conforms_in_form(&redis, &store, payloads_apart).await;
}

/// `store` on `redis` conforms, every order it stores is in its form (`in_form` counts the
/// orders, and those in it), and the index repair rebuilds from orders of that form.
async fn conforms_in_form(
    redis: &RedisServer,
    store: &RedisStore,
    in_form: fn(&RedisServer) -> (usize, usize),
) {
    repair_all(store).await;
    conformance(store).await;
    let (orders, in_form) = in_form(redis);
    assert!(orders > 10, "{orders} orders");
    assert_eq!(in_form, orders);
    let repaired = repair_all(store).await;
    assert!(repaired.orders > 0);
    assert!(repaired.owners.contains("node-p"), "{repaired:?}");
}

/// Nodes with and without `database.payload_apart` share a Redis: each reads the orders the
/// other created and commits their next transitions, and an order keeps the form it was
/// created in (a node without the option leaves out the payload of an order that keeps it
/// apart; one with it writes the payload of an order that does not).
#[tokio::test]
async fn redis_stores_with_and_without_payloads_apart_take_over_each_others_orders() {
    let redis = RedisServer::start();
    let connect = |apart| {
        RedisStore::connect(&redis.url(), 2, Duration::from_secs(2))
            .unwrap()
            .with_payload_apart(apart)
    };
    let (apart, whole) = (connect(true), connect(false));
    let user = format!("user-{}", uuid::Uuid::new_v4().simple());
    let mut payload = serde_json::json!({"note": "caf\u{e9} \"x\"", "items": [1, 2.5, null]});
    for (creator, taker) in [(&apart, &whole), (&whole, &apart)] {
        payload["n"] = serde_json::json!(user.len());
        let order = created_by(creator, &user, &payload).await;
        let mut read = taker.get(order.order_id).await.unwrap().expect("read");
        assert_eq!(read, order);
        while !read.is_finished() {
            taker.commit(&succeed(&read)).await.expect("commit");
            read = creator.get(order.order_id).await.unwrap().expect("read");
            assert_eq!(**read.payload, payload);
        }
        let all = ListQuery {
            limit: 10,
            ..ListQuery::default()
        };
        let listed = whole.list_for_user(&user, &all).await.unwrap();
        assert!(listed
            .orders
            .iter()
            .any(|listed| listed.order_id == order.order_id && **listed.payload == payload));
    }
    // The first order keeps its payload apart, the second in its doc.
    assert_eq!(payloads_apart(&redis), (2, 1));
}

/// How many order hashes `redis` holds, and how many of them are split: a head and steps in
/// fields of their own, a payload apart, and a doc with none of them.
fn orders_split(redis: &RedisServer) -> (usize, usize) {
    let counted = redis.cli(&[
        "EVAL",
        "local n, split = 0, 0 \
         for _, key in ipairs(redis.call('KEYS', 'op:*:order:*')) do \
           n = n + 1 \
           local doc = redis.call('HGET', key, 'doc') \
           if redis.call('HEXISTS', key, 'head') == 1 and redis.call('HEXISTS', key, 's0') == 1 \
             and redis.call('HEXISTS', key, 'payload') == 1 and not string.find(doc, '\"steps\":', 1, true) \
             and not string.find(doc, '\"order_id\":', 1, true) then split = split + 1 end \
         end \
         return {n, split}",
        "0",
    ]);
    let mut counted = counted.lines().map(|line| line.parse().expect("a count"));
    (counted.next().expect("n"), counted.next().expect("split"))
}

fn split_store(redis: &RedisServer) -> RedisStore {
    RedisStore::connect(&redis.url(), 4, Duration::from_secs(2))
        .unwrap()
        .with_split_orders(true)
}

/// `database.split_orders`: every order created is kept split, through every change, and reads
/// back whole.
#[tokio::test]
async fn redis_store_keeping_orders_split_conforms() {
    let redis = RedisServer::start();
    conforms_in_form(&redis, &split_store(&redis), orders_split).await;
}

/// Nodes with and without `database.split_orders` share a Redis: each reads the orders the
/// other created and commits their next transitions, and an order keeps the form it was
/// created in.
#[tokio::test]
async fn redis_stores_with_and_without_split_orders_take_over_each_others_orders() {
    let redis = RedisServer::start();
    let (split, whole) = (split_store(&redis), plain_store_on(&redis));
    let user = format!("user-{}", uuid::Uuid::new_v4().simple());
    let payload = serde_json::json!({"note": "caf\u{e9} \"x\"", "items": [1, 2.5, null]});
    for (creator, taker) in [(&split, &whole), (&whole, &split)] {
        let order = created_by(creator, &user, &payload).await;
        let mut read = taker.get(order.order_id).await.unwrap().expect("read");
        assert_eq!(read, order);
        // Each store commits every other transition: neither knows the steps the other wrote.
        let mut turn = 0;
        while !read.is_finished() {
            let (committer, reader) = if turn % 2 == 0 {
                (taker, creator)
            } else {
                (creator, taker)
            };
            let next = succeed_with(&read, serde_json::json!({"turn": turn}));
            committer.commit(&next).await.expect("commit");
            read = reader.get(order.order_id).await.unwrap().expect("read");
            assert_eq!(read, next);
            turn += 1;
        }
    }
    // The first order is split, the second whole.
    assert_eq!(orders_split(&redis), (2, 1));
}

/// A new order of `user`'s with `payload`, owned by `node-a`, created by `store`.
async fn created_by(store: &RedisStore, user: &str, payload: &serde_json::Value) -> Order {
    let order = Order::new(
        OrderId::new_v4(),
        user.to_string(),
        payload.clone(),
        "node-a".into(),
        Utc::now(),
    );
    create(store, &order).await;
    order
}

/// A split order's step with an output.
fn succeed_with(order: &Order, output: serde_json::Value) -> Order {
    step(
        order,
        Event::StepSucceeded {
            step: order.current_step,
            output: Some(Output::of(&output).unwrap()),
        },
    )
}

fn plain_store_on(redis: &RedisServer) -> RedisStore {
    RedisStore::connect(&redis.url(), 4, Duration::from_secs(2)).unwrap()
}

/// A split order's writes send only the steps that changed: with steps whose outputs are large,
/// orders through all their steps take Redis far fewer bytes than whole orders do; and a write
/// from steps that are not as stored (another store of the same node wrote since) is sent again
/// with every step, so the order reads back as committed.
#[tokio::test]
async fn redis_store_writes_only_the_steps_of_a_split_order_that_changed() {
    let redis = RedisServer::start();
    let output = serde_json::json!({"label": "x".repeat(4000)});
    let mut bytes = Vec::new();
    for store in [plain_store_on(&redis), split_store(&redis)] {
        let before = input_bytes(&redis);
        for _ in 0..20 {
            let mut order = new_order("bytes", "node-a", 0);
            create(&store, &order).await;
            while !order.is_finished() {
                order = succeed_with(&order, output.clone());
                store.commit(&order).await.expect("commit");
            }
            assert_eq!(store.get(order.order_id).await.unwrap(), Some(order));
        }
        bytes.push(input_bytes(&redis) - before);
    }
    // Whole: each of the four outputs is sent at every later write (ten times in all); split:
    // once.
    assert!(
        bytes[1] * 2 < bytes[0],
        "split {} bytes, whole {}",
        bytes[1],
        bytes[0]
    );

    // Two stores as one node, each committing from the steps it wrote last. The second stores
    // a first step unlike the first store's; the first then commits, from its own, a write
    // that leaves its first step as it wrote it: the order reads back as that write has it.
    let (one, two) = (split_store(&redis), split_store(&redis));
    let created = new_order("bases", "node-a", 0);
    create(&one, &created).await;
    let first = succeed_with(&created, serde_json::json!({"by": "one"}));
    one.commit(&first).await.expect("commit");
    let theirs = succeed_with(
        &succeed_with(&created, serde_json::json!({"by": "two"})),
        output,
    );
    two.commit(&theirs).await.expect("commit");
    let ours = succeed(&succeed(&first));
    one.commit(&ours).await.expect("commit");
    assert_eq!(two.get(ours.order_id).await.unwrap(), Some(ours));
}

/// Bytes Redis read from its clients so far.
fn input_bytes(redis: &RedisServer) -> u64 {
    redis
        .cli(&["INFO", "stats"])
        .lines()
        .find_map(|line| line.strip_prefix("total_net_input_bytes:"))
        .and_then(|bytes| bytes.trim().parse().ok())
        .expect("total_net_input_bytes")
}

/// A store on a Redis with one replica, whose writes wait for it (`min_replicas = 1`). Its
/// timeout (a `WAIT` gets a third of it) leaves room for a machine busy with other tests and
/// builds: these tests count calls, and a write the replica acknowledged late is no failure.
fn replicated_store() -> (RedisServer, RedisServer, RedisStore) {
    use order_process::store::redis::Connections;
    use std::sync::Arc;

    let redis = RedisServer::start();
    let replica = RedisServer::start_replica_of(&redis);
    let connections = Connections::connect(&redis.url(), 4, Duration::from_secs(10))
        .unwrap()
        .with_min_replicas(1);
    (redis, replica, RedisStore::new(Arc::new(connections)))
}

/// The script calls and `WAIT`s `redis` ran while `writes` ran, and what `writes` answered.
async fn calls_during<T>(redis: &RedisServer, writes: impl Future<Output = T>) -> (u64, u64, T) {
    let (scripts, waits) = (calls_of(redis, "evalsha"), calls_of(redis, "wait"));
    let answer = writes.await;
    let scripts = calls_of(redis, "evalsha") - scripts;
    let waits = calls_of(redis, "wait") - waits;
    (scripts, waits, answer)
}

/// A store on a Redis without replicas.
fn plain_store() -> (RedisServer, RedisStore) {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 4, Duration::from_secs(2)).unwrap();
    (redis, store)
}

/// 120 commits sent together go in far fewer script calls (and, with `replicated`, `WAIT`s),
/// each answered on its own.
async fn commits_together(redis: &RedisServer, store: &RedisStore, replicated: bool) {
    let orders = committed_once(store).await;
    let (scripts, waits, sent) = calls_during(redis, commit_together(store, &orders)).await;
    let sent = sent as u64;
    assert!(
        scripts * 4 <= sent,
        "{sent} commits took {scripts} script calls"
    );
    if replicated {
        assert!(waits * 4 <= sent, "{sent} commits took {waits} waits");
    }
}

/// The same for creates: 120 submitted together go in far fewer script calls (and `WAIT`s),
/// each answered on its own.
async fn creates_together(redis: &RedisServer, store: &RedisStore, replicated: bool) {
    let (scripts, waits, sent) = calls_during(redis, create_together(store)).await;
    let sent = sent as u64;
    // The 40 created before one by one, and the 40 keys looked up again one by one; with
    // replicas, each order found again (the 40 created before, submitted again, and those of the
    // 40 keys) is confirmed replicated by a call and a `WAIT` of its own before it is answered.
    let alone = if replicated { 160 } else { 80 };
    assert!(
        scripts.saturating_sub(alone) * 4 <= sent,
        "{sent} creates took {scripts} script calls ({alone} of them alone)"
    );
    if replicated {
        assert!(
            waits.saturating_sub(alone) * 4 <= sent,
            "{sent} creates took {waits} waits ({alone} of them alone)"
        );
    }
}

/// Writes that wait for a replica are committed together when ready together.
#[tokio::test]
async fn redis_store_commits_transitions_ready_together_in_one_call_and_one_wait() {
    let (redis, _replica, store) = replicated_store();
    commits_together(&redis, &store, true).await;
}

#[tokio::test]
async fn redis_store_creates_orders_submitted_together_in_one_call_and_one_wait() {
    let (redis, _replica, store) = replicated_store();
    creates_together(&redis, &store, true).await;
}

/// Without replicas too: fewer calls cost Redis and the node less CPU per write.
#[tokio::test]
async fn redis_store_without_replicas_commits_transitions_ready_together_in_one_call() {
    let (redis, store) = plain_store();
    commits_together(&redis, &store, false).await;
}

#[tokio::test]
async fn redis_store_without_replicas_creates_orders_submitted_together_in_one_call() {
    let (redis, store) = plain_store();
    creates_together(&redis, &store, false).await;
}

/// Writes that come one after another while a call is on its way go together in the next call
/// (one call per connection is on its way at a time), instead of each in a call of its own: on
/// one connection, with Redis holding the first call back (`CLIENT PAUSE`), 30 commits sent
/// one by one take two calls.
#[tokio::test]
async fn redis_store_sends_the_writes_that_come_while_its_calls_are_on_their_way_in_the_next() {
    use std::sync::Arc;

    let redis = RedisServer::start();
    let store = Arc::new(RedisStore::connect(&redis.url(), 1, Duration::from_secs(5)).unwrap());
    let orders = committed_once(&*store).await;
    let orders = &orders[..30];
    redis.cli(&["CLIENT", "PAUSE", "500", "WRITE"]);
    let (scripts, _, ()) = calls_during(&redis, async {
        let mut sent = Vec::new();
        for order in orders {
            let (store, next) = (Arc::clone(&store), succeed(order));
            sent.push(tokio::spawn(async move { store.commit(&next).await }));
            // Lets the commit reach the group commit, and the group commit send it if it may.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
        for commit in sent {
            commit.await.expect("commit task").expect("commit");
        }
    })
    .await;
    assert!(scripts <= 2, "30 commits took {scripts} script calls");
}

/// The same on a Redis Cluster of three primaries, whose slots each shard's keys hash to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_store_conforms() {
    let cluster = RedisCluster::start();
    let connect =
        || RedisStore::connect_cluster(&cluster.addresses(), 4, Duration::from_secs(2)).unwrap();
    // The default retention: what the conformance finishes must still be there when it looks.
    let store = connect();
    repair_all(&store).await;
    conformance(&store).await;
    commit_together(&store, &committed_once(&store).await).await;
    create_together(&store).await;
    let repaired = repair_all(&store).await;
    assert!(repaired.orders > 0);
    assert!(repaired.owners.contains("node-p"), "{repaired:?}");
    assert!(!repaired.owners.contains("node-t"), "{repaired:?}");
    retention(&connect().with_retention(Duration::from_secs(1))).await;
}

/// On a Redis Cluster, the transitions of one shard ready together go in far fewer script
/// calls too (a call holds one shard's keys): 120 commits of orders of one shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_store_commits_the_transitions_of_one_shard_ready_together_in_one_call() {
    let cluster = RedisCluster::start();
    let store =
        RedisStore::connect_cluster(&cluster.addresses(), 4, Duration::from_secs(2)).unwrap();
    let orders = committed_once_as(&store, |id| keys::in_shard(id, 5)).await;
    let scripts = || {
        cluster
            .primaries()
            .into_iter()
            .filter_map(|port| cluster.cli(port, &["INFO", "commandstats"]))
            .map(|stats| calls_in(&stats, "evalsha"))
            .sum::<u64>()
    };
    let before = scripts();
    let sent = commit_together(&store, &orders).await as u64;
    let scripts = scripts() - before;
    assert!(
        scripts * 4 <= sent,
        "{sent} commits took {scripts} script calls"
    );
}

/// A primary of a Redis Cluster that stalls holds back the writes of its own shards only: on
/// one connection, with the primary of one order's shard stopped (SIGSTOP) while that order's
/// commit is on its way, the commits of orders of another primary still go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_cluster_primary_holds_back_only_its_own_shards_writes() {
    use std::sync::Arc;

    let cluster = RedisCluster::try_start(3, 0).expect("a redis cluster");
    let store = RedisStore::connect_cluster(&cluster.addresses(), 1, Duration::from_secs(5));
    let store = Arc::new(store.unwrap());
    let primary = |shard: u16| {
        let tag = format!("{{{}}}", keys::shard_tag(shard));
        let slot = cluster.slot_of(&tag).expect("the shard's slot");
        cluster.primary_of(slot).expect("the shard's primary")
    };
    let stalled = primary(0);
    let elsewhere = (1..keys::SHARDS)
        .find(|shard| primary(*shard) != stalled)
        .expect("a shard of another primary");
    let in_shard = |shard: u16| {
        let mut order = new_order("stalled", "node-g", 0);
        order.order_id = keys::in_shard(order.order_id, shard);
        order
    };
    let held = in_shard(0);
    create(&*store, &held).await;
    let others: Vec<Order> = (0..10).map(|_| in_shard(elsewhere)).collect();
    for order in &others {
        create(&*store, order).await;
    }
    assert!(cluster.signal(stalled, "STOP"), "cannot stop {stalled}");
    let waiting = {
        let (store, next) = (Arc::clone(&store), succeed(&held));
        tokio::spawn(async move { store.commit(&next).await })
    };
    // Lets the held commit go out first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let others_through = tokio::time::timeout(Duration::from_millis(600), async {
        for order in &others {
            store
                .commit(&succeed(order))
                .await
                .expect("commit elsewhere");
        }
    })
    .await;
    assert!(cluster.signal(stalled, "CONT"), "cannot resume {stalled}");
    assert!(
        others_through.is_ok(),
        "commits to another primary waited for the stopped one"
    );
    waiting
        .await
        .expect("commit task")
        .expect("the held commit, once its primary is back");
}

/// A Redis Cluster connection that takes longer to open than the store timeout, though each of
/// its round trips takes less (through a proxy that holds every reply of the one node it is
/// given back for 0.6 s): the open goes on after the request that asked for it gives up, and a
/// later request has it. Abandoned at each request's timeout, such an open never completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_connection_slower_to_open_than_the_timeout_still_opens() {
    let cluster = RedisCluster::try_start(3, 0)
        .unwrap_or_else(|error| panic!("cannot start a redis cluster: {error}"));
    let proxy = Proxy::start(cluster.primaries()[0]).await;
    proxy.delay_replies(Duration::from_millis(600));
    let node = format!("127.0.0.1:{}", proxy.port);
    let store = RedisStore::connect_cluster(&[node], 1, Duration::from_secs(1)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut failed = 0;
    while let Err(error) = store.get(OrderId::new_v4()).await {
        failed += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "no answer within 20 s ({failed} requests failed), the last: {error}"
        );
    }
    // Else the open was quicker than the timeout, and this test showed nothing.
    assert!(failed > 0, "the first request already had an answer");
}

#[tokio::test]
async fn embedded_store_deletes_finished_orders_after_retention() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_retaining(dir.path(), Duration::from_secs(1)).unwrap();
    retention(&store).await;
}

/// How many members the sorted sets `named` (one for each shard) hold in all, on the Redis at
/// `port`.
fn members(port: u16, named: impl Fn(u16) -> String) -> String {
    let keys: Vec<String> = keys::shards().map(named).collect();
    let count = keys.len().to_string();
    let mut args = vec![
        "EVAL",
        "local n = 0 for _, k in ipairs(KEYS) do n = n + redis.call('ZCARD', k) end return n",
        &count,
    ];
    args.extend(keys.iter().map(String::as_str));
    raw_command(port, &args)
        .trim()
        .trim_start_matches(':')
        .to_string()
}

/// How many entries `user`'s state indexes hold in all, on the Redis at `port`.
fn filed(port: u16, user: &str) -> usize {
    let codes: std::collections::BTreeSet<&str> = Step::ALL
        .iter()
        .map(|step| keys::state_code(*step, None))
        .chain(
            [RollbackState::Complete, RollbackState::Incomplete]
                .map(|state| keys::state_code(Step::Failed, Some(state))),
        )
        .collect();
    codes
        .into_iter()
        .map(|code| {
            members(port, |shard| keys::state_key(shard, code, user))
                .parse::<usize>()
                .unwrap_or(0)
        })
        .sum()
}

/// Runs the retention pass, as the leader does, until `user`'s index holds `entries`
/// members.
async fn pruned_to(redis: &RedisServer, store: &RedisStore, user: &str, entries: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while members(redis.port, |shard| keys::user_key(shard, user)) != entries.to_string() {
        assert!(
            std::time::Instant::now() < deadline,
            "user index not pruned"
        );
        store.purge_expired(PURGE_BATCH).await.expect("purge");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn redis_store_deletes_finished_orders_after_retention() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 4, Duration::from_secs(2))
        .unwrap()
        .with_retention(Duration::from_secs(1));
    let user = retention(&store).await;
    // The listing took out the entries of the orders that went, as the retention pass would.
    let index = |shard| keys::user_key(shard, &user);
    assert_eq!(members(redis.port, index), "4");
    assert_eq!(
        filed(redis.port, &user),
        4,
        "state index entries of gone orders"
    );
    // Without a listing, the retention pass alone takes a gone order's entry out.
    let lone = new_order(&user, "node-a", 30);
    create(&store, &lone).await;
    finish(&store, &lone).await;
    assert_eq!(members(redis.port, index), "5");
    wait_gone(&store, lone.order_id, Duration::from_secs(10)).await;
    pruned_to(&redis, &store, &user, 4).await;
    assert_eq!(
        filed(redis.port, &user),
        4,
        "state index entries of gone orders"
    );
    assert_eq!(members(redis.port, keys::finished_key), "0");
    // A finished order kept forever, as an older version left it: the index repair gives it
    // its retention.
    let old = new_order(&user, "node-a", 40);
    create(&store, &old).await;
    finish(&store, &old).await;
    let key = keys::order_key(old.order_id);
    assert_eq!(redis.cli(&["PERSIST", &key]).trim(), "1");
    redis.cli(&["DEL", &keys::finished_key(keys::shard_of(old.order_id))]);
    assert_eq!(redis.cli(&["PTTL", &key]).trim(), "-1");
    repair_all(&store).await;
    wait_gone(&store, old.order_id, Duration::from_secs(10)).await;
    pruned_to(&redis, &store, &user, 4).await;
}

/// How many times Redis ran `command` (`INFO commandstats`), scripts' calls included.
fn calls_of(redis: &RedisServer, command: &str) -> u64 {
    calls_in(&redis.cli(&["INFO", "commandstats"]), command)
}

/// How many times `command` ran by `stats`, one Redis's `INFO commandstats`.
fn calls_in(stats: &str, command: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

/// How many order hashes (`HMGET`s) listing `user`'s orders with `query` read, and the ids of
/// the page.
async fn hashes_read(
    redis: &RedisServer,
    store: &RedisStore,
    user: &str,
    query: ListQuery,
) -> (u64, Vec<OrderId>) {
    let before = calls_of(redis, "hmget");
    let page = store.list_for_user(user, &query).await.expect("list");
    let read = calls_of(redis, "hmget") - before;
    (
        read,
        page.orders.iter().map(|order| order.order_id).collect(),
    )
}

/// A listing filtered by rollback state or step reads a page's worth of order hashes, not the
/// user's history: three parked rollbacks among 3,000 completed orders cost three reads, two
/// once one is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_filtered_listing_reads_a_page_not_the_history() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 4, Duration::from_secs(2)).unwrap();
    repair_all(&store).await;
    let user = "long-history";
    let mut parked_ids = Vec::new();
    for offset in 0..3 {
        parked_ids.push(parked(&store, user, offset).await.order_id);
    }
    parked_ids.reverse();
    for wave in 0..30 {
        let orders = (0..100).map(|offset| {
            let store = &store;
            async move {
                let order = new_order(user, "node-a", 10 + wave * 100 + offset);
                create(store, &order).await;
                finish(store, &order).await
            }
        });
        join_all(orders).await;
    }
    let incomplete = ListQuery {
        limit: 50,
        rollback_state: Some(RollbackState::Incomplete),
        ..ListQuery::default()
    };
    let (read, listed) = hashes_read(&redis, &store, user, incomplete.clone()).await;
    assert_eq!(listed, parked_ids);
    assert!(read <= 3, "read {read} order hashes for 3 orders");
    let completed = ListQuery {
        limit: 10,
        current_step: Some(Step::Completed),
        ..ListQuery::default()
    };
    let (read, listed) = hashes_read(&redis, &store, user, completed).await;
    assert_eq!(listed.len(), 10);
    assert!(read <= 10, "read {read} order hashes for a page of 10");
    // A parked rollback retried leaves the index of parked ones in the same step.
    let retried = store
        .reopen(reopen(parked_ids[0], user, "node-a"))
        .await
        .expect("retry");
    assert!(matches!(retried, Reopened::Accepted(_)));
    let (read, listed) = hashes_read(&redis, &store, user, incomplete.clone()).await;
    assert_eq!(listed, parked_ids[1..]);
    assert!(read <= 2, "read {read} order hashes for 2 orders");
    // What the same listing costs by the user's history (as on a Redis whose state indexes are
    // not complete yet): every order of it.
    redis.cli(&["DEL", keys::STATE_INDEXED]);
    let (read, listed) = hashes_read(&redis, &store, user, incomplete).await;
    assert_eq!(listed, parked_ids[1..]);
    assert!(read >= 3_000, "read {read} order hashes");
}

/// A Redis written by an earlier version has no state indexes: filtered listings read the
/// user's history and are right; the leader's index repair files every order and marks the
/// indexes complete, and then filtered listings read them, still right.
#[tokio::test]
async fn redis_store_lists_by_state_orders_stored_before_the_state_index() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 4, Duration::from_secs(2)).unwrap();
    let user = "old-states";
    let mut running = Vec::new();
    let mut completed = Vec::new();
    let mut parked_ids = Vec::new();
    for offset in 0..30 {
        let order = new_order(user, "node-a", offset * 10);
        create(&store, &order).await;
        if offset % 3 == 1 {
            completed.push(finish(&store, &order).await.order_id);
        } else {
            running.push(order);
        }
    }
    for offset in 0..3 {
        parked_ids.push(parked(&store, user, 400 + offset).await.order_id);
    }
    // As an earlier version left it: no state index, no order names one, no mark.
    let wipe = "for _, key in ipairs(redis.call('KEYS', 'op:*:state:*')) do redis.call('DEL', key) end \
        for _, key in ipairs(redis.call('KEYS', 'op:*:order:*')) do redis.call('HDEL', key, 'filed') end \
        return redis.call('DEL', KEYS[1])";
    redis.cli(&["EVAL", wipe, "1", keys::STATE_INDEXED]);
    assert_eq!(redis.cli(&["KEYS", "op:*:state:*"]), "");
    // An order of then moves on a step before the repair comes by.
    let moved = succeed(&running[0]);
    store.commit(&moved).await.expect("commit");
    let running: Vec<OrderId> = running[1..]
        .iter()
        .rev()
        .map(|order| order.order_id)
        .collect();
    completed.reverse();
    parked_ids.reverse();
    let check = || async {
        let store = &store;
        assert_eq!(
            listed(store, user, Some(Step::Scheduling), None).await,
            running
        );
        assert_eq!(
            listed(store, user, Some(Step::PreProcessing), None).await,
            vec![moved.order_id]
        );
        assert_eq!(
            listed(store, user, Some(Step::Completed), None).await,
            completed
        );
        assert_eq!(
            listed(store, user, None, Some(RollbackState::Incomplete)).await,
            parked_ids
        );
        assert_eq!(
            listed(store, user, Some(Step::Failed), None).await,
            parked_ids
        );
    };
    check().await;
    repair_all(&store).await;
    assert_eq!(redis.cli(&["EXISTS", keys::STATE_INDEXED]), "1");
    let filed_in = |code: &str| {
        members(redis.port, |shard| keys::state_key(shard, code, user))
            .parse::<usize>()
            .unwrap_or(0)
    };
    assert_eq!(filed_in(keys::RUNNING), running.len() + 1);
    assert_eq!(filed_in("Completed"), completed.len());
    assert_eq!(filed_in("rollback-incomplete"), parked_ids.len());
    check().await;
}

/// How many entries the state index `code` of `user` holds in all shards.
fn filed_in(redis: &RedisServer, user: &str, code: &str) -> usize {
    members(redis.port, |shard| keys::state_key(shard, code, user))
        .parse::<usize>()
        .unwrap_or(0)
}

/// The four work steps share one state index: a transition from one to the next writes the
/// order and no index entry; listings filtered by a work step still list each order at its own.
#[tokio::test]
async fn redis_store_moves_orders_between_work_steps_without_writing_an_index() {
    let (redis, store) = plain_store();
    let user = "work-steps";
    let mut orders = Vec::new();
    for offset in 0..10 {
        let order = new_order(user, "node-a", offset * 10);
        create(&store, &order).await;
        orders.push(order);
    }
    let index_writes = || calls_of(&redis, "zadd") + calls_of(&redis, "zrem");
    let before = index_writes();
    for (n, order) in orders.iter_mut().enumerate() {
        // Order n goes n % 4 steps on: Scheduling, Pre-Processing, Processing, Post-Processing.
        for _ in 0..n % 4 {
            *order = succeed(order);
            store.commit(order).await.expect("commit");
        }
    }
    assert_eq!(index_writes() - before, 0, "index entries written");
    assert_eq!(filed_in(&redis, user, keys::RUNNING), orders.len());
    for step in Step::WORK {
        let at_step: Vec<OrderId> = orders
            .iter()
            .rev()
            .filter(|order| order.current_step == step)
            .map(|order| order.order_id)
            .collect();
        assert_eq!(listed(&store, user, Some(step), None).await, at_step);
    }
    // Finishing moves an order out of the running index, into `Completed`'s, and files it
    // in the finished index: three entries written, whatever step it finishes from.
    let before = index_writes();
    let done = finish(&store, &orders[0]).await;
    assert_eq!(index_writes() - before, 3, "index entries written");
    assert_eq!(filed_in(&redis, user, keys::RUNNING), orders.len() - 1);
    assert_eq!(
        listed(&store, user, Some(Step::Completed), None).await,
        vec![done.order_id]
    );
}

/// An earlier version filed an order at a work step under that step's own index: listings
/// filtered by the step find it there, its next transition moves it into the running index,
/// and the index repair moves those that stay where they are.
#[tokio::test]
async fn redis_store_lists_and_moves_orders_filed_under_a_work_step_by_an_earlier_version() {
    let (redis, store) = plain_store();
    repair_all(&store).await;
    let user = "step-filed";
    let mut orders = Vec::new();
    for offset in 0..3 {
        let mut order = new_order(user, "node-a", offset * 10);
        create(&store, &order).await;
        order = succeed(&order);
        store.commit(&order).await.expect("commit");
        orders.push(order);
    }
    // As the earlier version filed them: under `Pre-Processing`, named so in `filed`.
    let refile = "for i = 1, #KEYS, 3 do \
          local member = redis.call('ZRANGE', KEYS[i + 1], 0, 0)[1] \
          redis.call('ZREM', KEYS[i + 1], member) \
          redis.call('ZADD', KEYS[i + 2], 0, member) \
          redis.call('HSET', KEYS[i], 'filed', KEYS[i + 2]) \
        end return 1";
    let mut args = vec![
        "EVAL".to_string(),
        refile.to_string(),
        (orders.len() * 3).to_string(),
    ];
    for order in &orders {
        let shard = keys::shard_of(order.order_id);
        args.push(keys::order_key(order.order_id));
        args.push(keys::state_key(shard, keys::RUNNING, user));
        args.push(keys::state_key(shard, "Pre-Processing", user));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    redis.cli(&args);
    assert_eq!(filed_in(&redis, user, keys::RUNNING), 0);
    assert_eq!(filed_in(&redis, user, "Pre-Processing"), 3);
    let newest_first = |orders: &[Order]| -> Vec<OrderId> {
        orders.iter().rev().map(|order| order.order_id).collect()
    };
    assert_eq!(
        listed(&store, user, Some(Step::PreProcessing), None).await,
        newest_first(&orders)
    );
    // One moves on a step: out of the step's own index, into the running one.
    orders[0] = succeed(&orders[0]);
    store.commit(&orders[0]).await.expect("commit");
    assert_eq!(filed_in(&redis, user, "Pre-Processing"), 2);
    assert_eq!(filed_in(&redis, user, keys::RUNNING), 1);
    assert_eq!(
        listed(&store, user, Some(Step::Processing), None).await,
        vec![orders[0].order_id]
    );
    assert_eq!(
        listed(&store, user, Some(Step::PreProcessing), None).await,
        newest_first(&orders[1..])
    );
    // The repair files the others in the running index too.
    repair_all(&store).await;
    assert_eq!(filed_in(&redis, user, "Pre-Processing"), 0);
    assert_eq!(filed_in(&redis, user, keys::RUNNING), 3);
    assert_eq!(
        listed(&store, user, Some(Step::PreProcessing), None).await,
        newest_first(&orders[1..])
    );
}

/// A file written before orders were filed by finish time opens, and its finished orders are
/// filed by the one-time walk and deleted like any other; unfinished ones stay.
#[tokio::test]
async fn embedded_store_purges_orders_finished_before_retention_existed() {
    let dir = tempfile::tempdir().unwrap();
    let running = new_order("old", "node-a", 0);
    let mut finished = Vec::new();
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        create(&store, &running).await;
        for offset in 1..=30 {
            let order = new_order("old", "node-a", offset);
            create(&store, &order).await;
            finished.push(finish(&store, &order).await.order_id);
        }
    }
    // As an older version left it: none of the retention tables.
    let db = open_redb(dir.path()).await;
    let txn = db.begin_write().unwrap();
    for table in ["orders_finished", "order_idempotency_keys", "meta"] {
        assert!(txn
            .delete_table(redb::TableDefinition::<&str, ()>::new(table))
            .unwrap());
    }
    txn.commit().unwrap();
    drop(db);

    let store = EmbeddedStore::open_retaining(dir.path(), Duration::from_secs(1)).unwrap();
    for id in finished {
        wait_gone(&store, id, Duration::from_secs(15)).await;
    }
    assert!(store.get(running.order_id).await.unwrap().is_some());
    assert_eq!(store.stored_orders().unwrap(), 1);
}

/// A finished order whose record does not read when its retention is over is kept for an
/// operator and filed again to be looked at later, not left out of the purge for good.
#[tokio::test]
async fn an_unreadable_finished_order_stays_filed_for_the_purge() {
    let dir = tempfile::tempdir().unwrap();
    let order = new_order("unreadable", "node-a", 0);
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        create(&store, &order).await;
        finish(&store, &order).await;
    }
    let id = order.order_id.to_string();
    let finished = redb::TableDefinition::<(u64, &str), u64>::new("orders_finished");
    let filed = |db: &redb::Database| {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(finished).unwrap();
        let mut at = Vec::new();
        for entry in table.iter().unwrap() {
            let (key, _) = entry.unwrap();
            let (when, order) = key.value();
            if order == id {
                at.push(when);
            }
        }
        at
    };
    let db = open_redb(dir.path()).await;
    assert_eq!(filed(&db).len(), 1);
    // A zstd frame naming a dictionary this version does not have.
    let txn = db.begin_write().unwrap();
    txn.open_table(redb::TableDefinition::<&str, &[u8]>::new("orders"))
        .unwrap()
        .insert(id.as_str(), &[0x28, 0xb5, 0x2f, 0xfd, 0x23, 1, 2, 3, 4][..])
        .unwrap();
    txn.commit().unwrap();
    drop(db);

    // Past its retention of a second, purged (by this call or the purge thread) at least once.
    let store = EmbeddedStore::open_retaining(dir.path(), Duration::from_secs(1)).unwrap();
    let past = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < past {
        store.purge_expired(PURGE_BATCH).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        store.get(order.order_id).await,
        Err(StoreError::Corrupt(_))
    ));
    drop(store);
    let db = open_redb(dir.path()).await;
    let now = u64::try_from(Utc::now().timestamp_millis()).unwrap();
    let at = filed(&db);
    assert_eq!(at.len(), 1, "filed again once");
    assert!(at[0] > now, "looked at again later, not at once");
}

/// The store's redb file, opened directly once the store that had it open let it go.
async fn open_redb(dir: &std::path::Path) -> redb::Database {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match redb::Database::open(dir.join("orders.redb")) {
            Ok(db) => return db,
            Err(error) if std::time::Instant::now() > deadline => panic!("reopen: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A file written before orders were filed by state gets them filed by a walk in the
/// background; listings filtered by state are right before, during and after it.
#[tokio::test]
async fn embedded_store_files_orders_stored_before_the_state_index_existed() {
    let dir = tempfile::tempdir().unwrap();
    let user = "old-states";
    let mut running = Vec::new();
    let mut completed = Vec::new();
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        for offset in 0..40 {
            let order = new_order(user, "node-a", offset);
            create(&store, &order).await;
            if offset % 2 == 0 {
                running.push(order.order_id);
            } else {
                completed.push(finish(&store, &order).await.order_id);
            }
        }
    }
    // As an older version left it: no state index.
    let db = open_redb(dir.path()).await;
    let txn = db.begin_write().unwrap();
    for table in ["orders_by_user_state", "order_state"] {
        assert!(txn
            .delete_table(redb::TableDefinition::<&str, ()>::new(table))
            .unwrap());
    }
    txn.commit().unwrap();
    drop(db);

    running.reverse();
    completed.reverse();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let by_step = |step| {
        let store = &store;
        async move { listed(store, user, Some(step), None).await }
    };
    assert_eq!(by_step(Step::Scheduling).await, running);
    assert_eq!(by_step(Step::Completed).await, completed);
    // The walk runs on the purge thread's next pass: wait until the index holds every order.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while store.backfill_owed().unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "the state walk never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(by_step(Step::Scheduling).await, running);
    assert_eq!(by_step(Step::Completed).await, completed);
}

/// A file where an earlier version filed orders at a work step under that step's own code, not
/// the code the work steps share now: listings filtered by a work step find both, newest first
/// across them, and an order so filed moves to the shared code at its next transition.
#[tokio::test]
async fn embedded_store_lists_work_steps_filed_by_an_earlier_version() {
    use redb::{ReadableDatabase, ReadableTable};
    const BY_STATE: redb::TableDefinition<(&str, u8, u64, &str), ()> =
        redb::TableDefinition::new("orders_by_user_state");
    const STATE_OF: redb::TableDefinition<&str, (u8, u8)> =
        redb::TableDefinition::new("order_state");
    /// The code of `Scheduling` an earlier version filed under: its place in `Step::ALL`.
    const SCHEDULING: u8 = 0;
    let dir = tempfile::tempdir().unwrap();
    let user = "work-steps";
    let mut orders = Vec::new();
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        for offset in 0..7 {
            let order = new_order(user, "node-a", offset);
            create(&store, &order).await;
            orders.push(order);
        }
    }
    // The even ones filed as the earlier version did.
    let old: Vec<String> = orders
        .iter()
        .step_by(2)
        .map(|order| order.order_id.to_string())
        .collect();
    let db = open_redb(dir.path()).await;
    let txn = db.begin_write().unwrap();
    {
        let mut by_state = txn.open_table(BY_STATE).unwrap();
        let mut state_of = txn.open_table(STATE_OF).unwrap();
        let entries: Vec<(u8, u64, String)> = by_state
            .iter()
            .unwrap()
            .map(|entry| {
                let (key, _) = entry.unwrap();
                let (_, code, micros, id) = key.value();
                (code, micros, id.to_string())
            })
            .collect();
        assert_eq!(entries.len(), orders.len());
        for (code, micros, id) in entries {
            assert_ne!(code, SCHEDULING, "filed under the step's own code");
            if old.contains(&id) {
                by_state.remove((user, code, micros, id.as_str())).unwrap();
                by_state
                    .insert((user, SCHEDULING, micros, id.as_str()), ())
                    .unwrap();
                state_of.insert(id.as_str(), (SCHEDULING, u8::MAX)).unwrap();
            }
        }
    }
    txn.commit().unwrap();
    drop(db);

    let store = EmbeddedStore::open(dir.path()).unwrap();
    let newest_first: Vec<OrderId> = orders.iter().rev().map(|order| order.order_id).collect();
    assert_eq!(
        listed(&store, user, Some(Step::Scheduling), None).await,
        newest_first
    );
    assert!(listed(&store, user, Some(Step::Processing), None)
        .await
        .is_empty());
    // The newest order filed the old way moves on, and out of the step's own code.
    let moved = succeed(&orders[6]);
    store.commit(&moved).await.expect("commit");
    assert_eq!(
        listed(&store, user, Some(Step::Scheduling), None).await,
        newest_first[1..]
    );
    assert_eq!(
        listed(&store, user, Some(Step::PreProcessing), None).await,
        [moved.order_id]
    );
    drop(store);
    let db = open_redb(dir.path()).await;
    let txn = db.begin_read().unwrap();
    let by_state = txn.open_table(BY_STATE).unwrap();
    let filed_old: Vec<String> = by_state
        .iter()
        .unwrap()
        .filter_map(|entry| {
            let (key, _) = entry.unwrap();
            let (_, code, _, id) = key.value();
            (code == SCHEDULING).then(|| id.to_string())
        })
        .collect();
    assert_eq!(filed_old, old[..3]);
}

/// A redb file stays about the same size however many orders finish, once they are past
/// retention: the purge deletes them, in transactions of at most [`PURGE_BATCH`], and redb
/// reuses the pages they took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_purges_in_batches_and_stops_growing() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_retaining(dir.path(), Duration::from_secs(1)).unwrap();
    let file = dir.path().join("orders.redb");
    let mut sizes = Vec::new();
    for round in 0..10 {
        let orders: Vec<Order> = (0..2_500)
            .map(|offset| new_order("bulk", "node-a", offset))
            .collect();
        let created = orders.iter().enumerate().map(|(offset, order)| {
            let key = format!("r{round}-{offset}");
            let store = &store;
            async move { store.create(order, Some(&key)).await }
        });
        for outcome in join_all(created).await {
            assert!(matches!(outcome, Ok(Created::New)), "{outcome:?}");
        }
        // Finished in one commit each (the executor takes one per step).
        let finished = orders.iter().map(|order| {
            let mut order = order.clone();
            while !order.is_finished() {
                order = succeed(&order);
            }
            let store = &store;
            async move { store.commit(&order).await }
        });
        for outcome in join_all(finished).await {
            outcome.expect("commit");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store.stored_orders().unwrap() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} orders left",
                store.stored_orders().unwrap()
            );
            // A step does at most a batch, however many are due.
            assert!(store.purge_expired(PURGE_BATCH).await.unwrap() <= PURGE_BATCH);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Two more commits: redb frees the pages of a commit's deletes at a later commit.
        for _ in 0..2 {
            store.purge_expired(PURGE_BATCH).await.unwrap();
        }
        sizes.push(std::fs::metadata(&file).unwrap().len());
    }
    // The idempotency keys went with their orders.
    let again = new_order("bulk", "node-a", 0);
    assert!(matches!(
        store.create(&again, Some("r0-0")).await,
        Ok(Created::New)
    ));
    // redb reuses the pages the purge freed (once a later commit has released them, hence the
    // two more commits above) and gives back free space at its end: 0.8 to 3 MB after each
    // round here, idle or under load. Ten rounds kept, not purged, make a file of 71 MB (it
    // doubles from 8.9 MB after the first, to 36 MB after the third).
    let most = sizes.iter().max().copied().unwrap_or_default();
    assert!(most <= 8 << 20, "the file kept growing: {sizes:?}");
}

/// Redis's memory stays about flat while orders keep finishing, with a short retention and the
/// leader's retention pass running: hashes, idempotency keys and index entries all go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_memory_stays_flat_while_orders_keep_finishing() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 4, Duration::from_secs(2))
        .unwrap()
        .with_retention(Duration::from_secs(1));
    let used_memory = || {
        let info = redis.cli(&["INFO", "memory"]);
        info.lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .and_then(|value| value.trim().parse::<u64>().ok())
            .expect("used_memory")
    };
    // The keys stored, by a walk through them all: one that expired goes as the walk meets it,
    // however far behind Redis's own expiry cycle runs on a busy machine (`DBSIZE` counts it
    // until then, and `used_memory` with it).
    let dbsize = || {
        let keys = redis.cli(&["--scan"]);
        keys.lines().filter(|key| !key.is_empty()).count() as u64
    };
    let mut samples = Vec::new();
    let started = std::time::Instant::now();
    for wave in 0..16 {
        let mut finishing = Vec::new();
        for offset in 0..300 {
            let user = format!("flat-{}", offset % 7);
            let key = format!("w{wave}-{offset}");
            let store: &dyn OrderStore = &store;
            let order = keyed(store, &user, "node-a", offset, &key);
            finishing.push(async move {
                match store.create(&order, Some(&key)).await {
                    Ok(Created::New) => {}
                    other => panic!("{other:?}"),
                }
                finish(store, &order).await;
            });
        }
        join_all(finishing).await;
        store.purge_expired(PURGE_BATCH).await.expect("purge");
        samples.push((dbsize(), used_memory()));
        // Waves about a quarter of a retention apart.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(started.elapsed() > Duration::from_secs(4));
    // Keys come and go in waves: at most the few waves of the last retention period are stored
    // (two keys an order), not all sixteen; memory follows them.
    let most = |samples: &[(u64, u64)]| {
        samples.iter().fold((0, 0), |(keys, memory), sample| {
            (keys.max(sample.0), memory.max(sample.1))
        })
    };
    let (early_keys, early_memory) = most(&samples[..8]);
    let (late_keys, late_memory) = most(&samples[8..]);
    assert!(
        early_keys.max(late_keys) <= 5 * 600 && late_memory <= early_memory * 3 / 2,
        "redis kept growing (keys, used_memory per wave): {samples:?}"
    );
    // With the orders stopped, everything of theirs goes.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        store.purge_expired(PURGE_BATCH).await.expect("purge");
        let (keys, finished) = (dbsize(), members(redis.port, keys::finished_key));
        if keys == 0 && finished == "0" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{keys} keys left ({}), {finished} finished entries",
            redis.cli(&["KEYS", "*"])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn redis_store_takes_out_owned_entries_left_behind() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 2, Duration::from_secs(2)).unwrap();
    let mut order = new_order("tidy", "node-t", 0);
    create(&store, &order).await;
    for _ in 0..4 {
        order = succeed(&order);
        store.commit(&order).await.expect("commit");
    }
    assert!(order.is_finished());
    // An entry put back by a sweep that read the order before it finished.
    let id = order.order_id.to_string();
    let owned = keys::owned_key(keys::shard_of(order.order_id), "node-t");
    let stale = redis.cli(&["SADD", &owned, &id]);
    assert_eq!(stale.trim(), "1");
    assert!(owns(&store, "node-t", order.order_id).await);
    assert!(store.disown("node-t", order.order_id).await.unwrap());
    assert!(!owns(&store, "node-t", order.order_id).await);
    // The index repair decides on the order as it is: finished, so out of the set.
    redis.cli(&["SADD", &owned, &id]);
    repair_all(&store).await;
    assert!(!owns(&store, "node-t", order.order_id).await);
}

/// A parked order is re-opened at a new revision; one whose record has no revision field (no
/// commit here ever wrote one) is re-opened all the same, judged by owner and epoch.
#[tokio::test]
async fn redis_store_reopens_a_parked_order_at_a_new_revision_with_or_without_its_field() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 2, Duration::from_secs(2)).unwrap();
    for without_field in [false, true] {
        let user = format!("reopened-{without_field}");
        let order = parked(&store, &user, 0).await;
        let key = keys::order_key(order.order_id);
        if without_field {
            redis.cli(&["HDEL", &key, "rev"]);
        }
        let outcome = store
            .reopen(reopen(order.order_id, &user, "node-a"))
            .await
            .expect("retry");
        let Reopened::Accepted(reopened) = outcome else {
            panic!("not re-opened: {outcome:?}");
        };
        assert_eq!(reopened.revision, order.revision + 1);
        assert_eq!(
            redis.cli(&["HGET", &key, "rev"]).trim(),
            reopened.revision.to_string()
        );
        assert_eq!(store.get(order.order_id).await.unwrap(), Some(reopened));
    }
}

/// A keyed order's id is picked in its key's shard, also through the store the node uses (timed
/// for `/metrics`), so that its create is not moved there afterwards.
#[tokio::test]
async fn redis_store_picks_a_keyed_orders_id_in_its_keys_shard_through_the_metered_store() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 2, Duration::from_secs(2)).unwrap();
    let metered = MeteredStore::new(Arc::new(store), Arc::new(Metrics::new()));
    for n in 0..32 {
        let key = format!("key-{n}");
        let id = metered.new_order_id("keyed", Some(&key));
        assert_eq!(
            keys::shard_of(id),
            keys::shard_of_key("keyed", &key),
            "{key}"
        );
    }
}

/// A reassignment that finds an order of its node's owned set owned by a third node (an entry
/// left behind) makes sure that node's set lists it, and still moves the rest: the script that
/// does it is loaded like every other (a Redis that never ran it answered `NOSCRIPT`).
#[tokio::test]
async fn redis_store_reassign_enlists_an_order_a_third_node_owns() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 2, Duration::from_secs(2)).unwrap();
    let theirs = new_order("third", "node-c", 0);
    let mine = new_order("third", "node-a", 1);
    create(&store, &theirs).await;
    create(&store, &mine).await;
    let shard = keys::shard_of(theirs.order_id);
    let id = theirs.order_id.to_string();
    // Left behind in node-a's set, and missing from node-c's.
    redis.cli(&["SADD", &keys::owned_key(shard, "node-a"), &id]);
    redis.cli(&["SREM", &keys::owned_key(shard, "node-c"), &id]);
    assert!(!owns(&store, "node-c", theirs.order_id).await);
    let moved = store.reassign("node-a", "node-b").await.expect("reassign");
    assert_eq!(moved, [mine.order_id]);
    assert!(owns(&store, "node-c", theirs.order_id).await);
    assert!(!owns(&store, "node-a", theirs.order_id).await);
    assert!(!owns(&store, "node-b", theirs.order_id).await);
    assert!(owns(&store, "node-b", mine.order_id).await);
}

/// A move from one work step to the next is sent without the owned set or the order's index
/// entry; where more is to be done than write the order, Redis asks for the whole commit,
/// which does it: an order now another node's, or gone, leaves the committer's owned set.
#[tokio::test]
async fn redis_store_commit_to_a_work_step_takes_out_an_order_that_is_not_the_committers() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 2, Duration::from_secs(2)).unwrap();
    let moved = new_order("moved", "node-a", 0);
    let gone = new_order("moved", "node-a", 1);
    create(&store, &moved).await;
    create(&store, &gone).await;
    assert_eq!(store.reassign("node-a", "node-b").await.unwrap().len(), 2);
    // Entries left behind in node-a's owned set, as a sweep that read the orders before the
    // reassignment would put back; and one order gone since.
    for order in [&moved, &gone] {
        let owned = keys::owned_key(keys::shard_of(order.order_id), "node-a");
        redis.cli(&["SADD", &owned, &order.order_id.to_string()]);
        assert!(owns(&store, "node-a", order.order_id).await);
    }
    redis.cli(&["DEL", &keys::order_key(gone.order_id)]);
    assert_eq!(succeed(&moved).current_step, Step::PreProcessing);
    assert!(matches!(
        store.commit(&succeed(&moved)).await,
        Err(StoreError::NotOwner)
    ));
    assert!(matches!(
        store.commit(&succeed(&gone)).await,
        Err(StoreError::NotFound)
    ));
    assert!(!owns(&store, "node-a", moved.order_id).await);
    assert!(!owns(&store, "node-a", gone.order_id).await);
    assert!(owns(&store, "node-b", moved.order_id).await);
}

/// An order filed under another index than the work steps' (as an earlier version could leave
/// one) is filed under theirs by its next move to a work step.
#[tokio::test]
async fn redis_store_commit_to_a_work_step_files_an_order_filed_under_another_index() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 2, Duration::from_secs(2)).unwrap();
    let order = new_order("refiled", "node-r", 0);
    create(&store, &order).await;
    let shard = keys::shard_of(order.order_id);
    let running = keys::state_key(shard, keys::RUNNING, &order.user);
    let elsewhere = keys::state_key(shard, Step::Scheduling.as_str(), &order.user);
    let key = keys::order_key(order.order_id);
    let member = redis
        .cli(&["ZRANGE", &running, "0", "-1"])
        .trim()
        .to_string();
    assert!(
        member.contains(&order.order_id.simple().to_string()),
        "{member}"
    );
    redis.cli(&["ZREM", &running, &member]);
    redis.cli(&["ZADD", &elsewhere, "0", &member]);
    redis.cli(&["HSET", &key, "filed", &elsewhere]);
    let next = succeed(&order);
    store.commit(&next).await.expect("commit");
    assert_eq!(redis.cli(&["HGET", &key, "filed"]).trim(), running);
    assert_eq!(redis.cli(&["ZRANGE", &running, "0", "-1"]).trim(), member);
    assert_eq!(redis.cli(&["ZCARD", &elsewhere]).trim(), "0");
    assert_eq!(store.get(order.order_id).await.unwrap(), Some(next));
}

#[tokio::test]
async fn redis_store_fails_fast_when_redis_is_down_and_recovers() {
    let mut redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 4, Duration::from_secs(1)).unwrap();
    let order = new_order("alice", "node-a", 0);
    create(&store, &order).await;
    redis.kill();
    let started = std::time::Instant::now();
    assert!(matches!(
        store.get(order.order_id).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(5), "store hung");
    redis.restart();
    // Scripts are gone after a restart; the commit loads them again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store.commit(&succeed(&order)).await {
            Ok(()) => break,
            Err(error) if std::time::Instant::now() > deadline => panic!("commit: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Sends one command to Redis as RESP over a plain socket and reads the first line of the answer.
fn raw_command(port: u16, args: &[&str]) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    let mut command = format!("*{}\r\n", args.len());
    for arg in args {
        command.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(command.as_bytes()).expect("send to redis");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("answer from redis");
    line
}

/// Regression (found while writing the chaos campaign's duplicate check): a request that reserved
/// its idempotency key and then stalled before storing its order (a paused node), and the
/// client's retry of it on another node, each stored an order: the retry took the key over with a
/// new id, and the stalled request stored its own id when it woke. Now the retry stores its order
/// under the reserved id, and whichever write comes second finds it taken.
#[tokio::test]
async fn redis_store_keeps_one_order_per_idempotency_key_when_the_first_request_stalls() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 2, Duration::from_secs(2)).unwrap();
    let user = format!("user-{}", uuid::Uuid::new_v4().simple());
    // The first request, on node-a, reserved the key for its order and stalls before writing it.
    let stalled = keyed(&store, &user, "node-a", 0, "cart-7");
    let reserved = stalled.order_id.to_string();
    let key = keys::idem_key(&user, "cart-7");
    let answer = raw_command(redis.port, &["SET", &key, &reserved, "EX", "600"]);
    assert!(answer.starts_with("+OK"), "{answer}");
    // The client's retry reaches node-b: it stores the order under the reserved id.
    let retry = new_order(&user, "node-b", 5);
    let stored = match store.create(&retry, Some("cart-7")).await.unwrap() {
        Created::Adopted(order) => *order,
        other => panic!("the retry did not take the reserved id: {other:?}"),
    };
    assert_eq!(stored.order_id, stalled.order_id);
    assert_eq!(stored.owner, "node-b");
    assert_eq!(store.get(retry.order_id).await.unwrap(), None);
    // The stalled request wakes and writes its order: the id is taken, nothing is stored twice.
    match store.create(&stalled, None).await.unwrap() {
        Created::Existing(existing) => assert_eq!(existing.owner, "node-b"),
        other => panic!("the stalled request stored a second order: {other:?}"),
    }
    let listed = store
        .list_for_user(
            &user,
            &ListQuery {
                limit: 50,
                ..ListQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(listed.orders.len(), 1, "{:?}", listed.orders);
    assert!(!store
        .owned_unfinished("node-a")
        .await
        .unwrap()
        .contains(&stalled.order_id));
    assert!(store
        .owned_unfinished("node-b")
        .await
        .unwrap()
        .contains(&stalled.order_id));
    // A later repeat of the key gets that one order.
    match store
        .create(&new_order(&user, "node-a", 9), Some("cart-7"))
        .await
        .unwrap()
    {
        Created::Existing(existing) => assert_eq!(existing.order_id, stalled.order_id),
        other => panic!("{other:?}"),
    }
}

/// An idempotency key as an earlier version spelled it for a user whose name holds a `:`
/// (`…:idem:{user}:{key}`), which is also how this version spells another user's key: that user
/// gets an order of its own, never the first user's.
#[tokio::test]
async fn redis_store_never_answers_a_key_with_another_users_order() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), 2, Duration::from_secs(2)).unwrap();
    let user = format!("user-{}", uuid::Uuid::new_v4().simple());
    let (key, colon_user) = keys_spelled_alike(&user);
    let theirs = keyed(&store, &colon_user, "node-a", 0, "k");
    create(&store, &theirs).await;
    let old_key = keys::idem_key(&user, &key);
    let answer = raw_command(
        redis.port,
        &["SET", &old_key, &theirs.order_id.to_string(), "EX", "600"],
    );
    assert!(answer.starts_with("+OK"), "{answer}");
    let mine = keyed(&store, &user, "node-a", 5, &key);
    match store.create(&mine, Some(&key)).await.unwrap() {
        Created::New => {}
        other => panic!("{user} with key {key} got no order of its own: {other:?}"),
    }
    match store
        .create(&new_order(&user, "node-a", 9), Some(&key))
        .await
        .unwrap()
    {
        Created::Existing(existing) => assert_eq!(existing.order_id, mine.order_id),
        other => panic!("a repeat of {user}'s key {key}: {other:?}"),
    }
    assert_eq!(
        store
            .get(theirs.order_id)
            .await
            .unwrap()
            .map(|order| order.user),
        Some(colon_user)
    );
}

/// Regression: the first create after Redis forgot its scripts (a restart, a `SCRIPT FLUSH`) was
/// a pipeline whose index entries (owned set, user index) ran while its create script was refused
/// with `NOSCRIPT`; when the connection was lost before the pipeline went out again, the indexes
/// named an order that was never stored. The create and its index entries are one script now:
/// all of it or nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_create_cut_off_after_noscript_leaves_no_index_entry() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    let store = RedisStore::connect(&proxy.url(), 1, Duration::from_secs(2)).unwrap();
    let user = format!("user-{}", uuid::Uuid::new_v4().simple());
    create(&store, &new_order(&user, "node-a", 0)).await;
    let answer = raw_command(redis.port, &["SCRIPT", "FLUSH"]);
    assert!(answer.starts_with("+OK"), "{answer}");
    proxy.cut_before_reply("NOSCRIPT");
    let order = new_order(&user, "node-a", 5);
    assert!(matches!(
        store.create(&order, None).await,
        Err(StoreError::Unavailable(_))
    ));
    assert_eq!(proxy.faults_made(), 1, "the connection was not cut");
    let id = order.order_id.to_string();
    let user_index = |shard| keys::user_key(shard, &user);
    let owned_set = keys::owned_key(keys::shard_of(order.order_id), "node-a");
    let owned = |port| raw_command(port, &["SISMEMBER", &owned_set, &id]);
    assert_eq!(
        raw_command(redis.port, &["EXISTS", &keys::order_key(order.order_id)]),
        ":0\r\n"
    );
    assert_eq!(
        owned(redis.port),
        ":0\r\n",
        "owned set names a missing order"
    );
    assert_eq!(
        members(redis.port, user_index),
        "1",
        "user index names a missing order"
    );
    // The client's retry stores it once, with its index entries.
    create(&store, &order).await;
    assert_eq!(owned(redis.port), ":1\r\n");
    assert_eq!(members(redis.port, user_index), "2");
}
