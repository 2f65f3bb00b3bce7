//! Membership and failure detection through chitchat gossip over UDP, on the same port number as
//! the HTTP API, sealed with the cluster secret ([`SealedUdp`]).

use super::keys::{self, NodeStateExt};
use super::sealed::SealedUdp;
use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use anyhow::Context;
use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState,
    ProtocolVersion,
};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// A live peer (or this node) as gossip sees it.
#[derive(Clone, Debug)]
pub struct Member {
    pub node_id: String,
    pub generation: u64,
    pub http_addr: Option<SocketAddr>,
    pub version: Option<String>,
    pub inflight: usize,
    pub started_at: Option<String>,
    /// The node says it cannot renew its liveness lease.
    pub lease_lost: bool,
}

impl Member {
    fn from_state(id: &ChitchatId, state: &NodeState) -> Member {
        Member {
            node_id: id.node_id.to_string(),
            generation: id.generation_id,
            http_addr: state.http_addr(),
            version: state.version().map(str::to_string),
            inflight: state.inflight(),
            started_at: state.started_at().map(str::to_string),
            lease_lost: state.lease_lost(),
        }
    }
}

/// A node that gossip has seen, live or not, for the cluster view.
#[derive(Clone, Debug)]
pub struct SeenNode {
    pub member: Member,
    pub live: bool,
    pub last_seen: DateTime<Utc>,
}

pub struct Membership {
    handle: ChitchatHandle,
    live_rx: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    /// Last time each node (by id) was seen live, kept by a watcher task.
    last_seen: Arc<Mutex<HashMap<String, DateTime<Utc>>>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Membership {
    pub async fn start(
        node_id: &str,
        generation: u64,
        gossip_addr: SocketAddr,
        advertise: SocketAddr,
        config: &ClusterConfig,
        initial: Vec<(String, String)>,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Membership> {
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(node_id.to_string(), generation, advertise),
            cluster_id: config.id.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr: gossip_addr,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: config.phi_threshold,
                sampling_window_size: 1000,
                max_interval: Duration::from_secs(10),
                initial_interval: config.initial_interval,
                dead_node_grace_period: config.dead_node_grace_period,
            },
            marked_for_deletion_grace_period: MARKED_FOR_DELETION,
            catchup_callback: None,
            // A draining node announces it is leaving; peers stop counting it as live at once.
            extra_liveness_predicate: Some(Box::new(|state: &NodeState| !state.is_leaving())),
            protocol_version: ProtocolVersion::V0,
        };
        let transport = SealedUdp::new(&config.secret, &config.id, config.gossip_seal)?
            .counting_drops(Arc::clone(metrics));
        let handle = spawn_chitchat(chitchat_config, initial, &transport)
            .await
            .with_context(|| format!("cannot start gossip on udp {gossip_addr}"))?;
        let live_rx = handle.chitchat().lock().await.live_nodes_watcher();
        let last_seen = Arc::new(Mutex::new(HashMap::new()));
        // Longer than gossip keeps a dead node: by then nothing asks when it was last seen.
        let kept = config.dead_node_grace_period + MARKED_FOR_DELETION + MARKED_FOR_DELETION;
        let watcher = tokio::spawn(watch_members(live_rx.clone(), Arc::clone(&last_seen), kept));
        Ok(Membership {
            handle,
            live_rx,
            last_seen,
            watcher,
        })
    }

    /// Live members, this node included once gossip has run a round, without leaving ones.
    pub fn live(&self) -> Vec<Member> {
        self.live_rx
            .borrow()
            .iter()
            .map(|(id, state)| Member::from_state(id, state))
            .collect()
    }

    /// Whether `node_id` is live (any generation).
    pub fn is_live(&self, node_id: &str) -> bool {
        self.live_rx
            .borrow()
            .keys()
            .any(|id| id.node_id.as_ref() == node_id)
    }

    /// Every node gossip knows of, live or dead, newest generation per node.
    pub async fn all(&self) -> Vec<SeenNode> {
        let live: Vec<ChitchatId> = self.live_rx.borrow().keys().cloned().collect();
        let chitchat = self.handle.chitchat();
        let chitchat = chitchat.lock().await;
        let last_seen = self
            .last_seen
            .lock()
            .map(|seen| seen.clone())
            .unwrap_or_default();
        let mut newest: BTreeMap<String, SeenNode> = BTreeMap::new();
        for (id, state) in chitchat.node_states() {
            let node_id = id.node_id.to_string();
            let is_live = live.contains(id);
            let seen = SeenNode {
                member: Member::from_state(id, state),
                live: is_live,
                last_seen: match last_seen.get(&node_id) {
                    Some(seen) if !is_live => *seen,
                    _ => Utc::now(),
                },
            };
            match newest.get(&node_id) {
                Some(existing) if existing.member.generation >= id.generation_id => {}
                _ => {
                    newest.insert(node_id, seen);
                }
            }
        }
        newest.into_values().collect()
    }

    pub async fn set(&self, key: &str, value: String) {
        self.handle
            .chitchat()
            .lock()
            .await
            .self_node_state()
            .set(key, value);
    }

    /// Tells peers this node is leaving, so they drop it from their live set within a round.
    pub async fn announce_leaving(&self) {
        self.set(keys::LEAVING, "true".to_string()).await;
    }

    /// Waits up to `within` for peers to have gossiped with us once more, then stops gossip.
    pub async fn shutdown(self, within: Duration) {
        tokio::time::sleep(within).await;
        self.watcher.abort();
        if let Err(error) = self.handle.shutdown().await {
            tracing::warn!(error = %error, "gossip did not shut down cleanly");
        }
    }
}

/// How long gossip keeps a dead node marked for deletion before it forgets it.
const MARKED_FOR_DELETION: Duration = Duration::from_secs(3600);

/// Notes `live` nodes as seen `now`, and forgets the nodes not seen for `kept` (a node id that
/// is gone for good, as every restart on a new data dir makes).
fn note_seen(
    seen: &mut HashMap<String, DateTime<Utc>>,
    live: &[(String, u64)],
    now: DateTime<Utc>,
    kept: Duration,
) {
    for (node_id, _) in live {
        seen.insert(node_id.clone(), now);
    }
    let kept = chrono::Duration::from_std(kept).unwrap_or(chrono::Duration::MAX);
    seen.retain(|_, at| now.signed_duration_since(*at) <= kept);
}

/// Logs membership changes (not key-value updates) and keeps `last_seen` fresh.
async fn watch_members(
    mut live_rx: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    last_seen: Arc<Mutex<HashMap<String, DateTime<Utc>>>>,
    kept: Duration,
) {
    let mut previous: Vec<(String, u64)> = Vec::new();
    loop {
        let current: Vec<(String, u64)> = live_rx
            .borrow_and_update()
            .keys()
            .map(|id| (id.node_id.to_string(), id.generation_id))
            .collect();
        if let Ok(mut seen) = last_seen.lock() {
            note_seen(&mut seen, &current, Utc::now(), kept);
        }
        if current != previous {
            for joined in current.iter().filter(|node| !previous.contains(node)) {
                tracing::info!(node = %joined.0, generation = joined.1, "node is live");
            }
            for left in previous.iter().filter(|node| !current.contains(node)) {
                tracing::info!(node = %left.0, generation = left.1, "node is no longer live");
            }
            previous = current;
        }
        if live_rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_not_seen_for_longer_than_kept_are_forgotten() {
        let mut seen = HashMap::new();
        let start = Utc::now();
        let kept = Duration::from_secs(60);
        let a = ("a".to_string(), 1);
        let b = ("b".to_string(), 1);
        note_seen(&mut seen, &[a.clone(), b], start, kept);
        assert_eq!(seen.len(), 2);
        note_seen(
            &mut seen,
            std::slice::from_ref(&a),
            start + chrono::Duration::seconds(60),
            kept,
        );
        assert_eq!(seen.len(), 2, "b was seen 60 s ago: kept");
        note_seen(&mut seen, &[a], start + chrono::Duration::seconds(61), kept);
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["a"]);
    }
}
