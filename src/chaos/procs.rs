//! The processes a campaign runs and the faults it makes with them: a `redis-server` with an
//! append-only file, order-process nodes started from the built binary, signals sent by pid, and
//! gossip partitions made with iptables. Everything started here is killed by pid when dropped,
//! and every iptables rule added is removed.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A loopback port free for both TCP and UDP right now (gossip uses UDP on the HTTP port).
pub fn free_port() -> std::io::Result<u16> {
    for _ in 0..100 {
        let tcp = TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(
        "no port free for both TCP and UDP on 127.0.0.1",
    ))
}

/// Sends a signal by name (`STOP`, `CONT`, `TERM`) with `kill -SIG pid`.
pub fn signal(pid: u32, name: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

fn append(path: &Path) -> std::io::Result<std::fs::File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// SIGKILLs and reaps a child (`Child::kill` sends SIGKILL to its pid).
fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    appendfsync: String,
    child: Option<Child>,
}

impl Redis {
    pub async fn start(dir: PathBuf, appendfsync: &str) -> std::io::Result<Redis> {
        std::fs::create_dir_all(&dir)?;
        let mut redis = Redis {
            port: free_port()?,
            dir,
            appendfsync: appendfsync.to_string(),
            child: None,
        };
        redis.launch().await?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    async fn launch(&mut self) -> std::io::Result<()> {
        let log = append(&self.dir.join("redis.log"))?;
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", &self.appendfsync])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.ping() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(std::io::Error::other(format!(
            "redis-server on port {} did not answer PING",
            self.port
        )))
    }

    /// True when Redis answers PING (it answers LOADING while it reads its append-only file).
    fn ping(&self) -> bool {
        use std::io::Read;
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut answer = [0u8; 7];
        stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
    }

    /// SIGKILL: whatever Redis has not written to its append-only file is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// Starts again on the same port and directory, reading the append-only file.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.launch().await
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One order-process node: its own directory (config, data, log), port and process.
pub struct Node {
    pub index: usize,
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
    join: Vec<u16>,
    child: Option<Child>,
    pub paused: bool,
    launches: usize,
}

impl Node {
    pub fn new(bin: &Path, dir: PathBuf, index: usize, config: &str) -> std::io::Result<Node> {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("config.toml"), config)?;
        Ok(Node {
            index,
            port: free_port()?,
            dir,
            bin: bin.to_path_buf(),
            join: Vec::new(),
            child: None,
            paused: false,
            launches: 0,
        })
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }

    /// The node id, once the node has written it.
    pub fn service_id(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("data").join("service_id"))
            .ok()
            .map(|text| text.trim().to_string())
    }

    pub fn set_join(&mut self, ports: Vec<u16>) {
        self.join = ports;
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process (same port, same data dir as before).
    pub fn launch(&mut self) -> std::io::Result<()> {
        self.launches += 1;
        let mut log = append(&self.log_path())?;
        writeln!(log, "==== launch {} ====", self.launches)?;
        let mut command = Command::new(&self.bin);
        command
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.dir.join("data"));
        for port in &self.join {
            command.arg("--join").arg(format!("127.0.0.1:{port}"));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
        self.paused = false;
    }

    pub fn signal(&mut self, name: &str) -> bool {
        match self.pid() {
            Some(pid) => {
                let sent = signal(pid, name);
                if sent && name == "STOP" {
                    self.paused = true;
                }
                if sent && name == "CONT" {
                    self.paused = false;
                }
                sent
            }
            None => false,
        }
    }

    /// Polls until the process exits; `None` if it still runs at the deadline.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let status = self.child.as_mut().and_then(|child| child.try_wait().ok()?);
            if let Some(status) = status {
                self.child = None;
                return Some(status);
            }
            if self.child.is_none() || Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Gossip partitions: iptables rules dropping a node's UDP on loopback, both what is sent to its
/// port and what it sends from it. Rules added are removed on `heal` and on drop.
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
