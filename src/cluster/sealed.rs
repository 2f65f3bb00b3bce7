//! Gossip sealed with the cluster secret: every datagram is chitchat's message encrypted and
//! authenticated with ChaCha20-Poly1305 (ring), under a key derived with HKDF-SHA256 from
//! `cluster.secret` and `cluster.id`. Only nodes that hold the secret can read the gossip or be
//! heard in it; anything else that arrives on the port is dropped, and said so in the log at
//! most once a minute. `cluster.gossip_seal` eases a cluster onto it (see [`GossipSeal`]).
//!
//! chitchat turns its messages into bytes only inside its own UDP socket, so [`SealedUdp`]
//! relays: chitchat's socket is bound on loopback, and for each peer a loopback socket of ours
//! stands in for it. What chitchat sends to that stand-in is sealed and sent from the gossip
//! port to the peer; what the peer sends, once opened, is passed on to chitchat from the
//! stand-in, which chitchat then sees as the sender and answers. Only datagrams that come
//! through a stand-in reach chitchat: another process on the host writing to its loopback
//! socket is not heard.
//!
//! A datagram is `[FORMAT][nonce, 12 bytes][message, encrypted][tag, 16 bytes]`; the nonce is
//! random for each datagram. chitchat fills a message up to the most a datagram carries (a
//! joining node's first state of a cluster of a couple of hundred nodes), which leaves no room
//! for sealing: such a message is compressed (zstd) first and sent as [`FORMAT_COMPRESSED`].
//! There is no replay window: a datagram captured and sent again opens, and is answered, like
//! any; chitchat ignores the heartbeats and versions it has already seen.

use crate::config::GossipSeal;
use crate::metrics::Metrics;
use anyhow::Context;
use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket};
use chitchat::ChitchatEnvelope;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

/// The first byte of every sealed datagram: the format, so that another can follow.
const FORMAT: u8 = 1;
/// The first byte of a sealed datagram whose message was compressed (zstd) before it was
/// sealed: only a message too large to fit sealed as it is goes so, so that every message a
/// node of the first sealed version could read still reaches it as [`FORMAT`].
const FORMAT_COMPRESSED: u8 = 2;
/// How every plain chitchat message begins: its magic number, 45139, little-endian.
const PLAIN_MAGIC: [u8; 2] = 45_139_u16.to_le_bytes();
const _: () = assert!(PLAIN_MAGIC[0] != FORMAT && PLAIN_MAGIC[0] != FORMAT_COMPRESSED);
/// zstd's level for a message compressed before sealing (rare: only the largest).
const COMPRESSION_LEVEL: i32 = 3;
/// The most a UDP datagram carries over IPv4 (IPv6 carries 20 bytes more).
const MAX_DATAGRAM: usize = 65_507;
/// What sealing adds to a message.
const OVERHEAD: usize = 1 + NONCE_LEN + 16;
/// How often dropped datagrams are logged at most.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// The most peers with a stand-in at once; past it the stand-in used least lately goes (the
/// peer gets a new one when it is heard from or written to again).
const MAX_PEERS: usize = 1024;

/// The gossip transport: UDP on the gossip port, sealed as `seal` says.
pub struct SealedUdp {
    key: Arc<LessSafeKey>,
    seal: GossipSeal,
    metrics: Option<Arc<Metrics>>,
}

impl SealedUdp {
    /// The transport of the cluster `cluster_id` whose nodes share `secret`.
    pub fn new(secret: &str, cluster_id: &str, seal: GossipSeal) -> anyhow::Result<SealedUdp> {
        let info = [cluster_id.as_bytes()];
        let prk =
            hkdf::Salt::new(hkdf::HKDF_SHA256, b"order-process gossip").extract(secret.as_bytes());
        let okm = prk
            .expand(&info, &CHACHA20_POLY1305)
            .map_err(|_| anyhow::anyhow!("cannot derive the gossip key"))?;
        Ok(SealedUdp {
            key: Arc::new(LessSafeKey::new(UnboundKey::from(okm))),
            seal,
            metrics: None,
        })
    }

    /// Counts the datagrams it drops in `metrics` (`order_process_gossip_dropped_total`).
    pub fn counting_drops(mut self, metrics: Arc<Metrics>) -> SealedUdp {
        self.metrics = Some(metrics);
        self
    }
}

#[async_trait]
impl Transport for SealedUdp {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let public = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("failed to bind to {listen_addr}/UDP for gossip"))?;
        let local_addr = public.local_addr()?;
        let public = Arc::new(public);
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let chitchat = UdpSocket::open(loopback).await?;
        let relays = Arc::new(Relays {
            public: Arc::clone(&public),
            chitchat: chitchat.local_addr()?,
            key: Arc::clone(&self.key),
            seal: self.seal,
            stand_ins: Mutex::new(StandIns::default()),
        });
        let receiver =
            tokio::spawn(receive(Arc::clone(&relays), self.metrics.clone())).abort_handle();
        Ok(Box::new(SealedSocket {
            chitchat,
            local_addr,
            relays,
            receiver,
        }))
    }
}

/// The socket chitchat gossips through.
struct SealedSocket {
    /// chitchat's own socket, on loopback.
    chitchat: UdpSocket,
    /// The gossip port's address.
    local_addr: SocketAddr,
    relays: Arc<Relays>,
    /// The task that reads the gossip port.
    receiver: AbortHandle,
}

impl Drop for SealedSocket {
    fn drop(&mut self) {
        self.receiver.abort();
        self.relays.close();
    }
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.local_addr)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let stand_in = self.relays.stand_in(to)?;
        self.chitchat.send(stand_in, envelope).await
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let received = self.chitchat.recv().await?;
            if let Some(peer) = self.relays.peer_of(received.from_addr) {
                return Ok(RecvOutcome {
                    from_addr: peer,
                    ..received
                });
            }
            debug!(from = %received.from_addr, "dropped a gossip message that came through no peer's stand-in");
        }
    }
}

/// What the relay tasks share.
struct Relays {
    /// The gossip port.
    public: Arc<tokio::net::UdpSocket>,
    /// chitchat's loopback socket.
    chitchat: SocketAddr,
    key: Arc<LessSafeKey>,
    seal: GossipSeal,
    stand_ins: Mutex<StandIns>,
}

/// The stand-in of each peer, and the peer of each stand-in.
#[derive(Default)]
struct StandIns {
    by_peer: HashMap<SocketAddr, StandIn>,
    by_local: HashMap<SocketAddr, SocketAddr>,
}

struct StandIn {
    socket: Arc<tokio::net::UdpSocket>,
    local: SocketAddr,
    task: AbortHandle,
    used: Instant,
}

impl Relays {
    fn stand_ins(&self) -> MutexGuard<'_, StandIns> {
        // Only ever changed by map operations, which do not panic halfway.
        self.stand_ins
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The loopback socket that stands in for `peer`, made (with the task that carries what
    /// chitchat sends it to the peer) when the peer has none.
    fn stand_in_socket(
        self: &Arc<Self>,
        peer: SocketAddr,
    ) -> anyhow::Result<(Arc<tokio::net::UdpSocket>, SocketAddr)> {
        let mut stand_ins = self.stand_ins();
        if let Some(stand_in) = stand_ins.by_peer.get_mut(&peer) {
            stand_in.used = Instant::now();
            return Ok((Arc::clone(&stand_in.socket), stand_in.local));
        }
        if stand_ins.by_peer.len() >= MAX_PEERS {
            let oldest = stand_ins
                .by_peer
                .iter()
                .min_by_key(|(_, stand_in)| stand_in.used)
                .map(|(peer, _)| *peer);
            if let Some(gone) = oldest.and_then(|peer| stand_ins.by_peer.remove(&peer)) {
                gone.task.abort();
                stand_ins.by_local.remove(&gone.local);
            }
        }
        let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
            .and_then(tokio::net::UdpSocket::from_std)
            .context("cannot open a loopback socket for a gossip peer")?;
        let socket = Arc::new(socket);
        let local = socket.local_addr()?;
        let task =
            tokio::spawn(forward(Arc::clone(self), Arc::clone(&socket), peer)).abort_handle();
        stand_ins.by_local.insert(local, peer);
        stand_ins.by_peer.insert(
            peer,
            StandIn {
                socket: Arc::clone(&socket),
                local,
                task,
                used: Instant::now(),
            },
        );
        Ok((socket, local))
    }

    /// Where chitchat sends what is for `peer`.
    fn stand_in(self: &Arc<Self>, peer: SocketAddr) -> anyhow::Result<SocketAddr> {
        self.stand_in_socket(peer).map(|(_, local)| local)
    }

    /// The peer the stand-in at `local` stands in for.
    fn peer_of(&self, local: SocketAddr) -> Option<SocketAddr> {
        self.stand_ins().by_local.get(&local).copied()
    }

    /// Stops every stand-in's task.
    fn close(&self) {
        let mut stand_ins = self.stand_ins();
        for (_, stand_in) in stand_ins.by_peer.drain() {
            stand_in.task.abort();
        }
        stand_ins.by_local.clear();
    }
}

/// Carries what chitchat sends to `socket` (the stand-in of `peer`) to the peer, sealed unless
/// this node sends plain gossip.
async fn forward(relays: Arc<Relays>, socket: Arc<tokio::net::UdpSocket>, peer: SocketAddr) {
    let random = SystemRandom::new();
    let mut buf = vec![0; MAX_DATAGRAM];
    let mut sealed = Vec::with_capacity(MAX_DATAGRAM);
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                debug!(error = %error, "cannot read a gossip stand-in socket");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if from != relays.chitchat {
            continue;
        }
        let Some(message) = buf.get(..len) else {
            continue;
        };
        let datagram = if relays.seal.sends_sealed() {
            if let Err(error) = seal(&relays.key, &random, message, &mut sealed) {
                warn!(peer = %peer, error = %error, "cannot seal a gossip message");
                continue;
            }
            &sealed[..]
        } else {
            message
        };
        if let Err(error) = relays.public.send_to(datagram, peer).await {
            debug!(peer = %peer, error = %error, "cannot send a gossip message");
        }
    }
}

/// Reads the gossip port: what opens (or, when this node hears plain gossip, what is not
/// sealed) goes on to chitchat from the sender's stand-in.
async fn receive(relays: Arc<Relays>, metrics: Option<Arc<Metrics>>) {
    let mut buf = vec![0; MAX_DATAGRAM];
    let mut inflated = Vec::new();
    let mut dropped = Dropped::default();
    loop {
        let (len, from) = match relays.public.recv_from(&mut buf).await {
            Ok(received) => received,
            // As chitchat's own socket: these pass (a peer that went away).
            Err(error) => {
                debug!(error = %error, "cannot read the gossip port");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(datagram) = buf.get_mut(..len) else {
            continue;
        };
        // Plain gossip begins with chitchat's magic number, which no sealed datagram does: a
        // node that hears plain gossip passes on only that, and drops (and counts) the rest
        // that does not open, as a node hearing sealed gossip alone does.
        let message: &[u8] = if relays.seal.hears_plain() && datagram.starts_with(&PLAIN_MAGIC) {
            datagram
        } else {
            match open(&relays.key, datagram, &mut inflated) {
                Ok(message) => message,
                Err(why) => {
                    dropped.note(from, why);
                    if let Some(metrics) = &metrics {
                        metrics.gossip_dropped();
                    }
                    continue;
                }
            }
        };
        let stand_in = match relays.stand_in_socket(from) {
            Ok((socket, _)) => socket,
            Err(error) => {
                warn!(peer = %from, error = %error, "cannot pass on a gossip message");
                continue;
            }
        };
        if let Err(error) = stand_in.send_to(message, relays.chitchat).await {
            debug!(peer = %from, error = %error, "cannot pass on a gossip message");
        }
    }
}

/// Datagrams dropped since the last warning.
#[derive(Default)]
struct Dropped {
    count: u64,
    warned: Option<Instant>,
}

impl Dropped {
    fn note(&mut self, from: SocketAddr, why: &str) {
        self.count += 1;
        if self.warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        warn!(from = %from, why, dropped = self.count, "dropped gossip datagrams not sealed with this cluster's secret (a node with another cluster.secret or cluster.id, one of a version or a cluster.gossip_seal that sends plain gossip, or not a node)");
        self.count = 0;
        self.warned = Some(Instant::now());
    }
}

/// Why [`open`] found no sealed message: the datagram is not sealed at all.
const NOT_SEALED: &str = "not sealed";

/// `message` sealed under `key` into `sealed`; compressed first when it would not fit in a
/// datagram sealed as it is.
fn seal(
    key: &LessSafeKey,
    random: &SystemRandom,
    message: &[u8],
    sealed: &mut Vec<u8>,
) -> anyhow::Result<()> {
    if message.len() + OVERHEAD <= MAX_DATAGRAM {
        return seal_as(FORMAT, key, random, message, sealed);
    }
    let compressed = zstd::bulk::compress(message, COMPRESSION_LEVEL)
        .context("cannot compress a gossip message")?;
    anyhow::ensure!(
        compressed.len() + OVERHEAD <= MAX_DATAGRAM,
        "a gossip message of {} bytes is too large for a datagram once sealed, even compressed \
         (to {} bytes)",
        message.len(),
        compressed.len()
    );
    seal_as(FORMAT_COMPRESSED, key, random, &compressed, sealed)
}

/// `message` sealed under `key` into `sealed` as a datagram of `format`.
fn seal_as(
    format: u8,
    key: &LessSafeKey,
    random: &SystemRandom,
    message: &[u8],
    sealed: &mut Vec<u8>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        message.len() + OVERHEAD <= MAX_DATAGRAM,
        "a gossip message of {} bytes is too large for a datagram once sealed",
        message.len()
    );
    let mut nonce = [0; NONCE_LEN];
    random
        .fill(&mut nonce)
        .map_err(|_| anyhow::anyhow!("no randomness for a gossip nonce"))?;
    sealed.clear();
    sealed.push(format);
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(message);
    let body = sealed
        .get_mut(1 + NONCE_LEN..)
        .ok_or_else(|| anyhow::anyhow!("cannot seal a gossip message"))?;
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from([format]),
            body,
        )
        .map_err(|_| anyhow::anyhow!("cannot seal a gossip message"))?;
    sealed.extend_from_slice(tag.as_ref());
    Ok(())
}

/// The message sealed in `datagram` under `key` (opened in place, or decompressed into
/// `inflated`), or why there is none.
fn open<'a>(
    key: &LessSafeKey,
    datagram: &'a mut [u8],
    inflated: &'a mut Vec<u8>,
) -> Result<&'a [u8], &'static str> {
    let format = match datagram.first() {
        Some(&format) if format == FORMAT || format == FORMAT_COMPRESSED => format,
        _ => return Err(NOT_SEALED),
    };
    if datagram.len() < OVERHEAD {
        return Err(NOT_SEALED);
    }
    let (head, body) = datagram.split_at_mut(1 + NONCE_LEN);
    let nonce = head
        .get(1..)
        .and_then(|nonce| Nonce::try_assume_unique_for_key(nonce).ok())
        .ok_or(NOT_SEALED)?;
    let message = key
        .open_in_place(nonce, Aad::from([format]), body)
        .map_err(|_| "sealed with another key, or altered")?;
    if format == FORMAT {
        return Ok(message);
    }
    // No message chitchat sends is larger than a datagram.
    *inflated = zstd::bulk::decompress(message, MAX_DATAGRAM)
        .map_err(|_| "sealed, but its compressed message does not decompress")?;
    Ok(inflated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chitchat::{ChitchatMessage, ProtocolVersion};

    /// A message whose version tells it apart: the test sends the ones to be dropped as V0.
    fn envelope(version: ProtocolVersion) -> ChitchatEnvelope {
        ChitchatEnvelope {
            version,
            message: ChitchatMessage::BadCluster,
        }
    }

    async fn socket(transport: &SealedUdp) -> Box<dyn Socket> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        transport.open(any).await.expect("a gossip socket")
    }

    async fn next(receiver: &mut Box<dyn Socket>) -> RecvOutcome {
        tokio::time::timeout(Duration::from_secs(10), receiver.recv())
            .await
            .expect("a datagram within 10 s")
            .expect("received")
    }

    #[tokio::test]
    async fn only_messages_sealed_with_the_same_secret_and_cluster_arrive_and_are_answered() {
        let ours = SealedUdp::new("the secret", "orders", GossipSeal::On).expect("a transport");
        let mut receiver = socket(&ours).await;
        let to = receiver.local_addr().expect("an address");

        // Each of these must be dropped: another secret, another cluster, plain gossip, a
        // sealed message with one bit changed.
        for (secret, cluster) in [("another", "orders"), ("the secret", "other")] {
            let transport = SealedUdp::new(secret, cluster, GossipSeal::On).expect("a transport");
            let mut other = socket(&transport).await;
            other
                .send(to, envelope(ProtocolVersion::V0))
                .await
                .expect("sent");
        }
        let plain =
            SealedUdp::new("the secret", "orders", GossipSeal::Accept).expect("a transport");
        let mut plain = socket(&plain).await;
        plain
            .send(to, envelope(ProtocolVersion::V0))
            .await
            .expect("sent");
        let raw = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("a socket");
        let mut altered = Vec::new();
        seal(&ours.key, &SystemRandom::new(), b"anything", &mut altered).expect("sealed");
        if let Some(last) = altered.last_mut() {
            *last ^= 1;
        }
        raw.send_to(&altered, to).await.expect("sent");

        // Sealed right, sent last: the first to arrive, from the sender's gossip port.
        let mut sender = socket(&ours).await;
        let from = sender.local_addr().expect("an address");
        sender
            .send(to, envelope(ProtocolVersion::V1))
            .await
            .expect("sent");
        let received = next(&mut receiver).await;
        assert_eq!(received.envelope, envelope(ProtocolVersion::V1));
        assert_eq!(received.from_addr, from);

        // The answer to that address reaches the sender.
        receiver
            .send(received.from_addr, envelope(ProtocolVersion::V1))
            .await
            .expect("answered");
        assert_eq!(next(&mut sender).await.from_addr, to);
    }

    #[tokio::test]
    async fn a_node_easing_onto_sealed_gossip_hears_both_kinds() {
        let sealed = SealedUdp::new("s", "c", GossipSeal::On).expect("a transport");
        let plain = SealedUdp::new("s", "c", GossipSeal::Accept).expect("a transport");
        let both = SealedUdp::new("s", "c", GossipSeal::Send).expect("a transport");
        for hearing in [&plain, &both] {
            let mut receiver = socket(hearing).await;
            let to = receiver.local_addr().expect("an address");
            for sending in [&sealed, &plain] {
                let mut sender = socket(sending).await;
                sender
                    .send(to, envelope(ProtocolVersion::V1))
                    .await
                    .expect("sent");
                let received = next(&mut receiver).await;
                assert_eq!(received.from_addr, sender.local_addr().expect("an address"));
            }
        }
    }

    #[tokio::test]
    async fn a_node_hearing_plain_gossip_drops_and_counts_what_is_neither_plain_nor_ours() {
        let metrics = Arc::new(Metrics::new());
        let both = SealedUdp::new("s", "c", GossipSeal::Send)
            .expect("a transport")
            .counting_drops(Arc::clone(&metrics));
        let mut receiver = socket(&both).await;
        let to = receiver.local_addr().expect("an address");
        // Each sender kept until the end: its relays go with it.
        let stranger = SealedUdp::new("another", "c", GossipSeal::On).expect("a transport");
        let mut stranger = socket(&stranger).await;
        stranger
            .send(to, envelope(ProtocolVersion::V0))
            .await
            .expect("sent");
        let raw = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("a socket");
        raw.send_to(b"GET / HTTP/1.1\r\n\r\n", to)
            .await
            .expect("sent");
        let plain = SealedUdp::new("s", "c", GossipSeal::Accept).expect("a transport");
        let mut plain = socket(&plain).await;
        // Sent once the two before it were counted, so that it arrives after them.
        let counted = || {
            metrics
                .render()
                .is_ok_and(|text| text.contains("order_process_gossip_dropped_total 2"))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !counted() {
            assert!(
                Instant::now() < deadline,
                "the two were not dropped and counted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        plain
            .send(to, envelope(ProtocolVersion::V1))
            .await
            .expect("sent");
        assert_eq!(
            next(&mut receiver).await.envelope,
            envelope(ProtocolVersion::V1)
        );
        let text = metrics.render().expect("the metrics render");
        assert!(
            text.contains("order_process_gossip_dropped_total 2"),
            "{}",
            text.lines()
                .filter(|line| line.contains("gossip"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    #[tokio::test]
    async fn peers_on_ipv6_addresses_are_heard_and_answered() {
        let transport = SealedUdp::new("s", "c", GossipSeal::On).expect("a transport");
        let ipv6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0));
        let mut receiver = transport.open(ipv6).await.expect("a gossip socket on ::1");
        let mut sender = transport.open(ipv6).await.expect("a gossip socket on ::1");
        let to = receiver.local_addr().expect("an address");
        let from = sender.local_addr().expect("an address");
        assert!(to.is_ipv6() && from.is_ipv6());
        sender
            .send(to, envelope(ProtocolVersion::V1))
            .await
            .expect("sent");
        let received = next(&mut receiver).await;
        assert_eq!(received.from_addr, from);
        receiver
            .send(from, envelope(ProtocolVersion::V1))
            .await
            .expect("answered");
        assert_eq!(next(&mut sender).await.from_addr, to);
    }

    /// A Syn whose cluster id makes its envelope `len` bytes long, as chitchat sends it (the
    /// envelope's own bytes measured through a sender of plain gossip).
    async fn syn_of_len(len: usize) -> ChitchatEnvelope {
        let syn = |cluster_id: String| ChitchatEnvelope {
            version: ProtocolVersion::V1,
            message: ChitchatMessage::Syn {
                cluster_id,
                digest: Default::default(),
            },
        };
        let plain = SealedUdp::new("s", "c", GossipSeal::Accept).expect("a transport");
        let mut sender = socket(&plain).await;
        let raw = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("a socket");
        let to = raw.local_addr().expect("an address");
        sender.send(to, syn("x".repeat(100))).await.expect("sent");
        let mut buf = vec![0; MAX_DATAGRAM];
        let (sent, _) = tokio::time::timeout(Duration::from_secs(10), raw.recv_from(&mut buf))
            .await
            .expect("a datagram within 10 s")
            .expect("received");
        syn("x".repeat(len - (sent - 100)))
    }

    #[tokio::test]
    async fn a_message_that_fills_a_datagram_arrives_sealed() {
        // chitchat fills a joining node's first state up to the most a datagram carries.
        let transport = SealedUdp::new("s", "c", GossipSeal::On).expect("a transport");
        let mut receiver = socket(&transport).await;
        let mut sender = socket(&transport).await;
        let to = receiver.local_addr().expect("an address");
        let full = syn_of_len(MAX_DATAGRAM - 7).await;
        let ChitchatMessage::Syn { cluster_id, .. } = &full.message else {
            unreachable!("a Syn")
        };
        let expected = cluster_id.clone();
        sender.send(to, full).await.expect("sent");
        let received = next(&mut receiver).await;
        let arrived = matches!(
            &received.envelope.message,
            ChitchatMessage::Syn { cluster_id, .. } if *cluster_id == expected
        );
        assert!(arrived, "another message arrived");
    }

    #[test]
    fn only_a_message_too_large_to_seal_as_it_is_is_compressed() {
        let ours = SealedUdp::new("the secret", "orders", GossipSeal::On).expect("a transport");
        let random = SystemRandom::new();
        let mut sealed = Vec::new();
        let mut inflated = Vec::new();
        let fits = vec![b'n'; MAX_DATAGRAM - OVERHEAD];
        seal(&ours.key, &random, &fits, &mut sealed).expect("sealed");
        assert_eq!((sealed[0], sealed.len()), (FORMAT, MAX_DATAGRAM));
        assert_eq!(open(&ours.key, &mut sealed, &mut inflated), Ok(&fits[..]));

        let large: Vec<u8> = (0..MAX_DATAGRAM - 1)
            .map(|i| b"node-7f3a:http_addr=10.0.0.5:8080;"[i % 34])
            .collect();
        seal(&ours.key, &random, &large, &mut sealed).expect("sealed");
        assert_eq!(sealed[0], FORMAT_COMPRESSED);
        assert!(sealed.len() < MAX_DATAGRAM / 10, "{}", sealed.len());
        let mut relabelled = sealed.clone();
        relabelled[0] = FORMAT;
        assert!(open(&ours.key, &mut relabelled, &mut inflated).is_err());
        assert_eq!(open(&ours.key, &mut sealed, &mut inflated), Ok(&large[..]));

        // Bytes that do not compress cannot go at all.
        let mut noise = vec![0; MAX_DATAGRAM - 1];
        random.fill(&mut noise).expect("random bytes");
        assert!(seal(&ours.key, &random, &noise, &mut sealed).is_err());
    }

    #[test]
    fn a_sealed_message_does_not_show_the_message_and_opens_to_it() {
        let ours = SealedUdp::new("the secret", "orders", GossipSeal::On).expect("a transport");
        let message = b"the gossip message".to_vec();
        let mut sealed = Vec::new();
        seal(&ours.key, &SystemRandom::new(), &message, &mut sealed).expect("sealed");
        assert_eq!(sealed.len(), message.len() + OVERHEAD);
        assert!(!sealed
            .windows(message.len())
            .any(|window| window == message));
        let theirs = SealedUdp::new("another", "orders", GossipSeal::On).expect("a transport");
        let mut inflated = Vec::new();
        assert!(open(&theirs.key, &mut sealed.clone(), &mut inflated).is_err());
        assert_eq!(
            open(&ours.key, &mut sealed, &mut inflated),
            Ok(&message[..])
        );
        assert_eq!(
            open(&ours.key, &mut message.clone(), &mut inflated),
            Err(NOT_SEALED)
        );
    }
}
