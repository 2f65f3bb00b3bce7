//! Cluster mode: membership by gossip, a leader chosen by a lease in Redis, and the takeover of a
//! dead node's orders.
//!
//! - Every node keeps a liveness lease (`op:alive:{node}`); while it is current the node may
//!   start steps (the pipeline's [`Gate`]).
//! - One node holds the leader lease, renewed by compare-and-set; each term has a fencing token.
//! - The leader sweeps: a registered node whose liveness lease has expired and which still owns
//!   orders is dead once gossip agrees or the node says (in gossip) it cannot renew the lease,
//!   or once the lease has stayed expired for `cluster.takeover_after` whatever gossip says; the
//!   live node with the fewest orders in flight is asked to take them over
//!   (`POST /service/transfer`).
//! - On SIGTERM a node drains: it announces it is leaving, lets running steps finish, releases
//!   its liveness lease and hands its remaining orders to a live peer.
//!
//! The leases and the node registry are behind [`Coordinator`] ([`RedisCoordinator`] on the
//! cluster's Redis); the orders behind [`OrderStore`]. [`node`](crate::node) wires them.

mod coordination;
pub mod keys;
mod lapsed;
mod membership;
mod redis;
mod sealed;

pub use coordination::{Acquired, Coordinator, Leader, Liveness, NodeStatus, Renewal};
pub use membership::{Member, Membership, SeenNode};
pub use redis::RedisCoordinator;

use lapsed::LapsedLeases;

use crate::api::tls::Peers;
use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::order::OrderId;
use crate::pipeline::{Gate, Pool};
use crate::secret::constant_time_eq;
use crate::service::Runners;
use crate::store::{OrderStore, PURGE_BATCH};
use futures_util::StreamExt;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, info_span, warn, Instrument, Span};

/// How many orders one page of a new leader's index repair reads; a pause follows each page,
/// so the repair's load stays bounded however many orders the store holds.
const REPAIR_PAGE: usize = 1_000;
/// The pause after each page of the index repair.
const REPAIR_PAUSE: Duration = Duration::from_millis(50);
/// The most finished orders whose index entries one retention pass takes out once their
/// retention ran out (in script calls of [`PURGE_BATCH`]); more wait for the next pass.
const PURGE_PER_PASS: usize = 10_000;

/// The longest wait to connect to a peer asked to take orders over.
const TRANSFER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long telling a peer of a cancel may take; it is best effort.
const CANCEL_TELL_TIMEOUT: Duration = Duration::from_secs(2);

/// The most peers told of cancels at once; past it a cancel is not told (the order's stored
/// flag still stops it at its next commit), so repeated cancels cannot pile up connections.
const CANCEL_TELLS: usize = 32;

/// Where a peer is told of a cancel (see [`Cluster::note_cancel`]).
pub const CANCELS_PATH: &str = "/service/cancels";

/// How long a peer asked to take orders over has to answer before the next one is asked too
/// (a transfer is answered in tens of milliseconds, also under load).
const TRANSFER_HEDGE: Duration = Duration::from_millis(500);
/// How long past the leader lease's expiry, by the store's clock, a follower tries to take it.
const LEASE_EXPIRY_MARGIN: Duration = Duration::from_millis(25);

/// Header that carries the cluster secret on cluster-internal calls.
pub const SECRET_HEADER: &str = "x-cluster-secret";

/// This node's current leader term, if any.
#[derive(Clone, Debug)]
struct Term {
    holder: String,
    token: u64,
    until: Instant,
}

/// Why a transfer request was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("a node cannot take over its own orders")]
    OwnOrders,
    #[error("node {0} is alive")]
    Alive(String),
    #[error("this node is stopping")]
    Stopping,
    #[error("fencing token {given} is older than the current {current}")]
    StaleLeader { given: u64, current: u64 },
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// What a transfer did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Transferred {
    pub current_service_id: String,
    pub transferred_service_id: String,
    pub orders: usize,
}

pub struct Cluster {
    node_id: String,
    /// This process's liveness lease.
    liveness: Liveness,
    advertise: SocketAddr,
    config: ClusterConfig,
    /// The leases and the node registry.
    coordinator: Arc<dyn Coordinator>,
    /// The orders, for their takeover, hand-over and index repair.
    store: Arc<dyn OrderStore>,
    pool: Arc<Pool>,
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
    membership: tokio::sync::Mutex<Option<Membership>>,
    term: Mutex<Option<Term>>,
    /// Since when this term has seen each node without its liveness lease.
    lapsed: Mutex<LapsedLeases>,
    /// Since when this node has renewed its own liveness lease without a miss (none while it
    /// cannot): a leader just back from losing Redis itself does not trust peers' lapses early.
    held_since: Mutex<Option<Instant>>,
    http: reqwest::Client,
    /// How peers are called: http, or https when this node serves it.
    peers: Peers,
    stop_tx: watch::Sender<bool>,
    /// Set when the node starts draining: it gives up the leader lease at once and takes it no
    /// more, so a peer leads (and sweeps) while this node finishes its steps.
    leaving_tx: watch::Sender<bool>,
    /// Wakes the sweep when this node begins a leader term.
    new_term: tokio::sync::Notify,
    /// Room for peers being told of cancels (see [`CANCEL_TELLS`]).
    cancel_tells: tokio::sync::Semaphore,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Cluster {
    /// Joins the cluster: starts gossip on the HTTP port number and the lease and sweep tasks.
    /// Orders this node owns are resumed once its liveness lease is in place. `generation` tells
    /// this process from the node's earlier ones in gossip: it must be higher than theirs.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        node_id: String,
        generation: u64,
        listen: SocketAddr,
        advertise: SocketAddr,
        config: ClusterConfig,
        coordinator: Arc<dyn Coordinator>,
        store: Arc<dyn OrderStore>,
        pool: Arc<Pool>,
        gate: Arc<Gate>,
        metrics: Arc<Metrics>,
        peers: Peers,
    ) -> anyhow::Result<Arc<Cluster>> {
        let initial = vec![
            (keys::HTTP_ADDR.to_string(), advertise.to_string()),
            (keys::VERSION.to_string(), crate::about::VERSION.to_string()),
            (keys::INFLIGHT.to_string(), "0".to_string()),
            (
                keys::STARTED_AT.to_string(),
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ),
        ];
        let liveness = Liveness {
            node: node_id.clone(),
            // Unique to this process, so that two processes with one node id never pass for one.
            holder: format!(
                "{node_id}:{generation}-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            http_addr: advertise.to_string(),
        };
        claim_identity(coordinator.as_ref(), &liveness, &config, &gate).await?;
        let membership = Membership::start(
            &node_id, generation, listen, advertise, &config, initial, &metrics,
        )
        .await?;
        // Peers close idle connections after limits.header_read_timeout (10 s by default); drop
        // ours sooner so a transfer never goes out on a connection being closed.
        // A peer cut off from this node is given up on after a second's connect, not the whole
        // transfer timeout, so the next candidate takes the orders over sooner.
        let http = peers
            .client(reqwest::Client::builder())
            .timeout(config.transfer_timeout)
            .connect_timeout(config.transfer_timeout.min(TRANSFER_CONNECT_TIMEOUT))
            .pool_idle_timeout(Duration::from_secs(5))
            .build()?;
        let (stop_tx, _) = watch::channel(false);
        let (leaving_tx, _) = watch::channel(false);
        let cluster = Arc::new(Cluster {
            liveness,
            node_id,
            advertise,
            config,
            coordinator,
            store,
            pool,
            gate,
            metrics,
            membership: tokio::sync::Mutex::new(Some(membership)),
            term: Mutex::new(None),
            lapsed: Mutex::new(LapsedLeases::default()),
            held_since: Mutex::new(None),
            http,
            peers,
            stop_tx,
            leaving_tx,
            new_term: tokio::sync::Notify::new(),
            cancel_tells: tokio::sync::Semaphore::new(CANCEL_TELLS),
            tasks: Mutex::new(Vec::new()),
        });
        let tasks = vec![
            spawn_in(info_span!("liveness"), Arc::clone(&cluster).keep_alive()),
            spawn_in(
                info_span!("leadership"),
                Arc::clone(&cluster).keep_leadership(),
            ),
            spawn_in(info_span!("sweep"), Arc::clone(&cluster).sweep()),
            spawn_in(info_span!("retention"), Arc::clone(&cluster).retain()),
            spawn_in(
                info_span!("gossip"),
                Arc::clone(&cluster).publish_inflight(),
            ),
        ];
        if let Ok(mut slot) = cluster.tasks.lock() {
            slot.extend(tasks);
        }
        Ok(cluster)
    }

    /// Whether `given` is the cluster secret.
    pub fn secret_matches(&self, given: &str) -> bool {
        constant_time_eq(given.as_bytes(), self.config.secret.as_bytes())
    }

    /// Sleeps `period`; true when the cluster began stopping meanwhile.
    async fn pause(&self, period: Duration) -> bool {
        let mut stop_rx = self.stop_tx.subscribe();
        if *stop_rx.borrow() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => false,
            _ = stop_rx.changed() => true,
        }
    }

    /// Renews this node's liveness lease; the first success registers the node and resumes the
    /// orders it owns.
    async fn keep_alive(self: Arc<Self>) {
        let ttl = self.config.liveness_ttl;
        let mut registered = false;
        // Whether this process has held the lease: taken at start, unless the store was out
        // of reach then.
        let mut held_once = self.gate.is_open();
        let mut held_by_another = false;
        let mut failing = false;
        let mut announced = false;
        loop {
            let sent = Instant::now();
            let held = match self.coordinator.renew_alive(&self.liveness, ttl).await {
                Ok(Renewal::HeldBy(holder)) => {
                    // Not ours, whatever this node's clock says: no step starts from now.
                    self.gate.lapsed();
                    // Said once, also when the store was out of reach before.
                    if !held_by_another {
                        error!(holder = %holder, "another process holds this node id's liveness lease; no new steps start while it does");
                        held_by_another = true;
                    }
                    false
                }
                Ok(renewal @ (Renewal::Held | Renewal::Taken)) => {
                    held_by_another = false;
                    if renewal == Renewal::Taken && held_once && !failing {
                        // Gone from the store while this node's clock said it held (the store's
                        // clock ran ahead, or this host was suspended): its orders may have been
                        // taken over, so each is read again before its next step.
                        warn!("liveness lease was gone from the store before it ran out here; orders are read again before their next step");
                    }
                    if renewal == Renewal::Taken {
                        self.gate.lapsed();
                    }
                    self.gate.renewed(sent + ttl);
                    if failing && held_once {
                        info!("liveness lease renewed again");
                    } else if failing {
                        info!("liveness lease taken; the node id is free again");
                    }
                    held_once = true;
                    if !registered {
                        registered = self.register().await;
                    }
                    true
                }
                Err(error) => {
                    if !failing {
                        warn!(error = %error, "cannot renew liveness lease; no new steps start until it is renewed");
                    }
                    false
                }
            };
            if held == failing || !announced {
                // Peers learn it by gossip: the leader takes a node that says so over as soon
                // as the store shows its lease expired.
                self.announce_lease(held).await;
                announced = true;
            }
            failing = !held;
            if self.pause(self.config.liveness_renew_interval).await {
                return;
            }
        }
    }

    /// Tells peers whether this node holds its liveness lease, and notes since when it has.
    async fn announce_lease(&self, held: bool) {
        if let Ok(mut since) = self.held_since.lock() {
            *since = if held {
                Some(since.unwrap_or_else(Instant::now))
            } else {
                None
            };
        }
        let membership = self.membership.lock().await;
        if let Some(membership) = membership.as_ref() {
            let value = if held { "held" } else { "lost" };
            membership.set(keys::LEASE, value.to_string()).await;
        }
    }

    /// Whether this node has held its own liveness lease for at least `period`.
    fn held_for(&self, period: Duration) -> bool {
        self.held_since
            .lock()
            .ok()
            .and_then(|since| *since)
            .is_some_and(|since| since.elapsed() >= period)
    }

    /// Registers the node and queues the unfinished orders it owns; false to try again later.
    async fn register(&self) -> bool {
        if let Err(error) = self
            .coordinator
            .register_node(&self.node_id, &self.liveness.http_addr)
            .await
        {
            warn!(error = %error, "cannot register node");
            return false;
        }
        let _adopting = self.pool.adopting();
        match self.store.owned_unfinished(&self.node_id).await {
            Ok(ids) => {
                if !ids.is_empty() {
                    info!(orders = ids.len(), "resuming unfinished orders");
                }
                self.pool.resume_all(ids);
                true
            }
            Err(error) => {
                warn!(error = %error, "cannot list own unfinished orders");
                false
            }
        }
    }

    /// True while this node holds a current leader term.
    pub fn is_leader(&self) -> bool {
        self.term
            .lock()
            .ok()
            .and_then(|term| term.as_ref().map(|term| Instant::now() < term.until))
            .unwrap_or(false)
    }

    fn current_term(&self) -> Option<Term> {
        self.term
            .lock()
            .ok()
            .and_then(|term| term.clone())
            .filter(|term| Instant::now() < term.until)
    }

    fn set_term(&self, term: Option<Term>) {
        if let Ok(mut slot) = self.term.lock() {
            *slot = term;
        }
    }

    /// Takes the leader lease when it is free and renews it while held. Leader duties stop the
    /// moment a renewal fails or the lease runs out locally.
    async fn keep_leadership(self: Arc<Self>) {
        let ttl = self.config.leader_lease_ttl;
        let mut leaving_rx = self.leaving_tx.subscribe();
        // The term whose renewal failed or that ran out here before it was renewed: Redis may
        // still hold its lease, which then keeps anyone else (a new term of this node too) from
        // leading until it expires. It is renewed again first.
        let mut unsure: Option<Term> = None;
        loop {
            let sent = Instant::now();
            // A follower tries again as soon as the holder's lease runs out, when that is sooner.
            let mut wait = self.config.leader_renew_interval;
            if *leaving_rx.borrow_and_update() {
                self.step_down().await;
                // A term whose renewal got no answer may still hold the lease in Redis: it is
                // released too (only by its holder), so a peer leads now, not once it expires.
                if let Some(term) = unsure.take() {
                    match self.coordinator.release_leader(&term.holder).await {
                        Ok(()) => {
                            info!(token = term.token, "leaving: unsure leader lease released")
                        }
                        Err(error) => {
                            warn!(token = term.token, error = %error, "cannot release leader lease; it expires on its own")
                        }
                    }
                }
                if self.pause(self.config.leader_renew_interval).await {
                    return;
                }
                continue;
            }
            match self.current_term() {
                Some(term) => match self.coordinator.renew_leader(&term.holder, ttl).await {
                    Ok(true) => self.set_term(Some(Term {
                        until: sent + ttl,
                        ..term
                    })),
                    Ok(false) => {
                        self.set_term(None);
                        self.metrics.leadership_changed(false);
                        info!(token = term.token, "leader -> follower: lease lost");
                    }
                    Err(error) => {
                        self.set_term(None);
                        self.metrics.leadership_changed(false);
                        info!(token = term.token, error = %error, "leader -> follower: cannot renew lease");
                        unsure = Some(term);
                    }
                },
                None => {
                    let lapsed = self.term.lock().ok().and_then(|mut term| term.take());
                    if let Some(term) = lapsed {
                        self.metrics.leadership_changed(false);
                        info!(
                            token = term.token,
                            "leader -> follower: lease expired before renewal"
                        );
                        unsure = Some(term);
                    }
                    let renewed = match unsure.take() {
                        Some(term) if self.gate.is_open() => {
                            match self.coordinator.renew_leader(&term.holder, ttl).await {
                                Ok(true) => Some(term),
                                Ok(false) => None,
                                // Redis may still hold it: try again next time.
                                Err(error) => {
                                    debug!(token = term.token, error = %error, "cannot renew the leader lease again");
                                    unsure = Some(term);
                                    None
                                }
                            }
                        }
                        other => {
                            unsure = other;
                            None
                        }
                    };
                    if let Some(term) = renewed {
                        // The same term, never taken by anyone else meanwhile: its fencing
                        // token stays current, and its index repair is done.
                        let token = term.token;
                        self.set_term(Some(Term {
                            until: sent + ttl,
                            ..term
                        }));
                        self.metrics.leadership_changed(true);
                        info!(token, "follower -> leader: lease renewed again");
                    } else if self.gate.is_open() && unsure.is_none() {
                        let holder = format!("{}:{}", self.node_id, uuid::Uuid::new_v4().simple());
                        match self.coordinator.acquire_leader(&holder, ttl).await {
                            Ok(Acquired::Term(token)) => {
                                self.set_term(Some(Term {
                                    holder,
                                    token,
                                    until: sent + ttl,
                                }));
                                self.metrics.leadership_changed(true);
                                info!(token, "follower -> leader");
                                let (store, coordinator) =
                                    (Arc::clone(&self.store), Arc::clone(&self.coordinator));
                                let cluster = Arc::downgrade(&self);
                                let leading = move || {
                                    cluster.upgrade().is_some_and(|cluster| cluster.is_leader())
                                };
                                tokio::spawn(async move {
                                    repair(store.as_ref(), coordinator.as_ref(), leading).await;
                                });
                                self.new_term.notify_one();
                            }
                            Ok(Acquired::HeldFor(left)) => {
                                wait = wait.min(left + LEASE_EXPIRY_MARGIN);
                            }
                            Err(error) => debug!(error = %error, "cannot try the leader lease"),
                        }
                    }
                }
            }
            let mut stop_rx = self.stop_tx.subscribe();
            if *stop_rx.borrow() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop_rx.changed() => return,
                _ = leaving_rx.changed() => {}
            }
        }
    }

    /// Gives up the leader lease, if held, so that a peer can take it at once.
    async fn step_down(&self) {
        let Some(term) = self.current_term() else {
            return;
        };
        self.set_term(None);
        self.metrics.leadership_changed(false);
        match self.coordinator.release_leader(&term.holder).await {
            Ok(()) => info!(token = term.token, "leader -> follower: lease released"),
            Err(error) => {
                warn!(token = term.token, error = %error, "cannot release leader lease; it expires on its own")
            }
        }
    }

    /// The leader's sweep: finds nodes that are dead (not live in gossip, liveness lease expired)
    /// yet own orders, and has a live node take them over. Deaths while there was no leader and
    /// whole-cluster restarts are caught the same way.
    async fn sweep(self: Arc<Self>) {
        loop {
            // A new term sweeps at once: a leader that took over from a dead one has its orders
            // to move.
            tokio::select! {
                stopped = self.pause(self.config.sweep_interval) => if stopped {
                    return;
                },
                _ = self.new_term.notified() => {}
            }
            let Some(term) = self.current_term() else {
                if let Err(error) = self.backstop_once().await {
                    debug!(error = %error, "follower's look behind the leader failed");
                }
                continue;
            };
            if let Err(error) = self.sweep_once(term.token).await {
                warn!(error = %error, "sweep failed");
            }
        }
    }

    /// Runs the leader's [`purge_expired`](Cluster::purge_expired) each `cluster.sweep_interval`,
    /// apart from the sweep: a pass that takes long (a shard at a time, on a store that fsyncs
    /// every write) never holds a takeover up.
    async fn retain(self: Arc<Self>) {
        loop {
            if self.pause(self.config.sweep_interval).await {
                return;
            }
            if self.is_leader() {
                self.purge_expired().await;
            }
        }
    }

    /// The leader's retention pass: takes out the index entries of orders whose retention ran
    /// out, at most [`PURGE_PER_PASS`] of them, from the oldest due.
    async fn purge_expired(&self) {
        let mut through = 0;
        while through < PURGE_PER_PASS {
            match self.store.purge_expired(PURGE_BATCH).await {
                Ok(taken) => {
                    through += taken;
                    if taken < PURGE_BATCH {
                        break;
                    }
                }
                Err(error) => {
                    warn!(error = %error, "retention pass failed");
                    break;
                }
            }
        }
        if through > 0 {
            debug!(
                orders = through,
                "retention pass took out index entries of expired orders"
            );
        }
    }

    async fn sweep_once(self: &Arc<Self>, token: u64) -> Result<(), crate::store::StoreError> {
        let live = self.live_members().await;
        let live_ids: HashSet<&str> = live.iter().map(|member| member.node_id.as_str()).collect();
        // Peers that say they cannot renew their lease, trusted once this node has renewed its
        // own without a miss for a lease's length: after an outage of the store itself every
        // lease lapsed and every node said so, and each gets the time to renew and say so.
        let trust_lost = self.held_for(self.config.liveness_ttl);
        let lease_lost: HashSet<&str> = live
            .iter()
            .filter(|member| trust_lost && member.lease_lost)
            .map(|member| member.node_id.as_str())
            .collect();
        // Every registered node, gossip-live or not: the liveness lease is the authority, gossip
        // only makes a takeover sooner.
        let mut known = self.registered_peers().await?;
        let registered = known.len();
        // Forgotten nodes are looked at too, in the same reads: one that owns orders (a create
        // that landed after it was forgotten) is registered again and taken over like any other.
        for node in self.coordinator.forgotten_nodes().await? {
            if node != self.node_id && !known.contains(&node) {
                known.push(node);
            }
        }
        if known.is_empty() {
            return Ok(());
        }
        let statuses = self.coordinator.node_status(&known).await?;
        for (
            at,
            (
                node,
                NodeStatus {
                    alive,
                    owned,
                    lapsed,
                },
            ),
        ) in known.iter().zip(statuses).enumerate()
        {
            if at >= registered {
                if owned == 0 || alive {
                    continue;
                }
                self.coordinator.remember_node(node).await?;
                warn!(node = %node, orders = owned, "orders landed as a forgotten node's own; registered it again to take them over");
            }
            let seen = self
                .lapsed
                .lock()
                .map(|mut lapsed| lapsed.observe(token, node, alive, Instant::now()))
                .unwrap_or_default();
            // Redis's clock tells since when, also to a leader new in office; what this leader
            // saw itself is the floor, should that clock step back.
            let lapsed = lapsed.map_or(seen, |lapsed| lapsed.max(seen));
            let gossip_live = live_ids.contains(node.as_str());
            let says_lost = lease_lost.contains(node.as_str());
            debug!(node = %node, alive, owned, gossip_live, says_lost, lapsed_ms = u64::try_from(lapsed.as_millis()).unwrap_or(u64::MAX), "sweep looked at a node");
            let seen_by = Seen {
                alive,
                gossip_live,
                says_lost,
                lapsed,
            };
            if !seen_by.dead(trust_lost, self.config.takeover_after) {
                continue;
            }
            if owned == 0 {
                // Kept a while: an order can still land as its own (a create sent before the
                // lapse, delayed on a bad link), and the sweep looks only at registered nodes.
                if !gossip_live && lapsed >= self.config.forget_after {
                    self.coordinator.forget_node(node).await?;
                    if let Ok(mut lapsed) = self.lapsed.lock() {
                        lapsed.forget(node);
                    }
                    debug!(node = %node, "forgot a dead node that owns no orders");
                }
                continue;
            }
            if !self.is_leader() {
                return Ok(());
            }
            if says_lost {
                warn!(node = %node, orders = owned, "node cannot renew its liveness lease and the lease expired; transferring its orders");
            } else if gossip_live {
                warn!(node = %node, orders = owned, lapsed_ms = u64::try_from(lapsed.as_millis()).unwrap_or(u64::MAX), "liveness lease expired for longer than cluster.takeover_after while gossip calls the node live; transferring its orders");
            } else {
                info!(node = %node, orders = owned, "node is dead and owns orders, transferring them");
            }
            self.transfer_to_best(node, token, &live).await;
        }
        Ok(())
    }

    /// A follower's look behind the leader, each `cluster.sweep_interval`: a node whose liveness
    /// lease has stayed expired, by the store's clock, for [`Seen::left_behind`] (two sweeps
    /// past when a leader would have moved its orders) has them taken over by this node itself.
    /// The leader may be unable to act (paused, cut from Redis, just dead) while its lease
    /// still runs; a takeover does not wait for that lease. A racing leader is harmless: each
    /// order moves by its own compare-and-set, and each taker resumes what it moved.
    async fn backstop_once(&self) -> Result<(), crate::store::StoreError> {
        // Judged only by a node that can run what it takes, and that has held its own lease for
        // a lease's length (after an outage of the store, every lease lapsed at once).
        if !self.gate.is_open()
            || self.pool.is_stopping()
            || !self.held_for(self.config.liveness_ttl)
        {
            return Ok(());
        }
        let known = self.registered_peers().await?;
        let lapses = self.coordinator.lease_lapses(&known).await?;
        let (gossip_live, lease_lost): (HashSet<String>, HashSet<String>) = {
            let live = self.live_members().await;
            (
                live.iter().map(|member| member.node_id.clone()).collect(),
                live.into_iter()
                    .filter(|member| member.lease_lost)
                    .map(|member| member.node_id)
                    .collect(),
            )
        };
        let grace = self.config.sweep_interval * 2;
        let behind: Vec<String> = known
            .into_iter()
            .zip(lapses)
            .filter_map(|(node, lapsed)| {
                let seen = Seen {
                    alive: false,
                    gossip_live: gossip_live.contains(&node),
                    says_lost: lease_lost.contains(&node),
                    lapsed: lapsed?,
                };
                seen.left_behind(self.config.takeover_after, grace)
                    .then_some(node)
            })
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        let statuses = self.coordinator.node_status(&behind).await?;
        for (node, status) in behind.iter().zip(statuses) {
            if status.alive || status.owned == 0 {
                continue;
            }
            let lapsed_ms = status.lapsed.map_or(0, |lapsed| {
                u64::try_from(lapsed.as_millis()).unwrap_or(u64::MAX)
            });
            warn!(node = %node, orders = status.owned, lapsed_ms, "liveness lease expired and the leader has not moved the node's orders; taking them over");
            if let Err(error) = self.take_over(node).await {
                warn!(node = %node, error = %error, "takeover behind the leader failed");
            }
        }
        Ok(())
    }

    /// Every node in the registry but this one.
    async fn registered_peers(&self) -> Result<Vec<String>, crate::store::StoreError> {
        Ok(self
            .coordinator
            .known_nodes()
            .await?
            .into_iter()
            .map(|(node, _)| node)
            .filter(|node| node != &self.node_id)
            .collect())
    }

    /// Live members that can take work: this node included, draining ones excluded.
    async fn live_members(&self) -> Vec<Member> {
        let membership = self.membership.lock().await;
        let mut live = membership.as_ref().map(|m| m.live()).unwrap_or_default();
        if !live.iter().any(|member| member.node_id == self.node_id) && !self.pool.is_stopping() {
            live.push(Member {
                node_id: self.node_id.clone(),
                generation: 0,
                http_addr: Some(self.advertise),
                version: Some(crate::about::VERSION.to_string()),
                inflight: self.pool.inflight(),
                started_at: None,
                lease_lost: false,
            });
        }
        live
    }

    /// Asks live members, in [`takeover_order`], to take over `dead`'s orders. A member that
    /// has not answered within [`TRANSFER_HEDGE`] (a process paused, or killed a moment ago
    /// with its lease still running and its port taken by its successor) is not waited for:
    /// the next one is asked too, while the first may still answer. Each order moves by its own
    /// compare-and-set, so the two share the orders between them and each resumes what it took.
    async fn transfer_to_best(self: &Arc<Self>, dead: &str, token: u64, live: &[Member]) -> bool {
        let mut candidates: Vec<&Member> = live
            .iter()
            .filter(|member| member.node_id != dead)
            .filter(|member| member.node_id != self.node_id || !self.pool.is_stopping())
            .collect();
        takeover_order(&mut candidates);
        let mut next = self.leased(candidates).await.into_iter();
        let hedge = self.config.transfer_timeout.min(TRANSFER_HEDGE);
        let mut asked = futures_util::stream::FuturesUnordered::new();
        loop {
            if asked.is_empty() {
                match next.next() {
                    Some(member) => asked.push(self.ask_to_take_over(member, dead, token)),
                    None => return false,
                }
            }
            tokio::select! {
                Some(answer) = asked.next() => {
                    // A task that panicked or was cancelled took nothing it did not resume.
                    if answer.unwrap_or(false) {
                        return true;
                    }
                }
                _ = tokio::time::sleep(hedge), if next.len() > 0 => {
                    if let Some(member) = next.next() {
                        info!(from = %dead, to = %member.node_id, waited_ms = u64::try_from(hedge.as_millis()).unwrap_or(u64::MAX), "no answer to the transfer yet; asking the next node too");
                        asked.push(self.ask_to_take_over(member, dead, token));
                    }
                }
            }
        }
    }

    /// Asks `member` (this node itself, or a peer over HTTP) to take over `dead`'s orders, as a
    /// task of its own: it runs to its end (and logs how it went) also once another member has
    /// answered first.
    fn ask_to_take_over(
        self: &Arc<Self>,
        member: &Member,
        dead: &str,
        token: u64,
    ) -> JoinHandle<bool> {
        let this = Arc::clone(self);
        let (member, dead) = (member.clone(), dead.to_string());
        let asking = async move {
            let outcome = if member.node_id == this.node_id {
                this.accept_transfer(&dead, Some(token), false)
                    .await
                    .map_err(|error| error.to_string())
            } else {
                match member.http_addr {
                    Some(addr) => this.request_transfer(addr, &dead, Some(token), false).await,
                    None => Err("no http address in gossip".to_string()),
                }
            };
            match outcome {
                Ok(done) => {
                    info!(from = %dead, to = %done.current_service_id, orders = done.orders, "orders transferred");
                    true
                }
                Err(error) => {
                    warn!(from = %dead, to = %member.node_id, error = %error, "transfer failed, trying the next node");
                    false
                }
            }
        };
        tokio::spawn(asking.instrument(Span::current()))
    }

    /// Of `members` (order kept), this node and the peers that hold their liveness lease in the
    /// store under the HTTP address gossip gives for them. A transfer request carries the
    /// cluster secret, and gossip may be plain (`cluster.gossip_seal` easing onto sealing): a
    /// host that merely advertises itself (or a real node's id at another address) gets nothing.
    async fn leased<'a>(&self, members: Vec<&'a Member>) -> Vec<&'a Member> {
        let peers: Vec<String> = members
            .iter()
            .filter(|member| member.node_id != self.node_id)
            .map(|member| member.node_id.clone())
            .collect();
        let checked = async {
            let registered: HashMap<String, String> =
                self.coordinator.known_nodes().await?.into_iter().collect();
            let statuses = self.coordinator.node_status(&peers).await?;
            Ok::<_, crate::store::StoreError>((registered, statuses))
        };
        let (registered, statuses) = match checked.await {
            Ok(checked) => checked,
            Err(error) => {
                warn!(error = %error, "cannot check peers' liveness leases; no peer is sent a transfer");
                (HashMap::new(), Vec::new())
            }
        };
        let alive: HashSet<&str> = peers
            .iter()
            .zip(statuses)
            .filter(|(_, status)| status.alive)
            .map(|(node, _)| node.as_str())
            .collect();
        members
            .into_iter()
            .filter(|member| {
                let registered_here = || {
                    registered
                        .get(&member.node_id)
                        .and_then(|addr| addr.parse::<SocketAddr>().ok())
                        .is_some_and(|addr| member.http_addr == Some(addr))
                };
                let keep = member.node_id == self.node_id
                    || (alive.contains(member.node_id.as_str()) && registered_here());
                if !keep {
                    warn!(node = %member.node_id, addr = ?member.http_addr, "gossip member holds no liveness lease at that address; not sent a transfer");
                }
                keep
            })
            .collect()
    }

    async fn request_transfer(
        &self,
        addr: SocketAddr,
        dead: &str,
        token: Option<u64>,
        handover: bool,
    ) -> Result<Transferred, String> {
        let response = self
            .http
            .post(self.peers.url(addr, "/service/transfer"))
            .header(SECRET_HEADER, &self.config.secret)
            .json(&serde_json::json!({ "service_id": dead, "fence": token, "handover": handover }))
            .send()
            .await
            .map_err(|error| error.to_string())?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(format!("{status}: {text}"));
        }
        response
            .json::<Transferred>()
            .await
            .map_err(|error| error.to_string())
    }

    /// Takes over `dead`'s unfinished orders: one owner compare-and-set per order, then each is
    /// queued to resume at its current step.
    /// `handover` marks a draining node handing over its own orders: it has released its
    /// liveness lease, but peers may not have gossiped its `leaving` flag yet.
    pub async fn accept_transfer(
        &self,
        dead: &str,
        token: Option<u64>,
        handover: bool,
    ) -> Result<Transferred, TransferError> {
        if dead == self.node_id {
            return Err(TransferError::OwnOrders);
        }
        // Orders moved here now would not run: they would wait for the sweep after this node
        // is gone.
        if self.pool.is_stopping() {
            return Err(TransferError::Stopping);
        }
        if self.coordinator.is_alive(dead).await? {
            return Err(TransferError::Alive(dead.to_string()));
        }
        if let Some(given) = token {
            let current = self.coordinator.leader().await?.fence;
            if given < current {
                return Err(TransferError::StaleLeader { given, current });
            }
        }
        // A leader's request (with its token) is decided on the liveness lease, checked above;
        // gossip may still call a node live that has been cut off from the store.
        let live = !handover && token.is_none() && {
            let membership = self.membership.lock().await;
            membership.as_ref().is_some_and(|m| m.is_live(dead))
        };
        if live {
            return Err(TransferError::Alive(dead.to_string()));
        }
        self.take_over(dead).await
    }

    /// Moves `dead`'s unfinished orders to this node and queues them, once whoever decided it
    /// checked that `dead`'s liveness lease is not held.
    async fn take_over(&self, dead: &str) -> Result<Transferred, TransferError> {
        let _adopting = self.pool.adopting();
        let ids = match self.store.reassign(dead, &self.node_id).await {
            Ok(ids) => ids,
            Err(error) => {
                self.resume_after_failed_takeover(dead).await;
                return Err(error.into());
            }
        };
        info!(from = %dead, orders = ids.len(), "took over orders");
        let orders = ids.len();
        self.metrics.transfer_accepted(orders);
        self.pool.resume_all(ids);
        Ok(Transferred {
            current_service_id: self.node_id.clone(),
            transferred_service_id: dead.to_string(),
            orders,
        })
    }

    /// After a takeover that failed part-way: the orders it moved (a store call that timed out
    /// may have moved some too) are in this node's owned set, so that set is read again and what
    /// nothing here runs is resumed now, not at the next reconciliation. The leader asks again
    /// for the rest.
    async fn resume_after_failed_takeover(&self, dead: &str) {
        match self.store.owned_unfinished(&self.node_id).await {
            Ok(owned) => {
                let idle: Vec<_> = owned
                    .into_iter()
                    .filter(|id| !self.pool.is_active(*id))
                    .collect();
                warn!(from = %dead, orders = idle.len(), "takeover failed part-way; resuming what it moved");
                self.pool.resume_all(idle);
            }
            Err(error) => {
                warn!(from = %dead, error = %error, "takeover failed part-way and own orders cannot be listed; reconciliation resumes them");
            }
        }
    }

    /// Keeps this node's in-flight count in gossip, for the leader's choice of takeover target.
    async fn publish_inflight(self: Arc<Self>) {
        let mut last = usize::MAX;
        loop {
            let inflight = self.pool.inflight();
            if inflight != last {
                let membership = self.membership.lock().await;
                if let Some(membership) = membership.as_ref() {
                    membership.set(keys::INFLIGHT, inflight.to_string()).await;
                }
                last = inflight;
            }
            if self.pause(self.config.gossip_interval).await {
                return;
            }
        }
    }

    /// Order `id` was asked to stop through another node: if it runs here and its stored
    /// record says so, it stops after its running step (or wakes from a retry wait to roll
    /// back). A word that the store does not bear out is ignored. True when noted.
    pub async fn note_cancel(&self, id: OrderId) -> Result<bool, crate::store::StoreError> {
        if !self.pool.is_active(id) {
            return Ok(false);
        }
        let stored = self.store.get(id).await?;
        if !stored.is_some_and(|order| order.cancel_requested) {
            return Ok(false);
        }
        self.pool.note_cancel(id);
        Ok(true)
    }

    /// The cluster view: every node gossip knows, with its role; and the leader's node id.
    pub async fn view(&self) -> (Option<String>, Vec<SeenNode>) {
        let nodes = {
            let membership = self.membership.lock().await;
            match membership.as_ref() {
                Some(membership) => membership.all().await,
                None => Vec::new(),
            }
        };
        let leader = match self.coordinator.leader().await {
            Ok(leader) => leader.node().map(str::to_string),
            Err(_) => self.is_leader().then(|| self.node_id.clone()),
        };
        (leader, nodes)
    }

    /// Drains the node: announce leaving and give up the leader lease, let running steps finish
    /// (up to `grace`), release the liveness lease, hand unfinished orders to a live peer, leave.
    pub async fn drain(&self, grace: Duration) {
        {
            let membership = self.membership.lock().await;
            if let Some(membership) = membership.as_ref() {
                membership.announce_leaving().await;
            }
        }
        // A leader that is leaving hands the leadership on now, not when its steps are done:
        // should this process be killed while it drains, no peer waits for the lease to expire.
        // `send_replace`, not `send`: with no task listening at this instant (each subscribes
        // only while it pauses), `send` would drop the value and no task would ever stop.
        self.leaving_tx.send_replace(true);
        self.pool.shutdown(grace).await;
        self.stop_tx.send_replace(true);
        let tasks: Vec<JoinHandle<()>> = self
            .tasks
            .lock()
            .map(|mut tasks| tasks.drain(..).collect())
            .unwrap_or_default();
        for task in tasks {
            let _ = task.await;
        }
        if let Err(error) = self.coordinator.release_alive(&self.liveness).await {
            warn!(error = %error, "cannot release liveness lease");
        }
        self.hand_over().await;
        self.step_down().await;
        let membership = self.membership.lock().await.take();
        if let Some(membership) = membership {
            // One more gossip round or two so peers see `leaving` before we go quiet.
            membership.shutdown(self.config.gossip_interval * 2).await;
        }
    }

    /// Gives this node's unfinished orders to the live peer with the fewest in flight.
    async fn hand_over(&self) {
        let owned = match self.store.owned_unfinished(&self.node_id).await {
            Ok(owned) => owned.len(),
            Err(error) => {
                warn!(error = %error, "cannot list unfinished orders to hand over; the leader will move them");
                return;
            }
        };
        if owned == 0 {
            return;
        }
        let peers: Vec<Member> = {
            let membership = self.membership.lock().await;
            membership
                .as_ref()
                .map(|m| m.live())
                .unwrap_or_default()
                .into_iter()
                .filter(|member| member.node_id != self.node_id)
                .collect()
        };
        let mut peers = peers;
        peers.sort_by_key(|member| member.inflight);
        for peer in self.leased(peers.iter().collect()).await {
            let Some(addr) = peer.http_addr else { continue };
            match self.request_transfer(addr, &self.node_id, None, true).await {
                Ok(done) => {
                    info!(to = %peer.node_id, orders = done.orders, "handed unfinished orders over");
                    return;
                }
                Err(error) => {
                    warn!(to = %peer.node_id, error = %error, "peer refused the hand-over, trying the next");
                }
            }
        }
        error!(
            orders = owned,
            "no live peer took the unfinished orders; the leader's sweep will move them"
        );
    }
}

/// Takes this node's liveness lease before the node joins: a node id names one process. While
/// another process holds it (a restart right after a crash, until the crashed process's lease
/// expires; or a copy of this node's data dir running elsewhere) this waits, and it refuses to
/// start when the lease is still held after two lease lifetimes. While the store cannot be
/// reached it waits the same way (the holder may be renewing again once it is back); a store
/// still unreachable then does not stop the start: the lease keeper keeps trying, and no step
/// starts meanwhile.
async fn claim_identity(
    coordinator: &dyn Coordinator,
    liveness: &Liveness,
    config: &ClusterConfig,
    gate: &Gate,
) -> anyhow::Result<()> {
    let ttl = config.liveness_ttl;
    let deadline = Instant::now() + ttl * 2 + config.liveness_renew_interval;
    let mut waiting = false;
    let mut unreachable = false;
    loop {
        let sent = Instant::now();
        match coordinator.renew_alive(liveness, ttl).await {
            Ok(Renewal::Held | Renewal::Taken) => {
                gate.renewed(sent + ttl);
                if waiting {
                    info!("liveness lease taken; the node id is free again");
                }
                return Ok(());
            }
            Ok(Renewal::HeldBy(holder)) if Instant::now() >= deadline => {
                anyhow::bail!(
                    "node id {} is in use by another process: its liveness lease is held by {holder} and kept renewed (a copied data dir? each node needs its own)",
                    liveness.node
                );
            }
            Ok(Renewal::HeldBy(holder)) => {
                if !waiting {
                    warn!(holder = %holder, "another process holds this node id's liveness lease; waiting for it to expire");
                    waiting = true;
                }
            }
            Err(error) if Instant::now() >= deadline => {
                warn!(error = %error, "cannot take the liveness lease at start; the lease keeper keeps trying");
                return Ok(());
            }
            Err(error) => {
                if !unreachable {
                    warn!(error = %error, "cannot reach the store to take the liveness lease; waiting");
                    unreachable = true;
                }
                // Whoever holds the lease when the store is back is known only then.
                waiting = true;
            }
        }
        tokio::time::sleep(
            config
                .liveness_renew_interval
                .min(Duration::from_millis(250)),
        )
        .await;
    }
}

/// What a sweep knows of a registered node.
struct Seen {
    /// It holds its liveness lease.
    alive: bool,
    /// Gossip calls it live.
    gossip_live: bool,
    /// It says in gossip that it cannot renew its lease (and this node trusts that now).
    says_lost: bool,
    /// How long its lease has been expired.
    lapsed: Duration,
}

impl Seen {
    /// Whether its orders are to be taken over. A node gossip calls live is, once its lease
    /// has been expired for `takeover_after`, but only when the sweeping node has held its
    /// own lease for a lease's length (`trusted`): after an outage of the store every lease
    /// lapsed while the store was away, and each live node gets the time to renew its own
    /// before it is judged by that lapse.
    fn dead(&self, trusted: bool, takeover_after: Duration) -> bool {
        if self.alive {
            return false;
        }
        !self.gossip_live || self.says_lost || (trusted && self.lapsed >= takeover_after)
    }

    /// Whether a follower takes its orders over itself: its lease has stayed expired `grace`
    /// past when a leader able to act would have moved them (at once when gossip calls it dead
    /// or it says it cannot renew, after `takeover_after` otherwise). The follower must trust
    /// lapses, as in [`Seen::dead`].
    fn left_behind(&self, takeover_after: Duration, grace: Duration) -> bool {
        if self.alive {
            return false;
        }
        let leader_would = if !self.gossip_live || self.says_lost {
            Duration::ZERO
        } else {
            takeover_after
        };
        self.lapsed >= leader_would + grace
    }
}

/// The order in which live members are asked to take a dead node's orders: those that say they
/// can renew their liveness lease first (one that cannot would fail its store calls, after
/// `database.timeout`), then the fewest orders in flight.
fn takeover_order(candidates: &mut [&Member]) {
    candidates.sort_by(|a, b| {
        (a.lease_lost, a.inflight, &a.node_id).cmp(&(b.lease_lost, b.inflight, &b.node_id))
    });
}

/// A new leader's repair of the store's indexes, a page of [`REPAIR_PAGE`] orders at a time
/// while `leading` says this node still leads. An owner of unfinished orders that the registry
/// does not know (lost, or forgotten in a race) is put back in it as soon as its page is read,
/// so the sweep takes its orders over once it is found dead.
async fn repair(store: &dyn OrderStore, coordinator: &dyn Coordinator, leading: impl Fn() -> bool) {
    let mut cursor = String::new();
    let mut orders = 0;
    let mut owners = BTreeSet::new();
    loop {
        if !leading() {
            debug!(orders, "index repair stopped: no longer the leader");
            return;
        }
        let (page, next) = match store.repair_indexes(&cursor, REPAIR_PAGE).await {
            Ok(page) => page,
            Err(error) => {
                warn!(error = %error, "index repair failed");
                return;
            }
        };
        orders += page.orders;
        for owner in page.owners {
            if owners.contains(&owner) {
                continue;
            }
            match coordinator.remember_node(&owner).await {
                Ok(true) => {
                    warn!(node = %owner, "an owner of unfinished orders was not registered; registered it so the sweep looks at it")
                }
                Ok(false) => {}
                Err(error) => {
                    warn!(node = %owner, error = %error, "cannot register an owner of unfinished orders")
                }
            }
            owners.insert(owner);
        }
        match next {
            Some(next) => cursor = next,
            None => break,
        }
        tokio::time::sleep(REPAIR_PAUSE).await;
    }
    debug!(orders, owners = owners.len(), "indexes repaired");
}

/// Runs one of the cluster's background tasks, its log lines under `span`.
fn spawn_in(span: Span, task: impl Future<Output = ()> + Send + 'static) -> JoinHandle<()> {
    tokio::spawn(task.instrument(span))
}

/// A cancel asked of this node for an order a peer runs is passed to that peer while it holds
/// its liveness lease, at the address it registered with it (never one gossip alone names: the
/// request carries the cluster secret).
#[async_trait::async_trait]
impl Runners for Cluster {
    async fn tell_cancelled(&self, owner: &str, id: OrderId) {
        let Ok(_telling) = self.cancel_tells.try_acquire() else {
            debug!(order_id = %id, owner = %owner, "too many cancels being told; left to the order's next commit");
            return;
        };
        let owners = [owner.to_string()];
        let found = async {
            let alive = self.coordinator.node_status(&owners).await?;
            if !alive.first().is_some_and(|status| status.alive) {
                return Ok(None);
            }
            let registered = self.coordinator.known_nodes().await?;
            Ok::<_, crate::store::StoreError>(
                registered
                    .into_iter()
                    .find(|(node, _)| node == owner)
                    .and_then(|(_, addr)| addr.parse::<SocketAddr>().ok()),
            )
        };
        let addr = match found.await {
            Ok(Some(addr)) => addr,
            // Not alive: whoever takes its orders over reads the cancel from the store.
            Ok(None) => return,
            Err(error) => {
                debug!(order_id = %id, owner = %owner, error = %error, "cannot find the node that runs a cancelled order");
                return;
            }
        };
        let sent = self
            .http
            .post(self.peers.url(addr, CANCELS_PATH))
            .header(SECRET_HEADER, &self.config.secret)
            .timeout(CANCEL_TELL_TIMEOUT)
            .json(&serde_json::json!({ "order_id": id }))
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => {}
            Ok(response) => {
                debug!(order_id = %id, owner = %owner, status = %response.status(), "node that runs a cancelled order refused to hear of it");
            }
            Err(error) => {
                debug!(order_id = %id, owner = %owner, error = %error, "cannot tell the node that runs a cancelled order");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{takeover_order, Member, Seen};
    use std::time::Duration;

    fn member(id: &str, inflight: usize, lease_lost: bool) -> Member {
        Member {
            node_id: id.to_string(),
            generation: 1,
            http_addr: None,
            version: None,
            inflight,
            started_at: None,
            lease_lost,
        }
    }

    fn peer(alive: bool, gossip_live: bool, says_lost: bool, lapsed_ms: u64) -> Seen {
        Seen {
            alive,
            gossip_live,
            says_lost,
            lapsed: Duration::from_millis(lapsed_ms),
        }
    }

    #[test]
    fn a_member_that_cannot_renew_its_lease_is_asked_last() {
        let (cut, busy, idle, also_idle) = (
            member("a", 0, true),
            member("b", 9, false),
            member("d", 1, false),
            member("c", 1, false),
        );
        let mut candidates = vec![&cut, &busy, &idle, &also_idle];
        takeover_order(&mut candidates);
        let order: Vec<&str> = candidates.iter().map(|m| m.node_id.as_str()).collect();
        assert_eq!(order, ["c", "d", "b", "a"]);
    }

    #[test]
    fn a_live_peer_whose_lease_lapsed_in_a_store_outage_gets_the_time_to_renew() {
        let after = Duration::from_secs(1);
        // Gossip calls it live, its lease expired 5 s ago while the store was away: not taken
        // while the sweeping node has only just renewed its own; taken once it has held it a
        // while.
        assert!(!peer(false, true, false, 5_000).dead(false, after));
        assert!(peer(false, true, false, 5_000).dead(true, after));
        assert!(!peer(false, true, false, 500).dead(true, after));
        // Dead in gossip, or saying it cannot renew: at once; holding its lease: never.
        assert!(peer(false, false, false, 0).dead(false, after));
        assert!(peer(false, true, true, 0).dead(false, after));
        assert!(!peer(true, false, true, 5_000).dead(true, after));
    }

    #[test]
    fn a_follower_takes_over_only_what_the_leader_left_for_two_sweeps() {
        let (after, grace) = (Duration::from_secs(1), Duration::from_secs(1));
        // Dead in gossip, or saying it cannot renew: the leader moves it at once, a follower
        // after the grace.
        assert!(!peer(false, false, false, 999).left_behind(after, grace));
        assert!(peer(false, false, false, 1_000).left_behind(after, grace));
        assert!(peer(false, true, true, 1_000).left_behind(after, grace));
        // Live in gossip: the leader waits `takeover_after`, a follower the grace more.
        assert!(!peer(false, true, false, 1_999).left_behind(after, grace));
        assert!(peer(false, true, false, 2_000).left_behind(after, grace));
        // Holding its lease: never.
        assert!(!peer(true, false, false, 60_000).left_behind(after, grace));
    }
}
