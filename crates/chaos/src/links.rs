//! Cut and thinned links: iptables rules that drop some of a node's packets. On loopback (no
//! network namespaces) a partition drops the UDP of the node's gossip port, both what is sent to
//! it and what it sends from it. In network namespaces the rules live in the node's own namespace
//! and drop by address: all its traffic with its peers (a partition), one direction of it, its
//! traffic with Redis, or a share of every packet on its link. Rules added are removed on `heal`
//! and on drop (and go with the namespace in any case).

use crate::netns::Hosts;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// One iptables rule: where it lives, and its chain and match (`INPUT -s ADDR -j DROP`).
#[derive(Clone, Debug)]
pub struct Rule {
    /// The host whose namespace holds it; `None` for the root namespace.
    host: Option<String>,
    spec: Vec<String>,
}

impl Rule {
    fn new(host: Option<&str>, spec: &[&str]) -> Rule {
        Rule {
            host: host.map(str::to_string),
            spec: spec.iter().map(|part| part.to_string()).collect(),
        }
    }
}

/// Which way of a node's traffic with some addresses (its peers', Redis's) is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Both,
    /// What the node sends; it still hears its peers.
    Outgoing,
    /// What the node receives; its peers still hear it.
    Incoming,
}

impl Direction {
    /// What the fault does, for the progress lines.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Both => "cut from its peers",
            Direction::Outgoing => "its packets to its peers dropped",
            Direction::Incoming => "its peers' packets to it dropped",
        }
    }
}

/// The gossip partition on loopback: the UDP to and from `port` dropped in the root namespace.
pub fn loopback_gossip(port: u16) -> Vec<Rule> {
    let port = port.to_string();
    ["--dport", "--sport"]
        .into_iter()
        .map(|flag| Rule::new(None, &["INPUT", "-p", "udp", flag, &port, "-j", "DROP"]))
        .collect()
}

/// Drops what `host` exchanges with `addresses` in `direction`, in its namespace.
pub fn addresses(host: &str, addresses: &[IpAddr], direction: Direction) -> Vec<Rule> {
    let mut rules = Vec::new();
    for address in addresses {
        let address = address.to_string();
        if direction != Direction::Outgoing {
            rules.push(Rule::new(
                Some(host),
                &["INPUT", "-s", &address, "-j", "DROP"],
            ));
        }
        if direction != Direction::Incoming {
            rules.push(Rule::new(
                Some(host),
                &["OUTPUT", "-d", &address, "-j", "DROP"],
            ));
        }
    }
    rules
}

/// Drops each packet `host` sends or receives on its link (`eth0`) with this probability.
pub fn lossy(host: &str, probability: f64) -> Vec<Rule> {
    let probability = format!("{probability:.2}");
    [("INPUT", "-i"), ("OUTPUT", "-o")]
        .into_iter()
        .map(|(chain, interface)| {
            Rule::new(
                Some(host),
                &[
                    chain,
                    interface,
                    "eth0",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &probability,
                    "-j",
                    "DROP",
                ],
            )
        })
        .collect()
}

/// The rules in effect, by node index.
pub struct Links {
    /// The network namespaces' hosts, when nodes run in them.
    hosts: Option<Hosts>,
    active: Vec<(usize, Vec<Rule>)>,
}

impl Links {
    pub fn new(hosts: Option<Hosts>) -> Links {
        Links {
            hosts,
            active: Vec::new(),
        }
    }

    /// Whether iptables works here (installed, and allowed to change the rules).
    pub fn available() -> bool {
        Command::new("iptables")
            .args(["-w", "-L", "INPUT", "-n"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Whether the nodes run in network namespaces (rules by address in their own).
    pub fn in_namespaces(&self) -> bool {
        self.hosts.is_some()
    }

    /// `iptables -w ACTION SPEC…` where the rule lives; true when it succeeded.
    fn iptables(&self, action: &str, rule: &Rule) -> bool {
        let mut args = vec![action.to_string()];
        args.extend(rule.spec.iter().cloned());
        match (&rule.host, &self.hosts) {
            (Some(host), Some(hosts)) => hosts.iptables(host, &args),
            (Some(_), None) => false,
            (None, _) => Command::new("iptables")
                .arg("-w")
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success()),
        }
    }

    /// Adds the rules of a fault on node `node`; false when one was refused (all are removed
    /// on `heal` all the same).
    pub fn cut(&mut self, node: usize, rules: Vec<Rule>) -> bool {
        let mut done = true;
        for rule in &rules {
            done &= self.iptables("-A", rule);
        }
        self.active.push((node, rules));
        done
    }

    /// Removes every rule added for node `node`.
    pub fn heal(&mut self, node: usize) {
        let (healed, kept) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|(index, _)| *index == node);
        self.active = kept;
        for (_, rules) in healed {
            for rule in &rules {
                // Remove every copy, in case a rule was added twice.
                while self.iptables("-D", rule) {}
            }
        }
    }

    /// Whether node `node` has rules in effect.
    pub fn is_cut(&self, node: usize) -> bool {
        self.active.iter().any(|(index, _)| *index == node)
    }

    pub fn heal_all(&mut self) {
        let nodes: Vec<usize> = self.active.iter().map(|(index, _)| *index).collect();
        for node in nodes {
            self.heal(node);
        }
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.heal_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_drop_what_the_fault_names() {
        let peer: IpAddr = [10, 160, 0, 12].into();
        let spec = |rules: Vec<Rule>| -> Vec<String> {
            rules.iter().map(|rule| rule.spec.join(" ")).collect()
        };
        assert_eq!(
            spec(addresses("node0", &[peer], Direction::Outgoing)),
            ["OUTPUT -d 10.160.0.12 -j DROP"]
        );
        assert_eq!(
            spec(addresses("node0", &[peer], Direction::Both)),
            [
                "INPUT -s 10.160.0.12 -j DROP",
                "OUTPUT -d 10.160.0.12 -j DROP"
            ]
        );
        assert_eq!(
            spec(lossy("node0", 0.2))[1],
            "OUTPUT -o eth0 -m statistic --mode random --probability 0.20 -j DROP"
        );
        assert_eq!(
            spec(loopback_gossip(7000))[0],
            "INPUT -p udp --dport 7000 -j DROP"
        );
        assert!(loopback_gossip(7000).iter().all(|rule| rule.host.is_none()));
    }
}
