//! An [`OrderStore`] wrapper that times every operation and counts its failures and the commits
//! refused by the owner check (fencing), for `/metrics`. It adds two relaxed atomic adds and a
//! clock read per call.

use super::{
    AsidePage, CancelOutcome, Created, ListQuery, OrderStore, OwnedPage, Page, Reopen, Reopened,
    Reopening, RepairPage, SetAside, StoreError, TakenBack,
};
use crate::metrics::{Metrics, StoreOperation};
use crate::order::{Order, OrderId};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Instant;

pub struct MeteredStore {
    inner: Arc<dyn OrderStore>,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn OrderStore>, metrics: Arc<Metrics>) -> MeteredStore {
        MeteredStore { inner, metrics }
    }

    fn observe<T>(
        &self,
        operation: StoreOperation,
        started: Instant,
        result: &Result<T, StoreError>,
    ) {
        self.metrics
            .store_observed(operation, started.elapsed(), failed(result));
    }
}

/// Whether `result` is a failure of the store. Not found, not owner and a pending cancellation
/// are answers, not store failures.
fn failed<T>(result: &Result<T, StoreError>) -> bool {
    matches!(
        result,
        Err(StoreError::Unavailable(_)) | Err(StoreError::Corrupt(_))
    )
}

#[async_trait]
impl OrderStore for MeteredStore {
    fn new_order_id(&self, user: &str, key: Option<&str>) -> OrderId {
        self.inner.new_order_id(user, key)
    }

    async fn create(&self, order: &Order, key: Option<&str>) -> Result<Created, StoreError> {
        let started = Instant::now();
        let result = self.inner.create(order, key).await;
        self.observe(StoreOperation::Create, started, &result);
        result
    }

    async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        let started = Instant::now();
        let result = self.inner.get(id).await;
        self.observe(StoreOperation::Get, started, &result);
        result
    }

    async fn confirm(&self, order: &Order) -> Result<bool, StoreError> {
        self.inner.confirm(order).await
    }

    async fn get_many(&self, ids: &[OrderId]) -> Vec<Result<Option<Order>, StoreError>> {
        // One call, timed once: its time is the batch's, and it failed if any read did.
        let started = Instant::now();
        let results = self.inner.get_many(ids).await;
        self.metrics.store_observed(
            StoreOperation::Get,
            started.elapsed(),
            results.iter().any(failed),
        );
        results
    }

    async fn list_for_user(&self, user: &str, query: &ListQuery) -> Result<Page, StoreError> {
        let started = Instant::now();
        let result = self.inner.list_for_user(user, query).await;
        self.observe(StoreOperation::List, started, &result);
        result
    }

    async fn commit(&self, order: &Order) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.inner.commit(order).await;
        self.observe(StoreOperation::Commit, started, &result);
        if matches!(result, Err(StoreError::NotOwner)) {
            self.metrics.fencing_rejected();
        }
        result
    }

    async fn reopen(&self, reopen: Reopen<'_>) -> Result<Reopened, StoreError> {
        let started = Instant::now();
        let operation = match reopen.what {
            Reopening::RollbackRetry => StoreOperation::RetryRollback,
            Reopening::Redelivery => StoreOperation::Redeliver,
        };
        let result = self.inner.reopen(reopen).await;
        self.observe(operation, started, &result);
        result
    }

    async fn request_cancel(&self, id: OrderId, user: &str) -> Result<CancelOutcome, StoreError> {
        let started = Instant::now();
        let result = self.inner.request_cancel(id, user).await;
        self.observe(StoreOperation::Cancel, started, &result);
        result
    }

    async fn owned_unfinished(&self, node: &str) -> Result<Vec<OrderId>, StoreError> {
        let started = Instant::now();
        let result = self.inner.owned_unfinished(node).await;
        self.observe(StoreOperation::OwnedUnfinished, started, &result);
        result
    }

    async fn owned_page(&self, node: &str, at: &str, n: usize) -> Result<OwnedPage, StoreError> {
        let started = Instant::now();
        let result = self.inner.owned_page(node, at, n).await;
        self.observe(StoreOperation::OwnedUnfinished, started, &result);
        result
    }

    async fn still_owned(&self, node: &str, ids: &[OrderId]) -> Result<Vec<OrderId>, StoreError> {
        let started = Instant::now();
        let result = self.inner.still_owned(node, ids).await;
        self.observe(StoreOperation::OwnedUnfinished, started, &result);
        result
    }

    async fn parked_page(&self, at: &str, n: usize) -> Result<OwnedPage, StoreError> {
        // An operator's look, never on an order's path: not timed.
        self.inner.parked_page(at, n).await
    }

    async fn reassign(&self, from: &str, to: &str) -> Result<Vec<OrderId>, StoreError> {
        let started = Instant::now();
        let result = self.inner.reassign(from, to).await;
        self.observe(StoreOperation::Reassign, started, &result);
        result
    }

    async fn disown(&self, node: &str, id: OrderId) -> Result<bool, StoreError> {
        // Rare, and never on a request path: not timed.
        self.inner.disown(node, id).await
    }

    async fn set_aside(&self, aside: &SetAside) -> Result<(), StoreError> {
        // Rare, and never on a request path: counted, not timed.
        let result = self.inner.set_aside(aside).await;
        if result.is_ok() {
            self.metrics.order_set_aside();
        }
        result
    }

    async fn set_aside_page(&self, at: &str, n: usize) -> Result<AsidePage, StoreError> {
        self.inner.set_aside_page(at, n).await
    }

    async fn take_back(&self, id: OrderId, to: &str) -> Result<TakenBack, StoreError> {
        // Rare, and never on a request path: counted, not timed.
        let result = self.inner.take_back(id, to).await;
        if matches!(result, Ok(TakenBack::Taken)) {
            self.metrics.order_taken_back();
        }
        result
    }

    async fn repair_indexes(&self, at: &str, n: usize) -> Result<RepairPage, StoreError> {
        // A once-a-term sweep, not a request path: no metric of its own.
        self.inner.repair_indexes(at, n).await
    }

    async fn purge_expired(&self, n: usize) -> Result<usize, StoreError> {
        // Background housekeeping, not a request path: no metric of its own.
        self.inner.purge_expired(n).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.inner.ping().await;
        self.observe(StoreOperation::Ping, started, &result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    /// The count of `operation="get"` observations in `metrics`' text.
    fn gets(metrics: &Metrics) -> String {
        let text = metrics.render().unwrap_or_default();
        text.lines()
            .find(|line| {
                line.contains("store_operation_duration_seconds_count")
                    && line.contains("operation=\"get\"")
            })
            .and_then(|line| line.split_whitespace().last())
            .unwrap_or_default()
            .to_string()
    }

    #[tokio::test]
    async fn a_batch_of_reads_is_one_store_call() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let store = MeteredStore::new(
            Arc::new(EmbeddedStore::open(dir.path()).unwrap()),
            Arc::clone(&metrics),
        );
        let ids: Vec<OrderId> = (0..5).map(|_| OrderId::now_v7()).collect();
        let read = store.get_many(&ids).await;
        assert_eq!(read.len(), 5);
        assert_eq!(gets(&metrics), "1");
        store.get(ids[0]).await.unwrap();
        assert_eq!(gets(&metrics), "2");
    }
}
