//! Loopback ports free for both TCP and UDP (gossip uses UDP on a node's HTTP port).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
use std::sync::Mutex;

/// Ports handed out by this process, so two concurrent users never get the same one.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port that is free for both TCP and UDP right now, never handed out before by
/// this process.
pub fn free_port() -> std::io::Result<u16> {
    free_port_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// A port of `host` (a loopback address) free for both TCP and UDP right now, never handed
/// out before by this process.
pub fn free_port_on(host: IpAddr) -> std::io::Result<u16> {
    for _ in 0..100 {
        let tcp = TcpListener::bind((host, 0))?;
        let port = tcp.local_addr()?.port();
        let Ok(udp) = UdpSocket::bind((host, port)) else {
            continue;
        };
        drop((tcp, udp));
        let mut handed_out = HANDED_OUT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if handed_out.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(format!(
        "no port free for both TCP and UDP on {host}"
    )))
}

/// A loopback port free for TCP whose `port + offset` is free too (a Redis Cluster node's bus
/// listens there), both never handed out before by this process.
pub fn free_port_pair(offset: u16) -> std::io::Result<u16> {
    for _ in 0..100 {
        let port = free_port()?;
        let Some(other) = port.checked_add(offset) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", other)).is_err() {
            continue;
        }
        let mut handed_out = HANDED_OUT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if handed_out.get_or_insert_with(HashSet::new).insert(other) {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(format!(
        "no pair of free ports {offset} apart on 127.0.0.1"
    )))
}
