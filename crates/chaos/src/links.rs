//! Gossip partitions: iptables rules dropping a node's UDP on loopback, both what is sent to its
//! port and what it sends from it. Rules added are removed on `heal` and on drop.

use std::process::{Command, Stdio};

/// The iptables rules this campaign added, by node port.
#[derive(Default)]
pub struct Partitions {
    active: Vec<u16>,
}

fn iptables(action: &str, flag: &str, port: u16) -> bool {
    Command::new("iptables")
        .args(["-w", action, "INPUT", "-p", "udp", flag])
        .arg(port.to_string())
        .args(["-j", "DROP"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

impl Partitions {
    /// Whether iptables works here (installed, and allowed to change the rules).
    pub fn available() -> bool {
        Command::new("iptables")
            .args(["-w", "-L", "INPUT", "-n"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|status| status.success())
            .unwrap_or(false)
    }

    pub fn cut(&mut self, port: u16) -> bool {
        let done = iptables("-A", "--dport", port) && iptables("-A", "--sport", port);
        self.active.push(port);
        done
    }

    pub fn heal(&mut self, port: u16) {
        if let Some(position) = self.active.iter().position(|active| *active == port) {
            self.active.remove(position);
            // Remove every copy, in case a rule was added twice.
            while iptables("-D", "--dport", port) {}
            while iptables("-D", "--sport", port) {}
        }
    }

    pub fn is_cut(&self, port: u16) -> bool {
        self.active.contains(&port)
    }

    pub fn heal_all(&mut self) {
        for port in self.active.clone() {
            self.heal(port);
        }
    }
}

impl Drop for Partitions {
    fn drop(&mut self) {
        self.heal_all();
    }
}
