//! The embedded store: one redb file in the data dir, for a node running alone.
//!
//! Writes go through one writer thread that gathers whatever requests are waiting into a single
//! write transaction (group commit): one fsync makes a whole batch durable, and each caller hears
//! back only after that fsync. Reads use redb's MVCC snapshots directly and never wait for the
//! writer.
//!
//! Retention: the transaction that finishes an order also files it by when it finished, and a
//! purge thread has the writer delete, [`PURGE_BATCH`] per transaction, the finished orders
//! older than the retention, with their index entries and idempotency keys.

use super::doc;
use super::{
    cancel_outcome, check_commit, corrupt, created_micros, decode_cursor, encode_cursor, is_parked,
    reopen_outcome, same_order, AsidePage, CancelOutcome, Checked, Created, Fence, ListQuery,
    OrderStore, OwnedPage, Page, Reopen, Reopened, RepairPage, Repaired, SetAside, StoreError,
    TakenBack, DEFAULT_RETENTION, IDEMPOTENCY_TTL, PURGE_BATCH,
};
use crate::order::{IdMap, Order, OrderId, RollbackState, Step};
use async_trait::async_trait;
use chrono::Utc;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// order id → the order's JSON, or that JSON compressed (see `doc`).
const ORDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("orders");
/// (user, created µs, order id) → (): a user's orders in creation order.
const BY_USER: TableDefinition<(&str, u64, &str), ()> = TableDefinition::new("orders_by_user");
/// (node, order id) → (): unfinished orders by owner.
const OWNED: TableDefinition<(&str, &str), ()> = TableDefinition::new("owned_unfinished");
/// (user, key) → (order id, expiry as unix seconds).
const IDEMPOTENCY: TableDefinition<(&str, &str), (&str, i64)> =
    TableDefinition::new("idempotency_keys");

/// order id → [`SetAside`] JSON: orders whose record cannot be read.
const ASIDE: TableDefinition<&str, &[u8]> = TableDefinition::new("set_aside");

/// (finished at, unix ms; order id) → the order's revision then: finished orders by when they
/// finished, for the purge. An entry whose order has another revision now (re-opened since) is
/// dropped without deleting the order.
const FINISHED: TableDefinition<(u64, &str), u64> = TableDefinition::new("orders_finished");
/// order id → the idempotency key it was created with, so the purge deletes that key too.
const ORDER_KEYS: TableDefinition<&str, &str> = TableDefinition::new("order_idempotency_keys");
/// Bookkeeping: [`BACKFILL`] while the walk that files orders finished before [`FINISHED`]
/// existed is owed, holding the id it goes on after.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Order id → (): the orders whose rollback is parked, kept in the transaction that parks,
/// re-opens or deletes one.
const PARKED: TableDefinition<&str, ()> = TableDefinition::new("parked_rollbacks");
/// A user's orders by state (a step's, the work steps' shared one, or a rollback state's code:
/// see `state_codes`), newest last: what listings filtered by step or rollback state read
/// instead of the user's history.
const BY_STATE: TableDefinition<(&str, u8, u64, &str), ()> =
    TableDefinition::new("orders_by_user_state");
/// Order id → the state codes it is filed under in `BY_STATE`.
const STATE_OF: TableDefinition<&str, (u8, u8)> = TableDefinition::new("order_state");
/// Order id → its payload's doc, for the orders created with `database.payload_apart`: their
/// doc in `ORDERS` leaves the payload out.
const PAYLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("order_payloads");
const BACKFILL: &str = "finished_backfill";
/// Meta key of a walk that files orders stored before `BY_STATE` existed; listings filtered by
/// state scan the user's history until it is over.
const STATE_BACKFILL: &str = "state_backfill";
/// Orders read by a walk: their ids, and what each decoded to.
type Walked = Vec<(String, Result<Order, StoreError>)>;

/// The order stored under `id` with doc `doc`, its payload read from `payloads` where it is
/// kept apart.
fn read_order(
    payloads: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
    doc: &[u8],
) -> Result<Order, StoreError> {
    let payload = payloads.get(id).map_err(unavailable)?;
    doc::read(doc, payload.as_ref().map(|payload| payload.value()))
}

/// Whether a walk that files orders stored by an older version in a newer index is owed.
fn walk_owed(txn: &redb::ReadTransaction) -> Result<bool, StoreError> {
    let meta = txn.open_table(META).map_err(unavailable)?;
    Ok(meta.get(BACKFILL).map_err(unavailable)?.is_some()
        || meta.get(STATE_BACKFILL).map_err(unavailable)?.is_some())
}

/// The state code of "no rollback state".
const NO_ROLLBACK: u8 = u8::MAX;

/// The state code the four work steps share, so that an order moving from one to the next
/// does not move in `BY_STATE`. An earlier version filed them under each step's own code: an
/// order so filed moves at its next transition, and listings read both.
const RUNNING: u8 = 18;

/// The codes an order is filed under in `BY_STATE`: its current step's ([`RUNNING`] at a work
/// step), and its rollback state's (or `NO_ROLLBACK`).
fn state_codes(order: &Order) -> (u8, u8) {
    let step = if Step::WORK.contains(&order.current_step) {
        RUNNING
    } else {
        step_code(order.current_step)
    };
    (step, rollback_code(order.rollback_state))
}

/// The `BY_STATE` codes a listing filtered by `query` reads (then filtering what it reads by
/// `query`), or `None` for an unfiltered one. A rollback state is set only on failed orders,
/// which never change step again; a work step's orders are in [`RUNNING`], or in the step's
/// own code where an earlier version filed them.
fn listing_codes(query: &ListQuery) -> Option<Vec<u8>> {
    match (query.rollback_state, query.current_step) {
        (Some(state), _) => Some(vec![rollback_code(Some(state))]),
        (None, Some(step)) if Step::WORK.contains(&step) => Some(vec![RUNNING, step_code(step)]),
        (None, Some(step)) => Some(vec![step_code(step)]),
        (None, None) => None,
    }
}

/// A listing's entries: (created µs, order id), newest first.
type Listed<'a> = Box<dyn Iterator<Item = Result<(u64, String), StoreError>> + 'a>;

/// `ranges`, each newest first, merged newest first (an error first of all).
fn newest_first(ranges: Vec<Listed<'_>>) -> Listed<'_> {
    let mut ranges: Vec<_> = ranges.into_iter().map(Iterator::peekable).collect();
    Box::new(std::iter::from_fn(move || {
        let newest = ranges
            .iter_mut()
            .enumerate()
            .filter_map(|(index, range)| Some((index, range.peek()?)))
            .max_by(|(_, a), (_, b)| match (a, b) {
                (Ok(a), Ok(b)) => a.cmp(b),
                (Err(_), _) => std::cmp::Ordering::Greater,
                (_, Err(_)) => std::cmp::Ordering::Less,
            })
            .map(|(index, _)| index)?;
        ranges.get_mut(newest)?.next()
    }))
}

fn step_code(step: Step) -> u8 {
    Step::ALL
        .iter()
        .position(|each| *each == step)
        .and_then(|index| u8::try_from(index).ok())
        .unwrap_or(NO_ROLLBACK)
}

fn rollback_code(state: Option<RollbackState>) -> u8 {
    match state {
        None => NO_ROLLBACK,
        Some(RollbackState::Complete) => 16,
        Some(RollbackState::Incomplete) => 17,
    }
}

/// How long the purge leaves a finished order whose record does not read before it looks at
/// it again, in ms.
const UNREADABLE_AGAIN_MS: u64 = 3_600_000;

/// How often the purge thread looks for finished orders past their retention.
const PURGE_EVERY: Duration = Duration::from_secs(1);

/// The page cache. Orders in flight sit in a few recent pages (ids are time-ordered), so a
/// modest cache serves them; it bounds memory however many orders the file holds.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

/// The most requests one write transaction takes.
const MAX_BATCH: usize = 512;

/// A write for the writer thread. Given the batch's open tables (or why they could not be
/// opened), it applies itself and returns its [`Answer`]; the closure holds the caller's reply
/// channel, typed for what the caller waits for, so every caller hears its own outcome.
type WriteRequest = Box<dyn FnOnce(Result<&mut Tables<'_, '_>, &str>) -> Answer + Send>;

/// Tells a caller its outcome once the batch's transaction committed, or why it did not.
type Answer = Box<dyn FnOnce(Result<(), &str>) + Send>;

/// How often at most the heartbeat probes the writer with a write of its own (each one an fsync).
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How long a heartbeat's probe may stay out before the store is called stalled: as long as
/// the heartbeat that sent it waits for it, so that every heartbeat then says the same.
const PROBE_STALLED: Duration = Duration::from_secs(2);

/// How the writer's last write transaction went (a batch, or a heartbeat's probe).
struct WriteHealth {
    /// Why it failed; `None` when it committed.
    failure: Option<String>,
    /// When it ended, or when a probe was last sent.
    at: Instant,
    /// When the probe sent since it ended was sent, if one was: no write ended since.
    probed: Option<Instant>,
}

/// The open file, shared by the store's readers, its writer thread and its purge thread. Empty
/// while the writer reopens it: after a write failed on the disk (full, or failing), redb fails
/// every later read and write of that handle, and the file can be opened again only once no one
/// holds the old one.
#[derive(Clone)]
struct OpenFile {
    db: Arc<RwLock<Option<Arc<Database>>>>,
    /// Set for good by [`EmbeddedStore::close`]: the node is stopping.
    closed: Arc<AtomicBool>,
}

impl OpenFile {
    fn new(db: Arc<Database>) -> OpenFile {
        OpenFile {
            db: Arc::new(RwLock::new(Some(db))),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The database as open now; unavailable while it is reopened, or once closed.
    fn get(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| StoreError::Unavailable(self.why_not_open().into()))
    }

    /// Why there is no database to hand out.
    fn why_not_open(&self) -> &'static str {
        match self.is_closed() {
            true => CLOSED,
            false => REOPENING,
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Takes the database out (readers get unavailable meanwhile); a handle that tells when the
    /// last holder let go of it.
    fn take(&self) -> Option<std::sync::Weak<Database>> {
        self.take_open().map(|db| Arc::downgrade(&db))
    }

    /// Takes the database out, for good unless someone puts one back.
    fn take_open(&self) -> Option<Arc<Database>> {
        self.db
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn put(&self, db: Database) {
        *self.db.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(db));
    }
}

pub struct EmbeddedStore {
    db: OpenFile,
    writer_tx: mpsc::Sender<WriteRequest>,
    /// Why a lock: the writer thread records each transaction's outcome, heartbeats read it.
    health: Arc<Mutex<WriteHealth>>,
    retention: Duration,
    /// Whether orders are written compressed (`database.compress_orders`).
    compress: bool,
    /// Whether orders are created with their payload apart (`database.payload_apart`).
    payload_apart: bool,
    /// The data dir, where a backup is written before it is sent.
    dir: PathBuf,
    /// One backup at a time: each takes as much room in the data dir as the orders, until it
    /// is sent.
    backups: Arc<tokio::sync::Semaphore>,
}

/// A copy of the store's file made by [`EmbeddedStore::backup`]: open for reading, and already
/// gone from the data dir, so it takes no room once dropped.
pub struct Backup {
    pub file: std::fs::File,
    pub bytes: u64,
    /// The orders it holds.
    pub orders: u64,
    /// Held until the copy is dropped: no other backup is made meanwhile.
    pub turn: tokio::sync::OwnedSemaphorePermit,
}

/// Why [`EmbeddedStore::backup`] made no copy.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("another backup is being made or sent")]
    Busy,
    /// The copy could leave the store too little room for its own writes.
    #[error("a backup needs {needed} bytes free in the data dir ({BACKUP_HEADROOM} of them left to the store), and {free} are")]
    NoRoom { needed: u64, free: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The room a backup leaves free in the data dir for the store's own writes, besides its copy.
pub const BACKUP_HEADROOM: u64 = 64 << 20;

impl EmbeddedStore {
    /// [`EmbeddedStore::open_retaining`] with the default retention.
    pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        EmbeddedStore::open_retaining(dir, DEFAULT_RETENTION)
    }

    /// Opens (or creates) `orders.redb` in `dir` and starts the writer thread and the purge
    /// thread, which end once the store is dropped. Finished orders are deleted `retention` after
    /// they finished. A file written before orders were filed by finish time gets its finished
    /// orders filed by a bounded walk, once: they are deleted one retention after they completed.
    pub fn open_retaining(dir: &Path, retention: Duration) -> Result<EmbeddedStore, StoreError> {
        EmbeddedStore::open_with(dir, retention, false)
    }

    /// [`EmbeddedStore::open_retaining`], writing orders compressed when `compress` says so
    /// (either form is read whatever it says).
    pub fn open_with(
        dir: &Path,
        retention: Duration,
        compress: bool,
    ) -> Result<EmbeddedStore, StoreError> {
        let path = dir.join("orders.redb");
        let db = Arc::new(open_file(&path)?);
        // Create the tables up front so readers never meet a missing table.
        let txn = db.begin_write().map_err(unavailable)?;
        {
            let names: Vec<String> = txn
                .list_tables()
                .map_err(unavailable)?
                .map(|table| table.name().to_string())
                .collect();
            let known = |table: &str| names.iter().any(|name| name == table);
            // Orders stored before they were filed by finish time: file them, in the background.
            if known(ORDERS.name()) && !known(FINISHED.name()) {
                txn.open_table(META)
                    .map_err(unavailable)?
                    .insert(BACKFILL, "")
                    .map_err(unavailable)?;
            }
            // Orders stored before they were filed by state: the same, for listings.
            if known(ORDERS.name()) && !known(BY_STATE.name()) {
                txn.open_table(META)
                    .map_err(unavailable)?
                    .insert(STATE_BACKFILL, "")
                    .map_err(unavailable)?;
            }
            txn.open_table(ORDERS).map_err(unavailable)?;
            txn.open_table(BY_USER).map_err(unavailable)?;
            txn.open_table(OWNED).map_err(unavailable)?;
            txn.open_table(IDEMPOTENCY).map_err(unavailable)?;
            txn.open_table(ASIDE).map_err(unavailable)?;
            txn.open_table(FINISHED).map_err(unavailable)?;
            txn.open_table(ORDER_KEYS).map_err(unavailable)?;
            txn.open_table(META).map_err(unavailable)?;
            txn.open_table(PARKED).map_err(unavailable)?;
            txn.open_table(BY_STATE).map_err(unavailable)?;
            txn.open_table(STATE_OF).map_err(unavailable)?;
            txn.open_table(PAYLOADS).map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)?;

        let db = OpenFile::new(db);
        let (writer_tx, writer_rx) = mpsc::channel(4 * MAX_BATCH);
        let writer_db = db.clone();
        let health = Arc::new(Mutex::new(WriteHealth {
            failure: None,
            at: Instant::now(),
            probed: None,
        }));
        let writer_health = Arc::clone(&health);
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(&writer_db, &path, writer_rx, &writer_health, compress))
            .map_err(|error| StoreError::Unavailable(format!("cannot start writer: {error}")))?;
        let (purge_db, purge_tx) = (db.clone(), writer_tx.downgrade());
        std::thread::Builder::new()
            .name("store-purge".into())
            .spawn(move || purge_loop(&purge_db, &purge_tx, retention))
            .map_err(|error| StoreError::Unavailable(format!("cannot start purge: {error}")))?;
        remove_partial_backups(dir);
        Ok(EmbeddedStore {
            db,
            writer_tx,
            health,
            retention,
            compress,
            payload_apart: false,
            dir: dir.to_path_buf(),
            backups: Arc::new(tokio::sync::Semaphore::new(1)),
        })
    }

    /// A copy of the store's file, made from one read transaction (so every table as of one
    /// commit, whatever is written meanwhile, which it does not hold up): a redb file that a node
    /// opens as its `orders.redb`. Written in the data dir first, so it needs as much room there
    /// as the orders take: refused unless the data dir has that (the store file's size, which
    /// the copy does not exceed) and [`BACKUP_HEADROOM`] more free, and while another is made
    /// or sent.
    pub async fn backup(&self) -> Result<Backup, BackupError> {
        let turn = Arc::clone(&self.backups)
            .try_acquire_owned()
            .map_err(|_| BackupError::Busy)?;
        let (needed, free) = self.backup_room().map_err(unavailable_io)?;
        if free < needed {
            return Err(BackupError::NoRoom { needed, free });
        }
        let path = self
            .dir
            .join(format!("{PARTIAL_BACKUP}{}", uuid::Uuid::new_v4()));
        // The turn goes with the copy, which goes on in its thread should the caller give up:
        // no other copy begins until this one is out of the data dir.
        let copy = self
            .read(move |db| {
                let copied = copy_file(db, &path).and_then(|orders| {
                    let file = std::fs::File::open(&path).map_err(unavailable_io)?;
                    let bytes = file.metadata().map_err(unavailable_io)?.len();
                    Ok(Backup {
                        file,
                        bytes,
                        orders,
                        turn,
                    })
                });
                // Open (or failed), the copy leaves the data dir at once.
                let _ = std::fs::remove_file(&path);
                copied
            })
            .await?;
        Ok(copy)
    }

    /// The room a backup needs in the data dir and the room there is, in bytes.
    fn backup_room(&self) -> std::io::Result<(u64, u64)> {
        let size = std::fs::metadata(self.dir.join("orders.redb"))?.len();
        let stat = rustix::fs::statvfs(&self.dir)?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        Ok((size.saturating_add(BACKUP_HEADROOM), free))
    }

    /// The store, creating orders with their payload apart from their doc (written once, in a
    /// table of its own) when `apart` says so; either form is read whatever it says.
    pub fn with_payload_apart(mut self, apart: bool) -> EmbeddedStore {
        self.payload_apart = apart;
        self
    }

    /// Closes the file for a clean stop: later reads and writes are unavailable, and once the
    /// ones under way have let go of it (waiting up to `within`), redb closes it cleanly, so the
    /// next start need not repair it (a repair reads the whole file). Blocks while it waits. An
    /// error means the file is left for its last user to close, or for the next start to repair.
    pub fn close(&self, within: Duration) -> Result<(), StoreError> {
        self.db.closed.store(true, Ordering::Release);
        let mut db = self
            .db
            .take_open()
            .ok_or_else(|| StoreError::Unavailable(REOPENING.into()))?;
        let deadline = Instant::now() + within;
        loop {
            match Arc::try_unwrap(db) {
                Ok(db) => return db.close().map_err(unavailable),
                Err(shared) if Instant::now() < deadline => {
                    db = shared;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => {
                    return Err(StoreError::Unavailable(format!(
                        "the store file was still in use after {within:?}"
                    )))
                }
            }
        }
    }

    /// How many orders the file holds, finished or not.
    pub fn stored_orders(&self) -> Result<u64, StoreError> {
        let txn = self.db.get()?.begin_read().map_err(unavailable)?;
        let orders = txn.open_table(ORDERS).map_err(unavailable)?;
        orders.len().map_err(unavailable)
    }

    /// Whether a walk that files orders stored by an older version in a newer index is owed.
    pub fn backfill_owed(&self) -> Result<bool, StoreError> {
        walk_owed(&self.db.get()?.begin_read().map_err(unavailable)?)
    }

    /// Runs `read` on the blocking pool, so a read that waits for the disk holds up no other
    /// task of the node.
    async fn read<T, F>(&self, read: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.get()?;
        tokio::task::spawn_blocking(move || read(&db))
            .await
            .map_err(|error| StoreError::Unavailable(format!("store read failed: {error}")))?
    }

    /// Has the writer thread apply `apply` in its next batch and waits until that batch is
    /// durable.
    async fn write<T, F>(&self, apply: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tables<'_, '_>) -> Result<T, StoreError> + Send + 'static,
    {
        let (request, reply_rx) = write_request(apply);
        self.writer_tx
            .send(request)
            .await
            .map_err(|_| writer_stopped())?;
        reply_rx.await.map_err(|_| writer_stopped())?
    }
}

fn writer_stopped() -> StoreError {
    StoreError::Unavailable("store writer stopped".into())
}

/// A request for the writer thread to apply `apply` in its next batch, and where its outcome
/// arrives once that batch is durable.
fn write_request<T, F>(apply: F) -> (WriteRequest, oneshot::Receiver<Result<T, StoreError>>)
where
    T: Send + 'static,
    F: FnOnce(&mut Tables<'_, '_>) -> Result<T, StoreError> + Send + 'static,
{
    let (reply, reply_rx) = oneshot::channel();
    let request: WriteRequest = Box::new(move |tables: Result<&mut Tables<'_, '_>, &str>| {
        let outcome = tables.map_err(stopped_batch).and_then(apply);
        Box::new(move |committed: Result<(), &str>| {
            // A caller that gave up waiting has dropped its receiver; nothing to tell it.
            let _ = reply.send(committed.map_err(stopped_batch).and(outcome));
        })
    });
    (request, reply_rx)
}

/// Now, in unix ms.
fn now_millis() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
}

/// When orders that finished before now, in unix ms, are past `retention`.
fn purge_cutoff(retention: Duration) -> u64 {
    now_millis().saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX))
}

/// Runs on its own thread until the store is dropped: every [`PURGE_EVERY`], when a read shows
/// finished orders past `retention` (or a backfill owed), has the writer purge a batch, and
/// goes on at once while batches come back full. The deletes run on the writer thread, in its
/// transactions, so they never race a commit.
fn purge_loop(db: &OpenFile, writer: &mpsc::WeakSender<WriteRequest>, retention: Duration) {
    loop {
        std::thread::sleep(PURGE_EVERY);
        if db.is_closed() {
            return;
        }
        loop {
            // Held only for the look, so the writer can reopen the file meanwhile.
            let due = db.get().and_then(|db| purge_due(&db, retention));
            match due {
                Ok(false) => break,
                Ok(true) => {}
                Err(error) => {
                    tracing::warn!(error = %error, "cannot look for expired orders");
                    break;
                }
            }
            // Held only while this batch runs, so a dropped store's writer still stops.
            let Some(writer) = writer.upgrade() else {
                return;
            };
            let cutoff = purge_cutoff(retention);
            let (request, reply_rx) =
                write_request(move |tables| tables.purge(cutoff, PURGE_BATCH));
            if writer.blocking_send(request).is_err() {
                return;
            }
            drop(writer);
            match reply_rx.blocking_recv() {
                Ok(Ok(through)) if through >= PURGE_BATCH => {}
                Ok(Ok(_)) => break,
                Ok(Err(error)) => {
                    tracing::warn!(error = %error, "purge of expired orders failed");
                    break;
                }
                Err(_) => return,
            }
        }
        if writer.upgrade().is_none() {
            return;
        }
    }
}

/// Whether the purge has work: a finished order past `retention`, or a backfill owed. A read,
/// so an idle store is not made to commit (and fsync) every second.
fn purge_due(db: &Database, retention: Duration) -> Result<bool, StoreError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let finished = txn.open_table(FINISHED).map_err(unavailable)?;
    let first = finished.first().map_err(unavailable)?;
    if first.is_some_and(|(key, _)| key.value().0 < purge_cutoff(retention)) {
        return Ok(true);
    }
    walk_owed(&txn)
}

/// Why a batch's requests failed together: its transaction could not open or commit.
fn stopped_batch(error: &str) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

fn unavailable(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(error.into().to_string())
}

fn unavailable_io(error: std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("backup: {error}"))
}

/// How the name of a backup being written starts: one left by a node that stopped while
/// writing it is removed at the next start.
const PARTIAL_BACKUP: &str = "backup-partial-";

fn remove_partial_backups(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(PARTIAL_BACKUP)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Copies every table of `db`, as one read transaction sees them, into a new file at `path`;
/// returns how many orders it holds. Refuses a file with a table it does not know (of a later
/// version): a backup must hold everything.
fn copy_file(db: &Database, path: &Path) -> Result<u64, StoreError> {
    let from = db.begin_read().map_err(unavailable)?;
    // With the store's own cache: redb's default (1 GiB) would let a copy of a large file take
    // that much memory.
    let copy = redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(unavailable)?;
    let to = copy.begin_write().map_err(unavailable)?;
    let copied = [
        copy_table(&from, &to, ORDERS)?,
        copy_table(&from, &to, BY_USER)?,
        copy_table(&from, &to, OWNED)?,
        copy_table(&from, &to, IDEMPOTENCY)?,
        copy_table(&from, &to, ASIDE)?,
        copy_table(&from, &to, FINISHED)?,
        copy_table(&from, &to, ORDER_KEYS)?,
        copy_table(&from, &to, META)?,
        copy_table(&from, &to, PARKED)?,
        copy_table(&from, &to, BY_STATE)?,
        copy_table(&from, &to, STATE_OF)?,
        copy_table(&from, &to, PAYLOADS)?,
    ];
    for table in from.list_tables().map_err(unavailable)? {
        if !copied.iter().any(|name| name == table.name()) {
            return Err(StoreError::Unavailable(format!(
                "backup: table {} is not one this version copies",
                table.name()
            )));
        }
    }
    let orders = from
        .open_table(ORDERS)
        .map_err(unavailable)?
        .len()
        .map_err(unavailable)?;
    to.commit().map_err(unavailable)?;
    Ok(orders)
}

/// Copies `table` from `from` to `to`; returns its name.
fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    from: &redb::ReadTransaction,
    to: &redb::WriteTransaction,
    table: TableDefinition<'static, K, V>,
) -> Result<String, StoreError> {
    let source = from.open_table(table).map_err(unavailable)?;
    let mut target = to.open_table(table).map_err(unavailable)?;
    for entry in source.iter().map_err(unavailable)? {
        let (key, value) = entry.map_err(unavailable)?;
        target
            .insert(key.value(), value.value())
            .map_err(unavailable)?;
    }
    Ok(table.name().to_string())
}

/// Opens (or creates) the store's file; redb repairs it first if it was not closed cleanly.
fn open_file(path: &Path) -> Result<Database, StoreError> {
    redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|error| match error {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                StoreError::Unavailable(format!("{} is in use by another process", path.display()))
            }
            other => StoreError::Unavailable(format!("cannot open {}: {other}", path.display())),
        })
}

/// Runs on its own thread: takes a batch of requests, applies them in one transaction, commits
/// (fsync), then answers each. A failed commit fails every request of the batch; one that
/// left the file's handle failing every later transaction has the file reopened.
fn writer_loop(
    db: &OpenFile,
    path: &Path,
    mut requests_rx: mpsc::Receiver<WriteRequest>,
    health: &Mutex<WriteHealth>,
    compress: bool,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut owners = Owners::default();
    // When the file was last reopened, and the pause before that reopen.
    let mut reopened: Option<(Instant, Duration)> = None;
    while let Some(first) = requests_rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match requests_rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let (outcome, latched) = match db.get() {
            Ok(open) => {
                let outcome = apply_batch(&open, &mut batch, &mut owners, compress);
                let latched = outcome.is_err() && is_latched(&open);
                (outcome, latched)
            }
            Err(error) => {
                let error = error.to_string();
                fail_all(batch.drain(..), &error);
                (Err(error), false)
            }
        };
        if let Err(error) = &outcome {
            // The cache may hold changes that never reached the disk.
            owners.clear();
            tracing::error!(error = %error, "store write transaction failed");
        }
        // Why a lock: heartbeats read this outcome from other threads.
        *health.lock().unwrap_or_else(PoisonError::into_inner) = WriteHealth {
            failure: outcome.err(),
            at: Instant::now(),
            probed: None,
        };
        if latched {
            let pause = match reopened {
                Some((at, pause)) if at.elapsed() < REOPEN_CALM => {
                    (pause * 2).min(REOPEN_MAX_PAUSE)
                }
                _ => Duration::ZERO,
            };
            if !reopen(db, path, &mut requests_rx, pause) {
                return;
            }
            reopened = Some((Instant::now(), pause.max(REOPEN_EVERY)));
        }
    }
}

/// How often the writer tries to open its file again while it cannot (and fails the writes
/// that came meanwhile).
const REOPEN_EVERY: Duration = Duration::from_millis(500);

/// A write that fails on the disk again within this of a reopen doubles the pause before the
/// next (up to [`REOPEN_MAX_PAUSE`]): each reopen of a file not closed cleanly has redb repair it,
/// reading it whole, which a disk still full would have it do over and over.
const REOPEN_CALM: Duration = Duration::from_secs(10);

const REOPEN_MAX_PAUSE: Duration = Duration::from_secs(16);

/// What a write meets while the file is reopened.
const REOPENING: &str = "the store is reopening its file after a failed write";

/// What a read or write meets once the file is closed.
const CLOSED: &str = "the store is closed: the node is stopping";

/// Whether `db` fails every transaction since an earlier one failed on the disk (redb's
/// `PreviousIo`): only a new handle on the file can write again. An empty transaction tells.
fn is_latched(db: &Database) -> bool {
    let probe = db
        .begin_write()
        .map_err(redb::Error::from)
        .and_then(|txn| txn.commit().map_err(redb::Error::from));
    matches!(probe, Err(redb::Error::PreviousIo))
}

/// Answers every request of `requests` with `error`, unapplied.
fn fail_all(requests: impl Iterator<Item = WriteRequest>, error: &str) {
    for request in requests {
        request(Err(error))(Err(error));
    }
}

/// Reopens the file after a write failed on the disk: takes it out (readers and writers get
/// unavailable meanwhile), waits `pause` and until no one holds the old handle, and opens it
/// again once the disk lets redb do so (repairing it: it was not closed cleanly). False when
/// the store was dropped meanwhile.
fn reopen(
    db: &OpenFile,
    path: &Path,
    requests_rx: &mut mpsc::Receiver<WriteRequest>,
    pause: Duration,
) -> bool {
    let old = db.take();
    tracing::warn!(path = %path.display(), pause_ms = pause.as_millis(), "store file fails every write since one failed on the disk, reopening it");
    let since = Instant::now();
    let mut last_error = String::new();
    loop {
        std::thread::sleep(REOPEN_EVERY);
        loop {
            match requests_rx.try_recv() {
                Ok(request) => fail_all(std::iter::once(request), REOPENING),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
        if since.elapsed() >= pause && old.as_ref().is_none_or(|old| old.strong_count() == 0) {
            forget_cached_pages(path);
            match open_file(path) {
                Ok(reopened) => {
                    db.put(reopened);
                    tracing::info!(path = %path.display(), "store file reopened");
                    return true;
                }
                Err(error) => {
                    let error = error.to_string();
                    if error != last_error {
                        tracing::warn!(error = %error, "cannot reopen the store file yet");
                        last_error = error;
                    }
                }
            }
        }
    }
}

/// Drops the file's pages from the page cache before it is opened again after a failed write.
/// A write that failed on the disk can leave its pages there, marked clean but never written
/// (Linux reports the error once and keeps the pages): redb's repair would read the failed
/// commit from them and take it for one on the disk, and later commits would build on pages
/// that exist only in memory. Dropped, the repair reads what the disk holds.
fn forget_cached_pages(path: &Path) {
    let dropped = std::fs::File::open(path).and_then(|file| {
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)
            .map_err(std::io::Error::from)
    });
    if let Err(error) = dropped {
        tracing::debug!(path = %path.display(), error = %error, "cannot drop the store file's cached pages");
    }
}

/// Who owns each unfinished order, at which epoch, and whether a cancellation is pending: what a
/// commit checks. Kept by the writer thread (the only writer) so a commit need not decode the
/// stored order; filled from the file on a miss, dropped when the order finishes.
#[derive(Clone, Debug)]
struct Ownership {
    owner: String,
    epoch: u64,
    cancel_requested: bool,
    revision: u64,
}

impl Ownership {
    fn fence(&self) -> Fence<'_> {
        Fence {
            owner: &self.owner,
            epoch: self.epoch,
            cancel_requested: self.cancel_requested,
            revision: self.revision,
        }
    }
}

type Owners = IdMap<Ownership>;

impl From<&Order> for Ownership {
    fn from(order: &Order) -> Self {
        Ownership {
            owner: order.owner.clone(),
            epoch: order.epoch,
            cancel_requested: order.cancel_requested,
            revision: order.revision,
        }
    }
}

/// Applies a batch in one write transaction and answers each request once it committed. On
/// error every request of the batch has been answered with it.
fn apply_batch(
    db: &Database,
    batch: &mut Vec<WriteRequest>,
    owners: &mut Owners,
    compress: bool,
) -> Result<(), String> {
    let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
    let committed = db
        .begin_write()
        .map_err(|error| error.to_string())
        .and_then(|txn| {
            let mut tables = Tables::open(&txn, owners, compress)?;
            answers.extend(batch.drain(..).map(|apply| apply(Ok(&mut tables))));
            drop(tables);
            txn.commit().map_err(|error| error.to_string())
        });
    if let Err(error) = &committed {
        // The transaction did not open: the requests it never applied fail with it.
        answers.extend(batch.drain(..).map(|apply| apply(Err(error))));
    }
    for answer in answers {
        answer(committed.as_ref().map(|&()| ()).map_err(String::as_str));
    }
    committed
}

struct Tables<'txn, 'cache> {
    orders: redb::Table<'txn, &'static str, &'static [u8]>,
    by_user: redb::Table<'txn, (&'static str, u64, &'static str), ()>,
    owned: redb::Table<'txn, (&'static str, &'static str), ()>,
    idempotency: redb::Table<'txn, (&'static str, &'static str), (&'static str, i64)>,
    aside: redb::Table<'txn, &'static str, &'static [u8]>,
    finished: redb::Table<'txn, (u64, &'static str), u64>,
    order_keys: redb::Table<'txn, &'static str, &'static str>,
    meta: redb::Table<'txn, &'static str, &'static str>,
    parked: redb::Table<'txn, &'static str, ()>,
    by_state: redb::Table<'txn, (&'static str, u8, u64, &'static str), ()>,
    state_of: redb::Table<'txn, &'static str, (u8, u8)>,
    payloads: redb::Table<'txn, &'static str, &'static [u8]>,
    owners: &'cache mut Owners,
    /// Whether the orders this batch writes again are written compressed.
    compress: bool,
}

impl<'txn, 'cache> Tables<'txn, 'cache> {
    fn open(
        txn: &'txn redb::WriteTransaction,
        owners: &'cache mut Owners,
        compress: bool,
    ) -> Result<Tables<'txn, 'cache>, String> {
        Ok(Tables {
            orders: txn.open_table(ORDERS).map_err(|error| error.to_string())?,
            by_user: txn.open_table(BY_USER).map_err(|error| error.to_string())?,
            owned: txn.open_table(OWNED).map_err(|error| error.to_string())?,
            idempotency: txn
                .open_table(IDEMPOTENCY)
                .map_err(|error| error.to_string())?,
            aside: txn.open_table(ASIDE).map_err(|error| error.to_string())?,
            finished: txn
                .open_table(FINISHED)
                .map_err(|error| error.to_string())?,
            order_keys: txn
                .open_table(ORDER_KEYS)
                .map_err(|error| error.to_string())?,
            meta: txn.open_table(META).map_err(|error| error.to_string())?,
            parked: txn.open_table(PARKED).map_err(|error| error.to_string())?,
            by_state: txn
                .open_table(BY_STATE)
                .map_err(|error| error.to_string())?,
            state_of: txn
                .open_table(STATE_OF)
                .map_err(|error| error.to_string())?,
            payloads: txn
                .open_table(PAYLOADS)
                .map_err(|error| error.to_string())?,
            owners,
            compress,
        })
    }

    fn read(&self, id: &str) -> Result<Option<Order>, StoreError> {
        match self.orders.get(id).map_err(unavailable)? {
            Some(bytes) => read_order(&self.payloads, id, bytes.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Stores an order's bytes and keeps the owner index, the finished index and the cache in
    /// step. `newly_owned` is set when the order enters its owner's index (created or moved).
    fn write(&mut self, order: &Order, bytes: &[u8], newly_owned: bool) -> Result<(), StoreError> {
        let id = order.order_id.to_string();
        self.orders
            .insert(id.as_str(), bytes)
            .map_err(unavailable)?;
        self.file_state(order, &id)?;
        if !order.owes_work() {
            self.owned
                .remove((order.owner.as_str(), id.as_str()))
                .map_err(unavailable)?;
            self.owners.remove(&order.order_id);
            self.finished
                .insert((now_millis(), id.as_str()), order.revision)
                .map_err(unavailable)?;
            self.file_parked(order, &id)?;
        } else {
            if newly_owned {
                self.owned
                    .insert((order.owner.as_str(), id.as_str()), ())
                    .map_err(unavailable)?;
            }
            self.owners.insert(order.order_id, Ownership::from(order));
        }
        Ok(())
    }

    /// Files the order under its step and rollback state in `BY_STATE`, out of the ones it was
    /// filed under before.
    fn file_state(&mut self, order: &Order, id: &str) -> Result<(), StoreError> {
        let codes = state_codes(order);
        let before = self.unfile_state(order, id, Some(codes))?;
        if before == Some(codes) {
            return Ok(());
        }
        let (user, micros) = (order.user.as_str(), created_micros(order));
        for code in [codes.0, codes.1] {
            if code != NO_ROLLBACK {
                self.by_state
                    .insert((user, code, micros, id), ())
                    .map_err(unavailable)?;
            }
        }
        self.state_of.insert(id, codes).map_err(unavailable)?;
        Ok(())
    }

    /// Takes the order out of `BY_STATE`, unless it is filed under `keep` already; returns the
    /// codes it was filed under.
    fn unfile_state(
        &mut self,
        order: &Order,
        id: &str,
        keep: Option<(u8, u8)>,
    ) -> Result<Option<(u8, u8)>, StoreError> {
        let before = self
            .state_of
            .get(id)
            .map_err(unavailable)?
            .map(|codes| codes.value());
        let Some(codes) = before.filter(|codes| Some(*codes) != keep) else {
            return Ok(before);
        };
        let (user, micros) = (order.user.as_str(), created_micros(order));
        for code in [codes.0, codes.1] {
            if code != NO_ROLLBACK {
                self.by_state
                    .remove((user, code, micros, id))
                    .map_err(unavailable)?;
            }
        }
        self.state_of.remove(id).map_err(unavailable)?;
        Ok(before)
    }

    /// Keeps the parked table in step with a finished (or re-opened) order.
    fn file_parked(&mut self, order: &Order, id: &str) -> Result<(), StoreError> {
        if is_parked(order) {
            self.parked.insert(id, ()).map_err(unavailable)?;
        } else {
            self.parked.remove(id).map_err(unavailable)?;
        }
        Ok(())
    }

    /// Creates `order` with its doc `bytes` and, where its payload is kept apart, that
    /// payload's doc `payload`.
    fn create(
        &mut self,
        order: &Order,
        bytes: &[u8],
        payload: Option<&[u8]>,
        key: Option<&str>,
    ) -> Result<Created, StoreError> {
        let id = order.order_id.to_string();
        let now = chrono::Utc::now().timestamp();
        if let Some(key) = key {
            let existing = self
                .idempotency
                .get((order.user.as_str(), key))
                .map_err(unavailable)?
                .map(|guard| {
                    let (id, expires) = guard.value();
                    (id.to_string(), expires)
                });
            if let Some((first_id, expires)) = existing {
                if expires > now {
                    if let Some(first) = self.read(&first_id)? {
                        return Ok(Created::Existing(Box::new(first)));
                    }
                }
            }
            let ttl = i64::try_from(IDEMPOTENCY_TTL.as_secs()).unwrap_or(i64::MAX);
            self.idempotency
                .insert(
                    (order.user.as_str(), key),
                    (id.as_str(), now.saturating_add(ttl)),
                )
                .map_err(unavailable)?;
            self.order_keys
                .insert(id.as_str(), key)
                .map_err(unavailable)?;
        }
        self.write(order, bytes, true)?;
        if let Some(payload) = payload {
            self.payloads
                .insert(id.as_str(), payload)
                .map_err(unavailable)?;
        }
        self.by_user
            .insert(
                (order.user.as_str(), created_micros(order), id.as_str()),
                (),
            )
            .map_err(unavailable)?;
        Ok(Created::New)
    }

    /// The ownership of an unfinished order, from the cache or, on a miss, the file.
    fn ownership(&mut self, id: OrderId) -> Result<Ownership, StoreError> {
        if let Some(found) = self.owners.get(&id) {
            return Ok(found.clone());
        }
        let stored = self.read(&id.to_string())?.ok_or(StoreError::NotFound)?;
        let found = Ownership::from(&stored);
        if stored.owes_work() {
            self.owners.insert(id, found.clone());
        }
        Ok(found)
    }

    fn commit(&mut self, order: &Order, bytes: &[u8]) -> Result<(), StoreError> {
        let stored = self.ownership(order.order_id)?;
        let same_as_stored = || {
            let full = self.read(&order.order_id.to_string())?;
            Ok(full.is_some_and(|full| same_order(&full, order)))
        };
        if check_commit(stored.fence(), order, same_as_stored)? == Checked::Applied {
            return Ok(());
        }
        if stored.cancel_requested && !order.cancel_requested {
            // The writer knew of a failure but not of the cancellation: keep the flag.
            let mut merged = order.clone();
            merged.cancel_requested = true;
            return self.write(&merged, &doc::encode(&merged, self.compress)?, false);
        }
        self.write(order, bytes, false)
    }

    fn reassign(&mut self, from: &str, to: &str) -> Result<Vec<OrderId>, StoreError> {
        let mut ids = Vec::new();
        for entry in self.owned.range((from, "")..).map_err(unavailable)? {
            let (key, _) = entry.map_err(unavailable)?;
            let (owner, id) = key.value();
            if owner != from {
                break;
            }
            ids.push(id.to_string());
        }
        let mut moved = Vec::new();
        for id in ids {
            self.owned
                .remove((from, id.as_str()))
                .map_err(unavailable)?;
            let Some(mut order) = self.read(&id)? else {
                continue;
            };
            if order.owner != from || !order.owes_work() {
                continue;
            }
            order.owner = to.to_string();
            order.epoch += 1;
            self.write(&order, &doc::encode(&order, self.compress)?, true)?;
            moved.push(order.order_id);
        }
        Ok(moved)
    }

    fn reopen(&mut self, reopen: Reopen<'_>) -> Result<Reopened, StoreError> {
        let id = reopen.id;
        let stored = self
            .read(&id.to_string())?
            .filter(|order| order.user == reopen.user)
            .ok_or(StoreError::NotFound)?;
        match reopen_outcome(stored, reopen.what, reopen.node, reopen.now) {
            Ok(next) => {
                self.write(&next, &doc::encode(&next, self.compress)?, true)?;
                self.file_parked(&next, &id.to_string())?;
                Ok(Reopened::Accepted(next))
            }
            Err(stored) => Ok(Reopened::Refused(*stored)),
        }
    }

    fn disown(&mut self, node: &str, id: OrderId) -> Result<bool, StoreError> {
        let key = id.to_string();
        let owned_here = match self.read(&key) {
            Ok(Some(order)) => order.owner == node && order.owes_work(),
            Ok(None) => false,
            // Its owner cannot be told: the entry stays, for whoever sets the order aside.
            Err(StoreError::Corrupt(_)) => return Ok(false),
            Err(error) => return Err(error),
        };
        if owned_here {
            return Ok(false);
        }
        let removed = self
            .owned
            .remove((node, key.as_str()))
            .map_err(unavailable)?
            .is_some();
        Ok(removed)
    }

    fn set_aside(&mut self, aside: &SetAside, bytes: &[u8]) -> Result<(), StoreError> {
        let id = aside.order_id.to_string();
        self.owned
            .remove((aside.node.as_str(), id.as_str()))
            .map_err(unavailable)?;
        self.owners.remove(&aside.order_id);
        self.aside.insert(id.as_str(), bytes).map_err(unavailable)?;
        Ok(())
    }

    fn take_back(&mut self, id: OrderId, to: &str) -> Result<TakenBack, StoreError> {
        let key = id.to_string();
        if self.aside.get(key.as_str()).map_err(unavailable)?.is_none() {
            return Ok(TakenBack::NotAside);
        }
        // Read and encoded before the entry goes: an order that still does not read stays
        // set aside.
        let Some(mut order) = self.read(&key)?.filter(Order::owes_work) else {
            self.aside.remove(key.as_str()).map_err(unavailable)?;
            return Ok(TakenBack::Dropped);
        };
        order.owner = to.to_string();
        order.epoch += 1;
        let bytes = doc::encode(&order, self.compress)?;
        self.aside.remove(key.as_str()).map_err(unavailable)?;
        self.write(&order, &bytes, true)?;
        Ok(TakenBack::Taken)
    }

    /// Deletes up to `n` finished orders that finished before `cutoff` (unix ms), then files up
    /// to `n` orders of a backfill owed. Returns how many entries it went through.
    fn purge(&mut self, cutoff: u64, n: usize) -> Result<usize, StoreError> {
        let mut due = Vec::new();
        for entry in self
            .finished
            .range((0u64, "")..(cutoff, ""))
            .map_err(unavailable)?
            .take(n)
        {
            let (key, revision) = entry.map_err(unavailable)?;
            let (at, id) = key.value();
            due.push((at, id.to_string(), revision.value()));
        }
        for (at, id, revision) in &due {
            self.finished
                .remove((*at, id.as_str()))
                .map_err(unavailable)?;
            match self.read(id) {
                Ok(Some(order)) if !order.owes_work() && order.revision == *revision => {
                    self.delete(&order)?;
                }
                // Re-opened since (and maybe finished again, with an entry of its own), or gone.
                Ok(_) => {}
                // Kept as it is, for an operator to look at, and looked at again in an hour: a
                // record that reads again (a node rolled back to an older version, then
                // upgraded) is purged then.
                Err(StoreError::Corrupt(error)) => {
                    tracing::warn!(order_id = %id, error = %error, "purge keeps an unreadable order, to look at again in an hour");
                    self.finished
                        .insert(
                            (cutoff.saturating_add(UNREADABLE_AGAIN_MS), id.as_str()),
                            revision,
                        )
                        .map_err(unavailable)?;
                }
                Err(error) => return Err(error),
            }
        }
        Ok(due.len() + self.backfill(n)?)
    }

    /// Deletes a finished order with its user index entry and idempotency key.
    fn delete(&mut self, order: &Order) -> Result<(), StoreError> {
        let id = order.order_id.to_string();
        let user = order.user.as_str();
        self.orders.remove(id.as_str()).map_err(unavailable)?;
        self.payloads.remove(id.as_str()).map_err(unavailable)?;
        self.parked.remove(id.as_str()).map_err(unavailable)?;
        self.unfile_state(order, &id, None)?;
        self.by_user
            .remove((user, created_micros(order), id.as_str()))
            .map_err(unavailable)?;
        let key = self
            .order_keys
            .remove(id.as_str())
            .map_err(unavailable)?
            .map(|key| key.value().to_string());
        if let Some(key) = key {
            // Unless a later order has taken the key over since it expired.
            let names_this = self
                .idempotency
                .get((user, key.as_str()))
                .map_err(unavailable)?
                .is_some_and(|entry| entry.value().0 == id);
            if names_this {
                self.idempotency
                    .remove((user, key.as_str()))
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }

    /// Files up to `n` more orders of a file written before the finished index existed, by when
    /// they completed, and up to `n` of one written before the state index existed, by state.
    /// Returns how many orders it read.
    fn backfill(&mut self, n: usize) -> Result<usize, StoreError> {
        let now = now_millis();
        let read = self.walk(BACKFILL, n)?;
        for (id, order) in &read {
            let Ok(order) = order else { continue };
            if !order.owes_work() {
                let completed = order
                    .complete_time
                    .and_then(|at| u64::try_from(at.timestamp_millis()).ok())
                    .map_or(now, |at| at.min(now));
                self.finished
                    .insert((completed, id.as_str()), order.revision)
                    .map_err(unavailable)?;
            }
        }
        let filed = self.walk(STATE_BACKFILL, n)?;
        for (id, order) in &filed {
            if let Ok(order) = order {
                self.file_state(order, id)?;
            }
        }
        Ok(read.len() + filed.len())
    }

    /// The next `n` orders of the walk kept under `walk` in the meta table (none when no such
    /// walk is owed); the walk goes on after the id it stopped at, and ends for good once it
    /// went through every order.
    fn walk(&mut self, walk: &str, n: usize) -> Result<Walked, StoreError> {
        let Some(after) = self
            .meta
            .get(walk)
            .map_err(unavailable)?
            .map(|at| at.value().to_string())
        else {
            return Ok(Vec::new());
        };
        let mut read = Vec::new();
        for entry in self.orders.range(after.as_str()..).map_err(unavailable)? {
            let (id, bytes) = entry.map_err(unavailable)?;
            if id.value() == after {
                continue;
            }
            if read.len() >= n {
                break;
            }
            let order = read_order(&self.payloads, id.value(), bytes.value());
            read.push((id.value().to_string(), order));
        }
        match read.last() {
            Some((last, _)) if read.len() >= n => {
                self.meta.insert(walk, last.as_str()).map_err(unavailable)?;
            }
            _ => {
                self.meta.remove(walk).map_err(unavailable)?;
                tracing::info!(
                    walk,
                    "orders stored before this index existed are filed in it"
                );
            }
        }
        Ok(read)
    }

    fn cancel(&mut self, id: OrderId, user: &str) -> Result<CancelOutcome, StoreError> {
        let stored = self
            .read(&id.to_string())?
            .filter(|order| order.user == user)
            .ok_or(StoreError::NotFound)?;
        let (outcome, changed) = cancel_outcome(stored);
        if changed {
            if let CancelOutcome::Accepted(order) = &outcome {
                self.write(order, &doc::encode(order, self.compress)?, false)?;
            }
        }
        Ok(outcome)
    }
}

#[async_trait]
impl OrderStore for EmbeddedStore {
    async fn create(&self, order: &Order, key: Option<&str>) -> Result<Created, StoreError> {
        if self.payload_apart {
            // Before the doc is written: it then leaves the payload out, as every later write
            // of the order does.
            order.payload.set_apart();
        }
        let payload = order
            .payload
            .is_apart()
            .then(|| doc::encode_payload(&order.payload, self.compress))
            .transpose()?;
        let (order, bytes) = (order.clone(), doc::encode(order, self.compress)?);
        let key = key.map(str::to_string);
        self.write(move |tables| tables.create(&order, &bytes, payload.as_deref(), key.as_deref()))
            .await
    }

    async fn get(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let orders = txn.open_table(ORDERS).map_err(unavailable)?;
            let payloads = txn.open_table(PAYLOADS).map_err(unavailable)?;
            let id = id.to_string();
            let found = orders.get(id.as_str()).map_err(unavailable)?;
            match found {
                Some(bytes) => read_order(&payloads, &id, bytes.value()).map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn get_many(&self, ids: &[OrderId]) -> Vec<Result<Option<Order>, StoreError>> {
        let wanted = ids.to_vec();
        // One trip to the blocking pool and one read transaction for the lot.
        let read = self
            .read(move |db| {
                let txn = db.begin_read().map_err(unavailable)?;
                let orders = txn.open_table(ORDERS).map_err(unavailable)?;
                let payloads = txn.open_table(PAYLOADS).map_err(unavailable)?;
                Ok(wanted
                    .iter()
                    .map(|id| {
                        let id = id.to_string();
                        match orders.get(id.as_str()) {
                            Ok(Some(bytes)) => read_order(&payloads, &id, bytes.value()).map(Some),
                            Ok(None) => Ok(None),
                            Err(error) => Err(unavailable(error)),
                        }
                    })
                    .collect::<Vec<_>>())
            })
            .await;
        match read {
            Ok(results) => results,
            Err(error) => ids.iter().map(|_| Err(error.clone())).collect(),
        }
    }

    async fn list_for_user(&self, user: &str, query: &ListQuery) -> Result<Page, StoreError> {
        let (user, query) = (user.to_string(), query.clone());
        self.read(move |db| {
            let (user, query) = (user.as_str(), &query);
            let txn = db.begin_read().map_err(unavailable)?;
            let by_user = txn.open_table(BY_USER).map_err(unavailable)?;
            let orders = txn.open_table(ORDERS).map_err(unavailable)?;
            let payloads = txn.open_table(PAYLOADS).map_err(unavailable)?;
            let upper_id;
            let upper = match query.cursor.as_deref() {
                Some(cursor) => {
                    let (micros, id) = decode_cursor(cursor).ok_or(StoreError::NotFound)?;
                    upper_id = id.to_string();
                    (user, micros, upper_id.as_str())
                }
                None => (user, u64::MAX, ""),
            };
            // A filter on the rollback state (set only on failed orders) or else on the step
            // reads the indexes of that state, once they hold every order.
            let meta = txn.open_table(META).map_err(unavailable)?;
            let filed = meta.get(STATE_BACKFILL).map_err(unavailable)?.is_none();
            let by_state = txn.open_table(BY_STATE).map_err(unavailable)?;
            let range: Listed = match listing_codes(query).filter(|_| filed) {
                Some(codes) => {
                    let mut ranges: Vec<Listed> = Vec::with_capacity(codes.len());
                    for code in codes {
                        ranges.push(Box::new(
                            by_state
                                .range((user, code, 0u64, "")..(user, code, upper.1, upper.2))
                                .map_err(unavailable)?
                                .rev()
                                .map(|entry| {
                                    let (key, _) = entry.map_err(unavailable)?;
                                    let (_, _, micros, id) = key.value();
                                    Ok((micros, id.to_string()))
                                }),
                        ));
                    }
                    newest_first(ranges)
                }
                None => Box::new(
                    by_user
                        .range((user, 0u64, "")..upper)
                        .map_err(unavailable)?
                        .rev()
                        .map(|entry| {
                            let (key, _) = entry.map_err(unavailable)?;
                            let (_, micros, id) = key.value();
                            Ok((micros, id.to_string()))
                        }),
                ),
            };
            let mut page = Page::default();
            for entry in range {
                let (micros, id) = entry?;
                let id = id.as_str();
                let Some(bytes) = orders.get(id).map_err(unavailable)? else {
                    continue;
                };
                let order = match read_order(&payloads, id, bytes.value()) {
                    Ok(order) => order,
                    Err(error) => {
                        tracing::warn!(order_id = %id, error = %error, "listing skips an unreadable order");
                        continue;
                    }
                };
                if !query.matches(&order) {
                    continue;
                }
                page.orders.push(order);
                if page.orders.len() >= query.limit {
                    if let Ok(order_id) = OrderId::try_parse(id) {
                        page.next_cursor = Some(encode_cursor(micros, order_id));
                    }
                    break;
                }
            }
            Ok(page)
        })
        .await
    }

    async fn commit(&self, order: &Order) -> Result<(), StoreError> {
        let (order, bytes) = (order.clone(), doc::encode(order, self.compress)?);
        self.write(move |tables| tables.commit(&order, &bytes))
            .await
    }

    async fn request_cancel(&self, id: OrderId, user: &str) -> Result<CancelOutcome, StoreError> {
        let user = user.to_string();
        self.write(move |tables| tables.cancel(id, &user)).await
    }

    async fn reopen(&self, reopen: Reopen<'_>) -> Result<Reopened, StoreError> {
        let (id, what, now) = (reopen.id, reopen.what, reopen.now);
        let (user, node) = (reopen.user.to_string(), reopen.node.to_string());
        self.write(move |tables| {
            tables.reopen(Reopen {
                id,
                user: &user,
                node: &node,
                now,
                what,
            })
        })
        .await
    }

    async fn owned_unfinished(&self, node: &str) -> Result<Vec<OrderId>, StoreError> {
        Ok(self.owned_page(node, "", usize::MAX).await?.0)
    }

    async fn owned_page(&self, node: &str, at: &str, n: usize) -> Result<OwnedPage, StoreError> {
        let (node, at) = (node.to_string(), at.to_string());
        self.read(move |db| {
            let (node, at) = (node.as_str(), at.as_str());
            let txn = db.begin_read().map_err(unavailable)?;
            let owned = txn.open_table(OWNED).map_err(unavailable)?;
            let range = owned.range((node, at)..).map_err(unavailable)?;
            let mut ids = Vec::new();
            let mut last = None;
            for entry in range {
                let (key, _) = entry.map_err(unavailable)?;
                let (owner, id) = key.value();
                if owner != node {
                    return Ok((ids, None));
                }
                if id == at {
                    continue;
                }
                if ids.len() >= n.max(1) {
                    return Ok((ids, last));
                }
                last = Some(id.to_string());
                match OrderId::try_parse(id) {
                    Ok(id) => ids.push(id),
                    Err(_) => {
                        tracing::warn!(order_id = %id, "skipping an unreadable id in the owner index")
                    }
                }
            }
            Ok((ids, None))
        })
        .await
    }

    async fn still_owned(&self, node: &str, ids: &[OrderId]) -> Result<Vec<OrderId>, StoreError> {
        let (node, ids) = (node.to_string(), ids.to_vec());
        self.read(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let owned = txn.open_table(OWNED).map_err(unavailable)?;
            let mut still = Vec::with_capacity(ids.len());
            for id in ids {
                let key = id.to_string();
                if owned
                    .get((node.as_str(), key.as_str()))
                    .map_err(unavailable)?
                    .is_some()
                {
                    still.push(id);
                }
            }
            Ok(still)
        })
        .await
    }

    async fn parked_page(&self, at: &str, n: usize) -> Result<OwnedPage, StoreError> {
        let at = at.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let parked = txn.open_table(PARKED).map_err(unavailable)?;
            let range = parked.range(at.as_str()..).map_err(unavailable)?;
            let mut ids = Vec::new();
            for entry in range {
                let (key, _) = entry.map_err(unavailable)?;
                let id = key.value();
                if id == at {
                    continue;
                }
                if ids.len() >= n.max(1) {
                    let next = ids.last().map(ToString::to_string);
                    return Ok((ids, next));
                }
                match OrderId::try_parse(id) {
                    Ok(id) => ids.push(id),
                    Err(_) => {
                        tracing::warn!(order_id = %id, "skipping an unreadable id in the parked index")
                    }
                }
            }
            Ok((ids, None))
        })
        .await
    }

    async fn reassign(&self, from: &str, to: &str) -> Result<Vec<OrderId>, StoreError> {
        let (from, to) = (from.to_string(), to.to_string());
        self.write(move |tables| tables.reassign(&from, &to)).await
    }

    async fn disown(&self, node: &str, id: OrderId) -> Result<bool, StoreError> {
        let node = node.to_string();
        self.write(move |tables| tables.disown(&node, id)).await
    }

    async fn set_aside(&self, aside: &SetAside) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(aside).map_err(corrupt)?;
        let aside = aside.clone();
        self.write(move |tables| tables.set_aside(&aside, &bytes))
            .await
    }

    async fn set_aside_page(&self, at: &str, n: usize) -> Result<AsidePage, StoreError> {
        let at = at.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let aside = txn.open_table(ASIDE).map_err(unavailable)?;
            let mut found = Vec::new();
            let mut last = None;
            for entry in aside.range(at.as_str()..).map_err(unavailable)? {
                let (id, bytes) = entry.map_err(unavailable)?;
                if id.value() == at {
                    continue;
                }
                if found.len() >= n.max(1) {
                    return Ok((found, last));
                }
                last = Some(id.value().to_string());
                match serde_json::from_slice(bytes.value()) {
                    Ok(entry) => found.push(entry),
                    Err(error) => {
                        tracing::warn!(error = %error, "skipping an unreadable set-aside entry")
                    }
                }
            }
            Ok((found, None))
        })
        .await
    }

    async fn take_back(&self, id: OrderId, to: &str) -> Result<TakenBack, StoreError> {
        let to = to.to_string();
        self.write(move |tables| tables.take_back(id, &to)).await
    }

    async fn repair_indexes(&self, _at: &str, _n: usize) -> Result<RepairPage, StoreError> {
        // The indexes are written in the same transaction as the orders: nothing to repair,
        // and one node owns every order.
        Ok((Repaired::default(), None))
    }

    async fn purge_expired(&self, n: usize) -> Result<usize, StoreError> {
        let cutoff = purge_cutoff(self.retention);
        self.write(move |tables| tables.purge(cutoff, n)).await
    }

    /// Reads, and tells whether the store takes writes: from the writer's last transaction when
    /// it is recent, else from a probe write (at most one a second, however many heartbeats ask).
    async fn ping(&self) -> Result<(), StoreError> {
        let txn = self.db.get()?.begin_read().map_err(unavailable)?;
        txn.open_table(ORDERS).map_err(unavailable)?;
        if self.writer_tx.is_closed() {
            return Err(StoreError::Unavailable("store writer stopped".into()));
        }
        {
            // Why a lock: concurrent heartbeats must agree on which one probes.
            let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
            if health.at.elapsed() < PROBE_EVERY {
                // A probe that has not ended for long (a disk that stalls) is a failure: the last
                // outcome, from before it, says nothing of the disk now.
                if let Some(sent) = health.probed.filter(|sent| sent.elapsed() >= PROBE_STALLED) {
                    return Err(StoreError::Unavailable(format!(
                        "no store write has ended for {} ms",
                        sent.elapsed().as_millis()
                    )));
                }
                return health
                    .failure
                    .as_deref()
                    .map_or(Ok(()), |error| Err(stopped_batch(error)));
            }
            // Later heartbeats within the second read this probe's outcome once it is in. A
            // probe sent while one is still out (or was dropped unanswered) keeps its time.
            let now = Instant::now();
            health.at = now;
            health.probed.get_or_insert(now);
        }
        // Commits an empty write transaction, through the writer like any write.
        self.write(|_| Ok(())).await
    }
}
