//! Hosts with addresses of their own: a network namespace per node and one for Redis, on a bridge
//! whose address (the gateway) is in this, the root, namespace, made and removed with the repo's
//! `scripts/netns`. The campaign reaches every host over the bridge and serves the ledger on the
//! gateway address; the hosts reach each other and the gateway, nothing else.
//!
//! The network is named after this process (`c{pid}`) and takes a /24 of 10.160.0.0/11 derived
//! from the pid that no interface here uses, claimed with a lock file while the campaign runs, so
//! two campaigns can run at once. Dropping the [`Network`] removes everything `scripts/netns`
//! made (`down` is idempotent); the processes inside must be killed before.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The host the first Redis server runs in (the replicas of sentinel mode: `redis1`, `redis2`).
pub const REDIS_HOST: &str = "redis";

/// The host node `index` runs in.
pub fn node_host(index: usize) -> String {
    format!("node{index}")
}

/// How many /24s of 10.160.0.0/11 a network may take.
const SUBNETS: u32 = 32 * 256;

/// `scripts/netns`: next to the sources this binary was built from, else under the current dir.
fn script() -> PathBuf {
    let built = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/netns"));
    if built.is_file() {
        built
    } else {
        PathBuf::from("scripts/netns")
    }
}

/// Runs `scripts/netns ARGS…`; its stderr (the reason) when it fails.
fn run_script(args: &[String]) -> Result<(), String> {
    let output = Command::new(script())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run {}: {error}", script().display()))?;
    if output.status.success() {
        Ok(())
    } else {
        let reason = String::from_utf8_lossy(&output.stderr).trim().to_string();
        Err(if reason.is_empty() {
            format!("scripts/netns {}: {}", args.join(" "), output.status)
        } else {
            reason
        })
    }
}

/// Runs commands inside the hosts of one network; cheap to clone.
#[derive(Clone, Debug)]
pub struct Hosts {
    net: String,
}

impl Hosts {
    /// The command prefix that runs a program inside `host` (`scripts/netns exec NET HOST`); the
    /// program's pid is the one the prefix starts with.
    pub fn launcher(&self, host: &str) -> Vec<String> {
        vec![
            script().display().to_string(),
            "exec".into(),
            self.net.clone(),
            host.into(),
        ]
    }

    /// Runs `iptables -w ARGS…` inside `host`; true when it succeeded.
    pub fn iptables(&self, host: &str, args: &[String]) -> bool {
        let launcher = self.launcher(host);
        Command::new(&launcher[0])
            .args(&launcher[1..])
            .args(["iptables", "-w"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

/// The bridge, the hosts on it and their addresses; removed when dropped.
pub struct Network {
    pub hosts: Hosts,
    /// The bridge's address, in the root namespace.
    pub gateway: IpAddr,
    /// Each host's name and address.
    addresses: Vec<(String, IpAddr)>,
    /// Held while the network lives: no other campaign takes its subnet.
    _claim: File,
}

impl Network {
    /// Makes the hosts named (each gets its own namespace and address), or says why namespaces
    /// cannot be made here (`scripts/netns check`).
    pub fn up(names: &[String]) -> Result<Network, String> {
        run_script(&["check".into()])?;
        let pid = std::process::id();
        let net = format!("c{}", pid % 10_000_000);
        let (prefix, claim) = free_subnet(pid)?;
        let addresses: Vec<(String, IpAddr)> = names
            .iter()
            .enumerate()
            .map(|(index, name)| (name.clone(), host_address(prefix, index)))
            .collect();
        let mut args = vec![
            "up".to_string(),
            net.clone(),
            format!("{}/24", Ipv4Addr::from(prefix | 1)),
        ];
        args.extend(
            addresses
                .iter()
                .map(|(name, address)| format!("{name}={address}")),
        );
        // A failed `up` removes what it made itself.
        run_script(&args)?;
        Ok(Network {
            hosts: Hosts { net },
            gateway: IpAddr::V4(Ipv4Addr::from(prefix | 1)),
            addresses,
            _claim: claim,
        })
    }

    pub fn name(&self) -> &str {
        &self.hosts.net
    }

    /// The address of `host` (one of the names it was made with).
    pub fn address(&self, host: &str) -> Option<IpAddr> {
        self.addresses
            .iter()
            .find(|(name, _)| name == host)
            .map(|(_, address)| *address)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if let Err(error) = run_script(&["down".into(), self.hosts.net.clone()]) {
            eprintln!(
                "chaos: cannot remove the network {}: {error}",
                self.hosts.net
            );
        }
    }
}

/// The address of the `index`th host of the /24 `prefix`: .11, .12, …
fn host_address(prefix: u32, index: usize) -> IpAddr {
    let offset = u32::try_from(index).unwrap_or(0).min(200) + 11;
    IpAddr::V4(Ipv4Addr::from(prefix | offset))
}

/// The /24 of 10.160.0.0/11 at position `slot`, as the address of its network.
fn subnet(slot: u32) -> u32 {
    u32::from(Ipv4Addr::new(10, 160, 0, 0)) + ((slot % SUBNETS) << 8)
}

/// Where the lock files that claim subnets go: `/run/lock` (a tmpfs, as scripts/test uses),
/// else the temp dir.
fn lock_dir() -> PathBuf {
    let run = PathBuf::from("/run/lock");
    if run.is_dir() {
        run
    } else {
        std::env::temp_dir()
    }
}

/// A /24 no interface here uses, tried from the one the pid names, and the lock file that claims
/// it for this campaign.
fn free_subnet(pid: u32) -> Result<(u32, File), String> {
    let used = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .map_err(|error| format!("cannot list the addresses in use: {error}"))?;
    for step in 0..256 {
        let prefix = subnet(pid.wrapping_add(step));
        let network = Ipv4Addr::from(prefix);
        let [a, b, c, _] = network.octets();
        if used.contains(&format!(" {a}.{b}.{c}.")) {
            continue;
        }
        let path = lock_dir().join(format!("order-process-chaos-{a}.{b}.{c}.lock"));
        let Ok(file) = File::create(&path) else {
            continue;
        };
        if file.try_lock().is_ok() {
            return Ok((prefix, file));
        }
    }
    Err("no free 10.160.0.0/11 subnet for the hosts".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_stay_in_their_range() {
        let first = Ipv4Addr::from(subnet(0));
        assert_eq!(first, Ipv4Addr::new(10, 160, 0, 0));
        let last = Ipv4Addr::from(subnet(SUBNETS - 1));
        assert_eq!(last, Ipv4Addr::new(10, 191, 255, 0));
        assert_eq!(subnet(SUBNETS), subnet(0));
        assert_eq!(
            host_address(subnet(1), 2),
            IpAddr::V4(Ipv4Addr::new(10, 160, 1, 13))
        );
    }
}
